//! Rendezvous load generator: many simulated peers, each with its own Ed25519 identity and its
//! own QUIC connection, multiplexed over a few UDP sockets (endpoints) of this process.
//!
//! 1. Registers `--peers` peers, `--concurrency` at a time, and times it (registrations per
//!    second, and per CPU second of the rendezvous process when `--rv-pid` is given).
//! 2. Keeps them registered and idle for `--hold-s` seconds (QUIC keep-alives only, as idle peers
//!    do) and reads the rendezvous's RSS and CPU time before the peers arrived, after they were
//!    registered and at the end of the hold.
//! 3. Closes every connection and prints one JSON line.
//!
//! With `--handshake-only` step 1 is the QUIC + TLS handshake alone (same client, same
//! identities, same sockets), against `bench handshake-server`: the baseline the rendezvous's
//! registrations per CPU second are compared with.
//!
//! Bounded: the peer count is capped at 200,000 and every phase has a deadline.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use certs::{Fingerprint, Identity, ServerTrust};
use common::{ControlMessage, PROTOCOL_VERSION};
use peer::register::RENDEZVOUS_SERVER_NAME as SERVER_NAME;
use tokio::task::JoinSet;
use transport::TransportSettings;

use crate::usage;

/// The most peers one run may simulate.
const MAX_PEERS: usize = 200_000;

/// Options of `bench rv-load`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The rendezvous's UDP address.
    #[arg(long)]
    server: SocketAddr,
    /// Its key fingerprint (`server key sha256:...`).
    #[arg(long)]
    server_key: String,
    /// Peers to register (at most 200,000).
    #[arg(long, default_value_t = 10_000)]
    peers: usize,
    #[command(flatten)]
    pub(crate) load: LoadArgs,
    /// Seconds to keep the registered peers alive before measuring again.
    #[arg(long, default_value_t = 30)]
    hold_s: u64,
    /// Deadline for the registration phase, in seconds.
    #[arg(long, default_value_t = 300)]
    register_deadline_s: u64,
    /// The rendezvous process, to read its RSS and CPU time from /proc.
    #[arg(long)]
    rv_pid: Option<u32>,
    /// Only the QUIC + TLS handshake, no `register` (against `bench handshake-server`).
    #[arg(long)]
    handshake_only: bool,
}

/// The options `rv-load` and `cluster-load` share: how the simulated peers are spread over
/// sockets, and how many requests are in flight at once.
#[derive(clap::Args, Debug)]
pub struct LoadArgs {
    /// UDP sockets (quinn endpoints) the peers are spread over. Against a rendezvous on IPv4
    /// loopback every socket gets its own source address in 127.0.0.0/8 and there are at least
    /// `--peers / --peers-per-source` of them (`--peers-per-node / --peers-per-source` with
    /// `cluster-load`): the server limits connections and new identities per source address,
    /// and real peers do not all come from one address.
    #[arg(long, default_value_t = 8)]
    pub(crate) endpoints: usize,
    /// Peers sharing one source address (loopback servers only, per node with `cluster-load`;
    /// see `--endpoints`).
    #[arg(long, default_value_t = 16)]
    pub(crate) peers_per_source: usize,
    /// Requests in flight at once (per node with `cluster-load`). Against loopback, more
    /// registrations only add handshake retransmissions: 16 already keep one server core busy.
    #[arg(long, default_value_t = 16)]
    pub(crate) concurrency: usize,
}

/// One registered simulated peer: dropping it closes nothing; [`run`] closes connections.
pub(crate) struct Registered {
    pub(crate) conn: quinn::Connection,
    /// Held so the control stream stays open (the server ends the registration with it);
    /// `None` with `--handshake-only`. `bench cluster-load` reads the pushes on it.
    pub(crate) control: Option<(quinn::SendStream, quinn::RecvStream)>,
}

pub(crate) async fn register_one(
    endpoint: quinn::Endpoint,
    identity: Identity,
    server: SocketAddr,
    fingerprint: Fingerprint,
    handshake_only: bool,
) -> anyhow::Result<Registered> {
    let settings = TransportSettings::default();
    let tls = certs::client_config_for_server(
        &identity,
        ServerTrust::Pinned(fingerprint),
        common::ALPN_RENDEZVOUS,
    )?;
    let config = transport::quic_client_config(tls, settings)?;
    let conn = endpoint
        .connect_with(config, server, SERVER_NAME)?
        .await
        .context("handshake")?;
    if handshake_only {
        return Ok(Registered {
            conn,
            control: None,
        });
    }
    // The peer's own register handshake.
    let peer::register::RegisterExchange {
        send: tx,
        recv: rx,
        reply,
    } = peer::register::register(&conn, PROTOCOL_VERSION, Vec::new(), Duration::from_secs(10))
        .await?;
    match reply {
        ControlMessage::Registered { id, .. } if id == identity.id() => Ok(Registered {
            conn,
            control: Some((tx, rx)),
        }),
        other => bail!("unexpected reply to register: {}", other.kind()),
    }
}

