//! The soak: the real `rendezvous` binary under legitimate load and every attack of
//! [`e2e::attack::soak_attacks`] at once, for `SOAK_SECONDS` (default 1800), with the server's
//! memory, open files and metrics sampled every 5 s. Ignored by default (`cargo test` and CI skip
//! it); `scripts/soak.sh` runs it against release binaries.
//!
//! Legitimate load, for the whole run:
//! - 300 registered idle raw clients (20 sources in 127.0.1.0/24, 15 each, so the per-source
//!   limits are not what is tested), each pinged on its control stream once a minute;
//! - two real `peer` processes in a chat, one line every 5 s in alternating directions, each
//!   line checked to arrive;
//! - a fresh `peer listen` (a new identity, from its own 127.0.2.x source) every 30 s, which must
//!   register within [`FRESH_DEADLINE`];
//! - a scrape of `/metrics` with every sample.
//!
//! The attacks run all at once rather than in rotation: the memory they cost then adds up to
//! its worst case, any interaction between them shows, and the load is the same through the
//! whole run, so a steady RSS growth in the second half can only be a leak (in a rotation,
//! each phase change would move RSS by itself).
//!
//! `SOAK_ATTACKS=name,name` runs only the attacks named (`none`: none), to tell which costs what.
//!
//! Output, in `SOAK_OUT` (default `target/soak`): `samples.csv` (time, RSS, fds, threads and the
//! main metrics, every 5 s), `metrics.csv` (every metrics sample, long format), `summary.md`.
//! The test fails unless every legitimate operation succeeded, peak RSS stayed under
//! [`PEAK_RSS_BOUND`], RSS grew less than [`GROWTH_TOLERANCE`] over the second half (least-
//! squares trend), and the server still answers at the end.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use certs::{Identity, ServerTrust};
use common::frame_io::{read_frame, write_frame};
use common::{ControlMessage, PROTOCOL_VERSION};
use e2e::attack::{self, RawClient, Running, Stop, Target};
use e2e::{args, Proc, Rendezvous, TempDir};

/// Idle raw clients: sources in 127.0.1.0/24, and clients per source (within the 20 new
/// identities a source may register at once).
const IDLE_SOURCES: u16 = 20;
const IDLE_PER_SOURCE: usize = 15;
/// How often each idle client pings.
const IDLE_PING_EVERY: Duration = Duration::from_secs(60);
/// How often a chat line is sent.
const CHAT_EVERY: Duration = Duration::from_secs(5);
/// How long a chat line may take to arrive.
const CHAT_DEADLINE: Duration = Duration::from_secs(20);
/// How often a fresh peer registers.
const FRESH_EVERY: Duration = Duration::from_secs(30);
/// How long a fresh peer may take from its start to its registration ("a few seconds"; the
/// margin is for a loaded 2-core machine: process start and identity generation included).
const FRESH_DEADLINE: Duration = Duration::from_secs(15);
/// How often the server is sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// Peak RSS the server may reach under the whole load.
const PEAK_RSS_BOUND: u64 = 256 << 20;
/// Most RSS growth over the second half of the run (least-squares trend over its samples).
const GROWTH_TOLERANCE: u64 = 16 << 20;

/// Metrics in `samples.csv` (each the sum over its labels).
const SAMPLED_METRICS: &[&str] = &[
    "rendezvous_registered_peers",
    "rendezvous_online_peers",
    "rendezvous_connections_refused_total",
    "rendezvous_handshake_timeouts_total",
    "rendezvous_quic_retries_total",
    "rendezvous_not_reading_disconnects_total",
    "rendezvous_registrations_total",
    "rendezvous_registrations_refused_total",
    "rendezvous_error_replies_total",
    "rendezvous_stun_requests_total",
    "rendezvous_tcp_tunnels_open",
    "rendezvous_tcp_tunnel_handshakes_failed_total",
    "rendezvous_tcp_tunnels_refused_total",
    "rendezvous_metrics_connections_dropped_total",
    "rendezvous_relay_packets_total",
    "rendezvous_relay_bytes_total",
    "rendezvous_relay_dropped_packets_total",
    "rendezvous_relay_held_packets",
    "rendezvous_relay_sessions_total",
];

/// Attempts, successes and latencies of one kind of legitimate operation.
#[derive(Default)]
struct OpStats {
    attempted: u64,
    succeeded: u64,
    latencies: Vec<Duration>,
    failures: Vec<String>,
}

