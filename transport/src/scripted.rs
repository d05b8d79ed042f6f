//! A UDP socket without a network: it hands out scripted receive batches and records what is
//! sent. It lets tests and fuzz targets drive [`crate::DemuxSocket`]'s receive filter (GRO
//! segments, STUN diversion, address translation) and its routes exactly as quinn would, with
//! batches no real kernel would produce (odd strides, lengths past the buffer).

use std::collections::VecDeque;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

/// One received buffer as the OS would report it: `meta` as given (its `len` and `stride` may be
/// anything), `data` copied into quinn's buffer up to the buffer's size.
#[derive(Debug, Clone)]
pub struct ScriptedDatagram {
    /// What the receive call reports.
    pub meta: RecvMeta,
    /// The bytes (one or several GRO segments).
    pub data: Vec<u8>,
}

/// A socket whose receives return the queued batches one per call (then `Pending`), and whose
/// sends are recorded.
#[derive(Debug)]
pub struct ScriptedSocket {
    local: SocketAddr,
    batches: Mutex<VecDeque<Vec<ScriptedDatagram>>>,
    sent: Mutex<Vec<(SocketAddr, Vec<u8>)>>,
}

impl ScriptedSocket {
    /// A socket "bound" to `local` with nothing to receive.
    pub fn new(local: SocketAddr) -> Arc<Self> {
        Arc::new(ScriptedSocket {
            local,
            batches: Mutex::default(),
            sent: Mutex::default(),
        })
    }

    /// Queues a batch for one receive call (entries past the caller's buffers are dropped).
    pub fn push_batch(&self, batch: Vec<ScriptedDatagram>) {
        self.batches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(batch);
    }

    /// Everything sent so far, with its destination, in order.
    pub fn sent(&self) -> Vec<(SocketAddr, Vec<u8>)> {
        self.sent.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Always writable.
#[derive(Debug)]
struct Writable;

impl UdpPoller for Writable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncUdpSocket for ScriptedSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Writable)
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.sent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((transmit.destination, transmit.contents.to_vec()));
        Ok(())
    }

    fn poll_recv(
        &self,
        _cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let Some(batch) = self
            .batches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
        else {
            return Poll::Pending;
        };
        let n = batch.len().min(bufs.len()).min(meta.len());
        for (i, datagram) in batch.into_iter().take(n).enumerate() {
            let copied = datagram.data.len().min(bufs[i].len());
            bufs[i][..copied].copy_from_slice(&datagram.data[..copied]);
            meta[i] = datagram.meta;
        }
        Poll::Ready(Ok(n))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }

    fn max_receive_segments(&self) -> usize {
        64
    }
}

/// Calls `each` with every entry quinn would get from `socket` (its meta and bytes) until the
/// socket has nothing more, receiving `buffers` at a time into fresh zeroed buffers of `size`
/// bytes. An error when a receive fails, returns nothing, reports a length past the buffer, or
/// never runs dry.
fn receive_until_pending(
    socket: &Arc<crate::DemuxSocket>,
    size: usize,
    buffers: usize,
    mut each: impl FnMut(&RecvMeta, &[u8]),
) -> Result<(), String> {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    // Every call returns at least one datagram or Pending, and the inputs are finite.
    for _ in 0..10_000 {
        let mut storage = vec![vec![0u8; size]; buffers];
        let mut meta = vec![RecvMeta::default(); buffers];
        let mut bufs: Vec<IoSliceMut<'_>> =
            storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        match socket.poll_recv(&mut cx, &mut bufs, &mut meta) {
            Poll::Pending => return Ok(()),
            Poll::Ready(Err(e)) => return Err(format!("receive failed: {e}")),
            Poll::Ready(Ok(0)) => return Err("a receive returned no datagram".into()),
            Poll::Ready(Ok(n)) => {
                drop(bufs);
                for (m, b) in meta.iter().zip(&storage).take(n) {
                    if m.len > size {
                        return Err(format!("a length {} past the buffer", m.len));
                    }
                    each(m, &b[..m.len]);
                }
            }
        }
    }
    Err("receive never ran dry".into())
}

/// Drives a [`crate::DemuxSocket`] over a [`ScriptedSocket`] from a byte script (route changes,
/// received batches with arbitrary GRO strides and lengths, injected datagrams, sends) and checks
/// every step against a model of the routes: what quinn receives (bytes, translated source),
/// which segments go to the STUN channel (in order, exactly once, or counted as dropped when it
/// is full), where sends go, which aliases are taken or refused (claims, owners with routes,
/// bounds). The fuzz target `demux` and the property tests run it. `Err` names
/// the first property broken.
pub fn check_receive_script(script: &[u8]) -> Result<(), String> {
    model::run(script).map(|_| ())
}

