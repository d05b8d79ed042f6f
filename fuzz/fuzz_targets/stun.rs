//! Both STUN codecs: `common::stun` (stun_codec based: Binding requests and responses, probes
//! with MESSAGE-INTEGRITY) and `common::stun5780` (the server's hand-written parser and
//! responses).
//!
//! Properties:
//! - arbitrary datagrams (as they are, and forced into STUN shape so that the parsers get past
//!   the first check): no panic; what decodes has the STUN shape and the datagram's transaction
//!   id; a request is answered with a response that decodes to the requester's address, a
//!   response is never answered (no reflection loops);
//! - every request the RFC 5780 parser accepts gets a response of exactly the size its
//!   attributes need, at most 84 bytes when the addresses are IPv4 (the documented bound) and at
//!   most 124 with IPv6, that another implementation (stun_codec) decodes, and that is not itself
//!   a request; error responses are at most 68 bytes;
//! - encoders round-trip: requests, responses, CHANGE-REQUEST flags, probe tags; a probe
//!   verifies with its key only, and not once its transaction id is changed.

#![no_main]

use std::net::SocketAddr;

use arbitrary::{Arbitrary, Unstructured};
use common::stun::{self, ProbeTag, StunPacket, HEADER_LEN, MAGIC_COOKIE};
use common::stun5780::{self, BindingRequest, ResponseContext};
use common::PeerId;
use libfuzzer_sys::fuzz_target;
use p2p_fuzz::socket_addr;

/// The documented bound on a response to a Binding request (IPv4 addresses).
const MAX_RESPONSE_V4: usize = 84;
/// The same with IPv6 addresses: header, four 24-byte address attributes, FINGERPRINT.
const MAX_RESPONSE: usize = 20 + 4 * 24 + 8;
/// An error response: header, ERROR-CODE with a reason of at most 32 bytes, FINGERPRINT.
const MAX_ERROR_RESPONSE: usize = 20 + 4 + 4 + 32 + 8;

/// STUN cannot carry a scope id or flow label: the address as it goes on the wire.
fn plain(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip(), addr.port())
}

fn address_attribute_len(addr: &SocketAddr) -> usize {
    4 + 4 + if addr.is_ipv4() { 4 } else { 16 }
}

