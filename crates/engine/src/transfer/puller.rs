//! D's side of the hand-off: one task that owns the decode requests waiting for remote
//! KV. It renews their leases on P with heartbeats until their pull starts, runs each
//! pull (mutually authenticated handshake, read straight into the blocks the engine
//! allocated, done) under a deadline, tells P "done" for requests that will never read,
//! and reports every pull's outcome to the engine loop. Requests reach it only after
//! their params' signature was checked (`api::handoff`), so it connects only where a
//! worker holding the cluster secret said the KV is.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::handshake::{self, Greeting};
use super::wire::{self, DeviceExport, LeaseRef, Message, WireError, within};
use super::{Local, RemotePrefill, SOCKET_BUFFER_BYTES};
use crate::kv::{BlockId, KvBlocks};
use crate::metrics as names;
use crate::sched::{SeqId, WeakEngine};

/// What the engine loop tells the puller.
#[derive(Debug)]
pub enum PullerMsg {
    /// A decode request with remote KV arrived: keep its lease alive.
    Track { seq: SeqId, source: RemotePrefill },
    /// Its blocks are allocated: read them.
    Pull(PullJob),
    /// It will not read (its prompt is cached here, or it ended): tell P to free.
    Release { seq: SeqId },
}

/// One read: P's blocks into the engine's blocks, pairwise.
#[derive(Debug)]
pub struct PullJob {
    pub seq: SeqId,
    pub source: RemotePrefill,
    pub remote_blocks: Vec<BlockId>,
    /// Owned by the waiting sequence: nobody else touches them until the outcome is in.
    pub local_blocks: Vec<BlockId>,
    /// Prompt tokens the blocks depend on, and their digest (checked by P).
    pub num_tokens: usize,
    pub tokens_digest: String,
}

/// Why a pull failed, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The params were not signed by a worker of this cluster, or expired (never
    /// pulled: nothing connects anywhere).
    Unauthenticated,
    /// P could not be reached.
    Unreachable,
    /// P refused the handshake (secret, fingerprint, engine id), did not prove it holds
    /// the cluster secret, or answered wrongly.
    Handshake,
    /// P refused the read (unknown or expired request, foreign blocks, other prompt).
    Refused,
    /// The connection failed or stalled mid-transfer.
    Transfer,
    /// The request's `kv_transfer_params` cannot describe a read.
    InvalidParams,
}

impl FailureKind {
    pub fn label(self) -> &'static str {
        match self {
            FailureKind::Unauthenticated => "unauthenticated",
            FailureKind::Unreachable => "unreachable",
            FailureKind::Handshake => "handshake",
            FailureKind::Refused => "refused",
            FailureKind::Transfer => "transfer",
            FailureKind::InvalidParams => "invalid_params",
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("KV transfer from {source_addr} failed ({}): {message}", kind.label())]
pub struct PullFailure {
    pub kind: FailureKind,
    pub source_addr: String,
    pub message: String,
}

impl PullFailure {
    pub fn new(kind: FailureKind, source: &RemotePrefill, message: impl Into<String>) -> Self {
        Self {
            kind,
            source_addr: format!("{}:{}", source.host, source.port),
            message: message.into(),
        }
    }

    /// What the client of the failed request is told. For failures on the network only
    /// the kind: the address and the error stay in this worker's log (a client must
    /// not learn about the network through it).
    pub fn client_message(&self) -> String {
        let kind = self.kind.label();
        match self.kind {
            FailureKind::InvalidParams | FailureKind::Unauthenticated => {
                format!("KV transfer failed ({kind}): {}", self.message)
            }
            _ => format!(
                "KV transfer from the prefill worker failed ({kind}); the decode worker's \
                 log has the details"
            ),
        }
    }

