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
use std::sync::Arc;
use std::time::Duration;

use certs::{Fingerprint, Identity, KnownServers, ServerTrust};
use common::frame_io::{read_frame, write_frame};
use common::{ControlMessage, PeerId, PROTOCOL_VERSION};
use tokio::sync::{mpsc, watch};
use transport::TransportSettings;

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
    /// Server address as the user wrote it (the key for the known-servers file).
    pub server_name: String,
    /// Resolved address.
    pub server_addr: SocketAddr,
    /// A pinned fingerprint (`--server-key`), else trust on first use.
    pub pinned: Option<Fingerprint>,
    /// Known-servers file for trust on first use.
    pub known_servers: PathBuf,
    /// Our interface addresses to announce.
    pub local_addrs: Vec<SocketAddr>,
    /// The external port our router maps to our UDP port, announced in each `register`
    /// ([`crate::portmap`]; later changes are sent as `mapped_port`).
    pub mapped_port: watch::Receiver<Option<crate::portmap::mapper::Mapping>>,
    /// QUIC timers.
    pub transport: TransportSettings,
    /// The rendezvous's TLS tunnel, used when UDP to it fails.
    pub tcp_server: Option<SocketAddr>,
    /// Our socket (the tunnel is installed as a route in it).
    pub socket: Arc<transport::DemuxSocket>,
}

