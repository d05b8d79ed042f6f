//! `peer`: register with a rendezvous, find other peers by id, and chat with them over
//! end-to-end encrypted QUIC.

mod access;
mod cache;
mod chat;
mod console;
mod control;
mod dial;
mod files;
mod netcheck;
mod node;
mod paths;
mod ping;
mod portmap;
mod punching;
mod relay;
mod session;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use certs::{Fingerprint, Identity};
use clap::{Args, Parser, Subcommand};
use common::message::Candidate;
use common::{ControlMessage, ErrorCode, PeerId};
use tokio::sync::{mpsc, watch};
use transport::TransportSettings;

use crate::cache::PeerCache;
use crate::console::Console;
use crate::node::Node;
use crate::session::{ServerEvent, Session, SessionConfig, SessionState};

/// A peer: registers with a rendezvous and talks to other peers by id over QUIC.
#[derive(Parser, Debug)]
#[command(name = "peer", version)]
struct Cli {
    /// Identity key file (created with mode 0600 on first use).
    /// Default: <config dir>/identity.pem.
    #[arg(long, global = true)]
    identity: Option<PathBuf>,
    /// Directory for the identity, the known-servers file and the peer cache.
    /// Default: $XDG_CONFIG_HOME/p2p or ~/.config/p2p.
    #[arg(long, global = true)]
    config_dir: Option<PathBuf>,
    /// More detail on stderr (candidates, attempts).
    #[arg(long, short, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print this peer's id (creating the identity if needed).
    Id,
    /// Register and accept connections; show incoming messages, send typed lines to every
    /// connected peer.
    Listen {
        #[command(flatten)]
        server: ServerArgs,
        /// Accept files that peers send (`peer send`) into this directory. Needs an allow-list
        /// (--allow or <config dir>/authorized_peers) or --allow-any.
        #[arg(long)]
        accept_files: Option<PathBuf>,
        #[command(flatten)]
        access: AccessArgs,
        /// Largest file accepted, in bytes (suffixes K, M, G, T: powers of 1024). A larger one
        /// is refused before any byte is written.
        #[arg(long, default_value = "4G", value_parser = parse_size, requires = "accept_files")]
        max_file_size: u64,
    },
    /// Connect to a peer by id and chat: typed lines go to the peer, end of input ends the chat.
    Connect {
        /// The peer's id (32 hex digits, hyphens optional).
        peer: PeerId,
        #[command(flatten)]
        server: ServerArgs,
        /// Seconds to wait for the peer to answer (a relayed handshake on a lossy network
        /// can need several retransmissions).
        #[arg(long, default_value_t = 20.0)]
        dial_timeout: f64,
    },
    /// Send a file to a peer (which must run `peer listen --accept-files DIR`); prints progress
    /// and succeeds only once the receiver has verified the SHA-256.
    Send {
        /// The peer's id.
        peer: PeerId,
        /// The file.
        file: PathBuf,
        #[command(flatten)]
        server: ServerArgs,
        /// Seconds to wait for the peer to answer (a relayed handshake on a lossy network
        /// can need several retransmissions).
        #[arg(long, default_value_t = 20.0)]
        dial_timeout: f64,
    },
    /// What this network's NAT does (RFC 4787/5780 terms) and with which peers a direct path
    /// will work. Uses the rendezvous's STUN service, or `--stun HOST:PORT`.
    Netcheck {
        /// The rendezvous, HOST:PORT (its STUN service; TCP 443 on the same host is tried).
        #[arg(long)]
        server: Option<String>,
        /// A STUN server to use instead (any standard one; RFC 5780 servers give the most).
        /// Repeat it to compare what several servers see: different public ports for different
        /// servers reveal a symmetric NAT even without RFC 5780.
        #[arg(long)]
        stun: Vec<String>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Do not probe the default gateway for UPnP IGD, NAT-PMP and PCP.
        #[arg(long)]
        no_port_mapping: bool,
    },
    /// Ping a peer: the path the packets take (direct, with the address, or relayed), round-trip
    /// percentiles, and when relayed, why, from both sides' NAT behaviour. Goes through the peer
    /// already running with this config dir (listen, connect, send) if there is one; otherwise
    /// registers by itself (needs --server).
    Ping {
        /// The peer's id.
        peer: PeerId,
        /// Pings to send.
        #[arg(long, short = 'c', default_value_t = 10)]
        count: u32,
        /// Seconds between pings.
        #[arg(long, short = 'i', default_value_t = 0.2)]
        interval: f64,
        /// Keep pinging (past --count) until a pong comes over a direct path; report how long it
        /// took. Fails if no direct path is found within --timeout.
        #[arg(long)]
        until_direct: bool,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
        /// Print the summary as JSON (and nothing else on stdout).
        #[arg(long)]
        json: bool,
        /// The rendezvous, HOST:PORT: ping from a peer of our own when no peer runs with this
        /// config dir.
        #[arg(long)]
        server: Option<String>,
        #[command(flatten)]
        session: SessionArgs,
        /// Seconds to wait for the peer to answer the connection.
        #[arg(long, default_value_t = 20.0)]
        dial_timeout: f64,
    },
    /// Show the running peer's state (the one with this config dir): registration, observed
    /// address, NAT behaviour, open connections with their paths and byte counts.
    Status {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show what the rendezvous knows about a peer (from the cache when possible).
    Lookup {
        /// The peer's id.
        peer: PeerId,
        #[command(flatten)]
        server: ServerArgs,
        /// Ask the server even if the peer is cached.
        #[arg(long)]
        refresh: bool,
    },
}

/// Who may connect to a listening peer.
#[derive(Args, Debug, Clone)]
struct AccessArgs {
    /// Accept only this peer (repeatable; together with the ids in <config dir>/authorized_peers,
    /// one per line with optional `# comments`). Others are refused and told why.
    #[arg(long = "allow", value_name = "ID")]
    allow: Vec<PeerId>,
    /// Accept every peer that knows this peer's id, even with --accept-files (conflicts with an
    /// allow-list).
    #[arg(long)]
    allow_any: bool,
}

/// A byte count: digits, optionally followed by K, M, G or T (powers of 1024; `B`, `iB` and
/// `IB` suffixes after them are accepted too).
fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, suffix) = text.split_at(digits_end);
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size (digits, then K, M, G or T)"))?;
    let shift = match suffix.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        other => return Err(format!("unknown size suffix {other:?} (K, M, G or T)")),
    };
    value
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

