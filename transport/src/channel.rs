//! Relay channels: the relay's data plane in plain UDP.
//!
//! A relayed packet used to travel inside a second QUIC connection (the peer's connection to
//! the rendezvous): encrypted, acknowledged and reassembled once more on each hop, although it
//! is already an end-to-end encrypted QUIC packet between the two peers. A channel carries it
//! instead as one UDP datagram with a short header, `[CHANNEL_MARKER][channel id: u64 BE]`,
//! from the peer's own socket to the rendezvous's, which forwards it unchanged to the other
//! side (as a TURN channel does, RFC 8656 section 12): no decryption, no re-encryption, one
//! `recvmsg` and one `sendmsg` per batch of segments.
//!
//! Why this is safe without a per-packet MAC: the rendezvous hands a channel id (64 random
//! bits) to the two peers of an introduction only on their control connections (TLS), and
//! forwards a datagram only when it comes from the address that peer's control connection
//! comes from (the same socket, so the same NAT mapping); anything else is shown to QUIC as
//! the garbage it is. What an on-path attacker who learns an id can do (inject datagrams the
//! receiving peer's QUIC discards, charged to the victim's relay allowance) it can do anyway
//! by dropping that peer's packets.
//!
//! This module holds the wire format and the hook by which the rendezvous forwards channel
//! datagrams ([`ChannelForwarder`]); the [`crate::DemuxSocket`] does the sending and receiving.

use std::net::SocketAddr;

/// The first byte of a channel datagram. QUIC packets have the fixed bit (0x40) set (unless
/// greased, which our endpoints never negotiate with anyone: `grease_quic_bit` is not
/// advertised), and STUN's first two bits are zero, so 0b10xxxxxx is free; the channel id
/// decides anyway (an unknown id, or a known one from the wrong address, is left to QUIC).
pub const CHANNEL_MARKER: u8 = 0xB5;

/// Bytes of the channel header.
pub const CHANNEL_HEADER: usize = 1 + 8;

/// Largest UDP payload a channel datagram may have: an IPv4 datagram of 1,500 bytes (the
/// Ethernet MTU) less the IP and UDP headers. Packets that would not fit with the header go
/// by the relay stream instead (QUIC's MTU discovery may have found a larger MTU on another
/// path of the same connection).
pub const MAX_CHANNEL_DATAGRAM_V4: usize = 1500 - 20 - 8;

/// As [`MAX_CHANNEL_DATAGRAM_V4`] when the rendezvous is reached over IPv6.
pub const MAX_CHANNEL_DATAGRAM_V6: usize = 1500 - 40 - 8;

/// The largest channel datagram towards `server`.
pub fn max_channel_datagram(server: SocketAddr) -> usize {
    if server.ip().to_canonical().is_ipv4() {
        MAX_CHANNEL_DATAGRAM_V4
    } else {
        MAX_CHANNEL_DATAGRAM_V6
    }
}

/// The header of a datagram on channel `id`.
pub fn header(id: u64) -> [u8; CHANNEL_HEADER] {
    let mut h = [0u8; CHANNEL_HEADER];
    h[0] = CHANNEL_MARKER;
    h[1..].copy_from_slice(&id.to_be_bytes());
    h
}

/// The channel id of a datagram that has the channel shape (marker, a full header and at
/// least one byte of packet), else `None`.
pub fn channel_id(datagram: &[u8]) -> Option<u64> {
    if datagram.len() <= CHANNEL_HEADER || datagram[0] != CHANNEL_MARKER {
        return None;
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&datagram[1..CHANNEL_HEADER]);
    Some(u64::from_be_bytes(id))
}

/// What the rendezvous does with a run of channel datagrams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardVerdict {
    /// Send the run, unchanged, to `to` (the other side of the channel), from `src_ip` (the
    /// local address that side's control connection uses, on a multi-homed server).
    Send {
        /// The other side's address.
        to: SocketAddr,
        /// The local address to send from, if known.
        src_ip: Option<std::net::IpAddr>,
    },
    /// The forwarder took care of it (queued it on the other side's relay stream, or dropped
    /// and counted it).
    Done,
    /// Not a channel datagram after all (unknown id, or not from the channel's side): it goes
    /// to QUIC, which discards what it cannot read.
    NotChannel,
}

/// The rendezvous's side of channels, called by [`crate::DemuxSocket`] for every run of
/// consecutive datagrams of one received buffer that have the channel shape and the same id:
/// decides where they go, and charges them. Called on the endpoint's receive path: must not
/// block (no I/O, only short locks).
pub trait ChannelForwarder: Send + Sync {
    /// `run` holds `count` datagrams of `stride` bytes each (the last one possibly shorter),
    /// each with its channel header, all from `from` on channel `id`.
    fn forward(
        &self,
        id: u64,
        from: SocketAddr,
        run: &[u8],
        stride: usize,
        count: usize,
    ) -> ForwardVerdict;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_shapes_are_checked() {
        let mut d = header(0x0102_0304_0506_0708).to_vec();
        assert_eq!(d[0], CHANNEL_MARKER);
        assert_eq!(channel_id(&d), None, "a header alone carries no packet");
        d.push(0x40);
        assert_eq!(channel_id(&d), Some(0x0102_0304_0506_0708));
        d[0] = 0x40;
        assert_eq!(channel_id(&d), None);
        assert_eq!(channel_id(&[]), None);
        assert_eq!(channel_id(&[CHANNEL_MARKER; 5]), None);
        // Neither STUN nor QUIC with its fixed bit can look like one.
        assert!(!common::stun::is_stun(&d));
        assert_eq!(CHANNEL_MARKER & 0xC0, 0x80);
    }

    /// A peer connection's largest packet fits a channel datagram whatever the server's
    /// family (MTU discovery stops there), and is still more than QUIC's minimum.
    #[test]
    fn a_peers_largest_packet_fits_a_channel_datagram() {
        let largest = usize::from(crate::PEER_MAX_UDP_PAYLOAD);
        assert_eq!(largest, 1443);
        assert!(largest + CHANNEL_HEADER <= MAX_CHANNEL_DATAGRAM_V6);
        assert!(largest + CHANNEL_HEADER <= MAX_CHANNEL_DATAGRAM_V4);
        assert!(largest >= 1200);
    }

    #[test]
    fn the_size_limit_follows_the_servers_family() {
        assert_eq!(max_channel_datagram("192.0.2.1:443".parse().unwrap()), 1472);
        assert_eq!(
            max_channel_datagram("[::ffff:192.0.2.1]:443".parse().unwrap()),
            1472
        );
        assert_eq!(
            max_channel_datagram("[2001:db8::1]:443".parse().unwrap()),
            1452
        );
    }
}
