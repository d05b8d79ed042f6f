//! Control protocol (peer <-> rendezvous) and peer protocol messages.
//!
//! Every message is a JSON object with a `type` field (serde's internally tagged enums), carried in
//! one [`frame`](crate::frame). Decoding tells apart malformed JSON, a missing or unknown `type`,
//! and a known type with bad fields, so that the server can answer each with its own error code.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::PeerId;

/// Version of the control protocol, sent in `register` and echoed in `registered`. Version 2
/// added `accept`: the server relays between two peers only once the target of their
/// introduction accepted it, so version-1 peers (which never accept) are refused. Version 3
/// added the secret `key` of `punch` (probes and answers are authenticated with it instead of
/// the public nonce), so version-2 peers, whose probes new peers would ignore, are refused.
/// Version 4 added the port-mapped candidate (`mapped_port` in `register` and the
/// `mapped_port` message) and `nat` (a peer tells the rendezvous its measured NAT behaviour,
/// handed to the other side in `punch`, from which both sides decide on birthday punching,
/// `punch::birthday`); version-3 peers would never take part, so they are refused. Version 5
/// added IPv6 address proofs (`server_addrs` in `registered`, the `confirm_address` message),
/// which a version-4 server would refuse as unknown fields and types. Version 6 added
/// `mapped_port` to `peer_info` (the port-mapped candidate in `peer lookup`), which a version-5
/// peer would refuse as an unknown field. Version 7 added `inbound_takes_port` to the NAT
/// profile (`nat`, and the peer's profile in `punch`): an initiator whose probes could take the port of a responder behind such a NAT holds them until
/// the responder's first probe (`punch::PunchConfig::initiator_hold`); a version-6 peer would
/// neither report it nor hold, so it is refused. Version 8 added `no_relay` to `punch`: in a
/// cluster whose nodes are not all linked (`--cluster-link`), the introduction says that the
/// relay cannot join the two sides, and a peer that needs the relay is refused at once instead
/// of timing out; a version-7 peer would refuse the unknown field. Version 9 added relay
/// channels (`relay_channel`, `relay_channel_ready`): a relayed connection's packets travel as
/// plain UDP datagrams that the rendezvous forwards without decrypting (see
/// `transport::channel`); a version-8 server would answer the request as an unknown type.
/// Version 10 added `first_flight` to `connect` and to the pushed `punch`: the dialer's first
/// QUIC datagram travels with the introduction, so the target answers the handshake as soon as
/// it hears of it (a round trip to the rendezvous less before the first byte); a version-9
/// peer would refuse the unknown field.
pub const PROTOCOL_VERSION: u32 = 10;

/// Version of the protocol between two peers, carried in their ALPN
/// ([`ALPN_PEER`](crate::ALPN_PEER)). Version 2 tags chat frames and ends a chat with
/// `end`/`end_ack` (see [`chat`](crate::chat)), so that a piped line is never lost while the
/// sender reports success; version-1 peers cannot complete the handshake with version-2 peers.
/// Version 3 adds the `service` application (`service_open`/`service_reply`, then raw bytes:
/// `peer pipe` and `peer forward`) and resumable files (the receiver answers a `file_header`
/// with `file_resume`, the sender says where it starts with `file_start`); a version-2 peer
/// would wait for bytes a version-3 sender holds back, so the two refuse each other in the
/// handshake, naming the older version.
/// Version 4 hashes files with BLAKE3 while they are sent instead of SHA-256 in a pass before:
/// the `file_header` names no hash, the raw bytes are followed by `file_end` with the whole
/// file's hash, and `file_resume`/`file_result` carry BLAKE3 hashes; a version-3 peer would
/// take the `file_end` frame for bytes of the file.
pub const PEER_PROTOCOL_VERSION: u32 = 4;

/// Most local addresses a peer may announce.
pub const MAX_LOCAL_ADDRS: usize = 16;

