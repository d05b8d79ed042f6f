//! The chat message: `{from, to, sent_at, body}`, parsed strictly; the frames of a chat stream;
//! and [`ChatEnding`], the sans-IO end of a chat that makes sure nothing typed is lost.
//!
//! The original project could not parse its own creation times; here `sent_at` is RFC 3339 on the
//! wire and a typed timestamp in memory, and anything else is rejected with a reason.
//!
//! # Ending a chat without losing a line
//!
//! Closing a QUIC connection discards stream data the other side has not read yet, and a
//! transport-level acknowledgement only says the data reached the peer's QUIC stack, not its
//! screen. So a chat ends with an exchange of its own (peer protocol version 2,
//! [`PEER_PROTOCOL_VERSION`](crate::message::PEER_PROTOCOL_VERSION)):
//!
//! 1. The side whose input ends sends `end` (it sends no more messages).
//! 2. A side that reads `end` has shown every message before it: it answers `end_ack`, and sends
//!    its own `end` if it has not yet (the chat is over for both).
//! 3. A side is done once it has sent `end`, read `end_ack` for it, and read the peer's `end`
//!    (and answered it). Only then does it finish its stream; it closes the connection (if it
//!    is the side that made it) only after reading the peer's finish, which the peer sends once
//!    it has everything too. So neither side closes while the other still waits for data.
//!
//! A side that waits longer than its timeout for `end_ack` or the peer's `end` fails the chat
//! (a non-zero exit for `peer connect`): its lines may not have been read.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::PeerId;

/// Longest chat body, in bytes.
pub const MAX_BODY_LEN: usize = 16 * 1024;

/// One chat line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    /// Sender.
    pub from: PeerId,
    /// Recipient.
    pub to: PeerId,
    /// When the sender wrote it (RFC 3339).
    #[serde(with = "time::serde::rfc3339")]
    pub sent_at: OffsetDateTime,
    /// The text.
    pub body: String,
}

/// Why a chat message is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChatError {
    /// Not a well-formed chat message (bad JSON, bad id, bad timestamp, extra fields).
    #[error("malformed chat message: {0}")]
    Malformed(String),
    /// Body over [`MAX_BODY_LEN`].
    #[error("chat body of {0} bytes is over the {MAX_BODY_LEN}-byte limit")]
    TooLong(usize),
    /// `from` is not the authenticated peer.
    #[error("message claims to be from {claimed} but the connection is authenticated as {actual}")]
    WrongSender {
        /// What the message says.
        claimed: PeerId,
        /// Who proved its key.
        actual: PeerId,
    },
    /// `to` is not us.
    #[error("message is addressed to {to}, not to this peer")]
    WrongRecipient {
        /// What the message says.
        to: PeerId,
    },
}

impl ChatMessage {
    /// A message written now.
    pub fn new(from: PeerId, to: PeerId, body: impl Into<String>) -> Result<Self, ChatError> {
        let body = body.into();
        if body.len() > MAX_BODY_LEN {
            return Err(ChatError::TooLong(body.len()));
        }
        Ok(ChatMessage {
            from,
            to,
            sent_at: OffsetDateTime::now_utc(),
            body,
        })
    }

    /// Parses and checks a received message against the authenticated sender and ourselves.
    pub fn decode_from(bytes: &[u8], sender: PeerId, me: PeerId) -> Result<Self, ChatError> {
        let msg = Self::decode(bytes)?;
        msg.check(sender, me)?;
        Ok(msg)
    }

    /// Checks a message against the authenticated sender and ourselves.
    pub fn check(&self, sender: PeerId, me: PeerId) -> Result<(), ChatError> {
        let msg = self;
        if msg.from != sender {
            return Err(ChatError::WrongSender {
                claimed: msg.from,
                actual: sender,
            });
        }
        if msg.to != me {
            return Err(ChatError::WrongRecipient { to: msg.to });
        }
        Ok(())
    }