#[derive(Args, Debug, Clone)]
struct ServerArgs {
    /// The rendezvous, HOST:PORT.
    #[arg(long)]
    server: String,
    #[command(flatten)]
    session: SessionArgs,
}

/// How to reach and trust the rendezvous (besides its address).
#[derive(Args, Debug, Clone)]
struct SessionArgs {
    /// The rendezvous key fingerprint (`sha256:...`, printed by the server at start). Without
    /// it the key is trusted on first use and remembered.
    #[arg(long)]
    server_key: Option<Fingerprint>,
    /// Local UDP address to bind (one socket carries all traffic).
    #[arg(long, default_value = "0.0.0.0:0")]
    bind: SocketAddr,
    /// Seconds to wait for the first registration.
    #[arg(long, default_value_t = 10.0)]
    register_timeout: f64,
    /// The rendezvous's TLS tunnel, used when UDP does not get through
    /// (default: the server's host, port 443; `off` disables it).
    #[arg(long)]
    server_tcp: Option<String>,
}

fn config_dir(cli: &Cli) -> PathBuf {
    if let Some(dir) = &cli.config_dir {
        return dir.clone();
    }
    if let Some(xdg) = std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(xdg).join("p2p");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".config").join("p2p"),
        None => PathBuf::from(".p2p"),
    }
}

