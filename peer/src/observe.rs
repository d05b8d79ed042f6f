//! Proving our address of the other IP family to the rendezvous.
//!
//! A dual-stack peer registers over IPv4 when it can (the rendezvous must see its NAT's IPv4
//! mapping). Its IPv6 address (no NAT: its interface address, behind a stateful firewall at
//! most) is what gets symmetric NATs direct, and the rendezvous accepts it only proven: after
//! each registration we send an address-proof request
//! ([`common::stun::observe_request`]) from our one socket to the server's address of the
//! other family (`registered.server_addrs`), and return the answer's MESSAGE-INTEGRITY, which
//! only a host receiving at our address can know, in a `confirm_address` on the TLS control
//! connection. The server then hands the address out as a second observed candidate. Sending
//! to the server also opens our firewall towards it, nothing more: other peers get through it
//! by punching.

use std::net::SocketAddr;
use std::time::Duration;

use common::stun::{self, ProbeTag, StunPacket};
use common::ControlMessage;
use tokio::sync::watch;

use crate::console::Console;
use crate::node::Node;
use crate::punching::Router;
use crate::session::{Session, SessionState};

/// Requests sent per registration before giving up (UDP may lose one).
const ATTEMPTS: u32 = 3;
/// How long to wait for each answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
/// A proof that failed (its requests or answers lost, the path of the other family down for
/// a while) is tried again within the same registration after this long, then after twice
/// as long each time, at most [`RETRIES`] times: a peer that registered during a loss burst
/// would otherwise stay without its IPv6 candidate until its next registration.
const FIRST_RETRY: Duration = Duration::from_secs(10);
/// Proofs tried again per registration after the first (10, 20, 40, 80, 160 s: about 5 min).
const RETRIES: u32 = 5;

/// The wait before proof attempt `failed + 1` of a registration after `failed` failed ones,
/// or `None` when the registration's attempts are used up.
fn retry_after(failed: u32) -> Option<Duration> {
    (1..=RETRIES)
        .contains(&failed)
        .then(|| FIRST_RETRY * 2u32.pow(failed - 1))
}

/// The address of `server_addrs` to prove ours at: the first of the other family than the
/// control connection's (`control`), if our socket can send there.
pub fn proof_target(
    server_addrs: &[SocketAddr],
    control: SocketAddr,
    dual_stack: bool,
) -> Option<SocketAddr> {
    if !dual_stack {
        return None;
    }
    server_addrs
        .iter()
        .map(|a| transport::canonical(*a))
        .find(|a| a.is_ipv4() != control.is_ipv4())
}

