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

#[test]
fn a_peer_announcing_another_peers_address_breaks_nothing_and_is_rate_limited() {
    let dir = TempDir::new("punchattack");
    let rv = Rendezvous::start(&dir.path().join("rv"), "127.0.0.1:0");
    let v_dir = dir.path().join("v");
    let (mut v, v_id) = listen("v", &v_dir, &rv);
    let mut connect = args!["connect", v_id];
    connect.extend(rv.args());
    let mut p = peer("p", &dir.path().join("p"), &connect);
    p.stdout.wait_for(&format!("connected to {v_id}"), T);
    let p_addr = direct_addr(&v_dir);
    let p_id = status_json(&v_dir)["connections"][0]["peer"]
        .as_str()
        .expect("peer id")
        .to_owned();

    let lines_before = v.stdout.lines().len();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let v_peer: PeerId = v_id.parse().unwrap();
    let (attacker, mut relayed_to_attacker, introduced, refused) = runtime.block_on(async {
        let identity = certs::Identity::generate().unwrap();
        let endpoint = attack::endpoint_on(std::net::Ipv4Addr::new(127, 0, 4, 1)).unwrap();
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
        // Its relay stream: were V to take P's packets for the attacker's, V's answers (P's
        // QUIC packets) would be relayed here, since V accepts the attacker's introductions.
        let (_relay_tx, relay_rx) = attacker
            .relay()
            .await
            .unwrap()
            .expect("the relay stream opens");
        let (mut introduced, mut refused) = (0u32, 0u32);
        // 45: under the per-connection request limit (burst 50), which would answer first.
        for _ in 0..45 {
            match attacker
                .request(&ControlMessage::Connect { id: v_peer })
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

    // V<->P is unaffected: both ways, on the same direct path.
    v.send_line("still there?");
    p.stdout.wait_for("still there?", T);
    p.send_line("yes, still here");
    v.stdout.wait_for("yes, still here", T);
    let report = status_json(&v_dir);
    let conns = report["connections"].as_array().expect("connections");
    assert_eq!(conns.len(), 1, "{report}");
    assert_eq!(conns[0]["peer"], p_id.as_str(), "{report}");
    assert_eq!(direct_addr(&v_dir), p_addr, "{report}");
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
