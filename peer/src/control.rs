//! The local control socket: `peer status` and `peer ping` talk to the peer already running with
//! the same config dir (`listen`, `connect`, `send`) through `<config dir>/control.sock`, a Unix
//! socket in a directory only its owner can enter (0700). A second process with the same identity
//! must not register itself: the rendezvous would then send the running peer's introductions to
//! it.
//!
//! One request per connection, as length-prefixed JSON frames (the same codec as everywhere):
//! `status` is answered with one `status` frame; `ping` with a `ping_reply` frame per pong and a
//! final `ping_done`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::frame_io::{read_frame, write_frame};
use common::PeerId;
use punch::path::Current;
use serde::{Deserialize, Serialize};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch, Semaphore};

use crate::netcheck::Report;
use crate::paths::PathKeeper;
use crate::ping::{PingOptions, PingReply, PingSummary};
use crate::session::SessionState;

/// Clients served at once.
const MAX_CLIENTS: usize = 16;
/// Connections listed in a status report.
const MAX_LISTED: usize = 256;
/// A client must send its request within this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The socket's path in a config dir.
pub fn socket_path(config_dir: &Path) -> PathBuf {
    config_dir.join("control.sock")
}

/// What a client asks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// The peer's state.
    Status {},
    /// Ping a peer (connecting first if needed).
    Ping {
        /// Whom.
        peer: PeerId,
        /// How.
        options: PingOptions,
    },
}

/// What the running peer answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    /// Answer to `status`.
    Status(Box<StatusReport>),
    /// One pong.
    PingReply(PingReply),
    /// The ping is over.
    PingDone(Box<PingSummary>),
    /// Connecting (before the first pong): what the dial found.
    PingConnected {
        /// `connected to ... in N ms: path`.
        message: String,
    },
    /// The request failed.
    Error {
        /// Why.
        message: String,
    },
}

/// `peer status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    /// Our id.
    pub id: PeerId,
    /// The command the peer runs (`listen`, `connect`, `send`).
    pub mode: String,
    /// Its process id.
    pub pid: u32,
    /// Seconds since it started.
    pub uptime_s: f64,
    /// The rendezvous, as given.
    pub server: String,
    /// The registration.
    pub registration: RegistrationStatus,
    /// Our UDP socket.
    pub local_addr: Option<SocketAddr>,
    /// Its kernel receive buffer, in bytes as the kernel grants them (`None`: unknown): below
    /// [`transport::PEER_SOCKET_BUFFER`] when `net.core.rmem_max` capped it, and fast
    /// transfers to us then lose packets while our runtime is busy.
    #[serde(default)]
    pub receive_buffer: Option<usize>,
    /// The relay stream through the rendezvous is open.
    pub relay_ready: bool,
    /// Our NAT, as measured against the rendezvous at start (`None`: not finished yet).
    pub nat: Option<Report>,
    /// The port mapping our router granted (`None`: none, or port mapping is off).
    #[serde(default)]
    pub port_mapping: Option<PortMappingStatus>,
    /// Open peer connections.
    pub connections: Vec<ConnectionStatus>,
}

/// A port mapping the router granted, as `peer status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PortMappingStatus {
    /// `PCP`, `NAT-PMP` or `UPnP IGD`.
    pub protocol: String,
    /// The router's external address, when it said.
    pub external_ip: Option<std::net::Ipv4Addr>,
    /// The external port that leads to our UDP socket.
    pub external_port: u16,
    /// Granted lifetime, seconds (`None`: a permanent UPnP lease).
    pub lifetime_s: Option<u64>,
    /// Announced to the rendezvous as a candidate (not when the router's external address is
    /// private: another NAT is in front).
    pub announced: bool,
}

/// Where the registration stands.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegistrationStatus {
    /// `registered`, `connecting` or `failed`.
    pub state: String,
    /// Our public address as the rendezvous sees it.
    pub observed: Option<SocketAddr>,
    /// Registered through the TCP 443 tunnel.
    pub over_tcp: bool,
    /// Registrations so far in this process.
    pub generation: u64,
    /// The last error (when not registered).
    pub error: Option<String>,
    /// The server registered with (of several, the one chosen): its name, as given or its
    /// address when a name gave several.
    #[serde(default)]
    pub server: Option<String>,
    /// That server's UDP address.
    #[serde(default)]
    pub server_addr: Option<SocketAddr>,
    /// The round trip to it measured before choosing, in milliseconds (only with several
    /// servers).
    #[serde(default)]
    pub server_rtt_ms: Option<f64>,
    /// How many servers the peer was given.
    #[serde(default)]
    pub servers: usize,
}

