//! The hand-off wire format (protocol version [`PROTOCOL_VERSION`], documented in
//! `docs/kv-transfer.md`): length-prefixed JSON control messages, and raw block bytes
//! after a [`Message::ReadOk`]. Every read is bounded in size ([`MAX_CONTROL_BYTES`])
//! and in time (the caller's timeout).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::kv::KvLayout;

/// Bumped on any incompatible change of the messages or their meaning.
pub const PROTOCOL_VERSION: u32 = 2;

/// Largest control message accepted (a read of a few thousand block ids fits easily).
pub const MAX_CONTROL_BYTES: usize = 1 << 20;

/// Largest message before a peer has proved the cluster secret (`hello`, `auth`: a
/// nonce, a proof, a fingerprint and an engine id), so that strangers cannot make the
/// server allocate more.
pub const MAX_HANDSHAKE_BYTES: usize = 4 << 10;

/// What must be equal on both sides before any block moves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub protocol_version: u32,
    /// [`crate::LoadedModel`]'s identity digest (weights file and architecture).
    pub model: String,
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    pub kv_dtype: String,
}

impl Fingerprint {
    pub fn new(model: String, layout: KvLayout) -> Self {
        Self {
            protocol_version: PROTOCOL_VERSION,
            model,
            num_layers: layout.num_layers,
            num_kv_heads: layout.num_kv_heads,
            head_dim: layout.head_dim,
            block_size: layout.block_size,
            kv_dtype: layout.dtype.name().to_owned(),
        }
    }

    /// The fields that differ from `other`, for the error message (empty if none).
    pub fn differences(&self, other: &Fingerprint) -> Vec<String> {
        let mut diffs = Vec::new();
        let mut check = |name: &str, a: String, b: String| {
            if a != b {
                diffs.push(format!("{name}: {a} here, {b} there"));
            }
        };
        check(
            "protocol_version",
            self.protocol_version.to_string(),
            other.protocol_version.to_string(),
        );
        check("model", self.model.clone(), other.model.clone());
        check(
            "num_layers",
            self.num_layers.to_string(),
            other.num_layers.to_string(),
        );
        check(
            "num_kv_heads",
            self.num_kv_heads.to_string(),
            other.num_kv_heads.to_string(),
        );
        check(
            "head_dim",
            self.head_dim.to_string(),
            other.head_dim.to_string(),
        );
        check(
            "block_size",
            self.block_size.to_string(),
            other.block_size.to_string(),
        );
        check("kv_dtype", self.kv_dtype.clone(), other.kv_dtype.clone());
        diffs
    }
}

/// How a reader on the same host can copy a GPU worker's blocks itself: a CUDA IPC
/// handle of its KV cache. Sent in the welcome of workers whose KV is in GPU memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceExport {
    /// The host's boot id: readers elsewhere ignore the export.
    pub host: String,
    /// `cuIpcGetMemHandle` of the cache, hex.
    pub ipc_handle: String,
    /// Bytes of the exported allocation.
    pub bytes: u64,
}

/// Why the serving side refused something.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The peer did not prove it holds the cluster secret (all an unauthenticated peer
    /// ever learns).
    Unauthorized,
    /// The fingerprints differ.
    Incompatible,
    /// The reader expected another engine.
    EngineIdMismatch,
    /// No lease under that request id (never existed, released, or expired), or not
    /// with that lease secret.
    UnknownRequest,
    /// A block id is not one of the lease's blocks.
    BlockOutOfRange,
    /// The reader's prompt is not the one whose KV the lease holds.
    PromptMismatch,
    /// A message the server did not expect at this point.
    BadMessage,
}

/// A lease named with the secret P issued for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRef {
    pub request_id: String,
    pub lease_secret: String,
}

