//! Frames of the node-to-node link (`rendezvous::nodelink`): what a node reads from another
//! node once the cluster key is proven. `[1][16-byte peer id][u32 length][relay frames]` carries
//! relay frames for a peer; `[2][requester id][target id][u64 nonce]` an accept.
//!
//! Properties:
//! - raw bytes, cut into arbitrary pushes, give exactly the frames a plain reference parser
//!   finds (valid peer ids, batches within `MAX_LINK_BATCH`) and stop at the same error, never
//!   a panic;
//! - `buffered()` is always the bytes pushed minus the bytes decoded, and a drained decoder
//!   holds less than one whole frame;
//! - `encode_packets` refuses exactly the batches over the cap, and every encoded frame comes
//!   back unchanged whatever the cuts.

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use common::PeerId;
use libfuzzer_sys::fuzz_target;
use p2p_fuzz::Cuts;
use rendezvous::nodelink::{
    encode_consent, encode_packets, LinkDecoder, LinkFrame, LinkFrameError, MAX_LINK_BATCH,
};

const PACKETS_HEADER: usize = 1 + 16 + 4;
const CONSENT_FRAME: usize = 1 + 16 + 16 + 8;

/// A decoded frame, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Frame {
    Packets(PeerId, Vec<u8>),
    Consent(PeerId, PeerId, u64),
}

impl Frame {
    fn wire_len(&self) -> usize {
        match self {
            Frame::Packets(_, frames) => PACKETS_HEADER + frames.len(),
            Frame::Consent(..) => CONSENT_FRAME,
        }
    }
}

/// What decoding a stream gave: the frames, the error it stopped at, the bytes left over.
#[derive(Debug, PartialEq, Eq)]
struct Decoded {
    frames: Vec<Frame>,
    error: Option<LinkFrameError>,
    left: usize,
}

fn peer(bytes: &[u8]) -> Option<PeerId> {
    let id: [u8; 16] = bytes.get(..16)?.try_into().ok()?;
    PeerId::from_bytes(id).ok()
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
        let Some(&tag) = bytes.first() else {
            return end(frames, None, 0);
        };
        match tag {
            1 => {
                if bytes.len() < PACKETS_HEADER {
                    return end(frames, None, bytes.len());
                }
                let Some(to) = peer(&bytes[1..]) else {
                    return end(frames, Some(LinkFrameError::PeerId), bytes.len());
                };
                let len = u32::from_be_bytes([bytes[17], bytes[18], bytes[19], bytes[20]]) as usize;
                if len > MAX_LINK_BATCH {
                    return end(frames, Some(LinkFrameError::TooLong(len)), bytes.len());
                }
                if bytes.len() < PACKETS_HEADER + len {
                    return end(frames, None, bytes.len());
                }
                frames.push(Frame::Packets(
                    to,
                    bytes[PACKETS_HEADER..PACKETS_HEADER + len].to_vec(),
                ));
                bytes = &bytes[PACKETS_HEADER + len..];
            }
            2 => {
                if bytes.len() < CONSENT_FRAME {
                    return end(frames, None, bytes.len());
                }
                let (Some(requester), Some(target)) = (peer(&bytes[1..]), peer(&bytes[17..]))
                else {
                    return end(frames, Some(LinkFrameError::PeerId), bytes.len());
                };
                let mut nonce = [0u8; 8];
                nonce.copy_from_slice(&bytes[33..41]);
                frames.push(Frame::Consent(requester, target, u64::from_be_bytes(nonce)));
                bytes = &bytes[CONSENT_FRAME..];
            }
            other => return end(frames, Some(LinkFrameError::Tag(other)), bytes.len()),
        }
    }
}

