//! The node-to-node link of the cross-node relay (`serve --cluster ... --cluster-link ADDR
//! --cluster-key-file FILE`): when two peers that need the relay are registered on different
//! nodes, the packets one sends to its node cross to the other's node over a QUIC connection
//! between the two nodes, and go down the other's relay stream there. The nodes forward the
//! peers' packets as opaque bytes (the peers' own end-to-end encrypted QUIC packets).
//!
//! - **Authentication.** The nodes share a cluster key (32 random bytes, hex in a file). TLS
//!   1.3 runs with the nodes' own keys (for encryption only); then each side proves it holds the
//!   cluster key with an HMAC-SHA256 over a value exported from that very TLS session (RFC
//!   5705 exporter), its node id and the other's, and its incarnation (a random number per
//!   process, which tells a restarted node from a duplicate link): a stranger without the key
//!   cannot complete the exchange, a recorded exchange is worth nothing in another session, and
//!   a man in the middle (two sessions, two exported values) fails both ways. Nothing is read from a link before
//!   the dialer's proof checked; the dialer sends nothing but its proof before the acceptor's
//!   proof checked. A refused attempt is closed and counted.
//! - **Links.** Each node announces its link address in its `rv:node:{node}` entry. A link is
//!   opened on first need (a packet or an accept for a peer on that node), reused, and opened
//!   again on the next need after it failed (not sooner than [`REDIAL_AFTER`]); a dead link is
//!   noticed within [`LINK_IDLE_TIMEOUT`], and a restarted node's new link replaces it at once.
//!   One per pair of nodes: if both dial at once, both keep the one dialed by the node whose id
//!   sorts first.
//! - **Bounds.** A queue of [`LINK_QUEUE_BYTES`] per link (batches beyond it are dropped and
//!   counted, as for a peer's relay queue), frames of at most [`MAX_LINK_BATCH`] bytes,
//!   [`MAX_PENDING_LINKS`] attempts being authenticated at once (more are refused), at most
//!   [`crate::cluster::MAX_NODES`] links, [`MAX_ROUTES`] peers whose node is remembered.
//! - **Consent and limits.** Both nodes check the introduction (the sender's node its own
//!   record of it, the destination's node the accept it saw) and both charge the sender's relay
//!   allowance (rate, quota), as for a local relay; the destination's queue bounds what waits.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use common::PeerId;
use quinn::{Connection, RecvStream, SendStream};
use ring::hmac;
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::cluster::{check_node_id, Cluster, ClusterError, MAX_NODES, MAX_NODE_ID};
use crate::relay::{Batch, Dropped, Sink};

/// The ALPN of the node-to-node link.
pub const ALPN_NODE_LINK: &[u8] = b"rendezvous-node-link/1";
/// The TLS server name the link dials (the certificate is not checked by name).
const LINK_SERVER_NAME: &str = "rendezvous-node";
/// Bytes of the cluster key.
pub const KEY_BYTES: usize = 32;
/// Bytes queued towards one link before batches are dropped.
pub const LINK_QUEUE_BYTES: usize = 4 * 1024 * 1024;
/// Largest batch of relay frames in one link frame.
pub const MAX_LINK_BATCH: usize = 256 * 1024;
/// Link attempts being handshaken or authenticated at once; more are refused.
pub const MAX_PENDING_LINKS: usize = 16;
/// How long a link attempt may take: QUIC handshake, then the key proofs.
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(5);
/// After a failed dial, how long before the next need dials again (meanwhile packets for that
/// node are dropped, counted as no route).
pub const REDIAL_AFTER: Duration = Duration::from_secs(1);
/// Peers on other nodes whose node is remembered (one per cross-node introduction).
pub const MAX_ROUTES: usize = 65_536;
/// How long a peer's node is remembered after the introduction that taught it: as long as the
/// introduction's consent lasts.
pub const ROUTE_TTL: Duration = Duration::from_secs(3600 + 120);
/// A link this young, dialed by the node whose id sorts first, is kept when the other node's
/// link arrives (both dialed at once); an older one is replaced (the other node lost it: it
/// restarted, or the link died on its side).
const RACE_WINDOW: Duration = Duration::from_secs(10);
/// How long a replaced link waits for the other side to finish its stream.
const RETIRE_GRACE: Duration = Duration::from_secs(10);
/// Most bytes read from a link at once.
const READ_CHUNK: usize = 64 * 1024;
/// QUIC windows of an authenticated link: sized for relay traffic between data centres
/// (8 MiB: about 400 MB/s at 20 ms).
pub const LINK_WINDOW: u32 = 8 * 1024 * 1024;
/// The connection's receive window before the other side has proved the key: what a stranger
/// can make a node buffer per attempt.
pub const UNAUTHENTICATED_WINDOW: u32 = 16 * 1024;
/// A link that hears nothing (not even keep-alives, sent every 2 s) for this long is dead.
pub const LINK_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of the exported keying material the proofs cover.
const EKM_BYTES: usize = 32;
/// The exporter label (RFC 5705 / RFC 8446 section 7.5).
const EKM_LABEL: &[u8] = b"EXPORTER-rendezvous-node-link";
/// The first bytes of both proofs.
const MAGIC: &[u8; 8] = b"RVLINK1\0";
/// Link frame tags.
const TAG_PACKETS: u8 = 1;
const TAG_CONSENT: u8 = 2;
/// Header of a packets frame: tag, destination, length.
const PACKETS_HEADER: usize = 1 + 16 + 4;
/// A consent frame: tag, requester, target, nonce.
const CONSENT_FRAME: usize = 1 + 16 + 16 + 8;
/// Application close codes of a link.
const CLOSE_REFUSED: u32 = 1;
const CLOSE_TOO_MANY: u32 = 2;
const CLOSE_SHUTDOWN: u32 = 3;

/// The key the nodes of a cluster share: whoever holds it may open node-to-node links.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterKey([u8; KEY_BYTES]);

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.write_str("ClusterKey(..)")
    }
}

