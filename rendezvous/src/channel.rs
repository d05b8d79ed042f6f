//! Relay channels, the rendezvous's side: which UDP datagrams it forwards between two peers
//! without opening them (see `transport::channel` for the wire format and why).
//!
//! A peer whose connection to another is relayed asks for a channel (`relay_channel` on its
//! control connection). The rendezvous grants one per pair of peers that were introduced with
//! the target's accept (the stream relay's rule), both registered here. Each side's end is
//! bound to the address its control connection comes from, so a datagram is forwarded only
//! from one of the two bound addresses, to the other. When the other side has not bound its
//! end (it has not asked yet, or it is reached over the TCP tunnel), the packets go into its
//! relay stream instead, so that nothing is lost while the two sides switch. Every packet is
//! charged against the sender's relay allowance, as on the stream.
//!
//! Why a module of its own: the table is a sans-IO value ([`ChannelTable`]: ids, ends,
//! bounds; unit-tested with addresses made up), driven by the server's request handler, its
//! once-a-second [`Channels::sweep`] (addresses that moved with their connection, consent that
//! lapsed, connections that closed) and the socket's receive path ([`Channels`] is the
//! socket's [`ChannelForwarder`]).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::PeerId;
use transport::channel::{self, ChannelForwarder, ForwardVerdict, CHANNEL_HEADER};

use crate::relay::{add, frame_cost, lock, Batch, Dropped, Refusal, RelayHub, RelayLimits};

/// Most channels one peer takes part in (each needs an accepted introduction with the other
/// side, so this is also bounded by the introductions a peer can get).
pub const MAX_CHANNELS_PER_PEER: usize = 64;

/// Most channels in all (about 150 bytes each).
pub const MAX_CHANNELS: usize = 65_536;

/// How often the server looks at every channel again (addresses, consent, closed
/// connections).
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// A connection's id, as the server numbers them.
pub type ConnId = u64;

/// Why a channel is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelRefusal {
    /// The peer takes part in [`MAX_CHANNELS_PER_PEER`] channels already.
    #[error("peer {0} has {MAX_CHANNELS_PER_PEER} relay channels already")]
    TooManyForPeer(PeerId),
    /// The server holds [`MAX_CHANNELS`].
    #[error("the server holds {MAX_CHANNELS} relay channels; use the relay stream")]
    Full,
    /// A peer asked for a channel to itself.
    #[error("no relay channel to yourself")]
    ToSelf,
}

/// What [`ChannelTable::route`] found for a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The side that sent it.
    pub from: PeerId,
    /// The other side.
    pub to: PeerId,
    /// The other side's bound address and local address, if it bound its end.
    pub to_addr: Option<(SocketAddr, Option<IpAddr>)>,
}

#[derive(Debug, Clone, Copy)]
struct End {
    peer: PeerId,
    /// The end's control connection, its remote address (canonical) and the local address
    /// it arrives at; `None` until that side asks.
    bound: Option<(ConnId, SocketAddr, Option<IpAddr>)>,
}

#[derive(Debug)]
struct Channel {
    ends: [End; 2],
}

/// Where an end's connection comes from: its remote address and the local address it arrives
/// at, if known.
pub type EndAddr = (SocketAddr, Option<IpAddr>);

/// What the sweep asks about: every bound end (its peer and connection), and every pair.
pub type SweepInputs = (Vec<(PeerId, ConnId)>, Vec<(PeerId, PeerId)>);

/// The channels: a sans-IO value (no sockets, no clock), bounded.
#[derive(Debug, Default)]
pub struct ChannelTable {
    by_id: HashMap<u64, Channel>,
    by_pair: HashMap<(PeerId, PeerId), u64>,
    per_peer: HashMap<PeerId, usize>,
}

fn pair(a: PeerId, b: PeerId) -> (PeerId, PeerId) {
    if a.as_bytes() <= b.as_bytes() {
        (a, b)
    } else {
        (b, a)
    }
}

