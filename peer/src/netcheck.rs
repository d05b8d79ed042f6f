//! `peer netcheck`: what this network's NAT does, in RFC 4787/5780 terms, and what will work.
//!
//! The tests are those of RFC 5780 section 4, run against a STUN server that offers behaviour
//! discovery (OTHER-ADDRESS): mapping (does the public address change with the destination's IP,
//! or port?), filtering (do answers from another IP, or another port, get in?), hairpinning, port
//! preservation, and whether UDP and TCP 443 get out. [`classify`] turns the observations into a
//! report without any I/O, so it is tested on its own.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::nat::{Behaviour, NatProfile};
use common::stun::{self, StunPacket};
use common::stun5780;
use serde::Serialize;

use crate::portmap::PortMapping;
use tokio::net::UdpSocket;

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
    /// Every STUN server asked from the same socket: (server, mapped address and round trip).
    pub servers: Vec<(SocketAddr, Option<(SocketAddr, Duration)>)>,
}

/// The result, for people and for `--json`.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
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
    /// Each STUN server asked: what it saw and how far it is.
    pub servers: Vec<ServerAnswer>,
    /// What the router offers for port mapping (`None`: not probed).
    pub port_mapping: Option<PortMapping>,
    /// In plain words, with which peers a direct path will work.
    pub verdict: String,
}

/// One STUN server's answer.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct ServerAnswer {
    /// The server.
    pub server: SocketAddr,
    /// Our address as it saw it (`None`: no answer).
    pub mapped: Option<SocketAddr>,
    /// Round trip, ms.
    pub rtt_ms: Option<f64>,
}

impl Report {
    /// The part a peer tells others (in its pongs) so that they can say why a path is relayed.
    pub fn profile(&self) -> NatProfile {
        NatProfile {
            udp: self.udp,
            no_nat: self.no_nat,
            mapping: self.mapping,
            filtering: self.filtering,
        }
    }
}

