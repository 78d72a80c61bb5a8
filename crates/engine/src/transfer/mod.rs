//! The KV hand-off between a prefill (P) and a decode (D) worker, behind vLLM's
//! `kv_transfer_params` protocol: P keeps a finished request's blocks under a lease and
//! serves reads of them; D pulls the blocks its prefix cache lacks into its own store,
//! renewing the lease with heartbeats while it waits, and tells P when it is done.
//!
//! - [`wire`]: the versioned TCP protocol (documented in `docs/kv-transfer.md`).
//! - [`auth`]: the cluster secret, signed params, handshake proofs, lease secrets.
//! - [`handshake`]: the reader's side of the mutually authenticated handshake.
//! - [`lease`]: P's leases.
//! - [`probe`], [`measure`]: a timed read of a worker's blocks without an engine, and
//!   one whole measured hand-off from a running worker (`tandem kv --measure`).
//! - `identity`: the model digest in the compatibility fingerprint.
//! - `server`: P's listener (`--kv-port`).
//! - `puller`: D's reads and heartbeats.
//!
//! The engine loop decides what moves (it owns the block pool); these tasks move the
//! bytes, straight between the socket and the shared [`KvMemory`], and report back
//! through the engine's command channel.

pub mod auth;
pub mod handshake;
mod identity;
pub mod lease;
pub mod measure;
pub mod probe;
pub mod puller;
mod server;
pub mod wire;

use std::time::Duration;

pub use auth::ClusterSecret;
pub use identity::model_identity;
pub use lease::{Handoff, LeaseTable};
pub use puller::{PullFailure, PullJob, PullOutcome, PullerMsg, spawn_puller};
pub use server::KvServer;
pub use wire::Fingerprint;

use tandem_protocol::pd::KvTransferParams;

use crate::kv::{BlockId, KvBlocks};

/// Runs a blocking GPU call (a copy, a staging-buffer allocation) off the async
/// threads; its error becomes a wire error.
#[cfg(feature = "cuda")]
fn gpu_blocking<T, E: std::fmt::Display>(
    call: impl FnOnce() -> Result<T, E>,
) -> Result<T, wire::WireError> {
    tokio::task::block_in_place(call).map_err(|e| wire::WireError::Device(e.to_string()))
}

/// Where a decode request's prompt KV is, as P's `kv_transfer_params` said. Its
/// `Debug` leaves the lease secret out.
#[derive(Clone, PartialEq, Eq)]
pub struct RemotePrefill {
    pub engine_id: String,
    pub host: String,
    pub port: u16,
    pub request_id: String,
    /// P's blocks in prompt order (the first KV group of `remote_block_ids`).
    pub block_ids: Vec<BlockId>,
    /// What P wants to see before it serves the lease (`tandem_lease_secret`; empty
    /// when the params carry none, which their signature check refuses).
    pub lease_secret: String,
}

impl std::fmt::Debug for RemotePrefill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemotePrefill")
            .field("engine_id", &self.engine_id)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("request_id", &self.request_id)
            .field("block_ids", &self.block_ids)
            .field("lease_secret", &"<redacted>")
            .finish()
    }
}

/// Why a decode leg's `kv_transfer_params` name no blocks tandem can read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    #[error("do_remote_prefill needs {0}")]
    Missing(&'static str),
    #[error("do_remote_prefill needs a non-empty remote_block_ids")]
    NoBlocks,
    #[error("remote_block_ids has {0} KV-cache groups; this model has one")]
    Groups(usize),
    #[error("the prefill worker's tp_size is {0}; tandem reads from tp_size 1 only")]
    TensorParallel(u64),
}