fn seconds(value: f64, what: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value)
        .map_err(|_| anyhow!("{what} must be a non-negative number of seconds"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = if cli.verbose {
        "info,peer=debug"
    } else {
        "warn"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli));
    // The stdin thread may be blocked in a read; do not wait for it.
    runtime.shutdown_timeout(Duration::from_millis(200));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let dir = config_dir(&cli);
    // Created with mode 0700 before anything is written into it (an existing one is kept).
    certs::durable::create_private_dir(&dir)
        .with_context(|| format!("cannot create the config dir {}", dir.display()))?;
    match certs::durable::tighten_own_dir(&dir) {
        Ok(Some(old)) => eprintln!(
            "made the config dir {} private (mode {old:o} -> 700): it holds the identity key \
             and the control socket",
            dir.display()
        ),
        Ok(None) => {}
        Err(e) => eprintln!(
            "warning: cannot make the config dir {} private: {e}",
            dir.display()
        ),
    }
    let identity_path = cli
        .identity
        .clone()
        .unwrap_or_else(|| dir.join("identity.pem"));
    let (identity, created) = Identity::load_or_create(&identity_path)?;
    if created {
        eprintln!(
            "created identity {} in {}",
            identity.id(),
            identity_path.display()
        );
    }
    let identity = Arc::new(identity);
    match cli.command {
        Command::Id => {
            println!("{}", identity.id());
            Ok(())
        }
        Command::Listen {
            server,
            accept_files,
            access,
            max_file_size,
        } => {
            let policy = access::policy(
                &access.allow,
                access.allow_any,
                &dir.join(access::FILE_NAME),
                accept_files.is_some(),
            )?;
            let inbox = match accept_files {
                Some(files) => {
                    if !files.is_dir() {
                        bail!("--accept-files {}: not a directory", files.display());
                    }
                    Some(files::Inbox::new(files, max_file_size))
                }
                None => None,
            };
            listen(identity, &dir, server, Arc::new(policy), inbox, cli.verbose).await
        }
        Command::Netcheck {
            server,
            stun,
            json,
            no_port_mapping,
        } => {
            let targets: Vec<String> = if stun.is_empty() {
                server.iter().cloned().collect()
            } else {
                stun
            };
            if targets.is_empty() {
                bail!("netcheck needs --server HOST:PORT or --stun HOST:PORT");
            }
            let mut servers = Vec::new();
            for target in &targets {
                servers.push(
                    tokio::net::lookup_host(target)
                        .await
                        .with_context(|| format!("cannot resolve {target:?}"))?
                        .next()
                        .ok_or_else(|| anyhow!("{target:?} has no address"))?,
                );
            }
            let tcp_443 = match &server {
                Some(s) => tokio::net::lookup_host(s)
                    .await
                    .ok()
                    .and_then(|mut a| a.next())
                    .map(|a| SocketAddr::new(a.ip(), 443)),
                None => None,
            };
            let options = netcheck::Options {
                tcp_443,
                hairpin: true,
                port_mapping: !no_port_mapping,
            };
            let report = netcheck::run(&servers, &options)
                .await
                .context("running the network checks")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
            Ok(())
        }
        Command::Send {
            peer,
            file,
            server,
            dial_timeout,
        } => {
            let dial_timeout = seconds(dial_timeout, "--dial-timeout")?;
            send(
                identity,
                &dir,
                server,
                peer,
                file,
                dial_timeout,
                cli.verbose,
            )
            .await
        }
        Command::Connect {
            peer,
            server,
            dial_timeout,
        } => {
            let dial_timeout = seconds(dial_timeout, "--dial-timeout")?;
            connect(identity, &dir, server, peer, dial_timeout, cli.verbose).await
        }
        Command::Lookup {
            peer,
            server,
            refresh,
        } => lookup(identity, &dir, server, peer, refresh).await,
        Command::Status { json } => status(&dir, json).await,
        Command::Ping {
            peer,
            count,
            interval,
            until_direct,
            timeout,
            json,
            server,
            session,
            dial_timeout,
        } => {
            let server = server.map(|server| ServerArgs { server, session });
            let options = ping::PingOptions {
                count: count.max(1),
                interval_ms: seconds(interval, "--interval")?.as_millis() as u64,
                until_direct,
                timeout_ms: seconds(timeout, "--timeout")?.as_millis() as u64,
            };
            let dial_timeout = seconds(dial_timeout, "--dial-timeout")?;
            ping_command(
                identity,
                &dir,
                server,
                peer,
                options,
                json,
                dial_timeout,
                cli.verbose,
            )
            .await
        }
    }
}

/// What every networked command starts with.
struct Context_ {
    node: Node,
    keeper: paths::PathKeeper,
    server_addr: SocketAddr,
    session: Session,
    events: mpsc::Receiver<ServerEvent>,
    console: Console,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    console_task: tokio::task::JoinHandle<()>,
    server: ServerArgs,
}

/// Measures our NAT against the rendezvous's STUN service once registered, for `peer status` and
/// for the pongs we send (so that peers can say why their path to us is relayed).
async fn measure_nat(
    session: Session,
    server: SocketAddr,
    out: watch::Sender<Option<netcheck::Report>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let measure = async {
        // Registration tells whether UDP works at all (or the tunnel is in use).
        let _ = session.wait_registered(Duration::from_secs(30)).await;
        netcheck::run(&[server], &netcheck::Options::default()).await
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

/// What a networked command is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Listen,
    Connect,
    Send,
    Lookup,
    Ping { json: bool },
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Listen => "listen",
            Mode::Connect => "connect",
            Mode::Send => "send",
            Mode::Lookup => "lookup",
            Mode::Ping { .. } => "ping",
        }
    }
}