    /// Counts the failure in the metrics.
    pub fn record(&self) {
        metrics::counter!(names::KV_TRANSFER_FAILURES_TOTAL, names::KIND => self.kind.label())
            .increment(1);
    }
}

/// A finished pull: how much moved, or why nothing usable did.
pub type PullOutcome = Result<PullStats, PullFailure>;

#[derive(Debug, Clone, Copy)]
pub struct PullStats {
    pub blocks: usize,
    pub bytes: usize,
    pub elapsed: Duration,
}

/// Starts the puller; it ends when the engine drops its sender.
pub fn spawn_puller(
    messages: mpsc::UnboundedReceiver<PullerMsg>,
    engine: WeakEngine,
    local: Local,
    heartbeat_every: Duration,
) -> JoinHandle<()> {
    tokio::spawn(run(messages, engine, local, heartbeat_every))
}

async fn run(
    mut messages: mpsc::UnboundedReceiver<PullerMsg>,
    engine: WeakEngine,
    local: Local,
    heartbeat_every: Duration,
) {
    let mut waiting: HashMap<SeqId, RemotePrefill> = HashMap::new();
    let mut tick = tokio::time::interval(heartbeat_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            message = messages.recv() => match message {
                None => return,
                Some(PullerMsg::Track { seq, source }) => {
                    waiting.insert(seq, source);
                }
                Some(PullerMsg::Pull(job)) => {
                    waiting.remove(&job.seq);
                    let (engine, local) = (engine.clone(), local.clone());
                    tokio::spawn(async move {
                        let seq = job.seq;
                        let outcome = pull(job, &local).await;
                        engine.pulled(seq, outcome);
                    });
                }
                Some(PullerMsg::Release { seq }) => {
                    if let Some(source) = waiting.remove(&seq) {
                        let local = local.clone();
                        tokio::spawn(async move { tell_done(&source, &local).await });
                    }
                }
            },
            _ = tick.tick() => send_heartbeats(&waiting, &local),
        }
    }
}

/// One heartbeat per P endpoint, naming all of its requests still waiting here.
fn send_heartbeats(waiting: &HashMap<SeqId, RemotePrefill>, local: &Local) {
    let mut by_source: HashMap<(String, u16, String), Vec<LeaseRef>> = HashMap::new();
    for source in waiting.values() {
        let key = (source.host.clone(), source.port, source.engine_id.clone());
        by_source.entry(key).or_default().push(lease_ref(source));
    }
    for ((host, port, engine_id), leases) in by_source {
        let local = local.clone();
        tokio::spawn(async move {
            let heartbeat = Message::Heartbeat { leases };
            if let Err(err) = exchange(&host, port, &engine_id, &heartbeat, &local).await {
                tracing::debug!(%host, port, %err, "KV lease heartbeat failed");
            }
        });
    }
}

fn lease_ref(source: &RemotePrefill) -> LeaseRef {
    LeaseRef {
        request_id: source.request_id.clone(),
        lease_secret: source.lease_secret.clone(),
    }
}

fn done_message(source: &RemotePrefill) -> Message {
    Message::Done {
        request_id: source.request_id.clone(),
        lease_secret: source.lease_secret.clone(),
    }
}

async fn tell_done(source: &RemotePrefill, local: &Local) {
    let done = done_message(source);
    if let Err(err) = exchange(&source.host, source.port, &source.engine_id, &done, local).await {
        tracing::debug!(request_id = source.request_id, %err, "could not tell P to free its blocks");
    }
}

/// One acknowledged message on a fresh connection to P (heartbeats, late dones).
async fn exchange(
    host: &str,
    port: u16,
    engine_id: &str,
    message: &Message,
    local: &Local,
) -> Result<(), Failed> {
    let secret = secret_of(local)?;
    let mut stream = connect(host, port, local).await?;
    handshake(&mut stream, engine_id, secret, local).await?;
    request(&mut stream, message, local).await
}

/// The cluster secret; without one this worker never connects to a P.
fn secret_of(local: &Local) -> Result<&super::ClusterSecret, Failed> {
    local.secret.as_ref().ok_or_else(|| {
        Failed(
            FailureKind::Unauthenticated,
            "this worker has no KV secret".into(),
        )
    })
}