    /// Parses a message without checking who sent it.
    pub fn decode(bytes: &[u8]) -> Result<Self, ChatError> {
        let msg: ChatMessage =
            serde_json::from_slice(bytes).map_err(|e| ChatError::Malformed(e.to_string()))?;
        if msg.body.len() > MAX_BODY_LEN {
            return Err(ChatError::TooLong(msg.body.len()));
        }
        Ok(msg)
    }

    /// Encodes to JSON bytes.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec())
    }

    /// `sent_at` as RFC 3339 text, for display.
    pub fn sent_at_rfc3339(&self) -> String {
        self.sent_at
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| self.sent_at.to_string())
    }
}

/// One frame of a chat stream (after the stream's `open` header): a JSON object with a `type`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ChatFrame {
    /// A typed line.
    Message(ChatMessage),
    /// The sender will send no more messages.
    End {},
    /// The sender has read, and shown, every message up to the receiver's `end`.
    EndAck {},
}

impl ChatFrame {
    /// Parses a frame; a message's body length is checked, its sender and recipient are not
    /// (see [`ChatMessage::check`]).
    pub fn decode(bytes: &[u8]) -> Result<Self, ChatError> {
        let frame: ChatFrame =
            serde_json::from_slice(bytes).map_err(|e| ChatError::Malformed(e.to_string()))?;
        if let ChatFrame::Message(msg) = &frame {
            if msg.body.len() > MAX_BODY_LEN {
                return Err(ChatError::TooLong(msg.body.len()));
            }
        }
        Ok(frame)
    }

    /// Encodes to JSON bytes (a frame body).
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec())
    }
}

/// How long a side whose chat is ending waits for the peer's `end_ack` and `end` before it gives
/// up and reports that its lines may be lost.
pub const END_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a chat did not end cleanly.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChatEndError {
    /// The peer did not acknowledge our `end` in time: what we sent may not have been read.
    #[error("the peer did not confirm within {0:?} that it read our messages; they may be lost")]
    NotAcknowledged(Duration),
    /// The peer acknowledged our messages but did not end its own side in time.
    #[error("the peer read our messages but did not end its side of the chat within {0:?}")]
    PeerDidNotEnd(Duration),
    /// `end_ack` without an `end` of ours to acknowledge.
    #[error("protocol violation: the peer acknowledged an end we never sent")]
    UnexpectedAck,
    /// A second `end_ack`.
    #[error("protocol violation: the peer acknowledged our end twice")]
    DuplicateAck,
    /// A second `end`.
    #[error("protocol violation: the peer ended the chat twice")]
    DuplicateEnd,
    /// A message after the peer's `end`.
    #[error("protocol violation: the peer sent a message after ending the chat")]
    MessageAfterEnd,
    /// The peer finished its stream before the ending was complete.
    #[error("the peer closed the chat stream without ending the chat")]
    ClosedEarly,
}

/// Who ended a chat first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndedBy {
    /// Our input ended first.
    Us,
    /// The peer's `end` came first.
    Peer,
}

/// The end of a chat, without I/O: what to send when, and when the chat is over or has failed.
/// Time is passed in.
#[derive(Debug, Clone)]
pub struct ChatEnding {
    timeout: Duration,
    deadline: Option<Instant>,
    sent_end: bool,
    acked: bool,
    peer_ended: bool,
    ended_by: Option<EndedBy>,
}

impl ChatEnding {
    /// A chat in progress; once ending, it waits at most `timeout` for the peer.
    pub fn new(timeout: Duration) -> Self {
        ChatEnding {
            timeout,
            deadline: None,
            sent_end: false,
            acked: false,
            peer_ended: false,
            ended_by: None,
        }
    }

    /// Our input ended: the `end` to send (none if we already sent it).
    pub fn input_ended(&mut self, now: Instant) -> Option<ChatFrame> {
        if self.sent_end {
            return None;
        }
        self.ended_by.get_or_insert(EndedBy::Us);
        self.sent_end = true;
        self.deadline.get_or_insert(now + self.timeout);
        Some(ChatFrame::End {})
    }