async fn start(
    identity: Arc<Identity>,
    dir: &std::path::Path,
    server: ServerArgs,
    verbose: bool,
    mode: Mode,
) -> anyhow::Result<Context_> {
    let process_started = Instant::now();
    let server_addr = tokio::net::lookup_host(&server.server)
        .await
        .with_context(|| format!("cannot resolve rendezvous address {:?}", server.server))?
        .find(|a| a.is_ipv4() == server.session.bind.is_ipv4())
        .ok_or_else(|| {
            anyhow!(
                "rendezvous address {:?} has no address of the bind family",
                server.server
            )
        })?;
    let transport = TransportSettings::default();
    let (node, stun_rx) = Node::bind(server.session.bind, identity.clone(), transport)
        .with_context(|| format!("cannot bind {}", server.session.bind))?;
    let local = node.local_addr().context("reading the bound address")?;
    let (shutdown, shutdown_rx) = watch::channel(false);
    let (console, console_task) = Console::start_with(matches!(mode, Mode::Ping { json: true }));
    let tcp_server = match server.session.server_tcp.as_deref() {
        Some("off") => None,
        Some(addr) => Some(
            tokio::net::lookup_host(addr)
                .await
                .with_context(|| format!("cannot resolve --server-tcp {addr:?}"))?
                .next()
                .ok_or_else(|| anyhow!("--server-tcp {addr:?} has no address"))?,
        ),
        None => Some(SocketAddr::new(server_addr.ip(), 443)),
    };
    let config = SessionConfig {
        server_name: server.server.clone(),
        server_addr,
        pinned: server.session.server_key,
        known_servers: dir.join("known_servers"),
        local_addrs: node::local_addrs(local, server_addr),
        transport,
        tcp_server,
        socket: node.socket.clone(),
    };
    let (session, events, session_task) =
        Session::start(node.endpoint.clone(), identity, config, shutdown_rx.clone());
    let router = punching::Router::default();
    let stun_task = tokio::spawn(punching::dispatch(
        node.clone(),
        router.clone(),
        stun_rx,
        shutdown_rx.clone(),
    ));
    let (relay, relay_task) =
        relay::Relay::start(session.clone(), node.socket.injector(), shutdown_rx.clone());
    // A lookup is over in a moment: it neither measures nor serves the control socket.
    let long_lived = mode != Mode::Lookup;
    let (nat_tx, nat_rx) = watch::channel(None);
    let nat_task = tokio::spawn(measure_nat(
        session.clone(),
        server_addr,
        nat_tx,
        shutdown_rx.clone(),
    ));
    if !long_lived {
        nat_task.abort();
    }
    let keeper = paths::PathKeeper::new(
        node.clone(),
        router,
        relay,
        session.clone(),
        console.clone(),
        verbose,
        nat_rx,
    );
    let mut tasks = vec![session_task, stun_task, relay_task, nat_task];
    // The control socket (peer status, peer ping) of this config dir.
    let control_path = control::socket_path(dir);
    let control = if long_lived {
        Some(control::bind(&control_path))
    } else {
        None
    };
    match control {
        None => {}
        Some(Ok(listener)) => {
            let ctx = control::ControlContext {
                keeper: keeper.clone(),
                mode: mode.name(),
                server: server.server.clone(),
                config_dir: dir.to_owned(),
                started: process_started,
                dial_timeout: Duration::from_secs(20),
            };
            tasks.push(tokio::spawn(control::serve(
                listener,
                control_path,
                ctx,
                shutdown_rx,
            )));
        }
        Some(Err(e)) => {
            console
                .error(format!(
                    "warning: {e}; `peer status` and `peer ping` will not reach this process"
                ))
                .await
        }
    }
    Ok(Context_ {
        node,
        keeper,
        server_addr,
        session,
        events,
        console,
        shutdown,
        tasks,
        console_task,
        server,
    })
}

impl Context_ {
    async fn register(&self) -> anyhow::Result<session::Registration> {
        let timeout = seconds(self.server.session.register_timeout, "--register-timeout")?;
        self.session.wait_registered(timeout).await.map_err(|e| {
            anyhow!(
                "cannot register with the rendezvous at {}: {e}",
                self.server.server
            )
        })
    }

    /// Starts the tasks that keep paths working: answering introductions and watching our
    /// public mapping.
    fn keep_paths(&mut self) {
        let events = std::mem::replace(&mut self.events, mpsc::channel(1).1);
        self.tasks.push(tokio::spawn(
            self.keeper.clone().serve_introductions(events),
        ));
        self.tasks.push(tokio::spawn(
            self.keeper
                .clone()
                .watch_mapping(self.server_addr, self.shutdown.subscribe()),
        ));
    }

