//! Who may take part in a KV hand-off. Owns the cluster secret (read from a file or
//! `TANDEM_KV_SECRET`, never logged), the signature a prefill worker puts on the
//! `kv_transfer_params` it issues (checked by the decode worker before it connects
//! anywhere), the proofs of the KV port's mutual handshake, per-lease secrets, and the
//! constant-time comparisons they all rest on. Everything here is HMAC-SHA256 under
//! the cluster secret, each use under its own label, so no proof or signature of one
//! kind is valid as another.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use tandem_protocol::pd::KvTransferParams;

use super::RemotePrefill;

type HmacSha256 = Hmac<Sha256>;

/// The environment variable holding the secret itself (a file given by
/// `--kv-secret-file` wins over it).
pub const SECRET_ENV: &str = "TANDEM_KV_SECRET";
/// Shortest secret accepted, in bytes (after trimming whitespace).
pub const MIN_SECRET_BYTES: usize = 16;
/// Random bytes of each handshake nonce.
pub const NONCE_BYTES: usize = 32;
/// Random bytes of each lease secret.
pub const LEASE_SECRET_BYTES: usize = 16;
/// How far the clocks of P and D may disagree when D checks a signature's expiry.
pub const CLOCK_SKEW_SECS: u64 = 60;

/// The `kv_transfer_params` keys tandem adds to vLLM's dict (vLLM ignores them).
pub const PARAM_LEASE_SECRET: &str = "tandem_lease_secret";
pub const PARAM_EXPIRES_AT: &str = "tandem_expires_at";
pub const PARAM_SIGNATURE: &str = "tandem_signature";

/// What to do about a missing secret, for error messages.
pub const HOW_TO_CONFIGURE: &str = "give every worker of the cluster the same secret of at \
     least 16 bytes, in a file named by `--kv-secret-file PATH` or in the TANDEM_KV_SECRET \
     environment variable (e.g. `export TANDEM_KV_SECRET=$(head -c 32 /dev/urandom | xxd -p \
     -c 64)`); `tandem up` generates one for its workers";

const PARAMS_LABEL: &[u8] = b"tandem-kv-params";
const PARAMS_VERSION: u32 = 1;
const SERVER_PROOF_LABEL: &[u8] = b"tandem-kv-v2 server";
const CLIENT_PROOF_LABEL: &[u8] = b"tandem-kv-v2 client";

/// The secret every worker of one cluster shares. Its `Debug` does not show it.
#[derive(Clone)]
pub struct ClusterSecret(Arc<[u8]>);

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecret(<redacted>)")
    }
}

/// Why no usable secret could be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read the KV secret file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the KV secret from {origin} is {len} bytes long; it needs at least \
         {MIN_SECRET_BYTES}: {HOW_TO_CONFIGURE}"
    )]
    TooShort { origin: String, len: usize },
}

impl ClusterSecret {
    /// A secret from its text: surrounding whitespace trimmed, at least
    /// [`MIN_SECRET_BYTES`] left. `origin` names where it came from, for the error.
    pub fn new(secret: &[u8], origin: &str) -> Result<Self, SecretError> {
        let trimmed = secret.trim_ascii();
        if trimmed.len() < MIN_SECRET_BYTES {
            return Err(SecretError::TooShort {
                origin: origin.to_owned(),
                len: trimmed.len(),
            });
        }
        Ok(Self(trimmed.into()))
    }

