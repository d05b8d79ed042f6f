//! Paths over time, in the network-namespace NAT lab (root only; `scripts/test.sh` enables
//! them): keep-alives through a short NAT timeout, NAT rebinding on either side, a direct path cut
//! in the middle of a file transfer and restored, a relay that never sees plaintext, a peer
//! whose network blocks UDP, and one whose UDP only works after it registered over TCP.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use e2e::lab::{self, Lab, RV_LISTEN};
use e2e::{args, bin, rendezvous_args, Proc, Rendezvous, TempDir};

const T: Duration = Duration::from_secs(30);

fn connect(lab: &Lab, dir: &Path, rv: &Rendezvous, id: &str) -> Proc {
    let mut a = args!["connect", id];
    a.extend(rv.args());
    lab.peer("b", "b", &dir.join("b"), &a)
}

/// Runs `nft` in a lab namespace.
fn nft(lab: &Lab, host: &str, rule: &str) {
    let status = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.netns(host), "nft"])
        .args(rule.split_whitespace())
        .status()
        .expect("running nft");
    assert!(status.success(), "nft {rule}");
}

fn natlab(args: &[&str]) {
    let status = std::process::Command::new(e2e::lab::natlab_sh())
        .args(args)
        .status()
        .expect("running natlab.sh");
    assert!(status.success(), "natlab.sh {args:?}");
}

#[test]
fn keepalives_hold_a_direct_path_through_a_20s_nat_timeout() {
    if !lab::netns_enabled("keepalives_hold_a_direct_path_through_a_20s_nat_timeout") {
        return;
    }
    let lab = Lab::up(
        "keepalive",
        &["--a", "port", "--b", "port", "--udp-timeout", "20"],
    );
    let dir = TempDir::new("keepalive");
    let rv = lab.rendezvous(&dir.path().join("rv"));
    let (mut a, a_id) = lab.listen("a", "a", &dir.path().join("a"), &rv, &[], T);
    let mut b = connect(&lab, dir.path(), &rv, &a_id);
    b.stdout.wait_for("connected to", T);
    b.stdout.wait_for("direct to", T);
    b.send_line("before the idle minute");
    a.stdout.wait_for("before the idle minute", T);

    // Idle three NAT timeouts: only keep-alives cross the NATs.
    std::thread::sleep(Duration::from_secs(60));
    b.send_line("after the idle minute");
    a.stdout.wait_for("after the idle minute", T);
    a.send_line("and back");
    b.stdout.wait_for("and back", T);
    let paths: Vec<String> = b
        .stdout
        .lines()
        .into_iter()
        .filter(|l| l.starts_with("path to"))
        .collect();
    assert!(
        paths.iter().all(|l| l.contains("direct to")),
        "the path never left the direct path: {paths:?}"
    );
    b.close_stdin();
    assert!(b.wait(T).success());
}

#[test]
fn nat_rebinding_on_either_side_loses_no_message() {
    if !lab::netns_enabled("nat_rebinding_on_either_side_loses_no_message") {
        return;
    }
    let lab = Lab::up("rebind", &["--a", "port", "--b", "port"]);
    let dir = TempDir::new("rebind");
    let rv = lab.rendezvous(&dir.path().join("rv"));
    let (mut a, a_id) = lab.listen("a", "a", &dir.path().join("a"), &rv, &[], T);
    let mut b = connect(&lab, dir.path(), &rv, &a_id);
    b.stdout.wait_for("direct to", T);

    for (round, side) in [(1, "nata"), (2, "natb")] {
        natlab(&["flush", lab.name(), side]);
        let to_a = format!("round {round}: b to a after flushing {side}");
        let to_b = format!("round {round}: a to b after flushing {side}");
        b.send_line(&to_a);
        a.send_line(&to_b);
        a.stdout.wait_for(&to_a, T);
        b.stdout.wait_for(&to_b, T);
        let rebound = if side == "nata" { &a } else { &b };
        rebound
            .stdout
            .wait_for_nth("our public address changed", 1, T);
    }
    // Both sides end up direct again on the new mappings.
    let last = |p: &Proc| {
        p.stdout
            .lines()
            .into_iter()
            .rfind(|l| l.starts_with("path to"))
    };
    let deadline = Instant::now() + T;
    while last(&b).is_some_and(|l| !l.contains("direct to")) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        last(&b).is_some_and(|l| l.contains("direct to")),
        "{:?}",
        last(&b)
    );
    b.close_stdin();
    assert!(b.wait(T).success());
}