impl ChannelTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Channels held.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// `me` (on connection `conn`, from `addr`, arriving at `local_ip`) binds its end of the
    /// channel with `other`, made with id `new_id()` if the pair has none (the caller checked
    /// the introduction's consent). Returns the channel's id.
    pub fn bind(
        &mut self,
        me: PeerId,
        other: PeerId,
        conn: ConnId,
        addr: SocketAddr,
        local_ip: Option<IpAddr>,
        mut new_id: impl FnMut() -> u64,
    ) -> Result<u64, ChannelRefusal> {
        if me == other {
            return Err(ChannelRefusal::ToSelf);
        }
        let bound = Some((conn, transport::canonical(addr), local_ip));
        if let Some(&id) = self.by_pair.get(&pair(me, other)) {
            if let Some(channel) = self.by_id.get_mut(&id) {
                for end in channel.ends.iter_mut().filter(|e| e.peer == me) {
                    end.bound = bound;
                }
                return Ok(id);
            }
        }
        if self.by_id.len() >= MAX_CHANNELS {
            return Err(ChannelRefusal::Full);
        }
        for peer in [me, other] {
            if self.per_peer.get(&peer).copied().unwrap_or(0) >= MAX_CHANNELS_PER_PEER {
                return Err(ChannelRefusal::TooManyForPeer(peer));
            }
        }
        // 64 random bits: a collision (or zero) is drawn again.
        let id = loop {
            let id = new_id();
            if id != 0 && !self.by_id.contains_key(&id) {
                break id;
            }
        };
        self.by_id.insert(
            id,
            Channel {
                ends: [
                    End { peer: me, bound },
                    End {
                        peer: other,
                        bound: None,
                    },
                ],
            },
        );
        self.by_pair.insert(pair(me, other), id);
        for peer in [me, other] {
            *self.per_peer.entry(peer).or_insert(0) += 1;
        }
        Ok(id)
    }

    /// Where a datagram on channel `id` from `from` goes: `None` unless `from` is one end's
    /// bound address.
    pub fn route(&self, id: u64, from: SocketAddr) -> Option<Route> {
        let channel = self.by_id.get(&id)?;
        let from = transport::canonical(from);
        let sender = channel
            .ends
            .iter()
            .position(|e| e.bound.is_some_and(|(_, addr, _)| addr == from))?;
        let (me, other) = (&channel.ends[sender], &channel.ends[1 - sender]);
        Some(Route {
            from: me.peer,
            to: other.peer,
            to_addr: other.bound.map(|(_, addr, ip)| (addr, ip)),
        })
    }

    /// What [`ChannelTable::sweep`] will ask about: every bound end (peer and connection) and
    /// every pair. Gathered first, so that the caller can look at connections and the
    /// registry without this table's lock (a connection's address takes quinn's lock of that
    /// connection, whose driver may be waiting for the socket, whose receive path may be
    /// waiting for this table).
    pub fn sweep_inputs(&self) -> SweepInputs {
        let mut ends = Vec::new();
        let mut pairs = Vec::with_capacity(self.by_id.len());
        for channel in self.by_id.values() {
            for end in &channel.ends {
                if let Some((conn, _, _)) = end.bound {
                    ends.push((end.peer, conn));
                }
            }
            pairs.push((channel.ends[0].peer, channel.ends[1].peer));
        }
        (ends, pairs)
    }

    /// Looks at every channel again, with answers gathered since [`ChannelTable::sweep_inputs`]
    /// (each `None` when the question was not asked: a channel made or an end bound since is
    /// left as it is). `end_addr(peer, conn)`: where `peer`'s end on `conn` comes from now,
    /// `Some(None)` when that connection closed or is no longer the peer's current
    /// registration (the end is then unbound: its packets go to the peer's relay stream until
    /// it asks again). `consent(a, b)`: whether the pair's introduction still allows relaying
    /// (the channel is removed when it does not: the peers' periodic requests are refused and
    /// they go back to the relay stream). `online(peer)`: whether it is registered here; a
    /// channel with no end bound and neither peer online is removed.
    pub fn sweep(
        &mut self,
        mut consent: impl FnMut(PeerId, PeerId) -> Option<bool>,
        mut online: impl FnMut(PeerId) -> Option<bool>,
        mut end_addr: impl FnMut(PeerId, ConnId) -> Option<Option<(SocketAddr, Option<IpAddr>)>>,
    ) {
        let mut gone = Vec::new();
        for (id, channel) in self.by_id.iter_mut() {
            for end in channel.ends.iter_mut() {
                if let Some((conn, _, _)) = end.bound {
                    if let Some(now) = end_addr(end.peer, conn) {
                        end.bound = now.map(|(addr, ip)| (conn, transport::canonical(addr), ip));
                    }
                }
            }
            let [a, b] = [channel.ends[0].peer, channel.ends[1].peer];
            let unbound = channel.ends.iter().all(|e| e.bound.is_none());
            let lapsed = consent(a, b) == Some(false);
            let nobody = unbound && online(a) == Some(false) && online(b) == Some(false);
            if lapsed || nobody {
                gone.push(*id);
            }
        }
        for id in gone {
            self.remove(id);
        }
    }

    /// Unbinds `me`'s end of its channel with `other`, if there is one (a `relay_channel`
    /// the server refused: the peer unbinds its own side, and `other`'s packets must reach it
    /// through its relay stream, which makes it ask again).
    pub fn unbind(&mut self, me: PeerId, other: PeerId) {
        let Some(id) = self.by_pair.get(&pair(me, other)) else {
            return;
        };
        if let Some(channel) = self.by_id.get_mut(id) {
            for end in channel.ends.iter_mut().filter(|e| e.peer == me) {
                end.bound = None;
            }
        }
    }

    fn remove(&mut self, id: u64) {
        let Some(channel) = self.by_id.remove(&id) else {
            return;
        };
        let [a, b] = channel.ends;
        self.by_pair.remove(&pair(a.peer, b.peer));
        for peer in [a.peer, b.peer] {
            if let Some(n) = self.per_peer.get_mut(&peer) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.per_peer.remove(&peer);
                }
            }
        }
    }
}