/// Messages between a peer and the rendezvous.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlMessage {
    /// First message on the control stream. The id comes from the client certificate, the
    /// observed address from the packets, so neither is sent.
    Register {
        /// The client's protocol version.
        version: u32,
        /// The peer's own interface addresses (for peers on the same LAN).
        #[serde(default)]
        local_addrs: Vec<SocketAddr>,
        /// The external port our router maps to our UDP port (PCP, NAT-PMP or UPnP IGD), if
        /// any. Only the port: the rendezvous pairs it with the address it observes, so that a
        /// peer can never aim others at an address that is not its own.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mapped_port: Option<u16>,
    },
    /// Reply to `register`.
    Registered {
        /// The id the server derived from the client certificate.
        id: PeerId,
        /// The source address the server saw.
        observed: SocketAddr,
        /// How often the peer should send something to keep NAT mappings alive.
        keepalive_s: u32,
        /// The server's protocol version.
        version: u32,
        /// The server's addresses where it answers address-proof requests (a dual-stack
        /// server: one per family). A dual-stack peer sends a
        /// [`stun::observe_request`](crate::stun::observe_request) to the one of the other
        /// family than this connection's and confirms its address with `confirm_address`.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        server_addrs: Vec<SocketAddr>,
    },
    /// Ask for a peer's addresses.
    Query {
        /// Whom to look up.
        id: PeerId,
    },
    /// Reply to `query`.
    PeerInfo(PeerInfo),
    /// Ask the server to introduce two peers: both get a `punch`.
    Connect {
        /// The peer to connect to.
        id: PeerId,
        /// The dialer's first QUIC datagram (its Initial) for `id`. The rendezvous hands it to
        /// the target inside the pushed `punch` when it can (see [`FirstFlight`]); the dialer
        /// sends it over the relay as well, so nothing depends on it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        first_flight: Option<FirstFlight>,
    },
    /// Sent to both sides of a `connect`: the requester gets it as the reply, the target on its
    /// control stream, at the same moment, so that both can start probing together.
    Punch {
        /// The other side.
        peer: PeerId,
        /// Addresses where the other side may be reached, best first.
        candidates: Vec<Candidate>,
        /// Shared by both sides of one introduction; probes carry it in clear (it routes them
        /// to their session). Random.
        nonce: u64,
        /// The introduction's secret: probes and answers carry MESSAGE-INTEGRITY keyed by it.
        /// Only ever sent on the TLS control streams of the two peers.
        key: crate::stun::PunchKey,
        /// The other side's NAT behaviour as it reported it (`nat`), if it did: with ours, it
        /// decides whether this pair needs birthday punching and which side plays which role.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        nat: Option<crate::nat::NatProfile>,
        /// Why the rendezvous cannot relay between the two sides of this introduction, when it
        /// cannot (they are on two nodes of a cluster that are not linked); absent when it can.
        /// Only a direct path can then join them.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        no_relay: Option<String>,
        /// To the target only: the requester's first QUIC datagram from its `connect`, to be
        /// taken as if relayed from the requester once the target accepts the introduction.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        first_flight: Option<FirstFlight>,
    },
    /// Sent by the target of an introduction (on a request stream of its own) when it gets the
    /// `punch` push: it agrees to be relayed to and from `peer`. Answered with `ack`, or an error
    /// if no such introduction is waiting (wrong peer or nonce, expired).
    Accept {
        /// The peer that asked for the introduction (the `peer` of the pushed `punch`).
        peer: PeerId,
        /// The introduction's nonce (the `nonce` of the pushed `punch`).
        nonce: u64,
    },
    /// First frame of a stream that becomes this peer's relay stream (binary
    /// [`relay`](crate::relay) frames follow in both directions once the server answers).
    RelayOpen {},
    /// The relay stream is open.
    RelayReady {
        /// Largest packet the server relays.
        max_packet: u32,
        /// Relay limit for this peer, bytes per second.
        rate_bytes_per_s: u64,
    },
    /// Asks for a relay channel with `peer` (introduced to us, with its accept, and
    /// registered on this server): packets to it may then leave as channel datagrams from the
    /// socket of this connection (see `transport::channel`). Answered with
    /// `relay_channel_ready`, or an error (`relay_denied`) when the relay stream must do. Asked
    /// again after the connection's address changed, it binds the new address.
    RelayChannel {
        /// The other side.
        peer: PeerId,
    },
    /// A relay channel is granted.
    RelayChannelReady {
        /// The other side (as asked).
        peer: PeerId,
        /// The channel's id, 16 hex digits (64 bits: the header of its datagrams).
        channel: String,
        /// Largest packet a channel datagram carries (larger ones take the relay stream).
        max_packet: u32,
    },
    /// Liveness check; answered with `pong`.
    Ping {
        /// Echoed back.
        seq: u64,
    },
    /// Reply to `ping`.
    Pong {
        /// The `seq` of the ping.
        seq: u64,
    },
    /// How a punch that followed an introduction (`connect`) ended, sent by the side that asked
    /// for it; the server counts successes for its operator. Answered with `ack`.
    PunchResult {
        /// The other side of the introduction.
        peer: PeerId,
        /// A direct path was proven.
        direct: bool,
    },
    /// The external port our router maps to our UDP port changed (`None`: no mapping any
    /// more), sent after `register` whenever it changes. Answered with `ack`.
    MappedPort {
        /// As `mapped_port` of `register`.
        port: Option<u16>,
    },
    /// The peer's NAT behaviour, as it measured it against the rendezvous's STUN service; sent
    /// once measured and again after every registration. Kept while the peer is online and
    /// handed to the other side of its introductions (in `punch`). Answered with `ack`.
    Nat {
        /// The measured profile.
        nat: crate::nat::NatProfile,
    },
    /// Our address in the other IP family than this connection's, as the server's answer to our
    /// address-proof request showed it, with that answer's MESSAGE-INTEGRITY as the proof that
    /// we receive at `addr` (only the server can compute it, and it sent it only there).
    /// Answered with `ack`, or an error if the proof does not check (wrong, or older than
    /// about two minutes). The server then hands `addr` out as a second observed candidate.
    ConfirmAddress {
        /// Our address (the XOR-MAPPED-ADDRESS of the answer).
        addr: SocketAddr,
        /// The transaction id of our request.
        transaction: [u8; 12],
        /// The answer's MESSAGE-INTEGRITY.
        proof: [u8; 20],
    },
    /// Reply to a report that needs no other answer.
    Ack {},
    /// A request failed.
    Error {
        /// Machine-readable reason.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
    },
}

