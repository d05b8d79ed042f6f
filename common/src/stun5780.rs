//! The STUN server side of RFC 5389 Binding and RFC 5780 NAT behaviour discovery, encoded by
//! hand: stun_codec 0.4 decodes CHANGE-REQUEST wrongly, and a server only needs to read one
//! attribute and write five.
//!
//! Responses carry XOR-MAPPED-ADDRESS, MAPPED-ADDRESS (for RFC 3489 clients), RESPONSE-ORIGIN,
//! OTHER-ADDRESS (when the server has an alternate address) and FINGERPRINT: 64 or 76 bytes over
//! IPv4, at most 124 over IPv6, whatever the request (the per-source rate limit of the server bounds the rest).

use std::net::{IpAddr, SocketAddr};

use crate::stun::{HEADER_LEN, MAGIC_COOKIE};

const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS: u16 = 0x0101;
const BINDING_ERROR: u16 = 0x0111;
const ATTR_MAPPED_ADDRESS: u16 = 0x0001;
const ATTR_CHANGE_REQUEST: u16 = 0x0003;
const ATTR_ERROR_CODE: u16 = 0x0009;
const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
const ATTR_FINGERPRINT: u16 = 0x8028;
const ATTR_RESPONSE_ORIGIN: u16 = 0x802b;
const ATTR_OTHER_ADDRESS: u16 = 0x802c;
const FINGERPRINT_XOR: u32 = 0x5354_554e;

/// A Binding request as a server needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindingRequest {
    /// Transaction id.
    pub transaction: [u8; 12],
    /// CHANGE-REQUEST asked for a response from the other IP.
    pub change_ip: bool,
    /// CHANGE-REQUEST asked for a response from the other port.
    pub change_port: bool,
}

/// Parses a Binding request; `None` for anything else (responses, other methods, garbage).
pub fn parse_binding_request(datagram: &[u8]) -> Option<BindingRequest> {
    if !crate::stun::is_stun(datagram) {
        return None;
    }
    let kind = u16::from_be_bytes([datagram[0], datagram[1]]);
    let length = u16::from_be_bytes([datagram[2], datagram[3]]) as usize;
    if kind != BINDING_REQUEST || HEADER_LEN + length > datagram.len() {
        return None;
    }
    let mut transaction = [0u8; 12];
    transaction.copy_from_slice(&datagram[8..20]);
    let mut request = BindingRequest {
        transaction,
        change_ip: false,
        change_port: false,
    };
    let mut attrs = &datagram[HEADER_LEN..HEADER_LEN + length];
    while attrs.len() >= 4 {
        let attr = u16::from_be_bytes([attrs[0], attrs[1]]);
        let len = u16::from_be_bytes([attrs[2], attrs[3]]) as usize;
        let padded = (len + 3) & !3;
        if 4 + len > attrs.len() {
            return None;
        }
        if attr == ATTR_CHANGE_REQUEST && len == 4 {
            let flags = u32::from_be_bytes([attrs[4], attrs[5], attrs[6], attrs[7]]);
            request.change_ip = flags & 0x4 != 0;
            request.change_port = flags & 0x2 != 0;
        }
        attrs = attrs.get(4 + padded..).unwrap_or(&[]);
    }
    Some(request)
}

/// Encodes a Binding request with CHANGE-REQUEST (for clients: the NAT behaviour tests).
pub fn binding_request_with_change(
    transaction: [u8; 12],
    change_ip: bool,
    change_port: bool,
) -> Vec<u8> {
    let mut flags = 0u32;
    if change_ip {
        flags |= 0x4;
    }
    if change_port {
        flags |= 0x2;
    }
    let mut out = header(BINDING_REQUEST, transaction);
    attribute(&mut out, ATTR_CHANGE_REQUEST, &flags.to_be_bytes());
    finish(out)
}