/// An exchange error, classified by when it happened.
struct Failed(FailureKind, String);

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.0.label(), self.1)
    }
}

impl From<WireError> for Failed {
    fn from(err: WireError) -> Self {
        Failed(FailureKind::Transfer, err.to_string())
    }
}

async fn connect(host: &str, port: u16, local: &Local) -> Result<TcpStream, Failed> {
    let connecting = async {
        let mut last_error = None;
        for addr in tokio::net::lookup_host((host, port)).await? {
            let socket = if addr.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES)?;
            match socket.connect(addr).await {
                Ok(stream) => return Ok(stream),
                Err(err) => last_error = Some(err),
            }
        }
        Err(last_error.unwrap_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, "the host has no address")
        }))
    };
    let stream = tokio::time::timeout(local.limits.connect, connecting)
        .await
        .map_err(|_| {
            Failed(
                FailureKind::Unreachable,
                format!("no connection within {:?}", local.limits.connect),
            )
        })?
        .map_err(|e| Failed(FailureKind::Unreachable, e.to_string()))?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// The mutually authenticated handshake; returns what P offers same-host readers of
/// GPU memory.
async fn handshake(
    stream: &mut TcpStream,
    engine_id: &str,
    secret: &super::ClusterSecret,
    local: &Local,
) -> Result<Option<DeviceExport>, Failed> {
    let greeting = Greeting {
        secret,
        fingerprint: &local.fingerprint,
        engine_id,
        io: local.limits.io,
    };
    handshake::greet(stream, &greeting)
        .await
        .map_err(|e| Failed(FailureKind::Handshake, e.to_string()))
}

/// Sends a heartbeat or done and waits for its acknowledgement.
async fn request(stream: &mut TcpStream, message: &Message, local: &Local) -> Result<(), Failed> {
    within(local.limits.io, wire::send(stream, message)).await?;
    match within(local.limits.io, wire::receive(stream)).await? {
        Message::Ack { .. } => Ok(()),
        other => Err(Failed(
            FailureKind::Transfer,
            format!("unexpected answer {}", other.kind()),
        )),
    }
}

async fn pull(job: PullJob, local: &Local) -> PullOutcome {
    let started = Instant::now();
    let deadline = local.limits.pull;
    let result = match tokio::time::timeout(deadline, read_blocks(&job, local)).await {
        Ok(result) => result,
        Err(_) => Err(Failed(
            FailureKind::Transfer,
            format!("the transfer did not finish within {deadline:?}"),
        )),
    };
    match result {
        Ok(bytes) => {
            let elapsed = started.elapsed();
            metrics::counter!(names::KV_TRANSFER_BYTES_TOTAL, names::DIRECTION => "received")
                .increment(bytes as u64);
            metrics::counter!(names::KV_TRANSFER_BLOCKS_TOTAL, names::DIRECTION => "received")
                .increment(job.local_blocks.len() as u64);
            metrics::histogram!(names::KV_TRANSFER_SECONDS).record(elapsed.as_secs_f64());
            Ok(PullStats {
                blocks: job.local_blocks.len(),
                bytes,
                elapsed,
            })
        }
        Err(Failed(kind, message)) => {
            let failure = PullFailure::new(kind, &job.source, message);
            failure.record();
            #[cfg(feature = "cuda")]
            if let (FailureKind::Unreachable | FailureKind::Handshake, KvBlocks::Device(kv)) =
                (kind, &local.memory)
            {
                // P is gone or restarted: stop mapping its memory.
                kv.unmap_peer(&job.source.engine_id);
            }
            if matches!(kind, FailureKind::Refused | FailureKind::Transfer) {
                // P may still hold blocks for this request; this reader is done with them.
                let (source, local) = (job.source.clone(), local.clone());
                tokio::spawn(async move { tell_done(&source, &local).await });
            }
            Err(failure)
        }
    }
}

