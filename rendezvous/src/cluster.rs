//! The cluster registry: several rendezvous nodes sharing one registry in Redis
//! (`rendezvous serve --cluster redis://HOST:PORT/ --node-id NAME`; or the primary Redis
//! Sentinel names, [`SentinelTarget`]; or a Redis Cluster, [`ShardedTarget`]).
//!
//! Each node keeps its own peers in its in-memory [`crate::core::Registry`] exactly as a single
//! node does (their connections, introductions and rate limits live there); Redis holds what the
//! other nodes need to find them. Keys (`{id}` is a peer id, `{node}` a node id):
//!
//! | key | value | TTL |
//! |---|---|---|
//! | `rv:peer:{id}` | the peer's record, the JSON of [`Record`] (same as a redb row) | `--expire-after-days`, renewed while online |
//! | `rv:online:{id}` | the node holding the peer online | [`ClusterTimings::online_ttl`] (60 s), renewed every [`ClusterTimings::refresh_every`] (20 s) |
//! | `rv:node:{node}` | the node's UDP address and key fingerprint (JSON) | 60 s, renewed likewise |
//!
//! and one pub/sub channel per node, `rv:punch:{node}`, carrying the introductions other
//! nodes forward to that node's peers ([`ForwardedIntroduction`] in a versioned JSON envelope).
//! On a Redis Cluster (`redis+cluster://`) every name starts with `{rv}:` instead ([`Keys`]).
//!
//! Expiry is Redis's: a record disappears `--expire-after-days` after its last write (a node
//! rewrites the records of its online peers every refresh), an online mark 60 s after its node
//! stopped renewing it (a node that died). A newer registration on another node takes the
//! online mark over; a node's renewal and its going-offline write only touch a mark that is
//! still its own (small Lua scripts), so an old connection cannot take a peer back.
//!
//! Degraded mode (Redis unreachable): see [`Cluster::available`] and docs/cluster.md. Every
//! Redis call has a timeout, pipelines are bounded, values read are bounded in size and parsed
//! into typed errors: Redis is hostile input too.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::nat::NatProfile;
use common::PeerId;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::IntoConnectionInfo;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use crate::core::{ForwardedIntroduction, Record};

/// Largest record read from Redis (a record is at most about 1.5 KB: 16 addresses); a longer
/// value is malformed.
pub const MAX_RECORD_BYTES: usize = 8 * 1024;

/// Largest NAT profile read from Redis (one is about 100 bytes); a longer one is ignored.
pub const MAX_NAT_BYTES: usize = 1024;

/// Largest node id.
pub const MAX_NODE_ID: usize = 64;

/// Largest pub/sub message handled; a longer one is dropped.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024;

/// Most writes waiting for the writer task; a write beyond that is dropped (and made good by
/// the next refresh).
pub const WRITE_QUEUE: usize = 4096;

/// Most writes in one pipeline.
pub const WRITE_BATCH: usize = 128;

/// Most peers re-asserted in one pipeline by a refresh.
pub const REFRESH_BATCH: usize = 256;

/// The version of the pub/sub envelope.
const ENVELOPE_VERSION: u32 = 1;

/// Sets the online mark only if it is free or already this node's (a renewal never takes a
/// peer from the node it moved to). KEYS[1] mark, ARGV[1] node, ARGV[2] TTL seconds.
const CLAIM_IF_FREE_OR_MINE: &str = "local v = redis.call('GET', KEYS[1]) \
    if v == false or v == ARGV[1] then redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2]) \
    return 1 end return 0";

/// Deletes the online mark only if it is this node's. KEYS[1] mark, ARGV[1] node.
const RELEASE_IF_MINE: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
    return redis.call('DEL', KEYS[1]) end return 0";

/// The names of the registry's keys and channels. With a standalone Redis (or Sentinel's
/// primary) they start with `rv:`; on a Redis Cluster with `{rv}:`, a hash tag that puts every
/// key in one hash slot, so that each pipeline and script (several keys of one peer, the live
/// nodes' set) stays on one shard as Redis Cluster requires (the registry is small: one shard
/// holds it, and the shard's replicas give the failover).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keys {
    prefix: &'static str,
}

impl Keys {
    /// The keys of a standalone Redis (`rv:...`).
    pub const STANDALONE: Keys = Keys { prefix: "rv" };
    /// The keys on a Redis Cluster (`{rv}:...`: one hash slot).
    pub const SHARDED: Keys = Keys { prefix: "{rv}" };

    /// The key of a peer's record.
    pub fn peer(&self, id: &PeerId) -> String {
        format!("{}:peer:{id}", self.prefix)
    }

    /// The key of a peer's online mark (its value: the node holding it).
    pub fn online(&self, id: &PeerId) -> String {
        format!("{}:online:{id}", self.prefix)
    }

    /// The key of the NAT profile an online peer reported (handed to the other side of its
    /// introductions, which decides on birthday punching with it).
    pub fn nat(&self, id: &PeerId) -> String {
        format!("{}:nat:{id}", self.prefix)
    }

    /// The sorted set of the live nodes' ids, scored by when their entry expires (Unix
    /// seconds).
    pub fn nodes(&self) -> String {
        format!("{}:nodes", self.prefix)
    }

    /// The key of a node's liveness entry.
    pub fn node(&self, node: &str) -> String {
        format!("{}:node:{node}", self.prefix)
    }

    /// The pub/sub channel of a node: introductions forwarded to its peers.
    pub fn punch_channel(&self, node: &str) -> String {
        format!("{}:punch:{node}", self.prefix)
    }
}

/// Most nodes counted in the cluster-level metrics.
pub const MAX_NODES: usize = 256;

/// Timings of the cluster registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterTimings {
    /// Most time one Redis call (or pipeline) may take before it counts as failed.
    pub call_timeout: Duration,
    /// TTL of a peer's online mark and of a node's liveness entry: how long a dead node's peers
    /// still look online.
    pub online_ttl: Duration,
    /// How often a node renews its peers' records and online marks.
    pub refresh_every: Duration,
    /// How often a node pings Redis (so an outage is noticed within this, and in degraded mode
    /// so is the recovery) and a lost subscription is tried again.
    pub probe_every: Duration,
}

impl Default for ClusterTimings {
    fn default() -> Self {
        ClusterTimings {
            call_timeout: Duration::from_secs(2),
            online_ttl: Duration::from_secs(60),
            refresh_every: Duration::from_secs(20),
            probe_every: Duration::from_secs(1),
        }
    }
}

/// `--cluster URL --node-id NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// The Redis URL: `redis://[USER:PASSWORD@]HOST:PORT[/DB]`, `redis+unix:///PATH`, or
    /// `redis+sentinel://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE` (the primary that
    /// Redis Sentinel names for SERVICE; see [`SentinelTarget`]).
    pub url: String,
    /// This node's name, unique in the cluster.
    pub node_id: String,
    /// Timings.
    pub timings: ClusterTimings,
    /// The node-to-node link of the cross-node relay (`--cluster-link`, `--cluster-key-file`);
    /// `None`: peers on different nodes are not relayed to each other (`relay_denied`).
    pub link: Option<crate::nodelink::LinkConfig>,
}

/// Failures of the cluster registry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    /// The node id is unusable.
    #[error(
        "node id {0:?}: 1 to {MAX_NODE_ID} letters, digits, `.`, `_` or `-` (unique in the cluster)"
    )]
    BadNodeId(String),
    /// The Redis URL is unusable.
    #[error("cluster URL {url:?}: {message}")]
    BadUrl {
        /// The URL given.
        url: String,
        /// What is wrong.
        message: String,
    },
    /// Redis is unreachable (degraded mode).
    #[error("the cluster registry (Redis) is unreachable: {0}")]
    Unavailable(String),
    /// A call took longer than [`ClusterTimings::call_timeout`].
    #[error("the cluster registry (Redis) did not answer within {0:?}")]
    Timeout(Duration),
    /// Redis answered with an error.
    #[error("the cluster registry (Redis) failed: {0}")]
    Redis(String),
    /// The Redis given as one server (`redis://`) is a node of a Redis Cluster (sharded):
    /// the keys of a standalone registry span hash slots, which Redis Cluster refuses in one
    /// pipeline or script; a Redis Cluster is given as `redis+cluster://` (hash-tagged keys).
    #[error(
        "the cluster registry at {url} is a Redis Cluster node (cluster_enabled:1): give the \
         cluster as redis+cluster://HOST:PORT[,HOST:PORT...]/ (see docs/cluster.md)"
    )]
    ShardedRedis {
        /// The server's address (as given, or as Sentinel named it).
        url: String,
    },
    /// Another live node, with another key, holds this node id.
    #[error(
        "node id {node:?} is in use by a live node with another key (at {addr}); give each node \
         its own --node-id (or wait up to a minute after stopping the other one)"
    )]
    NodeIdInUse {
        /// The node id.
        node: String,
        /// The other node's address, as it published it.
        addr: String,
    },
    /// A value read from Redis is not what a node writes.
    #[error("malformed value in the cluster registry at {key}: {why}")]
    Malformed {
        /// The key (or channel).
        key: String,
        /// What is wrong with it.
        why: String,
    },
}

