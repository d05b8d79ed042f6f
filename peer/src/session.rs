//! The peer's session with the rendezvous: register, keep the registration alive, re-register
//! with backoff whenever the connection drops, and carry requests and pushed events.
//!
//! The state is published in a `watch` channel; readers clone what they need and never hold a
//! borrow across an `.await`.
//!
//! Why it is a module of its own: registration outlives every connection (it is retried with
//! backoff, moves to the TCP tunnel and back) and everything else only needs its current state.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use certs::{Fingerprint, Identity, KnownServers, ServerTrust};
use common::frame_io::{read_frame, write_frame};
use common::{ControlMessage, PeerId, PROTOCOL_VERSION};
use tokio::sync::{mpsc, watch};
use transport::TransportSettings;

use crate::liveness::{self, Liveness, Verdict};

/// Server name sent in the TLS handshake (our verifiers check keys, not names).
use crate::register::RENDEZVOUS_SERVER_NAME as SERVER_NAME;
/// Longest wait for one request's reply.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Backoff between registration attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Pushed events queued for the application.
const EVENT_QUEUE: usize = 64;
/// A live registration.
#[derive(Debug, Clone)]
pub struct Registration {
    /// The QUIC connection to the rendezvous.
    pub conn: quinn::Connection,
    /// Our id as the server derived it from our certificate.
    pub id: PeerId,
    /// Our public address as the server saw it.
    pub observed: SocketAddr,
    /// Times registered so far in this process (1 for the first).
    pub generation: u64,
    /// The connection runs through the TLS-over-TCP tunnel (UDP is blocked).
    pub over_tcp: bool,
    /// The router-mapped external port this registration announced.
    pub mapped_port: Option<u16>,
    /// Where the server answers address-proof requests (a dual-stack server; see
    /// [`crate::observe`]).
    pub server_addrs: Vec<SocketAddr>,
    /// The server we are registered with (one of [`SessionConfig::servers`]).
    pub server: ServerInfo,
}

/// One rendezvous server a peer may register with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInfo {
    /// Its place in [`SessionConfig::servers`].
    pub index: usize,
    /// Its name: the known-servers key (`HOST:PORT` as given, or the address when a name gave
    /// several).
    pub name: String,
    /// Its UDP address.
    pub addr: SocketAddr,
    /// The round trip measured before choosing (`None`: not measured, or no answer).
    pub rtt: Option<Duration>,
    /// How many servers the session may choose from.
    pub of: usize,
}

/// How to reach one rendezvous server.
#[derive(Debug, Clone)]
pub struct ServerSpec {
    /// The known-servers key: `HOST:PORT` as the user wrote it, or, for a name that resolved to
    /// several addresses, the address (each node has its own key).
    pub name: String,
    /// Its UDP address.
    pub addr: SocketAddr,
    /// Its TLS tunnel, used when UDP to it fails.
    pub tcp: Option<SocketAddr>,
}

/// Where the session stands.
#[derive(Debug, Clone)]
pub enum SessionState {
    /// Trying to (re-)register; the last failure, if any.
    Connecting {
        /// Why the last attempt failed.
        last_error: Option<String>,
    },
    /// Registered.
    Registered(Registration),
    /// Stopped for good (the server key is wrong): retrying cannot help.
    Fatal(String),
}

/// Something the server pushed.
#[derive(Debug, Clone)]
pub enum ServerEvent {
    /// Another peer asked to connect to us (or we to it): start probing.
    Punch {
        /// The other side.
        peer: PeerId,
        /// Where it may be reached.
        candidates: Vec<common::message::Candidate>,
        /// Shared nonce (public: it routes probes).
        nonce: u64,
        /// The introduction's secret key (probes and answers are authenticated with it).
        key: common::stun::PunchKey,
        /// The peer's NAT behaviour as it reported it to the rendezvous, if it did.
        nat: Option<common::nat::NatProfile>,
        /// Why the rendezvous cannot relay between us, if it cannot (two unlinked nodes of a
        /// cluster).
        no_relay: Option<String>,
        /// The dialer's first QUIC datagram, carried with the introduction: taken as if it had
        /// come over the relay once we accept.
        first_flight: Option<common::message::FirstFlight>,
    },
}

