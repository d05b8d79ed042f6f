//! Reusable attacks on a running rendezvous, for the attack tests (`tests/attacks_*.rs`) and the
//! soak (`tests/soak.rs`).
//!
//! Each attack is an async function that runs until its [`Stop`] is set and records what it did
//! in [`Counters`] (never panics on what the server does: a refused or closed connection is a
//! count, not a failure). [`soak_attacks`] lists them by name with the intensity the soak uses;
//! [`Running`] starts one on a runtime and, when stopped, hands back its counters.
//!
//! Every attack sends from its own block of loopback source addresses (Linux routes all of
//! 127.0.0.0/8 to `lo`), so the server's per-source limits see many attackers and never mix an
//! attacker with the legitimate load (127.0.0.1, 127.0.1.x, 127.0.2.x). The blocks, by second
//! octet: 10 tunnel, 11 metrics, 12 garbage UDP, 13 registration flood, 14 relay flood, 20 to 23
//! STUN (a /14: more sources than the server's STUN limiter remembers), 30 QUIC clients that
//! never read, 31 Initial flood; 32 and up are free for new attacks.
//!
//! To add an attack: write `async fn my_attack(target: Target, stop: Stop, counters: Counters)`
//! (or a wrapper choosing its parameters) and add an [`Attack`] for it to [`soak_attacks`].

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use certs::{Fingerprint, Identity, ServerTrust};
use common::frame_io::{read_frame, write_frame};
use common::relay;
use common::{ControlMessage, ErrorCode, PeerId, PROTOCOL_VERSION};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;

/// Deadline for one exchange with the server (generous: a loaded 2-core machine).
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the attacks go: the rendezvous's ports and key.
#[derive(Clone, Debug)]
pub struct Target {
    /// QUIC and STUN (UDP).
    pub udp: SocketAddr,
    /// The server's key.
    pub fingerprint: Fingerprint,
    /// The TLS tunnel (TCP), if it listens.
    pub tunnel: Option<SocketAddr>,
    /// `/metrics` (TCP), if it listens.
    pub metrics: Option<SocketAddr>,
}

/// The attackers' runtime: two workers of its own, so that an attack runs beside the test's
/// threads that drive and watch the real programs.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime for the attackers")
}

/// Tells an attack to end. Cloned into every task of the attack.
#[derive(Clone, Default)]
pub struct Stop(Arc<AtomicBool>);

impl Stop {
    /// Not stopped yet.
    pub fn new() -> Stop {
        Stop::default()
    }

    /// Ends every attack holding a clone of this.
    pub fn stop(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Whether [`Stop::stop`] was called.
    pub fn stopped(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// Sleeps `duration`, waking early when stopped; returns false when stopped.
    pub async fn sleep(&self, duration: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + duration;
        while !self.stopped() {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return true;
            }
            tokio::time::sleep((deadline - now).min(Duration::from_millis(100))).await;
        }
        false
    }
}

/// Named counters of what an attack did (connections made, closed by the server, requests
/// sent, answers, refusals...).
#[derive(Clone, Default)]
pub struct Counters(Arc<Mutex<BTreeMap<&'static str, u64>>>);

impl Counters {
    /// Adds `n` to the counter `name` (created at 0).
    pub fn add(&self, name: &'static str, n: u64) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *map.entry(name).or_default() += n;
    }

    /// The counter `name` (0 if never added to).
    pub fn get(&self, name: &str) -> u64 {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.get(name).copied().unwrap_or(0)
    }

    /// Every counter, by name.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.iter().map(|(k, v)| (*k, *v)).collect()
    }
}

/// The future an attack runs.
pub type AttackFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// An attack's body: given the target, runs until stopped.
pub type AttackBody = Arc<dyn Fn(Target, Stop, Counters) -> AttackFuture + Send + Sync>;

/// A named attack.
#[derive(Clone)]
pub struct Attack {
    /// Short name (a column of the soak's summary).
    pub name: &'static str,
    /// What it does, in a sentence.
    pub what: &'static str,
    /// Runs it.
    pub body: AttackBody,
}

impl Attack {
    /// An attack named `name` running `body`.
    pub fn new<F, Fut>(name: &'static str, what: &'static str, body: F) -> Attack
    where
        F: Fn(Target, Stop, Counters) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        Attack {
            name,
            what,
            body: Arc::new(move |target, stop, counters| Box::pin(body(target, stop, counters))),
        }
    }
}

