//! TCP services over a peer connection: `peer listen --expose NAME=HOST:PORT` offers a local
//! TCP service to the peers on its allow-list, `peer pipe ID NAME` joins stdin/stdout to it
//! (ssh's `ProxyCommand`), and `peer forward ID NAME --local ADDR` turns every TCP connection
//! accepted on a local port into a stream to it.
//!
//! On the wire: `open {app: service}`, `service_open {name}`, then the exposing side connects to
//! the service and answers `service_reply {ok, message}`; with `ok`, raw bytes follow both ways.
//! A half-close is carried through: the end of one side's reader finishes its QUIC send stream,
//! and a finished stream shuts down the writing half of the TCP connection on the other side.
//! An error on either side resets the stream (and the TCP connection, so that the local client
//! sees a reset rather than a clean end of data).
//!
//! Why it is a module of its own: an exposed service lets a remote peer make this host open TCP
//! connections, so who may (the allow-list, checked by the endpoint), to what (only the named
//! services) and how many at once ([`MAX_STREAMS_PER_PEER`]) are decided here.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::frame_io::{read_frame, write_frame};
use common::message::PeerApp;
use common::{PeerId, PeerMessage};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::access::Refused;
use crate::console::Console;
use crate::endpoint::{ConnectError, Endpoint};
use crate::files::printable;

/// Service streams one peer may have open at once on a listener (all its connections
/// together); more are refused with a reason.
pub const MAX_STREAMS_PER_PEER: usize = 64;
/// Local TCP connections `peer forward` carries at once; more are reset at once (and logged).
pub const MAX_LOCAL_CONNECTIONS: usize = 256;
/// How long the exposing side waits for the service to accept a TCP connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long either side waits for the `service_open` or the `service_reply`.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest service name.
pub const MAX_NAME_LEN: usize = 64;
/// QUIC stream reset code when one side of a spliced connection fails.
const SPLICE_FAILED: u32 = 1;
const CHUNK: usize = 64 * 1024;

/// Why a service name is not acceptable: 1 to [`MAX_NAME_LEN`] ASCII letters, digits, `.`, `_`
/// or `-`.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!(
            "a service name has 1 to {MAX_NAME_LEN} characters, not {}",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "a service name has only ASCII letters, digits, '.', '_' and '-' (not {})",
            c.escape_debug()
        ));
    }
    Ok(())
}

/// Parses `NAME=HOST:PORT` (`--expose`).
pub fn parse_expose(text: &str) -> Result<(String, String), String> {
    let (name, target) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: expected NAME=HOST:PORT"))?;
    check_name(name).map_err(|e| format!("{text:?}: {e}"))?;
    let port_ok = target
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if !port_ok {
        return Err(format!(
            "{text:?}: the target {target:?} is not HOST:PORT (a port from 1 to 65535)"
        ));
    }
    Ok((name.to_owned(), target.to_owned()))
}

/// The services a listener exposes, and the streams each peer has open to them.
#[derive(Debug)]
pub struct Exposed {
    services: BTreeMap<String, String>,
    open: Mutex<HashMap<PeerId, usize>>,
}

/// Why `--expose` cannot be used as given.
#[derive(Debug, thiserror::Error)]
pub enum ExposeError {
    /// Two services of one name.
    #[error("--expose {0}: a service of that name is exposed already")]
    Duplicate(String),
    /// No allow-list: any peer that knows our id could reach the service.
    #[error(
        "--expose needs an allow-list: a service is only offered to the peers named with \
         --allow ID (repeatable) or in {0} (--allow-any is refused with --expose)"
    )]
    NoAllowList(std::path::PathBuf),
}

impl Exposed {
    /// The services `list` names (each `(name, HOST:PORT)`), offered only to the peers of an
    /// allow-list (`policy`; the endpoint refuses every other peer's connection).
    pub fn new(
        list: Vec<(String, String)>,
        policy: &crate::access::Access,
        allow_list_file: &std::path::Path,
    ) -> Result<Arc<Exposed>, ExposeError> {
        if matches!(policy, crate::access::Access::Anyone) {
            return Err(ExposeError::NoAllowList(allow_list_file.to_owned()));
        }
        let mut services = BTreeMap::new();
        for (name, target) in list {
            if services.insert(name.clone(), target).is_some() {
                return Err(ExposeError::Duplicate(name));
            }
        }
        Ok(Arc::new(Exposed {
            services,
            open: Mutex::new(HashMap::new()),
        }))
    }

