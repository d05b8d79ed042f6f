//! STUN (RFC 5389) helpers: recognising STUN-shaped datagrams on a socket shared with QUIC, and
//! Binding requests and responses.
//!
//! QUIC packets always have the second-highest bit of the first byte set (the "fixed bit", as long
//! as greasing is off), STUN messages have the two highest bits clear and the magic cookie at
//! bytes 4..8, so one check on the first eight bytes tells them apart.

use std::net::SocketAddr;

use bytecodec::{DecodeExt, EncodeExt};
use stun_codec::rfc5389::attributes::{
    Fingerprint, MessageIntegrity, Software, Username, XorMappedAddress,
};
use stun_codec::rfc5389::{methods::BINDING, Attribute};
use stun_codec::{Message, MessageClass, MessageDecoder, MessageEncoder, TransactionId};

use crate::PeerId;

/// The STUN magic cookie (RFC 5389 section 6).
pub const MAGIC_COOKIE: u32 = 0x2112_A442;

/// Size of a STUN header.
pub const HEADER_LEN: usize = 20;

/// True if the datagram has the shape of a STUN message: at least a header, the two top bits
/// zero, the magic cookie, and a length that is a multiple of four.
pub fn is_stun(datagram: &[u8]) -> bool {
    datagram.len() >= HEADER_LEN
        && datagram[0] & 0xC0 == 0
        && datagram[4..8] == MAGIC_COOKIE.to_be_bytes()
        && u16::from_be_bytes([datagram[2], datagram[3]]).is_multiple_of(4)
}

/// A decoded STUN message that this crate acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StunPacket {
    /// A Binding request.
    BindingRequest {
        /// Its transaction id.
        transaction: [u8; 12],
        /// Its USERNAME, if any (hole-punching probes carry one, see [`ProbeTag`]).
        username: Option<String>,
    },
    /// A Binding success response.
    BindingSuccess {
        /// Its transaction id.
        transaction: [u8; 12],
        /// The XOR-MAPPED-ADDRESS: how the responder saw the requester.
        mapped: SocketAddr,
    },
}

/// A STUN-shaped datagram that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StunError {
    /// Not a STUN message, or a broken one.
    #[error("malformed STUN message: {0}")]
    Malformed(String),
    /// A valid message of a kind this code does not handle.
    #[error("unsupported STUN message ({0})")]
    Unsupported(String),
}

/// Decodes a datagram into a [`StunPacket`].
pub fn decode(datagram: &[u8]) -> Result<StunPacket, StunError> {
    if !is_stun(datagram) {
        return Err(StunError::Malformed("not STUN-shaped".into()));
    }
    let mut decoder = MessageDecoder::<Attribute>::new();
    let message = decoder
        .decode_from_bytes(datagram)
        .map_err(|e| StunError::Malformed(e.to_string()))?
        .map_err(|broken| StunError::Malformed(format!("{:?}", broken.error())))?;
    let transaction = *message.transaction_id().as_bytes();
    if message.method() != BINDING {
        return Err(StunError::Unsupported(format!(
            "method {:#x}",
            message.method().as_u16()
        )));
    }
    match message.class() {
        MessageClass::Request => Ok(StunPacket::BindingRequest {
            transaction,
            username: message
                .get_attribute::<Username>()
                .map(|u| u.name().to_owned()),
        }),
        MessageClass::SuccessResponse => {
            let mapped = message
                .get_attribute::<XorMappedAddress>()
                .map(|a| a.address())
                .ok_or_else(|| StunError::Malformed("no XOR-MAPPED-ADDRESS".into()))?;
            Ok(StunPacket::BindingSuccess {
                transaction,
                mapped,
            })
        }
        other => Err(StunError::Unsupported(format!("class {other:?}"))),
    }
}

/// Encodes a Binding request.
pub fn binding_request(transaction: [u8; 12]) -> Vec<u8> {
    let message = Message::<Attribute>::new(
        MessageClass::Request,
        BINDING,
        TransactionId::new(transaction),
    );
    encode(message)
}

/// Encodes a Binding success response that tells the requester its address `mapped`.
pub fn binding_success(transaction: [u8; 12], mapped: SocketAddr) -> Vec<u8> {
    let mut message = Message::<Attribute>::new(
        MessageClass::SuccessResponse,
        BINDING,
        TransactionId::new(transaction),
    );
    message.add_attribute(XorMappedAddress::new(mapped));
    if let Ok(software) = Software::new("p2p".to_owned()) {
        message.add_attribute(software);
    }
    if let Ok(fingerprint) = Fingerprint::new(&message) {
        message.add_attribute(fingerprint);
    }
    encode(message)
}

