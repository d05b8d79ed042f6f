//! Several rendezvous nodes: which one to register with, and when to move to another.
//!
//! A peer may be given several servers (`--server` repeated, or a host name with several
//! addresses): the nodes of one cluster, sharing their registry. It measures the round trip to
//! each (one STUN Binding request, [`measure_rtts`]), registers with the fastest, and stays there
//! until that server stops answering; then it moves to the next best and registers there.
//!
//! The decisions are a sans-IO value, [`Selection`]: measurements, failures and registrations
//! in, with `now` passed in; the server to try next out. The session ([`crate::session`]) feeds
//! it and does the I/O.
//!
//! Why the order given counts: round trips within [`SAME_RTT_MARGIN`] of the fastest count as
//! equal, and among them the first given wins. Two peers given the same list then pick the same
//! node, and a relayed pair stays on one node (the relay between nodes is not everywhere yet),
//! however the few milliseconds of jitter fall.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Round trips this close to the fastest server's count as equal (the order given decides).
pub const SAME_RTT_MARGIN: Duration = Duration::from_millis(10);
/// Failed attempts in a row with one server before the next server is tried. A lost connection
/// counts as one: a server that restarts is registered with again at once, one that is gone is
/// left after one more failed attempt.
pub const ATTEMPTS_BEFORE_FAILOVER: u32 = 2;
/// How long a server that failed is passed over (unless every server is).
pub const DOWN_FOR: Duration = Duration::from_secs(60);
/// Most servers a peer takes (flags and addresses of its names together); more are refused.
pub const MAX_SERVERS: usize = 16;
/// How long the round-trip probes wait for their answers.
pub const RTT_PROBE_TIMEOUT: Duration = Duration::from_millis(1500);

#[derive(Debug, Clone, Default)]
struct ServerState {
    rtt: Option<Duration>,
    failures: u32,
    down_until: Option<Instant>,
    /// Never tried again (a wrong key, another protocol version).
    excluded: bool,
}

/// Which of several servers to register with (sans-IO; see the module documentation).
#[derive(Debug, Clone)]
pub struct Selection {
    servers: Vec<ServerState>,
    current: Option<usize>,
}

impl Selection {
    /// `count` servers (at least one), in the order given; none measured yet.
    pub fn new(count: usize) -> Self {
        Selection {
            servers: vec![ServerState::default(); count.max(1)],
            current: None,
        }
    }

    /// How many servers there are.
    pub fn len(&self) -> usize {
        self.servers.len()
    }

    /// Always false: a selection has at least one server.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The round trip to `server` (`None`: it did not answer the probe). A server that did not
    /// answer comes after every server that did.
    pub fn rtt_measured(&mut self, server: usize, rtt: Option<Duration>) {
        if let Some(state) = self.servers.get_mut(server) {
            state.rtt = rtt;
        }
    }

    /// The measured round trip of `server`.
    pub fn rtt(&self, server: usize) -> Option<Duration> {
        self.servers.get(server).and_then(|s| s.rtt)
    }

    /// The server being used (or tried) now.
    pub fn current(&self) -> Option<usize> {
        self.current
    }

    fn is_down(&self, server: usize, now: Instant) -> bool {
        let state = &self.servers[server];
        state.excluded || state.down_until.is_some_and(|until| until > now)
    }

    /// `server` is never to be tried again (its key is wrong, it speaks another protocol
    /// version). Returns false when no server is left.
    pub fn exclude(&mut self, server: usize) -> bool {
        if let Some(state) = self.servers.get_mut(server) {
            state.excluded = true;
        }
        if self.current == Some(server) {
            self.current = None;
        }
        self.servers.iter().any(|s| !s.excluded)
    }