impl ControlMessage {
    /// A `connect` to `id` without a first flight.
    pub fn connect(id: PeerId) -> Self {
        ControlMessage::Connect {
            id,
            first_flight: None,
        }
    }

    /// Shorthand for an error reply.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        ControlMessage::Error {
            code,
            message: message.into(),
        }
    }

    /// Decodes a frame body.
    pub fn decode(bytes: &[u8]) -> Result<Self, MessageError> {
        decode_tagged(bytes, CONTROL_TYPES)
    }

    /// Encodes to JSON bytes (a frame body).
    pub fn encode(&self) -> Vec<u8> {
        encode_json(self)
    }

    /// A channel id as `relay_channel_ready` spells it.
    pub fn channel_hex(id: u64) -> String {
        format!("{id:016x}")
    }

    /// A channel id from `relay_channel_ready` (exactly 16 hex digits).
    pub fn parse_channel(hex: &str) -> Option<u64> {
        if hex.len() != 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        u64::from_str_radix(hex, 16).ok()
    }

    /// The `type` tag, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ControlMessage::Register { .. } => "register",
            ControlMessage::Registered { .. } => "registered",
            ControlMessage::Query { .. } => "query",
            ControlMessage::PeerInfo(_) => "peer_info",
            ControlMessage::Connect { .. } => "connect",
            ControlMessage::Punch { .. } => "punch",
            ControlMessage::Accept { .. } => "accept",
            ControlMessage::RelayOpen {} => "relay_open",
            ControlMessage::RelayReady { .. } => "relay_ready",
            ControlMessage::RelayChannel { .. } => "relay_channel",
            ControlMessage::RelayChannelReady { .. } => "relay_channel_ready",
            ControlMessage::Ping { .. } => "ping",
            ControlMessage::Pong { .. } => "pong",
            ControlMessage::PunchResult { .. } => "punch_result",
            ControlMessage::MappedPort { .. } => "mapped_port",
            ControlMessage::ConfirmAddress { .. } => "confirm_address",
            ControlMessage::Nat { .. } => "nat",
            ControlMessage::Ack {} => "ack",
            ControlMessage::Error { .. } => "error",
        }
    }
}

/// The `type` tags of [`ControlMessage`]: [`ControlMessage::decode`] answers any other with
/// [`MessageError::UnknownType`].
pub const CONTROL_TYPES: &[&str] = &[
    "register",
    "registered",
    "query",
    "peer_info",
    "connect",
    "punch",
    "accept",
    "relay_open",
    "relay_ready",
    "relay_channel",
    "relay_channel_ready",
    "ping",
    "pong",
    "punch_result",
    "mapped_port",
    "confirm_address",
    "nat",
    "ack",
    "error",
];

/// The `type` tags of [`PeerMessage`]: [`PeerMessage::decode`] answers any other with
/// [`MessageError::UnknownType`].
pub const PEER_TYPES: &[&str] = &[
    "open",
    "file_header",
    "file_end",
    "file_result",
    "file_resume",
    "file_start",
    "service_open",
    "service_reply",
    "ping",
    "pong",
    "error",
];

/// Largest [`FirstFlight`], in bytes: one UDP datagram of the largest payload an IPv4 path
/// with a 1,500-byte MTU carries (a QUIC client's Initial is padded to 1,200 bytes).
pub const MAX_FIRST_FLIGHT: usize = 1472;

/// A dialer's first QUIC datagram, carried in `connect` and the pushed `punch` (JSON: a base64
/// string). Between 1 and [`MAX_FIRST_FLIGHT`] bytes: anything else fails to decode. Its
/// bytes are the peers' business (an Initial packet the target's QUIC endpoint checks); the
/// rendezvous only forwards them, one per introduction, so the introduction rate limits bound
/// what a requester can make it send.
#[derive(Clone, PartialEq, Eq)]
pub struct FirstFlight(Vec<u8>);

