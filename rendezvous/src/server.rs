//! The tokio driver: accepts QUIC connections, moves frames between streams and the
//! [`Registry`], writes to the [`Store`], answers STUN. No protocol decisions are made here.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::frame_io::{read_frame, write_frame, FrameIoError};
use common::{ControlMessage, ErrorCode, FrameError, PeerId};
use quinn::{Connection, RecvStream, SendStream};
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;

use crate::core::{ConnId, Outcome, Registry, RelayRefusal};
use crate::ratelimit::TokenBucket;
use crate::relay::{Permission, RelayHub, RelayLimits};
use crate::store::Store;

/// How long a client has to finish the handshake and send `register`.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request stream may take to deliver its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Pushes queued for one peer before new ones are dropped.
const PUSH_QUEUE: usize = 64;
/// Registry rows expired per hold of the registry lock (each chunk is then deleted from storage
/// in one durable transaction before the next).
const EXPIRY_CHUNK: usize = 1024;
/// Application close codes.
const CLOSE_SHUTDOWN: u32 = 1;
const CLOSE_PROTOCOL: u32 = 2;

/// Server limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Concurrent connections; more are refused at the QUIC level.
    pub max_connections: usize,
    /// Sustained requests per second per connection.
    pub requests_per_second: f64,
    /// Burst of requests per connection.
    pub request_burst: f64,
    /// Relay limits.
    pub relay: RelayLimits,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 20_000,
            requests_per_second: 20.0,
            request_burst: 50.0,
            relay: RelayLimits::default(),
        }
    }
}

/// What the driver keeps per registered connection.
struct Online {
    /// Pushes to its control stream.
    pusher: mpsc::Sender<ControlMessage>,
    /// The connection, to read its current remote address.
    conn: Connection,
}

pub(crate) struct Shared {
    registry: Mutex<Registry>,
    online: Mutex<HashMap<ConnId, Online>>,
    store: Store,
    limits: Limits,
    pub(crate) relay: Arc<RelayHub>,
    pub(crate) stun: Arc<crate::stun::StunCounters>,
    pub(crate) rejections: Rejections,
}

/// Error replies sent, by code: what clients got wrong (or were refused), for the operator.
#[derive(Debug, Default)]
pub(crate) struct Rejections {
    counts: [AtomicU64; REJECTION_CODES.len()],
}

/// The codes counted, in the order of [`Rejections::snapshot`].
pub(crate) const REJECTION_CODES: [(ErrorCode, &str); 9] = [
    (ErrorCode::BadRequest, "bad_request"),
    (ErrorCode::UnknownType, "unknown_type"),
    (ErrorCode::TooLarge, "too_large"),
    (ErrorCode::NotRegistered, "not_registered"),
    (ErrorCode::UnsupportedVersion, "unsupported_version"),
    (ErrorCode::RateLimited, "rate_limited"),
    (ErrorCode::NotFound, "not_found"),
    (ErrorCode::PeerOffline, "peer_offline"),
    (ErrorCode::RelayDenied, "relay_denied"),
];

