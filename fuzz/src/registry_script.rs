//! The byte format of the registry target's input: a script of operations on a handful of
//! peers, their connections and a clock, each operation a few bytes (so that libFuzzer's
//! mutations add, drop and change whole steps), and an encoder for writing seed scripts.
//!
//! | opcode (byte % 5) | bytes after it | operation |
//! | --- | --- | --- |
//! | 0 | peer, conn, from, kind, a, b | peer sends a control message on one of its connections |
//! | 1 | peer, conn | one of the peer's connections closes |
//! | 2 | peer, from | the peer's packets now come from another address (migration) |
//! | 3 | hi, lo, shift | time moves forward by `(hi << 8 | lo) << (shift % 8)` seconds (up to 97 days) |
//! | 4 | max | the server's expiry sweep deletes at most `1 + max % 8` long-offline rows |
//!
//! The message of a send is `kind % 7`: 0 `register` (`a`: bit 0 the right version, bit 1
//! repeated addresses, bit 2 too many; `b`: which local addresses), 1 `query` (`a`: the peer),
//! 2 `connect` (`a`), 3 `ping` (`a`: seq), 4 `punch_result` (`a`: the peer, `b & 1`: direct),
//! 5 a message only the server sends (`a`), 6 `accept` (`a`: the requester, `b & 1`: with the
//! nonce of the pair's last introduction, else a wrong one; the driver fills it in).
//!
//! A script ends at the first incomplete operation.

use std::net::SocketAddr;

use common::message::MAX_LOCAL_ADDRS;
use common::{ControlMessage, PeerId, PROTOCOL_VERSION};

/// Peers a script talks about.
pub const PEERS: u8 = 6;

/// Live connections a peer may hold at once in a script (the driver accepts more, but three
/// already give "old connection", "new connection" and "the one after").
pub const CONNS_PER_PEER: usize = 3;

/// The id of script peer `n`.
pub fn peer(n: u8) -> PeerId {
    PeerId::from_key_digest(&[n % PEERS + 1; 32])
}

/// Source addresses a peer's packets may come from: IPv4, IPv6, and the virtual address of a
/// TCP-tunnelled peer (240.0.0.0/4, never a candidate).
pub const FROM: [&str; 8] = [
    "203.0.113.1:4000",
    "203.0.113.1:4001",
    "198.51.100.7:50000",
    "[2001:db8::1]:4000",
    "[2001:db8::1]:4001",
    "241.0.0.1:443",
    "10.0.0.5:4000",
    "[2001:db8::2]:1",
];

/// Local addresses a peer may announce, bad ones included (port 0, unspecified, virtual, the
/// observed address itself).
pub const LOCAL: [&str; 8] = [
    "10.0.0.2:4000",
    "10.0.0.2:0",
    "0.0.0.0:4000",
    "[::]:4000",
    "241.0.0.9:1",
    "192.168.1.2:5000",
    "[fd00::2]:4000",
    "203.0.113.1:4000",
];

/// Parses one of the tables above (they are constants: parsing cannot fail).
pub fn addr(table: &[&str; 8], n: u8) -> SocketAddr {
    table[usize::from(n) % 8]
        .parse()
        .unwrap_or_else(|_| unreachable!())
}

/// What a peer sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Msg {
    /// `register`: the right version or not, the local addresses picked by a bit mask, repeated
    /// out of order (duplicates that are not adjacent) or padded past the cap.
    Register {
        /// [`PROTOCOL_VERSION`], or another one.
        version_ok: bool,
        /// Bit i: announce `LOCAL[i]`.
        locals: u8,
        /// Announce the list twice, the second time reversed.
        repeat: bool,
        /// Announce more than [`MAX_LOCAL_ADDRS`].
        too_many: bool,
    },
    /// `query` for a script peer.
    Query(u8),
    /// `connect` to a script peer.
    Connect(u8),
    /// `ping`.
    Ping(u8),
    /// `punch_result` about a script peer.
    PunchResult(u8, bool),
    /// A message only the server sends (`pong`, `punch`, `registered`, ...).
    ServerSide(u8),
    /// `accept` of an introduction asked for by a script peer (the requester): with the nonce
    /// of the last introduction between the two (`true`) or a wrong one (`false`). The driver
    /// knows the nonces and passes the one to send to [`Msg::to_message`].
    Accept(u8, bool),
}

/// One step of a script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `peer` sends `msg` on its connection number `conn` (modulo the live ones; a number past
    /// them opens a new connection) from address `FROM[from]`.
    Send {
        /// Script peer.
        peer: u8,
        /// Which connection.
        conn: u8,
        /// Index in [`FROM`].
        from: u8,
        /// The message.
        msg: Msg,
    },
    /// One of the peer's live connections closes.
    Close {
        /// Script peer.
        peer: u8,
        /// Which connection.
        conn: u8,
    },
    /// The peer's packets come from `FROM[from]` now.
    Observe {
        /// Script peer.
        peer: u8,
        /// Index in [`FROM`].
        from: u8,
    },
    /// Time moves forward.
    Wait {
        /// Seconds.
        secs: u32,
    },
    /// The server's expiry sweep runs (`Registry::expire`) with a batch of `1 + max % 8`.
    Expire {
        /// The batch size, modulo 8, minus one.
        max: u8,
    },
}