impl FirstFlight {
    /// `datagram` as a first flight, or `None` when it is empty or longer than
    /// [`MAX_FIRST_FLIGHT`].
    pub fn new(datagram: Vec<u8>) -> Option<Self> {
        (!datagram.is_empty() && datagram.len() <= MAX_FIRST_FLIGHT)
            .then_some(FirstFlight(datagram))
    }

    /// The datagram.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The datagram, owned.
    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

impl std::fmt::Debug for FirstFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FirstFlight({} bytes)", self.0.len())
    }
}

impl Serialize for FirstFlight {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use base64::Engine as _;
        serializer.serialize_str(&base64::engine::general_purpose::STANDARD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for FirstFlight {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use base64::Engine as _;
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        // Checked before decoding, so that a huge string costs no allocation of its size.
        if text.len() > MAX_FIRST_FLIGHT.div_ceil(3) * 4 {
            return Err(serde::de::Error::custom(format!(
                "first_flight longer than {MAX_FIRST_FLIGHT} bytes"
            )));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .map_err(|e| serde::de::Error::custom(format!("first_flight is not base64: {e}")))?;
        FirstFlight::new(bytes).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "first_flight must hold 1 to {MAX_FIRST_FLIGHT} bytes"
            ))
        })
    }
}

/// What the rendezvous knows about a peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerInfo {
    /// The peer.
    pub id: PeerId,
    /// Its public address as last seen by the server.
    pub observed: SocketAddr,
    /// Its interface addresses as it announced them.
    pub local_addrs: Vec<SocketAddr>,
    /// The external port its router maps to it (`register` / `mapped_port`), if any: with the
    /// observed IP, its port-mapped candidate (shown by `peer lookup` as `(port mapping)`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mapped_port: Option<u16>,
    /// Whether it has a live control connection now.
    pub online: bool,
    /// When the server last heard from it.
    #[serde(with = "time::serde::rfc3339")]
    pub last_seen: OffsetDateTime,
}

/// An address where a peer may be reachable, and where it comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Candidate {
    /// The address.
    pub addr: SocketAddr,
    /// Its origin.
    pub kind: CandidateKind,
}

impl Candidate {
    /// How a path to this candidate is described to users (see [`describe_candidate`]).
    pub fn describe(&self) -> &'static str {
        describe_candidate(self.kind, self.addr)
    }
}

/// How a path to `addr`, a candidate of `kind`, is described: as [`CandidateKind::describe`],
/// except that an interface address that is a global IPv6 address is a "public IPv6
/// address", not a LAN one: IPv6 has no NAT, so a peer's interface address is its public one.
pub fn describe_candidate(kind: CandidateKind, addr: SocketAddr) -> &'static str {
    match (kind, addr.ip()) {
        (CandidateKind::Local, std::net::IpAddr::V6(v6)) if is_global_ipv6(&v6) => {
            "public IPv6 address"
        }
        _ => kind.describe(),
    }
}

/// Whether `ip` is in the IPv6 global unicast range (2000::/3), where every public IPv6
/// address is today (documentation addresses, 2001:db8::/32, included: the lab uses them).
pub fn is_global_ipv6(ip: &std::net::Ipv6Addr) -> bool {
    ip.segments()[0] & 0xe000 == 0x2000
}

/// Most candidates of one peer the rendezvous hands out in a `punch`, and that a peer probes
/// (the rest are ignored): each costs the other side probes.
pub const MAX_CANDIDATES: usize = 8;

/// Whether `addr` may be handed out and probed as a candidate: not unspecified, multicast,
/// broadcast, port 0, or a reserved 240.0.0.0/4 address (the rendezvous's TCP tunnels and the
/// peers' stable per-peer addresses live there), and loopback only when `allow_loopback` (both
/// peers and the rendezvous run on one host, as in tests). A candidate is an address the other
/// peer will send probes to, so these rules keep a peer from aiming another at addresses that
/// are no peer's (its own host, a subnet's broadcast, a multicast group).
pub fn usable_candidate(addr: SocketAddr, allow_loopback: bool) -> bool {
    use std::net::IpAddr;
    if addr.port() == 0 {
        return false;
    }
    let ip = match addr.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    if ip.is_unspecified() || ip.is_multicast() || (ip.is_loopback() && !allow_loopback) {
        return false;
    }
    match ip {
        IpAddr::V4(v4) => !v4.is_broadcast() && v4.octets()[0] < 240,
        IpAddr::V6(_) => true,
    }
}

/// Origin of a [`Candidate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CandidateKind {
    /// The source address the rendezvous observed (the peer's public mapping).
    Observed,
    /// An interface address of the peer (same LAN, or no NAT).
    Local,
    /// A port mapping obtained from the router (UPnP IGD, NAT-PMP, PCP).
    Mapped,
    /// A port guessed for a symmetric NAT.
    Predicted,
}

