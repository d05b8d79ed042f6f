//! Attacks on the registry's growth, against an in-process `rendezvous::Server` on loopback:
//! floods of fresh identities (which cost an attacker nothing) from a few source addresses in
//! 127.0.0.0/8 are refused with `rate_limited` past the per-source limit, the registry never
//! holds more rows than its cap, and rows of peers offline longer than the expiry time are
//! deleted from memory and from disk.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use certs::{Fingerprint, Identity, ServerTrust};
use common::frame_io::{read_frame, write_frame};
use common::{ControlMessage, ErrorCode, PeerId, PROTOCOL_VERSION};
use e2e::TempDir;
use rendezvous::core::RegistryLimits;
use rendezvous::{Config, Server};

/// Deadline for anything that should happen promptly (generous: a loaded 2-core machine).
const T: Duration = Duration::from_secs(60);

async fn start(data_dir: &Path, registry: RegistryLimits) -> Server {
    Server::start(Config {
        metrics: Some("127.0.0.1:0".parse().unwrap()),
        registry,
        ..Config::new("127.0.0.1:0".parse().unwrap(), data_dir)
    })
    .await
    .expect("starting the rendezvous")
}

/// A QUIC endpoint sending from `ip` (any address of 127.0.0.0/8 works on Linux loopback).
fn endpoint_on(ip: Ipv4Addr) -> quinn::Endpoint {
    let (endpoint, _, _) =
        transport::make_endpoint(SocketAddr::from((ip, 0)), None, Default::default(), 8, None)
            .expect("client endpoint");
    endpoint
}

/// How one registration attempt ended.
#[derive(Debug)]
enum Reply {
    Registered,
    Refused(ErrorCode, String),
}

/// Registers `identity` over `endpoint` with a raw client, then closes the connection (the
/// peer goes offline) and returns the server's answer.
async fn register_once(
    endpoint: &quinn::Endpoint,
    identity: &Identity,
    server: SocketAddr,
    fingerprint: Fingerprint,
) -> Reply {
    let (reply, conn) = register_and_stay(endpoint, identity, server, fingerprint).await;
    conn.close(0, b"done");
    reply
}

/// Registers `identity` over `endpoint` with a raw client and returns the server's answer and
/// the connection, with its control stream (the peer stays online while they are held).
async fn register_and_stay(
    endpoint: &quinn::Endpoint,
    identity: &Identity,
    server: SocketAddr,
    fingerprint: Fingerprint,
) -> (Reply, Online) {
    let tls = certs::client_config_for_server(
        identity,
        ServerTrust::Pinned(fingerprint),
        common::ALPN_RENDEZVOUS,
    )
    .unwrap();
    let config = transport::quic_client_config(tls, Default::default()).unwrap();
    let conn = tokio::time::timeout(
        T,
        endpoint
            .connect_with(config, server, peer::register::RENDEZVOUS_SERVER_NAME)
            .unwrap(),
    )
    .await
    .expect("handshake in time")
    .expect("handshake");
    // The peer's own register handshake.
    let peer::register::RegisterExchange {
        send: tx,
        recv: rx,
        reply,
    } = peer::register::register(&conn, PROTOCOL_VERSION, vec![], T)
        .await
        .expect("a reply to register in time");
    let reply = match reply {
        ControlMessage::Registered { id, .. } => {
            assert_eq!(id, identity.id());
            Reply::Registered
        }
        ControlMessage::Error { code, message } => Reply::Refused(code, message),
        other => panic!("unexpected reply to register: {other:?}"),
    };
    (reply, Online { conn, tx, rx })
}

/// A raw client's registered connection and control stream.
struct Online {
    conn: quinn::Connection,
    tx: quinn::SendStream,
    rx: quinn::RecvStream,
}

impl Online {
    fn close(&self, code: u32, reason: &[u8]) {
        self.conn.close(code.into(), reason);
    }
}

