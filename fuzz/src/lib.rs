//! Shared pieces of the fuzz targets: structured generators for the messages this project sends
//! (built from libFuzzer's bytes with `arbitrary`), the byte format of the registry target's
//! operation scripts, and the round-trip checks several targets make.
//!
//! Each target in `fuzz_targets/` asserts properties, not only "does not crash": every assertion
//! failure is a finding. The seed corpus under `corpus/` is written by `examples/seed_corpus.rs`
//! (see scripts/fuzz.sh), from the real encoders, so it follows the code when formats change.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};

use arbitrary::{Result, Unstructured};
use common::message::{Candidate, CandidateKind, PeerApp, PeerInfo};
use common::nat::{Behaviour, NatProfile};
use common::{ControlMessage, ErrorCode, MessageError, PeerId, PeerMessage, MAX_FRAME_LEN};
use time::OffsetDateTime;

pub mod registry_script;

/// A peer id from 32 arbitrary bytes (the way real ids come from key digests).
pub fn peer_id(u: &mut Unstructured) -> Result<PeerId> {
    Ok(PeerId::from_key_digest(&u.arbitrary()?))
}

/// Any IPv4 or IPv6 socket address, sometimes with a scope id (link-local addresses that a
/// socket reports); never a flow label (which no text form carries).
pub fn socket_addr(u: &mut Unstructured) -> Result<SocketAddr> {
    Ok(match u.int_in_range(0u8..=3)? {
        0 | 1 => SocketAddr::new(
            IpAddr::V4(Ipv4Addr::from(u.arbitrary::<[u8; 4]>()?)),
            u.arbitrary()?,
        ),
        2 => SocketAddr::new(
            IpAddr::V6(Ipv6Addr::from(u.arbitrary::<[u8; 16]>()?)),
            u.arbitrary()?,
        ),
        _ => SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(u.arbitrary::<[u8; 16]>()?),
            u.arbitrary()?,
            0,
            u.arbitrary()?,
        )),
    })
}

/// A UTC time that RFC 3339 can write (years 1 to 9999), to the nanosecond.
pub fn timestamp(u: &mut Unstructured) -> Result<OffsetDateTime> {
    const FIRST: i128 = -62_135_596_800 * 1_000_000_000;
    const LAST: i128 = 253_402_300_799 * 1_000_000_000 + 999_999_999;
    let nanos = u.int_in_range(FIRST..=LAST)?;
    OffsetDateTime::from_unix_timestamp_nanos(nanos).map_err(|_| arbitrary::Error::IncorrectFormat)
}

fn error_code(u: &mut Unstructured) -> Result<ErrorCode> {
    Ok(*u.choose(&[
        ErrorCode::BadRequest,
        ErrorCode::UnknownType,
        ErrorCode::TooLarge,
        ErrorCode::NotFound,
        ErrorCode::PeerOffline,
        ErrorCode::NotRegistered,
        ErrorCode::UnsupportedVersion,
        ErrorCode::RateLimited,
        ErrorCode::RelayDenied,
        ErrorCode::Internal,
        ErrorCode::Unknown,
    ])?)
}

/// An optional first flight: absent, or 1 to `MAX_FIRST_FLIGHT` arbitrary bytes.
fn first_flight(u: &mut Unstructured) -> Result<Option<common::message::FirstFlight>> {
    if !u.arbitrary::<bool>()? {
        return Ok(None);
    }
    let n = u.int_in_range(1..=common::message::MAX_FIRST_FLIGHT)?;
    Ok(common::message::FirstFlight::new(u.bytes(n)?.to_vec()))
}

fn addrs(u: &mut Unstructured, max: usize) -> Result<Vec<SocketAddr>> {
    let n = u.int_in_range(0..=max)?;
    (0..n).map(|_| socket_addr(u)).collect()
}

