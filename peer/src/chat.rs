//! Chat over a QUIC stream: lines typed go out as [`ChatFrame::Message`] frames, messages
//! received are shown with sender and time, and the chat ends with the `end`/`end_ack` exchange
//! of [`common::chat`], so that neither side reports success before the other has read it all.
//!
//! Why it is a module of its own: both `peer listen` and `peer connect` speak it, and its ending
//! protocol is what lets `peer connect` exit 0 only when nothing was lost.

use std::time::{Duration, Instant};

use common::chat::{ChatEnding, EndedBy};
use common::frame_io::{read_frame, write_frame, FrameIoError};
use common::message::PeerApp;
use common::{ChatFrame, ChatMessage, PeerId, PeerMessage};
use tokio::sync::mpsc;

use crate::console::Console;

/// How a chat ended.
#[derive(Debug, PartialEq, Eq)]
pub enum ChatEnd {
    /// Our input ended first; the peer acknowledged reading everything we sent, and we read
    /// everything it sent.
    InputClosed,
    /// The peer ended the chat first; the same acknowledgements were exchanged. `unsent` lines
    /// of our input were already queued and not sent (the chat was over).
    PeerClosed {
        /// Queued input lines that were not sent.
        unsent: usize,
    },
    /// The connection failed, the peer broke the protocol, or it did not acknowledge our end in
    /// time: what we sent may not have been read.
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

/// How long a side that is done waits for the peer's finish before it moves on (the peer
/// finishes as soon as it has our `end_ack`; this only bounds a peer that never does).
const LINGER: Duration = Duration::from_secs(2);

/// While a chat is ending, how often its connection is made to send a packet the peer
/// acknowledges ([`crate::paths::nudge`]).
///
/// Why: the ending is the tail of the conversation, a few small frames each way with nothing
/// behind them. When one is lost, only quinn's loss timer sends it again, and on a lossy path
/// that timer backs off exponentially (a 10 % loss path with a jittery RTT waited 1, 2, then 4 s
/// and more): a lost `end` and a lost retransmission could outlast the ending's 10 s. An
/// acknowledged nudge makes quinn declare the older packet lost and send it again at once, so a
/// lost frame of the ending waits about this long plus a round trip instead.
pub const END_NUDGE_EVERY: Duration = Duration::from_millis(500);

/// Runs the chat on `conn`'s streams `tx` and `rx` until it ends (see [`common::chat`] for how
/// an ending is made lossless): our input ending, or the peer's `end`, starts the ending; it
/// completes once both sides acknowledged each other's `end`, or fails after `end_timeout`.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    conn: &quinn::Connection,
    mut tx: quinn::SendStream,
    rx: quinn::RecvStream,
    me: PeerId,
    peer: PeerId,
    mut lines: mpsc::Receiver<String>,
    console: Console,
    end_timeout: Duration,
) -> ChatEnd {
    // Reading a frame is not cancel-safe, so the reader runs alongside the chat (in this task,
    // so that it ends with it).
    let (frames_tx, mut frames) = mpsc::channel(64);
    let reader = read_all(rx, frames_tx);
    let mut ending = ChatEnding::new(end_timeout);
    let mut nudging = tokio::time::interval(END_NUDGE_EVERY);
    nudging.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let chatting = async {
        let result: Result<(), String> = loop {
            if ending.is_done() {
                break Ok(());
            }
            let deadline = ending.deadline();
            let expired = async move {
                match deadline {
                    Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                line = lines.recv(), if ending.may_send() => {
                    let frame = match line {
                        Some(line) => match ChatMessage::new(me, peer, line) {
                            Ok(msg) => ChatFrame::Message(msg),
                            Err(e) => {
                                console.error(format!("not sent: {e}")).await;
                                continue;
                            }
                        },
                        None => match ending.input_ended(Instant::now()) {
                            Some(end) => end,
                            None => continue,
                        },
                    };
                    if let Err(e) = write_frame(&mut tx, &frame.encode()).await {
                        break Err(e.to_string());
                    }
                }
                frame = frames.recv() => match frame {
                    Some(Ok(body)) => match ChatFrame::decode(&body) {
                        Ok(ChatFrame::Message(msg)) => {
                            if let Err(e) = ending.on_message() {
                                break Err(e.to_string());
                            }
                            match msg.check(peer, me) {
                                Ok(()) => console.message(&msg).await,
                                Err(e) => console.error(format!("dropped a message from {peer}: {e}")).await,
                            }
                        }
                        Ok(ChatFrame::EndAck {}) => {
                            if let Err(e) = ending.on_ack() {
                                break Err(e.to_string());
                            }
                        }
                        Ok(ChatFrame::End {}) => {
                            let replies = match ending.on_end(Instant::now()) {
                                Ok(replies) => replies,
                                Err(e) => break Err(e.to_string()),
                            };
                            // The acknowledgement says every line was shown: make it true first.
                            console.flush().await;
                            let mut failed = None;
                            for reply in replies {
                                if let Err(e) = write_frame(&mut tx, &reply.encode()).await {
                                    failed = Some(e.to_string());
                                    break;
                                }
                            }
                            if let Some(e) = failed {
                                break Err(e);
                            }
                        }
                        Err(e) => console.error(format!("dropped a frame from {peer}: {e}")).await,
                    },
                    Some(Err(e)) => break Err(e),
                    None => {
                        if let Err(e) = ending.on_peer_finished() {
                            break Err(e.to_string());
                        }
                    }
                },
                _ = expired => {
                    if let Err(e) = ending.poll_timeout(Instant::now()) {
                        break Err(e.to_string());
                    }
                }
                _ = nudging.tick(), if deadline.is_some() => crate::paths::nudge(conn),
            }
        };
        let end = match result {
            Ok(()) => {
                // Done: everything both ways was read. Finish our side; the peer finishes its side
                // once it has our last `end_ack`, and the dialing side closes the connection only
                // after that, so the peer never loses it.
                let _ = tx.finish();
                let linger = async { while let Some(Ok(_)) = frames.recv().await {} };
                let _ = tokio::time::timeout(LINGER, linger).await;
                match ending.ended_by() {
                    Some(EndedBy::Peer) => {
                        let mut unsent = 0;
                        while lines.try_recv().is_ok() {
                            unsent += 1;
                        }
                        ChatEnd::PeerClosed { unsent }
                    }
                    _ => ChatEnd::InputClosed,
                }
            }
            Err(e) => {
                let _ = tx.reset(0u32.into());
                ChatEnd::Failed(e)
            }
        };
        end
    };
    crate::tasks::alongside(chatting, reader).await.0
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

/// Why `peer connect`'s chat did not end cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ConverseError {
    /// The peer closed the connection: its allow-list does not name us.
    #[error(transparent)]
    Refused(#[from] crate::access::Refused),
    /// The chat stream could not be opened.
    #[error("cannot open the chat stream: {0}")]
    Open(String),
    /// The peer ended the chat before all our input was sent.
    #[error("{peer} ended the chat before {unsent} line(s) of input could be sent")]
    Unsent {
        /// The peer.
        peer: PeerId,
        /// Input lines not sent.
        unsent: usize,
    },
    /// The chat failed (see [`ChatEnd::Failed`]).
    #[error("chat with {peer} failed: {reason}")]
    Failed {
        /// The peer.
        peer: PeerId,
        /// Why.
        reason: String,
    },
}

/// `peer connect`: chats with the peer of `conn` (which `endpoint` made), `lines` going out,
/// until our input ends or the peer ends the chat; closes the connection.
pub async fn converse(
    endpoint: &crate::endpoint::Endpoint,
    conn: &crate::endpoint::Connection,
    lines: mpsc::Receiver<String>,
) -> Result<(), ConverseError> {
    let peer = conn.peer();
    let console = endpoint.console().clone();
    let (tx, rx) = open(conn)
        .await
        .map_err(|e| match crate::access::refusal(peer, conn) {
            Some(refused) => ConverseError::Refused(refused),
            None => ConverseError::Open(e),
        })?;
    let end = run(
        conn.quinn(),
        tx,
        rx,
        endpoint.id(),
        peer,
        lines,
        console.clone(),
        common::chat::END_TIMEOUT,
    )
    .await;
    // Read before our own close replaces the reason the connection ended with.
    if let Some(refused) = crate::access::refusal(peer, conn) {
        return Err(refused.into());
    }
    conn.close(0u32.into(), b"chat over");
    match end {
        ChatEnd::InputClosed => Ok(()),
        ChatEnd::PeerClosed { unsent: 0 } => {
            console.say(format!("{peer} ended the chat")).await;
            Ok(())
        }
        ChatEnd::PeerClosed { unsent } => Err(ConverseError::Unsent { peer, unsent }),
        ChatEnd::Failed(reason) => Err(ConverseError::Failed { peer, reason }),
    }
}
