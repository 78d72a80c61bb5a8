//! The cluster secret of a topology's built-in workers: the key with which prefill
//! workers sign the hand-off parameters they issue and both sides of a hand-off
//! authenticate each other (`docs/security.md`). `tandem up` takes one from a file or
//! the environment, or makes a fresh one per run, and hands it to every built-in worker
//! through its environment (over ssh's standard input for remote ones), never on a
//! command line, in a log or in `--dry-run`'s output.

use std::fmt;
use std::path::{Path, PathBuf};

/// The environment variable through which workers receive the secret.
pub const SECRET_ENV: &str = "TANDEM_KV_SECRET";

/// Fewest bytes a secret may have (128 bits).
pub const MIN_SECRET_BYTES: usize = 16;

/// Random bytes in a generated secret (written as hex).
const GENERATED_BYTES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("reading the KV secret file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the KV secret from {origin} has {len} bytes; it needs at least {MIN_SECRET_BYTES} \
         (make one with `head -c 32 /dev/urandom | xxd -p -c 64`)"
    )]
    TooShort { origin: String, len: usize },
    #[error("the KV secret from {origin} is not one line of text")]
    NotOneLine { origin: String },
    #[error("no random bytes from the kernel: {0}")]
    Random(std::io::Error),
}

/// A cluster secret. Its `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterSecret(String);

impl ClusterSecret {
    /// A fresh secret: 256 random bits from the kernel, as hex.
    pub fn generate() -> Result<Self, SecretError> {
        let mut bytes = [0u8; GENERATED_BYTES];
        let mut filled = 0;
        while filled < bytes.len() {
            let rest = &mut bytes[filled..];
            // SAFETY: writes at most `rest.len()` bytes into `rest`.
            let got = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
            if got < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() != std::io::ErrorKind::Interrupted {
                    return Err(SecretError::Random(err));
                }
                continue;
            }
            filled += got as usize;
        }
        Ok(Self(bytes.iter().map(|b| format!("{b:02x}")).collect()))
    }

    /// The secret in `path` (its contents, surrounding whitespace trimmed).
    pub fn from_file(path: &Path) -> Result<Self, SecretError> {
        let text = std::fs::read_to_string(path).map_err(|source| SecretError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// The secret in [`SECRET_ENV`], if that is set.
    pub fn from_env() -> Result<Option<Self>, SecretError> {
        match std::env::var(SECRET_ENV) {
            Ok(text) => Self::parse(&text, SECRET_ENV).map(Some),
            Err(_) => Ok(None),
        }
    }

    /// `file` if given, else [`SECRET_ENV`] if set, else a fresh secret.
    pub fn resolve(file: Option<&Path>) -> Result<Self, SecretError> {
        if let Some(path) = file {
            return Self::from_file(path);
        }
        match Self::from_env()? {
            Some(secret) => Ok(secret),
            None => Self::generate(),
        }
    }

    fn parse(text: &str, origin: &str) -> Result<Self, SecretError> {
        // ASCII whitespace only, as the workers trim it.
        let secret = text.trim_ascii();
        if secret.contains(['\n', '\r', '\0']) {
            return Err(SecretError::NotOneLine {
                origin: origin.to_owned(),
            });
        }
        if secret.len() < MIN_SECRET_BYTES {
            return Err(SecretError::TooShort {
                origin: origin.to_owned(),
                len: secret.len(),
            });
        }
        Ok(Self(secret.to_owned()))
    }

    /// The secret itself, for a worker's environment.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterSecret(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_secrets_are_256_bit_hex_and_differ() {
        let a = ClusterSecret::generate().unwrap();
        let b = ClusterSecret::generate().unwrap();
        assert_eq!(a.expose().len(), 64);
        assert!(a.expose().chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        assert!(!format!("{a:?}").contains(a.expose()));
    }

    #[test]
    fn files_are_trimmed_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "0123456789abcdef0123\n").unwrap();
        assert_eq!(
            ClusterSecret::from_file(&path).unwrap().expose(),
            "0123456789abcdef0123"
        );
        std::fs::write(&path, "short\n").unwrap();
        let err = ClusterSecret::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("at least 16"), "{err}");
        std::fs::write(&path, "0123456789abcdef\n0123456789abcdef").unwrap();
        assert!(matches!(
            ClusterSecret::from_file(&path),
            Err(SecretError::NotOneLine { .. })
        ));
        let missing = ClusterSecret::from_file(&dir.path().join("nope")).unwrap_err();
        assert!(missing.to_string().contains("nope"), "{missing}");
    }
}