/// One peer connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectionStatus {
    /// The other side.
    pub peer: PeerId,
    /// Its path, for people.
    pub path: String,
    /// The peer's address on the direct path (when direct).
    pub direct_addr: Option<SocketAddr>,
    /// QUIC's smoothed round trip, ms.
    pub rtt_ms: f64,
    /// UDP payload bytes sent on this connection (all paths).
    pub tx_bytes: u64,
    /// UDP payload bytes received.
    pub rx_bytes: u64,
    /// Seconds since the connection started.
    pub age_s: f64,
    /// Seconds on the current path.
    pub on_path_s: f64,
    /// Why the last punch found no direct path.
    pub punch_failure: Option<String>,
}

/// What the control server needs from the running peer.
#[derive(Clone)]
pub struct ControlContext {
    /// Paths, links, session, NAT.
    pub keeper: PathKeeper,
    /// The command running.
    pub mode: &'static str,
    /// The rendezvous, as given.
    pub server: String,
    /// Where the config lives (peer cache).
    pub config_dir: PathBuf,
    /// When the process started.
    pub started: Instant,
    /// How long a dial for a ping may take.
    pub dial_timeout: Duration,
    /// The router's port mapping of our UDP port.
    pub port_mapping: tokio::sync::watch::Receiver<Option<crate::portmap::mapper::Mapping>>,
}

impl ControlContext {
    /// A status report now.
    pub fn status(&self) -> StatusReport {
        let keeper = &self.keeper;
        let registration = match keeper.session.state() {
            SessionState::Registered(reg) => RegistrationStatus {
                state: "registered".into(),
                observed: Some(reg.observed),
                over_tcp: reg.over_tcp,
                generation: reg.generation,
                error: None,
                server: Some(reg.server.name.clone()),
                server_addr: Some(reg.server.addr),
                server_rtt_ms: reg.server.rtt.map(|r| r.as_secs_f64() * 1000.0),
                servers: keeper.session.server_addrs().len(),
            },
            SessionState::Connecting { last_error } => RegistrationStatus {
                state: "connecting".into(),
                observed: None,
                over_tcp: false,
                generation: 0,
                error: last_error,
                server: None,
                server_addr: None,
                server_rtt_ms: None,
                servers: keeper.session.server_addrs().len(),
            },
            SessionState::Fatal(e) => RegistrationStatus {
                state: "failed".into(),
                observed: None,
                over_tcp: false,
                generation: 0,
                error: Some(e),
                server: None,
                server_addr: None,
                server_rtt_ms: None,
                servers: keeper.session.server_addrs().len(),
            },
        };
        let connections = keeper
            .links()
            .into_iter()
            .take(MAX_LISTED)
            .map(|link| {
                let stats = link.conn.stats();
                let (path, direct_addr) = match link.status.path {
                    Current::Direct(addr) => (
                        format!("direct to {addr} ({})", link.status.describe),
                        Some(addr),
                    ),
                    // Said when its packets travel as plain UDP datagrams the rendezvous
                    // sends on unopened, rather than inside our QUIC connection to it.
                    Current::Relay if keeper.relay.channel_of(&link.peer).is_some() => {
                        (format!("{} on a relay channel", keeper.relay_label()), None)
                    }
                    Current::Relay => (keeper.relay_label().to_owned(), None),
                };
                ConnectionStatus {
                    peer: link.peer,
                    path,
                    direct_addr,
                    rtt_ms: link.conn.rtt().as_secs_f64() * 1000.0,
                    tx_bytes: stats.udp_tx.bytes,
                    rx_bytes: stats.udp_rx.bytes,
                    age_s: link.status.started.elapsed().as_secs_f64(),
                    on_path_s: link.status.since.elapsed().as_secs_f64(),
                    punch_failure: link.status.punch_failure,
                }
            })
            .collect();
        StatusReport {
            id: keeper.node.identity.id(),
            mode: self.mode.to_owned(),
            pid: std::process::id(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            server: self.server.clone(),
            registration,
            local_addr: keeper.node.local_addr().ok(),
            receive_buffer: keeper.node.socket.socket_buffers().map(|b| b.receive),
            relay_ready: keeper.relay.is_ready(),
            nat: keeper.nat.borrow().clone(),
            port_mapping: self.port_mapping.borrow().map(|m| PortMappingStatus {
                protocol: m.protocol.to_string(),
                external_ip: m.external_ip,
                external_port: m.external_port,
                lifetime_s: m.lifetime.map(|l| l.as_secs()),
                announced: m.usable_from_outside(),
            }),
            connections,
        }
    }
}

/// Why the control socket could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Another peer runs with this config dir and serves the socket.
    #[error("another peer already runs with this config dir (its control socket {0} answers)")]
    InUse(PathBuf),
    /// The socket could not be created.
    #[error("cannot create the control socket {path}: {source}")]
    Io {
        /// Where.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The directory the socket would be in is not private.
    #[error("not serving the control socket: {0}")]
    Dir(#[from] certs::durable::PrivateDirError),
}

/// Binds the control socket; a socket file left by a peer that is gone is replaced.
///
/// The socket is created in a directory only we can enter (created with mode 0700, or refused if
/// it exists with wider permissions or another owner), so nobody else can reach it at any moment:
/// a chmod after `bind` would leave a window in which the socket has the umask's permissions.
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    let io = |source| ControlError::Io {
        path: path.to_owned(),
        source,
    };
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    certs::durable::ensure_private_dir(dir)?;
    match UnixListener::bind(path) {
        Ok(listener) => Ok(listener),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ControlError::InUse(path.to_owned()));
            }
            std::fs::remove_file(path).map_err(io)?;
            UnixListener::bind(path).map_err(io)
        }
        Err(e) => Err(io(e)),
    }
}

