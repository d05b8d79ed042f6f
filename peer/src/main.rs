//! `peer`: register with a rendezvous, find other peers by id, and chat with them over
//! end-to-end encrypted QUIC.
//!
//! The command line only: argument parsing, output and dispatch. Everything else is the `peer`
//! library (`src/lib.rs`), which other programs can use as well.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use certs::{Fingerprint, Identity};
use clap::{Args, Parser, Subcommand};
use common::PeerId;
use peer::commands::{self, DirPrivacy, PeerLookup, Role, ServerOptions};
use peer::endpoint::{Endpoint, EndpointConfig, TcpTunnel};
use peer::{access, console, control, files, listener, netcheck, ping, FirstUseTrust};
use tokio::sync::watch;

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
    /// IP TTL of the opening probes sent when punching starts: they open our own NAT toward
    /// the peer and die before the peer's NAT, so that the peer's probes cannot arrive first
    /// (some routers then give us a new port for that peer). Raise it if more than one NAT of
    /// your own stands in the way (3 behind a carrier-grade NAT); `off` sends none (and, as the
    /// responder, does not wait for the initiator's first probe).
    #[arg(long, default_value = "2", value_parser = opening_ttl)]
    opening_ttl: OpeningTtl,
}

/// `--opening-ttl`: 1-255 or `off`.
#[derive(Debug, Clone, Copy)]
struct OpeningTtl(Option<u8>);

fn opening_ttl(text: &str) -> Result<OpeningTtl, String> {
    if text == "off" {
        return Ok(OpeningTtl(None));
    }
    match text.parse::<u8>() {
        Ok(0) | Err(_) => Err(format!("{text:?} is not a TTL (1-255) or `off`")),
        Ok(ttl) => Ok(OpeningTtl(Some(ttl))),
    }
}

fn seconds(value: f64, what: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value)
        .map_err(|_| anyhow!("{what} must be a non-negative number of seconds"))
}

impl ServerArgs {
    /// The library's view of the rendezvous flags.
    fn options(&self) -> anyhow::Result<ServerOptions> {
        let session = &self.session;
        Ok(ServerOptions {
            address: self.server.clone(),
            server_key: session.server_key,
            bind: session.bind,
            register_timeout: seconds(session.register_timeout, "--register-timeout")?,
            opening_ttl: session.opening_ttl.0,
            tcp_tunnel: match session.server_tcp.as_deref() {
                Some("off") => TcpTunnel::Off,
                Some(addr) => TcpTunnel::At(addr.to_owned()),
                None => TcpTunnel::SameHost,
            },
        })
    }
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

/// Binds a command's endpoint, runs `command` on it (which closes it), and prints the
/// rendezvous key's trust on first use on stderr as soon as the session reports it.
async fn with_endpoint<T, E, F>(
    identity: Arc<Identity>,
    config: EndpointConfig,
    command: impl FnOnce(Endpoint) -> F,
) -> anyhow::Result<T>
where
    F: std::future::Future<Output = Result<T, E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    let endpoint = Endpoint::bind(identity, config).await?;
    let notice = FirstUseNotice::start(&endpoint);
    let result = command(endpoint).await;
    notice.finish().await;
    Ok(result?)
}

/// Prints the rendezvous key's trust on first use once: when it happens, or at the end if the
/// command finished before the printer saw it.
struct FirstUseNotice {
    printer: tokio::task::JoinHandle<bool>,
    trust: watch::Receiver<Option<FirstUseTrust>>,
}

impl FirstUseNotice {
    fn start(endpoint: &Endpoint) -> Self {
        let trust = endpoint.first_use_trust();
        let mut watching = trust.clone();
        let printer = tokio::spawn(async move {
            match watching.wait_for(Option::is_some).await {
                Ok(trusted) => {
                    if let Some(trusted) = &*trusted {
                        eprintln!("{trusted}");
                    }
                    true
                }
                Err(_) => false,
            }
        });
        FirstUseNotice { printer, trust }
    }