/// The attacks the soak runs, all at once, with their soak intensities (sized so that all of
/// them together leave the legitimate load some of a 2-core machine).
pub fn soak_attacks() -> Vec<Attack> {
    vec![
        Attack::new(
            "tunnel_slowloris",
            "8 sources x 4 TCP connections to the tunnel port, half idle, half trickling a TLS \
             record that never completes, each reopened once closed",
            |t: Target, stop, counters| async move {
                let Some(to) = t.tunnel else { return };
                let mut all = JoinSet::new();
                for n in 1..=8 {
                    all.spawn(hold_connections(
                        block_ip(10, n),
                        to,
                        4,
                        TLS_SLOWLORIS,
                        stop.clone(),
                        counters.clone(),
                    ));
                }
                while all.join_next().await.is_some() {}
            },
        ),
        Attack::new(
            "metrics_slowloris",
            "8 sources x 4 TCP connections to the metrics port, half idle, half trickling a \
             request head that never ends, each reopened once closed",
            |t: Target, stop, counters| async move {
                let Some(to) = t.metrics else { return };
                let mut all = JoinSet::new();
                for n in 1..=8 {
                    all.spawn(hold_connections(
                        block_ip(11, n),
                        to,
                        4,
                        HTTP_SLOWLORIS,
                        stop.clone(),
                        counters.clone(),
                    ));
                }
                while all.join_next().await.is_some() {}
            },
        ),
        Attack::new(
            "stun_flood",
            "STUN binding requests, 1,000 per second from 256 sources at a time, 128 new \
             sources a second (moving through 127.20.0.0/14: 262,144 sources, more than the \
             server's STUN limiter remembers)",
            |t: Target, stop, counters| {
                stun_flood(t.udp, 256, 1000, Duration::from_secs(2), stop, counters)
            },
        ),
        Attack::new(
            "garbage_udp",
            "random datagrams (QUIC-looking, STUN-shaped, random), 500 per second from 32 sources",
            |t: Target, stop, counters| garbage_udp(t.udp, 32, 500, stop, counters),
        ),
        Attack::new(
            "registration_flood",
            "fresh identities registering, 10 per second from a pool of 32 sources (each \
             connection closed after the answer: the rows stay, offline)",
            |t: Target, stop, counters| registration_flood(t, 32, 10, stop, counters),
        ),
        Attack::new(
            "relay_flood",
            "one sender relaying 2 MB/s to 8 destinations that accepted and never read, plus an \
             empty frame per round; all nine replaced by fresh identities every 60 s",
            |t: Target, stop, counters| {
                relay_flood(t, 8, 2_000_000, Duration::from_secs(60), stop, counters)
            },
        ),
        Attack::new(
            "quic_never_read",
            "8 QUIC clients at a time that never read (tiny receive windows; every stream the \
             server allows opened and filled, requests without pause), each replaced by a fresh \
             one from a fresh source once the server disconnects it",
            |t: Target, stop, counters| quic_never_read(t.udp, 8, stop, counters),
        ),
        Attack::new(
            "initial_flood",
            "real QUIC Initials of fresh handshakes that are never continued, 500 per second \
             from 256 sources (127.31.0.0/16)",
            |t: Target, stop, counters| initial_flood(t.udp, 256, 500, stop, counters),
        ),
    ]
}

/// An attack started on a runtime.
pub struct Running {
    /// Its name.
    pub name: &'static str,
    stop: Stop,
    counters: Counters,
    handle: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Starts `attack` against `target` on `runtime`.
    pub fn start(runtime: &tokio::runtime::Handle, attack: &Attack, target: &Target) -> Running {
        let stop = Stop::new();
        let counters = Counters::default();
        let handle = runtime.spawn((attack.body)(
            target.clone(),
            stop.clone(),
            counters.clone(),
        ));
        Running {
            name: attack.name,
            stop,
            counters,
            handle,
        }
    }

    /// What it did so far.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        self.counters.snapshot()
    }

    /// Stops it, waits (at most 30 s, then aborts it) and returns its counters.
    pub async fn finish(self) -> Vec<(&'static str, u64)> {
        self.stop.stop();
        let abort = self.handle.abort_handle();
        if tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .is_err()
        {
            abort.abort();
            self.counters.add("aborted_at_stop", 1);
        }
        self.counters.snapshot()
    }
}

/// 127.`block`.hi.lo, numbering `n` from 1 within the block.
pub fn block_ip(block: u8, n: u16) -> Ipv4Addr {
    let [hi, lo] = n.to_be_bytes();
    Ipv4Addr::new(127, block, hi, lo)
}

/// A TCP connection from `from` (any port).
pub async fn connect_from(from: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((from, 0)))?;
    socket.connect(to).await
}