/// If `datagram` is a Binding request, the response to send back to `source`.
pub fn answer_binding(datagram: &[u8], source: SocketAddr) -> Option<Vec<u8>> {
    match decode(datagram) {
        Ok(StunPacket::BindingRequest { transaction, .. }) => {
            Some(binding_success(transaction, source))
        }
        _ => None,
    }
}

/// What a hole-punching probe says about itself, in its USERNAME attribute
/// (`p2p1:<nonce as 16 hex digits>:<sender id, 32 hex digits>`), the way ICE connectivity checks
/// carry their credentials. The tag is public (it travels in clear in every probe): it only
/// routes datagrams to the right session. What proves a probe or an answer comes from the peer
/// is its MESSAGE-INTEGRITY, keyed by the introduction's secret [`PunchKey`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeTag {
    /// The introduction's nonce.
    pub nonce: u64,
    /// Who sent the probe.
    pub sender: PeerId,
}

const PROBE_PREFIX: &str = "p2p1:";

impl ProbeTag {
    /// The USERNAME text.
    pub fn to_username(&self) -> String {
        format!(
            "{PROBE_PREFIX}{:016x}:{}",
            self.nonce,
            self.sender.as_uuid().simple()
        )
    }

    /// Parses a USERNAME; `None` if it is not a probe's.
    pub fn from_username(username: &str) -> Option<Self> {
        let rest = username.strip_prefix(PROBE_PREFIX)?;
        let (nonce, sender) = rest.split_once(':')?;
        if nonce.len() != 16 {
            return None;
        }
        Some(ProbeTag {
            nonce: u64::from_str_radix(nonce, 16).ok()?,
            sender: sender.parse().ok()?,
        })
    }

    /// Transaction ids of probes start with the nonce, so that responses (which carry no
    /// USERNAME) can be routed to the right punching session.
    pub fn transaction(&self, counter: u32) -> [u8; 12] {
        let mut txid = [0u8; 12];
        txid[..8].copy_from_slice(&self.nonce.to_be_bytes());
        txid[8..].copy_from_slice(&counter.to_be_bytes());
        txid
    }
}

/// The nonce at the start of a probe's transaction id.
pub fn nonce_of_transaction(transaction: &[u8; 12]) -> u64 {
    let mut nonce = [0u8; 8];
    nonce.copy_from_slice(&transaction[..8]);
    u64::from_be_bytes(nonce)
}

/// The secret of one introduction (or of one direct link's heartbeats): the MESSAGE-INTEGRITY
/// key of its probes and answers, ICE's short-term password. The rendezvous draws a fresh one
/// from a CSPRNG for every introduction and hands it to the two peers only inside the `punch`
/// messages on their TLS control streams; it never travels in a datagram, so a host that sees
/// every probe (and so knows the USERNAME, the nonce and the transaction ids) still cannot
/// forge a probe or an answer. In JSON it is 32 hex digits; `Debug` does not show it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PunchKey([u8; PunchKey::LEN]);

impl PunchKey {
    /// Length of a key in bytes (128 bits).
    pub const LEN: usize = 16;

    /// The key with these bytes (which must come from a CSPRNG or a key exporter).
    pub fn from_bytes(bytes: [u8; PunchKey::LEN]) -> Self {
        PunchKey(bytes)
    }

    /// The key's bytes.
    pub fn as_bytes(&self) -> &[u8; PunchKey::LEN] {
        &self.0
    }

    /// The key as 32 lowercase hex digits (its JSON form, and the STUN short-term password).
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses 32 hex digits.
    pub fn from_hex(text: &str) -> Option<Self> {
        if text.len() != 2 * PunchKey::LEN || !text.is_ascii() {
            return None;
        }
        let mut bytes = [0u8; PunchKey::LEN];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(PunchKey(bytes))
    }
}

impl std::fmt::Debug for PunchKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A secret: never in logs.
        f.write_str("PunchKey(..)")
    }
}

impl serde::Serialize for PunchKey {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

impl<'de> serde::Deserialize<'de> for PunchKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        PunchKey::from_hex(&text).ok_or_else(|| {
            serde::de::Error::custom(format!("a punch key is {} hex digits", 2 * PunchKey::LEN))
        })
    }
}

fn seal(mut message: Message<Attribute>, key: &PunchKey) -> Vec<u8> {
    if let Ok(integrity) = MessageIntegrity::new_short_term_credential(&message, &key.to_hex()) {
        message.add_attribute(integrity);
    }
    if let Ok(fingerprint) = Fingerprint::new(&message) {
        message.add_attribute(fingerprint);
    }
    encode(message)
}

