//! `peer netcheck`: what this network's NAT does, in RFC 4787/5780 terms, and what will work.
//!
//! The tests are those of RFC 5780 section 4, run against a STUN server that offers behaviour
//! discovery (OTHER-ADDRESS): mapping (does the public address change with the destination's IP,
//! or port?), filtering (do answers from another IP, or another port, get in?), hairpinning, port
//! preservation, and whether UDP and TCP 443 get out. [`classify`] turns the observations into a
//! report without any I/O, so it is tested on its own.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::stun::{self, StunPacket};
use common::stun5780;
use serde::Serialize;
use tokio::net::UdpSocket;

/// NAT behaviour for mapping or filtering (RFC 4787).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Behaviour {
    /// The same for every destination (or anyone may send in).
    EndpointIndependent,
    /// Depends on the destination's IP.
    AddressDependent,
    /// Depends on the destination's IP and port.
    AddressAndPortDependent,
    /// Not measurable (the STUN server offers no alternate address, or UDP is blocked).
    Unknown,
}

impl Behaviour {
    fn words(&self) -> &'static str {
        match self {
            Behaviour::EndpointIndependent => "endpoint-independent",
            Behaviour::AddressDependent => "address-dependent",
            Behaviour::AddressAndPortDependent => "address-and-port-dependent",
            Behaviour::Unknown => "unknown",
        }
    }
}

/// What the tests saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observations {
    /// Our local address.
    pub local: Option<SocketAddr>,
    /// Test I: mapped address from the primary address, its round trip, the alternate address.
    pub primary: Option<(SocketAddr, Duration, Option<SocketAddr>)>,
    /// Mapped address from (alternate IP, primary port).
    pub via_alt_ip: Option<SocketAddr>,
    /// Mapped address from (alternate IP, alternate port).
    pub via_alt_both: Option<SocketAddr>,
    /// An answer asked to come from the other IP and port arrived.
    pub filter_change_both: Option<bool>,
    /// An answer asked to come from the other port arrived.
    pub filter_change_port: Option<bool>,
    /// A datagram to our own public address came back to us.
    pub hairpin: Option<bool>,
    /// A TCP connection to the server's port 443 succeeded.
    pub tcp_443: Option<bool>,
}

/// The result, for people and for `--json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// UDP to the STUN server got an answer.
    pub udp: bool,
    /// TCP to port 443 of the server got through (`None`: not tested).
    pub tcp_443: Option<bool>,
    /// Our public address (first test).
    pub public_addr: Option<SocketAddr>,
    /// Round trip to the STUN server, ms.
    pub rtt_ms: Option<f64>,
    /// No NAT at all (public address = local address).
    pub no_nat: bool,
    /// Mapping behaviour.
    pub mapping: Behaviour,
    /// Filtering behaviour.
    pub filtering: Behaviour,
    /// The NAT keeps our local port as the public port.
    pub port_preserved: Option<bool>,
    /// Packets to our own public address come back (`None`: not tested).
    pub hairpin: Option<bool>,
    /// In plain words, with which peers a direct path will work.
    pub verdict: String,
}

/// Classifies the observations (RFC 5780 section 4.3 and 4.4).
pub fn classify(obs: &Observations) -> Report {
    let Some((public, rtt, other)) = obs.primary else {
        let verdict = match obs.tcp_443 {
            Some(true) => "UDP does not get out of this network; TCP 443 does: every connection will be relayed through the rendezvous over TLS on TCP 443".to_owned(),
            _ => "UDP does not get out of this network and TCP 443 did not either: no connection is possible from here".to_owned(),
        };
        return Report {
            udp: false,
            tcp_443: obs.tcp_443,
            public_addr: None,
            rtt_ms: None,
            no_nat: false,
            mapping: Behaviour::Unknown,
            filtering: Behaviour::Unknown,
            port_preserved: None,
            hairpin: obs.hairpin,
            verdict,
        };
    };
    let no_nat = obs.local.is_some_and(|l| l == public);
    let mapping = if no_nat {
        Behaviour::EndpointIndependent
    } else {
        match (other, obs.via_alt_ip, obs.via_alt_both) {
            (None, _, _) | (_, None, _) => Behaviour::Unknown,
            (_, Some(m2), _) if m2 == public => Behaviour::EndpointIndependent,
            (_, Some(m2), Some(m3)) if m3 == m2 => Behaviour::AddressDependent,
            (_, Some(_), Some(_)) => Behaviour::AddressAndPortDependent,
            (_, Some(_), None) => Behaviour::Unknown,
        }
    };
    let filtering = match (other, obs.filter_change_both, obs.filter_change_port) {
        (None, _, _) => Behaviour::Unknown,
        (_, Some(true), _) => Behaviour::EndpointIndependent,
        (_, Some(false), Some(true)) => Behaviour::AddressDependent,
        (_, Some(false), Some(false)) => Behaviour::AddressAndPortDependent,
        _ => Behaviour::Unknown,
    };
    let port_preserved = obs.local.map(|l| l.port() == public.port());
    let verdict = verdict(no_nat, mapping, filtering);
    Report {
        udp: true,
        tcp_443: obs.tcp_443,
        public_addr: Some(public),
        rtt_ms: Some(rtt.as_secs_f64() * 1000.0),
        no_nat,
        mapping,
        filtering,
        port_preserved,
        hairpin: obs.hairpin,
        verdict,
    }
}

