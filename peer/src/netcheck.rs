//! `peer netcheck`: what this network's NAT does, in RFC 4787/5780 terms, and what will work.
//!
//! The tests are those of RFC 5780 section 4, run against a STUN server that offers behaviour
//! discovery (OTHER-ADDRESS): mapping (does the public address change with the destination's IP,
//! or port?), filtering (do answers from another IP, or another port, get in?), hairpinning, port
//! preservation, and whether UDP and TCP 443 get out. [`classify`] turns the observations into a
//! report without any I/O, so it is tested on its own.
//!
//! Why it is a module of its own: knowing the NAT's behaviour explains why a path is relayed
//! (`peer ping`, `peer status`) and is measured once per endpoint, apart from any connection.

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
    /// After an answer from the other port was filtered: the fresh socket's public address as
    /// the primary address saw it, then as that other port saw it when we sent to it. A NAT
    /// whose state for the filtered answer took our public port gives the second a new port.
    pub after_filtered: Option<(SocketAddr, SocketAddr)>,
    /// A datagram to our own public address came back to us.
    pub hairpin: Option<bool>,
    /// A TCP connection to the server's port 443 succeeded.
    pub tcp_443: Option<bool>,
    /// Every STUN server asked from the same socket: (server, mapped address and round trip).
    pub servers: Vec<(SocketAddr, Option<(SocketAddr, Duration)>)>,
    /// IPv6: our global address, and the server tried over IPv6 with what it saw.
    pub ipv6: Ipv6Report,
}

/// IPv6 reachability, for people and for `--json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Ipv6Report {
    /// The address the routing table would send from to the IPv6 internet (`None`: no IPv6
    /// route or no routable address: IPv4 only).
    pub address: Option<std::net::IpAddr>,
    /// The STUN server asked over IPv6 (`None`: none has an IPv6 address; not tested).
    pub server: Option<SocketAddr>,
    /// Our address as it saw it (`None`: no answer, or not tested).
    pub public_addr: Option<SocketAddr>,
    /// Round trip of its answer, ms.
    pub rtt_ms: Option<u64>,
}

impl Ipv6Report {
    /// One line for people.
    pub fn describe(&self) -> String {
        match (self.address, self.server, self.public_addr) {
            (None, _, None) | (None, None, Some(_)) => {
                "no global IPv6 address (IPv4 only)".to_owned()
            }
            (_, Some(server), Some(public)) => {
                let no_nat = if self.address == Some(public.ip()) {
                    " (no NAT: peers reach it through the firewall by punching)"
                } else {
                    ""
                };
                let rtt = match self.rtt_ms {
                    Some(0) => ", under 1 ms".to_owned(),
                    Some(ms) => format!(", {ms} ms"),
                    None => String::new(),
                };
                format!("works: {server} sees {public}{no_nat}{rtt}")
            }
            (Some(address), Some(server), None) => {
                format!("address {address}, but no answer from {server} over IPv6 (blocked?)")
            }
            (Some(address), None, _) => format!(
                "address {address}; not tested (the server has no IPv6 address; --stun6 \
                 HOST:PORT tests with another)"
            ),
        }
    }
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
    /// A packet from outside that the NAT did not let in took our public port for its sender:
    /// our next packets to that sender left from another port (`None`: not tested; only a NAT
    /// that maps independently of the destination and filters is tested).
    #[serde(default)]
    pub inbound_takes_port: Option<bool>,
    /// Packets to our own public address come back (`None`: not tested).
    pub hairpin: Option<bool>,
    /// Each STUN server asked: what it saw and how far it is.
    pub servers: Vec<ServerAnswer>,
    /// What the router offers for port mapping (`None`: not probed).
    pub port_mapping: Option<PortMapping>,
    /// IPv6 reachability.
    #[serde(default)]
    pub ipv6: Ipv6Report,
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
            inbound_takes_port: self.inbound_takes_port == Some(true),
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
            ipv6: obs.ipv6.clone(),
            public_addr: None,
            rtt_ms: None,
            no_nat: false,
            mapping: Behaviour::Unknown,
            filtering: Behaviour::Unknown,
            port_preserved: None,
            inbound_takes_port: None,
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
    // Only meaningful where one public port per socket is the rule and something was filtered.
    let inbound_takes_port = match (no_nat, mapping, filtering, obs.after_filtered) {
        (
            false,
            Behaviour::EndpointIndependent,
            Behaviour::AddressDependent | Behaviour::AddressAndPortDependent,
            Some((before, after)),
        ) => Some(before != after),
        _ => None,
    };
    let mut verdict = verdict(no_nat, mapping, filtering, other.is_some());
    if inbound_takes_port == Some(true) {
        verdict.push_str(
            "; a packet that reaches your NAT before you sent to its sender takes your public \
             port for that sender (your next packets to it leave from another port): punching \
             has a peer that filters by port wait for our probes before it sends its own",
        );
    }
    if obs.ipv6.public_addr.is_some() {
        verdict.push_str(
            "; over IPv6, which works here, direct paths work with every peer that has IPv6 too, \
             whatever its IPv4 NAT",
        );
    }
    Report {
        udp: true,
        tcp_443: obs.tcp_443,
        servers: server_answers(obs),
        port_mapping: None,
        ipv6: obs.ipv6.clone(),
        public_addr: Some(public),
        rtt_ms: Some(rtt.as_secs_f64() * 1000.0),
        no_nat,
        mapping,
        filtering,
        port_preserved,
        inbound_takes_port,
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

/// The verdict in words. `discovery`: the server offered RFC 5780 behaviour discovery
/// (OTHER-ADDRESS), so an unknown behaviour means its tests got no answer (lost or blocked on
/// the way), not that the server cannot tell.
fn verdict(no_nat: bool, mapping: Behaviour, filtering: Behaviour, discovery: bool) -> String {
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
             behind no NAT or a cone NAT, and with peers behind symmetric NATs by birthday \
             punching (probing many of their ports; relayed when it finds none in time)"
                .to_owned()
        }
        (EndpointIndependent, Unknown) => format!(
            "your NAT keeps one public port per socket (its filtering is unknown: {}): direct \
             paths will work with peers behind no NAT or a cone NAT, and with symmetric NATs only \
             if your NAT lets their new ports in",
            if discovery {
                "the filtering tests got no answer at all, not even to a plain request"
            } else {
                "the STUN server offers no behaviour discovery"
            }
        ),
        (AddressDependent | AddressAndPortDependent, _) => {
            "your NAT gives a new public port for every destination (symmetric): direct paths will \
             work with peers behind no NAT or a full or address-restricted cone NAT, and with \
             port-restricted cone NATs by birthday punching (many extra sockets; relayed when it \
             finds no port in time); peers behind symmetric NATs will be relayed"
                .to_owned()
        }
        _ if discovery => "the STUN server offers behaviour discovery, but its tests got no \
                           answer from its alternate address (lost or blocked on the way), so the \
                           NAT's behaviour is unknown; connections fall back to the relay when \
                           punching fails"
            .to_owned(),
        _ => "the STUN server does not offer behaviour discovery (no OTHER-ADDRESS), so the NAT's \
              behaviour is unknown; connections fall back to the relay when punching fails"
            .to_owned(),
    }
}

