use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use rendezvous::core::RegistryLimits;
use rendezvous::metrics::MetricsLimits;
use rendezvous::relay::RelayLimits;
use rendezvous::tunnel::TunnelLimits;
use rendezvous::{Config, Limits, Server};

/// `--expire-after-days` by default: the library's default, in days (a test checks they agree).
const DEFAULT_EXPIRE_AFTER_DAYS: u32 = 30;

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

// Parsed once at start: the size of the larger variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
    /// Serve QUIC (control protocol) and STUN on one UDP port.
    Serve {
        /// Read options from this TOML file: keys are the option names without `--`
        /// (`listen = "[::]:7000"`, `max-connections = 50000`); options given on the command
        /// line override the file's; an unknown key is an error.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// UDP address to listen on. The default `[::]:7000` is one dual-stack socket (IPv4 and
        /// IPv6); `0.0.0.0:7000` serves IPv4 only.
        #[arg(long, default_value = "[::]:7000")]
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
        /// Second UDP port for STUN behaviour discovery (RFC 5780), on the same IP(s)
        /// (default: the --listen port + 1, left out with a warning if it cannot be bound;
        /// `off` disables it).
        #[arg(long)]
        stun_alt_port: Option<String>,
        /// Second IP of this host for STUN behaviour discovery (RFC 5780): with it, peers
        /// learn how their NAT maps and filters by IP too (full discovery).
        #[arg(long)]
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
        /// Relay byte quota per peer per day (0: none).
        #[arg(long, default_value_t = RelayLimits::default().quota_bytes)]
        relay_quota: u64,
        /// Most registered peers (rows, online or not); new identities are refused while the
        /// registry is full. A row costs about 260-370 bytes of memory, at most about 800 (a
        /// peer announcing 16 local addresses).
        #[arg(long, default_value_t = RegistryLimits::default().max_registered)]
        max_registered: usize,
        /// Delete a registered peer's row once it has been offline this many days.
        #[arg(
            long,
            default_value_t = DEFAULT_EXPIRE_AFTER_DAYS,
            value_parser = clap::value_parser!(u32).range(1..=36_500)
        )]
        expire_after_days: u32,
        /// Append every relayed packet to this file (capped at 16 MiB), to inspect what the
        /// server handles (it only ever sees the peers' encrypted QUIC packets).
        #[arg(long, env = "RENDEZVOUS_RELAY_TRACE")]
        relay_trace: Option<PathBuf>,
        /// Share the registry with other rendezvous nodes in Redis: `redis://HOST:PORT/`
        /// (`redis://:PASSWORD@HOST:PORT/DB` with a password), or the primary that Redis
        /// Sentinel names, followed when it moves:
        /// `redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE` (the sentinels'
        /// addresses; the password is the primary's), or a Redis Cluster by some of its
        /// servers: `redis+cluster://[:PASSWORD@]HOST:PORT[,HOST:PORT...]/`. Needs --node-id.
        /// Without it the registry is the embedded one in --data-dir.
        #[arg(long, value_name = "URL")]
        cluster: Option<String>,
        /// This node's name in the cluster (1 to 64 letters, digits, `.`, `_`, `-`; unique).
        #[arg(long, value_name = "NAME")]
        node_id: Option<String>,
        /// Relay across the cluster's nodes: listen for the other nodes' links on this UDP
        /// address (QUIC, authenticated by the cluster key). Needs --cluster and
        /// --cluster-key-file. Without it, peers on different nodes are not relayed to each
        /// other.
        #[arg(long, value_name = "IP:PORT")]
        cluster_link: Option<SocketAddr>,
        /// The address the other nodes reach this node's link at (announced in Redis), when
        /// --cluster-link listens on a wildcard address.
        #[arg(long, value_name = "IP:PORT")]
        cluster_link_announce: Option<SocketAddr>,
        /// The cluster key, shared by every node (64 hex digits, mode 0600; make one with
        /// `openssl rand -hex 32`): only holders of it can open a node link.
        #[arg(long, value_name = "FILE")]
        cluster_key_file: Option<PathBuf>,
        #[command(flatten)]
        edge: EdgeArgs,
    },
    /// Make a new cluster key (for --cluster-key-file): 64 hex digits written to FILE with mode
    /// 0600; copy the same file to every node of the cluster. Never overwrites a file.
    ClusterKey {
        /// Where to write it.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Print the server key's fingerprint (what peers pass as --server-key).
    Fingerprint {
        /// Directory for the server key and the registry.
        #[arg(long, default_value = "./rendezvous-data")]
        data_dir: PathBuf,
    },
}

