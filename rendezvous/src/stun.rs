//! The STUN service: RFC 5389 Binding on the main port (shared with QUIC), and RFC 5780
//! behaviour discovery when the server is given an alternate port and, where the host has one,
//! an alternate IP: CHANGE-REQUEST is honoured from the matching socket, and every response says
//! where it came from (RESPONSE-ORIGIN) and where the alternate is (OTHER-ADDRESS).
//!
//! Bounded reflection: responses are 64 or 76 bytes over IPv4, at most 124 over IPv6, and each
//! source (IPv4 address or IPv6 /64) is rate limited by a [`StunLimiter`] that remembers the
//! most recently seen sources.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use common::stun5780::{self, ResponseContext};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use transport::{DemuxSocket, StunDatagram};

use crate::sources::{SourceBuckets, SourceKey};

/// Requests per second per source (IPv4 address or IPv6 /64), sustained, and burst.
pub const PER_SOURCE_RATE: f64 = 20.0;
/// Burst of requests per source.
pub const PER_SOURCE_BURST: f64 = 40.0;
/// Sources remembered by the limiter; beyond that the least recently seen is forgotten (a
/// flood of spoofed sources cannot reset the limit of a source that keeps sending). About
/// 100 bytes each: a few MiB at most.
pub const MAX_SOURCES: usize = 65_536;

/// The per-source STUN rate limit.
#[derive(Debug)]
pub struct StunLimiter(SourceBuckets);

impl Default for StunLimiter {
    fn default() -> Self {
        StunLimiter(SourceBuckets::new(
            PER_SOURCE_BURST,
            PER_SOURCE_RATE,
            MAX_SOURCES,
        ))
    }
}

impl StunLimiter {
    /// Whether a request from `source` may be answered now.
    pub fn allow(&mut self, source: IpAddr, now: Instant) -> bool {
        self.0.try_take(SourceKey::of(source), 1.0, now)
    }

    /// Sources remembered now.
    pub fn sources(&self) -> usize {
        self.0.len()
    }
}

/// STUN counters.
#[derive(Debug, Default)]
pub struct StunCounters {
    /// Binding requests answered.
    pub answered: AtomicU64,
    /// Requests dropped by the per-source limit.
    pub rate_limited: AtomicU64,
    /// STUN-shaped datagrams that were not Binding requests.
    pub ignored: AtomicU64,
}

/// One of the up to four sockets: (IP index, port index), 0 = primary, 1 = alternate.
#[derive(Clone)]
enum Socket {
    Shared(Arc<DemuxSocket>),
    Plain(Arc<tokio::net::UdpSocket>),
}

impl Socket {
    async fn send_to(&self, data: &[u8], to: SocketAddr) -> std::io::Result<()> {
        match self {
            Socket::Shared(demux) => demux.send_to(data, to).await,
            Socket::Plain(socket) => {
                // A dual-stack socket takes IPv4 destinations v4-mapped.
                let to = match (to, socket.local_addr()) {
                    (SocketAddr::V4(v4), Ok(SocketAddr::V6(_))) => {
                        SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
                    }
                    _ => to,
                };
                socket.send_to(data, to).await.map(|_| ())
            }
        }
    }
}

/// Where the alternate addresses are.
#[derive(Debug, Clone, Copy, Default)]
pub struct StunConfig {
    /// Second port on the same IP(s): enables RFC 5780 port changes.
    pub alt_port: Option<u16>,
    /// Second IP of this host: enables RFC 5780 IP changes (needs `alt_port` too).
    pub alt_ip: Option<IpAddr>,
    /// The alternates were not asked for (`rendezvous serve` picks the listen port + 1 by
    /// default): one that cannot be bound is left out with a warning instead of failing the
    /// start.
    pub optional: bool,
}

/// The alternate STUN addresses actually bound, and what they offer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StunAlternates {
    /// The main address.
    pub primary: Option<SocketAddr>,
    /// (main IP, alternate port): answers CHANGE-REQUEST "change port".
    pub port: Option<SocketAddr>,
    /// (alternate IP, main port): answers "change IP".
    pub ip: Option<SocketAddr>,
    /// (alternate IP, alternate port): answers both, and is the OTHER-ADDRESS of every response.
    pub other: Option<SocketAddr>,
}

impl StunAlternates {
    /// What NAT behaviour discovery the server offers, in words (printed at start).
    pub fn describe(&self) -> String {
        match (self.port, self.other) {
            (_, Some(other)) => format!(
                "STUN behaviour discovery (RFC 5780): full, alternate address {other}: peers \
                 learn how their NAT maps and filters by IP and by port"
            ),
            (Some(port), None) => format!(
                "STUN behaviour discovery on {port} (one IP): mapping and filtering by port only \
                 (CHANGE-REQUEST \"change port\" is answered from there); a second IP of this \
                 host (--stun-alt-ip IP) would add mapping and filtering by IP and OTHER-ADDRESS, \
                 which RFC 5780 clients such as `peer netcheck` and the peers' NAT diagnosis need \
                 to classify a NAT"
            ),
            (None, None) => "STUN behaviour discovery off: peers learn their public address \
                 only (Binding on the main port); --stun-alt-port PORT adds mapping and \
                 filtering by port, and --stun-alt-ip IP with it full RFC 5780 discovery"
                .to_owned(),
        }
    }
}

