//! File transfer over a peer connection: `open {app: file}`, a `file_header` (name, size,
//! SHA-256), the raw bytes, and a `file_result` from the receiver once it has stored and checked
//! them. The receiver writes to a temporary file and renames it only after the hash matches.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::frame_io::{read_frame, write_frame};
use common::message::PeerApp;
use common::{PeerId, PeerMessage};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::console::Console;

const CHUNK: usize = 256 * 1024;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a file, hex.
pub async fn sha256_file(path: &Path) -> std::io::Result<(u64, String)> {
    let mut file = tokio::fs::File::open(path).await?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; CHUNK];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        size += n as u64;
        ctx.update(&buf[..n]);
    }
    Ok((size, hex(ctx.finish().as_ref())))
}

/// Sends `path` on a new stream of `conn`; returns a summary once the receiver confirmed it.
pub async fn send(
    conn: &quinn::Connection,
    path: &Path,
    console: &Console,
) -> anyhow::Result<String> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow::anyhow!("{} has no usable file name", path.display()))?
        .to_owned();
    let (size, sha256) = sha256_file(path)
        .await
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    let (mut tx, mut rx) = conn.open_bi().await?;
    write_frame(&mut tx, &PeerMessage::Open { app: PeerApp::File }.encode()).await?;
    let header = PeerMessage::FileHeader {
        name: name.clone(),
        size,
        sha256: sha256.clone(),
    };
    write_frame(&mut tx, &header.encode()).await?;
    let started = Instant::now();
    let mut file = tokio::fs::File::open(path).await?;
    let mut buf = vec![0u8; CHUNK];
    let mut sent = 0u64;
    let mut last_report = Instant::now();
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        tx.write_all(&buf[..n]).await?;
        sent += n as u64;
        if last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            console.error(progress(sent, size, started.elapsed())).await;
        }
    }
    if sent != size {
        anyhow::bail!("{} changed while it was being sent", path.display());
    }
    tx.finish()?;
    let reply = tokio::time::timeout(Duration::from_secs(60), read_frame(&mut rx))
        .await
        .map_err(|_| anyhow::anyhow!("no confirmation from the receiver within 60 s"))??
        .ok_or_else(|| anyhow::anyhow!("the receiver closed the stream without a verdict"))?;
    let elapsed = started.elapsed();
    match PeerMessage::decode(&reply)? {
        PeerMessage::FileResult { ok: true, sha256: theirs, .. } if theirs == sha256 => Ok(format!(
            "sent {name}: {size} bytes in {:.2} s ({:.1} MB/s), verified by the receiver (sha256 {sha256})",
            elapsed.as_secs_f64(),
            size as f64 / elapsed.as_secs_f64().max(1e-9) / 1e6
        )),
        PeerMessage::FileResult { message, .. } => anyhow::bail!("the receiver refused {name}: {message}"),
        PeerMessage::Error { message } => anyhow::bail!("the receiver refused {name}: {message}"),
        other => anyhow::bail!("unexpected reply {other:?}"),
    }
}

fn progress(done: u64, total: u64, elapsed: Duration) -> String {
    let pct = if total == 0 {
        100.0
    } else {
        done as f64 * 100.0 / total as f64
    };
    let width = 30;
    let filled = ((pct / 100.0) * width as f64) as usize;
    format!(
        "[{}{}] {pct:5.1}% {done}/{total} bytes, {:.1} MB/s",
        "#".repeat(filled.min(width)),
        " ".repeat(width - filled.min(width)),
        done as f64 / elapsed.as_secs_f64().max(1e-9) / 1e6
    )
}

/// A name that cannot escape the directory it is stored in.
fn safe_name(name: &str) -> Option<&str> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\', '\0'])
        && !name.starts_with('.');
    ok.then_some(name)
}

