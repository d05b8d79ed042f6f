//! The `peer` program's commands as library calls. Each takes what the command line gave (an
//! [`Endpoint`] bound with [`endpoint_config`], a peer id, options), does the work, closes the
//! endpoint, and returns what there is to show; the program only parses arguments, calls these
//! and prints. Events along the way (connected, progress, pongs) go to the endpoint's
//! [`Console`](crate::console::Console) as its [`Output`] says.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use certs::Fingerprint;
use common::message::Candidate;
use common::PeerId;

use crate::access::Refused;
use crate::cache::PeerCache;
use crate::endpoint::{
    ConnectError, Connection, ControlSocket, Endpoint, EndpointConfig, Output, QueryError,
    Rendezvous, RendezvousTrust, TcpTunnel,
};
use crate::ping::{PingError, PingOptions, PingSummary};

/// The peer cache's file name in the config dir.
pub const PEER_CACHE_FILE: &str = "peers.json";
/// The known-servers file's name in the config dir (rendezvous keys trusted on first use).
pub const KNOWN_SERVERS_FILE: &str = "known_servers";
/// The identity key's file name in the config dir.
pub const IDENTITY_FILE: &str = "identity.pem";

/// The config dir when none is given: `$XDG_CONFIG_HOME/p2p`, else `~/.config/p2p`, else
/// `.p2p` in the current directory.
pub fn default_config_dir() -> PathBuf {
    if let Some(xdg) = std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(xdg).join("p2p");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".config").join("p2p"),
        None => PathBuf::from(".p2p"),
    }
}

/// The config dir could not be created.
#[derive(Debug, thiserror::Error)]
#[error("cannot create the config dir {}", path.display())]
pub struct ConfigDirError {
    /// The directory.
    pub path: PathBuf,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

/// What [`prepare_config_dir`] did about the directory's permissions (it holds the identity key
/// and the control socket, so only its owner may enter it).
#[derive(Debug)]
pub enum DirPrivacy {
    /// It was private already (or belongs to another user, and is left alone).
    Unchanged,
    /// Its mode was wider; it is now 0700.
    Tightened {
        /// The mode it had.
        old_mode: u32,
    },
    /// Its mode could not be checked or changed.
    Failed(std::io::Error),
}

/// Creates the config dir with mode 0700 if it does not exist, and makes an existing one of
/// ours private.
pub fn prepare_config_dir(dir: &Path) -> Result<DirPrivacy, ConfigDirError> {
    certs::durable::create_private_dir(dir).map_err(|source| ConfigDirError {
        path: dir.to_owned(),
        source,
    })?;
    Ok(match certs::durable::tighten_own_dir(dir) {
        Ok(Some(old_mode)) => DirPrivacy::Tightened { old_mode },
        Ok(None) => DirPrivacy::Unchanged,
        Err(e) => DirPrivacy::Failed(e),
    })
}

/// Which command an endpoint runs: what it starts and where its events go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `peer listen`.
    Listen,
    /// `peer connect`.
    Connect,
    /// `peer send`.
    Send,
    /// `peer lookup`: over in a moment.
    Lookup,
    /// `peer pipe`: stdout carries the service's bytes, so every event goes to stderr.
    Pipe,
    /// `peer forward`.
    Forward,
    /// `peer ping`; with `json`, stdout carries only the summary.
    Ping {
        /// The summary is printed as JSON.
        json: bool,
    },
}

impl Role {
    /// The command's name (shown by `peer status`).
    pub fn name(self) -> &'static str {
        match self {
            Role::Listen => "listen",
            Role::Connect => "connect",
            Role::Send => "send",
            Role::Lookup => "lookup",
            Role::Pipe => "pipe",
            Role::Forward => "forward",
            Role::Ping { .. } => "ping",
        }
    }
}

