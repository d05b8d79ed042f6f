//! Relay frames (`[u16 length][16-byte peer id][packet]`, what flows on a relay stream):
//! `common::relay::RelayDecoder` and the encoders.
//!
//! Properties:
//! - raw bytes, cut into arbitrary pushes, give exactly the frames a plain reference parser
//!   finds (valid peer ids only, packets within `MAX_RELAY_PACKET`) and stop at the same error;
//!   an error repeats (the stream is not resynchronised); `next_frame` and `next_frame_ref` agree;
//! - after the decoder is drained, what it still buffers is less than one whole frame, and
//!   `buffered()` always equals the bytes pushed minus the bytes decoded;
//! - arbitrary packets (up to and past the cap) are refused by `encode` and `encode_into` exactly
//!   when over the cap, a refusal leaves a batch as it was, a batch equals the frames one by one,
//!   and every accepted packet comes back unchanged, with its peer, whatever the cuts.

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use common::relay::{self, RelayDecoder, RelayFrameError, MAX_RELAY_PACKET};
use common::PeerId;
use libfuzzer_sys::fuzz_target;
use p2p_fuzz::Cuts;

const HEADER: usize = 2 + 16;

/// The most a drained decoder may hold: an incomplete frame, i.e. less than the largest one.
const MAX_PENDING: usize = HEADER + MAX_RELAY_PACKET - 1;

/// What decoding a stream gave: the frames, the error it stopped at, the bytes left over.
#[derive(Debug, PartialEq, Eq)]
struct Decoded {
    frames: Vec<(PeerId, Vec<u8>)>,
    error: Option<RelayFrameError>,
    left: usize,
}

/// The obvious parser, from the format's description.
fn reference(mut bytes: &[u8]) -> Decoded {
    let mut frames = Vec::new();
    let end = |frames, error, left| Decoded {
        frames,
        error,
        left,
    };
    loop {
        if bytes.len() < 2 {
            return end(frames, None, bytes.len());
        }
        let len = usize::from(u16::from_be_bytes([bytes[0], bytes[1]]));
        if !(16..=16 + MAX_RELAY_PACKET).contains(&len) {
            return end(frames, Some(RelayFrameError::BadLength(len)), bytes.len());
        }
        if bytes.len() < 2 + len {
            return end(frames, None, bytes.len());
        }
        let mut id = [0u8; 16];
        id.copy_from_slice(&bytes[2..18]);
        let Ok(peer) = PeerId::from_bytes(id) else {
            return end(frames, Some(RelayFrameError::BadPeer), bytes.len());
        };
        frames.push((peer, bytes[18..2 + len].to_vec()));
        bytes = &bytes[2 + len..];
    }
}

/// Pushes `bytes` in chunks, draining after each; the frames, the error, what is left.
fn decode(bytes: &[u8], cuts: &mut Cuts, by_ref: bool) -> Decoded {
    let mut decoder = RelayDecoder::new();
    let mut frames = Vec::new();
    let mut pushed = 0usize;
    let mut decoded = 0usize;
    let mut failed = None;
    for chunk in cuts.split(bytes) {
        decoder.push(chunk);
        pushed += chunk.len();
        assert_eq!(decoder.buffered(), pushed - decoded);
        if let Some(err) = &failed {
            // The same error, whatever arrives next: a bad stream stays bad.
            assert_eq!(decoder.next_frame().as_ref(), Err(err));
            continue;
        }
        loop {
            let next = if by_ref {
                decoder
                    .next_frame_ref()
                    .map(|f| f.map(|(peer, p)| (peer, p.to_vec())))
            } else {
                decoder.next_frame()
            };
            match next {
                Ok(Some((peer, packet))) => {
                    assert!(
                        packet.len() <= MAX_RELAY_PACKET,
                        "a {}-byte packet",
                        packet.len()
                    );
                    decoded += HEADER + packet.len();
                    frames.push((peer, packet));
                }
                Ok(None) => break,
                Err(err) => {
                    failed = Some(err);
                    break;
                }
            }
            assert_eq!(decoder.buffered(), pushed - decoded);
        }
        if failed.is_none() {
            assert!(
                decoder.buffered() <= MAX_PENDING,
                "a drained decoder holds {} bytes",
                decoder.buffered()
            );
        }
    }
    Decoded {
        frames,
        error: failed,
        left: decoder.buffered(),
    }
}

fn seed_of(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

#[derive(Arbitrary, Debug)]
enum Packet {
    Bytes(Vec<u8>),
    Repeat { byte: u8, len: u16 },
}

#[derive(Arbitrary, Debug)]
struct Packets {
    packets: Vec<([u8; 32], Packet)>,
    seed: u64,
    max_cut: u16,
}

fn round_trip(input: Packets) {
    let mut batch = Vec::new();
    let mut one_by_one = Vec::new();
    let mut accepted = Vec::new();
    for (digest, packet) in input.packets {
        let peer = PeerId::from_key_digest(&digest);
        let packet = match packet {
            Packet::Bytes(bytes) => bytes,
            Packet::Repeat { byte, len } => vec![byte; usize::from(len) % (MAX_RELAY_PACKET + 2)],
        };
        let before = batch.clone();
        match (
            relay::encode(&peer, &packet),
            relay::encode_into(&mut batch, &peer, &packet),
        ) {
            (Ok(frame), Ok(())) => {
                assert!(packet.len() <= MAX_RELAY_PACKET);
                assert_eq!(frame.len(), HEADER + packet.len());
                assert_eq!(&batch[before.len()..], &frame[..], "encode_into != encode");
                one_by_one.extend_from_slice(&frame);
                accepted.push((peer, packet));
            }
            (Err(a), Err(b)) => {
                assert!(
                    packet.len() > MAX_RELAY_PACKET,
                    "{}-byte packet refused",
                    packet.len()
                );
                assert_eq!(a, b);
                assert!(batch == before, "a refused packet changed the batch");
            }
            (a, b) => panic!("encode and encode_into disagree: {a:?} / {b:?}"),
        }
    }
    assert!(batch == one_by_one, "a batch differs from its frames");
    let mut cuts = Cuts::for_len(input.seed, usize::from(input.max_cut), batch.len());
    let decoded = decode(&batch, &mut cuts, input.seed & 1 == 0);
    assert_eq!(decoded.error, None);
    assert_eq!(decoded.left, 0);
    assert!(decoded.frames == accepted, "the decoder changed the frames");
}

fuzz_target!(|data: &[u8]| {
    let seed = seed_of(data);
    let expected = reference(data);
    for (by_ref, max_cut) in [(false, 7), (true, 3000)] {
        let decoded = decode(data, &mut Cuts::new(seed, max_cut), by_ref);
        assert_eq!(
            decoded.error, expected.error,
            "the decoder stops differently"
        );
        assert!(
            decoded.frames == expected.frames,
            "the decoder disagrees with the reference"
        );
        assert_eq!(
            decoded.left, expected.left,
            "bytes left over differ from the reference"
        );
    }
    if let Ok(input) = Packets::arbitrary(&mut Unstructured::new(data)) {
        round_trip(input);
    }
});
