//! Relay frames: what flows on a relay stream once it is open.
//!
//! `[u16 length][16-byte peer id][packet]`, big-endian, where the length counts the id and the
//! packet. From a peer to the rendezvous the id names the destination; from the rendezvous to a
//! peer it names the source. Packets are the peers' own end-to-end encrypted QUIC packets: the
//! server forwards bytes it cannot read.

use crate::PeerId;

/// Largest packet a relay frame carries (a QUIC datagram is at most ~1500 bytes on Ethernet).
pub const MAX_RELAY_PACKET: usize = 2048;

const HEADER: usize = 2 + 16;

/// A relay frame that cannot be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelayFrameError {
    /// The length is shorter than an id or longer than the cap.
    #[error("relay frame length {0} is invalid (16 to {max} bytes)", max = 16 + MAX_RELAY_PACKET)]
    BadLength(usize),
    /// The id is not a peer id.
    #[error("relay frame names an invalid peer id")]
    BadPeer,
}

/// Encodes one frame. Packets over [`MAX_RELAY_PACKET`] are refused.
pub fn encode(peer: &PeerId, packet: &[u8]) -> Result<Vec<u8>, RelayFrameError> {
    let mut out = Vec::with_capacity(HEADER + packet.len());
    encode_into(&mut out, peer, packet)?;
    Ok(out)
}

/// Appends one frame to `out` (to batch several frames into one write). Packets over
/// [`MAX_RELAY_PACKET`] are refused and leave `out` as it was.
pub fn encode_into(out: &mut Vec<u8>, peer: &PeerId, packet: &[u8]) -> Result<(), RelayFrameError> {
    if packet.len() > MAX_RELAY_PACKET {
        return Err(RelayFrameError::BadLength(16 + packet.len()));
    }
    // The cap keeps the length inside u16.
    out.extend_from_slice(&((16 + packet.len()) as u16).to_be_bytes());
    out.extend_from_slice(peer.as_bytes());
    out.extend_from_slice(packet);
    Ok(())
}

/// Bytes of frames gathered into one write on a relay stream: a batch of queued packets costs
/// one stream write (one wake-up of the connection) instead of one per packet.
pub const RELAY_WRITE_BATCH: usize = 64 * 1024;

/// Incremental decoder: push bytes in any chunking, pull `(peer, packet)` frames out.
#[derive(Debug, Default)]
pub struct RelayDecoder {
    buf: Vec<u8>,
    start: usize,
}

impl RelayDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes. What was decoded before is dropped first (moving at most one
    /// partial frame), so that after decoding every complete frame the buffer holds at most one
    /// partial frame plus the bytes of one push.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered and not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Bytes allocated for the buffer (for memory accounting).
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed. An error means the stream
    /// cannot be trusted any more.
    pub fn next_frame(&mut self) -> Result<Option<(PeerId, Vec<u8>)>, RelayFrameError> {
        Ok(self
            .next_frame_ref()?
            .map(|(peer, packet)| (peer, packet.to_vec())))
    }

    /// As [`RelayDecoder::next_frame`], with the packet borrowed from the decoder's buffer (valid
    /// until the next call): forwarding copies it once, into the outgoing batch.
    pub fn next_frame_ref(&mut self) -> Result<Option<(PeerId, &[u8])>, RelayFrameError> {
        let pending = &self.buf[self.start..];
        if pending.len() < 2 {
            return Ok(None);
        }
        let len = u16::from_be_bytes([pending[0], pending[1]]) as usize;
        if !(16..=16 + MAX_RELAY_PACKET).contains(&len) {
            return Err(RelayFrameError::BadLength(len));
        }
        if pending.len() < 2 + len {
            return Ok(None);
        }
        let mut id = [0u8; 16];
        id.copy_from_slice(&pending[2..18]);
        let peer = PeerId::from_bytes(id).map_err(|_| RelayFrameError::BadPeer)?;
        let start = self.start;
        self.start += 2 + len;
        Ok(Some((peer, &self.buf[start + 18..start + 2 + len])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id() -> PeerId {
        PeerId::from_key_digest(&[8; 32])
    }

    #[test]
    fn batched_frames_decode_one_by_one() {
        let (a, b) = (
            PeerId::from_key_digest(&[1; 32]),
            PeerId::from_key_digest(&[2; 32]),
        );
        let mut batch = Vec::new();
        encode_into(&mut batch, &a, b"first").unwrap();
        encode_into(&mut batch, &b, &[7u8; MAX_RELAY_PACKET]).unwrap();
        let before = batch.len();
        assert!(encode_into(&mut batch, &a, &[0u8; MAX_RELAY_PACKET + 1]).is_err());
        assert_eq!(
            batch.len(),
            before,
            "a refused packet leaves the batch as it was"
        );
        assert_eq!(&batch[..2 + 16 + 5], &encode(&a, b"first").unwrap()[..]);
        let mut decoder = RelayDecoder::new();
        decoder.push(&batch);
        assert_eq!(decoder.next_frame(), Ok(Some((a, b"first".to_vec()))));
        assert_eq!(
            decoder.next_frame(),
            Ok(Some((b, vec![7u8; MAX_RELAY_PACKET])))
        );
        assert_eq!(decoder.next_frame(), Ok(None));
    }

    #[test]
    fn round_trip_and_limits() {
        let mut dec = RelayDecoder::new();
        dec.push(&encode(&id(), b"quic packet").unwrap());
        dec.push(&encode(&id(), &[]).unwrap());
        assert_eq!(
            dec.next_frame().unwrap(),
            Some((id(), b"quic packet".to_vec()))
        );
        assert_eq!(dec.next_frame().unwrap(), Some((id(), Vec::new())));
        assert_eq!(dec.next_frame().unwrap(), None);
        assert!(encode(&id(), &vec![0; MAX_RELAY_PACKET + 1]).is_err());
        let mut dec = RelayDecoder::new();
        dec.push(&[0, 3, 1, 2, 3]);
        assert_eq!(dec.next_frame(), Err(RelayFrameError::BadLength(3)));
        let mut dec = RelayDecoder::new();
        let mut frame = encode(&id(), b"x").unwrap();
        frame[2..18].copy_from_slice(&[0; 16]);
        dec.push(&frame);
        assert_eq!(dec.next_frame(), Err(RelayFrameError::BadPeer));
    }

    proptest! {
        #[test]
        fn any_chunking_round_trips(
            packets in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..1500), 0..6),
            cut in 1usize..100,
        ) {
            let wire: Vec<u8> = packets.iter().flat_map(|p| encode(&id(), p).unwrap()).collect();
            let mut dec = RelayDecoder::new();
            let mut out = Vec::new();
            for chunk in wire.chunks(cut) {
                dec.push(chunk);
                while let Some((_, packet)) = dec.next_frame().unwrap() {
                    out.push(packet);
                }
            }
            prop_assert_eq!(out, packets);
            prop_assert_eq!(dec.buffered(), 0);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let mut dec = RelayDecoder::new();
            dec.push(&bytes);
            for _ in 0..200 {
                match dec.next_frame() {
                    Ok(Some(_)) => continue,
                    _ => break,
                }
            }
        }
    }
}
