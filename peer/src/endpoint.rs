//! [`Endpoint`]: a peer as a library. Bind one UDP socket, register with a rendezvous, then
//! [`connect`](Endpoint::connect) to other peers by id and [`accept`](Endpoint::accept) their
//! connections; every connection is a plain [`quinn::Connection`] whose path (direct or
//! relayed) is kept up to date underneath it.
//!
//! Why this exists: the pieces (the socket and QUIC endpoint in [`crate::node`], the rendezvous
//! session in [`crate::session`], the relay, hole punching and the path keepers) only work
//! together when they are started in the right order with the same shutdown signal. This module
//! is that start-up wiring, once, for the `peer` program and for any other program alike.

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::ops::Deref;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use certs::{Fingerprint, Identity};
use common::message::PeerInfo;
use common::{ControlMessage, ErrorCode, PeerId};
use punch::path::Current;
use tokio::sync::{mpsc, watch};
use transport::TransportSettings;

use crate::access::{self, Access};
use crate::cache::PeerCache;
use crate::console::Console;
use crate::control;
use crate::dial;
use crate::netcheck;
use crate::node::{self, Node};
use crate::paths::{LinkStatus, PathKeeper};
use crate::punching;
use crate::relay;
use crate::session::{Registration, ServerEvent, ServerSpec, Session, SessionConfig, SessionState};

/// How long an incoming handshake may take before the connection is dropped silently.
pub const ACCEPT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How the rendezvous's key is trusted.
#[derive(Debug, Clone)]
pub enum RendezvousTrust {
    /// Only this key (the `sha256:...` fingerprint the server prints at start).
    Pinned(Fingerprint),
    /// Any of these keys: the nodes of a cluster, each with its own key ([`Rendezvous::others`]).
    PinnedAnyOf(Vec<Fingerprint>),
    /// The key remembered for the server's name in this known-servers file; a server not in it
    /// is trusted on first use and remembered there (as ssh does).
    KnownServers(PathBuf),
}

/// Where the rendezvous's TLS-over-TCP tunnel is (used when UDP to it does not get through).
#[derive(Debug, Clone, Default)]
pub enum TcpTunnel {
    /// The rendezvous's host, port 443.
    #[default]
    SameHost,
    /// This `HOST:PORT`.
    At(String),
    /// No tunnel: UDP only.
    Off,
}

/// The rendezvous an endpoint registers with.
#[derive(Debug, Clone)]
pub struct Rendezvous {
    /// `HOST:PORT` (also the name its key is remembered under).
    pub address: String,
    /// More nodes of the same cluster, `HOST:PORT` each. With any (or when `address` resolves
    /// to several addresses), the endpoint registers with the fastest node and moves to another
    /// when its node stops answering ([`crate::failover`]).
    pub others: Vec<String>,
    /// Of several servers, register with the first given that answers (the others are standbys
    /// in the order given) rather than the fastest. Default off.
    pub prefer_first: bool,
    /// How its key is trusted.
    pub trust: RendezvousTrust,
    /// Its TCP tunnel.
    pub tcp_tunnel: TcpTunnel,
}

impl Rendezvous {
    /// The rendezvous at `address` (`HOST:PORT`) with the key `fingerprint`.
    pub fn pinned(address: impl Into<String>, fingerprint: Fingerprint) -> Self {
        Rendezvous {
            address: address.into(),
            others: Vec::new(),
            prefer_first: false,
            trust: RendezvousTrust::Pinned(fingerprint),
            tcp_tunnel: TcpTunnel::default(),
        }
    }

    /// The rendezvous at `address`, its key checked against (or remembered in) `known_servers`.
    pub fn known_servers(address: impl Into<String>, known_servers: PathBuf) -> Self {
        Rendezvous {
            address: address.into(),
            others: Vec::new(),
            prefer_first: false,
            trust: RendezvousTrust::KnownServers(known_servers),
            tcp_tunnel: TcpTunnel::default(),
        }
    }
}

/// Where an endpoint reports events (connections, path changes, refusals).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Output {
    /// To [`tracing`]: events at `info`, warnings at `warn`. The default for a library.
    #[default]
    Log,
    /// To stdout (events) and stderr (warnings), as the `peer` program prints them. With
    /// `events_to_stderr`, events go to stderr too (stdout is left to a machine-readable result).
    Terminal {
        /// Events to stderr as well.
        events_to_stderr: bool,
    },
}