/// The rendezvous's key was trusted on first use (no `--server-key`, and the known-servers file
/// did not name the server) and saved for next time. The session does not print: the caller
/// decides whether to tell the user (the `peer` program prints [`FirstUseTrust`]'s text on
/// stderr, as ssh does for a new host key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirstUseTrust {
    /// The server as the user wrote it (its key in the known-servers file).
    pub server_name: String,
    /// The key's fingerprint, now pinned for the life of the process and remembered.
    pub fingerprint: Fingerprint,
    /// The known-servers file it was saved in.
    pub saved_in: PathBuf,
}

impl std::fmt::Display for FirstUseTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "trusting rendezvous {} key {} on first use (saved in {})",
            self.server_name,
            self.fingerprint,
            self.saved_in.display()
        )
    }
}

/// How to reach and trust the rendezvous.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// The servers (at least one; the first is used when there is no other): the nodes of
    /// one cluster. With several, the fastest is chosen ([`crate::failover`]) and the session
    /// moves to another when it stops answering.
    pub servers: Vec<ServerSpec>,
    /// Of several servers, choose the fastest (a STUN round trip to each first); off: the first
    /// given that answers.
    pub measure_rtt: bool,
    /// Pinned fingerprints (`--server-key`, repeatable): every server must present one of
    /// them. Empty: each server's key is looked up in (or trusted on first use and saved to)
    /// the known-servers file.
    pub pinned: Vec<Fingerprint>,
    /// Known-servers file for trust on first use.
    pub known_servers: PathBuf,
    /// Our interface addresses to announce.
    pub local_addrs: Vec<SocketAddr>,
    /// The external port our router maps to our UDP port, announced in each `register`
    /// ([`crate::portmap`]; later changes are sent as `mapped_port`).
    pub mapped_port: watch::Receiver<Option<crate::portmap::mapper::Mapping>>,
    /// QUIC timers.
    pub transport: TransportSettings,
    /// Our socket (the tunnel is installed as a route in it).
    pub socket: Arc<transport::DemuxSocket>,
}

/// Handle to the running session.
#[derive(Clone)]
pub struct Session {
    state: watch::Receiver<SessionState>,
    first_use: watch::Receiver<Option<FirstUseTrust>>,
    udp_works: Arc<tokio::sync::Notify>,
    /// The server registered with, or being tried now.
    current: Arc<Mutex<SocketAddr>>,
    servers: Arc<[SocketAddr]>,
    /// Relay writes so far (see [`Session::note_relayed`]).
    relayed: Arc<AtomicU64>,
}

/// Errors of a request to the rendezvous.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// No live registration right now.
    #[error("not registered with the rendezvous: {0}")]
    NotRegistered(String),
    /// No reply in time.
    #[error("the rendezvous did not answer within {0:?}")]
    Timeout(Duration),
    /// The stream failed.
    #[error("request to the rendezvous failed: {0}")]
    Transport(String),
    /// The reply was not a valid message.
    #[error("invalid reply from the rendezvous: {0}")]
    BadReply(String),
}

impl Session {
    /// Starts the session task. Messages pushed by the server arrive on the returned receiver.
    pub fn start(
        endpoint: quinn::Endpoint,
        identity: Arc<Identity>,
        config: SessionConfig,
        shutdown: watch::Receiver<bool>,
    ) -> (
        Session,
        mpsc::Receiver<ServerEvent>,
        tokio::task::JoinHandle<()>,
    ) {
        let (state_tx, state) = watch::channel(SessionState::Connecting { last_error: None });
        let (events_tx, events) = mpsc::channel(EVENT_QUEUE);
        let (first_use_tx, first_use) = watch::channel(None);
        let udp_works = Arc::new(tokio::sync::Notify::new());
        let servers: Arc<[SocketAddr]> = config.servers.iter().map(|s| s.addr).collect();
        let first = servers
            .first()
            .copied()
            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
        let current = Arc::new(Mutex::new(first));
        let relayed = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(run(
            endpoint,
            identity,
            config,
            state_tx,
            events_tx,
            first_use_tx,
            udp_works.clone(),
            current.clone(),
            relayed.clone(),
            shutdown,
        ));
        (
            Session {
                state,
                first_use,
                udp_works,
                current,
                servers,
                relayed,
            },
            events,
            task,
        )
    }