    /// The secret of `file` if given, else of `env` (the value of [`SECRET_ENV`]; empty
    /// counts as unset); `None` when neither is.
    pub fn load(file: Option<&Path>, env: Option<OsString>) -> Result<Option<Self>, SecretError> {
        if let Some(path) = file {
            let bytes = std::fs::read(path).map_err(|source| SecretError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            let origin = format!("file {}", path.display());
            return Self::new(&bytes, &origin).map(Some);
        }
        match env {
            Some(value) if !value.as_encoded_bytes().trim_ascii().is_empty() => {
                Self::new(value.as_encoded_bytes(), SECRET_ENV).map(Some)
            }
            _ => Ok(None),
        }
    }

    /// [`Self::load`] with this process's [`SECRET_ENV`].
    pub fn from_file_or_env(file: Option<&Path>) -> Result<Option<Self>, SecretError> {
        Self::load(file, std::env::var_os(SECRET_ENV))
    }

    /// An HMAC over `parts`, each fed in order (callers make the encoding unambiguous).
    fn mac(&self, parts: &[&[u8]]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        for part in parts {
            mac.update(part);
        }
        mac
    }

    /// Whether `tag_hex` is the HMAC of `parts`, compared in constant time.
    fn verifies(&self, parts: &[&[u8]], tag_hex: &str) -> bool {
        from_hex(tag_hex).is_some_and(|tag| self.mac(parts).verify_slice(&tag).is_ok())
    }

    fn tag(&self, parts: &[&[u8]]) -> String {
        to_hex(&self.mac(parts).finalize().into_bytes())
    }
}

/// What P's signature on a decode leg's `kv_transfer_params` covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignedParams<'a> {
    pub engine_id: &'a str,
    pub request_id: &'a str,
    pub block_ids: &'a [u32],
    pub host: &'a str,
    pub port: u16,
    pub num_tokens: u64,
    /// Unix seconds after which D refuses the params.
    pub expires_at: u64,
    pub lease_secret: &'a str,
}

/// Why D refuses a decode leg's params without connecting anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParamsRejection {
    #[error(
        "kv_transfer_params lack {0}: they were not issued by a prefill worker of this cluster"
    )]
    Unsigned(&'static str),
    #[error("the kv_transfer_params signature is not this cluster's")]
    BadSignature,
    #[error("the kv_transfer_params expired")]
    Expired,
}

impl SignedParams<'_> {
    /// Label, version, then every field length-prefixed (u64 little-endian) or fixed-width,
    /// so no two different field sets encode alike.
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128 + 4 * self.block_ids.len());
        put_bytes(&mut out, PARAMS_LABEL);
        out.extend_from_slice(&PARAMS_VERSION.to_le_bytes());
        put_bytes(&mut out, self.engine_id.as_bytes());
        put_bytes(&mut out, self.request_id.as_bytes());
        out.extend_from_slice(&(self.block_ids.len() as u64).to_le_bytes());
        for id in self.block_ids {
            out.extend_from_slice(&id.to_le_bytes());
        }
        put_bytes(&mut out, self.host.as_bytes());
        out.extend_from_slice(&u64::from(self.port).to_le_bytes());
        out.extend_from_slice(&self.num_tokens.to_le_bytes());
        out.extend_from_slice(&self.expires_at.to_le_bytes());
        put_bytes(&mut out, self.lease_secret.as_bytes());
        out
    }

    /// The hex HMAC-SHA256 of the fields under `secret`.
    pub fn sign(&self, secret: &ClusterSecret) -> String {
        secret.tag(&[&self.encode()])
    }

    /// Checks `signature` (constant time) and the expiry, allowing [`CLOCK_SKEW_SECS`].
    pub fn verify(
        &self,
        secret: &ClusterSecret,
        signature: &str,
        now_unix: u64,
    ) -> Result<(), ParamsRejection> {
        if !secret.verifies(&[&self.encode()], signature) {
            return Err(ParamsRejection::BadSignature);
        }
        if now_unix > self.expires_at.saturating_add(CLOCK_SKEW_SECS) {
            return Err(ParamsRejection::Expired);
        }
        Ok(())
    }
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Checks that `params` (whose read is `source`) were signed by a worker holding
/// `secret` and have not expired.
pub fn verify_params(
    secret: &ClusterSecret,
    source: &RemotePrefill,
    params: &KvTransferParams,
    now_unix: u64,
) -> Result<(), ParamsRejection> {
    let num_tokens = params
        .remote_num_tokens
        .ok_or(ParamsRejection::Unsigned("remote_num_tokens"))?;
    let expires_at = params
        .extra
        .get(PARAM_EXPIRES_AT)
        .and_then(serde_json::Value::as_u64)
        .ok_or(ParamsRejection::Unsigned(PARAM_EXPIRES_AT))?;
    let signature = params
        .extra
        .get(PARAM_SIGNATURE)
        .and_then(serde_json::Value::as_str)
        .ok_or(ParamsRejection::Unsigned(PARAM_SIGNATURE))?;
    if source.lease_secret.is_empty() {
        return Err(ParamsRejection::Unsigned(PARAM_LEASE_SECRET));
    }
    let signed = SignedParams {
        engine_id: &source.engine_id,
        request_id: &source.request_id,
        block_ids: &source.block_ids,
        host: &source.host,
        port: source.port,
        num_tokens,
        expires_at,
        lease_secret: &source.lease_secret,
    };
    signed.verify(secret, signature, now_unix)
}