/// Every legitimate operation, by kind; shared by the load's threads and tasks.
#[derive(Clone, Default)]
struct Ops(Arc<Mutex<BTreeMap<&'static str, OpStats>>>);

impl Ops {
    fn record(&self, kind: &'static str, outcome: Result<Duration, String>) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let stats = map.entry(kind).or_default();
        stats.attempted += 1;
        match outcome {
            Ok(latency) => {
                stats.succeeded += 1;
                stats.latencies.push(latency);
            }
            Err(why) => {
                eprintln!("soak: legitimate {kind} failed: {why}");
                if stats.failures.len() < 5 {
                    stats.failures.push(why);
                }
            }
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// /proc/<pid>/status field in kB (VmRSS, VmHWM) or count (Threads).
fn status_field(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

fn open_fds(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// `GET /metrics` from 127.0.0.1, answered with 200 within 10 s.
fn scrape(addr: SocketAddr) -> Result<String, String> {
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: rendezvous\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut text = String::new();
    stream
        .read_to_string(&mut text)
        .map_err(|e| format!("read: {e}"))?;
    if !text.starts_with("HTTP/1.1 200") || !text.contains("rendezvous_registered_peers ") {
        return Err(format!(
            "bad answer: {}",
            text.lines().next().unwrap_or_default()
        ));
    }
    Ok(text)
}

/// Every (series, value) of a scrape.
fn series(text: &str) -> Vec<(String, f64)> {
    let body = text.split("\r\n\r\n").nth(1).unwrap_or(text);
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

/// The sum over labels of `name` in `all`.
fn metric_sum(all: &[(String, f64)], name: &str) -> f64 {
    all.iter()
        .filter(|(series, _)| {
            series == name
                || series
                    .strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with('{'))
        })
        .map(|(_, v)| v)
        .sum()
}

/// The address in the server's stdout line containing `needle`.
fn address_in(rv: &Rendezvous, needle: &str) -> SocketAddr {
    let line = rv.proc.stdout.wait_for(needle, Duration::from_secs(30));
    line.split(|c: char| c.is_whitespace() || c == '/')
        .find_map(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("an address in {line:?}"))
}

/// `--server ADDR --server-key FP` and the tunnel, for the peer program.
#[derive(Clone)]
struct ServerArgs {
    args: Vec<String>,
}

/// Two real peers in a chat, a line every [`CHAT_EVERY`] in alternating directions, until
/// `stop`; each line is a `chat` operation.
fn chat(dir: PathBuf, server: ServerArgs, stop: Stop, ops: Ops) {
    let mut listen_args = args!["listen"];
    listen_args.extend(server.args.iter().cloned());
    let mut a = e2e::peer("chat-a", &dir.join("a"), &listen_args);
    let started = Instant::now();
    let a_id = e2e::wait_registered(&a, Duration::from_secs(30));
    ops.record("chat_setup", Ok(started.elapsed()));
    let mut connect_args = args!["connect", a_id];
    connect_args.extend(server.args.iter().cloned());
    let mut b = e2e::peer("chat-b", &dir.join("b"), &connect_args);
    b.wait_for_line(&format!("connected to {a_id}"), Duration::from_secs(30));
    a.wait_for_line("connected: ", Duration::from_secs(30));
    let mut n = 0u64;
    while sleep_unless(&stop, CHAT_EVERY) {
        n += 1;
        let line = format!("soak-chat-{n}-end");
        let (sender, receiver) = if n.is_multiple_of(2) {
            (&mut a, &b)
        } else {
            (&mut b, &a)
        };
        let sent = Instant::now();
        sender.send_line(&line);
        let outcome = receiver
            .stdout
            .try_wait_for_at(&line, CHAT_DEADLINE)
            .map(|(_, at)| at.saturating_duration_since(sent))
            .map_err(|closed| {
                format!("line {n} did not arrive (receiver's output closed: {closed})")
            });
        ops.record("chat", outcome);
    }
    b.close_stdin();
    let _ = b.wait(Duration::from_secs(10));
}

/// Sleeps `duration` unless `stop` comes first; false when stopped.
fn sleep_unless(stop: &Stop, duration: Duration) -> bool {
    let deadline = Instant::now() + duration;
    while !stop.stopped() {
        let now = Instant::now();
        if now >= deadline {
            return true;
        }
        std::thread::sleep((deadline - now).min(Duration::from_millis(100)));
    }
    false
}

/// A fresh `peer listen` from source 127.0.2.(k+1): its registration is a `fresh_register`
/// operation (from its start to its "registered with" line).
fn fresh_peer(dir: &Path, k: u64, server: &ServerArgs, ops: &Ops, kind: &'static str) {
    let bind = SocketAddr::from((Ipv4Addr::new(127, 0, 2, (k % 250) as u8 + 1), 0));
    let mut argv = args!["listen", "--bind", bind];
    argv.extend(server.args.iter().cloned());
    let config = dir.join(format!("fresh-{k}"));
    let started = Instant::now();
    let mut p = e2e::peer(&format!("fresh-{k}"), &config, &argv);
    let outcome = match p.stdout.try_wait_for_at("registered with", FRESH_DEADLINE) {
        Ok((line, at)) if !line.contains("TCP tunnel") => Ok(at.saturating_duration_since(started)),
        Ok((line, _)) => Err(format!("registered only through the tunnel: {line}")),
        Err(closed) => {
            let stderr = p.stderr.lines();
            Err(format!(
                "not registered within {FRESH_DEADLINE:?} (exited: {closed}); stderr tail: {}",
                stderr[stderr.len().saturating_sub(5)..].join(" | ")
            ))
        }
    };
    ops.record(kind, outcome);
    let _ = p.terminate(Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(&config);
}

/// Registers the idle raw clients (each an `idle_register` operation).
async fn register_idle(target: &Target, ops: &Ops) -> Vec<RawClient> {
    let mut tasks = tokio::task::JoinSet::new();
    for s in 1..=IDLE_SOURCES {
        let (target, ops) = (target.clone(), ops.clone());
        tasks.spawn(async move {
            let mut clients = Vec::new();
            let endpoint = match attack::endpoint_on(attack::block_ip(0, 256 + s)) {
                Ok(endpoint) => endpoint,
                Err(e) => {
                    for _ in 0..IDLE_PER_SOURCE {
                        ops.record("idle_register", Err(e.clone()));
                    }
                    return clients;
                }
            };
            for _ in 0..IDLE_PER_SOURCE {
                let started = Instant::now();
                let outcome = match Identity::generate() {
                    Err(e) => Err(e.to_string()),
                    Ok(identity) => RawClient::register(
                        &endpoint,
                        &identity,
                        target.udp,
                        ServerTrust::Pinned(target.fingerprint),
                        PROTOCOL_VERSION,
                    )
                    .await
                    .and_then(|r| r.map_err(|refusal| format!("refused: {refusal:?}"))),
                };
                match outcome {
                    Ok(client) => {
                        ops.record("idle_register", Ok(started.elapsed()));
                        clients.push(client);
                    }
                    Err(e) => ops.record("idle_register", Err(e)),
                }
            }
            clients
        });
    }
    let mut all = Vec::new();
    while let Some(clients) = tasks.join_next().await {
        all.extend(clients.unwrap_or_default());
    }
    all
}

/// Pings every idle client on its control stream (each an `idle_ping` operation).
async fn ping_all(clients: &mut [RawClient], seq: &mut u64, ops: &Ops, kind: &'static str) {
    for client in clients.iter_mut() {
        *seq += 1;
        let started = Instant::now();
        let (tx, rx) = &mut client.control;
        let exchange = async {
            write_frame(tx, &ControlMessage::Ping { seq: *seq }.encode())
                .await
                .map_err(|e| format!("write: {e}"))?;
            // Anything else the server pushes on the control stream is skipped.
            for _ in 0..8 {
                let frame = read_frame(rx)
                    .await
                    .map_err(|e| format!("read: {e}"))?
                    .ok_or("control stream closed")?;
                if let Ok(ControlMessage::Pong { seq: got }) = ControlMessage::decode(&frame) {
                    if got == *seq {
                        return Ok(());
                    }
                }
            }
            Err("no pong among 8 frames".to_owned())
        };
        let outcome = match tokio::time::timeout(Duration::from_secs(10), exchange).await {
            Ok(Ok(())) => Ok(started.elapsed()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err("no pong within 10 s".into()),
        };
        ops.record(kind, outcome);
    }
}

/// One sample of the server.
struct Sample {
    t: f64,
    rss_kib: u64,
    fds: u64,
}

#[test]
#[ignore = "the soak runs for 30 minutes: scripts/soak.sh (SOAK_SECONDS to shorten it)"]
fn soak_legitimate_load_with_every_attack_at_once() {
    let seconds: u64 = std::env::var("SOAK_SECONDS")
        .ok()
        .map(|s| s.parse().expect("SOAK_SECONDS is a number of seconds"))
        .unwrap_or(1800);
    let out_dir = std::env::var_os("SOAK_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| e2e::workspace_root().join("target/soak"));
    std::fs::create_dir_all(&out_dir).expect("creating SOAK_OUT");
    let duration = Duration::from_secs(seconds);

    let dir = TempDir::new("soak");
    let mut argv = e2e::rendezvous_args(&dir.path().join("rv"), "127.0.0.1:0");
    argv.extend(args![
        "--tcp-listen",
        "127.0.0.1:0",
        "--metrics",
        "127.0.0.1:0"
    ]);
    let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
    let mut rv = Rendezvous::ready(Proc::spawn("rendezvous", &e2e::bin("rendezvous"), &refs));
    let tunnel = address_in(&rv, "tcp tunnel listening on");
    let metrics = address_in(&rv, "metrics on http://");
    let pid = rv.proc.pid();
    let target = Target {
        udp: rv.addr,
        fingerprint: rv.fingerprint.parse().expect("server key fingerprint"),
        tunnel: Some(tunnel),
        metrics: Some(metrics),
    };
    let mut server_args = rv.args();
    server_args.extend(args!["--server-tcp", tunnel]);
    let server = ServerArgs { args: server_args };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let ops = Ops::default();
    let rss_before = status_field(pid, "VmRSS").unwrap_or(0);

    // Legitimate load first, then the attacks.
    let mut idle = runtime.block_on(register_idle(&target, &ops));
    eprintln!("soak: {} idle clients registered", idle.len());
    let stop_load = Stop::new();
    let idle_task = runtime.spawn({
        let (stop, ops) = (stop_load.clone(), ops.clone());
        async move {
            let mut seq = 0;
            while stop.sleep(IDLE_PING_EVERY).await {
                ping_all(&mut idle, &mut seq, &ops, "idle_ping").await;
            }
            // The server still answers every idle client at the end.
            ping_all(&mut idle, &mut seq, &ops, "final_idle_ping").await;
            for client in &idle {
                client.conn.close(0u32.into(), b"soak done");
            }
        }
    });
    let chat_thread = std::thread::spawn({
        let (dir, server, stop, ops) = (
            dir.path().join("chat"),
            server.clone(),
            stop_load.clone(),
            ops.clone(),
        );
        move || chat(dir, server, stop, ops)
    });
    let fresh_thread = std::thread::spawn({
        let (dir, server, stop, ops) = (
            dir.path().to_owned(),
            server.clone(),
            stop_load.clone(),
            ops.clone(),
        );
        move || {
            let mut k = 0;
            while sleep_unless(&stop, FRESH_EVERY) {
                fresh_peer(&dir, k, &server, &ops, "fresh_register");
                k += 1;
            }
            k
        }
    });
    // SOAK_ATTACKS=name,name runs only those ("none": none), to tell which attack costs what.
    let only = std::env::var("SOAK_ATTACKS").ok();
    let attacks: Vec<attack::Attack> = attack::soak_attacks()
        .into_iter()
        .filter(|a| {
            only.as_deref()
                .is_none_or(|only| only.split(',').any(|n| n == a.name))
        })
        .collect();
    let running: Vec<Running> = attacks
        .iter()
        .map(|a| Running::start(runtime.handle(), a, &target))
        .collect();

    // Sample until the end.
    let mut samples_csv = std::io::BufWriter::new(
        std::fs::File::create(out_dir.join("samples.csv")).expect("samples.csv"),
    );
    let mut metrics_csv = std::io::BufWriter::new(
        std::fs::File::create(out_dir.join("metrics.csv")).expect("metrics.csv"),
    );
    write!(samples_csv, "t_s,rss_kib,fds,threads,scrape_ms").unwrap();
    for name in SAMPLED_METRICS {
        write!(samples_csv, ",{name}").unwrap();
    }
    writeln!(samples_csv).unwrap();
    writeln!(metrics_csv, "t_s,series,value").unwrap();
    let started = Instant::now();
    let mut samples: Vec<Sample> = Vec::new();
    let mut server_died = false;
    let mut last_scrape = Vec::new();
    loop {
        let t = started.elapsed().as_secs_f64();
        if !rv.proc.running() {
            server_died = true;
            break;
        }
        let rss_kib = status_field(pid, "VmRSS").unwrap_or(0);
        let fds = open_fds(pid).unwrap_or(0);
        let threads = status_field(pid, "Threads").unwrap_or(0);
        let scrape_start = Instant::now();
        let scraped = scrape(metrics);
        let scrape_ms = scrape_start.elapsed().as_secs_f64() * 1e3;
        let all = match scraped {
            Ok(text) => {
                ops.record("scrape", Ok(scrape_start.elapsed()));
                series(&text)
            }
            Err(e) => {
                ops.record("scrape", Err(e));
                Vec::new()
            }
        };
        write!(
            samples_csv,
            "{t:.1},{rss_kib},{fds},{threads},{scrape_ms:.1}"
        )
        .unwrap();
        for name in SAMPLED_METRICS {
            write!(samples_csv, ",{}", metric_sum(&all, name)).unwrap();
        }
        writeln!(samples_csv).unwrap();
        samples_csv.flush().unwrap();
        for (name, value) in &all {
            // Labels hold commas: quote the series.
            writeln!(
                metrics_csv,
                "{t:.1},\"{}\",{value}",
                name.replace('"', "\"\"")
            )
            .unwrap();
        }
        metrics_csv.flush().unwrap();
        if !all.is_empty() {
            last_scrape = all;
        }
        samples.push(Sample { t, rss_kib, fds });
        let next = started + SAMPLE_EVERY.mul_f64(samples.len() as f64);
        if next >= started + duration {
            break;
        }
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    let elapsed = started.elapsed();

    // Stop the attacks, then the load; the server must still answer.
    let reports: Vec<(&'static str, Vec<(&'static str, u64)>)> = runtime.block_on(async {
        let mut reports = Vec::new();
        for r in running {
            let name = r.name;
            reports.push((name, r.finish().await));
        }
        reports
    });
    stop_load.stop();
    let chat_ok = chat_thread.join().is_ok();
    let fresh_count = fresh_thread.join().unwrap_or(0);
    if !server_died {
        fresh_peer(dir.path(), 10_000, &server, &ops, "final_fresh_register");
        let scrape_start = Instant::now();
        ops.record(
            "final_scrape",
            scrape(metrics).map(|_| scrape_start.elapsed()),
        );
    }
    let _ = runtime.block_on(idle_task);
    runtime.shutdown_timeout(Duration::from_secs(10));
    let hwm_kib = status_field(pid, "VmHWM").unwrap_or(0);
    let final_kib = status_field(pid, "VmRSS").unwrap_or(0);
    server_died |= !rv.proc.running();

    // RSS: peak, and the least-squares trend over the second half.
    let peak_kib = samples
        .iter()
        .map(|s| s.rss_kib)
        .max()
        .unwrap_or(0)
        .max(hwm_kib);
    let half = elapsed.as_secs_f64() / 2.0;
    let second: Vec<&Sample> = samples.iter().filter(|s| s.t >= half).collect();
    let slope_kib_per_s = if second.len() >= 2 {
        let n = second.len() as f64;
        let mean_t = second.iter().map(|s| s.t).sum::<f64>() / n;
        let mean_r = second.iter().map(|s| s.rss_kib as f64).sum::<f64>() / n;
        let cov: f64 = second
            .iter()
            .map(|s| (s.t - mean_t) * (s.rss_kib as f64 - mean_r))
            .sum();
        let var: f64 = second.iter().map(|s| (s.t - mean_t).powi(2)).sum();
        if var > 0.0 {
            cov / var
        } else {
            0.0
        }
    } else {
        0.0
    };
    let span = second.last().map_or(0.0, |l| l.t) - second.first().map_or(0.0, |f| f.t);
    let trend_growth_kib = slope_kib_per_s * span;
    let second_min = second.iter().map(|s| s.rss_kib).min().unwrap_or(0);
    let second_max = second.iter().map(|s| s.rss_kib).max().unwrap_or(0);

    // The summary.
    let ops_map = ops.0.lock().unwrap_or_else(|p| p.into_inner());
    let mut md = String::new();
    let mib = |kib: u64| kib as f64 / 1024.0;
    md += "# Rendezvous soak\n\n";
    md += &format!(
        "Duration {:.0} s (asked {seconds} s); {} samples every {} s; server pid {pid}.\n\n",
        elapsed.as_secs_f64(),
        samples.len(),
        SAMPLE_EVERY.as_secs()
    );
    md += "## Server memory\n\n";
    md += &format!("- RSS before the load: {:.1} MiB\n", mib(rss_before));
    md += &format!(
        "- RSS at the first sample (load and attacks started): {:.1} MiB\n",
        mib(samples.first().map_or(0, |s| s.rss_kib))
    );
    md += &format!(
        "- Peak RSS: {:.1} MiB (VmHWM {:.1} MiB; bound {} MiB)\n",
        mib(peak_kib),
        mib(hwm_kib),
        PEAK_RSS_BOUND >> 20
    );
    md += &format!(
        "- RSS at the end of the run: {:.1} MiB; after the attacks and load stopped: {:.1} MiB\n",
        mib(samples.last().map_or(0, |s| s.rss_kib)),
        mib(final_kib)
    );
    md += &format!(
        "- Second half ({} samples over {span:.0} s): min {:.1} MiB, max {:.1} MiB, trend \
         {slope_kib_per_s:+.2} KiB/s = {:+.2} MiB over the half (tolerance {} MiB)\n",
        second.len(),
        mib(second_min),
        mib(second_max),
        trend_growth_kib / 1024.0,
        GROWTH_TOLERANCE >> 20
    );
    md += &format!(
        "- Open fds: first sample {}, most {}, last sample {}\n",
        samples.first().map_or(0, |s| s.fds),
        samples.iter().map(|s| s.fds).max().unwrap_or(0),
        samples.last().map_or(0, |s| s.fds)
    );
    md += &format!(
        "- Server still running at the end: {}\n\n",
        if server_died { "NO" } else { "yes" }
    );
    md += "## Legitimate operations\n\n";
    md += "| operation | attempted | succeeded | p50 ms | p90 ms | p99 ms | max ms |\n";
    md += "|---|---:|---:|---:|---:|---:|---:|\n";
    let mut all_ok = true;
    for (kind, stats) in ops_map.iter() {
        let mut lat = stats.latencies.clone();
        lat.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        md += &format!(
            "| {kind} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} |\n",
            stats.attempted,
            stats.succeeded,
            ms(percentile(&lat, 0.5)),
            ms(percentile(&lat, 0.9)),
            ms(percentile(&lat, 0.99)),
            ms(lat.last().copied().unwrap_or_default())
        );
        all_ok &= stats.attempted == stats.succeeded;
    }
    for (kind, stats) in ops_map.iter() {
        for failure in &stats.failures {
            md += &format!("\n- {kind} failed: {failure}");
        }
    }
    md += &format!(
        "\n\n{} fresh peers registered during the run; the chat thread {}.\n\n",
        fresh_count,
        if chat_ok {
            "ended normally"
        } else {
            "PANICKED"
        }
    );
    md += "## Attacks (all at once, for the whole run)\n\n";
    for (attack, (name, counters)) in attacks.iter().zip(&reports) {
        let list: Vec<String> = counters.iter().map(|(k, v)| format!("{k} {v}")).collect();
        md += &format!(
            "- **{name}**: {}. Counters: {}\n",
            attack.what,
            list.join(", ")
        );
    }
    md += "\n## Server metrics at the last sample\n\n```\n";
    for name in SAMPLED_METRICS {
        md += &format!("{name} {}\n", metric_sum(&last_scrape, name));
    }
    md += "```\n";
    drop(ops_map);
    std::fs::write(out_dir.join("summary.md"), &md).expect("summary.md");
    eprintln!("\n{md}\nsoak: results in {}", out_dir.display());

    assert!(!server_died, "the server exited during the soak");
    assert!(chat_ok, "the chat thread panicked (its setup failed)");
    assert!(
        all_ok,
        "a legitimate operation failed: see {}",
        out_dir.display()
    );
    assert!(
        peak_kib * 1024 < PEAK_RSS_BOUND,
        "peak RSS {} MiB over the bound",
        peak_kib / 1024
    );
    assert!(
        trend_growth_kib * 1024.0 < GROWTH_TOLERANCE as f64,
        "RSS grew {:.1} MiB over the second half",
        trend_growth_kib / 1024.0
    );
    assert!(
        samples.len() as u64 >= seconds / SAMPLE_EVERY.as_secs() / 2,
        "too few samples"
    );
}