/// Channel counters for the operator.
#[derive(Debug, Default)]
pub struct ChannelCounters {
    /// Channels granted (`relay_channel` answered with an id).
    pub granted: AtomicU64,
    /// `relay_channel` refused.
    pub refused: AtomicU64,
    /// Datagrams sent on to the other side's channel.
    pub forwarded: AtomicU64,
    /// Datagrams put into the other side's relay stream (its end not bound).
    pub to_stream: AtomicU64,
    /// Datagrams dropped: over the rate or quota, or the other side's relay stream full or
    /// missing.
    pub dropped: AtomicU64,
    /// Channels held now (a gauge, updated by the sweep and by grants).
    pub open: AtomicU64,
}

/// The table behind a lock, the socket's [`ChannelForwarder`].
pub struct Channels {
    table: Mutex<ChannelTable>,
    hub: Arc<RelayHub>,
    limits: RelayLimits,
    /// The socket's counters (what it could not send on).
    socket_stats: std::sync::OnceLock<Arc<transport::DemuxStats>>,
    /// For the operator.
    pub counters: ChannelCounters,
}

impl Channels {
    /// No channels yet; packets are charged to the peers' allowances in `hub` with `limits`.
    pub(crate) fn new(hub: Arc<RelayHub>, limits: RelayLimits) -> Self {
        Channels {
            table: Mutex::new(ChannelTable::new()),
            hub,
            limits,
            socket_stats: std::sync::OnceLock::new(),
            counters: ChannelCounters::default(),
        }
    }

    /// The socket that forwards for us (for its counters).
    pub(crate) fn set_socket_stats(&self, stats: Arc<transport::DemuxStats>) {
        let _ = self.socket_stats.set(stats);
    }

    /// Channel datagrams the socket could not send on (its buffer was full).
    pub(crate) fn send_failed(&self) -> u64 {
        self.socket_stats
            .get()
            .map_or(0, |s| s.channel_send_failed.load(Ordering::Relaxed))
    }

    /// As [`ChannelTable::bind`], with a random id; counted.
    pub(crate) fn bind(
        &self,
        me: PeerId,
        other: PeerId,
        conn: ConnId,
        addr: SocketAddr,
        local_ip: Option<IpAddr>,
    ) -> Result<u64, ChannelRefusal> {
        let mut table = lock(&self.table);
        let result = table.bind(me, other, conn, addr, local_ip, rand::random);
        self.counters
            .open
            .store(table.len() as u64, Ordering::Relaxed);
        drop(table);
        add(
            match result {
                Ok(_) => &self.counters.granted,
                Err(_) => &self.counters.refused,
            },
            1,
        );
        result
    }

    /// As [`ChannelTable::sweep_inputs`] (the table's lock held only for that).
    pub(crate) fn sweep_inputs(&self) -> SweepInputs {
        lock(&self.table).sweep_inputs()
    }

    /// As [`ChannelTable::sweep`]: the closures must not take locks (they run under the
    /// table's).
    pub(crate) fn sweep(
        &self,
        consent: impl FnMut(PeerId, PeerId) -> Option<bool>,
        online: impl FnMut(PeerId) -> Option<bool>,
        end_addr: impl FnMut(PeerId, ConnId) -> Option<Option<(SocketAddr, Option<IpAddr>)>>,
    ) {
        let mut table = lock(&self.table);
        table.sweep(consent, online, end_addr);
        self.counters
            .open
            .store(table.len() as u64, Ordering::Relaxed);
    }