impl CandidateKind {
    /// How the path is described to users.
    pub fn describe(&self) -> &'static str {
        match self {
            CandidateKind::Observed => "public address",
            CandidateKind::Local => "same LAN",
            CandidateKind::Mapped => "port mapping",
            CandidateKind::Predicted => "predicted port",
        }
    }
}

/// Machine-readable error codes of the control protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame is not valid JSON or a message has bad fields.
    BadRequest,
    /// The `type` is not one this server knows.
    UnknownType,
    /// The frame is over the size cap.
    TooLarge,
    /// No such peer is registered.
    NotFound,
    /// The peer is registered but not connected now.
    PeerOffline,
    /// The request needs a registration first.
    NotRegistered,
    /// Client and server protocol versions are incompatible.
    UnsupportedVersion,
    /// Too many requests.
    RateLimited,
    /// Relaying is refused (not introduced, over quota).
    RelayDenied,
    /// The server failed; try again.
    Internal,
    /// A code this build does not know (newer server).
    #[serde(other)]
    Unknown,
}

/// Messages between two peers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum PeerMessage {
    /// First frame on every stream a peer opens: which application runs on it.
    Open {
        /// The application.
        app: PeerApp,
    },
    /// Sent after `open {app: file}`: what the sender offers (the receiver answers with
    /// `file_resume`, or refuses).
    FileHeader {
        /// File name (a plain name: no directories).
        name: String,
        /// The file's length in bytes.
        size: u64,
    },
    /// The receiver's answer to a `file_header`: how much of this file (same sender, name and
    /// size) it already holds from an interrupted transfer, and the BLAKE3 hash of those bytes.
    /// `offset` 0 (and the empty string's hash) when it has nothing.
    FileResume {
        /// Bytes the receiver holds (at most the announced size).
        offset: u64,
        /// BLAKE3 of those bytes, hex.
        prefix_blake3: String,
    },
    /// The sender's answer to `file_resume`: exactly `size - offset` raw bytes follow (the file
    /// from `offset` to its end), then `file_end`. Either the receiver's offset (the prefix
    /// hashes matched) or 0 (start over).
    FileStart {
        /// Where the bytes that follow start.
        offset: u64,
    },
    /// After the raw bytes: the BLAKE3 hash of the whole file (from byte 0, the resumed prefix
    /// included), computed by the sender as it read the bytes it sent. The sender then finishes
    /// its side of the stream.
    FileEnd {
        /// BLAKE3 of the whole file, hex.
        blake3: String,
    },
    /// The receiver's verdict on a file.
    FileResult {
        /// Stored and verified.
        ok: bool,
        /// BLAKE3 of the bytes the receiver holds, hex (empty when it refused the file before
        /// any).
        blake3: String,
        /// Detail for the sender.
        message: String,
    },
    /// Sent after `open {app: service}`: which exposed TCP service the stream is for.
    ServiceOpen {
        /// The service's name (`peer listen --expose NAME=HOST:PORT`).
        name: String,
        /// Only ask whether the service is exposed to us (no TCP connection is made); the
        /// reply ends the stream.
        #[serde(default)]
        probe: bool,
    },
    /// The answer to `service_open`: with `ok`, the TCP connection is up and raw bytes follow
    /// both ways (each side finishing its half when its reader ends); otherwise why not.
    ServiceReply {
        /// Connected (or, for a probe, exposed to us).
        ok: bool,
        /// Why not, or what the stream is connected to.
        message: String,
    },
    /// On a `ping` stream: echo this `seq` at once.
    Ping {
        /// Echoed in the `pong`.
        seq: u64,
    },
    /// Answer to a peer's `ping`, with what the answering peer knows of its NAT.
    Pong {
        /// The `seq` of the ping.
        seq: u64,
        /// The answering peer's NAT, if it has measured it.
        #[serde(default)]
        nat: Option<crate::nat::NatProfile>,
    },
    /// The receiver refuses the stream or a message on it.
    Error {
        /// Human-readable reason.
        message: String,
    },
}

impl PeerMessage {
    /// Decodes a frame body.
    pub fn decode(bytes: &[u8]) -> Result<Self, MessageError> {
        decode_tagged(bytes, PEER_TYPES)
    }

    /// Encodes to JSON bytes.
    pub fn encode(&self) -> Vec<u8> {
        encode_json(self)
    }
}

/// Applications that run on a peer-to-peer stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerApp {
    /// Chat: [`ChatFrame`](crate::ChatFrame)s both ways (messages, then `end`/`end_ack`).
    Chat,
    /// One file: a `file_header`, `file_resume` back, `file_start`, the bytes from there,
    /// `file_end` (the whole file's hash), and a `file_result` back.
    File,
    /// Round trips: `ping` frames answered by `pong` frames.
    Ping,
    /// A byte stream to a TCP service the other side exposes: `service_open`, `service_reply`,
    /// then raw bytes both ways.
    Service,
}

