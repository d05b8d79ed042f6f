//! Port mapping by the router. [`probe`] tells whether the default gateway offers NAT-PMP
//! (RFC 6886), PCP (RFC 6887) and UPnP IGD (SSDP discovery), all at once, as Tailscale's
//! portmapper does, for `peer netcheck`; nothing is mapped by it. [`mapper`] (sans-IO) and
//! [`driver`] (its I/O) ask the gateway to map the peer's UDP port and keep the mapping, which
//! the rendezvous hands out as a candidate of its own kind (`port mapping`).
//!
//! The encoders and parsers are pure and tested on bytes ([`wire`], [`upnp`]).
//!
//! Why it is a module of its own: the probes speak three binary protocols whose parsers take
//! bytes from the LAN; keeping them pure makes them testable and fuzzable without a router.

pub mod driver;
pub mod mapper;
pub mod upnp;
pub mod wire;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use serde::Serialize;
use tokio::net::UdpSocket;

/// NAT-PMP and PCP server port on the gateway.
pub const NAT_PMP_PORT: u16 = 5351;
/// SSDP port.
pub const SSDP_PORT: u16 = 1900;
/// SSDP multicast group.
pub const SSDP_GROUP: Ipv4Addr = Ipv4Addr::new(239, 255, 255, 250);
/// How long the probes wait for answers.
const PROBE_WAIT: Duration = Duration::from_millis(1200);

/// What the gateway answered.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct PortMapping {
    /// The default gateway probed (`None`: no IPv4 default route).
    pub gateway: Option<IpAddr>,
    /// A UPnP Internet Gateway Device answered SSDP discovery.
    pub upnp: bool,
    /// Where its description is (the LOCATION header).
    pub upnp_location: Option<String>,
    /// NAT-PMP answered an external-address request.
    pub nat_pmp: bool,
    /// PCP answered an ANNOUNCE.
    pub pcp: bool,
    /// The external address NAT-PMP reported.
    pub external_ip: Option<IpAddr>,
}

impl PortMapping {
    /// One line for people.
    pub fn describe(&self) -> String {
        let Some(gateway) = self.gateway else {
            return "not probed (no IPv4 default gateway)".to_owned();
        };
        let mut offered = Vec::new();
        if self.upnp {
            offered.push("UPnP IGD");
        }
        if self.nat_pmp {
            offered.push("NAT-PMP");
        }
        if self.pcp {
            offered.push("PCP");
        }
        if offered.is_empty() {
            format!("none (gateway {gateway} answers neither UPnP IGD, NAT-PMP nor PCP)")
        } else {
            let external = self
                .external_ip
                .map(|ip| format!(", external address {ip}"))
                .unwrap_or_default();
            format!("{} (gateway {gateway}{external})", offered.join(", "))
        }
    }
}

/// NAT-PMP "external address" request: version 0, opcode 0.
pub fn nat_pmp_request() -> [u8; 2] {
    [0, 0]
}

/// Parses a NAT-PMP external-address response: `Some(ip)` when it reports success.
pub fn parse_nat_pmp_response(data: &[u8]) -> Option<Ipv4Addr> {
    if data.len() < 12 || data[0] != 0 || data[1] != 128 {
        return None;
    }
    let result = u16::from_be_bytes([data[2], data[3]]);
    (result == 0).then(|| Ipv4Addr::new(data[8], data[9], data[10], data[11]))
}

/// PCP ANNOUNCE request (RFC 6887 section 14.1) from `client`.
pub fn pcp_announce(client: Ipv4Addr) -> [u8; 24] {
    let mut out = [0u8; 24];
    out[0] = 2; // version
    out[1] = 0; // request, opcode ANNOUNCE
                // lifetime 0 (bytes 4..8); client IP as IPv4-mapped IPv6 (bytes 8..24)
    out[18] = 0xff;
    out[19] = 0xff;
    out[20..24].copy_from_slice(&client.octets());
    out
}

/// Whether `data` is a successful PCP ANNOUNCE response.
pub fn parse_pcp_response(data: &[u8]) -> bool {
    // Version 2, response bit with opcode ANNOUNCE, result SUCCESS.
    data.len() >= 24 && data[0] == 2 && data[1] == 0x80 && data[3] == 0
}