    /// UDP to the rendezvous works (a STUN answer came back): if the session runs through the
    /// TCP tunnel (an earlier UDP attempt was unlucky), it re-registers over UDP.
    pub fn udp_works(&self) {
        if matches!(&*self.state.borrow(), SessionState::Registered(r) if r.over_tcp) {
            self.udp_works.notify_one();
        }
    }

    /// The relay wrote packets to the server: with several servers, a silent server is then
    /// probed sooner ([`crate::liveness`]), since a relayed connection waits on it.
    pub fn note_relayed(&self) {
        self.relayed.fetch_add(1, Ordering::Relaxed);
    }

    /// The address of the rendezvous we are registered with (or trying now).
    pub fn server_addr(&self) -> SocketAddr {
        self.current.lock().map_or(
            self.servers
                .first()
                .copied()
                .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))),
            |c| *c,
        )
    }

    /// The addresses of every server we may register with.
    pub fn server_addrs(&self) -> &[SocketAddr] {
        &self.servers
    }

    /// The current state.
    pub fn state(&self) -> SessionState {
        self.state.borrow().clone()
    }

    /// A watch on the state, to follow re-registrations.
    pub fn watch(&self) -> watch::Receiver<SessionState> {
        self.state.clone()
    }

    /// A watch that becomes `Some` when the rendezvous's key is trusted on first use (with
    /// several servers, each server's in turn: the latest); the value stays, so a late reader
    /// still sees it.
    pub fn first_use_trust(&self) -> watch::Receiver<Option<FirstUseTrust>> {
        self.first_use.clone()
    }

    /// Waits for a registration; fails with the last error after `timeout`, or at once if the
    /// session hit a fatal error.
    pub async fn wait_registered(&self, timeout: Duration) -> Result<Registration, String> {
        let mut state = self.state.clone();
        let wait = async {
            loop {
                let current = state.borrow_and_update().clone();
                match current {
                    SessionState::Registered(reg) => return Ok(reg),
                    SessionState::Fatal(e) => return Err(e),
                    SessionState::Connecting { .. } => {}
                }
                if state.changed().await.is_err() {
                    return Err("session stopped".to_owned());
                }
            }
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(result) => result,
            Err(_) => Err(match self.state() {
                SessionState::Connecting {
                    last_error: Some(e),
                } => format!("no registration within {timeout:?}: {e}"),
                _ => format!("no answer within {timeout:?}"),
            }),
        }
    }

    /// Sends one request on its own stream and waits for the reply.
    pub async fn request(&self, msg: &ControlMessage) -> Result<ControlMessage, RequestError> {
        let conn = match self.state() {
            SessionState::Registered(reg) => reg.conn,
            SessionState::Connecting { last_error } => {
                return Err(RequestError::NotRegistered(
                    last_error.unwrap_or_else(|| "still connecting".into()),
                ))
            }
            SessionState::Fatal(e) => return Err(RequestError::NotRegistered(e)),
        };
        let exchange = async {
            let (mut tx, mut rx) = conn
                .open_bi()
                .await
                .map_err(|e| RequestError::Transport(e.to_string()))?;
            write_frame(&mut tx, &msg.encode())
                .await
                .map_err(|e| RequestError::Transport(e.to_string()))?;
            let _ = tx.finish();
            let body = read_frame(&mut rx)
                .await
                .map_err(|e| RequestError::Transport(e.to_string()))?
                .ok_or_else(|| RequestError::BadReply("stream closed without a reply".into()))?;
            ControlMessage::decode(&body).map_err(|e| RequestError::BadReply(e.to_string()))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| RequestError::Timeout(REQUEST_TIMEOUT))?
    }
}

enum AttemptError {
    /// Retrying will not help.
    Fatal(String),
    /// Try again after a backoff.
    Retry(String),
    /// The server answered and refused for now (rate limited, full, failed to store): try again
    /// after a backoff, over the same path. UDP works, so the TCP tunnel would only reach the
    /// same refusal.
    Refused(String),
}

/// How one server's key is trusted.
#[derive(Debug, Clone)]
enum Trust {
    /// One of these keys (`--server-key`).
    Pinned(Vec<Fingerprint>),
    /// This key, from the known-servers file or trusted on first use in this process.
    Known(Fingerprint),
    /// Any key, remembered after the handshake.
    FirstUse,
}

