//! The peer's end of the relay: one relay stream on the rendezvous connection (re-opened after
//! every re-registration). Packets quinn sends to a relayed peer arrive here through the
//! socket's virtual path and leave as `{to, packet}` frames; frames `{from, packet}` from the
//! server are injected into quinn as if they came from that peer's address.
//!
//! Why it is a module of its own: the relay is a path like any other for quinn (a virtual
//! route in the socket), so the framing and the per-peer stable addresses live apart from the
//! decision of when to use it.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::frame_io::{read_frame, write_frame};
use common::relay::{self, RelayDecoder};
use common::{ControlMessage, PeerId};
use tokio::sync::{mpsc, oneshot, watch};
use transport::{Injector, VirtualPacket, VirtualSink};

use crate::session::{Session, SessionState};

/// Packets waiting for the relay stream.
const RELAY_QUEUE: usize = 1024;

/// The address quinn uses for `peer` when it is reached through [`crate::paths`]: in 240.0.0.0/4,
/// which is reserved and never routed, so a packet to it can only leave through a route.
pub fn stable_addr(peer: &PeerId) -> SocketAddr {
    let b = peer.as_bytes();
    let ip = Ipv4Addr::new(240 | (b[0] & 0x0f), b[1], b[2], b[3]);
    let port = u16::from_be_bytes([b[4], b[5]]).max(1);
    SocketAddr::from((ip, port))
}

/// Whether `addr` is a stable per-peer address (in 240.0.0.0/4, see [`stable_addr`]), in
/// either spelling (a dual-stack socket shows it v4-mapped).
pub fn is_stable_addr(addr: SocketAddr) -> bool {
    // A dual-stack socket shows it v4-mapped (`::ffff:240.x.y.z`).
    matches!(transport::canonical(addr), SocketAddr::V4(v4) if v4.ip().octets()[0] >= 240)
}

/// Handle to the relay.
#[derive(Clone)]
pub struct Relay {
    tx: mpsc::Sender<VirtualPacket>,
    ready: watch::Receiver<bool>,
    addrs: Arc<Mutex<HashMap<PeerId, SocketAddr>>>,
    waiters: Arc<Waiters>,
}

/// Who waits for the next relayed packet of a peer: a responder's punching session, whose
/// probes wait until the initiator has opened its NAT (see [`punch::PunchConfig::responder_hold`]).
/// The initiator dials over the relay after it started punching, and the rendezvous forwards
/// that handshake only once we accepted the introduction, so its first packet tells us the
/// initiator is under way. One waiter per peer at most; waiters whose session ended are pruned
/// whenever one is added.
#[derive(Default)]
struct Waiters {
    // Lets the reader skip the lock while nobody waits (the common case).
    count: AtomicUsize,
    map: Mutex<HashMap<PeerId, oneshot::Sender<()>>>,
}

impl Waiters {
    fn add(&self, peer: PeerId) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut map) = self.map.lock() {
            map.retain(|_, w| !w.is_closed());
            map.insert(peer, tx);
            self.count.store(map.len(), Ordering::Release);
        }
        rx
    }

    fn heard(&self, peer: &PeerId) {
        if self.count.load(Ordering::Acquire) == 0 {
            return;
        }
        if let Ok(mut map) = self.map.lock() {
            if let Some(waiter) = map.remove(peer) {
                let _ = waiter.send(());
            }
            self.count.store(map.len(), Ordering::Release);
        }
    }
}

impl Relay {
    /// Starts the relay task.
    pub fn start(
        session: Session,
        injector: Injector,
        shutdown: watch::Receiver<bool>,
    ) -> (Relay, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(RELAY_QUEUE);
        let (ready_tx, ready) = watch::channel(false);
        let addrs: Arc<Mutex<HashMap<PeerId, SocketAddr>>> = Arc::default();
        let waiters: Arc<Waiters> = Arc::default();
        let task = tokio::spawn(run(
            session,
            injector,
            rx,
            ready_tx,
            addrs.clone(),
            waiters.clone(),
            shutdown,
        ));
        (
            Relay {
                tx,
                ready,
                addrs,
                waiters,
            },
            task,
        )
    }

    /// Fires at the next packet relayed to us from `peer` (see [`Waiters`]). A later call for
    /// the same peer replaces this one.
    pub fn next_packet_from(&self, peer: PeerId) -> oneshot::Receiver<()> {
        self.waiters.add(peer)
    }

    /// True while a relay stream is open.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Waits up to `timeout` for the relay stream.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let mut ready = self.ready.clone();
        tokio::time::timeout(timeout, ready.wait_for(|r| *r))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// The virtual path to `peer` through the relay.
    pub fn sink(&self, peer: &PeerId) -> VirtualSink {
        VirtualSink::new(*peer.as_bytes(), self.tx.clone())
    }

    /// Relayed packets from `peer` are shown to quinn as coming from `addr`.
    pub fn set_quinn_addr(&self, peer: PeerId, addr: SocketAddr) {
        if let Ok(mut addrs) = self.addrs.lock() {
            addrs.insert(peer, addr);
        }
    }

    /// Forgets `peer`'s quinn address.
    pub fn forget(&self, peer: &PeerId) {
        if let Ok(mut addrs) = self.addrs.lock() {
            addrs.remove(peer);
        }
    }
}