/// SSDP M-SEARCH for an Internet Gateway Device.
pub fn ssdp_search() -> Vec<u8> {
    format!(
        "M-SEARCH * HTTP/1.1\r\nHOST: {SSDP_GROUP}:{SSDP_PORT}\r\n\
         ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n\
         MAN: \"ssdp:discover\"\r\nMX: 1\r\n\r\n"
    )
    .into_bytes()
}

/// Parses an SSDP answer: `Some(location)` (possibly empty) when it is a 200 OK for an Internet
/// Gateway Device or one of its WAN connection services.
pub fn parse_ssdp_response(data: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(data).ok()?;
    let mut lines = text.split("\r\n");
    let status = lines.next()?;
    if !status.starts_with("HTTP/1.1 200") && !status.starts_with("HTTP/1.0 200") {
        return None;
    }
    let mut gateway = false;
    let mut location = String::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "st" | "nt" => {
                gateway |= value.contains("InternetGatewayDevice")
                    || value.contains("WANIPConnection")
                    || value.contains("WANPPPConnection")
            }
            "location" => location = value.chars().take(256).collect(),
            _ => {}
        }
    }
    gateway.then_some(location)
}

/// The IPv4 default gateway, from `/proc/net/route`.
pub fn default_gateway() -> Option<Ipv4Addr> {
    let table = std::fs::read_to_string("/proc/net/route").ok()?;
    parse_route_table(&table)
}

/// The gateway of the first default route (destination 0, flag RTF_GATEWAY) in the text of
/// `/proc/net/route`.
pub fn parse_route_table(table: &str) -> Option<Ipv4Addr> {
    const RTF_GATEWAY: u32 = 0x2;
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (destination, gateway, flags) = (fields.get(1)?, fields.get(2)?, fields.get(3)?);
        let flags = u32::from_str_radix(flags, 16).ok()?;
        if *destination != "00000000" || flags & RTF_GATEWAY == 0 {
            return None;
        }
        // Host byte order, which is little-endian on every platform this runs on.
        let raw = u32::from_str_radix(gateway, 16).ok()?;
        Some(Ipv4Addr::from(raw.to_le_bytes()))
    })
}

/// Probes `gateway` for the three protocols at once.
pub async fn probe(gateway: Option<Ipv4Addr>) -> PortMapping {
    let Some(gateway) = gateway else {
        return PortMapping::default();
    };
    let (pmp, pcp, upnp) = tokio::join!(
        probe_nat_pmp(gateway),
        probe_pcp(gateway),
        probe_upnp(gateway)
    );
    PortMapping {
        gateway: Some(IpAddr::V4(gateway)),
        upnp: upnp.is_some(),
        upnp_location: upnp.filter(|l| !l.is_empty()),
        nat_pmp: pmp.is_some(),
        pcp,
        external_ip: pmp.map(IpAddr::V4),
    }
}

/// Sends `request` to `to` up to three times and returns the first answer `parse` accepts.
async fn ask<T>(
    socket: &UdpSocket,
    request: &[u8],
    to: &[SocketAddr],
    parse: impl Fn(&[u8]) -> Option<T>,
) -> Option<T> {
    let mut buf = [0u8; 1500];
    let attempt = PROBE_WAIT / 3;
    for _ in 0..3 {
        for addr in to {
            let _ = socket.send_to(request, addr).await;
        }
        let deadline = tokio::time::Instant::now() + attempt;
        while let Ok(Ok((n, _))) =
            tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await
        {
            if let Some(found) = parse(&buf[..n]) {
                return Some(found);
            }
        }
    }
    None
}

async fn bound_socket() -> Option<UdpSocket> {
    UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await.ok()
}

async fn probe_nat_pmp(gateway: Ipv4Addr) -> Option<Ipv4Addr> {
    let socket = bound_socket().await?;
    let to = [SocketAddr::from((gateway, NAT_PMP_PORT))];
    ask(&socket, &nat_pmp_request(), &to, parse_nat_pmp_response).await
}