/// How a command reaches and trusts the rendezvous.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// HOST:PORT.
    pub address: String,
    /// More nodes of the same cluster, HOST:PORT each (`--server` repeated).
    pub others: Vec<String>,
    /// The servers' key fingerprints (each server must present one of them); empty trusts each
    /// on first use (remembered in the config dir).
    pub server_key: Vec<Fingerprint>,
    /// Our local UDP address.
    pub bind: SocketAddr,
    /// How long to wait for the first registration.
    pub register_timeout: Duration,
    /// IP TTL of the opening probes (`None`: none).
    pub opening_ttl: Option<u8>,
    /// The rendezvous's TLS tunnel.
    pub tcp_tunnel: TcpTunnel,
    /// Ask the router for a port mapping (`--no-port-mapping` turns it off).
    pub port_mapping: bool,
    /// Use birthday punching for pairs that need it (`--no-birthday-punch` turns it off).
    pub birthday_punch: bool,
    /// Never seek a direct path (`--relay-only`).
    pub relay_only: bool,
    /// Relay channels for relayed packets (`--no-relay-channel` turns them off).
    pub relay_channels: bool,
    /// Of several servers, the first given that answers rather than the fastest
    /// (`--prefer-first-server`).
    pub prefer_first_server: bool,
}

/// The endpoint configuration of a command run with `config_dir`: events on the terminal, the
/// peer cache and known servers in the config dir, and (except for a lookup, which is over in
/// a moment) kept paths, a NAT measurement and the control socket.
pub fn endpoint_config(
    server: &ServerOptions,
    config_dir: &Path,
    verbose: bool,
    role: Role,
) -> EndpointConfig {
    let trust = match server.server_key.as_slice() {
        [] => RendezvousTrust::KnownServers(config_dir.join(KNOWN_SERVERS_FILE)),
        [fp] => RendezvousTrust::Pinned(*fp),
        several => RendezvousTrust::PinnedAnyOf(several.to_vec()),
    };
    let mut config = EndpointConfig::new(Rendezvous {
        address: server.address.clone(),
        others: server.others.clone(),
        prefer_first: server.prefer_first_server,
        trust,
        tcp_tunnel: server.tcp_tunnel.clone(),
    });
    config.bind = server.bind;
    config.register_timeout = server.register_timeout;
    config.opening_ttl = server.opening_ttl;
    config.birthday_punch = server.birthday_punch;
    config.relay_only = server.relay_only;
    config.relay_channels = server.relay_channels;
    config.peer_cache = Some(config_dir.join(PEER_CACHE_FILE));
    config.output = Output::Terminal {
        events_to_stderr: matches!(role, Role::Ping { json: true } | Role::Pipe),
    };
    config.verbose = verbose;
    let long_lived = role != Role::Lookup;
    config.keep_paths = long_lived;
    config.measure_nat = long_lived;
    // A lookup is over in a moment: a mapping would be deleted as soon as it was made.
    config.port_mapping = long_lived && server.port_mapping;
    // A pipe runs under ssh, once per login: it would only warn that the config dir's peer
    // already serves the socket.
    config.control = (long_lived && role != Role::Pipe).then(|| ControlSocket {
        config_dir: config_dir.to_owned(),
        mode: role.name(),
    });
    config
}

/// Connects `endpoint` to `peer`; the connection answers the pings the peer sends on it. On
/// failure the endpoint is closed.
pub async fn open_connection(
    endpoint: Endpoint,
    peer: PeerId,
) -> Result<(Endpoint, Connection), ConnectError> {
    match endpoint.connect(peer).await {
        Ok(conn) => {
            crate::dial::answer_pings(endpoint.path_keeper().clone(), conn.quinn().clone());
            Ok((endpoint, conn))
        }
        Err(e) => {
            endpoint.close().await;
            Err(e)
        }
    }
}

/// Why `peer connect` failed.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// No connection.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The chat itself.
    #[error(transparent)]
    Chat(#[from] crate::chat::ConverseError),
}

/// `peer connect`: connects `endpoint` to `peer` and chats, `lines` going out, until our input
/// ends or the peer ends the chat; closes the endpoint.
pub async fn chat(
    endpoint: Endpoint,
    peer: PeerId,
    lines: tokio::sync::mpsc::Receiver<String>,
) -> Result<(), ChatError> {
    let (endpoint, conn) = open_connection(endpoint, peer).await?;
    // With several servers, say when the registration moves to another (as `listen` does).
    let watcher = (endpoint.path_keeper().session.server_addrs().len() > 1).then(|| {
        tokio::spawn(crate::listener::watch_session(
            endpoint.registration(),
            endpoint.console().clone(),
        ))
    });
    let result = crate::chat::converse(&endpoint, &conn, lines).await;
    if let Some(watcher) = watcher {
        watcher.abort();
        let _ = watcher.await;
    }
    endpoint.close().await;
    Ok(result?)
}