/// Caps and timeouts of the TCP tunnel and metrics ports.
#[derive(clap::Args, Debug)]
struct EdgeArgs {
    /// Most TCP tunnels (in handshake or open) in all.
    #[arg(long, default_value_t = TunnelLimits::default().max_tunnels)]
    tunnel_max: usize,
    /// Most TCP tunnels per source (IPv4 address or IPv6 /64).
    #[arg(long, default_value_t = TunnelLimits::default().tunnels_per_source)]
    tunnel_per_source: usize,
    /// Most tunnel TLS handshakes in progress in all (a newer one closes the oldest).
    #[arg(long, default_value_t = TunnelLimits::default().max_handshakes)]
    tunnel_handshakes: usize,
    /// Most tunnel TLS handshakes in progress per source (a newer one closes the source's
    /// oldest).
    #[arg(long, default_value_t = TunnelLimits::default().handshakes_per_source)]
    tunnel_handshakes_per_source: usize,
    /// Seconds from TCP accept to a completed tunnel TLS handshake.
    #[arg(long, value_parser = seconds, default_value = "5")]
    tunnel_handshake_timeout: Duration,
    /// Seconds without a datagram from the client before a tunnel is closed.
    #[arg(long, value_parser = seconds, default_value = "60")]
    tunnel_idle_timeout: Duration,
    /// Seconds a write to a client that does not read may block before the tunnel is closed.
    #[arg(long, value_parser = seconds, default_value = "10")]
    tunnel_write_timeout: Duration,
    /// Seconds a metrics client has to send its request.
    #[arg(long, value_parser = seconds, default_value = "2")]
    metrics_request_timeout: Duration,
    /// Metrics connections waiting for their request, per source (a newer one closes the
    /// oldest).
    #[arg(long, default_value_t = MetricsLimits::default().waiting_per_source)]
    metrics_per_source: usize,
    /// Metrics connections waiting for their request, in all (a newer one closes the oldest).
    #[arg(long, default_value_t = MetricsLimits::default().waiting)]
    metrics_max_waiting: usize,
}

impl EdgeArgs {
    fn limits(&self) -> (TunnelLimits, MetricsLimits) {
        (
            TunnelLimits {
                max_tunnels: self.tunnel_max,
                tunnels_per_source: self.tunnel_per_source,
                max_handshakes: self.tunnel_handshakes,
                handshakes_per_source: self.tunnel_handshakes_per_source,
                handshake_timeout: self.tunnel_handshake_timeout,
                idle_timeout: self.tunnel_idle_timeout,
                write_timeout: self.tunnel_write_timeout,
                ..TunnelLimits::default()
            },
            MetricsLimits {
                waiting: self.metrics_max_waiting,
                waiting_per_source: self.metrics_per_source,
                request_timeout: self.metrics_request_timeout,
                ..MetricsLimits::default()
            },
        )
    }
}