    /// `name=target` of every service, for the listener's banner.
    pub fn describe(&self) -> Vec<String> {
        self.services
            .iter()
            .map(|(name, target)| format!("{name}={target}"))
            .collect()
    }

    fn admit(self: &Arc<Self>, peer: PeerId) -> Result<StreamSlot, String> {
        let mut open = self
            .open
            .lock()
            .map_err(|_| "internal error: the service lock is poisoned".to_owned())?;
        let count = open.entry(peer).or_insert(0);
        if *count >= MAX_STREAMS_PER_PEER {
            return Err(format!(
                "{MAX_STREAMS_PER_PEER} service streams of yours are open already on this peer; \
                 close some first"
            ));
        }
        *count += 1;
        Ok(StreamSlot {
            exposed: self.clone(),
            peer,
        })
    }
}

/// One open service stream of a peer, given back when dropped.
struct StreamSlot {
    exposed: Arc<Exposed>,
    peer: PeerId,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if let Ok(mut open) = self.exposed.open.lock() {
            if let Some(count) = open.get_mut(&self.peer) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    open.remove(&self.peer);
                }
            }
        }
    }
}

/// What crossed a spliced stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Spliced {
    /// Bytes from the local side to the peer.
    pub sent: u64,
    /// Bytes from the peer to the local side.
    pub received: u64,
}

/// Copies `local_in` to `tx` and `rx` to `local_out` until both directions ended: the end of
/// `local_in` finishes `tx` (and waits for the peer to acknowledge every byte), the end of `rx`
/// shuts `local_out` down. On an error of either direction the other is dropped, `tx` is reset
/// and the error returned.
pub async fn splice<R, W>(
    mut local_in: R,
    mut local_out: W,
    tx: &mut quinn::SendStream,
    rx: &mut quinn::RecvStream,
) -> Result<Spliced, String>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut totals = Spliced::default();
    let (sent, received) = (&mut totals.sent, &mut totals.received);
    let result = {
        let (tx, rx) = (&mut *tx, &mut *rx);
        let up = async move {
            let mut buf = vec![0u8; CHUNK];
            loop {
                let n = local_in
                    .read(&mut buf)
                    .await
                    .map_err(|e| format!("reading the local side: {e}"))?;
                if n == 0 {
                    break;
                }
                tx.write_all(&buf[..n])
                    .await
                    .map_err(|e| format!("sending to the peer: {e}"))?;
                *sent += n as u64;
            }
            tx.finish().map_err(|e| format!("finishing: {e}"))?;
            // Our half is only done once the peer has every byte of it.
            match tx.stopped().await {
                Ok(None) => Ok(()),
                Ok(Some(code)) => Err(format!(
                    "the peer stopped reading (code {code}) before taking everything"
                )),
                Err(e) => Err(format!("the peer did not acknowledge our data: {e}")),
            }
        };
        let down = async move {
            let mut buf = vec![0u8; CHUNK];
            loop {
                match rx.read(&mut buf).await {
                    Ok(Some(n)) => {
                        local_out
                            .write_all(&buf[..n])
                            .await
                            .map_err(|e| format!("writing to the local side: {e}"))?;
                        local_out
                            .flush()
                            .await
                            .map_err(|e| format!("writing to the local side: {e}"))?;
                        *received += n as u64;
                    }
                    Ok(None) => break,
                    Err(quinn::ReadError::Reset(code)) => {
                        return Err(format!("the other side reset the stream (code {code})"))
                    }
                    Err(e) => return Err(format!("receiving from the peer: {e}")),
                }
            }
            local_out
                .shutdown()
                .await
                .map_err(|e| format!("closing the local side: {e}"))
        };
        tokio::try_join!(up, down)
    };
    match result {
        Ok(_) => Ok(totals),
        Err(e) => {
            let _ = tx.reset(SPLICE_FAILED.into());
            let _ = rx.stop(SPLICE_FAILED.into());
            Err(e)
        }
    }
}

