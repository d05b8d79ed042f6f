//! Attacks on the rendezvous's relay, end to end: the real `rendezvous` binary on loopback and
//! raw QUIC clients with their own identities (no peer program).
//!
//! - One sender relays as fast as it may to many destinations that accepted its introductions
//!   and then never read their relay streams, mixed with a stream of empty frames: the server's
//!   memory stays bounded (RSS from /proc) and its metrics show the drops.
//! - Consent: nothing is relayed to a peer before it accepts the introduction; what the
//!   requester sent meanwhile is held and delivered on accept, or dropped after the hold time.
//! - The real peer program accepts the introductions it is pushed.
//! - One relay stream per connection; wrong accepts are refused; version-1 peers are refused
//!   with a message telling them to upgrade.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::relay::{self, RelayDecoder};
use common::{ControlMessage, ErrorCode, PeerId, PROTOCOL_VERSION};
use e2e::attack::{self, RawClient, PACKET};
use e2e::{args, Proc, Rendezvous, TempDir};

const T: Duration = Duration::from_secs(30);
/// Destinations that never read.
const DESTINATIONS: usize = 24;
/// The server's default queue per destination (rendezvous::relay::RelayLimits::queue_bytes).
const QUEUE_BYTES: u64 = 1024 * 1024;

/// A raw client (the support library's), failing the test on any error.
struct Client(RawClient);

impl std::ops::Deref for Client {
    type Target = RawClient;
    fn deref(&self) -> &RawClient {
        &self.0
    }
}

/// Registers a raw client with a fresh identity, each from its own source in 127.0.3.0/24 (the
/// test registers more new identities than one source may).
async fn client(server: SocketAddr, version: u32) -> Result<Client, ControlMessage> {
    static NEXT_SOURCE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(1);
    let n = NEXT_SOURCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let identity = certs::Identity::generate().unwrap();
    let endpoint = attack::endpoint_on(std::net::Ipv4Addr::new(127, 0, 3, n)).unwrap();
    RawClient::register(
        &endpoint,
        &identity,
        server,
        certs::ServerTrust::FirstUse,
        version,
    )
    .await
    .unwrap()
    .map(Client)
}

impl Client {
    /// One request on its own stream.
    async fn request(&self, msg: &ControlMessage) -> ControlMessage {
        self.0.request(msg).await.unwrap()
    }

    /// Opens a relay stream (or returns the refusal).
    async fn relay(&self) -> Result<(quinn::SendStream, quinn::RecvStream), ControlMessage> {
        self.0.relay().await.unwrap()
    }

    /// Asks to be introduced to `target`; the nonce.
    async fn connect(&self, target: PeerId) -> u64 {
        self.0.connect(target).await.unwrap()
    }
}

/// The pid of the process whose command line mentions `needle` (our temporary directory).
fn pid_of(needle: &str) -> u32 {
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            if String::from_utf8_lossy(&cmdline).contains(needle) {
                return pid;
            }
        }
    }
    panic!("no process mentions {needle}");
}

/// Resident memory of `pid`, bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    kb * 1024
}

fn scrape(addr: &str) -> String {
    e2e::scrape(addr)
}

