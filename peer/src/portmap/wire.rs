//! Encoders and parsers of the mapping requests of PCP (RFC 6887, opcode MAP) and NAT-PMP
//! (RFC 6886, opcodes 0 and 1 for UDP). Pure functions on bytes from the LAN: every parser takes
//! any input and answers `None` for anything it does not recognise as a well-formed response.

use std::net::{Ipv4Addr, Ipv6Addr};

/// PCP version.
const PCP_VERSION: u8 = 2;
/// PCP opcode MAP.
const PCP_OP_MAP: u8 = 1;
/// Length of a PCP MAP request and response (24-byte header, 36-byte MAP body).
pub const PCP_MAP_LEN: usize = 60;
/// Largest PCP message (RFC 6887 section 7): longer datagrams are not PCP.
pub const PCP_MAX_LEN: usize = 1100;
/// IANA protocol number of UDP.
const IPPROTO_UDP: u8 = 17;
/// PCP result UNSUPP_VERSION: a NAT-PMP-only server answers a PCP request with it.
pub const PCP_UNSUPP_VERSION: u8 = 1;

/// NAT-PMP opcode "map UDP".
const PMP_OP_MAP_UDP: u8 = 1;

/// What a PCP MAP response says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PcpMapResponse {
    /// Result code (0 = success).
    pub result: u8,
    /// Granted lifetime, seconds.
    pub lifetime: u32,
    /// The server's epoch (seconds since its state began).
    pub epoch: u32,
    /// The nonce of the request it answers.
    pub nonce: [u8; 12],
    /// The internal port it is for.
    pub internal_port: u16,
    /// Assigned external port.
    pub external_port: u16,
    /// Assigned external address (IPv4; `None` when the response carries a non-IPv4 address).
    pub external_ip: Option<Ipv4Addr>,
}

/// A PCP MAP request (RFC 6887 sections 7.1 and 11.1) for UDP `internal_port` of `client`,
/// suggesting the same external port, for `lifetime` seconds (0 deletes the mapping).
pub fn pcp_map_request(
    client: Ipv4Addr,
    nonce: [u8; 12],
    internal_port: u16,
    suggested_external_port: u16,
    lifetime: u32,
) -> [u8; PCP_MAP_LEN] {
    let mut out = [0u8; PCP_MAP_LEN];
    out[0] = PCP_VERSION;
    out[1] = PCP_OP_MAP; // R bit 0: request
    out[4..8].copy_from_slice(&lifetime.to_be_bytes());
    out[8..24].copy_from_slice(&client.to_ipv6_mapped().octets());
    out[24..36].copy_from_slice(&nonce);
    out[36] = IPPROTO_UDP;
    out[40..42].copy_from_slice(&internal_port.to_be_bytes());
    out[42..44].copy_from_slice(&suggested_external_port.to_be_bytes());
    // Suggested external address: the IPv4-mapped unspecified address (any).
    out[44..60].copy_from_slice(&Ipv4Addr::UNSPECIFIED.to_ipv6_mapped().octets());
    out
}

/// Parses a PCP response to a MAP request. A response with an error result still parses (the
/// caller wants the result code); only malformed datagrams and other opcodes give `None`.
pub fn parse_pcp_map_response(data: &[u8]) -> Option<PcpMapResponse> {
    if data.len() < 4 || data.len() > PCP_MAX_LEN {
        return None;
    }
    // An error response may be short (a server that does not speak version 2 answers with its
    // own header only): the version and result are all that matter then.
    if data[0] != PCP_VERSION || data[1] != 0x80 | PCP_OP_MAP {
        return None;
    }
    if data.len() < PCP_MAP_LEN {
        return None;
    }
    let u32_at = |i: usize| u32::from_be_bytes([data[i], data[i + 1], data[i + 2], data[i + 3]]);
    let u16_at = |i: usize| u16::from_be_bytes([data[i], data[i + 1]]);
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&data[24..36]);
    if data[36] != IPPROTO_UDP {
        return None;
    }
    let mut ip = [0u8; 16];
    ip.copy_from_slice(&data[44..60]);
    Some(PcpMapResponse {
        result: data[3],
        lifetime: u32_at(4),
        epoch: u32_at(8),
        nonce,
        internal_port: u16_at(40),
        external_port: u16_at(42),
        external_ip: Ipv6Addr::from(ip).to_ipv4_mapped(),
    })
}

