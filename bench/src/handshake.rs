//! `bench handshake-server`: the baseline of the rendezvous's registration cost. A plain
//! `quinn::Endpoint::server` (plain UDP socket, quinn's default transport config) with a plain
//! rustls TLS 1.3 server configuration using the same certificate type and crypto as the
//! rendezvous (an Ed25519 identity's self-signed certificate, the ring provider, the rendezvous
//! ALPN, a client certificate required and its TLS 1.3 handshake signature verified), and
//! nothing of ours on top: no certificate parsing beyond what rustls does, no id derivation, no
//! registry, no control stream, no per-source limits. It accepts every handshake and keeps the
//! connection until the client closes it, so that `bench rv-load --handshake-only` measures it
//! exactly as it measures the rendezvous (handshakes per server CPU second, RSS per idle
//! connection).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use certs::Identity;
use quinn::crypto::rustls::QuicServerConfig;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

/// Connection attempts waiting for the accept loop at once (the rendezvous allows 256; the
/// loop here takes each at once, so this only absorbs bursts).
const MAX_INCOMING: usize = 256;

/// Requires a client certificate and checks its TLS 1.3 handshake signature (rustls's own
/// function, as every rustls verifier does); accepts any certificate otherwise.
#[derive(Debug)]
struct SignatureOnlyClientVerifier {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for SignatureOnlyClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Binds the plain handshake server for `identity` on `listen`.
fn bind(listen: SocketAddr, identity: &Identity) -> anyhow::Result<quinn::Endpoint> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(SignatureOnlyClientVerifier {
        algorithms: provider.signature_verification_algorithms,
    });
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.cert_chain(), identity.private_key())?;
    tls.alpn_protocols = vec![common::ALPN_RENDEZVOUS.to_vec()];
    let crypto = QuicServerConfig::try_from(tls).context("TLS configuration for QUIC")?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.max_incoming(MAX_INCOMING);
    Ok(quinn::Endpoint::server(config, listen)?)
}

/// Accepts every connection attempt and holds each connection until it is closed; returns
/// when the endpoint is closed.
async fn accept_all(endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(async move {
            // A failed handshake is the client's business: the load generator counts it.
            if let Ok(conn) = incoming.await {
                conn.closed().await;
            }
        });
    }
}

/// Runs the plain handshake server until killed. Prints `server key sha256:...` (the
/// fingerprint `rv-load --server-key` pins, as for the rendezvous) and `listening ADDR`.
pub async fn server(listen: SocketAddr, key: &Path) -> anyhow::Result<()> {
    let (identity, _) = Identity::load_or_create(key)
        .with_context(|| format!("loading or creating {}", key.display()))?;
    let endpoint = bind(listen, &identity)?;
    println!("server key {}", identity.fingerprint());
    println!("listening {}", endpoint.local_addr()?);
    accept_all(endpoint).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The baseline server takes the load generator's handshake (the rendezvous's client
    /// configuration: pinned key, rendezvous ALPN, client certificate) and holds the connection.
    #[tokio::test]
    async fn takes_the_load_generators_handshake() {
        let identity = Identity::generate().unwrap();
        let endpoint = bind("127.0.0.1:0".parse().unwrap(), &identity).unwrap();
        let server = endpoint.local_addr().unwrap();
        let accepting = tokio::spawn(accept_all(endpoint.clone()));
        let (client, _socket, _stun) = transport::make_endpoint(
            "127.0.0.1:0".parse().unwrap(),
            None,
            transport::TransportSettings::default(),
            16,
            None,
        )
        .unwrap();
        let peer = crate::rvload::register_one(
            client.clone(),
            Identity::generate().unwrap(),
            server,
            identity.fingerprint(),
            true,
        )
        .await
        .unwrap();
        assert!(peer.conn.close_reason().is_none());
        assert_eq!(
            peer.conn
                .handshake_data()
                .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
                .and_then(|d| d.protocol),
            Some(common::ALPN_RENDEZVOUS.to_vec())
        );
        // A client pinning another key is refused by its own verifier, as with the rendezvous.
        let wrong = crate::rvload::register_one(
            client,
            Identity::generate().unwrap(),
            server,
            Identity::generate().unwrap().fingerprint(),
            true,
        )
        .await;
        assert!(wrong.is_err());
        endpoint.close(0u32.into(), b"done");
        accepting.await.unwrap();
    }
}
