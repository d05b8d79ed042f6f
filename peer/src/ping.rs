//! `peer ping`: round trips over a `ping` stream on the peer connection, the path each one took,
//! and, when the path is relayed, why, from both sides' NAT behaviour.
//!
//! The answering peer puts its own NAT profile in every `pong`, so the pinging side can explain
//! the path with [`common::nat::forecast`] without asking the rendezvous.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::frame_io::{read_frame, write_frame};
use common::message::PeerApp;
use common::nat::{forecast, Forecast, NatProfile};
use common::{PeerId, PeerMessage};
use punch::path::Current;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::paths::PathKeeper;

/// How long one ping waits for its pong.
const PONG_TIMEOUT: Duration = Duration::from_secs(2);
/// How long pinging goes on after `count` to learn both NAT profiles for a relayed path (and,
/// for a pair that only birthday punching opens, to give that punch its time).
const EXPLAIN_WAIT: Duration = Duration::from_secs(8);
/// A ping stream the other side leaves idle this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// What to do.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct PingOptions {
    /// Pings to send (at least).
    pub count: u32,
    /// Time between pings.
    pub interval_ms: u64,
    /// Keep pinging past `count` until a pong comes over a direct path (or `timeout_ms`).
    pub until_direct: bool,
    /// Give up after this long.
    pub timeout_ms: u64,
}

/// One pong.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PingReply {
    /// The ping's number.
    pub seq: u64,
    /// Round trip, ms.
    pub rtt_ms: f64,
    /// The path it took, for people.
    pub path: String,
    /// It took a direct path.
    pub direct: bool,
}

/// Round-trip statistics, ms.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RttStats {
    /// Replies they cover (those on the final path).
    pub samples: usize,
    /// Fastest.
    pub min: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Slowest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

/// Percentile by nearest rank of sorted `values`.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl RttStats {
    /// Statistics of `rtts`, `None` if empty.
    pub fn of(rtts: &[f64]) -> Option<RttStats> {
        if rtts.is_empty() {
            return None;
        }
        let mut sorted = rtts.to_vec();
        sorted.sort_by(f64::total_cmp);
        Some(RttStats {
            samples: sorted.len(),
            min: sorted[0],
            p50: percentile(&sorted, 50.0),
            p90: percentile(&sorted, 90.0),
            p99: percentile(&sorted, 99.0),
            max: sorted[sorted.len() - 1],
            mean: sorted.iter().sum::<f64>() / sorted.len() as f64,
        })
    }
}

/// The outcome.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PingSummary {
    /// Whom we pinged.
    pub peer: PeerId,
    /// Pings sent.
    pub sent: u32,
    /// Pongs received.
    pub received: u32,
    /// Round trips on the final path.
    pub rtt_ms: Option<RttStats>,
    /// The path at the end, for people.
    pub path: String,
    /// The path at the end is direct.
    pub direct: bool,
    /// The peer's address on the direct path.
    pub direct_addr: Option<SocketAddr>,
    /// Why the path is relayed (when it is).
    pub reason: Option<String>,
    /// Our NAT, as measured against the rendezvous.
    pub our_nat: Option<NatProfile>,
    /// The peer's NAT, as it reported.
    pub peer_nat: Option<NatProfile>,
    /// Time to set the connection up (introduction, punching or relay, QUIC handshake), when this
    /// ping made it; measured from the end of registration.
    pub connect_ms: Option<f64>,
    /// From the start of the connect (or of the ping, on an existing connection) to the first
    /// pong: the first byte each way.
    pub first_reply_ms: Option<f64>,
    /// With `until_direct`: when the first pong came over a direct path, from the same start.
    pub direct_after_ms: Option<f64>,
}

