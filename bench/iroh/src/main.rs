//! The iroh contestant of `scripts/bench.sh --iroh` (issue 16): an iroh endpoint configured with
//! one iroh-relay (the one the bench runs in dev mode on the rendezvous host) and no outside
//! address lookup, measuring what `bench` and `peer ping` measure for us:
//!
//! - `listen`: prints `id <endpoint id>` once connected to its relay, then serves every
//!   connection: a `p` stream is answered with one byte (first reply), a `g` stream is read to the
//!   end into a discard sink and answered with its byte count (goodput). One JSON line per
//!   finished connection: goodput bytes and this process's CPU seconds while they flowed.
//! - `dial`: dials an endpoint id through the relay (and direct addresses, when given, as the
//!   goodput tests give ours), then prints one JSON line: connection up and first reply (from the
//!   dial; `online_ms` is the time from the process start to the dial: binding and the relay
//!   connection), when the selected path became a direct one, the final path, and, with `--bytes`,
//!   goodput over N parallel streams timed like bench/src/goodput.rs (connection up, path
//!   settled, until the listener has confirmed every stream's count).
//!
//! It lives outside the project's workspace so that the normal build never compiles iroh.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use iroh::endpoint::{presets, Connection, PathEvent};
use iroh::{Endpoint, EndpointAddr, EndpointId, RelayMap, RelayMode, RelayUrl, TransportAddr};
use tokio::sync::watch;
use tokio_stream::StreamExt;

const ALPN: &[u8] = b"p2p-bench/iroh/1";
/// Bytes per write, as in bench/src/goodput.rs.
const CHUNK: usize = 64 * 1024;

#[derive(Parser)]
#[command(about = "iroh endpoint for scripts/bench.sh --iroh")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve first-reply and goodput streams until killed.
    Listen {
        /// The iroh-relay (dev mode: http://HOST:3340).
        #[arg(long)]
        relay: RelayUrl,
        /// CA (PEM) that signed the relay's certificate, for QUIC address discovery.
        #[arg(long)]
        relay_ca: Option<std::path::PathBuf>,
        /// Local UDP address (default: iroh's, every interface, a random port).
        #[arg(long)]
        bind: Option<SocketAddr>,
    },
    /// Write a CA and a certificate for the relay's IP address (QUIC address discovery needs
    /// TLS even in iroh-relay's dev mode): DIR/ca.pem, DIR/cert.pem, DIR/key.pem.
    Certs {
        #[arg(long)]
        dir: std::path::PathBuf,
        #[arg(long)]
        ip: std::net::IpAddr,
    },
    /// Dial a listener and measure.
    Dial {
        #[arg(long)]
        relay: RelayUrl,
        /// CA (PEM) that signed the relay's certificate, for QUIC address discovery.
        #[arg(long)]
        relay_ca: Option<std::path::PathBuf>,
        /// The listener's endpoint id (its `id` line).
        #[arg(long)]
        id: EndpointId,
        /// Direct addresses of the listener to try besides the relay (goodput on a plain link).
        #[arg(long)]
        addr: Vec<SocketAddr>,
        #[arg(long)]
        bind: Option<SocketAddr>,
        /// Goodput bytes in all (0: connect, first reply and path only).
        #[arg(long, default_value_t = 0)]
        bytes: u64,
        #[arg(long, default_value_t = 1)]
        streams: u64,
        /// How long to wait for a direct path after the first reply.
        #[arg(long, default_value_t = 10.0)]
        direct_wait_s: f64,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let process_start = Instant::now();
    match Cli::parse().command {
        Command::Listen {
            relay,
            relay_ca,
            bind,
        } => listen(relay, relay_ca, bind).await,
        Command::Certs { dir, ip } => certs(&dir, ip),
        Command::Dial {
            relay,
            relay_ca,
            id,
            addr,
            bind,
            bytes,
            streams,
            direct_wait_s,
        } => {
            if streams == 0 {
                bail!("--streams must be at least 1");
            }
            let wait = Duration::try_from_secs_f64(direct_wait_s).context("--direct-wait-s")?;
            let endpoint = endpoint(relay.clone(), relay_ca, bind).await?;
            dial(
                process_start,
                endpoint,
                relay,
                id,
                addr,
                bytes,
                streams,
                wait,
            )
            .await
        }
    }
}