/// A control message of any kind, with arbitrary field values.
pub fn control_message(u: &mut Unstructured) -> Result<ControlMessage> {
    Ok(match u.int_in_range(0u8..=17)? {
        0 => ControlMessage::Register {
            version: u.arbitrary()?,
            local_addrs: addrs(u, 20)?,
            mapped_port: u.arbitrary()?,
        },
        1 => ControlMessage::Registered {
            id: peer_id(u)?,
            observed: socket_addr(u)?,
            keepalive_s: u.arbitrary()?,
            version: u.arbitrary()?,
            server_addrs: addrs(u, 4)?,
        },
        2 => ControlMessage::Query { id: peer_id(u)? },
        3 => ControlMessage::PeerInfo(PeerInfo {
            id: peer_id(u)?,
            observed: socket_addr(u)?,
            local_addrs: addrs(u, 20)?,
            mapped_port: u.arbitrary()?,
            online: u.arbitrary()?,
            last_seen: timestamp(u)?,
        }),
        4 => ControlMessage::Connect {
            id: peer_id(u)?,
            first_flight: first_flight(u)?,
        },
        5 => {
            let n = u.int_in_range(0..=20)?;
            let mut candidates = Vec::with_capacity(n);
            for _ in 0..n {
                candidates.push(Candidate {
                    addr: socket_addr(u)?,
                    kind: *u.choose(&[
                        CandidateKind::Observed,
                        CandidateKind::Local,
                        CandidateKind::Mapped,
                        CandidateKind::Predicted,
                    ])?,
                });
            }
            ControlMessage::Punch {
                peer: peer_id(u)?,
                candidates,
                nonce: u.arbitrary()?,
                key: common::stun::PunchKey::from_bytes(u.arbitrary()?),
                nat: None,
                no_relay: u.arbitrary()?,
                first_flight: first_flight(u)?,
            }
        }
        6 => ControlMessage::RelayOpen {},
        7 => ControlMessage::RelayReady {
            max_packet: u.arbitrary()?,
            rate_bytes_per_s: u.arbitrary()?,
        },
        8 => ControlMessage::Ping {
            seq: u.arbitrary()?,
        },
        9 => ControlMessage::Pong {
            seq: u.arbitrary()?,
        },
        10 => ControlMessage::PunchResult {
            peer: peer_id(u)?,
            direct: u.arbitrary()?,
        },
        11 => ControlMessage::Ack {},
        12 => ControlMessage::Accept {
            peer: peer_id(u)?,
            nonce: u.arbitrary()?,
        },
        13 => ControlMessage::MappedPort {
            port: u.arbitrary()?,
        },
        14 => ControlMessage::ConfirmAddress {
            addr: socket_addr(u)?,
            transaction: u.arbitrary()?,
            proof: u.arbitrary()?,
        },
        15 => ControlMessage::RelayChannel { peer: peer_id(u)? },
        16 => ControlMessage::RelayChannelReady {
            peer: peer_id(u)?,
            channel: u.arbitrary()?,
            max_packet: u.arbitrary()?,
        },
        _ => ControlMessage::Error {
            code: error_code(u)?,
            message: u.arbitrary()?,
        },
    })
}

fn behaviour(u: &mut Unstructured) -> Result<Behaviour> {
    Ok(*u.choose(&[
        Behaviour::EndpointIndependent,
        Behaviour::AddressDependent,
        Behaviour::AddressAndPortDependent,
        Behaviour::Unknown,
    ])?)
}

/// A peer-to-peer message of any kind, with arbitrary field values.
pub fn peer_message(u: &mut Unstructured) -> Result<PeerMessage> {
    Ok(match u.int_in_range(0u8..=10)? {
        6 => PeerMessage::FileResume {
            offset: u.arbitrary()?,
            prefix_blake3: u.arbitrary()?,
        },
        10 => PeerMessage::FileEnd {
            blake3: u.arbitrary()?,
        },
        7 => PeerMessage::FileStart {
            offset: u.arbitrary()?,
        },
        8 => PeerMessage::ServiceOpen {
            name: u.arbitrary()?,
            probe: u.arbitrary()?,
        },
        9 => PeerMessage::ServiceReply {
            ok: u.arbitrary()?,
            message: u.arbitrary()?,
        },
        0 => PeerMessage::Open {
            app: *u.choose(&[
                PeerApp::Chat,
                PeerApp::File,
                PeerApp::Ping,
                PeerApp::Service,
            ])?,
        },
        1 => PeerMessage::FileHeader {
            name: u.arbitrary()?,
            size: u.arbitrary()?,
        },
        2 => PeerMessage::FileResult {
            ok: u.arbitrary()?,
            blake3: u.arbitrary()?,
            message: u.arbitrary()?,
        },
        3 => PeerMessage::Ping {
            seq: u.arbitrary()?,
        },
        4 => PeerMessage::Pong {
            seq: u.arbitrary()?,
            nat: if u.arbitrary()? {
                Some(NatProfile {
                    udp: u.arbitrary()?,
                    no_nat: u.arbitrary()?,
                    mapping: behaviour(u)?,
                    filtering: behaviour(u)?,
                    inbound_takes_port: u.arbitrary()?,
                })
            } else {
                None
            },
        },
        _ => PeerMessage::Error {
            message: u.arbitrary()?,
        },
    })
}