    /// May we still send messages (we have not sent `end`)?
    pub fn may_send(&self) -> bool {
        !self.sent_end
    }

    /// A message from the peer arrived: refused after the peer's `end`.
    pub fn on_message(&self) -> Result<(), ChatEndError> {
        if self.peer_ended {
            return Err(ChatEndError::MessageAfterEnd);
        }
        Ok(())
    }

    /// The peer's `end` arrived (everything it sent before has been shown): the frames to send
    /// in reply, in order (`end_ack`, then our own `end` unless sent).
    pub fn on_end(&mut self, now: Instant) -> Result<Vec<ChatFrame>, ChatEndError> {
        if self.peer_ended {
            return Err(ChatEndError::DuplicateEnd);
        }
        self.peer_ended = true;
        self.ended_by.get_or_insert(EndedBy::Peer);
        let mut replies = vec![ChatFrame::EndAck {}];
        replies.extend(self.input_ended(now));
        Ok(replies)
    }

    /// The peer's `end_ack` arrived.
    pub fn on_ack(&mut self) -> Result<(), ChatEndError> {
        match (self.sent_end, self.acked) {
            (false, _) => Err(ChatEndError::UnexpectedAck),
            (true, true) => Err(ChatEndError::DuplicateAck),
            (true, false) => {
                self.acked = true;
                Ok(())
            }
        }
    }

    /// The peer finished its stream: fine once done, a failure before.
    pub fn on_peer_finished(&self) -> Result<(), ChatEndError> {
        if self.is_done() {
            Ok(())
        } else {
            Err(ChatEndError::ClosedEarly)
        }
    }

    /// Both ends sent and acknowledged: nothing is in flight that the other side still needs,
    /// except our `end_ack`, which went out before our stream's finish.
    pub fn is_done(&self) -> bool {
        self.sent_end && self.acked && self.peer_ended
    }

    /// Who ended first (`None` while the chat runs).
    pub fn ended_by(&self) -> Option<EndedBy> {
        self.ended_by
    }

    /// When [`poll_timeout`](Self::poll_timeout) fails, if the ending has begun and is not done.
    pub fn deadline(&self) -> Option<Instant> {
        if self.is_done() {
            None
        } else {
            self.deadline
        }
    }