    async fn finish(self) {
        self.printer.abort();
        if !matches!(self.printer.await, Ok(true)) {
            if let Some(trusted) = &*self.trust.borrow() {
                eprintln!("{trusted}");
            }
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let dir = cli
        .config_dir
        .clone()
        .unwrap_or_else(commands::default_config_dir);
    match commands::prepare_config_dir(&dir)? {
        DirPrivacy::Tightened { old_mode } => eprintln!(
            "made the config dir {} private (mode {old_mode:o} -> 700): it holds the identity \
             key and the control socket",
            dir.display()
        ),
        DirPrivacy::Unchanged => {}
        DirPrivacy::Failed(e) => eprintln!(
            "warning: cannot make the config dir {} private: {e}",
            dir.display()
        ),
    }
    let identity_path = cli
        .identity
        .clone()
        .unwrap_or_else(|| dir.join(commands::IDENTITY_FILE));
    let (identity, created) = Identity::load_or_create(&identity_path)?;
    if created {
        eprintln!(
            "created identity {} in {}",
            identity.id(),
            identity_path.display()
        );
    }
    let identity = Arc::new(identity);
    let verbose = cli.verbose;
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
                Some(files) if !files.is_dir() => {
                    bail!("--accept-files {}: not a directory", files.display())
                }
                Some(files) => Some(files::Inbox::new(files, max_file_size)),
                None => None,
            };
            // Installed before registration is announced (see `stop_signals`).
            let signal =
                commands::stop_signals().context("installing the SIGINT/SIGTERM handlers")?;
            let mut config =
                commands::endpoint_config(&server.options()?, &dir, verbose, Role::Listen);
            config.access = policy.clone();
            with_endpoint(identity, config, |endpoint| {
                listener::run(endpoint, &policy, inbox, signal)
            })
            .await
        }
        Command::Netcheck {
            server,
            stun,
            json,
            no_port_mapping,
        } => {
            let report = netcheck::check(server.as_deref(), &stun, !no_port_mapping).await?;
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
            if !file.is_file() {
                bail!("{}: not a readable file", file.display());
            }
            let mut config =
                commands::endpoint_config(&server.options()?, &dir, verbose, Role::Send);
            config.dial_timeout = dial_timeout;
            with_endpoint(identity, config, |endpoint| {
                commands::send_file(endpoint, peer, &file)
            })
            .await
        }
        Command::Connect {
            peer,
            server,
            dial_timeout,
        } => {
            let dial_timeout = seconds(dial_timeout, "--dial-timeout")?;
            let mut config =
                commands::endpoint_config(&server.options()?, &dir, verbose, Role::Connect);
            config.dial_timeout = dial_timeout;
            with_endpoint(identity, config, |endpoint| {
                commands::chat(endpoint, peer, console::stdin_lines())
            })
            .await
        }
        Command::Lookup {
            peer,
            server,
            refresh,
        } => {
            let (lookup, warning) = PeerLookup::open(&dir);
            if let Some(w) = warning {
                eprintln!("warning: {w}");
            }
            if let Some(cached) = lookup.cached(peer).filter(|_| !refresh) {
                print!("{}", cached.render());
                return Ok(());
            }
            let config = commands::endpoint_config(&server.options()?, &dir, false, Role::Lookup);
            let (found, warning) =
                with_endpoint(identity, config, |endpoint| lookup.ask(endpoint, peer)).await?;
            if let Some(w) = warning {
                eprintln!("warning: {w}");
            }
            print!("{}", found.render());
            Ok(())
        }
        Command::Status { json } => {
            let report = control::status(&dir).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
            Ok(())
        }
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
            let options = ping::PingOptions {
                count: count.max(1),
                interval_ms: seconds(interval, "--interval")?.as_millis() as u64,
                until_direct,
                timeout_ms: seconds(timeout, "--timeout")?.as_millis() as u64,
            };
            let dial_timeout = seconds(dial_timeout, "--dial-timeout")?;
            // Through the peer running with this config dir if there is one.
            let through_running = ping::through_running_peer(&dir, peer, options, |line| {
                if !json {
                    println!("{line}");
                }
            })
            .await;
            let summary = match through_running {
                Ok(summary) => summary,
                Err(ping::ThroughPeerError::Client(control::ClientError::NotRunning(path))) => {
                    let Some(server) = server else {
                        bail!(
                            "no peer is running with config dir {} (no {}); start `peer listen`, \
                             or give --server to ping from a peer of its own",
                            dir.display(),
                            path.display()
                        );
                    };
                    let server = ServerArgs { server, session }.options()?;
                    let mut config =
                        commands::endpoint_config(&server, &dir, verbose, Role::Ping { json });
                    config.dial_timeout = dial_timeout;
                    with_endpoint(identity, config, |endpoint| {
                        commands::ping(endpoint, peer, options, json)
                    })
                    .await?
                }
                Err(e) => return Err(e.into()),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                print!("{}", ping::render(&summary));
            }
            Ok(commands::ping_verdict(peer, &options, &summary)?)
        }
    }
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
