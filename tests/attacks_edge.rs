//! Attacks on the rendezvous's TCP ports, against the real binary on loopback: the TLS tunnel
//! (TCP 443 in production) and `/metrics`.
//!
//! Attackers connect from their own loopback addresses (127.0.0.2 and up: Linux routes all of
//! 127.0.0.0/8 to `lo`), so each is a separate source for the per-source caps; the honest peer
//! and the scraper come from 127.0.0.1. Timeouts are shortened by flags so that the test waits
//! seconds, not minutes. Assertions are on bounds (what was closed, what the counters say), with
//! generous deadlines for a loaded machine.
//!
//! The honest peer goes through the tunnel for real: it is given as `--server` a UDP port that
//! is bound and never answers (so its QUIC over UDP gets no reply and it falls back after 3 s),
//! and `--server-tcp` the tunnel. QUIC does not care which address the client thinks the server
//! has: the client's packets to that address go into the tunnel, the server injects them into
//! its endpoint, and the pinned key authenticates it.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::attack::{self, closed_within, Counters, Slowloris, Stop, HTTP_SLOWLORIS, TLS_SLOWLORIS};
use e2e::{args, Proc, Rendezvous, TempDir};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(30);

/// A rendezvous with the tunnel and metrics ports on loopback.
struct Edge {
    rv: Rendezvous,
    tunnel: SocketAddr,
    metrics: SocketAddr,
}

