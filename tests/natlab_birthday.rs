//! Repeated trials of birthday punching in the network-namespace NAT lab (root only), for the
//! success rates in `docs/lab-matrix.md`. Run by `scripts/birthday-trials.sh`; ignored by a
//! plain `cargo test` (the NAT matrix in `natlab.rs` runs one trial of each pair as an ordinary
//! test).
//!
//! For each case (`sym_port`: listener behind a symmetric NAT, dialer behind a port-restricted
//! one, as in the matrix) and impairment, one lab; each trial starts everything afresh (NAT
//! mappings and conntrack flushed, a new rendezvous, a new listener and dialer with new
//! identities) and measures from the dialer's start to its `path to ...: direct to` line.
//! Environment: `BIRTHDAY_TRIALS` (default 20), `BIRTHDAY_CASES` (default
//! `sym_port,port_sym,sym_cgnat,cgnat_sym`), `BIRTHDAY_IMPAIRMENTS` (default `clean,impaired`),
//! `BIRTHDAY_WITHIN_S` (the success bound, default 10).

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use e2e::lab::{self, Lab};
use e2e::{args, TempDir};

/// Longest wait for a trial's direct path (a trial past `BIRTHDAY_WITHIN_S` counts as failed
/// but its time is still recorded when it comes).
const WAIT: Duration = Duration::from_secs(20);

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// The NAT routers of a side of kind `kind` (flushed between trials).
fn routers(kind: &str, side: &str) -> Vec<String> {
    match kind {
        "open" => Vec::new(),
        "cgnat" => vec![format!("cgnat{side}"), format!("nat{side}")],
        _ => vec![format!("nat{side}")],
    }
}

fn flush(lab: &Lab, host: &str) {
    let status = std::process::Command::new(lab::natlab_sh())
        .args(["flush", lab.name(), host])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("running natlab.sh flush");
    assert!(status.success(), "natlab.sh flush {} {host}", lab.name());
}

/// How one trial went direct.
struct Direct {
    /// From the dialer's start to its `direct to` line.
    after: Duration,
    /// From the dialer's `birthday punching` line (its punch with both NAT profiles known) to
    /// the `direct to` line, when it printed one.
    punch: Option<Duration>,
    /// How the path was found, as the dialer says.
    how: String,
}

/// One trial: how it went direct, or why not.
fn trial(lab: &Lab, listener_kind: &str, dialer_kind: &str) -> Result<Direct, String> {
    for host in routers(listener_kind, "a")
        .into_iter()
        .chain(routers(dialer_kind, "b"))
    {
        flush(lab, &host);
    }
    let dir = TempDir::new("birthday-trial");
    let rv = lab.rendezvous(&dir.path().join("rv"));
    let (_listener, l_id) = lab.listen(
        "a",
        "listener",
        &dir.path().join("a"),
        &rv,
        &args!["-v"],
        WAIT,
    );
    let mut connect = args!["-v", "connect", l_id];
    connect.extend(rv.args());
    let started = Instant::now();
    let dialer = lab.peer("b", "dialer", &dir.path().join("b"), &connect);
    let found = dialer
        .stdout
        .try_wait_for_at(&format!("path to {l_id}: direct to "), WAIT)
        .or_else(|_| {
            // Direct from the start (connected directly).
            dialer
                .stdout
                .try_wait_for_at(&format!("connected to {l_id} in "), Duration::ZERO)
                .ok()
                .filter(|(line, _)| line.contains("direct to "))
                .ok_or(())
        });
    match found {
        Ok((line, at)) => {
            let how = line
                .rsplit_once('(')
                .map(|(_, how)| how.trim_end_matches(')').to_owned())
                .unwrap_or_default();
            let punch = dialer
                .stderr
                .try_wait_for_at("birthday punching", Duration::ZERO)
                .ok()
                .map(|(_, from)| at.saturating_duration_since(from));
            Ok(Direct {
                after: at.saturating_duration_since(started),
                punch,
                how,
            })
        }
        Err(()) => {
            let mut dialer = dialer;
            let reason = dialer
                .stdout
                .lines()
                .into_iter()
                .find(|l| l.contains("no direct path: "))
                .unwrap_or_else(|| "no direct path and no reason".into());
            let exited = if dialer.running() {
                String::new()
            } else {
                let stderr = dialer.stderr.lines();
                let tail = stderr[stderr.len().saturating_sub(3)..].join(" / ");
                format!(
                    " (the dialer exited after {:.1} s: {:?}; stderr ends: {tail})",
                    started.elapsed().as_secs_f64(),
                    dialer.wait(Duration::from_secs(1))
                )
            };
            Err(reason + &exited)
        }
    }
}