impl Trust {
    fn tls(&self, identity: &Identity, alpn: &[u8]) -> Result<rustls::ClientConfig, AttemptError> {
        let config = match self {
            Trust::Pinned(keys) if keys.len() == 1 => {
                certs::client_config_for_server(identity, ServerTrust::Pinned(keys[0]), alpn)
            }
            Trust::Pinned(keys) => certs::client_config_for_any_server(identity, keys, alpn),
            Trust::Known(key) => {
                certs::client_config_for_server(identity, ServerTrust::Pinned(*key), alpn)
            }
            Trust::FirstUse => {
                certs::client_config_for_server(identity, ServerTrust::FirstUse, alpn)
            }
        };
        config.map_err(|e| AttemptError::Fatal(e.to_string()))
    }
}

#[allow(clippy::too_many_arguments)]
async fn run(
    endpoint: quinn::Endpoint,
    identity: Arc<Identity>,
    config: SessionConfig,
    state_tx: watch::Sender<SessionState>,
    events_tx: mpsc::Sender<ServerEvent>,
    first_use: watch::Sender<Option<FirstUseTrust>>,
    udp_works: Arc<tokio::sync::Notify>,
    current: Arc<Mutex<SocketAddr>>,
    relayed: Arc<AtomicU64>,
    mut shutdown: watch::Receiver<bool>,
) {
    if config.servers.is_empty() {
        state_tx.send_replace(SessionState::Fatal("no rendezvous server given".to_owned()));
        return;
    }
    let several = config.servers.len() > 1;
    let channel_stats = config.socket.stats();
    let mut backoff = BACKOFF_MIN;
    let mut generation = 0u64;
    // Pinned by flag, else by the known-servers file, else trusted on first use and then pinned
    // for the life of the process.
    let mut trusts: Vec<Trust> = if config.pinned.is_empty() {
        let known = match KnownServers::load(&config.known_servers) {
            Ok(known) => known,
            Err(e) => {
                state_tx.send_replace(SessionState::Fatal(e.to_string()));
                return;
            }
        };
        config
            .servers
            .iter()
            .map(|s| known.get(&s.name).map_or(Trust::FirstUse, Trust::Known))
            .collect()
    } else {
        vec![Trust::Pinned(config.pinned.clone()); config.servers.len()]
    };
    // A server that gave a fatal error (a wrong key, another protocol version) is not tried
    // again; the session stops only when every server has.
    let mut fatal: Vec<Option<String>> = vec![None; config.servers.len()];
    let mut selection = crate::failover::Selection::new(config.servers.len());
    if several && config.measure_rtt {
        let addrs: Vec<SocketAddr> = config.servers.iter().map(|s| s.addr).collect();
        let rtts = tokio::select! {
            r = crate::failover::measure_rtts(&addrs, crate::failover::RTT_PROBE_TIMEOUT) => r,
            _ = shutdown.changed() => return,
        };
        for (i, rtt) in rtts.into_iter().enumerate() {
            tracing::info!(server = %config.servers[i].name, rtt_ms = rtt.map(|r| r.as_secs_f64() * 1e3), "rendezvous round trip");
            selection.rtt_measured(i, rtt);
        }
    }
    let mut tunnel = Tunnel::default();
    // Every way out of the loop below ends here, where the tunnel's task is stopped and
    // awaited: the endpoint's close awaits this task, and so the tunnel's.
    let registering = async {
        loop {
            let index = selection.next(Instant::now());
            let server = &config.servers[index];
            if tunnel.server != Some(server.addr) {
                // The tunnel (and the preference for it) belongs to one server.
                tunnel.close(&config);
                tunnel.preferred = false;
            }
            if let Ok(mut current) = current.lock() {
                *current = server.addr;
            }
            let attempt = tokio::select! {
                r = attempt(&endpoint, &identity, &config, server, &mut trusts[index], &first_use, &mut tunnel, several) => r,
                _ = shutdown.changed() => return,
            };
            let mut at_once = false;
            match attempt {
                Ok((conn, control_tx, mut control_rx, id, observed, mapped_port, server_addrs)) => {
                    generation += 1;
                    backoff = BACKOFF_MIN;
                    selection.registered(index);
                    let info = ServerInfo {
                        index,
                        name: server.name.clone(),
                        addr: server.addr,
                        rtt: selection.rtt(index),
                        of: config.servers.len(),
                    };
                    state_tx.send_replace(SessionState::Registered(Registration {
                        conn: conn.clone(),
                        id,
                        observed,
                        generation,
                        over_tcp: tunnel.is_open(),
                        mapped_port,
                        server_addrs,
                        server: info,
                    }));
                    tracing::info!(server = %server.name, %observed, generation, over_tcp = tunnel.is_open(), "registered with the rendezvous");
                    let mut end = LinkEnd::Lost;
                    let reason = tokio::select! {
                        r = pump_events(&mut control_rx, &events_tx) => r,
                        e = conn.closed() => e.to_string(),
                        r = check_liveness(&conn, &relayed, &channel_stats), if several => {
                            end = LinkEnd::Silent;
                            r
                        }
                        _ = udp_works.notified(), if tunnel.is_open() => {
                            tunnel.preferred = false;
                            end = LinkEnd::LeavingTunnel;
                            "UDP to the rendezvous works again; leaving the TCP tunnel".to_owned()
                        }
                        _ = shutdown.changed() => {
                            conn.close(0u32.into(), b"peer shutting down");
                            // Let the close frame leave before the tunnel goes.
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            return;
                        }
                    };
                    drop(control_tx);
                    tracing::warn!(server = %server.name, %reason, "lost the rendezvous connection; re-registering");
                    conn.close(0u32.into(), b"re-registering");
                    match end {
                        LinkEnd::Lost => selection.lost(index, Instant::now()),
                        LinkEnd::Silent => {
                            selection.unresponsive(index, Instant::now());
                            // Straight to the next server, without a backoff.
                            at_once = true;
                        }
                        LinkEnd::LeavingTunnel => {}
                    }
                    state_tx.send_replace(SessionState::Connecting {
                        last_error: Some(format!("{}: {reason}", server.name)),
                    });
                }
                Err(AttemptError::Fatal(e)) => {
                    if !several {
                        tracing::error!(error = %e, "giving up on the rendezvous");
                        state_tx.send_replace(SessionState::Fatal(e));
                        return;
                    }
                    tracing::error!(server = %server.name, error = %e, "giving up on this rendezvous server");
                    fatal[index] = Some(format!("{}: {e}", server.name));
                    if fatal.iter().all(Option::is_some) {
                        let all: Vec<String> = fatal.iter().flatten().cloned().collect();
                        state_tx.send_replace(SessionState::Fatal(all.join("; ")));
                        return;
                    }
                    // Never tried again.
                    selection.exclude(index);
                    at_once = true;
                    state_tx.send_replace(SessionState::Connecting {
                        last_error: Some(format!("{}: {e}", server.name)),
                    });
                }
                Err(AttemptError::Retry(e) | AttemptError::Refused(e)) => {
                    tracing::debug!(server = %server.name, error = %e, "registration attempt failed");
                    at_once = selection.failed(index, Instant::now());
                    state_tx.send_replace(SessionState::Connecting {
                        last_error: Some(format!("{}: {e}", server.name)),
                    });
                }
            }
            if at_once {
                // Another server is ready: no backoff before trying it.
                continue;
            }
            // Jitter spreads out the reconnect storm after a server restart.
            let jitter =
                Duration::from_millis(rand::random::<u64>() % (backoff.as_millis() as u64 / 2 + 1));
            tokio::select! {
                _ = tokio::time::sleep(backoff + jitter) => {}
                _ = shutdown.changed() => return,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    };
    registering.await;
    tunnel.stop(&config).await;
}

/// How a registration's connection ended.
enum LinkEnd {
    /// Closed or reset (the server may be restarting): one more attempt with it.
    Lost,
    /// It went silent and did not answer our probes ([`crate::liveness`]): the next server at
    /// once.
    Silent,
    /// We leave the TCP tunnel for UDP, same server.
    LeavingTunnel,
}

/// Returns once the server has gone silent and left our probes unanswered
/// ([`crate::liveness`]); with why. `relayed` counts the relay's writes.
async fn check_liveness(
    conn: &quinn::Connection,
    relayed: &AtomicU64,
    channels: &transport::DemuxStats,
) -> String {
    // Relay channel datagrams come from the server too (not on this connection): they count
    // as the server's signs of life, and those we send on them as relay writes.
    let datagrams =
        || conn.stats().udp_rx.datagrams + channels.channel_received.load(Ordering::Relaxed);
    let relayed =
        || relayed.load(Ordering::Relaxed) + channels.channel_sent.load(Ordering::Relaxed);
    let mut liveness = Liveness::new(Instant::now(), datagrams(), relayed());
    let mut tick = tokio::time::interval(liveness::POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    // Every probe the verdicts ask for goes out, each a request of its own, while earlier ones
    // are still under way (QUIC retransmits each): several independent tries within the grace
    // are what keeps loss from passing for a dead node (see `crate::liveness`). At most
    // MAX_PROBES_IN_FLIGHT at once; aborted when this future is dropped.
    let mut probes = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            Some(_) = probes.join_next(), if !probes.is_empty() => continue,
        }
        let verdict = liveness.poll(Instant::now(), datagrams(), relayed());
        match verdict {
            Verdict::Wait => {}
            Verdict::Probe => {
                // Without a free slot it is asked for again at the next look.
                if probes.len() < liveness::MAX_PROBES_IN_FLIGHT {
                    seq += 1;
                    probes.spawn(send_probe(conn.clone(), seq));
                    liveness.probe_sent(Instant::now());
                }
            }
            Verdict::Gone { silent_for, probes } => {
                // Our own process may have stalled (a loaded machine): let quinn's driver take
                // what arrived meanwhile, and look once more before leaving the server.
                tokio::task::yield_now().await;
                if liveness.poll(Instant::now(), datagrams(), relayed()) == Verdict::Wait {
                    continue;
                }
                return format!(
                    "the rendezvous went silent ({:.1} s without a packet from it, {probes} \
                     probe(s) unanswered)",
                    silent_for.as_secs_f64()
                );
            }
        }
    }
}

/// One liveness probe: a `ping` request, its reply read (what arrives is counted by QUIC's
/// statistics, which is all [`Liveness`] looks at); gives up after [`liveness::GRACE`].
async fn send_probe(conn: quinn::Connection, seq: u64) {
    let ping = async {
        let (mut tx, mut rx) = conn.open_bi().await.ok()?;
        write_frame(&mut tx, &ControlMessage::Ping { seq }.encode())
            .await
            .ok()?;
        let _ = tx.finish();
        read_frame(&mut rx).await.ok()?
    };
    let _ = tokio::time::timeout(liveness::GRACE, ping).await;
}

/// The TLS-over-TCP tunnel to the rendezvous, when UDP does not get through.
#[derive(Default)]
struct Tunnel {
    task: Option<tokio::task::JoinHandle<transport::tunnel::TunnelEnd>>,
    /// The server whose address the tunnel is routed for.
    server: Option<SocketAddr>,
    // Registering over TCP worked: try it first next time.
    preferred: bool,
}

impl Tunnel {
    fn is_open(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }

    fn close(&mut self, config: &SessionConfig) {
        if let Some(task) = self.task.take() {
            task.abort();
            if let Some(server) = self.server {
                config.socket.remove_routes(server);
            }
        }
    }

    /// Like [`Tunnel::close`], and waits until the tunnel's task has ended.
    async fn stop(&mut self, config: &SessionConfig) {
        if let Some(task) = self.task.take() {
            task.abort();
            if let Some(server) = self.server {
                config.socket.remove_routes(server);
            }
            let _ = task.await;
        }
    }

    async fn open(
        &mut self,
        identity: &Identity,
        config: &SessionConfig,
        server: &ServerSpec,
        trust: &Trust,
        tcp_server: SocketAddr,
    ) -> Result<(), AttemptError> {
        self.close(config);
        self.server = Some(server.addr);
        let retry = |what: &str, e: &dyn std::fmt::Display| {
            AttemptError::Retry(format!("TCP tunnel to {tcp_server}: {what}: {e}"))
        };
        let tcp = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect(tcp_server),
        )
        .await
        .map_err(|_| retry("connect", &"timed out"))?
        .map_err(|e| retry("connect", &e))?;
        let _ = tcp.set_nodelay(true);
        let tls = trust.tls(identity, common::ALPN_TUNNEL)?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
        let name = rustls::pki_types::ServerName::try_from(SERVER_NAME)
            .map_err(|e| AttemptError::Fatal(e.to_string()))?;
        let stream = match tokio::time::timeout(
            Duration::from_secs(5),
            connector.connect(name, tcp),
        )
        .await
        {
            Err(_) => return Err(retry("TLS", &"timed out")),
            Ok(Err(e)) => {
                let text = e.to_string();
                if text.contains("key mismatch") {
                    return Err(AttemptError::Fatal(describe_mismatch(&text)));
                }
                return Err(retry("TLS", &e));
            }
            Ok(Ok(stream)) => stream,
        };
        let (tx, rx) = mpsc::channel(1024);
        config.socket.set_route(
            server.addr,
            transport::PathTarget::Virtual(transport::VirtualSink::new([0; 16], tx)),
        );
        let injector = config.socket.injector();
        let server_addr = server.addr;
        self.task = Some(tokio::spawn(transport::tunnel::run_tunnel(
            stream,
            injector,
            server_addr,
            rx,
        )));
        Ok(())
    }
}