#[test]
fn a_direct_path_cut_mid_transfer_falls_back_to_the_relay_and_returns() {
    if !lab::netns_enabled("a_direct_path_cut_mid_transfer_falls_back_to_the_relay_and_returns") {
        return;
    }
    // 40 Mbit/s links: a 30 MB transfer lasts about 7 s, long enough to cut and restore.
    let lab = Lab::up(
        "switch",
        &["--a", "port", "--b", "port", "--rate", "40mbit"],
    );
    let dir = TempDir::new("switch");
    let recv = dir.path().join("recv");
    std::fs::create_dir_all(&recv).unwrap();
    let file = dir.path().join("payload.bin");
    let payload: Vec<u8> = (0..30_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&file, &payload).unwrap();

    let rv = lab.rendezvous(&dir.path().join("rv"));
    let accept = args!["--accept-files", recv.to_str().unwrap(), "--allow-any"];
    let mut listen = accept.clone();
    listen.insert(0, "listen".into());
    listen.extend(rv.args());
    // `lab.listen` puts extra arguments before `listen`; --accept-files belongs after it.
    let a = lab.peer("a", "a", &dir.path().join("a"), &listen);
    let a_id = e2e::wait_registered(&a, T);
    let mut send = args!["send", a_id, file.to_str().unwrap()];
    send.extend(rv.args());
    let mut b = lab.peer("b", "b", &dir.path().join("b"), &send);
    b.stdout.wait_for("direct to", T);
    a.stdout.wait_for("receiving payload.bin", T);
    std::thread::sleep(Duration::from_millis(1500));

    // Cut every packet between the two NATs' public addresses (the rendezvous stays reachable).
    nft(&lab, "inet", "add table ip cut");
    nft(
        &lab,
        "inet",
        "add chain ip cut cutchain { type filter hook forward priority -10 ; }",
    );
    nft(
        &lab,
        "inet",
        "add rule ip cut cutchain ip saddr 203.0.113.21 ip daddr 203.0.113.22 drop",
    );
    nft(
        &lab,
        "inet",
        "add rule ip cut cutchain ip saddr 203.0.113.22 ip daddr 203.0.113.21 drop",
    );
    let cut = Instant::now();
    b.stdout.wait_for("relayed via rendezvous", T);
    let fallback = cut.elapsed();
    // The selector leaves a dead path about 1.8 s after its last answer (exactly: the
    // simulated `punch::path` tests); the slack is for a loaded machine and the queue of a
    // 40 Mbit/s link full of the transfer.
    assert!(
        fallback <= Duration::from_millis(3000),
        "fell back to the relay {fallback:?} after the cut"
    );
    std::thread::sleep(Duration::from_secs(2));
    nft(&lab, "inet", "delete table ip cut");
    // Back to direct (the second `direct to` line of the sender).
    b.stdout.wait_for_nth("direct to", 2, T);

    assert!(b.wait(Duration::from_secs(120)).success(), "send failed");
    assert!(b.stdout.text().contains("verified by the receiver"));
    let received = std::fs::read(recv.join("payload.bin")).expect("file stored");
    assert!(received == payload, "the transfer is not byte-exact");
    drop(a);
}

/// A birthday path (symmetric x port-restricted: it runs through one of the symmetric side's
/// extra sockets) is kept by its heartbeats, falls back to the relay when cut, and returns
/// when restored, carrying chat both ways each time.
#[test]
fn a_birthday_path_is_kept_falls_back_and_returns() {
    if !lab::netns_enabled("a_birthday_path_is_kept_falls_back_and_returns") {
        return;
    }
    let lab = Lab::up("bdpath", &["--a", "sym", "--b", "port"]);
    let dir = TempDir::new("bdpath");
    let rv = lab.rendezvous(&dir.path().join("rv"));
    let (mut a, a_id) = lab.listen("a", "a", &dir.path().join("a"), &rv, &args![], T);
    let mut b = connect(&lab, dir.path(), &rv, &a_id);
    let (line, _) = b.wait_for_line(&format!("path to {a_id}: direct to "), T);
    assert!(line.contains("(birthday punch)"), "{line}");
    // Kept: still direct after a few seconds of heartbeats alone, and chat goes both ways.
    std::thread::sleep(Duration::from_secs(4));
    b.send_line("over the birthday path");
    a.stdout.wait_for("over the birthday path", T);
    a.send_line("and back");
    b.stdout.wait_for("and back", T);
    let last_path = |b: &Proc| {
        b.stdout
            .lines()
            .into_iter()
            .rfind(|l| l.contains(&format!("path to {a_id}: ")))
            .unwrap_or_default()
    };
    assert!(last_path(&b).contains("direct to "), "{}", last_path(&b));

    // Cut every packet between the two NATs' public addresses (the rendezvous stays reachable).
    nft(&lab, "inet", "add table ip cut");
    nft(
        &lab,
        "inet",
        "add chain ip cut cutchain { type filter hook forward priority -10 ; }",
    );
    nft(
        &lab,
        "inet",
        "add rule ip cut cutchain ip saddr 203.0.113.21 ip daddr 203.0.113.22 drop",
    );
    nft(
        &lab,
        "inet",
        "add rule ip cut cutchain ip saddr 203.0.113.22 ip daddr 203.0.113.21 drop",
    );
    b.stdout
        .wait_for(&format!("path to {a_id}: relayed via rendezvous"), T);
    b.send_line("over the relay");
    a.stdout.wait_for("over the relay", T);
    std::thread::sleep(Duration::from_secs(2));
    nft(&lab, "inet", "delete table ip cut");
    // Back: the heartbeats through the winning socket are answered again (or a new punch).
    b.stdout
        .wait_for_nth(&format!("path to {a_id}: direct to "), 2, T);
    b.send_line("direct again");
    a.stdout.wait_for("direct again", T);
    a.send_line("and back again");
    b.stdout.wait_for("and back again", T);
}