mod model {
    use std::collections::{HashMap, HashSet, VecDeque};
    use std::net::SocketAddr;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    use quinn::udp::{RecvMeta, Transmit};
    use quinn::AsyncUdpSocket;
    use tokio::sync::mpsc;

    use super::{ScriptedDatagram, ScriptedSocket};
    use crate::demux::{canonical, same_family, MAX_ALIASES, MAX_ALIASES_PER_ADDR};
    use crate::{DemuxSocket, PathTarget, VirtualPacket, VirtualSink};

    /// Room in the STUN channel: small, so that scripts reach the full-channel case.
    const STUN_QUEUE: usize = 8;
    /// Room in the virtual path's channel.
    const VIRTUAL_QUEUE: usize = 8;
    /// quinn's receive buffers per call.
    const BUFFERS: usize = 4;

    /// Addresses the script picks from: an IPv4 address and its IPv4-mapped IPv6 form, the same
    /// host on another port, IPv6, and stable-address-like ones.
    fn pool(i: u8) -> SocketAddr {
        const POOL: [&str; 7] = [
            "198.51.100.1:4000",
            "[::ffff:198.51.100.1]:4000",
            "198.51.100.1:4001",
            "10.0.0.2:5000",
            "[2001:db8::7]:6000",
            "240.0.0.1:1",
            "[::ffff:240.0.0.1]:1",
        ];
        POOL[usize::from(i) % POOL.len()]
            .parse()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    struct Reader<'a> {
        bytes: &'a [u8],
    }

    impl Reader<'_> {
        fn byte(&mut self) -> Option<u8> {
            let (&b, rest) = self.bytes.split_first()?;
            self.bytes = rest;
            Some(b)
        }