    async fn finish(self) {
        let Context_ {
            node,
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
        for task in tasks {
            if tokio::time::timeout(Duration::from_secs(2), task)
                .await
                .is_err()
            {
                tracing::debug!("a task did not stop within 2 s");
            }
        }
        // Link tasks still hold console handles, so the printer would never end by itself;
        // everything queued was written by the flush above.
        console.flush().await;
        console_task.abort();
        node.endpoint.close(0u32.into(), b"bye");
        let _ = tokio::time::timeout(Duration::from_secs(1), node.endpoint.wait_idle()).await;
    }
}

async fn lookup(
    identity: Arc<Identity>,
    dir: &std::path::Path,
    server: ServerArgs,
    peer: PeerId,
    refresh: bool,
) -> anyhow::Result<()> {
    let (mut cache, warning) = PeerCache::load(&dir.join("peers.json"));
    if let Some(w) = warning {
        eprintln!("warning: {w}");
    }
    if !refresh {
        if let Some(entry) = cache.get(&peer) {
            println!("{peer} (cached {})", format_time(entry.updated));
            for c in &entry.candidates {
                println!("  {} ({})", c.addr, c.kind.describe());
            }
            return Ok(());
        }
    }
    let ctx = start(identity, dir, server, false, Mode::Lookup).await?;
    let result = async {
        ctx.register().await?;
        match ctx
            .session
            .request(&ControlMessage::Query { id: peer })
            .await?
        {
            ControlMessage::PeerInfo(info) => {
                let mut candidates = vec![Candidate {
                    addr: info.observed,
                    kind: common::message::CandidateKind::Observed,
                }];
                candidates.extend(
                    info.local_addrs
                        .iter()
                        .filter(|a| **a != info.observed)
                        .map(|&addr| Candidate {
                            addr,
                            kind: common::message::CandidateKind::Local,
                        }),
                );
                if let Err(e) = cache.put(peer, candidates.clone()) {
                    eprintln!("warning: cannot write the peer cache: {e}");
                }
                let status = if info.online { "online" } else { "offline" };
                println!(
                    "{peer} (from the rendezvous: {status}, last seen {})",
                    format_time(info.last_seen)
                );
                for c in &candidates {
                    println!("  {} ({})", c.addr, c.kind.describe());
                }
                Ok(())
            }
            ControlMessage::Error {
                code: ErrorCode::NotFound,
                ..
            } => Err(anyhow!("peer {peer} is not registered with the rendezvous")),
            ControlMessage::Error { code, message } => {
                Err(anyhow!("the rendezvous refused ({code:?}): {message}"))
            }
            other => Err(anyhow!(
                "unexpected reply `{}` from the rendezvous",
                other.kind()
            )),
        }
    }
    .await;
    ctx.finish().await;
    result
}

fn format_time(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

async fn listen(
    identity: Arc<Identity>,
    dir: &std::path::Path,
    server: ServerArgs,
    policy: Arc<access::Access>,
    inbox: Option<Arc<files::Inbox>>,
    verbose: bool,
) -> anyhow::Result<()> {
    // The handlers are installed before registration is announced: a SIGTERM that follows
    // "registered with" at once must stop the listener gracefully (removing any `.part` file),
    // not kill it with the default action.
    let signal = stop_signals().context("installing the SIGINT/SIGTERM handlers")?;
    let mut ctx = start(identity, dir, server, verbose, Mode::Listen).await?;
    let reg = match ctx.register().await {
        Ok(reg) => reg,
        Err(e) => {
            ctx.finish().await;
            return Err(e);
        }
    };
    let me = reg.id;
    ctx.console.say(format!("peer id {me}")).await;
    if let access::Access::Only(ids) = &*policy {
        ctx.console
            .say(format!("accepting only {} allowed peer(s)", ids.len()))
            .await;
    }
    let how = if reg.over_tcp {
        "through the TCP tunnel: UDP is blocked".to_owned()
    } else {
        format!("observed address {}", reg.observed)
    };
    ctx.console
        .say(format!("registered with {} ({how})", ctx.server.server))
        .await;
    let watcher = tokio::spawn(watch_session(ctx.session.watch(), ctx.console.clone()));
    ctx.keep_paths();
    let hub: Arc<Mutex<HashMap<u64, mpsc::Sender<String>>>> = Arc::default();
    let input_task = tokio::spawn(broadcast_input(
        console::stdin_lines(),
        hub.clone(),
        ctx.console.clone(),
    ));
    let mut conns = tokio::task::JoinSet::new();
    let endpoint = ctx.node.endpoint.clone();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                conns.spawn(serve_peer(incoming, me, hub.clone(), ctx.keeper.clone(), policy.clone(), inbox.clone(), ctx.console.clone()));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            () = &mut signal => break,
        }
    }
    ctx.console.say("shutting down").await;
    conns.abort_all();
    for task in [watcher, input_task] {
        task.abort();
    }
    ctx.finish().await;
    Ok(())
}

/// Tells the user when the registration is lost and when it is back.
async fn watch_session(mut state: watch::Receiver<SessionState>, console: Console) {
    let mut generation = state.borrow().clone().registered_generation();
    let mut lost = false;
    while state.changed().await.is_ok() {
        let current = state.borrow_and_update().clone();
        match current {
            SessionState::Registered(reg) if Some(reg.generation) != generation => {
                generation = Some(reg.generation);
                lost = false;
                console
                    .say(format!(
                        "re-registered with the rendezvous (observed address {})",
                        reg.observed
                    ))
                    .await;
            }
            SessionState::Connecting { last_error } if !lost => {
                lost = true;
                console
                    .error(format!(
                        "lost the rendezvous ({}); retrying",
                        last_error.unwrap_or_default()
                    ))
                    .await;
            }
            SessionState::Fatal(e) => {
                console.error(format!("rendezvous: {e}")).await;
                return;
            }
            _ => {}
        }
    }
}

impl SessionState {
    fn registered_generation(&self) -> Option<u64> {
        match self {
            SessionState::Registered(reg) => Some(reg.generation),
            _ => None,
        }
    }
}

async fn broadcast_input(
    mut lines: mpsc::Receiver<String>,
    hub: Arc<Mutex<HashMap<u64, mpsc::Sender<String>>>>,
    console: Console,
) {
    while let Some(line) = lines.recv().await {
        // Clone the senders and release the lock before any await.
        let targets: Vec<mpsc::Sender<String>> = hub
            .lock()
            .map(|h| h.values().cloned().collect())
            .unwrap_or_default();
        if targets.is_empty() {
            console.error("no peer is connected; line not sent").await;
        }
        for target in targets {
            if target.try_send(line.clone()).is_err() {
                console
                    .error("a peer is not keeping up; line dropped for it")
                    .await;
            }
        }
    }
}

