//! Async frame reading and writing over any tokio stream (a QUIC stream, in practice).

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::frame::{self, FrameError, PREFIX_LEN};

/// Failure to read or write a frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameIoError {
    /// Over the size cap, or cut short.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The transport failed.
    #[error("stream error: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads one frame of at most [`frame::MAX_FRAME_LEN`] bytes. `Ok(None)` at a clean end of
/// stream (between frames).
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
) -> Result<Option<Vec<u8>>, FrameIoError> {
    read_frame_max(reader, frame::MAX_FRAME_LEN).await
}

/// Reads one frame of at most `max` bytes (never more than [`frame::MAX_FRAME_LEN`]): a longer
/// announced length is [`FrameError::TooLarge`] before any of the body is read. `Ok(None)` at a
/// clean end of stream (between frames).
///
/// The body buffer grows as bytes arrive instead of being allocated at the announced length: a
/// peer that announces a large frame and sends nothing more costs 64 bytes (the buffer then
/// doubles as the body arrives, never past twice its length). The bytes are read
/// straight into it: a read buffer held in the future would be carried, at its full size, by
/// every task that waits here (the rendezvous's control-stream reader of every idle peer: 4 KiB
/// each, docs/benchmarks.md "Idle peer memory").
pub async fn read_frame_max<R: AsyncRead + Unpin>(
    reader: &mut R,
    max: usize,
) -> Result<Option<Vec<u8>>, FrameIoError> {
    let mut prefix = [0u8; PREFIX_LEN];
    let mut have = 0;
    while have < PREFIX_LEN {
        let n = reader.read(&mut prefix[have..]).await?;
        if n == 0 {
            if have == 0 {
                return Ok(None);
            }
            return Err(FrameError::Truncated {
                have,
                want: PREFIX_LEN,
            }
            .into());
        }
        have += n;
    }
    let len = frame::decode_prefix(prefix)?;
    let max = max.min(frame::MAX_FRAME_LEN);
    if len > max {
        return Err(FrameError::TooLarge { len, max }.into());
    }
    let mut body = Vec::new();
    // `take`: never a byte of the next frame.
    let mut rest = (&mut *reader).take(len as u64);
    while body.len() < len {
        let n = rest.read_buf(&mut body).await?;
        if n == 0 {
            return Err(FrameError::Truncated {
                have: PREFIX_LEN + body.len(),
                want: PREFIX_LEN + len,
            }
            .into());
        }
    }
    Ok(Some(body))
}

/// Writes one frame (prefix and body in a single write).
pub async fn write_frame<W: AsyncWrite + Unpin>(
    writer: &mut W,
    body: &[u8],
) -> Result<(), FrameIoError> {
    let bytes = frame::encode(body)?;
    writer.write_all(&bytes).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trip_over_a_pipe() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            write_frame(&mut a, b"one").await.unwrap();
            write_frame(&mut a, &vec![7u8; 1000]).await.unwrap();
        });
        assert_eq!(read_frame(&mut b).await.unwrap(), Some(b"one".to_vec()));
        assert_eq!(read_frame(&mut b).await.unwrap(), Some(vec![7u8; 1000]));
        writer.await.unwrap();
        assert_eq!(read_frame(&mut b).await.unwrap(), None);
    }

    #[tokio::test]
    async fn oversized_and_truncated_frames_are_errors() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        assert!(matches!(
            read_frame(&mut b).await,
            Err(FrameIoError::Frame(FrameError::TooLarge { .. }))
        ));
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[0, 0, 0, 10, 1, 2]).await.unwrap();
        drop(a);
        assert!(matches!(
            read_frame(&mut b).await,
            Err(FrameIoError::Frame(FrameError::Truncated { .. }))
        ));
    }

    #[tokio::test]
    async fn a_smaller_cap_refuses_longer_frames_and_the_body_grows_as_it_arrives() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[0, 0, 0x10, 0]).await.unwrap();
        assert!(matches!(
            read_frame_max(&mut b, 1024).await,
            Err(FrameIoError::Frame(FrameError::TooLarge {
                len: 4096,
                max: 1024
            }))
        ));
        // A frame announced at the cap but never sent: the reader waits with nothing allocated
        // beyond what arrived (checked through the result once the bytes come).
        let (mut a, mut b) = tokio::io::duplex(64);
        let reader = tokio::spawn(async move { read_frame_max(&mut b, 10_000).await });
        a.write_all(&9000u32.to_be_bytes()).await.unwrap();
        for _ in 0..9 {
            a.write_all(&[5u8; 1000]).await.unwrap();
        }
        let body = reader.await.unwrap().unwrap().unwrap();
        assert_eq!(body, vec![5u8; 9000]);
    }

    /// A task waiting here for a frame carries no read buffer: the rendezvous has one such task
    /// per idle registered peer, so every byte of this future is paid 100,000 times.
    #[test]
    fn a_waiting_read_holds_no_read_buffer() {
        let (_a, mut b) = tokio::io::duplex(64);
        let waiting = read_frame_max(&mut b, frame::MAX_FRAME_LEN);
        let size = std::mem::size_of_val(&waiting);
        // The exact size depends on the compiler and profile; what matters is that no 4 KiB
        // read buffer lives in it any more.
        assert!(size <= 1024, "read_frame_max's future is {size} bytes");
    }

    /// Two frames back to back in one write: the first read takes its body and nothing of the
    /// second, which the next read returns whole.
    #[tokio::test]
    async fn a_body_read_stops_at_its_frame() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let mut both = frame::encode(&[1u8; 300]).unwrap();
        both.extend(frame::encode(&[2u8; 5]).unwrap());
        a.write_all(&both).await.unwrap();
        assert_eq!(read_frame(&mut b).await.unwrap(), Some(vec![1u8; 300]));
        assert_eq!(read_frame(&mut b).await.unwrap(), Some(vec![2u8; 5]));
    }
}