/// Pushes `bytes` in chunks, draining after each; the frames, the error, what is left.
fn decode(bytes: &[u8], cuts: &mut Cuts) -> Decoded {
    let mut decoder = LinkDecoder::default();
    let mut frames = Vec::new();
    let mut pushed = 0usize;
    let mut decoded = 0usize;
    let mut failed = None;
    for chunk in cuts.split(bytes) {
        decoder.push(chunk);
        pushed += chunk.len();
        assert_eq!(decoder.buffered(), pushed - decoded);
        if failed.is_some() {
            // A link whose stream went bad is closed by the node: nothing more is read.
            continue;
        }
        loop {
            match decoder.next_frame() {
                Ok(Some(LinkFrame::Packets { to, frames: batch })) => {
                    assert!(batch.len() <= MAX_LINK_BATCH);
                    frames.push(Frame::Packets(to, batch.to_vec()));
                }
                Ok(Some(LinkFrame::Consent {
                    requester,
                    target,
                    nonce,
                })) => frames.push(Frame::Consent(requester, target, nonce)),
                Ok(None) => break,
                Err(err) => {
                    failed = Some(err);
                    break;
                }
            }
            decoded += frames.last().map_or(0, Frame::wire_len);
            assert_eq!(decoder.buffered(), pushed - decoded);
        }
        if failed.is_none() {
            assert!(
                decoder.buffered() < PACKETS_HEADER + MAX_LINK_BATCH,
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
enum Input {
    Packets {
        to: [u8; 32],
        batch: Vec<u8>,
        /// Extra length (to reach and pass the cap without a huge input).
        pad: Option<u32>,
    },
    Consent {
        requester: [u8; 32],
        target: [u8; 32],
        nonce: u64,
    },
}

#[derive(Arbitrary, Debug)]
struct Inputs {
    frames: Vec<Input>,
    seed: u64,
    max_cut: u16,
}

fn round_trip(input: Inputs) {
    let mut stream = Vec::new();
    let mut expected = Vec::new();
    for frame in input.frames {
        match frame {
            Input::Packets { to, mut batch, pad } => {
                if let Some(pad) = pad {
                    let len = batch.len() + (pad as usize % (MAX_LINK_BATCH + 2));
                    batch.resize(len.min(MAX_LINK_BATCH + 1), 0xa5);
                }
                let to = PeerId::from_key_digest(&to);
                match encode_packets(&to, &batch) {
                    Some(bytes) => {
                        assert!(batch.len() <= MAX_LINK_BATCH);
                        assert_eq!(bytes.len(), PACKETS_HEADER + batch.len());
                        stream.extend_from_slice(&bytes);
                        expected.push(Frame::Packets(to, batch));
                    }
                    None => assert!(
                        batch.len() > MAX_LINK_BATCH,
                        "{} bytes refused",
                        batch.len()
                    ),
                }
            }
            Input::Consent {
                requester,
                target,
                nonce,
            } => {
                let requester = PeerId::from_key_digest(&requester);
                let target = PeerId::from_key_digest(&target);
                let bytes = encode_consent(&requester, &target, nonce);
                assert_eq!(bytes.len(), CONSENT_FRAME);
                stream.extend_from_slice(&bytes);
                expected.push(Frame::Consent(requester, target, nonce));
            }
        }
    }
    let mut cuts = Cuts::for_len(input.seed, usize::from(input.max_cut), stream.len());
    let decoded = decode(&stream, &mut cuts);
    assert_eq!(decoded.error, None);
    assert_eq!(decoded.left, 0);
    assert!(decoded.frames == expected, "the decoder changed the frames");
}

fuzz_target!(|data: &[u8]| {
    let seed = seed_of(data);
    let expected = reference(data);
    for max_cut in [7, 3000] {
        let decoded = decode(data, &mut Cuts::new(seed, max_cut));
        assert_eq!(
            decoded.error, expected.error,
            "the decoder stops differently"
        );
        assert!(
            decoded.frames == expected.frames,
            "the decoder disagrees with the reference"
        );
        assert_eq!(decoded.left, expected.left, "bytes left over differ");
    }
    if let Ok(input) = Inputs::arbitrary(&mut Unstructured::new(data)) {
        round_trip(input);
    }
});