/// The `type` tag of an encoded message.
fn tag_of(bytes: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    value.get("type")?.as_str().map(str::to_owned)
}

/// Encodes `msg`, decodes it back and checks that nothing changed: the same value, the same
/// bytes when encoded again (the encoding is canonical), and the tag that `kind()` names.
pub fn assert_control_round_trip(msg: &ControlMessage) {
    let bytes = msg.encode();
    let back = ControlMessage::decode(&bytes).unwrap_or_else(|e| {
        panic!(
            "{msg:?} encodes as {:?}, which does not decode: {e}",
            String::from_utf8_lossy(&bytes)
        )
    });
    assert_eq!(&back, msg, "decode(encode(m)) != m");
    assert_eq!(back.encode(), bytes, "encoding is not canonical");
    assert_eq!(
        tag_of(&bytes).as_deref(),
        Some(msg.kind()),
        "type tag != kind()"
    );
}

/// As [`assert_control_round_trip`], for peer messages.
pub fn assert_peer_round_trip(msg: &PeerMessage) {
    let bytes = msg.encode();
    let back = PeerMessage::decode(&bytes).unwrap_or_else(|e| {
        panic!(
            "{msg:?} encodes as {:?}, which does not decode: {e}",
            String::from_utf8_lossy(&bytes)
        )
    });
    assert_eq!(&back, msg, "decode(encode(m)) != m");
    assert_eq!(back.encode(), bytes, "encoding is not canonical");
}

/// What a decoding error may look like: an unknown tag echoed back is capped at 64 characters,
/// a known tag is one of `known`, and the error reply the server sends (`error` with the
/// error's text) stays within a small multiple of the input: no amplification by reflection,
/// and a frame-sized request always gets a frame-sized answer.
pub fn assert_decode_error_is_bounded(input: &[u8], err: &MessageError, known: &[&str]) {
    match err {
        MessageError::UnknownType(shown) => {
            assert!(
                shown.chars().count() <= 64,
                "unknown tag echoed in full: {shown:?}"
            );
            assert!(
                !known.contains(&shown.as_str()),
                "a known tag reported unknown: {shown}"
            );
        }
        MessageError::Invalid { kind, .. } => {
            assert!(
                known.contains(&kind.as_str()),
                "invalid message of unknown kind {kind:?}"
            );
        }
        MessageError::Json(_) | MessageError::MissingType => {}
    }
    let reply = ControlMessage::error(err.code(), err.to_string()).encode();
    assert!(
        reply.len() <= 4 * input.len() + 512,
        "the error reply to {} input bytes is {} bytes: {:?}",
        input.len(),
        reply.len(),
        String::from_utf8_lossy(&reply)
    );
    if input.len() <= MAX_FRAME_LEN / 4 - 512 {
        assert!(reply.len() <= MAX_FRAME_LEN);
    }
}

/// The `type` tags the decoders know (from `common`, so that a new message cannot be missed).
pub use common::message::{CONTROL_TYPES, PEER_TYPES};

/// Deterministic chunk sizes (1 to `max`) from a seed: how a byte stream is cut into reads.
pub struct Cuts {
    state: u64,
    max: usize,
}

impl Cuts {
    /// Cuts from `seed`, each between 1 and `max` bytes.
    pub fn new(seed: u64, max: usize) -> Self {
        Cuts {
            state: seed | 1,
            max: max.max(1),
        }
    }

    /// As [`Cuts::new`], with `max` raised so that `len` bytes make at most about 4096 chunks:
    /// cuts matter at frame boundaries, and a long stream cut into single bytes only slows the
    /// fuzzer down.
    pub fn for_len(seed: u64, max: usize, len: usize) -> Self {
        Self::new(seed, max.max(len / 1024))
    }

    /// The next chunk size.
    pub fn next_len(&mut self) -> usize {
        // xorshift64: cheap and enough to vary the cuts.
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        // Favour tiny reads (prefix and header boundaries) half the time.
        let max = if self.state & 1 == 0 {
            self.max.min(7)
        } else {
            self.max
        };
        1 + (self.state >> 8) as usize % max
    }

    /// Splits `bytes` into consecutive chunks.
    pub fn split<'a>(&mut self, mut bytes: &'a [u8]) -> Vec<&'a [u8]> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let n = self.next_len().min(bytes.len());
            out.push(&bytes[..n]);
            bytes = &bytes[n..];
        }
        out
    }
}
