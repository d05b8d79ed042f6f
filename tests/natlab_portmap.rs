//! Port mapping against a real router implementation, in the network-namespace NAT lab (root
//! only): Debian's `miniupnpd-nftables` (UPnP IGD, NAT-PMP, PCP) runs on the listener's NAT
//! router and installs its mappings into that router's nftables (`natlab.sh upnp`). Both sides
//! are symmetric NATs, a pair that is relayed without the mapping.
//!
//! The main test, in order: the listener maps its port (PCP) and announces it; a dialer goes
//! direct through the mapping (`port mapping` in the connect line, `peer status` and `peer
//! ping`); the router's mapping service stops (losing its mappings) until the listener's
//! mapping expires, and comes back; the listener notices the restart through the PCP epoch and
//! maps again, so that a second dialer goes direct too; the listener's clean exit deletes the mapping from the router's ruleset.
//! Another drops PCP requests in front of the listener's miniupnpd (`natlab.sh upnp --no-pcp`:
//! miniupnpd switches NAT-PMP and PCP together), so that the listener maps by NAT-PMP, a dialer
//! goes direct through that mapping (`peer lookup` shows it as the listener's `(port mapping)`
//! candidate), and the listener's clean exit deletes it.
//! The last runs miniupnpd with NAT-PMP and PCP off on the *dialer's* router: the dialer falls
//! back to UPnP IGD `AddPortMapping` as it starts, the listener reaches it through the mapping,
//! and the dialer `DeletePortMapping`s when its input ends.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use e2e::lab::{self, Lab};
use e2e::{args, Proc, Rendezvous, TempDir};

const T: Duration = Duration::from_secs(30);
const MINIUPNPD: &str = "/usr/sbin/miniupnpd";