/// Serves the control socket until `shutdown`; removes the socket file at the end.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    ctx: ControlContext,
    mut shutdown: watch::Receiver<bool>,
) {
    let limit = Arc::new(Semaphore::new(MAX_CLIENTS));
    let mut clients = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let Ok(permit) = limit.clone().try_acquire_owned() else {
                    // Too many clients: refuse this one without waiting for it.
                    drop(stream);
                    continue;
                };
                let ctx = ctx.clone();
                clients.spawn(async move {
                    handle(stream, ctx).await;
                    drop(permit);
                });
            }
            Some(_) = clients.join_next(), if !clients.is_empty() => {}
            _ = shutdown.changed() => break,
        }
    }
    clients.shutdown().await;
    let _ = std::fs::remove_file(&path);
}

/// Closes a connection this server made when dropped.
struct CloseOnDrop(quinn::Connection);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close(0u32.into(), b"ping done");
    }
}

async fn send(stream: &mut UnixStream, reply: &Reply) -> bool {
    let body = serde_json::to_vec(reply).unwrap_or_else(|_| b"{}".to_vec());
    write_frame(stream, &body).await.is_ok()
}

async fn handle(mut stream: UnixStream, ctx: ControlContext) {
    let request = match tokio::time::timeout(REQUEST_TIMEOUT, read_frame(&mut stream)).await {
        Ok(Ok(Some(body))) => serde_json::from_slice::<Request>(&body).map_err(|e| e.to_string()),
        Ok(Ok(None)) => return,
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no request within 5 s".to_owned()),
    };
    match request {
        Err(message) => {
            send(&mut stream, &Reply::Error { message }).await;
        }
        Ok(Request::Status {}) => {
            send(&mut stream, &Reply::Status(Box::new(ctx.status()))).await;
        }
        Ok(Request::Ping { peer, options }) => {
            let (tx, mut rx) = mpsc::channel(64);
            // The replies go out until the ping has sent its last one (dropping `tx`), or the
            // client went away.
            let forward = async {
                while let Some(reply) = rx.recv().await {
                    if !send(&mut stream, &reply).await {
                        return;
                    }
                }
            };
            // The ping runs in this handler's task: it ends with the handler for any reason
            // (the client went away, or the server shuts down and aborts its clients, awaiting
            // them).
            crate::tasks::alongside(forward, ping_for_client(ctx, peer, options, tx)).await;
        }
    }
}

