//! The network-namespace NAT lab (`scripts/natlab.sh`, see `scripts/lab/README.md`) for
//! end-to-end tests: bring a lab up, run the real binaries inside its namespaces, and tear it
//! down again, also when an assertion fails or the test process is killed.
//!
//! Processes run as `ip netns exec LAB-HOST BINARY ...`: `ip` execs the binary, so the [`Proc`]
//! is the real process and dropping it kills it. Declare `Proc`s after the [`Lab`] so that they
//! are dropped (killed) before the lab goes down.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::{bin, peer_args, rendezvous_args, wait_registered, workspace_root, Proc, Rendezvous};

/// What a lab test says when it is not enabled.
pub const NETNS_GATE: &str = "needs root and P2P_NETNS_TESTS=1 (scripts/test.sh sets it)";

/// Where the rendezvous listens in every lab (`LAB-rv`).
pub const RV_LISTEN: &str = "203.0.113.10:7000";
/// Where the rendezvous listens in a lab up with `--ipv6`: one dual-stack socket.
pub const RV_LISTEN_DUAL: &str = "[::]:7000";
/// The rendezvous's IPv6 address in a lab up with `--ipv6` (`LAB-rv`, 2001:db8::10).
pub const RV_LISTEN6: &str = "[2001:db8::10]:7000";

/// Whether lab tests may run here (`P2P_NETNS_TESTS=1`, which `scripts/test.sh` sets when it
/// runs as root with nftables). When not, says so on stderr: a lab test then returns at once
/// (plain `cargo test` without root passes, and says what it skipped), while `scripts/test.sh`
/// as root runs them all and prints the matrix they write.
pub fn netns_enabled(test: &str) -> bool {
    let enabled = std::env::var("P2P_NETNS_TESTS").as_deref() == Ok("1");
    if !enabled {
        eprintln!("skipped {test}: {NETNS_GATE}");
    }
    enabled
}

/// Panics with [`NETNS_GATE`] unless `P2P_NETNS_TESTS=1`: for code that must never run outside
/// a lab (the tests check [`netns_enabled`] first and skip).
pub fn require_netns() {
    if std::env::var("P2P_NETNS_TESTS").as_deref() != Ok("1") {
        panic!("{NETNS_GATE}");
    }
}

/// `scripts/natlab.sh`.
pub fn natlab_sh() -> PathBuf {
    workspace_root().join("scripts").join("natlab.sh")
}

/// The cargo target directory: `$CARGO_TARGET_DIR` (relative to the workspace root when
/// relative) or the workspace's `target/`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR").filter(|v| !v.is_empty()) {
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    }
}

fn natlab(args: &[&str]) -> Output {
    Command::new(natlab_sh())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running natlab.sh {args:?}: {e}"))
}

/// A lab name (1-6 of `[a-z0-9]`, as natlab.sh requires): `n` and five base-36 digits of a hash
/// of the case name, the process id, the time and the attempt, so that parallel tests, two runs
/// side by side and labs left behind by a killed run never collide.
fn lab_name(case: &str, attempt: u32) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let salt = format!("{case}/{}/{nanos}/{attempt}", std::process::id());
    // FNV-1a
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in salt.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut name = String::from("n");
    for _ in 0..5 {
        name.push(char::from_digit((h % 36) as u32, 36).expect("digit"));
        h /= 36;
    }
    name
}

/// A running lab, taken down on drop.
pub struct Lab {
    name: String,
    /// `sh -c 'read; natlab.sh down LAB'` in its own process group, reading a pipe that only
    /// this process holds: if the test process dies without dropping the lab (SIGKILL, nextest
    /// timeout), the pipe closes and the watchdog takes the lab down.
    watchdog: Option<Child>,
}