/// Why the link cannot be set up or used.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The key file cannot be read.
    #[error("cluster key file {path}: {source}")]
    KeyFile {
        /// The file.
        path: std::path::PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The key file is readable by others.
    #[error(
        "cluster key file {path} has mode {mode:o}: others could read the cluster key; run \
         `chmod 600 {path}`"
    )]
    KeyPermissions {
        /// The file.
        path: std::path::PathBuf,
        /// Its mode bits.
        mode: u32,
    },
    /// The key is not 64 hex digits.
    #[error("cluster key: expected 64 hex digits (make one with `openssl rand -hex 32`), {0}")]
    BadKey(String),
    /// The link endpoint cannot be set up.
    #[error("node link on {addr}: {message}")]
    Endpoint {
        /// The address.
        addr: SocketAddr,
        /// What failed.
        message: String,
    },
    /// The other node announces no link address.
    #[error("node {0} announces no node link address")]
    NoAddress(String),
    /// The cluster registry could not be asked.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// The QUIC connection failed.
    #[error("node link: {0}")]
    Connection(String),
    /// The other side did not prove the cluster key (or spoke something else).
    #[error("node link refused: {0}")]
    Refused(String),
    /// The attempt took longer than [`AUTH_TIMEOUT`].
    #[error("node link: no answer within {AUTH_TIMEOUT:?}")]
    Timeout,
}

impl ClusterKey {
    /// A key from its bytes.
    pub fn from_bytes(bytes: [u8; KEY_BYTES]) -> Self {
        ClusterKey(bytes)
    }

    /// A fresh random key.
    pub fn generate() -> Self {
        ClusterKey(rand::random())
    }

    /// The key as 64 hex digits (what the key file holds).
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses 64 hex digits (surrounding whitespace ignored).
    pub fn parse(text: &str) -> Result<Self, LinkError> {
        let text = text.trim();
        if text.len() != 2 * KEY_BYTES {
            return Err(LinkError::BadKey(format!("got {} characters", text.len())));
        }
        let mut key = [0u8; KEY_BYTES];
        for (i, byte) in key.iter_mut().enumerate() {
            *byte = text
                .get(2 * i..2 * i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| LinkError::BadKey("found a character that is not hex".into()))?;
        }
        Ok(ClusterKey(key))
    }

    /// Loads the key file (at most 1 KiB read); refuses a file others can read.
    pub fn load(path: &Path) -> Result<Self, LinkError> {
        use std::os::unix::fs::PermissionsExt;
        let io = |source| LinkError::KeyFile {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let mode = file.metadata().map_err(io)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(LinkError::KeyPermissions {
                path: path.to_owned(),
                mode,
            });
        }
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::Read::take(file, 1024), &mut text)
            .map_err(io)?;
        Self::parse(&text)
    }

    fn hmac_key(&self) -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, &self.0)
    }
}

/// `--cluster-link ADDR [--cluster-link-announce ADDR] --cluster-key-file FILE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkConfig {
    /// Where the link endpoint listens (UDP).
    pub listen: SocketAddr,
    /// The address the other nodes dial (announced in Redis); `None`: the bound address, which
    /// must then be a specific IP.
    pub announce: Option<SocketAddr>,
    /// The cluster key.
    pub key: ClusterKey,
}

/// Counters of the node links, for the operator.
#[derive(Debug, Default)]
pub struct LinkCounters {
    /// Relayed packets sent to other nodes.
    pub packets_sent: AtomicU64,
    /// Their packet bytes.
    pub bytes_sent: AtomicU64,
    /// Relayed packets received from other nodes and queued for a peer here.
    pub packets_received: AtomicU64,
    /// Their packet bytes.
    pub bytes_received: AtomicU64,
    /// Link attempts refused: no proof of the cluster key (or a bad one), too many attempts at
    /// once, too many links.
    pub refused: AtomicU64,
    /// Dials that failed (the other node unreachable, or it did not prove the key).
    pub dial_failures: AtomicU64,
    /// Batches for another node dropped: its link's queue full, or no link.
    pub dropped: AtomicU64,
}