/// Where packets to `conn`'s peer go now.
fn path_now(keeper: &PathKeeper, conn: &quinn::Connection) -> (String, Option<SocketAddr>) {
    match keeper.node.socket.route_of(conn.remote_address()) {
        transport::PathTarget::Udp(addr) => {
            let how = keeper
                .link_of_conn(conn)
                .map(|l| l.status)
                .filter(|s| s.path == Current::Direct(addr))
                .map_or("direct", |s| s.describe);
            (format!("direct to {addr} ({how})"), Some(addr))
        }
        transport::PathTarget::Virtual(_) => (keeper.relay_label().to_owned(), None),
    }
}

/// Why a connection is relayed, from both NAT profiles and the last punch failure.
pub fn explain(
    ours: Option<&NatProfile>,
    theirs: Option<&NatProfile>,
    punch_failure: Option<&str>,
) -> String {
    match forecast(ours, theirs) {
        Forecast::Relayed(reason) => reason,
        Forecast::Direct => match punch_failure {
            Some(failure) => format!(
                "both NATs allow a direct path, but punching found none ({failure}); \
                 retrying in the background"
            ),
            None => "both NATs allow a direct path; punching has not found one yet".to_owned(),
        },
        Forecast::Birthday(reason) => match punch_failure {
            Some(failure) => format!(
                "{reason}: only birthday punching (guessing the symmetric side's port with many \
                 probes) can open a direct path, and it found none ({failure}); retrying in the \
                 background"
            ),
            None => format!(
                "{reason}: only birthday punching (guessing the symmetric side's port with many \
                 probes) can open a direct path; it has not found one yet (or is off on one \
                 side: --no-birthday-punch)"
            ),
        },
        Forecast::Unknown(missing) => format!("cannot tell why: {missing}"),
    }
}