/// Receives one file on a stream whose `open` was already read; stores it in `dir`.
pub async fn receive(
    mut tx: quinn::SendStream,
    mut rx: quinn::RecvStream,
    peer: PeerId,
    dir: Option<&Path>,
    console: &Console,
) {
    let result = receive_inner(&mut rx, peer, dir, console).await;
    let reply = match &result {
        Ok((_, sha256, _)) => PeerMessage::FileResult {
            ok: true,
            sha256: sha256.clone(),
            message: "stored".into(),
        },
        Err((sha256, message)) => PeerMessage::FileResult {
            ok: false,
            sha256: sha256.clone(),
            message: message.clone(),
        },
    };
    let _ = write_frame(&mut tx, &reply.encode()).await;
    let _ = tx.finish();
    let _ = tokio::time::timeout(Duration::from_secs(5), tx.stopped()).await;
    match result {
        Ok((path, sha256, size)) => {
            console
                .say(format!(
                    "received {} ({size} bytes) from {peer}, sha256 {sha256} verified",
                    path.display()
                ))
                .await
        }
        Err((_, message)) => {
            let _ = rx.stop(1u32.into());
            console
                .error(format!("refused a file from {peer}: {message}"))
                .await
        }
    }
}

async fn receive_inner(
    rx: &mut quinn::RecvStream,
    peer: PeerId,
    dir: Option<&Path>,
    console: &Console,
) -> Result<(PathBuf, String, u64), (String, String)> {
    let fail = |m: String| (String::new(), m);
    let Some(dir) = dir else {
        return Err(fail(
            "this peer does not accept files (start it with --accept-files DIR)".into(),
        ));
    };
    let header = tokio::time::timeout(Duration::from_secs(10), read_frame(rx))
        .await
        .map_err(|_| fail("no file header within 10 s".into()))?
        .map_err(|e| fail(e.to_string()))?
        .ok_or_else(|| fail("stream closed before the file header".into()))?;
    let (name, size, sha256) = match PeerMessage::decode(&header) {
        Ok(PeerMessage::FileHeader { name, size, sha256 }) => (name, size, sha256),
        Ok(other) => return Err(fail(format!("expected a file header, got {other:?}"))),
        Err(e) => return Err(fail(e.to_string())),
    };
    let name = safe_name(&name)
        .ok_or_else(|| fail(format!("refusing the file name {name:?}")))?
        .to_owned();
    let final_path = dir.join(&name);
    let temp_path = dir.join(format!(".{name}.{}.part", rand::random::<u32>()));
    let mut file = tokio::fs::File::create(&temp_path)
        .await
        .map_err(|e| fail(format!("cannot create {}: {e}", temp_path.display())))?;
    console
        .say(format!("receiving {name} ({size} bytes) from {peer}"))
        .await;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    let outcome: Result<(), String> = async {
        loop {
            let n = match rx.read(&mut buf).await {
                Ok(Some(n)) => n,
                Ok(None) => break,
                Err(e) => return Err(format!("transfer failed: {e}")),
            };
            got += n as u64;
            if got > size {
                return Err(format!("more than the announced {size} bytes"));
            }
            ctx.update(&buf[..n]);
            file.write_all(&buf[..n])
                .await
                .map_err(|e| format!("cannot write {}: {e}", temp_path.display()))?;
        }
        file.flush().await.map_err(|e| e.to_string())?;
        if got != size {
            return Err(format!("stream ended after {got} of {size} bytes"));
        }
        Ok(())
    }
    .await;
    let computed = hex(ctx.finish().as_ref());
    let verified = outcome.and_then(|()| {
        if computed == sha256 {
            Ok(())
        } else {
            Err(format!(
                "sha256 mismatch: announced {sha256}, received {computed}"
            ))
        }
    });
    match verified {
        Ok(()) => {
            tokio::fs::rename(&temp_path, &final_path)
                .await
                .map_err(|e| {
                    (
                        computed.clone(),
                        format!("cannot store {}: {e}", final_path.display()),
                    )
                })?;
            Ok((final_path, computed, size))
        }
        Err(message) => {
            let _ = tokio::fs::remove_file(&temp_path).await;
            Err((computed, message))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cannot_escape_the_directory() {
        assert_eq!(safe_name("report.pdf"), Some("report.pdf"));
        for bad in [
            "",
            ".",
            "..",
            "../etc/passwd",
            "a/b",
            "a\\b",
            ".hidden",
            "x\0y",
        ] {
            assert_eq!(safe_name(bad), None, "{bad:?}");
        }
        assert_eq!(safe_name(&"x".repeat(256)), None);
    }
}