/// Handshake, read, done; returns the bytes read.
async fn read_blocks(job: &PullJob, local: &Local) -> Result<usize, Failed> {
    let source = &job.source;
    let secret = secret_of(local)?;
    let mut stream = connect(&source.host, source.port, local).await?;
    let export = handshake(&mut stream, &source.engine_id, secret, local).await?;
    if let Some(peer) = export.and_then(|e| mapped_peer(&e, &source.engine_id, local)) {
        return read_from_device(&mut stream, job, local, peer).await;
    }
    let read = Message::Read {
        request_id: source.request_id.clone(),
        lease_secret: source.lease_secret.clone(),
        block_ids: job.remote_blocks.clone(),
        num_tokens: job.num_tokens,
        tokens_digest: job.tokens_digest.clone(),
    };
    within(local.limits.io, wire::send(&mut stream, &read)).await?;
    let block_bytes = local.memory.layout().bytes_per_block();
    match within(local.limits.io, wire::receive(&mut stream)).await? {
        Message::ReadOk {
            blocks,
            block_bytes: theirs,
        } if blocks == job.local_blocks.len() && theirs == block_bytes => {}
        Message::Error { message, .. } => return Err(Failed(FailureKind::Refused, message)),
        other => {
            return Err(Failed(
                FailureKind::Transfer,
                format!("unexpected answer to a read: {}", other.kind()),
            ));
        }
    }
    // SAFETY: the waiting sequence owns these blocks and the engine loop leaves them
    // alone until this pull's outcome arrives (which happens after this future ends).
    unsafe {
        receive_blocks(
            &mut stream,
            &local.memory,
            &job.local_blocks,
            local.limits.io,
        )
    }
    .await?;
    // The data is in; a lost "done" only leaves P's lease to expire.
    let done = done_message(source);
    if let Err(Failed(_, err)) = request(&mut stream, &done, local).await {
        tracing::debug!(request_id = source.request_id, %err, "P did not acknowledge done");
    }
    Ok(job.local_blocks.len() * block_bytes)
}

/// P's exported GPU memory mapped here, when both sides' KV is on GPUs of this host
/// (else `None`: the blocks come as bytes).
#[cfg(feature = "cuda")]
fn mapped_peer(
    export: &DeviceExport,
    engine_id: &str,
    local: &Local,
) -> Option<std::sync::Arc<crate::cuda::kv::MappedPeer>> {
    let KvBlocks::Device(kv) = &local.memory else {
        return None;
    };
    if super::host_identity().as_deref() != Some(export.host.as_str()) {
        return None;
    }
    let handle = parse_handle(&export.ipc_handle)?;
    // Opening a mapping takes tens of milliseconds the first time: off the async threads.
    tokio::task::block_in_place(|| kv.map_peer(engine_id, handle))
}

#[cfg(not(feature = "cuda"))]
fn mapped_peer(_: &DeviceExport, _: &str, _: &Local) -> Option<NoMapping> {
    None
}

/// Stands for a mapping in builds without GPUs (never made).
#[cfg(not(feature = "cuda"))]
enum NoMapping {}

/// 64 bytes from 128 hex digits.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn parse_handle(hex: &str) -> Option<[u8; 64]> {
    if hex.len() != 128 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 64];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The same-host path: P pins the blocks, this side copies them GPU to GPU in one