/// Every message of the protocol. Reader → server: `Hello`, `Auth`, then any of
/// `Read`, `ReadDevice` (then `ReadDeviceDone`), `Heartbeat`, `Done`. Server → reader:
/// `Challenge`, `Welcome`, `ReadOk` (then the bytes), `ReadDeviceOk`, `Ack`, `Error`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// The reader's first message: a fresh random nonce, hex.
    Hello {
        client_nonce: String,
    },
    /// The server's nonce and its proof that it holds the cluster secret.
    Challenge {
        server_nonce: String,
        server_proof: String,
    },
    /// The reader's proof, then what the server checks once it is authenticated.
    Auth {
        client_proof: String,
        fingerprint: Fingerprint,
        /// The `remote_engine_id` the reader was given.
        engine_id: String,
    },
    Welcome {
        fingerprint: Fingerprint,
        engine_id: String,
        /// Present when the KV is in GPU memory that a reader on this host may map.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        device: Option<DeviceExport>,
    },
    Read {
        request_id: String,
        lease_secret: String,
        block_ids: Vec<u32>,
        /// Prompt tokens the blocks' contents depend on, and their digest
        /// ([`tokens_digest`]).
        num_tokens: usize,
        tokens_digest: String,
    },
    /// `blocks` × `block_bytes` raw bytes follow, in the order of the read's ids.
    ReadOk {
        blocks: usize,
        block_bytes: usize,
    },
    /// Like `Read`, but the reader copies the blocks itself from the exported GPU
    /// memory (same host): the server pins them until `ReadDeviceDone`.
    ReadDevice {
        request_id: String,
        lease_secret: String,
        block_ids: Vec<u32>,
        num_tokens: usize,
        tokens_digest: String,
    },
    /// The blocks are pinned; copy them, then send `ReadDeviceDone`.
    ReadDeviceOk {
        blocks: usize,
    },
    /// The reader's copy is complete (or abandoned): unpin. Answered with `Ack`.
    ReadDeviceDone {
        request_id: String,
        lease_secret: String,
    },
    /// Renews these leases.
    Heartbeat {
        leases: Vec<LeaseRef>,
    },
    /// The reader is done with this request's blocks (read, or never going to).
    Done {
        request_id: String,
        lease_secret: String,
    },
    /// `count`: how many of the named leases existed (with that secret).
    Ack {
        count: usize,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
}

impl Message {
    /// Its `type` on the wire: what error texts and logs name, never its fields (some
    /// carry lease secrets).
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Challenge { .. } => "challenge",
            Message::Auth { .. } => "auth",
            Message::Welcome { .. } => "welcome",
            Message::Read { .. } => "read",
            Message::ReadOk { .. } => "read_ok",
            Message::ReadDevice { .. } => "read_device",
            Message::ReadDeviceOk { .. } => "read_device_ok",
            Message::ReadDeviceDone { .. } => "read_device_done",
            Message::Heartbeat { .. } => "heartbeat",
            Message::Done { .. } => "done",
            Message::Ack { .. } => "ack",
            Message::Error { .. } => "error",
        }
    }
}

/// Failures of one exchange.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("a {len}-byte control message exceeds the {limit}-byte limit")]
    TooLarge { len: usize, limit: usize },
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("the peer closed the connection")]
    Closed,
    /// Copying blocks to or from GPU memory failed.
    #[error("KV memory: {0}")]
    Device(String),
}

/// Runs `io` with a deadline.
pub async fn within<T>(
    limit: Duration,
    io: impl Future<Output = Result<T, WireError>>,
) -> Result<T, WireError> {
    tokio::time::timeout(limit, io)
        .await
        .unwrap_or(Err(WireError::Timeout(limit)))
}

