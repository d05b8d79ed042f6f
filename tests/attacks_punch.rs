//! A hostile peer against a peer, end to end: the real `rendezvous` and `peer` binaries on
//! loopback, and a raw QUIC client with its own identity (no peer program) as the attacker.
//!
//! Peers V (listening) and P (connected to V, chatting over a direct path) are up. The attacker
//! registers announcing P's address as its own interface address and asks to be introduced to V
//! as fast as it can. Before issue 12, every introduction made V alias the announced addresses
//! to the attacker, so P's packets were taken for the attacker's and V<->P broke; and nothing
//! limited how often the attacker could make V probe them. Now: the rendezvous rate-limits the
//! attacker's introductions, V aliases no address on an introduction's say-so (only after a
//! probe authenticated with the introduction's key came from it, and never away from a live
//! connection), and V<->P goes on, on the same direct path.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::{ControlMessage, ErrorCode, PeerId, PROTOCOL_VERSION};
use e2e::attack::{self, RawClient};
use e2e::{args, listen, peer, peer_run, Rendezvous, TempDir};

const T: Duration = Duration::from_secs(30);

fn status_json(dir: &Path) -> serde_json::Value {
    let (status, out, err) = peer_run(dir, &args!["status", "--json"], T);
    assert!(status.success(), "{out}\n{err}");
    serde_json::from_str(&out).expect("status JSON")
}

/// The address of V's direct path to its one connection, once it is direct.
fn direct_addr(dir: &Path) -> SocketAddr {
    let deadline = std::time::Instant::now() + T;
    loop {
        let report = status_json(dir);
        let path = report["connections"][0]["path"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        if let Some(addr) = path
            .strip_prefix("direct to ")
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse().ok())
        {
            return addr;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no direct path: {report}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// V listening and P connected to it over a direct path, on a rendezvous of their own.
struct Pair {
    rv: Rendezvous,
    v: e2e::Proc,
    v_id: String,
    v_dir: std::path::PathBuf,
    p: e2e::Proc,
    /// P's address as V's direct path has it.
    p_addr: SocketAddr,
}

fn v_and_p(dir: &TempDir) -> Pair {
    let rv = Rendezvous::start(&dir.path().join("rv"), "127.0.0.1:0");
    let v_dir = dir.path().join("v");
    let (v, v_id) = listen("v", &v_dir, &rv);
    let mut connect = args!["connect", v_id];
    connect.extend(rv.args());
    let p = peer("p", &dir.path().join("p"), &connect);
    p.stdout.wait_for(&format!("connected to {v_id}"), T);
    let p_addr = direct_addr(&v_dir);
    Pair {
        rv,
        v,
        v_id,
        v_dir,
        p,
        p_addr,
    }
}

/// V<->P still chats both ways, and on the same direct path (`p_addr`) as before the attack.
fn assert_still_chatting_direct(
    v: &mut e2e::Proc,
    p: &mut e2e::Proc,
    v_dir: &Path,
    p_addr: SocketAddr,
) {
    v.send_line("still there?");
    p.stdout.wait_for("still there?", T);
    p.send_line("yes, still here");
    v.stdout.wait_for("yes, still here", T);
    assert_eq!(direct_addr(v_dir), p_addr, "{}", status_json(v_dir));
}

/// A raw client registered with `rv` from `ip` (announcing `local_addrs`), with its relay
/// stream open.
async fn registered_attacker(
    rv: &Rendezvous,
    ip: std::net::Ipv4Addr,
    local_addrs: Vec<SocketAddr>,
) -> (RawClient, (quinn::SendStream, quinn::RecvStream)) {
    let identity = certs::Identity::generate().unwrap();
    let endpoint = attack::endpoint_on(ip).unwrap();
    let attacker = RawClient::register_announcing(
        &endpoint,
        &identity,
        rv.addr,
        certs::ServerTrust::FirstUse,
        PROTOCOL_VERSION,
        local_addrs,
    )
    .await
    .unwrap()
    .expect("the attacker registers");
    let relay = attacker
        .relay()
        .await
        .unwrap()
        .expect("the relay stream opens");
    (attacker, relay)
}

#[test]
fn a_peer_announcing_another_peers_address_breaks_nothing_and_is_rate_limited() {
    let dir = TempDir::new("punchattack");
    let Pair {
        rv,
        mut v,
        v_id,
        v_dir,
        mut p,
        p_addr,
    } = v_and_p(&dir);
    let p_id = status_json(&v_dir)["connections"][0]["peer"]
        .as_str()
        .expect("peer id")
        .to_owned();

    let lines_before = v.stdout.lines().len();
    let runtime = attack::runtime();
    let v_peer: PeerId = v_id.parse().unwrap();
    let (attacker, mut relayed_to_attacker, introduced, refused) = runtime.block_on(async {
        // Its relay stream: were V to take P's packets for the attacker's, V's answers (P's
        // QUIC packets) would be relayed here, since V accepts the attacker's introductions.
        let (attacker, (_relay_tx, relay_rx)) =
            registered_attacker(&rv, std::net::Ipv4Addr::new(127, 0, 4, 1), vec![p_addr]).await;
        let (mut introduced, mut refused) = (0u32, 0u32);
        // 45: under the per-connection request limit (burst 50), which would answer first.
        for _ in 0..45 {
            match attacker
                .request(&ControlMessage::connect(v_peer))
                .await
                .unwrap()
            {
                ControlMessage::Punch { candidates, .. } => {
                    // The rendezvous hands V's candidates to the attacker; V gets the
                    // attacker's, P's address among them (all of this runs on loopback).
                    assert!(!candidates.is_empty());
                    introduced += 1;
                }
                ControlMessage::Error {
                    code: ErrorCode::RateLimited,
                    message,
                } => {
                    assert!(message.contains("too many introductions"), "{message}");
                    refused += 1;
                }
                other => panic!("connect answered {other:?}"),
            }
        }
        (attacker, relay_rx, introduced, refused)
    });
    // 32 at once, then 5 a second: the loop takes well under 2 s.
    assert!(
        (32..=42).contains(&introduced),
        "{introduced} introductions"
    );
    assert_eq!(introduced + refused, 45);

    // V<->P is unaffected: both ways, on the same direct path, its only connection.
    assert_still_chatting_direct(&mut v, &mut p, &v_dir, p_addr);
    let report = status_json(&v_dir);
    let conns = report["connections"].as_array().expect("connections");
    assert_eq!(conns.len(), 1, "{report}");
    assert_eq!(conns[0]["peer"], p_id.as_str(), "{report}");
    // Nothing of V's reached the attacker through the relay.
    let mut buf = [0u8; 4096];
    let read = runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(2), relayed_to_attacker.read(&mut buf)).await
    });
    assert!(
        !matches!(read, Ok(Ok(Some(n))) if n > 0),
        "V sent packets to the attacker: {read:?}"
    );
    drop(attacker);
    let since = v.stdout.lines()[lines_before..].join("\n");
    assert!(
        !since.contains("relayed via"),
        "V's path to P fell back to the relay:\n{since}"
    );
}

