//! Prometheus metrics over plain HTTP (`--metrics ADDR`): `GET /metrics` answers the text
//! exposition format; anything else is a 404. Requests are small, bounded and timed out.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::server::Shared;

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
    /// Punches that proved a direct path, as reported by the peers.
    pub punches_succeeded: u64,
    /// Punches that found no direct path, as reported by the peers.
    pub punches_failed: u64,
    /// Error replies sent, by code.
    pub error_replies: Vec<(&'static str, u64)>,
    /// Requests refused as invalid.
    pub rejected: u64,
    /// Relay: sessions, packets, bytes.
    pub relay_sessions: u64,
    /// Relayed packets.
    pub relay_packets: u64,
    /// Relayed bytes.
    pub relay_bytes: u64,
    /// Relay drops by reason.
    pub relay_dropped: [(&'static str, u64); 5],
    /// STUN: answered, rate limited, ignored.
    pub stun: [(&'static str, u64); 3],
    /// Connection attempts sent a QUIC Retry (address validation under load).
    pub quic_retries: u64,
    /// Connection attempts refused, by reason.
    pub connections_refused: [(&'static str, u64); 4],
    /// QUIC handshakes that did not finish in time.
    pub handshake_timeouts: u64,
    /// Peers disconnected for not reading their replies within the write timeout.
    pub not_reading: u64,
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
    let metrics: [(&str, &str, &str, Samples); 17] = [
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
            "rendezvous_stun_requests_total",
            "counter",
            "STUN datagrams, by outcome.",
            labelled("outcome", &s.stun),
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

pub(crate) fn snapshot(shared: &Shared) -> Snapshot {
    let (registered, online, counters) = shared.registry_view();
    let relay = &shared.relay.counters;
    let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    Snapshot {
        registered,
        online,
        registrations: counters.registrations,
        queries: counters.queries,
        introductions: counters.punches,
        punches_succeeded: counters.punches_succeeded,
        punches_failed: counters.punches_failed,
        error_replies: shared.rejections.snapshot(),
        rejected: counters.rejected,
        relay_sessions: get(&relay.sessions),
        relay_packets: get(&relay.packets),
        relay_bytes: get(&relay.bytes),
        relay_dropped: [
            ("queue_full", get(&relay.dropped_queue_full)),
            ("no_route", get(&relay.dropped_no_route)),
            ("not_introduced", get(&relay.denied_not_introduced)),
            ("rate", get(&relay.denied_rate)),
            ("quota", get(&relay.denied_quota)),
        ],
        stun: [
            ("answered", get(&shared.stun.answered)),
            ("rate_limited", get(&shared.stun.rate_limited)),
            ("ignored", get(&shared.stun.ignored)),
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
    }
}

/// Serves `/metrics` until `shutdown` flips.
pub(crate) async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            _ = shutdown.changed() => break,
        };
        if tasks.len() >= 64 {
            continue; // drop the connection: scrapers retry
        }
        let shared = shared.clone();
        tasks.spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), answer(stream, &shared)).await;
        });
    }
    tasks.shutdown().await;
}

async fn answer(mut stream: tokio::net::TcpStream, shared: &Shared) -> std::io::Result<()> {
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || request.len() > 8192 {
            return Ok(());
        }
        request.extend_from_slice(&buf[..n]);
    }
    let line = request.split(|b| *b == b'\r').next().unwrap_or(&[]);
    let (status, body) = if line.starts_with(b"GET /metrics ") {
        ("200 OK", render(&snapshot(shared)))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_exposition_format() {
        let text = render(&Snapshot {
            registered: 3,
            relay_dropped: [
                ("queue_full", 1),
                ("no_route", 0),
                ("not_introduced", 2),
                ("rate", 0),
                ("quota", 0),
            ],
            stun: [("answered", 5), ("rate_limited", 0), ("ignored", 1)],
            punches_succeeded: 4,
            error_replies: vec![("bad_request", 2), ("too_large", 1)],
            ..Snapshot::default()
        });
        assert!(text.contains("rendezvous_punch_results_total{result=\"direct\"} 4\n"));
        assert!(text.contains("rendezvous_error_replies_total{code=\"too_large\"} 1\n"));
        assert!(text
            .contains("# TYPE rendezvous_registered_peers gauge\nrendezvous_registered_peers 3\n"));
        assert!(
            text.contains("rendezvous_relay_dropped_packets_total{reason=\"not_introduced\"} 2\n")
        );
        assert!(text.contains("rendezvous_stun_requests_total{outcome=\"answered\"} 5\n"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<u64>().is_ok(), "{line}");
        }
    }
}
