//! Cluster load generator: simulated peers spread over several rendezvous nodes that share one
//! registry in Redis (`rendezvous serve --cluster`), to measure what each node does under load
//! next to the single-node figures of `rv-load`.
//!
//! 1. Registers `--peers-per-node` peers with every node at once (`--concurrency` in flight per
//!    node) and times each node: registrations per second, and per CPU second of the node's
//!    process when `--rv-pid` is given (one per `--server`, in the same order).
//! 2. Cross-node introductions: `--introductions-per-node` peers of every node each ask to be
//!    introduced (`connect`) to a peer of the next node (the last node's to the first's), all
//!    nodes at once; a `punch` reply counts (the target's node is reached through Redis, see
//!    docs/cluster.md). Introductions per second per requesting node, its CPU seconds, the
//!    time from request to reply and from request to the target's pushed `punch` (median and
//!    95th percentile: the push is what crosses the nodes). Given one node (a single node, or
//!    a cluster of one), each peer asks for the next peer of the same node: the baseline the
//!    cross-node figures are compared with.
//! 3. Closes every connection and prints one JSON line.
//!
//! Bounded: at most 8 nodes and 20,000 peers per node, and every phase has a deadline.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use certs::Fingerprint;
use common::frame_io::{read_frame, write_frame};
use common::{ControlMessage, PeerId};
use tokio::task::JoinSet;

use crate::rvload::{endpoints_for, identities, register_one, sample, LoadArgs, Registered};

/// The most nodes one run drives.
const MAX_NODES: usize = 8;
/// The most peers per node.
const MAX_PEERS_PER_NODE: usize = 20_000;
/// How long one introduction request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Options of `bench cluster-load`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A node's UDP address (repeat for every node).
    #[arg(long = "server", required = true)]
    servers: Vec<SocketAddr>,
    /// Its key fingerprint (one per `--server`, in the same order).
    #[arg(long = "server-key", required = true)]
    server_keys: Vec<String>,
    /// The nodes' processes, to read their CPU time from /proc (one per `--server`, or none).
    #[arg(long = "rv-pid")]
    rv_pids: Vec<u32>,
    /// Peers registered with each node.
    #[arg(long, default_value_t = 10_000)]
    peers_per_node: usize,
    /// Peers of each node that ask for an introduction to a peer of the next node.
    #[arg(long, default_value_t = 2_000)]
    introductions_per_node: usize,
    /// Introductions in flight per node (default: --concurrency). 1 times each one alone: the
    /// path's own latency, without queueing behind the others.
    #[arg(long)]
    introduction_concurrency: Option<usize>,
    #[command(flatten)]
    pub(crate) load: LoadArgs,
    /// Deadline of each phase, in seconds.
    #[arg(long, default_value_t = 300)]
    deadline_s: u64,
}

/// One node's side of the run.
struct Node {
    server: SocketAddr,
    fingerprint: Fingerprint,
    pid: Option<u32>,
}

/// What registering with one node gave.
struct Registrations {
    peers: Vec<(PeerId, Registered)>,
    failed: usize,
    first_error: Option<String>,
    secs: f64,
}

