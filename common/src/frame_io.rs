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

/// Reads one frame. `Ok(None)` at a clean end of stream (between frames).
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
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
    let mut body = vec![0u8; len];
    let mut have = 0;
    while have < len {
        let n = reader.read(&mut body[have..]).await?;
        if n == 0 {
            return Err(FrameError::Truncated {
                have: PREFIX_LEN + have,
                want: PREFIX_LEN + len,
            }
            .into());
        }
        have += n;
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
}