    /// A `relay_channel` of `me` for `other` the server refused before it reached the table
    /// (counted with the table's refusals): `me`'s end is unbound, as the peer unbinds its
    /// side on a refusal.
    pub(crate) fn refused_elsewhere(&self, me: PeerId, other: PeerId) {
        add(&self.counters.refused, 1);
        lock(&self.table).unbind(me, other);
    }
}

impl ChannelForwarder for Channels {
    fn forward(
        &self,
        id: u64,
        from: SocketAddr,
        run: &[u8],
        stride: usize,
        count: usize,
    ) -> ForwardVerdict {
        let Some(route) = lock(&self.table).route(id, from) else {
            return ForwardVerdict::NotChannel;
        };
        let counters = &self.hub.counters;
        let count = count as u64;
        let packets = || {
            run.chunks(stride.max(1))
                .map(|d| &d[CHANNEL_HEADER.min(d.len())..])
        };
        let (bytes, cost) = packets().fold((0u64, 0u64), |(bytes, cost), p| {
            (bytes + p.len() as u64, cost + frame_cost(p.len()))
        });
        if let Err(refusal) = self
            .hub
            .charge(route.from, cost, self.limits, Instant::now())
        {
            add(
                match refusal {
                    Refusal::Quota => &counters.denied_quota,
                    _ => &counters.denied_rate,
                },
                count,
            );
            add(&self.counters.dropped, count);
            return ForwardVerdict::Done;
        }
        if self.hub.tracing() {
            // `--relay-trace`: every relayed packet, whichever way it travels.
            for packet in packets() {
                if !self.hub.trace_packet(packet) {
                    break;
                }
            }
        }
        // A datagram the destination's path cannot carry (larger than a channel datagram of
        // its address family: an IPv4 end's largest, to an IPv6 end) would fail there, and a
        // GSO batch of them makes the kernel refuse the batch: its relay stream takes them.
        let to_udp = route
            .to_addr
            .filter(|(to, _)| stride.min(run.len()) <= channel::max_channel_datagram(*to));
        if let Some((to, src_ip)) = to_udp {
            add(&counters.packets, count);
            add(&counters.bytes, bytes);
            add(&self.counters.forwarded, count);
            return ForwardVerdict::Send { to, src_ip };
        }
        // The other side has no channel: its relay stream, as if the packets had come by ours.
        let mut batch = Batch::default();
        for packet in packets() {
            batch.push(&route.from, packet, frame_cost(packet.len()));
        }
        match self.hub.offer_to(&route.to, batch) {
            Ok(()) => {
                add(&counters.packets, count);
                add(&counters.bytes, bytes);
                add(&self.counters.to_stream, count);
            }
            Err(dropped) => {
                add(
                    match dropped {
                        Dropped::QueueFull => &counters.dropped_queue_full,
                        Dropped::Closed => &counters.dropped_no_route,
                    },
                    count,
                );
                add(&self.counters.dropped, count);
            }
        }
        ForwardVerdict::Done
    }
}

