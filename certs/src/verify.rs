use std::fmt;
use std::sync::Arc;

use common::PeerId;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::identity::{fingerprint_of_cert, peer_id_of_cert, Fingerprint, Identity};
use crate::TlsConfigError;

/// The crypto provider used everywhere: ring, explicitly, so that no process-wide default is
/// needed (and no second provider can make rustls pick at random).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificate presented was not the one pinned. Its `Debug` is the human message because
/// rustls and quinn show errors of this kind through `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub enum PinMismatch {
    /// Dialed a peer id, got another key.
    Peer {
        /// The id that was dialed.
        expected: PeerId,
        /// The id of the key presented.
        seen: PeerId,
    },
    /// The rendezvous key is not the pinned one.
    Server {
        /// The pinned fingerprint.
        expected: Fingerprint,
        /// The fingerprint presented.
        seen: Fingerprint,
    },
    /// The rendezvous key is none of the pinned ones.
    ServerAnyOf {
        /// How many keys were pinned.
        expected: usize,
        /// The fingerprint presented.
        seen: Fingerprint,
    },
}

impl fmt::Display for PinMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PinMismatch::Peer { expected, seen } => write!(
                f,
                "peer key mismatch: dialed {expected} but the remote key belongs to {seen}"
            ),
            PinMismatch::Server { expected, seen } => write!(
                f,
                "rendezvous key mismatch: expected {expected} but the server presented {seen}"
            ),
            PinMismatch::ServerAnyOf { expected, seen } => write!(
                f,
                "rendezvous key mismatch: the server presented {seen}, none of the \
                 {expected} pinned keys"
            ),
        }
    }
}

impl fmt::Debug for PinMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for PinMismatch {}

fn mismatch(m: PinMismatch) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(m),
    )))
}

/// How a peer decides to trust the rendezvous.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerTrust {
    /// Accept only this key.
    Pinned(Fingerprint),
    /// Accept any key; the caller records it (trust on first use) after the handshake.
    FirstUse,
}

#[derive(Debug)]
enum Expect {
    Peer(PeerId),
    Server(ServerTrust),
    /// Any one of these keys (a peer given several rendezvous nodes, each with its own key).
    ServerAnyOf(Vec<Fingerprint>),
}

/// Only TLS 1.3 is offered (QUIC requires it), so a TLS 1.2 signature is never expected.
fn tls12_refused() -> Result<HandshakeSignatureValid, rustls::Error> {
    Err(rustls::Error::PeerIncompatible(
        rustls::PeerIncompatible::Tls12NotOffered,
    ))
}

