//! IPv6 in the network-namespace NAT lab (root only; `natlab.sh up --ipv6`): peers and the
//! rendezvous get documentation-range addresses (2001:db8::/32), each peer behind its router's
//! stateful IPv6 firewall (established and related pass, anything new from outside is dropped:
//! filtering like a port-restricted cone, no NAT). Both sides are symmetric IPv4 NATs, a pair
//! that is relayed over IPv4 only.
//!
//! - `sym_sym_dual_stack_goes_direct_over_ipv6`: both peers dual-stack, registered over IPv4;
//!   the dialer goes direct to the listener's IPv6 address through both firewalls.
//! - `ipv6_only_peer_reaches_dual_stack_peer`: the dialer has no IPv4 route and registers over
//!   IPv6; the dual-stack listener (registered over IPv4) is reached over IPv6.
//! - `netcheck_reports_ipv6_reachability`: `peer netcheck` on a dual-stack peer says IPv6 works
//!   and shows its address as the server saw it; on the IPv4-only side it says there is none.
//! - `a_lost_ipv6_proof_is_tried_again_within_the_registration`: the listener's IPv6 address
//!   proof is dropped on its way out, then let through: the peer proves its address again
//!   without registering again.

use std::path::Path;
use std::time::Duration;

use e2e::lab::{self, Lab, RV_LISTEN6};
use e2e::{args, Proc, Rendezvous, TempDir};

const STEP: Duration = Duration::from_secs(30);

/// The listener's IPv6 address in every `--ipv6` lab (side a behind a router).
const LISTENER6: &str = "[2001:db8:1::2]:";
/// The dialer's.
const DIALER6: &str = "[2001:db8:2::2]:";

/// A listener on `LAB-a` registered over IPv4, a dialer on `LAB-b` that connects to it with
/// `server` (the rendezvous's IPv4 or IPv6 address): the dialer must end up direct to the
/// listener's IPv6 address, the listener must see the dialer's, and a line must pass each way.
fn direct_over_ipv6(lab: &Lab, rv: &Rendezvous, dir: &Path, server: &str) {
    let (mut listener, l_id) = lab.listen("a", "listener", &dir.join("a"), rv, &args!["-v"], STEP);
    let connect = args![
        "-v",
        "connect",
        l_id,
        "--server",
        server,
        "--server-key",
        rv.fingerprint
    ];
    let mut dialer = lab.peer("b", "dialer", &dir.join("b"), &connect);
    let (line, _) = dialer.wait_for_line(&format!("connected to {l_id} in "), STEP);
    let direct = format!("direct to {LISTENER6}");
    if !line.contains(&direct) {
        // Started on the relay: the path moves once the punch succeeds.
        dialer.wait_for_line(&format!("path to {l_id}: {direct}"), STEP);
    }
    let (accepted, _) = listener.wait_for_line("connected: ", STEP);
    let d_id = accepted.split_whitespace().nth(1).expect("id").to_owned();
    exchange(&mut listener, &l_id, &mut dialer, &d_id);
    // The listener's path to the dialer is its IPv6 address too (its path lines or the accept).
    let on_ipv6 = accepted.contains(DIALER6)
        || listener
            .stdout
            .lines()
            .iter()
            .any(|l| l.contains(&format!("path to {d_id}: direct to {DIALER6}")));
    assert!(
        on_ipv6,
        "the listener reaches the dialer over IPv6:\n{}",
        listener.stdout.text()
    );
    dialer.close_stdin();
    assert_eq!(
        lab::exit_code(&mut dialer, STEP),
        Some(0),
        "the dialer exits 0 at the end of its input\nstderr:\n{}",
        dialer.stderr.text()
    );
}

/// One chat line each way.
fn exchange(listener: &mut Proc, l_id: &str, dialer: &mut Proc, d_id: &str) {
    let to_listener = format!("hello listener from dialer {d_id}");
    dialer.send_line(&to_listener);
    let (got, _) = listener.wait_for_line(&to_listener, STEP);
    assert!(got.contains(&format!("{d_id}: {to_listener}")), "{got}");
    let to_dialer = format!("hello dialer from listener {l_id}");
    listener.send_line(&to_dialer);
    let (got, _) = dialer.wait_for_line(&to_dialer, STEP);
    assert!(got.contains(&format!("{l_id}: {to_dialer}")), "{got}");
}