/// Seconds since the Unix epoch (0 for a clock before it).
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A handshake nonce: [`NONCE_BYTES`] random bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nonce([u8; NONCE_BYTES]);

impl Nonce {
    pub fn random() -> Self {
        Self(rand::random())
    }

    /// A peer's nonce from hex; `None` unless exactly [`NONCE_BYTES`] bytes.
    pub fn from_hex(hex: &str) -> Option<Self> {
        from_hex(hex)?.try_into().ok().map(Self)
    }

    pub fn to_hex(&self) -> String {
        to_hex(&self.0)
    }
}

/// P's proof that it holds the secret: HMAC(K, server label ‖ client nonce ‖ server nonce).
pub fn server_proof(secret: &ClusterSecret, client: &Nonce, server: &Nonce) -> String {
    secret.tag(&[SERVER_PROOF_LABEL, &client.0, &server.0])
}

/// D's proof, under another label than P's, so that P's proof is never valid as D's.
pub fn client_proof(secret: &ClusterSecret, client: &Nonce, server: &Nonce) -> String {
    secret.tag(&[CLIENT_PROOF_LABEL, &client.0, &server.0])
}

pub fn verify_server_proof(
    secret: &ClusterSecret,
    client: &Nonce,
    server: &Nonce,
    proof: &str,
) -> bool {
    secret.verifies(&[SERVER_PROOF_LABEL, &client.0, &server.0], proof)
}

pub fn verify_client_proof(
    secret: &ClusterSecret,
    client: &Nonce,
    server: &Nonce,
    proof: &str,
) -> bool {
    secret.verifies(&[CLIENT_PROOF_LABEL, &client.0, &server.0], proof)
}

/// A fresh lease secret: [`LEASE_SECRET_BYTES`] random bytes, hex.
pub fn new_lease_secret() -> String {
    to_hex(&rand::random::<[u8; LEASE_SECRET_BYTES]>())
}