/// Pings `peer` on its open connection, or dials it first (closing that connection after).
async fn ping_for_client(
    ctx: ControlContext,
    peer: PeerId,
    options: PingOptions,
    out: mpsc::Sender<Reply>,
) {
    let keeper = &ctx.keeper;
    if peer == keeper.node.identity.id() {
        let message = format!("{peer} is this peer's own id");
        let _ = out.send(Reply::Error { message }).await;
        return;
    }
    let started = Instant::now();
    let (conn, connect_ms, _close) = match keeper.link(&peer) {
        Some(link) => (link.conn, None, None),
        None => {
            let (mut cache, _) = crate::cache::PeerCache::load(&ctx.config_dir.join("peers.json"));
            match crate::dial::establish(keeper, &mut cache, peer, ctx.dial_timeout, false).await {
                Ok((conn, via)) => {
                    let ms = started.elapsed().as_secs_f64() * 1000.0;
                    keeper.start_link(peer, conn.clone(), via.describe, via.path);
                    crate::dial::answer_pings(keeper.clone(), conn.clone());
                    let message = format!("connected to {peer} in {ms:.0} ms: {}", via.text);
                    let _ = out.send(Reply::PingConnected { message }).await;
                    // Closed when the ping ends, or is aborted.
                    let close = CloseOnDrop(conn.clone());
                    (conn, Some(ms), Some(close))
                }
                Err(e) => {
                    let message = format!("cannot connect to {peer}: {e:#}");
                    let _ = out.send(Reply::Error { message }).await;
                    return;
                }
            }
        }
    };
    let (replies_tx, mut replies) = mpsc::channel(16);
    // Forwards each reply as it comes, until the ping is done (dropping `replies_tx`).
    let forward = async {
        while let Some(reply) = replies.recv().await {
            if out.send(Reply::PingReply(reply)).await.is_err() {
                return;
            }
        }
    };
    let ping = async {
        let replies_tx = replies_tx;
        crate::ping::run(
            keeper,
            peer,
            &conn,
            options,
            started,
            connect_ms,
            &replies_tx,
        )
        .await
    };
    let (result, ()) = tokio::join!(ping, forward);
    let reply = match result {
        Ok(summary) => Reply::PingDone(Box::new(summary)),
        Err(message) => Reply::Error { message },
    };
    let _ = out.send(reply).await;
}

/// Why a request to the running peer failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No peer runs with this config dir.
    #[error("no peer is running with this config dir (no control socket at {0})")]
    NotRunning(PathBuf),
    /// The exchange failed.
    #[error("talking to the running peer failed: {0}")]
    Failed(String),
}

/// Sends `request` to the running peer and hands each reply to `on_reply` until it returns
/// false or the peer closes the connection.
pub async fn request(
    config_dir: &Path,
    request: &Request,
    mut on_reply: impl FnMut(Reply) -> bool,
) -> Result<(), ClientError> {
    let path = socket_path(config_dir);
    let mut stream = match UnixStream::connect(&path).await {
        Ok(stream) => stream,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(ClientError::NotRunning(path))
        }
        Err(e) => return Err(ClientError::Failed(e.to_string())),
    };
    let body = serde_json::to_vec(request).map_err(|e| ClientError::Failed(e.to_string()))?;
    write_frame(&mut stream, &body)
        .await
        .map_err(|e| ClientError::Failed(e.to_string()))?;
    loop {
        let Some(body) = read_frame(&mut stream)
            .await
            .map_err(|e| ClientError::Failed(e.to_string()))?
        else {
            return Ok(());
        };
        let reply: Reply = serde_json::from_slice(&body)
            .map_err(|e| ClientError::Failed(format!("bad reply: {e}")))?;
        if !on_reply(reply) {
            return Ok(());
        }
    }
}

/// `bytes` in MiB, for people.
fn mib(bytes: usize) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