/// Checks a node id: 1 to [`MAX_NODE_ID`] ASCII letters, digits, `.`, `_`, `-` (it is part of
/// Redis keys and channel names).
pub fn check_node_id(node: &str) -> Result<(), ClusterError> {
    if is_short_name(node) {
        Ok(())
    } else {
        Err(ClusterError::BadNodeId(node.to_owned()))
    }
}

/// 1 to [`MAX_NODE_ID`] ASCII letters, digits, `.`, `_` or `-`: a node id, or a Sentinel
/// service name (safe in Redis keys and channels, and in log lines).
fn is_short_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NODE_ID
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// What the cluster registry holds about a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterPeer {
    /// Its record.
    pub record: Record,
    /// The node holding it online, if any.
    pub node: Option<String>,
    /// The NAT profile it reported to its node, if any.
    pub nat: Option<NatProfile>,
}

/// What a node publishes about itself in `rv:node:{node}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Its UDP address (QUIC, STUN).
    pub addr: String,
    /// Its key's fingerprint.
    pub fingerprint: String,
    /// Peers online on it at its latest refresh.
    #[serde(default)]
    pub online: u64,
    /// Its node-to-node link address (`--cluster-link`), where the other nodes open the link
    /// of the cross-node relay; absent on a node without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
}

/// The pub/sub message: a forwarded introduction, versioned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// [`ENVELOPE_VERSION`].
    pub v: u32,
    /// The sending node.
    pub from: String,
    /// The introduction.
    pub intro: ForwardedIntroduction,
}

/// Parses a pub/sub message (hostile: bounded, typed errors).
pub fn parse_envelope(channel: &str, payload: &[u8]) -> Result<Envelope, ClusterError> {
    let malformed = |why: String| ClusterError::Malformed {
        key: channel.to_owned(),
        why,
    };
    if payload.len() > MAX_MESSAGE_BYTES {
        return Err(malformed(format!(
            "{} bytes, at most {MAX_MESSAGE_BYTES}",
            payload.len()
        )));
    }
    let envelope: Envelope =
        serde_json::from_slice(payload).map_err(|e| malformed(e.to_string()))?;
    if envelope.v != ENVELOPE_VERSION {
        return Err(malformed(format!(
            "envelope version {}, this node speaks {ENVELOPE_VERSION}",
            envelope.v
        )));
    }
    check_node_id(&envelope.from).map_err(|e| malformed(e.to_string()))?;
    Ok(envelope)
}

/// Parses a record read from `key` (hostile: bounded, typed errors).
pub fn parse_record(key: &str, bytes: &[u8]) -> Result<Record, ClusterError> {
    if bytes.len() >= MAX_RECORD_BYTES {
        return Err(ClusterError::Malformed {
            key: key.to_owned(),
            why: format!("longer than {MAX_RECORD_BYTES} bytes"),
        });
    }
    parse_json(key, bytes)
}

/// Parses a NAT profile read from `key`: empty is none.
pub fn parse_nat(key: &str, bytes: &[u8]) -> Result<Option<NatProfile>, ClusterError> {
    if bytes.is_empty() {
        return Ok(None);
    }
    if bytes.len() >= MAX_NAT_BYTES {
        return Err(ClusterError::Malformed {
            key: key.to_owned(),
            why: format!("longer than {MAX_NAT_BYTES} bytes"),
        });
    }
    parse_json(key, bytes).map(Some)
}

/// Parses an online mark read from `key`: empty is none, else a node id.
pub fn parse_node(key: &str, bytes: &[u8]) -> Result<Option<String>, ClusterError> {
    if bytes.is_empty() {
        return Ok(None);
    }
    let malformed = |why: &str| ClusterError::Malformed {
        key: key.to_owned(),
        why: why.to_owned(),
    };
    let node = std::str::from_utf8(bytes).map_err(|_| malformed("not UTF-8"))?;
    check_node_id(node).map_err(|_| malformed("not a node id"))?;
    Ok(Some(node.to_owned()))
}

/// Parses a node's entry read from `key`: empty is none.
pub fn parse_node_info(key: &str, bytes: &[u8]) -> Result<Option<NodeInfo>, ClusterError> {
    if bytes.is_empty() {
        return Ok(None);
    }
    parse_json(key, bytes).map(Some)
}

/// Parses the JSON value read from `key`; what is not JSON of a `T` is [`ClusterError::Malformed`].
fn parse_json<T: serde::de::DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, ClusterError> {
    serde_json::from_slice(bytes).map_err(|e| ClusterError::Malformed {
        key: key.to_owned(),
        why: e.to_string(),
    })
}

/// One queued write.
enum Write {
    /// The peer is online here: its record, and the online mark set to this node.
    Online(PeerId, Record),
    /// The peer went offline here: its record, and the online mark deleted if still ours.
    Offline(PeerId, Record),
    /// The peer (online here) reported its NAT profile.
    Nat(PeerId, NatProfile),
}

struct WriteRequest {
    write: Write,
    done: Option<oneshot::Sender<Result<(), ClusterError>>>,
}

/// Counters of the cluster registry, for the operator.
#[derive(Debug, Default)]
pub struct ClusterCounters {
    /// Introductions forwarded to other nodes.
    pub forwarded: AtomicU64,
    /// Introductions received from other nodes and pushed to a peer here.
    pub received: AtomicU64,
    /// Pub/sub messages dropped: malformed, or not for a peer online here.
    pub dropped: AtomicU64,
    /// Redis calls that failed or timed out.
    pub failures: AtomicU64,
    /// Times Sentinel named a new primary and this node moved to it.
    pub primary_changes: AtomicU64,
    /// Live nodes in the cluster, at this node's latest refresh.
    pub nodes: AtomicU64,
    /// Peers online on all the live nodes, at this node's latest refresh (each node's count is
    /// as of its own latest refresh: up to [`ClusterTimings::refresh_every`] old).
    pub cluster_online: AtomicU64,
}

/// `url` with the password, if any, replaced by `***` (for logs and error messages).
pub fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.rsplit_once('@') {
        Some((user_info, host)) => {
            let user = user_info.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_owned(),
    }
}

/// The scheme of a cluster URL naming Redis Sentinel.
pub const SENTINEL_SCHEME: &str = "redis+sentinel://";
/// Most sentinels one URL may name.
pub const MAX_SENTINELS: usize = 16;
/// Longest wait for one sentinel (or the server it names) to connect, and again to answer.
pub const SENTINEL_STEP: Duration = Duration::from_secs(1);

/// `redis+sentinel://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE`: the sentinels to ask,
/// the service (Sentinel's `monitor` name) whose primary holds the registry, and the primary's
/// credentials (the sentinels themselves are asked without: Debian's `redis-sentinel` has no
/// password by default).
///
/// Why native Sentinel: without it the operator needs a virtual IP or a proxy that follows the
/// primary. The node asks the sentinels for the primary before its first connection and again
/// whenever Redis stops answering (degraded mode's probe, every
/// [`ClusterTimings::probe_every`]), and a write refused with `READONLY` (a primary demoted
/// while we were connected) counts as Redis not answering; so after a failover the node is back
/// within Sentinel's own failover time plus about a second.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentinelTarget {
    /// `redis://HOST:PORT/` of each sentinel, in the order given.
    pub sentinel_urls: Vec<String>,
    /// The service name.
    pub service: String,
    /// The primary's user name, if any.
    pub username: Option<String>,
    /// The primary's password, if any.
    pub password: Option<String>,
}

impl SentinelTarget {
    /// Parses a `redis+sentinel://` URL; the error says what is wrong (and never shows the
    /// credentials). The user name and password may be percent-encoded (`%2F` for `/`), as in
    /// a `redis://` URL.
    pub fn parse(url: &str) -> Result<SentinelTarget, String> {
        let HostList {
            urls,
            path,
            username,
            password,
        } = HostList::parse(url, SENTINEL_SCHEME, "sentinel", MAX_SENTINELS)?;
        let service = path
            .ok_or("expected /SERVICE after the sentinels' addresses")?
            .trim_end_matches('/')
            .to_owned();
        if !is_short_name(&service) {
            return Err(format!(
                "service name {service:?}: 1 to 64 letters, digits, `.`, `_` or `-` (Sentinel's \
                 `monitor` name)"
            ));
        }
        Ok(SentinelTarget {
            sentinel_urls: urls,
            service,
            username,
            password,
        })
    }

