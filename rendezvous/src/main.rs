use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use rendezvous::relay::RelayLimits;
use rendezvous::{Config, Limits, Server};

/// The rendezvous server: peers register here, find each other by id, and are introduced for
/// hole punching.
#[derive(Parser, Debug)]
#[command(name = "rendezvous", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve QUIC (control protocol) and STUN on one UDP port.
    Serve {
        /// UDP address to listen on.
        #[arg(long, default_value = "0.0.0.0:7000")]
        listen: SocketAddr,
        /// Directory for the server key and the registry.
        #[arg(long, default_value = "./rendezvous-data")]
        data_dir: PathBuf,
        /// TCP address of the TLS tunnel for peers whose network blocks UDP
        /// (default: the --listen IP, port 443; `off` disables it).
        #[arg(long)]
        tcp_listen: Option<String>,
        /// Serve Prometheus metrics (`GET /metrics`) on this TCP address.
        #[arg(long)]
        metrics: Option<SocketAddr>,
        /// Second UDP port for STUN behaviour discovery (RFC 5780), on the same IP(s).
        #[arg(long)]
        stun_alt_port: Option<u16>,
        /// Second IP of this host for STUN behaviour discovery (RFC 5780).
        #[arg(long, requires = "stun_alt_port")]
        stun_alt_ip: Option<std::net::IpAddr>,
        /// Most concurrent peer connections.
        #[arg(long, default_value_t = Limits::default().max_connections)]
        max_connections: usize,
        /// Most concurrent connections from one IPv4 address or IPv6 /64 (generous: carrier-grade
        /// NAT puts many users behind one IPv4 address).
        #[arg(long, default_value_t = Limits::default().max_connections_per_source)]
        max_connections_per_ip: usize,
        /// Most QUIC handshakes in progress at once (separate from --max-connections, so that
        /// half-open handshakes cannot take established peers' slots).
        #[arg(long, default_value_t = Limits::default().max_handshakes)]
        max_handshakes: usize,
        /// Most QUIC handshakes in progress at once from one IPv4 address or IPv6 /64.
        #[arg(long, default_value_t = Limits::default().max_handshakes_per_source)]
        max_handshakes_per_ip: usize,
        /// Above this many handshakes in progress, clients must first prove their address with a
        /// QUIC Retry (0: always).
        #[arg(long, default_value_t = Limits::default().retry_above_handshakes)]
        retry_above_handshakes: usize,
        /// QUIC receive and send windows of a connection relaying through the server, bytes
        /// (relay throughput per connection is at most this / RTT).
        #[arg(long, default_value_t = Limits::default().relay_window)]
        relay_window: u32,
        /// Relay rate limit per peer, bytes per second.
        #[arg(long, default_value_t = RelayLimits::default().rate_bytes_per_s)]
        relay_rate: u64,
        /// Relay byte quota per relay session (0: none).
        #[arg(long, default_value_t = RelayLimits::default().quota_bytes)]
        relay_quota: u64,
        /// Append every relayed packet to this file (capped at 16 MiB), to inspect what the
        /// server handles (it only ever sees the peers' encrypted QUIC packets).
        #[arg(long, env = "RENDEZVOUS_RELAY_TRACE")]
        relay_trace: Option<PathBuf>,
    },
    /// Print the server key's fingerprint (what peers pass as --server-key).
    Fingerprint {
        /// Directory for the server key and the registry.
        #[arg(long, default_value = "./rendezvous-data")]
        data_dir: PathBuf,
    },
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Fingerprint { data_dir } => {
            println!("{}", rendezvous::fingerprint(&data_dir)?);
            Ok(())
        }
        Command::Serve {
            listen,
            data_dir,
            max_connections,
            max_connections_per_ip,
            max_handshakes,
            max_handshakes_per_ip,
            retry_above_handshakes,
            relay_window,
            relay_rate,
            relay_quota,
            relay_trace,
            tcp_listen,
            stun_alt_port,
            stun_alt_ip,
            metrics,
        } => {
            let tcp_required = tcp_listen.as_deref().is_some_and(|t| t != "off");
            let tcp_listen =
                match tcp_listen.as_deref() {
                    Some("off") => None,
                    Some(addr) => Some(addr.parse::<SocketAddr>().with_context(|| {
                        format!("--tcp-listen {addr:?} is not IP:PORT or `off`")
                    })?),
                    None => Some(SocketAddr::new(listen.ip(), 443)),
                };
            let limits = Limits {
                max_connections,
                max_connections_per_source: max_connections_per_ip,
                max_handshakes,
                max_handshakes_per_source: max_handshakes_per_ip,
                retry_above_handshakes,
                relay_window,
                relay: RelayLimits {
                    rate_bytes_per_s: relay_rate,
                    quota_bytes: relay_quota,
                    ..RelayLimits::default()
                },
                ..Limits::default()
            };
            let server = Server::start(Config {
                listen,
                data_dir: data_dir.clone(),
                limits,
                relay_trace,
                tcp_listen,
                tcp_required,
                stun: rendezvous::stun::StunConfig {
                    alt_port: stun_alt_port,
                    alt_ip: stun_alt_ip,
                },
                metrics,
            })
            .await
            .with_context(|| format!("starting the rendezvous on {listen}"))?;
            println!(
                "rendezvous listening on {} (QUIC and STUN over UDP)",
                server.local_addr()
            );
            match server.tcp_addr() {
                Some(tcp) => println!("tcp tunnel listening on {tcp} (TLS, for peers without UDP)"),
                None => println!("tcp tunnel off"),
            }
            if let Some(metrics) = server.metrics_addr() {
                println!("metrics on http://{metrics}/metrics");
            }
            println!("server key {}", server.fingerprint());
            println!(
                "data dir {} ({} registered peers loaded)",
                data_dir.display(),
                server.registered_at_start()
            );
            wait_for_signal().await?;
            println!("shutting down");
            server.shutdown().await;
            Ok(())
        }
    }
}

async fn wait_for_signal() -> anyhow::Result<()> {
    transport::shutdown_signal()
        .await
        .context("waiting for SIGINT or SIGTERM")
}