    /// Fails once the deadline has passed without the peer's `end_ack` and `end`.
    pub fn poll_timeout(&self, now: Instant) -> Result<(), ChatEndError> {
        match self.deadline() {
            Some(deadline) if now >= deadline => Err(if self.acked {
                ChatEndError::PeerDidNotEnd(self.timeout)
            } else {
                ChatEndError::NotAcknowledged(self.timeout)
            }),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ids() -> (PeerId, PeerId) {
        (
            PeerId::from_key_digest(&[1; 32]),
            PeerId::from_key_digest(&[2; 32]),
        )
    }

    #[test]
    fn round_trip_and_wire_shape() {
        let (a, b) = ids();
        let msg = ChatMessage::new(a, b, "hi").unwrap();
        let json: serde_json::Value = serde_json::from_slice(&msg.encode()).unwrap();
        let keys: Vec<_> = json.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys.len(), 4);
        for key in ["from", "to", "sent_at", "body"] {
            assert!(json.get(key).is_some(), "{key}");
        }
        assert_eq!(ChatMessage::decode_from(&msg.encode(), a, b).unwrap(), msg);
    }

    #[test]
    fn parses_rfc3339_with_offsets_and_fractions() {
        let (a, b) = ids();
        let json = format!(
            r#"{{"from":"{a}","to":"{b}","sent_at":"2026-11-25T08:40:58.123+01:00","body":"x"}}"#
        );
        let msg = ChatMessage::decode(json.as_bytes()).unwrap();
        assert_eq!(
            msg.sent_at,
            time::macros::datetime!(2026-11-25 07:40:58.123 UTC)
        );
    }

    #[test]
    fn rejects_bad_times_extra_fields_and_spoofing() {
        let (a, b) = ids();
        for sent_at in [
            "yesterday",
            "2026-11-25 07:40:58",
            "2026-13-01T00:00:00Z",
            "1700000000",
        ] {
            let json = format!(r#"{{"from":"{a}","to":"{b}","sent_at":"{sent_at}","body":"x"}}"#);
            assert!(
                matches!(
                    ChatMessage::decode(json.as_bytes()),
                    Err(ChatError::Malformed(_))
                ),
                "{sent_at}"
            );
        }
        let json = format!(
            r#"{{"from":"{a}","to":"{b}","sent_at":"2026-11-25T07:40:58Z","body":"x","admin":true}}"#
        );
        assert!(ChatMessage::decode(json.as_bytes()).is_err());
        let msg = ChatMessage::new(a, b, "x").unwrap();
        assert!(matches!(
            ChatMessage::decode_from(&msg.encode(), b, b),
            Err(ChatError::WrongSender { .. })
        ));
        assert!(matches!(
            ChatMessage::decode_from(&msg.encode(), a, a),
            Err(ChatError::WrongRecipient { .. })
        ));
        assert!(matches!(
            ChatMessage::new(a, b, "x".repeat(MAX_BODY_LEN + 1)),
            Err(ChatError::TooLong(_))
        ));
    }

    #[test]
    fn frames_are_tagged_and_strict() {
        let (a, b) = ids();
        let msg = ChatMessage::new(a, b, "hi").unwrap();
        let frame = ChatFrame::Message(msg.clone());
        let json: serde_json::Value = serde_json::from_slice(&frame.encode()).unwrap();
        assert_eq!(json["type"], "message");
        assert_eq!(json["body"], "hi");
        assert_eq!(ChatFrame::decode(&frame.encode()).unwrap(), frame);
        assert_eq!(ChatFrame::End {}.encode(), br#"{"type":"end"}"#);
        assert_eq!(ChatFrame::EndAck {}.encode(), br#"{"type":"end_ack"}"#);
        assert_eq!(
            ChatFrame::decode(br#"{"type":"end_ack"}"#).unwrap(),
            ChatFrame::EndAck {}
        );
        // A version-1 frame (an untagged message) is refused, as are extra fields.
        assert!(matches!(
            ChatFrame::decode(&msg.encode()),
            Err(ChatError::Malformed(_))
        ));
        assert!(ChatFrame::decode(br#"{"type":"end","now":true}"#).is_err());
        assert!(ChatFrame::decode(br#"{"type":"bye"}"#).is_err());
        let long = format!(
            r#"{{"type":"message","from":"{a}","to":"{b}","sent_at":"2026-11-25T07:40:58Z","body":"{}"}}"#,
            "x".repeat(MAX_BODY_LEN + 1)
        );
        assert!(matches!(
            ChatFrame::decode(long.as_bytes()),
            Err(ChatError::TooLong(_))
        ));
    }

    const TIMEOUT: Duration = Duration::from_secs(10);

    /// Delivers every frame one side queued to the other, in order, as a stream would.
    fn deliver(to: &mut ChatEnding, frames: Vec<ChatFrame>, now: Instant) -> Vec<ChatFrame> {
        let mut replies = Vec::new();
        for frame in frames {
            match frame {
                ChatFrame::End {} => replies.extend(to.on_end(now).unwrap()),
                ChatFrame::EndAck {} => to.on_ack().unwrap(),
                ChatFrame::Message(_) => to.on_message().unwrap(),
            }
        }
        replies
    }

    #[test]
    fn the_side_whose_input_ends_is_done_only_after_the_peer_acknowledged() {
        let now = Instant::now();
        let (mut x, mut y) = (ChatEnding::new(TIMEOUT), ChatEnding::new(TIMEOUT));
        let end = x.input_ended(now).into_iter().collect::<Vec<_>>();
        assert_eq!(end, vec![ChatFrame::End {}]);
        assert!(!x.may_send() && !x.is_done());
        assert_eq!(x.input_ended(now), None, "end is sent once");
        assert_eq!(x.deadline(), Some(now + TIMEOUT));
        // Y answers with its acknowledgement, then its own end.
        let replies = deliver(&mut y, end, now);
        assert_eq!(replies, vec![ChatFrame::EndAck {}, ChatFrame::End {}]);
        assert!(!y.is_done(), "Y still needs X's acknowledgement of its end");
        assert_eq!(y.ended_by(), Some(EndedBy::Peer));
        let replies = deliver(&mut x, replies, now);
        assert_eq!(replies, vec![ChatFrame::EndAck {}]);
        assert!(x.is_done());
        assert_eq!(x.ended_by(), Some(EndedBy::Us));
        assert_eq!(x.deadline(), None);
        assert_eq!(x.poll_timeout(now + TIMEOUT * 2), Ok(()));
        assert!(deliver(&mut y, replies, now).is_empty());
        assert!(y.is_done());
        assert_eq!(y.on_peer_finished(), Ok(()));
    }

    #[test]
    fn both_inputs_ending_at_once_still_needs_both_acknowledgements() {
        let now = Instant::now();
        let (mut x, mut y) = (ChatEnding::new(TIMEOUT), ChatEnding::new(TIMEOUT));
        let from_x: Vec<_> = x.input_ended(now).into_iter().collect();
        let from_y: Vec<_> = y.input_ended(now).into_iter().collect();
        // Each end crossed the other: the peer's end is not an acknowledgement.
        let ack_from_y = deliver(&mut y, from_x, now);
        let ack_from_x = deliver(&mut x, from_y, now);
        assert_eq!(ack_from_y, vec![ChatFrame::EndAck {}]);
        assert!(!x.is_done() && !y.is_done());
        deliver(&mut x, ack_from_y, now);
        deliver(&mut y, ack_from_x, now);
        assert!(x.is_done() && y.is_done());
    }

    #[test]
    fn a_silent_peer_fails_the_ending_at_the_deadline_and_not_before() {
        let now = Instant::now();
        let mut x = ChatEnding::new(TIMEOUT);
        assert_eq!(x.deadline(), None, "no deadline while the chat runs");
        assert_eq!(x.poll_timeout(now + TIMEOUT * 100), Ok(()));
        x.input_ended(now);
        assert_eq!(
            x.poll_timeout(now + TIMEOUT - Duration::from_millis(1)),
            Ok(())
        );
        assert_eq!(
            x.poll_timeout(now + TIMEOUT),
            Err(ChatEndError::NotAcknowledged(TIMEOUT))
        );
        assert_eq!(x.on_peer_finished(), Err(ChatEndError::ClosedEarly));
        // Acknowledged, but the peer never ends its side.
        x.on_ack().unwrap();
        assert_eq!(
            x.poll_timeout(now + TIMEOUT),
            Err(ChatEndError::PeerDidNotEnd(TIMEOUT))
        );
    }

    #[test]
    fn protocol_violations_are_refused() {
        let now = Instant::now();
        let mut x = ChatEnding::new(TIMEOUT);
        assert_eq!(x.on_ack(), Err(ChatEndError::UnexpectedAck));
        x.on_message().unwrap();
        x.on_end(now).unwrap();
        assert_eq!(x.on_message(), Err(ChatEndError::MessageAfterEnd));
        assert_eq!(x.on_end(now), Err(ChatEndError::DuplicateEnd));
        x.on_ack().unwrap();
        assert_eq!(x.on_ack(), Err(ChatEndError::DuplicateAck));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let (a, b) = ids();
            let _ = ChatMessage::decode_from(&bytes, a, b);
            let _ = ChatFrame::decode(&bytes);
        }

        #[test]
        fn any_body_round_trips(body in "\\PC{0,200}") {
            let (a, b) = ids();
            let msg = ChatMessage::new(a, b, body).unwrap();
            prop_assert_eq!(ChatMessage::decode(&msg.encode()).unwrap(), msg);
        }
    }
}