impl StatusReport {
    /// The report as `peer status` prints it.
    pub fn render(&self) -> String {
        let r = self;
        let mut out = String::new();
        let mut line = |label: &str, value: String| {
            out.push_str(&format!("{:<16}{value}\n", format!("{label}:")));
        };
        line("peer id", r.id.to_string());
        line(
            "running",
            format!("`peer {}`, pid {}, for {:.0} s", r.mode, r.pid, r.uptime_s),
        );
        let reg = &r.registration;
        // Of several servers, which one, where, how far, and out of how many.
        let server = match (&reg.server, reg.server_addr) {
            (Some(name), Some(addr)) if reg.servers > 1 => {
                let rtt = reg
                    .server_rtt_ms
                    .map_or(String::new(), |ms| format!(", round trip {ms:.1} ms"));
                format!("{name} ({addr}{rtt}; one of {} servers)", reg.servers)
            }
            (Some(name), _) => name.clone(),
            _ => r.server.clone(),
        };
        match (reg.state.as_str(), reg.observed) {
            ("registered", Some(observed)) if reg.over_tcp => line(
                "rendezvous",
                format!(
                    "registered with {server} through the TCP 443 tunnel (UDP blocked; tunnel \
                 address {observed})"
                ),
            ),
            ("registered", Some(observed)) => {
                line("rendezvous", format!("registered with {server}"));
                line("observed addr", observed.to_string());
            }
            (state, _) => line(
                "rendezvous",
                format!(
                    "{state} ({})",
                    reg.error.clone().unwrap_or_else(|| "no error yet".into())
                ),
            ),
        }
        if let Some(local) = r.local_addr {
            let buffer = match r.receive_buffer {
                Some(b) if b < transport::PEER_SOCKET_BUFFER => format!(
                    " (receive buffer {}, capped by net.core.rmem_max: fast transfers to this \
                     peer may lose packets)",
                    mib(b)
                ),
                Some(b) => format!(" (receive buffer {})", mib(b)),
                None => String::new(),
            };
            line("local socket", format!("{local}{buffer}"));
        }
        line(
            "relay",
            if r.relay_ready { "ready" } else { "not open" }.to_owned(),
        );
        let nat = match &r.nat {
            Some(n) => {
                let p = n.profile();
                format!(
                    "{} ({} mapping, {} filtering)",
                    p.kind(),
                    n.mapping.words(),
                    n.filtering.words()
                )
            }
            None => "not measured yet".to_owned(),
        };
        line("NAT", nat);
        if let Some(m) = &r.port_mapping {
            let external = match m.external_ip {
                Some(ip) => format!("{ip}:{}", m.external_port),
                None => format!("external port {}", m.external_port),
            };
            let lifetime = m
                .lifetime_s
                .map_or("permanent lease".to_owned(), |s| format!("lifetime {s} s"));
            let note = if m.announced {
                "announced as a candidate"
            } else {
                "not announced: the router's address is private"
            };
            line(
                "port mapping",
                format!("{external} by {} ({lifetime}, {note})", m.protocol),
            );
        }
        if r.connections.is_empty() {
            out.push_str("connections:    none\n");
        } else {
            out.push_str(&format!("connections:    {}\n", r.connections.len()));
            for c in &r.connections {
                out.push_str(&format!(
                    "  {}  {}  rtt {:.1} ms  sent {}  received {}  up {:.0} s\n",
                    c.peer,
                    c.path,
                    c.rtt_ms,
                    human_bytes(c.tx_bytes),
                    human_bytes(c.rx_bytes),
                    c.age_s
                ));
                if let (Some(why), None) = (&c.punch_failure, c.direct_addr) {
                    out.push_str(&format!("      no direct path: {why}\n"));
                }
            }
        }
        out
    }
}

/// A byte count for people: `512 B`, `1.5 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Why `peer status` got no report.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// No peer runs with this config dir.
    #[error("{reason}; start `peer listen` (or connect, send) with --config-dir {}", dir.display())]
    NotRunning {
        /// What the client saw.
        reason: String,
        /// The config dir.
        dir: PathBuf,
    },
    /// The exchange failed.
    #[error(transparent)]
    Client(ClientError),
    /// The running peer answered with an error.
    #[error("the running peer refused: {0}")]
    Refused(String),
    /// It closed without a report.
    #[error("the running peer sent no status")]
    NoReport,
}

