//! Goodput tests: one connection, N parallel streams of bytes into a discard sink.
//!
//! The client times from the moment the connection is up (handshake excluded) until the server
//! has confirmed every stream's byte count. Both sides report their own CPU seconds over the test.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use certs::Identity;
use peer::register::PEER_SERVER_NAME;
use peer::stable_addr;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;
use transport::{PathTarget, TransportSettings};

use crate::usage::self_cpu_s;
use crate::Mode;

const SERVER_ID: &str = "server.pem";
const CLIENT_ID: &str = "client.pem";
const QUINN_CERT: &str = "quinn-cert.der";
const QUINN_KEY: &str = "quinn-key.der";
/// Bytes per write.
const CHUNK: usize = 64 * 1024;

/// Writes two Ed25519 identities (ours) and an rcgen certificate (plain quinn) into `dir`.
pub fn write_keys(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for name in [SERVER_ID, CLIENT_ID] {
        Identity::generate()?.save(&dir.join(name))?;
    }
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
    std::fs::write(dir.join(QUINN_CERT), cert.cert.der())?;
    std::fs::write(dir.join(QUINN_KEY), cert.signing_key.serialize_der())?;
    Ok(())
}

fn load_identity(dir: &Path, name: &str) -> anyhow::Result<Identity> {
    let path = dir.join(name);
    Identity::load(&path).with_context(|| format!("loading {}", path.display()))
}

fn quinn_cert(dir: &Path) -> anyhow::Result<(CertificateDer<'static>, PrivateKeyDer<'static>)> {
    let cert = std::fs::read(dir.join(QUINN_CERT)).context("reading the quinn certificate")?;
    let key = std::fs::read(dir.join(QUINN_KEY)).context("reading the quinn key")?;
    Ok((
        CertificateDer::from(cert),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
    ))
}

/// Runs the server side of one test and prints its JSON line.
pub async fn server(
    mode: Mode,
    listen: SocketAddr,
    keys: &Path,
    streams: usize,
    peer_addr: Option<SocketAddr>,
) -> anyhow::Result<()> {
    match mode {
        Mode::Tcp => tcp_server(listen, streams).await,
        Mode::Quinn | Mode::QuinnBuffers => {
            let (cert, key) = quinn_cert(keys)?;
            let config = quinn::ServerConfig::with_single_cert(vec![cert], key)?;
            let endpoint = quinn_endpoint(mode, listen, Some(config))?;
            quic_server(endpoint).await
        }
        Mode::Ours => {
            let identity = load_identity(keys, SERVER_ID)?;
            let tls = certs::server_config(&identity, &[common::ALPN_PEER])?;
            let (endpoint, socket, _stun_rx) = transport::make_endpoint(
                listen,
                Some(tls),
                TransportSettings::default(),
                256,
                None,
            )?;
            // As the peer does once a direct path is proven: the other side's stable address is
            // routed to its real address, and packets from there are shown as coming from it.
            if let Some(real) = peer_addr {
                let client = load_identity(keys, CLIENT_ID)?.id();
                socket.set_route(stable_addr(&client), PathTarget::Udp(real));
            }
            quic_server(endpoint).await
        }
    }
}

/// A plain quinn endpoint on `addr` (as `quinn::Endpoint::server` / `client` make it), its
/// socket's buffers enlarged as the peer's are for [`Mode::QuinnBuffers`].
fn quinn_endpoint(
    mode: Mode,
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> anyhow::Result<quinn::Endpoint> {
    let socket = std::net::UdpSocket::bind(addr).with_context(|| format!("binding {addr}"))?;
    if mode == Mode::QuinnBuffers {
        transport::enlarge_buffers(&socket, transport::PEER_SOCKET_BUFFER);
    }
    let runtime = quinn::default_runtime().context("no async runtime")?;
    Ok(quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        server,
        socket,
        runtime,
    )?)
}

async fn quic_server(endpoint: quinn::Endpoint) -> anyhow::Result<()> {
    println!("listening {}", endpoint.local_addr()?);
    let incoming = endpoint.accept().await.context("endpoint closed")?;
    let conn = incoming.await.context("handshake")?;
    let cpu0 = self_cpu_s();
    let mut tasks = JoinSet::new();
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        tasks.spawn(async move {
            let mut total = 0u64;
            while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
                total += chunk.bytes.len() as u64;
            }
            send.write_all(&total.to_be_bytes()).await?;
            send.finish()?;
            // Keep the stream until the client has read the count (it closes the connection).
            let _ = send.stopped().await;
            anyhow::Ok(total)
        });
    }
    let mut bytes = 0;
    while let Some(result) = tasks.join_next().await {
        if let Ok(Ok(n)) = result {
            bytes += n;
        }
    }
    let cpu = self_cpu_s() - cpu0;
    endpoint.close(0u32.into(), b"");
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    println!(
        "{}",
        serde_json::json!({"side": "server", "bytes": bytes, "cpu_s": cpu})
    );
    Ok(())
}

