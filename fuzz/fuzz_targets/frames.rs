//! Length-prefixed frames (the control and peer protocols' framing): `common::frame` and the
//! async `common::frame_io::read_frame` / `write_frame` that the server runs on every stream.
//!
//! Properties:
//! - raw bytes, cut into arbitrary reads, give exactly the frames a plain reference parser
//!   finds, never a body over `MAX_FRAME_LEN`, and end the way the reference says (clean end,
//!   truncated with the right counts, or too large); both decoders agree;
//! - arbitrary bodies (up to and past the cap) are refused by `encode` exactly when over the cap,
//!   and the rest come back unchanged whatever the cuts;
//! - `read_frame` makes progress on every poll and resumes correctly after `Pending`;
//! - with `CHECK_READ_ALLOCATION`, `read_frame` allocates in proportion to the bytes it has
//!   received, not to the length a prefix announces (issue 11: off until frame_io stops
//!   allocating the announced length up front).

#![no_main]

use std::alloc::{GlobalAlloc, Layout, System};
use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};

use arbitrary::{Arbitrary, Unstructured};
use common::frame::{self, FrameDecoder, FrameError, MAX_FRAME_LEN, PREFIX_LEN};
use common::frame_io::{read_frame, write_frame, FrameIoError};
use libfuzzer_sys::fuzz_target;
use p2p_fuzz::Cuts;
use tokio::io::{AsyncRead, ReadBuf};

/// Whether to assert the allocation bound of `read_frame` (see the module docs). Turn on once
/// `common::frame_io::read_frame` grows its buffer with the bytes received.
const CHECK_READ_ALLOCATION: bool = false;

/// Counts the bytes the target holds in Rust allocations, and the peak since the last reset.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size >= layout.size() {
            let live = LIVE.fetch_add(new_size - layout.size(), Ordering::Relaxed)
                + (new_size - layout.size());
            PEAK.fetch_max(live, Ordering::Relaxed);
        } else {
            LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
        }
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// How a byte stream ends, according to the reference parser.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// Between frames.
    Clean,
    /// Inside a frame: bytes left over and bytes the frame needs (prefix included).
    Partial { have: usize, want: usize },
    /// A prefix announces more than the cap.
    TooLarge { len: usize },
}

/// The obvious parser, written from the format's description.
fn reference(mut bytes: &[u8]) -> (Vec<&[u8]>, End) {
    let mut frames = Vec::new();
    loop {
        if bytes.is_empty() {
            return (frames, End::Clean);
        }
        if bytes.len() < 4 {
            return (
                frames,
                End::Partial {
                    have: bytes.len(),
                    want: 4,
                },
            );
        }
        let len = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
        if len > MAX_FRAME_LEN {
            return (frames, End::TooLarge { len });
        }
        if bytes.len() < 4 + len {
            return (
                frames,
                End::Partial {
                    have: bytes.len(),
                    want: 4 + len,
                },
            );
        }
        frames.push(&bytes[4..4 + len]);
        bytes = &bytes[4 + len..];
    }
}

/// Feeds `bytes` to a [`FrameDecoder`] in chunks, taking frames out after each chunk.
fn decode_incrementally(bytes: &[u8], cuts: &mut Cuts) -> (Vec<Vec<u8>>, End) {
    let mut decoder = FrameDecoder::new();
    let mut frames = Vec::new();
    for chunk in cuts.split(bytes) {
        decoder.push(chunk);
        loop {
            match decoder.next_frame() {
                Ok(Some(body)) => {
                    assert!(body.len() <= MAX_FRAME_LEN, "a {}-byte body", body.len());
                    frames.push(body);
                }
                Ok(None) => break,
                Err(FrameError::TooLarge { len, max }) => {
                    assert_eq!(max, MAX_FRAME_LEN);
                    // A failed decoder stays failed, whatever arrives next.
                    decoder.push(&frame::encode(b"x").unwrap_or_default());
                    assert_eq!(decoder.next_frame(), Err(FrameError::TooLarge { len, max }));
                    return (frames, End::TooLarge { len });
                }
                Err(other) => panic!("next_frame failed with {other:?}"),
            }
        }
    }
    let end = match decoder.finish() {
        Ok(()) => End::Clean,
        Err(FrameError::Truncated { have, want }) => End::Partial { have, want },
        Err(other) => panic!("finish failed with {other:?}"),
    };
    (frames, end)
}

/// An in-memory stream that returns the bytes in the given cuts and sometimes `Pending` first
/// (waking at once, as a socket with more data would).
struct ChunkedReader<'a> {
    rest: &'a [u8],
    cuts: Cuts,
    delivered: usize,
    pending_next: bool,
}

impl AsyncRead for ChunkedReader<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let n = this.cuts.next_len();
        if this.pending_next {
            this.pending_next = false;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        this.pending_next = n.is_multiple_of(3);
        let n = n.min(buf.remaining()).min(this.rest.len());
        buf.put_slice(&this.rest[..n]);
        this.rest = &this.rest[n..];
        this.delivered += n;
        Poll::Ready(Ok(()))
    }
}