impl Report {
    /// The report for people.
    pub fn render(&self) -> String {
        let ipv6 = self.ipv6.describe();
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
        line("early packet", match self.inbound_takes_port {
            Some(true) => "takes the port (an unsolicited packet moves our next flow to its sender to a new port)",
            Some(false) => "harmless",
            None => "not tested",
        });
        line("hairpinning", yes_no(self.hairpin));
        let mapping = match &self.port_mapping {
            None => "not probed".to_owned(),
            Some(pm) => pm.describe(),
        };
        line("port mapping", &mapping);
        line("IPv6", &ipv6);
        line("verdict", &self.verdict);
        out
    }
}

/// How long one STUN transaction retransmits before it concludes "no answer" (RFC 5389 section
/// 7.2.1): the request is sent `sends` times (Rc), the interval starting at `rto` and doubling
/// after each send, capped at `max_rto`; after the last send the client waits `last_wait`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retransmit {
    /// First retransmission timeout (RTO).
    pub rto: Duration,
    /// Largest interval between two sends (RFC 5389 has no cap: `Duration::MAX`).
    pub max_rto: Duration,
    /// Requests sent in all (Rc).
    pub sends: u32,
    /// Wait after the last send before giving up (RFC 5389: Rm times the RTO).
    pub last_wait: Duration,
}

impl Retransmit {
    /// RFC 5389's defaults (the reference the budgets below shorten; the tests check the
    /// schedule against the RFC's own example): RTO 500 ms doubling, Rc = 7, Rm = 16: sends at 0, 0.5, 1.5, 3.5, 7.5,
    /// 15.5 and 31.5 s, no answer concluded at 39.5 s.
    #[cfg(test)]
    pub const RFC5389: Retransmit = Retransmit {
        rto: Duration::from_millis(500),
        max_rto: Duration::MAX,
        sends: 7,
        last_wait: Duration::from_millis(16 * 500),
    };