#[test]
fn the_relay_never_sees_plaintext() {
    if !lab::netns_enabled("the_relay_never_sees_plaintext") {
        return;
    }
    let lab = Lab::up("plain", &["--a", "sym", "--b", "sym"]);
    let dir = TempDir::new("plain");
    let trace = dir.path().join("relay.trace");
    let mut rv_args = rendezvous_args(&dir.path().join("rv"), RV_LISTEN);
    rv_args.extend(args!["--relay-trace", trace.to_str().unwrap()]);
    let rv = Rendezvous::ready(lab.spawn("rv", "rendezvous", &bin("rendezvous"), &rv_args));
    let (mut a, a_id) = lab.listen("a", "a", &dir.path().join("a"), &rv, &[], T);
    let mut b = connect(&lab, dir.path(), &rv, &a_id);
    b.stdout.wait_for("relayed via rendezvous (UDP)", T);
    let secret_ab = format!("SECRET-{:016x}", rand_u64());
    let secret_ba = format!("SECRET-{:016x}", rand_u64());
    // The listener can answer once the dialer's chat stream has reached it.
    b.send_line(&secret_ab);
    a.stdout.wait_for(&secret_ab, T);
    a.send_line(&secret_ba);
    b.stdout.wait_for(&secret_ba, T);
    // Symmetric against symmetric has no direct path: the relay carried the chat...
    b.stdout.wait_for("no direct path", T);
    b.close_stdin();
    assert!(b.wait(T).success());
    drop(rv);
    let seen = std::fs::read(&trace).expect("relay trace written");
    assert!(
        seen.len() > 1000,
        "the relay carried the traffic ({} bytes traced)",
        seen.len()
    );
    // ...and never saw it in the clear.
    for secret in [&secret_ab, &secret_ba] {
        assert!(
            !seen.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "{secret} appears in what the relay handled"
        );
    }
}

#[test]
fn a_peer_without_udp_connects_through_the_tcp_tunnel() {
    if !lab::netns_enabled("a_peer_without_udp_connects_through_the_tcp_tunnel") {
        return;
    }
    let lab = Lab::up("noudp", &["--a", "port", "--b", "udpblock"]);
    let dir = TempDir::new("noudp");
    let rv = lab.rendezvous(&dir.path().join("rv"));
    let (mut a, a_id) = lab.listen("a", "a", &dir.path().join("a"), &rv, &[], T);
    let mut b = connect(&lab, dir.path(), &rv, &a_id);
    b.stdout.wait_for("relayed via rendezvous (TCP)", T);
    b.send_line("over tcp");
    a.stdout.wait_for("over tcp", T);
    a.send_line("back over tcp");
    b.stdout.wait_for("back over tcp", T);
    b.close_stdin();
    assert!(b.wait(T).success());
}

/// A listener whose UDP to the rendezvous is dropped at its NAT for its first seconds registers
/// through the TCP tunnel; a dialer (symmetric NAT, UDP) connects through the relay; when UDP
/// comes back the listener moves its registration to UDP, and the connection goes direct
/// (the listener's address-restricted NAT lets the dialer's probes in once the listener has
/// probed the dialer's address). On failure the lab's rulesets and conntrack are shown.
#[test]
fn a_listener_that_started_on_the_tcp_tunnel_goes_direct_once_udp_works() {
    if !lab::netns_enabled("a_listener_that_started_on_the_tcp_tunnel_goes_direct_once_udp_works") {
        return;
    }
    let lab = Lab::up("tunfirst", &["--a", "addr", "--b", "sym"]);
    // UDP from the listener's side to the rendezvous (QUIC and STUN) dropped at its NAT.
    nft(&lab, "nata", "add table inet tunfirst");
    nft(
        &lab,
        "nata",
        "add chain inet tunfirst blk { type filter hook forward priority -10 ; }",
    );
    let (rv_ip, rv_port) = RV_LISTEN.split_once(':').expect("RV_LISTEN is IP:PORT");
    nft(
        &lab,
        "nata",
        &format!("add rule inet tunfirst blk ip daddr {rv_ip} udp dport {rv_port} drop"),
    );
    let dir = TempDir::new("tunfirst");
    let rv = lab.rendezvous(&dir.path().join("rv"));
    let a = lab.peer("a", "a", &dir.path().join("a"), &{
        let mut listen = args!["listen"];
        listen.extend(rv.args());
        listen
    });
    let a_id = e2e::wait_registered(&a, T);
    a.stdout.wait_for("through the TCP tunnel", T);
    let mut b = connect(&lab, dir.path(), &rv, &a_id);
    let line = b.stdout.wait_for(&format!("connected to {a_id}"), T);
    assert!(line.contains("relayed via rendezvous"), "{line}");

    nft(&lab, "nata", "delete table inet tunfirst");
    if let Err(closed) = b.stdout.try_wait_for_at("direct to", T) {
        panic!(
            "no direct path {} s after UDP came back (dialer's output closed: {closed})\n\
             listener:\n{}\ndialer:\n{}\nlab:\n{}",
            T.as_secs(),
            a.stdout.text(),
            b.stdout.text(),
            lab.status()
        );
    }
    b.send_line("direct after the tunnel");
    a.stdout.wait_for("direct after the tunnel", T);
    b.close_stdin();
    assert!(b.wait(T).success());
}

fn rand_u64() -> u64 {
    rand::random()
}

