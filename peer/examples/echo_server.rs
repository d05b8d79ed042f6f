//! An echo server on the `peer` library: it registers with a rendezvous under a fresh identity,
//! prints its peer id, and sends every stream a peer opens back to it.
//!
//! ```text
//! cargo run -p rendezvous -- serve --listen 127.0.0.1:7000 --data-dir /tmp/rv
//! cargo run -p peer --example echo_server -- 127.0.0.1:7000 SERVER_KEY
//! cargo run -p peer --example echo_client -- 127.0.0.1:7000 SERVER_KEY PEER_ID hello
//! ```
//!
//! `SERVER_KEY` is the `sha256:...` the rendezvous prints at start; `PEER_ID` is the id this
//! server prints. `RUST_LOG=info` shows the endpoint's events (connections, path changes).

use std::sync::Arc;

use peer::{Endpoint, EndpointConfig, Identity, Rendezvous};

/// The longest message echoed (a peer cannot make us buffer more).
const MAX_MESSAGE: usize = 64 * 1024;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [server, key] = args.as_slice() else {
        eprintln!("usage: echo_server RENDEZVOUS_ADDR SERVER_KEY");
        std::process::exit(2);
    };
    let identity = Arc::new(Identity::generate()?);
    let config = EndpointConfig::new(Rendezvous::pinned(server.as_str(), key.parse()?));
    let endpoint = Endpoint::bind(identity, config).await?;
    let registration = endpoint.registered().await?;
    println!(
        "echo server {} registered (observed address {})",
        registration.id, registration.observed
    );
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => incoming,
            _ = tokio::signal::ctrl_c() => None,
        };
        let Some(incoming) = incoming else { break };
        tokio::spawn(async move {
            // Refusals (a bad handshake, a peer on another peer's address) are logged by the
            // endpoint.
            let Ok(conn) = incoming.await else { return };
            println!("connection from {}", conn.peer());
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                let peer = conn.peer();
                tokio::spawn(async move {
                    let echoed = async {
                        let data = recv.read_to_end(MAX_MESSAGE).await?;
                        send.write_all(&data).await?;
                        send.finish()?;
                        // Keep the stream until the peer has read it all (it closes then).
                        let _ = send.stopped().await;
                        Ok::<usize, Box<dyn std::error::Error + Send + Sync>>(data.len())
                    };
                    match echoed.await {
                        Ok(n) => println!("echoed {n} bytes to {peer}"),
                        Err(e) => eprintln!("stream from {peer}: {e}"),
                    }
                });
            }
        });
    }
    endpoint.close().await;
    Ok(())
}