fn certs(dir: &std::path::Path, ip: std::net::IpAddr) -> anyhow::Result<()> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    std::fs::create_dir_all(dir)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate()?;
    let ca = ca_params.self_signed(&ca_key)?;
    let mut leaf = CertificateParams::new(Vec::<String>::new())?;
    leaf.subject_alt_names = vec![SanType::IpAddress(ip)];
    let leaf_key = KeyPair::generate()?;
    let cert = leaf.signed_by(&leaf_key, &Issuer::new(ca_params, ca_key))?;
    std::fs::write(dir.join("ca.pem"), ca.pem())?;
    std::fs::write(dir.join("cert.pem"), cert.pem())?;
    std::fs::write(dir.join("key.pem"), leaf_key.serialize_pem())?;
    Ok(())
}

async fn endpoint(
    relay: RelayUrl,
    relay_ca: Option<std::path::PathBuf>,
    bind: Option<SocketAddr>,
) -> anyhow::Result<Endpoint> {
    // Minimal: no address lookup services (no n0 DNS or pkarr); the relay is the only server.
    let mut builder = Endpoint::builder(presets::Minimal)
        .relay_mode(RelayMode::Custom(RelayMap::from(relay)))
        .alpns(vec![ALPN.to_vec()]);
    if let Some(path) = relay_ca {
        let pem = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        use rustls_pki_types::pem::PemObject;
        let roots = rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("parsing {}", path.display()))?;
        builder = builder.ca_tls_config(iroh::tls::CaTlsConfig::default().with_extra_roots(roots));
    }
    if let Some(addr) = bind {
        builder = builder
            .clear_ip_transports()
            .bind_addr(addr)
            .context("--bind")?;
    }
    let endpoint = builder.bind().await.context("binding the iroh endpoint")?;
    tokio::time::timeout(Duration::from_secs(20), endpoint.online())
        .await
        .context("no connection to the relay within 20 s")?;
    Ok(endpoint)
}

async fn listen(
    relay: RelayUrl,
    relay_ca: Option<std::path::PathBuf>,
    bind: Option<SocketAddr>,
) -> anyhow::Result<()> {
    let endpoint = endpoint(relay, relay_ca, bind).await?;
    println!("id {}", endpoint.id());
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                tokio::spawn(async move {
                    if let Err(e) = serve(incoming).await {
                        eprintln!("connection: {e:#}");
                    }
                });
            }
        }
    }
    endpoint.close().await;
    Ok(())
}