/// What a server knows when it answers.
#[derive(Debug, Clone, Copy)]
pub struct ResponseContext {
    /// The requester as seen.
    pub mapped: SocketAddr,
    /// The address the response is sent from.
    pub origin: SocketAddr,
    /// The server's alternate address (other IP and/or other port), if it has one.
    pub other: Option<SocketAddr>,
}

/// Encodes the Binding success response.
pub fn binding_response(transaction: [u8; 12], ctx: &ResponseContext) -> Vec<u8> {
    let mut out = header(BINDING_SUCCESS, transaction);
    attribute(
        &mut out,
        ATTR_XOR_MAPPED_ADDRESS,
        &address(ctx.mapped, Some(&transaction)),
    );
    attribute(&mut out, ATTR_MAPPED_ADDRESS, &address(ctx.mapped, None));
    attribute(&mut out, ATTR_RESPONSE_ORIGIN, &address(ctx.origin, None));
    if let Some(other) = ctx.other {
        attribute(&mut out, ATTR_OTHER_ADDRESS, &address(other, None));
    }
    finish(out)
}

/// Encodes a Binding error response (e.g. 420 when a CHANGE-REQUEST cannot be honoured).
pub fn binding_error(transaction: [u8; 12], code: u16, reason: &str) -> Vec<u8> {
    let mut out = header(BINDING_ERROR, transaction);
    let mut value = vec![0, 0, (code / 100) as u8, (code % 100) as u8];
    value.extend_from_slice(&reason.as_bytes()[..reason.len().min(32)]);
    attribute(&mut out, ATTR_ERROR_CODE, &value);
    finish(out)
}

/// Reads RESPONSE-ORIGIN and OTHER-ADDRESS from a success response (for clients).
pub fn parse_response_addresses(datagram: &[u8]) -> (Option<SocketAddr>, Option<SocketAddr>) {
    let mut origin = None;
    let mut other = None;
    if datagram.len() < HEADER_LEN || !crate::stun::is_stun(datagram) {
        return (None, None);
    }
    let length = u16::from_be_bytes([datagram[2], datagram[3]]) as usize;
    let mut attrs = datagram.get(HEADER_LEN..HEADER_LEN + length).unwrap_or(&[]);
    while attrs.len() >= 4 {
        let attr = u16::from_be_bytes([attrs[0], attrs[1]]);
        let len = u16::from_be_bytes([attrs[2], attrs[3]]) as usize;
        let Some(value) = attrs.get(4..4 + len) else {
            break;
        };
        match attr {
            ATTR_RESPONSE_ORIGIN => origin = parse_address(value),
            ATTR_OTHER_ADDRESS => other = parse_address(value),
            _ => {}
        }
        attrs = attrs.get(4 + ((len + 3) & !3)..).unwrap_or(&[]);
    }
    (origin, other)
}

fn parse_address(value: &[u8]) -> Option<SocketAddr> {
    let port = u16::from_be_bytes([*value.get(2)?, *value.get(3)?]);
    match value.get(1)? {
        0x01 => {
            let ip: [u8; 4] = value.get(4..8)?.try_into().ok()?;
            Some(SocketAddr::new(IpAddr::from(ip), port))
        }
        0x02 => {
            let ip: [u8; 16] = value.get(4..20)?.try_into().ok()?;
            Some(SocketAddr::new(IpAddr::from(ip), port))
        }
        _ => None,
    }
}

fn header(kind: u16, transaction: [u8; 12]) -> Vec<u8> {
    let mut out = Vec::with_capacity(96);
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
    out.extend_from_slice(&transaction);
    out
}

