//! The chat message: `{from, to, sent_at, body}`, parsed strictly.
//!
//! The original project could not parse its own creation times; here `sent_at` is RFC 3339 on the
//! wire and a typed timestamp in memory, and anything else is rejected with a reason.

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
        if msg.from != sender {
            return Err(ChatError::WrongSender {
                claimed: msg.from,
                actual: sender,
            });
        }
        if msg.to != me {
            return Err(ChatError::WrongRecipient { to: msg.to });
        }
        Ok(msg)
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

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let (a, b) = ids();
            let _ = ChatMessage::decode_from(&bytes, a, b);
        }

        #[test]
        fn any_body_round_trips(body in "\\PC{0,200}") {
            let (a, b) = ids();
            let msg = ChatMessage::new(a, b, body).unwrap();
            prop_assert_eq!(ChatMessage::decode(&msg.encode()).unwrap(), msg);
        }
    }
}