    /// The server to try now: the current one unless it is passed over, else the best of those
    /// that are not (fastest, with [`SAME_RTT_MARGIN`] and the order given deciding between
    /// near-equals; unmeasured ones last, in order), else, when every server is passed over,
    /// the one whose time is up first.
    pub fn next(&mut self, now: Instant) -> usize {
        if let Some(current) = self.current.filter(|&c| !self.is_down(c, now)) {
            return current;
        }
        let best = self.ranking(now).into_iter().next().unwrap_or_else(|| {
            // Every server is passed over: the one back first (ties: the first given).
            (0..self.servers.len())
                .filter(|&i| !self.servers[i].excluded)
                .min_by_key(|&i| self.servers[i].down_until)
                .unwrap_or(0)
        });
        self.current = Some(best);
        best
    }

    /// The servers that are not passed over at `now`, best first.
    pub fn ranking(&self, now: Instant) -> Vec<usize> {
        let fastest = self.servers.iter().filter_map(|s| s.rtt).min();
        let mut order: Vec<usize> = (0..self.servers.len())
            .filter(|&i| !self.is_down(i, now))
            .collect();
        // Sort key: near the fastest (by order given), then measured (by round trip), then
        // unmeasured (by order given).
        order.sort_by_key(|&i| match (self.servers[i].rtt, fastest) {
            (Some(rtt), Some(fastest)) if rtt <= fastest + SAME_RTT_MARGIN => {
                (0, Duration::ZERO, i)
            }
            (Some(rtt), _) => (1, rtt, i),
            (None, _) => (2, Duration::ZERO, i),
        });
        order
    }

    /// An attempt to register with `server` failed (no answer, refused, lost). Returns true if
    /// another server is ready to be tried at once (the caller skips its backoff).
    pub fn failed(&mut self, server: usize, now: Instant) -> bool {
        let Some(state) = self.servers.get_mut(server) else {
            return false;
        };
        state.failures += 1;
        if state.failures < ATTEMPTS_BEFORE_FAILOVER {
            return false;
        }
        state.failures = 0;
        state.down_until = Some(now + DOWN_FOR);
        if self.current == Some(server) {
            self.current = None;
        }
        !self.ranking(now).is_empty()
    }

    /// The connection to `server` was lost (closed, or it stopped answering): counts as one
    /// failed attempt, so the next attempt goes to the same server, and the one after that to
    /// another.
    pub fn lost(&mut self, server: usize, now: Instant) {
        self.failed(server, now);
    }

    /// `server` stopped answering on a live connection (it went silent and left our probes
    /// unanswered, see [`crate::liveness`]):
    /// it is passed over at once, without the reconnect a closed connection gets (a server that
    /// is silent for seconds is gone or cut off, not restarting).
    pub fn unresponsive(&mut self, server: usize, now: Instant) {
        if let Some(state) = self.servers.get_mut(server) {
            state.failures = 0;
            state.down_until = Some(now + DOWN_FOR);
        }
        if self.current == Some(server) {
            self.current = None;
        }
    }

    /// Registered with `server`: it is the current one, with a clean slate.
    pub fn registered(&mut self, server: usize) {
        if let Some(state) = self.servers.get_mut(server) {
            state.failures = 0;
            state.down_until = None;
            self.current = Some(server);
        }
    }
}