/// Why `peer send` failed.
#[derive(Debug, thiserror::Error)]
pub enum SendFileError {
    /// No connection.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The receiver closed the connection: its allow-list does not name us.
    #[error(transparent)]
    Refused(#[from] Refused),
    /// The transfer failed (the text says where).
    #[error(transparent)]
    Transfer(#[from] crate::files::SendError),
}

/// `peer send`: connects `endpoint` to `peer`, sends `file` and shows the summary once the
/// receiver verified it; closes the endpoint.
pub async fn send_file(endpoint: Endpoint, peer: PeerId, file: &Path) -> Result<(), SendFileError> {
    let (endpoint, conn) = open_connection(endpoint, peer).await?;
    let console = endpoint.console().clone();
    let result = crate::files::send(&conn, file, &console)
        .await
        .map_err(|e| match crate::access::refusal(peer, &conn) {
            Some(refused) => SendFileError::Refused(refused),
            None => SendFileError::Transfer(e),
        });
    if let Ok(summary) = &result {
        console.say(summary.clone()).await;
    }
    conn.close(0u32.into(), b"done");
    endpoint.close().await;
    result.map(|_| ())
}

/// Where [`Lookup`]'s answer comes from.
#[derive(Debug, Clone)]
pub enum LookupSource {
    /// The peer cache, written then.
    Cache {
        /// When the entry was written.
        updated: time::OffsetDateTime,
    },
    /// The rendezvous.
    Rendezvous {
        /// The peer is registered now.
        online: bool,
        /// When the rendezvous last heard from it.
        last_seen: time::OffsetDateTime,
    },
}

/// What `peer lookup` found.
#[derive(Debug, Clone)]
pub struct Lookup {
    /// The peer.
    pub peer: PeerId,
    /// From where.
    pub source: LookupSource,
    /// Its addresses.
    pub candidates: Vec<Candidate>,
}

impl Lookup {
    /// The text `peer lookup` prints: a heading line, then one line per address.
    pub fn render(&self) -> String {
        let peer = self.peer;
        let mut out = match &self.source {
            LookupSource::Cache { updated } => {
                format!("{peer} (cached {})\n", format_time(*updated))
            }
            LookupSource::Rendezvous { online, last_seen } => {
                let status = if *online { "online" } else { "offline" };
                format!(
                    "{peer} (from the rendezvous: {status}, last seen {})\n",
                    format_time(*last_seen)
                )
            }
        };
        for c in &self.candidates {
            out.push_str(&format!("  {} ({})\n", c.addr, c.describe()));
        }
        out
    }
}

fn format_time(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

/// `peer lookup`: the peer cache of a config dir, and the rendezvous for what it lacks.
pub struct PeerLookup {
    cache: PeerCache,
}

impl PeerLookup {
    /// Loads the peer cache of `config_dir`; an unreadable one is reported in the warning and
    /// treated as empty.
    pub fn open(config_dir: &Path) -> (PeerLookup, Option<String>) {
        let (cache, warning) = PeerCache::load(&config_dir.join(PEER_CACHE_FILE));
        (PeerLookup { cache }, warning)
    }

    /// What the cache knows about `peer`.
    pub fn cached(&self, peer: PeerId) -> Option<Lookup> {
        let entry = self.cache.get(&peer)?;
        Some(Lookup {
            peer,
            source: LookupSource::Cache {
                updated: entry.updated,
            },
            candidates: entry.candidates.clone(),
        })
    }

    /// Asks the rendezvous through `endpoint` (closed after) and caches the answer; a cache
    /// that cannot be written is reported in the warning.
    pub async fn ask(
        mut self,
        endpoint: Endpoint,
        peer: PeerId,
    ) -> Result<(Lookup, Option<String>), QueryError> {
        let result = endpoint.query(peer).await;
        endpoint.close().await;
        let info = result?;
        let candidates = crate::cache::candidates_of(&info);
        let warning = self
            .cache
            .put(peer, candidates.clone())
            .err()
            .map(|e| format!("cannot write the peer cache: {e}"));
        let lookup = Lookup {
            peer,
            source: LookupSource::Rendezvous {
                online: info.online,
                last_seen: info.last_seen,
            },
            candidates,
        };
        Ok((lookup, warning))
    }
}

/// Why `peer ping` from an endpoint of its own failed.
#[derive(Debug, thiserror::Error)]
pub enum PingCommandError {
    /// No connection.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The pings.
    #[error(transparent)]
    Ping(#[from] PingError),
}

/// `peer ping` without a running peer: connects `endpoint` to `peer` and pings it (pongs shown
/// on the endpoint's output unless `quiet`); closes the endpoint.
pub async fn ping(
    endpoint: Endpoint,
    peer: PeerId,
    options: PingOptions,
    quiet: bool,
) -> Result<PingSummary, PingCommandError> {
    let (endpoint, conn) = open_connection(endpoint, peer).await?;
    let result = crate::ping::over_connection(&endpoint, &conn, options, quiet).await;
    conn.close(0u32.into(), b"ping done");
    endpoint.close().await;
    Ok(result?)
}

/// A ping that ran but did not get what was asked.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PingVerdict {
    /// `until_direct`, and every pong came over the relay.
    #[error("no direct path to {peer} within {seconds} s")]
    NoDirectPath {
        /// The peer.
        peer: PeerId,
        /// The time allowed, in whole seconds.
        seconds: u64,
    },
    /// No pong at all.
    #[error("no answer from {peer}")]
    NoAnswer {
        /// The peer.
        peer: PeerId,
    },
}

/// Whether `summary` (of a ping to `peer` with `options`) is a success.
pub fn ping_verdict(
    peer: PeerId,
    options: &PingOptions,
    summary: &PingSummary,
) -> Result<(), PingVerdict> {
    if options.until_direct && !summary.direct {
        return Err(PingVerdict::NoDirectPath {
            peer,
            seconds: options.timeout_ms / 1000,
        });
    }
    if summary.received == 0 {
        return Err(PingVerdict::NoAnswer { peer });
    }
    Ok(())
}

/// Installs SIGINT and SIGTERM handlers now; the future completes at the first of them (for
/// `peer listen`: installed before registration is announced, so that a signal right after it
/// stops the listener gracefully instead of killing it).
pub fn stop_signals() -> std::io::Result<impl std::future::Future<Output = ()>> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use common::message::CandidateKind;

    fn server() -> ServerOptions {
        ServerOptions {
            address: "rv.example:7000".into(),
            others: Vec::new(),
            server_key: Vec::new(),
            bind: "0.0.0.0:0".parse().unwrap(),
            register_timeout: Duration::from_secs(3),
            opening_ttl: Some(2),
            tcp_tunnel: TcpTunnel::Off,
            port_mapping: true,
            birthday_punch: true,
            relay_only: false,
            relay_channels: true,
            prefer_first_server: false,
        }
    }

    #[test]
    fn a_lookup_is_short_lived_and_every_other_command_keeps_paths() {
        let dir = Path::new("/cfg");
        let lookup = endpoint_config(&server(), dir, false, Role::Lookup);
        assert!(!lookup.keep_paths && !lookup.measure_nat && lookup.control.is_none());
        assert!(!lookup.port_mapping, "a lookup maps no port");
        for role in [
            Role::Listen,
            Role::Connect,
            Role::Send,
            Role::Ping { json: false },
        ] {
            let config = endpoint_config(&server(), dir, true, role);
            assert!(
                config.keep_paths && config.measure_nat && config.verbose && config.port_mapping,
                "{role:?}"
            );
            let off = ServerOptions {
                port_mapping: false,
                ..server()
            };
            assert!(
                !endpoint_config(&off, dir, true, role).port_mapping,
                "--no-port-mapping: {role:?}"
            );
            let control = config.control.expect("a control socket");
            assert_eq!(
                (control.config_dir.as_path(), control.mode),
                (dir, role.name())
            );
        }
        // The config dir holds the cache and, without a pinned key, the known servers.
        assert_eq!(
            lookup.peer_cache.as_deref(),
            Some(Path::new("/cfg/peers.json"))
        );
        assert!(matches!(
            &lookup.rendezvous.trust,
            RendezvousTrust::KnownServers(path) if path == Path::new("/cfg/known_servers")
        ));
        assert_eq!(lookup.register_timeout, Duration::from_secs(3));
        // Only `ping --json` moves events off stdout.
        let json = endpoint_config(&server(), dir, false, Role::Ping { json: true });
        assert!(matches!(
            json.output,
            Output::Terminal {
                events_to_stderr: true
            }
        ));
        assert!(matches!(
            lookup.output,
            Output::Terminal {
                events_to_stderr: false
            }
        ));
    }

    #[test]
    fn lookups_render_their_source_and_addresses() {
        let peer = PeerId::from_key_digest(&[7; 32]);
        let when = time::OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        let candidates = vec![Candidate {
            addr: "198.51.100.1:4000".parse().unwrap(),
            kind: CandidateKind::Observed,
        }];
        let cached = Lookup {
            peer,
            source: LookupSource::Cache { updated: when },
            candidates: candidates.clone(),
        };
        assert_eq!(
            cached.render(),
            format!("{peer} (cached 2023-11-14T22:13:20Z)\n  198.51.100.1:4000 (public address)\n")
        );
        let asked = Lookup {
            peer,
            source: LookupSource::Rendezvous {
                online: false,
                last_seen: when,
            },
            candidates: Vec::new(),
        };
        assert_eq!(
            asked.render(),
            format!("{peer} (from the rendezvous: offline, last seen 2023-11-14T22:13:20Z)\n")
        );
    }

    #[test]
    fn a_ping_fails_without_pongs_or_without_the_direct_path_it_waited_for() {
        let peer = PeerId::from_key_digest(&[9; 32]);
        let summary: PingSummary = serde_json::from_value(serde_json::json!({
            "peer": peer, "sent": 3, "received": 3, "rtt_ms": null, "path": "relayed",
            "direct": false, "direct_addr": null, "reason": null, "our_nat": null,
            "peer_nat": null, "connect_ms": null, "first_reply_ms": null, "direct_after_ms": null
        }))
        .expect("a summary");
        let mut options = PingOptions {
            count: 3,
            interval_ms: 200,
            until_direct: false,
            timeout_ms: 30_500,
        };
        assert_eq!(ping_verdict(peer, &options, &summary), Ok(()));
        options.until_direct = true;
        let verdict = ping_verdict(peer, &options, &summary).unwrap_err();
        assert_eq!(
            verdict.to_string(),
            format!("no direct path to {peer} within 30 s")
        );
        options.until_direct = false;
        let silent = PingSummary {
            received: 0,
            ..summary
        };
        assert_eq!(
            ping_verdict(peer, &options, &silent)
                .unwrap_err()
                .to_string(),
            format!("no answer from {peer}")
        );
    }

    /// What the rendezvous says about a peer whose router maps its port: the lookup shows the
    /// mapping at the observed IP as `(port mapping)`, beside the observed and LAN addresses;
    /// a mapping of port 0 or of the observed port itself is no extra line.
    #[test]
    fn a_lookup_shows_the_port_mapped_candidate() {
        let peer = PeerId::from_key_digest(&[3; 32]);
        let mut info = common::message::PeerInfo {
            id: peer,
            observed: "203.0.113.21:15352".parse().unwrap(),
            local_addrs: vec!["10.0.1.2:15352".parse().unwrap()],
            mapped_port: Some(56998),
            online: true,
            last_seen: time::macros::datetime!(2026-11-26 13:00:00 UTC),
        };
        let lookup = Lookup {
            peer,
            source: LookupSource::Rendezvous {
                online: true,
                last_seen: info.last_seen,
            },
            candidates: crate::cache::candidates_of(&info),
        };
        let text = lookup.render();
        let lines: Vec<&str> = text.lines().skip(1).map(str::trim).collect();
        assert_eq!(
            lines,
            [
                "203.0.113.21:15352 (public address)",
                "203.0.113.21:56998 (port mapping)",
                "10.0.1.2:15352 (same LAN)",
            ],
            "{text}"
        );
        for port in [Some(0), Some(15352), None] {
            info.mapped_port = port;
            let candidates = crate::cache::candidates_of(&info);
            assert!(
                candidates.iter().all(|c| c.kind != CandidateKind::Mapped),
                "{port:?}: {candidates:?}"
            );
            assert_eq!(candidates.len(), 2);
        }
    }
}