/// Proves our other-family address after every registration (over UDP, to a dual-stack
/// server), again later within the registration when a proof fails ([`retry_after`]), until
/// `shutdown`.
pub(crate) async fn run(
    node: Node,
    router: Router,
    session: Session,
    keeper: crate::paths::PathKeeper,
    console: Console,
    verbose: bool,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut state = session.watch();
    // The registration whose proof is settled (proven, or its retries used up).
    let mut proven_generation = 0;
    // Failed proofs of the current registration: (its generation, how many, when to retry).
    let mut failed: Option<(u64, u32, tokio::time::Instant)> = None;
    loop {
        if let SessionState::Registered(reg) = session.state() {
            let target = proof_target(
                &reg.server_addrs,
                session.server_addr(),
                node.socket.is_ipv6(),
            );
            let due = match failed {
                Some((generation, _, at)) if generation == reg.generation => {
                    tokio::time::Instant::now() >= at
                }
                _ => true,
            };
            if let Some(target) =
                target.filter(|_| reg.generation != proven_generation && !reg.over_tcp && due)
            {
                let outcome = tokio::select! {
                    r = prove(&node, &router, &session, target) => r,
                    _ = shutdown.changed() => return,
                };
                let proven = outcome.as_ref().is_ok_and(|a| a.is_ipv6());
                let before = node
                    .ipv6_proven
                    .swap(proven, std::sync::atomic::Ordering::Relaxed);
                if proven && !before {
                    // Connections made before it (relayed, or direct over IPv4) may move now.
                    keeper.ipv6_proven();
                }
                match &outcome {
                    Ok(_) => {
                        proven_generation = reg.generation;
                        failed = None;
                    }
                    Err(_) => {
                        let count = match failed {
                            Some((generation, n, _)) if generation == reg.generation => n + 1,
                            _ => 1,
                        };
                        match retry_after(count) {
                            Some(wait) => {
                                failed = Some((
                                    reg.generation,
                                    count,
                                    tokio::time::Instant::now() + wait,
                                ))
                            }
                            None => {
                                proven_generation = reg.generation;
                                failed = None;
                            }
                        }
                    }
                }
                match outcome {
                    Ok(addr) => {
                        tracing::info!(%addr, server = %target, "address of the other family proven");
                        if verbose {
                            console
                                .say(format!(
                                    "address {addr} proven to the rendezvous (via {target})"
                                ))
                                .await;
                        }
                    }
                    Err(why) => {
                        tracing::info!(server = %target, %why, "no address of the other family");
                        if verbose {
                            console
                                .say(format!("no address proven at {target}: {why}"))
                                .await;
                        }
                    }
                }
            }
        }
        let retry_at = failed.map(|(_, _, at)| at);
        tokio::select! {
            r = state.changed() => if r.is_err() { return },
            _ = sleep_until(retry_at) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Until `at`, or never.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// One proof: request, answer, `confirm_address`. Our proven address, or why not.
async fn prove(
    node: &Node,
    router: &Router,
    session: &Session,
    target: SocketAddr,
) -> Result<SocketAddr, String> {
    let nonce: u64 = rand::random();
    let mut inbox = router.register_raw(nonce);
    let tag = ProbeTag {
        nonce,
        sender: node.identity.id(),
    };
    let result = async {
        for attempt in 0..ATTEMPTS {
            let transaction = tag.transaction(attempt);
            node.socket
                .send_to(&stun::observe_request(transaction), target)
                .await
                .map_err(|e| format!("cannot send to {target}: {e}"))?;
            let answer = tokio::time::timeout(ANSWER_TIMEOUT, async {
                while let Some(d) = inbox.recv().await {
                    if d.from != target {
                        continue;
                    }
                    if let Ok(StunPacket::BindingSuccess {
                        transaction: t,
                        mapped,
                    }) = stun::decode(&d.data)
                    {
                        if t == transaction {
                            return stun::integrity_of(&d.data).map(|proof| (mapped, proof));
                        }
                    }
                }
                None
            })
            .await;
            let Ok(Some((addr, proof))) = answer else {
                continue;
            };
            let confirm = ControlMessage::ConfirmAddress {
                addr,
                transaction,
                proof,
            };
            return match session.request(&confirm).await {
                Ok(ControlMessage::Ack {}) => Ok(addr),
                Ok(ControlMessage::Error { message, .. }) => {
                    Err(format!("the rendezvous refused it: {message}"))
                }
                Ok(other) => Err(format!("unexpected reply `{}`", other.kind())),
                Err(e) => Err(e.to_string()),
            };
        }
        Err(format!("no answer from {target}"))
    }
    .await;
    router.unregister(nonce);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failed proof is tried again within the registration on a doubling schedule, a bounded
    /// number of times (3 requests each): about 5 minutes, then not until the next
    /// registration.
    #[test]
    fn failed_proofs_are_retried_with_backoff_a_bounded_number_of_times() {
        assert_eq!(retry_after(0), None);
        let waits: Vec<u64> = (1..=RETRIES)
            .map(|n| retry_after(n).map(|d| d.as_secs()).unwrap_or(0))
            .collect();
        assert_eq!(waits, vec![10, 20, 40, 80, 160]);
        assert_eq!(retry_after(RETRIES + 1), None);
        assert_eq!(retry_after(u32::MAX), None);
    }

    /// The proof goes to the server's address of the other family, only from a dual-stack
    /// socket, whatever the spelling of the server's addresses.
    #[test]
    fn the_proof_goes_to_the_other_family_from_a_dual_stack_socket() {
        let v4: SocketAddr = "203.0.113.10:7000".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::10]:7000".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:203.0.113.10]:7000".parse().unwrap();
        assert_eq!(proof_target(&[v4, v6], v4, true), Some(v6));
        assert_eq!(proof_target(&[v4, v6], v6, true), Some(v4));
        assert_eq!(proof_target(&[mapped, v6], v6, true), Some(v4));
        assert_eq!(proof_target(&[v4, v6], v4, false), None);
        assert_eq!(proof_target(&[v4], v4, true), None);
        assert_eq!(proof_target(&[], v4, true), None);
    }
}