/// Waits until the far end closes `stream` (EOF or reset), reading and discarding what it
/// sends; false if it is still open after `within`.
pub async fn closed_within<S: AsyncRead + Unpin>(stream: &mut S, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// What an attacking TCP connection sends: `opening` at once, then (if `trickle`) one more
/// byte every 250 ms, never completing anything.
#[derive(Clone, Copy, Debug)]
pub struct Slowloris {
    /// Sent at once.
    pub opening: &'static [u8],
    /// Sent every 250 ms after that.
    pub trickle: Option<u8>,
}

/// The opening of a TLS record of 16 KiB that never arrives: the acceptor waits for the rest.
pub const TLS_SLOWLORIS: Slowloris = Slowloris {
    opening: &[0x16, 0x03, 0x01, 0x40, 0x00],
    trickle: Some(0),
};

/// A request head that never ends.
pub const HTTP_SLOWLORIS: Slowloris = Slowloris {
    opening: b"GET /metrics HTTP/1.1\r\n",
    trickle: Some(b'X'),
};

/// Connections that only connect.
pub const IDLE: Slowloris = Slowloris {
    opening: b"",
    trickle: None,
};

/// Keeps `workers` connections from `from` to `to` open, half idle and half `slowloris`,
/// reopening each once closed, until `stop`. Counts `connections` opened, `closed_by_server`
/// and `connect_failed`.
pub async fn hold_connections(
    from: Ipv4Addr,
    to: SocketAddr,
    workers: usize,
    slowloris: Slowloris,
    stop: Stop,
    counters: Counters,
) {
    let mut all = JoinSet::new();
    for w in 0..workers {
        let kind = if w % 2 == 0 { IDLE } else { slowloris };
        let stop = stop.clone();
        let counters = counters.clone();
        all.spawn(async move {
            while !stop.stopped() {
                let Ok(mut stream) = connect_from(from, to).await else {
                    counters.add("connect_failed", 1);
                    stop.sleep(Duration::from_millis(200)).await;
                    continue;
                };
                counters.add("connections", 1);
                let _ = stream.write_all(kind.opening).await;
                while !stop.stopped() {
                    if let Some(byte) = kind.trickle {
                        let _ = stream.write_all(&[byte]).await;
                    }
                    if closed_within(&mut stream, Duration::from_millis(250)).await {
                        counters.add("closed_by_server", 1);
                        break;
                    }
                }
                stop.sleep(Duration::from_millis(200)).await;
            }
        });
    }
    while all.join_next().await.is_some() {}
}

/// UDP sockets on 127.`block`.0.1 and up, one per source.
async fn udp_sources(block: u8, sources: u16) -> Vec<tokio::net::UdpSocket> {
    let mut sockets = Vec::new();
    for n in 1..=sources.max(1) {
        let from = SocketAddr::from((block_ip(block, n), 0));
        if let Ok(socket) = tokio::net::UdpSocket::bind(from).await {
            sockets.push(socket);
        }
    }
    sockets
}

/// The `i`th address of 127.20.0.0/14 (wrapping, skipping the block's first).
fn stun_source(i: u64) -> Ipv4Addr {
    let n = (i % ((1 << 18) - 1) + 1) as u32;
    Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 20, 0, 0)) | n)
}

/// Sends `per_second` datagrams made by `make` (round robin over `sockets`) until `stop`, in
/// batches every 10 ms; after each send drains what came back to that socket. Counts `sent`,
/// `send_failed` and `replies`.
async fn udp_pump(
    sockets: Vec<tokio::net::UdpSocket>,
    to: SocketAddr,
    per_second: u32,
    stop: Stop,
    counters: Counters,
    mut make: impl FnMut(u64) -> Vec<u8>,
) {
    if sockets.is_empty() {
        counters.add("no_sockets", 1);
        return;
    }
    let per_tick = (per_second / 100).max(1) as u64;
    let mut ticker = tokio::time::interval(Duration::from_millis(10));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut i = 0u64;
    let mut buf = [0u8; 2048];
    while !stop.stopped() {
        ticker.tick().await;
        for _ in 0..per_tick {
            let socket = &sockets[(i % sockets.len() as u64) as usize];
            match socket.try_send_to(&make(i), to) {
                Ok(_) => counters.add("sent", 1),
                Err(_) => counters.add("send_failed", 1),
            }
            while socket.try_recv_from(&mut buf).is_ok() {
                counters.add("replies", 1);
            }
            i += 1;
        }
    }
}