/// The largest packet a channel carries, for the `relay_channel_ready` answer.
pub fn max_packet(server: SocketAddr) -> usize {
    channel::max_channel_datagram(server) - CHANNEL_HEADER
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> PeerId {
        PeerId::from_key_digest(&[n; 32])
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([198, 51, 100, 1], port))
    }

    fn counter() -> impl FnMut() -> u64 {
        let mut next = 0;
        move || {
            next += 1;
            next
        }
    }

    #[test]
    fn both_sides_share_one_channel_and_only_bound_addresses_route() {
        let mut t = ChannelTable::new();
        let (a, b) = (id(1), id(2));
        let ch = t.bind(a, b, 10, addr(1), None, counter()).unwrap();
        // b has not bound: a's datagrams have nowhere to go by UDP.
        let r = t.route(ch, addr(1)).unwrap();
        assert_eq!((r.from, r.to, r.to_addr), (a, b, None));
        // Nobody else sends on it, not even b before it binds.
        assert_eq!(t.route(ch, addr(2)), None);
        assert_eq!(t.route(ch + 1, addr(1)), None);
        // b binds the same channel.
        assert_eq!(t.bind(b, a, 20, addr(2), None, counter()), Ok(ch));
        assert_eq!(t.route(ch, addr(1)).unwrap().to_addr, Some((addr(2), None)));
        assert_eq!(t.route(ch, addr(2)).unwrap().to_addr, Some((addr(1), None)));
        assert_eq!(t.len(), 1);
        // A v4-mapped source is the same address.
        let mapped = SocketAddr::new(
            IpAddr::V6(std::net::Ipv4Addr::new(198, 51, 100, 1).to_ipv6_mapped()),
            1,
        );
        assert_eq!(t.route(ch, mapped).unwrap().from, a);
        assert_eq!(
            t.bind(a, a, 10, addr(1), None, counter()),
            Err(ChannelRefusal::ToSelf)
        );
    }

    #[test]
    fn the_sweep_follows_addresses_unbinds_stale_ends_and_removes_lapsed_channels() {
        let mut t = ChannelTable::new();
        let (a, b) = (id(1), id(2));
        let yes = |_: PeerId, _: PeerId| Some(true);
        let online = |_: PeerId| Some(true);
        let ch = t.bind(a, b, 10, addr(1), None, counter()).unwrap();
        t.bind(b, a, 20, addr(2), None, counter()).unwrap();
        let (ends, pairs) = t.sweep_inputs();
        assert_eq!(ends.len(), 2);
        assert_eq!(pairs.len(), 1);
        // a's NAT rebound: its connection comes from port 9 now.
        let moved = |_: PeerId, conn: ConnId| {
            Some(Some((if conn == 10 { addr(9) } else { addr(2) }, None)))
        };
        t.sweep(yes, online, moved);
        assert_eq!(t.route(ch, addr(1)), None);
        assert_eq!(t.route(ch, addr(9)).unwrap().to, b);
        // b registered again on another connection (or its connection closed): its end is
        // unbound, a's packets take b's relay stream until b asks again.
        t.sweep(yes, online, |_, conn| {
            Some((conn == 10).then_some((addr(9), None)))
        });
        assert_eq!(t.route(ch, addr(9)).unwrap().to_addr, None);
        assert_eq!(t.bind(b, a, 21, addr(3), None, counter()), Ok(ch));
        assert_eq!(t.route(ch, addr(9)).unwrap().to_addr, Some((addr(3), None)));
        // An end bound after the sweep's questions were asked is left as it is.
        t.sweep(|_, _| None, |_| None, |_, _| None);
        assert_eq!(t.route(ch, addr(9)).unwrap().to_addr, Some((addr(3), None)));
        // A refused request unbinds the asker's end only.
        t.unbind(b, a);
        assert_eq!(t.route(ch, addr(9)).unwrap().to_addr, None);
        assert_eq!(t.route(ch, addr(3)), None);
        t.bind(b, a, 21, addr(3), None, counter()).unwrap();
        // Both ends gone, but a peer still online (it will ask again): kept.
        t.sweep(yes, |p| Some(p == a), |_, _| Some(None));
        assert_eq!(t.len(), 1);
        // Neither online: removed, and the peers' counts with it.
        t.sweep(yes, |_| Some(false), |_, _| Some(None));
        assert!(t.is_empty());
        assert!(t.per_peer.is_empty() && t.by_pair.is_empty());
        // Consent lapsed: removed at once, bound or not; a pair not asked about is kept.
        let ch = t.bind(a, b, 10, addr(1), None, counter()).unwrap();
        t.sweep(|_, _| None, online, |_, _| None);
        assert_eq!(t.len(), 1);
        t.sweep(
            |_, _| Some(false),
            online,
            |_, _| Some(Some((addr(1), None))),
        );
        assert_eq!(t.route(ch, addr(1)), None);
        assert!(t.is_empty() && t.per_peer.is_empty());
    }

    #[test]
    fn channels_are_bounded_per_peer_and_in_all() {
        let mut t = ChannelTable::new();
        let hub = id(0);
        let mut ids = counter();
        for n in 0..MAX_CHANNELS_PER_PEER {
            let other = PeerId::from_key_digest(&[(n + 1) as u8; 32]);
            t.bind(hub, other, 1, addr(1), None, &mut ids).unwrap();
        }
        let one_more = id(200);
        assert_eq!(
            t.bind(hub, one_more, 1, addr(1), None, &mut ids),
            Err(ChannelRefusal::TooManyForPeer(hub))
        );
        // The other side's count is checked too.
        assert_eq!(
            t.bind(one_more, hub, 2, addr(2), None, &mut ids),
            Err(ChannelRefusal::TooManyForPeer(hub))
        );
        // Rebinding an existing channel is not a new one.
        let first = PeerId::from_key_digest(&[1; 32]);
        assert!(t.bind(first, hub, 3, addr(3), None, &mut ids).is_ok());
        // In all.
        let mut t = ChannelTable::new();
        let mut n = 0u32;
        while t.len() < MAX_CHANNELS {
            let digest = |side: u8| {
                let mut d = [side; 32];
                d[..4].copy_from_slice(&n.to_be_bytes());
                d
            };
            let (a, b) = (
                PeerId::from_key_digest(&digest(0)),
                PeerId::from_key_digest(&digest(1)),
            );
            t.bind(a, b, 1, addr(1), None, &mut ids).unwrap();
            n += 1;
        }
        assert_eq!(
            t.bind(id(1), id(2), 1, addr(1), None, &mut ids),
            Err(ChannelRefusal::Full)
        );
    }

    #[test]
    fn a_drawn_id_that_is_taken_or_zero_is_drawn_again() {
        let mut t = ChannelTable::new();
        let mut draws = vec![7u64, 0, 7, 8].into_iter();
        let first = t
            .bind(id(1), id(2), 1, addr(1), None, || {
                draws.next().unwrap_or(99)
            })
            .unwrap();
        let second = t
            .bind(id(3), id(4), 1, addr(3), None, || {
                draws.next().unwrap_or(99)
            })
            .unwrap();
        assert_eq!((first, second), (7, 8));
    }
}