    /// Ours for an exchange whose answer is expected (test I and the mapping tests): RFC 5389's
    /// RTO and Rc with the interval capped at 1 s and a last wait of 2 s (sends at 0, 0.5, 1.5,
    /// 2.5, 3.5, 4.5 and 5.5 s; no answer at 7.5 s), so that a blocked network is reported in
    /// seconds, not in 39.5 s. With 10 % loss each way, all seven round trips fail about once in
    /// 100,000 measurements (0.19^7).
    pub const EXPECTED: Retransmit = Retransmit {
        rto: Duration::from_millis(500),
        max_rto: Duration::from_secs(1),
        sends: 7,
        last_wait: Duration::from_secs(2),
    };

    /// Ours for an exchange that a filtering NAT drops by design (the filtering tests, where
    /// "no answer" is the result on most NATs and costs the whole budget): five sends (0, 0.5,
    /// 1.5, 2.5, 3.5 s), no answer at 4.5 s. With 10 % loss each way, an answer that should come
    /// is missed about 2.5 times in 10,000 (0.19^5); the filtering tests run concurrently, so a
    /// filtering NAT costs 4.5 s once.
    pub const FILTERED: Retransmit = Retransmit {
        rto: Duration::from_millis(500),
        max_rto: Duration::from_secs(1),
        sends: 5,
        last_wait: Duration::from_secs(1),
    };

    /// When each request is sent, after the first, and when "no answer" is concluded.
    #[cfg(test)]
    pub fn timeline(&self) -> (Vec<Duration>, Duration) {
        let mut sends = Vec::new();
        let mut at = Duration::ZERO;
        let mut interval = self.rto;
        for i in 0..self.sends {
            if i > 0 {
                at = at.saturating_add(interval.min(self.max_rto));
                interval = interval.saturating_mul(2);
            }
            sends.push(at);
        }
        (sends, at.saturating_add(self.last_wait))
    }
}

/// What a [`Transaction`] wants done now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Send the request (again).
    Send,
    /// Nothing to do before this instant (unless an answer arrives).
    Wait(Instant),
    /// The budget is spent without an answer.
    GiveUp,
}

/// One STUN transaction's retransmissions, without I/O: time is passed in. An answer to any
/// copy of the request ends it (the caller stops polling).
#[derive(Debug, Clone)]
pub struct Transaction {
    schedule: Retransmit,
    sent: u32,
    interval: Duration,
    next: Instant,
}

impl Transaction {
    /// A transaction whose first request is due at `now`.
    pub fn new(schedule: Retransmit, now: Instant) -> Self {
        Transaction {
            schedule,
            sent: 0,
            interval: schedule.rto,
            next: now,
        }
    }

    /// What to do at `now`. After [`Step::Send`], poll again (the next step is a wait).
    pub fn poll(&mut self, now: Instant) -> Step {
        if now < self.next {
            return Step::Wait(self.next);
        }
        if self.sent >= self.schedule.sends {
            return Step::GiveUp;
        }
        self.sent += 1;
        self.next = if self.sent == self.schedule.sends {
            now + self.schedule.last_wait
        } else {
            let wait = self.interval.min(self.schedule.max_rto);
            self.interval = self.interval.saturating_mul(2);
            now + wait
        };
        Step::Send
    }
}

/// The retransmission budgets of a measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Patience {
    /// For exchanges whose answer is expected.
    pub expected: Retransmit,
    /// For the filtering tests.
    pub filtered: Retransmit,
}

impl Default for Patience {
    fn default() -> Self {
        Patience {
            expected: Retransmit::EXPECTED,
            filtered: Retransmit::FILTERED,
        }
    }
}

/// An answer: the mapped address, where it came from, the raw response, the round trip since the
/// first request.
type Answer = (SocketAddr, SocketAddr, Vec<u8>, Duration);

/// One Binding request to send, retransmitted on its schedule.
struct Pending {
    request: Vec<u8>,
    transaction_id: [u8; 12],
    to: SocketAddr,
    retransmit: Transaction,
    answer: Option<Answer>,
    done: bool,
}