/// Pings `peer` over `conn`; each pong goes to `replies` as it arrives. `started` is when the
/// connect began (for `first_reply_ms` and `direct_after_ms`).
pub async fn run(
    keeper: &PathKeeper,
    peer: PeerId,
    conn: &quinn::Connection,
    options: PingOptions,
    started: Instant,
    connect_ms: Option<f64>,
    replies: &mpsc::Sender<PingReply>,
) -> Result<PingSummary, String> {
    let (mut tx, rx) = conn
        .open_bi()
        .await
        .map_err(|e| format!("cannot open a ping stream: {e}"))?;
    write_frame(&mut tx, &PeerMessage::Open { app: PeerApp::Ping }.encode())
        .await
        .map_err(|e| format!("cannot open a ping stream: {e}"))?;
    // Reading a frame is not cancel-safe: the reader runs alongside the loop (in this task, so
    // that it ends with it).
    let (pong_tx, mut pongs) = mpsc::channel(16);
    let mut reader = Box::pin(read_pongs(rx, pong_tx));
    let deadline = started.max(Instant::now()) + Duration::from_millis(options.timeout_ms);
    let interval = Duration::from_millis(options.interval_ms.max(10));
    let mut sent = 0u32;
    let mut received = 0u32;
    let mut samples: Vec<(f64, bool)> = Vec::new();
    let mut peer_nat = None;
    let mut first_reply_ms = None;
    let mut direct_after_ms = None;
    let mut failure = None;
    let mut last_direct = false;
    // After the last ping, a relayed path still needs both NAT profiles to be explained: ours
    // may still be being measured, the peer's comes with its pongs.
    let mut explain_until: Option<Instant> = None;
    let pinging = async {
        loop {
            let now = Instant::now();
            let direct_seen = direct_after_ms.is_some();
            let our_nat = keeper.nat_profile();
            let unexplained = !last_direct && (peer_nat.is_none() || our_nat.is_none());
            // A pair that only birthday punching opens goes direct a moment after both
            // profiles are known: a relayed answer then would only be early.
            let birthday_pending = !last_direct
                && matches!(
                    forecast(our_nat.as_ref(), peer_nat.as_ref()),
                    Forecast::Birthday(_)
                );
            let counted = sent >= options.count && (!options.until_direct || direct_seen);
            if counted {
                let until = *explain_until.get_or_insert(now + EXPLAIN_WAIT);
                if !(unexplained || birthday_pending) || now >= until {
                    break;
                }
            }
            if now >= deadline {
                break;
            }
            let seq = u64::from(sent);
            let sent_at = Instant::now();
            if let Err(e) = write_frame(&mut tx, &PeerMessage::Ping { seq }.encode()).await {
                failure = Some(format!("connection lost: {e}"));
                break;
            }
            sent += 1;
            let wait_until = (sent_at + PONG_TIMEOUT).min(deadline);
            loop {
                let pong = tokio::time::timeout_at(wait_until.into(), pongs.recv()).await;
                match pong {
                    Ok(Some(Ok((pong_seq, nat)))) if pong_seq == seq => {
                        let rtt_ms = sent_at.elapsed().as_secs_f64() * 1000.0;
                        received += 1;
                        if nat.is_some() {
                            peer_nat = nat;
                        }
                        let since_start = started.elapsed().as_secs_f64() * 1000.0;
                        first_reply_ms.get_or_insert(since_start);
                        let (path, direct_addr) = path_now(keeper, conn);
                        let direct = direct_addr.is_some();
                        last_direct = direct;
                        if direct {
                            direct_after_ms.get_or_insert(since_start);
                        }
                        samples.push((rtt_ms, direct));
                        let _ = replies
                            .send(PingReply {
                                seq,
                                rtt_ms,
                                path,
                                direct,
                            })
                            .await;
                        break;
                    }
                    // A late pong of an earlier ping.
                    Ok(Some(Ok(_))) => continue,
                    Ok(Some(Err(e))) => {
                        failure = Some(e);
                        break;
                    }
                    Ok(None) => {
                        failure = Some("the peer closed the ping stream".to_owned());
                        break;
                    }
                    Err(_) => break, // lost
                }
            }
            if failure.is_some() {
                break;
            }
            let next = sent_at + interval;
            if next < deadline {
                tokio::time::sleep_until(next.into()).await;
            }
        }
    };
    crate::tasks::alongside(pinging, reader.as_mut()).await;
    let _ = tx.finish();
    drop(reader);
    if let (Some(failure), 0) = (&failure, received) {
        return Err(failure.clone());
    }
    let (path, direct_addr) = path_now(keeper, conn);
    let direct = direct_addr.is_some();
    let on_final_path: Vec<f64> = samples
        .iter()
        .filter(|(_, d)| *d == direct)
        .map(|(rtt, _)| *rtt)
        .collect();
    let our_nat = keeper.nat_profile();
    let reason = (!direct).then(|| {
        let punch_failure = keeper
            .link_of_conn(conn)
            .and_then(|l| l.status.punch_failure);
        explain(
            our_nat.as_ref(),
            peer_nat.as_ref(),
            punch_failure.as_deref(),
        )
    });
    Ok(PingSummary {
        peer,
        sent,
        received,
        rtt_ms: RttStats::of(&on_final_path),
        path,
        direct,
        direct_addr,
        reason,
        our_nat,
        peer_nat,
        connect_ms,
        first_reply_ms,
        direct_after_ms,
    })
}

type Pong = Result<(u64, Option<NatProfile>), String>;

async fn read_pongs(mut rx: quinn::RecvStream, pongs: mpsc::Sender<Pong>) {
    loop {
        let item = match read_frame(&mut rx).await {
            Ok(Some(body)) => match PeerMessage::decode(&body) {
                Ok(PeerMessage::Pong { seq, nat }) => Ok((seq, nat)),
                Ok(PeerMessage::Error { message }) => Err(format!("the peer refused: {message}")),
                Ok(other) => Err(format!("unexpected message on the ping stream: {other:?}")),
                Err(e) => Err(format!("bad pong: {e}")),
            },
            Ok(None) => return,
            Err(e) => Err(e.to_string()),
        };
        let stop = item.is_err();
        if pongs.send(item).await.is_err() || stop {
            return;
        }
    }
}