fn attribute(out: &mut Vec<u8>, kind: u16, value: &[u8]) {
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    out.extend_from_slice(value);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// The address attribute value; XORed as in XOR-MAPPED-ADDRESS when a transaction is given.
fn address(addr: SocketAddr, xor_with: Option<&[u8; 12]>) -> Vec<u8> {
    let cookie = MAGIC_COOKIE.to_be_bytes();
    let mut port = addr.port();
    if xor_with.is_some() {
        port ^= (MAGIC_COOKIE >> 16) as u16;
    }
    let mut value = vec![0];
    match addr.ip() {
        IpAddr::V4(ip) => {
            value.push(0x01);
            value.extend_from_slice(&port.to_be_bytes());
            let mut octets = ip.octets();
            if xor_with.is_some() {
                for (o, c) in octets.iter_mut().zip(cookie) {
                    *o ^= c;
                }
            }
            value.extend_from_slice(&octets);
        }
        IpAddr::V6(ip) => {
            value.push(0x02);
            value.extend_from_slice(&port.to_be_bytes());
            let mut octets = ip.octets();
            if let Some(transaction) = xor_with {
                let key: Vec<u8> = cookie.iter().chain(transaction.iter()).copied().collect();
                for (o, k) in octets.iter_mut().zip(key) {
                    *o ^= k;
                }
            }
            value.extend_from_slice(&octets);
        }
    }
    value
}

/// Sets the length and appends FINGERPRINT.
fn finish(mut out: Vec<u8>) -> Vec<u8> {
    let with_fingerprint = out.len() - HEADER_LEN + 8;
    out[2..4].copy_from_slice(&(with_fingerprint as u16).to_be_bytes());
    let crc = crc32(&out) ^ FINGERPRINT_XOR;
    attribute(&mut out, ATTR_FINGERPRINT, &crc.to_be_bytes());
    out
}

/// CRC-32 (IEEE), as FINGERPRINT needs.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stun::{decode, StunPacket};
    use proptest::prelude::*;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn change_request_round_trip() {
        for (ip, port) in [(false, false), (true, false), (false, true), (true, true)] {
            let request = binding_request_with_change([5; 12], ip, port);
            assert_eq!(
                parse_binding_request(&request),
                Some(BindingRequest {
                    transaction: [5; 12],
                    change_ip: ip,
                    change_port: port
                })
            );
        }
        // A plain request (from stun_codec) has no change flags.
        let plain = crate::stun::binding_request([6; 12]);
        assert_eq!(
            parse_binding_request(&plain),
            Some(BindingRequest {
                transaction: [6; 12],
                change_ip: false,
                change_port: false
            })
        );
    }

    #[test]
    fn responses_decode_with_a_standard_decoder_and_are_small() {
        let ctx = ResponseContext {
            mapped: "198.51.100.7:41000".parse().unwrap(),
            origin: "203.0.113.10:3479".parse().unwrap(),
            other: Some("203.0.113.11:3479".parse().unwrap()),
        };
        let response = binding_response([7; 12], &ctx);
        assert!(response.len() <= 84, "{}", response.len());
        // stun_codec (another implementation) reads it, FINGERPRINT and all.
        assert_eq!(
            decode(&response),
            Ok(StunPacket::BindingSuccess {
                transaction: [7; 12],
                mapped: ctx.mapped
            })
        );
        assert_eq!(
            parse_response_addresses(&response),
            (Some(ctx.origin), ctx.other)
        );
        let v6 = ResponseContext {
            mapped: "[2001:db8::7]:41000".parse().unwrap(),
            ..ctx
        };
        assert_eq!(
            decode(&binding_response([8; 12], &v6)),
            Ok(StunPacket::BindingSuccess {
                transaction: [8; 12],
                mapped: v6.mapped
            })
        );
        let error = binding_error([9; 12], 420, "cannot change IP");
        assert!(crate::stun::is_stun(&error));
        assert_eq!(parse_binding_request(&error), None);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_binding_request(&bytes);
            let _ = parse_response_addresses(&bytes);
            if bytes.len() >= HEADER_LEN {
                bytes[0] = 0;
                bytes[1] = 1;
                bytes[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
                let len = ((bytes.len() - HEADER_LEN) as u16) & !3;
                bytes[2..4].copy_from_slice(&len.to_be_bytes());
                let _ = parse_binding_request(&bytes);
                let _ = parse_response_addresses(&bytes);
            }
        }
    }
}