/// The local control socket (`peer status`, `peer ping`) an endpoint may serve.
#[derive(Debug, Clone)]
pub struct ControlSocket {
    /// The config dir; the socket is `<dir>/control.sock`.
    pub config_dir: PathBuf,
    /// The command running, as `peer status` shows it.
    pub mode: &'static str,
}

/// Everything an [`Endpoint`] is built from, besides its identity.
#[derive(Debug, Clone)]
pub struct EndpointConfig {
    /// The rendezvous.
    pub rendezvous: Rendezvous,
    /// Local UDP address to bind (one socket carries all traffic). Default `[::]:0`: one
    /// dual-stack socket for IPv4 and IPv6 (IPv4 only on a host without IPv6).
    pub bind: SocketAddr,
    /// Longest wait for a registration in [`Endpoint::registered`]. Default 10 s.
    pub register_timeout: Duration,
    /// Longest wait for a peer to answer in [`Endpoint::connect`]. Default 20 s.
    pub dial_timeout: Duration,
    /// The peer cache file (addresses that worked), or `None` for a cache in memory only.
    pub peer_cache: Option<PathBuf>,
    /// Where events are reported.
    pub output: Output,
    /// Report more (candidates, probes).
    pub verbose: bool,
    /// Who may connect ([`Endpoint::accept`] refuses the others). Default: anyone.
    pub access: Access,
    /// Answer introductions and keep paths (punching, heartbeats, rebinding). Default on; off
    /// only for an endpoint that merely asks the rendezvous something and exits.
    pub keep_paths: bool,
    /// Measure our NAT once registered ([`Endpoint::nat`]). Default on.
    pub measure_nat: bool,
    /// Birthday punching ([`punch::birthday`]) for pairs that need it: a symmetric NAT
    /// against a port-restricted one. Default on.
    pub birthday_punch: bool,
    /// Serve a control socket. Default none.
    pub control: Option<ControlSocket>,
    /// Ask the default gateway to map our UDP port (PCP, NAT-PMP, UPnP IGD) and announce the
    /// mapping as a candidate ([`crate::portmap`]); deleted on [`Endpoint::close`]. Default on;
    /// never done when the socket or the rendezvous is on loopback (everything on one host).
    pub port_mapping: bool,
    /// QUIC timers.
    pub transport: TransportSettings,
    /// IP TTL of the opening probes of punching ([`punch::PunchConfig::opening_ttl`]; `None`:
    /// none). Default [`punch::DEFAULT_OPENING_TTL`].
    pub opening_ttl: Option<u8>,
    /// Never seek a direct path: every connection stays on the relay (diagnostics, and tests
    /// of the relay on one host, where a direct path always works). Default off.
    pub relay_only: bool,
    /// Relayed packets travel on relay channels (plain UDP datagrams the rendezvous forwards
    /// unopened, [`crate::relay`]) where the server grants them; off, they stay on the relay
    /// stream. Default on.
    pub relay_channels: bool,
}

impl EndpointConfig {
    /// The defaults, with `rendezvous`.
    pub fn new(rendezvous: Rendezvous) -> Self {
        EndpointConfig {
            rendezvous,
            bind: SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)),
            register_timeout: Duration::from_secs(10),
            dial_timeout: Duration::from_secs(20),
            peer_cache: None,
            output: Output::Log,
            verbose: false,
            access: Access::Anyone,
            keep_paths: true,
            measure_nat: true,
            birthday_punch: true,
            control: None,
            port_mapping: true,
            transport: TransportSettings::default(),
            opening_ttl: Some(punch::DEFAULT_OPENING_TTL),
            relay_only: false,
            relay_channels: true,
        }
    }
}

/// Longest wait of a dial for a port mapping the gateway is still granting.
const PORT_MAPPING_WAIT: Duration = Duration::from_secs(1);