/// The STUN alternates from `--stun-alt-port` and `--stun-alt-ip`: a port given is required
/// (the start fails if it cannot be bound), the default (the listen port + 1; an ephemeral port
/// when the listen port is 0) is optional, `off` turns discovery off.
fn stun_config(
    alt_port: Option<&str>,
    alt_ip: Option<std::net::IpAddr>,
    listen: SocketAddr,
) -> anyhow::Result<rendezvous::stun::StunConfig> {
    let (alt_port, optional) = match alt_port {
        Some("off") => {
            if let Some(ip) = alt_ip {
                anyhow::bail!(
                    "--stun-alt-ip {ip} needs an alternate port: drop `--stun-alt-port off`"
                );
            }
            (None, false)
        }
        Some(port) => {
            let port: u16 = port
                .parse()
                .with_context(|| format!("--stun-alt-port {port:?} is not a port or `off`"))?;
            (Some(port), false)
        }
        None => match listen.port() {
            0 => (Some(0), true),
            port => (port.checked_add(1), true),
        },
    };
    Ok(rendezvous::stun::StunConfig {
        alt_port,
        alt_ip,
        optional,
    })
}

/// Parses a positive number of seconds (fractions allowed).
fn seconds(text: &str) -> Result<Duration, String> {
    let secs: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if secs.is_nan() || secs <= 0.0 {
        return Err(format!("{text:?}: must be more than 0 seconds"));
    }
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{text:?}: {e}"))
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

/// Parses the command line `args` (program name first), merging `serve --config FILE` in (the
/// command line wins). A usage error exits as clap does (message and usage, status 2).
fn parse_cli(args: Vec<std::ffi::OsString>) -> anyhow::Result<Cli> {
    let command = Cli::command();
    let matches = command
        .clone()
        .try_get_matches_from(&args)
        .unwrap_or_else(|e| e.exit());
    let merged = match matches.subcommand() {
        Some(("serve", serve)) => match serve.get_one::<PathBuf>("config") {
            Some(path) => Some((
                path.clone(),
                rendezvous::config_file::merge_args(&command, "serve", serve, &args, path)?,
            )),
            None => None,
        },
        _ => None,
    };
    let Some((path, merged)) = merged else {
        return Ok(Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit()));
    };
    // The command line alone parsed: an error now comes from a value in the file.
    let matches = command.try_get_matches_from(merged).map_err(|e| {
        let message = e.to_string();
        let first = message.lines().next().unwrap_or_default();
        anyhow::anyhow!(
            "config file {}: {}",
            path.display(),
            first.trim_start_matches("error: ")
        )
    })?;
    Cli::from_arg_matches(&matches).map_err(|e| anyhow::anyhow!("{e}"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = parse_cli(std::env::args_os().collect())?;
    init_logging(cli.log_format);
    match cli.command {
        Command::ClusterKey { out } => {
            if out.exists() {
                anyhow::bail!(
                    "{} exists: a cluster key is never overwritten (every node must hold the \
                     same one); remove it first to replace it on every node",
                    out.display()
                );
            }
            let key = rendezvous::nodelink::ClusterKey::generate();
            certs::durable::write_private_file(&out, format!("{}\n", key.to_hex()).as_bytes())
                .with_context(|| format!("writing the cluster key to {}", out.display()))?;
            println!(
                "cluster key written to {} (mode 0600): copy it to every node and pass \
                 --cluster-key-file",
                out.display()
            );
            Ok(())
        }
        Command::Fingerprint { data_dir } => {
            println!("{}", rendezvous::fingerprint(&data_dir)?);
            Ok(())
        }
        Command::Serve {
            config: _,
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
            edge,
            max_registered,
            expire_after_days,
            cluster,
            node_id,
            cluster_link,
            cluster_link_announce,
            cluster_key_file,
        } => {
            let mut cluster = cluster_config(cluster, node_id)?;
            let link = link_config(cluster_link, cluster_link_announce, cluster_key_file)?;
            match (&mut cluster, link) {
                (Some(cluster), link) => cluster.link = link,
                (None, Some(_)) => anyhow::bail!(
                    "--cluster-link and --cluster-key-file are for a cluster node: add --cluster URL"
                ),
                (None, None) => {}
            }
            let cluster_line = cluster.as_ref().map(|c| {
                format!(
                    "cluster node {} (registry in Redis at {})",
                    c.node_id,
                    rendezvous::cluster::redact_password(&c.url)
                )
            });
            let (tunnel_limits, metrics_limits) = edge.limits();
            let tcp_required = tcp_listen.as_deref().is_some_and(|t| t != "off");
            let tcp_listen =
                match tcp_listen.as_deref() {
                    Some("off") => None,
                    Some(addr) => Some(addr.parse::<SocketAddr>().with_context(|| {
                        format!("--tcp-listen {addr:?} is not IP:PORT or `off`")
                    })?),
                    None => Some(SocketAddr::new(listen.ip(), 443)),
                };
            let stun = stun_config(stun_alt_port.as_deref(), stun_alt_ip, listen)?;
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
                stun,
                metrics,
                tunnel_limits,
                metrics_limits,
                registry: RegistryLimits {
                    max_registered,
                    expire_after: std::time::Duration::from_secs(
                        u64::from(expire_after_days) * 86_400,
                    ),
                    ..RegistryLimits::default()
                },
                cluster,
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
            println!("{}", server.stun_alternates().describe());
            if let Some(metrics) = server.metrics_addr() {
                println!("metrics on http://{metrics}/metrics");
            }
            println!("server key {}", server.fingerprint());
            if let Some(link) = server.link_addr() {
                println!("node link on {link} (cross-node relay, QUIC over UDP)");
            }
            match cluster_line {
                Some(line) => println!("{line}"),
                None => println!(
                    "data dir {} ({} registered peers loaded)",
                    data_dir.display(),
                    server.registered_at_start()
                ),
            }
            wait_for_signal().await?;
            println!("shutting down");
            server.shutdown().await;
            Ok(())
        }
    }
}

/// `--cluster URL --node-id NAME`: both or neither (checked here rather than by clap, since
/// one may come from the config file and the other from the command line).
fn cluster_config(
    url: Option<String>,
    node_id: Option<String>,
) -> anyhow::Result<Option<rendezvous::cluster::ClusterConfig>> {
    match (url, node_id) {
        (Some(url), Some(node_id)) => Ok(Some(rendezvous::cluster::ClusterConfig {
            url,
            node_id,
            timings: Default::default(),
            link: None,
        })),
        (None, None) => Ok(None),
        (Some(_), None) => anyhow::bail!("--cluster needs --node-id NAME (unique in the cluster)"),
        (None, Some(_)) => anyhow::bail!("--node-id is for a cluster node: add --cluster URL"),
    }
}

/// `--cluster-link ADDR --cluster-key-file FILE [--cluster-link-announce ADDR]`: the link and
/// the key go together.
fn link_config(
    listen: Option<SocketAddr>,
    announce: Option<SocketAddr>,
    key_file: Option<PathBuf>,
) -> anyhow::Result<Option<rendezvous::nodelink::LinkConfig>> {
    match (listen, key_file) {
        (Some(listen), Some(key_file)) => Ok(Some(rendezvous::nodelink::LinkConfig {
            listen,
            announce,
            key: rendezvous::nodelink::ClusterKey::load(&key_file)?,
        })),
        (None, None) if announce.is_none() => Ok(None),
        (None, None) => anyhow::bail!("--cluster-link-announce needs --cluster-link IP:PORT"),
        (Some(_), None) => anyhow::bail!(
            "--cluster-link needs --cluster-key-file FILE (the key every node shares; make one \
             with `openssl rand -hex 32`)"
        ),
        (None, Some(_)) => anyhow::bail!("--cluster-key-file needs --cluster-link IP:PORT"),
    }
}

async fn wait_for_signal() -> anyhow::Result<()> {
    transport::shutdown_signal()
        .await
        .context("waiting for SIGINT or SIGTERM")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edge_flag_defaults_are_the_library_defaults() {
        let cli = Cli::try_parse_from(["rendezvous", "serve"]).unwrap();
        let Command::Serve { edge, .. } = cli.command else {
            panic!("serve");
        };
        assert_eq!(
            edge.limits(),
            (TunnelLimits::default(), MetricsLimits::default())
        );
        assert!(seconds("0").is_err() && seconds("x").is_err() && seconds("-1").is_err());
        assert_eq!(seconds("0.5"), Ok(Duration::from_millis(500)));
    }

    /// `rendezvous serve` with no STUN options serves behaviour discovery on the port after
    /// the listen port (optional: a busy port does not stop the server); `off` turns it off; a
    /// port given must be bound.
    #[test]
    fn stun_discovery_is_on_by_default_on_the_next_port() {
        let stun = |args: &[&str]| {
            let mut all = vec!["rendezvous", "serve"];
            all.extend_from_slice(args);
            let cli = Cli::try_parse_from(all).unwrap();
            let Command::Serve {
                stun_alt_port,
                stun_alt_ip,
                listen,
                ..
            } = cli.command
            else {
                panic!("serve");
            };
            stun_config(stun_alt_port.as_deref(), stun_alt_ip, listen)
        };
        let default = stun(&[]).unwrap();
        assert_eq!(
            (default.alt_port, default.alt_ip, default.optional),
            (Some(7001), None, true)
        );
        let other = stun(&["--listen", "192.0.2.1:3478"]).unwrap();
        assert_eq!(other.alt_port, Some(3479));
        // Port 0: the alternate is an ephemeral port too; no port above 65535.
        assert_eq!(
            stun(&["--listen", "127.0.0.1:0"]).unwrap().alt_port,
            Some(0)
        );
        assert_eq!(
            stun(&["--listen", "127.0.0.1:65535"]).unwrap().alt_port,
            None
        );
        let off = stun(&["--stun-alt-port", "off"]).unwrap();
        assert_eq!((off.alt_port, off.alt_ip), (None, None));
        let given = stun(&["--stun-alt-port", "4000", "--stun-alt-ip", "192.0.2.2"]).unwrap();
        assert_eq!(
            (given.alt_port, given.alt_ip, given.optional),
            (Some(4000), Some("192.0.2.2".parse().unwrap()), false)
        );
        // A second IP with the default alternate port.
        let ip_only = stun(&["--stun-alt-ip", "192.0.2.2"]).unwrap();
        assert_eq!((ip_only.alt_port, ip_only.optional), (Some(7001), true));
        let err = |args: &[&str]| format!("{:#}", stun(args).unwrap_err());
        assert!(err(&["--stun-alt-port", "x"]).contains("not a port or `off`"));
        assert!(
            err(&["--stun-alt-port", "off", "--stun-alt-ip", "192.0.2.2"])
                .contains("needs an alternate port")
        );
    }

    /// A config file in a fresh temporary directory, removed on drop.
    struct ConfigFile(PathBuf);

    impl ConfigFile {
        fn new(text: &[u8]) -> ConfigFile {
            let dir = std::env::temp_dir().join(format!(
                "rv-config-{}-{}",
                std::process::id(),
                rand::random::<u64>()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("rendezvous.toml");
            std::fs::write(&path, text).unwrap();
            ConfigFile(path)
        }
    }

    impl Drop for ConfigFile {
        fn drop(&mut self) {
            if let Some(dir) = self.0.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    fn serve_with(file: &ConfigFile, extra: &[&str]) -> anyhow::Result<Command> {
        let mut args: Vec<std::ffi::OsString> = vec![
            "rendezvous".into(),
            "serve".into(),
            "--config".into(),
            file.0.clone().into(),
        ];
        args.extend(extra.iter().map(Into::into));
        parse_cli(args).map(|cli| cli.command)
    }

    /// Every option of the file is used, the command line overrides it, and the file's values
    /// pass the CLI's own checks.
    #[test]
    fn config_file_sets_options_and_the_command_line_wins() {
        let file = ConfigFile::new(
            br#"
# a comment
listen = "127.0.0.1:7100"
data-dir = "/var/lib/rendezvous"
max-connections = 1234
expire-after-days = 7
tcp-listen = "off"
tunnel-handshake-timeout = 2.5
metrics-per-source = 3
"#,
        );
        let Command::Serve {
            listen,
            data_dir,
            max_connections,
            expire_after_days,
            tcp_listen,
            edge,
            max_registered,
            ..
        } = serve_with(&file, &["--max-connections", "99"]).unwrap()
        else {
            panic!("serve");
        };
        assert_eq!(listen, "127.0.0.1:7100".parse().unwrap());
        assert_eq!(data_dir, PathBuf::from("/var/lib/rendezvous"));
        assert_eq!(max_connections, 99, "the command line overrides the file");
        assert_eq!(expire_after_days, 7);
        assert_eq!(tcp_listen.as_deref(), Some("off"));
        assert_eq!(edge.tunnel_handshake_timeout, Duration::from_millis(2500));
        assert_eq!(edge.metrics_per_source, 3);
        // Not in the file: the default.
        assert_eq!(max_registered, RegistryLimits::default().max_registered);
    }

    /// A typo is never ignored: the unknown key is named (with the dashed spelling when it is
    /// only the underscores); values of the wrong type or out of range name the file and key.
    #[test]
    fn config_file_errors_name_the_key() {
        let err = |text: &str| {
            let file = ConfigFile::new(text.as_bytes());
            format!("{:#}", serve_with(&file, &[]).unwrap_err())
        };
        let typo = err("max_connections = 5\n");
        assert!(typo.contains("unknown key `max_connections`"), "{typo}");
        assert!(typo.contains("did you mean `max-connections`"), "{typo}");
        let unknown = err("listen = \"127.0.0.1:1\"\nfrobnicate = 1\n");
        assert!(unknown.contains("unknown key `frobnicate`"), "{unknown}");
        // `config` is not an option of the file (no includes).
        assert!(err("config = \"/etc/x\"\n").contains("unknown key `config`"));
        let table = err("[serve]\nlisten = \"127.0.0.1:1\"\n");
        assert!(table.contains("unknown key `serve`"), "{table}");
        let list = err("listen = [\"127.0.0.1:1\"]\n");
        assert!(list.contains("key `listen`: a list"), "{list}");
        let range = err("expire-after-days = 0\n");
        assert!(
            range.contains("config file") && range.contains("0"),
            "{range}"
        );
        let addr = err("listen = \"nowhere\"\n");
        assert!(
            addr.contains("config file") && addr.contains("nowhere"),
            "{addr}"
        );
        let syntax = err("listen = \n");
        assert!(syntax.contains("not valid TOML"), "{syntax}");
        let big = ConfigFile::new(&vec![b'#'; 100 * 1024]);
        let too_large = format!("{:#}", serve_with(&big, &[]).unwrap_err());
        assert!(too_large.contains("at most 65536"), "{too_large}");
        let missing = parse_cli(vec![
            "rendezvous".into(),
            "serve".into(),
            "--config".into(),
            "/nonexistent/rendezvous.toml".into(),
        ]);
        assert!(format!("{:#}", missing.unwrap_err()).contains("/nonexistent/rendezvous.toml"));
    }

    /// `--cluster-link` and `--cluster-key-file` go together (and with a cluster); the key
    /// file must hold 64 hex digits and be private to its owner; the file's keys are the
    /// options' names.
    #[test]
    fn link_flags_come_together_and_the_key_file_is_checked() {
        use std::os::unix::fs::PermissionsExt;
        let err = |listen: Option<&str>, announce: Option<&str>, key: Option<PathBuf>| {
            link_config(
                listen.map(|a| a.parse().unwrap()),
                announce.map(|a| a.parse().unwrap()),
                key,
            )
            .unwrap_err()
            .to_string()
        };
        assert!(err(Some("127.0.0.1:7001"), None, None).contains("needs --cluster-key-file"));
        assert!(err(None, None, Some("k".into())).contains("needs --cluster-link"));
        assert!(err(None, Some("127.0.0.1:7001"), None).contains("needs --cluster-link"));
        assert!(link_config(None, None, None).unwrap().is_none());
        let key = rendezvous::nodelink::ClusterKey::generate();
        let file = ConfigFile::new(key.to_hex().as_bytes());
        std::fs::set_permissions(&file.0, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(err(Some("127.0.0.1:7001"), None, Some(file.0.clone())).contains("chmod 600"));
        std::fs::set_permissions(&file.0, std::fs::Permissions::from_mode(0o600)).unwrap();
        let link = link_config(
            Some("127.0.0.1:7001".parse().unwrap()),
            None,
            Some(file.0.clone()),
        )
        .unwrap()
        .unwrap();
        assert_eq!(link.key, key);
        std::fs::write(&file.0, "not a key").unwrap();
        assert!(err(Some("127.0.0.1:7001"), None, Some(file.0.clone())).contains("64 hex digits"));
        let toml = ConfigFile::new(
            b"cluster-link = \"10.0.0.1:7001\"\ncluster-key-file = \"/etc/rendezvous/cluster.key\"\n",
        );
        let Command::Serve {
            cluster_link,
            cluster_key_file,
            ..
        } = serve_with(&toml, &[]).unwrap()
        else {
            panic!("serve");
        };
        assert_eq!(cluster_link, Some("10.0.0.1:7001".parse().unwrap()));
        assert_eq!(
            cluster_key_file,
            Some(PathBuf::from("/etc/rendezvous/cluster.key"))
        );
    }

    /// `--cluster` and `--node-id` go together, on the command line or in the file; the
    /// password in the URL is never printed.
    #[test]
    fn cluster_flags_come_together_and_hide_the_password() {
        let parse = |args: &[&str]| {
            let mut all = vec!["rendezvous", "serve"];
            all.extend_from_slice(args);
            Cli::try_parse_from(all)
        };
        let cluster = |args: &[&str]| {
            let Command::Serve {
                cluster, node_id, ..
            } = parse(args).unwrap().command
            else {
                panic!("serve");
            };
            cluster_config(cluster, node_id).map_err(|e| e.to_string())
        };
        assert!(cluster(&["--cluster", "redis://127.0.0.1:6379/"])
            .unwrap_err()
            .contains("needs --node-id"));
        assert!(cluster(&["--node-id", "a"])
            .unwrap_err()
            .contains("add --cluster"));
        assert_eq!(cluster(&[]), Ok(None));
        let both = cluster(&["--cluster", "redis://127.0.0.1:6379/", "--node-id", "a"]);
        assert_eq!(both.unwrap().unwrap().node_id, "a");
        let file = ConfigFile::new(b"cluster = \"redis://10.0.0.5:6379/\"\nnode-id = \"eu-1\"\n");
        let Command::Serve {
            cluster, node_id, ..
        } = serve_with(&file, &["--node-id", "eu-2"]).unwrap()
        else {
            panic!("serve");
        };
        assert_eq!(cluster.as_deref(), Some("redis://10.0.0.5:6379/"));
        assert_eq!(node_id.as_deref(), Some("eu-2"));
        assert_eq!(
            rendezvous::cluster::redact_password("redis://:s3cr@t@10.0.0.5:6379/0"),
            "redis://:***@10.0.0.5:6379/0"
        );
        assert_eq!(
            rendezvous::cluster::redact_password("redis://rv:pw@h:1/"),
            "redis://rv:***@h:1/"
        );
        assert_eq!(
            rendezvous::cluster::redact_password("redis://h:1/"),
            "redis://h:1/"
        );
    }

    /// The example config file that docs/deploy.md installs is one `serve` accepts.
    #[test]
    fn the_deploy_config_file_parses() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/rendezvous.toml");
        let cli = parse_cli(vec![
            "rendezvous".into(),
            "serve".into(),
            "--config".into(),
            path.into(),
        ])
        .unwrap();
        let Command::Serve {
            listen,
            data_dir,
            tcp_listen,
            metrics,
            cluster,
            ..
        } = cli.command
        else {
            panic!("serve");
        };
        assert_eq!(listen, "[::]:7000".parse().unwrap());
        assert_eq!(data_dir, PathBuf::from("/var/lib/rendezvous"));
        assert_eq!(tcp_listen.as_deref(), Some("[::]:443"));
        assert_eq!(metrics, Some("127.0.0.1:9100".parse().unwrap()));
        assert_eq!(cluster, None);
    }

    /// The example config file names every option of `serve` (set, or commented with its
    /// default or an example), and every value it shows is one `serve` accepts: with every
    /// commented key set (the first of each), the file still parses.
    #[test]
    fn the_deploy_config_file_shows_every_serve_option_with_a_valid_value() {
        let text = include_str!("../../deploy/rendezvous.toml");
        let key_of = |line: &str| -> Option<(bool, String)> {
            let (commented, rest) = match line.strip_prefix("# ") {
                Some(rest) => (true, rest),
                None => (false, line),
            };
            let (key, _) = rest.split_once(" = ")?;
            let is_key = !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '-');
            is_key.then(|| (commented, key.to_owned()))
        };
        let shown: Vec<String> = text.lines().filter_map(key_of).map(|(_, k)| k).collect();
        let command = Cli::command();
        let serve = command
            .get_subcommands()
            .find(|c| c.get_name() == "serve")
            .expect("a serve command");
        let mut options: Vec<String> = serve
            .get_arguments()
            .chain(command.get_arguments())
            .filter_map(|a| a.get_long())
            .filter(|long| !matches!(*long, "config" | "help" | "version"))
            .map(str::to_owned)
            .collect();
        options.sort();
        options.dedup();
        assert!(options.len() > 30, "{options:?}");
        for option in &options {
            assert!(
                shown.contains(option),
                "deploy/rendezvous.toml does not show `{option}`"
            );
        }
        for key in &shown {
            assert!(options.contains(key), "`{key}` is no option of serve");
        }
        // Every commented key set (the first line of each; the cluster URL has an alternative).
        let mut seen = std::collections::HashSet::new();
        let all: String = text
            .lines()
            .filter_map(|line| {
                let (commented, key) = key_of(line)?;
                if !seen.insert(key) {
                    return None;
                }
                Some(if commented { &line[2..] } else { line })
            })
            .map(|line| format!("{line}\n"))
            .collect();
        let file = ConfigFile::new(all.as_bytes());
        let Command::Serve {
            stun_alt_ip,
            relay_trace,
            cluster,
            node_id,
            cluster_link_announce,
            ..
        } = serve_with(&file, &[]).expect("every value in the example parses")
        else {
            panic!("serve");
        };
        assert_eq!(stun_alt_ip, Some("198.51.100.2".parse().unwrap()));
        assert!(relay_trace.is_some());
        assert_eq!(cluster.as_deref(), Some("redis://10.0.0.5:6379/"));
        assert_eq!(node_id.as_deref(), Some("eu-1"));
        assert_eq!(
            cluster_link_announce,
            Some("10.0.0.11:7100".parse().unwrap())
        );
    }

    #[test]
    fn default_expiry_is_the_librarys() {
        assert_eq!(
            u64::from(DEFAULT_EXPIRE_AFTER_DAYS) * 86_400,
            RegistryLimits::default().expire_after.as_secs()
        );
    }
}