/// Mapping behaviour from several STUN servers (when the first offers no RFC 5780 discovery):
/// one public address for every server means endpoint-independent mapping; different ones mean
/// it depends on the destination, on the port too if two servers share an IP and saw different
/// ports.
fn mapping_across_servers(answers: &[(SocketAddr, SocketAddr)]) -> Behaviour {
    let distinct_ips = answers
        .iter()
        .map(|(server, _)| server.ip())
        .collect::<std::collections::HashSet<_>>()
        .len();
    if answers.len() < 2 {
        return Behaviour::Unknown;
    }
    let first = answers[0].1;
    if answers.iter().all(|(_, mapped)| *mapped == first) {
        // Only conclusive if the destinations differed in IP (what address-dependent NATs
        // look at) .
        return if distinct_ips >= 2 {
            Behaviour::EndpointIndependent
        } else {
            Behaviour::Unknown
        };
    }
    let same_ip_differs = answers.iter().any(|(s1, m1)| {
        answers
            .iter()
            .any(|(s2, m2)| s1.ip() == s2.ip() && s1.port() != s2.port() && m1 != m2)
    });
    let same_ip_same = answers.iter().any(|(s1, m1)| {
        answers
            .iter()
            .any(|(s2, m2)| s1.ip() == s2.ip() && s1.port() != s2.port() && m1 == m2)
    });
    if same_ip_same && !same_ip_differs {
        Behaviour::AddressDependent
    } else {
        Behaviour::AddressAndPortDependent
    }
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
            servers: server_answers(obs),
            port_mapping: None,
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
    let mapping = if mapping == Behaviour::Unknown {
        let answers: Vec<(SocketAddr, SocketAddr)> = obs
            .servers
            .iter()
            .filter_map(|(server, answer)| answer.map(|(mapped, _)| (*server, mapped)))
            .collect();
        mapping_across_servers(&answers)
    } else {
        mapping
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
        servers: server_answers(obs),
        port_mapping: None,
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

fn server_answers(obs: &Observations) -> Vec<ServerAnswer> {
    obs.servers
        .iter()
        .map(|(server, answer)| ServerAnswer {
            server: *server,
            mapped: answer.map(|(m, _)| m),
            rtt_ms: answer.map(|(_, rtt)| rtt.as_secs_f64() * 1000.0),
        })
        .collect()
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
        (EndpointIndependent, Unknown) => {
            "your NAT keeps one public port per socket (its filtering is unknown: the STUN server \
             offers no behaviour discovery): direct paths will work with peers behind no NAT or a \
             cone NAT, and with symmetric NATs only if your NAT lets their new ports in"
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
        let mut line = |label: &str, value: &str| {
            out.push_str(&format!("{:<18}{value}\n", format!("{label}:")));
        };
        line("UDP", if self.udp { "works" } else { "blocked" });
        line("TCP 443", yes_no(self.tcp_443));
        if let Some(public) = self.public_addr {
            let no_nat = if self.no_nat { " (no NAT)" } else { "" };
            line("public address", &format!("{public}{no_nat}"));
        }
        if let Some(rtt) = self.rtt_ms {
            line("RTT to server", &format!("{rtt:.1} ms"));
        }
        if self.servers.len() > 1 {
            for answer in &self.servers {
                let seen = match (answer.mapped, answer.rtt_ms) {
                    (Some(m), Some(rtt)) => format!("sees {m}, {rtt:.1} ms"),
                    _ => "no answer".to_owned(),
                };
                line("STUN server", &format!("{} {seen}", answer.server));
            }
        }
        line("mapping", self.mapping.words());
        line("filtering", self.filtering.words());
        line("port preserved", yes_no(self.port_preserved));
        line("hairpinning", yes_no(self.hairpin));
        let mapping = match &self.port_mapping {
            None => "not probed".to_owned(),
            Some(pm) => pm.describe(),
        };
        line("port mapping", &mapping);
        line("verdict", &self.verdict);
        out
    }
}

/// Tries of an exchange whose answer is expected (mapping tests): with 10 % loss each way a try
/// fails about one time in five, so five tries leave a wrong "unknown" about 3 times in 10,000.
const TRIES_EXPECTED: usize = 5;
/// Tries of an exchange that a filtering NAT is expected to drop (filtering tests): every try
/// costs `wait` when no answer comes.
const TRIES_FILTERED: usize = 3;

/// One Binding exchange: up to `tries` tries of `wait` each; the answer's mapped address and
/// where it came from.
async fn exchange(
    socket: &UdpSocket,
    request: &[u8],
    transaction: [u8; 12],
    to: SocketAddr,
    (wait, tries): (Duration, usize),
) -> Option<(SocketAddr, SocketAddr, Vec<u8>, Duration)> {
    let mut buf = [0u8; 1500];
    for _ in 0..tries {
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
    patience: (Duration, usize),
) -> Option<(SocketAddr, SocketAddr, Vec<u8>, Duration)> {
    let transaction: [u8; 12] = rand::random();
    let request = stun5780::binding_request_with_change(transaction, change_ip, change_port);
    exchange(socket, &request, transaction, to, patience).await
}

/// What to test besides the STUN behaviour tests.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Try a TCP connection to this address (the rendezvous's TLS tunnel).
    pub tcp_443: Option<SocketAddr>,
    /// Test hairpinning.
    pub hairpin: bool,
    /// Probe the default gateway for UPnP IGD, NAT-PMP and PCP.
    pub port_mapping: bool,
}

/// Runs the tests against `servers` (STUN servers; the first that offers RFC 5780 behaviour
/// discovery is used for the mapping and filtering tests, the others are compared with it).
pub async fn run(servers: &[SocketAddr], options: &Options) -> std::io::Result<Report> {
    let Some(&first) = servers.first() else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "no STUN server given",
        ));
    };
    let bind: SocketAddr = if first.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .unwrap_or(first);
    let portmap = options
        .port_mapping
        .then(|| tokio::spawn(crate::portmap::probe(crate::portmap::default_gateway())));
    let socket = UdpSocket::bind(bind).await?;
    let wait = Duration::from_millis(500);
    let (expected, filtered) = ((wait, TRIES_EXPECTED), (wait, TRIES_FILTERED));
    let same = (false, false);
    let mut obs = Observations {
        local: crate::node::local_addrs(socket.local_addr()?, first)
            .first()
            .copied(),
        ..Observations::default()
    };
    // Test I against every server, from one socket.
    let mut discovery = None;
    for &server in servers {
        let answer = ask(&socket, server, same, expected).await;
        obs.servers
            .push((server, answer.as_ref().map(|(m, _, _, rtt)| (*m, *rtt))));
        if let Some((mapped, _, raw, rtt)) = answer {
            let (_, other) = stun5780::parse_response_addresses(&raw);
            if obs.primary.is_none() || (discovery.is_none() && other.is_some()) {
                obs.primary = Some((mapped, rtt, other));
                if other.is_some() {
                    discovery = Some(server);
                }
            }
        }
    }
    if let (Some(server), Some((mapped, _, Some(other)))) = (discovery, obs.primary) {
        // Mapping: does the public address change with the destination's IP, then port?
        let alt_ip = SocketAddr::new(other.ip(), server.port());
        obs.via_alt_ip = ask(&socket, alt_ip, same, expected).await.map(|r| r.0);
        if obs.via_alt_ip.is_some() && obs.via_alt_ip != Some(mapped) {
            obs.via_alt_both = ask(&socket, other, same, expected).await.map(|r| r.0);
        }
        // Filtering is tested from a fresh socket (a fresh mapping) that has only ever sent to
        // the primary address: the mapping tests above opened the first socket's filter to
        // the alternate IP.
        let fresh = UdpSocket::bind(bind).await?;
        let both = ask(&fresh, server, (true, true), filtered).await.is_some();
        obs.filter_change_both = Some(both);
        if !both {
            obs.filter_change_port =
                Some(ask(&fresh, server, (false, true), filtered).await.is_some());
        }
    }
    if let (true, Some((mapped, _, _))) = (options.hairpin, obs.primary) {
        obs.hairpin = Some(hairpin(&socket, mapped, first, bind, wait).await?);
    }
    if let Some(tcp) = options.tcp_443 {
        let connect = tokio::net::TcpStream::connect(tcp);
        obs.tcp_443 = Some(matches!(
            tokio::time::timeout(Duration::from_secs(3), connect).await,
            Ok(Ok(_))
        ));
    }
    let mut report = classify(&obs);
    if let Some(task) = portmap {
        report.port_mapping = task.await.ok();
    }
    Ok(report)
}