/// Why an endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The rendezvous name did not resolve.
    #[error("cannot resolve rendezvous address {0:?}")]
    Resolve(String, #[source] std::io::Error),
    /// It resolved, but to no address of the family we bind.
    #[error("rendezvous address {0:?} has no address of the bind family")]
    NoAddress(String),
    /// The tunnel's name did not resolve.
    #[error("cannot resolve --server-tcp {0:?}")]
    ResolveTunnel(String, #[source] std::io::Error),
    /// It resolved to nothing.
    #[error("--server-tcp {0:?} has no address")]
    NoTunnelAddress(String),
    /// More servers than [`crate::failover::MAX_SERVERS`] (names and their addresses).
    #[error("{0} rendezvous addresses given; at most {max} are taken", max = crate::failover::MAX_SERVERS)]
    TooManyServers(usize),
    /// An explicit tunnel address with several servers (it would be one server's).
    #[error("--server-tcp HOST:PORT names one server's tunnel; with several servers use the default (each server's host, port 443) or `off`")]
    TunnelWithSeveralServers,
    /// The socket or the QUIC endpoint could not be set up.
    #[error("cannot bind {addr}")]
    Bind {
        /// What we tried to bind.
        addr: SocketAddr,
        /// Why it failed.
        #[source]
        source: node::BindError,
    },
    /// The socket has no local address.
    #[error("reading the bound address")]
    LocalAddr(#[source] std::io::Error),
}

/// Why no registration was reached.
#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot register with the rendezvous at {server}: {reason}")]
pub struct RegisterError {
    /// The rendezvous, as configured.
    pub server: String,
    /// The last failure (or the fatal one: a wrong key, an incompatible version).
    pub reason: String,
}

/// Why [`Endpoint::connect`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// We are not registered.
    #[error(transparent)]
    Register(#[from] RegisterError),
    /// The id is our own.
    #[error("{0} is this peer's own id")]
    OwnId(PeerId),
    /// The peer could not be reached (not registered, refused, no path, timed out).
    #[error("{reason}")]
    Dial {
        /// The peer.
        peer: PeerId,
        /// What went wrong, for the user.
        reason: String,
    },
}

/// Why an incoming connection was not accepted. Each is also reported on the endpoint's output.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    /// The handshake failed.
    #[error("refused connection from {remote}: {source}")]
    Handshake {
        /// Where it came from.
        remote: SocketAddr,
        /// What quinn said.
        #[source]
        source: quinn::ConnectionError,
    },
    /// The handshake took longer than [`ACCEPT_HANDSHAKE_TIMEOUT`].
    #[error("the handshake from {0} did not complete in time")]
    Timeout(SocketAddr),
    /// The client presented no usable certificate.
    #[error("the connection from {0} proved no identity")]
    NoIdentity(SocketAddr),
    /// It arrived on the stable address of another peer than the one it proved to be.
    #[error("refused a connection from {0}: it came on the address of another peer")]
    AddressOfAnotherPeer(PeerId),
    /// The access policy does not allow this peer.
    #[error("refused {0}: {reason}", reason = access::REFUSED_REASON)]
    NotAllowed(PeerId),
}

/// Why [`Endpoint::query`] failed.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// We are not registered.
    #[error(transparent)]
    Register(#[from] RegisterError),
    /// The request failed.
    #[error(transparent)]
    Request(#[from] crate::session::RequestError),
    /// The rendezvous has never seen the peer.
    #[error("peer {0} is not registered with the rendezvous")]
    NotFound(PeerId),
    /// It refused otherwise.
    #[error("the rendezvous refused ({code:?}): {message}")]
    Refused {
        /// Its error code.
        code: ErrorCode,
        /// Its message.
        message: String,
    },
    /// It answered something else.
    #[error("unexpected reply `{0}` from the rendezvous")]
    Unexpected(&'static str),
}

/// A peer endpoint: one UDP socket, a registration with a rendezvous, and connections to other
/// peers by id. Built by [`Endpoint::bind`]; stop it with [`Endpoint::close`].
pub struct Endpoint {
    node: Node,
    keeper: PathKeeper,
    server_name: String,
    session: Session,
    console: Console,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    console_task: tokio::task::JoinHandle<()>,
    /// Introductions pushed by the rendezvous, while nobody answers them (`keep_paths` off).
    _events: Option<mpsc::Receiver<ServerEvent>>,
    register_timeout: Duration,
    dial_timeout: Duration,
    peer_cache: Option<PathBuf>,
    access: Arc<Access>,
    verbose: bool,
    /// Tells the rendezvous our router's port mapping (`None`: port mapping off).
    announcer: Option<crate::portmap::driver::Announcer>,
    /// A port mapping is probably on its way ([`crate::portmap::mapper::Mapper::settling`]).
    mapping_settling: watch::Receiver<bool>,
}

/// Measures our NAT against the rendezvous's STUN service once registered, for `peer status` and
/// for the pongs we send (so that peers can say why their path to us is relayed).
async fn measure_nat(
    session: Session,
    out: watch::Sender<Option<netcheck::Report>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let measure = async {
        // Registration tells whether UDP works at all (or the tunnel is in use).
        let _ = session.wait_registered(Duration::from_secs(30)).await;
        // The server registered with (of several, the one chosen).
        netcheck::run(&[session.server_addr()], &netcheck::Options::default()).await
    };
    tokio::select! {
        report = measure => match report {
            Ok(report) => {
                tracing::debug!(mapping = ?report.mapping, filtering = ?report.filtering, "NAT measured");
                out.send_replace(Some(report));
            }
            Err(e) => tracing::debug!(error = %e, "NAT measurement failed"),
        },
        _ = shutdown.changed() => {}
    }
}

/// Tells the rendezvous our NAT profile once measured, and again after every new registration
/// (a new registration drops the profile the rendezvous had): it hands it to the other side of
/// our introductions, which decides on birthday punching with it.
async fn report_nat(
    session: Session,
    keeper: PathKeeper,
    mut nat: watch::Receiver<Option<netcheck::Report>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut first = true;
    let mut state = session.watch();
    let mut reported: Option<(u64, common::nat::NatProfile)> = None;
    // The measurement's sender is dropped once it has measured: its last value stays.
    let mut nat_open = true;
    loop {
        let generation = match &*state.borrow_and_update() {
            SessionState::Registered(reg) => Some(reg.generation),
            _ => None,
        };
        let profile = nat.borrow_and_update().as_ref().map(|r| r.profile());
        if let (Some(generation), Some(profile)) = (generation, profile) {
            if reported != Some((generation, profile)) {
                match session.request(&ControlMessage::Nat { nat: profile }).await {
                    Ok(ControlMessage::Ack {}) => {
                        reported = Some((generation, profile));
                        if std::mem::replace(&mut first, false) {
                            keeper.nat_measured(&profile).await;
                        }
                    }
                    Ok(other) => {
                        tracing::debug!(
                            reply = other.kind(),
                            "the rendezvous did not take our NAT profile"
                        );
                        reported = Some((generation, profile));
                    }
                    Err(e) => tracing::debug!(error = %e, "reporting our NAT profile failed"),
                }
            }
        }
        tokio::select! {
            r = state.changed() => if r.is_err() { return },
            r = nat.changed(), if nat_open => nat_open = r.is_ok(),
            _ = shutdown.changed() => return,
        }
    }
}

impl Endpoint {
    /// Binds the socket and starts everything: the rendezvous session (it registers in the
    /// background, see [`Endpoint::registered`]), STUN routing, the relay, and (per `config`)
    /// answering introductions, watching our public address, measuring our NAT and the control
    /// socket. Must be called within a tokio runtime.
    pub async fn bind(
        identity: Arc<Identity>,
        config: EndpointConfig,
    ) -> Result<Endpoint, EndpointError> {
        let process_started = Instant::now();
        let name = config.rendezvous.address.clone();
        // Every name given, each resolved: one server per address of the family we use.
        let mut server_addrs: Vec<(String, SocketAddr)> = Vec::new();
        for server_name in std::iter::once(&name).chain(&config.rendezvous.others) {
            let resolved: Vec<SocketAddr> = tokio::net::lookup_host(server_name)
                .await
                .map_err(|e| EndpointError::Resolve(server_name.clone(), e))?
                .map(transport::canonical)
                .collect();
            let addrs = node::pick_server_addrs(&resolved, config.bind);
            if addrs.is_empty() {
                return Err(EndpointError::NoAddress(server_name.clone()));
            }
            let several = addrs.len() > 1;
            for addr in addrs {
                if server_addrs.iter().any(|(_, a)| *a == addr) {
                    continue;
                }
                // Each address of a name with several is a node of its own, with its own key.
                let key = if several {
                    addr.to_string()
                } else {
                    server_name.clone()
                };
                server_addrs.push((key, addr));
            }
        }
        if server_addrs.len() > crate::failover::MAX_SERVERS {
            return Err(EndpointError::TooManyServers(server_addrs.len()));
        }
        let server_addr = server_addrs[0].1;
        let transport = config.transport;
        let (node, stun_rx) =
            Node::bind(config.bind, identity.clone(), transport).map_err(|e| {
                EndpointError::Bind {
                    addr: config.bind,
                    source: e,
                }
            })?;
        let local = node.local_addr().map_err(EndpointError::LocalAddr)?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (console, console_task) = match config.output {
            Output::Log => Console::to_log(),
            Output::Terminal { events_to_stderr } => Console::start_with(events_to_stderr),
        };
        let explicit_tunnel = match &config.rendezvous.tcp_tunnel {
            TcpTunnel::At(addr) => {
                if server_addrs.len() > 1 {
                    return Err(EndpointError::TunnelWithSeveralServers);
                }
                Some(
                    tokio::net::lookup_host(addr)
                        .await
                        .map_err(|e| EndpointError::ResolveTunnel(addr.clone(), e))?
                        .next()
                        .ok_or_else(|| EndpointError::NoTunnelAddress(addr.clone()))?,
                )
            }
            _ => None,
        };
        let servers: Vec<ServerSpec> = server_addrs
            .iter()
            .map(|(key, addr)| ServerSpec {
                name: key.clone(),
                addr: *addr,
                tcp: match &config.rendezvous.tcp_tunnel {
                    TcpTunnel::Off => None,
                    TcpTunnel::At(_) => explicit_tunnel,
                    TcpTunnel::SameHost => Some(SocketAddr::new(addr.ip(), 443)),
                },
            })
            .collect();
        let (pinned, known_servers) = match &config.rendezvous.trust {
            RendezvousTrust::Pinned(fp) => (vec![*fp], PathBuf::new()),
            RendezvousTrust::PinnedAnyOf(fps) => (fps.clone(), PathBuf::new()),
            RendezvousTrust::KnownServers(path) => (Vec::new(), path.clone()),
        };
        let (mapping_tx, mapping_rx) = watch::channel(None);
        let (settling_tx, settling_rx) = watch::channel(false);
        let session_config = SessionConfig {
            mapped_port: mapping_rx.clone(),
            servers,
            measure_rtt: !config.rendezvous.prefer_first,
            pinned,
            known_servers,
            local_addrs: node::local_addrs(local, server_addr),
            transport,
            socket: node.socket.clone(),
        };
        let (session, events, session_task) = Session::start(
            node.endpoint.clone(),
            identity,
            session_config,
            shutdown_rx.clone(),
        );
        let mut router = punching::Router::default();
        router.birthday = config.birthday_punch;
        let stun_task = tokio::spawn(punching::dispatch(
            node.clone(),
            router.clone(),
            stun_rx,
            shutdown_rx.clone(),
        ));
        let (relay, relay_task) = relay::Relay::start(
            session.clone(),
            node.socket.clone(),
            config.relay_channels,
            shutdown_rx.clone(),
        );
        let (nat_tx, nat_rx) = watch::channel(None);
        let mut tasks = vec![session_task, stun_task, relay_task];
        let map_port = config.port_mapping
            && (local.is_ipv4() || local.ip().is_unspecified())
            && !local.ip().is_loopback()
            && !server_addr.ip().is_loopback();
        if map_port {
            tasks.push(tokio::spawn(crate::portmap::driver::run(
                crate::portmap::mapper::MapperConfig::default(),
                local.port(),
                console.clone(),
                config.verbose,
                mapping_tx,
                settling_tx,
                shutdown_rx.clone(),
            )));
        }
        let announcer = map_port.then(|| {
            let announcer =
                crate::portmap::driver::Announcer::new(session.clone(), mapping_rx.clone());
            tasks.push(tokio::spawn(announcer.clone().run(shutdown_rx.clone())));
            announcer
        });
        if config.measure_nat {
            tasks.push(tokio::spawn(measure_nat(
                session.clone(),
                nat_tx,
                shutdown_rx.clone(),
            )));
        }
        let mut keeper = PathKeeper::new(
            node.clone(),
            router.clone(),
            relay,
            session.clone(),
            console.clone(),
            config.verbose,
            nat_rx,
            crate::tasks::TaskSet::new(shutdown_rx.clone()),
        );
        keeper.opening_ttl = config.opening_ttl;
        keeper.relay_only = config.relay_only;
        tasks.push(tokio::spawn(crate::observe::run(
            node.clone(),
            router,
            session.clone(),
            keeper.clone(),
            console.clone(),
            config.verbose,
            shutdown_rx.clone(),
        )));
        tasks.push(tokio::spawn(report_nat(
            session.clone(),
            keeper.clone(),
            keeper.nat.clone(),
            shutdown_rx.clone(),
        )));
        match &config.control {
            None => {}
            Some(socket) => {
                // The control socket (peer status, peer ping) of this config dir.
                let control_path = control::socket_path(&socket.config_dir);
                match control::bind(&control_path) {
                    Ok(listener) => {
                        let ctx = control::ControlContext {
                            keeper: keeper.clone(),
                            mode: socket.mode,
                            server: name.clone(),
                            config_dir: socket.config_dir.clone(),
                            started: process_started,
                            dial_timeout: Duration::from_secs(20),
                            port_mapping: mapping_rx.clone(),
                        };
                        tasks.push(tokio::spawn(control::serve(
                            listener,
                            control_path,
                            ctx,
                            shutdown_rx,
                        )));
                    }
                    Err(e) => {
                        console
                            .error(format!(
                                "warning: {e}; `peer status` and `peer ping` will not reach \
                                 this process"
                            ))
                            .await
                    }
                }
            }
        }
        let mut endpoint = Endpoint {
            node,
            keeper,
            server_name: name,
            session,
            console,
            shutdown,
            tasks,
            console_task,
            _events: Some(events),
            register_timeout: config.register_timeout,
            dial_timeout: config.dial_timeout,
            peer_cache: config.peer_cache,
            access: Arc::new(config.access),
            verbose: config.verbose,
            announcer,
            mapping_settling: settling_rx,
        };
        if config.keep_paths {
            endpoint.keep_paths();
        }
        Ok(endpoint)
    }

    /// Starts the tasks that keep paths working: answering introductions and watching our
    /// public mapping.
    fn keep_paths(&mut self) {
        let Some(events) = self._events.take() else {
            return;
        };
        self.tasks.push(tokio::spawn(
            self.keeper.clone().serve_introductions(events),
        ));
        self.tasks.push(tokio::spawn(
            self.keeper.clone().watch_mapping(self.shutdown.subscribe()),
        ));
        self.tasks.push(tokio::spawn(
            self.keeper
                .clone()
                .reintroduce_after_reregistration(self.shutdown.subscribe()),
        ));
    }

    /// Our id.
    pub fn id(&self) -> PeerId {
        self.node.identity.id()
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.node.local_addr()
    }

    /// The rendezvous as configured (`HOST:PORT`).
    pub fn rendezvous(&self) -> &str {
        &self.server_name
    }

    /// Waits for a registration (at most the configured `register_timeout`; at once if the
    /// session failed for good, such as with a wrong server key).
    pub async fn registered(&self) -> Result<Registration, RegisterError> {
        self.session
            .wait_registered(self.register_timeout)
            .await
            .map_err(|reason| RegisterError {
                server: self.server_name.clone(),
                reason,
            })
    }

    /// A watch on the registration: re-registrations (with their observed address) and losses.
    pub fn registration(&self) -> watch::Receiver<SessionState> {
        self.session.watch()
    }

    /// Becomes `Some` once the rendezvous's key was trusted on first use (no pinned key, and the
    /// known-servers file did not name the server) and saved there. The endpoint prints nothing:
    /// tell the user if you like (the `peer` program prints the value's text on stderr).
    pub fn first_use_trust(&self) -> watch::Receiver<Option<crate::session::FirstUseTrust>> {
        self.session.first_use_trust()
    }

    /// Our NAT's behaviour, once measured (`None` before, or with `measure_nat` off).
    pub fn nat(&self) -> watch::Receiver<Option<netcheck::Report>> {
        self.keeper.nat.clone()
    }

    /// The rendezvous session (requests of its control protocol).
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// The path keeper: every connection's link, the relay, punching. For status and ping.
    pub fn path_keeper(&self) -> &PathKeeper {
        &self.keeper
    }

    /// Where this endpoint reports events.
    pub fn console(&self) -> &Console {
        &self.console
    }

    /// The QUIC endpoint under it.
    pub fn quinn_endpoint(&self) -> &quinn::Endpoint {
        &self.node.endpoint
    }

    /// What the rendezvous knows about `peer` (waits for our registration first).
    pub async fn query(&self, peer: PeerId) -> Result<PeerInfo, QueryError> {
        self.registered().await?;
        match self
            .session
            .request(&ControlMessage::Query { id: peer })
            .await?
        {
            ControlMessage::PeerInfo(info) => Ok(info),
            ControlMessage::Error {
                code: ErrorCode::NotFound,
                ..
            } => Err(QueryError::NotFound(peer)),
            ControlMessage::Error { code, message } => Err(QueryError::Refused { code, message }),
            other => Err(QueryError::Unexpected(other.kind())),
        }
    }

    /// Connects to `peer` by id: from the peer cache if an address there still answers, else
    /// through an introduction by the rendezvous. The connection starts on the relay at once
    /// when no direct path is known yet, and moves to a direct one as soon as punching proves
    /// it ([`Connection::path`] follows that). The peer's key is pinned: only `peer` can answer.
    pub async fn connect(&self, peer: PeerId) -> Result<Connection, ConnectError> {
        let me = self.registered().await?.id;
        if peer == me {
            return Err(ConnectError::OwnId(peer));
        }
        let started = Instant::now();
        let (mut cache, warning) = match &self.peer_cache {
            Some(path) => PeerCache::load(path),
            None => (PeerCache::in_memory(), None),
        };
        if let Some(w) = warning {
            self.console.error(format!("warning: {w}")).await;
        }
        if let Some(announcer) = &self.announcer {
            // A mapping granted after we registered must be a candidate of this introduction
            // (no request when the rendezvous already knows it). A gateway that has answered
            // but not granted yet gets a moment; one that answers nothing delays nobody.
            let mut settling = self.mapping_settling.clone();
            let _ = tokio::time::timeout(PORT_MAPPING_WAIT, settling.wait_for(|s| !*s)).await;
            announcer.sync().await;
        }
        let (conn, via) = dial::establish(
            &self.keeper,
            &mut cache,
            peer,
            self.dial_timeout,
            self.verbose,
        )
        .await
        .map_err(|e| ConnectError::Dial {
            peer,
            reason: format!("{e:#}"),
        })?;
        let connect_time = started.elapsed();
        self.console
            .say(format!(
                "connected to {peer} in {:.0} ms: {}",
                connect_time.as_secs_f64() * 1000.0,
                via.text
            ))
            .await;
        self.keeper
            .start_link(peer, conn.clone(), via.describe, via.path);
        Ok(Connection::new(
            &self.keeper,
            peer,
            conn,
            started,
            connect_time,
        ))
    }

    /// The next incoming connection; `None` once the endpoint is closed. Await the returned
    /// [`Incoming`] (in a task of its own, so that a slow handshake holds up nobody) for the
    /// connection and the id its TLS handshake proved.
    pub async fn accept(&self) -> Option<Incoming> {
        let incoming = self.node.endpoint.accept().await?;
        Some(Incoming {
            incoming,
            keeper: self.keeper.clone(),
            access: self.access.clone(),
        })
    }

    /// Stops everything this endpoint started: the session (closing the registration), the
    /// relay, STUN routing, punching, the control socket, every connection's link task; then
    /// closes every connection and the endpoint and waits (at most a second) for the closes to
    /// go out. When it returns, no task the endpoint spawned is still running: that includes
    /// the control socket's clients and the pings they run, the punches answering
    /// introductions and the pings answered on connections we made. A ping, chat or file
    /// transfer the caller runs on a connection spawns no task (its stream reader is a future
    /// inside it): it ends by itself once the connection is closed, or when the caller drops
    /// it. The routes stay as they were, so that the close frames take the connections' paths.
    pub async fn close(self) {
        let Endpoint {
            node,
            keeper,
            console,
            shutdown,
            tasks,
            console_task,
            ..
        } = self;
        // The session closes its own connection when told to stop; close the endpoint after,
        // so that the session does not mistake the shutdown for a lost server.
        let _ = shutdown.send(true);
        console.flush().await;
        for mut task in tasks {
            if tokio::time::timeout(Duration::from_secs(2), &mut task)
                .await
                .is_err()
            {
                tracing::debug!("a task did not stop within 2 s; aborting it");
                task.abort();
                let _ = task.await;
            }
        }
        // Links, punches, introduction replies: each ends at the shutdown signal.
        keeper.tasks.join().await;
        // Clones of the console outlive the endpoint (in the caller's hands), so the printer
        // would never end by itself; everything queued was written by the flush above.
        console.flush().await;
        console_task.abort();
        let _ = console_task.await;
        node.endpoint.close(0u32.into(), b"bye");
        let _ = tokio::time::timeout(Duration::from_secs(1), node.endpoint.wait_idle()).await;
    }
}

/// A connection to another peer: a [`quinn::Connection`] (it derefs to one: open and accept
/// streams on it as usual) with the peer's proven id and a watch on its path.
#[derive(Debug, Clone)]
pub struct Connection {
    conn: quinn::Connection,
    peer: PeerId,
    path: watch::Receiver<LinkStatus>,
    started: Instant,
    connect_time: Duration,
}

impl Connection {
    fn new(
        keeper: &PathKeeper,
        peer: PeerId,
        conn: quinn::Connection,
        started: Instant,
        connect_time: Duration,
    ) -> Connection {
        let path = keeper.watch_path(&conn).unwrap_or_else(|| {
            // The connection closed before its link started: a path that never changes.
            let now = Instant::now();
            watch::channel(LinkStatus {
                path: Current::Relay,
                describe: "connection closed",
                started: now,
                since: now,
                punch_failure: None,
            })
            .1
        });
        Connection {
            conn,
            peer,
            path,
            started,
            connect_time,
        }
    }

    /// The other side, as its TLS handshake proved it.
    pub fn peer(&self) -> PeerId {
        self.peer
    }

    /// The path the connection's packets take now and how it came to be; `changed()` on it
    /// wakes at every switch (direct to relayed and back) and ends when the connection's link
    /// does.
    pub fn path(&self) -> watch::Receiver<LinkStatus> {
        self.path.clone()
    }

    /// When the connect began (for the connection we accepted: when the handshake ended).
    pub fn started(&self) -> Instant {
        self.started
    }

    /// How long the connect took (zero for an accepted connection).
    pub fn connect_time(&self) -> Duration {
        self.connect_time
    }

    /// The quinn connection.
    pub fn quinn(&self) -> &quinn::Connection {
        &self.conn
    }

    /// The quinn connection, by value.
    pub fn into_quinn(self) -> quinn::Connection {
        self.conn
    }
}

impl Deref for Connection {
    type Target = quinn::Connection;

    fn deref(&self) -> &quinn::Connection {
        &self.conn
    }
}

/// A connection arriving, from [`Endpoint::accept`]. Await it for the [`Connection`]: the
/// handshake completes, the peer's id is checked against the address it came on and the
/// endpoint's [`Access`] policy, and its path starts being kept. A refusal is reported on the
/// endpoint's output too.
pub struct Incoming {
    incoming: quinn::Incoming,
    keeper: PathKeeper,
    access: Arc<Access>,
}

impl Incoming {
    /// Where it comes from (a peer's stable address when it arrived relayed or from an address
    /// proven to be that peer's).
    pub fn remote_address(&self) -> SocketAddr {
        transport::canonical(self.incoming.remote_address())
    }

    async fn establish(self) -> Result<Connection, AcceptError> {
        let Incoming {
            incoming,
            keeper,
            access: policy,
        } = self;
        let console = &keeper.console;
        let remote = transport::canonical(incoming.remote_address());
        let conn = match tokio::time::timeout(ACCEPT_HANDSHAKE_TIMEOUT, incoming).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(source)) => {
                let e = AcceptError::Handshake { remote, source };
                console.error(e.to_string()).await;
                return Err(e);
            }
            Err(_) => {
                let e = AcceptError::Timeout(remote);
                console.error(e.to_string()).await;
                return Err(e);
            }
        };
        // The id the TLS handshake proved (the hash of the client certificate's key).
        let Some(peer) = node::remote_id(&conn) else {
            conn.close(2u32.into(), b"no identity");
            return Err(AcceptError::NoIdentity(remote));
        };
        // A connection that arrives on a peer's stable address (relayed, or from an address
        // aliased to that peer by an authenticated probe) must be that peer's: the TLS id
        // decides, not the address map.
        if relay::is_stable_addr(remote) && remote != relay::stable_addr(&peer) {
            let e = AcceptError::AddressOfAnotherPeer(peer);
            console.error(e.to_string()).await;
            conn.close(2u32.into(), b"address of another peer");
            return Err(e);
        }
        let (path, announced) = match keeper.node.socket.route_of(remote) {
            transport::PathTarget::Udp(addr) => {
                (format!("from {addr}"), punch::path::Current::Direct(addr))
            }
            transport::PathTarget::Virtual(_) => {
                (keeper.relay_label().to_owned(), punch::path::Current::Relay)
            }
        };
        if !policy.allows(&peer) {
            conn.close(
                access::REFUSED_CODE.into(),
                access::REFUSED_REASON.as_bytes(),
            );
            console
                .error(format!(
                    "refused {peer} ({path}): {}",
                    access::REFUSED_REASON
                ))
                .await;
            return Err(AcceptError::NotAllowed(peer));
        }
        console.say(format!("connected: {peer} {path}")).await;
        keeper.start_link(peer, conn.clone(), "the peer's address", announced);
        Ok(Connection::new(
            &keeper,
            peer,
            conn,
            Instant::now(),
            Duration::ZERO,
        ))
    }
}

impl IntoFuture for Incoming {
    type Output = Result<Connection, AcceptError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.establish())
    }
}

/// `direct to ADDR (how it was found)` or `relayed`, and why there is no direct path if known.
impl std::fmt::Display for LinkStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.path {
            Current::Direct(addr) => write!(f, "direct to {addr} ({})", self.describe),
            Current::Relay => {
                write!(f, "relayed via the rendezvous")?;
                match &self.punch_failure {
                    Some(why) => write!(f, " (no direct path: {why})"),
                    None => Ok(()),
                }
            }
        }
    }
}