async fn run(
    session: Session,
    injector: Injector,
    mut rx: mpsc::Receiver<VirtualPacket>,
    ready: watch::Sender<bool>,
    addrs: Arc<Mutex<HashMap<PeerId, SocketAddr>>>,
    waiters: Arc<Waiters>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut state = session.watch();
    loop {
        // Wait for a registration, dropping what quinn sends meanwhile (as a dead link would).
        let reg = loop {
            let current = state.borrow_and_update().clone();
            match current {
                SessionState::Registered(reg) => break reg,
                SessionState::Fatal(_) => return,
                SessionState::Connecting { .. } => {}
            }
            tokio::select! {
                r = state.changed() => if r.is_err() { return },
                _ = rx.recv() => {}
                _ = shutdown.changed() => return,
            }
        };
        match open(&reg.conn).await {
            Ok((mut send, recv)) => {
                ready.send_replace(true);
                tracing::debug!("relay stream open");
                // A task of its own (not a future of this one) so that reading and writing the
                // relay stream run in parallel: relayed throughput. Aborted and awaited on every
                // way out below, so it ends with this task (which the endpoint's close awaits).
                let reader = tokio::spawn(read_relayed(
                    recv,
                    injector.clone(),
                    addrs.clone(),
                    waiters.clone(),
                ));
                let mut batch =
                    Vec::with_capacity(relay::RELAY_WRITE_BATCH + 2 * relay::MAX_RELAY_PACKET);
                // `true`: the relay stops; `false`: the stream is opened again.
                let writing = async {
                    loop {
                        tokio::select! {
                            packet = rx.recv() => {
                                let Some(packet) = packet else { return true };
                                // Everything quinn has queued meanwhile goes out in the same write.
                                batch.clear();
                                encode_packet(&mut batch, &packet);
                                while batch.len() < relay::RELAY_WRITE_BATCH {
                                    let Ok(packet) = rx.try_recv() else { break };
                                    encode_packet(&mut batch, &packet);
                                }
                                if batch.is_empty() {
                                    continue;
                                }
                                if send.write_all(&batch).await.is_err() {
                                    break false;
                                }
                                session.note_relayed();
                            }
                            r = state.changed() => {
                                if r.is_err() {
                                    return true;
                                }
                                let same = matches!(&*state.borrow(), SessionState::Registered(r) if r.generation == reg.generation);
                                if !same {
                                    break false;
                                }
                            }
                            _ = shutdown.changed() => return true,
                        }
                    }
                };
                let stop = writing.await;
                reader.abort();
                let _ = reader.await;
                if stop {
                    return;
                }
                ready.send_replace(false);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot open the relay stream");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = shutdown.changed() => return,
                }
            }
        }
    }
}

/// Appends `packet`'s relay frame to `batch` (a packet with a bad label or size is dropped, as
/// a lossy link would).
fn encode_packet(batch: &mut Vec<u8>, packet: &VirtualPacket) {
    if let Ok(to) = PeerId::from_bytes(packet.label) {
        let _ = relay::encode_into(batch, &to, &packet.data);
    }
}

async fn open(conn: &quinn::Connection) -> Result<(quinn::SendStream, quinn::RecvStream), String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    write_frame(&mut send, &ControlMessage::RelayOpen {}.encode())
        .await
        .map_err(|e| e.to_string())?;
    let reply = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut recv))
        .await
        .map_err(|_| "no answer to relay_open".to_owned())?
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "relay stream closed".to_owned())?;
    match ControlMessage::decode(&reply) {
        Ok(ControlMessage::RelayReady { .. }) => Ok((send, recv)),
        Ok(ControlMessage::Error { code, message }) => {
            Err(format!("refused ({code:?}): {message}"))
        }
        Ok(other) => Err(format!("unexpected `{}`", other.kind())),
        Err(e) => Err(e.to_string()),
    }
}

async fn read_relayed(
    mut recv: quinn::RecvStream,
    injector: Injector,
    addrs: Arc<Mutex<HashMap<PeerId, SocketAddr>>>,
    waiters: Arc<Waiters>,
) {
    let mut decoder = RelayDecoder::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match recv.read(&mut buf).await {
            Ok(Some(n)) => n,
            _ => return,
        };
        decoder.push(&buf[..n]);
        loop {
            match decoder.next_frame() {
                Ok(Some((from, packet))) => {
                    let addr = addrs
                        .lock()
                        .ok()
                        .and_then(|a| a.get(&from).copied())
                        .unwrap_or_else(|| stable_addr(&from));
                    // A full queue drops the packet; QUIC recovers.
                    let _ = injector.inject(addr, packet);
                    waiters.heard(&from);
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "bad frame from the relay");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// quinn on a dual-stack socket shows a stable address v4-mapped: it is still one, and the
    /// same peer's.
    #[test]
    fn a_v4_mapped_stable_address_is_a_stable_address() {
        let peer = PeerId::from_key_digest(&[3; 32]);
        let stable = stable_addr(&peer);
        assert!(is_stable_addr(stable));
        let SocketAddr::V4(v4) = stable else {
            panic!("stable addresses are IPv4")
        };
        let mapped = SocketAddr::new(std::net::IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port());
        assert!(is_stable_addr(mapped));
        assert_eq!(transport::canonical(mapped), stable);
        assert!(!is_stable_addr("[2001:db8::1]:1".parse().unwrap()));
        assert!(!is_stable_addr("[::ffff:203.0.113.5]:1".parse().unwrap()));
    }
}