async fn tcp_server(listen: SocketAddr, streams: usize) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("listening {}", listener.local_addr()?);
    let mut tasks = JoinSet::new();
    let mut cpu0 = None;
    for _ in 0..streams {
        let (mut stream, _) = listener.accept().await?;
        cpu0.get_or_insert_with(self_cpu_s);
        tasks.spawn(async move {
            let mut buf = vec![0u8; CHUNK];
            let mut total = 0u64;
            loop {
                let n = stream.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            stream.write_all(&total.to_be_bytes()).await?;
            stream.shutdown().await?;
            anyhow::Ok(total)
        });
    }
    let mut bytes = 0;
    while let Some(result) = tasks.join_next().await {
        bytes += result??;
    }
    let cpu = self_cpu_s() - cpu0.unwrap_or(0.0);
    println!(
        "{}",
        serde_json::json!({"side": "server", "bytes": bytes, "cpu_s": cpu})
    );
    Ok(())
}

/// Runs the client side of one test and prints its JSON line.
pub async fn client(
    mode: Mode,
    connect: SocketAddr,
    bind: SocketAddr,
    keys: &Path,
    bytes: u64,
    streams: usize,
) -> anyhow::Result<()> {
    let streams = streams.max(1);
    let per_stream = bytes / streams as u64;
    let (secs, cpu) = match mode {
        Mode::Tcp => {
            let mut conns = Vec::new();
            for _ in 0..streams {
                conns.push(
                    tokio::net::TcpStream::connect(connect)
                        .await
                        .with_context(|| format!("connecting to {connect}"))?,
                );
            }
            let (start, cpu0) = (Instant::now(), self_cpu_s());
            let mut tasks = JoinSet::new();
            for mut conn in conns {
                tasks.spawn(async move {
                    write_pattern(&mut conn, per_stream).await?;
                    conn.shutdown().await?;
                    let mut count = [0u8; 8];
                    conn.read_exact(&mut count).await?;
                    check_count(count, per_stream)
                });
            }
            while let Some(result) = tasks.join_next().await {
                result??;
            }
            (start.elapsed().as_secs_f64(), self_cpu_s() - cpu0)
        }
        Mode::Quinn | Mode::QuinnBuffers => {
            let (cert, _) = quinn_cert(keys)?;
            let mut roots = rustls::RootCertStore::empty();
            roots.add(cert)?;
            let config = quinn::ClientConfig::with_root_certificates(Arc::new(roots))?;
            let endpoint = quinn_endpoint(mode, bind, None)?;
            dial_and_send(&endpoint, config, connect, "localhost", streams, per_stream).await?
        }
        Mode::Ours => {
            let identity = load_identity(keys, CLIENT_ID)?;
            let server = load_identity(keys, SERVER_ID)?.id();
            let settings = TransportSettings::default();
            let (endpoint, socket, _stun_rx) =
                transport::make_endpoint(bind, None, settings, 256, None)?;
            // Dial the stable address, routed to the server's real address (peer::establish).
            let stable = stable_addr(&server);
            socket.set_route(stable, PathTarget::Udp(connect));
            let tls = certs::client_config_for_peer(&identity, server, common::ALPN_PEER)?;
            let config = transport::quic_peer_client_config(tls, settings)?;
            dial_and_send(
                &endpoint,
                config,
                stable,
                PEER_SERVER_NAME,
                streams,
                per_stream,
            )
            .await?
        }
    };
    let sent = per_stream * streams as u64;
    println!(
        "{}",
        serde_json::json!({
            "side": "client", "bytes": sent, "secs": secs, "cpu_s": cpu,
            "bytes_per_s": sent as f64 / secs,
        })
    );
    Ok(())
}

/// Writes `bytes` bytes of a fixed pattern to `stream` in `CHUNK`-sized writes (TCP and QUIC
/// senders alike).
async fn write_pattern<W: tokio::io::AsyncWrite + Unpin>(
    stream: &mut W,
    bytes: u64,
) -> std::io::Result<()> {
    let chunk = vec![0x5au8; CHUNK];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        stream.write_all(&chunk[..n]).await?;
        left -= n as u64;
    }
    Ok(())
}

fn check_count(count: [u8; 8], expected: u64) -> anyhow::Result<()> {
    let got = u64::from_be_bytes(count);
    if got != expected {
        bail!("the server counted {got} bytes, {expected} were sent");
    }
    Ok(())
}

/// Sends `per_stream` bytes on each of `streams` bidirectional streams; returns the seconds and
/// CPU seconds until every count came back.
/// Dials `addr` from `endpoint` (plain quinn or ours alike), runs [`quic_client`] on the
/// connection, then closes it and lets the close go out.
async fn dial_and_send(
    endpoint: &quinn::Endpoint,
    config: quinn::ClientConfig,
    addr: SocketAddr,
    server_name: &str,
    streams: usize,
    per_stream: u64,
) -> anyhow::Result<(f64, f64)> {
    let conn = endpoint
        .connect_with(config, addr, server_name)?
        .await
        .context("handshake")?;
    let result = quic_client(&conn, streams, per_stream).await;
    conn.close(0u32.into(), b"done");
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    result
}

async fn quic_client(
    conn: &quinn::Connection,
    streams: usize,
    per_stream: u64,
) -> anyhow::Result<(f64, f64)> {
    let (start, cpu0) = (Instant::now(), self_cpu_s());
    let mut tasks = JoinSet::new();
    for _ in 0..streams {
        let conn = conn.clone();
        tasks.spawn(async move {
            let (mut send, mut recv) = conn.open_bi().await?;
            write_pattern(&mut send, per_stream).await?;
            send.finish()?;
            let mut count = [0u8; 8];
            recv.read_exact(&mut count).await?;
            check_count(count, per_stream)
        });
    }
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    Ok((start.elapsed().as_secs_f64(), self_cpu_s() - cpu0))
}
