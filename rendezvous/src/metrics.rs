//! Prometheus metrics over plain HTTP (`--metrics ADDR`): `GET /metrics` answers the text
//! exposition format; anything else is a 404.
//!
//! The port may be reachable by anyone, and a scraper must still get its answer while someone
//! holds connections open and trickles bytes (slowloris). New connections are rate limited per
//! source; requests are at most 8 KiB and must arrive within a short deadline; connections
//! still sending their request wait in a [`Lobby`](crate::waiting::Lobby) that always admits a
//! newcomer by closing the oldest waiting connection (of the newcomer's source if that source
//! is at its cap, else of all), so a scraper that sends its request at once is answered;
//! answering has its own per-source and total slots and deadline ([`MetricsLimits`]).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::server::Shared;
use crate::sources::{SourceBuckets, SourceKey, SourceSlots};
use crate::tunnel::TunnelCounters;
use crate::waiting::{Eviction, Lobby, Ticket};

/// A snapshot of everything exported.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Registered peers.
    pub registered: u64,
    /// Peers with a live connection.
    pub online: u64,
    /// Registrations accepted.
    pub registrations: u64,
    /// Queries answered.
    pub queries: u64,
    /// Introductions made (punches requested).
    pub introductions: u64,
    /// Introductions whose push to the target carried the requester's first QUIC datagram.
    pub first_flights: u64,
    /// Punches that proved a direct path, as reported by the peers.
    pub punches_succeeded: u64,
    /// Punches that found no direct path, as reported by the peers.
    pub punches_failed: u64,
    /// Error replies sent, by code.
    pub error_replies: Vec<(&'static str, u64)>,
    /// Requests refused as invalid.
    pub rejected: u64,
    /// Registrations refused by the registry's growth limits, by reason.
    pub registrations_refused: [(&'static str, u64); 3],
    /// Rows deleted because their peer was offline longer than the expiry time.
    pub expired: u64,
    /// Relay: sessions, packets, bytes.
    pub relay_sessions: u64,
    /// Relayed packets.
    pub relay_packets: u64,
    /// Relayed bytes.
    pub relay_bytes: u64,
    /// Relay drops by reason.
    pub relay_dropped: Vec<(&'static str, u64)>,
    /// Relayed packets held until their introduction was accepted, then forwarded.
    pub relay_held_forwarded: u64,
    /// `relay_open` refused: the connection already had a relay stream.
    pub relay_streams_refused: u64,
    /// Relayed packets held now, waiting for their introduction's accept.
    pub relay_held: u64,
    /// Relay channels held now.
    pub relay_channels: u64,
    /// `relay_channel` answers: granted, refused.
    pub relay_channel_requests: [(&'static str, u64); 2],
    /// Relay channel datagrams by outcome: forwarded (to the other side's channel),
    /// to_stream (into its relay stream), dropped; and send_failed (the socket's buffer).
    pub relay_channel_datagrams: [(&'static str, u64); 4],
    /// STUN: answered, rate limited, ignored.
    pub stun: [(&'static str, u64); 3],
    /// TCP tunnels open now.
    pub tunnels_open: u64,
    /// TCP tunnel connections refused, by cap.
    pub tunnels_refused: [(&'static str, u64); 3],
    /// TCP tunnel TLS handshakes that did not complete, by reason.
    pub tunnel_handshakes_failed: [(&'static str, u64); 4],
    /// TCP tunnels closed, by reason.
    pub tunnels_closed: [(&'static str, u64); 4],
    /// Metrics connections closed before answering, by reason.
    pub metrics_dropped: [(&'static str, u64); 5],
    /// Connection attempts sent a QUIC Retry (address validation under load).
    pub quic_retries: u64,
    /// Connection attempts refused, by reason.
    pub connections_refused: [(&'static str, u64); 4],
    /// QUIC handshakes that did not finish in time.
    pub handshake_timeouts: u64,
    /// Peers disconnected for not reading their replies within the write timeout.
    pub not_reading: u64,
    /// In a cluster (`--cluster`): what the node did with the cluster registry.
    pub cluster: Option<ClusterSnapshot>,
}

/// The cluster side of a node, for the operator.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ClusterSnapshot {
    /// Whether Redis answered the latest call (0: degraded mode).
    pub redis_up: u64,
    /// Redis calls that failed or timed out.
    pub redis_failures: u64,
    /// Times Sentinel named a new primary (`redis+sentinel://`; 0 otherwise).
    pub primary_changes: u64,
    /// Introductions across nodes: forwarded to other nodes, received and pushed here, dropped
    /// here (malformed, or for a peer not online here).
    pub introductions: [(&'static str, u64); 3],
    /// Live nodes in the cluster.
    pub nodes: u64,
    /// Peers online on all the live nodes.
    pub online: u64,
    /// The cross-node relay (`--cluster-link`), if this node has a node link.
    pub links: Option<LinkSnapshot>,
}

/// The node links of the cross-node relay, for the operator.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LinkSnapshot {
    /// Relayed packets sent to other nodes and received from them (queued for a peer here).
    pub packets: [(&'static str, u64); 2],
    /// Their packet bytes, likewise.
    pub bytes: [(&'static str, u64); 2],
    /// Established links now.
    pub links: u64,
    /// Link attempts refused (no proof of the cluster key, too many at once).
    pub refused: u64,
    /// Dials to other nodes that failed.
    pub dial_failures: u64,
    /// Batches for other nodes dropped (link queue full, or no link).
    pub dropped: u64,
}

/// Samples of one metric: (label set, value); an empty label set for an unlabelled metric.
type Samples = Vec<(String, u64)>;

fn unlabelled(value: u64) -> Samples {
    vec![(String::new(), value)]
}

/// One sample per `(label value, count)`, labelled `{key="value"}`.
fn labelled(key: &str, values: &[(&str, u64)]) -> Samples {
    values
        .iter()
        .map(|(value, n)| (format!("{{{key}=\"{value}\"}}"), *n))
        .collect()
}

/// Renders the text exposition format.
pub fn render(s: &Snapshot) -> String {
    let metrics: Vec<(&str, &str, &str, Samples)> = vec![
        (
            "rendezvous_registered_peers",
            "gauge",
            "Peers in the registry.",
            unlabelled(s.registered),
        ),
        (
            "rendezvous_online_peers",
            "gauge",
            "Peers with a live control connection.",
            unlabelled(s.online),
        ),
        (
            "rendezvous_registrations_total",
            "counter",
            "Registrations accepted.",
            unlabelled(s.registrations),
        ),
        (
            "rendezvous_queries_total",
            "counter",
            "Queries answered.",
            unlabelled(s.queries),
        ),
        (
            "rendezvous_introductions_total",
            "counter",
            "Introductions (punch requests sent to both peers).",
            unlabelled(s.introductions),
        ),
        (
            "rendezvous_first_flights_total",
            "counter",
            "Introductions whose punch to the target carried the requester's first QUIC datagram \
             (the handshake starts without waiting for the relay).",
            unlabelled(s.first_flights),
        ),
        (
            "rendezvous_punch_results_total",
            "counter",
            "Punch outcomes reported by the peers that asked for the introduction.",
            labelled(
                "result",
                &[
                    ("direct", s.punches_succeeded),
                    ("failed", s.punches_failed),
                ],
            ),
        ),
        (
            "rendezvous_error_replies_total",
            "counter",
            "Requests answered with an error (malformed, unknown type, too large, rate limited, \
             ...), by code.",
            labelled("code", &s.error_replies),
        ),
        (
            "rendezvous_rejected_requests_total",
            "counter",
            "Requests refused as invalid.",
            unlabelled(s.rejected),
        ),
        (
            "rendezvous_registrations_refused_total",
            "counter",
            "Registrations refused (answered `rate_limited`): too many from the source \
             (source_rate), too many new identities from the source (new_ids_rate), registry \
             full (full).",
            labelled("reason", &s.registrations_refused),
        ),
        (
            "rendezvous_expired_peers_total",
            "counter",
            "Registry rows deleted because their peer was offline longer than the expiry time.",
            unlabelled(s.expired),
        ),
        (
            "rendezvous_relay_sessions_total",
            "counter",
            "Relay streams opened.",
            unlabelled(s.relay_sessions),
        ),
        (
            "rendezvous_relay_packets_total",
            "counter",
            "Packets relayed.",
            unlabelled(s.relay_packets),
        ),
        (
            "rendezvous_relay_bytes_total",
            "counter",
            "Bytes relayed.",
            unlabelled(s.relay_bytes),
        ),
        (
            "rendezvous_relay_dropped_packets_total",
            "counter",
            "Relayed packets dropped, by reason.",
            labelled("reason", &s.relay_dropped),
        ),
        (
            "rendezvous_relay_held_forwarded_packets_total",
            "counter",
            "Relayed packets held until the introduction was accepted, then forwarded.",
            unlabelled(s.relay_held_forwarded),
        ),
        (
            "rendezvous_relay_held_packets",
            "gauge",
            "Relayed packets held now, waiting for their introduction to be accepted.",
            unlabelled(s.relay_held),
        ),
        (
            "rendezvous_relay_streams_refused_total",
            "counter",
            "Relay streams refused: the connection already had one.",
            unlabelled(s.relay_streams_refused),
        ),
        (
            "rendezvous_relay_channels",
            "gauge",
            "Relay channels held (plain UDP relaying between two introduced peers).",
            unlabelled(s.relay_channels),
        ),
        (
            "rendezvous_relay_channel_requests_total",
            "counter",
            "relay_channel requests, by answer.",
            labelled("result", &s.relay_channel_requests),
        ),
        (
            "rendezvous_relay_channel_datagrams_total",
            "counter",
            "Relay channel datagrams, by outcome: forwarded (handed to the socket, of which send_failed could not be sent), to_stream, dropped (also counted in the relay's packets and drops).",
            labelled("outcome", &s.relay_channel_datagrams),
        ),
        (
            "rendezvous_stun_requests_total",
            "counter",
            "STUN datagrams, by outcome.",
            labelled("outcome", &s.stun),
        ),
        (
            "rendezvous_tcp_tunnels_open",
            "gauge",
            "TCP 443 tunnels open (TLS up).",
            unlabelled(s.tunnels_open),
        ),
        (
            "rendezvous_tcp_tunnels_refused_total",
            "counter",
            "TCP tunnel connections closed at accept, by the cap that was full.",
            labelled("cap", &s.tunnels_refused),
        ),
        (
            "rendezvous_tcp_tunnel_handshakes_failed_total",
            "counter",
            "TCP tunnel TLS handshakes that did not complete, by reason.",
            labelled("reason", &s.tunnel_handshakes_failed),
        ),
        (
            "rendezvous_tcp_tunnels_closed_total",
            "counter",
            "TCP tunnels closed, by reason.",
            labelled("reason", &s.tunnels_closed),
        ),
        (
            "rendezvous_metrics_connections_dropped_total",
            "counter",
            "Metrics connections closed without an answer, by reason.",
            labelled("reason", &s.metrics_dropped),
        ),
        (
            "rendezvous_quic_retries_total",
            "counter",
            "Connection attempts answered with a QUIC Retry (address validation under load).",
            unlabelled(s.quic_retries),
        ),
        (
            "rendezvous_connections_refused_total",
            "counter",
            "Connection attempts refused, by reason (per-source or total caps on handshakes and \
             connections).",
            labelled("reason", &s.connections_refused),
        ),
        (
            "rendezvous_handshake_timeouts_total",
            "counter",
            "QUIC handshakes that did not finish in time.",
            unlabelled(s.handshake_timeouts),
        ),
        (
            "rendezvous_not_reading_disconnects_total",
            "counter",
            "Peers disconnected for not reading their replies within the write timeout.",
            unlabelled(s.not_reading),
        ),
    ];
    let mut metrics = metrics;
    if let Some(cluster) = &s.cluster {
        metrics.extend([
            (
                "rendezvous_cluster_redis_up",
                "gauge",
                "Whether the cluster registry (Redis) answered the latest call (0: degraded mode).",
                unlabelled(cluster.redis_up),
            ),
            (
                "rendezvous_cluster_redis_failures_total",
                "counter",
                "Calls to the cluster registry (Redis) that failed or timed out.",
                unlabelled(cluster.redis_failures),
            ),
            (
                "rendezvous_cluster_redis_primary_changes_total",
                "counter",
                "Times Redis Sentinel named a new primary that this node moved to \
                 (redis+sentinel:// only).",
                unlabelled(cluster.primary_changes),
            ),
            (
                "rendezvous_cluster_nodes",
                "gauge",
                "Live nodes in the cluster (as of this node's latest refresh, every 20 s).",
                unlabelled(cluster.nodes),
            ),
            (
                "rendezvous_cluster_online_peers",
                "gauge",
                "Peers online on all the live nodes of the cluster (each node's count as of its \
                 latest refresh).",
                unlabelled(cluster.online),
            ),
            (
                "rendezvous_cluster_introductions_total",
                "counter",
                "Introductions across nodes: forwarded to another node, received from one and \
                 pushed here, dropped here (malformed, or the target is not online here).",
                labelled("direction", &cluster.introductions),
            ),
        ]);
        if let Some(links) = &cluster.links {
            metrics.extend([
                (
                    "rendezvous_cluster_relay_packets_total",
                    "counter",
                    "Relayed packets that crossed a node link: sent to another node, received \
                     from one and queued for a peer here.",
                    labelled("direction", &links.packets),
                ),
                (
                    "rendezvous_cluster_relay_bytes_total",
                    "counter",
                    "Bytes of the relayed packets that crossed a node link, likewise.",
                    labelled("direction", &links.bytes),
                ),
                (
                    "rendezvous_cluster_links",
                    "gauge",
                    "Node-to-node links established now.",
                    unlabelled(links.links),
                ),
                (
                    "rendezvous_cluster_link_refused_total",
                    "counter",
                    "Node link attempts refused: no (or a wrong) proof of the cluster key, or \
                     too many attempts at once.",
                    unlabelled(links.refused),
                ),
                (
                    "rendezvous_cluster_link_dial_failures_total",
                    "counter",
                    "Node links this node could not open (the other node unreachable, or it \
                     did not prove the cluster key).",
                    unlabelled(links.dial_failures),
                ),
                (
                    "rendezvous_cluster_link_dropped_total",
                    "counter",
                    "Relay batches for another node dropped: its link's queue full, or no link.",
                    unlabelled(links.dropped),
                ),
            ]);
        }
    }
    let mut out = String::new();
    for (name, kind, help, samples) in metrics {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    }
    out
}

pub(crate) fn snapshot(
    shared: &Shared,
    tunnel: &TunnelCounters,
    scrapes: &MetricsCounters,
) -> Snapshot {
    let (registered, online, counters) = shared.registry_view();
    let cluster = shared.cluster().map(|cluster| {
        let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        ClusterSnapshot {
            redis_up: u64::from(cluster.available()),
            redis_failures: get(&cluster.counters.failures),
            primary_changes: get(&cluster.counters.primary_changes),
            introductions: [
                ("forwarded", get(&cluster.counters.forwarded)),
                ("received", get(&cluster.counters.received)),
                ("dropped", get(&cluster.counters.dropped)),
            ],
            nodes: get(&cluster.counters.nodes),
            online: get(&cluster.counters.cluster_online),
            links: shared.links.as_ref().map(|links| {
                let c = &links.counters;
                LinkSnapshot {
                    packets: [
                        ("sent", get(&c.packets_sent)),
                        ("received", get(&c.packets_received)),
                    ],
                    bytes: [
                        ("sent", get(&c.bytes_sent)),
                        ("received", get(&c.bytes_received)),
                    ],
                    links: links.established(),
                    refused: get(&c.refused),
                    dial_failures: get(&c.dial_failures),
                    dropped: get(&c.dropped),
                }
            }),
        }
    });
    let relay = &shared.relay.counters;
    let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    Snapshot {
        registered,
        online,
        registrations: counters.registrations,
        queries: counters.queries,
        introductions: counters.punches,
        first_flights: counters.first_flights,
        punches_succeeded: counters.punches_succeeded,
        punches_failed: counters.punches_failed,
        error_replies: shared.rejections.snapshot(),
        rejected: counters.rejected,
        registrations_refused: [
            ("source_rate", counters.refused_source_rate),
            ("new_ids_rate", counters.refused_new_ids_rate),
            ("full", counters.refused_full),
        ],
        expired: counters.expired,
        relay_sessions: get(&relay.sessions),
        relay_packets: get(&relay.packets),
        relay_bytes: get(&relay.bytes),
        relay_dropped: vec![
            ("queue_full", get(&relay.dropped_queue_full)),
            ("no_route", get(&relay.dropped_no_route)),
            ("not_introduced", get(&relay.denied_not_introduced)),
            ("not_accepted", get(&relay.dropped_not_accepted)),
            ("rate", get(&relay.denied_rate)),
            ("quota", get(&relay.denied_quota)),
            ("empty", get(&relay.dropped_empty)),
        ],
        relay_held_forwarded: get(&relay.held_then_forwarded),
        relay_streams_refused: get(&relay.refused_streams),
        relay_held: get(&relay.held_now),
        relay_channels: get(&shared.channels.counters.open),
        relay_channel_requests: [
            ("granted", get(&shared.channels.counters.granted)),
            ("refused", get(&shared.channels.counters.refused)),
        ],
        relay_channel_datagrams: [
            ("forwarded", get(&shared.channels.counters.forwarded)),
            ("to_stream", get(&shared.channels.counters.to_stream)),
            ("dropped", get(&shared.channels.counters.dropped)),
            ("send_failed", shared.channels.send_failed()),
        ],
        stun: [
            ("answered", get(&shared.stun.answered)),
            ("rate_limited", get(&shared.stun.rate_limited)),
            ("ignored", get(&shared.stun.ignored)),
        ],
        tunnels_open: get(&tunnel.open),
        tunnels_refused: [
            ("rate", get(&tunnel.refused_rate)),
            ("tunnels_per_source", get(&tunnel.refused_per_source)),
            ("tunnels_total", get(&tunnel.refused_total)),
        ],
        tunnel_handshakes_failed: [
            ("timeout", get(&tunnel.handshake_timeouts)),
            ("error", get(&tunnel.handshake_failures)),
            ("evicted_per_source", get(&tunnel.evicted_per_source)),
            ("evicted_total", get(&tunnel.evicted_total)),
        ],
        tunnels_closed: [
            ("idle", get(&tunnel.closed_idle)),
            ("write_timeout", get(&tunnel.closed_write_timeout)),
            ("oversized_datagram", get(&tunnel.closed_oversized)),
            ("client", get(&tunnel.closed_by_client)),
        ],
        metrics_dropped: [
            ("evicted_per_source", get(&scrapes.evicted_per_source)),
            ("evicted_total", get(&scrapes.evicted_total)),
            ("request_timeout", get(&scrapes.request_timeouts)),
            ("responding_full", get(&scrapes.refused_responding)),
            ("rate", get(&scrapes.refused_rate)),
        ],
        quic_retries: get(&shared.conns.retries),
        connections_refused: [
            (
                "source_connections",
                get(&shared.conns.refused_source_connections),
            ),
            (
                "source_handshakes",
                get(&shared.conns.refused_source_handshakes),
            ),
            ("handshakes", get(&shared.conns.refused_handshakes)),
            ("connections", get(&shared.conns.refused_connections)),
        ],
        handshake_timeouts: get(&shared.conns.handshake_timeouts),
        not_reading: get(&shared.conns.not_reading),
        cluster,
    }
}

/// What the metrics port lets remote parties hold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MetricsLimits {
    /// Connections still sending their request, in all (a newer one closes the oldest).
    pub waiting: usize,
    /// Connections still sending their request, per source (a newer one closes the source's
    /// oldest).
    pub waiting_per_source: usize,
    /// Connections being answered (request read), in all.
    pub responding: usize,
    /// Connections being answered, per source.
    pub responding_per_source: usize,
    /// New connections per second per source, sustained (more are closed at once).
    pub connections_per_second: f64,
    /// Burst of new connections per source.
    pub connection_burst: f64,
    /// Time from accept to a complete request (an honest scraper sends it at once).
    pub request_timeout: Duration,
    /// Time to hand the response to the client.
    pub response_timeout: Duration,
}

impl Default for MetricsLimits {
    fn default() -> Self {
        MetricsLimits {
            waiting: 64,
            waiting_per_source: 4,
            responding: 64,
            responding_per_source: 4,
            connections_per_second: 5.0,
            connection_burst: 20.0,
            request_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(5),
        }
    }
}

/// Largest request head read (request line and headers).
const MAX_REQUEST: usize = 8192;

/// Sources whose connection rate is remembered (least recently seen forgotten first).
const RATE_SOURCES: usize = 4096;

/// What happened on the metrics port, for `/metrics` itself.
#[derive(Debug, Default)]
pub struct MetricsCounters {
    /// Waiting connections closed to admit a newer one from the same source.
    pub evicted_per_source: AtomicU64,
    /// Waiting connections closed to admit a newer one when the waiting room was full.
    pub evicted_total: AtomicU64,
    /// Connections that did not deliver a request in time.
    pub request_timeouts: AtomicU64,
    /// Requests not answered: every response slot (of the source, or in all) taken.
    pub refused_responding: AtomicU64,
    /// Connections closed at accept: the source opens them faster than its rate.
    pub refused_rate: AtomicU64,
}

/// Serves `/metrics` until `shutdown` flips.
pub(crate) async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    tunnel: Arc<TunnelCounters>,
    limits: MetricsLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    let counters = Arc::new(MetricsCounters::default());
    let lobby = Lobby::new(limits.waiting_per_source, limits.waiting);
    let responding = SourceSlots::new(limits.responding_per_source, limits.responding);
    let mut rates = SourceBuckets::new(
        limits.connection_burst,
        limits.connections_per_second,
        RATE_SOURCES,
    );
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            _ = shutdown.changed() => break,
        };
        let source = SourceKey::of(remote.ip());
        if !rates.try_take(source, 1.0, Instant::now()) {
            counters.refused_rate.fetch_add(1, Ordering::Relaxed);
            continue; // dropping the stream closes it
        }
        let (ticket, eviction) = lobby.enter(source);
        if let Some(why) = eviction {
            let counter = match why {
                Eviction::PerSource => &counters.evicted_per_source,
                Eviction::Total => &counters.evicted_total,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        let connection = Connection {
            shared: shared.clone(),
            tunnel: tunnel.clone(),
            counters: counters.clone(),
            responding: responding.clone(),
            limits,
            source,
        };
        tasks.spawn(connection.run(stream, ticket));
    }
    tasks.shutdown().await;
}

/// One metrics connection's task.
struct Connection {
    shared: Arc<Shared>,
    tunnel: Arc<TunnelCounters>,
    counters: Arc<MetricsCounters>,
    responding: SourceSlots,
    limits: MetricsLimits,
    source: SourceKey,
}

impl Connection {
    async fn run(self, mut stream: tokio::net::TcpStream, mut ticket: Ticket) {
        let read = tokio::time::timeout(self.limits.request_timeout, read_request(&mut stream));
        let request = match ticket.unless_evicted(read).await {
            Some(Ok(Ok(Some(request)))) => request,
            Some(Err(_)) => {
                self.counters
                    .request_timeouts
                    .fetch_add(1, Ordering::Relaxed);
                return;
            }
            // Evicted, closed, or not a request.
            _ => return,
        };
        drop(ticket);
        let Ok(_slot) = self.responding.try_acquire(self.source) else {
            self.counters
                .refused_responding
                .fetch_add(1, Ordering::Relaxed);
            return;
        };
        let _ = tokio::time::timeout(
            self.limits.response_timeout,
            self.respond(&mut stream, &request),
        )
        .await;
    }

    async fn respond(
        &self,
        stream: &mut tokio::net::TcpStream,
        request: &[u8],
    ) -> std::io::Result<()> {
        let line = request.split(|b| *b == b'\r').next().unwrap_or(&[]);
        let (status, body) = if line.starts_with(b"GET /metrics ") {
            (
                "200 OK",
                render(&snapshot(&self.shared, &self.tunnel, &self.counters)),
            )
        } else {
            ("404 Not Found", "see /metrics\n".to_owned())
        };
        let response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    }
}

/// Reads a request head (up to the blank line); `None` if the client closed first or sent more
/// than [`MAX_REQUEST`] bytes without one.
async fn read_request(stream: &mut tokio::net::TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 || request.len() + n > MAX_REQUEST {
            return Ok(None);
        }
        // Only the new bytes (and the 3 before them) can complete the blank line: a request
        // trickled a byte at a time costs linear time, not quadratic.
        let from = request.len().saturating_sub(3);
        request.extend_from_slice(&buf[..n]);
        if request[from..].windows(4).any(|w| w == b"\r\n\r\n") {
            return Ok(Some(request));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_exposition_format() {
        let text = render(&Snapshot {
            registered: 3,
            relay_dropped: vec![
                ("queue_full", 1),
                ("no_route", 0),
                ("not_introduced", 2),
                ("rate", 0),
                ("quota", 0),
            ],
            stun: [("answered", 5), ("rate_limited", 0), ("ignored", 1)],
            punches_succeeded: 4,
            error_replies: vec![("bad_request", 2), ("too_large", 1)],
            registrations_refused: [("source_rate", 0), ("new_ids_rate", 7), ("full", 0)],
            expired: 9,
            ..Snapshot::default()
        });
        assert!(
            text.contains("rendezvous_registrations_refused_total{reason=\"new_ids_rate\"} 7\n")
        );
        assert!(text.contains("rendezvous_expired_peers_total 9\n"));
        assert!(text.contains("rendezvous_punch_results_total{result=\"direct\"} 4\n"));
        assert!(text.contains("rendezvous_error_replies_total{code=\"too_large\"} 1\n"));
        assert!(text
            .contains("# TYPE rendezvous_registered_peers gauge\nrendezvous_registered_peers 3\n"));
        assert!(
            text.contains("rendezvous_relay_dropped_packets_total{reason=\"not_introduced\"} 2\n")
        );
        assert!(text.contains("rendezvous_stun_requests_total{outcome=\"answered\"} 5\n"));
        assert!(text.contains("rendezvous_tcp_tunnels_open 0\n"));
        // A single node has no cluster metrics; a cluster node has them.
        assert!(!text.contains("rendezvous_cluster_"));
        let node = render(&Snapshot {
            cluster: Some(ClusterSnapshot {
                redis_up: 1,
                redis_failures: 2,
                primary_changes: 1,
                introductions: [("forwarded", 3), ("received", 4), ("dropped", 5)],
                nodes: 3,
                online: 7,
                links: Some(LinkSnapshot {
                    packets: [("sent", 8), ("received", 9)],
                    bytes: [("sent", 800), ("received", 900)],
                    links: 2,
                    refused: 1,
                    dial_failures: 0,
                    dropped: 0,
                }),
            }),
            ..Snapshot::default()
        });
        assert!(node.contains("rendezvous_cluster_relay_packets_total{direction=\"received\"} 9\n"));
        assert!(node.contains("rendezvous_cluster_links 2\n"));
        assert!(node.contains("rendezvous_cluster_link_refused_total 1\n"));
        assert!(node.contains("rendezvous_cluster_redis_up 1\n"));
        assert!(node.contains("rendezvous_cluster_nodes 3\n"));
        assert!(node.contains("rendezvous_cluster_online_peers 7\n"));
        assert!(node.contains("rendezvous_cluster_introductions_total{direction=\"received\"} 4\n"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<u64>().is_ok(), "{line}");
        }
    }
}