/// Encodes a probe: a Binding request with the tag in USERNAME and MESSAGE-INTEGRITY keyed by
/// the introduction's secret key.
pub fn probe_request(tag: &ProbeTag, counter: u32, key: &PunchKey) -> Vec<u8> {
    let mut message = Message::<Attribute>::new(
        MessageClass::Request,
        BINDING,
        TransactionId::new(tag.transaction(counter)),
    );
    if let Ok(username) = Username::new(tag.to_username()) {
        message.add_attribute(username);
    }
    seal(message, key)
}

/// Encodes the answer to a probe: a Binding success response with XOR-MAPPED-ADDRESS and
/// MESSAGE-INTEGRITY keyed by the introduction's secret key.
pub fn probe_success(transaction: [u8; 12], mapped: SocketAddr, key: &PunchKey) -> Vec<u8> {
    let mut message = Message::<Attribute>::new(
        MessageClass::SuccessResponse,
        BINDING,
        TransactionId::new(transaction),
    );
    message.add_attribute(XorMappedAddress::new(mapped));
    seal(message, key)
}

/// USERNAME of a Binding request that asks the rendezvous for an address proof: a peer sends
/// one to the rendezvous's address in the other IP family than its control connection, and the
/// answer's MESSAGE-INTEGRITY (keyed by a secret of the server and the request's source
/// address) is the proof it returns over TLS (`confirm_address`).
pub const OBSERVE_USERNAME: &str = "p2p-observe";

/// Encodes an address-proof request (see [`OBSERVE_USERNAME`]).
pub fn observe_request(transaction: [u8; 12]) -> Vec<u8> {
    let mut message = Message::<Attribute>::new(
        MessageClass::Request,
        BINDING,
        TransactionId::new(transaction),
    );
    if let Ok(username) = Username::new(OBSERVE_USERNAME.to_owned()) {
        message.add_attribute(username);
    }
    encode(message)
}

/// The MESSAGE-INTEGRITY value (HMAC-SHA1) of a STUN message, if it has one.
pub fn integrity_of(datagram: &[u8]) -> Option<[u8; 20]> {
    let mut decoder = MessageDecoder::<Attribute>::new();
    let Ok(Ok(message)) = decoder.decode_from_bytes(datagram) else {
        return None;
    };
    message
        .get_attribute::<MessageIntegrity>()
        .map(|mi| mi.hmac_sha1())
}

/// True if the datagram carries a MESSAGE-INTEGRITY that checks with `key`.
pub fn verify_probe(datagram: &[u8], key: &PunchKey) -> bool {
    let mut decoder = MessageDecoder::<Attribute>::new();
    let Ok(Ok(message)) = decoder.decode_from_bytes(datagram) else {
        return false;
    };
    message
        .get_attribute::<MessageIntegrity>()
        .is_some_and(|mi| mi.check_short_term_credential(&key.to_hex()).is_ok())
}