        fn u16(&mut self) -> Option<u16> {
            Some(u16::from_be_bytes([self.byte()?, self.byte()?]))
        }
    }

    /// A STUN-shaped segment of `len` bytes (at least the 20-byte header) or a QUIC-shaped one
    /// (first byte with a top bit set), filled with `fill`.
    fn segment(stun: bool, len: usize, fill: u8) -> Vec<u8> {
        let mut s = vec![fill; len];
        if stun && len >= 20 {
            s[0] = 0x00;
            s[1] = 0x01;
            let body = ((len - 20) as u16) & !3;
            s[2..4].copy_from_slice(&body.to_be_bytes());
            s[4..8].copy_from_slice(&0x2112_A442u32.to_be_bytes());
        } else if let Some(first) = s.first_mut() {
            *first |= 0x40;
        }
        s
    }

    /// The routes as the model keeps them.
    #[derive(Default)]
    struct Routes {
        out: HashMap<SocketAddr, Option<SocketAddr>>, // None: the virtual path
        back: HashMap<SocketAddr, SocketAddr>,
        claimed: HashSet<SocketAddr>,
    }

    impl Routes {
        fn set(&mut self, quinn: SocketAddr, target: Option<SocketAddr>) {
            let quinn = canonical(quinn);
            if let Some(Some(old)) = self.out.remove(&quinn) {
                if self.back.get(&old) == Some(&quinn) {
                    self.back.remove(&old);
                }
            }
            match target {
                Some(real) if canonical(real) == quinn => {}
                Some(real) => {
                    self.back.insert(canonical(real), quinn);
                    self.out.insert(quinn, Some(canonical(real)));
                }
                None => {
                    self.out.insert(quinn, None);
                }
            }
        }

        /// Whether the alias is taken: never away from a claimed address or from another
        /// quinn address with a route, and within the bounds.
        fn alias(&mut self, real: SocketAddr, quinn: SocketAddr) -> bool {
            let (real, quinn) = (canonical(real), canonical(quinn));
            if real == quinn {
                return true;
            }
            if self.claimed.contains(&real) {
                return false;
            }
            match self.back.get(&real) {
                Some(owner) if *owner == quinn => return true,
                Some(owner) if self.out.contains_key(owner) => return false,
                _ => {}
            }
            let per_addr = self.back.values().filter(|q| **q == quinn).count();
            if !self.back.contains_key(&real)
                && (self.back.len() >= MAX_ALIASES || per_addr >= MAX_ALIASES_PER_ADDR)
            {
                return false;
            }
            self.back.insert(real, quinn);
            true
        }

        /// Undoes the alias `real -> quinn` unless `quinn` is routed to `real` (then it is
        /// the route's return path, not an alias).
        fn unalias(&mut self, real: SocketAddr, quinn: SocketAddr) {
            let (real, quinn) = (canonical(real), canonical(quinn));
            let routed_there = self.out.get(&quinn) == Some(&Some(real));
            if self.back.get(&real) == Some(&quinn) && !routed_there {
                self.back.remove(&real);
            }
        }

        fn claim(&mut self, quinn: SocketAddr) {
            if self.claimed.len() < MAX_ALIASES {
                self.claimed.insert(canonical(quinn));
            }
        }

        fn remove(&mut self, quinn: SocketAddr) {
            let quinn = canonical(quinn);
            self.claimed.remove(&quinn);
            self.out.remove(&quinn);
            self.back.retain(|_, q| *q != quinn);
        }

        fn translate(&self, from: SocketAddr) -> SocketAddr {
            match self.back.get(&canonical(from)) {
                Some(quinn) => same_family(*quinn, from),
                None => from,
            }
        }
    }

    /// One entry quinn is expected to get.
    #[derive(PartialEq, Eq)]
    struct Delivered {
        from: SocketAddr,
        data: Vec<u8>,
    }

    impl std::fmt::Debug for Delivered {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            let head = &self.data[..self.data.len().min(8)];
            write!(
                f,
                "{} bytes {head:02x?}.. from {}",
                self.data.len(),
                self.from
            )
        }
    }

    impl Delivered {
        /// `self` as a receive into buffers of `size` bytes gives it (an injected datagram is
        /// cut to the buffer, as a kernel would cut it).
        fn cut(&self, size: usize) -> Delivered {
            Delivered {
                from: self.from,
                data: self.data[..self.data.len().min(size)].to_vec(),
            }
        }
    }

    /// What a script made the socket do (for tests that check a script reaches its cases).
    #[derive(Debug, Default, PartialEq, Eq)]
    pub(super) struct Summary {
        /// Datagrams quinn got from the network.
        pub quic: u64,
        /// Segments diverted to STUN (delivered or dropped).
        pub stun: u64,
        /// Injected datagrams quinn got.
        pub injected: u64,
    }

    pub(super) fn run(script: &[u8]) -> Result<Summary, String> {
        let mut injected_seen = 0u64;
        let local = pool(3);
        let inner = ScriptedSocket::new(local);
        let (socket, mut stun_rx) = DemuxSocket::from_socket(inner.clone(), STUN_QUEUE);
        let (virtual_tx, mut virtual_rx) = mpsc::channel::<VirtualPacket>(VIRTUAL_QUEUE);
        let sink = VirtualSink::new([7; 16], virtual_tx);
        let stats = socket.stats();
        let mut routes = Routes::default();
        let mut injected: VecDeque<Delivered> = VecDeque::new();
        let mut sent_expected: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
        let mut stun_seen = 0u64;
        let mut quic_seen = 0u64;
        let mut r = Reader { bytes: script };
        let mut step = 0usize;
        while let Some(op) = r.byte() {
            step += 1;
            let at = |what: String| format!("step {step} (op {}): {what}", op % 8);
            match op % 8 {
                0 | 1 => {
                    let (quinn, real) = (pool(r.byte().unwrap_or(0)), pool(r.byte().unwrap_or(0)));
                    if op % 6 == 0 {
                        socket.set_route(quinn, PathTarget::Udp(real));
                        routes.set(quinn, Some(real));
                    } else {
                        socket.set_route(quinn, PathTarget::Virtual(sink.clone()));
                        routes.set(quinn, None);
                    }
                }
                2 if op / 8 % 4 == 3 => {
                    // A quarter of the alias operations undo one (an introduction that ended
                    // without a connection): only that alias goes, never a route's.
                    let (real, quinn) = (pool(r.byte().unwrap_or(0)), pool(r.byte().unwrap_or(0)));
                    socket.remove_alias(real, quinn);
                    routes.unalias(real, quinn);
                }
                2 => {
                    let (real, quinn) = (pool(r.byte().unwrap_or(0)), pool(r.byte().unwrap_or(0)));
                    let taken = socket.add_alias(real, quinn).is_ok();
                    if taken != routes.alias(real, quinn) {
                        return Err(at(format!(
                            "alias {real} -> {quinn} {} against the model",
                            if taken { "taken" } else { "refused" }
                        )));
                    }
                }
                6 => {
                    let quinn = pool(r.byte().unwrap_or(0));
                    socket.claim(quinn);
                    routes.claim(quinn);
                }
                7 => {
                    let quinn = pool(r.byte().unwrap_or(0));
                    socket.release(quinn);
                    routes.claimed.remove(&canonical(quinn));
                }
                3 => {
                    let quinn = pool(r.byte().unwrap_or(0));
                    socket.remove_routes(quinn);
                    routes.remove(quinn);
                }
                4 => {
                    // A receive batch: its entries, then quinn's buffer size.
                    let entries = usize::from(r.byte().unwrap_or(0) % 6) + 1;
                    let mut batch = Vec::new();
                    for _ in 0..entries {
                        let from = pool(r.byte().unwrap_or(0));
                        let shape = r.byte().unwrap_or(0);
                        let stride = usize::from(r.u16().unwrap_or(0) % 1600);
                        let segments = usize::from(shape % 5) + 1;
                        let fill = r.byte().unwrap_or(0);
                        let mut data = Vec::new();
                        for k in 0..segments {
                            let stun = (r.byte().unwrap_or(0) >> (k % 8)) & 1 == 1;
                            let len = if stride == 0 || k + 1 == segments {
                                usize::from(r.byte().unwrap_or(0)) * 3
                            } else {
                                stride
                            };
                            data.extend(segment(stun, len, fill.wrapping_add(k as u8)));
                        }
                        // Usually the true length; sometimes more or less than was copied.
                        let len = match shape >> 5 {
                            0 => data.len() + usize::from(r.byte().unwrap_or(0)),
                            1 => data
                                .len()
                                .saturating_sub(usize::from(r.byte().unwrap_or(0))),
                            _ => data.len(),
                        };
                        let dst_ip = (shape & 0x10 != 0).then_some(local.ip());
                        batch.push(ScriptedDatagram {
                            meta: RecvMeta {
                                addr: from,
                                len,
                                stride,
                                ecn: None,
                                dst_ip,
                            },
                            data,
                        });
                    }
                    let buffer = 64 + usize::from(r.u16().unwrap_or(0) % 4000);
                    // What the filter must make of it.
                    let mut expect = VecDeque::new();
                    let mut stun_expected = Vec::new();
                    for d in batch.iter().take(BUFFERS) {
                        let len = d.meta.len.min(buffer);
                        let mut bytes = d.data.clone();
                        bytes.resize(buffer, 0);
                        bytes.truncate(len);
                        let stride = if d.meta.stride == 0 {
                            len
                        } else {
                            d.meta.stride
                        };
                        let mut kept = Vec::new();
                        let segments: Vec<&[u8]> = if stride >= len {
                            vec![&bytes[..]]
                        } else {
                            bytes.chunks(stride).collect()
                        };
                        for s in segments {
                            if common::stun::is_stun(s) {
                                // The STUN path sees IPv4 peers plain, never v4-mapped.
                                stun_expected.push((
                                    canonical(d.meta.addr),
                                    d.meta.dst_ip.map(|ip| ip.to_canonical()),
                                    s.to_vec(),
                                ));
                            } else {
                                kept.extend_from_slice(s);
                            }
                        }
                        if !kept.is_empty() {
                            expect.push_back(Delivered {
                                from: routes.translate(d.meta.addr),
                                data: kept,
                            });
                        }
                    }
                    inner.push_batch(batch);
                    let got = receive_all(&socket, buffer)?;
                    // The receive drains both sources: quinn gets every entry of the batch and
                    // every injected datagram (cut to the buffer), each source in its order, the
                    // two interleaved in any way.
                    let expect: Vec<Delivered> = expect.into_iter().collect();
                    let injected_now: Vec<Delivered> =
                        injected.drain(..).map(|i| i.cut(buffer)).collect();
                    if !interleaves(&got, &expect, &injected_now) {
                        return Err(at(format!(
                            "quinn got {got:?}; expected {expect:?} interleaved with injected \
                             {injected_now:?}"
                        )));
                    }
                    quic_seen += expect.len() as u64;
                    injected_seen += injected_now.len() as u64;
                    // STUN: in order, each once, the overflow counted.
                    let mut delivered = Vec::new();
                    while let Ok(d) = stun_rx.try_recv() {
                        delivered.push((d.from, d.to, d.data));
                    }
                    let room = STUN_QUEUE.min(stun_expected.len());
                    if delivered[..] != stun_expected[..room] {
                        return Err(at(format!(
                            "STUN channel got {} datagrams, expected the first {room} of {}",
                            delivered.len(),
                            stun_expected.len()
                        )));
                    }
                    stun_seen += stun_expected.len() as u64;
                    let counted = stats.stun_received.load(Ordering::Relaxed)
                        + stats.stun_dropped.load(Ordering::Relaxed);
                    if counted != stun_seen {
                        return Err(at(format!(
                            "{counted} STUN datagrams counted, {stun_seen} diverted"
                        )));
                    }
                    if stats.quic_received.load(Ordering::Relaxed) != quic_seen {
                        return Err(at(format!(
                            "quic_received {} != {quic_seen}",
                            stats.quic_received.load(Ordering::Relaxed)
                        )));
                    }
                }
                _ => {
                    // 5: an injected datagram or a send.
                    let target = pool(r.byte().unwrap_or(0));
                    let len = usize::from(r.u16().unwrap_or(0) % 3000);
                    let fill = r.byte().unwrap_or(0);
                    if fill & 1 == 0 {
                        // Injected: reaches quinn as is, from the address given.
                        let data = vec![fill; len];
                        if socket.injector().inject(target, data.clone()) {
                            injected.push_back(Delivered { from: target, data });
                        }
                        continue;
                    }
                    // quinn sends, maybe as GRO segments.
                    let contents = vec![fill; len];
                    let segment_size = (fill & 2 != 0).then_some(usize::from(fill % 97) + 1);
                    let transmit = Transmit {
                        destination: target,
                        ecn: None,
                        contents: &contents,
                        segment_size,
                        src_ip: None,
                    };
                    socket
                        .try_send(&transmit)
                        .map_err(|e| at(format!("send failed: {e}")))?;
                    match routes.out.get(&canonical(target)) {
                        Some(None) => {
                            let chunk = segment_size.unwrap_or(len).max(1);
                            let mut expected: Vec<Vec<u8>> =
                                contents.chunks(chunk).map(<[u8]>::to_vec).collect();
                            let mut got = Vec::new();
                            while let Ok(p) = virtual_rx.try_recv() {
                                got.push(p.data);
                            }
                            // The channel holds VIRTUAL_QUEUE; the rest were dropped.
                            expected.truncate(VIRTUAL_QUEUE);
                            if got != expected {
                                return Err(at(format!(
                                    "virtual path got {} datagrams, expected {}",
                                    got.len(),
                                    expected.len()
                                )));
                            }
                        }
                        Some(Some(real)) => {
                            sent_expected.push((same_family(*real, target), contents));
                        }
                        None => sent_expected.push((target, contents)),
                    }
                    if inner.sent() != sent_expected {
                        return Err(at("sends went elsewhere than the routes say".into()));
                    }
                }
            }
        }
        // Whatever was injected and not yet received comes out now.
        let got = receive_all(&socket, 4096)?;
        let rest: Vec<Delivered> = injected.into_iter().collect();
        if got != rest {
            return Err(format!("at the end quinn got {got:?}, injected {rest:?}"));
        }
        Ok(Summary {
            quic: quic_seen,
            stun: stun_seen,
            injected: injected_seen + rest.len() as u64,
        })
    }

    /// Whether `got` is `a` and `b` interleaved, each in its order (a merge of two queues).
    fn interleaves(got: &[Delivered], a: &[Delivered], b: &[Delivered]) -> bool {
        if got.len() != a.len() + b.len() {
            return false;
        }
        // reach[i][j]: the first i of `a` and j of `b` make the first i + j of `got`.
        let mut reach = vec![vec![false; b.len() + 1]; a.len() + 1];
        reach[0][0] = true;
        for i in 0..=a.len() {
            for j in 0..=b.len() {
                if !reach[i][j] || i + j == got.len() {
                    continue;
                }
                let next = &got[i + j];
                if a.get(i) == Some(next) {
                    reach[i + 1][j] = true;
                }
                if b.get(j) == Some(next) {
                    reach[i][j + 1] = true;
                }
            }
        }
        reach[a.len()][b.len()]
    }

    /// Receives until the socket has nothing more, into fresh zeroed buffers of `size` bytes.
    fn receive_all(socket: &Arc<DemuxSocket>, size: usize) -> Result<Vec<Delivered>, String> {
        let mut got = Vec::new();
        super::receive_until_pending(socket, size, BUFFERS, |meta, data| {
            got.push(Delivered {
                from: meta.addr,
                data: data.to_vec(),
            })
        })?;
        Ok(got)
    }

    #[cfg(test)]
    mod tests {
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

            #[test]
            fn the_receive_filter_matches_the_model(script in proptest::collection::vec(any::<u8>(), 0..400)) {
                if let Err(e) = super::run(&script) {
                    panic!("{e}");
                }
            }
        }

        /// An alias taken and then undone: the datagram from that address reaches quinn from
        /// the address itself again (the model checks every source), and undoing an alias
        /// that is a route's return path changes nothing.
        #[test]
        fn an_undone_alias_no_longer_translates() {
            let script = [
                2, 0, 5, // alias pool 0 -> pool 5
                26, 0, 5, // undo it
                0, 3, 2, // route pool 3 -> pool 2 (its return path: pool 2 -> pool 3)
                26, 2, 3, // "undo" the return path: refused, the route stays
                4, 1, // a batch of two entries:
                0, 0x60, 0, 0, 1, 0, 20, 0, 10, // from pool 0, one QUIC datagram
                2, 0x60, 0, 0, 1, 0, 20, 0, 10, // from pool 2, one QUIC datagram
                0, 200, // 200-byte buffers
            ];
            let summary = super::run(&script).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(summary.quic, 2);
        }

        /// A batch of GRO segments mixing STUN and QUIC, from an aliased address, with a full STUN
        /// channel: the hand-written case the proptest generalises.
        #[test]
        fn a_mixed_gro_batch_from_an_alias() {
            let script = [
                2, 0, 5, // alias 198.51.100.1:4000 -> 240.0.0.1:1
                4, 1, // a batch of two entries:
                // from pool 0, three segments of stride 40 (STUN, QUIC, a last STUN of 30 bytes)
                0, 0x84, 0, 40, 9, 0b1, 0, 0b100, 10,
                // from pool 4, no stride: one QUIC datagram of 60 + 30 bytes
                4, 0x60, 0, 0, 1, 0, 20, 0, 10, 0, 200, // 264-byte buffers
            ];
            let summary = super::run(&script).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                summary,
                super::Summary {
                    quic: 2,
                    stun: 2,
                    injected: 0
                }
            );
        }
    }
}

