//! An echo client on the `peer` library: it registers with a rendezvous, connects to the echo
//! server by its peer id (through whatever NATs are between them), sends a message on a stream
//! and prints what comes back, with the path the connection took.
//!
//! ```text
//! cargo run -p peer --example echo_client -- 127.0.0.1:7000 SERVER_KEY PEER_ID hello
//! ```
//!
//! See `echo_server.rs` for the other two commands.

use std::sync::Arc;

use peer::{Endpoint, EndpointConfig, Identity, PeerId, Rendezvous};

/// The longest echo read back.
const MAX_MESSAGE: usize = 64 * 1024;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (server, key, server_id, message) = match args.as_slice() {
        [server, key, id] => (server, key, id, "hello"),
        [server, key, id, message] => (server, key, id, message.as_str()),
        _ => {
            eprintln!("usage: echo_client RENDEZVOUS_ADDR SERVER_KEY PEER_ID [MESSAGE]");
            std::process::exit(2);
        }
    };
    let server_id: PeerId = server_id.parse()?;
    let identity = Arc::new(Identity::generate()?);
    let config = EndpointConfig::new(Rendezvous::pinned(server.as_str(), key.parse()?));
    let endpoint = Endpoint::bind(identity, config).await?;
    let result = async {
        let conn = endpoint.connect(server_id).await?;
        println!(
            "connected to {} in {} ms: {}",
            conn.peer(),
            conn.connect_time().as_millis(),
            *conn.path().borrow()
        );
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(message.as_bytes()).await?;
        send.finish()?;
        let echoed = recv.read_to_end(MAX_MESSAGE).await?;
        println!("echoed: {}", String::from_utf8_lossy(&echoed));
        conn.close(0u32.into(), b"done");
        if echoed != message.as_bytes() {
            return Err("the echo differs from the message".into());
        }
        Ok::<(), Box<dyn std::error::Error>>(())
    }
    .await;
    endpoint.close().await;
    result
}
