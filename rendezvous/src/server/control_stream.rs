//! The control stream of one registered peer, read and written by its connection's task alone.
//!
//! Why a module of its own: every registered peer holds one of these for as long as it is
//! connected, so what it costs is the server's memory per idle peer. It used to be a reader
//! task, a writer task and two channels between them and the control loop (about 2.8 KiB per
//! idle peer, docs/benchmarks.md); now the control loop owns both halves of the stream and
//! polls them in its own `select!`. That needs reads and writes that lose nothing when a
//! `select!` drops them: quinn's `read_chunk` and `write` take bytes only when they complete,
//! and the frame being read or written lives here, not in a future.
//!
//! Bounds: a frame read is at most [`MAX_REQUEST_FRAME`](super::MAX_REQUEST_FRAME) (a longer
//! prefix is refused before its body is buffered), and the stream is read only while no whole
//! frame waits to be answered, so at most one frame and one read chunk are buffered; at most
//! [`REPLY_QUEUE`](super::REPLY_QUEUE) replies wait; every frame written must be taken by the
//! peer's flow control within [`WRITE_TIMEOUT`](super::WRITE_TIMEOUT).

use std::collections::VecDeque;
use std::sync::Mutex;

use common::frame_io::FrameIoError;
use common::{ControlMessage, FrameDecoder};
use quinn::{RecvStream, SendStream};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{lock, MAX_REQUEST_FRAME, PUSH_QUEUE, REPLY_QUEUE, WRITE_TIMEOUT};

/// Most bytes taken from the receive stream at once.
const READ_CHUNK: usize = 4096;

/// Why a write did not go out.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum WriteFailure {
    /// The peer's flow control took nothing for [`WRITE_TIMEOUT`]: it does not read.
    TimedOut,
    /// The stream is gone (reset, stopped, the connection lost).
    Stream,
}

/// A frame on its way out.
struct Writing {
    frame: Vec<u8>,
    written: usize,
    deadline: Instant,
}

/// Both halves of a control stream, apart so that one `select!` can read and write at once.
pub(super) struct ControlStream {
    /// The receive half and the frame being read.
    pub(super) reader: ControlReader,
    /// The send half and the frames waiting to go.
    pub(super) writer: ControlWriter,
}

impl ControlStream {
    pub(super) fn new(tx: SendStream, rx: RecvStream) -> ControlStream {
        ControlStream {
            reader: ControlReader {
                rx,
                decoder: FrameDecoder::with_max(MAX_REQUEST_FRAME),
                ended: false,
            },
            writer: ControlWriter {
                tx,
                replies: VecDeque::new(),
                writing: None,
            },
        }
    }
}

/// The receive half of a control stream and the frame being read.
pub(super) struct ControlReader {
    rx: RecvStream,
    decoder: FrameDecoder,
    /// The peer finished its half.
    ended: bool,
}

impl ControlReader {
    /// The next whole frame read, `Ok(None)` if none is complete (or the peer finished the
    /// stream between frames: see [`ControlReader::ended`]). A bad length, or the end of the
    /// stream inside a frame, is an error, for good.
    pub(super) fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FrameIoError> {
        if let Some(frame) = self.decoder.next_frame()? {
            return Ok(Some(frame));
        }
        if self.ended {
            self.decoder.finish()?;
        }
        Ok(None)
    }

    /// The peer finished its half of the stream.
    pub(super) fn ended(&self) -> bool {
        self.ended
    }

    /// The next whole frame, reading as needed; `Ok(None)` when the peer finished the stream
    /// between frames. Cancel-safe: what was read before it is dropped stays for the next call.
    pub(super) async fn read_frame(&mut self) -> Result<Option<Vec<u8>>, FrameIoError> {
        loop {
            if let Some(frame) = self.next_frame()? {
                return Ok(Some(frame));
            }
            if self.ended {
                return Ok(None);
            }
            self.read_more().await?;
        }
    }

    /// Reads what arrived into the frame being read: `Ok(false)` once the peer finished the
    /// stream. Cancel-safe: dropped before it completes, it has taken nothing.
    pub(super) async fn read_more(&mut self) -> Result<bool, FrameIoError> {
        match self.rx.read_chunk(READ_CHUNK, true).await {
            Ok(Some(chunk)) => {
                self.decoder.push(&chunk.bytes);
                Ok(true)
            }
            Ok(None) => {
                self.ended = true;
                Ok(false)
            }
            Err(e) => Err(FrameIoError::Io(e.into())),
        }
    }
}

/// The send half of a control stream: the frame being written and the replies behind it.
pub(super) struct ControlWriter {
    tx: SendStream,
    /// Replies (encoded frames) waiting behind [`ControlWriter::writing`]; at most
    /// [`REPLY_QUEUE`].
    replies: VecDeque<Vec<u8>>,
    writing: Option<Box<Writing>>,
}

impl ControlWriter {
    /// Whether another reply fits (the control loop answers frames only while one does).
    pub(super) fn has_room(&self) -> bool {
        self.replies.len() < REPLY_QUEUE
    }

    /// Queues a reply behind the others; `Err` when [`REPLY_QUEUE`] are waiting already.
    pub(super) fn queue_reply(&mut self, msg: &ControlMessage) -> Result<(), ()> {
        if !self.has_room() {
            return Err(());
        }
        self.push(msg);
        Ok(())
    }

    /// Nothing is being written or waiting: a push may go now (replies go first).
    pub(super) fn idle(&self) -> bool {
        self.writing.is_none()
    }