/// One registration attempt: over UDP, and through the TCP tunnel if UDP fails (or if the
/// tunnel worked last time).
#[allow(clippy::too_many_arguments)]
async fn attempt(
    endpoint: &quinn::Endpoint,
    identity: &Identity,
    config: &SessionConfig,
    server: &ServerSpec,
    trust: &mut Trust,
    first_use: &watch::Sender<Option<FirstUseTrust>>,
    tunnel: &mut Tunnel,
    several: bool,
) -> Result<Registered, AttemptError> {
    let mut udp_error = None;
    if !tunnel.preferred {
        tunnel.close(config);
        // With other servers to go to, a silent one is left sooner. With only the TCP tunnel
        // to fall back on, a slow answer (a loaded server or machine, a slow first round trip)
        // gets the same 5 s as without it: the tunnel works, but punching then starts from a
        // registration the other peers cannot punch to until UDP is found to work again.
        let timeout = if several {
            Duration::from_secs(3)
        } else {
            Duration::from_secs(5)
        };
        match register(
            endpoint, identity, config, server, trust, first_use, timeout,
        )
        .await
        {
            Err(AttemptError::Retry(e)) if server.tcp.is_some() => udp_error = Some(e),
            other => return other,
        }
    }
    let Some(tcp_server) = server.tcp else {
        return Err(AttemptError::Retry(udp_error.unwrap_or_default()));
    };
    let result = async {
        tunnel
            .open(identity, config, server, trust, tcp_server)
            .await?;
        register(
            endpoint,
            identity,
            config,
            server,
            trust,
            first_use,
            Duration::from_secs(5),
        )
        .await
    }
    .await;
    match result {
        Ok(registered) => {
            tunnel.preferred = true;
            Ok(registered)
        }
        Err(AttemptError::Retry(e)) => {
            tunnel.close(config);
            tunnel.preferred = false;
            Err(AttemptError::Retry(match udp_error {
                Some(udp) => format!("{udp}; {e}"),
                None => e,
            }))
        }
        Err(fatal) => Err(fatal),
    }
}

