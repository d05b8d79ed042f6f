//! Address proofs for a peer's address in the other IP family than its control connection.
//!
//! A dual-stack peer registers over one family (IPv4 when it has it: there the rendezvous sees
//! its NAT's mapping). Its address in the other family is only as good as its claim unless the
//! server sees it: the peer sends an address-proof request
//! ([`common::stun::observe_request`]) from its one socket to the server's address of the other
//! family, and the server answers the source address with a Binding success whose
//! MESSAGE-INTEGRITY is keyed by a secret of the server and that address (and the current
//! minute). Only a host that receives at that address learns the answer, so a `confirm_address`
//! carrying it over the peer's authenticated TLS connection proves both who the peer is and that
//! it receives there (return routability, as QUIC's address validation). Nothing is stored
//! until the proof checks; proofs are stateless and expire within two minutes.

use std::net::SocketAddr;

use common::stun::{self, PunchKey};
use ring::hmac;
use time::OffsetDateTime;

/// The server's addresses of both families, with the port of `bound`, when `bound` is the
/// dual-stack wildcard (`[::]:port`): the source addresses the routing table picks towards the
/// IPv4 and IPv6 internet (found by connecting UDP sockets, which sends nothing). Empty for a
/// socket of one family: there is no other family to prove.
pub fn own_addrs(bound: SocketAddr) -> Vec<SocketAddr> {
    if !(bound.is_ipv6() && bound.ip().is_unspecified()) {
        return Vec::new();
    }
    let probes: [SocketAddr; 2] = [
        (std::net::Ipv4Addr::new(8, 8, 8, 8), 443).into(),
        (
            std::net::Ipv6Addr::new(0x2001, 0x4860, 0x4860, 0, 0, 0, 0, 0x8888),
            443,
        )
            .into(),
    ];
    probes
        .iter()
        .filter_map(|target| {
            let any: SocketAddr = match target {
                SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
                SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
            };
            let socket = std::net::UdpSocket::bind(any).ok()?;
            socket.connect(target).ok()?;
            let ip = socket.local_addr().ok()?.ip();
            (!ip.is_unspecified() && !ip.is_loopback()).then(|| SocketAddr::new(ip, bound.port()))
        })
        .collect()
}

/// How long a proof's key is valid: the minute of the answer and the next.
const BUCKET_S: i64 = 60;

/// The MESSAGE-INTEGRITY key of the answer to `addr` in minute `bucket`.
fn key_for(secret: &[u8; 32], addr: SocketAddr, bucket: i64) -> PunchKey {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let mut context = Vec::with_capacity(64);
    context.extend_from_slice(b"p2p observe v1 ");
    context.extend_from_slice(addr.to_string().as_bytes());
    context.extend_from_slice(&bucket.to_be_bytes());
    let tag = hmac::sign(&key, &context);
    let mut bytes = [0u8; PunchKey::LEN];
    bytes.copy_from_slice(&tag.as_ref()[..PunchKey::LEN]);
    PunchKey::from_bytes(bytes)
}

fn bucket_of(now: OffsetDateTime) -> i64 {
    now.unix_timestamp().div_euclid(BUCKET_S)
}

/// The answer to an address-proof request with `transaction` from `from`, at `now`.
pub fn answer(
    secret: &[u8; 32],
    transaction: [u8; 12],
    from: SocketAddr,
    now: OffsetDateTime,
) -> Vec<u8> {
    stun::probe_success(transaction, from, &key_for(secret, from, bucket_of(now)))
}

/// Whether `proof` is the MESSAGE-INTEGRITY of our answer to a request with `transaction` from
/// `addr` sent this minute or the one before.
pub fn verify(
    secret: &[u8; 32],
    transaction: [u8; 12],
    addr: SocketAddr,
    proof: &[u8; 20],
    now: OffsetDateTime,
) -> bool {
    let bucket = bucket_of(now);
    [bucket, bucket - 1].into_iter().any(|b| {
        let expected = stun::probe_success(transaction, addr, &key_for(secret, addr, b));
        stun::integrity_of(&expected)
            // Every byte compared, whatever the first difference: no timing hint.
            .is_some_and(|mac| mac.iter().zip(proof).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const T0: OffsetDateTime = datetime!(2026-11-26 10:00:30 UTC);

    /// The proof of our answer checks for that address and transaction, the same minute and
    /// the next; not for another address, transaction or secret, nor two minutes later.
    #[test]
    fn a_proof_checks_only_for_its_address_transaction_and_time() {
        let secret = [9u8; 32];
        let addr: SocketAddr = "[2001:db8:1::2]:4000".parse().unwrap();
        let tx = [5u8; 12];
        let reply = answer(&secret, tx, addr, T0);
        let proof = stun::integrity_of(&reply).expect("the answer is sealed");
        assert!(verify(&secret, tx, addr, &proof, T0));
        assert!(verify(
            &secret,
            tx,
            addr,
            &proof,
            T0 + time::Duration::seconds(60)
        ));
        assert!(!verify(
            &secret,
            tx,
            addr,
            &proof,
            T0 + time::Duration::seconds(150)
        ));
        let other: SocketAddr = "[2001:db8:1::3]:4000".parse().unwrap();
        assert!(!verify(&secret, tx, other, &proof, T0));
        assert!(!verify(&secret, [6u8; 12], addr, &proof, T0));
        assert!(!verify(&[8u8; 32], tx, addr, &proof, T0));
        let mut forged = proof;
        forged[0] ^= 1;
        assert!(!verify(&secret, tx, addr, &forged, T0));
    }
}