fn run(case: &str, options: &[&str], server: &str) {
    if !lab::netns_enabled(case) {
        return;
    }
    let dir = TempDir::new(case);
    let lab = Lab::up(case, options);
    {
        let rv = lab.rendezvous_dual_stack(&dir.path().join("rv"));
        direct_over_ipv6(&lab, &rv, dir.path(), server);
        // The processes are killed here, before the lab goes down.
    }
    lab.down();
}

#[test]
fn sym_sym_dual_stack_goes_direct_over_ipv6() {
    run(
        "ipv6_sym_sym",
        &["--a", "sym", "--b", "sym", "--ipv6", "ab"],
        lab::RV_LISTEN,
    );
}

#[test]
fn ipv6_only_peer_reaches_dual_stack_peer() {
    run(
        "ipv6_only_dual",
        &[
            "--a",
            "sym",
            "--b",
            "sym",
            "--ipv6",
            "ab",
            "--ipv6-only",
            "b",
        ],
        RV_LISTEN6,
    );
}

#[test]
fn netcheck_reports_ipv6_reachability() {
    let case = "ipv6_netcheck";
    if !lab::netns_enabled(case) {
        return;
    }
    let dir = TempDir::new(case);
    let lab = Lab::up(case, &["--a", "sym", "--b", "port", "--ipv6", "a"]);
    {
        let rv = lab.rendezvous_dual_stack(&dir.path().join("rv"));
        let netcheck = |host: &str| {
            let args = args![
                "netcheck",
                "--server",
                lab::RV_LISTEN,
                "--stun6",
                RV_LISTEN6,
                "--no-port-mapping"
            ];
            let mut p = lab.peer(
                host,
                &format!("netcheck-{host}"),
                &dir.path().join(host),
                &args,
            );
            p.close_stdin();
            assert_eq!(lab::exit_code(&mut p, STEP), Some(0), "{}", p.stderr.text());
            p.stdout.text()
        };
        let dual = netcheck("a");
        assert!(
            dual.contains(&format!(
                "IPv6:             works: {RV_LISTEN6} sees {LISTENER6}"
            )) && dual.contains("(no NAT"),
            "{dual}"
        );
        let v4_only = netcheck("b");
        assert!(
            v4_only.contains("IPv6:             no global IPv6 address (IPv4 only)"),
            "{v4_only}"
        );
        drop(rv);
    }
    lab.down();
}

/// Runs `nft` with `script` on stdin in `LAB-host`.
fn nft(lab: &Lab, host: &str, script: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &format!("{}-{host}", lab.name()),
            "nft",
            "-f",
            "-",
        ])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("running nft in the lab");
    child
        .stdin
        .take()
        .expect("nft's stdin")
        .write_all(script.as_bytes())
        .expect("writing the nft script");
    assert!(
        child.wait().expect("waiting for nft").success(),
        "nft -f - in {host}: {script}"
    );
}

#[test]
fn a_lost_ipv6_proof_is_tried_again_within_the_registration() {
    let case = "ipv6_proof_retry";
    if !lab::netns_enabled(case) {
        return;
    }
    let dir = TempDir::new(case);
    let lab = Lab::up(case, &["--a", "port", "--b", "port", "--ipv6", "ab"]);
    {
        let rv = lab.rendezvous_dual_stack(&dir.path().join("rv"));
        // Every IPv6 datagram from the listener to the rendezvous's port is lost: its proof
        // requests (3, 2 s apart) get no answer.
        nft(
            &lab,
            "a",
            "table ip6 proof_loss {\n chain out {\n type filter hook output priority 0;\n udp dport 7000 drop\n }\n}\n",
        );
        let (listener, _) = lab.listen(
            "a",
            "listener",
            &dir.path().join("a"),
            &rv,
            &args!["-v"],
            STEP,
        );
        listener.wait_for_line("no address proven at [2001:db8::10]:7000", STEP);
        nft(&lab, "a", "delete table ip6 proof_loss\n");
        // Tried again 10 s after the failure, in the same registration.
        let (line, _) = listener.wait_for_line("proven to the rendezvous", STEP);
        assert!(line.contains("2001:db8:1::2"), "{line}");
        assert_eq!(
            listener
                .stdout
                .lines()
                .iter()
                .filter(|l| l.starts_with("registered with "))
                .count(),
            1,
            "proven without registering again:\n{}",
            listener.stdout.text()
        );
    }
    lab.down();
}
