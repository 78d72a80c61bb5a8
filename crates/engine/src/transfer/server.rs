//! P's hand-off listener: authenticates each reader (both prove they hold the cluster
//! secret; a peer that does not learns nothing but "unauthorized"), then checks its
//! fingerprint and engine id, serves reads of leased blocks straight from the KV
//! memory, renews leases on heartbeats, ends them on "done", and sweeps the expired
//! ones. Every lease operation must present the lease's secret. Freed blocks go back
//! to the engine loop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::auth::{self, ClusterSecret};
use super::handshake::{self, Presented};
use super::lease::{LeaseRead, LeaseTable};
use super::wire::{self, ErrorCode, Message, WireError, within};
use super::{Local, SOCKET_BUFFER_BYTES};
use crate::kv::{BlockId, KvBlocks};
use crate::metrics as names;
use crate::sched::WeakEngine;

/// Connections served at once; more are closed as they arrive.
const MAX_CONNECTIONS: usize = 1024;

/// Connections at once that have not yet proved the cluster secret; more are closed as
/// they arrive, so strangers cannot crowd out the cluster's readers for long (each
/// handshake has one I/O deadline in all).
const MAX_HANDSHAKES: usize = 256;

/// A bound hand-off listener; [`KvServer::run`] serves it.
pub struct KvServer {
    listener: TcpListener,
    ctx: Arc<Ctx>,
}

struct Ctx {
    local: Local,
    secret: ClusterSecret,
    leases: Arc<LeaseTable>,
    engine: WeakEngine,
    /// Offered to same-host readers when the KV is in GPU memory.
    device: Option<wire::DeviceExport>,
    connections: Arc<Semaphore>,
    handshakes: Arc<Semaphore>,
}

impl Ctx {
    fn release(&self, blocks: Vec<BlockId>) {
        if !blocks.is_empty() {
            self.engine.release_blocks(blocks);
        }
        metrics::gauge!(names::KV_BLOCKS_HELD_FOR_REMOTE).set(self.leases.held_blocks() as f64);
    }
}

impl KvServer {
    /// Listens on `addr` for readers holding `secret`.
    pub async fn bind(
        addr: SocketAddr,
        local: Local,
        secret: ClusterSecret,
        leases: Arc<LeaseTable>,
        engine: WeakEngine,
    ) -> std::io::Result<Self> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        // Accepted connections inherit it: whole blocks fit in flight.
        socket.set_send_buffer_size(SOCKET_BUFFER_BYTES)?;
        socket.bind(addr)?;
        let listener = socket.listen(1024)?;
        let device = super::device_export(&local.memory);
        let ctx = Arc::new(Ctx {
            local,
            secret,
            leases,
            engine,
            device,
            connections: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            handshakes: Arc::new(Semaphore::new(MAX_HANDSHAKES)),
        });
        Ok(Self { listener, ctx })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts readers and sweeps expired leases until `shutdown` completes; then ends
    /// every lease.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let sweeper = tokio::spawn(sweep(self.ctx.clone()));
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => match self.ctx.connections.clone().try_acquire_owned() {
                        Ok(permit) => {
                            tokio::spawn(serve_connection(stream, peer, self.ctx.clone(), permit));
                        }
                        Err(_) => tracing::debug!(%peer, "KV hand-off listener full: connection closed"),
                    },
                    Err(err) => {
                        tracing::warn!(%err, "KV hand-off listener: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                () = &mut shutdown => break,
            }
        }
        sweeper.abort();
        self.ctx.release(self.ctx.leases.drain());
    }
}

/// Ends expired leases, a few times per lease duration.
async fn sweep(ctx: Arc<Ctx>) {
    let every =
        (ctx.leases.duration() / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        for (request_id, blocks) in ctx.leases.expire() {
            tracing::warn!(
                request_id,
                blocks = blocks.len(),
                "releasing KV blocks whose lease expired before the decode worker read them"
            );
            metrics::counter!(names::KV_EXPIRED_LEASES_TOTAL).increment(1);
            ctx.release(blocks);
        }
    }
}

/// Serves one connection; `_permit` counts it among [`MAX_CONNECTIONS`].
async fn serve_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    ctx: Arc<Ctx>,
    _permit: OwnedSemaphorePermit,
) {
    let _ = stream.set_nodelay(true);
    if let Err(err) = converse(&mut stream, peer, &ctx).await {
        tracing::debug!(%peer, %err, "KV hand-off connection ended");
    }
}