/// STUN binding requests to `to`, `per_second` in all from `sources` addresses at a time in
/// 127.20.0.0/14; every `rotate` all the sockets move to the next `sources` addresses, so the
/// server sees ever new sources. Counts `sent`, `replies` (the server answers each source at a
/// limited rate) and `sources` used.
pub async fn stun_flood(
    to: SocketAddr,
    sources: u16,
    per_second: u32,
    rotate: Duration,
    stop: Stop,
    counters: Counters,
) {
    let mut next = 0u64;
    while !stop.stopped() {
        let mut sockets = Vec::new();
        for _ in 0..sources.max(1) {
            let from = SocketAddr::from((stun_source(next), 0));
            next += 1;
            if let Ok(socket) = tokio::net::UdpSocket::bind(from).await {
                sockets.push(socket);
            }
        }
        counters.add("sources", sockets.len() as u64);
        let phase = Stop::new();
        let pump = udp_pump(
            sockets,
            to,
            per_second,
            phase.clone(),
            counters.clone(),
            |i| {
                let mut transaction = [0u8; 12];
                transaction[..8].copy_from_slice(&i.to_be_bytes());
                common::stun::binding_request(transaction)
            },
        );
        let timer = async {
            stop.sleep(rotate).await;
            phase.stop();
        };
        tokio::join!(pump, timer);
    }
}

/// Garbage datagrams to `to` (a third with a QUIC long-header first byte, a third STUN-shaped
/// with the magic cookie, a third random), 1 to 1400 bytes, `per_second` in all from `sources`
/// addresses in 127.12.0.0/16. Counts `sent` and `replies`.
pub async fn garbage_udp(
    to: SocketAddr,
    sources: u16,
    per_second: u32,
    stop: Stop,
    counters: Counters,
) {
    let sockets = udp_sources(12, sources).await;
    udp_pump(sockets, to, per_second, stop, counters, |i| {
        let len = 1 + (rand::random::<u32>() % 1400) as usize;
        let mut data: Vec<u8> = (0..len).map(|_| rand::random()).collect();
        match i % 3 {
            0 => data[0] |= 0xC0,
            1 if len >= 20 => {
                data[0] &= 0x3F;
                data[4..8].copy_from_slice(&common::stun::MAGIC_COOKIE.to_be_bytes());
            }
            _ => {}
        }
        data
    })
    .await
}

/// A QUIC endpoint sending from `ip` (a peer's endpoint: demultiplexed socket).
pub fn endpoint_on(ip: Ipv4Addr) -> Result<quinn::Endpoint, String> {
    transport::make_endpoint(SocketAddr::from((ip, 0)), None, Default::default(), 8, None)
        .map(|(endpoint, _, _)| endpoint)
        .map_err(|e| format!("endpoint on {ip}: {e}"))
}

/// A registered raw client (its own identity, no peer program): the connection and the
/// control stream, kept open and unread while it is held.
pub struct RawClient {
    /// Its id.
    pub id: PeerId,
    /// The connection.
    pub conn: quinn::Connection,
    /// The control stream, kept open.
    pub control: (quinn::SendStream, quinn::RecvStream),
}

/// Writes `msg` and reads one reply frame (at most [`REPLY_TIMEOUT`]).
pub async fn exchange(
    tx: &mut quinn::SendStream,
    rx: &mut quinn::RecvStream,
    msg: &ControlMessage,
) -> Result<ControlMessage, String> {
    write_frame(tx, &msg.encode())
        .await
        .map_err(|e| format!("writing {}: {e}", msg.kind()))?;
    let reply = tokio::time::timeout(REPLY_TIMEOUT, read_frame(rx))
        .await
        .map_err(|_| format!("no reply to {} in time", msg.kind()))?
        .map_err(|e| format!("reading the reply to {}: {e}", msg.kind()))?
        .ok_or_else(|| format!("stream closed before the reply to {}", msg.kind()))?;
    ControlMessage::decode(&reply).map_err(|e| format!("decoding the reply: {e}"))
}

impl RawClient {
    /// Connects over `endpoint` as `identity` and registers with protocol `version`: the
    /// client, or the server's refusal; `Err` when the exchange itself failed.
    pub async fn register(
        endpoint: &quinn::Endpoint,
        identity: &Identity,
        server: SocketAddr,
        trust: ServerTrust,
        version: u32,
    ) -> Result<Result<RawClient, ControlMessage>, String> {
        Self::register_announcing(endpoint, identity, server, trust, version, vec![]).await
    }

