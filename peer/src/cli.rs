//! The command line's grammar: every subcommand, flag and default of `peer`, and the small
//! parsers (sizes, seconds) that turn flag text into values. Kept apart from `main.rs` so that
//! the dispatch there reads as what each command does, and so that the grammar is tested
//! without running anything.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::anyhow;
use certs::Fingerprint;
use clap::{Args, Parser, Subcommand};
use common::PeerId;
use peer::commands::ServerOptions;
use peer::endpoint::TcpTunnel;

/// A peer: registers with a rendezvous and talks to other peers by id over QUIC.
#[derive(Parser, Debug)]
#[command(name = "peer", version)]
pub(crate) struct Cli {
    /// Identity key file (created with mode 0600 on first use).
    /// Default: <config dir>/identity.pem.
    #[arg(long, global = true)]
    pub(crate) identity: Option<PathBuf>,
    /// Directory for the identity, the known-servers file and the peer cache.
    /// Default: $XDG_CONFIG_HOME/p2p or ~/.config/p2p.
    #[arg(long, global = true)]
    pub(crate) config_dir: Option<PathBuf>,
    /// More detail on stderr (candidates, attempts).
    #[arg(long, short, global = true)]
    pub(crate) verbose: bool,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
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
        /// Offer the TCP service at HOST:PORT under NAME to the peers of the allow-list
        /// (repeatable): they reach it with `peer pipe` and `peer forward`. Needs an allow-list
        /// (--allow or <config dir>/authorized_peers); refused with --allow-any.
        #[arg(long, value_name = "NAME=HOST:PORT", value_parser = peer::services::parse_expose)]
        expose: Vec<(String, String)>,
    },
    /// Join stdin and stdout to a TCP service the peer exposes (`peer listen --expose`), until
    /// both sides ended. Usable as ssh's ProxyCommand:
    /// `ssh -o ProxyCommand='peer pipe %h ssh --server HOST:PORT' PEER_ID`.
    Pipe {
        /// The peer's id.
        peer: PeerId,
        /// The service's name.
        #[arg(default_value = "ssh")]
        service: String,
        #[command(flatten)]
        server: ServerArgs,
        /// Seconds to wait for the peer to answer the connection.
        #[arg(long, default_value_t = 20.0)]
        dial_timeout: f64,
    },
    /// Listen on a local TCP address and carry every connection accepted there to a TCP
    /// service the peer exposes (`peer listen --expose`), until SIGINT/SIGTERM.
    Forward {
        /// The peer's id.
        peer: PeerId,
        /// The service's name.
        service: String,
        /// The local address to listen on (port 0: any free port, printed).
        #[arg(long, value_name = "ADDR")]
        local: SocketAddr,
        #[command(flatten)]
        server: ServerArgs,
        /// Seconds to wait for the peer to answer the connection.
        #[arg(long, default_value_t = 20.0)]
        dial_timeout: f64,
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
    /// and succeeds only once the receiver has verified the whole file's hash (BLAKE3).
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
        /// Test IPv6 reachability against this STUN server, HOST:PORT of an IPv6 address (default:
        /// the IPv6 address of --server or the first --stun, if its name has one).
        #[arg(long)]
        stun6: Option<String>,
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
        /// The rendezvous, HOST:PORT (repeatable: the nodes of one cluster): ping from a peer
        /// of our own when no peer runs with this config dir.
        #[arg(long)]
        server: Vec<String>,
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
pub(crate) struct AccessArgs {
    /// Accept only this peer (repeatable; together with the ids in <config dir>/authorized_peers,
    /// one per line with optional `# comments`). Others are refused and told why.
    #[arg(long = "allow", value_name = "ID")]
    pub(crate) allow: Vec<PeerId>,
    /// Accept every peer that knows this peer's id, even with --accept-files (conflicts with an
    /// allow-list).
    #[arg(long)]
    pub(crate) allow_any: bool,
}

/// A byte count: digits, optionally followed by K, M, G or T (powers of 1024; `B`, `iB` and
/// `IB` suffixes after them are accepted too).
pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
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
pub(crate) struct ServerArgs {
    /// The rendezvous, HOST:PORT. Repeatable: the nodes of one cluster; the peer registers with
    /// the fastest and moves to another when its node stops answering. A name with several
    /// addresses counts as several nodes.
    #[arg(long, required = true)]
    pub(crate) server: Vec<String>,
    #[command(flatten)]
    pub(crate) session: SessionArgs,
}

/// How to reach and trust the rendezvous (besides its address).
#[derive(Args, Debug, Clone)]
pub(crate) struct SessionArgs {
    /// The rendezvous key fingerprint (`sha256:...`, printed by the server at start).
    /// Repeatable: with several servers, give every node's key; each server must present one of
    /// them. Without it each server's key is trusted on first use and remembered.
    #[arg(long)]
    pub(crate) server_key: Vec<Fingerprint>,
    /// Local UDP address to bind (one socket carries all traffic). The default `[::]:0` is one
    /// dual-stack socket for IPv4 and IPv6; `0.0.0.0:0` keeps the peer on IPv4 only.
    #[arg(long, default_value = "[::]:0")]
    pub(crate) bind: SocketAddr,
    /// Seconds to wait for the first registration.
    #[arg(long, default_value_t = 10.0)]
    pub(crate) register_timeout: f64,
    /// The rendezvous's TLS tunnel, used when UDP does not get through
    /// (default: the server's host, port 443; `off` disables it).
    #[arg(long)]
    pub(crate) server_tcp: Option<String>,
    /// Do not ask the router to map our UDP port (PCP, NAT-PMP, UPnP IGD).
    #[arg(long)]
    pub(crate) no_port_mapping: bool,
    /// Never use birthday punching (many extra sockets or probes to get through a symmetric
    /// NAT); such pairs stay relayed.
    #[arg(long)]
    pub(crate) no_birthday_punch: bool,
    /// IP TTL of the opening probes sent when punching starts: they open our own NAT toward
    /// the peer and die before the peer's NAT, so that the peer's probes cannot arrive first
    /// (some routers then give us a new port for that peer). Raise it if more than one NAT of
    /// your own stands in the way (3 behind a carrier-grade NAT); `off` sends none (and, as the
    /// responder, does not wait for the initiator's first probe).
    #[arg(long, default_value = "2", value_parser = opening_ttl)]
    pub(crate) opening_ttl: OpeningTtl,
    /// Never seek a direct path: every connection stays on the rendezvous's relay (to measure
    /// or test the relay; it does not hide our addresses, which the rendezvous still hands to
    /// the peers we are introduced to).
    #[arg(long)]
    pub(crate) relay_only: bool,
    /// Keep relayed packets on the relay stream (inside the QUIC connection to the rendezvous)
    /// instead of relay channels (plain UDP datagrams the rendezvous forwards unopened; the
    /// default, and about twice as fast). For a network that lets QUIC through to the rendezvous
    /// but not other UDP, and for comparisons.
    #[arg(long)]
    pub(crate) no_relay_channel: bool,
    /// With several --server: register with the first one given that answers (the others are
    /// standbys, in the order given) instead of the fastest.
    #[arg(long)]
    pub(crate) prefer_first_server: bool,
}

/// `--opening-ttl`: 1-255 or `off`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OpeningTtl(pub(crate) Option<u8>);

fn opening_ttl(text: &str) -> Result<OpeningTtl, String> {
    if text == "off" {
        return Ok(OpeningTtl(None));
    }
    match text.parse::<u8>() {
        Ok(0) | Err(_) => Err(format!("{text:?} is not a TTL (1-255) or `off`")),
        Ok(ttl) => Ok(OpeningTtl(Some(ttl))),
    }
}

pub(crate) fn seconds(value: f64, what: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value)
        .map_err(|_| anyhow!("{what} must be a non-negative number of seconds"))
}