async fn probe_pcp(gateway: Ipv4Addr) -> bool {
    let Some(socket) = bound_socket().await else {
        return false;
    };
    let to = SocketAddr::from((gateway, NAT_PMP_PORT));
    // The client address in the request must be ours as the gateway sees it.
    let client = match socket.connect(to).await.and_then(|_| socket.local_addr()) {
        Ok(SocketAddr::V4(local)) => *local.ip(),
        _ => return false,
    };
    let mut buf = [0u8; 1500];
    for _ in 0..3 {
        let _ = socket.send(&pcp_announce(client)).await;
        let deadline = tokio::time::Instant::now() + PROBE_WAIT / 3;
        while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, socket.recv(&mut buf)).await {
            if parse_pcp_response(&buf[..n]) {
                return true;
            }
        }
    }
    false
}

async fn probe_upnp(gateway: Ipv4Addr) -> Option<String> {
    let socket = bound_socket().await?;
    // The multicast group is the standard; many gateways also answer unicast, and unicast
    // works where no multicast route exists.
    let to = [
        SocketAddr::from((SSDP_GROUP, SSDP_PORT)),
        SocketAddr::from((gateway, SSDP_PORT)),
    ];
    ask(&socket, &ssdp_search(), &to, parse_ssdp_response).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nat_pmp_codec() {
        assert_eq!(nat_pmp_request(), [0, 0]);
        let ok = [0, 128, 0, 0, 0, 0, 0, 5, 198, 51, 100, 7];
        assert_eq!(
            parse_nat_pmp_response(&ok),
            Some(Ipv4Addr::new(198, 51, 100, 7))
        );
        let mut refused = ok;
        refused[3] = 3; // network failure
        assert_eq!(parse_nat_pmp_response(&refused), None);
        assert_eq!(parse_nat_pmp_response(&ok[..11]), None);
        assert_eq!(parse_nat_pmp_response(&[]), None);
    }

    #[test]
    fn pcp_codec() {
        let request = pcp_announce(Ipv4Addr::new(10, 0, 1, 2));
        assert_eq!(request[0], 2);
        assert_eq!(&request[16..24], &[0, 0, 0xff, 0xff, 10, 0, 1, 2]);
        let mut response = [0u8; 24];
        response[0] = 2;
        response[1] = 0x80;
        assert!(parse_pcp_response(&response));
        response[3] = 1; // UNSUPP_VERSION
        assert!(!parse_pcp_response(&response));
        // A NAT-PMP-only server answers a version-2 request with version 0.
        assert!(!parse_pcp_response(&[0, 0x80, 0, 1]));
    }

    #[test]
    fn ssdp_codec() {
        let search = String::from_utf8(ssdp_search()).unwrap();
        assert!(search.starts_with("M-SEARCH * HTTP/1.1\r\n"));
        assert!(search.contains("InternetGatewayDevice:1"));
        let answer = b"HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\n\
            ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n\
            LOCATION: http://10.0.1.1:5000/rootDesc.xml\r\n\r\n";
        assert_eq!(
            parse_ssdp_response(answer).as_deref(),
            Some("http://10.0.1.1:5000/rootDesc.xml")
        );
        let printer = b"HTTP/1.1 200 OK\r\nST: urn:schemas-upnp-org:device:Printer:1\r\n\r\n";
        assert_eq!(parse_ssdp_response(printer), None);
        assert_eq!(parse_ssdp_response(b"\xff\xfe"), None);
        assert_eq!(parse_ssdp_response(b"HTTP/1.1 404 Not Found\r\n\r\n"), None);
    }

    #[test]
    fn default_route_from_proc() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\n\
            eth0\t0001000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\n\
            eth0\t00000000\t0101000A\t0003\t0\t0\t0\t00000000\n";
        assert_eq!(parse_route_table(table), Some(Ipv4Addr::new(10, 0, 1, 1)));
        assert_eq!(parse_route_table("Iface\tDestination\n"), None);
        assert_eq!(parse_route_table("h\neth0 00000000 zz 0003\n"), None);
    }

    #[test]
    fn describe_says_what_answered() {
        let none = PortMapping {
            gateway: Some(IpAddr::V4(Ipv4Addr::new(10, 0, 1, 1))),
            ..PortMapping::default()
        };
        assert!(none.describe().starts_with("none"));
        let some = PortMapping {
            nat_pmp: true,
            pcp: true,
            external_ip: Some(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 21))),
            ..none.clone()
        };
        assert_eq!(
            some.describe(),
            "NAT-PMP, PCP (gateway 10.0.1.1, external address 203.0.113.21)"
        );
        assert!(PortMapping::default().describe().contains("no IPv4"));
    }
}
