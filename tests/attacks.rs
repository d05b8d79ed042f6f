//! Attacks on the real `rendezvous` binary from loopback (issue 11, items 1 and 3): what they
//! cost the server (resident memory read from /proc/<pid>/status, bytes it sends back) is
//! asserted against the documented bounds, and a legitimate peer keeps working meanwhile.
//!
//! The two tests run one at a time (they measure one server's memory and both load the
//! machine). `ATTACKS_RENDEZVOUS_BIN=/path/to/rendezvous` runs them against another build, to
//! measure a server without the defences (the numbers are printed before the assertions).

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::frame_io::write_frame;
use common::{ControlMessage, PROTOCOL_VERSION};
use e2e::attack::{client_crypto, make_initials, never_reading_client, Ended};
use e2e::{args, listen, peer, rendezvous_args, Proc, Rendezvous, TempDir};

const T: Duration = Duration::from_secs(30);

/// The tests measure one server's memory each: never two at once.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn start_rendezvous(dir: &std::path::Path) -> Rendezvous {
    let program = std::env::var_os("ATTACKS_RENDEZVOUS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| e2e::bin("rendezvous"));
    let args = rendezvous_args(dir, "127.0.0.1:0");
    let mut refs: Vec<&str> = args.iter().map(String::as_str).collect();
    refs.extend(["--tcp-listen", "off", "--metrics", "127.0.0.1:0"]);
    Rendezvous::ready(Proc::spawn("rendezvous", &program, &refs))
}