/// Registers each identity in turn from `ip`, closing each connection after the answer
/// (`stay` false) or keeping them all (`stay` true); returns the answers in order and the
/// connections kept.
async fn flood_from(
    ip: Ipv4Addr,
    identities: Vec<Identity>,
    server: SocketAddr,
    fingerprint: Fingerprint,
    stay: bool,
) -> (Vec<(PeerId, Reply)>, Vec<Online>, quinn::Endpoint) {
    let endpoint = endpoint_on(ip);
    let mut replies = Vec::new();
    let mut kept = Vec::new();
    for identity in identities {
        let (reply, online) = register_and_stay(&endpoint, &identity, server, fingerprint).await;
        if stay {
            kept.push(online);
        } else {
            online.close(0, b"done");
        }
        replies.push((identity.id(), reply));
    }
    (replies, kept, endpoint)
}

fn identities(n: usize) -> Vec<Identity> {
    (0..n).map(|_| Identity::generate().unwrap()).collect()
}

/// `GET /metrics`, as an operator's scraper would.
fn scrape(addr: SocketAddr) -> String {
    e2e::scrape(&addr.to_string())
}

/// The value of the sample `name` (with its labels, if any) in a scrape.
fn sample(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} in\n{text}"))
}

async fn metrics(server: &Server) -> String {
    let addr = server.metrics_addr().unwrap();
    tokio::task::spawn_blocking(move || scrape(addr))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_new_identities_is_rate_limited_per_source() {
    let dir = TempDir::new("registry-flood");
    let server = start(dir.path(), RegistryLimits::default()).await;
    let (addr, fingerprint) = (server.local_addr(), server.fingerprint());
    let burst = RegistryLimits::default().new_ids_burst as usize;
    const SOURCES: u8 = 4;
    const PER_SOURCE: usize = 30;

    let started = Instant::now();
    let mut floods = tokio::task::JoinSet::new();
    for s in 0..SOURCES {
        let ip = Ipv4Addr::new(127, 0, 0, 2 + s);
        let ids = tokio::task::spawn_blocking(move || identities(PER_SOURCE))
            .await
            .unwrap();
        floods.spawn(async move {
            let (replies, _, _) = flood_from(ip, ids, addr, fingerprint, false).await;
            (ip, replies)
        });
    }
    let mut by_source = HashMap::new();
    while let Some(result) = floods.join_next().await {
        let (ip, replies) = result.unwrap();
        by_source.insert(ip, replies);
    }
    // One more new identity per source per minute that the flood lasted.
    let refill = started.elapsed().as_secs() as usize / 60 + 1;

    let mut accepted_total = 0;
    let mut refused_total = 0;
    for (ip, replies) in &by_source {
        let accepted = replies
            .iter()
            .filter(|(_, r)| matches!(r, Reply::Registered))
            .count();
        assert!(
            (burst..=burst + refill).contains(&accepted),
            "{ip}: {accepted} new identities accepted, the limit is {burst} (+{refill})"
        );
        // The first `burst` are accepted; past it only refusals (and the odd refill).
        assert!(replies[..burst]
            .iter()
            .all(|(_, r)| matches!(r, Reply::Registered)));
        for (_, reply) in &replies[burst..] {
            if let Reply::Refused(code, message) = reply {
                assert_eq!(*code, ErrorCode::RateLimited, "{message}");
                assert!(
                    message.contains(&format!("too many new identities from {ip}")),
                    "{message}"
                );
                refused_total += 1;
            }
        }
        accepted_total += accepted;
    }
    assert!(refused_total >= SOURCES as usize * (PER_SOURCE - burst - refill));

    // An identity the server knows re-registers from a flooded source: the new-identity limit
    // does not lock out returning peers (many peers may share a carrier-grade NAT address).
    let flooded = Ipv4Addr::new(127, 0, 0, 2);
    let returning = identities(1).pop().unwrap();
    let other = endpoint_on(Ipv4Addr::new(127, 0, 0, 9));
    assert!(matches!(
        register_once(&other, &returning, addr, fingerprint).await,
        Reply::Registered
    ));
    let endpoint = endpoint_on(flooded);
    for _ in 0..5 {
        let reply = register_once(&endpoint, &returning, addr, fingerprint).await;
        assert!(matches!(reply, Reply::Registered), "{reply:?}");
    }

    // The registry holds what was accepted and no more; the operator sees why the rest was
    // refused.
    let text = metrics(&server).await;
    assert_eq!(
        sample(&text, "rendezvous_registered_peers"),
        accepted_total as u64 + 1
    );
    assert_eq!(
        sample(
            &text,
            "rendezvous_registrations_refused_total{reason=\"new_ids_rate\"}"
        ),
        refused_total as u64
    );
    assert_eq!(
        sample(
            &text,
            "rendezvous_error_replies_total{code=\"rate_limited\"}"
        ),
        refused_total as u64
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_is_capped_and_offline_rows_expire_from_memory_and_disk() {
    let dir = TempDir::new("registry-expiry");
    let cap = 30;
    let limits = RegistryLimits {
        max_registered: cap,
        expire_after: Duration::from_secs(2),
        ..RegistryLimits::default()
    };
    let server = start(dir.path(), limits).await;
    let (addr, fingerprint) = (server.local_addr(), server.fingerprint());
    let burst = limits.new_ids_burst as usize;

    // Two sources, each within its new-identity burst, together past the cap. The peers stay
    // online (online peers never expire), so the cap is reached exactly.
    let mut floods = tokio::task::JoinSet::new();
    for s in 0..2u8 {
        let ip = Ipv4Addr::new(127, 0, 1, 2 + s);
        let ids = tokio::task::spawn_blocking(move || identities(burst))
            .await
            .unwrap();
        floods.spawn(flood_from(ip, ids, addr, fingerprint, true));
    }
    let mut accepted = Vec::new();
    let mut full = 0;
    let mut connections = Vec::new();
    while let Some(result) = floods.join_next().await {
        let (replies, kept, endpoint) = result.unwrap();
        connections.push((kept, endpoint));
        for (id, reply) in replies {
            match reply {
                Reply::Registered => accepted.push(id),
                Reply::Refused(ErrorCode::RateLimited, message)
                    if message.contains("registry is full") =>
                {
                    full += 1
                }
                Reply::Refused(code, message) => panic!("refused: {code:?} {message}"),
            }
        }
    }
    assert_eq!((accepted.len(), full), (cap, 2 * burst - cap));
    let text = metrics(&server).await;
    assert_eq!(sample(&text, "rendezvous_registered_peers"), cap as u64);
    assert_eq!(
        sample(
            &text,
            "rendezvous_registrations_refused_total{reason=\"full\"}"
        ),
        full as u64
    );

    // The flooding peers go offline: after the expiry time the registry is empty again.
    for (kept, endpoint) in connections {
        for online in kept {
            online.close(0, b"done");
        }
        endpoint.close(0u32.into(), b"done");
    }
    let deadline = Instant::now() + T;
    loop {
        let text = metrics(&server).await;
        if sample(&text, "rendezvous_registered_peers") == 0 {
            assert_eq!(
                sample(&text, "rendezvous_expired_peers_total"),
                accepted.len() as u64
            );
            break;
        }
        assert!(Instant::now() < deadline, "rows did not expire:\n{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A peer that stays online does not expire, however long it is connected.
    let staying = identities(1).pop().unwrap();
    let endpoint = endpoint_on(Ipv4Addr::new(127, 0, 1, 9));
    let (reply, mut online) = register_and_stay(&endpoint, &staying, addr, fingerprint).await;
    assert!(matches!(reply, Reply::Registered), "{reply:?}");
    // Three expiry times online (the expiry task runs several times meanwhile), sending pings
    // as the peer would.
    let online_until = Instant::now() + 3 * limits.expire_after;
    while Instant::now() < online_until {
        write_frame(&mut online.tx, &ControlMessage::Ping { seq: 1 }.encode())
            .await
            .unwrap();
        let _pong = tokio::time::timeout(T, read_frame(&mut online.rx))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        sample(&metrics(&server).await, "rendezvous_registered_peers"),
        1
    );
    server.shutdown().await;

    // Deleted on disk too: opening the store (without expiring anything at load) finds only
    // the peer that stayed online.
    let (_store, rows, writer) = rendezvous::store::open(dir.path()).unwrap();
    let ids: Vec<PeerId> = rows.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, vec![staying.id()]);
    drop(_store);
    writer.join().unwrap();
}