async fn serve_peer(
    incoming: quinn::Incoming,
    me: PeerId,
    hub: Arc<Mutex<HashMap<u64, mpsc::Sender<String>>>>,
    keeper: paths::PathKeeper,
    policy: Arc<access::Access>,
    inbox: Option<Arc<files::Inbox>>,
    console: Console,
) {
    let remote = incoming.remote_address();
    let conn = match tokio::time::timeout(Duration::from_secs(10), incoming).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            console
                .error(format!("refused connection from {remote}: {e}"))
                .await;
            return;
        }
        Err(_) => return,
    };
    // The id the TLS handshake proved (the hash of the client certificate's key).
    let Some(peer) = node::remote_id(&conn) else {
        conn.close(2u32.into(), b"no identity");
        return;
    };
    // A connection that arrives on a peer's stable address (relayed, or from an address aliased
    // to that peer by an authenticated probe) must be that peer's: the TLS id decides, not the
    // address map.
    if is_stable_addr(remote) && remote != relay::stable_addr(&peer) {
        console
            .error(format!(
                "refused a connection from {peer}: it came on the address of another peer"
            ))
            .await;
        conn.close(2u32.into(), b"address of another peer");
        return;
    }
    let path = match keeper.node.socket.route_of(remote) {
        transport::PathTarget::Udp(addr) => format!("from {addr}"),
        transport::PathTarget::Virtual(_) => keeper.relay_label().to_owned(),
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
        return;
    }
    console.say(format!("connected: {peer} {path}")).await;
    keeper.start_link(peer, conn.clone(), "the peer's address");
    let mut streams = tokio::task::JoinSet::new();
    loop {
        let (mut tx, mut rx) = tokio::select! {
            accepted = conn.accept_bi() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    console.say(format!("disconnected: {peer} ({e})")).await;
                    break;
                }
            },
            Some(_) = streams.join_next(), if !streams.is_empty() => continue,
        };
        let app = match chat::accept(&mut tx, &mut rx).await {
            Ok(app) => app,
            Err(e) => {
                console
                    .error(format!("refused a stream from {peer}: {e}"))
                    .await;
                continue;
            }
        };
        let console = console.clone();
        match app {
            common::message::PeerApp::Chat => {
                // One key per chat in this process: stream indices repeat on every connection, and
                // a second chat under the same key would end the first one's input.
                static NEXT_CHAT: std::sync::atomic::AtomicU64 =
                    std::sync::atomic::AtomicU64::new(0);
                let key = NEXT_CHAT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let (line_tx, line_rx) = mpsc::channel(64);
                if let Ok(mut h) = hub.lock() {
                    h.insert(key, line_tx);
                }
                let hub = hub.clone();
                streams.spawn(async move {
                    let end = chat::run(
                        tx,
                        rx,
                        me,
                        peer,
                        line_rx,
                        console.clone(),
                        common::chat::END_TIMEOUT,
                    )
                    .await;
                    if let Ok(mut h) = hub.lock() {
                        h.remove(&key);
                    }
                    match end {
                        chat::ChatEnd::PeerClosed { .. } => {
                            console.say(format!("chat with {peer} ended")).await
                        }
                        chat::ChatEnd::Failed(e) => {
                            console.error(format!("chat with {peer} failed: {e}")).await
                        }
                        chat::ChatEnd::InputClosed => {}
                    }
                });
            }
            common::message::PeerApp::Ping => {
                streams.spawn(ping::serve(tx, rx, keeper.clone()));
            }
            common::message::PeerApp::File => {
                let inbox = inbox.clone();
                streams.spawn(async move { files::receive(tx, rx, peer, inbox, &console).await });
            }
        }
    }
    streams.shutdown().await;
}

/// A connection made by [`open_connection`].
struct Opened {
    conn: quinn::Connection,
    /// When the connect began (after registration).
    started: Instant,
    /// How long it took.
    connect_ms: f64,
}

/// Starts a session, registers, and connects to `peer`; returns the context and connection.
async fn open_connection(
    identity: Arc<Identity>,
    dir: &std::path::Path,
    server: ServerArgs,
    peer: PeerId,
    dial_timeout: Duration,
    verbose: bool,
    mode: Mode,
) -> anyhow::Result<(Context_, Opened)> {
    let mut ctx = start(identity, dir, server, verbose, mode).await?;
    ctx.keep_paths();
    let connected = async {
        let me = ctx.register().await?.id;
        if peer == me {
            bail!("{peer} is this peer's own id");
        }
        let started = Instant::now();
        let (mut cache, warning) = PeerCache::load(&dir.join("peers.json"));
        if let Some(w) = warning {
            ctx.console.error(format!("warning: {w}")).await;
        }
        let (conn, via) =
            dial::establish(&ctx.keeper, &mut cache, peer, dial_timeout, verbose).await?;
        let connect_ms = started.elapsed().as_secs_f64() * 1000.0;
        ctx.console
            .say(format!(
                "connected to {peer} in {connect_ms:.0} ms: {}",
                via.text
            ))
            .await;
        ctx.keeper.start_link(peer, conn.clone(), via.describe);
        dial::answer_pings(ctx.keeper.clone(), conn.clone());
        Ok(Opened {
            conn,
            started,
            connect_ms,
        })
    }
    .await;
    match connected {
        Ok(opened) => Ok((ctx, opened)),
        Err(e) => {
            ctx.finish().await;
            Err(e)
        }
    }
}

