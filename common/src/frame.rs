//! Length-prefixed frames: a 4-byte big-endian length, then that many bytes of JSON.
//!
//! [`FrameDecoder`] is incremental (feed it whatever bytes arrived, take out whole frames) and
//! refuses a length above [`MAX_FRAME_LEN`] as soon as the prefix is seen, before buffering the
//! body, so a hostile length cannot make anyone allocate.

/// Largest frame body accepted, in bytes.
pub const MAX_FRAME_LEN: usize = 64 * 1024;

/// Bytes in the length prefix.
pub const PREFIX_LEN: usize = 4;

/// A frame that cannot be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The prefix announces more than the cap.
    #[error("frame of {len} bytes is larger than the {max}-byte limit")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame ({have} of {want} bytes)")]
    Truncated {
        /// Bytes received.
        have: usize,
        /// Bytes the frame needs.
        want: usize,
    },
}

/// Encodes one frame: prefix and body. Fails if the body is over [`MAX_FRAME_LEN`].
pub fn encode(body: &[u8]) -> Result<Vec<u8>, FrameError> {
    if body.len() > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge {
            len: body.len(),
            max: MAX_FRAME_LEN,
        });
    }
    let mut out = Vec::with_capacity(PREFIX_LEN + body.len());
    // The cap keeps the length well inside u32.
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    Ok(out)
}

/// Reads the length prefix and checks it against the cap.
pub fn decode_prefix(prefix: [u8; PREFIX_LEN]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    Ok(len)
}

/// Incremental decoder: push bytes in any chunking, pull complete frames out. Holds no buffer
/// between frames (a decoder per idle connection costs nothing but itself).
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    failed: Option<FrameError>,
    max: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder::with_max(MAX_FRAME_LEN)
    }
}

impl FrameDecoder {
    /// A decoder with an empty buffer, for frames of up to [`MAX_FRAME_LEN`].
    pub fn new() -> Self {
        Self::default()
    }

    /// A decoder that refuses frames longer than `max` (at most [`MAX_FRAME_LEN`]) as soon as
    /// their prefix is in.
    pub fn with_max(max: usize) -> Self {
        FrameDecoder {
            buf: Vec::new(),
            failed: None,
            max: max.min(MAX_FRAME_LEN),
        }
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.failed.is_none() {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// Takes the next complete frame, `Ok(None)` if more bytes are needed. After an error the
    /// decoder stays failed: a stream with a bad length cannot be resynchronised.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        if let Some(err) = &self.failed {
            return Err(err.clone());
        }
        if self.buf.len() < PREFIX_LEN {
            return Ok(None);
        }
        let mut prefix = [0u8; PREFIX_LEN];
        prefix.copy_from_slice(&self.buf[..PREFIX_LEN]);
        let len = match decode_prefix(prefix) {
            Ok(len) if len > self.max => Err(FrameError::TooLarge { len, max: self.max }),
            other => other,
        };
        let len = match len {
            Ok(len) => len,
            Err(err) => {
                self.buf = Vec::new();
                self.failed = Some(err.clone());
                return Err(err);
            }
        };
        if self.buf.len() < PREFIX_LEN + len {
            return Ok(None);
        }
        let body = self.buf[PREFIX_LEN..PREFIX_LEN + len].to_vec();
        self.buf.drain(..PREFIX_LEN + len);
        if self.buf.is_empty() {
            self.buf = Vec::new();
        }
        Ok(Some(body))
    }

    /// Call at end of stream: an error if a partial frame is left over.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let want = if self.buf.len() >= PREFIX_LEN {
            let mut prefix = [0u8; PREFIX_LEN];
            prefix.copy_from_slice(&self.buf[..PREFIX_LEN]);
            PREFIX_LEN + u32::from_be_bytes(prefix) as usize
        } else {
            PREFIX_LEN
        };
        Err(FrameError::Truncated {
            have: self.buf.len(),
            want,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_in_one_chunk() {
        let mut dec = FrameDecoder::new();
        dec.push(&encode(b"hello").unwrap());
        dec.push(&encode(b"").unwrap());
        assert_eq!(dec.next_frame().unwrap(), Some(b"hello".to_vec()));
        assert_eq!(dec.next_frame().unwrap(), Some(Vec::new()));
        assert_eq!(dec.next_frame().unwrap(), None);
        dec.finish().unwrap();
    }

    #[test]
    fn oversized_prefix_is_refused_before_the_body_arrives() {
        let mut dec = FrameDecoder::new();
        dec.push(&u32::MAX.to_be_bytes());
        let err = dec.next_frame().unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }));
        // It stays failed.
        dec.push(&encode(b"x").unwrap());
        assert!(dec.next_frame().is_err());
        assert!(encode(&vec![0; MAX_FRAME_LEN + 1]).is_err());
        assert!(encode(&vec![0; MAX_FRAME_LEN]).is_ok());
    }

    #[test]
    fn a_smaller_cap_refuses_at_the_prefix_and_no_buffer_is_kept_between_frames() {
        let mut dec = FrameDecoder::with_max(8);
        dec.push(&encode(b"12345678").unwrap());
        assert_eq!(dec.next_frame().unwrap(), Some(b"12345678".to_vec()));
        assert!(dec.buf.is_empty());
        assert_eq!(dec.buf.capacity(), 0, "an idle decoder holds no buffer");
        // Nine announced: refused on the prefix alone, with the decoder's own cap.
        dec.push(&9u32.to_be_bytes());
        assert_eq!(
            dec.next_frame().unwrap_err(),
            FrameError::TooLarge { len: 9, max: 8 }
        );
        assert_eq!(
            FrameDecoder::with_max(usize::MAX).max,
            MAX_FRAME_LEN,
            "never above the protocol's cap"
        );
    }

    #[test]
    fn truncated_stream_is_reported() {
        let mut dec = FrameDecoder::new();
        let frame = encode(b"hello").unwrap();
        dec.push(&frame[..6]);
        assert_eq!(dec.next_frame().unwrap(), None);
        assert_eq!(
            dec.finish(),
            Err(FrameError::Truncated { have: 6, want: 9 })
        );
    }

    proptest! {
        #[test]
        fn any_chunking_gives_the_same_frames(
            bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..8),
            cut in 1usize..50,
        ) {
            let wire: Vec<u8> = bodies.iter().flat_map(|b| encode(b).unwrap()).collect();
            let mut dec = FrameDecoder::new();
            let mut out = Vec::new();
            for chunk in wire.chunks(cut) {
                dec.push(chunk);
                while let Some(frame) = dec.next_frame().unwrap() {
                    out.push(frame);
                }
            }
            prop_assert_eq!(out, bodies);
            prop_assert!(dec.finish().is_ok());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let mut dec = FrameDecoder::new();
            dec.push(&bytes);
            for _ in 0..bytes.len() + 1 {
                match dec.next_frame() {
                    Ok(Some(_)) => continue,
                    _ => break,
                }
            }
            let _ = dec.finish();
        }
    }
}