/// Answers the pings on a stream the other side opened, with our NAT profile in each pong.
pub async fn serve(mut tx: quinn::SendStream, mut rx: quinn::RecvStream, keeper: PathKeeper) {
    loop {
        let frame = match tokio::time::timeout(IDLE_TIMEOUT, read_frame(&mut rx)).await {
            Ok(Ok(Some(frame))) => frame,
            _ => break,
        };
        let reply = match PeerMessage::decode(&frame) {
            Ok(PeerMessage::Ping { seq }) => PeerMessage::Pong {
                seq,
                nat: keeper.nat_profile(),
            },
            Ok(other) => PeerMessage::Error {
                message: format!("expected ping, got {other:?}"),
            },
            Err(e) => PeerMessage::Error {
                message: e.to_string(),
            },
        };
        let refuse = matches!(reply, PeerMessage::Error { .. });
        if write_frame(&mut tx, &reply.encode()).await.is_err() || refuse {
            break;
        }
    }
    let _ = tx.finish();
}

/// The summary for people.
pub fn render(summary: &PingSummary) -> String {
    let mut out = String::new();
    let lost = summary.sent.saturating_sub(summary.received);
    out.push_str(&format!(
        "--- {} ping statistics ---\n{} sent, {} received, {:.0}% lost\n",
        summary.peer,
        summary.sent,
        summary.received,
        if summary.sent == 0 {
            0.0
        } else {
            100.0 * f64::from(lost) / f64::from(summary.sent)
        }
    ));
    if let Some(rtt) = &summary.rtt_ms {
        out.push_str(&format!(
            "rtt min/p50/p90/p99/max = {:.2}/{:.2}/{:.2}/{:.2}/{:.2} ms ({} on this path)\n",
            rtt.min, rtt.p50, rtt.p90, rtt.p99, rtt.max, rtt.samples
        ));
    }
    out.push_str(&format!("path: {}\n", summary.path));
    if let Some(reason) = &summary.reason {
        out.push_str(&format!("why relayed: {reason}\n"));
    }
    let describe = |p: &Option<NatProfile>| match p {
        Some(p) => format!(
            "{} ({} mapping, {} filtering)",
            p.kind(),
            p.mapping.words(),
            p.filtering.words()
        ),
        None => "not measured".to_owned(),
    };
    out.push_str(&format!("your NAT: {}\n", describe(&summary.our_nat)));
    out.push_str(&format!("peer's NAT: {}\n", describe(&summary.peer_nat)));
    if let Some(ms) = summary.connect_ms {
        out.push_str(&format!("connected in {ms:.0} ms\n"));
    }
    if let Some(ms) = summary.direct_after_ms {
        out.push_str(&format!("direct after {ms:.0} ms\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::nat::Behaviour::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let rtts: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = RttStats::of(&rtts).unwrap();
        assert_eq!(
            (s.min, s.p50, s.p90, s.p99, s.max),
            (1.0, 50.0, 90.0, 99.0, 100.0)
        );
        assert_eq!(s.mean, 50.5);
        let one = RttStats::of(&[7.0]).unwrap();
        assert_eq!((one.p50, one.p99), (7.0, 7.0));
        assert!(RttStats::of(&[]).is_none());
    }

    #[test]
    fn explains_from_both_profiles() {
        let port = NatProfile {
            udp: true,
            no_nat: false,
            mapping: EndpointIndependent,
            filtering: AddressAndPortDependent,
            inbound_takes_port: false,
        };
        let sym = NatProfile {
            mapping: AddressAndPortDependent,
            ..port
        };
        let why = explain(Some(&sym), Some(&port), None);
        assert!(why.starts_with("your NAT gives a new public port"), "{why}");
        assert!(why.contains("only birthday punching"), "{why}");
        let why = explain(Some(&port), Some(&sym), Some("no answer to 2048 probes"));
        assert!(
            why.starts_with("the peer's NAT gives a new public port")
                && why.contains("found none (no answer to 2048 probes)"),
            "{why}"
        );
        let why = explain(Some(&sym), Some(&sym), None);
        assert!(why.starts_with("both NATs give a new public port"), "{why}");
        let why = explain(Some(&port), Some(&port), Some("no answer to 12 probes"));
        assert!(why.contains("no answer to 12 probes"), "{why}");
        let why = explain(None, Some(&port), None);
        assert!(why.starts_with("cannot tell why"), "{why}");
    }
}

/// How a ping line reads.
pub fn render_reply(peer: PeerId, reply: &PingReply) -> String {
    format!(
        "pong from {peer} seq={} via {} in {:.2} ms",
        reply.seq, reply.path, reply.rtt_ms
    )
}

/// Why a ping over a connection failed.
#[derive(Debug, thiserror::Error)]
pub enum PingError {
    /// The peer closed the connection: its allow-list does not name us.
    #[error(transparent)]
    Refused(#[from] crate::access::Refused),
    /// Anything else.
    #[error("ping failed: {0}")]
    Failed(String),
}

/// Pings the peer of `conn` (made by `endpoint`), showing each pong on the endpoint's output
/// unless `quiet`; the summary, once every ping is answered or timed out.
pub async fn over_connection(
    endpoint: &crate::endpoint::Endpoint,
    conn: &crate::endpoint::Connection,
    options: PingOptions,
    quiet: bool,
) -> Result<PingSummary, PingError> {
    let peer = conn.peer();
    let (replies_tx, mut replies) = mpsc::channel(16);
    let console = endpoint.console().clone();
    // Shows each pong as it comes, until the ping is done (dropping `replies_tx`); in this
    // task, so that it ends with the ping.
    let printer = async move {
        while let Some(reply) = replies.recv().await {
            if !quiet {
                console.say(render_reply(peer, &reply)).await;
            }
        }
    };
    let pinging = async move {
        let replies_tx = replies_tx;
        run(
            endpoint.path_keeper(),
            peer,
            conn,
            options,
            conn.started(),
            Some(conn.connect_time().as_secs_f64() * 1000.0),
            &replies_tx,
        )
        .await
    };
    let (summary, ()) = tokio::join!(pinging, printer);
    let summary = summary.map_err(|e| match crate::access::refusal(peer, conn) {
        Some(refused) => PingError::Refused(refused),
        None => PingError::Failed(e),
    });
    let summary = summary?;
    endpoint.console().flush().await;
    Ok(summary)
}

/// Why a ping through the running peer failed.
#[derive(Debug, thiserror::Error)]
pub enum ThroughPeerError {
    /// No peer runs with this config dir, or the exchange failed.
    #[error(transparent)]
    Client(#[from] crate::control::ClientError),
    /// The running peer could not ping (its message).
    #[error("{0}")]
    Refused(String),
    /// It closed without a summary.
    #[error("the running peer ended the ping without a summary")]
    NoSummary,
}

/// Pings `peer` through the peer running with `config_dir` (its control socket): each pong and
/// the "connected" line go to `on_line` as they arrive; the summary at the end.
pub async fn through_running_peer(
    config_dir: &std::path::Path,
    peer: PeerId,
    options: PingOptions,
    mut on_line: impl FnMut(String),
) -> Result<PingSummary, ThroughPeerError> {
    use crate::control::{self, Reply};
    let mut summary = None;
    let mut error = None;
    control::request(
        config_dir,
        &control::Request::Ping { peer, options },
        |reply| {
            match reply {
                Reply::PingReply(r) => on_line(render_reply(peer, &r)),
                Reply::PingConnected { message } => on_line(message),
                Reply::PingDone(s) => {
                    summary = Some(*s);
                    return false;
                }
                Reply::Error { message } => {
                    error = Some(message);
                    return false;
                }
                _ => {}
            }
            true
        },
    )
    .await?;
    if let Some(message) = error {
        return Err(ThroughPeerError::Refused(message));
    }
    summary.ok_or(ThroughPeerError::NoSummary)
}