/// Handle to the running session.
#[derive(Clone)]
pub struct Session {
    state: watch::Receiver<SessionState>,
    first_use: watch::Receiver<Option<FirstUseTrust>>,
    udp_works: Arc<tokio::sync::Notify>,
    server_addr: SocketAddr,
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
        let server_addr = config.server_addr;
        let task = tokio::spawn(run(
            endpoint,
            identity,
            config,
            state_tx,
            events_tx,
            first_use_tx,
            udp_works.clone(),
            shutdown,
        ));
        (
            Session {
                state,
                first_use,
                udp_works,
                server_addr,
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

    /// The rendezvous's address.
    pub fn server_addr(&self) -> SocketAddr {
        self.server_addr
    }

    /// The current state.
    pub fn state(&self) -> SessionState {
        self.state.borrow().clone()
    }

    /// A watch on the state, to follow re-registrations.
    pub fn watch(&self) -> watch::Receiver<SessionState> {
        self.state.clone()
    }

    /// A watch that becomes `Some` (once, for the life of the session) when the rendezvous's key
    /// is trusted on first use; the value stays, so a late reader still sees it.
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

#[allow(clippy::too_many_arguments)]
async fn run(
    endpoint: quinn::Endpoint,
    identity: Arc<Identity>,
    config: SessionConfig,
    state_tx: watch::Sender<SessionState>,
    events_tx: mpsc::Sender<ServerEvent>,
    first_use: watch::Sender<Option<FirstUseTrust>>,
    udp_works: Arc<tokio::sync::Notify>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = BACKOFF_MIN;
    let mut generation = 0u64;
    // Pinned by flag, else by the known-servers file, else trusted on first use and then pinned
    // for the life of the process.
    let mut trust = match config.pinned {
        Some(fp) => ServerTrust::Pinned(fp),
        None => match KnownServers::load(&config.known_servers) {
            Ok(known) => known
                .get(&config.server_name)
                .map_or(ServerTrust::FirstUse, ServerTrust::Pinned),
            Err(e) => {
                state_tx.send_replace(SessionState::Fatal(e.to_string()));
                return;
            }
        },
    };
    let mut tunnel = Tunnel::default();
    // Every way out of the loop below ends here, where the tunnel's task is stopped and
    // awaited: the endpoint's close awaits this task, and so the tunnel's.
    let registering = async {
        loop {
            let attempt = tokio::select! {
                r = attempt(&endpoint, &identity, &config, &mut trust, &first_use, &mut tunnel) => r,
                _ = shutdown.changed() => return,
            };
            match attempt {
                Ok((conn, control_tx, mut control_rx, id, observed, mapped_port)) => {
                    generation += 1;
                    backoff = BACKOFF_MIN;
                    state_tx.send_replace(SessionState::Registered(Registration {
                        conn: conn.clone(),
                        id,
                        observed,
                        generation,
                        over_tcp: tunnel.is_open(),
                        mapped_port,
                    }));
                    tracing::info!(%observed, generation, over_tcp = tunnel.is_open(), "registered with the rendezvous");
                    let reason = tokio::select! {
                        r = pump_events(&mut control_rx, &events_tx) => r,
                        e = conn.closed() => e.to_string(),
                        _ = udp_works.notified(), if tunnel.is_open() => {
                            tunnel.preferred = false;
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
                    tracing::warn!(%reason, "lost the rendezvous connection; re-registering");
                    conn.close(0u32.into(), b"re-registering");
                    state_tx.send_replace(SessionState::Connecting {
                        last_error: Some(reason),
                    });
                }
                Err(AttemptError::Fatal(e)) => {
                    tracing::error!(error = %e, "giving up on the rendezvous");
                    state_tx.send_replace(SessionState::Fatal(e));
                    return;
                }
                Err(AttemptError::Retry(e) | AttemptError::Refused(e)) => {
                    tracing::debug!(error = %e, "registration attempt failed");
                    state_tx.send_replace(SessionState::Connecting {
                        last_error: Some(e),
                    });
                }
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

/// The TLS-over-TCP tunnel to the rendezvous, when UDP does not get through.
#[derive(Default)]
struct Tunnel {
    task: Option<tokio::task::JoinHandle<transport::tunnel::TunnelEnd>>,
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
            config.socket.remove_routes(config.server_addr);
        }
    }

    /// Like [`Tunnel::close`], and waits until the tunnel's task has ended.
    async fn stop(&mut self, config: &SessionConfig) {
        if let Some(task) = self.task.take() {
            task.abort();
            config.socket.remove_routes(config.server_addr);
            let _ = task.await;
        }
    }

    async fn open(
        &mut self,
        identity: &Identity,
        config: &SessionConfig,
        trust: ServerTrust,
        tcp_server: SocketAddr,
    ) -> Result<(), AttemptError> {
        self.close(config);
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
        let tls = certs::client_config_for_server(identity, trust, common::ALPN_TUNNEL)
            .map_err(|e| AttemptError::Fatal(e.to_string()))?;
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
            config.server_addr,
            transport::PathTarget::Virtual(transport::VirtualSink::new([0; 16], tx)),
        );
        let injector = config.socket.injector();
        let server_addr = config.server_addr;
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
async fn attempt(
    endpoint: &quinn::Endpoint,
    identity: &Identity,
    config: &SessionConfig,
    trust: &mut ServerTrust,
    first_use: &watch::Sender<Option<FirstUseTrust>>,
    tunnel: &mut Tunnel,
) -> Result<Registered, AttemptError> {
    let mut udp_error = None;
    if !tunnel.preferred {
        tunnel.close(config);
        let timeout = if config.tcp_server.is_some() {
            Duration::from_secs(3)
        } else {
            Duration::from_secs(5)
        };
        match register(endpoint, identity, config, trust, first_use, timeout).await {
            Err(AttemptError::Retry(e)) if config.tcp_server.is_some() => udp_error = Some(e),
            other => return other,
        }
    }
    let Some(tcp_server) = config.tcp_server else {
        return Err(AttemptError::Retry(udp_error.unwrap_or_default()));
    };
    let result = async {
        tunnel.open(identity, config, *trust, tcp_server).await?;
        register(
            endpoint,
            identity,
            config,
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
);

async fn register(
    endpoint: &quinn::Endpoint,
    identity: &Identity,
    config: &SessionConfig,
    trust: &mut ServerTrust,
    first_use: &watch::Sender<Option<FirstUseTrust>>,
    timeout: Duration,
) -> Result<Registered, AttemptError> {
    let retry = |e: &dyn std::fmt::Display| AttemptError::Retry(e.to_string());
    let tls = certs::client_config_for_server(identity, *trust, common::ALPN_RENDEZVOUS)
        .map_err(|e| AttemptError::Fatal(e.to_string()))?;
    let client = transport::quic_client_config(tls, config.transport)
        .map_err(|e| AttemptError::Fatal(e.to_string()))?;
    let connecting = endpoint
        .connect_with(client, config.server_addr, SERVER_NAME)
        .map_err(|e| retry(&e))?;
    let conn = match tokio::time::timeout(timeout, connecting).await {
        Err(_) => {
            return Err(AttemptError::Retry(format!(
                "no answer from {} within {} s",
                config.server_addr,
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
    if *trust == ServerTrust::FirstUse {
        let fp = server_fingerprint(&conn).map_err(AttemptError::Fatal)?;
        let mut known = KnownServers::load(&config.known_servers)
            .map_err(|e| AttemptError::Fatal(e.to_string()))?;
        known
            .remember(&config.server_name, fp)
            .map_err(|e| AttemptError::Fatal(e.to_string()))?;
        let trusted = FirstUseTrust {
            server_name: config.server_name.clone(),
            fingerprint: fp,
            saved_in: config.known_servers.clone(),
        };
        tracing::info!(server = %trusted.server_name, fingerprint = %fp, "rendezvous key trusted on first use");
        first_use.send_replace(Some(trusted));
        *trust = ServerTrust::Pinned(fp);
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
            Ok((conn, tx, rx, id, observed, mapped_port))
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
            }) => {
                let event = ServerEvent::Punch {
                    peer,
                    candidates,
                    nonce,
                    key,
                    nat,
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
