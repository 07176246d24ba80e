//! Driver tokens and their fingerprints.
//!
//! A [`DriverToken`] is the only type that holds a plain token; its `Debug` and `Display` never
//! print it. Everything that is stored, logged, streamed or measured carries the [`Fingerprint`]
//! instead: HMAC-SHA256 of the token under `token_hash_key`, hex, first 32 characters.

use std::{
    fmt, fs,
    io::{self, Write},
    path::{Path, PathBuf},
};

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

/// Name of the generated key file inside the data dir.
pub const KEY_FILE: &str = "token_hash.key";

const MIN_LEN: usize = 20;
const MAX_LEN: usize = 80;

/// A plain driver token. Redacted in `Debug` and `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct DriverToken(String);

impl DriverToken {
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }

    /// The plain token, for the authorizer, the queue entry and the webhook body only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// True when the token matches `^[A-Za-z0-9._~-]{20,80}$`; any other token is decided INVALID.
    pub fn is_well_formed(&self) -> bool {
        is_well_formed(&self.0)
    }
}

/// The format check of CONTRACT §1, without a regex engine.
pub fn is_well_formed(token: &str) -> bool {
    (MIN_LEN..=MAX_LEN).contains(&token.len())
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'-'))
}

impl fmt::Debug for DriverToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DriverToken(<redacted>)")
    }
}

impl fmt::Display for DriverToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The keyed hash of a driver token: 32 lowercase hex characters.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(String);

impl Fingerprint {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Wraps a fingerprint read back from a store.
    pub fn from_stored(hex: String) -> Self {
        Self(hex)
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Computes fingerprints under one key. Cheap to clone.
#[derive(Clone)]
pub struct Fingerprinter {
    mac: Hmac<Sha256>,
}

impl fmt::Debug for Fingerprinter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Fingerprinter(<key redacted>)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("token_hash_key must not be empty")]
    Empty,
    #[error("cannot read or create the token hash key at {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl Fingerprinter {
    pub fn new(key: &[u8]) -> Result<Self, KeyError> {
        if key.is_empty() {
            return Err(KeyError::Empty);
        }
        let mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts keys of any length");
        Ok(Self { mac })
    }

    /// The configured key, or the one kept in `data_dir`, generated (mode 0600) on first start.
    pub fn load(configured: Option<&str>, data_dir: &Path) -> Result<Self, KeyError> {
        if let Some(key) = configured {
            return Self::new(key.as_bytes());
        }
        let path = data_dir.join(KEY_FILE);
        let io_err = |source| KeyError::Io {
            path: path.clone(),
            source,
        };
        match fs::read_to_string(&path) {
            Ok(key) => Self::new(key.trim().as_bytes()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let mut raw = [0u8; 32];
                rand::rng().fill_bytes(&mut raw);
                let key = hex::encode(raw);
                write_private(&path, key.as_bytes()).map_err(io_err)?;
                Self::new(key.as_bytes())
            }
            Err(e) => Err(io_err(e)),
        }
    }

    /// A key for another purpose (e.g. the decision chain), derived from this one.
    pub fn derive_key(&self, purpose: &str) -> [u8; 32] {
        let mut mac = self.mac.clone();
        mac.update(b"chargegate key derivation\x1f");
        mac.update(purpose.as_bytes());
        mac.finalize().into_bytes().into()
    }

    pub fn fingerprint(&self, token: &DriverToken) -> Fingerprint {
        let mut mac = self.mac.clone();
        mac.update(token.expose().as_bytes());
        let digest = mac.finalize().into_bytes();
        Fingerprint(hex::encode(&digest[..16]))
    }
}

/// Creates `path` with mode 0600 (never readable by others, even for an instant) and syncs it.
fn write_private(path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_check_follows_the_contract() {
        assert!(is_well_formed("abcdefghijklmnopqrst"));
        assert!(is_well_formed(&"A.b_c~d-9".repeat(9)[..80]));
        assert!(!is_well_formed("abcdefghijklmnopqrs"), "19 characters");
        assert!(!is_well_formed(&"a".repeat(81)));
        assert!(!is_well_formed("abcdefghij klmnopqrst"), "space");
        assert!(!is_well_formed("abcdefghijklmnopqrsé"), "non-ASCII");
        assert!(!is_well_formed("abcdefghij+klmnopqrst"), "plus");
    }

    #[test]
    fn fingerprint_is_keyed_hex_and_truncated() {
        let token = DriverToken::new("04A1B2C3D4E5F6A7B8C9D0");
        let a = Fingerprinter::new(b"key-a").unwrap().fingerprint(&token);
        let b = Fingerprinter::new(b"key-b").unwrap().fingerprint(&token);
        assert_eq!(a.as_str().len(), 32);
        assert!(
            a.as_str()
                .bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_ne!(a, b, "the key changes the fingerprint");
        // HMAC-SHA256("key-a", token), checked with an independent implementation.
        let mut mac = Hmac::<Sha256>::new_from_slice(b"key-a").unwrap();
        mac.update(token.expose().as_bytes());
        assert_eq!(a.as_str(), &hex::encode(mac.finalize().into_bytes())[..32]);
    }

    #[test]
    fn generated_key_is_private_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let token = DriverToken::new("04A1B2C3D4E5F6A7B8C9D0");
        let first = Fingerprinter::load(None, dir.path())
            .unwrap()
            .fingerprint(&token);
        let second = Fingerprinter::load(None, dir.path())
            .unwrap()
            .fingerprint(&token);
        assert_eq!(first, second);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.path().join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn token_is_redacted_when_printed() {
        let token = DriverToken::new("04A1B2C3D4E5F6A7B8C9D0");
        assert!(!format!("{token:?} {token}").contains("04A1"));
    }
}