fn add(counter: &AtomicU64, n: u64) {
    if n > 0 {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

fn sub(counter: &AtomicU64, n: u64) {
    if n > 0 {
        let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
            Some(v.saturating_sub(n))
        });
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What a node does with what arrives over its links (the server's side).
pub trait LinkHandler: Send + Sync {
    /// Relay frames (`{from, packet}`, as the relay stream carries them) for the peer `to` on
    /// this node, from the node `node`; what is queued for `to` is counted in
    /// [`LinkCounters::packets_received`] and [`LinkCounters::bytes_received`].
    fn packets(&self, node: &str, to: PeerId, frames: &[u8]);
    /// The node `node` saw `target` accept the introduction `nonce` that `requester` (on this
    /// node) asked for.
    fn consent(&self, node: &str, requester: PeerId, target: PeerId, nonce: u64);
}

/// A frame of the link.
#[derive(Debug, PartialEq, Eq)]
pub enum LinkFrame<'a> {
    /// Relay frames for the peer `to`.
    Packets {
        /// The destination (on the receiving node).
        to: PeerId,
        /// Relay frames `{from, packet}`.
        frames: &'a [u8],
    },
    /// An accept seen on the sending node.
    Consent {
        /// Who asked for the introduction (on the receiving node).
        requester: PeerId,
        /// Who accepted it (on the sending node).
        target: PeerId,
        /// The introduction's nonce.
        nonce: u64,
    },
}

/// A link frame that cannot be decoded: the link cannot be trusted any more.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkFrameError {
    /// Unknown tag.
    #[error("unknown link frame tag {0}")]
    Tag(u8),
    /// A batch longer than [`MAX_LINK_BATCH`].
    #[error("link frame of {0} bytes, at most {MAX_LINK_BATCH}")]
    TooLong(usize),
    /// A peer id that is not one.
    #[error("bad peer id in a link frame")]
    PeerId,
}

/// Encodes a packets frame: relay frames (`{from, packet}`) for `to`. `None` if too long.
pub fn encode_packets(to: &PeerId, frames: &[u8]) -> Option<Vec<u8>> {
    if frames.len() > MAX_LINK_BATCH {
        return None;
    }
    let mut out = Vec::with_capacity(PACKETS_HEADER + frames.len());
    out.push(TAG_PACKETS);
    out.extend_from_slice(to.as_bytes());
    out.extend_from_slice(&(frames.len() as u32).to_be_bytes());
    out.extend_from_slice(frames);
    Some(out)
}

/// Encodes a consent frame.
pub fn encode_consent(requester: &PeerId, target: &PeerId, nonce: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(CONSENT_FRAME);
    out.push(TAG_CONSENT);
    out.extend_from_slice(requester.as_bytes());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(&nonce.to_be_bytes());
    out
}

fn peer_at(bytes: &[u8]) -> Result<PeerId, LinkFrameError> {
    let id: [u8; 16] = bytes
        .get(..16)
        .and_then(|b| b.try_into().ok())
        .ok_or(LinkFrameError::PeerId)?;
    PeerId::from_bytes(id).map_err(|_| LinkFrameError::PeerId)
}

/// Splits a link's byte stream into frames; holds at most one partial frame plus one read.
#[derive(Debug, Default)]
pub struct LinkDecoder {
    buf: Vec<u8>,
    start: usize,
}

impl LinkDecoder {
    /// Appends bytes read from the link.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame, if any.
    pub fn next_frame(&mut self) -> Result<Option<LinkFrame<'_>>, LinkFrameError> {
        let rest = &self.buf[self.start..];
        let Some(&tag) = rest.first() else {
            return Ok(None);
        };
        match tag {
            TAG_PACKETS => {
                if rest.len() < PACKETS_HEADER {
                    return Ok(None);
                }
                let to = peer_at(&rest[1..])?;
                let len = u32::from_be_bytes([rest[17], rest[18], rest[19], rest[20]]) as usize;
                if len > MAX_LINK_BATCH {
                    return Err(LinkFrameError::TooLong(len));
                }
                if rest.len() < PACKETS_HEADER + len {
                    return Ok(None);
                }
                let start = self.start + PACKETS_HEADER;
                self.start += PACKETS_HEADER + len;
                Ok(Some(LinkFrame::Packets {
                    to,
                    frames: &self.buf[start..start + len],
                }))
            }
            TAG_CONSENT => {
                if rest.len() < CONSENT_FRAME {
                    return Ok(None);
                }
                let requester = peer_at(&rest[1..])?;
                let target = peer_at(&rest[17..])?;
                let mut nonce = [0u8; 8];
                nonce.copy_from_slice(&rest[33..41]);
                self.start += CONSENT_FRAME;
                Ok(Some(LinkFrame::Consent {
                    requester,
                    target,
                    nonce: u64::from_be_bytes(nonce),
                }))
            }
            other => Err(LinkFrameError::Tag(other)),
        }
    }

    /// Bytes pushed and not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Bytes held now.
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }
}

/// The proof a side sends: HMAC(key, role || exported || node ids || its incarnation), see
/// [`signed_input`].
fn proof(
    key: &hmac::Key,
    role: &[u8],
    ekm: &[u8],
    ids: (&str, &str),
    incarnation: u64,
) -> hmac::Tag {
    hmac::sign(key, &signed_input(role, ekm, ids, incarnation))
}

fn exported(conn: &Connection) -> Result<[u8; EKM_BYTES], LinkError> {
    let mut ekm = [0u8; EKM_BYTES];
    conn.export_keying_material(&mut ekm, EKM_LABEL, b"")
        .map_err(|_| LinkError::Connection("TLS exporter unavailable".into()))?;
    Ok(ekm)
}

fn refused(why: impl Into<String>) -> LinkError {
    LinkError::Refused(why.into())
}

/// The dialer's first step: opens the link's stream and sends the hello (this node's id, the
/// id of the node it means to reach, this process's `incarnation` and its proof of `key`).
/// Public for the attack tests: a stranger with a wrong key gets this far and no further.
pub async fn dialer_hello(
    conn: &Connection,
    key: &ClusterKey,
    me: &str,
    them: &str,
    incarnation: u64,
) -> Result<(SendStream, RecvStream), LinkError> {
    let ekm = exported(conn)?;
    let (mut send, recv) = conn
        .open_bi()
        .await
        .map_err(|e| LinkError::Connection(e.to_string()))?;
    let tag = proof(&key.hmac_key(), b"dialer", &ekm, (me, them), incarnation);
    let mut hello = MAGIC.to_vec();
    for id in [me, them] {
        hello.push(id.len() as u8);
        hello.extend_from_slice(id.as_bytes());
    }
    hello.extend_from_slice(&incarnation.to_be_bytes());
    hello.extend_from_slice(tag.as_ref());
    send.write_all(&hello)
        .await
        .map_err(|e| LinkError::Connection(e.to_string()))?;
    Ok((send, recv))
}

/// The dialer's second step: checks the acceptor's proof; returns the acceptor's incarnation.
pub async fn dialer_check(
    conn: &Connection,
    recv: &mut RecvStream,
    key: &ClusterKey,
    me: &str,
    them: &str,
) -> Result<u64, LinkError> {
    let ekm = exported(conn)?;
    let mut answer = [0u8; 8 + 8 + 32];
    recv.read_exact(&mut answer)
        .await
        .map_err(|e| refused(format!("node {them} did not answer the hello: {e}")))?;
    if &answer[..8] != MAGIC {
        return Err(refused(format!("node {them} does not speak the node link")));
    }
    let mut incarnation = [0u8; 8];
    incarnation.copy_from_slice(&answer[8..16]);
    let incarnation = u64::from_be_bytes(incarnation);
    // Constant time: ring compares the tags.
    hmac::verify(
        &key.hmac_key(),
        &signed_input(b"acceptor", &ekm, (them, me), incarnation),
        &answer[16..],
    )
    .map_err(|_| refused(format!("node {them} did not prove the cluster key")))?;
    Ok(incarnation)
}