    /// How to log in to the primary Sentinel names.
    fn primary_login(&self) -> redis::RedisConnectionInfo {
        redis::RedisConnectionInfo {
            username: self.username.clone(),
            password: self.password.clone(),
            ..Default::default()
        }
    }
}

/// `SCHEME[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...][/PATH]`, taken apart: the hosts as
/// `redis://HOST:PORT/` URLs (without the credentials), the path, the credentials decoded.
struct HostList {
    urls: Vec<String>,
    path: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

impl HostList {
    /// `what` names a host in errors; at most `max` hosts. Errors never show the credentials.
    fn parse(url: &str, scheme: &str, what: &str, max: usize) -> Result<HostList, String> {
        let rest = url
            .strip_prefix(scheme)
            .ok_or_else(|| format!("expected {scheme}"))?;
        // The credentials end at the last `@` (a password may hold `/`, `@` or `:`), before the
        // path is looked at.
        let (credentials, rest) = match rest.rsplit_once('@') {
            Some((credentials, rest)) => (Some(credentials), rest),
            None => (None, rest),
        };
        let (hosts, path) = match rest.split_once('/') {
            Some((hosts, path)) => (hosts, Some(path.to_owned())),
            None => (rest, None),
        };
        let (username, password) = match credentials {
            None => (None, None),
            Some(c) => match c.split_once(':') {
                Some((user, password)) => (
                    Some(percent_decode(user)?).filter(|u| !u.is_empty()),
                    Some(percent_decode(password)?).filter(|p| !p.is_empty()),
                ),
                None => return Err("credentials must be [USER]:PASSWORD".to_owned()),
            },
        };
        let mut urls = Vec::new();
        for host in hosts.split(',') {
            let (name, port) = host
                .rsplit_once(':')
                .ok_or_else(|| format!("{what} {host:?}: expected HOST:PORT"))?;
            let valid_name = !name.is_empty()
                && name.chars().all(|c| {
                    c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '[' | ']' | ':')
                });
            if !valid_name || port.parse::<u16>().map_or(true, |p| p == 0) {
                return Err(format!("{what} {host:?}: expected HOST:PORT"));
            }
            urls.push(format!("redis://{name}:{port}/"));
        }
        if urls.len() > max {
            return Err(format!("at most {max} {what}s"));
        }
        Ok(HostList {
            urls,
            path,
            username,
            password,
        })
    }
}

/// The scheme of a cluster URL naming a Redis Cluster (sharded Redis) by some of its nodes.
pub const SHARDED_SCHEME: &str = "redis+cluster://";
/// Most seed nodes one `redis+cluster://` URL may name.
pub const MAX_SEEDS: usize = 16;

/// `redis+cluster://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...]/`: a Redis Cluster, reached
/// through any of these nodes (the client learns the others and the slots from them, and
/// follows failovers and slot moves by itself).
///
/// Why it works on a sharded Redis: the keys carry the hash tag `{rv}` ([`Keys::SHARDED`]), so
/// they all live in one hash slot and every pipeline and script stays on one shard (Redis
/// Cluster refuses them across slots); the shard's replicas take over when its primary dies.
/// Introductions use classic pub/sub, which Redis Cluster delivers to subscribers on every
/// node: the node subscribes on the first seed that answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardedTarget {
    /// `redis://HOST:PORT/` of each seed node, in the order given.
    pub seed_urls: Vec<String>,
    /// The user name, if any.
    pub username: Option<String>,
    /// The password, if any.
    pub password: Option<String>,
}

impl ShardedTarget {
    /// Parses a `redis+cluster://` URL; the error says what is wrong (and never shows the
    /// credentials).
    pub fn parse(url: &str) -> Result<ShardedTarget, String> {
        let HostList {
            urls,
            path,
            username,
            password,
        } = HostList::parse(url, SHARDED_SCHEME, "cluster node", MAX_SEEDS)?;
        if path.is_some_and(|p| !p.is_empty()) {
            return Err("a Redis Cluster has no databases: nothing may follow the `/`".to_owned());
        }
        Ok(ShardedTarget {
            seed_urls: urls,
            username,
            password,
        })
    }

    /// The client of the whole cluster, calls bounded by `timeout`.
    fn client(&self, timeout: Duration) -> redis::RedisResult<redis::cluster::ClusterClient> {
        let mut builder = redis::cluster::ClusterClient::builder(self.seed_urls.clone())
            .connection_timeout(timeout)
            .response_timeout(timeout)
            .retries(1);
        if let Some(user) = &self.username {
            builder = builder.username(user.clone());
        }
        if let Some(password) = &self.password {
            builder = builder.password(password.clone());
        }
        builder.build()
    }

    /// A plain client of each seed node (for the subscription), in order.
    fn seed_clients(&self) -> redis::RedisResult<Vec<redis::Client>> {
        self.seed_urls
            .iter()
            .map(|url| {
                let mut info = url.as_str().into_connection_info()?;
                info.redis.username = self.username.clone();
                info.redis.password = self.password.clone();
                redis::Client::open(info)
            })
            .collect()
    }
}

/// The connection to the registry: one server's (reconnecting by itself), or a Redis
/// Cluster's (routing by slot, following failovers).
#[derive(Clone)]
enum RegistryConn {
    Standalone(ConnectionManager),
    Sharded(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for RegistryConn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            RegistryConn::Standalone(c) => c.req_packed_command(cmd),
            RegistryConn::Sharded(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            RegistryConn::Standalone(c) => c.req_packed_commands(pipeline, offset, count),
            RegistryConn::Sharded(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RegistryConn::Standalone(c) => c.get_db(),
            RegistryConn::Sharded(c) => c.get_db(),
        }
    }
}

/// `%XX` escapes decoded (a URL's user name or password); the error does not show the text.
fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or("credentials: a `%` not followed by two hex digits")?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "credentials: not UTF-8 once decoded".to_owned())
}

/// A node's handle on the cluster registry; shared by the server's tasks.
pub struct Cluster {
    node: String,
    /// The Redis server in use: the one of the URL, or the primary Sentinel named last (`None`
    /// until Sentinel has named one).
    client: Mutex<Option<redis::Client>>,
    /// Where to ask which server is the primary, with `redis+sentinel://`.
    sentinel: Option<SentinelTarget>,
    /// The Redis Cluster, with `redis+cluster://`.
    sharded: Option<ShardedTarget>,
    /// The names of the keys (hash-tagged on a Redis Cluster).
    keys: Keys,
    /// The seed the subscription was last made on (a Redis Cluster): tried first next time.
    subscribed_seed: AtomicUsize,
    /// When the sentinels were asked last.
    sentinels_asked: Mutex<Option<Instant>>,
    /// The connection (reconnecting by itself); `None` until the first connect succeeds.
    conn: Mutex<Option<RegistryConn>>,
    available: AtomicBool,
    /// Bumped each time Redis stops answering: the subscription is re-made then, since a
    /// connection that hung (rather than closed) would never end by itself.
    outages: watch::Sender<u64>,
    writes: mpsc::Sender<WriteRequest>,
    timings: ClusterTimings,
    record_ttl_s: u64,
    node_info: Mutex<NodeInfo>,
    /// Counters.
    pub counters: ClusterCounters,
}

/// A peer online on this node, as a refresh writes it: id, record, reported NAT profile.
pub type OnlinePeer = (PeerId, Record, Option<NatProfile>);