/// `peer status --json` of the peer running with `dir`, once registered: the public address the
/// rendezvous sees it at (on loopback, the address of its one UDP socket).
fn observed_addr(dir: &Path) -> SocketAddr {
    let report = status_json(dir);
    report["registration"]["observed"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no observed address: {report}"))
}

/// Item 3 of issue 12, the order the test above cannot catch: the attacker announces P's address
/// *before* P connects to V, when no live connection of V's owns that address yet (the claim
/// that protects a running connection does not apply). Before issue 12, V mapped every candidate
/// of an introduction to the introducer at once: once the attacker had been introduced, P's
/// packets reached V's QUIC as the attacker's. P, dialing V at V's cached address (as a peer
/// that talked to V before does, with no introduction), was then refused by V ("it came on the
/// address of another peer": the TLS id is P's, the address the attacker's), and V would not map
/// P's own address to P when P punched ("a live connection already uses it"). Now V maps an
/// address to a peer only after a probe authenticated with that introduction's key came from it,
/// which the attacker cannot produce for P's address: P's cached dial is accepted at once, on
/// P's own address, and every ping is answered on a direct path.
#[test]
fn a_peer_that_announces_an_address_before_its_owner_connects_cannot_take_it() {
    let dir = TempDir::new("punchsteal");
    let rv = Rendezvous::start(&dir.path().join("rv"), "127.0.0.1:0");
    let v_dir = dir.path().join("v");
    let mut v_args = args!["-v", "listen"];
    v_args.extend(rv.args());
    let v = peer("v", &v_dir, &v_args);
    let v_id = e2e::wait_registered(&v, T);
    let v_addr = observed_addr(&v_dir);
    // P runs too (listening), with no connection to anyone yet: its socket and address are
    // fixed, so the attacker can announce them before P dials V.
    let p_dir = dir.path().join("p");
    let (p, p_id) = listen("p", &p_dir, &rv);
    let p_addr = observed_addr(&p_dir);

    let runtime = attack::runtime();
    let v_peer: PeerId = v_id.parse().unwrap();
    let (attacker, introduced) = runtime.block_on(async {
        let identity = certs::Identity::generate().unwrap();
        let endpoint = attack::endpoint_on(std::net::Ipv4Addr::new(127, 0, 4, 2)).unwrap();
        let attacker = RawClient::register_announcing(
            &endpoint,
            &identity,
            rv.addr,
            certs::ServerTrust::FirstUse,
            PROTOCOL_VERSION,
            vec![p_addr],
        )
        .await
        .unwrap()
        .expect("the attacker registers");
        let mut introduced = 0u32;
        // As many introductions as the rendezvous allows at once (the rest are rate-limited).
        for _ in 0..40 {
            match attacker
                .request(&ControlMessage::connect(v_peer))
                .await
                .unwrap()
            {
                ControlMessage::Punch { .. } => introduced += 1,
                ControlMessage::Error {
                    code: ErrorCode::RateLimited,
                    ..
                } => {}
                other => panic!("connect answered {other:?}"),
            }
        }
        (attacker, introduced)
    });
    assert!(introduced >= 30, "{introduced} introductions");
    let attacker_id = attacker.id.short();
    // V took every introduction: it probed P's address for the attacker, over each session's
    // whole schedule (the last scheduled probe is #14, 4.5 s in), and P's plain answers (P
    // knows no key of the attacker's introductions) were refused as unauthenticated. Waiting for
    // all of them also lets V's punching budget, which these sessions spent, fill up again
    // before P dials (the budget is the subject of the test above, not of this one).
    let last_probe = format!("punch {attacker_id}: probe #14 -> {p_addr}");
    v.stderr
        .wait_for_nth(&last_probe, introduced as usize, Duration::from_secs(60));
    let forged = format!("punch {attacker_id}: ignored an answer from {p_addr}");
    v.stderr.wait_for(&forged, T);

    // P talked to V before: V's address is in P's peer cache, and P dials it straight away.
    let cache = serde_json::json!({
        v_id.as_str(): {
            "candidates": [{ "addr": v_addr.to_string(), "kind": "observed" }],
            "updated": "2026-01-01T00:00:00Z",
        }
    });
    std::fs::write(p_dir.join("peers.json"), cache.to_string()).unwrap();
    // `peer ping` goes through P's running process (its socket, its address).
    let (status, out, err) = peer_run(
        &p_dir,
        &args!["ping", &v_id, "--count", "5", "--interval", "0.1", "--json"],
        Duration::from_secs(60),
    );
    assert!(
        status.success(),
        "P cannot ping V after the attacker announced P's address\nstdout:\n{out}\nstderr:\n{err}\n\
         V's stderr:\n{}",
        v.stderr.text()
    );
    let summary: serde_json::Value = serde_json::from_str(&out).expect("ping JSON");
    assert_eq!(summary["received"], 5, "{summary}");
    assert_eq!(summary["direct"], true, "{summary}");
    assert_eq!(summary["direct_addr"], v_addr.to_string(), "{summary}");
    // V accepted P's connection at once, as P's, from P's own address: the dial to the cached
    // address worked (with P's address mapped to the attacker, V's answers went to the attacker
    // and P gave up on the cached address after 1 s, and asked the rendezvous).
    let connected = v.stdout.wait_for(&format!("connected: {p_id}"), T);
    assert_eq!(connected.trim(), format!("connected: {p_id} from {p_addr}"));
    let failed = format!("cached address {v_addr} of {v_id} failed");
    assert!(
        !p.stderr.text().contains(&failed),
        "P's dial to V's cached address failed:\n{}\nV's stderr:\n{}",
        p.stderr.text(),
        v.stderr.text()
    );
    for stolen in [
        format!("introduced to {p_id}"),
        format!("refused a connection from {p_id}"),
        format!("{p_addr} not taken as the peer's address"),
    ] {
        assert!(
            !v.stderr.text().contains(&stolen),
            "V took P's address for the attacker's ({stolen:?}):\n{}",
            v.stderr.text()
        );
    }
    drop(attacker);
    drop(p);
}

/// Protocol version 10: a `connect` carries the requester's first QUIC datagram, which the
/// rendezvous hands to the target inside the pushed `punch`, and the target feeds to its QUIC
/// endpoint as if relayed from the requester. A hostile requester sends garbage instead, the
/// largest allowed, as many as it may: random bytes, a QUIC v1 Initial header over garbage,
/// an unknown QUIC version, a short header. The target takes each as one datagram from the
/// requester's stable address (never as anyone else's): its connection with P goes on, on the
/// same direct path, and what its QUIC endpoint answers (at most a version negotiation or a
/// stateless reset per datagram) goes back over the relay to the attacker alone, at most one
/// packet per introduction the rendezvous allowed (its introduction limits bound the flights).
#[test]
fn hostile_first_flights_reach_the_target_only_as_one_datagram_per_introduction() {
    use common::message::{FirstFlight, MAX_FIRST_FLIGHT};
    use rand::RngCore;

    let dir = TempDir::new("flightattack");
    let Pair {
        rv,
        mut v,
        v_id,
        v_dir,
        mut p,
        p_addr,
    } = v_and_p(&dir);
    let runtime = attack::runtime();
    let v_peer: PeerId = v_id.parse().unwrap();
    let (attacker, relay, introduced) = runtime.block_on(async {
        let (attacker, relay) =
            registered_attacker(&rv, std::net::Ipv4Addr::new(127, 0, 4, 2), Vec::new()).await;
        let mut rng = rand::rng();
        let mut introduced = 0u32;
        for n in 0..45u32 {
            let mut datagram = vec![0u8; MAX_FIRST_FLIGHT];
            rng.fill_bytes(&mut datagram);
            match n % 4 {
                // A QUIC v1 Initial header (8-byte connection ids) over garbage.
                1 => datagram[..14].copy_from_slice(&[0xc3, 0, 0, 0, 1, 8, 1, 2, 3, 4, 5, 6, 7, 8]),
                // A long header of an unknown version.
                2 => datagram[..5].copy_from_slice(&[0xc0, 0x1a, 0x2a, 0x3a, 0x4a]),
                // A short header.
                3 => datagram[0] = 0x40,
                _ => {}
            }
            let flight = FirstFlight::new(datagram).expect("in bounds");
            let reply = attacker
                .request(&ControlMessage::Connect {
                    id: v_peer,
                    first_flight: Some(flight),
                })
                .await
                .unwrap();
            match reply {
                ControlMessage::Punch { first_flight, .. } => {
                    // Never echoed to the requester.
                    assert!(first_flight.is_none());
                    introduced += 1;
                }
                ControlMessage::Error {
                    code: ErrorCode::RateLimited,
                    ..
                } => {}
                other => panic!("connect answered {other:?}"),
            }
        }
        (attacker, relay, introduced)
    });
    assert!(
        (32..=42).contains(&introduced),
        "{introduced} introductions"
    );

    // V<->P is unaffected: both ways, on the same direct path.
    assert_still_chatting_direct(&mut v, &mut p, &v_dir, p_addr);

    // What V's QUIC endpoint answered came to the attacker over the relay, from V, at most
    // one packet per introduction.
    let (_relay_tx, mut relay_rx) = relay;
    let frames = runtime.block_on(async {
        let mut decoder = common::relay::RelayDecoder::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut frames = 0u32;
        while let Ok(Ok(Some(n))) =
            tokio::time::timeout(Duration::from_secs(2), relay_rx.read(&mut buf)).await
        {
            decoder.push(&buf[..n]);
            while let Ok(Some((from, _))) = decoder.next_frame() {
                assert_eq!(from, v_peer, "relayed from someone else");
                frames += 1;
            }
        }
        frames
    });
    eprintln!("{introduced} introductions with a hostile first flight; {frames} packets of V's answered them");
    assert!(
        frames <= introduced,
        "{frames} packets to the attacker for {introduced} introductions"
    );
    drop(attacker);
    assert!(v.terminate(T).success(), "V survives");
    drop(p);
}