/// What a proof signs: the role, the exported keying material, both node ids (each
/// length-prefixed, so that no two inputs concatenate alike; the signer's first) and the
/// signer's incarnation.
fn signed_input(
    role: &[u8],
    ekm: &[u8],
    (first, second): (&str, &str),
    incarnation: u64,
) -> Vec<u8> {
    let mut out = role.to_vec();
    out.extend_from_slice(ekm);
    out.push(first.len() as u8);
    out.extend_from_slice(first.as_bytes());
    out.push(second.len() as u8);
    out.extend_from_slice(second.as_bytes());
    out.extend_from_slice(&incarnation.to_be_bytes());
    out
}

async fn read_id(recv: &mut RecvStream) -> Result<String, LinkError> {
    let len = recv
        .read_u8()
        .await
        .map_err(|e| refused(format!("hello: {e}")))? as usize;
    if len == 0 || len > MAX_NODE_ID {
        return Err(refused("hello: bad node id length"));
    }
    let mut id = vec![0u8; len];
    recv.read_exact(&mut id)
        .await
        .map_err(|e| refused(format!("hello: {e}")))?;
    let id = String::from_utf8(id).map_err(|_| refused("hello: node id not UTF-8"))?;
    check_node_id(&id).map_err(|e| refused(e.to_string()))?;
    Ok(id)
}

/// The acceptor's side: reads the dialer's hello (bounded), checks its proof, answers with its
/// own. Returns the dialer's node id and incarnation, and the stream.
async fn accept_hello(
    conn: &Connection,
    key: &ClusterKey,
    me: &str,
    incarnation: u64,
) -> Result<(String, u64, SendStream, RecvStream), LinkError> {
    let ekm = exported(conn)?;
    let (mut send, mut recv) = conn
        .accept_bi()
        .await
        .map_err(|e| LinkError::Connection(e.to_string()))?;
    let mut magic = [0u8; 8];
    recv.read_exact(&mut magic)
        .await
        .map_err(|e| refused(format!("hello: {e}")))?;
    if &magic != MAGIC {
        return Err(refused("not a node link hello"));
    }
    let dialer = read_id(&mut recv).await?;
    let meant = read_id(&mut recv).await?;
    let mut rest = [0u8; 8 + 32];
    recv.read_exact(&mut rest)
        .await
        .map_err(|e| refused(format!("hello: {e}")))?;
    let mut dialer_incarnation = [0u8; 8];
    dialer_incarnation.copy_from_slice(&rest[..8]);
    let dialer_incarnation = u64::from_be_bytes(dialer_incarnation);
    hmac::verify(
        &key.hmac_key(),
        &signed_input(b"dialer", &ekm, (&dialer, &meant), dialer_incarnation),
        &rest[8..],
    )
    .map_err(|_| refused(format!("{dialer:?} did not prove the cluster key")))?;
    if meant != me {
        return Err(refused(format!(
            "{dialer:?} dialed node {meant:?}, this is {me:?}"
        )));
    }
    if dialer == me {
        return Err(refused("a node link to itself"));
    }
    let mut answer = MAGIC.to_vec();
    answer.extend_from_slice(&incarnation.to_be_bytes());
    answer.extend_from_slice(
        proof(
            &key.hmac_key(),
            b"acceptor",
            &ekm,
            (me, &dialer),
            incarnation,
        )
        .as_ref(),
    );
    send.write_all(&answer)
        .await
        .map_err(|e| LinkError::Connection(e.to_string()))?;
    Ok((dialer, dialer_incarnation, send, recv))
}

/// One link (established or being dialed) to a node.
struct Link {
    id: u64,
    /// Which node dialed it (see the one-link rule in [`Links::adopt`]).
    dialer: String,
    /// When it was dialed, or established.
    since: Instant,
    /// The other node's incarnation (a random number per process: a restarted node has
    /// another), once established.
    remote: Option<u64>,
    sink: Sink,
    conn: Option<Connection>,
    /// Dropped with the entry: the link's writer then sends what is queued, finishes its
    /// stream and the link ends once the other side has finished too (nothing queued is lost
    /// when a link is replaced).
    _retire: oneshot::Sender<()>,
}

/// Peers on other nodes, with their node: learned from cross-node introductions.
#[derive(Default)]
struct Routes {
    map: HashMap<PeerId, (String, Instant)>,
}

impl Routes {
    fn set(&mut self, peer: PeerId, node: &str, now: Instant) {
        if self.map.len() >= MAX_ROUTES && !self.map.contains_key(&peer) {
            self.map
                .retain(|_, (_, at)| now.saturating_duration_since(*at) < ROUTE_TTL);
            if self.map.len() >= MAX_ROUTES {
                // Still full of live routes: the oldest goes.
                if let Some(oldest) = self.map.iter().min_by_key(|(_, (_, at))| *at).map(|e| *e.0) {
                    self.map.remove(&oldest);
                }
            }
        }
        self.map.insert(peer, (node.to_owned(), now));
    }

    fn get(&self, peer: &PeerId, now: Instant) -> Option<&str> {
        self.map
            .get(peer)
            .filter(|(_, at)| now.saturating_duration_since(*at) < ROUTE_TTL)
            .map(|(node, _)| node.as_str())
    }
}