/// kernel, then tells P its copy is done, then done with the request.
#[cfg(feature = "cuda")]
async fn read_from_device(
    stream: &mut TcpStream,
    job: &PullJob,
    local: &Local,
    peer: std::sync::Arc<crate::cuda::kv::MappedPeer>,
) -> Result<usize, Failed> {
    let KvBlocks::Device(kv) = &local.memory else {
        unreachable!("mapped_peer maps only for GPU memory");
    };
    let source = &job.source;
    let read = Message::ReadDevice {
        request_id: source.request_id.clone(),
        lease_secret: source.lease_secret.clone(),
        block_ids: job.remote_blocks.clone(),
        num_tokens: job.num_tokens,
        tokens_digest: job.tokens_digest.clone(),
    };
    within(local.limits.io, wire::send(stream, &read)).await?;
    match within(local.limits.io, wire::receive(stream)).await? {
        Message::ReadDeviceOk { blocks } if blocks == job.local_blocks.len() => {}
        Message::Error { message, .. } => return Err(Failed(FailureKind::Refused, message)),
        other => {
            return Err(Failed(
                FailureKind::Transfer,
                format!("unexpected answer to a device read: {}", other.kind()),
            ));
        }
    }
    // SAFETY: P pins the remote blocks until our ReadDeviceDone; the local blocks belong
    // to the waiting sequence (as for a byte read); `peer` keeps the mapping open.
    let copied = tokio::task::block_in_place(|| unsafe {
        kv.copy_from_peer(peer.base(), &job.remote_blocks, &job.local_blocks)
    });
    drop(peer);
    let finished = Message::ReadDeviceDone {
        request_id: source.request_id.clone(),
        lease_secret: source.lease_secret.clone(),
    };
    let acknowledged = request(stream, &finished, local).await;
    if let Err(err) = copied {
        kv.unmap_peer(&source.engine_id);
        return Err(Failed(FailureKind::Transfer, format!("GPU copy: {err}")));
    }
    acknowledged?;
    metrics::counter!(names::KV_DEVICE_PULLS_TOTAL).increment(1);
    let done = done_message(source);
    if let Err(Failed(_, err)) = request(stream, &done, local).await {
        tracing::debug!(request_id = source.request_id, %err, "P did not acknowledge done");
    }
    Ok(job.local_blocks.len() * kv.layout().bytes_per_block())
}

#[cfg(not(feature = "cuda"))]
async fn read_from_device(
    _: &mut TcpStream,
    _: &PullJob,
    _: &Local,
    never: NoMapping,
) -> Result<usize, Failed> {
    match never {}
}

/// Reads the blocks' bytes from `stream` into `blocks`, straight into host memory or
/// staged to the GPU.
///
/// # Safety
/// Nobody else may read or write the blocks until the returned future completes.
async unsafe fn receive_blocks(
    stream: &mut TcpStream,
    memory: &KvBlocks,
    blocks: &[BlockId],
    io: std::time::Duration,
) -> Result<(), WireError> {
    match memory {
        KvBlocks::Host(memory) => {
            for &block in blocks {
                // SAFETY: the caller's promise.
                let dst = unsafe { memory.block_mut(block) };
                within(io, async { Ok(stream.read_exact(dst).await?) }).await?;
            }
        }
        #[cfg(feature = "cuda")]
        KvBlocks::Device(kv) => {
            let per_block = kv.layout().bytes_per_block();
            let mut staging = super::gpu_blocking(|| kv.staging())?;
            for chunk in blocks.chunks(staging.blocks(per_block)) {
                let bytes = &mut staging.as_mut_slice()[..chunk.len() * per_block];
                within(io, async { Ok(stream.read_exact(bytes).await?) }).await?;
                // SAFETY: the caller's promise.
                super::gpu_blocking(|| unsafe { kv.write_blocks(chunk, bytes) })?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_handle;

    #[test]
    fn ipc_handles_are_128_hex_digits() {
        let hex: String = (0..64u8).map(|b| format!("{b:02x}")).collect();
        let handle = parse_handle(&hex).unwrap();
        assert_eq!(handle[0], 0);
        assert_eq!(handle[63], 63);
        assert!(parse_handle(&hex[..126]).is_none());
        assert!(parse_handle(&format!("{}zz", &hex[..126])).is_none());
        assert!(parse_handle(&"é".repeat(64)).is_none());
    }
}