impl Msg {
    /// The control message, for script peers; an `accept` carries `accept_nonce` (ignored by
    /// the other messages).
    pub fn to_message(self, accept_nonce: u64) -> ControlMessage {
        match self {
            Msg::Register {
                version_ok,
                locals,
                repeat,
                too_many,
            } => {
                let mut local_addrs: Vec<SocketAddr> = (0..8u8)
                    .filter(|i| locals & (1 << i) != 0)
                    .map(|i| addr(&LOCAL, i))
                    .collect();
                if repeat {
                    let again: Vec<SocketAddr> = local_addrs.iter().rev().copied().collect();
                    local_addrs.extend(again);
                }
                if too_many {
                    while local_addrs.len() <= MAX_LOCAL_ADDRS {
                        local_addrs.push(addr(&LOCAL, local_addrs.len() as u8));
                    }
                }
                ControlMessage::Register {
                    version: if version_ok {
                        PROTOCOL_VERSION
                    } else {
                        PROTOCOL_VERSION.wrapping_add(1)
                    },
                    local_addrs,
                    mapped_port: None,
                }
            }
            Msg::Query(n) => ControlMessage::Query { id: peer(n) },
            // Half of them with a first flight (the registry hands it to the target's push).
            Msg::Connect(n) => ControlMessage::Connect {
                id: peer(n),
                first_flight: (n % 2 == 1)
                    .then(|| common::message::FirstFlight::new(vec![n; 1200]))
                    .flatten(),
            },
            Msg::Ping(seq) => ControlMessage::Ping { seq: seq.into() },
            Msg::PunchResult(n, direct) => ControlMessage::PunchResult {
                peer: peer(n),
                direct,
            },
            Msg::ServerSide(n) => match n % 5 {
                0 => ControlMessage::Pong { seq: n.into() },
                1 => ControlMessage::Ack {},
                2 => ControlMessage::Punch {
                    peer: peer(n),
                    candidates: Vec::new(),
                    nonce: n.into(),
                    key: common::stun::PunchKey::from_bytes([n; 16]),
                    nat: None,
                    no_relay: None,
                    first_flight: None,
                },
                3 => ControlMessage::RelayChannel { peer: peer(n) },
                _ => ControlMessage::RelayOpen {},
            },
            Msg::Accept(n, _) => ControlMessage::Accept {
                peer: peer(n),
                nonce: accept_nonce,
            },
        }
    }

    fn encode(self) -> [u8; 3] {
        match self {
            Msg::Register {
                version_ok,
                locals,
                repeat,
                too_many,
            } => [
                0,
                u8::from(version_ok) | u8::from(repeat) << 1 | u8::from(too_many) << 2,
                locals,
            ],
            Msg::Query(n) => [1, n, 0],
            Msg::Connect(n) => [2, n, 0],
            Msg::Ping(seq) => [3, seq, 0],
            Msg::PunchResult(n, direct) => [4, n, u8::from(direct)],
            Msg::ServerSide(n) => [5, n, 0],
            Msg::Accept(n, right_nonce) => [6, n, u8::from(right_nonce)],
        }
    }

    fn decode(kind: u8, a: u8, b: u8) -> Msg {
        match kind % 7 {
            0 => Msg::Register {
                version_ok: a & 1 != 0,
                repeat: a & 2 != 0,
                too_many: a & 4 != 0,
                locals: b,
            },
            1 => Msg::Query(a),
            2 => Msg::Connect(a),
            3 => Msg::Ping(a),
            4 => Msg::PunchResult(a, b & 1 != 0),
            5 => Msg::ServerSide(a),
            _ => Msg::Accept(a, b & 1 != 0),
        }
    }
}

impl Op {
    /// Appends the operation's bytes.
    pub fn encode(self, out: &mut Vec<u8>) {
        match self {
            Op::Send {
                peer,
                conn,
                from,
                msg,
            } => {
                out.extend_from_slice(&[0, peer, conn, from]);
                out.extend_from_slice(&msg.encode());
            }
            Op::Close { peer, conn } => out.extend_from_slice(&[1, peer, conn]),
            Op::Observe { peer, from } => out.extend_from_slice(&[2, peer, from]),
            Op::Wait { secs } => {
                // The smallest shift that fits; seconds below the shift's unit are dropped.
                let mut shift = 0u8;
                while secs >> shift > 0xFFFF {
                    shift += 1;
                }
                let v = (secs >> shift) as u16;
                out.extend_from_slice(&[3, (v >> 8) as u8, v as u8, shift]);
            }
            Op::Expire { max } => out.extend_from_slice(&[4, max]),
        }
    }

    /// Decodes the next operation and advances `input`; `None` at the end.
    pub fn decode(input: &mut &[u8]) -> Option<Op> {
        let (&opcode, rest) = input.split_first()?;
        let (op, used) = match opcode % 5 {
            0 => {
                let &[peer, conn, from, kind, a, b] = rest.get(..6)? else {
                    return None;
                };
                let msg = Msg::decode(kind, a, b);
                (
                    Op::Send {
                        peer,
                        conn,
                        from,
                        msg,
                    },
                    6,
                )
            }
            1 => {
                let &[peer, conn] = rest.get(..2)? else {
                    return None;
                };
                (Op::Close { peer, conn }, 2)
            }
            2 => {
                let &[peer, from] = rest.get(..2)? else {
                    return None;
                };
                (Op::Observe { peer, from }, 2)
            }
            3 => {
                let &[hi, lo, shift] = rest.get(..3)? else {
                    return None;
                };
                let secs = u32::from(u16::from_be_bytes([hi, lo])) << (shift % 8);
                (Op::Wait { secs }, 3)
            }
            _ => {
                let &max = rest.first()?;
                (Op::Expire { max }, 1)
            }
        };
        *input = &rest[used..];
        Some(op)
    }
}

/// Encodes a whole script.
pub fn encode(ops: &[Op]) -> Vec<u8> {
    let mut out = Vec::new();
    for op in ops {
        op.encode(&mut out);
    }
    out
}