fn verdict(no_nat: bool, mapping: Behaviour, filtering: Behaviour) -> String {
    use Behaviour::*;
    if no_nat && filtering == EndpointIndependent {
        return "no NAT and no filtering: every peer can reach you directly".to_owned();
    }
    match (mapping, filtering) {
        (EndpointIndependent, EndpointIndependent | AddressDependent) => {
            "your NAT keeps one public port per socket and lets peers you have contacted in: direct \
             paths will work with peers behind any NAT, symmetric ones included"
                .to_owned()
        }
        (EndpointIndependent, AddressAndPortDependent) => {
            "your NAT keeps one public port per socket but only accepts packets from the exact \
             address and port you sent to (port-restricted cone): direct paths will work with peers \
             behind no NAT or a cone NAT; peers behind symmetric NATs will be relayed"
                .to_owned()
        }
        (AddressDependent | AddressAndPortDependent, _) => {
            "your NAT gives a new public port for every destination (symmetric): direct paths will \
             work only with peers behind no NAT or a full or address-restricted cone NAT; peers \
             behind port-restricted cone or symmetric NATs will be relayed"
                .to_owned()
        }
        _ => "the STUN server does not offer behaviour discovery (no OTHER-ADDRESS), so the NAT's \
              behaviour is unknown; connections fall back to the relay when punching fails"
            .to_owned(),
    }
}

impl Report {
    /// The report for people.
    pub fn render(&self) -> String {
        let yes_no = |b: Option<bool>| match b {
            Some(true) => "yes",
            Some(false) => "no",
            None => "not tested",
        };
        let mut out = String::new();
        out.push_str(&format!(
            "UDP:              {}\n",
            if self.udp { "works" } else { "blocked" }
        ));
        out.push_str(&format!("TCP 443:          {}\n", yes_no(self.tcp_443)));
        if let Some(public) = self.public_addr {
            out.push_str(&format!(
                "public address:   {public}{}\n",
                if self.no_nat { " (no NAT)" } else { "" }
            ));
        }
        if let Some(rtt) = self.rtt_ms {
            out.push_str(&format!("RTT to server:    {rtt:.1} ms\n"));
        }
        out.push_str(&format!("mapping:          {}\n", self.mapping.words()));
        out.push_str(&format!("filtering:        {}\n", self.filtering.words()));
        out.push_str(&format!(
            "port preserved:   {}\n",
            yes_no(self.port_preserved)
        ));
        out.push_str(&format!("hairpinning:      {}\n", yes_no(self.hairpin)));
        out.push_str(
            "port mapping:     not probed (UPnP IGD / NAT-PMP / PCP are not implemented yet)\n",
        );
        out.push_str(&format!("verdict:          {}\n", self.verdict));
        out
    }
}

/// One Binding exchange: up to 3 tries of `wait` each; the answer's mapped address and where it
/// came from.
async fn exchange(
    socket: &UdpSocket,
    request: &[u8],
    transaction: [u8; 12],
    to: SocketAddr,
    wait: Duration,
) -> Option<(SocketAddr, SocketAddr, Vec<u8>, Duration)> {
    let mut buf = [0u8; 1500];
    for _ in 0..3 {
        let sent = Instant::now();
        socket.send_to(request, to).await.ok()?;
        let deadline = sent + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let Ok(Ok((n, from))) = tokio::time::timeout(left, socket.recv_from(&mut buf)).await
            else {
                break;
            };
            if let Ok(StunPacket::BindingSuccess {
                transaction: t,
                mapped,
            }) = stun::decode(&buf[..n])
            {
                if t == transaction {
                    return Some((mapped, from, buf[..n].to_vec(), sent.elapsed()));
                }
            }
        }
    }
    None
}

/// A Binding request with the given CHANGE-REQUEST flags, and its answer.
async fn ask(
    socket: &UdpSocket,
    to: SocketAddr,
    (change_ip, change_port): (bool, bool),
    wait: Duration,
) -> Option<(SocketAddr, SocketAddr, Vec<u8>, Duration)> {
    let transaction: [u8; 12] = rand::random();
    let request = stun5780::binding_request_with_change(transaction, change_ip, change_port);
    exchange(socket, &request, transaction, to, wait).await
}