/// A node's links to the other nodes of its cluster.
pub struct Links {
    node: String,
    key: ClusterKey,
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    cluster: Arc<Cluster>,
    links: Mutex<HashMap<String, Link>>,
    failed: Mutex<HashMap<String, Instant>>,
    routes: Mutex<Routes>,
    handler: OnceLock<Weak<dyn LinkHandler>>,
    shutdown: OnceLock<watch::Receiver<bool>>,
    pending: Arc<Semaphore>,
    next_id: AtomicU64,
    /// A random number of this process, sent in the hellos: the other nodes tell a restart of
    /// this node by it.
    incarnation: u64,
    announce: SocketAddr,
    /// Counters.
    pub counters: LinkCounters,
}

fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    // One stream each way carries everything. Until the other side has proved the key, the
    // connection's receive window is small (what a stranger can make us buffer); then it grows
    // to LINK_WINDOW for relay traffic (see `authenticated`). No datagrams.
    t.max_concurrent_bidi_streams(1u32.into())
        .max_concurrent_uni_streams(0u32.into())
        .stream_receive_window(LINK_WINDOW.into())
        .receive_window(UNAUTHENTICATED_WINDOW.into())
        .send_window(u64::from(LINK_WINDOW))
        .datagram_receive_buffer_size(None)
        .keep_alive_interval(Some(Duration::from_secs(2)));
    // A dead node's link is noticed within this (then opened again on the next need).
    if let Ok(idle) = quinn::IdleTimeout::try_from(LINK_IDLE_TIMEOUT) {
        t.max_idle_timeout(Some(idle));
    }
    Arc::new(t)
}