async fn converse(stream: &mut TcpStream, peer: SocketAddr, ctx: &Ctx) -> Result<(), WireError> {
    let limits = ctx.local.limits;
    let Ok(handshake) = ctx.handshakes.clone().try_acquire_owned() else {
        tracing::debug!(%peer, "too many KV hand-off handshakes in progress: connection closed");
        return Ok(());
    };
    let greeted = greet(stream, peer, ctx).await?;
    drop(handshake);
    if !greeted {
        return Ok(());
    }
    loop {
        let message = match within(limits.idle, wire::receive(stream)).await {
            Err(WireError::Closed) => return Ok(()),
            other => other?,
        };
        let reply = match message {
            Message::Read {
                request_id,
                lease_secret,
                block_ids,
                num_tokens,
                tokens_digest,
            } => {
                let read = LeaseRead {
                    request_id: &request_id,
                    lease_secret: &lease_secret,
                    block_ids: &block_ids,
                    num_tokens,
                    digest: &tokens_digest,
                };
                serve_read(stream, ctx, &read).await?;
                continue;
            }
            Message::ReadDevice {
                request_id,
                lease_secret,
                block_ids,
                num_tokens,
                tokens_digest,
            } if ctx.device.is_some() => {
                let read = LeaseRead {
                    request_id: &request_id,
                    lease_secret: &lease_secret,
                    block_ids: &block_ids,
                    num_tokens,
                    digest: &tokens_digest,
                };
                serve_device_read(stream, ctx, &read).await?;
                continue;
            }
            Message::Heartbeat { leases } => Message::Ack {
                count: ctx.leases.heartbeat(&leases),
            },
            Message::Done {
                request_id,
                lease_secret,
            } => {
                let (existed, blocks) = ctx.leases.done(&request_id, &lease_secret);
                ctx.release(blocks.unwrap_or_default());
                Message::Ack {
                    count: usize::from(existed),
                }
            }
            other => {
                let error = refusal(
                    ErrorCode::BadMessage,
                    format!("unexpected {}", other.kind()),
                );
                within(limits.io, wire::send(stream, &error)).await?;
                return Ok(());
            }
        };
        within(limits.io, wire::send(stream, &reply)).await?;
    }
}

fn refusal(code: ErrorCode, message: String) -> Message {
    Message::Error { code, message }
}

/// Authenticates the reader, then checks its fingerprint and engine id; false (after
/// telling it why) if they cannot work together.
async fn greet(stream: &mut TcpStream, peer: SocketAddr, ctx: &Ctx) -> Result<bool, WireError> {
    let Some(Presented {
        fingerprint,
        engine_id,
    }) = authenticate(stream, peer, ctx).await?
    else {
        return Ok(false);
    };
    let local = &ctx.local;
    // The reader holds the cluster secret: it may learn why it cannot read here.
    let diffs = local.fingerprint.differences(&fingerprint);
    let answer = if !diffs.is_empty() {
        let message = format!("incompatible KV layouts: {}", diffs.join("; "));
        refusal(ErrorCode::Incompatible, message)
    } else if engine_id != local.engine_id {
        let message = format!("this is engine {}, not {engine_id}", local.engine_id);
        refusal(ErrorCode::EngineIdMismatch, message)
    } else {
        Message::Welcome {
            fingerprint: local.fingerprint.clone(),
            engine_id: local.engine_id.clone(),
            device: ctx.device.clone(),
        }
    };
    let welcomed = matches!(answer, Message::Welcome { .. });
    within(local.limits.io, wire::send(stream, &answer)).await?;
    Ok(welcomed)
}

/// The mutual proof of the cluster secret ([`handshake::accept`]); what the reader
/// presented, or `None` after refusing a peer that failed (it learns nothing but
/// "unauthorized").
async fn authenticate(
    stream: &mut TcpStream,
    peer: SocketAddr,
    ctx: &Ctx,
) -> Result<Option<Presented>, WireError> {
    match handshake::accept(stream, &ctx.secret, ctx.local.limits.io).await? {
        Some(presented) => Ok(Some(presented)),
        None => refuse_unauthenticated(stream, peer, ctx).await,
    }
}

/// Counts the failure, logs it (a warning at most once a minute: scanners must not
/// flood the log), and tells the peer nothing but "unauthorized".
async fn refuse_unauthenticated<T>(
    stream: &mut TcpStream,
    peer: SocketAddr,
    ctx: &Ctx,
) -> Result<Option<T>, WireError> {
    metrics::counter!(names::KV_AUTH_FAILURES_TOTAL, names::SIDE => "server").increment(1);
    static LAST_WARNING: AtomicU64 = AtomicU64::new(0);
    let now = auth::now_unix();
    let last = LAST_WARNING.load(Ordering::Relaxed);
    if now >= last + 60
        && LAST_WARNING
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!(
            %peer,
            "a KV hand-off peer failed authentication (it does not hold this cluster's \
             secret); further failures within a minute are logged at debug level and \
             counted in tandem:kv_auth_failures_total"
        );
    } else {
        tracing::debug!(%peer, "a KV hand-off peer failed authentication");
    }
    let refused = refusal(ErrorCode::Unauthorized, "authentication failed".into());
    within(ctx.local.limits.io, wire::send(stream, &refused)).await?;
    Ok(None)
}

