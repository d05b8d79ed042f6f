//! Peer-to-peer messages and chat lines: arbitrary bytes through `PeerMessage::decode` and
//! `ChatMessage::decode` and `ChatFrame::decode` (what a hostile peer can send), and arbitrary messages through encode
//! and decode.
//!
//! Properties: whatever decodes re-encodes to bytes that decode to an equal value; decoding
//! errors are classified; a chat body that decodes is within `MAX_BODY_LEN`.

#![no_main]

use arbitrary::Unstructured;
use common::chat::MAX_BODY_LEN;
use common::{ChatFrame, ChatMessage, PeerMessage};
use libfuzzer_sys::fuzz_target;
use p2p_fuzz::{assert_decode_error_is_bounded, assert_peer_round_trip, peer_message, PEER_TYPES};

fuzz_target!(|data: &[u8]| {
    match PeerMessage::decode(data) {
        Ok(msg) => assert_peer_round_trip(&msg),
        Err(err) => assert_decode_error_is_bounded(data, &err, PEER_TYPES),
    }
    if let Ok(chat) = ChatMessage::decode(data) {
        assert!(chat.body.len() <= MAX_BODY_LEN);
        let bytes = chat.encode();
        let back = ChatMessage::decode(&bytes).unwrap_or_else(|e| {
            panic!(
                "{chat:?} encodes as {:?}: {e}",
                String::from_utf8_lossy(&bytes)
            )
        });
        assert_eq!(back, chat, "decode(encode(chat)) != chat");
        assert_eq!(back.encode(), bytes, "chat encoding is not canonical");
        let checked = ChatMessage::decode_from(&bytes, chat.from, chat.to);
        assert_eq!(checked.as_ref(), Ok(&chat));
    }
    if let Ok(frame) = ChatFrame::decode(data) {
        if let ChatFrame::Message(chat) = &frame {
            assert!(chat.body.len() <= MAX_BODY_LEN);
        }
        let bytes = frame.encode();
        let back = ChatFrame::decode(&bytes).unwrap_or_else(|e| {
            panic!(
                "{frame:?} encodes as {:?}: {e}",
                String::from_utf8_lossy(&bytes)
            )
        });
        assert_eq!(back, frame, "decode(encode(frame)) != frame");
    }
    let mut u = Unstructured::new(data);
    if let Ok(msg) = peer_message(&mut u) {
        assert_peer_round_trip(&msg);
    }
});