impl Links {
    /// Binds the link endpoint (TLS with the node's own key) and returns the links, not yet
    /// accepting: see [`Links::run`].
    pub fn bind(
        config: &LinkConfig,
        identity: &certs::Identity,
        cluster: Arc<Cluster>,
    ) -> Result<Arc<Links>, LinkError> {
        let endpoint_err = |message: String| LinkError::Endpoint {
            addr: config.listen,
            message,
        };
        let server_tls = certs::server_config(identity, &[ALPN_NODE_LINK])
            .map_err(|e| endpoint_err(e.to_string()))?;
        let server_crypto = quinn::crypto::rustls::QuicServerConfig::try_from(server_tls)
            .map_err(|e| endpoint_err(e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
        server.transport_config(transport_config());
        // The TLS layer only encrypts: who may link is decided by the key proofs.
        let client_tls =
            certs::client_config_for_server(identity, certs::ServerTrust::FirstUse, ALPN_NODE_LINK)
                .map_err(|e| endpoint_err(e.to_string()))?;
        let client_crypto = quinn::crypto::rustls::QuicClientConfig::try_from(client_tls)
            .map_err(|e| endpoint_err(e.to_string()))?;
        let mut client = quinn::ClientConfig::new(Arc::new(client_crypto));
        client.transport_config(transport_config());
        let socket =
            transport::bind_udp(config.listen, false).map_err(|e| endpoint_err(e.to_string()))?;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|e| endpoint_err(e.to_string()))?;
        let bound = endpoint
            .local_addr()
            .map_err(|e| endpoint_err(e.to_string()))?;
        let announce =
            match config.announce {
                Some(addr) => addr,
                None if bound.ip().is_unspecified() => return Err(endpoint_err(
                    "listening on a wildcard address: give --cluster-link-announce IP:PORT, the \
                     address the other nodes reach this one at"
                        .into(),
                )),
                None => bound,
            };
        Ok(Arc::new(Links {
            node: cluster.node().to_owned(),
            key: config.key.clone(),
            endpoint,
            client,
            cluster,
            links: Mutex::new(HashMap::new()),
            failed: Mutex::new(HashMap::new()),
            routes: Mutex::new(Routes::default()),
            handler: OnceLock::new(),
            shutdown: OnceLock::new(),
            pending: Arc::new(Semaphore::new(MAX_PENDING_LINKS)),
            next_id: AtomicU64::new(1),
            incarnation: rand::random(),
            announce,
            counters: LinkCounters::default(),
        }))
    }

    /// The address the other nodes dial (announced in Redis).
    pub fn announce(&self) -> SocketAddr {
        self.announce
    }

    /// Established links now.
    pub fn established(&self) -> u64 {
        lock(&self.links)
            .values()
            .filter(|l| l.conn.is_some())
            .count() as u64
    }

    /// `peer` is on `node` (a cross-node introduction was made with it).
    pub fn set_route(&self, peer: PeerId, node: &str) {
        lock(&self.routes).set(peer, node, Instant::now());
    }

    /// The node `peer` is on, if a cross-node introduction taught it.
    pub fn route(&self, peer: &PeerId) -> Option<String> {
        lock(&self.routes)
            .get(peer, Instant::now())
            .map(str::to_owned)
    }

    /// Forwards a relay batch (frames `{from, packet}`) for `to`, a peer on another node.
    /// Counts what is sent; `Err` when there is no route or the link's queue is full.
    pub fn forward(self: &Arc<Self>, to: PeerId, batch: Batch) -> Result<(), Dropped> {
        let Some(node) = self.route(&to) else {
            return Err(Dropped::Closed);
        };
        let Some(frames) = encode_packets(&to, &batch.frames) else {
            return Err(Dropped::QueueFull);
        };
        let (packets, bytes) = (batch.packets, batch.bytes);
        let link_batch = Batch {
            frames,
            packets,
            bytes,
            cost: batch.cost,
        };
        // Counted before the batch is queued: once queued it may reach the other node (and its
        // peer) before this thread goes on, and what the counters say must never lag behind.
        add(&self.counters.packets_sent, packets);
        add(&self.counters.bytes_sent, bytes);
        self.send(&node, link_batch).inspect_err(|_| {
            sub(&self.counters.packets_sent, packets);
            sub(&self.counters.bytes_sent, bytes);
        })
    }

    /// Tells `node` (the requester's) that `target` (here) accepted `requester`'s introduction.
    pub fn send_consent(
        self: &Arc<Self>,
        node: &str,
        requester: PeerId,
        target: PeerId,
        nonce: u64,
    ) {
        let batch = Batch {
            frames: encode_consent(&requester, &target, nonce),
            ..Batch::default()
        };
        if self.send(node, batch).is_err() {
            tracing::debug!(%node, "consent not sent: no link");
        }
    }

    /// Queues a link frame for `node`, dialing the link on first need.
    fn send(self: &Arc<Self>, node: &str, batch: Batch) -> Result<(), Dropped> {
        let sink = {
            let mut links = lock(&self.links);
            match links.get(node) {
                Some(link) => link.sink.clone(),
                None => {
                    let recently_failed = lock(&self.failed)
                        .get(node)
                        .is_some_and(|at| at.elapsed() < REDIAL_AFTER);
                    if recently_failed || links.len() >= MAX_NODES || node == self.node {
                        add(&self.counters.dropped, 1);
                        return Err(Dropped::Closed);
                    }
                    let Some(shutdown) = self.shutdown.get().cloned() else {
                        return Err(Dropped::Closed);
                    };
                    let (sink, rx) = Sink::new(LINK_QUEUE_BYTES);
                    let (retire_tx, retire) = oneshot::channel();
                    let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                    links.insert(
                        node.to_owned(),
                        Link {
                            id,
                            dialer: self.node.clone(),
                            since: Instant::now(),
                            remote: None,
                            sink: sink.clone(),
                            conn: None,
                            _retire: retire_tx,
                        },
                    );
                    let queue = Queue {
                        rx,
                        sink: sink.clone(),
                        retire,
                    };
                    tokio::spawn(self.clone().dial(node.to_owned(), id, queue, shutdown));
                    sink
                }
            }
        };
        sink.offer(batch).map_err(|(why, _)| {
            add(&self.counters.dropped, 1);
            why
        })
    }

    async fn dial(
        self: Arc<Self>,
        node: String,
        id: u64,
        queue: Queue,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let attempt = async {
            let addr = self
                .cluster
                .node_link_addr(&node)
                .await?
                .ok_or_else(|| LinkError::NoAddress(node.clone()))?;
            let connecting = self
                .endpoint
                .connect_with(self.client.clone(), addr, LINK_SERVER_NAME)
                .map_err(|e| LinkError::Connection(e.to_string()))?;
            let conn = connecting
                .await
                .map_err(|e| LinkError::Connection(e.to_string()))?;
            let (send, mut recv) =
                dialer_hello(&conn, &self.key, &self.node, &node, self.incarnation).await?;
            match dialer_check(&conn, &mut recv, &self.key, &self.node, &node).await {
                Ok(remote) => {
                    authenticated(&conn);
                    Ok::<_, LinkError>((conn, remote, send, recv))
                }
                Err(e) => {
                    conn.close(CLOSE_REFUSED.into(), b"no proof of the cluster key");
                    Err(e)
                }
            }
        };
        let result = tokio::select! {
            r = tokio::time::timeout(AUTH_TIMEOUT, attempt) => r.unwrap_or(Err(LinkError::Timeout)),
            _ = shutdown.changed() => Err(LinkError::Connection("shutting down".into())),
        };
        match result {
            Ok((conn, remote, send, recv)) => {
                // If the other node's link won meanwhile (see `adopt`), this one is retired
                // already: what was queued on it is sent, then it ends.
                self.install(&node, id, &conn, remote);
                tracing::info!(%node, "node link open (dialed)");
                self.run_link(node, id, conn, send, recv, queue, shutdown)
                    .await;
            }
            Err(e) => {
                add(&self.counters.dial_failures, 1);
                tracing::warn!(%node, error = %e, "cannot open the node link");
                {
                    let mut failed = lock(&self.failed);
                    if failed.len() >= MAX_NODES {
                        failed.clear();
                    }
                    failed.insert(node.clone(), Instant::now());
                }
                self.remove(&node, id);
                queue.drain();
            }
        }
    }

    /// A dialed link is up: records its connection unless another link replaced it.
    fn install(&self, node: &str, id: u64, conn: &Connection, remote: u64) {
        if let Some(link) = lock(&self.links).get_mut(node).filter(|l| l.id == id) {
            link.conn = Some(conn.clone());
            link.remote = Some(remote);
            link.since = Instant::now();
        }
    }

    /// An accepted, authenticated link from `node`: what this node sends to `node` goes over
    /// it from now on, unless this node dialed `node` itself less than [`RACE_WINDOW`] ago and
    /// its id sorts first (both dialed at once: both nodes then send over the link dialed by
    /// the node whose id sorts first, and the other link, retired at once, only delivers what
    /// was queued on it). A link this node dialed longer ago is replaced: `node` dialing means
    /// it lost that link (it restarted, or the link died on its side). `None`: refused (too
    /// many links).
    fn adopt(&self, node: &str, conn: &Connection, remote: u64) -> Option<(u64, Queue)> {
        let mut links = lock(&self.links);
        let (sink, rx) = Sink::new(LINK_QUEUE_BYTES);
        let (retire_tx, retire) = oneshot::channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let queue = Queue {
            rx,
            sink: sink.clone(),
            retire,
        };
        match links.get(node) {
            Some(existing)
                if keeps_own_link(
                    &self.node,
                    node,
                    &existing.dialer,
                    existing.since.elapsed(),
                    existing.remote.is_none_or(|r| r == remote),
                ) =>
            {
                // Receive only: retired at once.
                drop(retire_tx);
                return Some((id, queue));
            }
            None if links.len() >= MAX_NODES => return None,
            _ => {}
        }
        links.insert(
            node.to_owned(),
            Link {
                id,
                dialer: node.to_owned(),
                since: Instant::now(),
                remote: Some(remote),
                sink,
                conn: Some(conn.clone()),
                _retire: retire_tx,
            },
        );
        Some((id, queue))
    }

    fn remove(&self, node: &str, id: u64) {
        let mut links = lock(&self.links);
        if links.get(node).is_some_and(|l| l.id == id) {
            links.remove(node);
        }
    }

    /// Moves frames both ways until the link fails or the node shuts down. Once retired (its
    /// entry replaced), it sends what is still queued, finishes its stream, and reads until the
    /// other side has finished too (at most [`RETIRE_GRACE`]).
    #[allow(clippy::too_many_arguments)]
    async fn run_link(
        &self,
        node: String,
        id: u64,
        conn: Connection,
        mut send: SendStream,
        mut recv: RecvStream,
        queue: Queue,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let Queue {
            mut rx,
            sink,
            mut retire,
        } = queue;
        let writer = async {
            loop {
                let batch = tokio::select! {
                    biased;
                    batch = rx.recv() => batch,
                    _ = &mut retire => None,
                };
                let Some(batch) = batch else { break };
                let written = send.write_all(&batch.frames).await;
                sink.written(&batch);
                if written.is_err() {
                    return false;
                }
            }
            // Retired: what is still queued goes out, then the stream ends.
            while let Ok(batch) = rx.try_recv() {
                let written = send.write_all(&batch.frames).await;
                sink.written(&batch);
                if written.is_err() {
                    return false;
                }
            }
            send.finish().is_ok()
        };
        let reader = async {
            let mut decoder = LinkDecoder::default();
            loop {
                let chunk = match recv.read_chunk(READ_CHUNK, true).await {
                    Ok(Some(chunk)) => chunk,
                    Ok(None) | Err(_) => return,
                };
                decoder.push(&chunk.bytes);
                loop {
                    let frame = match decoder.next_frame() {
                        Ok(Some(frame)) => frame,
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!(%node, error = %e, "bad node link frame; closing the link");
                            return;
                        }
                    };
                    let Some(handler) = self.handler.get().and_then(Weak::upgrade) else {
                        return;
                    };
                    match frame {
                        LinkFrame::Packets { to, frames } => {
                            handler.packets(&node, to, frames);
                        }
                        LinkFrame::Consent {
                            requester,
                            target,
                            nonce,
                        } => handler.consent(&node, requester, target, nonce),
                    }
                }
            }
        };
        {
            tokio::pin!(writer, reader);
            tokio::select! {
                finished = &mut writer => {
                    if finished {
                        tokio::select! {
                            _ = &mut reader => {}
                            _ = tokio::time::sleep(RETIRE_GRACE) => {}
                            _ = shutdown.changed() => {}
                        }
                    }
                }
                _ = &mut reader => {}
                _ = shutdown.changed() => {}
            }
        }
        conn.close(CLOSE_SHUTDOWN.into(), b"link closed");
        self.remove(&node, id);
        rx.close();
        while let Ok(batch) = rx.try_recv() {
            sink.written(&batch);
        }
        tracing::info!(%node, "node link closed");
    }