/// Server-certificate verifier that checks the key, never names or CAs.
#[derive(Debug)]
struct PinnedServerVerifier {
    expect: Expect,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.expect {
            Expect::Peer(expected) => {
                let seen = peer_id_of_cert(end_entity)?;
                if seen != expected {
                    return Err(mismatch(PinMismatch::Peer { expected, seen }));
                }
            }
            Expect::Server(ServerTrust::Pinned(expected)) => {
                let seen = fingerprint_of_cert(end_entity)?;
                if seen != expected {
                    return Err(mismatch(PinMismatch::Server { expected, seen }));
                }
            }
            Expect::Server(ServerTrust::FirstUse) => {
                fingerprint_of_cert(end_entity)?;
            }
            Expect::ServerAnyOf(ref pinned) => {
                let seen = fingerprint_of_cert(end_entity)?;
                if !pinned.contains(&seen) {
                    return Err(mismatch(PinMismatch::ServerAnyOf {
                        expected: pinned.len(),
                        seen,
                    }));
                }
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_refused()
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

/// Client-certificate verifier: a client certificate is required and must prove its key (the
/// handshake signature); which key it is becomes the client's [`PeerId`] after the handshake.
#[derive(Debug)]
struct AnyKeyClientVerifier {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for AnyKeyClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        peer_id_of_cert(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_refused()
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

fn client_config(
    identity: &Identity,
    expect: Expect,
    alpn: &[u8],
) -> Result<rustls::ClientConfig, TlsConfigError> {
    let provider = provider();
    let verifier = Arc::new(PinnedServerVerifier {
        expect,
        algorithms: provider.signature_verification_algorithms,
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(identity.cert_chain(), identity.private_key())?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

/// TLS client configuration for dialing the peer `expected`: only a certificate whose key hashes
/// to `expected` is accepted.
pub fn client_config_for_peer(
    identity: &Identity,
    expected: PeerId,
    alpn: &[u8],
) -> Result<rustls::ClientConfig, TlsConfigError> {
    client_config(identity, Expect::Peer(expected), alpn)
}

/// TLS client configuration for the rendezvous.
pub fn client_config_for_server(
    identity: &Identity,
    trust: ServerTrust,
    alpn: &[u8],
) -> Result<rustls::ClientConfig, TlsConfigError> {
    client_config(identity, Expect::Server(trust), alpn)
}

/// TLS client configuration for a rendezvous whose key must be one of `pinned` (a peer given
/// several rendezvous nodes pins every node's key; which node has which key does not matter).
/// The check is in the handshake, before our certificate is sent: a server with another key
/// learns nothing of us.
pub fn client_config_for_any_server(
    identity: &Identity,
    pinned: &[Fingerprint],
    alpn: &[u8],
) -> Result<rustls::ClientConfig, TlsConfigError> {
    client_config(identity, Expect::ServerAnyOf(pinned.to_vec()), alpn)
}

/// TLS server configuration that requires a client certificate and offers the given ALPNs.
pub fn server_config(
    identity: &Identity,
    alpns: &[&[u8]],
) -> Result<rustls::ServerConfig, TlsConfigError> {
    let provider = provider();
    let verifier = Arc::new(AnyKeyClientVerifier {
        algorithms: provider.signature_verification_algorithms,
    });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.cert_chain(), identity.private_key())?;
    config.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
    Ok(config)
}

/// TLS server configuration for the TCP tunnel: the server proves its key (peers pin it as for
/// QUIC); clients are authenticated by the QUIC handshake inside the tunnel.
pub fn tunnel_server_config(
    identity: &Identity,
    alpn: &[u8],
) -> Result<rustls::ServerConfig, TlsConfigError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(identity.cert_chain(), identity.private_key())?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verify_as(expect: Expect, cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let verifier = PinnedServerVerifier {
            expect,
            algorithms: provider().signature_verification_algorithms,
        };
        verifier
            .verify_server_cert(
                cert,
                &[],
                &ServerName::try_from("peer").unwrap(),
                &[],
                UnixTime::now(),
            )
            .map(|_| ())
    }

    #[test]
    fn a_set_of_server_pins_accepts_any_of_its_keys_and_no_other() {
        let node_a = Identity::generate().unwrap();
        let node_b = Identity::generate().unwrap();
        let stranger = Identity::generate().unwrap();
        let fp = |i: &Identity| fingerprint_of_cert(&i.cert_chain()[0]).unwrap();
        let pinned = vec![fp(&node_a), fp(&node_b)];
        verify_as(Expect::ServerAnyOf(pinned.clone()), &node_a.cert_chain()[0]).unwrap();
        verify_as(Expect::ServerAnyOf(pinned.clone()), &node_b.cert_chain()[0]).unwrap();
        let err = verify_as(Expect::ServerAnyOf(pinned), &stranger.cert_chain()[0]).unwrap_err();
        let text = format!("{err}");
        assert!(text.contains("rendezvous key mismatch"), "{text}");
        assert!(text.contains(&fp(&stranger).to_string()), "{text}");
        assert!(text.contains("none of the 2 pinned keys"), "{text}");
    }

    #[test]
    fn peer_pin_accepts_only_the_dialed_key() {
        let alice = Identity::generate().unwrap();
        let mallory = Identity::generate().unwrap();
        let cert = &mallory.cert_chain()[0];
        verify_as(Expect::Peer(mallory.id()), cert).unwrap();
        let err = verify_as(Expect::Peer(alice.id()), cert).unwrap_err();
        let text = format!("{err}");
        assert!(text.contains(&alice.id().to_string()), "{text}");
        assert!(text.contains(&mallory.id().to_string()), "{text}");
    }

    #[test]
    fn server_pin_accepts_only_the_pinned_key() {
        let server = Identity::generate().unwrap();
        let other = Identity::generate().unwrap();
        let cert = &server.cert_chain()[0];
        verify_as(
            Expect::Server(ServerTrust::Pinned(server.fingerprint())),
            cert,
        )
        .unwrap();
        verify_as(Expect::Server(ServerTrust::FirstUse), cert).unwrap();
        let err = verify_as(
            Expect::Server(ServerTrust::Pinned(other.fingerprint())),
            cert,
        )
        .unwrap_err();
        assert!(format!("{err}").contains(&other.fingerprint().to_string()));
    }

    #[test]
    fn configs_build() {
        let id = Identity::generate().unwrap();
        client_config_for_peer(&id, id.id(), b"x").unwrap();
        client_config_for_server(&id, ServerTrust::FirstUse, b"x").unwrap();
        server_config(&id, &[b"x", b"y"]).unwrap();
    }
}