/// Whether `data` is a version-0 (NAT-PMP) answer to our version-2 request: the server speaks
/// NAT-PMP only (RFC 6887 section 9), or a PCP header with UNSUPP_VERSION.
pub fn pcp_unsupported_version(data: &[u8]) -> bool {
    data.len() >= 4 && data[1] & 0x80 != 0 && (data[0] == 0 || data[3] == PCP_UNSUPP_VERSION)
}

/// What a NAT-PMP "map UDP" response says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PmpMapResponse {
    /// Result code (0 = success).
    pub result: u16,
    /// Seconds since the server's state began.
    pub epoch: u32,
    /// The internal port it is for.
    pub internal_port: u16,
    /// Mapped external port.
    pub external_port: u16,
    /// Granted lifetime, seconds.
    pub lifetime: u32,
}

/// A NAT-PMP "map UDP" request (RFC 6886 section 3.3): 0 lifetime and 0 suggested port delete it.
pub fn pmp_map_request(
    internal_port: u16,
    suggested_external_port: u16,
    lifetime: u32,
) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[1] = PMP_OP_MAP_UDP;
    out[4..6].copy_from_slice(&internal_port.to_be_bytes());
    out[6..8].copy_from_slice(&suggested_external_port.to_be_bytes());
    out[8..12].copy_from_slice(&lifetime.to_be_bytes());
    out
}

/// Parses a NAT-PMP "map UDP" response (16 bytes; error responses may be 8).
pub fn parse_pmp_map_response(data: &[u8]) -> Option<PmpMapResponse> {
    if data.len() < 8 || data.len() > PCP_MAX_LEN || data[0] != 0 || data[1] != 128 + PMP_OP_MAP_UDP
    {
        return None;
    }
    let result = u16::from_be_bytes([data[2], data[3]]);
    let epoch = u32::from_be_bytes([data[4], data[5], data[6], data[7]]);
    if result != 0 {
        return Some(PmpMapResponse {
            result,
            epoch,
            internal_port: 0,
            external_port: 0,
            lifetime: 0,
        });
    }
    if data.len() < 16 {
        return None;
    }
    Some(PmpMapResponse {
        result,
        epoch,
        internal_port: u16::from_be_bytes([data[8], data[9]]),
        external_port: u16::from_be_bytes([data[10], data[11]]),
        lifetime: u32::from_be_bytes([data[12], data[13], data[14], data[15]]),
    })
}