    /// Accepts links until shutdown; `handler` gets what arrives over every link.
    pub async fn run(
        self: Arc<Self>,
        handler: Weak<dyn LinkHandler>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let _ = self.handler.set(handler);
        let _ = self.shutdown.set(shutdown.clone());
        let mut tasks = JoinSet::new();
        loop {
            tokio::select! {
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    // Attempts being authenticated, and links (at most one in use per node,
                    // and the retiring ones) are bounded.
                    let permit = match self.pending.clone().try_acquire_owned() {
                        Ok(permit) if tasks.len() < 2 * MAX_NODES + MAX_PENDING_LINKS => Ok(permit),
                        _ => Err(()),
                    };
                    let Ok(permit) = permit else {
                        add(&self.counters.refused, 1);
                        incoming.refuse();
                        continue;
                    };
                    tasks.spawn(self.clone().accept_one(incoming, permit, shutdown.clone()));
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                _ = shutdown.changed() => break,
            }
        }
        self.endpoint
            .close(CLOSE_SHUTDOWN.into(), b"node shutting down");
        let drain_tasks = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(3), drain_tasks)
            .await
            .is_err()
        {
            tasks.shutdown().await;
        }
    }

    async fn accept_one(
        self: Arc<Self>,
        incoming: quinn::Incoming,
        permit: OwnedSemaphorePermit,
        shutdown: watch::Receiver<bool>,
    ) {
        let remote = incoming.remote_address();
        let attempt = async {
            let conn = incoming
                .await
                .map_err(|e| LinkError::Connection(e.to_string()))?;
            match accept_hello(&conn, &self.key, &self.node, self.incarnation).await {
                Ok((node, incarnation, send, recv)) => {
                    authenticated(&conn);
                    Ok((conn, node, incarnation, send, recv))
                }
                Err(e) => {
                    conn.close(CLOSE_REFUSED.into(), b"no proof of the cluster key");
                    Err(e)
                }
            }
        };
        let result = tokio::time::timeout(AUTH_TIMEOUT, attempt)
            .await
            .unwrap_or(Err(LinkError::Timeout));
        drop(permit);
        let (conn, node, incarnation, send, recv) = match result {
            Ok(accepted) => accepted,
            Err(e) => {
                let n = self.counters.refused.fetch_add(1, Ordering::Relaxed) + 1;
                // Anyone can knock: logged the first times, then at powers of two.
                if n <= 10 || n.is_power_of_two() {
                    tracing::warn!(%remote, error = %e, total = n, "node link attempt refused");
                }
                return;
            }
        };
        let Some((id, queue)) = self.adopt(&node, &conn, incarnation) else {
            add(&self.counters.refused, 1);
            conn.close(CLOSE_TOO_MANY.into(), b"too many node links");
            return;
        };
        tracing::info!(%node, %remote, "node link open (accepted)");
        self.run_link(node, id, conn, send, recv, queue, shutdown)
            .await;
    }
}

/// The other side proved the key: the connection gets the link's receive window.
fn authenticated(conn: &Connection) {
    conn.set_receive_window(LINK_WINDOW.into());
}