async fn send(
    identity: Arc<Identity>,
    dir: &std::path::Path,
    server: ServerArgs,
    peer: PeerId,
    file: PathBuf,
    dial_timeout: Duration,
    verbose: bool,
) -> anyhow::Result<()> {
    if !file.is_file() {
        bail!("{}: not a readable file", file.display());
    }
    let (ctx, Opened { conn, .. }) = open_connection(
        identity,
        dir,
        server,
        peer,
        dial_timeout,
        verbose,
        Mode::Send,
    )
    .await?;
    let result = files::send(&conn, &file, &ctx.console)
        .await
        .map_err(|e| access::refusal(peer, &conn).unwrap_or(e));
    if let Ok(summary) = &result {
        ctx.console.say(summary.clone()).await;
    }
    conn.close(0u32.into(), b"done");
    ctx.finish().await;
    result.map(|_| ())
}

async fn connect(
    identity: Arc<Identity>,
    dir: &std::path::Path,
    server: ServerArgs,
    peer: PeerId,
    dial_timeout: Duration,
    verbose: bool,
) -> anyhow::Result<()> {
    let me = identity.id();
    let (ctx, Opened { conn, .. }) = open_connection(
        identity,
        dir,
        server,
        peer,
        dial_timeout,
        verbose,
        Mode::Connect,
    )
    .await?;
    let result = async {
        let (tx, rx) = chat::open(&conn)
            .await
            .map_err(|e| anyhow!("cannot open the chat stream: {e}"))?;
        let end = chat::run(
            tx,
            rx,
            me,
            peer,
            console::stdin_lines(),
            ctx.console.clone(),
            common::chat::END_TIMEOUT,
        )
        .await;
        // Read before our own close replaces the reason the connection ended with.
        if let Some(refused) = access::refusal(peer, &conn) {
            return Err(refused);
        }
        conn.close(0u32.into(), b"chat over");
        match end {
            chat::ChatEnd::InputClosed => Ok(()),
            chat::ChatEnd::PeerClosed { unsent: 0 } => {
                ctx.console.say(format!("{peer} ended the chat")).await;
                Ok(())
            }
            chat::ChatEnd::PeerClosed { unsent } => Err(anyhow!(
                "{peer} ended the chat before {unsent} line(s) of input could be sent"
            )),
            chat::ChatEnd::Failed(e) => Err(anyhow!("chat with {peer} failed: {e}")),
        }
    }
    .await
    .map_err(|e| access::refusal(peer, &conn).unwrap_or(e));
    ctx.finish().await;
    result
}

/// `peer status`: asks the running peer.
async fn status(dir: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let mut report = None;
    let mut error = None;
    control::request(dir, &control::Request::Status {}, |reply| {
        match reply {
            control::Reply::Status(r) => report = Some(r),
            control::Reply::Error { message } => error = Some(message),
            _ => {}
        }
        false
    })
    .await
    .map_err(|e| match e {
        control::ClientError::NotRunning(_) => anyhow!(
            "{e}; start `peer listen` (or connect, send) with --config-dir {}",
            dir.display()
        ),
        other => anyhow!(other),
    })?;
    if let Some(message) = error {
        bail!("the running peer refused: {message}");
    }
    let report = report.ok_or_else(|| anyhow!("the running peer sent no status"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render_status(&report));
    }
    Ok(())
}