/// The transaction id of an address-proof request (a Binding request with USERNAME
/// [`common::stun::OBSERVE_USERNAME`]).
fn observe_transaction(data: &[u8]) -> Option<[u8; 12]> {
    match common::stun::decode(data) {
        Ok(common::stun::StunPacket::BindingRequest {
            transaction,
            username: Some(username),
        }) if username == common::stun::OBSERVE_USERNAME => Some(transaction),
        _ => None,
    }
}

struct Service {
    sockets: [[Option<(Socket, SocketAddr)>; 2]; 2],
    other: Option<SocketAddr>,
    limiter: Mutex<StunLimiter>,
    counters: Arc<StunCounters>,
    /// Keys the answers to address-proof requests (see [`crate::observe`]).
    observe_secret: [u8; 32],
}

impl Service {
    fn allow(&self, source: IpAddr, now: Instant) -> bool {
        self.limiter
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .allow(source, now)
    }

    async fn handle(&self, data: &[u8], from: SocketAddr, ip: usize, port: usize) {
        if let Some(transaction) = observe_transaction(data) {
            // An address-proof request: answered from the primary socket only, rate-limited as
            // any Binding request (the answer is no larger than the request's usual answer).
            if ip != 0 || port != 0 {
                self.counters.ignored.fetch_add(1, Ordering::Relaxed);
                return;
            }
            if !self.allow(from.ip(), Instant::now()) {
                self.counters.rate_limited.fetch_add(1, Ordering::Relaxed);
                return;
            }
            if let Some((socket, _)) = &self.sockets[0][0] {
                let reply = crate::observe::answer(
                    &self.observe_secret,
                    transaction,
                    from,
                    time::OffsetDateTime::now_utc(),
                );
                if socket.send_to(&reply, from).await.is_ok() {
                    self.counters.answered.fetch_add(1, Ordering::Relaxed);
                }
            }
            return;
        }
        let Some(request) = stun5780::parse_binding_request(data) else {
            self.counters.ignored.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if !self.allow(from.ip(), Instant::now()) {
            self.counters.rate_limited.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let (ip_out, port_out) = (
            ip ^ usize::from(request.change_ip),
            port ^ usize::from(request.change_port),
        );
        let (socket, response) = match &self.sockets[ip_out][port_out] {
            Some((socket, origin)) => {
                let ctx = ResponseContext {
                    mapped: from,
                    origin: *origin,
                    other: self.other,
                };
                (
                    socket,
                    stun5780::binding_response(request.transaction, &ctx),
                )
            }
            None => match &self.sockets[ip][port] {
                // Cannot answer from the requested address: say so from where we are.
                Some((socket, _)) => (
                    socket,
                    stun5780::binding_error(request.transaction, 420, "no alternate address"),
                ),
                None => return,
            },
        };
        self.counters.answered.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = socket.send_to(&response, from).await {
            tracing::debug!(to = %from, error = %e, "STUN response not sent");
        }
    }
}

/// Binds the alternate sockets. Fails if an alternate address cannot be bound.
pub(crate) async fn start(
    primary: Arc<DemuxSocket>,
    primary_addr: SocketAddr,
    config: StunConfig,
    mut stun_rx: mpsc::Receiver<StunDatagram>,
    counters: Arc<StunCounters>,
    observe_secret: [u8; 32],
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<(tokio::task::JoinHandle<()>, StunAlternates)> {
    let mut sockets: [[Option<(Socket, SocketAddr)>; 2]; 2] = Default::default();
    sockets[0][0] = Some((Socket::Shared(primary), primary_addr));
    let mut plain = Vec::new();
    let ips = [Some(primary_addr.ip()), config.alt_ip];
    let ports = [Some(primary_addr.port()), config.alt_port];
    for (i, ip) in ips.iter().enumerate() {
        for (p, port) in ports.iter().enumerate() {
            if i == 0 && p == 0 {
                continue;
            }
            let (Some(ip), Some(port)) = (ip, port) else {
                continue;
            };
            let addr = SocketAddr::new(*ip, *port);
            // With a second IP, every socket of a port is bound with SO_REUSEPORT (the primary
            // too), so that the second IP's binds beside a dual-stack wildcard of the same port
            // (`[::]:port` covers every IPv4 address too). Otherwise dual-stack like the primary
            // when it is the IPv6 wildcard.
            let bound = if config.alt_ip.is_some() {
                transport::bind_udp_beside(addr)
            } else {
                transport::bind_udp(addr, false).and_then(|s| s.set_nonblocking(true).map(|()| s))
            };
            let socket = match bound.and_then(tokio::net::UdpSocket::from_std) {
                Ok(socket) => Arc::new(socket),
                Err(e) if config.optional => {
                    tracing::warn!(%addr, error = %e, "STUN alternate address left out: cannot bind");
                    continue;
                }
                Err(e) => return Err(e),
            };
            let bound = socket.local_addr()?;
            sockets[i][p] = Some((Socket::Plain(socket.clone()), bound));
            plain.push((socket, i, p));
        }
    }
    // RFC 5780: OTHER-ADDRESS promises both another IP and another port; without a second IP
    // only port changes are answered, and standard clients are not told of an alternate.
    let other = sockets[1][1].as_ref().map(|(_, addr)| *addr);
    if let Some(other) = other {
        tracing::info!(%other, "STUN behaviour discovery (RFC 5780) on the alternate address");
    }
    let bound = |i: usize, p: usize| sockets[i][p].as_ref().map(|(_, addr)| *addr);
    let alternates = StunAlternates {
        primary: Some(primary_addr),
        port: bound(0, 1),
        ip: bound(1, 0),
        other,
    };
    let service = Arc::new(Service {
        sockets,
        other,
        limiter: Mutex::new(StunLimiter::default()),
        counters,
        observe_secret,
    });
    let task = tokio::spawn(async move {
        let mut tasks = JoinSet::new();
        for (socket, i, p) in plain {
            let service = service.clone();
            let mut stop = shutdown.clone();
            tasks.spawn(async move {
                let mut buf = vec![0u8; 2048];
                loop {
                    let (n, from) = tokio::select! {
                        r = socket.recv_from(&mut buf) => match r {
                            Ok(r) => r,
                            Err(_) => continue,
                        },
                        _ = stop.changed() => return,
                    };
                    service
                        .handle(&buf[..n], transport::canonical(from), i, p)
                        .await;
                }
            });
        }
        loop {
            let datagram = tokio::select! {
                d = stun_rx.recv() => match d { Some(d) => d, None => break },
                _ = shutdown.changed() => break,
            };
            service.handle(&datagram.data, datagram.from, 0, 0).await;
        }
        tasks.shutdown().await;
    });
    Ok((task, alternates))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_flood_of_spoofed_sources_does_not_reset_a_sending_source() {
        let t0 = Instant::now();
        let mut limiter = StunLimiter::default();
        let attacker: IpAddr = "198.51.100.7".parse().unwrap();
        let allowed = (0..100).filter(|_| limiter.allow(attacker, t0)).count();
        assert_eq!(allowed, PER_SOURCE_BURST as usize);
        // Twice as many spoofed sources as remembered, while the attacker keeps sending:
        // it stays limited (the old limiter forgot everyone at 65,536 sources).
        for n in 0..(2 * MAX_SOURCES as u32) {
            let spoofed = IpAddr::V4((0x0a00_0000 + n).into());
            limiter.allow(spoofed, t0);
            if n % 1000 == 0 {
                assert!(
                    !limiter.allow(attacker, t0),
                    "limit reset after {n} sources"
                );
            }
        }
        assert_eq!(limiter.sources(), MAX_SOURCES);
        // Refill at the stated rate.
        let later = t0 + Duration::from_secs(1);
        let refilled = (0..100).filter(|_| limiter.allow(attacker, later)).count();
        assert_eq!(refilled, PER_SOURCE_RATE as usize);
    }

    /// The default alternate port is optional: taken by another program, it is left out (the
    /// server starts with discovery off and says so); a port the operator gave must be bound.
    #[tokio::test]
    async fn a_busy_default_alternate_port_is_left_out_and_a_given_one_fails_the_start() {
        let busy = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = busy.local_addr().unwrap().port();
        let main = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = main.local_addr().unwrap();
        let (demux, _) = DemuxSocket::new(main, 4).unwrap();
        let (stop_tx, stop_rx) = watch::channel(false);
        let optional = StunConfig {
            alt_port: Some(port),
            alt_ip: None,
            optional: true,
        };
        let (_tx, rx) = mpsc::channel(4);
        let (task, alternates) = start(
            demux.clone(),
            addr,
            optional,
            rx,
            Arc::default(),
            [0; 32],
            stop_rx.clone(),
        )
        .await
        .expect("starts without the busy port");
        assert_eq!(
            alternates,
            StunAlternates {
                primary: Some(addr),
                ..StunAlternates::default()
            }
        );
        assert!(alternates.describe().contains("discovery off"));
        let _ = stop_tx.send(true);
        task.await.unwrap();
        let (_tx, rx) = mpsc::channel(4);
        let required = StunConfig {
            optional: false,
            ..optional
        };
        assert!(
            start(demux, addr, required, rx, Arc::default(), [0; 32], stop_rx)
                .await
                .is_err()
        );
    }

    #[test]
    fn an_ipv6_host_counts_as_its_64() {
        let t0 = Instant::now();
        let mut limiter = StunLimiter::default();
        let allowed = (0..100u16)
            .filter(|n| {
                let ip = IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 1, *n, 0, 0, 1));
                limiter.allow(ip, t0)
            })
            .count();
        assert_eq!(allowed, PER_SOURCE_BURST as usize);
    }
}
