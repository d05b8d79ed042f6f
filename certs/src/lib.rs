//! Identity and trust.
//!
//! - [`Identity`]: a long-term Ed25519 key pair, stored with 0600 permissions, and a self-signed
//!   certificate made from it. Its [`PeerId`] is a hash of the public key.
//! - [`Fingerprint`]: SHA-256 of a public key, used to pin the rendezvous server.
//! - rustls configurations (ring provider only, TLS 1.3 only) whose verifiers accept exactly the
//!   key that was asked for: a peer dialing `<uuid>` accepts only a certificate whose key hashes to
//!   that UUID; a peer talking to the rendezvous accepts only the pinned (or first-seen) key.
//! - [`KnownServers`]: trust on first use, remembered like ssh's `known_hosts`.
//! - [`durable`]: the one way local state is written (0600 files, 0700 directories, atomic and
//!   synced, directory included).

pub mod durable;
mod identity;
mod known;
mod verify;

pub use identity::{
    fingerprint_of_cert, peer_id_of_cert, spki_of_cert, Fingerprint, Identity, IdentityError,
    ParseFingerprintError,
};
pub use known::{KnownServers, KnownServersError};
pub use verify::{
    client_config_for_any_server, client_config_for_peer, client_config_for_server, provider,
    server_config, tunnel_server_config, PinMismatch, ServerTrust,
};

/// Errors building TLS configurations.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// rustls refused the configuration (for example an unusable key).
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}