fn start(dir: &TempDir, extra: &[&str]) -> Edge {
    let data = dir.path().join("rv");
    let mut args = vec![
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
        "--tcp-listen",
        "127.0.0.1:0",
        "--metrics",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    let rv = Rendezvous::ready(Proc::spawn("rendezvous", &e2e::bin("rendezvous"), &args));
    let line = rv.proc.stdout.wait_for("tcp tunnel listening on", T);
    let tunnel = line
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .expect("tunnel address");
    let line = rv.proc.stdout.wait_for("metrics on http://", T);
    let metrics = line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .and_then(|addr| addr.parse().ok())
        .expect("metrics address");
    Edge {
        rv,
        tunnel,
        metrics,
    }
}

/// A TCP connection from 127.0.0.n.
async fn connect_from(n: u8, to: SocketAddr) -> std::io::Result<TcpStream> {
    attack::connect_from(Ipv4Addr::new(127, 0, 0, n), to).await
}

/// `GET /metrics` from 127.0.0.1; panics unless it is answered with 200 within `T`.
async fn scrape(metrics: SocketAddr) -> String {
    let exchange = async {
        let mut stream = connect_from(1, metrics).await?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: rendezvous\r\n\r\n")
            .await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        std::io::Result::Ok(response)
    };
    let response = tokio::time::timeout(T, exchange)
        .await
        .expect("scrape answered in time")
        .expect("scrape");
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    assert!(
        response.contains("rendezvous_registered_peers "),
        "{response}"
    );
    response
}

/// Scrapes until `done` holds for the scrape (the server counts a close just after the client
/// sees it), at most `T`; returns the last scrape either way (the caller asserts on it).
fn scrape_until(
    rt: &tokio::runtime::Runtime,
    metrics: SocketAddr,
    done: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + T;
    loop {
        let m = rt.block_on(scrape(metrics));
        if done(&m) || Instant::now() > deadline {
            return m;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The value of the sample `name_and_labels` in a scrape.
fn metric(scrape: &str, name_and_labels: &str) -> u64 {
    scrape
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{name_and_labels} ")))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name_and_labels} in\n{scrape}"))
}

/// A TLS client for the tunnel that pins the server's key.
fn tunnel_connector(fingerprint: &str) -> tokio_rustls::TlsConnector {
    let identity = certs::Identity::generate().unwrap();
    let trust = certs::ServerTrust::Pinned(fingerprint.parse().unwrap());
    let config = certs::client_config_for_server(&identity, trust, common::ALPN_TUNNEL).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

type Tunnel = tokio_rustls::client::TlsStream<TcpStream>;

/// A tunnel with TLS up, from 127.0.0.n.
async fn tunnel_from(
    n: u8,
    to: SocketAddr,
    connector: &tokio_rustls::TlsConnector,
) -> std::io::Result<Tunnel> {
    let tcp = connect_from(n, to).await?;
    let name =
        rustls::pki_types::ServerName::try_from(peer::register::RENDEZVOUS_SERVER_NAME).unwrap();
    tokio::time::timeout(T, connector.connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::other("TLS handshake timed out"))?
}

/// Keeps `workers` connections from 127.0.0.n to `to` open, half idle and half slowloris,
/// reopening each once closed, until `stop`; counts the connections the server closed (the
/// attack's `closed_by_server`).
fn attack(
    rt: &tokio::runtime::Runtime,
    n: u8,
    to: SocketAddr,
    workers: usize,
    slowloris: Slowloris,
    stop: Stop,
    counters: Counters,
) {
    rt.spawn(attack::hold_connections(
        Ipv4Addr::new(127, 0, 0, n),
        to,
        workers,
        slowloris,
        stop,
        counters,
    ));
}

/// Opens `n` TCP connections from one source to `port` that send nothing, and waits until the
/// server has closed every one (evicted by a newer one, or at its deadline).
async fn idle_connections_all_closed(port: SocketAddr, n: usize) {
    let mut idle = Vec::new();
    for _ in 0..n {
        idle.push(connect_from(2, port).await.unwrap());
    }
    for (i, conn) in idle.iter_mut().enumerate() {
        assert!(
            closed_within(conn, T).await,
            "idle connection {i} still open"
        );
    }
}

#[test]
fn tunnel_port_bounds_idle_connections_and_slowloris_and_a_peer_gets_through() {
    let dir = TempDir::new("edge-tunnel");
    let edge = start(
        &dir,
        &[
            "--tunnel-handshake-timeout",
            "2",
            // Long enough to open 9 tunnels one after the other on a loaded machine.
            "--tunnel-idle-timeout",
            "5",
            "--tunnel-handshakes",
            "16",
        ],
    );
    let rt = attack::runtime();

    // 1. Idle TCP connections from one source, more than its 4 handshake places: each newcomer
    // closes the source's oldest, and the last 4 close at the handshake deadline.
    rt.block_on(idle_connections_all_closed(edge.tunnel, 10));
    let failed = "rendezvous_tcp_tunnel_handshakes_failed_total";
    let per_source = "rendezvous_tcp_tunnels_refused_total{cap=\"tunnels_per_source\"}";
    let evicted_of = |m: &str| metric(m, &format!("{failed}{{reason=\"evicted_per_source\"}}"));
    let timed_out_of = |m: &str| metric(m, &format!("{failed}{{reason=\"timeout\"}}"));
    let m = scrape_until(&rt, edge.metrics, |m| {
        evicted_of(m) + timed_out_of(m) + metric(m, per_source) >= 10
    });
    let (evicted, timed_out) = (evicted_of(&m), timed_out_of(&m));
    // An evicted handshake's task may not have given its tunnel slot back yet when the next
    // connection arrives: that one is refused by the tunnel cap instead (also a bound).
    let refused = metric(&m, per_source);
    assert_eq!(evicted + timed_out + refused, 10, "{m}");
    assert!(timed_out <= 4, "at most 4 handshakes per source: {m}");

    // 2. Tunnels with TLS up: at most 8 per source; one trickling a frame that never completes
    // and the idle ones close at the idle deadline; slots come back; a datagram larger than
    // QUIC sends closes a tunnel at once.
    let connector = tunnel_connector(&edge.rv.fingerprint);
    rt.block_on(async {
        let mut tunnels = Vec::new();
        for i in 0..8 {
            let tunnel = tunnel_from(3, edge.tunnel, &connector).await;
            tunnels.push(tunnel.unwrap_or_else(|e| panic!("tunnel {i} within the cap: {e}")));
        }
        assert!(
            tunnel_from(3, edge.tunnel, &connector).await.is_err(),
            "a ninth tunnel from one source is refused"
        );
        let mut trickler = tunnels.pop().unwrap();
        let trickle = async move {
            // A 1200-byte datagram announced, then one byte every 200 ms.
            let mut write = trickler.write_all(&[0x04, 0xb0]).await;
            while write.is_ok() {
                let _ = trickler.flush().await;
                if closed_within(&mut trickler, Duration::from_millis(200)).await {
                    return;
                }
                write = trickler.write_all(&[0]).await;
            }
        };
        tokio::time::timeout(T, trickle)
            .await
            .expect("a trickled datagram does not keep a tunnel open");
        for (i, tunnel) in tunnels.iter_mut().enumerate() {
            assert!(closed_within(tunnel, T).await, "idle tunnel {i} still open");
        }
        // The slots come back as the server's tasks end, just after the client sees the close.
        let deadline = tokio::time::Instant::now() + T;
        let mut oversized = loop {
            match tunnel_from(3, edge.tunnel, &connector).await {
                Ok(tunnel) => break tunnel,
                Err(e) if tokio::time::Instant::now() > deadline => {
                    panic!("slots are not given back: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        oversized.write_all(&[0x08, 0x01]).await.unwrap(); // 2049 bytes announced
        oversized.flush().await.unwrap();
        assert!(closed_within(&mut oversized, T).await);
    });
    let closed = "rendezvous_tcp_tunnels_closed_total";
    let m = scrape_until(&rt, edge.metrics, |m| {
        metric(m, &format!("{closed}{{reason=\"idle\"}}")) >= 8
            && metric(m, &format!("{closed}{{reason=\"oversized_datagram\"}}")) >= 1
    });
    assert_eq!(
        metric(&m, &format!("{closed}{{reason=\"idle\"}}")),
        8,
        "{m}"
    );
    assert_eq!(
        metric(&m, &format!("{closed}{{reason=\"oversized_datagram\"}}")),
        1,
        "{m}"
    );
    assert!(
        metric(&m, per_source) > refused,
        "the ninth tunnel was refused: {m}"
    );

    // 3. A sustained attack from 12 sources, 6 connections each (idle, or trickling a TLS record
    // that never completes), more than the 16 handshake places in all: an honest peer still
    // registers through the tunnel, and scrapes are answered.
    let stop = Stop::new();
    let attacker_closed = Counters::default();
    for n in 10..22 {
        attack(
            &rt,
            n,
            edge.tunnel,
            6,
            TLS_SLOWLORIS,
            stop.clone(),
            attacker_closed.clone(),
        );
    }
    // Nothing answers QUIC on this UDP port: the peer falls back to the tunnel.
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let listen_args = args![
        "listen",
        "--server",
        silent_addr,
        "--server-key",
        edge.rv.fingerprint,
        "--server-tcp",
        edge.tunnel
    ];
    let honest = e2e::peer("honest", &dir.path().join("honest"), &listen_args);
    let line = honest
        .stdout
        .wait_for("registered with", Duration::from_secs(90));
    assert!(line.contains("TCP tunnel"), "{line}");
    for _ in 0..3 {
        rt.block_on(scrape(edge.metrics));
    }
    let deadline = Instant::now() + T;
    while attacker_closed.get("closed_by_server") < 100 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let m = rt.block_on(scrape(edge.metrics));
    stop.stop();
    assert!(
        attacker_closed.get("closed_by_server") >= 100,
        "the attack ran"
    );
    assert!(
        metric(&m, &format!("{failed}{{reason=\"evicted_total\"}}")) > 0,
        "the cap in all was reached: {m}"
    );
    assert!(metric(&m, "rendezvous_tcp_tunnels_open") <= 1024, "{m}");
    rt.shutdown_timeout(Duration::from_secs(5));
}

#[test]
fn metrics_port_answers_scrapes_during_idle_connections_and_a_slowloris() {
    let dir = TempDir::new("edge-metrics");
    let edge = start(
        &dir,
        &[
            "--metrics-request-timeout",
            "2",
            "--metrics-max-waiting",
            "16",
        ],
    );
    let rt = attack::runtime();

    // 1. Idle connections from one source, more than its 4 places: each newcomer closes the
    // source's oldest, and the last 4 close at the request deadline.
    rt.block_on(idle_connections_all_closed(edge.metrics, 10));
    let dropped = "rendezvous_metrics_connections_dropped_total";
    let evicted_of = |m: &str| metric(m, &format!("{dropped}{{reason=\"evicted_per_source\"}}"));
    let timed_out_of = |m: &str| metric(m, &format!("{dropped}{{reason=\"request_timeout\"}}"));
    let m = scrape_until(&rt, edge.metrics, |m| evicted_of(m) + timed_out_of(m) >= 10);
    let (evicted, timed_out) = (evicted_of(&m), timed_out_of(&m));
    assert_eq!(evicted + timed_out, 10, "{m}");
    assert!(timed_out <= 4, "at most 4 waiting per source: {m}");

    // 2. A slowloris from 12 sources, 6 connections each (idle, or trickling a request head
    // that never ends), more than the 16 waiting places in all: a connection that keeps
    // trickling is closed at the deadline, and every scrape is answered.
    let stop = Stop::new();
    let attacker_closed = Counters::default();
    for n in 10..22 {
        attack(
            &rt,
            n,
            edge.metrics,
            6,
            HTTP_SLOWLORIS,
            stop.clone(),
            attacker_closed.clone(),
        );
    }
    rt.block_on(async {
        let mut trickler = connect_from(30, edge.metrics).await.unwrap();
        trickler.write_all(HTTP_SLOWLORIS.opening).await.unwrap();
        let trickle = async {
            loop {
                if trickler.write_all(b"X").await.is_err()
                    || closed_within(&mut trickler, Duration::from_millis(200)).await
                {
                    return;
                }
            }
        };
        tokio::time::timeout(T, trickle)
            .await
            .expect("trickling does not keep a connection open");
    });
    for _ in 0..5 {
        rt.block_on(scrape(edge.metrics));
    }
    let deadline = Instant::now() + T;
    while attacker_closed.get("closed_by_server") < 100 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let m = rt.block_on(scrape(edge.metrics));
    stop.stop();
    assert!(
        attacker_closed.get("closed_by_server") >= 100,
        "the attack ran"
    );
    assert!(
        metric(&m, &format!("{dropped}{{reason=\"evicted_total\"}}")) > 0,
        "the cap in all was reached: {m}"
    );
    rt.shutdown_timeout(Duration::from_secs(5));
}
