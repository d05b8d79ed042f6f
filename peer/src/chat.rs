//! Chat over a QUIC stream: lines typed go out as [`ChatMessage`] frames, frames received are
//! shown with sender and time.

use std::time::Duration;

use common::frame_io::{read_frame, write_frame, FrameIoError};
use common::message::PeerApp;
use common::{ChatMessage, PeerId, PeerMessage};
use tokio::sync::mpsc;

use crate::console::Console;

/// How a chat ended.
#[derive(Debug, PartialEq, Eq)]
pub enum ChatEnd {
    /// Our input ended; everything we sent was acknowledged.
    InputClosed,
    /// The other side closed its half.
    PeerClosed,
    /// The connection failed.
    Failed(String),
}

/// Opens the chat stream on a connection we dialed.
pub async fn open(
    conn: &quinn::Connection,
) -> Result<(quinn::SendStream, quinn::RecvStream), String> {
    let (mut tx, rx) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let open = PeerMessage::Open { app: PeerApp::Chat };
    write_frame(&mut tx, &open.encode())
        .await
        .map_err(|e| e.to_string())?;
    Ok((tx, rx))
}

/// Reads the first frame of a stream the other side opened: which application it wants.
pub async fn accept(
    tx: &mut quinn::SendStream,
    rx: &mut quinn::RecvStream,
) -> Result<PeerApp, String> {
    let first = tokio::time::timeout(Duration::from_secs(10), read_frame(rx))
        .await
        .map_err(|_| "no stream header within 10 s".to_owned())?
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "stream closed before its header".to_owned())?;
    match PeerMessage::decode(&first) {
        Ok(PeerMessage::Open { app }) => Ok(app),
        Ok(other) => Err(format!("unexpected stream header {other:?}")),
        Err(e) => {
            let reply = PeerMessage::Error {
                message: e.to_string(),
            };
            let _ = write_frame(tx, &reply.encode()).await;
            let _ = tx.finish();
            Err(e.to_string())
        }
    }
}

/// Runs the chat until our input ends or the stream does.
pub async fn run(
    mut tx: quinn::SendStream,
    rx: quinn::RecvStream,
    me: PeerId,
    peer: PeerId,
    mut lines: mpsc::Receiver<String>,
    console: Console,
) -> ChatEnd {
    // Reading a frame is not cancel-safe, so the reader runs as its own task.
    let (frames_tx, mut frames) = mpsc::channel(64);
    let reader = tokio::spawn(read_all(rx, frames_tx));
    let end = loop {
        tokio::select! {
            line = lines.recv() => match line {
                Some(line) => {
                    let msg = match ChatMessage::new(me, peer, line) {
                        Ok(msg) => msg,
                        Err(e) => {
                            console.error(format!("not sent: {e}")).await;
                            continue;
                        }
                    };
                    if let Err(e) = write_frame(&mut tx, &msg.encode()).await {
                        break ChatEnd::Failed(e.to_string());
                    }
                }
                None => {
                    let _ = tx.finish();
                    // Wait until the peer has everything we wrote, then we are done.
                    let _ = tokio::time::timeout(Duration::from_secs(5), tx.stopped()).await;
                    break ChatEnd::InputClosed;
                }
            },
            frame = frames.recv() => match frame {
                Some(Ok(body)) => match ChatMessage::decode_from(&body, peer, me) {
                    Ok(msg) => console.message(&msg).await,
                    Err(e) => console.error(format!("dropped a message from {peer}: {e}")).await,
                },
                Some(Err(e)) => break ChatEnd::Failed(e),
                None => break ChatEnd::PeerClosed,
            },
        }
    };
    reader.abort();
    end
}

async fn read_all(mut rx: quinn::RecvStream, frames: mpsc::Sender<Result<Vec<u8>, String>>) {
    loop {
        let item = match read_frame(&mut rx).await {
            Ok(Some(body)) => Ok(body),
            Ok(None) => return,
            Err(FrameIoError::Frame(e)) => Err(format!("bad frame from peer: {e}")),
            Err(e) => Err(e.to_string()),
        };
        let stop = item.is_err();
        if frames.send(item).await.is_err() || stop {
            return;
        }
    }
}