pub async fn send(
    stream: &mut (impl AsyncWrite + Unpin),
    message: &Message,
) -> Result<(), WireError> {
    let body = serde_json::to_vec(message)?;
    if body.len() > MAX_CONTROL_BYTES {
        return Err(WireError::TooLarge {
            len: body.len(),
            limit: MAX_CONTROL_BYTES,
        });
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    stream.write_all(&frame).await?;
    stream.flush().await?;
    Ok(())
}

/// The next message; [`WireError::Closed`] on a clean end of stream before one.
pub async fn receive(stream: &mut (impl AsyncRead + Unpin)) -> Result<Message, WireError> {
    receive_at_most(stream, MAX_CONTROL_BYTES).await
}

/// [`receive`] of a message of at most `limit` bytes (refused before it is read).
pub async fn receive_at_most(
    stream: &mut (impl AsyncRead + Unpin),
    limit: usize,
) -> Result<Message, WireError> {
    let mut len = [0u8; 4];
    match stream.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(WireError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > limit {
        return Err(WireError::TooLarge { len, limit });
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await?;
    Ok(serde_json::from_slice(&body)?)
}

/// Digest of a prompt prefix: SHA-256 of the token ids as little-endian u32, hex.
pub fn tokens_digest(tokens: &[u32]) -> String {
    let mut hasher = Sha256::new();
    for t in tokens {
        hasher.update(t.to_le_bytes());
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The KV layout of the transfer module's unit tests: 2 layers, 1 KV head, head
/// dim 4, blocks of 16, f16.
#[cfg(test)]
pub(crate) fn tiny_layout() -> KvLayout {
    KvLayout {
        num_layers: 2,
        num_kv_heads: 1,
        head_dim: 4,
        block_size: 16,
        dtype: crate::kv::KvDtype::F16,
    }
}

/// The fingerprint of model "m" in [`tiny_layout`].
#[cfg(test)]
pub(crate) fn tiny_fingerprint() -> Fingerprint {
    Fingerprint::new("m".into(), tiny_layout())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn messages_round_trip_through_frames() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let sent = Message::Read {
            request_id: "cmpl-1-0-abcd".into(),
            lease_secret: "00ff".into(),
            block_ids: vec![3, 1, 4],
            num_tokens: 40,
            tokens_digest: tokens_digest(&[1, 2, 3]),
        };
        send(&mut a, &sent).await.unwrap();
        assert_eq!(receive(&mut b).await.unwrap(), sent);
        drop(a);
        assert!(matches!(receive(&mut b).await, Err(WireError::Closed)));
    }

    #[tokio::test]
    async fn oversized_frames_are_refused_before_reading_them() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&(u32::MAX).to_le_bytes()).await.unwrap();
        assert!(matches!(
            receive(&mut b).await,
            Err(WireError::TooLarge { .. })
        ));
    }

    #[test]
    fn welcomes_without_a_device_export_parse_as_before() {
        let layout = tiny_layout();
        let fingerprint = Fingerprint::new("m".into(), layout);
        // What a worker without a GPU (or an older tandem) sends: no `device` key.
        let old = serde_json::json!({
            "type": "welcome",
            "fingerprint": fingerprint,
            "engine_id": "e",
        });
        let parsed: Message = serde_json::from_value(old.clone()).unwrap();
        let plain = Message::Welcome {
            fingerprint: fingerprint.clone(),
            engine_id: "e".into(),
            device: None,
        };
        assert_eq!(parsed, plain);
        assert_eq!(serde_json::to_value(&plain).unwrap(), old);
        let exported = Message::Welcome {
            fingerprint,
            engine_id: "e".into(),
            device: Some(DeviceExport {
                host: "boot".into(),
                ipc_handle: "ab".repeat(64),
                bytes: 1 << 30,
            }),
        };
        let text = serde_json::to_string(&exported).unwrap();
        assert!(text.contains(r#""device":{"host":"boot""#), "{text}");
        assert_eq!(serde_json::from_str::<Message>(&text).unwrap(), exported);
    }

    #[test]
    fn device_reads_have_their_own_message_types() {
        let read = Message::ReadDevice {
            request_id: "r".into(),
            lease_secret: "s".into(),
            block_ids: vec![1],
            num_tokens: 16,
            tokens_digest: "d".into(),
        };
        let text = serde_json::to_string(&read).unwrap();
        assert!(text.starts_with(r#"{"type":"read_device""#), "{text}");
        let done = serde_json::to_string(&Message::ReadDeviceDone {
            request_id: "r".into(),
            lease_secret: "s".into(),
        })
        .unwrap();
        assert_eq!(
            done,
            r#"{"type":"read_device_done","request_id":"r","lease_secret":"s"}"#
        );
    }

    #[test]
    fn version_1_hellos_do_not_parse_as_version_2() {
        // A v1 reader's hello carries its fingerprint and no nonce: the server answers
        // it as an unauthenticated peer.
        let v1 = r#"{"type":"hello","fingerprint":{},"engine_id":"e"}"#;
        assert!(serde_json::from_str::<Message>(v1).is_err());
        let heartbeat = Message::Heartbeat {
            leases: vec![LeaseRef {
                request_id: "r".into(),
                lease_secret: "s".into(),
            }],
        };
        assert_eq!(
            serde_json::to_string(&heartbeat).unwrap(),
            r#"{"type":"heartbeat","leases":[{"request_id":"r","lease_secret":"s"}]}"#
        );
    }

    #[test]
    fn digest_is_sha256_of_little_endian_ids() {
        // python3 -c "import hashlib,struct;print(hashlib.sha256(struct.pack('<2I',1,2)).hexdigest())"
        assert_eq!(
            tokens_digest(&[1, 2]),
            "34fb5c825de7ca4aea6e712f19d439c1da0c92c37b423936c5f618545ca4fa1f"
        );
    }

    #[test]
    fn fingerprint_differences_name_the_fields() {
        let layout = tiny_layout();
        let a = Fingerprint::new("m".into(), layout);
        let b = Fingerprint::new(
            "m".into(),
            KvLayout {
                block_size: 32,
                ..layout
            },
        );
        assert!(a.differences(&a).is_empty());
        assert_eq!(a.differences(&b), vec!["block_size: 16 here, 32 there"]);
    }
}