/// Waits for a datagram equal to `expected` on `socket`.
async fn heard(socket: &UdpSocket, expected: &[u8]) -> bool {
    let mut buf = [0u8; 1500];
    loop {
        match socket.recv_from(&mut buf).await {
            Ok((n, _)) if buf[..n] == *expected => return true,
            Ok(_) => continue,
            Err(_) => return false,
        }
    }
}

/// Hairpinning (RFC 5780 section 4.5, made robust to filtering): a second socket learns its own
/// public address; both sockets send to each other's public address, as two peers on the same
/// LAN would when punching. Hairpinning works if either datagram comes back in through the NAT.
/// Sending both ways matters: a NAT that filters by address and port only lets a hairpinned
/// datagram in once the receiving socket has sent to the sender's public address.
async fn hairpin(
    socket: &UdpSocket,
    mapped: SocketAddr,
    server: SocketAddr,
    bind: SocketAddr,
    wait: Duration,
) -> std::io::Result<bool> {
    let second = UdpSocket::bind(bind).await?;
    let Some((second_mapped, _, _, _)) =
        ask(&second, server, (false, false), (wait, TRIES_EXPECTED)).await
    else {
        return Ok(false);
    };
    let probe_first: [u8; 12] = rand::random();
    let probe_second: [u8; 12] = rand::random();
    let first_probe = stun::binding_request(probe_first);
    let second_probe = stun::binding_request(probe_second);
    let listen = async {
        tokio::select! {
            true = heard(socket, &second_probe) => true,
            true = heard(&second, &first_probe) => true,
            else => false,
        }
    };
    let send = async {
        for _ in 0..3 {
            let _ = socket.send_to(&first_probe, second_mapped).await;
            let _ = second.send_to(&second_probe, mapped).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        std::future::pending::<()>().await;
    };
    let result = tokio::time::timeout(Duration::from_millis(900), async {
        tokio::select! {
            r = listen => r,
            _ = send => false,
        }
    })
    .await;
    Ok(result.unwrap_or(false))
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

    #[test]
    fn several_plain_stun_servers_reveal_the_mapping() {
        let (s1, s2, s3) = (
            a("198.51.100.1:3478"),
            a("198.51.100.2:3478"),
            a("198.51.100.1:3479"),
        );
        let m = a("203.0.113.21:40000");
        let m2 = a("203.0.113.21:40001");
        assert_eq!(
            mapping_across_servers(&[(s1, m), (s2, m)]),
            Behaviour::EndpointIndependent
        );
        // Two ports of one IP only: address-dependent NATs would not show a difference.
        assert_eq!(
            mapping_across_servers(&[(s1, m), (s3, m)]),
            Behaviour::Unknown
        );
        assert_eq!(
            mapping_across_servers(&[(s1, m), (s2, m2)]),
            Behaviour::AddressAndPortDependent
        );
        assert_eq!(
            mapping_across_servers(&[(s1, m), (s3, m), (s2, m2)]),
            Behaviour::AddressDependent
        );
        assert_eq!(mapping_across_servers(&[(s1, m)]), Behaviour::Unknown);
        // Without RFC 5780, classify falls back to the comparison.
        let obs = Observations {
            primary: Some((m, Duration::from_millis(5), None)),
            servers: vec![
                (s1, Some((m, Duration::from_millis(5)))),
                (s2, Some((m2, Duration::from_millis(9)))),
                (a("198.51.100.3:3478"), None),
            ],
            ..base()
        };
        let r = classify(&obs);
        assert_eq!(r.mapping, Behaviour::AddressAndPortDependent);
        assert!(r.verdict.contains("symmetric"), "{}", r.verdict);
        assert_eq!(r.servers.len(), 3);
        assert_eq!(r.servers[2].mapped, None);
        assert!(r
            .render()
            .contains("STUN server:      198.51.100.3:3478 no answer"));
    }
}
