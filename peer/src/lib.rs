//! `peer`: dial another peer by its id, through whatever NATs are in between, and get an
//! end-to-end encrypted QUIC connection.
//!
//! A peer has one UDP socket and registers with a rendezvous server, which introduces peers to
//! each other. A connection starts on the rendezvous's relay at once and moves to a direct path
//! as soon as hole punching proves one; the [`quinn::Connection`] never notices, because quinn
//! talks to one stable address per peer and the socket routes it ([`paths`]). Every peer is known
//! by its [`PeerId`], the hash of its public key, and the TLS handshake proves it: no name, no
//! certificate authority.
//!
//! # Example
//!
//! ```no_run
//! use std::sync::Arc;
//!
//! use peer::{Endpoint, EndpointConfig, Fingerprint, Identity, PeerId, Rendezvous};
//!
//! # async fn example(server_key: Fingerprint, other: PeerId) -> Result<(), Box<dyn std::error::Error>> {
//! let identity = Arc::new(Identity::generate()?);
//! let config = EndpointConfig::new(Rendezvous::pinned("127.0.0.1:7000", server_key));
//! let endpoint = Endpoint::bind(identity, config).await?;
//! let registration = endpoint.registered().await?;
//! println!("registered as {} (seen as {})", registration.id, registration.observed);
//!
//! // Dial by id: a quinn::Connection underneath, with the peer's key pinned.
//! let conn = endpoint.connect(other).await?;
//! println!("path: {}", *conn.path().borrow());
//! let (mut send, mut recv) = conn.open_bi().await?;
//! send.write_all(b"hello").await?;
//! send.finish()?;
//! let echoed = recv.read_to_end(1024).await?;
//! assert_eq!(echoed, b"hello");
//!
//! // Or wait for others: every connection comes with the id its handshake proved.
//! if let Some(incoming) = endpoint.accept().await {
//!     let conn = incoming.await?;
//!     println!("{} connected", conn.peer());
//! }
//! endpoint.close().await;
//! # Ok(())
//! # }
//! ```
//!
//! To try it on one machine, in three terminals (the examples are `examples/echo_*.rs`):
//!
//! ```text
//! cargo run -p rendezvous -- serve --listen 127.0.0.1:7000 --data-dir /tmp/rv   # prints its key
//! cargo run -p peer --example echo_server -- 127.0.0.1:7000 SERVER_KEY         # prints its id
//! cargo run -p peer --example echo_client -- 127.0.0.1:7000 SERVER_KEY PEER_ID hello
//! ```
//!
//! # Layers
//!
//! - [`endpoint`]: the public face: [`Endpoint`], [`Connection`], [`Incoming`].
//! - The machinery under it: [`node`] (socket and QUIC endpoint), [`session`] (registration;
//!   with several nodes, [`failover`] picks one and [`liveness`] tells when to leave it),
//!   [`register`] (the register handshake and TLS names), [`relay`], [`punching`], [`dial`],
//!   [`paths`] (keeping each connection on its best path), [`netcheck`] and [`portmap`] (what
//!   the NAT does; the router's port mapping of our socket), [`cache`] (addresses that worked), [`tasks`] (the tasks an endpoint spawns
//!   as it goes, all ended and awaited by [`Endpoint::close`]).
//! - The `peer` program's applications, on top of the endpoint: [`commands`] (each command as
//!   a library call, so that the program only parses arguments and prints), [`listener`] (inbound stream
//!   dispatch), [`chat`], [`files`] (and its disk writer), [`services`] (`pipe`, `forward`, `--expose`), [`ping`], [`access`] (allow-lists), [`control`] (the local
//!   control socket and `peer status`), [`console`] (where events are written).
#![warn(missing_docs)]

pub mod access;
pub mod cache;
pub mod chat;
pub mod commands;
pub mod console;
pub mod control;
pub mod dial;
mod disk_writer;
pub mod endpoint;
pub mod failover;
pub mod files;
pub mod listener;
pub mod liveness;
pub mod netcheck;
pub mod node;
pub mod observe;
pub mod paths;
pub mod ping;
pub mod portmap;
pub mod punching;
pub mod register;
pub mod relay;
pub mod services;
pub mod session;
pub mod tasks;
#[cfg(test)]
mod test_support;

pub use certs::{Fingerprint, Identity};
pub use common::PeerId;
pub use endpoint::{
    AcceptError, ConnectError, Connection, Endpoint, EndpointConfig, EndpointError, Incoming,
    RegisterError, Rendezvous,
};
pub use paths::LinkStatus;
pub use punch::path::Current as PathKind;
pub use quinn;
pub use relay::stable_addr;
pub use session::{FirstUseTrust, Registration, SessionState};