impl Rejections {
    fn count(&self, code: ErrorCode) {
        if let Some(i) = REJECTION_CODES.iter().position(|(c, _)| *c == code) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// (reason label, count) for every counted code.
    pub(crate) fn snapshot(&self) -> Vec<(&'static str, u64)> {
        REJECTION_CODES
            .iter()
            .zip(&self.counts)
            .map(|((_, label), n)| (*label, n.load(Ordering::Relaxed)))
            .collect()
    }
}

/// Locks a mutex, recovering the data if another thread panicked while holding it: the registry
/// is updated in single steps, so it is consistent whenever the lock is free.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    pub(crate) fn new(
        registry: Registry,
        store: Store,
        limits: Limits,
        relay: RelayHub,
        stun: Arc<crate::stun::StunCounters>,
    ) -> Arc<Self> {
        Arc::new(Shared {
            registry: Mutex::new(registry),
            online: Mutex::new(HashMap::new()),
            store,
            limits,
            relay: Arc::new(relay),
            stun,
            rejections: Rejections::default(),
        })
    }

    /// Runs one input through the registry (lock held only for that), then carries out the
    /// outcome's persistence and pushes. Returns the reply.
    async fn apply(
        &self,
        conn: ConnId,
        id: PeerId,
        observed: SocketAddr,
        msg: ControlMessage,
        durable: bool,
    ) -> Option<ControlMessage> {
        if let ControlMessage::Connect { id: target } = &msg {
            self.refresh_observed(*target);
        }
        // Introductions and accepts change what the two peers may relay to each other.
        let other_side = match &msg {
            ControlMessage::Accept { peer, .. } | ControlMessage::Connect { id: peer } => {
                Some(*peer)
            }
            _ => None,
        };
        let Outcome {
            reply,
            pushes,
            persist,
        } = lock(&self.registry).handle(conn, id, observed, msg, OffsetDateTime::now_utc());
        if let (Some(other), Some(ControlMessage::Ack {} | ControlMessage::Punch { .. })) =
            (other_side, &reply)
        {
            // Their relay sessions forget cached answers about each other (so that an answer
            // from before does not hold up the new one), and flush what they held on accept.
            self.relay.permissions_changed(id, other);
        }
        if let Some((who, record)) = persist {
            if durable {
                if let Err(e) = self.store.put(who, record).await {
                    tracing::error!(error = %e, "could not persist registration");
                    return Some(ControlMessage::error(
                        ErrorCode::Internal,
                        "registration could not be stored; try again",
                    ));
                }
            } else {
                self.store.put_later(who, record);
            }
        }
        for (target, push) in pushes {
            let sender = lock(&self.online).get(&target).map(|o| o.pusher.clone());
            match sender {
                Some(sender) => {
                    if sender.try_send(push).is_err() {
                        tracing::warn!(conn = target, "push queue full or closed; dropped");
                    }
                }
                None => tracing::warn!(conn = target, "push target has no control stream"),
            }
        }
        reply
    }
}

impl Shared {
    /// Registered peers, online peers and the registry's counters (lock held only to copy).
    pub(crate) fn registry_view(&self) -> (u64, u64, crate::core::Counters) {
        let registry = lock(&self.registry);
        (
            registry.registered() as u64,
            registry.online() as u64,
            registry.counters(),
        )
    }

    /// A TCP tunnel from `remote` carries the packets of `virtual_addr` (`Some`), or closed
    /// (`None`): registrations through it count against `remote` (see
    /// [`Registry::tunnel_opened`]).
    pub(crate) fn tunnel_source(&self, virtual_addr: SocketAddr, remote: Option<std::net::IpAddr>) {
        let mut registry = lock(&self.registry);
        match remote {
            Some(remote) => registry.tunnel_opened(virtual_addr, remote),
            None => registry.tunnel_closed(virtual_addr),
        }
    }

    /// Before introducing `target`, take its address from its live connection: after a NAT
    /// rebinding QUIC migrates at once, long before the peer sends another request.
    fn refresh_observed(&self, target: PeerId) {
        let (conn_id, recorded) = {
            let registry = lock(&self.registry);
            (
                registry.connection_of(&target),
                registry.observed_of(&target),
            )
        };
        let Some(conn_id) = conn_id else { return };
        let current = lock(&self.online)
            .get(&conn_id)
            .map(|o| o.conn.remote_address());
        let Some(current) = current else { return };
        if Some(current) == recorded {
            return;
        }
        let persist = lock(&self.registry).observe(target, current, OffsetDateTime::now_utc());
        if let Some((who, record)) = persist {
            tracing::info!(peer = %who, observed = %current, "address changed");
            self.store.put_later(who, record);
        }
    }
}