/// The same bytes with the STUN shape forced: top bits clear, the cookie, a length that
/// matches the datagram; `kind`, if given, as the message type.
fn shaped(data: &[u8], kind: Option<u16>) -> Option<Vec<u8>> {
    if data.len() < HEADER_LEN {
        return None;
    }
    let body = (data.len() - HEADER_LEN) & !3;
    let mut out = data[..HEADER_LEN + body].to_vec();
    match kind {
        Some(kind) => out[0..2].copy_from_slice(&kind.to_be_bytes()),
        None => out[0] &= 0x3F,
    }
    out[2..4].copy_from_slice(&(body as u16).to_be_bytes());
    out[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    Some(out)
}

fn check_codec(data: &[u8], source: SocketAddr) {
    let decoded = stun::decode(data);
    let answer = stun::answer_binding(data, source);
    if decoded.is_ok() {
        assert!(
            stun::is_stun(data),
            "decoded a datagram that is not STUN-shaped"
        );
    }
    match decoded {
        Ok(StunPacket::BindingRequest {
            transaction,
            username,
        }) => {
            assert_eq!(&transaction[..], &data[8..20]);
            let answer = answer.unwrap_or_else(|| panic!("a Binding request was not answered"));
            assert_eq!(answer, stun::binding_success(transaction, source));
            assert_eq!(
                stun::decode(&answer),
                Ok(StunPacket::BindingSuccess {
                    transaction,
                    mapped: source
                })
            );
            if let Some(tag) = username.as_deref().and_then(ProbeTag::from_username) {
                assert_eq!(ProbeTag::from_username(&tag.to_username()), Some(tag));
            }
        }
        Ok(StunPacket::BindingSuccess { transaction, .. }) => {
            assert_eq!(&transaction[..], &data[8..20]);
            assert_eq!(answer, None, "a response was answered");
        }
        Err(_) => assert_eq!(answer, None, "something that does not decode was answered"),
    }
    let _ = stun::verify_probe(data, &stun::PunchKey::from_bytes([0; 16]));
}

fn check_server(data: &[u8], contexts: &[ResponseContext], reason: &str) {
    let _ = stun5780::parse_response_addresses(data);
    let Some(request) = stun5780::parse_binding_request(data) else {
        return;
    };
    assert!(
        stun::is_stun(data),
        "parsed a datagram that is not STUN-shaped"
    );
    assert_eq!(
        &data[0..2],
        &[0, 1],
        "parsed something that is not a Binding request"
    );
    assert_eq!(&request.transaction[..], &data[8..20]);
    let length = usize::from(u16::from_be_bytes([data[2], data[3]]));
    assert!(HEADER_LEN + length <= data.len());
    for ctx in contexts {
        let response = stun5780::binding_response(request.transaction, ctx);
        let expected = HEADER_LEN
            + 2 * address_attribute_len(&ctx.mapped)
            + address_attribute_len(&ctx.origin)
            + ctx.other.as_ref().map_or(0, address_attribute_len)
            + 8;
        assert_eq!(response.len(), expected, "response size for {ctx:?}");
        assert!(response.len() <= MAX_RESPONSE);
        if ctx.mapped.is_ipv4() && ctx.origin.is_ipv4() && ctx.other.is_none_or(|o| o.is_ipv4()) {
            assert!(
                response.len() <= MAX_RESPONSE_V4,
                "{} bytes for {ctx:?}",
                response.len()
            );
        }
        assert!(stun::is_stun(&response));
        assert_eq!(
            stun::decode(&response),
            Ok(StunPacket::BindingSuccess {
                transaction: request.transaction,
                mapped: ctx.mapped
            }),
            "stun_codec reads the response differently"
        );
        assert_eq!(
            stun5780::parse_response_addresses(&response),
            (Some(ctx.origin), ctx.other)
        );
        assert_eq!(
            stun5780::parse_binding_request(&response),
            None,
            "a response parses as a request"
        );
    }
    let error = stun5780::binding_error(request.transaction, 420, reason);
    assert!(
        error.len() <= MAX_ERROR_RESPONSE,
        "{}-byte error response",
        error.len()
    );
    assert!(stun::is_stun(&error));
    assert_eq!(stun5780::parse_binding_request(&error), None);
    assert!(
        stun::decode(&error).is_err(),
        "an error response decodes as a request or success"
    );
}

#[derive(Arbitrary, Debug)]
struct Encoders {
    transaction: [u8; 12],
    nonce: u64,
    key: [u8; 16],
    other_key: [u8; 16],
    sender: [u8; 32],
    counter: u32,
    change_ip: bool,
    change_port: bool,
    flip: u8,
    username: String,
}

fn check_encoders(e: &Encoders, mapped: SocketAddr) {
    let txid = e.transaction;
    let request = stun::binding_request(txid);
    assert_eq!(
        stun::decode(&request),
        Ok(StunPacket::BindingRequest {
            transaction: txid,
            username: None
        })
    );
    assert_eq!(
        stun5780::parse_binding_request(&request),
        Some(BindingRequest {
            transaction: txid,
            change_ip: false,
            change_port: false
        })
    );
    assert_eq!(
        stun::decode(&stun::binding_success(txid, mapped)),
        Ok(StunPacket::BindingSuccess {
            transaction: txid,
            mapped
        })
    );
    let change = stun5780::binding_request_with_change(txid, e.change_ip, e.change_port);
    assert_eq!(
        stun5780::parse_binding_request(&change),
        Some(BindingRequest {
            transaction: txid,
            change_ip: e.change_ip,
            change_port: e.change_port
        })
    );

    let tag = ProbeTag {
        nonce: e.nonce,
        sender: PeerId::from_key_digest(&e.sender),
    };
    assert_eq!(ProbeTag::from_username(&tag.to_username()), Some(tag));
    let key = stun::PunchKey::from_bytes(e.key);
    let other_key = stun::PunchKey::from_bytes(e.other_key);
    let probe = stun::probe_request(&tag, e.counter, &key);
    let transaction = tag.transaction(e.counter);
    assert_eq!(stun::nonce_of_transaction(&transaction), e.nonce);
    match stun::decode(&probe) {
        Ok(StunPacket::BindingRequest {
            transaction: t,
            username: Some(name),
        }) => {
            assert_eq!(t, transaction);
            assert_eq!(ProbeTag::from_username(&name), Some(tag));
        }
        other => panic!("a probe decodes as {other:?}"),
    }
    assert!(stun::verify_probe(&probe, &key));
    let answer = stun::probe_success(transaction, mapped, &key);
    assert!(stun::verify_probe(&answer, &key));
    assert_eq!(
        stun::decode(&answer),
        Ok(StunPacket::BindingSuccess {
            transaction,
            mapped
        })
    );
    if e.other_key != e.key {
        assert!(
            !stun::verify_probe(&probe, &other_key),
            "a probe verifies with another key"
        );
        assert!(!stun::verify_probe(&answer, &other_key));
    }
    // Any change to the transaction id breaks MESSAGE-INTEGRITY.
    for packet in [&probe, &answer] {
        let mut tampered = packet.clone();
        let bit = usize::from(e.flip) % 96;
        tampered[8 + bit / 8] ^= 1 << (bit % 8);
        assert!(
            !stun::verify_probe(&tampered, &key),
            "a tampered probe verifies"
        );
    }
    if let Some(parsed) = ProbeTag::from_username(&e.username) {
        assert_eq!(ProbeTag::from_username(&parsed.to_username()), Some(parsed));
    }
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let source = socket_addr(&mut u)
        .map(plain)
        .unwrap_or(([192, 0, 2, 1], 9).into());
    let mut contexts = vec![
        ResponseContext {
            mapped: "198.51.100.7:41000".parse().unwrap(),
            origin: "203.0.113.10:3478".parse().unwrap(),
            other: Some("203.0.113.11:3479".parse().unwrap()),
        },
        ResponseContext {
            mapped: "[2001:db8::7]:41000".parse().unwrap(),
            origin: "[2001:db8::10]:3478".parse().unwrap(),
            other: Some("[2001:db8::11]:3479".parse().unwrap()),
        },
    ];
    if let (Ok(mapped), Ok(origin), Ok(other), Ok(has_other)) = (
        socket_addr(&mut u),
        socket_addr(&mut u),
        socket_addr(&mut u),
        u.arbitrary::<bool>(),
    ) {
        contexts.push(ResponseContext {
            mapped: plain(mapped),
            origin: plain(origin),
            other: has_other.then(|| plain(other)),
        });
    }
    let reason: String = u.arbitrary().unwrap_or_default();

    check_codec(data, source);
    check_server(data, &contexts, &reason);
    if let Some(shaped) = shaped(data, None) {
        check_codec(&shaped, source);
        check_server(&shaped, &contexts, &reason);
    }
    if let Some(shaped) = shaped(data, Some(0x0001)) {
        check_codec(&shaped, source);
        check_server(&shaped, &contexts, &reason);
    }
    if let Ok(encoders) = Encoders::arbitrary(&mut u) {
        check_encoders(&encoders, source);
    }
});
