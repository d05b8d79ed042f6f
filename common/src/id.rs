//! [`PeerId`]: a UUID (version 8) derived from a peer's public key.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

/// A peer's identity: UUIDv8 (RFC 9562) made of the first 16 bytes of SHA-256 over the
/// SubjectPublicKeyInfo of its certificate, with the version and variant bits set.
///
/// Because the id is a hash of the key, whoever proves possession of the key in a TLS handshake
/// proves the id; the rendezvous cannot hand out someone else's.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(Uuid);

impl PeerId {
    /// Builds the id from a SHA-256 digest of a SubjectPublicKeyInfo.
    pub fn from_key_digest(digest: &[u8; 32]) -> Self {
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&digest[..16]);
        PeerId(Uuid::new_v8(bytes))
    }

    /// Wraps raw bytes read back from storage; fails unless they are a version 8 UUID.
    pub fn from_bytes(bytes: [u8; 16]) -> Result<Self, ParsePeerIdError> {
        Self::from_uuid(Uuid::from_bytes(bytes))
    }

    fn from_uuid(uuid: Uuid) -> Result<Self, ParsePeerIdError> {
        // Variant bits 10xx are what `Uuid::new_v8` sets; check both so that a v8 id with a
        // non-RFC variant (which no key could produce) is rejected too.
        match (uuid.get_version_num(), uuid.get_variant()) {
            (8, uuid::Variant::RFC4122) => Ok(PeerId(uuid)),
            (version, _) => Err(ParsePeerIdError::NotPeerId { version }),
        }
    }

    /// The 16 raw bytes (for storage keys).
    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }

    /// The underlying UUID.
    pub fn as_uuid(&self) -> &Uuid {
        &self.0
    }

    /// The first eight hex digits, for compact log lines.
    pub fn short(&self) -> String {
        let mut s = self.0.simple().to_string();
        s.truncate(8);
        s
    }
}

/// Why a string is not a peer id. The messages are meant to be shown to users as they are.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParsePeerIdError {
    /// Wrong number of hex digits.
    #[error("a peer id has 32 hex digits (hyphens optional), this has {found}")]
    WrongLength {
        /// Hex digits found.
        found: usize,
    },
    /// A character that is neither a hex digit nor a hyphen.
    #[error("a peer id has only hex digits and hyphens; found {found:?} at position {position}")]
    InvalidChar {
        /// The offending character.
        found: char,
        /// Its position (in characters, from 1).
        position: usize,
    },
    /// Hyphens in the wrong places.
    #[error(
        "hyphens in a peer id go after digits 8, 12, 16 and 20 (8-4-4-4-12), or leave them all out"
    )]
    MisplacedHyphen,
    /// A UUID, but not one derived from a key (not version 8).
    #[error("this is a version {version} UUID; peer ids are version 8 (derived from a key)")]
    NotPeerId {
        /// The version found.
        version: usize,
    },
}

impl FromStr for PeerId {
    type Err = ParsePeerIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let mut digits = [0u8; 32];
        let mut count = 0usize;
        let mut hyphens = Vec::new();
        for (i, c) in s.chars().enumerate() {
            match c {
                '-' => hyphens.push(count),
                c if c.is_ascii_hexdigit() => {
                    if count < 32 {
                        digits[count] = c as u8;
                    }
                    count += 1;
                }
                found => {
                    return Err(ParsePeerIdError::InvalidChar {
                        found,
                        position: i + 1,
                    })
                }
            }
        }
        if count != 32 {
            return Err(ParsePeerIdError::WrongLength { found: count });
        }
        if !hyphens.is_empty() && hyphens != [8, 12, 16, 20] {
            return Err(ParsePeerIdError::MisplacedHyphen);
        }
        let mut bytes = [0u8; 16];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = (hex_value(digits[2 * i]) << 4) | hex_value(digits[2 * i + 1]);
        }
        Self::from_bytes(bytes)
    }
}

fn hex_value(digit: u8) -> u8 {
    match digit {
        b'0'..=b'9' => digit - b'0',
        b'a'..=b'f' => digit - b'a' + 10,
        // Only called on ASCII hex digits.
        _ => digit
            .to_ascii_lowercase()
            .wrapping_sub(b'a')
            .wrapping_add(10),
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerId({})", self.0.hyphenated())
    }
}

impl Serialize for PeerId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.0.hyphenated())
    }
}

impl<'de> Deserialize<'de> for PeerId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> PeerId {
        PeerId::from_key_digest(&[0xab; 32])
    }

    #[test]
    fn version_and_variant_bits_are_set() {
        let id = sample();
        assert_eq!(id.as_uuid().get_version_num(), 8);
        assert_eq!(id.as_uuid().get_variant(), uuid::Variant::RFC4122);
    }

    #[test]
    fn parses_with_and_without_hyphens_and_any_case() {
        let id = sample();
        let hyphenated = id.to_string();
        let simple = hyphenated.replace('-', "");
        assert_eq!(hyphenated.parse::<PeerId>(), Ok(id));
        assert_eq!(simple.parse::<PeerId>(), Ok(id));
        assert_eq!(simple.to_uppercase().parse::<PeerId>(), Ok(id));
        assert_eq!(format!("  {hyphenated}\n").parse::<PeerId>(), Ok(id));
    }

    #[test]
    fn errors_say_what_is_wrong() {
        assert_eq!(
            "abc".parse::<PeerId>(),
            Err(ParsePeerIdError::WrongLength { found: 3 })
        );
        assert_eq!(
            "zz".parse::<PeerId>(),
            Err(ParsePeerIdError::InvalidChar {
                found: 'z',
                position: 1
            })
        );
        let id = sample().to_string().replace('-', "");
        let misplaced = format!("{}-{}", &id[..3], &id[3..]);
        assert_eq!(
            misplaced.parse::<PeerId>(),
            Err(ParsePeerIdError::MisplacedHyphen)
        );
        // A random (v4) UUID is well formed but is not a peer id.
        let v4 = "67e55044-10b1-426f-9247-bb680e5fe0c8";
        assert_eq!(
            v4.parse::<PeerId>(),
            Err(ParsePeerIdError::NotPeerId { version: 4 })
        );
        let msg = ParsePeerIdError::WrongLength { found: 3 }.to_string();
        assert!(msg.contains("32 hex digits"), "{msg}");
    }

    #[test]
    fn serde_round_trip_and_rejects_bad_ids() {
        let id = sample();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{id}\""));
        assert_eq!(serde_json::from_str::<PeerId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<PeerId>("\"nope\"").is_err());
        assert!(serde_json::from_str::<PeerId>("42").is_err());
    }

    proptest! {
        #[test]
        fn any_digest_round_trips(digest in proptest::array::uniform32(any::<u8>())) {
            let id = PeerId::from_key_digest(&digest);
            prop_assert_eq!(id.to_string().parse::<PeerId>(), Ok(id));
            prop_assert_eq!(PeerId::from_bytes(*id.as_bytes()), Ok(id));
        }

        #[test]
        fn arbitrary_strings_never_panic(s in "\\PC{0,80}") {
            let _ = s.parse::<PeerId>();
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::array::uniform16(any::<u8>())) {
            let _ = PeerId::from_bytes(bytes);
        }
    }
}