#[test]
fn netcheck_classifies_every_nat_kind_of_the_lab() {
    if !lab::netns_enabled("netcheck_classifies_every_nat_kind_of_the_lab") {
        return;
    }
    // kind -> (udp, mapping, filtering, verdict fragment)
    let cases = [
        (
            "open",
            true,
            "endpoint_independent",
            "endpoint_independent",
            "no NAT",
        ),
        (
            "full",
            true,
            "endpoint_independent",
            "endpoint_independent",
            "any NAT",
        ),
        (
            "addr",
            true,
            "endpoint_independent",
            "address_dependent",
            "any NAT",
        ),
        (
            "port",
            true,
            "endpoint_independent",
            "address_and_port_dependent",
            "port-restricted",
        ),
        (
            "sym",
            true,
            "address_and_port_dependent",
            "address_and_port_dependent",
            "symmetric",
        ),
        (
            "cgnat",
            true,
            "endpoint_independent",
            "address_and_port_dependent",
            "port-restricted",
        ),
        ("udpblock", false, "unknown", "unknown", "TCP 443"),
        // A Linux router that an early packet turns symmetric: netcheck's mapping tests come
        // before its filtering tests (whose unsolicited answers are such early packets), so it
        // measures what peers meet: a port-restricted cone, whose state for a filtered packet
        // takes the port (`inbound_takes_port`, checked below).
        (
            "early",
            true,
            "endpoint_independent",
            "address_and_port_dependent",
            "port-restricted",
        ),
    ];
    for (kind, udp, mapping, filtering, verdict) in cases {
        let lab = Lab::up(&format!("netcheck-{kind}"), &["--a", kind, "--b", "port"]);
        let dir = TempDir::new("netcheck");
        let mut rv_args = rendezvous_args(&dir.path().join("rv"), "203.0.113.10:3478");
        rv_args.extend(args![
            "--stun-alt-port",
            "3479",
            "--stun-alt-ip",
            "203.0.113.11",
            "--tcp-listen",
            "203.0.113.10:443"
        ]);
        let _rv = Rendezvous::ready(lab.spawn("rv", "rendezvous", &bin("rendezvous"), &rv_args));
        let mut check = lab.peer(
            "a",
            "netcheck",
            &dir.path().join("a"),
            &args!["netcheck", "--server", "203.0.113.10:3478", "--json"],
        );
        assert!(check.wait(T).success(), "netcheck failed for {kind}");
        check.stdout.wait_closed(Duration::from_secs(5));
        let report: serde_json::Value =
            serde_json::from_str(&check.stdout.text()).expect("JSON report");
        assert_eq!(report["udp"], udp, "{kind}: {report}");
        assert_eq!(report["mapping"], mapping, "{kind}: {report}");
        assert_eq!(report["filtering"], filtering, "{kind}: {report}");
        assert_eq!(report["tcp_443"], true, "{kind}: {report}");
        assert!(
            report["verdict"].as_str().unwrap_or("").contains(verdict),
            "{kind}: {report}"
        );
        if kind == "open" {
            assert_eq!(report["no_nat"], true);
        }
        // Whether a filtered packet took the port: tested where one port per socket is kept
        // and a packet from another port was filtered; only `early` keeps the state that
        // takes it.
        let takes_port = match kind {
            "early" => serde_json::json!(true),
            "port" | "cgnat" => serde_json::json!(false),
            _ => serde_json::Value::Null,
        };
        assert_eq!(report["inbound_takes_port"], takes_port, "{kind}: {report}");
        drop(check);
        lab.down();
    }
}

