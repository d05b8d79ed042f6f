//! Test support: build and start the real `rendezvous` and `peer` binaries, read their output
//! line by line with timeouts, and clean up (processes and directories) even when a test fails.
//!
//! [`lab`] runs the same binaries inside the network namespaces of `scripts/natlab.sh`;
//! [`attack`] has the attacks that the attack tests and the soak run against them.

pub mod attack;
pub mod lab;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Builds the binaries once per test process (a no-op when they are fresh).
pub fn ensure_built() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut command = Command::new(cargo);
        // Cargo sets these for the test process; a build script that watches one (ring watches
        // CARGO_MANIFEST_DIR) would otherwise be rerun, and everything above it rebuilt, here
        // and again by the next plain `cargo` command.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if key.starts_with("CARGO_PKG_")
                || key.starts_with("CARGO_MANIFEST_")
                || [
                    "CARGO_CRATE_NAME",
                    "CARGO_BIN_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                    "CARGO_RUSTC_CURRENT_DIR",
                    "OUT_DIR",
                ]
                .contains(&key.as_ref())
            {
                command.env_remove(key.as_ref());
            }
        }
        // The examples too: the echo test runs the library's examples as a newcomer would.
        command.args(["build", "--quiet", "--workspace", "--bins", "--examples"]);
        // The binaries of the test's own profile (a release test, such as the soak under
        // scripts/soak.sh, starts release binaries: see `bin`).
        let exe = std::env::current_exe().expect("current_exe");
        let profile = exe
            .parent()
            .and_then(Path::parent)
            .and_then(Path::file_name);
        if profile.is_some_and(|p| p == "release") {
            command.arg("--release");
        }
        let status = command
            .current_dir(workspace_root())
            .status()
            .expect("running cargo build");
        assert!(status.success(), "cargo build of the binaries failed");
    });
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// Path of a workspace example (`examples/NAME.rs` of a member) built like the binaries.
pub fn example(name: &str) -> PathBuf {
    bin("examples").join(name)
}

/// Path of a workspace binary in the same profile directory as this test.
pub fn bin(name: &str) -> PathBuf {
    ensure_built();
    // target/<profile>/deps/<test binary>
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    profile_dir.join(name)
}