/// Why a frame body is not a valid message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// Not JSON, or not a JSON object.
    #[error("malformed JSON: {0}")]
    Json(String),
    /// A JSON object without a string `type`.
    #[error("message has no \"type\" field")]
    MissingType,
    /// A `type` this side does not know.
    #[error("unknown message type {0:?}")]
    UnknownType(String),
    /// A known type with missing, extra or invalid fields.
    #[error("invalid {kind:?} message: {reason}")]
    Invalid {
        /// The `type`.
        kind: String,
        /// What serde said.
        reason: String,
    },
}

impl MessageError {
    /// The control-protocol error code that answers this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            MessageError::UnknownType(_) => ErrorCode::UnknownType,
            _ => ErrorCode::BadRequest,
        }
    }
}

fn decode_tagged<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    known: &[&str],
) -> Result<T, MessageError> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| MessageError::Json(e.to_string()))?;
    let kind = match &value {
        serde_json::Value::Object(map) => match map.get("type") {
            Some(serde_json::Value::String(kind)) => kind.clone(),
            _ => return Err(MessageError::MissingType),
        },
        _ => return Err(MessageError::Json("expected a JSON object".into())),
    };
    if !known.contains(&kind.as_str()) {
        // Cap what is echoed back: the tag comes from the network.
        let shown: String = kind.chars().take(64).collect();
        return Err(MessageError::UnknownType(shown));
    }
    serde_json::from_value(value).map_err(|e| MessageError::Invalid {
        kind,
        reason: e.to_string(),
    })
}

