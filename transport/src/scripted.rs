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
    use std::io::IoSliceMut;
    use std::net::SocketAddr;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::task::{Context, Poll, Waker};

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
        let mut cx = Context::from_waker(Waker::noop());
        let mut got = Vec::new();
        // Every call returns at least one datagram or Pending, and the inputs are finite.
        for _ in 0..10_000 {
            let mut storage = vec![vec![0u8; size]; BUFFERS];
            let mut meta = [RecvMeta::default(); BUFFERS];
            let mut bufs: Vec<IoSliceMut<'_>> =
                storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            match socket.poll_recv(&mut cx, &mut bufs, &mut meta) {
                Poll::Pending => return Ok(got),
                Poll::Ready(Err(e)) => return Err(format!("receive failed: {e}")),
                Poll::Ready(Ok(0)) => return Err("a receive returned no datagram".into()),
                Poll::Ready(Ok(n)) => {
                    drop(bufs);
                    for (m, b) in meta.iter().zip(&storage).take(n) {
                        if m.len > size {
                            return Err(format!("a length {} past the buffer", m.len));
                        }
                        got.push(Delivered {
                            from: m.addr,
                            data: b[..m.len].to_vec(),
                        });
                    }
                }
            }
        }
        Err("receive never ran dry".into())
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