/// Polls `fut` to completion with a no-op waker (every `Pending` of the reader is followed by
/// a poll); panics if it keeps returning `Pending` (no progress).
fn block_on<F: Future>(fut: F, max_polls: usize) -> F::Output {
    let mut fut = pin!(fut);
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..max_polls {
        if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return out;
        }
    }
    panic!("no progress after {max_polls} polls");
}

/// Reads `bytes` with `read_frame` until the end or an error.
fn read_all(bytes: &[u8], seed: u64) -> (Vec<Vec<u8>>, End) {
    let mut reader = ChunkedReader {
        rest: bytes,
        cuts: Cuts::for_len(seed, 200, bytes.len()),
        delivered: 0,
        pending_next: false,
    };
    let mut frames = Vec::new();
    loop {
        let before = reader.delivered;
        let base = LIVE.load(Ordering::Relaxed);
        PEAK.store(base, Ordering::Relaxed);
        let result = block_on(read_frame(&mut reader), 4 * bytes.len() + 64);
        let grew = PEAK.load(Ordering::Relaxed) - base;
        let received = reader.delivered - before;
        if CHECK_READ_ALLOCATION {
            assert!(
                grew <= 2 * received + 32 * 1024,
                "read_frame allocated {grew} bytes after receiving {received}"
            );
        }
        match result {
            Ok(Some(body)) => {
                assert!(body.len() <= MAX_FRAME_LEN);
                assert_eq!(received, PREFIX_LEN + body.len(), "read past the frame");
                frames.push(body);
            }
            Ok(None) => return (frames, End::Clean),
            Err(FrameIoError::Frame(FrameError::Truncated { have, want })) => {
                return (frames, End::Partial { have, want })
            }
            Err(FrameIoError::Frame(FrameError::TooLarge { len, max })) => {
                assert_eq!(max, MAX_FRAME_LEN);
                return (frames, End::TooLarge { len });
            }
            Err(FrameIoError::Io(e)) => panic!("in-memory reader failed: {e}"),
        }
    }
}

fn seed_of(data: &[u8]) -> u64 {
    // FNV-1a: the cuts follow the input, so a crash reproduces from the input alone.
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// A body for the round-trip half: literal bytes, or one byte repeated (to reach the cap and
/// one past it without megabytes of input).
#[derive(Arbitrary, Debug)]
enum Body {
    Bytes(Vec<u8>),
    Repeat { byte: u8, len: u32 },
}

#[derive(Arbitrary, Debug)]
struct Bodies {
    bodies: Vec<Body>,
    seed: u64,
    max_cut: u16,
}

fn round_trip(input: Bodies) {
    let mut accepted = Vec::new();
    let mut wire = Vec::new();
    for body in input.bodies {
        let body = match body {
            Body::Bytes(bytes) => bytes,
            Body::Repeat { byte, len } => vec![byte; len as usize % (MAX_FRAME_LEN + 2)],
        };
        match frame::encode(&body) {
            Ok(bytes) => {
                assert!(body.len() <= MAX_FRAME_LEN);
                assert_eq!(bytes.len(), PREFIX_LEN + body.len());
                let prefix = [bytes[0], bytes[1], bytes[2], bytes[3]];
                assert_eq!(frame::decode_prefix(prefix), Ok(body.len()));
                assert_eq!(&bytes[PREFIX_LEN..], &body[..]);
                // write_frame writes the same bytes.
                let mut written = Vec::new();
                block_on(write_frame(&mut written, &body), 16)
                    .unwrap_or_else(|e| panic!("write_frame into a Vec failed: {e}"));
                assert_eq!(written, bytes);
                wire.extend_from_slice(&bytes);
                accepted.push(body);
            }
            Err(err) => {
                assert_eq!(
                    err,
                    FrameError::TooLarge {
                        len: body.len(),
                        max: MAX_FRAME_LEN
                    }
                );
                let mut written = Vec::new();
                assert!(block_on(write_frame(&mut written, &body), 16).is_err());
                assert!(written.is_empty(), "a refused frame was partly written");
            }
        }
        // Two frames at the cap and more: enough for every boundary, cheap enough to run fast.
        if wire.len() > 160 * 1024 {
            break;
        }
    }
    let mut cuts = Cuts::for_len(input.seed, usize::from(input.max_cut), wire.len());
    let (frames, end) = decode_incrementally(&wire, &mut cuts);
    assert_eq!(end, End::Clean);
    assert!(frames == accepted, "FrameDecoder changed the frames");
    let (frames, end) = read_all(&wire, input.seed);
    assert_eq!(end, End::Clean);
    assert!(frames == accepted, "read_frame changed the frames");
}

fuzz_target!(|data: &[u8]| {
    let seed = seed_of(data);
    let (expected, expected_end) = reference(data);
    let (frames, end) = decode_incrementally(data, &mut Cuts::new(seed, 300));
    assert_eq!(
        frames, expected,
        "FrameDecoder disagrees with the reference"
    );
    assert_eq!(
        end, expected_end,
        "FrameDecoder ends differently from the reference"
    );
    let (frames, end) = read_all(data, seed);
    assert_eq!(frames, expected, "read_frame disagrees with the reference");
    assert_eq!(
        end, expected_end,
        "read_frame ends differently from the reference"
    );

    if let Ok(input) = Bodies::arbitrary(&mut Unstructured::new(data)) {
        round_trip(input);
    }
});