type Registered = (
    quinn::Connection,
    quinn::SendStream,
    quinn::RecvStream,
    PeerId,
    SocketAddr,
    Option<u16>,
    Vec<SocketAddr>,
);

async fn register(
    endpoint: &quinn::Endpoint,
    identity: &Identity,
    config: &SessionConfig,
    server: &ServerSpec,
    trust: &mut Trust,
    first_use: &watch::Sender<Option<FirstUseTrust>>,
    timeout: Duration,
) -> Result<Registered, AttemptError> {
    let retry = |e: &dyn std::fmt::Display| AttemptError::Retry(e.to_string());
    let tls = trust.tls(identity, common::ALPN_RENDEZVOUS)?;
    let client = transport::quic_client_config(tls, config.transport)
        .map_err(|e| AttemptError::Fatal(e.to_string()))?;
    let connecting = endpoint
        .connect_with(client, server.addr, SERVER_NAME)
        .map_err(|e| retry(&e))?;
    let conn = match tokio::time::timeout(timeout, connecting).await {
        Err(_) => {
            return Err(AttemptError::Retry(format!(
                "no answer from {} within {} s",
                server.addr,
                timeout.as_secs()
            )))
        }
        Ok(Err(e)) => {
            let text = e.to_string();
            if text.contains("key mismatch") {
                return Err(AttemptError::Fatal(describe_mismatch(&text)));
            }
            return Err(retry(&e));
        }
        Ok(Ok(conn)) => conn,
    };
    if matches!(trust, Trust::FirstUse) {
        let fp = server_fingerprint(&conn).map_err(AttemptError::Fatal)?;
        let mut known = KnownServers::load(&config.known_servers)
            .map_err(|e| AttemptError::Fatal(e.to_string()))?;
        known
            .remember(&server.name, fp)
            .map_err(|e| AttemptError::Fatal(e.to_string()))?;
        let trusted = FirstUseTrust {
            server_name: server.name.clone(),
            fingerprint: fp,
            saved_in: config.known_servers.clone(),
        };
        tracing::info!(server = %trusted.server_name, fingerprint = %fp, "rendezvous key trusted on first use");
        first_use.send_replace(Some(trusted));
        *trust = Trust::Known(fp);
    }
    let mapped_port = crate::portmap::driver::announced_port(*config.mapped_port.borrow());
    let crate::register::RegisterExchange {
        send: tx,
        recv: rx,
        reply,
    } = crate::register::register_with(
        &conn,
        PROTOCOL_VERSION,
        config.local_addrs.clone(),
        mapped_port,
        Duration::from_secs(5),
    )
    .await
    .map_err(|e| retry(&e))?;
    match reply {
        ControlMessage::Registered {
            id,
            observed,
            version,
            server_addrs,
            ..
        } => {
            if version != PROTOCOL_VERSION {
                return Err(AttemptError::Fatal(format!(
                    "the rendezvous speaks protocol version {version} and this peer speaks \
                     version {PROTOCOL_VERSION}: upgrade the rendezvous or use a peer of its \
                     version"
                )));
            }
            if id != identity.id() {
                return Err(AttemptError::Fatal(format!(
                    "the rendezvous registered us as {id}, but our id is {}",
                    identity.id()
                )));
            }
            // At most one per family is used; a longer list is the server's mistake.
            let server_addrs = server_addrs.into_iter().take(4).collect();
            Ok((conn, tx, rx, id, observed, mapped_port, server_addrs))
        }
        ControlMessage::Error { code, message } => {
            let text = format!("registration refused ({code:?}): {message}");
            if code == common::ErrorCode::UnsupportedVersion {
                Err(AttemptError::Fatal(text))
            } else {
                Err(AttemptError::Refused(text))
            }
        }
        other => Err(AttemptError::Retry(format!(
            "unexpected reply `{}` to register",
            other.kind()
        ))),
    }
}