/// A temporary directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates a fresh directory under the system temp dir.
    pub fn new(tag: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!(
            "p2p-{tag}-{}-{:x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&path).expect("creating temp dir");
        TempDir(path)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[derive(Default)]
struct Lines {
    lines: Vec<String>,
    /// When each line was read.
    times: Vec<Instant>,
    closed: bool,
}

/// Collected output of one stream of a child process.
#[derive(Clone, Default)]
pub struct Output(Arc<(Mutex<Lines>, Condvar)>);

impl Output {
    fn collect(self, reader: impl std::io::Read + Send + 'static, echo: String) -> Self {
        let out = self.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(reader).lines() {
                let Ok(line) = line else { break };
                eprintln!("[{echo}] {line}");
                let (lock, cvar) = &*out.0;
                let mut state = lock.lock().unwrap_or_else(|p| p.into_inner());
                state.lines.push(line);
                state.times.push(Instant::now());
                drop(state);
                cvar.notify_all();
            }
            let (lock, cvar) = &*out.0;
            lock.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
            cvar.notify_all();
        });
        self
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<String> {
        self.0 .0.lock().unwrap().lines.clone()
    }

    /// All text so far.
    pub fn text(&self) -> String {
        self.lines().join("\n")
    }

    /// Waits for a line containing `needle` (counting lines already seen), panicking after
    /// `timeout` with everything seen so far.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> String {
        self.wait_for_nth(needle, 1, timeout)
    }

    /// Waits until the stream is closed (everything the process wrote has been read), at most
    /// `timeout`; returns whether it is.
    pub fn wait_closed(&self, timeout: Duration) -> bool {
        let (lock, cvar) = &*self.0;
        let state = lock.lock().unwrap();
        let (state, _) = cvar
            .wait_timeout_while(state, timeout, |s| !s.closed)
            .unwrap();
        state.closed
    }

    /// Waits until `n` lines contain `needle`; returns the n-th.
    pub fn wait_for_nth(&self, needle: &str, n: usize, timeout: Duration) -> String {
        self.wait_for_nth_at(needle, n, timeout).0
    }

    /// As [`Output::wait_for`], also returning when the line was read.
    pub fn wait_for_at(&self, needle: &str, timeout: Duration) -> (String, Instant) {
        self.wait_for_nth_at(needle, 1, timeout)
    }

    fn wait_for_nth_at(&self, needle: &str, n: usize, timeout: Duration) -> (String, Instant) {
        self.try_wait_for_nth_at(needle, n, timeout)
            .unwrap_or_else(|closed| {
                panic!(
                    "no {n}th line containing {needle:?} (stream closed: {closed}); output was:\n{}",
                    self.text()
                )
            })
    }

    /// As [`Output::wait_for_at`], without panicking: `Err(closed)` when the stream closed or
    /// `timeout` passed first.
    pub fn try_wait_for_at(
        &self,
        needle: &str,
        timeout: Duration,
    ) -> Result<(String, Instant), bool> {
        self.try_wait_for_nth_at(needle, 1, timeout)
    }

    fn try_wait_for_nth_at(
        &self,
        needle: &str,
        n: usize,
        timeout: Duration,
    ) -> Result<(String, Instant), bool> {
        let deadline = Instant::now() + timeout;
        let (lock, cvar) = &*self.0;
        let mut state = lock.lock().unwrap();
        loop {
            let found: Vec<usize> = (0..state.lines.len())
                .filter(|&i| state.lines[i].contains(needle))
                .collect();
            if found.len() >= n {
                let i = found[n - 1];
                return Ok((state.lines[i].clone(), state.times[i]));
            }
            let now = Instant::now();
            if now >= deadline || state.closed {
                return Err(state.closed);
            }
            state = cvar.wait_timeout(state, deadline - now).unwrap().0;
        }
    }
}

/// A child process killed on drop.
pub struct Proc {
    child: Child,
    stdin: Option<ChildStdin>,
    tag: String,
    /// Its stdout.
    pub stdout: Output,
    /// Its stderr.
    pub stderr: Output,
}