async fn serve_read(
    stream: &mut TcpStream,
    ctx: &Ctx,
    read: &LeaseRead<'_>,
) -> Result<(), WireError> {
    let limits = ctx.local.limits;
    let LeaseRead {
        request_id,
        block_ids,
        ..
    } = *read;
    if !pin_or_refuse(stream, ctx, read).await? {
        return Ok(());
    }
    let memory = &ctx.local.memory;
    let block_bytes = memory.layout().bytes_per_block();
    let sent = async {
        let header = Message::ReadOk {
            blocks: block_ids.len(),
            block_bytes,
        };
        within(limits.io, wire::send(stream, &header)).await?;
        // SAFETY: the lease holds every block (checked by begin_read) and keeps them
        // until end_read: the engine loop neither writes nor frees them meanwhile.
        unsafe { send_blocks(stream, memory, block_ids, limits.io) }.await?;
        within(limits.io, async { Ok(stream.flush().await?) }).await
    }
    .await;
    if let Some(blocks) = ctx.leases.end_read(request_id) {
        ctx.release(blocks);
    }
    if sent.is_ok() {
        count_sent(block_ids.len(), block_bytes);
    }
    sent
}

/// Starts a read of leased blocks (they stay pinned until `end_read`); on a refusal
/// tells the reader why and returns false.
async fn pin_or_refuse(
    stream: &mut TcpStream,
    ctx: &Ctx,
    read: &LeaseRead<'_>,
) -> Result<bool, WireError> {
    match ctx.leases.begin_read(read) {
        Ok(()) => Ok(true),
        Err((code, message)) => {
            tracing::warn!(request_id = read.request_id, %message, "refused a KV read");
            let refused = refusal(code, message);
            within(ctx.local.limits.io, wire::send(stream, &refused)).await?;
            Ok(false)
        }
    }
}

fn count_sent(blocks: usize, block_bytes: usize) {
    metrics::counter!(names::KV_TRANSFER_BYTES_TOTAL, names::DIRECTION => "sent")
        .increment((blocks * block_bytes) as u64);
    metrics::counter!(names::KV_TRANSFER_BLOCKS_TOTAL, names::DIRECTION => "sent")
        .increment(blocks as u64);
}

/// A same-host reader copies the blocks from the exported GPU memory itself: pin them
/// (as for a byte read) until it says its copy is done, or the connection fails.
async fn serve_device_read(
    stream: &mut TcpStream,
    ctx: &Ctx,
    read: &LeaseRead<'_>,
) -> Result<(), WireError> {
    let limits = ctx.local.limits;
    let LeaseRead {
        request_id,
        lease_secret,
        block_ids,
        ..
    } = *read;
    if !pin_or_refuse(stream, ctx, read).await? {
        return Ok(());
    }
    let copied = async {
        let ok = Message::ReadDeviceOk {
            blocks: block_ids.len(),
        };
        within(limits.io, wire::send(stream, &ok)).await?;
        match within(limits.io, wire::receive(stream)).await? {
            Message::ReadDeviceDone {
                request_id: done,
                lease_secret: secret,
            } if done == request_id && auth::secrets_equal(&secret, lease_secret) => Ok(()),
            other => Err(WireError::Device(format!(
                "expected the reader's copy to end, got {}",
                other.kind()
            ))),
        }
    }
    .await;
    if let Some(blocks) = ctx.leases.end_read(request_id) {
        ctx.release(blocks);
    }
    copied?;
    count_sent(block_ids.len(), ctx.local.memory.layout().bytes_per_block());
    within(limits.io, wire::send(stream, &Message::Ack { count: 1 })).await
}

/// Writes `blocks`' bytes to `stream`, straight from host memory or staged from the GPU.
///
/// # Safety
/// Nobody may write the blocks until the returned future completes.
async unsafe fn send_blocks(
    stream: &mut TcpStream,
    memory: &KvBlocks,
    blocks: &[BlockId],
    io: std::time::Duration,
) -> Result<(), WireError> {
    match memory {
        KvBlocks::Host(memory) => {
            for &block in blocks {
                // SAFETY: the caller's promise.
                let bytes = unsafe { memory.block(block) };
                within(io, async { Ok(stream.write_all(bytes).await?) }).await?;
            }
        }
        #[cfg(feature = "cuda")]
        KvBlocks::Device(kv) => {
            let per_block = kv.layout().bytes_per_block();
            let mut staging = super::gpu_blocking(|| kv.staging())?;
            for chunk in blocks.chunks(staging.blocks(per_block)) {
                let bytes = &mut staging.as_mut_slice()[..chunk.len() * per_block];
                // SAFETY: the caller's promise.
                super::gpu_blocking(|| unsafe { kv.read_blocks(chunk, bytes) })?;
                within(io, async { Ok(stream.write_all(bytes).await?) }).await?;
            }
        }
    }
    Ok(())
}
