use std::fmt;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use common::PeerId;
use rcgen::{CertificateParams, KeyPair, PKCS_ED25519};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// Why an identity could not be made, loaded or saved.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Reading or writing the key file failed.
    #[error("{action} identity file {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The key file is readable or writable by others.
    #[error(
        "identity file {path} has mode {mode:o}: others could read the private key; \
         run `chmod 600 {path}`"
    )]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
    /// The key file does not hold a usable key.
    #[error("identity file {path} does not hold a valid private key: {reason}")]
    BadKey {
        /// The file.
        path: PathBuf,
        /// What rcgen said.
        reason: String,
    },
    /// Key generation or certificate creation failed.
    #[error("creating identity: {0}")]
    Generate(String),
}

/// A long-term key pair and the self-signed certificate that carries it.
pub struct Identity {
    key_pkcs8: Vec<u8>,
    key_pem: String,
    cert: CertificateDer<'static>,
    spki: Vec<u8>,
    id: PeerId,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.debug_struct("Identity").field("id", &self.id).finish()
    }
}

impl Identity {
    /// A fresh Ed25519 identity, in memory only.
    pub fn generate() -> Result<Self, IdentityError> {
        let key = KeyPair::generate_for(&PKCS_ED25519)
            .map_err(|e| IdentityError::Generate(e.to_string()))?;
        Self::from_key_pair(key)
    }

    fn from_key_pair(key: KeyPair) -> Result<Self, IdentityError> {
        let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
        let id = PeerId::from_key_digest(&sha256(&spki));
        // The certificate only carries the key: verifiers check the key's hash and the handshake
        // signature, never names or dates, so the subject is informative.
        let params = CertificateParams::new(vec![id.to_string()])
            .map_err(|e| IdentityError::Generate(e.to_string()))?;
        let cert = params
            .self_signed(&key)
            .map_err(|e| IdentityError::Generate(e.to_string()))?;
        Ok(Identity {
            key_pkcs8: key.serialize_der(),
            key_pem: key.serialize_pem(),
            cert: cert.der().clone(),
            spki,
            id,
        })
    }

    /// Loads the identity at `path`, or creates one there (mode 0600, parent directory 0700) if
    /// the file does not exist. The flag is true when a new identity was created.
    pub fn load_or_create(path: &Path) -> Result<(Self, bool), IdentityError> {
        match fs::metadata(path) {
            Ok(_) => Ok((Self::load(path)?, false)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let identity = Self::generate()?;
                identity.save(path)?;
                Ok((identity, true))
            }
            Err(source) => Err(IdentityError::Io {
                action: "reading",
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Loads a PEM (PKCS#8) key file. Refuses a file that others can read.
    pub fn load(path: &Path) -> Result<Self, IdentityError> {
        let io_err = |source| IdentityError::Io {
            action: "reading",
            path: path.to_owned(),
            source,
        };
        let meta = fs::metadata(path).map_err(io_err)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(IdentityError::Permissions {
                path: path.to_owned(),
                mode,
            });
        }
        let pem = fs::read_to_string(path).map_err(io_err)?;
        let key = KeyPair::from_pem(&pem).map_err(|e| IdentityError::BadKey {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        Self::from_key_pair(key)
    }

    /// Writes the key as PEM with mode 0600 (its directory, if missing, 0700), atomically and
    /// durably ([`crate::durable::write_atomically`]: a power loss cannot lose the key).
    pub fn save(&self, path: &Path) -> Result<(), IdentityError> {
        let io_err = |source| IdentityError::Io {
            action: "writing",
            path: path.to_owned(),
            source,
        };
        crate::durable::write_private_file(path, self.key_pem.as_bytes()).map_err(io_err)
    }

    /// The peer id derived from the public key.
    pub fn id(&self) -> PeerId {
        self.id
    }

    /// SHA-256 of the public key: what clients pin for a server.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint(sha256(&self.spki))
    }

    /// A secret derived from the private key for `label`: stable across restarts, unguessable
    /// without the key (used for QUIC stateless-reset tokens, which must survive a restart so
    /// that clients of a restarted server learn at once that their connection is gone).
    pub fn derive_secret(&self, label: &str) -> [u8; 32] {
        let mut input = Vec::with_capacity(label.len() + 1 + self.key_pkcs8.len());
        input.extend_from_slice(label.as_bytes());
        input.push(0);
        input.extend_from_slice(&self.key_pkcs8);
        sha256(&input)
    }

    /// The certificate chain to present (one self-signed certificate).
    pub fn cert_chain(&self) -> Vec<CertificateDer<'static>> {
        vec![self.cert.clone()]
    }

    /// The private key, for rustls.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_pkcs8.clone()))
    }
}

pub(crate) fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// The SubjectPublicKeyInfo (DER, with its SEQUENCE header) of a certificate.
pub fn spki_of_cert(cert: &CertificateDer<'_>) -> Result<Vec<u8>, rustls::Error> {
    let parsed = webpki::EndEntityCert::try_from(cert).map_err(|e| {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
            std::sync::Arc::new(e),
        )))
    })?;
    Ok(parsed.subject_public_key_info().as_ref().to_vec())
}