async fn register_all(
    node: (SocketAddr, Fingerprint),
    endpoints: Vec<quinn::Endpoint>,
    identities: Vec<certs::Identity>,
    concurrency: usize,
    deadline: Duration,
) -> anyhow::Result<Registrations> {
    let (server, fingerprint) = node;
    let start = Instant::now();
    let mut out = Registrations {
        peers: Vec::with_capacity(identities.len()),
        failed: 0,
        first_error: None,
        secs: 0.0,
    };
    let mut tasks = JoinSet::new();
    let mut identities = identities.into_iter().enumerate();
    loop {
        while tasks.len() < concurrency.max(1) {
            let Some((i, identity)) = identities.next() else {
                break;
            };
            let endpoint = endpoints[i % endpoints.len()].clone();
            let id = identity.id();
            tasks.spawn(async move {
                register_one(endpoint, identity, server, fingerprint, false)
                    .await
                    .map(|r| (id, r))
            });
        }
        let remaining = deadline.saturating_sub(start.elapsed());
        match tokio::time::timeout(remaining, tasks.join_next()).await {
            Err(_) => {
                tasks.shutdown().await;
                bail!(
                    "registering with {server}: over the {} s deadline ({} registered)",
                    deadline.as_secs(),
                    out.peers.len()
                );
            }
            Ok(None) => break,
            Ok(Some(Ok(Ok(peer)))) => out.peers.push(peer),
            Ok(Some(Ok(Err(e)))) => {
                out.failed += 1;
                out.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
            Ok(Some(Err(e))) => {
                out.failed += 1;
                out.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    out.secs = start.elapsed().as_secs_f64();
    Ok(out)
}

/// A target's control stream, read for its pushes and handed back (dropping it would end the
/// target's registration).
type Control = (quinn::SendStream, quinn::RecvStream);

/// One introduction to time.
struct Ask {
    conn: quinn::Connection,
    requester: PeerId,
    target: PeerId,
    target_control: Control,
}

/// How long one introduction took: to the reply, and to the target's pushed `punch`.
struct Took {
    reply: Duration,
    push: Duration,
}

/// Reads `control` until the `punch` introducing `requester` arrives.
async fn pushed_punch(control: &mut Control, requester: PeerId) -> Result<(), String> {
    loop {
        let frame = read_frame(&mut control.1)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("the target's control stream closed")?;
        if let Ok(ControlMessage::Punch { peer, .. }) = ControlMessage::decode(&frame) {
            if peer == requester {
                return Ok(());
            }
        }
    }
}

/// One `connect` request on its own stream, and the target's push read alongside: the times
/// to the node's `punch` answer and to the target's. The control stream is handed back.
async fn introduce(mut ask: Ask) -> (Result<Took, String>, Control) {
    let asked = Instant::now();
    let pushed = async {
        pushed_punch(&mut ask.target_control, ask.requester).await?;
        Ok::<Duration, String>(asked.elapsed())
    };
    let replied = async {
        reply(ask.conn, ask.target).await?;
        Ok::<Duration, String>(asked.elapsed())
    };
    let both = async {
        let (reply, push) = tokio::try_join!(replied, pushed)?;
        Ok(Took { reply, push })
    };
    let took = tokio::time::timeout(REQUEST_TIMEOUT, both)
        .await
        .unwrap_or_else(|_| Err("no answer or push in time".to_owned()));
    (took, ask.target_control)
}

/// One `connect` request on its own stream: whether the node answered with a `punch`.
async fn reply(conn: quinn::Connection, target: PeerId) -> Result<(), String> {
    let exchange = async {
        let (mut tx, mut rx) = conn.open_bi().await.map_err(|e| e.to_string())?;
        write_frame(&mut tx, &ControlMessage::connect(target).encode())
            .await
            .map_err(|e| e.to_string())?;
        let reply = read_frame(&mut rx)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("stream closed before the reply")?;
        match ControlMessage::decode(&reply).map_err(|e| e.to_string())? {
            ControlMessage::Punch { .. } => Ok(()),
            other => Err(format!("answered {}", other.kind())),
        }
    };
    exchange.await
}

/// What one node's requesters got.
#[derive(Debug, Clone, Default)]
struct Introductions {
    ok: usize,
    failed: usize,
    first_error: Option<String>,
    secs: f64,
    /// Request to reply of each that succeeded, milliseconds.
    reply_ms: Vec<f64>,
    /// Request to the target's push of each that succeeded, milliseconds.
    push_ms: Vec<f64>,
}

/// The `q` quantile (0..=1) of `values` (nearest rank), 0 when there are none.
fn quantile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n => sorted[((q * n as f64).ceil() as usize).clamp(1, n) - 1],
    }
}

/// Runs `asks` with `concurrency` in flight: what they got, and the targets' control streams.
async fn introduce_all(
    asks: Vec<Ask>,
    concurrency: usize,
    deadline: Duration,
) -> (Introductions, Vec<Control>) {
    let start = Instant::now();
    let (mut ok, mut failed, mut first_error) = (0, 0, None);
    let mut reply_ms = Vec::with_capacity(asks.len());
    let mut push_ms = Vec::with_capacity(asks.len());
    let mut controls = Vec::with_capacity(asks.len());
    let mut tasks = JoinSet::new();
    let mut asks = asks.into_iter();
    loop {
        while tasks.len() < concurrency.max(1) {
            let Some(ask) = asks.next() else {
                break;
            };
            tasks.spawn(introduce(ask));
        }
        let remaining = deadline.saturating_sub(start.elapsed());
        match tokio::time::timeout(remaining, tasks.join_next()).await {
            Err(_) => {
                tasks.shutdown().await;
                failed += asks.len();
                first_error.get_or_insert_with(|| "phase deadline".to_owned());
                break;
            }
            Ok(None) => break,
            Ok(Some(Ok((Ok(took), control)))) => {
                ok += 1;
                reply_ms.push(took.reply.as_secs_f64() * 1000.0);
                push_ms.push(took.push.as_secs_f64() * 1000.0);
                controls.push(control);
            }
            Ok(Some(Ok((Err(e), control)))) => {
                failed += 1;
                first_error.get_or_insert(e);
                controls.push(control);
            }
            Ok(Some(Err(e))) => {
                failed += 1;
                first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    let got = Introductions {
        ok,
        failed,
        first_error,
        secs: start.elapsed().as_secs_f64(),
        reply_ms,
        push_ms,
    };
    (got, controls)
}

/// Runs the cluster load and prints its JSON line.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let n = args.servers.len();
    if n > MAX_NODES {
        bail!("at most {MAX_NODES} nodes");
    }
    if args.server_keys.len() != n {
        bail!(
            "one --server-key per --server ({n} servers, {} keys)",
            args.server_keys.len()
        );
    }
    if !args.rv_pids.is_empty() && args.rv_pids.len() != n {
        bail!("one --rv-pid per --server, or none");
    }
    if args.peers_per_node == 0 || args.peers_per_node > MAX_PEERS_PER_NODE {
        bail!("--peers-per-node must be between 1 and {MAX_PEERS_PER_NODE}");
    }
    if args.introductions_per_node > args.peers_per_node
        || (n == 1 && args.introductions_per_node >= args.peers_per_node)
    {
        bail!(
            "--introductions-per-node must be at most --peers-per-node (below it with one node: \
             each peer asks for the next)"
        );
    }
    let mut nodes = Vec::with_capacity(n);
    for (i, (server, key)) in args.servers.iter().zip(&args.server_keys).enumerate() {
        let fingerprint: Fingerprint = key
            .parse()
            .map_err(|e| anyhow::anyhow!("--server-key {key}: {e}"))?;
        nodes.push(Node {
            server: *server,
            fingerprint,
            pid: args.rv_pids.get(i).copied(),
        });
    }
    // One set of sockets for all nodes: each source address then has at most
    // `peers_per_source` peers on any one node.
    let endpoints = endpoints_for(args.servers[0], args.peers_per_node, &args.load)?;
    eprintln!(
        "cluster-load: generating {} identities",
        n * args.peers_per_node
    );
    let mut all = identities(n * args.peers_per_node).await?;
    let deadline = Duration::from_secs(args.deadline_s);

    // 1. Registrations, every node at once.
    eprintln!(
        "cluster-load: registering {} peers with each of {n} nodes",
        args.peers_per_node
    );
    let before: Vec<_> = nodes
        .iter()
        .map(|nd| sample(nd.pid))
        .collect::<Result<_, _>>()?;
    let mut registering = JoinSet::new();
    for (i, node) in nodes.iter().enumerate() {
        let mine = all.split_off(all.len() - args.peers_per_node);
        let endpoints = endpoints.clone();
        let target = (node.server, node.fingerprint);
        let concurrency = args.load.concurrency;
        registering.spawn(async move {
            (
                i,
                register_all(target, endpoints, mine, concurrency, deadline).await,
            )
        });
    }
    let mut registrations: Vec<Option<Registrations>> = (0..n).map(|_| None).collect();
    while let Some(done) = registering.join_next().await {
        let (i, result) = done.context("a registration task")?;
        registrations[i] = Some(result?);
    }
    let mut registrations: Vec<Registrations> = registrations.into_iter().flatten().collect();
    let registered: Vec<_> = nodes
        .iter()
        .map(|nd| sample(nd.pid))
        .collect::<Result<_, _>>()?;

    // 2. Cross-node introductions: node i's first peers ask for node i+1's.
    eprintln!(
        "cluster-load: {} {} introductions per node",
        args.introductions_per_node,
        if n == 1 { "same-node" } else { "cross-node" }
    );
    // Node i's peer j asks for node i+1's peer j (with one node, for peer j + 1: never
    // itself), whose control stream is taken to read the push; every target is asked for once.
    let take = args.introductions_per_node;
    let mut targets: Vec<Vec<(PeerId, Control)>> = Vec::with_capacity(n);
    for r in registrations.iter_mut() {
        let skip = usize::from(n == 1);
        let mut mine = Vec::with_capacity(take);
        for (id, peer) in r.peers.iter_mut().skip(skip).take(take) {
            let control = peer
                .control
                .take()
                .context("a registered peer without its control stream")?;
            mine.push((*id, control));
        }
        targets.push(mine);
    }
    let mut introducing = JoinSet::new();
    for i in 0..n {
        let next = std::mem::take(&mut targets[(i + 1) % n]);
        let asks: Vec<Ask> = registrations[i]
            .peers
            .iter()
            .zip(next)
            .map(|((requester, registered), (target, target_control))| Ask {
                conn: registered.conn.clone(),
                requester: *requester,
                target,
                target_control,
            })
            .collect();
        let concurrency = args
            .introduction_concurrency
            .unwrap_or(args.load.concurrency);
        introducing.spawn(async move { (i, introduce_all(asks, concurrency, deadline).await) });
    }
    let mut introductions = vec![Introductions::default(); n];
    // The targets' control streams, held to the end (their registrations with them).
    let mut controls = Vec::new();
    while let Some(done) = introducing.join_next().await {
        let (i, (result, held)) = done.context("an introduction task")?;
        introductions[i] = result;
        controls.extend(held);
    }
    let introduced: Vec<_> = nodes
        .iter()
        .map(|nd| sample(nd.pid))
        .collect::<Result<_, _>>()?;

    drop(controls);
    for r in &registrations {
        for (_, peer) in &r.peers {
            peer.conn.close(0u32.into(), b"bench done");
        }
    }
    for endpoint in &endpoints {
        let _ = tokio::time::timeout(Duration::from_secs(3), endpoint.wait_idle()).await;
    }

    let mut per_node = Vec::with_capacity(n);
    for (i, node) in nodes.iter().enumerate() {
        let r = &registrations[i];
        let Introductions {
            ok,
            failed,
            first_error,
            secs,
            reply_ms,
            push_ms,
        } = &introductions[i];
        let count = r.peers.len();
        let mut entry = serde_json::json!({
            "server": node.server.to_string(),
            "registered": count,
            "register_failed": r.failed,
            "register_first_error": r.first_error,
            "register_secs": r.secs,
            "registrations_per_s": count as f64 / r.secs.max(1e-9),
            "introductions": ok,
            "introductions_failed": failed,
            "introductions_first_error": first_error,
            "introduce_secs": secs,
            "introductions_per_s": *ok as f64 / secs.max(1e-9),
            "reply_p50_ms": quantile(reply_ms, 0.5),
            "reply_p95_ms": quantile(reply_ms, 0.95),
            "push_p50_ms": quantile(push_ms, 0.5),
            "push_p95_ms": quantile(push_ms, 0.95),
        });
        if let (Some(b), Some(reg), Some(intro)) = (before[i], registered[i], introduced[i]) {
            let register_cpu = reg.1 - b.1;
            let introduce_cpu = intro.1 - reg.1;
            entry["rv_register_cpu_s"] = register_cpu.into();
            entry["rv_registrations_per_cpu_s"] = (count as f64 / register_cpu.max(1e-9)).into();
            entry["rv_introduce_cpu_s"] = introduce_cpu.into();
            entry["rv_rss_registered_kib"] = reg.0.into();
        }
        per_node.push(entry);
    }
    let total_registered: usize = registrations.iter().map(|r| r.peers.len()).sum();
    let total_introduced: usize = introductions.iter().map(|i| i.ok).sum();
    println!(
        "{}",
        serde_json::json!({
            "nodes": n,
            "peers_per_node": args.peers_per_node,
            "registered": total_registered,
            "introductions": total_introduced,
            "per_node": per_node,
        })
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::quantile;

    #[test]
    fn quantiles_by_nearest_rank() {
        let values: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(quantile(&values, 0.5), 10.0);
        assert_eq!(quantile(&values, 0.95), 19.0);
        assert_eq!(quantile(&values, 1.0), 20.0);
        assert_eq!(quantile(&[3.0], 0.95), 3.0);
        assert_eq!(quantile(&[], 0.5), 0.0);
    }
}