impl ServerArgs {
    /// The library's view of the rendezvous flags.
    pub(crate) fn options(&self) -> anyhow::Result<ServerOptions> {
        let session = &self.session;
        let (first, others) = self
            .server
            .split_first()
            .ok_or_else(|| anyhow!("--server is required"))?;
        Ok(ServerOptions {
            address: first.clone(),
            others: others.to_vec(),
            server_key: session.server_key.clone(),
            bind: session.bind,
            register_timeout: seconds(session.register_timeout, "--register-timeout")?,
            opening_ttl: session.opening_ttl.0,
            tcp_tunnel: match session.server_tcp.as_deref() {
                Some("off") => TcpTunnel::Off,
                Some(addr) => TcpTunnel::At(addr.to_owned()),
                None => TcpTunnel::SameHost,
            },
            port_mapping: !session.no_port_mapping,
            birthday_punch: !session.no_birthday_punch,
            relay_only: session.relay_only,
            relay_channels: !session.no_relay_channel,
            prefer_first_server: session.prefer_first_server,
        })
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

    #[test]
    fn server_and_server_key_repeat_and_a_server_is_required() {
        let key = "sha256:".to_owned() + &"ab".repeat(32);
        let cli = Cli::try_parse_from([
            "peer",
            "listen",
            "--server",
            "a:1",
            "--server",
            "b:2",
            "--server-key",
            &key,
            "--server-key",
            &key,
            "--relay-only",
        ])
        .unwrap();
        let Command::Listen { server, .. } = cli.command else {
            panic!("not listen");
        };
        let options = server.options().unwrap();
        assert_eq!(options.address, "a:1");
        assert_eq!(options.others, vec!["b:2".to_owned()]);
        assert_eq!(options.server_key.len(), 2);
        assert!(options.relay_only);
        assert!(Cli::try_parse_from(["peer", "listen"]).is_err());
        // ping's server is optional (it may go through the running peer), and repeatable.
        let id = PeerId::from_key_digest(&[1; 32]).to_string();
        let cli = Cli::try_parse_from(["peer", "ping", &id, "--server", "a:1", "--server", "b:2"])
            .unwrap();
        let Command::Ping { server, .. } = cli.command else {
            panic!("not ping");
        };
        assert_eq!(server.len(), 2);
    }

    #[test]
    fn every_command_that_opens_the_endpoint_takes_no_port_mapping() {
        let id = PeerId::from_key_digest(&[1; 32]).to_string();
        let commands: [&[&str]; 6] = [
            &["listen"],
            &["connect", &id],
            &["send", &id, "/etc/hostname"],
            &["ping", &id, "--server", "h:1"],
            &["pipe", &id, "ssh"],
            &["forward", &id, "web", "--local", "127.0.0.1:8080"],
        ];
        for command in commands {
            let mut args = vec!["peer"];
            args.extend_from_slice(command);
            if !command.contains(&"ping") {
                args.extend(["--server", "h:1"]);
            }
            args.push("--no-port-mapping");
            let cli = Cli::try_parse_from(&args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            let session = match cli.command {
                Command::Listen { server, .. }
                | Command::Connect { server, .. }
                | Command::Send { server, .. }
                | Command::Pipe { server, .. }
                | Command::Forward { server, .. } => server.session,
                Command::Ping { session, .. } => session,
                _ => panic!("{args:?}"),
            };
            assert!(session.no_port_mapping, "{args:?}");
        }
    }
}