/// Serves one `service` stream (its `open` already read) for `peer`: reads which service,
/// connects to it and splices the stream to it. Everything refused is answered with the reason
/// and logged.
pub async fn serve(
    mut tx: quinn::SendStream,
    mut rx: quinn::RecvStream,
    peer: PeerId,
    exposed: Option<Arc<Exposed>>,
    console: Console,
) {
    let request = match tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame(&mut rx)).await {
        Ok(Ok(Some(frame))) => PeerMessage::decode(&frame),
        Ok(Ok(None)) => return,
        Ok(Err(e)) => return refuse(&mut tx, peer, &console, e.to_string()).await,
        Err(_) => {
            return refuse(
                &mut tx,
                peer,
                &console,
                format!("no service_open within {} s", HANDSHAKE_TIMEOUT.as_secs()),
            )
            .await
        }
    };
    let (name, probe) = match request {
        Ok(PeerMessage::ServiceOpen { name, probe }) => (name, probe),
        Ok(other) => {
            return refuse(
                &mut tx,
                peer,
                &console,
                format!(
                    "expected service_open, got `{}`",
                    printable(&format!("{other:?}"))
                ),
            )
            .await
        }
        Err(e) => return refuse(&mut tx, peer, &console, printable(&e.to_string())).await,
    };
    let Some(exposed) = exposed else {
        return refuse(
            &mut tx,
            peer,
            &console,
            "this peer exposes no services (start it with --expose NAME=HOST:PORT)".into(),
        )
        .await;
    };
    let Some(target) = exposed.services.get(&name).cloned() else {
        let offered: Vec<&str> = exposed.services.keys().map(String::as_str).collect();
        return refuse(
            &mut tx,
            peer,
            &console,
            format!(
                "service \"{}\" is not exposed by this peer (it exposes: {})",
                printable(&name),
                offered.join(", ")
            ),
        )
        .await;
    };
    if probe {
        let reply = PeerMessage::ServiceReply {
            ok: true,
            message: format!("service {name} is exposed"),
        };
        let _ = write_frame(&mut tx, &reply.encode()).await;
        let _ = tx.finish();
        let _ = tokio::time::timeout(Duration::from_secs(5), tx.stopped()).await;
        return;
    }
    let slot = match exposed.admit(peer) {
        Ok(slot) => slot,
        Err(e) => return refuse(&mut tx, peer, &console, e).await,
    };
    let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&target)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => {
            return refuse(
                &mut tx,
                peer,
                &console,
                format!("service {name} ({target}) is down: {e}"),
            )
            .await;
        }
        Err(_) => {
            return refuse(
                &mut tx,
                peer,
                &console,
                format!(
                    "service {name} ({target}) did not accept within {} s",
                    CONNECT_TIMEOUT.as_secs()
                ),
            )
            .await
        }
    };
    let reply = PeerMessage::ServiceReply {
        ok: true,
        message: format!("connected to {name}"),
    };
    if write_frame(&mut tx, &reply.encode()).await.is_err() {
        return;
    }
    tracing::debug!(%peer, service = %name, "service stream opened");
    let result = splice_tcp(tcp, &mut tx, &mut rx).await;
    drop(slot);
    match result {
        Ok(totals) => tracing::debug!(
            %peer, service = %name, sent = totals.sent, received = totals.received,
            "service stream closed"
        ),
        Err(e) => {
            console
                .error(format!("service {name} for {peer}: {e}"))
                .await
        }
    }
}

/// Makes closing `tcp` send a reset (SO_LINGER 0), so that its other end sees a failure, not
/// a clean end of data.
fn reset_on_close(tcp: &TcpStream) {
    // Deprecated because a non-zero linger blocks the thread on drop; a zero linger never does
    // (the connection is aborted at once).
    #[allow(deprecated)]
    let _ = tcp.set_linger(Some(Duration::ZERO));
}

/// Answers a `service_open` with a refusal and its reason, and logs it.
async fn refuse(tx: &mut quinn::SendStream, peer: PeerId, console: &Console, message: String) {
    // Logged first: the peer closes its connection once it has the reason, which ends this
    // task with the connection's other streams.
    console
        .error(format!("refused a service stream from {peer}: {message}"))
        .await;
    let reply = PeerMessage::ServiceReply { ok: false, message };
    let _ = write_frame(tx, &reply.encode()).await;
    let _ = tx.finish();
    let _ = tokio::time::timeout(Duration::from_secs(5), tx.stopped()).await;
}

/// [`splice`] over a TCP connection; on an error the connection is reset (SO_LINGER 0), so
/// that its other end sees the failure instead of a clean end of data.
async fn splice_tcp(
    mut tcp: TcpStream,
    tx: &mut quinn::SendStream,
    rx: &mut quinn::RecvStream,
) -> Result<Spliced, String> {
    let _ = tcp.set_nodelay(true);
    let result = {
        let (read, write) = tcp.split();
        splice(read, write, tx, rx).await
    };
    if result.is_err() {
        reset_on_close(&tcp);
    }
    result
}