#[test]
#[ignore = "repeated lab trials: scripts/birthday-trials.sh"]
fn birthday_trials() {
    lab::require_netns();
    let trials: u32 = env_or("BIRTHDAY_TRIALS", "20")
        .parse()
        .expect("BIRTHDAY_TRIALS");
    let within = Duration::from_secs(env_or("BIRTHDAY_WITHIN_S", "10").parse().expect("seconds"));
    let cases = env_or("BIRTHDAY_CASES", "sym_port,port_sym,sym_cgnat,cgnat_sym");
    let impairments = env_or("BIRTHDAY_IMPAIRMENTS", "clean,impaired");
    let out_dir = lab::target_dir().join("lab-matrix");
    std::fs::create_dir_all(&out_dir).expect("creating target/lab-matrix");
    for case in cases.split(',').filter(|c| !c.is_empty()) {
        let (listener, dialer) = case
            .split_once('_')
            .unwrap_or_else(|| panic!("case {case:?} is LISTENER_DIALER"));
        for impairment in impairments.split(',').filter(|i| !i.is_empty()) {
            let mut options = vec!["--a", listener, "--b", dialer];
            match impairment {
                "clean" => {}
                "impaired" => options.extend(["--delay", "40", "--loss", "10"]),
                other => panic!("impairment {other:?} is clean or impaired"),
            }
            let lab = Lab::up(&format!("bd-{case}-{impairment}"), &options);
            let mut times = Vec::new();
            let mut punches = Vec::new();
            let mut ok = 0u32;
            let mut failures = Vec::new();
            for n in 1..=trials {
                match trial(&lab, listener, dialer) {
                    Ok(Direct { after, punch, how }) => {
                        eprintln!(
                            "[birthday] {case} {impairment} #{n}: direct after {after:?} ({how}; \
                             birthday punch {punch:?})"
                        );
                        punches.extend(punch);
                        if after <= within {
                            ok += 1;
                        } else {
                            failures.push(format!("#{n}: direct only after {after:?}"));
                        }
                        times.push(after);
                    }
                    Err(reason) => {
                        eprintln!("[birthday] {case} {impairment} #{n}: {reason}");
                        failures.push(format!("#{n}: {reason}"));
                    }
                }
            }
            lab.down();
            times.sort();
            punches.sort();
            let ms =
                |d: Option<&Duration>| d.map_or("-".into(), |d| format!("{} ms", d.as_millis()));
            let mut row = format!(
                "| {listener} / {dialer} | {impairment} | {ok}/{trials} within {} s | median {} | \
                 worst {} | median {}, worst {} |",
                within.as_secs(),
                ms(times.get(times.len() / 2)),
                ms(times.last()),
                ms(punches.get(punches.len() / 2)),
                ms(punches.last()),
            );
            if !failures.is_empty() {
                let _ = write!(row, " {} |", failures.join("; "));
            } else {
                row.push_str("  |");
            }
            eprintln!("{row}");
            std::fs::write(
                out_dir.join(format!("birthday-{case}-{impairment}.md")),
                row + "\n",
            )
            .expect("writing the result row");
        }
    }
}