fn render_status(r: &control::StatusReport) -> String {
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
    match (reg.state.as_str(), reg.observed) {
        ("registered", Some(observed)) if reg.over_tcp => line(
            "rendezvous",
            format!(
                "registered with {} through the TCP 443 tunnel (UDP blocked; tunnel address \
                 {observed})",
                r.server
            ),
        ),
        ("registered", Some(observed)) => {
            line("rendezvous", format!("registered with {}", r.server));
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
        line("local socket", local.to_string());
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

fn human_bytes(n: u64) -> String {
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

/// How a ping line reads.
fn render_ping_reply(peer: PeerId, reply: &ping::PingReply) -> String {
    format!(
        "pong from {peer} seq={} via {} in {:.2} ms",
        reply.seq, reply.path, reply.rtt_ms
    )
}

/// `peer ping`: through the running peer if there is one, else by registering ourselves.
#[allow(clippy::too_many_arguments)]
async fn ping_command(
    identity: Arc<Identity>,
    dir: &std::path::Path,
    server: Option<ServerArgs>,
    peer: PeerId,
    options: ping::PingOptions,
    json: bool,
    dial_timeout: Duration,
    verbose: bool,
) -> anyhow::Result<()> {
    let request = control::Request::Ping { peer, options };
    let mut summary = None;
    let mut error = None;
    let through_daemon = control::request(dir, &request, |reply| {
        match reply {
            control::Reply::PingReply(r) if !json => println!("{}", render_ping_reply(peer, &r)),
            control::Reply::PingConnected { message } if !json => println!("{message}"),
            control::Reply::PingDone(s) => {
                summary = Some(*s);
                return false;
            }
            control::Reply::Error { message } => {
                error = Some(message);
                return false;
            }
            _ => {}
        }
        true
    })
    .await;
    let summary = match through_daemon {
        Ok(()) => {
            if let Some(message) = error {
                bail!("{message}");
            }
            summary.ok_or_else(|| anyhow!("the running peer ended the ping without a summary"))?
        }
        Err(control::ClientError::NotRunning(path)) => {
            let Some(server) = server else {
                bail!(
                    "no peer is running with config dir {} (no {}); start `peer listen`, or \
                     give --server to ping from a peer of its own",
                    dir.display(),
                    path.display()
                );
            };
            ping_standalone(
                identity,
                dir,
                server,
                peer,
                options,
                json,
                dial_timeout,
                verbose,
            )
            .await?
        }
        Err(e) => return Err(e.into()),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print!("{}", ping::render(&summary));
    }
    if options.until_direct && !summary.direct {
        bail!(
            "no direct path to {peer} within {} s",
            options.timeout_ms / 1000
        );
    }
    if summary.received == 0 {
        bail!("no answer from {peer}");
    }
    Ok(())
}

/// Registers, connects, waits for our NAT measurement (to explain a relayed path), pings.
#[allow(clippy::too_many_arguments)]
async fn ping_standalone(
    identity: Arc<Identity>,
    dir: &std::path::Path,
    server: ServerArgs,
    peer: PeerId,
    options: ping::PingOptions,
    json: bool,
    dial_timeout: Duration,
    verbose: bool,
) -> anyhow::Result<ping::PingSummary> {
    let (ctx, opened) = open_connection(
        identity,
        dir,
        server,
        peer,
        dial_timeout,
        verbose,
        Mode::Ping { json },
    )
    .await?;
    let result = async {
        let (replies_tx, mut replies) = mpsc::channel(16);
        let console = ctx.console.clone();
        let printer = tokio::spawn(async move {
            while let Some(reply) = replies.recv().await {
                if !json {
                    console.say(render_ping_reply(peer, &reply)).await;
                }
            }
        });
        let summary = ping::run(
            &ctx.keeper,
            peer,
            &opened.conn,
            options,
            opened.started,
            Some(opened.connect_ms),
            &replies_tx,
        )
        .await
        .map_err(|e| {
            access::refusal(peer, &opened.conn).unwrap_or_else(|| anyhow!("ping failed: {e}"))
        });
        drop(replies_tx);
        let _ = printer.await;
        let summary = summary?;
        ctx.console.flush().await;
        Ok(summary)
    }
    .await;
    opened.conn.close(0u32.into(), b"ping done");
    ctx.finish().await;
    result
}

/// Installs SIGINT and SIGTERM handlers now; the future completes at the first of them.
fn stop_signals() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

/// Whether `addr` is a stable per-peer address (240.0.0.0/4, see [`relay::stable_addr`]).
fn is_stable_addr(addr: SocketAddr) -> bool {
    matches!(addr, SocketAddr::V4(v4) if v4.ip().octets()[0] >= 240)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes_and_refuse_garbage() {
        assert_eq!(parse_size("1000"), Ok(1000));
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("10MiB"), Ok(10 << 20));
        assert_eq!(parse_size("2 kb"), Ok(2048));
        assert_eq!(parse_size("0"), Ok(0));
        for bad in [
            "",
            "G",
            "-1",
            "1.5G",
            "3X",
            "99999999999999999999",
            "17179869184T",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn listen_takes_allow_list_flags() {
        let id = PeerId::from_key_digest(&[1; 32]).to_string();
        let cli = Cli::try_parse_from([
            "peer",
            "listen",
            "--server",
            "h:1",
            "--allow",
            &id,
            "--allow",
            &id,
            "--accept-files",
            "/tmp",
            "--max-file-size",
            "1M",
        ])
        .unwrap();
        let Command::Listen {
            access,
            max_file_size,
            ..
        } = cli.command
        else {
            panic!("not listen");
        };
        assert_eq!(access.allow.len(), 2);
        assert!(!access.allow_any);
        assert_eq!(max_file_size, 1 << 20);
        // --max-file-size only with --accept-files; the default needs neither.
        assert!(Cli::try_parse_from([
            "peer",
            "listen",
            "--server",
            "h:1",
            "--max-file-size",
            "1M"
        ])
        .is_err());
        assert!(Cli::try_parse_from(["peer", "listen", "--server", "h:1"]).is_ok());
        assert!(
            Cli::try_parse_from(["peer", "listen", "--server", "h:1", "--allow", "nope"]).is_err()
        );
    }
}