async fn serve(incoming: iroh::endpoint::Incoming) -> anyhow::Result<()> {
    let conn = incoming.accept()?.await?;
    // CPU from the first goodput stream to the last one's end: the streams of one test run
    // in parallel, each on its own task, while the next ones are accepted.
    let mut cpu_first: Option<f64> = None;
    let mut goodput = tokio::task::JoinSet::new();
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let mut kind = [0u8; 1];
        recv.read_exact(&mut kind).await?;
        match kind[0] {
            b'p' => {
                send.write_all(b"p").await?;
                send.finish()?;
            }
            b'g' => {
                cpu_first.get_or_insert_with(self_cpu_s);
                goodput.spawn(async move {
                    let mut total = 0u64;
                    while let Ok(Some(chunk)) = recv.read_chunk(usize::MAX).await {
                        total += chunk.len() as u64;
                    }
                    let cpu_end = self_cpu_s();
                    let _ = send.write_all(&total.to_be_bytes()).await;
                    let _ = send.finish();
                    // Keep the stream until the dialer has read the count.
                    let _ = send.stopped().await;
                    (total, cpu_end)
                });
            }
            other => bail!("unknown stream kind {other}"),
        }
    }
    let (mut bytes, mut cpu_last) = (0u64, 0.0f64);
    while let Some(Ok((n, cpu_end))) = goodput.join_next().await {
        bytes += n;
        cpu_last = cpu_last.max(cpu_end);
    }
    let cpu = cpu_first.map_or(0.0, |first| cpu_last - first);
    println!(
        "{}",
        serde_json::json!({ "bytes": bytes, "cpu_s": cpu, "remote": conn.remote_id().to_string() })
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)] // the subcommand's flags, passed on once
async fn dial(
    process_start: Instant,
    endpoint: Endpoint,
    relay: RelayUrl,
    id: EndpointId,
    direct: Vec<SocketAddr>,
    bytes: u64,
    streams: u64,
    direct_wait: Duration,
) -> anyhow::Result<()> {
    let addr = EndpointAddr::new(id)
        .with_relay_url(relay)
        .with_addrs(direct.into_iter().map(TransportAddr::Ip));
    let start = Instant::now();
    let online_ms = ms(start - process_start);
    let conn = endpoint.connect(addr, ALPN).await.context("connecting")?;
    let connect_ms = ms(start.elapsed());
    let (direct_tx, mut direct_rx) = watch::channel(None);
    let watcher = tokio::spawn(watch_direct(conn.clone(), start, direct_tx));

    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(b"p").await?;
    send.finish()?;
    let mut reply = [0u8; 1];
    recv.read_exact(&mut reply).await?;
    let first_reply_ms = ms(start.elapsed());

    // The path as it settles: wait for a direct one up to `direct_wait` after the first reply.
    let _ = tokio::time::timeout(direct_wait, direct_rx.wait_for(|d| d.is_some())).await;
    let direct_ms = *direct_rx.borrow();
    let path = selected_path(&conn);

    let mut goodput = serde_json::Value::Null;
    let mut cpu = serde_json::Value::Null;
    if bytes > 0 {
        let cpu0 = self_cpu_s();
        let t0 = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..streams {
            let share = bytes / streams + u64::from(i < bytes % streams);
            let conn = conn.clone();
            tasks.spawn(async move { goodput_stream(&conn, share).await });
        }
        let mut confirmed = 0;
        while let Some(r) = tasks.join_next().await {
            confirmed += r.context("stream task")??;
        }
        let secs = t0.elapsed().as_secs_f64();
        if confirmed != bytes {
            bail!("listener confirmed {confirmed} of {bytes} bytes");
        }
        goodput = serde_json::json!(bytes as f64 / secs);
        cpu = serde_json::json!(self_cpu_s() - cpu0);
    }
    let final_path = selected_path(&conn);
    println!(
        "{}",
        serde_json::json!({
            "online_ms": online_ms,
            "connect_ms": connect_ms,
            "first_reply_ms": first_reply_ms,
            "direct_ms": direct_ms,
            "path": path,
            "final_path": final_path,
            "bytes_per_s": goodput,
            "cpu_s": cpu,
        })
    );
    watcher.abort();
    conn.close(0u32.into(), b"done");
    endpoint.close().await;
    Ok(())
}

/// Sends `n` goodput bytes on a new stream; returns the listener's count.
async fn goodput_stream(conn: &Connection, n: u64) -> anyhow::Result<u64> {
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(b"g").await?;
    let chunk = vec![0xa5u8; CHUNK];
    let mut left = n;
    while left > 0 {
        let len = left.min(CHUNK as u64) as usize;
        send.write_all(&chunk[..len]).await?;
        left -= len as u64;
    }
    send.finish()?;
    let mut count = [0u8; 8];
    recv.read_exact(&mut count).await?;
    Ok(u64::from_be_bytes(count))
}

/// Sets `direct` to the milliseconds since `start` at which a direct (IP) path was first selected.
async fn watch_direct(conn: Connection, start: Instant, direct: watch::Sender<Option<f64>>) {
    let mut events = conn.path_events();
    if conn
        .paths()
        .iter()
        .any(|p| p.is_selected() && matches!(p.remote_addr(), TransportAddr::Ip(_)))
    {
        direct.send_replace(Some(ms(start.elapsed())));
        return;
    }
    while let Some(event) = events.next().await {
        let selected_ip = match event {
            PathEvent::Selected { remote_addr, .. } => matches!(remote_addr, TransportAddr::Ip(_)),
            // Events were dropped: the snapshot says what is selected now.
            PathEvent::Lagged { .. } => conn
                .paths()
                .iter()
                .any(|p| p.is_selected() && matches!(p.remote_addr(), TransportAddr::Ip(_))),
            _ => false,
        };
        if selected_ip {
            direct.send_replace(Some(ms(start.elapsed())));
            return;
        }
    }
}

/// "direct IP:PORT", "relayed URL" or "none".
fn selected_path(conn: &Connection) -> String {
    let paths = conn.paths();
    let selected = paths.iter().find(|p| p.is_selected());
    match selected.as_ref().map(|p| p.remote_addr()) {
        Some(TransportAddr::Ip(a)) => format!("direct {a}"),
        Some(TransportAddr::Relay(u)) => format!("relayed {u}"),
        Some(other) => format!("other {other:?}"),
        None => "none".to_owned(),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// User + system CPU seconds this process has used so far.
fn self_cpu_s() -> f64 {
    // SAFETY: getrusage only writes into the zeroed struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    if rc != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}