/// Asks the peer running with `config_dir` for its status (`peer status`).
pub async fn status(config_dir: &Path) -> Result<StatusReport, StatusError> {
    let mut report = None;
    let mut error = None;
    request(config_dir, &Request::Status {}, |reply| {
        match reply {
            Reply::Status(r) => report = Some(r),
            Reply::Error { message } => error = Some(message),
            _ => {}
        }
        false
    })
    .await
    .map_err(|e| match e {
        ClientError::NotRunning(_) => StatusError::NotRunning {
            reason: e.to_string(),
            dir: config_dir.to_owned(),
        },
        other => StatusError::Client(other),
    })?;
    if let Some(message) = error {
        return Err(StatusError::Refused(message));
    }
    report.map(|r| *r).ok_or(StatusError::NoReport)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn requests_are_strict_json() {
        let ping: Request = serde_json::from_str(
            r#"{"type":"ping","peer":"768c29f3-da78-8bc8-b5cb-ccb05df19e88",
                "options":{"count":3,"interval_ms":100,"until_direct":false,"timeout_ms":5000}}"#,
        )
        .unwrap();
        assert!(matches!(ping, Request::Ping { options, .. } if options.count == 3));
        assert!(serde_json::from_str::<Request>(r#"{"type":"status"}"#).is_ok());
        assert!(serde_json::from_str::<Request>(r#"{"type":"status","x":1}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"type":"reboot"}"#).is_err());
    }

    /// A report of a registered peer whose socket got `receive_buffer` bytes (or none known).
    fn report(receive_buffer: Option<usize>) -> StatusReport {
        serde_json::from_value(serde_json::json!({
            "id": "768c29f3-da78-8bc8-b5cb-ccb05df19e88", "mode": "listen", "pid": 7,
            "uptime_s": 3.0, "server": "203.0.113.10:7000",
            "registration": {"state": "registered", "observed": "203.0.113.21:4000",
                "over_tcp": false, "generation": 1, "error": null},
            "local_addr": "[::]:41152", "receive_buffer": receive_buffer,
            "relay_ready": true, "nat": null, "connections": [],
        }))
        .unwrap()
    }

    #[test]
    fn status_shows_the_sockets_receive_buffer_and_says_when_it_was_capped() {
        let line = |r: StatusReport| {
            r.render()
                .lines()
                .find(|l| l.starts_with("local socket:"))
                .unwrap()
                .to_owned()
        };
        let full = line(report(Some(transport::PEER_SOCKET_BUFFER)));
        assert!(
            full.ends_with("[::]:41152 (receive buffer 8.0 MiB)"),
            "{full}"
        );
        let capped = line(report(Some(2 * 1024 * 1024)));
        assert!(
            capped.contains("receive buffer 2.0 MiB, capped by net.core.rmem_max"),
            "{capped}"
        );
        // A report of an older peer (no such field) still reads, and says nothing of it.
        let mut old = serde_json::to_value(report(None)).unwrap();
        old.as_object_mut().unwrap().remove("receive_buffer");
        let old: StatusReport = serde_json::from_value(old).unwrap();
        assert!(line(old).ends_with("[::]:41152"));
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_and_a_live_one_is_not() {
        let root = std::env::temp_dir().join(format!("p2p-control-{}", std::process::id()));
        let dir = root.join("config");
        let path = socket_path(&dir);
        let first = bind(&path).unwrap();
        // Created with the directory, and the directory with mode 0700.
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert!(matches!(bind(&path), Err(ControlError::InUse(_))));
        drop(first);
        // The file is still there, but nobody listens: taken over.
        let second = bind(&path).unwrap();
        drop(second);
        std::fs::remove_file(&path).unwrap();
        // A directory others can enter: no socket in it.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = bind(&path).unwrap_err();
        assert!(matches!(err, ControlError::Dir(_)), "{err}");
        assert!(err.to_string().contains("chmod 700"), "{err}");
        assert!(!path.exists());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