/// The UDP sockets (quinn endpoints, the same as a peer's: DemuxSocket, no greased QUIC bit)
/// `peers` simulated peers of a server at `server` are spread over: `load.endpoints` of them,
/// and against a server on IPv4 loopback at least `peers / load.peers_per_source`, each with
/// its own source address in 127.1.0.0/16 (the server limits connections and new identities
/// per source address, and real peers do not all come from one address).
pub(crate) fn endpoints_for(
    server: SocketAddr,
    peers: usize,
    load: &LoadArgs,
) -> anyhow::Result<Vec<quinn::Endpoint>> {
    let loopback = matches!(server, SocketAddr::V4(v4) if v4.ip().is_loopback());
    let sockets = if loopback {
        load.endpoints
            .max(peers.div_ceil(load.peers_per_source.max(1)))
    } else {
        load.endpoints
    };
    let mut out = Vec::new();
    for i in 0..sockets.max(1) {
        let bind: SocketAddr = if loopback {
            // 127.1.0.1, 127.1.0.2, ...: Linux routes all of 127.0.0.0/8 to the loopback.
            let n = u32::try_from(i).context("too many sockets")?;
            SocketAddr::from(([127, 1, (n / 250) as u8, (n % 250 + 1) as u8], 0))
        } else if server.is_ipv4() {
            "0.0.0.0:0".parse()?
        } else {
            "[::]:0".parse()?
        };
        let (endpoint, _socket, _stun) =
            transport::make_endpoint(bind, None, TransportSettings::default(), 16, None)?;
        out.push(endpoint);
    }
    Ok(out)
}

/// `n` fresh identities (generated off the runtime's threads).
pub(crate) async fn identities(n: usize) -> anyhow::Result<Vec<Identity>> {
    Ok(tokio::task::spawn_blocking(move || {
        (0..n)
            .map(|_| Identity::generate())
            .collect::<Result<Vec<_>, _>>()
    })
    .await??)
}

pub(crate) fn sample(pid: Option<u32>) -> anyhow::Result<Option<(u64, f64)>> {
    pid.map(|p| Ok((usage::rss_kib(p)?, usage::cpu_s(p)?)))
        .transpose()
}

/// Runs the load generator and prints its JSON line.
pub async fn run(args: Args) -> anyhow::Result<()> {
    if args.peers == 0 || args.peers > MAX_PEERS {
        bail!("--peers must be between 1 and {MAX_PEERS}");
    }
    let fingerprint: Fingerprint = args
        .server_key
        .parse()
        .map_err(|e| anyhow::anyhow!("--server-key: {e}"))?;
    let endpoints = endpoints_for(args.server, args.peers, &args.load)?;
    eprintln!("rv-load: generating {} identities", args.peers);
    let identities = identities(args.peers).await?;

    let before = sample(args.rv_pid)?;
    eprintln!("rv-load: registering {} peers", args.peers);
    let deadline = Duration::from_secs(args.register_deadline_s);
    let start = Instant::now();
    let mut peers = Vec::with_capacity(args.peers);
    let mut failures = 0usize;
    let mut first_error = None;
    let mut tasks = JoinSet::new();
    let mut identities = identities.into_iter().enumerate();
    loop {
        while tasks.len() < args.load.concurrency.max(1) {
            let Some((i, identity)) = identities.next() else {
                break;
            };
            let endpoint = endpoints[i % endpoints.len()].clone();
            tasks.spawn(register_one(
                endpoint,
                identity,
                args.server,
                fingerprint,
                args.handshake_only,
            ));
        }
        let remaining = deadline.saturating_sub(start.elapsed());
        match tokio::time::timeout(remaining, tasks.join_next()).await {
            Err(_) => {
                tasks.shutdown().await;
                bail!(
                    "registration phase over its {} s deadline ({} registered)",
                    args.register_deadline_s,
                    peers.len()
                );
            }
            Ok(None) => break,
            Ok(Some(Ok(Ok(peer)))) => peers.push(peer),
            Ok(Some(Ok(Err(e)))) => {
                failures += 1;
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
            Ok(Some(Err(e))) => {
                failures += 1;
                first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    let register_secs = start.elapsed().as_secs_f64();
    let registered = sample(args.rv_pid)?;
    eprintln!(
        "rv-load: {} registered in {register_secs:.2} s ({failures} failed); holding {} s",
        peers.len(),
        args.hold_s
    );
    tokio::time::sleep(Duration::from_secs(args.hold_s)).await;
    let held = sample(args.rv_pid)?;
    let alive = peers
        .iter()
        .filter(|p| p.conn.close_reason().is_none())
        .count();

    for peer in &peers {
        peer.conn.close(0u32.into(), b"bench done");
    }
    // All endpoints drain at once, within one deadline: one after the other, thousands of them
    // (100,000 peers are 6,250 sockets) took minutes.
    let mut draining = JoinSet::new();
    for endpoint in &endpoints {
        let endpoint = endpoint.clone();
        draining.spawn(async move { endpoint.wait_idle().await });
    }
    let drained = async { while draining.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(Duration::from_secs(5), drained).await;

    let n = peers.len();
    let mut out = serde_json::json!({
        "peers": n,
        "handshake_only": args.handshake_only,
        "failed": failures,
        "first_error": first_error,
        "register_secs": register_secs,
        "registrations_per_s": n as f64 / register_secs,
        "hold_s": args.hold_s,
        "alive_after_hold": alive,
    });
    if let (Some(before), Some(registered), Some(held)) = (before, registered, held) {
        let rv_register_cpu = registered.1 - before.1;
        let rss_growth_kib = held.0.saturating_sub(before.0);
        out["rv_rss_before_kib"] = before.0.into();
        out["rv_rss_registered_kib"] = registered.0.into();
        out["rv_rss_held_kib"] = held.0.into();
        out["rv_register_cpu_s"] = rv_register_cpu.into();
        out["rv_registrations_per_cpu_s"] = (n as f64 / rv_register_cpu.max(1e-9)).into();
        out["rv_rss_per_peer_kib"] = (rss_growth_kib as f64 / n.max(1) as f64).into();
        out["rv_hold_cpu_fraction"] = ((held.1 - registered.1) / args.hold_s.max(1) as f64).into();
    }
    println!("{out}");
    Ok(())
}