    /// As [`RawClient::register`], announcing `local_addrs` as its interface addresses (which
    /// the rendezvous hands out as its candidates).
    pub async fn register_announcing(
        endpoint: &quinn::Endpoint,
        identity: &Identity,
        server: SocketAddr,
        trust: ServerTrust,
        version: u32,
        local_addrs: Vec<SocketAddr>,
    ) -> Result<Result<RawClient, ControlMessage>, String> {
        let tls = certs::client_config_for_server(identity, trust, common::ALPN_RENDEZVOUS)
            .map_err(|e| format!("client TLS config: {e}"))?;
        let config = transport::quic_client_config(tls, Default::default())
            .map_err(|e| format!("client QUIC config: {e}"))?;
        let connecting = endpoint
            .connect_with(config, server, peer::register::RENDEZVOUS_SERVER_NAME)
            .map_err(|e| format!("connect: {e}"))?;
        let conn = tokio::time::timeout(REPLY_TIMEOUT, connecting)
            .await
            .map_err(|_| "handshake timed out".to_owned())?
            .map_err(|e| format!("handshake: {e}"))?;
        // The peer's own register handshake, with the version under test.
        let peer::register::RegisterExchange {
            send: tx,
            recv: rx,
            reply,
        } = peer::register::register(&conn, version, local_addrs, REPLY_TIMEOUT)
            .await
            .map_err(|e| format!("register: {e}"))?;
        match reply {
            ControlMessage::Registered { id, .. } if id == identity.id() => Ok(Ok(RawClient {
                id,
                conn,
                control: (tx, rx),
            })),
            ControlMessage::Registered { id, .. } => Err(format!("registered as {id}")),
            other => {
                conn.close(0u32.into(), b"refused");
                Ok(Err(other))
            }
        }
    }

    /// One request on its own stream.
    pub async fn request(&self, msg: &ControlMessage) -> Result<ControlMessage, String> {
        let (mut tx, mut rx) = self
            .conn
            .open_bi()
            .await
            .map_err(|e| format!("opening a stream: {e}"))?;
        exchange(&mut tx, &mut rx, msg).await
    }

    /// Opens a relay stream: the stream, or the server's refusal.
    #[allow(clippy::type_complexity)]
    pub async fn relay(
        &self,
    ) -> Result<Result<(quinn::SendStream, quinn::RecvStream), ControlMessage>, String> {
        let (mut tx, mut rx) = self
            .conn
            .open_bi()
            .await
            .map_err(|e| format!("opening a stream: {e}"))?;
        match exchange(&mut tx, &mut rx, &ControlMessage::RelayOpen {}).await? {
            ControlMessage::RelayReady { .. } => Ok(Ok((tx, rx))),
            other => Ok(Err(other)),
        }
    }

    /// Asks to be introduced to `target`: the introduction's nonce.
    pub async fn connect(&self, target: PeerId) -> Result<u64, String> {
        match self.request(&ControlMessage::connect(target)).await? {
            ControlMessage::Punch { nonce, .. } => Ok(nonce),
            other => Err(format!("connect: {other:?}")),
        }
    }

    /// Accepts the introduction `nonce` from `peer`.
    pub async fn accept(&self, peer: PeerId, nonce: u64) -> Result<(), String> {
        match self
            .request(&ControlMessage::Accept { peer, nonce })
            .await?
        {
            ControlMessage::Ack {} => Ok(()),
            other => Err(format!("accept: {other:?}")),
        }
    }
}

/// Registers fresh identities, `per_second` in all, from a pool of `sources` addresses in
/// 127.13.0.0/16 (round robin), closing each connection after the answer. Counts `registered`,
/// `refused_rate_limited`, `refused_other` and `failed` (handshake or exchange).
pub async fn registration_flood(
    target: Target,
    sources: u16,
    per_second: u32,
    stop: Stop,
    counters: Counters,
) {
    let mut endpoints = Vec::new();
    for n in 1..=sources.max(1) {
        match endpoint_on(block_ip(13, n)) {
            Ok(endpoint) => endpoints.push(endpoint),
            Err(_) => counters.add("endpoint_failed", 1),
        }
    }
    if endpoints.is_empty() {
        return;
    }
    let interval = Duration::from_secs_f64(1.0 / f64::from(per_second.max(1)));
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // At most 8 registrations in flight: a slow server slows the flood, not the other way.
    let mut in_flight = JoinSet::new();
    let mut i = 0usize;
    while !stop.stopped() {
        ticker.tick().await;
        while in_flight.len() >= 8 {
            in_flight.join_next().await;
        }
        let endpoint = endpoints[i % endpoints.len()].clone();
        i += 1;
        let (target, counters) = (target.clone(), counters.clone());
        in_flight.spawn(async move {
            let Ok(identity) = Identity::generate() else {
                counters.add("identity_failed", 1);
                return;
            };
            let trust = ServerTrust::Pinned(target.fingerprint);
            match RawClient::register(&endpoint, &identity, target.udp, trust, PROTOCOL_VERSION)
                .await
            {
                Ok(Ok(client)) => {
                    counters.add("registered", 1);
                    client.conn.close(0u32.into(), b"flood");
                }
                Ok(Err(ControlMessage::Error {
                    code: ErrorCode::RateLimited,
                    ..
                })) => counters.add("refused_rate_limited", 1),
                Ok(Err(_)) => counters.add("refused_other", 1),
                Err(_) => counters.add("failed", 1),
            }
        });
    }
    while in_flight.join_next().await.is_some() {}
    for endpoint in endpoints {
        endpoint.close(0u32.into(), b"done");
    }
}