    /// Writes `msg` (a push) after what is being written.
    pub(super) fn push(&mut self, msg: &ControlMessage) {
        let frame = encode(msg);
        if self.writing.is_none() {
            self.start(frame);
        } else {
            self.replies.push_back(frame);
        }
    }

    fn start(&mut self, frame: Vec<u8>) {
        self.writing = Some(Box::new(Writing {
            frame,
            written: 0,
            deadline: Instant::now() + WRITE_TIMEOUT,
        }));
    }

    /// Writes what the peer's flow control takes of the frame being written, then moves on to
    /// the next reply. Pending forever when nothing is being written. Cancel-safe: dropped
    /// before it completes, it has written nothing.
    pub(super) async fn write_some(&mut self) -> Result<(), WriteFailure> {
        let Some(writing) = self.writing.as_mut() else {
            return std::future::pending().await;
        };
        let rest = &writing.frame[writing.written..];
        // The write first: a deadline that passed while the control loop was busy elsewhere (a
        // slow registry or cluster call) is no sign of a peer that does not read, as long as
        // its flow control takes the bytes now.
        let wrote = tokio::select! {
            biased;
            wrote = self.tx.write(rest) => wrote,
            () = tokio::time::sleep_until(writing.deadline) => return Err(WriteFailure::TimedOut),
        };
        match wrote {
            Err(_) => Err(WriteFailure::Stream),
            Ok(n) => {
                writing.written += n;
                if writing.written == writing.frame.len() {
                    self.writing = None;
                    if let Some(next) = self.replies.pop_front() {
                        self.start(next);
                    }
                    if self.replies.is_empty() {
                        // An idle peer's queue holds no buffer.
                        self.replies = VecDeque::new();
                    }
                }
                Ok(())
            }
        }
    }

    /// Writes everything queued, each frame within [`WRITE_TIMEOUT`], then finishes the stream
    /// and waits (briefly) until the peer has it all: closing the connection right after
    /// would discard an error reply still in flight.
    pub(super) async fn drain(&mut self) -> Result<(), WriteFailure> {
        while self.writing.is_some() {
            self.write_some().await?;
        }
        let _ = self.tx.finish();
        let _ =
            tokio::time::timeout(std::time::Duration::from_millis(500), self.tx.stopped()).await;
        Ok(())
    }
}

/// Pushes (introductions) for one control stream, queued by other connections' tasks: at most
/// [`PUSH_QUEUE`], more are refused. (A tokio channel would hold about 0.8 KiB per idle peer
/// from the start: its cache-padded state and a first block of 32 slots; this holds a lock, an
/// empty queue and a wake-up.)
#[derive(Default)]
pub(super) struct Pushes {
    queue: Mutex<VecDeque<ControlMessage>>,
    ready: Notify,
}

impl Pushes {
    /// Queues `msg`; false (and dropped) when [`PUSH_QUEUE`] are waiting.
    pub(super) fn try_push(&self, msg: ControlMessage) -> bool {
        {
            let mut queue = lock(&self.queue);
            if queue.len() >= PUSH_QUEUE {
                return false;
            }
            queue.push_back(msg);
        }
        self.ready.notify_one();
        true
    }

    /// The oldest push, if any.
    pub(super) fn pop(&self) -> Option<ControlMessage> {
        let mut queue = lock(&self.queue);
        let msg = queue.pop_front();
        if queue.is_empty() && queue.capacity() > 0 {
            // An idle peer's queue holds no buffer.
            *queue = VecDeque::new();
        }
        msg
    }

    /// Waits for the next push. Cancel-safe: a wake-up it was given and did not use passes on
    /// (tokio's `Notify`), and nothing is taken from the queue until it completes.
    pub(super) async fn next(&self) -> ControlMessage {
        loop {
            if let Some(msg) = self.pop() {
                return msg;
            }
            self.ready.notified().await;
        }
    }
}

/// A message as a frame: the length prefix, then its JSON. Control messages are far below the
/// frame cap; one that were not would go out as an `internal` error instead.
fn encode(msg: &ControlMessage) -> Vec<u8> {
    common::frame::encode(&msg.encode()).unwrap_or_else(|_| {
        let error = ControlMessage::error(common::ErrorCode::Internal, "reply too large");
        common::frame::encode(&error.encode()).unwrap_or_default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(n: u64) -> ControlMessage {
        ControlMessage::Ping { seq: n }
    }

    #[tokio::test]
    async fn pushes_are_bounded_kept_in_order_and_a_dropped_wait_loses_nothing() {
        let pushes = Pushes::default();
        for n in 0..PUSH_QUEUE as u64 {
            assert!(pushes.try_push(push(n)));
        }
        assert!(!pushes.try_push(push(99)), "one past the bound is refused");
        for n in 0..PUSH_QUEUE as u64 {
            assert_eq!(pushes.next().await, push(n));
        }
        assert_eq!(
            lock(&pushes.queue).capacity(),
            0,
            "an emptied queue holds no buffer"
        );
        // A wait dropped before anything came (a `select!` taking another branch), then a
        // push: the next wait gets it at once.
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(10), pushes.next())
                .await
                .is_err()
        );
        assert!(pushes.try_push(push(7)));
        let got = tokio::time::timeout(std::time::Duration::from_secs(10), pushes.next()).await;
        assert_eq!(got.ok(), Some(push(7)));
    }
}