/// The server's connection counters from its metrics page, for the test's report.
fn connection_counters(rv: &Rendezvous) -> String {
    use std::io::{Read, Write};
    let line = rv.proc.stdout.wait_for("metrics on", T);
    let Some(addr) = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("http://"))
        .and_then(|w| w.strip_suffix("/metrics"))
    else {
        return String::new();
    };
    let Ok(mut stream) = std::net::TcpStream::connect(addr) else {
        return String::new();
    };
    let _ = stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    text.lines()
        .filter(|l| {
            !l.starts_with('#')
                && (l.contains("retries")
                    || l.contains("refused")
                    || l.contains("handshake")
                    || l.contains("not_reading"))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Resident memory of a process, bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Samples a process's resident memory every 20 ms and keeps the highest.
struct PeakRss {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PeakRss {
    fn start(pid: u32) -> PeakRss {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(rss(pid)));
        let thread = {
            let (stop, peak) = (stop.clone(), peak.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(rss(pid), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        PeakRss {
            stop,
            peak,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for PeakRss {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The close code of a peer disconnected for not reading (`rendezvous::CLOSE_NOT_READING`).
const CLOSE_NOT_READING: u64 = 3;

const MIB: u64 = 1024 * 1024;

/// Clients that never read.
const NON_READERS: usize = 50;
/// What one of them may cost the server, at most: the documented per-connection budget
/// (`rendezvous::Limits`, about 350 KiB) with room for the allocator's slack.
const PER_NON_READER_BOUND: u64 = 768 * 1024;

#[test]
fn clients_that_never_read_cost_little_and_are_disconnected_while_peers_chat() {
    let _serial = serial();
    let dir = TempDir::new("noread");
    let rv = start_rendezvous(&dir.path().join("rv"));
    let pid = rv.proc.pid();
    let rt = runtime();

    // A legitimate peer is online before the attack; another connects to it during the attack.
    let (mut a, a_id) = listen("a", &dir.path().join("a"), &rv);
    let baseline = rss(pid);
    let peak = PeakRss::start(pid);
    let ready = Arc::new(tokio::sync::Barrier::new(NON_READERS));
    let started = Instant::now();
    let clients: Vec<_> = (0..NON_READERS)
        .map(|i| {
            // Ten clients per source address: the per-source caps are not what saves us here.
            let bind = SocketAddr::from((Ipv4Addr::new(127, 0, 1, 1 + (i / 10) as u8), 0));
            rt.spawn(never_reading_client(rv.addr, bind, Some(ready.clone())))
        })
        .collect();

    let mut connect = args!["connect", a_id];
    connect.extend(rv.args());
    let mut b = peer("b", &dir.path().join("b"), &connect);
    b.stdout.wait_for(&format!("connected to {a_id}"), T);
    b.send_line("hello during the attack");
    a.stdout.wait_for("hello during the attack", T);
    a.send_line("answer during the attack");
    b.stdout.wait_for("answer during the attack", T);

    let ended: Vec<Ended> = rt.block_on(async {
        let mut ended = Vec::new();
        let deadline = tokio::time::Instant::now() + T;
        for client in clients {
            ended.push(match tokio::time::timeout_at(deadline, client).await {
                Ok(Ok(e)) => e,
                Ok(Err(e)) => Ended::Other(format!("task: {e}")),
                Err(_) => Ended::Other("still connected after 30 s".into()),
            });
        }
        ended
    });
    let elapsed = started.elapsed();
    eprintln!("server counters: {}", connection_counters(&rv));
    let peak = peak.finish();
    let growth = peak.saturating_sub(baseline);
    let per_client = growth / NON_READERS as u64;
    let not_reading = ended
        .iter()
        .filter(|e| matches!(e, Ended::ClosedByServer(CLOSE_NOT_READING)))
        .count();
    eprintln!(
        "never-reading clients: {NON_READERS}, server RSS {:.1} MiB before, peak {:.1} MiB, \
         growth {:.1} MiB = {} KiB per client; {not_reading} disconnected for not reading, \
         all ended after {:.1} s",
        baseline as f64 / MIB as f64,
        peak as f64 / MIB as f64,
        growth as f64 / MIB as f64,
        per_client / 1024,
        elapsed.as_secs_f64(),
    );

    // The legitimate pair still works after the attack.
    b.send_line("hello after the attack");
    a.stdout.wait_for("hello after the attack", T);

    assert!(
        per_client < PER_NON_READER_BOUND,
        "each never-reading client cost the server {per_client} bytes (bound \
         {PER_NON_READER_BOUND})"
    );
    for (i, e) in ended.iter().enumerate() {
        match e {
            Ended::ClosedByServer(CLOSE_NOT_READING) => {}
            Ended::ClosedByServer(code) => panic!("client {i} was closed with code {code}"),
            Ended::Other(how) => panic!("client {i} was not disconnected for not reading: {how}"),
        }
    }
    b.close_stdin();
    assert!(b.wait(T).success());
    assert!(a.terminate(T).success());
}

/// Source addresses of the flood (127.0.10.1 ... 127.0.11.128).
const FLOOD_SOURCES: usize = 256;
/// Initials per second, and for how long.
const FLOOD_RATE: usize = 2000;
const FLOOD_SECS: usize = 10;

#[test]
fn an_initial_flood_from_many_sources_is_cheap_and_a_peer_still_registers() {
    let _serial = serial();
    let dir = TempDir::new("flood");
    let rv = start_rendezvous(&dir.path().join("rv"));
    let pid = rv.proc.pid();
    let total = FLOOD_RATE * FLOOD_SECS;
    let initials = make_initials(rv.addr, total).expect("QUIC Initials");
    let sources: Arc<Vec<UdpSocket>> = Arc::new(
        (0..FLOOD_SOURCES)
            .map(|i| {
                let ip = Ipv4Addr::new(127, 0, 10 + (i / 128) as u8, 1 + (i % 128) as u8);
                let socket = UdpSocket::bind((ip, 0)).expect("binding a flood source");
                socket.set_nonblocking(true).expect("non-blocking");
                socket
            })
            .collect(),
    );

    let baseline = rss(pid);
    let peak = PeakRss::start(pid);
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let received = Arc::new(AtomicU64::new(0));
    // What the server sends to the flood's addresses, counted until the end.
    let receiver = {
        let (sources, stop, received) = (sources.clone(), stop.clone(), received.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                let mut any = false;
                for socket in sources.iter() {
                    while let Ok(n) = socket.recv(&mut buf) {
                        received.fetch_add(n as u64, Ordering::Relaxed);
                        any = true;
                    }
                }
                if !any {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        })
    };
    let flood = {
        let (sources, sent, server) = (sources.clone(), sent.clone(), rv.addr);
        std::thread::spawn(move || {
            // Paced in 10 ms ticks; the pace only shapes the load, no assertion depends on it.
            let start = Instant::now();
            let per_tick = FLOOD_RATE / 100;
            for (tick, batch) in initials.chunks(per_tick).enumerate() {
                for (k, initial) in batch.iter().enumerate() {
                    let socket = &sources[(tick * per_tick + k) % FLOOD_SOURCES];
                    if socket.send_to(initial, server).is_ok() {
                        sent.fetch_add(initial.len() as u64, Ordering::Relaxed);
                    }
                }
                let next = start + Duration::from_millis(10 * (tick as u64 + 1));
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
        })
    };

    // Three seconds into the flood, a legitimate peer registers.
    let deadline = Instant::now() + T;
    while sent.load(Ordering::Relaxed) < (3 * FLOOD_RATE * 1200) as u64 {
        assert!(Instant::now() < deadline, "the flood did not get going");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut args = vec!["listen".to_owned()];
    args.extend(rv.args());
    let spawned = Instant::now();
    let mut legit = peer("legit", &dir.path().join("legit"), &args);
    let (_, registered_at) = legit.wait_for_line("registered with", T);
    let took = registered_at.duration_since(spawned);
    let flood_running = !flood.is_finished();

    flood.join().expect("flood thread");
    // Late retransmissions of the half-open handshakes still count.
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    receiver.join().expect("receiver thread");
    let peak = peak.finish();
    eprintln!("server counters: {}", connection_counters(&rv));
    let growth = peak.saturating_sub(baseline);
    let (sent, received) = (
        sent.load(Ordering::Relaxed),
        received.load(Ordering::Relaxed),
    );
    let amplification = received as f64 / sent.max(1) as f64;
    eprintln!(
        "Initial flood: {total} Initials from {FLOOD_SOURCES} sources in {FLOOD_SECS} s, \
         {:.1} MB sent, {:.1} MB back (amplification {amplification:.2}); server RSS {:.1} MiB \
         before, peak {:.1} MiB, growth {:.1} MiB; legitimate peer registered in {:.2} s \
         (flood still running: {flood_running})",
        sent as f64 / 1e6,
        received as f64 / 1e6,
        baseline as f64 / MIB as f64,
        peak as f64 / MIB as f64,
        growth as f64 / MIB as f64,
        took.as_secs_f64()
    );
    assert!(
        took < Duration::from_secs(3),
        "the legitimate peer took {took:?} to register during the flood"
    );
    assert!(
        growth < 128 * MIB,
        "the flood grew the server by {growth} bytes"
    );
    assert!(
        amplification <= 3.0,
        "the server sent {received} bytes for {sent} (amplification {amplification:.2})"
    );
    assert!(legit.terminate(T).success());
}

/// A client that connects from `bind` and registers (it reads its replies); returns its
/// connection, or how the connection attempt failed.
async fn registered_client(
    server: SocketAddr,
    bind: SocketAddr,
) -> Result<
    (
        quinn::Endpoint,
        quinn::Connection,
        quinn::SendStream,
        quinn::RecvStream,
    ),
    String,
> {
    let mut config = quinn::ClientConfig::new(client_crypto()?);
    config.transport_config(Arc::new(quinn::TransportConfig::default()));
    let endpoint = quinn::Endpoint::client(bind).map_err(|e| format!("bind {bind}: {e}"))?;
    let conn = endpoint
        .connect_with(config, server, peer::register::RENDEZVOUS_SERVER_NAME)
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    let (mut tx, mut rx) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let register = ControlMessage::Register {
        version: PROTOCOL_VERSION,
        local_addrs: Vec::new(),
        mapped_port: None,
    };
    write_frame(&mut tx, &register.encode())
        .await
        .map_err(|e| e.to_string())?;
    let reply = tokio::time::timeout(T, common::frame_io::read_frame(&mut rx))
        .await
        .map_err(|_| "no reply to register".to_owned())?
        .map_err(|e| e.to_string())?
        .ok_or("control stream closed")?;
    match ControlMessage::decode(&reply) {
        Ok(ControlMessage::Registered { .. }) => Ok((endpoint, conn, tx, rx)),
        other => Err(format!("register answered {other:?}")),
    }
}

#[test]
fn connections_per_source_address_are_capped_and_other_sources_still_connect() {
    let _serial = serial();
    let dir = TempDir::new("per-ip");
    let program = std::env::var_os("ATTACKS_RENDEZVOUS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| e2e::bin("rendezvous"));
    let args = rendezvous_args(&dir.path().join("rv"), "127.0.0.1:0");
    let mut refs: Vec<&str> = args.iter().map(String::as_str).collect();
    refs.extend(["--tcp-listen", "off", "--max-connections-per-ip", "4"]);
    let rv = Rendezvous::ready(Proc::spawn("rendezvous", &program, &refs));
    let rt = runtime();
    rt.block_on(async {
        let crowded = SocketAddr::from(([127, 0, 3, 1], 0));
        let mut held = Vec::new();
        for i in 0..4 {
            match registered_client(rv.addr, crowded).await {
                Ok(client) => held.push(client),
                Err(e) => panic!("client {i} of the crowded source: {e}"),
            }
        }
        let refused = registered_client(rv.addr, crowded).await;
        assert!(
            refused.is_err(),
            "a fifth connection from one address was accepted"
        );
        let other = SocketAddr::from(([127, 0, 3, 2], 0));
        if let Err(e) = registered_client(rv.addr, other).await {
            panic!("another address was refused too: {e}");
        }
        // A slot is given back when a connection ends.
        let (_, conn, _, _) = held.pop().expect("four held");
        conn.close(0u32.into(), b"bye");
        let deadline = Instant::now() + T;
        loop {
            match registered_client(rv.addr, crowded).await {
                Ok(client) => {
                    held.push(client);
                    break;
                }
                Err(e) => assert!(Instant::now() < deadline, "slot never given back: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}

#[test]
fn frames_over_the_servers_4_kib_cap_are_answered_too_large() {
    let _serial = serial();
    let dir = TempDir::new("cap");
    let rv = start_rendezvous(&dir.path().join("rv"));
    let rt = runtime();
    rt.block_on(async {
        let bind = SocketAddr::from(([127, 0, 4, 1], 0));
        let (_endpoint, conn, mut control, _control_rx) =
            registered_client(rv.addr, bind).await.expect("registers");
        let too_large = |reply: Vec<u8>| match ControlMessage::decode(&reply) {
            Ok(ControlMessage::Error { code, message }) => {
                assert_eq!(code, common::ErrorCode::TooLarge, "{message}");
                assert!(message.contains("4096-byte limit"), "{message}");
            }
            other => panic!("expected too_large, got {other:?}"),
        };
        // On a request stream: answered, the connection stays.
        let (mut tx, mut rx) = conn.open_bi().await.expect("request stream");
        tx.write_all(&4097u32.to_be_bytes()).await.expect("write");
        let reply = tokio::time::timeout(T, common::frame_io::read_frame(&mut rx))
            .await
            .expect("a reply in time")
            .expect("a frame")
            .expect("not the end");
        too_large(reply);
        // On the control stream: answered, then the connection is closed (the stream cannot
        // be resynchronised).
        control
            .write_all(&4097u32.to_be_bytes())
            .await
            .expect("write");
        let reason = tokio::time::timeout(T, conn.closed())
            .await
            .expect("closed in time");
        assert!(reason.to_string().contains("bad frame"), "{reason}");
    });
}

#[test]
fn requests_past_the_per_connection_rate_are_answered_rate_limited() {
    let _serial = serial();
    let dir = TempDir::new("rate");
    let rv = start_rendezvous(&dir.path().join("rv"));
    let rt = runtime();
    rt.block_on(async {
        let bind = SocketAddr::from(([127, 0, 5, 1], 0));
        let (_endpoint, conn, mut tx, mut rx) =
            registered_client(rv.addr, bind).await.expect("registers");
        // Far more pings at once than the burst (50): every one is answered, the ones past the
        // bucket with `rate_limited`, and the connection stays.
        const SENT: u64 = 200;
        let mut wire = Vec::new();
        for seq in 0..SENT {
            wire.extend(common::frame::encode(&ControlMessage::Ping { seq }.encode()).unwrap());
        }
        tx.write_all(&wire).await.expect("write");
        let (mut pongs, mut limited) = (0u64, 0u64);
        for _ in 0..SENT {
            let reply = tokio::time::timeout(T, common::frame_io::read_frame(&mut rx))
                .await
                .expect("a reply in time")
                .expect("a frame")
                .expect("not the end");
            match ControlMessage::decode(&reply) {
                Ok(ControlMessage::Pong { .. }) => pongs += 1,
                Ok(ControlMessage::Error {
                    code: common::ErrorCode::RateLimited,
                    ..
                }) => limited += 1,
                other => panic!("unexpected reply {other:?}"),
            }
        }
        // The burst, plus what refilled (20/s) while the pings were handled.
        assert!(
            (50..SENT / 2).contains(&pongs),
            "{pongs} answered, {limited} rate limited"
        );
        assert_eq!(pongs + limited, SENT);
        assert!(conn.close_reason().is_none(), "the connection was closed");
        // The bucket refills: a ping a little later is answered.
        let deadline = Instant::now() + T;
        loop {
            let ping = ControlMessage::Ping { seq: 1000 };
            write_frame(&mut tx, &ping.encode()).await.expect("write");
            let reply = tokio::time::timeout(T, common::frame_io::read_frame(&mut rx))
                .await
                .expect("a reply in time")
                .expect("a frame")
                .expect("not the end");
            if matches!(
                ControlMessage::decode(&reply),
                Ok(ControlMessage::Pong { .. })
            ) {
                break;
            }
            assert!(Instant::now() < deadline, "the bucket never refilled");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
}