/// The [`PeerId`] of whoever holds the key in this certificate.
pub fn peer_id_of_cert(cert: &CertificateDer<'_>) -> Result<PeerId, rustls::Error> {
    Ok(PeerId::from_key_digest(&sha256(&spki_of_cert(cert)?)))
}

/// The [`Fingerprint`] of the key in this certificate.
pub fn fingerprint_of_cert(cert: &CertificateDer<'_>) -> Result<Fingerprint, rustls::Error> {
    Ok(Fingerprint(sha256(&spki_of_cert(cert)?)))
}

/// SHA-256 of a SubjectPublicKeyInfo, shown as `sha256:` and 64 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sha256:")?;
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why a string is not a fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "a server key fingerprint is `sha256:` followed by 64 hex digits (the prefix is optional); {0}"
)]
pub struct ParseFingerprintError(String);

impl FromStr for Fingerprint {
    type Err = ParseFingerprintError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let hex = s.strip_prefix("sha256:").unwrap_or(s);
        if hex.len() != 64 {
            return Err(ParseFingerprintError(format!(
                "got {} characters",
                hex.len()
            )));
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            let pair = hex.get(2 * i..2 * i + 2).unwrap_or("");
            *byte = u8::from_str_radix(pair, 16)
                .map_err(|_| ParseFingerprintError(format!("{pair:?} is not hex")))?;
        }
        Ok(Fingerprint(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn id_is_hash_of_the_certificate_key() {
        let identity = Identity::generate().unwrap();
        let cert = &identity.cert_chain()[0];
        assert_eq!(peer_id_of_cert(cert).unwrap(), identity.id());
        assert_eq!(fingerprint_of_cert(cert).unwrap(), identity.fingerprint());
        assert_eq!(identity.id().as_uuid().get_version_num(), 8);
        assert_ne!(Identity::generate().unwrap().id(), identity.id());
    }

    #[test]
    fn save_load_keeps_the_id_and_uses_mode_0600() {
        let dir = std::env::temp_dir().join(format!("certs-test-{}", std::process::id()));
        let path = dir.join("sub").join("identity.pem");
        let (created, fresh) = Identity::load_or_create(&path).unwrap();
        assert!(fresh);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (loaded, fresh) = Identity::load_or_create(&path).unwrap();
        assert!(!fresh);
        assert_eq!(loaded.id(), created.id());

        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = Identity::load(&path).unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");

        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(&path, "not a key").unwrap();
        let err = Identity::load(&path).unwrap_err();
        assert!(matches!(err, IdentityError::BadKey { .. }), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn garbage_certificates_are_errors() {
        assert!(peer_id_of_cert(&CertificateDer::from(vec![0u8; 10])).is_err());
        assert!(peer_id_of_cert(&CertificateDer::from(Vec::new())).is_err());
    }

    #[test]
    fn fingerprint_text_round_trip() {
        let fp = Identity::generate().unwrap().fingerprint();
        let text = fp.to_string();
        assert!(text.starts_with("sha256:"));
        assert_eq!(text.parse::<Fingerprint>().unwrap(), fp);
        assert_eq!(text["sha256:".len()..].parse::<Fingerprint>().unwrap(), fp);
        assert!("sha256:abc".parse::<Fingerprint>().is_err());
        assert!("zz".repeat(32).parse::<Fingerprint>().is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_der_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = peer_id_of_cert(&CertificateDer::from(bytes));
        }

        #[test]
        fn arbitrary_fingerprint_text_never_panics(s in "\\PC{0,80}") {
            let _ = s.parse::<Fingerprint>();
        }
    }
}