/// `natlab.sh addr LAB HOST`.
fn host_addr(lab: &Lab, host: &str) -> String {
    let out = std::process::Command::new(e2e::lab::natlab_sh())
        .args(["addr", lab.name(), host])
        .output()
        .expect("running natlab.sh addr");
    assert!(out.status.success(), "natlab.sh addr {host}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `peer netcheck --json` in `LAB-a` against the lab's rendezvous (with RFC 5780).
fn netcheck_json(lab: &Lab, dir: &Path) -> serde_json::Value {
    let mut check = lab.peer(
        "a",
        "netcheck",
        &dir.join("a"),
        &args!["netcheck", "--server", RV_LISTEN, "--json"],
    );
    assert!(check.wait(T).success(), "netcheck failed");
    check.stdout.wait_closed(Duration::from_secs(5));
    serde_json::from_str(&check.stdout.text()).expect("JSON report")
}

/// Two hosts behind one port-restricted NAT, hairpinning `on` or `off`.
fn same_port_nat(case: &str, hairpin: &str) -> Lab {
    Lab::up(
        case,
        &[
            "--a",
            "port",
            "--b",
            "port",
            "--same-nat",
            "--hairpin",
            hairpin,
        ],
    )
}

#[test]
fn netcheck_detects_hairpinning_and_router_port_mapping() {
    if !lab::netns_enabled("netcheck_detects_hairpinning_and_router_port_mapping") {
        return;
    }
    // Two hosts behind one port-restricted NAT that hairpins, whose router also answers NAT-PMP,
    // PCP and UPnP IGD discovery.
    let lab = same_port_nat("netcheck-hairpin-on", "on");
    let dir = TempDir::new("netcheck-hairpin");
    let _rv = lab.rendezvous(&dir.path().join("rv"));
    let public = host_addr(&lab, "nata");
    let script = e2e::workspace_root().join("scripts/lab/portmap.py");
    let responder = lab.spawn(
        "nata",
        "portmap",
        Path::new("/usr/bin/python3"),
        &args![script.to_str().expect("utf-8 path"), public],
    );
    responder
        .stdout
        .wait_for("portmap: NAT-PMP", Duration::from_secs(10));
    let report = netcheck_json(&lab, dir.path());
    assert_eq!(report["hairpin"], true, "{report}");
    assert_eq!(
        report["filtering"], "address_and_port_dependent",
        "{report}"
    );
    let pm = &report["port_mapping"];
    assert_eq!(pm["gateway"], "10.0.1.1", "{report}");
    assert_eq!(pm["nat_pmp"], true, "{report}");
    assert_eq!(pm["pcp"], true, "{report}");
    assert_eq!(pm["upnp"], true, "{report}");
    assert_eq!(pm["external_ip"], public.as_str(), "{report}");
    assert_eq!(
        pm["upnp_location"], "http://10.0.1.1:5000/rootDesc.xml",
        "{report}"
    );
    drop(responder);
    lab.down();

    // The same NAT without hairpinning, and a router that offers no port mapping.
    let lab = same_port_nat("netcheck-hairpin-off", "off");
    let dir = TempDir::new("netcheck-no-hairpin");
    let _rv = lab.rendezvous(&dir.path().join("rv"));
    let report = netcheck_json(&lab, dir.path());
    assert_eq!(report["hairpin"], false, "{report}");
    let pm = &report["port_mapping"];
    assert_eq!(pm["gateway"], "10.0.1.1", "{report}");
    assert_eq!(
        (&pm["nat_pmp"], &pm["pcp"], &pm["upnp"]),
        (
            &serde_json::Value::Bool(false),
            &serde_json::Value::Bool(false),
            &serde_json::Value::Bool(false)
        ),
        "{report}"
    );
    lab.down();
}

/// `peer ping A_ID --until-direct --json EXTRA...` from `LAB-b` to a listener on `LAB-a`, in a
/// lab of NAT kinds `a` and `b`: (exit success, JSON summary, stderr).
fn ping_until_direct(
    case: &str,
    a: &str,
    b: &str,
    extra: &[&str],
) -> (bool, serde_json::Value, String) {
    let lab = Lab::up(case, &["--a", a, "--b", b]);
    let dir = TempDir::new(case);
    let rv = lab.rendezvous(&dir.path().join("rv"));
    let (listener, a_id) = lab.listen("a", "a", &dir.path().join("a"), &rv, &[], T);
    let mut args = args!["ping", a_id, "--until-direct", "--json"];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(rv.args());
    let mut ping = lab.peer("b", "ping", &dir.path().join("b"), &args);
    let success = ping.wait(T).success();
    ping.stdout.wait_closed(Duration::from_secs(5));
    let summary = serde_json::from_str(&ping.stdout.text()).expect("JSON");
    let stderr = ping.stderr.text();
    // The processes end before the lab goes down.
    drop(ping);
    drop(listener);
    lab.down();
    (success, summary, stderr)
}

#[test]
fn ping_until_direct_reports_when_the_path_became_direct() {
    if !lab::netns_enabled("ping_until_direct_reports_when_the_path_became_direct") {
        return;
    }
    // port-restricted on both sides: the connection starts on the relay and moves to the
    // punched path.
    let (success, summary, stderr) =
        ping_until_direct("ping-until-direct", "port", "port", &["--count", "1"]);
    assert!(success, "{stderr}");
    assert_eq!(summary["direct"], true, "{summary}");
    let after = summary["direct_after_ms"]
        .as_f64()
        .expect("direct_after_ms");
    assert!(
        after >= summary["first_reply_ms"].as_f64().unwrap_or(0.0),
        "{summary}"
    );
    assert!(summary["direct_addr"]
        .as_str()
        .is_some_and(|a| a.starts_with("203.0.113.")));

    // symmetric on both sides: no direct path ever; --until-direct gives up and says why.
    let (success, summary, stderr) =
        ping_until_direct("ping-never-direct", "sym", "sym", &["--timeout", "6"]);
    assert!(!success, "no direct path: the ping fails");
    assert!(stderr.contains("no direct path to"), "{stderr}");
    assert_eq!(summary["direct"], false, "{summary}");
    assert!(summary["direct_after_ms"].is_null());
    assert!(
        summary["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("both NATs give a new public port")),
        "{summary}"
    );
}

#[test]
fn a_peer_that_reconnects_at_once_is_not_held_up_by_its_old_connection() {
    if !lab::netns_enabled("a_peer_that_reconnects_at_once_is_not_held_up_by_its_old_connection") {
        return;
    }
    // The same identity connects again right after its previous connection closed: the
    // listener still has the old connection's route to the dialer's old (dead) address for a
    // moment. The new connection must not wait for it (it once took until the 20 s dial timeout:
    // the old link's clean-up removed the route the new introduction had set up, and relayed
    // packets were shown to quinn as coming from the old connection's address).
    let lab = Lab::up("reconnect-at-once", &["--a", "port", "--b", "port"]);
    let dir = TempDir::new("reconnect-at-once");
    let rv = lab.rendezvous(&dir.path().join("rv"));
    let (_a, a_id) = lab.listen("a", "a", &dir.path().join("a"), &rv, &[], T);
    // The same local port twice in a row makes the cached address work (the NATs keep the
    // mappings), so the next connection's listener side follows a connection made without an
    // introduction; a new port makes the cached address fail and the introduction run.
    for (run, port) in [40000, 40000, 40001, 40002, 40002, 40003]
        .into_iter()
        .enumerate()
    {
        let mut args = args!["connect", a_id, "--bind", format!("0.0.0.0:{port}")];
        args.extend(rv.args());
        let mut b = lab.peer("b", "b", &dir.path().join("b"), &args);
        let (line, _) = b.wait_for_line(&format!("connected to {a_id} in "), T);
        let ms: u64 = line
            .split(" in ")
            .nth(1)
            .and_then(|rest| rest.split(" ms").next())
            .and_then(|ms| ms.parse().ok())
            .expect("connected in N ms");
        // A cached address that fails costs 1 s; the introduction a few ms more.
        assert!(ms < 5_000, "run {run}: {line}");
        b.close_stdin();
        assert!(b.wait(T).success(), "run {run}");
    }
    lab.down();
}

/// An on-path host that sees every datagram between two peers and forges and replays their
/// probes, probe answers and heartbeats from its own address (issue 12 item 1, in the lab).
mod on_path {
    use std::collections::HashSet;
    use std::io;
    use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::thread::JoinHandle;

    use common::stun::{self, ProbeTag, PunchKey, StunPacket};

    /// `sll_pkttype` of a packet the host itself sends (a forwarded packet is seen twice: coming
    /// in on one link, and going out on the other as `PACKET_OUTGOING`).
    const PACKET_OUTGOING: u8 = 4;

    /// What the attacker saw and did.
    #[derive(Debug, Default, Clone)]
    pub struct Seen {
        /// STUN Binding requests between the peers (probes and heartbeats).
        pub requests: u64,
        /// STUN Binding success responses between the peers (probe and heartbeat answers).
        pub answers: u64,
        /// Other datagrams between the peers (QUIC).
        pub other: u64,
        /// The nonces in the requests' USERNAMEs: the introduction's, and the heartbeats'.
        pub nonces: HashSet<u64>,
        /// Genuine requests sent again, unchanged, from the attacker's address.
        pub replayed_requests: u64,
        /// Requests with a seen USERNAME and transaction id, sealed with a wrong key.
        pub forged_requests: u64,
        /// Answers to seen requests (their transaction ids), sealed with a wrong key.
        pub forged_answers: u64,
        /// Genuine answers sent again, unchanged, from the attacker's address.
        pub replayed_answers: u64,
        /// Datagrams the peers sent to the attacker's own address (answers to the replays, and
        /// probes of the address a replayed probe came from).
        pub received: u64,
        /// Of those, Binding requests the attacker answered with a wrong key.
        pub answered_to_us: u64,
    }

    /// The attacker's thread; stopped (and joined) on drop or by [`Attacker::stop`].
    pub struct Attacker {
        stop: Arc<AtomicBool>,
        seen: Arc<Mutex<Seen>>,
        thread: Option<JoinHandle<io::Result<()>>>,
    }

    impl Attacker {
        /// Starts the attacker in network namespace `netns` (the lab's internet router, which
        /// forwards every datagram between the peers): it sniffs UDP between `peers` on every
        /// link with a packet socket, and sends its forgeries from a UDP socket of its own,
        /// whose source address is the router's. Returns once both sockets are open, so that
        /// nothing sent after this is missed.
        pub fn start(netns: &str, peers: [Ipv4Addr; 2]) -> Attacker {
            let stop = Arc::new(AtomicBool::new(false));
            let seen = Arc::new(Mutex::new(Seen::default()));
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let name = netns.to_owned();
            let thread = {
                let (stop, seen) = (stop.clone(), seen.clone());
                std::thread::spawn(move || {
                    let sockets = enter_netns(&name).and_then(|()| {
                        let sniffer = packet_socket()?;
                        let own = UdpSocket::bind("0.0.0.0:0")?;
                        own.set_nonblocking(true)?;
                        Ok((sniffer, own))
                    });
                    let (sniffer, own) = match sockets {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.to_string()));
                            return Ok(());
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    run(&sniffer, &own, peers, &stop, &seen)
                })
            };
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => panic!("starting the on-path attacker in {netns}: {e}"),
                Err(_) => panic!("the on-path attacker thread died"),
            }
            Attacker {
                stop,
                seen,
                thread: Some(thread),
            }
        }

        /// What it has seen and done so far.
        pub fn seen(&self) -> Seen {
            self.seen.lock().unwrap().clone()
        }

        /// Stops it; what it saw and did.
        pub fn stop(mut self) -> Seen {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(thread) = self.thread.take() {
                match thread.join() {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => panic!("the on-path attacker failed: {e}"),
                    Err(_) => panic!("the on-path attacker panicked"),
                }
            }
            self.seen()
        }
    }

    impl Drop for Attacker {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
    }

    /// Moves this thread (only) into the named network namespace.
    fn enter_netns(netns: &str) -> io::Result<()> {
        let file = std::fs::File::open(format!("/run/netns/{netns}"))?;
        // SAFETY: setns(2) on an open namespace file; it changes the network namespace of the
        // calling thread alone (a thread of our own), and touches no memory.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// An `AF_PACKET` socket that receives every IPv4 packet on every interface of the
    /// namespace (without the link header), waking up every 100 ms to check for a stop.
    fn packet_socket() -> io::Result<OwnedFd> {
        let protocol = i32::from((libc::ETH_P_IP as u16).to_be());
        // SAFETY: plain socket(2); the descriptor is owned right below.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                protocol,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        // SAFETY: setsockopt(2) reads a timeval of the size given.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                std::ptr::addr_of!(timeout).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(fd)
    }

    /// One packet from the packet socket: its length and `sll_pkttype`, or `None` on timeout.
    fn recv_packet(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<Option<(usize, u8)>> {
        // SAFETY: an all-zero sockaddr_ll is a valid value; recvfrom(2) writes at most
        // buf.len() bytes into buf and at most `len` bytes into `from`.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        let n = unsafe {
            libc::recvfrom(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                std::ptr::addr_of_mut!(from).cast(),
                &mut len,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock
                | io::ErrorKind::TimedOut
                | io::ErrorKind::Interrupted => Ok(None),
                _ => Err(e),
            };
        }
        Ok(Some((n as usize, from.sll_pkttype)))
    }

    /// The UDP datagram in an IPv4 packet: (source, destination, payload). Fragments and
    /// anything else are skipped.
    fn udp_of(packet: &[u8]) -> Option<(SocketAddrV4, SocketAddrV4, &[u8])> {
        let ihl = usize::from(packet.first()? & 0x0f) * 4;
        if packet[0] >> 4 != 4 || ihl < 20 || packet.len() < ihl + 8 || packet[9] != 17 {
            return None;
        }
        // More fragments, or a fragment offset.
        if u16::from_be_bytes([packet[6], packet[7]]) & 0x3fff != 0 {
            return None;
        }
        let ip =
            |at: usize| Ipv4Addr::new(packet[at], packet[at + 1], packet[at + 2], packet[at + 3]);
        let port = |at: usize| u16::from_be_bytes([packet[at], packet[at + 1]]);
        let udp_len = usize::from(port(ihl + 4));
        let payload = packet.get(ihl + 8..ihl + udp_len.max(8))?;
        Some((
            SocketAddrV4::new(ip(12), port(ihl)),
            SocketAddrV4::new(ip(16), port(ihl + 2)),
            payload,
        ))
    }

    fn wrong_key() -> PunchKey {
        PunchKey::from_bytes(rand::random())
    }

    fn run(
        sniffer: &OwnedFd,
        own: &UdpSocket,
        peers: [Ipv4Addr; 2],
        stop: &AtomicBool,
        seen: &Mutex<Seen>,
    ) -> io::Result<()> {
        let mut buf = vec![0u8; 65_536];
        let mut reply = [0u8; 2048];
        while !stop.load(Ordering::Relaxed) {
            // Whatever the peers sent to our own address: answer their requests with a wrong key.
            loop {
                match own.recv_from(&mut reply) {
                    Ok((n, from)) => {
                        let mut seen = seen.lock().unwrap();
                        seen.received += 1;
                        if let Ok(StunPacket::BindingRequest { transaction, .. }) =
                            stun::decode(&reply[..n])
                        {
                            let forged = stun::probe_success(transaction, from, &wrong_key());
                            own.send_to(&forged, from)?;
                            seen.answered_to_us += 1;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
            let Some((n, pkttype)) = recv_packet(sniffer, &mut buf)? else {
                continue;
            };
            if pkttype == PACKET_OUTGOING {
                continue;
            }
            let Some((src, dst, payload)) = udp_of(&buf[..n]) else {
                continue;
            };
            if !(peers.contains(src.ip()) && peers.contains(dst.ip()) && src.ip() != dst.ip()) {
                continue;
            }
            let (src, dst) = (SocketAddr::V4(src), SocketAddr::V4(dst));
            let mut seen = seen.lock().unwrap();
            match stun::decode(payload) {
                Ok(StunPacket::BindingRequest {
                    transaction,
                    username: Some(username),
                }) => {
                    let Some(tag) = ProbeTag::from_username(&username) else {
                        continue;
                    };
                    seen.requests += 1;
                    seen.nonces.insert(tag.nonce);
                    // The same request from us: authentic, but from the wrong address.
                    own.send_to(payload, dst)?;
                    seen.replayed_requests += 1;
                    // Its public USERNAME and transaction id under a key of our own.
                    let counter = u32::from_be_bytes([
                        transaction[8],
                        transaction[9],
                        transaction[10],
                        transaction[11],
                    ]);
                    own.send_to(&stun::probe_request(&tag, counter, &wrong_key()), dst)?;
                    seen.forged_requests += 1;
                    // An answer to it, racing the real one: the right transaction id, a wrong key.
                    own.send_to(&stun::probe_success(transaction, src, &wrong_key()), src)?;
                    seen.forged_answers += 1;
                }
                Ok(StunPacket::BindingSuccess { .. }) => {
                    seen.answers += 1;
                    // The genuine answer again, from us: authentic, but from the wrong address.
                    own.send_to(payload, dst)?;
                    seen.replayed_answers += 1;
                }
                _ => seen.other += 1,
            }
        }
        Ok(())
    }
}

/// `peer status --json` of the peer running in `host` with `config_dir`.
fn lab_status(lab: &Lab, host: &str, config_dir: &Path) -> serde_json::Value {
    let mut p = lab.peer(host, "status", config_dir, &args!["status", "--json"]);
    let code = lab::exit_code(&mut p, T);
    assert_eq!(code, Some(0), "peer status: {}", p.stderr.text());
    serde_json::from_str(&p.stdout.text()).expect("status JSON")
}

#[test]
fn an_on_path_host_that_forges_and_replays_probes_and_heartbeats_steers_no_path() {
    if !lab::netns_enabled(
        "an_on_path_host_that_forges_and_replays_probes_and_heartbeats_steers_no_path",
    ) {
        return;
    }
    // No NAT (open): every datagram the attacker sends reaches the peers' sockets, so each
    // forgery is really put to the test (a NAT's filter would drop most of them first).
    let lab = Lab::up("onpath", &["--a", "open", "--b", "open"]);
    let dir = TempDir::new("onpath");
    let (a_ip, b_ip) = (
        Ipv4Addr::new(203, 0, 113, 31),
        Ipv4Addr::new(203, 0, 113, 32),
    );
    // The internet router forwards every datagram between the two sides: the attacker sniffs
    // there and sends from the router's own address.
    let attacker_ip = "203.0.113.1:";
    let attacker = on_path::Attacker::start(&lab.netns("inet"), [a_ip, b_ip]);
    let rv = lab.rendezvous(&dir.path().join("rv"));
    let (mut a, a_id) = lab.listen("a", "a", &dir.path().join("a"), &rv, &args!["-v"], T);
    let mut b_args = args!["-v", "connect", a_id];
    b_args.extend(rv.args());
    let mut b = lab.peer("b", "b", &dir.path().join("b"), &b_args);
    b.stdout.wait_for(&format!("connected to {a_id}"), T);
    let (accepted, _) = a.wait_for_line("connected: ", T);
    let b_id = accepted.split_whitespace().nth(1).expect("id").to_owned();
    b.stdout.wait_for("direct to 203.0.113.31:", T);

    // Both peers received the attacker's forgeries and refused them: its heartbeats and answers
    // with a wrong key, and its replays of their genuine heartbeat answers. The punch sessions
    // refused its forged probes and answers.
    let heartbeat = format!("ignored a heartbeat datagram from {attacker_ip}");
    // Four on each side: more than one heartbeat round was attacked (-v shows up to 8).
    a.stderr.wait_for_nth(&heartbeat, 4, T);
    b.stderr.wait_for_nth(&heartbeat, 4, T);
    let punch_refusals = |p: &Proc| {
        p.stderr
            .lines()
            .into_iter()
            .filter(|l| l.contains(&format!("from {attacker_ip}")) && l.contains("(forged?)"))
            .count()
    };
    assert!(
        punch_refusals(&a) + punch_refusals(&b) >= 1,
        "no forged probe or answer reached a punch session\na:\n{}\nb:\n{}",
        a.stderr.text(),
        b.stderr.text()
    );
    // The attack goes on while the peers talk: a line each way, and a ping.
    b.send_line("through the on-path attacker");
    a.stdout.wait_for("through the on-path attacker", T);
    a.send_line("and back through it");
    b.stdout.wait_for("and back through it", T);
    let mut ping = lab.peer(
        "b",
        "ping",
        &dir.path().join("b"),
        &args!["ping", a_id, "--count", "3", "--json"],
    );
    assert_eq!(
        lab::exit_code(&mut ping, T),
        Some(0),
        "{}",
        ping.stderr.text()
    );
    let summary: serde_json::Value = serde_json::from_str(&ping.stdout.text()).expect("ping JSON");
    assert_eq!(summary["received"], 3, "{summary}");
    assert_eq!(summary["direct"], true, "{summary}");
    let direct = summary["direct_addr"].as_str().unwrap_or_default();
    assert!(direct.starts_with("203.0.113.31:"), "{summary}");

    // Each side's path is the other's own address, and always was.
    for (host, dir_name, other_id, other_ip) in [
        ("a", "a", b_id.as_str(), "203.0.113.32:"),
        ("b", "b", a_id.as_str(), "203.0.113.31:"),
    ] {
        let report = lab_status(&lab, host, &dir.path().join(dir_name));
        let conns = report["connections"].as_array().expect("connections");
        assert_eq!(conns.len(), 1, "{host}: {report}");
        assert_eq!(conns[0]["peer"], other_id, "{host}: {report}");
        let addr = conns[0]["direct_addr"].as_str().unwrap_or_default();
        assert!(addr.starts_with(other_ip), "{host}'s path: {report}");
    }
    for (name, p) in [("a", &a), ("b", &b)] {
        for line in p.stdout.lines() {
            assert!(
                !(line.contains("direct to ") && line.contains(attacker_ip)),
                "{name} took the attacker's address: {line}"
            );
            assert!(
                !line.starts_with("path to") || line.contains("direct to 203.0.113.3"),
                "{name}'s path left the direct path: {line}"
            );
        }
    }

    // The attack was real: the attacker saw the probes, the answers and the heartbeats (two
    // nonces at least: the introduction's and the heartbeats'), and sent its forgeries.
    let seen = attacker.stop();
    eprintln!("[onpath] the attacker: {seen:?}");
    assert!(seen.nonces.len() >= 2, "{seen:?}");
    assert!(seen.requests >= 4 && seen.answers >= 2, "{seen:?}");
    assert!(seen.other >= 10, "the attacker saw no QUIC: {seen:?}");
    // The replays were authentic, so the peers answered them, at the attacker's address (one
    // answer each, the bounded reflection the threat model allows).
    assert!(seen.received >= 2, "{seen:?}");
    assert!(
        seen.replayed_requests >= 4
            && seen.forged_requests >= 4
            && seen.forged_answers >= 4
            && seen.replayed_answers >= 2,
        "{seen:?}"
    );
    b.close_stdin();
    assert_eq!(lab::exit_code(&mut b, T), Some(0), "{}", b.stderr.text());
}