fn sample(text: &str, name: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn dropped(text: &str, reason: &str) -> u64 {
    sample(
        text,
        &format!("rendezvous_relay_dropped_packets_total{{reason=\"{reason}\"}}"),
    )
}

/// Polls the metrics until `done` holds; panics with the last scrape after `T`.
async fn wait_metrics(addr: &str, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + T;
    loop {
        let addr = addr.to_owned();
        let text = tokio::task::spawn_blocking(move || scrape(&addr))
            .await
            .unwrap();
        if done(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "{what}; metrics:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Writes `rounds` packets to every one of `targets`, and one empty frame per round; returns
/// how many empty frames were sent.
async fn blast(out: &mut quinn::SendStream, targets: &[PeerId], rounds: u64) -> u64 {
    attack::blast(out, targets, rounds).await.unwrap()
}

/// Reads relay frames from `rx` until `n` packets came from `from`.
async fn receive_from(rx: &mut quinn::RecvStream, from: PeerId, n: usize) -> Vec<Vec<u8>> {
    let mut decoder = RelayDecoder::new();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 4096];
    while got.len() < n {
        let read = tokio::time::timeout(T, rx.read(&mut buf))
            .await
            .expect("relayed packets in time")
            .unwrap()
            .expect("relay stream open");
        decoder.push(&buf[..read]);
        while let Some((source, packet)) = decoder.next_frame().unwrap() {
            assert_eq!(source, from);
            got.push(packet);
        }
    }
    got
}

#[test]
fn relay_memory_stays_bounded_and_relaying_needs_consent() {
    let dir = TempDir::new("attacks-relay");
    let data = dir.path().join("rv");
    // The server's pid is found by its data directory on its command line.
    let data_arg = data.to_str().unwrap().to_owned();
    let mut argv = e2e::rendezvous_args(&data, "127.0.0.1:0");
    argv.extend(args![
        "--tcp-listen",
        "off",
        "--metrics",
        "127.0.0.1:0",
        // No rate limit in the way: the queues are what is attacked.
        "--relay-rate",
        "10000000000"
    ]);
    let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
    let rv = Rendezvous::ready(Proc::spawn("rendezvous", &e2e::bin("rendezvous"), &refs));
    let metrics_line = rv
        .proc
        .stdout
        .wait_for("metrics on http://", Duration::from_secs(10));
    let metrics = metrics_line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .expect("metrics address")
        .to_owned();
    let pid = pid_of(&data_arg);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        // Version-1 peers are told to upgrade.
        match client(rv.addr, 1).await {
            Err(ControlMessage::Error {
                code: ErrorCode::UnsupportedVersion,
                message,
            }) => assert!(message.contains("upgrade"), "{message}"),
            Err(other) => panic!("{other:?}"),
            Ok(_) => panic!("a version-1 peer was registered"),
        }

        let sender = client(rv.addr, PROTOCOL_VERSION).await.unwrap();
        let (mut out, _sender_in) = sender.relay().await.unwrap();
        // One relay stream per connection.
        match sender.relay().await {
            Err(ControlMessage::Error {
                code: ErrorCode::RelayDenied,
                ..
            }) => {}
            other => panic!("second relay stream: {other:?}"),
        }

        // --- Consent: held until the accept, then delivered.
        let late = client(rv.addr, PROTOCOL_VERSION).await.unwrap();
        let (_late_out, mut late_in) = late.relay().await.unwrap();
        let nonce = sender.connect(late.id).await;
        let mut wire = Vec::new();
        for i in 0..3u8 {
            relay::encode_into(&mut wire, &late.id, &[i; 100]).unwrap();
        }
        out.write_all(&wire).await.unwrap();
        wait_metrics(&metrics, "3 packets held", |m| {
            sample(m, "rendezvous_relay_held_packets") >= 3
        })
        .await;
        // A wrong accept changes nothing.
        match late
            .request(&ControlMessage::Accept {
                peer: sender.id,
                nonce: nonce.wrapping_add(1),
            })
            .await
        {
            ControlMessage::Error {
                code: ErrorCode::BadRequest,
                ..
            } => {}
            other => panic!("wrong nonce accepted: {other:?}"),
        }
        assert_eq!(
            late.request(&ControlMessage::Accept {
                peer: sender.id,
                nonce
            })
            .await,
            ControlMessage::Ack {}
        );
        let got = receive_from(&mut late_in, sender.id, 3).await;
        assert_eq!(got, vec![vec![0u8; 100], vec![1u8; 100], vec![2u8; 100]]);
        let m = wait_metrics(&metrics, "held packets forwarded", |m| {
            sample(m, "rendezvous_relay_held_forwarded_packets_total") >= 3
        })
        .await;
        assert_eq!(sample(&m, "rendezvous_relay_held_packets"), 0);

        // --- No accept: dropped after the hold time.
        let silent = client(rv.addr, PROTOCOL_VERSION).await.unwrap();
        let (_silent_out, _silent_in) = silent.relay().await.unwrap();
        sender.connect(silent.id).await;
        let mut wire = Vec::new();
        for _ in 0..2 {
            relay::encode_into(&mut wire, &silent.id, &[9; 100]).unwrap();
        }
        out.write_all(&wire).await.unwrap();
        wait_metrics(&metrics, "unaccepted packets dropped", |m| {
            dropped(m, "not_accepted") >= 2 && sample(m, "rendezvous_relay_held_packets") == 0
        })
        .await;

        // --- The real peer program accepts the introductions it is pushed.
        let m = wait_metrics(&metrics, "a scrape", |_| true).await;
        let (forwarded, unaccepted) = (
            sample(&m, "rendezvous_relay_packets_total"),
            dropped(&m, "not_accepted"),
        );
        let (peer_proc, peer_id) = {
            let rv = &rv;
            let dir = dir.path().join("peer");
            tokio::task::spawn_blocking({
                let args = rv.args();
                move || {
                    let mut argv = vec!["listen".to_owned()];
                    argv.extend(args);
                    let p = e2e::peer("peer", &dir, &argv);
                    let id = e2e::wait_registered(&p, T);
                    (p, id)
                }
            })
            .await
            .unwrap()
        };
        let peer_id: PeerId = peer_id.parse().expect("peer id");
        sender.connect(peer_id).await;
        let mut wire = Vec::new();
        relay::encode_into(&mut wire, &peer_id, &[0x40; 100]).unwrap();
        // Sent again until it is forwarded: the peer's relay stream may open a moment after
        // its registration (a packet before that is dropped as `no_route`).
        let deadline = Instant::now() + T;
        let m = loop {
            out.write_all(&wire).await.unwrap();
            let m = wait_metrics(&metrics, "a scrape", |_| true).await;
            if sample(&m, "rendezvous_relay_packets_total") > forwarded {
                break m;
            }
            assert!(
                Instant::now() < deadline,
                "never forwarded to the peer:\n{m}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(dropped(&m, "not_accepted"), unaccepted);
        drop(peer_proc);

        // --- Many destinations that accept and never read.
        let mut sinks = Vec::new();
        for _ in 0..DESTINATIONS {
            let dest = client(rv.addr, PROTOCOL_VERSION).await.unwrap();
            let relay = dest.relay().await.unwrap();
            let nonce = sender.connect(dest.id).await;
            assert_eq!(
                dest.request(&ControlMessage::Accept {
                    peer: sender.id,
                    nonce
                })
                .await,
                ControlMessage::Ack {}
            );
            sinks.push((dest, relay));
        }
        let before = rss(pid);
        let targets: Vec<PeerId> = sinks.iter().map(|(dest, _)| dest.id).collect();
        // Each destination can take its queue, plus what QUIC lets it buffer unread (its
        // stream window): send twice that to each.
        let per_destination = 2 * (QUEUE_BYTES + 1_250_000);
        let rounds = per_destination / PACKET as u64;
        let mut empties = blast(&mut out, &targets, rounds).await;
        let m = wait_metrics(&metrics, "every frame accounted for", |m| {
            dropped(m, "empty") >= empties && dropped(m, "queue_full") > 0
        })
        .await;
        let after = rss(pid);
        let growth = after.saturating_sub(before);
        let sent = rounds * DESTINATIONS as u64;
        eprintln!(
            "sent {sent} packets of {PACKET} bytes to {DESTINATIONS} destinations that never read, \
             and {empties} empty frames; RSS {} -> {} MiB (+{} MiB); forwarded {}, dropped: \
             queue_full {}, rate {}, empty {}",
            before >> 20,
            after >> 20,
            growth >> 20,
            sample(&m, "rendezvous_relay_packets_total"),
            dropped(&m, "queue_full"),
            dropped(&m, "rate"),
            dropped(&m, "empty"),
        );
        // Per destination: its byte-bounded queue and what QUIC buffers towards it (at most its
        // stream window); plus a fixed allowance for allocator slack.
        let bound = DESTINATIONS as u64 * (QUEUE_BYTES + 1_250_000) + 32 * (1 << 20);
        assert!(
            growth < bound,
            "RSS grew by {growth} bytes (bound {bound}); sent {} bytes",
            sent * PACKET as u64
        );
        assert!(
            sample(&m, "rendezvous_relay_packets_total") < sent,
            "some were dropped"
        );
        // The same again: the queues are full, so nothing more is kept.
        let forwarded = sample(&m, "rendezvous_relay_packets_total");
        empties += blast(&mut out, &targets, rounds).await;
        let m = wait_metrics(&metrics, "the second burst accounted for", |m| {
            dropped(m, "empty") >= empties
        })
        .await;
        let again = rss(pid);
        eprintln!(
            "second burst: RSS {} MiB; forwarded {} more",
            again >> 20,
            sample(&m, "rendezvous_relay_packets_total") - forwarded
        );
        assert!(
            again < after + 8 * (1 << 20),
            "RSS kept growing: {after} -> {again}"
        );
        // The server still answers.
        assert_eq!(
            sender.request(&ControlMessage::Ping { seq: 1 }).await,
            ControlMessage::Pong { seq: 1 }
        );
        drop(sinks);
    });
}