fn natlab(args: &[&str]) -> String {
    let out = Command::new(lab::natlab_sh())
        .args(args)
        .output()
        .expect("running natlab.sh");
    assert!(
        out.status.success(),
        "natlab.sh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The miniupnpd DNAT rules of `router` (`natlab.sh upnp LAB ROUTER list`).
fn router_mappings(lab: &Lab, router: &str) -> String {
    natlab(&["upnp", lab.name(), router, "list"])
}

/// Waits until the listener's router (`nata`) maps `port` to the listener (`present`) or no
/// longer does.
fn wait_router_mapping(lab: &Lab, port: u16, present: bool) {
    wait_mapping_on(lab, "nata", "10.0.1.2", port, present)
}

/// Waits until `router` maps `port` to `host` (`present`) or no longer does.
fn wait_mapping_on(lab: &Lab, router: &str, host: &str, port: u16, present: bool) {
    let rule = format!("dport {port} dnat ip to {host}:");
    let deadline = Instant::now() + T;
    loop {
        let list = router_mappings(lab, router);
        if list.contains(&rule) == present {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "router mapping of {port} present={present} expected, ruleset has:\n{list}"
        );
        // Polling the router's ruleset: nothing to wait on but the file of rules itself.
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `port mapping: 192.0.3.21:PORT by PCP (router 10.0.1.1)` -> PORT, the `n`th such line.
fn mapped_port(listener: &Proc, n: usize) -> u16 {
    mapped_port_on(listener, "192.0.3.21", n)
}

/// As [`mapped_port`], for the router whose stand-in external address is `external`.
fn mapped_port_on(peer: &Proc, external: &str, n: usize) -> u16 {
    let needle = format!("port mapping: {external}:");
    let line = peer.stdout.wait_for_nth(&needle, n, T);
    let parse = || {
        let (_, rest) = line.split_once(&needle)?;
        rest.split_whitespace().next()?.parse().ok()
    };
    parse().unwrap_or_else(|| panic!("no port in {line:?}"))
}

/// A dialer on `LAB-b` connects to `id` and must go direct to the listener's mapped port.
fn dial_through_mapping(lab: &Lab, dir: &Path, rv: &Rendezvous, id: &str, port: u16, tag: &str) {
    let mut connect = args!["connect", id];
    connect.extend(rv.args());
    let mut dialer = lab.peer("b", tag, &dir.join(tag), &connect);
    let expected = format!("direct to 203.0.113.21:{port} (port mapping)");
    let (line, _) = dialer.wait_for_line(&format!("connected to {id} in "), T);
    if !line.contains(&expected) {
        dialer.wait_for_line(&format!("path to {id}: {expected}"), T);
    }
    // `peer status` and `peer ping` through the running dialer's control socket say so too.
    let mut status = lab.peer("b", "status", &dir.join(tag), &args!["status"]);
    assert_eq!(lab::exit_code(&mut status, T), Some(0));
    assert!(
        status.stdout.text().contains(&expected),
        "peer status:\n{}",
        status.stdout.text()
    );
    let mut ping = lab.peer(
        "b",
        "ping",
        &dir.join(tag),
        &args!["ping", id, "--count", "2", "--json"],
    );
    assert_eq!(lab::exit_code(&mut ping, T), Some(0));
    let summary: serde_json::Value = serde_json::from_str(&ping.stdout.text())
        .unwrap_or_else(|e| panic!("ping --json ({e}): {}", ping.stdout.text()));
    assert_eq!(summary["direct"], true, "{summary}");
    assert!(
        summary["path"]
            .as_str()
            .is_some_and(|p| p.contains("(port mapping)")),
        "{summary}"
    );
    dialer.close_stdin();
    assert_eq!(lab::exit_code(&mut dialer, T), Some(0));
}

/// Whether the lab test `case` can run here (says why not).
fn enabled(case: &str) -> bool {
    if !lab::netns_enabled(case) {
        return false;
    }
    if !Path::new(MINIUPNPD).exists() {
        eprintln!("skipped {case}: {MINIUPNPD} is missing (apt-get install miniupnpd-nftables)");
        return false;
    }
    true
}

/// The mapping is on the *dialer's* router, which offers only UPnP IGD: the dialer maps its
/// port right after it starts (the dial waits for a gateway that has answered), the listener
/// reaches it through the mapping, and the dialer's end of input (a clean exit) deletes it.
#[test]
fn sym_sym_goes_direct_through_the_dialers_upnp_igd_mapping_when_pcp_and_nat_pmp_are_off() {
    if !enabled(
        "sym_sym_goes_direct_through_the_dialers_upnp_igd_mapping_when_pcp_and_nat_pmp_are_off",
    ) {
        return;
    }
    let lab = Lab::up("upnp", &["--a", "sym", "--b", "sym"]);
    natlab(&["upnp", lab.name(), "natb", "start", "--upnp-only"]);
    let dir = TempDir::new("upnp");
    {
        let rv = lab.rendezvous(&dir.path().join("rv"));
        let (listener, id) = lab.listen("a", "listener", &dir.path().join("a"), &rv, &[], T);
        let mut connect = args!["-v", "connect", id];
        connect.extend(rv.args());
        let mut dialer = lab.peer("b", "dialer", &dir.path().join("b"), &connect);
        let port = mapped_port_on(&dialer, "192.0.3.22", 1);
        assert!(
            dialer
                .stdout
                .wait_for("port mapping: 192.0.3.22:", T)
                .contains("by UPnP IGD"),
            "port 5351 is closed: UPnP IGD"
        );
        wait_mapping_on(&lab, "natb", "10.0.2.2", port, true);
        // The dialer goes direct to the listener's probe source (the listener's NAT is
        // symmetric); the listener's path is the dialer's mapping.
        dialer.wait_for_line(&format!("path to {id}: direct to 203.0.113.21:"), T);
        let expected = format!("direct to 203.0.113.22:{port} (port mapping)");
        let deadline = Instant::now() + T;
        loop {
            let mut status = lab.peer("a", "status", &dir.path().join("a"), &args!["status"]);
            assert_eq!(lab::exit_code(&mut status, T), Some(0));
            if status.stdout.text().contains(&expected) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the listener's peer status shows no {expected:?}:\n{}",
                status.stdout.text()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        dialer.send_line("through the dialer's mapping");
        listener.stdout.wait_for("through the dialer's mapping", T);
        dialer.close_stdin();
        assert_eq!(lab::exit_code(&mut dialer, T), Some(0));
        wait_mapping_on(&lab, "natb", "10.0.2.2", port, false);
    }
    lab.down();
}

#[test]
fn sym_sym_goes_direct_through_a_miniupnpd_mapping_that_survives_a_router_restart() {
    if !enabled("sym_sym_goes_direct_through_a_miniupnpd_mapping_that_survives_a_router_restart") {
        return;
    }
    let lab = Lab::up("portmap", &["--a", "sym", "--b", "sym"]);
    // PCP lifetimes of at most 10 s: renewals every 5 s, so the restart is noticed quickly.
    natlab(&["upnp", lab.name(), "nata", "start", "--max-lifetime", "10"]);
    let dir = TempDir::new("portmap");
    {
        let rv = lab.rendezvous(&dir.path().join("rv"));
        let (mut listener, id) =
            lab.listen("a", "listener", &dir.path().join("a"), &rv, &args!["-v"], T);
        let port = mapped_port(&listener, 1);
        assert!(
            listener
                .stdout
                .wait_for("port mapping: 192.0.3.21:", T)
                .contains("by PCP"),
            "PCP is tried first and miniupnpd speaks it"
        );
        wait_router_mapping(&lab, port, true);
        dial_through_mapping(&lab, dir.path(), &rv, &id, port, "b1");

        // The router's mapping service stops (its mappings go with it): the listener's
        // renewals go unanswered until the mapping expires (10 s at most), and a round of all
        // three protocols fails. Then it comes back, and the listener's next round (10 s
        // later) finds it restarted (its epoch went back) and maps again.
        natlab(&["upnp", lab.name(), "nata", "stop"]);
        wait_router_mapping(&lab, port, false);
        listener.wait_for_line("port mapping lost: ", T);
        // Its next round finds nothing either (`-v` says so); the one after it is 10 s later.
        listener.wait_for_line("port mapping: none from router 10.0.1.1", T);
        natlab(&["upnp", lab.name(), "nata", "start", "--max-lifetime", "10"]);
        listener.wait_for_line("port mapping: router 10.0.1.1 restarted", T);
        // The listener asked again with its old port; the router may give another.
        let deadline = Instant::now() + T;
        let port = loop {
            let list = router_mappings(&lab, "nata");
            if let Some(rule) = list.lines().find(|l| l.contains("dnat ip to 10.0.1.2:")) {
                let after = rule.split("dport ").nth(1).unwrap_or_default();
                break after
                    .split_whitespace()
                    .next()
                    .and_then(|p| p.parse::<u16>().ok())
                    .expect("a port in the rule");
            }
            assert!(Instant::now() < deadline, "no mapping after the restart");
            std::thread::sleep(Duration::from_millis(100));
        };
        dial_through_mapping(&lab, dir.path(), &rv, &id, port, "b2");

        // A clean exit deletes the mapping.
        let status = listener.terminate(T);
        assert!(status.success(), "the listener exits cleanly: {status:?}");
        wait_router_mapping(&lab, port, false);
    }
    lab.down();
}

/// A router that speaks NAT-PMP but not PCP (the lab drops PCP requests on the router's LAN
/// input, by their version byte): the listener's PCP requests go unanswered, it falls back to
/// NAT-PMP, a dialer goes direct through that mapping, and a clean exit deletes it (NAT-PMP
/// lifetime 0).
#[test]
fn sym_sym_goes_direct_through_a_nat_pmp_mapping_when_the_router_drops_pcp() {
    if !enabled("sym_sym_goes_direct_through_a_nat_pmp_mapping_when_the_router_drops_pcp") {
        return;
    }
    let lab = Lab::up("natpmp", &["--a", "sym", "--b", "sym"]);
    natlab(&["upnp", lab.name(), "nata", "start", "--no-pcp"]);
    let dir = TempDir::new("natpmp");
    {
        let rv = lab.rendezvous(&dir.path().join("rv"));
        let (mut listener, id) =
            lab.listen("a", "listener", &dir.path().join("a"), &rv, &args!["-v"], T);
        let port = mapped_port(&listener, 1);
        assert!(
            listener
                .stdout
                .wait_for("port mapping: 192.0.3.21:", T)
                .contains("by NAT-PMP"),
            "PCP is dropped: NAT-PMP"
        );
        // PCP was asked first and the router dropped it (the drop rule counted packets).
        let rules = natlab(&[
            "exec",
            lab.name(),
            "nata",
            "--",
            "nft",
            "list",
            "table",
            "inet",
            "natlab_pcp",
        ]);
        assert!(
            rules.contains("counter packets ") && !rules.contains("counter packets 0 "),
            "no PCP request was dropped:\n{rules}"
        );
        wait_router_mapping(&lab, port, true);
        // `peer lookup` shows the mapping as the listener's port-mapped candidate.
        let mut query = args!["lookup", id];
        query.extend(rv.args());
        let mut lookup = lab.peer("b", "lookup", &dir.path().join("lookup"), &query);
        assert_eq!(lab::exit_code(&mut lookup, T), Some(0));
        let expected = format!("203.0.113.21:{port} (port mapping)");
        assert!(
            lookup.stdout.text().contains(&expected),
            "peer lookup shows no {expected:?}:\n{}",
            lookup.stdout.text()
        );
        dial_through_mapping(&lab, dir.path(), &rv, &id, port, "b1");

        // A clean exit deletes the mapping.
        let status = listener.terminate(T);
        assert!(status.success(), "the listener exits cleanly: {status:?}");
        wait_router_mapping(&lab, port, false);
    }
    lab.down();
}