/// Bytes of each relayed packet in a flood.
pub const PACKET: usize = 1200;

/// Writes `rounds` packets of [`PACKET`] bytes to every one of `targets`, and one empty frame
/// per round; returns how many empty frames were sent.
pub async fn blast(
    out: &mut quinn::SendStream,
    targets: &[PeerId],
    rounds: u64,
) -> Result<u64, String> {
    let packet = [0x5a_u8; PACKET];
    let mut empties = 0u64;
    let mut chunk = Vec::with_capacity(64 * 1024);
    for round in 0..rounds {
        for to in targets {
            relay::encode_into(&mut chunk, to, &packet).map_err(|e| e.to_string())?;
        }
        relay::encode_into(&mut chunk, &targets[round as usize % targets.len()], &[])
            .map_err(|e| e.to_string())?;
        empties += 1;
        if chunk.len() > 60 * 1024 {
            out.write_all(&chunk).await.map_err(|e| e.to_string())?;
            chunk.clear();
        }
    }
    out.write_all(&chunk).await.map_err(|e| e.to_string())?;
    Ok(empties)
}

/// One sender relaying about `bytes_per_second` to `destinations` raw clients that accepted
/// its introductions and never read their relay streams, plus an empty frame per round; every
/// `cycle` all of them close and fresh identities (from fresh sources in 127.14.0.0/16) take
/// their place, so what the server keeps per relay session must be freed. Counts `cycles`,
/// `setup_failed`, `packets`, `bytes`, `empty_frames` and `write_failed`.
pub async fn relay_flood(
    target: Target,
    destinations: usize,
    bytes_per_second: u64,
    cycle: Duration,
    stop: Stop,
    counters: Counters,
) {
    let mut round = 0u16;
    while !stop.stopped() {
        // Sources 127.14.r.1 and up for round r: a source registers fresh identities once per
        // 250 rounds, well within the per-source limits.
        let r = round % 250;
        round = round.wrapping_add(1);
        match relay_cycle(
            &target,
            r,
            destinations,
            bytes_per_second,
            cycle,
            &stop,
            &counters,
        )
        .await
        {
            Ok(()) => counters.add("cycles", 1),
            Err(_) => {
                counters.add("setup_failed", 1);
                stop.sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

async fn relay_cycle(
    target: &Target,
    r: u16,
    destinations: usize,
    bytes_per_second: u64,
    cycle: Duration,
    stop: &Stop,
    counters: &Counters,
) -> Result<(), String> {
    let mut endpoints = Vec::new();
    let mut join = || -> Result<quinn::Endpoint, String> {
        let n = (r << 8) | (endpoints.len() as u16 + 1);
        let endpoint = endpoint_on(block_ip(14, n))?;
        endpoints.push(endpoint.clone());
        Ok(endpoint)
    };
    let trust = ServerTrust::Pinned(target.fingerprint);
    let register = |endpoint: quinn::Endpoint| async move {
        let identity = Identity::generate().map_err(|e| e.to_string())?;
        RawClient::register(&endpoint, &identity, target.udp, trust, PROTOCOL_VERSION)
            .await?
            .map_err(|refusal| format!("register: {refusal:?}"))
    };
    let sender = register(join()?).await?;
    let (mut out, _sender_in) = sender
        .relay()
        .await?
        .map_err(|e| format!("relay_open: {e:?}"))?;
    let mut sinks = Vec::new();
    for _ in 0..destinations.max(1) {
        let dest = register(join()?).await?;
        let relay = dest
            .relay()
            .await?
            .map_err(|e| format!("relay_open: {e:?}"))?;
        let nonce = sender.connect(dest.id).await?;
        dest.accept(sender.id, nonce).await?;
        sinks.push((dest, relay));
    }
    let targets: Vec<PeerId> = sinks.iter().map(|(dest, _)| dest.id).collect();
    // Ten bursts a second of one round (a packet to each destination and an empty frame) or
    // more, to make about `bytes_per_second`.
    let round_bytes = (PACKET * targets.len()) as u64;
    let rounds = (bytes_per_second / 10 / round_bytes).max(1);
    let until = tokio::time::Instant::now() + cycle;
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.stopped() && tokio::time::Instant::now() < until {
        ticker.tick().await;
        match tokio::time::timeout(REPLY_TIMEOUT, blast(&mut out, &targets, rounds)).await {
            Ok(Ok(empties)) => {
                counters.add("packets", rounds * targets.len() as u64);
                counters.add("bytes", rounds * round_bytes);
                counters.add("empty_frames", empties);
            }
            _ => {
                counters.add("write_failed", 1);
                break;
            }
        }
    }
    sender.conn.close(0u32.into(), b"cycle");
    for (dest, _) in &sinks {
        dest.conn.close(0u32.into(), b"cycle");
    }
    for endpoint in endpoints {
        endpoint.close(0u32.into(), b"cycle");
    }
    Ok(())
}

/// A fresh client identity's QUIC crypto config for the rendezvous
/// (trusting its key on first use).
pub fn client_crypto() -> Result<Arc<quinn::crypto::rustls::QuicClientConfig>, String> {
    let identity = certs::Identity::generate().map_err(|e| e.to_string())?;
    let tls = certs::client_config_for_server(
        &identity,
        certs::ServerTrust::FirstUse,
        common::ALPN_RENDEZVOUS,
    )
    .map_err(|e| e.to_string())?;
    quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

/// How a client that never reads ended.
#[derive(Debug)]
pub enum Ended {
    /// The server closed the connection with this application code.
    ClosedByServer(u64),
    /// Some other way (reason).
    Other(String),
}

/// A client that never reads: tiny receive windows, never reads a stream, registers, opens
/// every stream the server lets it open and writes as much as it is allowed on each (one relay
/// stream, the others announcing the largest frame the protocol allows), then sends requests on
/// its control stream without pause. With `ready`, waits there for the other clients of the
/// barrier. Returns how its connection ended.
pub async fn never_reading_client(
    server: SocketAddr,
    bind: SocketAddr,
    ready: Option<Arc<tokio::sync::Barrier>>,
) -> Ended {
    let crypto = match client_crypto() {
        Ok(c) => c,
        Err(e) => return Ended::Other(e),
    };
    let mut transport = quinn::TransportConfig::default();
    transport
        .stream_receive_window(8u32.into())
        .receive_window(8u32.into())
        .datagram_receive_buffer_size(None)
        .keep_alive_interval(Some(Duration::from_secs(1)));
    let mut config = quinn::ClientConfig::new(crypto);
    config.transport_config(Arc::new(transport));
    let endpoint = match quinn::Endpoint::client(bind) {
        Ok(e) => e,
        Err(e) => return Ended::Other(format!("bind {bind}: {e}")),
    };
    let conn = match endpoint.connect_with(config, server, peer::register::RENDEZVOUS_SERVER_NAME) {
        Ok(connecting) => match connecting.await {
            Ok(conn) => conn,
            Err(e) => return Ended::Other(format!("handshake: {e}")),
        },
        Err(e) => return Ended::Other(format!("connect: {e}")),
    };
    let (mut control, control_rx) = match conn.open_bi().await {
        Ok(s) => s,
        Err(e) => return Ended::Other(format!("control stream: {e}")),
    };
    let register = ControlMessage::Register {
        version: PROTOCOL_VERSION,
        local_addrs: (0..16u16)
            .map(|i| SocketAddr::from(([192, 0, 2, i as u8 + 1], 4000 + i)))
            .collect(),
        mapped_port: None,
    };
    if let Err(e) = write_frame(&mut control, &register.encode()).await {
        return Ended::Other(format!("register: {e}"));
    }
    // Streams are held open and never read.
    let mut held = vec![control_rx];
    let mut writers = tokio::task::JoinSet::new();
    for i in 0..64 {
        let opened = tokio::time::timeout(Duration::from_millis(500), conn.open_bi()).await;
        let Ok(Ok((mut tx, rx))) = opened else { break };
        held.push(rx);
        writers.spawn(async move {
            if i == 0 {
                let open = ControlMessage::RelayOpen {}.encode();
                if write_frame(&mut tx, &open).await.is_err() {
                    return;
                }
                let to = PeerId::from_key_digest(&[9; 32]);
                let Ok(frame) = common::relay::encode(&to, &[0u8; 1200]) else {
                    return;
                };
                while tx.write_all(&frame).await.is_ok() {}
            } else {
                let largest = common::frame::MAX_FRAME_LEN as u32;
                if tx.write_all(&largest.to_be_bytes()).await.is_err() {
                    return;
                }
                let filler = vec![b'x'; 64 * 1024];
                while tx.write_all(&filler).await.is_ok() {}
            }
        });
    }
    // Every client has filled its streams before the requests start.
    if let Some(ready) = ready {
        let _ = tokio::time::timeout(Duration::from_secs(30), ready.wait()).await;
    }
    let query = ControlMessage::Query {
        id: PeerId::from_key_digest(&[7; 32]),
    }
    .encode();
    writers.spawn(async move { while write_frame(&mut control, &query).await.is_ok() {} });
    let closed = conn.closed().await;
    writers.shutdown().await;
    drop(held);
    match closed {
        quinn::ConnectionError::ApplicationClosed(close) => {
            Ended::ClosedByServer(close.error_code.into_inner())
        }
        other => Ended::Other(other.to_string()),
    }
}

/// `count` real QUIC Initials to `server`, each from a fresh client connection (quinn-proto's
/// sans-IO client: no socket, no state kept).
pub fn make_initials(server: SocketAddr, count: usize) -> Result<Vec<Vec<u8>>, String> {
    let crypto = client_crypto()?;
    let config = quinn::ClientConfig::new(crypto);
    let mut initials = Vec::with_capacity(count);
    let mut endpoint = None;
    for i in 0..count {
        // A fresh endpoint now and then: it keeps every connection it made.
        if i % 256 == 0 {
            endpoint = Some(quinn_proto::Endpoint::new(
                Arc::new(quinn_proto::EndpointConfig::default()),
                None,
                false,
                None,
            ));
        }
        let Some(endpoint) = endpoint.as_mut() else {
            return Err("no endpoint".into());
        };
        let now = std::time::Instant::now();
        let (_, mut conn) = endpoint
            .connect(
                now,
                config.clone(),
                server,
                peer::register::RENDEZVOUS_SERVER_NAME,
            )
            .map_err(|e| format!("connect: {e}"))?;
        let mut buf = Vec::new();
        let transmit = conn
            .poll_transmit(now, 1, &mut buf)
            .ok_or("a client connection starts with an Initial")?;
        buf.truncate(transmit.size);
        initials.push(buf);
    }
    Ok(initials)
}

/// `clients` QUIC clients at a time that never read ([`never_reading_client`]) to `server`,
/// each from its own source in 127.30.0.0/16 (a fresh one for every client: a fresh identity
/// per source stays within the per-source limits); each is replaced once its connection ends.
/// Counts `clients`, `closed_not_reading` (the server's close code 3), `closed_other_code` and
/// `ended_otherwise`.
pub async fn quic_never_read(server: SocketAddr, clients: u16, stop: Stop, counters: Counters) {
    let mut all = JoinSet::new();
    for w in 0..clients.max(1) {
        let (stop, counters) = (stop.clone(), counters.clone());
        all.spawn(async move {
            let mut round = 0u16;
            while !stop.stopped() {
                let n = (round % 250) * clients.max(1) + w + 1;
                round = round.wrapping_add(1);
                let bind = SocketAddr::from((block_ip(30, n), 0));
                counters.add("clients", 1);
                let client = never_reading_client(server, bind, None);
                tokio::pin!(client);
                // Ends with its connection, or when stopped (the connection is dropped).
                let ended = loop {
                    tokio::select! {
                        ended = &mut client => break Some(ended),
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {
                            if stop.stopped() {
                                break None;
                            }
                        }
                    }
                };
                match ended {
                    Some(Ended::ClosedByServer(3)) => counters.add("closed_not_reading", 1),
                    Some(Ended::ClosedByServer(_)) => counters.add("closed_other_code", 1),
                    Some(Ended::Other(_)) => {
                        counters.add("ended_otherwise", 1);
                        stop.sleep(Duration::from_secs(1)).await;
                    }
                    None => {}
                }
            }
        });
    }
    while all.join_next().await.is_some() {}
}

/// Real QUIC Initials of fresh handshakes that are never continued, `per_second` to `server`
/// from `sources` addresses in 127.31.0.0/16, made in batches of a second's worth (off the
/// runtime's threads). Counts `sent` (Initials), `bytes_sent`, `replies` and `bytes_back` (the
/// amplification is `bytes_back / bytes_sent`).
pub async fn initial_flood(
    server: SocketAddr,
    sources: u16,
    per_second: u32,
    stop: Stop,
    counters: Counters,
) {
    let sockets = udp_sources(31, sources).await;
    if sockets.is_empty() {
        counters.add("no_sockets", 1);
        return;
    }
    let per_tick = (per_second / 10).max(1) as usize;
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut i = 0usize;
    let mut buf = [0u8; 2048];
    while !stop.stopped() {
        let count = per_second.max(1) as usize;
        let batch = tokio::task::spawn_blocking(move || make_initials(server, count)).await;
        let Ok(Ok(batch)) = batch else {
            counters.add("make_failed", 1);
            stop.sleep(Duration::from_secs(1)).await;
            continue;
        };
        for chunk in batch.chunks(per_tick) {
            ticker.tick().await;
            if stop.stopped() {
                break;
            }
            for initial in chunk {
                let socket = &sockets[i % sockets.len()];
                i += 1;
                if socket.try_send_to(initial, server).is_ok() {
                    counters.add("sent", 1);
                    counters.add("bytes_sent", initial.len() as u64);
                }
            }
            for socket in &sockets {
                while let Ok((n, _)) = socket.try_recv_from(&mut buf) {
                    counters.add("replies", 1);
                    counters.add("bytes_back", n as u64);
                }
            }
        }
    }
}