/// A NAT-PMP external-address response: (result, epoch, address).
pub fn parse_pmp_address_response(data: &[u8]) -> Option<(u16, u32, Ipv4Addr)> {
    if data.len() < 12 || data.len() > PCP_MAX_LEN || data[0] != 0 || data[1] != 128 {
        return None;
    }
    Some((
        u16::from_be_bytes([data[2], data[3]]),
        u32::from_be_bytes([data[4], data[5], data[6], data[7]]),
        Ipv4Addr::new(data[8], data[9], data[10], data[11]),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pcp_response(result: u8, nonce: [u8; 12], port: u16) -> Vec<u8> {
        let mut r = vec![0u8; PCP_MAP_LEN];
        r[0] = 2;
        r[1] = 0x81;
        r[3] = result;
        r[4..8].copy_from_slice(&120u32.to_be_bytes());
        r[8..12].copy_from_slice(&77u32.to_be_bytes());
        r[24..36].copy_from_slice(&nonce);
        r[36] = 17;
        r[40..42].copy_from_slice(&4000u16.to_be_bytes());
        r[42..44].copy_from_slice(&port.to_be_bytes());
        r[44..60].copy_from_slice(&Ipv4Addr::new(203, 0, 113, 21).to_ipv6_mapped().octets());
        r
    }

    #[test]
    fn pcp_map_round_trip() {
        let nonce = [7u8; 12];
        let req = pcp_map_request(Ipv4Addr::new(10, 0, 1, 2), nonce, 4000, 4000, 7200);
        assert_eq!(req[0], 2);
        assert_eq!(req[1], 1);
        assert_eq!(&req[4..8], &7200u32.to_be_bytes());
        assert_eq!(&req[18..24], &[0xff, 0xff, 10, 0, 1, 2]);
        assert_eq!(&req[24..36], &nonce);
        assert_eq!(req[36], 17);
        assert_eq!(&req[40..44], &[0x0f, 0xa0, 0x0f, 0xa0]);
        let parsed = parse_pcp_map_response(&pcp_response(0, nonce, 41000)).unwrap();
        assert_eq!(parsed.result, 0);
        assert_eq!(parsed.lifetime, 120);
        assert_eq!(parsed.epoch, 77);
        assert_eq!(parsed.nonce, nonce);
        assert_eq!(parsed.internal_port, 4000);
        assert_eq!(parsed.external_port, 41000);
        assert_eq!(parsed.external_ip, Some(Ipv4Addr::new(203, 0, 113, 21)));
    }

    #[test]
    fn pcp_malformed_is_refused() {
        let good = pcp_response(0, [1; 12], 5);
        // Truncated at every length, a request (no R bit), another opcode, another protocol,
        // too long.
        for n in 0..PCP_MAP_LEN {
            assert_eq!(parse_pcp_map_response(&good[..n]), None, "{n}");
        }
        let mut request = good.clone();
        request[1] = 1;
        assert_eq!(parse_pcp_map_response(&request), None);
        let mut announce = good.clone();
        announce[1] = 0x80;
        assert_eq!(parse_pcp_map_response(&announce), None);
        let mut tcp = good.clone();
        tcp[36] = 6;
        assert_eq!(parse_pcp_map_response(&tcp), None);
        let mut long = good.clone();
        long.resize(PCP_MAX_LEN + 1, 0);
        assert_eq!(parse_pcp_map_response(&long), None);
        // A NAT-PMP server's answer to a version-2 request.
        assert!(pcp_unsupported_version(&[0, 0x81, 0, 1, 0, 0, 0, 9]));
        assert!(!pcp_unsupported_version(&good));
    }

    #[test]
    fn pmp_map_round_trip() {
        assert_eq!(
            pmp_map_request(4000, 4000, 7200),
            [0, 1, 0, 0, 0x0f, 0xa0, 0x0f, 0xa0, 0, 0, 0x1c, 0x20]
        );
        let ok = [
            0, 129, 0, 0, 0, 0, 0, 9, 0x0f, 0xa0, 0xa0, 0x28, 0, 0, 0, 60,
        ];
        assert_eq!(
            parse_pmp_map_response(&ok),
            Some(PmpMapResponse {
                result: 0,
                epoch: 9,
                internal_port: 4000,
                external_port: 41000,
                lifetime: 60
            })
        );
        for n in 0..8 {
            assert_eq!(parse_pmp_map_response(&ok[..n]), None);
        }
        // A success that is cut short is malformed; an error needs only the header.
        assert_eq!(parse_pmp_map_response(&ok[..12]), None);
        let refused = [0, 129, 0, 2, 0, 0, 0, 9];
        assert_eq!(parse_pmp_map_response(&refused).map(|r| r.result), Some(2));
        assert_eq!(parse_pmp_map_response(&[0, 130, 0, 0, 0, 0, 0, 0]), None);
        assert_eq!(
            parse_pmp_address_response(&[0, 128, 0, 0, 0, 0, 1, 0, 192, 0, 2, 1]),
            Some((0, 256, Ipv4Addr::new(192, 0, 2, 1)))
        );
        assert_eq!(parse_pmp_address_response(&[0, 128, 0, 0]), None);
    }
}