fn describe_mismatch(text: &str) -> String {
    // The rustls error text is wrapped by quinn; keep our own sentence from it.
    match text.find("rendezvous key mismatch") {
        Some(start) => text[start..].trim_end_matches(')').to_owned(),
        None => text.to_owned(),
    }
}

fn server_fingerprint(conn: &quinn::Connection) -> Result<Fingerprint, String> {
    let cert =
        transport::remote_certificate(conn).map_err(|e| format!("server certificate: {e}"))?;
    certs::fingerprint_of_cert(&cert).map_err(|e| e.to_string())
}

/// Reads pushed messages until the control stream ends; returns why it ended.
async fn pump_events(
    control_rx: &mut quinn::RecvStream,
    events_tx: &mpsc::Sender<ServerEvent>,
) -> String {
    loop {
        let body = match read_frame(control_rx).await {
            Ok(Some(body)) => body,
            Ok(None) => return "server closed the control stream".into(),
            Err(e) => return e.to_string(),
        };
        match ControlMessage::decode(&body) {
            Ok(ControlMessage::Punch {
                peer,
                candidates,
                nonce,
                key,
                nat,
                no_relay,
                first_flight,
            }) => {
                let event = ServerEvent::Punch {
                    peer,
                    candidates,
                    nonce,
                    key,
                    nat,
                    no_relay,
                    first_flight,
                };
                if events_tx.try_send(event).is_err() {
                    tracing::warn!("event queue full; dropping a punch request");
                }
            }
            Ok(ControlMessage::Error { code, message }) => {
                tracing::warn!(?code, %message, "rendezvous reported an error");
            }
            Ok(other) => tracing::debug!(kind = other.kind(), "ignoring pushed message"),
            Err(e) => tracing::warn!(error = %e, "malformed message from the rendezvous"),
        }
    }
}