/// Why a service stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// No connection to the peer.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The peer closed our connection: its allow-list does not name us.
    #[error(transparent)]
    Refused(#[from] Refused),
    /// The peer refused the service (not exposed, down, too many streams).
    #[error("{peer} refused service \"{name}\": {reason}")]
    Denied {
        /// The peer.
        peer: PeerId,
        /// The service.
        name: String,
        /// Its reason.
        reason: String,
    },
    /// The stream failed (the text says how).
    #[error("service \"{name}\" of {peer}: {reason}")]
    Stream {
        /// The peer.
        peer: PeerId,
        /// The service.
        name: String,
        /// What failed.
        reason: String,
    },
    /// `--local` could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Opens a stream to service `name` of `peer` (the other side of `conn`); with `probe`, only asks whether it
/// is exposed to us (the stream then ends).
pub async fn open(
    conn: &quinn::Connection,
    peer: PeerId,
    name: &str,
    probe: bool,
) -> Result<(quinn::SendStream, quinn::RecvStream), ServiceError> {
    let failed = |reason: String| match crate::access::refusal(peer, conn) {
        Some(refused) => ServiceError::Refused(refused),
        None => ServiceError::Stream {
            peer,
            name: name.to_owned(),
            reason,
        },
    };
    let (mut tx, mut rx) = conn.open_bi().await.map_err(|e| failed(e.to_string()))?;
    let opening = async {
        write_frame(
            &mut tx,
            &PeerMessage::Open {
                app: PeerApp::Service,
            }
            .encode(),
        )
        .await?;
        let request = PeerMessage::ServiceOpen {
            name: name.to_owned(),
            probe,
        };
        write_frame(&mut tx, &request.encode()).await?;
        read_frame(&mut rx).await
    };
    let reply = match tokio::time::timeout(HANDSHAKE_TIMEOUT, opening).await {
        Ok(Ok(Some(reply))) => reply,
        Ok(Ok(None)) => {
            return Err(failed(
                "the peer closed the stream without an answer".into(),
            ))
        }
        Ok(Err(e)) => return Err(failed(e.to_string())),
        Err(_) => {
            return Err(failed(format!(
                "no answer within {} s",
                HANDSHAKE_TIMEOUT.as_secs()
            )))
        }
    };
    match PeerMessage::decode(&reply) {
        Ok(PeerMessage::ServiceReply { ok: true, .. }) => Ok((tx, rx)),
        Ok(PeerMessage::ServiceReply { ok: false, message })
        | Ok(PeerMessage::Error { message }) => Err(ServiceError::Denied {
            peer,
            name: name.to_owned(),
            reason: printable(&message),
        }),
        Ok(other) => Err(failed(format!(
            "unexpected reply `{}`",
            printable(&format!("{other:?}"))
        ))),
        Err(e) => Err(failed(printable(&e.to_string()))),
    }
}

/// `peer pipe`: joins `input`/`output` (stdin/stdout) to service `name` of `peer` until both
/// directions ended; closes the endpoint. Succeeds only when every byte of `input` was
/// acknowledged by the peer and the peer's side ended cleanly.
pub async fn pipe<R, W>(
    endpoint: Endpoint,
    peer: PeerId,
    name: &str,
    input: R,
    output: W,
) -> Result<Spliced, ServiceError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (endpoint, conn) = crate::commands::open_connection(endpoint, peer).await?;
    let result = async {
        let (mut tx, mut rx) = open(&conn, peer, name, false).await?;
        splice(input, output, &mut tx, &mut rx).await.map_err(
            |reason| match crate::access::refusal(peer, &conn) {
                Some(refused) => ServiceError::Refused(refused),
                None => ServiceError::Stream {
                    peer,
                    name: name.to_owned(),
                    reason,
                },
            },
        )
    }
    .await;
    conn.close(0u32.into(), b"pipe over");
    endpoint.close().await;
    result
}