/// Accepts connections until `shutdown` flips, then closes everything and waits for tasks.
pub(crate) async fn serve(
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(shared.limits.max_connections));
    let mut tasks = JoinSet::new();
    tasks.spawn(log_counters(shared.clone(), shutdown.clone()));
    tasks.spawn(expire_rows(shared.clone(), shutdown.clone()));
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    tracing::warn!(remote = %incoming.remote_address(), "connection limit reached; refusing");
                    incoming.refuse();
                    continue;
                };
                let shared = shared.clone();
                let shutdown = shutdown.clone();
                tasks.spawn(async move {
                    let remote = incoming.remote_address();
                    if let Err(e) = handle_connection(incoming, shared, shutdown).await {
                        tracing::debug!(%remote, error = %e, "connection ended");
                    }
                    drop(permit);
                });
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            _ = shutdown.changed() => break,
        }
    }
    endpoint.close(CLOSE_SHUTDOWN.into(), b"server shutting down");
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(5), drain)
        .await
        .is_err()
    {
        tracing::warn!("tasks still running after 5 s; aborting them");
        tasks.shutdown().await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
}

/// Logs the relay counters every minute while they change, and once at shutdown.
async fn log_counters(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let mut last = String::new();
    let mut ticker = tokio::time::interval(Duration::from_secs(60));
    loop {
        let stop = tokio::select! {
            _ = ticker.tick() => false,
            _ = shutdown.changed() => true,
        };
        let summary = shared.relay.counters.summary();
        if summary != last || stop {
            tracing::info!("{summary}");
            last = summary;
        }
        if stop {
            return;
        }
    }
}