/// The writer's end of the write queue: run with [`Cluster::run_writer`].
pub struct WriteQueue(mpsc::Receiver<WriteRequest>);

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Cluster {
    /// Checks the configuration and tries Redis once (within the call timeout). Redis being
    /// down at start is not fatal: the node starts in degraded mode and connects when it can.
    /// `record_ttl` is the registry's expiry (`--expire-after-days`).
    pub async fn open(
        config: &ClusterConfig,
        record_ttl: Duration,
    ) -> Result<(Arc<Cluster>, WriteQueue), ClusterError> {
        check_node_id(&config.node_id)?;
        let bad_url = |message: &str| ClusterError::BadUrl {
            url: redact_password(&config.url),
            message: message.to_owned(),
        };
        let (mut sentinel, mut sharded) = (None, None);
        if config.url.starts_with(SENTINEL_SCHEME) {
            sentinel = Some(SentinelTarget::parse(&config.url).map_err(|m| bad_url(&m))?);
        } else if config.url.starts_with(SHARDED_SCHEME) {
            sharded = Some(ShardedTarget::parse(&config.url).map_err(|m| bad_url(&m))?);
        } else if !(config.url.starts_with("redis://") || config.url.starts_with("redis+unix://")) {
            return Err(bad_url(
                "expected redis://HOST:PORT/, redis+unix:///PATH, \
                 redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE or \
                 redis+cluster://HOST:PORT[,HOST:PORT...]/; TLS (rediss://) is not built in: \
                 reach Redis over a private network or a TLS tunnel",
            ));
        }
        // With Sentinel, the primary is asked for before the first connection (see `probe`);
        // the sentinels' and the seeds' URLs are checked here.
        let client = if let Some(target) = &sentinel {
            for url in &target.sentinel_urls {
                redis::Client::open(url.as_str()).map_err(|e| bad_url(&e.to_string()))?;
            }
            None
        } else if let Some(target) = &sharded {
            target
                .client(config.timings.call_timeout)
                .map_err(|e| bad_url(&e.to_string()))?;
            target.seed_clients().map_err(|e| bad_url(&e.to_string()))?;
            None
        } else {
            Some(redis::Client::open(config.url.as_str()).map_err(|e| bad_url(&e.to_string()))?)
        };
        let keys = if sharded.is_some() {
            Keys::SHARDED
        } else {
            Keys::STANDALONE
        };
        let (writes, queue) = mpsc::channel(WRITE_QUEUE);
        let cluster = Arc::new(Cluster {
            node: config.node_id.clone(),
            client: Mutex::new(client),
            sentinel,
            sharded,
            keys,
            subscribed_seed: AtomicUsize::new(0),
            sentinels_asked: Mutex::new(None),
            conn: Mutex::new(None),
            available: AtomicBool::new(false),
            outages: watch::Sender::new(0),
            writes,
            timings: config.timings,
            record_ttl_s: record_ttl.as_secs().max(1),
            node_info: Mutex::new(NodeInfo {
                addr: String::new(),
                fingerprint: String::new(),
                online: 0,
                link: None,
            }),
            counters: ClusterCounters::default(),
        });
        match cluster.probe().await {
            Ok(()) => {}
            // A misconfiguration, not an outage: the node does not start.
            Err(e @ ClusterError::ShardedRedis { .. }) => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "cluster registry unreachable at start: degraded mode until it answers")
            }
        }
        Ok((cluster, WriteQueue(queue)))
    }

    /// This node's id.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Whether Redis answered the latest call. While it does not (degraded mode), lookups of
    /// peers not online on this node fail at once with [`ClusterError::Unavailable`], writes
    /// are left to the refresh that follows recovery, and every [`ClusterTimings::probe_every`]
    /// a ping tries Redis again.
    pub fn available(&self) -> bool {
        self.available.load(Ordering::Relaxed)
    }

    /// What this node publishes about itself in `rv:node:{node}`.
    pub fn set_node_info(&self, info: &NodeInfo) {
        *lock(&self.node_info) = info.clone();
    }

    fn node_info_json(&self, online: u64) -> String {
        let mut info = lock(&self.node_info).clone();
        info.online = online;
        serde_json::to_string(&info).unwrap_or_default()
    }

    fn mark(&self, ok: bool) {
        let was = self.available.swap(ok, Ordering::Relaxed);
        if was != ok {
            if ok {
                tracing::info!(node = %self.node, "cluster registry (Redis) reachable");
            } else {
                tracing::warn!(node = %self.node, "cluster registry (Redis) unreachable: degraded mode");
                self.outages.send_modify(|n| *n = n.wrapping_add(1));
            }
        }
        if !ok {
            self.counters.failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The connection, failing at once in degraded mode.
    fn connection(&self) -> Result<RegistryConn, ClusterError> {
        if !self.available() {
            return Err(ClusterError::Unavailable(
                "degraded mode: waiting for Redis to answer again".to_owned(),
            ));
        }
        lock(&self.conn)
            .clone()
            .ok_or_else(|| ClusterError::Unavailable("not connected yet".to_owned()))
    }

    /// Runs `call` within the call timeout, recording the outcome.
    async fn timed<T, F>(&self, call: F) -> Result<T, ClusterError>
    where
        F: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let result = self.within(call).await;
        self.mark(!matches!(
            result,
            Err(ClusterError::Unavailable(_) | ClusterError::Timeout(_))
        ));
        result
    }

    /// Runs `call` within the call timeout, without recording the outcome.
    async fn within<T, F>(&self, call: F) -> Result<T, ClusterError>
    where
        F: std::future::Future<Output = redis::RedisResult<T>>,
    {
        match tokio::time::timeout(self.timings.call_timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() => {
                Err(ClusterError::Unavailable(e.to_string()))
            }
            // A primary that Sentinel demoted while we were connected: writes fail until we
            // ask Sentinel again, which degraded mode's probe does. (Without Sentinel a replica
            // given by mistake stays an error: nothing would change by asking again.)
            Ok(Err(e))
                if (self.sentinel.is_some() || self.sharded.is_some())
                    && e.kind() == redis::ErrorKind::ReadOnly =>
            {
                Err(ClusterError::Unavailable(format!(
                    "{e} (no longer the primary)"
                )))
            }
            // A Redis Cluster between a primary's death and its replica's promotion, or
            // without a quorum: as unreachable (degraded mode, recovery when it answers).
            Ok(Err(e))
                if self.sharded.is_some()
                    && matches!(
                        e.kind(),
                        redis::ErrorKind::ClusterDown
                            | redis::ErrorKind::TryAgain
                            | redis::ErrorKind::MasterDown
                            | redis::ErrorKind::ClusterConnectionNotFound
                    ) =>
            {
                Err(ClusterError::Unavailable(e.to_string()))
            }
            Ok(Err(e)) => Err(ClusterError::Redis(e.to_string())),
            Err(_) => Err(ClusterError::Timeout(self.timings.call_timeout)),
        }
    }

    /// Pings Redis (connecting first if never connected): whether it answers. With Sentinel,
    /// the sentinels are asked for the primary first while Redis does not answer (or before
    /// the first connection), and every [`ClusterTimings::refresh_every`] while it does (a
    /// primary cut off from the sentinels may still answer us after they promoted another);
    /// a new primary replaces the old connection.
    pub async fn probe(&self) -> Result<(), ClusterError> {
        if self.sentinel.is_some() {
            let lost = !self.available() || lock(&self.conn).is_none();
            let due = lock(&self.sentinels_asked)
                .is_none_or(|at| at.elapsed() >= self.timings.refresh_every);
            if lost || due {
                match self.follow_primary().await {
                    Ok(()) => {}
                    Err(e) if lost => {
                        self.mark(false);
                        return Err(e);
                    }
                    // Redis answers: the sentinels being unreachable changes nothing now.
                    Err(e) => tracing::warn!(error = %e, "cannot ask the sentinels"),
                }
            }
        }
        let existing = lock(&self.conn).clone();
        let mut conn = match existing {
            Some(conn) => conn,
            None => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(self.timings.call_timeout)
                    .set_response_timeout(self.timings.call_timeout)
                    .set_number_of_retries(1);
                let connected = async {
                    if let Some(target) = &self.sharded {
                        let client = target
                            .client(self.timings.call_timeout)
                            .map_err(|e| ClusterError::Redis(e.to_string()))?;
                        let conn = self.within(client.get_async_connection()).await?;
                        return Ok(RegistryConn::Sharded(conn));
                    }
                    let client = self.current_client()?;
                    // Checked on every new connection, before it counts as Redis answering:
                    // given as one server, a Redis Cluster node would refuse our keys of other
                    // slots; it is refused plainly, and the node stays degraded.
                    let mut conn = self
                        .within(ConnectionManager::new_with_config(client.clone(), config))
                        .await?;
                    let info: String = self
                        .within(redis::cmd("INFO").arg("cluster").query_async(&mut conn))
                        .await?;
                    if info.lines().any(|l| l.trim() == "cluster_enabled:1") {
                        let addr = client.get_connection_info().addr.to_string();
                        return Err(ClusterError::ShardedRedis { url: addr });
                    }
                    Ok(RegistryConn::Standalone(conn))
                };
                let conn = match connected.await {
                    Ok(conn) => conn,
                    Err(e) => {
                        self.mark(false);
                        if matches!(e, ClusterError::ShardedRedis { .. }) {
                            tracing::error!(error = %e, "cluster registry refused");
                        }
                        return Err(e);
                    }
                };
                *lock(&self.conn) = Some(conn.clone());
                conn
            }
        };
        match conn {
            RegistryConn::Standalone(_) => self
                .timed(redis::cmd("PING").query_async::<String>(&mut conn))
                .await
                .map(|_| ()),
            // On a Redis Cluster `PING` goes to every primary (one down elsewhere would fail
            // it): a read of a registry key asks the shard that holds the registry.
            RegistryConn::Sharded(_) => self
                .timed(
                    redis::cmd("EXISTS")
                        .arg(self.keys.nodes())
                        .query_async::<u64>(&mut conn),
                )
                .await
                .map(|_| ()),
        }
    }

    /// Where the subscription may be made: the one server in use, or every seed of a Redis
    /// Cluster.
    fn subscription_clients(&self) -> Result<Vec<redis::Client>, ClusterError> {
        match &self.sharded {
            Some(target) => target
                .seed_clients()
                .map_err(|e| ClusterError::Redis(e.to_string())),
            None => Ok(vec![self.current_client()?]),
        }
    }

    fn current_client(&self) -> Result<redis::Client, ClusterError> {
        lock(&self.client).clone().ok_or_else(|| {
            ClusterError::Unavailable("Sentinel has not named a primary yet".to_owned())
        })
    }

    /// Asks the sentinels which server is the primary ([`Cluster::ask_sentinels`]); a new one
    /// replaces the client, and the next call connects to it. An error (no sentinel names a
    /// primary that answers as one) leaves everything as it was.
    async fn follow_primary(&self) -> Result<(), ClusterError> {
        let Some(target) = &self.sentinel else {
            return Ok(());
        };
        *lock(&self.sentinels_asked) = Some(Instant::now());
        let primary = self.ask_sentinels(target).await?;
        let addr = primary.get_connection_info().addr.to_string();
        let changed = {
            let mut client = lock(&self.client);
            let known = client
                .as_ref()
                .map(|c| c.get_connection_info().addr.to_string());
            if known.as_deref() == Some(addr.as_str()) {
                false
            } else {
                if known.is_some() {
                    self.counters
                        .primary_changes
                        .fetch_add(1, Ordering::Relaxed);
                }
                *client = Some(primary);
                true
            }
        };
        if changed {
            tracing::info!(service = %target.service, primary = %addr, "Sentinel names the cluster registry's primary");
            *lock(&self.conn) = None;
            // The subscription is made again on the new primary.
            self.outages.send_modify(|n| *n = n.wrapping_add(1));
        }
        Ok(())
    }

    /// Asks the sentinels in turn, each within its own [`SENTINEL_STEP`] to connect and as much
    /// to answer, for the primary of the service, and checks that the server named answers
    /// `ROLE` as a primary: a sentinel that is down, hangs, is cut off from the others or is
    /// behind (names a demoted primary, or none) only costs its turn, and the next is asked.
    async fn ask_sentinels(&self, target: &SentinelTarget) -> Result<redis::Client, ClusterError> {
        let step = self.timings.call_timeout.min(SENTINEL_STEP);
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(step)
            .set_response_timeout(step);
        let mut why = Vec::new();
        for (i, url) in target.sentinel_urls.iter().enumerate() {
            let named = async {
                let sentinel = redis::Client::open(url.as_str())?;
                let mut conn = sentinel
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                redis::cmd("SENTINEL")
                    .arg("GET-MASTER-ADDR-BY-NAME")
                    .arg(&target.service)
                    .query_async::<Option<(String, u16)>>(&mut conn)
                    .await
            };
            let (host, port) = match tokio::time::timeout(step * 2, named).await {
                Ok(Ok(Some(addr))) => addr,
                Ok(Ok(None)) => {
                    why.push(format!("sentinel {}: no primary for the service", i + 1));
                    continue;
                }
                Ok(Err(e)) => {
                    why.push(format!("sentinel {}: {e}", i + 1));
                    continue;
                }
                Err(_) => {
                    why.push(format!(
                        "sentinel {}: no answer within {:?}",
                        i + 1,
                        step * 2
                    ));
                    continue;
                }
            };
            let info = redis::ConnectionInfo {
                addr: redis::ConnectionAddr::Tcp(host, port),
                redis: target.primary_login(),
            };
            let primary = match redis::Client::open(info) {
                Ok(client) => client,
                Err(e) => {
                    why.push(format!("sentinel {}: {e}", i + 1));
                    continue;
                }
            };
            let role = async {
                let mut conn = primary
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                redis::cmd("ROLE")
                    .query_async::<redis::Value>(&mut conn)
                    .await
            };
            match tokio::time::timeout(step * 2, role).await {
                Ok(Ok(redis::Value::Array(items))) if matches!(items.first(), Some(redis::Value::BulkString(role)) if role == b"master") =>
                {
                    return Ok(primary);
                }
                Ok(Ok(_)) => why.push(format!(
                    "sentinel {}: the server it names is not a primary",
                    i + 1
                )),
                Ok(Err(e)) => why.push(format!("sentinel {}: the server it names: {e}", i + 1)),
                Err(_) => why.push(format!(
                    "sentinel {}: the server it names does not answer",
                    i + 1
                )),
            }
        }
        Err(ClusterError::Unavailable(format!(
            "no sentinel names a primary for {:?} that answers as one ({})",
            target.service,
            why.join("; ")
        )))
    }

    /// Takes this node's id at start: refused ([`ClusterError::NodeIdInUse`]) while another
    /// node with another key (`fingerprint`) keeps the same id alive, so that two nodes never
    /// share a channel and online marks; the same node restarting (same key) takes it back.
    /// Unchecked (a warning) when Redis does not answer, or holds something unreadable there.
    pub async fn claim_node_id(&self, fingerprint: &str) -> Result<(), ClusterError> {
        match self.try_claim_node_id(fingerprint).await {
            Err(e @ ClusterError::NodeIdInUse { .. }) => Err(e),
            Err(e) => {
                tracing::warn!(node = %self.node, error = %e, "node id not checked for uniqueness");
                Ok(())
            }
            Ok(()) => Ok(()),
        }
    }

    async fn try_claim_node_id(&self, fingerprint: &str) -> Result<(), ClusterError> {
        let mut conn = self.connection()?;
        let key = self.keys.node(&self.node);
        let info = self.node_info_json(0);
        let online_ttl = self.timings.online_ttl.as_secs().max(1);
        let set: Option<String> = self
            .timed(
                redis::cmd("SET")
                    .arg(&key)
                    .arg(info)
                    .arg("NX")
                    .arg("EX")
                    .arg(online_ttl)
                    .query_async(&mut conn),
            )
            .await?;
        if set.is_some() {
            return Ok(());
        }
        let Some(held) = self.read_node_info(&mut conn, &key).await? else {
            // It expired between the SET NX and the read: nothing to compare with, so the claim
            // is unchecked (`claim_node_id` warns).
            return Err(ClusterError::Malformed {
                key,
                why: "the entry vanished between SET NX and the read".to_owned(),
            });
        };
        if held.fingerprint == fingerprint {
            return Ok(());
        }
        Err(ClusterError::NodeIdInUse {
            node: self.node.clone(),
            addr: held.addr.chars().take(64).collect(),
        })
    }

    /// What the cluster registry holds about `id`: its record and the node holding it online.
    pub async fn lookup(&self, id: &PeerId) -> Result<Option<ClusterPeer>, ClusterError> {
        let mut conn = self.connection()?;
        let (peer, online) = (self.keys.peer(id), self.keys.online(id));
        let mut pipe = redis::pipe();
        // GETRANGE bounds what a hostile value can make this node read.
        pipe.cmd("GETRANGE")
            .arg(&peer)
            .arg(0)
            .arg(MAX_RECORD_BYTES)
            .cmd("GETRANGE")
            .arg(&online)
            .arg(0)
            .arg(MAX_NODE_ID)
            .cmd("GETRANGE")
            .arg(self.keys.nat(id))
            .arg(0)
            .arg(MAX_NAT_BYTES);
        let (record, node, nat): (Vec<u8>, Vec<u8>, Vec<u8>) =
            self.timed(pipe.query_async(&mut conn)).await?;
        if record.is_empty() {
            return Ok(None);
        }
        let node = parse_node(&online, &node)?;
        // Only a hint for the punching strategy: an unreadable one is left out, not an error.
        let nat = match parse_nat(&self.keys.nat(id), &nat) {
            Ok(nat) => nat.filter(|_| node.is_some()),
            Err(e) => {
                tracing::debug!(error = %e, "ignoring a NAT profile");
                None
            }
        };
        Ok(Some(ClusterPeer {
            record: parse_record(&peer, &record)?,
            node,
            nat,
        }))
    }

    /// The node-to-node link address `node` announces in `rv:node:{node}` (hostile: bounded
    /// read, parsed), or `None` if it announces none (or its entry expired).
    pub async fn node_link_addr(
        &self,
        node: &str,
    ) -> Result<Option<std::net::SocketAddr>, ClusterError> {
        check_node_id(node)?;
        let mut conn = self.connection()?;
        let key = self.keys.node(node);
        let Some(info) = self.read_node_info(&mut conn, &key).await? else {
            return Ok(None);
        };
        match info.link {
            None => Ok(None),
            Some(addr) => addr.parse().map(Some).map_err(|_| ClusterError::Malformed {
                key,
                why: format!("link address {addr:?} is not IP:PORT"),
            }),
        }
    }

    /// Reads a node's entry at `key` (`rv:node:{node}`; hostile: bounded read, parsed):
    /// `None` if there is none (never written, or expired).
    async fn read_node_info(
        &self,
        conn: &mut RegistryConn,
        key: &str,
    ) -> Result<Option<NodeInfo>, ClusterError> {
        // GETRANGE bounds what a hostile value can make this node read.
        let bytes: Vec<u8> = self
            .timed(
                redis::cmd("GETRANGE")
                    .arg(key)
                    .arg(0)
                    .arg(MAX_RECORD_BYTES)
                    .query_async(conn),
            )
            .await?;
        parse_node_info(key, &bytes)
    }

    /// Forwards an introduction to `node`'s channel. Returns how many subscribers got it: 0
    /// means that node is not listening (it died, or its subscription is being re-made).
    pub async fn forward(
        &self,
        node: &str,
        intro: ForwardedIntroduction,
    ) -> Result<u64, ClusterError> {
        let mut conn = self.connection()?;
        let envelope = Envelope {
            v: ENVELOPE_VERSION,
            from: self.node.clone(),
            intro,
        };
        let payload = serde_json::to_vec(&envelope).map_err(|e| ClusterError::Malformed {
            key: self.keys.punch_channel(node),
            why: e.to_string(),
        })?;
        let channel = self.keys.punch_channel(node);
        let receivers: u64 = self
            .timed(
                redis::cmd("PUBLISH")
                    .arg(&channel)
                    .arg(payload)
                    .query_async(&mut conn),
            )
            .await?;
        self.counters.forwarded.fetch_add(1, Ordering::Relaxed);
        if receivers > 0 || self.sharded.is_none() {
            return Ok(receivers);
        }
        // On a Redis Cluster, PUBLISH counts only the subscribers of the server it reached
        // (the message still reaches every server's): the subscribers everywhere are counted
        // (`PUBSUB NUMSUB` goes to every server, summed). A server that does not answer now
        // (a failover) leaves the count unknown: taken as delivered, as a lost push would be.
        let everywhere = self
            .within(
                redis::cmd("PUBSUB")
                    .arg("NUMSUB")
                    .arg(&channel)
                    .query_async::<Vec<(String, u64)>>(&mut conn),
            )
            .await;
        Ok(match everywhere {
            Ok(counts) => counts.iter().map(|(_, n)| *n).sum(),
            Err(_) => 1,
        })
    }

    /// `id` registered here: writes its record and marks it online on this node, and waits
    /// (at most the call timeout) until Redis has it, so that other nodes find the peer as soon
    /// as it is told it is registered.
    pub async fn online(&self, id: PeerId, record: Record) -> Result<(), ClusterError> {
        let (done, wait) = oneshot::channel();
        self.queue(Write::Online(id, record), Some(done))?;
        match tokio::time::timeout(self.timings.call_timeout * 2, wait).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ClusterError::Unavailable("the writer stopped".to_owned())),
            Err(_) => Err(ClusterError::Timeout(self.timings.call_timeout * 2)),
        }
    }

    /// Queues a write of `id`'s record (online here) without waiting.
    pub fn online_later(&self, id: PeerId, record: Record) {
        let _ = self.queue(Write::Online(id, record), None);
    }

    /// `id` (online here) reported its NAT profile: queues it for the other nodes.
    pub fn nat_later(&self, id: PeerId, nat: NatProfile) {
        let _ = self.queue(Write::Nat(id, nat), None);
    }

    /// `id` went offline here: queues its record (with its last-seen time) and the removal of
    /// its online mark, if still this node's.
    pub fn offline_later(&self, id: PeerId, record: Record) {
        let _ = self.queue(Write::Offline(id, record), None);
    }

    fn queue(
        &self,
        write: Write,
        done: Option<oneshot::Sender<Result<(), ClusterError>>>,
    ) -> Result<(), ClusterError> {
        self.writes
            .try_send(WriteRequest { write, done })
            .map_err(|_| {
                tracing::debug!("cluster write queue full; the next refresh makes the write good");
                ClusterError::Unavailable("write queue full".to_owned())
            })
    }

    /// Applies queued writes in pipelines of at most [`WRITE_BATCH`] until every handle is
    /// gone (the server shut down). In degraded mode writes fail at once: the refresh after
    /// recovery re-asserts every online peer, and offline peers' marks expire by themselves.
    pub async fn run_writer(self: Arc<Self>, mut queue: WriteQueue) {
        // Only a weak handle from here: the task must not keep the queue's sender alive.
        let cluster = Arc::downgrade(&self);
        drop(self);
        while let Some(first) = queue.0.recv().await {
            let mut batch = vec![first];
            while batch.len() < WRITE_BATCH {
                match queue.0.try_recv() {
                    Ok(req) => batch.push(req),
                    Err(_) => break,
                }
            }
            let Some(cluster) = cluster.upgrade() else {
                return;
            };
            let result = cluster.write_batch(&batch).await;
            for req in batch {
                if let Some(done) = req.done {
                    let _ = done.send(result.clone());
                }
            }
        }
    }

    async fn write_batch(&self, batch: &[WriteRequest]) -> Result<(), ClusterError> {
        let mut conn = self.connection()?;
        let online_ttl = self.timings.online_ttl.as_secs().max(1);
        let mut pipe = redis::pipe();
        for req in batch {
            let (id, record) = match &req.write {
                Write::Online(id, record) | Write::Offline(id, record) => (id, record),
                Write::Nat(id, nat) => {
                    let json = serde_json::to_vec(nat).map_err(|e| ClusterError::Malformed {
                        key: self.keys.nat(id),
                        why: e.to_string(),
                    })?;
                    pipe.cmd("SET")
                        .arg(self.keys.nat(id))
                        .arg(json)
                        .arg("EX")
                        .arg(online_ttl)
                        .ignore();
                    continue;
                }
            };
            let json = serde_json::to_vec(record).map_err(|e| ClusterError::Malformed {
                key: self.keys.peer(id),
                why: e.to_string(),
            })?;
            pipe.cmd("SET")
                .arg(self.keys.peer(id))
                .arg(json)
                .arg("EX")
                .arg(self.record_ttl_s)
                .ignore();
            match &req.write {
                // A registration here is the newest: it takes the mark from any other node,
                // and drops the NAT profile (its network may have changed; it reports again).
                Write::Online(..) => pipe
                    .cmd("SET")
                    .arg(self.keys.online(id))
                    .arg(&self.node)
                    .arg("EX")
                    .arg(online_ttl)
                    .ignore()
                    .cmd("DEL")
                    .arg(self.keys.nat(id))
                    .ignore(),
                Write::Offline(..) => pipe
                    .cmd("EVAL")
                    .arg(RELEASE_IF_MINE)
                    .arg(1)
                    .arg(self.keys.online(id))
                    .arg(&self.node)
                    .ignore(),
                Write::Nat(..) => &mut pipe,
            };
        }
        self.timed(pipe.query_async::<()>(&mut conn)).await
    }

    /// Re-asserts `peers` (the peers online here) and this node's liveness entry, in pipelines
    /// of at most [`REFRESH_BATCH`] peers: renews the records' and marks' TTLs, and after Redis
    /// lost its data (a restart without persistence) writes them again.
    pub async fn refresh(&self, peers: &[OnlinePeer]) -> Result<(), ClusterError> {
        let mut conn = self.connection()?;
        let online_ttl = self.timings.online_ttl.as_secs().max(1);
        let info = self.node_info_json(peers.len() as u64);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        // The live nodes: a sorted set scored by when each node's entry expires, trimmed of
        // the expired ones, read bounded.
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(self.keys.node(&self.node))
            .arg(info)
            .arg("EX")
            .arg(online_ttl)
            .ignore()
            .cmd("ZADD")
            .arg(self.keys.nodes())
            .arg(now.saturating_add(online_ttl))
            .arg(&self.node)
            .ignore()
            .cmd("ZREMRANGEBYSCORE")
            .arg(self.keys.nodes())
            .arg("-inf")
            .arg(format!("({now}"))
            .ignore()
            .cmd("ZRANGE")
            .arg(self.keys.nodes())
            .arg(0)
            .arg(MAX_NODES - 1);
        let (names,): (Vec<Vec<u8>>,) = self.timed(pipe.query_async(&mut conn)).await?;
        self.count_nodes(&mut conn, names).await?;
        for chunk in peers.chunks(REFRESH_BATCH) {
            let mut pipe = redis::pipe();
            for (id, record, nat) in chunk {
                let Ok(json) = serde_json::to_vec(record) else {
                    continue;
                };
                if let Some(nat) = nat.and_then(|n| serde_json::to_vec(&n).ok()) {
                    pipe.cmd("SET")
                        .arg(self.keys.nat(id))
                        .arg(nat)
                        .arg("EX")
                        .arg(online_ttl)
                        .ignore();
                }
                pipe.cmd("SET")
                    .arg(self.keys.peer(id))
                    .arg(json)
                    .arg("EX")
                    .arg(self.record_ttl_s)
                    .ignore()
                    .cmd("EVAL")
                    .arg(CLAIM_IF_FREE_OR_MINE)
                    .arg(1)
                    .arg(self.keys.online(id))
                    .arg(&self.node)
                    .arg(online_ttl)
                    .ignore();
            }
            self.timed(pipe.query_async::<()>(&mut conn)).await?;
        }
        Ok(())
    }

    /// Reads the live nodes' entries (names from [`Keys::nodes`], hostile: checked) and records
    /// how many there are and how many peers they hold online.
    async fn count_nodes(
        &self,
        conn: &mut RegistryConn,
        names: Vec<Vec<u8>>,
    ) -> Result<(), ClusterError> {
        let names: Vec<String> = names
            .into_iter()
            .filter_map(|n| String::from_utf8(n).ok())
            .filter(|n| check_node_id(n).is_ok())
            .take(MAX_NODES)
            .collect();
        let mut pipe = redis::pipe();
        for name in &names {
            pipe.cmd("GETRANGE")
                .arg(self.keys.node(name))
                .arg(0)
                .arg(MAX_RECORD_BYTES);
        }
        let infos: Vec<Vec<u8>> = if names.is_empty() {
            Vec::new()
        } else {
            self.timed(pipe.query_async(conn)).await?
        };
        let (mut nodes, mut online) = (0u64, 0u64);
        for info in infos {
            if let Ok(info) = serde_json::from_slice::<NodeInfo>(&info) {
                nodes += 1;
                online = online.saturating_add(info.online);
            }
        }
        let before = self.counters.nodes.swap(nodes, Ordering::Relaxed);
        self.counters
            .cluster_online
            .store(online, Ordering::Relaxed);
        if before != nodes {
            tracing::info!(nodes, online, "cluster of {nodes} live nodes");
        }
        Ok(())
    }

    /// Keeps this node's entries alive: every [`ClusterTimings::refresh_every`] re-asserts the
    /// peers `online_peers` returns; in degraded mode pings every
    /// [`ClusterTimings::probe_every`] and refreshes at once when Redis answers again. Ends on
    /// shutdown.
    pub async fn run_maintenance<F>(
        self: Arc<Self>,
        online_peers: F,
        mut shutdown: watch::Receiver<bool>,
    ) where
        F: Fn() -> Vec<OnlinePeer> + Send,
    {
        let mut last_refresh: Option<tokio::time::Instant> = None;
        // Not connected at start counts as an outage: the first refresh says so when it works.
        let mut recovered = !self.available();
        let mut outages = self.outages.subscribe();
        loop {
            // An outage since the last look, whoever noticed it (this loop's ping or any other
            // call): once Redis answers, this node's peers are written again at once (Redis may
            // have lost everything meanwhile, or a failover the last writes).
            if outages.has_changed().unwrap_or(false) {
                outages.mark_unchanged();
                recovered = true;
                last_refresh = None;
            }
            // Degraded: a ping a second notices the recovery. Between refreshes: a ping a
            // second notices an outage (and so re-subscribes and, once Redis is back, writes
            // this node's peers again) within a second, not at the next refresh.
            let fresh = last_refresh.is_some_and(|at| at.elapsed() < self.timings.refresh_every);
            if !self.available() || fresh {
                if let Err(e) = self.probe().await {
                    tracing::debug!(error = %e, "cluster registry ping failed");
                }
            }
            // Answering (maybe just now): refresh if due.
            let due = last_refresh.is_none_or(|at| at.elapsed() >= self.timings.refresh_every);
            if self.available() && due {
                let peers = online_peers();
                match self.refresh(&peers).await {
                    Ok(()) => {
                        last_refresh = Some(tokio::time::Instant::now());
                        if std::mem::take(&mut recovered) {
                            tracing::info!(
                                peers = peers.len(),
                                "cluster registry answers again: this node's peers written again"
                            );
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cluster refresh failed"),
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.timings.probe_every) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Receives the introductions forwarded to this node (its channel) and hands each, parsed
    /// and checked, to `deliver`; re-subscribes every [`ClusterTimings::probe_every`] while
    /// the subscription is down. Ends on shutdown.
    pub async fn run_subscriber<F>(self: Arc<Self>, deliver: F, mut shutdown: watch::Receiver<bool>)
    where
        F: Fn(Envelope) + Send,
    {
        let channel = self.keys.punch_channel(&self.node);
        let mut outages = self.outages.subscribe();
        loop {
            outages.mark_unchanged();
            let subscribed = async {
                let clients = self.subscription_clients().map_err(|e| {
                    redis::RedisError::from((
                        redis::ErrorKind::IoError,
                        "no server to subscribe on",
                        e.to_string(),
                    ))
                })?;
                // On a Redis Cluster any node delivers every message published: the seeds are
                // tried in turn, from the one that served last.
                let first = self.subscribed_seed.load(Ordering::Relaxed);
                let mut last_error = None;
                for i in 0..clients.len() {
                    let at = (first + i) % clients.len();
                    let attempt = async {
                        let mut pubsub = clients[at].get_async_pubsub().await?;
                        pubsub.subscribe(&channel).await?;
                        Ok::<_, redis::RedisError>(pubsub)
                    };
                    match tokio::time::timeout(self.timings.call_timeout, attempt).await {
                        Ok(Ok(pubsub)) => {
                            self.subscribed_seed.store(at, Ordering::Relaxed);
                            return Ok(pubsub);
                        }
                        Ok(Err(e)) => last_error = Some(e),
                        Err(_) => {
                            last_error = Some(redis::RedisError::from((
                                redis::ErrorKind::IoError,
                                "subscribing timed out",
                            )))
                        }
                    }
                }
                Err(last_error.unwrap_or_else(|| {
                    redis::RedisError::from((redis::ErrorKind::IoError, "no server"))
                }))
            };
            let bound = self.timings.call_timeout
                * self
                    .sharded
                    .as_ref()
                    .map_or(1, |t| u32::try_from(t.seed_urls.len()).unwrap_or(1).max(1));
            match tokio::time::timeout(bound, subscribed).await {
                Ok(Ok(mut pubsub)) => {
                    tracing::info!(%channel, "subscribed to this node's introductions");
                    let mut messages = pubsub.on_message();
                    loop {
                        tokio::select! {
                            message = messages.next() => {
                                let Some(message) = message else { break };
                                match parse_envelope(&channel, message.get_payload_bytes()) {
                                    Ok(envelope) => deliver(envelope),
                                    Err(e) => {
                                        let n = self.counters.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                                        // Whoever can PUBLISH can send garbage: the log says so
                                        // the first times and then at powers of two, not per
                                        // message (the metric counts them all).
                                        if n <= 10 || n.is_power_of_two() {
                                            tracing::warn!(error = %e, total = n, "dropped a cluster message");
                                        }
                                    }
                                }
                            }
                            // Redis stopped answering: this subscription may be on a
                            // connection that hung; make a new one once Redis answers.
                            _ = outages.changed() => break,
                            _ = shutdown.changed() => return,
                        }
                    }
                    tracing::warn!(%channel, "subscription lost; re-subscribing");
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "cannot subscribe yet"),
                Err(_) => tracing::debug!("subscribing timed out"),
            }
            tokio::select! {
                _ = tokio::time::sleep(self.timings.probe_every) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_are_checked() {
        for good in ["a", "node-1", "eu.west_2", &"x".repeat(64)] {
            assert!(check_node_id(good).is_ok(), "{good}");
        }
        for bad in ["", "a b", "a:b", "nöde", &"x".repeat(65), "a\n"] {
            assert!(check_node_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sentinel_urls_are_parsed_and_bad_ones_refused_with_the_reason() {
        let target =
            SentinelTarget::parse("redis+sentinel://:s3cret@10.0.0.11:26379,rv2.example:26380/rv")
                .unwrap();
        assert_eq!(
            target.sentinel_urls,
            vec!["redis://10.0.0.11:26379/", "redis://rv2.example:26380/"]
        );
        assert_eq!(target.service, "rv");
        assert_eq!(target.username, None);
        assert_eq!(target.password.as_deref(), Some("s3cret"));
        let target =
            SentinelTarget::parse("redis+sentinel://admin:pw@[::1]:26379/my-primary/").unwrap();
        assert_eq!(target.sentinel_urls, vec!["redis://[::1]:26379/"]);
        assert_eq!(target.service, "my-primary");
        assert_eq!(target.username.as_deref(), Some("admin"));
        for (url, why) in [
            ("redis+sentinel://h:26379", "/SERVICE"),
            ("redis+sentinel://h:26379/", "service name"),
            ("redis+sentinel://h:26379/a b", "service name"),
            ("redis+sentinel://h/rv", "HOST:PORT"),
            ("redis+sentinel://h:0/rv", "HOST:PORT"),
            ("redis+sentinel://h:99999/rv", "HOST:PORT"),
            ("redis+sentinel://:26379/rv", "HOST:PORT"),
            ("redis+sentinel://h:1,,h:2/rv", "HOST:PORT"),
            ("redis+sentinel://h/x:1/rv", "HOST:PORT"),
            ("redis+sentinel://pw@h:1/rv", "[USER]:PASSWORD"),
            ("redis://h:1/", "expected redis+sentinel://"),
        ] {
            let e = SentinelTarget::parse(url).expect_err(url);
            assert!(e.contains(why), "{url}: {e}");
        }
        assert_eq!(
            redact_password("redis+sentinel://:s3cret@h1:1,h2:2/rv"),
            "redis+sentinel://:***@h1:1,h2:2/rv"
        );
        // A password may hold `/`, `@`, `:` (taken up to the last `@`) and percent escapes;
        // no error shows any part of it.
        let target =
            SentinelTarget::parse("redis+sentinel://:ab/c@d:e%2Fg%25@redis_s1:26379/rv").unwrap();
        assert_eq!(target.password.as_deref(), Some("ab/c@d:e/g%"));
        assert_eq!(target.sentinel_urls, vec!["redis://redis_s1:26379/"]);
        for url in [
            "redis+sentinel://:ab/cd@h:26379/",
            "redis+sentinel://:ab/cd@h/rv",
            "redis+sentinel://:ab%zzcd@h:1/rv",
            "redis+sentinel://:ab%ffcd@h:1/rv",
        ] {
            let e = SentinelTarget::parse(url).expect_err(url);
            assert!(!e.contains("cd"), "{url}: {e}");
        }
        let many: Vec<String> = (1..=MAX_SENTINELS + 1).map(|i| format!("h{i}:1")).collect();
        let e =
            SentinelTarget::parse(&format!("redis+sentinel://{}/rv", many.join(","))).unwrap_err();
        assert!(e.contains("at most"), "{e}");
    }

    #[test]
    fn redis_cluster_urls_are_parsed_and_bad_ones_refused_with_the_reason() {
        let target =
            ShardedTarget::parse("redis+cluster://:s3cret@10.0.0.11:6379,rv2.example:6380/")
                .unwrap();
        assert_eq!(
            target.seed_urls,
            vec!["redis://10.0.0.11:6379/", "redis://rv2.example:6380/"]
        );
        assert_eq!(target.username, None);
        assert_eq!(target.password.as_deref(), Some("s3cret"));
        let target = ShardedTarget::parse("redis+cluster://admin:p%2Fw@[::1]:7000").unwrap();
        assert_eq!(target.seed_urls, vec!["redis://[::1]:7000/"]);
        assert_eq!(target.username.as_deref(), Some("admin"));
        assert_eq!(target.password.as_deref(), Some("p/w"));
        let clients = target.seed_clients().unwrap();
        let info = clients[0].get_connection_info();
        assert_eq!(info.redis.username.as_deref(), Some("admin"));
        assert_eq!(info.redis.password.as_deref(), Some("p/w"));
        for (url, why) in [
            ("redis+cluster://h:7000/0", "no databases"),
            ("redis+cluster://h/", "HOST:PORT"),
            ("redis+cluster://h:0/", "HOST:PORT"),
            ("redis+cluster://h:1,,h:2/", "HOST:PORT"),
            ("redis+cluster://pw@h:1/", "[USER]:PASSWORD"),
            ("redis://h:1/", "expected redis+cluster://"),
        ] {
            let e = ShardedTarget::parse(url).expect_err(url);
            assert!(e.contains(why), "{url}: {e}");
        }
        let many: Vec<String> = (1..=MAX_SEEDS + 1).map(|i| format!("h{i}:1")).collect();
        let e = ShardedTarget::parse(&format!("redis+cluster://{}/", many.join(","))).unwrap_err();
        assert!(e.contains("at most"), "{e}");
        // The keys share one hash tag there (one slot), and only there.
        let id = PeerId::from_key_digest(&[7; 32]);
        assert_eq!(Keys::SHARDED.peer(&id), format!("{{rv}}:peer:{id}"));
        assert_eq!(Keys::SHARDED.nodes(), "{rv}:nodes");
        assert_eq!(Keys::STANDALONE.online(&id), format!("rv:online:{id}"));
        assert_eq!(Keys::STANDALONE.punch_channel("x"), "rv:punch:x");
    }

    #[tokio::test]
    async fn a_bad_cluster_url_is_refused_without_showing_its_password() {
        for url in [
            "redis+sentinel://:s3cret@h:26379/",
            "rediss://:s3cret@h:6379/",
            "redis+sentinel://:s3cret@h:26379,h/rv",
            "redis+cluster://:s3cret@h:6379,h/",
        ] {
            let config = ClusterConfig {
                url: url.to_owned(),
                node_id: "x".to_owned(),
                timings: ClusterTimings::default(),
                link: None,
            };
            let Err(e) = Cluster::open(&config, Duration::from_secs(60)).await else {
                panic!("{url} accepted");
            };
            assert!(matches!(e, ClusterError::BadUrl { .. }), "{url}: {e}");
            let text = e.to_string();
            assert!(!text.contains("s3cret") && text.contains(":***@"), "{text}");
        }
    }

    /// Values read from Redis that no node writes are typed errors, never panics.
    #[test]
    fn malformed_values_are_typed_errors() {
        let key = "rv:peer:x";
        assert!(matches!(
            parse_record(key, b"not json"),
            Err(ClusterError::Malformed { .. })
        ));
        assert!(matches!(
            parse_record(key, &vec![b'{'; MAX_RECORD_BYTES]),
            Err(ClusterError::Malformed { .. })
        ));
        assert!(matches!(
            parse_record(key, br#"{"observed":"1.2.3.4:5"}"#),
            Err(ClusterError::Malformed { .. })
        ));
        assert_eq!(parse_node("k", b""), Ok(None));
        assert_eq!(parse_node("k", b"n1"), Ok(Some("n1".to_owned())));
        assert!(parse_node("k", b"n 1").is_err());
        assert!(parse_node("k", &[0xff, 0xfe]).is_err());
        assert_eq!(parse_nat("k", b""), Ok(None));
        assert!(parse_nat("k", b"{}").is_err());
        assert!(parse_nat("k", &vec![b' '; MAX_NAT_BYTES]).is_err());
        assert_eq!(parse_node_info("k", b""), Ok(None));
        assert!(matches!(
            parse_node_info("k", b"{\"addr\":1}"),
            Err(ClusterError::Malformed { .. })
        ));
        assert!(matches!(
            parse_node_info("k", &vec![b'['; MAX_RECORD_BYTES + 1]),
            Err(ClusterError::Malformed { .. })
        ));
        let info = NodeInfo {
            addr: "1.2.3.4:5".to_owned(),
            fingerprint: "sha256:ab".to_owned(),
            online: 3,
            link: Some("1.2.3.4:6".to_owned()),
        };
        let json = serde_json::to_vec(&info).expect("a NodeInfo serializes");
        assert_eq!(parse_node_info("k", &json), Ok(Some(info)));
        assert!(parse_envelope("c", b"[]").is_err());
        assert!(parse_envelope("c", &vec![b' '; MAX_MESSAGE_BYTES + 1]).is_err());
        let unknown_field = br#"{"v":1,"from":"a","intro":{},"x":1}"#;
        assert!(parse_envelope("c", unknown_field).is_err());
    }
}