/// Binding exchanges run together from one socket (each with its own transaction id and
/// schedule); each answer is the first response to any copy of its request.
async fn exchanges(
    socket: &UdpSocket,
    requests: Vec<(Vec<u8>, [u8; 12], SocketAddr, Retransmit)>,
) -> Vec<Option<Answer>> {
    let started = Instant::now();
    let mut pending: Vec<Pending> = requests
        .into_iter()
        .map(|(request, transaction_id, to, schedule)| Pending {
            request,
            transaction_id,
            to,
            retransmit: Transaction::new(schedule, started),
            answer: None,
            done: false,
        })
        .collect();
    let mut buf = [0u8; 1500];
    loop {
        let now = Instant::now();
        let mut wake: Option<Instant> = None;
        for p in pending.iter_mut().filter(|p| !p.done) {
            loop {
                match p.retransmit.poll(now) {
                    Step::Send => {
                        // A failed send is a lost request: the schedule sends again.
                        let _ = socket.send_to(&p.request, p.to).await;
                    }
                    Step::Wait(at) => {
                        wake = Some(wake.map_or(at, |w| w.min(at)));
                        break;
                    }
                    Step::GiveUp => {
                        p.done = true;
                        break;
                    }
                }
            }
        }
        let Some(wake) = wake else { break };
        let left = wake.saturating_duration_since(Instant::now());
        let (n, from) = match tokio::time::timeout(left, socket.recv_from(&mut buf)).await {
            Ok(Ok(received)) => received,
            // A receive error (an ICMP error reported on the socket): nothing arrived; wait for
            // the schedule rather than spin on the error.
            Ok(Err(_)) => {
                tokio::time::sleep_until(wake.into()).await;
                continue;
            }
            Err(_) => continue,
        };
        if let Ok(StunPacket::BindingSuccess {
            transaction,
            mapped,
        }) = stun::decode(&buf[..n])
        {
            if let Some(p) = pending
                .iter_mut()
                .find(|p| !p.done && p.transaction_id == transaction)
            {
                p.answer = Some((mapped, from, buf[..n].to_vec(), started.elapsed()));
                p.done = true;
            }
        }
    }
    pending.into_iter().map(|p| p.answer).collect()
}

/// A Binding request with the given CHANGE-REQUEST flags: (request, transaction id).
fn request_with_change((change_ip, change_port): (bool, bool)) -> (Vec<u8>, [u8; 12]) {
    let transaction: [u8; 12] = rand::random();
    (
        stun5780::binding_request_with_change(transaction, change_ip, change_port),
        transaction,
    )
}

/// A Binding request with the given CHANGE-REQUEST flags, and its answer.
async fn ask(
    socket: &UdpSocket,
    to: SocketAddr,
    change: (bool, bool),
    schedule: Retransmit,
) -> Option<Answer> {
    let (request, transaction) = request_with_change(change);
    exchanges(socket, vec![(request, transaction, to, schedule)])
        .await
        .pop()
        .flatten()
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
    /// Ask this STUN server over IPv6 (the server's IPv6 address).
    pub ipv6: Option<SocketAddr>,
}