fn encode_json<T: Serialize>(value: &T) -> Vec<u8> {
    // Serialising these types cannot fail: no maps with non-string keys, no failing Serialize
    // impls. An empty object would be answered with an error by the other side, never a panic.
    serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A global IPv6 interface address is a public address (no NAT in IPv6); LAN, link-local,
    /// unique-local and IPv4 interface addresses stay "same LAN".
    #[test]
    fn a_global_ipv6_interface_address_is_described_as_public() {
        let describe = |addr: &str| describe_candidate(CandidateKind::Local, addr.parse().unwrap());
        assert_eq!(describe("[2001:db8:1::2]:5000"), "public IPv6 address");
        assert_eq!(describe("[2a00:1450::1]:5000"), "public IPv6 address");
        assert_eq!(describe("[fd00::2]:5000"), "same LAN");
        assert_eq!(describe("[fe80::1]:5000"), "same LAN");
        assert_eq!(describe("10.0.1.2:5000"), "same LAN");
        assert_eq!(describe("[::ffff:10.0.1.2]:5000"), "same LAN");
        // Other kinds keep their description whatever the family.
        assert_eq!(
            describe_candidate(CandidateKind::Observed, "[2001:db8::2]:1".parse().unwrap()),
            "public address"
        );
    }
    use proptest::prelude::*;

    fn id() -> PeerId {
        PeerId::from_key_digest(&[1; 32])
    }

    #[test]
    fn relay_channel_messages_are_the_documented_json_and_ids_parse_strictly() {
        let ready = ControlMessage::RelayChannelReady {
            peer: id(),
            channel: ControlMessage::channel_hex(0xAB),
            max_packet: 1463,
        };
        let json: serde_json::Value = serde_json::from_slice(&ready.encode()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"type": "relay_channel_ready", "peer": id().to_string(),
                "channel": "00000000000000ab", "max_packet": 1463})
        );
        assert_eq!(ControlMessage::decode(&ready.encode()).unwrap(), ready);
        let ask = ControlMessage::RelayChannel { peer: id() };
        assert_eq!(ControlMessage::decode(&ask.encode()).unwrap(), ask);
        assert_eq!(
            ControlMessage::parse_channel("00000000000000ab"),
            Some(0xAB)
        );
        assert_eq!(
            ControlMessage::parse_channel("ffffffffffffffff"),
            Some(u64::MAX)
        );
        for bad in [
            "",
            "ab",
            "+0000000000000ab",
            "00000000000000ag",
            "000000000000000ab",
            "é0000000000000a",
        ] {
            assert_eq!(ControlMessage::parse_channel(bad), None, "{bad}");
        }
    }

    #[test]
    fn wire_format_is_the_documented_json() {
        let msg = ControlMessage::Query { id: id() };
        let json: serde_json::Value = serde_json::from_slice(&msg.encode()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"type": "query", "id": id().to_string()})
        );
        let register = ControlMessage::decode(br#"{"type":"register","version":1}"#).unwrap();
        assert_eq!(
            register,
            ControlMessage::Register {
                version: 1,
                local_addrs: vec![],
                mapped_port: None,
            }
        );
        // Version 4: the router-mapped port, in `register` and on its own.
        let register = ControlMessage::decode(
            br#"{"type":"register","version":4,"local_addrs":[],"mapped_port":41000}"#,
        )
        .unwrap();
        assert!(matches!(
            register,
            ControlMessage::Register {
                mapped_port: Some(41000),
                ..
            }
        ));
        let json: serde_json::Value =
            serde_json::from_slice(&ControlMessage::MappedPort { port: Some(41000) }.encode())
                .unwrap();
        assert_eq!(
            json,
            serde_json::json!({"type": "mapped_port", "port": 41000})
        );
        assert_eq!(
            ControlMessage::decode(br#"{"type":"mapped_port","port":null}"#).unwrap(),
            ControlMessage::MappedPort { port: None }
        );
        assert!(ControlMessage::decode(br#"{"type":"mapped_port","port":70000}"#).is_err());
        assert_eq!(CandidateKind::Mapped.describe(), "port mapping");
        let info = ControlMessage::PeerInfo(PeerInfo {
            id: id(),
            observed: "203.0.113.2:4000".parse().unwrap(),
            local_addrs: vec!["10.0.0.2:4000".parse().unwrap()],
            mapped_port: Some(41000),
            online: true,
            last_seen: time::macros::datetime!(2026-11-25 07:40:58 UTC),
        });
        let json: serde_json::Value = serde_json::from_slice(&info.encode()).unwrap();
        assert_eq!(json["type"], "peer_info");
        assert_eq!(json["last_seen"], "2026-11-25T07:40:58Z");
        assert_eq!(json["mapped_port"], 41000);
        assert_eq!(ControlMessage::decode(&info.encode()).unwrap(), info);
        // No mapping: no field (and its absence decodes as none).
        let ControlMessage::PeerInfo(mut unmapped) = info else {
            unreachable!()
        };
        unmapped.mapped_port = None;
        let encoded = ControlMessage::PeerInfo(unmapped.clone()).encode();
        let json: serde_json::Value = serde_json::from_slice(&encoded).unwrap();
        assert!(json.get("mapped_port").is_none(), "{json}");
        assert_eq!(
            ControlMessage::decode(&encoded).unwrap(),
            ControlMessage::PeerInfo(unmapped)
        );
        let err = ControlMessage::error(ErrorCode::NotFound, "no such peer");
        let json: serde_json::Value = serde_json::from_slice(&err.encode()).unwrap();
        assert_eq!(json["code"], "not_found");
    }

    #[test]
    fn decode_errors_are_classified() {
        assert!(matches!(
            ControlMessage::decode(b"{not json"),
            Err(MessageError::Json(_))
        ));
        assert!(matches!(
            ControlMessage::decode(b"[1,2]"),
            Err(MessageError::Json(_))
        ));
        assert_eq!(
            ControlMessage::decode(br#"{"id":"x"}"#),
            Err(MessageError::MissingType)
        );
        let unknown = ControlMessage::decode(br#"{"type":"launch_missiles"}"#).unwrap_err();
        assert_eq!(unknown, MessageError::UnknownType("launch_missiles".into()));
        assert_eq!(unknown.code(), ErrorCode::UnknownType);
        let bad_id = ControlMessage::decode(br#"{"type":"query","id":"not-a-uuid"}"#).unwrap_err();
        assert!(matches!(&bad_id, MessageError::Invalid { kind, .. } if kind == "query"));
        assert_eq!(bad_id.code(), ErrorCode::BadRequest);
        let extra = ControlMessage::decode(br#"{"type":"ping","seq":1,"evil":true}"#);
        assert!(matches!(extra, Err(MessageError::Invalid { .. })));
    }

    #[test]
    fn unknown_error_codes_from_newer_servers_decode() {
        let msg = ControlMessage::decode(br#"{"type":"error","code":"brand_new","message":"m"}"#)
            .unwrap();
        assert_eq!(msg, ControlMessage::error(ErrorCode::Unknown, "m"));
    }

    #[test]
    fn unusable_candidates_are_refused() {
        for bad in [
            "0.0.0.0:1",
            "[::]:1",
            "203.0.113.1:0",
            "224.0.0.251:5353",
            "[ff02::1]:9",
            "255.255.255.255:9",
            "240.0.0.1:9",
            "[::ffff:127.0.0.1]:9",
            "[::ffff:255.255.255.255]:9",
        ] {
            let addr: SocketAddr = bad.parse().unwrap();
            assert!(!usable_candidate(addr, false), "{bad}");
        }
        for (loopback, allowed) in [("127.0.0.1:9", true), ("[::1]:9", true)] {
            let addr: SocketAddr = loopback.parse().unwrap();
            assert!(!usable_candidate(addr, false), "{loopback}");
            assert_eq!(usable_candidate(addr, true), allowed, "{loopback}");
        }
        for good in ["10.0.0.2:4000", "203.0.113.9:1", "[2001:db8::1]:9"] {
            assert!(usable_candidate(good.parse().unwrap(), false), "{good}");
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = ControlMessage::decode(&bytes);
            let _ = PeerMessage::decode(&bytes);
        }

        #[test]
        fn arbitrary_json_objects_never_panic(
            kind in prop_oneof![Just("query".to_string()), Just("register".to_string()),
                                Just("punch".to_string()), Just("peer_info".to_string()), "[a-z_]{0,12}"],
            key in "[a-z_]{1,10}",
            value in prop_oneof![Just(serde_json::json!(null)), any::<i64>().prop_map(|n| serde_json::json!(n)),
                                 "\\PC{0,20}".prop_map(|s| serde_json::json!(s))],
        ) {
            let obj = serde_json::json!({"type": kind, key: value});
            let bytes = serde_json::to_vec(&obj).unwrap();
            let _ = ControlMessage::decode(&bytes);
        }

        #[test]
        fn accept_round_trips(nonce in any::<u64>()) {
            let msg = ControlMessage::Accept { peer: id(), nonce };
            let json: serde_json::Value = serde_json::from_slice(&msg.encode()).unwrap();
            prop_assert_eq!(json, serde_json::json!({"type": "accept", "peer": id().to_string(), "nonce": nonce}));
            prop_assert_eq!(ControlMessage::decode(&msg.encode()).unwrap(), msg);
        }

        #[test]
        fn punch_round_trips(nonce in any::<u64>(), port in 1u16.., key in any::<[u8; 16]>()) {
            let msg = ControlMessage::Punch {
                peer: id(),
                candidates: vec![Candidate { addr: SocketAddr::from(([203, 0, 113, 9], port)), kind: CandidateKind::Observed }],
                nonce,
                key: crate::stun::PunchKey::from_bytes(key),
                nat: (port % 2 == 0).then_some(crate::nat::NatProfile {
                    udp: true,
                    no_nat: false,
                    mapping: crate::nat::Behaviour::AddressAndPortDependent,
                    filtering: crate::nat::Behaviour::AddressAndPortDependent,
                    inbound_takes_port: false,
                }),
                no_relay: (port % 3 == 0).then(|| "node y has no node link".to_owned()),
                first_flight: (port % 5 == 0).then(|| FirstFlight::new(key.repeat(75)).unwrap()),
            };
            prop_assert_eq!(ControlMessage::decode(&msg.encode()).unwrap(), msg);
        }

        #[test]
        fn connect_round_trips_with_any_first_flight(datagram in proptest::collection::vec(any::<u8>(), 1..=MAX_FIRST_FLIGHT)) {
            let msg = ControlMessage::Connect { id: id(), first_flight: FirstFlight::new(datagram) };
            prop_assert_eq!(ControlMessage::decode(&msg.encode()).unwrap(), msg);
        }
    }

    #[test]
    fn a_connect_without_a_first_flight_is_the_old_message() {
        let msg = ControlMessage::connect(id());
        let json: serde_json::Value = serde_json::from_slice(&msg.encode()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"type": "connect", "id": id().to_string()})
        );
    }

    #[test]
    fn a_first_flight_out_of_bounds_or_not_base64_is_refused() {
        use base64::Engine as _;
        let b64 = |n: usize| base64::engine::general_purpose::STANDARD.encode(vec![7u8; n]);
        let connect = |flight: serde_json::Value| {
            let obj = serde_json::json!({"type": "connect", "id": id().to_string(), "first_flight": flight});
            ControlMessage::decode(&serde_json::to_vec(&obj).unwrap())
        };
        assert!(matches!(
            connect(serde_json::json!(b64(MAX_FIRST_FLIGHT))),
            Ok(ControlMessage::Connect { first_flight: Some(f), .. }) if f.as_bytes().len() == MAX_FIRST_FLIGHT
        ));
        for bad in [
            serde_json::json!(b64(MAX_FIRST_FLIGHT + 1)),
            serde_json::json!(b64(0)),
            serde_json::json!("not base64!"),
            serde_json::json!("A".repeat(1 << 20)),
            serde_json::json!(12),
        ] {
            assert!(
                matches!(connect(bad.clone()), Err(MessageError::Invalid { .. })),
                "{bad:.40}"
            );
        }
        assert!(FirstFlight::new(Vec::new()).is_none());
        assert!(FirstFlight::new(vec![0; MAX_FIRST_FLIGHT + 1]).is_none());
    }
}