/// Deletes registry rows whose peers have been offline too long, periodically, in bounded
/// chunks: from memory under the lock, then durably from storage.
async fn expire_rows(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    // Often enough that a row outlives its expiry by a small fraction of it (a minute at most),
    // rarely enough to cost nothing.
    let expire_after = lock(&shared.registry).limits().expire_after;
    let every = (expire_after / 8).clamp(Duration::from_millis(100), Duration::from_secs(60));
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        loop {
            let expired = lock(&shared.registry).expire(OffsetDateTime::now_utc(), EXPIRY_CHUNK);
            let (n, full_chunk) = (expired.len(), expired.len() == EXPIRY_CHUNK);
            if n == 0 {
                break;
            }
            if let Err(e) = shared.store.delete_expired(expired).await {
                // The rows are gone from memory; storage drops them at the next start.
                tracing::error!(error = %e, rows = n, "could not delete expired rows");
                break;
            }
            tracing::info!(rows = n, "expired registry rows of peers offline too long");
            if !full_chunk {
                break;
            }
            tokio::task::yield_now().await;
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("handshake: {0}")]
    Handshake(#[from] quinn::ConnectionError),
    #[error("client certificate: {0}")]
    Identity(String),
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("frame: {0}")]
    Frame(#[from] FrameIoError),
    #[error("stream: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("{0}")]
    Protocol(String),
}

fn peer_id_of(conn: &Connection) -> Result<PeerId, ConnError> {
    let cert = transport::remote_certificate(conn).map_err(|e| ConnError::Identity(e.into()))?;
    certs::peer_id_of_cert(&cert).map_err(|e| ConnError::Identity(e.to_string()))
}

/// Sends a reply or push; error replies are counted by code for the operator.
async fn send(
    shared: &Shared,
    stream: &mut SendStream,
    msg: &ControlMessage,
) -> Result<(), ConnError> {
    if let ControlMessage::Error { code, .. } = msg {
        shared.rejections.count(*code);
    }
    write_frame(stream, &msg.encode()).await?;
    Ok(())
}

async fn handle_connection(
    incoming: quinn::Incoming,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ConnError> {
    let conn = tokio::time::timeout(REGISTER_TIMEOUT, incoming)
        .await
        .map_err(|_| ConnError::Timeout("handshake"))??;
    let id = peer_id_of(&conn)?;
    let conn_id = conn.stable_id() as ConnId;
    let (mut control_tx, control_rx) = tokio::time::timeout(REGISTER_TIMEOUT, conn.accept_bi())
        .await
        .map_err(|_| ConnError::Timeout("control stream"))??;

    // Control frames are read by their own task: reading a frame is not cancel-safe, so it must
    // not sit in the select! below.
    let (frames_tx, mut frames) = mpsc::channel(16);
    let reader = tokio::spawn(read_frames(control_rx, frames_tx));

    let result = async {
        let first = tokio::time::timeout(REGISTER_TIMEOUT, frames.recv())
            .await
            .map_err(|_| ConnError::Timeout("register"))?;
        let first = match first {
            Some(Ok(body)) => body,
            Some(Err(e)) => return Err(reject_frame(&shared, &conn, &mut control_tx, e).await),
            None => return Err(ConnError::Protocol("control stream closed before register".into())),
        };
        let msg = match ControlMessage::decode(&first) {
            Ok(msg @ ControlMessage::Register { .. }) => msg,
            Ok(other) => {
                let err = ControlMessage::error(
                    ErrorCode::NotRegistered,
                    format!("the first message must be `register`, got `{}`", other.kind()),
                );
                send(&shared, &mut control_tx, &err).await?;
                finish_and_wait(&mut control_tx).await;
                return Err(ConnError::Protocol("no register".into()));
            }
            Err(e) => {
                send(&shared, &mut control_tx, &ControlMessage::error(e.code(), e.to_string())).await?;
                finish_and_wait(&mut control_tx).await;
                return Err(ConnError::Protocol(e.to_string()));
            }
        };
        let reply = shared
            .apply(conn_id, id, conn.remote_address(), msg, true)
            .await;
        let registered = matches!(reply, Some(ControlMessage::Registered { .. }));
        if let Some(reply) = reply {
            send(&shared, &mut control_tx, &reply).await?;
        }
        if !registered {
            finish_and_wait(&mut control_tx).await;
            return Err(ConnError::Protocol("registration refused".into()));
        }
        tracing::info!(peer = %id, observed = %conn.remote_address(), "registered");

        let (push_tx, mut push_rx) = mpsc::channel(PUSH_QUEUE);
        lock(&shared.online).insert(
            conn_id,
            Online {
                pusher: push_tx,
                conn: conn.clone(),
            },
        );
        let mut limiter = TokenBucket::new(
            shared.limits.request_burst,
            shared.limits.requests_per_second,
            Instant::now(),
        );
        let mut requests = JoinSet::new();
        let outcome = loop {
            tokio::select! {
                frame = frames.recv() => match frame {
                    Some(Ok(body)) => {
                        let reply = if limiter.try_take(Instant::now()) {
                            match ControlMessage::decode(&body) {
                                Ok(msg) => shared.apply(conn_id, id, conn.remote_address(), msg, false).await,
                                Err(e) => Some(ControlMessage::error(e.code(), e.to_string())),
                            }
                        } else {
                            Some(ControlMessage::error(ErrorCode::RateLimited, "too many requests; slow down"))
                        };
                        if let Some(reply) = reply {
                            send(&shared, &mut control_tx, &reply).await?;
                        }
                    }
                    Some(Err(e)) => break Err(reject_frame(&shared, &conn, &mut control_tx, e).await),
                    None => break Ok(()),
                },
                Some(push) = push_rx.recv() => send(&shared, &mut control_tx, &push).await?,
                stream = conn.accept_bi() => match stream {
                    Ok((tx, rx)) => {
                        let allowed = limiter.try_take(Instant::now());
                        let shared = shared.clone();
                        let conn = conn.clone();
                        requests.spawn(async move {
                            if let Err(e) = handle_request(&shared, &conn, conn_id, id, tx, rx, allowed).await {
                                tracing::debug!(peer = %id, error = %e, "request failed");
                            }
                        });
                    }
                    Err(_) => break Ok(()),
                },
                Some(_) = requests.join_next(), if !requests.is_empty() => {}
                _ = shutdown.changed() => break Ok(()),
            }
        };
        requests.shutdown().await;
        outcome
    }
    .await;

    reader.abort();
    lock(&shared.online).remove(&conn_id);
    let gone = lock(&shared.registry).disconnected(conn_id, id, OffsetDateTime::now_utc());
    if let Some((who, record)) = gone {
        shared.store.put_later(who, record);
        tracing::info!(peer = %id, "offline");
    }
    result
}

/// Finishes a stream and waits (briefly) until the peer has it all: dropping the connection
/// right after would discard the error reply still in flight.
async fn finish_and_wait(stream: &mut SendStream) {
    let _ = stream.finish();
    let _ = tokio::time::timeout(Duration::from_millis(500), stream.stopped()).await;
}

/// Answers a bad frame on the control stream and closes the connection: after a bad length the
/// stream cannot be resynchronised.
async fn reject_frame(
    shared: &Shared,
    conn: &Connection,
    control_tx: &mut SendStream,
    err: FrameIoError,
) -> ConnError {
    let code = match &err {
        FrameIoError::Frame(FrameError::TooLarge { .. }) => ErrorCode::TooLarge,
        _ => ErrorCode::BadRequest,
    };
    let _ = send(
        shared,
        control_tx,
        &ControlMessage::error(code, err.to_string()),
    )
    .await;
    // Give the error a moment to leave before the close frame discards unsent data.
    finish_and_wait(control_tx).await;
    conn.close(CLOSE_PROTOCOL.into(), b"bad frame");
    ConnError::Frame(err)
}

async fn read_frames(mut recv: RecvStream, frames: mpsc::Sender<Result<Vec<u8>, FrameIoError>>) {
    loop {
        let frame = read_frame(&mut recv).await;
        let stop = !matches!(frame, Ok(Some(_)));
        let item = match frame {
            Ok(Some(body)) => Ok(body),
            Ok(None) => return,
            Err(e) => Err(e),
        };
        if frames.send(item).await.is_err() || stop {
            return;
        }
    }
}

/// One request on its own stream: one frame in, one frame out.
async fn handle_request(
    shared: &Shared,
    conn: &Connection,
    conn_id: ConnId,
    id: PeerId,
    mut tx: SendStream,
    mut rx: RecvStream,
    allowed: bool,
) -> Result<(), ConnError> {
    let reply = if !allowed {
        ControlMessage::error(ErrorCode::RateLimited, "too many requests; slow down")
    } else {
        match tokio::time::timeout(REQUEST_TIMEOUT, read_frame(&mut rx)).await {
            Err(_) => return Err(ConnError::Timeout("request")),
            Ok(Ok(None)) => return Ok(()),
            Ok(Err(FrameIoError::Frame(e))) => ControlMessage::error(
                match e {
                    FrameError::TooLarge { .. } => ErrorCode::TooLarge,
                    FrameError::Truncated { .. } => ErrorCode::BadRequest,
                },
                e.to_string(),
            ),
            Ok(Err(e)) => return Err(e.into()),
            Ok(Ok(Some(body))) => match ControlMessage::decode(&body) {
                Ok(ControlMessage::RelayOpen {}) => 'relay: {
                    let limits = shared.limits.relay;
                    let Some(opened) = shared.relay.open(id, conn_id, limits) else {
                        break 'relay ControlMessage::error(
                            ErrorCode::RelayDenied,
                            "this connection already has a relay stream (one per connection)",
                        );
                    };
                    let ready = ControlMessage::RelayReady {
                        max_packet: common::relay::MAX_RELAY_PACKET as u32,
                        rate_bytes_per_s: limits.rate_bytes_per_s,
                    };
                    send(shared, &mut tx, &ready).await?;
                    tracing::debug!(peer = %id, "relay stream open");
                    let permission = |to: PeerId| match lock(&shared.registry).relay_allowed(
                        id,
                        to,
                        OffsetDateTime::now_utc(),
                    ) {
                        Ok(()) => Permission::Allowed,
                        Err(RelayRefusal::NotAccepted) => Permission::AwaitingAccept,
                        Err(_) => Permission::Denied,
                    };
                    crate::relay::run(opened, tx, rx, permission).await;
                    return Ok(());
                }
                Ok(ControlMessage::Register { .. }) => ControlMessage::error(
                    ErrorCode::BadRequest,
                    "`register` belongs on the control stream",
                ),
                Ok(msg) => shared
                    .apply(conn_id, id, conn.remote_address(), msg, false)
                    .await
                    .unwrap_or_else(|| ControlMessage::error(ErrorCode::Internal, "no reply")),
                Err(e) => ControlMessage::error(e.code(), e.to_string()),
            },
        }
    };
    send(shared, &mut tx, &reply).await?;
    let _ = tx.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), tx.stopped()).await;
    Ok(())
}