fn encode(message: Message<Attribute>) -> Vec<u8> {
    // Encoding a message built from valid attributes does not fail; an empty datagram would be
    // dropped as garbage by the receiver rather than cause harm.
    MessageEncoder::<Attribute>::new()
        .encode_into_bytes(message)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn binding_round_trip() {
        let txid = [7u8; 12];
        let request = binding_request(txid);
        assert!(is_stun(&request));
        assert_eq!(
            decode(&request),
            Ok(StunPacket::BindingRequest {
                transaction: txid,
                username: None
            })
        );
        let source: SocketAddr = "203.0.113.7:41000".parse().unwrap();
        let response = answer_binding(&request, source).unwrap();
        assert!(is_stun(&response));
        assert_eq!(
            decode(&response),
            Ok(StunPacket::BindingSuccess {
                transaction: txid,
                mapped: source
            })
        );
        let v6: SocketAddr = "[2001:db8::1]:9".parse().unwrap();
        assert_eq!(
            decode(&binding_success(txid, v6)),
            Ok(StunPacket::BindingSuccess {
                transaction: txid,
                mapped: v6
            })
        );
    }

    fn key(n: u8) -> PunchKey {
        PunchKey::from_bytes([n; PunchKey::LEN])
    }

    #[test]
    fn probes_carry_their_tag() {
        let tag = ProbeTag {
            nonce: 0xdead_beef_0000_0001,
            sender: PeerId::from_key_digest(&[4; 32]),
        };
        let probe = probe_request(&tag, 7, &key(1));
        let Ok(StunPacket::BindingRequest {
            transaction,
            username: Some(username),
        }) = decode(&probe)
        else {
            panic!("{:?}", decode(&probe))
        };
        assert_eq!(ProbeTag::from_username(&username), Some(tag));
        assert_eq!(nonce_of_transaction(&transaction), tag.nonce);
        assert_eq!(transaction, tag.transaction(7));
        assert!(verify_probe(&probe, &key(1)));
        assert!(!verify_probe(&probe, &key(2)));
        let from: SocketAddr = "198.51.100.2:7".parse().unwrap();
        let answer = probe_success(transaction, from, &key(1));
        assert!(verify_probe(&answer, &key(1)));
        assert!(!verify_probe(&answer, &key(2)));
        assert_eq!(
            decode(&answer),
            Ok(StunPacket::BindingSuccess {
                transaction,
                mapped: from
            })
        );
        // A generic answer (no integrity) does not verify.
        assert!(!verify_probe(&binding_success(transaction, from), &key(1)));
        let mut tampered = answer.clone();
        let last = tampered.len() - 9;
        tampered[last] ^= 1;
        assert!(!verify_probe(&tampered, &key(1)));
        for bad in [
            "",
            "p2p1:",
            "p2p1:xyz:abc",
            "p2p1:0000000000000001:nope",
            "other",
        ] {
            assert_eq!(ProbeTag::from_username(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_public_parts_of_a_probe_do_not_make_its_key() {
        // Everything an on-path host learns from a probe: the USERNAME, the nonce, the
        // transaction id. The integrity the old scheme derived from the nonce no longer checks,
        // nor does any key built from those public values.
        let tag = ProbeTag {
            nonce: 0x0123_4567_89ab_cdef,
            sender: PeerId::from_key_digest(&[4; 32]),
        };
        let secret = key(0x5a);
        let from: SocketAddr = "198.51.100.2:7".parse().unwrap();
        let genuine = probe_success(tag.transaction(1), from, &secret);
        let mut guesses = vec![key(0)];
        let mut nonce_key = [0u8; PunchKey::LEN];
        nonce_key[..8].copy_from_slice(&tag.nonce.to_be_bytes());
        guesses.push(PunchKey::from_bytes(nonce_key));
        let mut txid_key = [0u8; PunchKey::LEN];
        txid_key[..12].copy_from_slice(&tag.transaction(1));
        guesses.push(PunchKey::from_bytes(txid_key));
        for guess in &guesses {
            let forged = probe_success(tag.transaction(1), from, guess);
            assert!(!verify_probe(&forged, &secret));
            assert!(!verify_probe(&genuine, guess));
        }
    }

    #[test]
    fn keys_are_hex_in_json_and_hidden_in_debug() {
        let k = PunchKey::from_bytes(*b"0123456789abcdef");
        let json = serde_json::to_string(&k).unwrap();
        assert_eq!(json, "\"30313233343536373839616263646566\"");
        assert_eq!(serde_json::from_str::<PunchKey>(&json).unwrap(), k);
        assert_eq!(format!("{k:?}"), "PunchKey(..)");
        for bad in [
            "\"\"",
            "\"0123\"",
            "\"zz313233343536373839616263646566\"",
            "12",
            "\"303132333435363738396162636465\u{e9}\"",
        ] {
            assert!(serde_json::from_str::<PunchKey>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn quic_packets_are_not_stun() {
        // Long header (0b11xx_xxxx) and short header (0b01xx_xxxx) both have the fixed bit set.
        let mut long = vec![0xC3u8; 1200];
        long[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
        assert!(!is_stun(&long));
        let mut short = vec![0x41u8; 40];
        short[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
        assert!(!is_stun(&short));
        assert!(!is_stun(&[0u8; 19]));
    }

    #[test]
    fn responses_are_not_answered() {
        let response = binding_success([1; 12], "192.0.2.1:1".parse().unwrap());
        assert_eq!(
            answer_binding(&response, "192.0.2.1:1".parse().unwrap()),
            None
        );
    }

    proptest! {
        #[test]
        fn arbitrary_usernames_never_panic(s in "\\PC{0,80}") {
            let _ = ProbeTag::from_username(&s);
            let _ = ProbeTag::from_username(&format!("p2p1:{s}"));
        }

        #[test]
        fn arbitrary_bytes_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = decode(&bytes);
            // Also force the STUN shape so the full decoder runs on garbage.
            if bytes.len() >= HEADER_LEN {
                bytes[0] &= 0x3F;
                bytes[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
                let len = (bytes.len() - HEADER_LEN) as u16 & !3;
                bytes[2..4].copy_from_slice(&len.to_be_bytes());
                let _ = decode(&bytes);
                let _ = verify_probe(&bytes, &key(1));
                let _ = answer_binding(&bytes, "192.0.2.1:1".parse().unwrap());
            }
        }
    }
}