impl Proc {
    /// Starts `program` with `args`; stdin is a pipe unless `stdin_null`.
    pub fn spawn(tag: &str, program: &Path, args: &[&str]) -> Proc {
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Tests wait for info lines; `P2P_TEST_LOG` adds more (a flake's diagnosis:
            // `P2P_TEST_LOG=info,peer::relay=debug`).
            .env(
                "RUST_LOG",
                std::env::var("P2P_TEST_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()));
        let stdout =
            Output::default().collect(child.stdout.take().expect("stdout"), tag.to_string());
        let stderr =
            Output::default().collect(child.stderr.take().expect("stderr"), format!("{tag}!"));
        let stdin = child.stdin.take();
        Proc {
            child,
            stdin,
            tag: tag.to_owned(),
            stdout,
            stderr,
        }
    }

    /// Waits up to `timeout` for a line of stdout containing `needle` and returns it with the
    /// time it was read; otherwise panics with what the process printed on both streams
    /// (including the error it exited with, if it did).
    pub fn wait_for_line(&self, needle: &str, timeout: Duration) -> (String, Instant) {
        self.stdout
            .try_wait_for_at(needle, timeout)
            .unwrap_or_else(|closed| {
                if closed {
                    // It exited: let the last of stderr (the error) arrive.
                    self.stderr.wait_closed(Duration::from_secs(2));
                }
                let stderr = self.stderr.lines();
                let tail = &stderr[stderr.len().saturating_sub(30)..];
                panic!(
                    "{} printed no line containing {needle:?} ({}); stdout:\n{}\n\
                     stderr (last {} lines):\n{}",
                    self.tag,
                    if closed { "it exited" } else { "timed out" },
                    self.stdout.text(),
                    tail.len(),
                    tail.join("\n")
                )
            })
    }

    /// The process id (to read /proc/<pid>/status, for instance).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it is still running (not exited, not reaped).
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Types a line.
    pub fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin is open");
        writeln!(stdin, "{line}").expect("writing to child stdin");
        stdin.flush().expect("flushing child stdin");
    }

    /// Closes stdin (EOF).
    pub fn close_stdin(&mut self) {
        self.stdin.take();
    }

    /// Waits for exit, panicking after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!(
                    "process did not exit within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                    self.stdout.text(),
                    self.stderr.text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, as in `kill -9`.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGSTOP: the process stops where it is (its sockets stay open, nothing is read or sent)
    /// until [`Proc::resume`]. For ordering what two processes do without timing either.
    /// Returns once every thread of the process is stopped: `kill` returns when the signal is
    /// queued, and a multi-threaded process stops only once one of its threads has taken the
    /// signal and stopped the others, which on a loaded machine can be milliseconds later, while
    /// the others keep running (a CI run saw a "stopped" listener answer a chat).
    pub fn pause(&self) {
        self.signal("-STOP");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.all_threads_stopped() {
            assert!(
                Instant::now() < deadline,
                "{} did not stop within 10 s of SIGSTOP",
                self.tag
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Whether every thread of the process is in the stopped state (`T`, or `t` when traced).
    fn all_threads_stopped(&self) -> bool {
        let Ok(threads) = std::fs::read_dir(format!("/proc/{}/task", self.child.id())) else {
            return false;
        };
        threads.flatten().all(|thread| {
            // "pid (comm) STATE ...": the state follows the last ')'. A thread that is gone
            // meanwhile runs nothing.
            std::fs::read_to_string(thread.path().join("stat")).map_or(true, |stat| {
                matches!(
                    stat.rsplit_once(')')
                        .and_then(|(_, rest)| rest.trim_start().chars().next()),
                    Some('T' | 't')
                )
            })
        })
    }

    /// SIGCONT after [`Proc::pause`].
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill {signal} {} failed", self.tag);
    }

    /// SIGTERM, then wait.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.wait(timeout)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running rendezvous server.
pub struct Rendezvous {
    /// The process.
    pub proc: Proc,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its key fingerprint.
    pub fingerprint: String,
}

impl Rendezvous {
    /// Starts `rendezvous serve` on `listen` with `data_dir` and waits for it to be ready.
    pub fn start(data_dir: &Path, listen: &str) -> Rendezvous {
        let args = rendezvous_args(data_dir, listen);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        Rendezvous::ready(Proc::spawn("rendezvous", &bin("rendezvous"), &refs))
    }

    /// Waits until a cluster node (`serve --cluster`) whose Redis came back after its first
    /// outage has written its peers again and subscribed to its introductions again.
    pub fn wait_cluster_registry_back(&self, timeout: Duration) {
        self.proc
            .stderr
            .wait_for("this node's peers written again", timeout);
        self.proc
            .stderr
            .wait_for_nth("subscribed to this node's introductions", 2, timeout);
    }

    /// Waits for an already started `rendezvous serve` (see [`rendezvous_args`]) to print its
    /// address and key fingerprint.
    pub fn ready(proc: Proc) -> Rendezvous {
        let line = proc
            .stdout
            .wait_for("listening on", Duration::from_secs(30));
        let addr = line
            .split_whitespace()
            .find_map(|w| w.parse().ok())
            .expect("address in the listening line");
        let key_line = proc.stdout.wait_for("server key", Duration::from_secs(5));
        let fingerprint = key_line
            .split_whitespace()
            .last()
            .expect("fingerprint")
            .to_owned();
        Rendezvous {
            proc,
            addr,
            fingerprint,
        }
    }

    /// `--server ADDR --server-key FP`.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--server".into(),
            self.addr.to_string(),
            "--server-key".into(),
            self.fingerprint.clone(),
        ]
    }
}

/// Arguments of `rendezvous serve --listen LISTEN --data-dir DATA_DIR`.
pub fn rendezvous_args(data_dir: &Path, listen: &str) -> Vec<String> {
    let dir = data_dir.to_str().expect("utf-8 path");
    crate::args!["serve", "--listen", listen, "--data-dir", dir]
}

/// Arguments of `peer --config-dir CONFIG_DIR ARGS...`.
pub fn peer_args(config_dir: &Path, args: &[String]) -> Vec<String> {
    let mut all = crate::args!["--config-dir", config_dir.to_str().expect("utf-8 path")];
    all.extend(args.iter().cloned());
    all
}

/// Starts `peer` with a config dir and arguments.
pub fn peer(tag: &str, config_dir: &Path, args: &[String]) -> Proc {
    let all = peer_args(config_dir, args);
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    Proc::spawn(tag, &bin("peer"), &refs)
}

/// Runs `peer ARGS` to completion and returns (status, stdout, stderr).
pub fn peer_run(
    config_dir: &Path,
    args: &[String],
    timeout: Duration,
) -> (ExitStatus, String, String) {
    let mut p = peer("peer-run", config_dir, args);
    p.close_stdin();
    let status = p.wait(timeout);
    // Let the reader threads drain.
    std::thread::sleep(Duration::from_millis(50));
    (status, p.stdout.text(), p.stderr.text())
}

/// Starts `peer listen` and returns it with its id once registered.
pub fn listen(tag: &str, config_dir: &Path, rv: &Rendezvous) -> (Proc, String) {
    let mut args = vec!["listen".to_owned()];
    args.extend(rv.args());
    let p = peer(tag, config_dir, &args);
    let id = wait_registered(&p, Duration::from_secs(20));
    (p, id)
}

/// `peer id` with a config dir (creating the identity there if needed).
pub fn peer_id_of(config_dir: &Path) -> String {
    let (status, out, err) = peer_run(config_dir, &crate::args!["id"], Duration::from_secs(20));
    assert!(status.success(), "{out}\n{err}");
    out.trim().to_owned()
}

/// Starts `peer listen EXTRA... --server ...` and returns it once registered.
pub fn listen_with(tag: &str, config_dir: &Path, rv: &Rendezvous, extra: &[String]) -> Proc {
    let mut all = crate::args!["listen"];
    all.extend(extra.iter().cloned());
    all.extend(rv.args());
    let p = peer(tag, config_dir, &all);
    wait_registered(&p, Duration::from_secs(20));
    p
}

/// Waits for a started `peer listen` to print its id and register; returns the id.
pub fn wait_registered(p: &Proc, timeout: Duration) -> String {
    let (line, _) = p.wait_for_line("peer id", timeout);
    let id = line.split_whitespace().last().expect("id").to_owned();
    p.wait_for_line("registered with", timeout);
    id
}

/// Builds a `Vec<String>` from string literals and strings.
#[macro_export]
macro_rules! args {
    ($($a:expr),* $(,)?) => { Vec::<String>::from([$($a.to_string()),*]) };
}

/// `GET /metrics` from `addr` (`IP:PORT`), as an operator's scraper would; the response, status
/// line and headers included. The metrics port limits new connections per source (5/s, burst
/// 20) and tests scrape often: a refused scrape (closed, reset or not `200`) is tried again,
/// for up to 30 s.
pub fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let attempt = (|| -> std::io::Result<String> {
            let mut http = std::net::TcpStream::connect(addr)?;
            http.set_read_timeout(Some(Duration::from_secs(10)))?;
            http.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")?;
            let mut text = String::new();
            http.read_to_string(&mut text)?;
            Ok(text)
        })();
        match attempt {
            Ok(text) if text.starts_with("HTTP/1.1 200") => return text,
            Ok(text) => assert!(Instant::now() < deadline, "scrape answered {text:?}"),
            Err(e) => assert!(Instant::now() < deadline, "scrape failed: {e}"),
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}