/// The round trip to each of `servers`: one STUN Binding request each (sent again once, after
/// half of `timeout`, to those that have not answered), from a socket of our own per family.
/// `None` for a server that did not answer within `timeout`. An answer must carry the
/// request's random transaction id and come from the server's address; anything else is
/// ignored.
pub async fn measure_rtts(servers: &[SocketAddr], timeout: Duration) -> Vec<Option<Duration>> {
    use common::stun::{self, StunPacket};
    let mut rtts = vec![None; servers.len()];
    let v4 = tokio::net::UdpSocket::bind("0.0.0.0:0").await.ok();
    let v6 = tokio::net::UdpSocket::bind("[::]:0").await.ok();
    let socket_for = |addr: &SocketAddr| {
        if addr.is_ipv4() {
            v4.as_ref()
        } else {
            v6.as_ref()
        }
    };
    let start = Instant::now();
    // (transaction, server, sent at)
    let mut sent: Vec<([u8; 12], usize, Instant)> = Vec::new();
    let send_round = |sent: &mut Vec<([u8; 12], usize, Instant)>, rtts: &[Option<Duration>]| {
        let mut batch = Vec::new();
        for (i, addr) in servers.iter().enumerate() {
            if rtts[i].is_none() {
                let transaction: [u8; 12] = rand::random();
                sent.push((transaction, i, Instant::now()));
                batch.push((transaction, *addr));
            }
        }
        batch
    };
    let mut buf4 = [0u8; 512];
    let mut buf6 = [0u8; 512];
    for round in 0..2u32 {
        for (transaction, addr) in send_round(&mut sent, &rtts) {
            if let Some(socket) = socket_for(&addr) {
                let _ = socket
                    .send_to(&stun::binding_request(transaction), addr)
                    .await;
            }
        }
        let round_end = start + timeout / 2 * (round + 1);
        loop {
            if rtts.iter().all(Option::is_some) {
                return rtts;
            }
            let receive = async {
                tokio::select! {
                    Some(Ok((n, from))) = async { Some(v4.as_ref()?.recv_from(&mut buf4).await) } => {
                        buf4.get(..n).map(|d| (d.to_vec(), from))
                    }
                    Some(Ok((n, from))) = async { Some(v6.as_ref()?.recv_from(&mut buf6).await) } => {
                        buf6.get(..n).map(|d| (d.to_vec(), from))
                    }
                    else => None,
                }
            };
            let Ok(received) = tokio::time::timeout_at(round_end.into(), receive).await else {
                break;
            };
            let Some((datagram, from)) = received else {
                // Neither socket can receive: nothing more will come.
                return rtts;
            };
            let Ok(StunPacket::BindingSuccess { transaction, .. }) = stun::decode(&datagram) else {
                continue;
            };
            let from = transport::canonical(from);
            if let Some(&(_, i, at)) = sent
                .iter()
                .find(|(t, i, _)| *t == transaction && servers[*i] == from)
            {
                rtts[i].get_or_insert(at.elapsed());
            }
        }
    }
    rtts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Option<Duration> {
        Some(Duration::from_millis(n))
    }

    #[test]
    fn the_fastest_server_is_chosen_and_near_equals_go_by_the_order_given() {
        let now = Instant::now();
        let mut s = Selection::new(3);
        s.rtt_measured(0, ms(80));
        s.rtt_measured(1, ms(20));
        s.rtt_measured(2, ms(25));
        // 2 is within the margin of 1: the order given decides, 1 first.
        assert_eq!(s.ranking(now), vec![1, 2, 0]);
        assert_eq!(s.next(now), 1);
        // Within the margin the first given wins even if a hair slower.
        let mut s = Selection::new(3);
        s.rtt_measured(0, ms(27));
        s.rtt_measured(1, ms(20));
        s.rtt_measured(2, None);
        assert_eq!(s.ranking(now), vec![0, 1, 2]);
        assert_eq!(s.next(now), 0);
    }

    #[test]
    fn unmeasured_servers_come_last_in_the_order_given() {
        let now = Instant::now();
        let mut s = Selection::new(3);
        s.rtt_measured(2, ms(300));
        assert_eq!(s.ranking(now), vec![2, 0, 1]);
        // Nothing measured: the order given.
        let mut s = Selection::new(3);
        assert_eq!(s.next(now), 0);
    }

    #[test]
    fn a_lost_server_is_tried_once_more_then_the_next_best_and_it_is_passed_over() {
        let now = Instant::now();
        let mut s = Selection::new(3);
        s.rtt_measured(0, ms(50));
        s.rtt_measured(1, ms(5));
        s.rtt_measured(2, ms(30));
        assert_eq!(s.next(now), 1);
        s.registered(1);
        // The connection is lost: one reconnect to the same server (it may have restarted).
        s.lost(1, now);
        assert_eq!(s.next(now), 1);
        // That fails too: the next best, at once.
        assert!(s.failed(1, now));
        assert_eq!(s.next(now), 2);
        s.registered(2);
        // Server 1 stays passed over while it is down, even though it is the fastest.
        assert_eq!(s.next(now + Duration::from_secs(1)), 2);
        assert_eq!(s.ranking(now + Duration::from_secs(1)), vec![2, 0]);
        // After DOWN_FOR it is a candidate again, but the peer stays where it is registered.
        let later = now + DOWN_FOR + Duration::from_secs(1);
        assert_eq!(s.ranking(later), vec![1, 2, 0]);
        assert_eq!(s.next(later), 2);
    }

    #[test]
    fn a_server_that_stopped_answering_is_left_at_once() {
        let now = Instant::now();
        let mut s = Selection::new(2);
        s.registered(0);
        s.unresponsive(0, now);
        assert_eq!(s.next(now), 1);
        // Alone, it is tried again (after the caller's backoff): there is nowhere else.
        let mut one = Selection::new(1);
        one.registered(0);
        one.unresponsive(0, now);
        assert_eq!(one.next(now), 0);
    }

    #[test]
    fn when_every_server_is_down_the_one_back_first_is_tried_after_a_backoff() {
        let t0 = Instant::now();
        let mut s = Selection::new(2);
        assert_eq!(s.next(t0), 0);
        assert!(!s.failed(0, t0));
        assert!(s.failed(0, t0), "server 1 is ready at once");
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(s.next(t1), 1);
        assert!(!s.failed(1, t1));
        // Both passed over now: the caller backs off, then tries the one back first.
        assert!(!s.failed(1, t1));
        assert_eq!(s.next(t1), 0);
        assert_eq!(s.next(t1 + Duration::from_secs(2)), 0);
        // A registration clears it.
        s.registered(0);
        assert_eq!(s.ranking(t1), vec![0]);
    }

    #[test]
    fn an_excluded_server_is_never_tried_again() {
        let now = Instant::now();
        let mut s = Selection::new(3);
        assert_eq!(s.next(now), 0);
        assert!(s.exclude(0));
        assert_eq!(s.next(now), 1);
        // Even once every other server is down, and long after.
        s.failed(1, now);
        s.failed(1, now);
        s.failed(2, now);
        s.failed(2, now);
        let later = now + DOWN_FOR * 10;
        assert_ne!(s.next(now), 0);
        assert_eq!(s.ranking(later), vec![1, 2]);
        assert!(s.exclude(1));
        assert!(!s.exclude(2), "none left");
    }

    #[test]
    fn one_server_is_always_the_one_tried() {
        let now = Instant::now();
        let mut s = Selection::new(1);
        for i in 0..5 {
            assert_eq!(s.next(now + Duration::from_secs(i)), 0);
            assert!(!s.failed(0, now + Duration::from_secs(i)));
        }
        // An empty list is taken as one server: nothing to index out of bounds.
        let mut empty = Selection::new(0);
        assert_eq!(empty.len(), 1);
        assert_eq!(empty.next(now), 0);
        // Unknown indices are ignored.
        empty.rtt_measured(7, ms(1));
        assert!(!empty.failed(7, now));
        empty.registered(7);
        assert_eq!(empty.current(), Some(0));
    }

    #[tokio::test]
    async fn the_probe_measures_a_stun_server_and_gives_none_for_a_silent_one() {
        // A STUN responder of our own on loopback, and a socket that never answers.
        let server = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().unwrap();
        let answering = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let (n, from) = server.recv_from(&mut buf).await.unwrap();
            let Ok(common::stun::StunPacket::BindingRequest { transaction, .. }) =
                common::stun::decode(&buf[..n])
            else {
                panic!("not a binding request");
            };
            // A wrong transaction first: ignored.
            let wrong = common::stun::binding_success([9; 12], from);
            server.send_to(&wrong, from).await.unwrap();
            let answer = common::stun::binding_success(transaction, from);
            server.send_to(&answer, from).await.unwrap();
        });
        let rtts = measure_rtts(
            &[addr, silent.local_addr().unwrap()],
            Duration::from_millis(400),
        )
        .await;
        answering.await.unwrap();
        assert!(
            rtts[0].is_some_and(|rtt| rtt < Duration::from_millis(400)),
            "{rtts:?}"
        );
        assert_eq!(rtts[1], None);
    }
}