/// Runs the tests against `server` (a STUN server, ideally with RFC 5780).
pub async fn run(server: SocketAddr, tcp_443: Option<SocketAddr>) -> std::io::Result<Report> {
    let bind: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .unwrap_or(server);
    let socket = UdpSocket::bind(bind).await?;
    let wait = Duration::from_millis(500);
    let same = (false, false);
    let mut obs = Observations {
        local: crate::node::local_addrs(socket.local_addr()?, server)
            .first()
            .copied(),
        ..Observations::default()
    };
    if let Some((mapped, _, raw, rtt)) = ask(&socket, server, same, wait).await {
        let (_, other) = stun5780::parse_response_addresses(&raw);
        obs.primary = Some((mapped, rtt, other));
        if let Some(other) = other {
            // Mapping: does the public address change with the destination's IP, then port?
            let alt_ip = SocketAddr::new(other.ip(), server.port());
            obs.via_alt_ip = ask(&socket, alt_ip, same, wait).await.map(|r| r.0);
            if obs.via_alt_ip.is_some() && obs.via_alt_ip != Some(mapped) {
                obs.via_alt_both = ask(&socket, other, same, wait).await.map(|r| r.0);
            }
            // Filtering is tested from a fresh socket (a fresh mapping) that has only ever sent to
            // the primary address: the mapping tests above opened the first socket's filter to
            // the alternate IP.
            let fresh = UdpSocket::bind(bind).await?;
            let both = ask(&fresh, server, (true, true), wait).await.is_some();
            obs.filter_change_both = Some(both);
            if !both {
                obs.filter_change_port =
                    Some(ask(&fresh, server, (false, true), wait).await.is_some());
            }
        }
        // Hairpinning: a datagram sent from another local socket to this socket's public
        // address comes back in through the NAT (as it would from a peer on the same LAN).
        let probe = stun::binding_request(rand::random());
        let other_socket = UdpSocket::bind(bind).await?;
        if other_socket.send_to(&probe, mapped).await.is_ok() {
            let mut buf = [0u8; 1500];
            let back = tokio::time::timeout(Duration::from_millis(700), async {
                loop {
                    match socket.recv_from(&mut buf).await {
                        Ok((n, _)) if buf[..n] == probe[..] => return true,
                        Ok(_) => continue,
                        Err(_) => return false,
                    }
                }
            })
            .await;
            obs.hairpin = Some(back.unwrap_or(false));
        }
    }
    if let Some(tcp) = tcp_443 {
        let connect = tokio::net::TcpStream::connect(tcp);
        obs.tcp_443 = Some(matches!(
            tokio::time::timeout(Duration::from_secs(3), connect).await,
            Ok(Ok(_))
        ));
    }
    Ok(classify(&obs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn base() -> Observations {
        Observations {
            local: Some(a("10.0.1.2:5000")),
            primary: Some((
                a("203.0.113.21:40000"),
                Duration::from_millis(20),
                Some(a("203.0.113.11:3479")),
            )),
            ..Observations::default()
        }
    }

    #[test]
    fn classifies_every_nat_kind() {
        // full cone
        let full = Observations {
            via_alt_ip: Some(a("203.0.113.21:40000")),
            filter_change_both: Some(true),
            ..base()
        };
        let r = classify(&full);
        assert_eq!(
            (r.mapping, r.filtering),
            (
                Behaviour::EndpointIndependent,
                Behaviour::EndpointIndependent
            )
        );
        assert!(r.verdict.contains("any NAT"));
        // address-restricted
        let addr = Observations {
            filter_change_both: Some(false),
            filter_change_port: Some(true),
            ..full.clone()
        };
        assert_eq!(classify(&addr).filtering, Behaviour::AddressDependent);
        // port-restricted
        let port = Observations {
            filter_change_port: Some(false),
            ..addr.clone()
        };
        let r = classify(&port);
        assert_eq!(r.filtering, Behaviour::AddressAndPortDependent);
        assert!(
            r.verdict.contains("symmetric NATs will be relayed"),
            "{}",
            r.verdict
        );
        // symmetric
        let sym = Observations {
            via_alt_ip: Some(a("203.0.113.21:40001")),
            via_alt_both: Some(a("203.0.113.21:40002")),
            ..port.clone()
        };
        let r = classify(&sym);
        assert_eq!(r.mapping, Behaviour::AddressAndPortDependent);
        assert!(r.verdict.contains("symmetric"), "{}", r.verdict);
        let addr_dep = Observations {
            via_alt_both: Some(a("203.0.113.21:40001")),
            ..sym.clone()
        };
        assert_eq!(classify(&addr_dep).mapping, Behaviour::AddressDependent);
        // open
        let open = Observations {
            local: Some(a("203.0.113.21:40000")),
            ..full.clone()
        };
        let r = classify(&open);
        assert!(r.no_nat && r.verdict.contains("no NAT"));
        // UDP blocked
        let blocked = Observations {
            tcp_443: Some(true),
            ..Observations::default()
        };
        let r = classify(&blocked);
        assert!(!r.udp && r.verdict.contains("TCP 443"));
        // A server without RFC 5780
        let plain = Observations {
            primary: Some((a("203.0.113.21:40000"), Duration::from_millis(5), None)),
            ..base()
        };
        let r = classify(&plain);
        assert_eq!(r.mapping, Behaviour::Unknown);
        assert!(r.verdict.contains("unknown"));
        assert_eq!(r.port_preserved, Some(false));
    }
}