/// Why `peer netcheck` could not run.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// Neither a rendezvous nor a STUN server was given.
    #[error("netcheck needs --server HOST:PORT or --stun HOST:PORT")]
    NoServer,
    /// A name did not resolve.
    #[error("cannot resolve {0:?}")]
    Resolve(String, #[source] std::io::Error),
    /// A name resolved to nothing.
    #[error("{0:?} has no address")]
    NoAddress(String),
    /// The checks failed (the socket could not be bound).
    #[error("running the network checks")]
    Run(#[source] std::io::Error),
}

/// `peer netcheck`: the checks against the STUN servers `stun`, or the rendezvous `server`'s STUN
/// service when there are none (its TCP 443 is tried too); `port_mapping` probes the gateway.
pub async fn check(
    server: Option<&str>,
    stun: &[String],
    stun6: Option<&str>,
    port_mapping: bool,
) -> Result<Report, CheckError> {
    let targets: Vec<&str> = if stun.is_empty() {
        server.into_iter().collect()
    } else {
        stun.iter().map(String::as_str).collect()
    };
    let targets_first = targets.first().copied();
    if targets.is_empty() {
        return Err(CheckError::NoServer);
    }
    let mut servers = Vec::new();
    for target in targets {
        servers.push(
            tokio::net::lookup_host(target)
                .await
                .map_err(|e| CheckError::Resolve(target.to_owned(), e))?
                .next()
                .ok_or_else(|| CheckError::NoAddress(target.to_owned()))?,
        );
    }
    let tcp_443 = match server {
        Some(s) => tokio::net::lookup_host(s)
            .await
            .ok()
            .and_then(|mut a| a.next())
            .map(|a| SocketAddr::new(a.ip(), 443)),
        None => None,
    };
    // IPv6: the given server, else the first target's IPv6 address if its name has one.
    let ipv6 = match stun6.or(targets_first) {
        Some(name) => tokio::net::lookup_host(name)
            .await
            .ok()
            .and_then(|mut addrs| addrs.find(|a| a.is_ipv6() && a.ip().to_canonical().is_ipv6())),
        None => None,
    };
    let options = Options {
        tcp_443,
        hairpin: true,
        port_mapping,
        ipv6,
    };
    run(&servers, &options).await.map_err(CheckError::Run)
}

/// Runs the tests against `servers` (STUN servers; the first that offers RFC 5780 behaviour
/// discovery is used for the mapping and filtering tests, the others are compared with it), with
/// the default retransmission budgets.
pub async fn run(servers: &[SocketAddr], options: &Options) -> std::io::Result<Report> {
    run_with(servers, options, Patience::default()).await
}

/// [`run`] with the given retransmission budgets.
pub async fn run_with(
    servers: &[SocketAddr],
    options: &Options,
    patience: Patience,
) -> std::io::Result<Report> {
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
    // The port-mapping probe runs alongside the STUN tests, in this task: it ends with them
    // (a spawned probe would run on, detached, after an error or a dropped check).
    let mut portmap = Box::pin(async {
        match options.port_mapping {
            true => Some(crate::portmap::probe(crate::portmap::default_gateway()).await),
            false => None,
        }
    });
    let measure = async {
        let socket = UdpSocket::bind(bind).await?;
        let (expected, filtered) = (patience.expected, patience.filtered);
        let same = (false, false);
        let mut obs = Observations {
            local: crate::node::local_addrs(socket.local_addr()?, first)
                .first()
                .copied(),
            ..Observations::default()
        };
        // Test I against every server, from one socket, all at once (a silent server costs its
        // budget once, not once per server).
        let mut discovery = None;
        let requests = servers
            .iter()
            .map(|&server| {
                let (request, transaction) = request_with_change(same);
                (request, transaction, server, expected)
            })
            .collect();
        let answers = exchanges(&socket, requests).await;
        for (&server, answer) in servers.iter().zip(answers) {
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
            // Both filtering tests (answers from the other IP and port, and from the other port)
            // run at once with a plain request beside them: every request goes to the primary
            // address only, so none opens the filter for another, and no answer to the plain one
            // means nothing got through at all: the filtering is then unknown, not "filtered".
            let fresh = UdpSocket::bind(bind).await?;
            let (control, control_id) = request_with_change(same);
            let (both, both_id) = request_with_change((true, true));
            let (port, port_id) = request_with_change((false, true));
            // Beside them, on a socket of its own (so that it takes no time of its own): does
            // the state a filtered packet leaves take our port? Only asked of a NAT that kept
            // one public port per destination above (for the others it changes nothing).
            let independent = obs.via_alt_ip == Some(mapped);
            let after_filtered = async {
                if !independent {
                    return None;
                }
                let probe = UdpSocket::bind(bind).await.ok()?;
                // The server answers these from its other port: unsolicited, for a NAT that
                // filters by port. Twice, as one may be lost.
                for _ in 0..2 {
                    let (request, _) = request_with_change((false, true));
                    let _ = probe.send_to(&request, server).await;
                }
                let (before, ..) = ask(&probe, server, same, expected).await?;
                // Those answers left the server before this one, so they have reached our NAT:
                // now we send to their source ourselves.
                let changed_port = SocketAddr::new(server.ip(), other.port());
                let (after, ..) = ask(&probe, changed_port, same, expected).await?;
                Some((before, after))
            };
            let (answers, after_filtered) = tokio::join!(
                exchanges(
                    &fresh,
                    vec![
                        (control, control_id, server, expected),
                        (both, both_id, server, filtered),
                        (port, port_id, server, filtered),
                    ],
                ),
                after_filtered
            );
            if answers[0].is_some() {
                let both = answers[1].is_some();
                obs.filter_change_both = Some(both);
                if !both {
                    obs.filter_change_port = Some(answers[2].is_some());
                }
                if answers[2].is_none() {
                    obs.after_filtered = after_filtered;
                }
            }
        }
        if let (true, Some((mapped, _, _))) = (options.hairpin, obs.primary) {
            obs.hairpin = Some(hairpin(&socket, mapped, first, bind, expected).await?);
        }
        obs.ipv6.address = crate::node::global_ipv6();
        if let Some(server6) = options.ipv6 {
            obs.ipv6.server = Some(server6);
            let socket6 = UdpSocket::bind((std::net::Ipv6Addr::UNSPECIFIED, 0)).await?;
            if let Some((mapped, _, _, rtt)) = ask(&socket6, server6, same, expected).await {
                obs.ipv6.public_addr = Some(mapped);
                obs.ipv6.rtt_ms = Some(rtt.as_millis().try_into().unwrap_or(u64::MAX));
            }
        }
        if let Some(tcp) = options.tcp_443 {
            let connect = tokio::net::TcpStream::connect(tcp);
            obs.tcp_443 = Some(matches!(
                tokio::time::timeout(Duration::from_secs(3), connect).await,
                Ok(Ok(_))
            ));
        }
        Ok::<_, std::io::Error>(classify(&obs))
    };
    let (measured, probed) = crate::tasks::alongside(measure, portmap.as_mut()).await;
    let mut report = measured?;
    report.port_mapping = match probed {
        Some(probed) => probed,
        None => portmap.await,
    };
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
    expected: Retransmit,
) -> std::io::Result<bool> {
    let second = UdpSocket::bind(bind).await?;
    let Some((second_mapped, _, _, _)) = ask(&second, server, (false, false), expected).await
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

    /// The IPv6 line says whether IPv6 works, and what is missing when it does not.
    #[test]
    fn the_ipv6_line_says_what_works_and_what_is_missing() {
        let addr = Some("2001:db8:1::2".parse().unwrap());
        let server: Option<SocketAddr> = Some("[2001:db8::10]:7000".parse().unwrap());
        let none = Ipv6Report::default();
        assert_eq!(none.describe(), "no global IPv6 address (IPv4 only)");
        let untested = Ipv6Report {
            address: addr,
            ..Ipv6Report::default()
        };
        assert!(
            untested.describe().contains("not tested"),
            "{}",
            untested.describe()
        );
        let blocked = Ipv6Report {
            address: addr,
            server,
            ..Ipv6Report::default()
        };
        assert!(blocked
            .describe()
            .contains("no answer from [2001:db8::10]:7000"));
        let works = Ipv6Report {
            address: addr,
            server,
            public_addr: Some("[2001:db8:1::2]:4000".parse().unwrap()),
            rtt_ms: Some(12),
        };
        let line = works.describe();
        assert!(
            line.starts_with("works: [2001:db8::10]:7000 sees [2001:db8:1::2]:4000 (no NAT"),
            "{line}"
        );
        assert!(line.ends_with("12 ms"), "{line}");
        // A report with working IPv6 says so in its verdict.
        let obs = Observations {
            local: Some("10.0.0.2:4000".parse().unwrap()),
            primary: Some((
                "203.0.113.5:4000".parse().unwrap(),
                Duration::from_millis(3),
                None,
            )),
            ipv6: works.clone(),
            ..Observations::default()
        };
        let report = classify(&obs);
        assert!(report.verdict.contains("over IPv6"), "{}", report.verdict);
        assert!(
            report.render().contains("IPv6:             works"),
            "{}",
            report.render()
        );
    }

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

    /// A port-restricted NAT whose state for a filtered packet took our port (the flow to that
    /// packet's sender then left from another port) says so, in the report, its verdict and the
    /// profile peers get; one that kept the port says it is harmless; where mapping depends on
    /// the destination anyway (or nothing was filtered) it is not judged.
    #[test]
    fn an_early_packet_that_takes_the_port_is_reported() {
        let port = Observations {
            via_alt_ip: Some(a("203.0.113.21:40000")),
            filter_change_both: Some(false),
            filter_change_port: Some(false),
            ..base()
        };
        let early = Observations {
            after_filtered: Some((a("203.0.113.21:41000"), a("203.0.113.21:52113"))),
            ..port.clone()
        };
        let r = classify(&early);
        assert_eq!(r.inbound_takes_port, Some(true));
        assert!(r.profile().inbound_takes_port);
        assert!(
            r.verdict.contains("takes your public port"),
            "{}",
            r.verdict
        );
        assert_eq!(r.profile().kind(), "port-restricted cone");
        let kept = Observations {
            after_filtered: Some((a("203.0.113.21:41000"), a("203.0.113.21:41000"))),
            ..port.clone()
        };
        let r = classify(&kept);
        assert_eq!(r.inbound_takes_port, Some(false));
        assert!(!r.profile().inbound_takes_port);
        assert!(!r.verdict.contains("takes your public port"));
        assert_eq!(classify(&port).inbound_takes_port, None);
        let sym = Observations {
            via_alt_ip: Some(a("203.0.113.21:40001")),
            via_alt_both: Some(a("203.0.113.21:40002")),
            ..early.clone()
        };
        assert_eq!(classify(&sym).inbound_takes_port, None);
        assert!(!classify(&sym).profile().inbound_takes_port);
        let json = serde_json::to_string(&classify(&early)).unwrap();
        assert!(json.contains("\"inbound_takes_port\":true"), "{json}");
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
            r.verdict.contains("symmetric NATs by birthday punching"),
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

    fn ms(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|&m| Duration::from_millis(m)).collect()
    }

    /// Drives a transaction with time passed in, never answered: when it sent, when it gave up.
    fn drive(schedule: Retransmit) -> (Vec<Duration>, Duration) {
        let start = Instant::now();
        let mut t = Transaction::new(schedule, start);
        let mut now = start;
        let mut sends = Vec::new();
        loop {
            match t.poll(now) {
                Step::Send => sends.push(now - start),
                Step::Wait(at) => {
                    assert!(at > now, "a wait is in the future");
                    // Polling early changes nothing.
                    assert_eq!(t.poll(now + (at - now) / 2), Step::Wait(at));
                    now = at;
                }
                Step::GiveUp => return (sends, now - start),
            }
        }
    }

    #[test]
    fn retransmissions_follow_rfc_5389_and_the_documented_budgets() {
        // RFC 5389 section 7.2.1's own example.
        let rfc = (
            ms(&[0, 500, 1500, 3500, 7500, 15500, 31500]),
            Duration::from_millis(39500),
        );
        assert_eq!(Retransmit::RFC5389.timeline(), rfc);
        assert_eq!(drive(Retransmit::RFC5389), rfc);
        let expected = (
            ms(&[0, 500, 1500, 2500, 3500, 4500, 5500]),
            Duration::from_millis(7500),
        );
        assert_eq!(Retransmit::EXPECTED.timeline(), expected);
        assert_eq!(drive(Retransmit::EXPECTED), expected);
        let filtered = (ms(&[0, 500, 1500, 2500, 3500]), Duration::from_millis(4500));
        assert_eq!(Retransmit::FILTERED.timeline(), filtered);
        assert_eq!(drive(Retransmit::FILTERED), filtered);
        // A late poll sends once, not a burst for every missed slot.
        let start = Instant::now();
        let mut t = Transaction::new(Retransmit::RFC5389, start);
        assert_eq!(t.poll(start), Step::Send);
        let late = start + Duration::from_secs(5);
        assert_eq!(t.poll(late), Step::Send);
        assert_eq!(t.poll(late), Step::Wait(late + Duration::from_secs(1)));
    }

    #[test]
    fn unknown_is_not_blamed_on_a_server_that_offers_discovery() {
        // The server offered OTHER-ADDRESS, but the answer from its alternate IP never came.
        let lost = Observations {
            filter_change_both: Some(true),
            ..base()
        };
        let r = classify(&lost);
        assert_eq!(r.mapping, Behaviour::Unknown);
        assert!(r.verdict.contains("got no answer"), "{}", r.verdict);
        assert!(!r.verdict.contains("does not offer"), "{}", r.verdict);
        // Filtering tests without even a plain answer: unknown, not "filtered".
        let silent = Observations {
            via_alt_ip: Some(a("203.0.113.21:40000")),
            ..base()
        };
        let r = classify(&silent);
        assert_eq!(
            (r.mapping, r.filtering),
            (Behaviour::EndpointIndependent, Behaviour::Unknown)
        );
        assert!(r.verdict.contains("got no answer"), "{}", r.verdict);
        // A server without discovery is still named as the cause.
        let plain = Observations {
            primary: Some((a("203.0.113.21:40000"), Duration::from_millis(5), None)),
            ..base()
        };
        assert!(classify(&plain).verdict.contains("does not offer"));
    }

    /// What the lossy responder drops.
    #[derive(Clone, Copy, Debug)]
    enum Loss {
        /// The first three copies of every transaction (old budgets of three tries concluded
        /// "filtered" from this).
        FirstThree,
        /// Every other request it receives (50 %).
        EveryOther,
        /// Everything sent to the alternate IP (and nothing else).
        AltIp,
    }

    /// The NAT the responder pretends the client is behind (it writes the mapped addresses and
    /// drops what that NAT's filter would drop).
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Nat {
        FullCone,
        PortRestricted,
        Symmetric,
    }

    /// An RFC 5780 STUN server on 127.0.0.1 and 127.0.0.2, two ports each, that drops requests
    /// deterministically. Returns the primary address.
    async fn lossy_responder(nat: Nat, loss: Loss) -> SocketAddr {
        use std::collections::HashMap;
        use std::sync::{Arc, Mutex};
        let ips = [
            std::net::IpAddr::from([127, 0, 0, 1]),
            std::net::IpAddr::from([127, 0, 0, 2]),
        ];
        // Ports free on both IPs.
        let sockets = 'bind: loop {
            let p1 = UdpSocket::bind((ips[0], 0)).await.unwrap();
            let p2 = UdpSocket::bind((ips[0], 0)).await.unwrap();
            let (port1, port2) = (
                p1.local_addr().unwrap().port(),
                p2.local_addr().unwrap().port(),
            );
            let (Ok(q1), Ok(q2)) = (
                UdpSocket::bind((ips[1], port1)).await,
                UdpSocket::bind((ips[1], port2)).await,
            ) else {
                continue 'bind;
            };
            break [Arc::new(p1), Arc::new(p2), Arc::new(q1), Arc::new(q2)];
        };
        let addrs: Vec<SocketAddr> = sockets.iter().map(|s| s.local_addr().unwrap()).collect();
        let other = addrs[3];
        // Copies seen per transaction, and requests seen in all.
        type Seen = (HashMap<[u8; 12], u32>, u64);
        let copies: Arc<Mutex<Seen>> = Arc::default();
        for (index, socket) in sockets.iter().enumerate() {
            let (sockets, addrs, copies) = (sockets.clone(), addrs.clone(), copies.clone());
            let socket = socket.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1500];
                while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                    let Some(req) = stun5780::parse_binding_request(&buf[..n]) else {
                        continue;
                    };
                    let drop_it = {
                        let mut copies = copies.lock().unwrap();
                        copies.1 += 1;
                        let total = copies.1;
                        let seen = copies.0.entry(req.transaction).or_insert(0);
                        *seen += 1;
                        match loss {
                            Loss::FirstThree => *seen <= 3,
                            Loss::EveryOther => total % 2 == 1,
                            Loss::AltIp => index >= 2,
                        }
                    };
                    // The emulated NAT's filter drops answers from an address or port the
                    // client has not sent to.
                    let changed = req.change_ip || req.change_port;
                    if drop_it || (changed && nat != Nat::FullCone) {
                        continue;
                    }
                    let reply_from = index
                        ^ (if req.change_ip { 2 } else { 0 })
                        ^ (if req.change_port { 1 } else { 0 });
                    let port = match nat {
                        Nat::Symmetric => 40000 + index as u16,
                        _ => 40000,
                    };
                    let ctx = stun5780::ResponseContext {
                        mapped: SocketAddr::from(([203, 0, 113, 7], port)),
                        origin: addrs[reply_from],
                        other: Some(other),
                    };
                    let response = stun5780::binding_response(req.transaction, &ctx);
                    let _ = sockets[reply_from].send_to(&response, from).await;
                }
            });
        }
        addrs[0]
    }

    /// Budgets shaped like the defaults but ten times faster, with a long last wait, so that a
    /// loaded machine cannot make an answer that comes late look lost.
    const FAST: Patience = Patience {
        expected: Retransmit {
            rto: Duration::from_millis(50),
            max_rto: Duration::from_millis(100),
            sends: 7,
            last_wait: Duration::from_secs(3),
        },
        filtered: Retransmit {
            rto: Duration::from_millis(50),
            max_rto: Duration::from_millis(100),
            sends: 5,
            last_wait: Duration::from_secs(3),
        },
    };

    #[tokio::test]
    async fn a_lossy_responder_still_gives_the_right_conclusion() {
        use Behaviour::*;
        let cases = [
            (
                Nat::FullCone,
                Loss::FirstThree,
                EndpointIndependent,
                EndpointIndependent,
            ),
            (
                Nat::FullCone,
                Loss::EveryOther,
                EndpointIndependent,
                EndpointIndependent,
            ),
            (
                Nat::PortRestricted,
                Loss::FirstThree,
                EndpointIndependent,
                AddressAndPortDependent,
            ),
            (
                Nat::PortRestricted,
                Loss::EveryOther,
                EndpointIndependent,
                AddressAndPortDependent,
            ),
            (
                Nat::Symmetric,
                Loss::FirstThree,
                AddressAndPortDependent,
                AddressAndPortDependent,
            ),
            (
                Nat::Symmetric,
                Loss::EveryOther,
                AddressAndPortDependent,
                AddressAndPortDependent,
            ),
        ];
        let runs = cases.map(|(nat, loss, mapping, filtering)| async move {
            let server = lossy_responder(nat, loss).await;
            let report = run_with(&[server], &Options::default(), FAST)
                .await
                .unwrap();
            (nat, loss, mapping, filtering, report)
        });
        for (nat, loss, mapping, filtering, report) in futures_join_all(runs).await {
            assert!(report.udp && !report.no_nat, "{nat:?} {loss:?}: {report:?}");
            assert_eq!(
                (report.mapping, report.filtering),
                (mapping, filtering),
                "{nat:?} {loss:?}: {}",
                report.verdict
            );
        }
        // Everything to the alternate IP lost: the mapping is unknown, and said to be for lack
        // of answers, not for lack of discovery.
        let server = lossy_responder(Nat::FullCone, Loss::AltIp).await;
        let report = run_with(&[server], &Options::default(), FAST)
            .await
            .unwrap();
        assert_eq!(report.mapping, Unknown, "{report:?}");
        assert!(
            report.verdict.contains("got no answer"),
            "{}",
            report.verdict
        );
    }

    /// Runs futures concurrently on this task and returns their outputs in order.
    async fn futures_join_all<F: std::future::Future>(futures: [F; 6]) -> Vec<F::Output> {
        let [a, b, c, d, e, f] = futures;
        let (a, b, c, d, e, f) = tokio::join!(a, b, c, d, e, f);
        vec![a, b, c, d, e, f]
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
