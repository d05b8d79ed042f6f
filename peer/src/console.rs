//! Why this exists: many tasks (links, punches, chats) report events, and their lines must not
//! interleave mid-line or block each other. One task owns stdout (or the log, for a library
//! endpoint); everyone else sends it lines. Typed input is read by a plain thread
//! (a blocking read cannot be cancelled, so it must not hold up the runtime at exit).

use std::io::BufRead;

use common::ChatMessage;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

const CONSOLE_QUEUE: usize = 256;
const INPUT_QUEUE: usize = 64;

enum Item {
    Line {
        is_error: bool,
        text: String,
    },
    /// Answered once everything queued before it is written.
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// Sends lines to stdout (events, messages) or stderr (warnings).
#[derive(Clone)]
pub struct Console {
    tx: mpsc::Sender<Item>,
}

impl Console {
    /// Starts the printer task; with `events_to_stderr`, event lines go to stderr too (stdout is
    /// left to a machine-readable result).
    pub fn start_with(events_to_stderr: bool) -> (Console, tokio::task::JoinHandle<()>) {
        let (tx, mut rx) = mpsc::channel::<Item>(CONSOLE_QUEUE);
        let task = tokio::spawn(async move {
            let mut stdout = tokio::io::stdout();
            let mut stderr = tokio::io::stderr();
            while let Some(item) = rx.recv().await {
                let (is_error, mut line) = match item {
                    Item::Line { is_error, text } => (is_error || events_to_stderr, text),
                    Item::Flush(done) => {
                        let _ = stdout.flush().await;
                        let _ = stderr.flush().await;
                        let _ = done.send(());
                        continue;
                    }
                };
                line.push('\n');
                let result = if is_error {
                    stderr.write_all(line.as_bytes()).await
                } else {
                    match stdout.write_all(line.as_bytes()).await {
                        Ok(()) => stdout.flush().await,
                        Err(e) => Err(e),
                    }
                };
                if result.is_err() {
                    // Nobody is reading any more; keep draining so senders never block.
                    continue;
                }
            }
            let _ = stdout.flush().await;
        });
        (Console { tx }, task)
    }

    /// Starts a printer that sends every line to [`tracing`] instead of the terminal: events at
    /// `info`, warnings at `warn`. What a library endpoint uses unless told otherwise (a program
    /// embedding the peer owns its stdout).
    pub fn to_log() -> (Console, tokio::task::JoinHandle<()>) {
        let (tx, mut rx) = mpsc::channel::<Item>(CONSOLE_QUEUE);
        let task = tokio::spawn(async move {
            while let Some(item) = rx.recv().await {
                match item {
                    Item::Line {
                        is_error: true,
                        text,
                    } => tracing::warn!("{text}"),
                    Item::Line { text, .. } => tracing::info!("{text}"),
                    Item::Flush(done) => {
                        let _ = done.send(());
                    }
                }
            }
        });
        (Console { tx }, task)
    }

    /// An event line on stdout.
    pub async fn say(&self, line: impl Into<String>) {
        let item = Item::Line {
            is_error: false,
            text: line.into(),
        };
        let _ = self.tx.send(item).await;
    }

    /// A warning on stderr.
    pub async fn error(&self, line: impl Into<String>) {
        let item = Item::Line {
            is_error: true,
            text: line.into(),
        };
        let _ = self.tx.send(item).await;
    }

    /// Waits until every line queued so far is written.
    pub async fn flush(&self) {
        let (done, written) = tokio::sync::oneshot::channel();
        if self.tx.send(Item::Flush(done)).await.is_ok() {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), written).await;
        }
    }

    /// A received chat message: `[sent_at] from: body`.
    pub async fn message(&self, msg: &ChatMessage) {
        // Control characters from the network must not drive the user's terminal.
        let body: String = msg
            .body
            .chars()
            .map(|c| if c.is_control() { '\u{fffd}' } else { c })
            .collect();
        self.say(format!(
            "[{}] {}: {}",
            msg.sent_at_rfc3339(),
            msg.from,
            body
        ))
        .await;
    }
}

/// Reads stdin lines on a thread; the receiver ends at EOF.
pub fn stdin_lines() -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel(INPUT_QUEUE);
    let spawned = std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let stdin = std::io::stdin();
            for line in stdin.lock().lines() {
                let Ok(line) = line else { break };
                if tx.blocking_send(line).is_err() {
                    break;
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the input thread; input is ignored");
    }
    rx
}