impl Lab {
    /// `natlab.sh up LAB OPTIONS...` under a fresh name derived from `case`.
    pub fn up(case: &str, options: &[&str]) -> Lab {
        require_netns();
        let mut attempt = 0;
        loop {
            let name = lab_name(case, attempt);
            let watchdog = Command::new("sh")
                .args([
                    "-c",
                    r#"read -r _ || true; exec "$0" down "$1" >/dev/null 2>&1"#,
                ])
                .arg(natlab_sh())
                .arg(&name)
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .expect("starting the lab watchdog");
            let mut up = vec!["up", name.as_str()];
            up.extend_from_slice(options);
            let out = natlab(&up);
            if out.status.success() {
                eprintln!(
                    "[lab] {case}: lab {name} is up (natlab.sh {})",
                    up.join(" ")
                );
                return Lab {
                    name,
                    watchdog: Some(watchdog),
                };
            }
            // Not ours to take down (it may be someone else's lab of the same name): stop the
            // watchdog without letting it run.
            let mut watchdog = watchdog;
            let _ = watchdog.kill();
            let _ = watchdog.wait();
            let stderr = String::from_utf8_lossy(&out.stderr);
            if stderr.contains("already exists") && attempt < 5 {
                attempt += 1;
                continue;
            }
            panic!(
                "natlab.sh {} failed ({}):\n{}{stderr}",
                up.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout)
            );
        }
    }

    /// The lab's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace of `host` (`a`, `b`, `rv`, ...).
    pub fn netns(&self, host: &str) -> String {
        format!("{}-{host}", self.name)
    }

    /// Starts `program ARGS...` in `host`'s namespace.
    pub fn spawn(&self, host: &str, tag: &str, program: &Path, args: &[String]) -> Proc {
        let netns = self.netns(host);
        let mut all = vec![
            "netns",
            "exec",
            netns.as_str(),
            program.to_str().expect("utf-8 path"),
        ];
        all.extend(args.iter().map(String::as_str));
        Proc::spawn(tag, Path::new("ip"), &all)
    }

    /// Starts `rendezvous serve` on `LAB-rv` at [`RV_LISTEN`], with RFC 5780 behaviour discovery
    /// on port 7001 and the second address 203.0.113.11 (so that peers can measure their NATs),
    /// and waits until it is ready.
    pub fn rendezvous(&self, data_dir: &Path) -> Rendezvous {
        let mut args = rendezvous_args(data_dir, RV_LISTEN);
        args.extend(crate::args![
            "--stun-alt-port",
            "7001",
            "--stun-alt-ip",
            "203.0.113.11"
        ]);
        Rendezvous::ready(self.spawn("rv", "rendezvous", &bin("rendezvous"), &args))
    }

    /// As [`Lab::rendezvous`], for a lab up with `--ipv6`: the rendezvous listens on one
    /// dual-stack socket ([`RV_LISTEN_DUAL`]), reachable at [`RV_LISTEN`] and [`RV_LISTEN6`];
    /// the returned [`Rendezvous::args`] name the IPv4 address.
    pub fn rendezvous_dual_stack(&self, data_dir: &Path) -> Rendezvous {
        let mut args = rendezvous_args(data_dir, RV_LISTEN_DUAL);
        args.extend(crate::args![
            "--stun-alt-port",
            "7001",
            "--stun-alt-ip",
            "203.0.113.11"
        ]);
        let mut rv = Rendezvous::ready(self.spawn("rv", "rendezvous", &bin("rendezvous"), &args));
        rv.addr = RV_LISTEN.parse().expect("RV_LISTEN is an address");
        rv
    }

    /// Starts `peer --config-dir CONFIG_DIR ARGS...` in `host`'s namespace.
    pub fn peer(&self, host: &str, tag: &str, config_dir: &Path, args: &[String]) -> Proc {
        self.spawn(host, tag, &bin("peer"), &peer_args(config_dir, args))
    }

    /// Starts `peer [EXTRA...] listen --server .. --server-key ..` in `host`'s namespace and
    /// returns it with its id once registered (within `timeout` for each step).
    pub fn listen(
        &self,
        host: &str,
        tag: &str,
        config_dir: &Path,
        rv: &Rendezvous,
        extra: &[String],
        timeout: Duration,
    ) -> (Proc, String) {
        let mut args = extra.to_vec();
        args.push("listen".into());
        args.extend(rv.args());
        let p = self.peer(host, tag, config_dir, &args);
        let id = wait_registered(&p, timeout);
        (p, id)
    }

    /// `natlab.sh status LAB`: topology, rulesets with live mappings, shim counters.
    pub fn status(&self) -> String {
        let out = natlab(&["status", &self.name]);
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }

    /// Namespaces of this lab that still exist.
    pub fn namespaces(&self) -> Vec<String> {
        lab_namespaces(&self.name)
    }

    /// Takes the lab down now and checks that none of its namespaces is left.
    pub fn down(mut self) {
        let left = self.take_down();
        assert!(left.is_empty(), "natlab.sh down left namespaces: {left:?}");
    }

    fn take_down(&mut self) -> Vec<String> {
        let out = natlab(&["down", &self.name]);
        if !out.status.success() {
            eprintln!(
                "[lab] natlab.sh down {} failed ({}): {}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
        self.namespaces()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.watchdog.is_none() {
            return; // already down
        }
        if std::thread::panicking() {
            eprintln!(
                "[lab] the test failed; lab {} was:\n{}",
                self.name,
                self.status()
            );
        }
        let left = self.take_down();
        if !left.is_empty() {
            eprintln!("[lab] natlab.sh down left namespaces: {left:?}");
        }
    }
}

/// The namespaces of lab `name` (`name-HOST`) that exist.
pub fn lab_namespaces(name: &str) -> Vec<String> {
    let prefix = format!("{name}-");
    std::fs::read_dir("/run/netns")
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits up to `timeout` for `p` to exit by itself; returns its exit code (`None` if killed by a
/// signal) after its output has been read to the end.
pub fn exit_code(p: &mut Proc, timeout: Duration) -> Option<i32> {
    let status = p.wait(timeout);
    // The readers see the end of the streams right after the exit.
    for out in [&p.stdout, &p.stderr] {
        out.wait_closed(Duration::from_secs(5));
    }
    status.code()
}
