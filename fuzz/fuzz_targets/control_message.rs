//! Control messages: arbitrary bytes through `ControlMessage::decode` (what a hostile peer or a
//! hostile rendezvous can send), and arbitrary messages through encode and decode.
//!
//! Properties: whatever decodes re-encodes to bytes that decode to an equal value, canonically;
//! decoding errors are classified and what the server echoes back stays bounded; every message
//! the code can build survives a round trip.

#![no_main]

use arbitrary::Unstructured;
use common::ControlMessage;
use libfuzzer_sys::fuzz_target;
use p2p_fuzz::{
    assert_control_round_trip, assert_decode_error_is_bounded, control_message, CONTROL_TYPES,
};

fuzz_target!(|data: &[u8]| {
    match ControlMessage::decode(data) {
        Ok(msg) => assert_control_round_trip(&msg),
        Err(err) => assert_decode_error_is_bounded(data, &err, CONTROL_TYPES),
    }
    if let Ok(msg) = control_message(&mut Unstructured::new(data)) {
        assert_control_round_trip(&msg);
    }
});