impl RemotePrefill {
    /// Where the params say the prompt's KV is: every field vLLM's prefill answer
    /// carries, one KV group of blocks, tensor parallelism 1.
    pub fn from_params(params: &KvTransferParams) -> Result<Self, SourceError> {
        let groups = params
            .remote_block_ids
            .as_ref()
            .ok_or(SourceError::Missing("remote_block_ids"))?
            .groups();
        let block_ids = match groups.as_slice() {
            [ids] if !ids.is_empty() => ids.to_vec(),
            [_] | [] => return Err(SourceError::NoBlocks),
            more => return Err(SourceError::Groups(more.len())),
        };
        if let Some(tp) = params.tp_size.filter(|&tp| tp != 1) {
            return Err(SourceError::TensorParallel(tp));
        }
        let field = |value: Option<&String>, name| value.cloned().ok_or(SourceError::Missing(name));
        Ok(RemotePrefill {
            engine_id: field(params.remote_engine_id.as_ref(), "remote_engine_id")?,
            host: field(params.remote_host.as_ref(), "remote_host")?,
            port: params
                .remote_port
                .ok_or(SourceError::Missing("remote_port"))?,
            request_id: field(params.remote_request_id.as_ref(), "remote_request_id")?,
            block_ids,
            lease_secret: params
                .extra
                .get(auth::PARAM_LEASE_SECRET)
                .and_then(serde_json::Value::as_str)
                .unwrap_or_default()
                .to_owned(),
        })
    }
}

/// What a request does with KV transfer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum KvRole {
    /// An ordinary request.
    #[default]
    Local,
    /// The P leg: keep the prompt's blocks for a remote decode and say where they are.
    RemoteDecode,
    /// The D leg: pull the prompt's KV from P instead of computing it.
    RemotePrefill(RemotePrefill),
}

/// What D does when the KV cannot be pulled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LoadFailurePolicy {
    /// Compute the prompt locally (logged and counted).
    #[default]
    Recompute,
    /// Fail the request.
    Fail,
}

/// Kernel socket buffer of hand-off connections (send on P, receive on D): large
/// enough for several blocks in flight, which lifts loopback throughput.
const SOCKET_BUFFER_BYTES: u32 = 4 << 20;

/// Time limits of the hand-off.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub connect: Duration,
    /// Any single exchange: one message, or one block's bytes.
    pub io: Duration,
    /// A whole pull, handshake to done.
    pub pull: Duration,
    /// An idle connection on the server.
    pub idle: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5),
            io: Duration::from_secs(10),
            pull: Duration::from_secs(60),
            idle: Duration::from_secs(60),
        }
    }
}

/// What both hand-off sides need to know about their own worker.
#[derive(Clone)]
pub struct Local {
    pub engine_id: String,
    /// The cluster secret: without it this worker neither serves nor pulls KV.
    pub secret: Option<ClusterSecret>,
    pub fingerprint: Fingerprint,
    pub memory: KvBlocks,
    pub limits: Limits,
}

/// This host's identity for same-host hand-offs (the kernel's boot id), if known.
pub fn host_identity() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// What a GPU worker offers same-host readers: its KV cache's IPC handle. `None` for
/// host memory, or when the handle cannot be made (then readers get bytes).
pub fn device_export(memory: &KvBlocks) -> Option<wire::DeviceExport> {
    match memory {
        KvBlocks::Host(_) => None,
        #[cfg(feature = "cuda")]
        KvBlocks::Device(kv) => {
            let host = host_identity()?;
            match kv.ipc_handle() {
                Ok(handle) => Some(wire::DeviceExport {
                    host,
                    ipc_handle: handle.iter().map(|b| format!("{b:02x}")).collect(),
                    bytes: kv.allocation_bytes() as u64,
                }),
                Err(err) => {
                    tracing::warn!(%err, "cannot export the KV cache to same-host readers; they will read bytes");
                    None
                }
            }
        }
    }
}

/// A fresh engine id: a random UUID (version 4), as vLLM's default.
pub fn new_engine_id() -> String {
    let bytes: [u8; 16] = rand::random();
    let mut b = bytes;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn engine_ids_are_version_4_uuids() {
        let id = super::new_engine_id();
        let parts: Vec<&str> = id.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(parts[2].starts_with('4'));
        assert_ne!(id, super::new_engine_id());
    }
}