/// Whether two secrets are equal, in time independent of where they differ.
pub fn secrets_equal(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(hex: &str) -> Option<Vec<u8>> {
    // Digits only (`from_str_radix` alone would take a `+`): one spelling per value.
    if !hex.len().is_multiple_of(2) || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(text: &str) -> ClusterSecret {
        ClusterSecret::new(text.as_bytes(), "test").unwrap()
    }

    fn cluster() -> ClusterSecret {
        secret("correct horse battery staple")
    }

    const BLOCKS: [u32; 3] = [12, 13, 14];

    fn fields() -> SignedParams<'static> {
        SignedParams {
            engine_id: "3c1e-engine",
            request_id: "cmpl-R-0-1a2b3c4d",
            block_ids: &BLOCKS,
            host: "10.0.0.5",
            port: 5600,
            num_tokens: 37,
            expires_at: 1_000_000,
            lease_secret: "00112233445566778899aabbccddeeff",
        }
    }

    #[test]
    fn secrets_are_trimmed_and_at_least_16_bytes() {
        assert!(ClusterSecret::new(b"  0123456789abcdef\n", "t").is_ok());
        let err = ClusterSecret::new(b"  0123456789abcde \n", "t").unwrap_err();
        assert!(err.to_string().contains("15 bytes"), "{err}");
        assert!(err.to_string().contains("TANDEM_KV_SECRET"), "{err}");
        // Trimmed secrets are the same secret.
        let a = ClusterSecret::new(b"0123456789abcdef\n", "t").unwrap();
        let b = ClusterSecret::new(b"0123456789abcdef", "t").unwrap();
        assert_eq!(fields().sign(&a), fields().sign(&b));
        assert_eq!(format!("{a:?}"), "ClusterSecret(<redacted>)");
    }

    #[test]
    fn a_secret_file_wins_over_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret");
        std::fs::write(&file, "file-secret-0123456789\n").unwrap();
        let env = || Some(OsString::from("env-secret-0123456789"));
        let from_file = ClusterSecret::load(Some(&file), env()).unwrap().unwrap();
        let from_env = ClusterSecret::load(None, env()).unwrap().unwrap();
        assert_eq!(
            fields().sign(&from_file),
            fields().sign(&secret("file-secret-0123456789"))
        );
        assert_eq!(
            fields().sign(&from_env),
            fields().sign(&secret("env-secret-0123456789"))
        );
        assert!(ClusterSecret::load(None, None).unwrap().is_none());
        assert!(
            ClusterSecret::load(None, Some(" ".into()))
                .unwrap()
                .is_none()
        );
        let missing = dir.path().join("none");
        assert!(matches!(
            ClusterSecret::load(Some(&missing), env()),
            Err(SecretError::Read { .. })
        ));
        std::fs::write(&file, "short\n").unwrap();
        assert!(matches!(
            ClusterSecret::load(Some(&file), env()),
            Err(SecretError::TooShort { len: 5, .. })
        ));
    }

    #[test]
    fn signed_params_verify_and_any_tampering_is_caught() {
        let key = cluster();
        let signature = fields().sign(&key);
        assert_eq!(signature.len(), 64);
        let now = fields().expires_at - 10;
        fields().verify(&key, &signature, now).unwrap();
        let other_blocks = [12, 13, 15];
        let fewer_blocks = [12, 13];
        let tampered = [
            SignedParams {
                engine_id: "3c1e-engine2",
                ..fields()
            },
            SignedParams {
                request_id: "cmpl-R-0-1a2b3c4e",
                ..fields()
            },
            SignedParams {
                block_ids: &other_blocks,
                ..fields()
            },
            SignedParams {
                block_ids: &fewer_blocks,
                ..fields()
            },
            SignedParams {
                host: "10.0.0.6",
                ..fields()
            },
            SignedParams {
                port: 5601,
                ..fields()
            },
            SignedParams {
                num_tokens: 36,
                ..fields()
            },
            SignedParams {
                expires_at: fields().expires_at + 3600,
                ..fields()
            },
            SignedParams {
                lease_secret: "00112233445566778899aabbccddeefe",
                ..fields()
            },
        ];
        for forged in tampered {
            assert_eq!(
                forged.verify(&key, &signature, now),
                Err(ParamsRejection::BadSignature),
                "{forged:?}"
            );
        }
        // Another cluster's secret, a mangled signature.
        let other = secret("another cluster's secret");
        assert_eq!(
            fields().verify(&other, &signature, now),
            Err(ParamsRejection::BadSignature)
        );
        for bad in ["", "zz", &signature[..62], &format!("{signature}00")] {
            assert_eq!(
                fields().verify(&key, bad, now),
                Err(ParamsRejection::BadSignature)
            );
        }
    }

    #[test]
    fn length_prefixes_keep_fields_apart() {
        // The same bytes split differently between two fields sign differently.
        let a = SignedParams {
            engine_id: "ab",
            request_id: "c",
            ..fields()
        };
        let b = SignedParams {
            engine_id: "a",
            request_id: "bc",
            ..fields()
        };
        assert_ne!(a.encode(), b.encode());
    }

    #[test]
    fn signatures_expire_after_the_clock_skew_allowance() {
        let key = cluster();
        let signature = fields().sign(&key);
        let expiry = fields().expires_at;
        fields()
            .verify(&key, &signature, expiry + CLOCK_SKEW_SECS)
            .unwrap();
        assert_eq!(
            fields().verify(&key, &signature, expiry + CLOCK_SKEW_SECS + 1),
            Err(ParamsRejection::Expired)
        );
    }

    #[test]
    fn params_without_the_signature_keys_are_unsigned() {
        let key = cluster();
        let source = RemotePrefill {
            engine_id: "3c1e-engine".into(),
            host: "10.0.0.5".into(),
            port: 5600,
            request_id: "cmpl-R-0-1a2b3c4d".into(),
            block_ids: BLOCKS.to_vec(),
            lease_secret: fields().lease_secret.into(),
        };
        let mut params = KvTransferParams {
            remote_num_tokens: Some(37),
            ..KvTransferParams::default()
        };
        assert_eq!(
            verify_params(&key, &source, &params, 0),
            Err(ParamsRejection::Unsigned(PARAM_EXPIRES_AT))
        );
        params
            .extra
            .insert(PARAM_EXPIRES_AT.into(), 1_000_000.into());
        assert_eq!(
            verify_params(&key, &source, &params, 0),
            Err(ParamsRejection::Unsigned(PARAM_SIGNATURE))
        );
        params
            .extra
            .insert(PARAM_SIGNATURE.into(), fields().sign(&key).into());
        verify_params(&key, &source, &params, 0).unwrap();
        let unleased = RemotePrefill {
            lease_secret: String::new(),
            ..source
        };
        assert_eq!(
            verify_params(&key, &unleased, &params, 0),
            Err(ParamsRejection::Unsigned(PARAM_LEASE_SECRET))
        );
    }

    #[test]
    fn handshake_proofs_need_the_same_secret_and_do_not_reflect() {
        let key = cluster();
        let (c, s) = (Nonce::random(), Nonce::random());
        assert_ne!(c, s);
        assert_eq!(Nonce::from_hex(&c.to_hex()), Some(c));
        assert_eq!(Nonce::from_hex(&c.to_hex()[..62]), None);
        let server = server_proof(&key, &c, &s);
        let client = client_proof(&key, &c, &s);
        assert!(verify_server_proof(&key, &c, &s, &server));
        assert!(verify_client_proof(&key, &c, &s, &client));
        // Reflection: P's proof handed back as D's (or the reverse) is refused.
        assert!(!verify_client_proof(&key, &c, &s, &server));
        assert!(!verify_server_proof(&key, &c, &s, &client));
        // Nonces swapped (a peer replaying the other side's role).
        assert!(!verify_client_proof(&key, &s, &c, &client));
        // A wrong secret on either side.
        let wrong = secret("not the cluster secret!");
        assert!(!verify_server_proof(&wrong, &c, &s, &server));
        assert!(!verify_client_proof(
            &key,
            &c,
            &s,
            &client_proof(&wrong, &c, &s)
        ));
        // Another session's nonces.
        let s2 = Nonce::random();
        assert!(!verify_client_proof(&key, &c, &s2, &client));
    }

    #[test]
    fn lease_secrets_are_random_and_compared_exactly() {
        let a = new_lease_secret();
        assert_eq!(a.len(), 2 * LEASE_SECRET_BYTES);
        assert_ne!(a, new_lease_secret());
        assert!(secrets_equal(&a, &a.clone()));
        assert!(!secrets_equal(&a, &a[..31]));
        assert!(!secrets_equal(&a, ""));
        assert!(!secrets_equal(&a, &new_lease_secret()));
    }
}