/// `peer forward`: checks that `peer` exposes `name` to us, then carries every TCP connection
/// accepted on `local` to it (each on a stream of its own) until `stop` completes; a lost
/// connection to the peer is dialed again at the next local connection. `ready` is told the
/// bound address once the service is known to be exposed. Closes the endpoint.
pub async fn forward(
    endpoint: Endpoint,
    peer: PeerId,
    name: &str,
    local: SocketAddr,
    ready: impl FnOnce(SocketAddr),
    stop: impl Future<Output = ()>,
) -> Result<(), ServiceError> {
    let listener = match TcpListener::bind(local).await {
        Ok(listener) => listener,
        Err(source) => {
            endpoint.close().await;
            return Err(ServiceError::Bind {
                addr: local,
                source,
            });
        }
    };
    let bound = listener.local_addr().unwrap_or(local);
    let (endpoint, mut conn) = crate::commands::open_connection(endpoint, peer).await?;
    // Refusals (not allowed, not exposed) are reported now, not at the first local connection.
    if let Err(e) = open(&conn, peer, name, true).await {
        conn.close(0u32.into(), b"refused");
        endpoint.close().await;
        return Err(e);
    }
    let console = endpoint.console().clone();
    console
        .say(format!("forwarding {bound} to service {name} of {peer}"))
        .await;
    ready(bound);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_LOCAL_CONNECTIONS));
    let mut carried = tokio::task::JoinSet::new();
    tokio::pin!(stop);
    // Whether the loss of the current connection was said already.
    let mut loss_said = false;
    let result = loop {
        let (tcp, from) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: said, and the next accept retried
                    // a moment later.
                    console.error(format!("accepting on {bound}: {e}")).await;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            Some(_) = carried.join_next(), if !carried.is_empty() => continue,
            reason = conn.closed(), if !loss_said => {
                loss_said = true;
                if let Some(refused) = crate::access::refusal(peer, &conn) {
                    break Err(ServiceError::Refused(refused));
                }
                console
                    .error(format!(
                        "the connection to {peer} was lost ({reason}); dialing again at the \
                         next local connection"
                    ))
                    .await;
                continue;
            }
            () = &mut stop => break Ok(()),
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            reset_on_close(&tcp);
            console
                .error(format!(
                    "connection from {from} reset: {MAX_LOCAL_CONNECTIONS} connections are \
                     forwarded already"
                ))
                .await;
            continue;
        };
        if conn.close_reason().is_some() {
            if let Some(refused) = crate::access::refusal(peer, &conn) {
                break Err(ServiceError::Refused(refused));
            }
            match endpoint.connect(peer).await {
                Ok(fresh) => {
                    loss_said = false;
                    crate::dial::answer_pings(
                        endpoint.path_keeper().clone(),
                        fresh.quinn().clone(),
                    );
                    conn = fresh;
                }
                Err(e) => {
                    reset_on_close(&tcp);
                    console
                        .error(format!("connection from {from} reset: {e}"))
                        .await;
                    continue;
                }
            }
        }
        let (conn, console, name) = (conn.clone(), console.clone(), name.to_owned());
        carried.spawn(async move {
            let _slot = slot;
            let (mut tx, mut rx) = match open(&conn, peer, &name, false).await {
                Ok(pair) => pair,
                Err(e) => {
                    // The local client learns of it by a reset; the reason goes to the log.
                    reset_on_close(&tcp);
                    console
                        .error(format!("connection from {from} reset: {e}"))
                        .await;
                    return;
                }
            };
            if let Err(e) = splice_tcp(tcp, &mut tx, &mut rx).await {
                console
                    .error(format!("connection from {from} to service {name}: {e}"))
                    .await;
            }
        });
    };
    carried.shutdown().await;
    conn.close(0u32.into(), b"forward over");
    endpoint.close().await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::Access;

    #[test]
    fn expose_arguments_are_checked() {
        assert_eq!(
            parse_expose("ssh=127.0.0.1:22"),
            Ok(("ssh".into(), "127.0.0.1:22".into()))
        );
        assert_eq!(
            parse_expose("web=localhost:8080"),
            Ok(("web".into(), "localhost:8080".into()))
        );
        assert_eq!(
            parse_expose("v6=[::1]:80"),
            Ok(("v6".into(), "[::1]:80".into()))
        );
        for bad in [
            "ssh",
            "=127.0.0.1:22",
            "ssh=127.0.0.1",
            "ssh=127.0.0.1:0",
            "ssh=127.0.0.1:99999",
            "ssh=:22",
            "a b=127.0.0.1:22",
            "x/y=127.0.0.1:22",
        ] {
            assert!(parse_expose(bad).is_err(), "{bad}");
        }
        assert!(check_name(&"s".repeat(MAX_NAME_LEN)).is_ok());
        assert!(check_name(&"s".repeat(MAX_NAME_LEN + 1)).is_err());
    }

    #[test]
    fn exposing_needs_an_allow_list_and_distinct_names() {
        let file = std::path::Path::new("/nonexistent/authorized_peers");
        let err = Exposed::new(
            vec![("ssh".into(), "127.0.0.1:22".into())],
            &Access::Anyone,
            file,
        )
        .unwrap_err();
        assert!(err.to_string().contains("needs an allow-list"), "{err}");
        let only = Access::Only(Default::default());
        let err = Exposed::new(
            vec![
                ("ssh".into(), "127.0.0.1:22".into()),
                ("ssh".into(), "127.0.0.1:23".into()),
            ],
            &only,
            file,
        )
        .unwrap_err();
        assert!(err.to_string().contains("exposed already"), "{err}");
    }

    #[test]
    fn streams_per_peer_are_bounded_and_given_back() {
        let only = Access::Only(Default::default());
        let exposed = Exposed::new(
            vec![("ssh".into(), "127.0.0.1:22".into())],
            &only,
            std::path::Path::new("x"),
        )
        .unwrap();
        let (a, b) = (
            PeerId::from_key_digest(&[1; 32]),
            PeerId::from_key_digest(&[2; 32]),
        );
        let slots: Vec<StreamSlot> = (0..MAX_STREAMS_PER_PEER)
            .map(|_| exposed.admit(a).unwrap())
            .collect();
        let err = exposed.admit(a).err().unwrap();
        assert!(err.contains("open already"), "{err}");
        assert!(exposed.admit(b).is_ok(), "another peer has its own bound");
        drop(slots);
        assert!(exposed.open.lock().unwrap().is_empty());
        assert!(exposed.admit(a).is_ok());
    }

    /// A peer opening service streams over several connections at once: the bound holds across
    /// them, the one over it is told why, and a closed stream gives its place back.
    #[tokio::test]
    async fn a_peer_cannot_hold_more_service_streams_than_the_bound() {
        use crate::node::Node;
        let settings = transport::TransportSettings::default();
        let node = || {
            let identity = Arc::new(certs::Identity::generate().unwrap());
            Node::bind("127.0.0.1:0".parse().unwrap(), identity, settings).unwrap()
        };
        let ((a, _a_stun), (b, _b_stun)) = (node(), node());
        // The service holds every connection it accepts.
        let service = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = service.local_addr().unwrap().to_string();
        let holder = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((tcp, _)) = service.accept().await {
                held.push(tcp);
            }
        });
        let exposed = Exposed::new(
            vec![("svc".into(), target)],
            &Access::Only(Default::default()),
            std::path::Path::new("x"),
        )
        .unwrap();
        let (console, _printer) = Console::start_with(true);
        let a_id = a.identity.id();
        let server = tokio::spawn({
            let endpoint = b.endpoint.clone();
            async move {
                let mut tasks = tokio::task::JoinSet::new();
                while let Some(incoming) = endpoint.accept().await {
                    let Ok(conn) = incoming.await else { continue };
                    let (exposed, console) = (exposed.clone(), console.clone());
                    tasks.spawn(async move {
                        let mut streams = tokio::task::JoinSet::new();
                        while let Ok((mut tx, mut rx)) = conn.accept_bi().await {
                            let app = crate::chat::accept(&mut tx, &mut rx).await.unwrap();
                            assert_eq!(app, PeerApp::Service);
                            streams.spawn(serve(
                                tx,
                                rx,
                                a_id,
                                Some(exposed.clone()),
                                console.clone(),
                            ));
                        }
                        streams.shutdown().await;
                    });
                }
            }
        });
        let target = b.local_addr().unwrap();
        let mut conns = Vec::new();
        for _ in 0..3 {
            conns.push(
                a.dial(b.identity.id(), target, Duration::from_secs(10))
                    .await
                    .unwrap(),
            );
        }
        let b_id = b.identity.id();
        let mut open_streams = Vec::new();
        for i in 0..MAX_STREAMS_PER_PEER {
            let conn = &conns[i % conns.len()];
            open_streams.push(open(conn, b_id, "svc", false).await.unwrap());
        }
        let err = open(&conns[0], b_id, "svc", false).await.unwrap_err();
        assert!(
            matches!(&err, ServiceError::Denied { reason, .. } if reason.contains("open already")),
            "{err}"
        );
        // One stream ends: its place is free again (once the server has seen the end).
        let (mut tx, _rx) = open_streams.pop().unwrap();
        tx.reset(0u32.into()).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match open(&conns[1], b_id, "svc", false).await {
                Ok(pair) => {
                    open_streams.push(pair);
                    break;
                }
                Err(e) => assert!(std::time::Instant::now() < deadline, "{e}"),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        server.abort();
        holder.abort();
    }
}
