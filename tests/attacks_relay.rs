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

/// Starts the rendezvous on loopback with its data in `data`, no TCP tunnel, metrics on a port
/// of its own, and `extra` options; with its metrics address.
fn rendezvous_with_metrics(data: &std::path::Path, extra: &[String]) -> (Rendezvous, String) {
    let mut argv = e2e::rendezvous_args(data, "127.0.0.1:0");
    argv.extend(args!["--tcp-listen", "off", "--metrics", "127.0.0.1:0"]);
    argv.extend(extra.iter().cloned());
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
    (rv, metrics)
}

#[test]
fn relay_memory_stays_bounded_and_relaying_needs_consent() {
    let dir = TempDir::new("attacks-relay");
    let data = dir.path().join("rv");
    // The server's pid is found by its data directory on its command line.
    let data_arg = data.to_str().unwrap().to_owned();
    // No rate limit in the way: the queues are what is attacked.
    let (rv, metrics) = rendezvous_with_metrics(&data, &args!["--relay-rate", "10000000000"]);
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

/// A raw client and the socket it registered from (to send channel datagrams from the address
/// its control connection comes from, as a peer does).
struct ChannelClient {
    client: RawClient,
    socket: std::sync::Arc<transport::DemuxSocket>,
    _endpoint: quinn::Endpoint,
}

async fn channel_client(server: SocketAddr, n: u8) -> ChannelClient {
    let identity = certs::Identity::generate().unwrap();
    let (endpoint, socket, _stun) = transport::make_endpoint(
        SocketAddr::from(([127, 0, 5, n], 0)),
        None,
        Default::default(),
        8,
        None,
    )
    .unwrap();
    let client = RawClient::register(
        &endpoint,
        &identity,
        server,
        certs::ServerTrust::FirstUse,
        PROTOCOL_VERSION,
    )
    .await
    .unwrap()
    .unwrap();
    ChannelClient {
        client,
        socket,
        _endpoint: endpoint,
    }
}

/// `relay_channel`'s answer: the id, or the refusal.
async fn ask_channel(from: &RawClient, peer: PeerId) -> Result<u64, ControlMessage> {
    match from
        .request(&ControlMessage::RelayChannel { peer })
        .await
        .unwrap()
    {
        ControlMessage::RelayChannelReady {
            peer: p, channel, ..
        } if p == peer => Ok(ControlMessage::parse_channel(&channel).expect("16 hex digits")),
        other => Err(other),
    }
}

fn channel_datagram(id: u64, body: &[u8]) -> Vec<u8> {
    [&transport::channel::header(id)[..], body].concat()
}

/// Relay channels (plain UDP relaying): granted only between peers introduced with the
/// target's accept; forwarded only from the two bound addresses (a stranger who knows the id,
/// from its own address, gets nothing through); into the other side's relay stream until it
/// binds its end, then by UDP to its socket; charged to the sender's relay quota; a
/// datagram of the channel shape that is not a channel's reaches nobody.
#[test]
fn relay_channels_need_consent_and_forward_only_between_the_bound_ends() {
    let dir = TempDir::new("attacks-channel");
    // A small allowance: 30 kB of relaying per peer and day.
    let (rv, metrics) =
        rendezvous_with_metrics(&dir.path().join("rv"), &args!["--relay-quota", "30000"]);
    let channel_count = |m: &str, outcome: &str| {
        sample(
            m,
            &format!("rendezvous_relay_channel_datagrams_total{{outcome=\"{outcome}\"}}"),
        )
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let a = channel_client(rv.addr, 1).await;
        let b = channel_client(rv.addr, 2).await;
        let stranger = channel_client(rv.addr, 3).await;

        // No introduction, no channel; nor to oneself, nor to someone unknown.
        for (asker, peer) in [
            (&a.client, b.client.id),
            (&a.client, a.client.id),
            (&a.client, PeerId::from_key_digest(&[9; 32])),
        ] {
            match ask_channel(asker, peer).await {
                Err(ControlMessage::Error {
                    code: ErrorCode::RelayDenied,
                    ..
                }) => {}
                other => panic!("a channel without consent: {other:?}"),
            }
        }
        // Introduced, not accepted yet: still no.
        let nonce = a.client.connect(b.client.id).await.unwrap();
        assert!(ask_channel(&a.client, b.client.id).await.is_err());
        b.client.accept(a.client.id, nonce).await.unwrap();
        let id = ask_channel(&a.client, b.client.id).await.unwrap();
        // The stranger was introduced to nobody.
        assert!(ask_channel(&stranger.client, b.client.id).await.is_err());

        // b has no channel yet: a's datagrams arrive in b's relay stream.
        let (_b_out, mut b_in) = b.client.relay().await.unwrap().unwrap();
        // The stranger sends on a's channel from its own address first: not forwarded.
        stranger
            .socket
            .send_to(&channel_datagram(id, b"\x40spoofed"), rv.addr)
            .await
            .unwrap();
        a.socket
            .send_to(&channel_datagram(id, b"\x40from a"), rv.addr)
            .await
            .unwrap();
        let got = receive_from(&mut b_in, a.client.id, 1).await;
        assert_eq!(got, vec![b"\x40from a".to_vec()]);
        let m = wait_metrics(&metrics, "one to the stream", |m| {
            channel_count(m, "to_stream") == 1
        })
        .await;
        assert_eq!(channel_count(&m, "forwarded"), 0, "{m}");

        // b binds its end: the same channel; a's datagrams now reach b's socket by UDP.
        assert_eq!(ask_channel(&b.client, a.client.id).await.unwrap(), id);
        let heard = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = heard.clone();
        b.socket.bind_channel(
            *a.client.id.as_bytes(),
            id,
            rv.addr,
            "240.0.0.1:1".parse().unwrap(),
            Some(std::sync::Arc::new(move || {
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            })),
        );
        a.socket
            .send_to(&channel_datagram(id, b"\x40by udp"), rv.addr)
            .await
            .unwrap();
        let m = wait_metrics(&metrics, "one forwarded", |m| {
            channel_count(m, "forwarded") == 1
        })
        .await;
        assert_eq!(channel_count(&m, "to_stream"), 1, "{m}");
        // b's socket took it as a channel datagram (b's quinn endpoint read the socket).
        let deadline = Instant::now() + T;
        while b
            .socket
            .stats()
            .channel_received
            .load(std::sync::atomic::Ordering::Relaxed)
            == 0
        {
            assert!(
                Instant::now() < deadline,
                "b's socket never got the datagram"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(heard.load(std::sync::atomic::Ordering::Relaxed) >= 1);

        // Over the allowance (30 kB): most of 100 datagrams of 1 kB are dropped and counted
        // as the quota's.
        let big = channel_datagram(id, &[0x40; 1000]);
        for _ in 0..100 {
            a.socket.send_to(&big, rv.addr).await.unwrap();
        }
        let m = wait_metrics(&metrics, "the rate limit", |m| {
            channel_count(m, "dropped") + channel_count(m, "forwarded") >= 101
        })
        .await;
        assert!(channel_count(&m, "dropped") >= 70, "{m}");
        assert!(dropped(&m, "quota") >= 70, "{m}");

        // A datagram of the channel's shape with an id nobody holds reaches no one: quinn
        // discards it and the server goes on.
        a.socket
            .send_to(&channel_datagram(id ^ 1, b"\x40nobody's"), rv.addr)
            .await
            .unwrap();
        match ask_channel(&a.client, b.client.id).await {
            Ok(again) => assert_eq!(again, id),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            sample(&scrape(&metrics), "rendezvous_relay_channels"),
            1,
            "one channel for the pair, however often asked"
        );
    });
}