/// Drives a [`crate::DemuxSocket`] over a [`ScriptedSocket`] from a byte script through relay
/// channels ([`crate::channel`]), playing both roles at once: two bound channels (a peer's) and
/// a forwarder (the rendezvous's). Received batches mix QUIC segments, channel datagrams on
/// bound, forwarded, dropped and unknown ids, headers cut short, from the server (in both
/// spellings) or from someone else, with arbitrary GRO strides; sends to the relayed peers are
/// wrapped, or too large and take the relay sink. Checks: quinn gets every non-channel segment
/// unchanged from its source and every bound channel's packet, header cut, from the relayed
/// peer's address, each exactly once; the forwarder sees exactly the runs of its ids from
/// their sources and what it sends on leaves unchanged; nothing panics. The fuzz target
/// `demux` and a property test run it. `Err` names the first property broken.
pub fn check_channel_script(script: &[u8]) -> Result<(), String> {
    channel_model::run(script).map(|_| ())
}

mod channel_model {
    use std::collections::BTreeMap;
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};

    use quinn::udp::{RecvMeta, Transmit};
    use quinn::AsyncUdpSocket;
    use tokio::sync::mpsc;

    use super::{ScriptedDatagram, ScriptedSocket};
    use crate::channel::{self, ChannelForwarder, ForwardVerdict, CHANNEL_HEADER};
    use crate::demux::same_family;
    use crate::{DemuxSocket, PathTarget, VirtualPacket, VirtualSink};

    const BUFFERS: usize = 4;
    const SERVER: &str = "198.51.100.1:4000";
    const SERVER_MAPPED: &str = "[::ffff:198.51.100.1]:4000";
    const OTHER: &str = "203.0.113.9:9";
    const FORWARD_TO: &str = "192.0.2.7:7";
    /// Bound channels and the quinn addresses they show.
    const BOUND: [(u64, &str); 2] = [(1, "240.0.0.1:1"), (2, "240.0.0.2:2")];
    /// The forwarder sends id 3 on, takes id 4, knows no other.
    const SENT_ON: u64 = 3;
    const TAKEN: u64 = 4;

    fn addr(s: &str) -> SocketAddr {
        s.parse()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Records the runs it is offered.
    #[derive(Default)]
    struct Recorder {
        runs: Mutex<Vec<(u64, SocketAddr, Vec<u8>)>>,
    }

    impl ChannelForwarder for Recorder {
        fn forward(
            &self,
            id: u64,
            from: SocketAddr,
            run: &[u8],
            stride: usize,
            count: usize,
        ) -> ForwardVerdict {
            let verdict = match id {
                SENT_ON => ForwardVerdict::Send {
                    to: addr(FORWARD_TO),
                    src_ip: None,
                },
                TAKEN => ForwardVerdict::Done,
                _ => return ForwardVerdict::NotChannel,
            };
            // Every segment of the run is on `id`; `count` of them, `stride` apart.
            let segments: Vec<&[u8]> = run.chunks(stride.max(1)).collect();
            if segments.len() != count
                || segments.iter().any(|s| channel::channel_id(s) != Some(id))
            {
                self.runs.lock().unwrap_or_else(|p| p.into_inner()).push((
                    u64::MAX,
                    from,
                    Vec::new(),
                ));
            }
            self.runs.lock().unwrap_or_else(|p| p.into_inner()).push((
                id,
                crate::canonical(from),
                run.to_vec(),
            ));
            verdict
        }
    }

    /// A multiset of (source, bytes).
    type Bag = BTreeMap<(String, Vec<u8>), usize>;

    fn put(bag: &mut Bag, from: SocketAddr, data: Vec<u8>) {
        *bag.entry((from.to_string(), data)).or_insert(0) += 1;
    }

    /// What a script made the socket do (for the test that checks a script reaches its
    /// cases).
    #[derive(Debug, Default)]
    pub(super) struct Summary {
        /// Bound channels' datagrams shown to quinn.
        pub received: u64,
        /// Datagrams the forwarder sent on.
        pub forwarded: u64,
        /// Runs the forwarder took (id 4).
        pub taken: u64,
        /// Datagrams sent on a channel.
        pub sent: u64,
        /// Segments quinn got as they came (not a bound channel's).
        pub untouched: u64,
    }

    pub(super) fn run(script: &[u8]) -> Result<Summary, String> {
        let mut summary = Summary::default();
        // A dual-stack socket (IPv4 sources v4-mapped) or an IPv4 one.
        let dual_stack = script.first().is_some_and(|b| b & 0x40 != 0);
        let local = addr(if dual_stack {
            "[2001:db8::2]:5000"
        } else {
            "10.0.0.2:5000"
        });
        let inner = ScriptedSocket::new(local);
        let (socket, _stun) = DemuxSocket::from_socket(inner.clone(), 8);
        let recorder = Arc::new(Recorder::default());
        socket.set_forwarder(recorder.clone());
        let (virtual_tx, mut virtual_rx) = mpsc::channel::<VirtualPacket>(64);
        for (id, quinn) in BOUND {
            let label = [id as u8; 16];
            socket.set_route(
                addr(quinn),
                PathTarget::Virtual(VirtualSink::new(label, virtual_tx.clone())),
            );
            socket.bind_channel(label, id, addr(SERVER), addr(quinn), None);
        }
        let mut bytes = script.iter().copied();
        let mut next = move || bytes.next();
        let mut step = 0;
        while let Some(op) = next() {
            step += 1;
            let at = |what: String| format!("step {step}: {what}");
            if op % 4 == 3 {
                // quinn sends to a relayed peer, maybe as GSO segments.
                let (id, quinn) = BOUND[usize::from(op >> 2) % 2];
                let len = usize::from(next().unwrap_or(0)) * 8;
                let segment = usize::from(next().unwrap_or(0)) * 7 + 1;
                let contents: Vec<u8> = (0..len).map(|i| 0x40 | (i as u8 & 0x3f)).collect();
                let before = inner.sent().len();
                socket
                    .try_send(&Transmit {
                        destination: addr(quinn),
                        ecn: None,
                        contents: &contents,
                        segment_size: (op & 0x80 != 0).then_some(segment),
                        src_ip: None,
                    })
                    .map_err(|e| at(format!("send failed: {e}")))?;
                let seg = if op & 0x80 != 0 { segment } else { len.max(1) };
                let mut wrapped = Vec::new();
                for d in contents.chunks(seg) {
                    wrapped.extend_from_slice(&channel::header(id));
                    wrapped.extend_from_slice(d);
                }
                let sent: Vec<u8> = inner.sent()[before..]
                    .iter()
                    .flat_map(|(to, d)| {
                        if crate::canonical(*to) != addr(SERVER) {
                            vec![0xFF]
                        } else {
                            d.clone()
                        }
                    })
                    .collect();
                let mut sunk = Vec::new();
                while let Ok(p) = virtual_rx.try_recv() {
                    sunk.extend(p.data);
                }
                if seg + CHANNEL_HEADER > channel::MAX_CHANNEL_DATAGRAM_V4 {
                    if !sent.is_empty() || sunk != contents {
                        return Err(at("a packet too large for a channel was not sunk".into()));
                    }
                } else if sent != wrapped || !sunk.is_empty() {
                    return Err(at(format!(
                        "sent {} bytes to the server, expected {} wrapped",
                        sent.len(),
                        wrapped.len()
                    )));
                }
                continue;
            }
            // A receive batch.
            let entries = usize::from(op >> 2) % BUFFERS + 1;
            let mut batch = Vec::new();
            let mut expect_quinn = Bag::new();
            let mut expect_runs: Vec<(u64, SocketAddr, Vec<u8>)> = Vec::new();
            let mut expect_sent: Vec<u8> = Vec::new();
            for _ in 0..entries {
                let from = match next().unwrap_or(0) % 3 {
                    0 => addr(SERVER),
                    1 if dual_stack => addr(SERVER_MAPPED),
                    1 => addr(SERVER),
                    _ => addr(OTHER),
                };
                let from_server = crate::canonical(from) == addr(SERVER);
                let segments = usize::from(next().unwrap_or(0) % 5) + 1;
                let stride = usize::from(next().unwrap_or(0)) % 40 + 1;
                let mut data = Vec::new();
                let mut parts: Vec<Vec<u8>> = Vec::new();
                for k in 0..segments {
                    let kind = next().unwrap_or(0);
                    let len = if k + 1 == segments {
                        usize::from(kind >> 3) % stride + 1
                    } else {
                        stride
                    };
                    let mut s = vec![0x40 | (kind & 0x3f); len];
                    if kind & 7 != 0 {
                        // Channel-shaped: ids 1-6 (bound, sent on, taken, unknown).
                        let h = channel::header(u64::from(kind & 7).min(6));
                        let n = len.min(CHANNEL_HEADER);
                        s[..n].copy_from_slice(&h[..n]);
                    }
                    data.extend_from_slice(&s);
                    parts.push(s);
                }
                // What the demux must make of it: runs of consecutive segments on one id.
                let mut i = 0;
                while i < parts.len() {
                    let id = channel::channel_id(&parts[i]);
                    let mut j = i + 1;
                    while id.is_some() && j < parts.len() && channel::channel_id(&parts[j]) == id {
                        j += 1;
                    }
                    let run: Vec<u8> = parts[i..j].concat();
                    match id {
                        Some(id) if from_server && BOUND.iter().any(|(b, _)| *b == id) => {
                            let quinn = BOUND.iter().find(|(b, _)| *b == id).map(|(_, q)| addr(q));
                            let quinn = quinn.unwrap_or(from);
                            // As every injected datagram: v4-mapped on a dual-stack socket.
                            let shown = if dual_stack {
                                same_family(quinn, local)
                            } else {
                                quinn
                            };
                            for p in &parts[i..j] {
                                put(&mut expect_quinn, shown, p[CHANNEL_HEADER..].to_vec());
                            }
                        }
                        Some(id) if id == SENT_ON || id == TAKEN => {
                            expect_runs.push((id, crate::canonical(from), run.clone()));
                            if id == SENT_ON {
                                expect_sent.extend_from_slice(&run);
                            }
                        }
                        _ => {
                            for p in &parts[i..j] {
                                put(&mut expect_quinn, from, p.clone());
                            }
                        }
                    }
                    i = j;
                }
                batch.push(ScriptedDatagram {
                    meta: RecvMeta {
                        addr: from,
                        len: data.len(),
                        stride: if segments == 1 { data.len() } else { stride },
                        ecn: None,
                        dst_ip: None,
                    },
                    data,
                });
            }
            let sent_before = inner.sent().len();
            recorder
                .runs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
            inner.push_batch(batch);
            let got = receive_all(&socket)?;
            summary.untouched += expect_quinn
                .iter()
                .filter(|((from, _), _)| !from.contains("240.0.0."))
                .map(|(_, n)| *n as u64)
                .sum::<u64>();
            summary.taken += expect_runs.iter().filter(|r| r.0 == TAKEN).count() as u64;
            if got != expect_quinn {
                return Err(at(format!("quinn got {got:?}, expected {expect_quinn:?}")));
            }
            let runs = recorder
                .runs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            if runs != expect_runs {
                return Err(at(format!(
                    "the forwarder saw {} runs, expected {}",
                    runs.len(),
                    expect_runs.len()
                )));
            }
            let sent: Vec<u8> = inner.sent()[sent_before..]
                .iter()
                .flat_map(|(to, d)| {
                    if crate::canonical(*to) != addr(FORWARD_TO) {
                        vec![0xFF]
                    } else {
                        d.clone()
                    }
                })
                .collect();
            if sent != expect_sent {
                return Err(at("what was sent on differs from the runs".into()));
            }
        }
        let stats = socket.stats();
        summary.received = stats
            .channel_received
            .load(std::sync::atomic::Ordering::Relaxed);
        summary.forwarded = stats
            .channel_forwarded
            .load(std::sync::atomic::Ordering::Relaxed);
        summary.sent = stats
            .channel_sent
            .load(std::sync::atomic::Ordering::Relaxed);
        Ok(summary)
    }

    /// Receives until the socket has nothing more; GRO buffers are split at their stride.
    fn receive_all(socket: &Arc<DemuxSocket>) -> Result<Bag, String> {
        let mut got = Bag::new();
        super::receive_until_pending(socket, 512, BUFFERS, |meta, data| {
            let stride = if meta.stride == 0 {
                data.len()
            } else {
                meta.stride
            };
            for d in data.chunks(stride.max(1)) {
                put(&mut got, meta.addr, d.to_vec());
            }
        })?;
        Ok(got)
    }

    #[cfg(test)]
    mod tests {
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

            /// Relay channels in the receive and send paths match the model, whatever the
            /// batches.
            #[test]
            fn relay_channels_match_the_model(script in proptest::collection::vec(any::<u8>(), 0..300)) {
                if let Err(broken) = super::run(&script) {
                    panic!("{broken}");
                }
            }
        }

        /// A script that reaches every case: bound channels whole and mixed, forwarded, taken,
        /// unknown, from the server in both spellings and from a stranger, sends wrapped.
        #[test]
        fn a_mixed_script_passes() {
            let mut script = Vec::new();
            for seed in 0..200u8 {
                script.extend([
                    seed.wrapping_mul(4),
                    seed % 3,
                    seed,
                    seed.wrapping_mul(7),
                    seed.wrapping_add(1),
                    seed.wrapping_mul(3),
                    seed ^ 5,
                    seed.wrapping_mul(13) | 3,
                    seed,
                    seed ^ 0x55,
                ]);
            }
            let summary = super::run(&script).unwrap();
            assert!(
                summary.received > 0
                    && summary.forwarded > 0
                    && summary.taken > 0
                    && summary.sent > 0
                    && summary.untouched > 0,
                "{summary:?}"
            );
        }
    }
}
