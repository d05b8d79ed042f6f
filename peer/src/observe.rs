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
/// server), until `shutdown`.
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
    let mut proven_generation = 0;
    loop {
        if let SessionState::Registered(reg) = session.state() {
            let target = proof_target(
                &reg.server_addrs,
                session.server_addr(),
                node.socket.is_ipv6(),
            );
            if let Some(target) =
                target.filter(|_| reg.generation != proven_generation && !reg.over_tcp)
            {
                proven_generation = reg.generation;
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
        tokio::select! {
            r = state.changed() => if r.is_err() { return },
            _ = shutdown.changed() => return,
        }
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