/// The one-link rule: when node `me`, holding a link to `node` dialed by `dialer` `age` ago,
/// accepts a link from `node`, does it keep sending over the one it holds? Only when it dialed
/// that one itself, its id sorts first, the link is young enough that both nodes may have
/// dialed at once, and it reaches the same process of `node` as the new one (`same_process`:
/// the incarnations match, or the held link is still being dialed); `node` applies the same
/// rule and sends over the same link. A node that restarted gets its new link used at once.
fn keeps_own_link(me: &str, node: &str, dialer: &str, age: Duration, same_process: bool) -> bool {
    dialer == me && me < node && age < RACE_WINDOW && same_process
}

/// A link's queue, as its task holds it.
struct Queue {
    rx: mpsc::Receiver<Batch>,
    /// For the byte account of what leaves the queue.
    sink: Sink,
    /// Fires (its sender is dropped) when the link's entry is replaced or removed.
    retire: oneshot::Receiver<()>,
}

impl Queue {
    /// Empties a queue that will not be sent, from its byte account.
    fn drain(self) {
        let Queue { mut rx, sink, .. } = self;
        rx.close();
        while let Ok(batch) = rx.try_recv() {
            sink.written(&batch);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> PeerId {
        PeerId::from_key_digest(&[n; 32])
    }

    #[test]
    fn keys_parse_from_hex_and_never_print() {
        let key = ClusterKey::generate();
        assert_eq!(
            ClusterKey::parse(&format!(" {}\n", key.to_hex())).unwrap(),
            key
        );
        assert!(ClusterKey::parse("abc").is_err());
        assert!(ClusterKey::parse(&"zz".repeat(32)).is_err());
        assert!(ClusterKey::parse(&"é".repeat(32)).is_err());
        assert_eq!(format!("{key:?}"), "ClusterKey(..)");
    }

    #[test]
    fn link_frames_round_trip_in_any_chunking_and_bad_ones_are_errors() {
        let mut relay_frames = Vec::new();
        common::relay::encode_into(&mut relay_frames, &id(1), b"opaque").unwrap();
        let mut wire = encode_packets(&id(2), &relay_frames).unwrap();
        wire.extend(encode_consent(&id(1), &id(2), 42));
        for split in 0..wire.len() {
            let mut decoder = LinkDecoder::default();
            let mut seen = Vec::new();
            for part in [&wire[..split], &wire[split..]] {
                decoder.push(part);
                while let Some(frame) = decoder.next_frame().unwrap() {
                    seen.push(format!("{frame:?}"));
                }
            }
            assert_eq!(seen.len(), 2, "split at {split}");
            assert!(seen[1].contains("nonce: 42"));
        }
        let mut decoder = LinkDecoder::default();
        decoder.push(&[9]);
        assert_eq!(decoder.next_frame(), Err(LinkFrameError::Tag(9)));
        let mut decoder = LinkDecoder::default();
        let mut long = vec![TAG_PACKETS];
        long.extend_from_slice(id(2).as_bytes());
        long.extend_from_slice(&((MAX_LINK_BATCH + 1) as u32).to_be_bytes());
        decoder.push(&long);
        assert_eq!(
            decoder.next_frame(),
            Err(LinkFrameError::TooLong(MAX_LINK_BATCH + 1))
        );
        assert!(encode_packets(&id(2), &vec![0; MAX_LINK_BATCH + 1]).is_none());
    }

    #[test]
    fn proofs_depend_on_the_key_the_session_and_the_roles() {
        let key = ClusterKey::generate().hmac_key();
        let other = ClusterKey::generate().hmac_key();
        let input = signed_input(b"dialer", &[1; 32], ("x", "y"), 7);
        let tag = proof(&key, b"dialer", &[1; 32], ("x", "y"), 7);
        assert!(hmac::verify(&key, &input, tag.as_ref()).is_ok());
        assert!(hmac::verify(&other, &input, tag.as_ref()).is_err());
        for changed in [
            signed_input(b"acceptor", &[1; 32], ("x", "y"), 7),
            signed_input(b"dialer", &[2; 32], ("x", "y"), 7),
            signed_input(b"dialer", &[1; 32], ("y", "x"), 7),
            signed_input(b"dialer", &[1; 32], ("x", "y"), 8),
        ] {
            assert!(hmac::verify(&key, &changed, tag.as_ref()).is_err());
        }
    }

    /// Both nodes of a pair that dialed each other at once end up sending over the same link
    /// (the one dialed by the node whose id sorts first); a link held longer than a dial takes
    /// is given up for the other node's new one (that node lost it).
    #[test]
    fn both_nodes_of_a_pair_pick_the_same_link() {
        let young = Duration::from_secs(1);
        // x < y. At x: its own link (young) against y's: kept. At y: its own link against
        // x's: given up. Both send over x's.
        assert!(keeps_own_link("x", "y", "x", young, true));
        assert!(!keeps_own_link("y", "x", "y", young, true));
        // An older link of x's: y dialing means y lost it: replaced.
        assert!(!keeps_own_link("x", "y", "x", RACE_WINDOW, true));
        // A young one to a process of y that is gone (y restarted): replaced at once.
        assert!(!keeps_own_link("x", "y", "x", young, false));
        // A link y dialed earlier, and y dials again: the newer replaces it.
        assert!(!keeps_own_link("x", "y", "y", young, true));
    }

    #[test]
    fn routes_are_bounded_and_expire() {
        let t0 = Instant::now();
        let mut routes = Routes::default();
        routes.set(id(1), "y", t0);
        assert_eq!(routes.get(&id(1), t0), Some("y"));
        assert_eq!(routes.get(&id(1), t0 + ROUTE_TTL), None);
        for n in 0..(MAX_ROUTES + 10) {
            let mut digest = [0u8; 32];
            digest[..8].copy_from_slice(&(n as u64).to_be_bytes());
            routes.set(PeerId::from_key_digest(&digest), "z", t0);
        }
        assert!(routes.map.len() <= MAX_ROUTES);
    }
}