#[cfg(test)]
mod forward_tests {
    use super::*;

    fn id(n: u8) -> PeerId {
        PeerId::from_key_digest(&[n; 32])
    }

    fn run_of(id: u64, sizes: &[usize]) -> (Vec<u8>, usize) {
        let stride = sizes[0];
        let mut run = Vec::new();
        for &size in sizes {
            let mut d = channel::header(id).to_vec();
            d.resize(size, 0x40);
            run.extend(d);
        }
        (run, stride)
    }

    /// The forwarder: only from a bound address; to the other side's address when its path
    /// can carry the datagrams, else to its relay stream (here none: dropped and counted);
    /// charged to the sender's quota.
    #[test]
    fn datagrams_go_where_the_other_side_can_take_them_and_are_charged() {
        let hub = Arc::new(RelayHub::new(None));
        let limits = RelayLimits {
            quota_bytes: 10_000,
            ..RelayLimits::default()
        };
        let channels = Channels::new(hub.clone(), limits);
        let (a, b) = (id(1), id(2));
        let a_addr: SocketAddr = "198.51.100.1:1000".parse().unwrap();
        let b_addr: SocketAddr = "[2001:db8::2]:2000".parse().unwrap();
        let ch = channels.bind(a, b, 1, a_addr, None).unwrap();
        assert_eq!(channels.bind(b, a, 2, b_addr, None), Ok(ch));

        // From anyone else: not a channel datagram.
        let (run, stride) = run_of(ch, &[100]);
        let stranger: SocketAddr = "203.0.113.9:9".parse().unwrap();
        assert_eq!(
            channels.forward(ch, stranger, &run, stride, 1),
            ForwardVerdict::NotChannel
        );
        // A batch that fits b's IPv6 path: sent on to b.
        let (run, stride) = run_of(ch, &[1400, 1400, 700]);
        assert_eq!(
            channels.forward(ch, a_addr, &run, stride, 3),
            ForwardVerdict::Send {
                to: b_addr,
                src_ip: None
            }
        );
        assert_eq!(channels.counters.forwarded.load(Ordering::Relaxed), 3);
        // An IPv4 end's largest datagram does not fit b's IPv6 path: b's relay stream would
        // take it (b has none here: dropped, counted).
        let (run, stride) = run_of(ch, &[channel::MAX_CHANNEL_DATAGRAM_V4]);
        assert_eq!(
            channels.forward(ch, a_addr, &run, stride, 1),
            ForwardVerdict::Done
        );
        assert_eq!(channels.counters.dropped.load(Ordering::Relaxed), 1);
        assert_eq!(hub.counters.dropped_no_route.load(Ordering::Relaxed), 1);
        // Over the quota (10 kB): dropped and counted as the quota's.
        let (run, stride) = run_of(ch, &[1400; 8]);
        assert_eq!(
            channels.forward(ch, a_addr, &run, stride, 8),
            ForwardVerdict::Done
        );
        assert_eq!(hub.counters.denied_quota.load(Ordering::Relaxed), 8);
    }
}
