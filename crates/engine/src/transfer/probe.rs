//! A measured read of a prefill worker's leased KV blocks, for `tandem kv --measure`:
//! the decode side of the hand-off without an engine. It connects, runs the mutually
//! authenticated handshake with the cluster secret and the caller's fingerprint, reads
//! every block of one lease into a scratch buffer
//! (timed from the read request to the last byte), and says "done" so the worker
//! frees the blocks at once.

use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};

use super::auth::ClusterSecret;
use super::handshake::{self, Greeting, HandshakeError};
use super::wire::{self, ErrorCode, Fingerprint, Message, WireError, within};
use super::{Limits, RemotePrefill, SOCKET_BUFFER_BYTES};

/// What to read: the lease's blocks, and the prompt they hold.
#[derive(Debug, Clone)]
pub struct ProbeRead {
    pub source: RemotePrefill,
    /// This side's fingerprint: the worker's model, layout and KV element type.
    pub fingerprint: Fingerprint,
    /// The cluster secret the worker holds.
    pub secret: ClusterSecret,
    /// Prompt tokens the blocks hold, and their digest ([`wire::tokens_digest`]).
    pub num_tokens: usize,
    pub tokens_digest: String,
}

/// What a measured read moved, and how fast.
#[derive(Debug, Clone, Copy)]
pub struct ProbeReport {
    pub blocks: usize,
    pub block_bytes: usize,
    pub bytes: usize,
    /// Connect and handshake.
    pub handshake: Duration,
    /// From sending the read to the last byte received.
    pub transfer: Duration,
    /// Whether the worker acknowledged "done" for an existing lease.
    pub released: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("no connection to {addr} within {limit:?}")]
    ConnectTimeout { addr: String, limit: Duration },
    #[error("connecting to {addr}: {error}")]
    Connect { addr: String, error: std::io::Error },
    #[error("{addr} refused ({code:?}): {message}")]
    Refused {
        addr: String,
        code: ErrorCode,
        message: String,
    },
    #[error("{addr} answered {what} with {answer}")]
    Unexpected {
        addr: String,
        what: &'static str,
        answer: String,
    },
    #[error("{addr} sends {theirs}-byte blocks; the fingerprint describes {ours}-byte blocks")]
    BlockSize {
        addr: String,
        theirs: usize,
        ours: usize,
    },
    #[error("the hand-off with {addr} failed: {error}")]
    Wire { addr: String, error: WireError },
    #[error("the handshake with {addr} failed: {error}")]
    Handshake { addr: String, error: HandshakeError },
    #[error("the read from {addr} did not finish within {limit:?}")]
    Deadline { addr: String, limit: Duration },
}

/// Bytes of one block as `fingerprint` describes it.
pub fn block_bytes(fingerprint: &Fingerprint) -> usize {
    let element = if fingerprint.kv_dtype == "f32" { 4 } else { 2 };
    2 * fingerprint.num_layers
        * fingerprint.num_kv_heads
        * fingerprint.block_size
        * fingerprint.head_dim
        * element
}

/// Reads every block of `read.source` once, timed, then releases the lease (also
/// after a failed read, on a fresh connection, best effort).
pub async fn measure_read(read: &ProbeRead, limits: Limits) -> Result<ProbeReport, ProbeError> {
    let addr = format!("{}:{}", read.source.host, read.source.port);
    let outcome = match tokio::time::timeout(limits.pull, read_all(read, &addr, limits)).await {
        Ok(outcome) => outcome,
        Err(_) => Err(ProbeError::Deadline {
            addr: addr.clone(),
            limit: limits.pull,
        }),
    };
    if outcome.is_err() {
        let _ = release(read, &addr, limits).await;
    }
    outcome
}

async fn read_all(read: &ProbeRead, addr: &str, limits: Limits) -> Result<ProbeReport, ProbeError> {
    let wire_error = |error| ProbeError::Wire {
        addr: addr.to_owned(),
        error,
    };
    let started = Instant::now();
    let mut stream = connect(read, addr, limits).await?;
    let handshake = started.elapsed();
    let ids = read.source.block_ids.clone();
    let ours = block_bytes(&read.fingerprint);
    // The destination is allocated and touched before the clock starts.
    let mut scratch = vec![1u8; ids.len() * ours];
    let request = Message::Read {
        request_id: read.source.request_id.clone(),
        lease_secret: read.source.lease_secret.clone(),
        block_ids: ids.clone(),
        num_tokens: read.num_tokens,
        tokens_digest: read.tokens_digest.clone(),
    };
    let started = Instant::now();
    within(limits.io, wire::send(&mut stream, &request))
        .await
        .map_err(wire_error)?;
    match within(limits.io, wire::receive(&mut stream))
        .await
        .map_err(wire_error)?
    {
        Message::ReadOk {
            blocks,
            block_bytes,
        } if blocks == ids.len() => {
            if block_bytes != ours {
                return Err(ProbeError::BlockSize {
                    addr: addr.to_owned(),
                    theirs: block_bytes,
                    ours,
                });
            }
        }
        other => return Err(unexpected(addr, "a read", other)),
    }
    for block in scratch.chunks_mut(ours) {
        within(limits.io, async { Ok(stream.read_exact(block).await?) })
            .await
            .map_err(wire_error)?;
    }
    let transfer = started.elapsed();
    let released = done(&mut stream, read, limits).await.map_err(wire_error)?;
    Ok(ProbeReport {
        blocks: ids.len(),
        block_bytes: ours,
        bytes: scratch.len(),
        handshake,
        transfer,
        released,
    })
}

fn unexpected(addr: &str, what: &'static str, answer: Message) -> ProbeError {
    match answer {
        Message::Error { code, message } => ProbeError::Refused {
            addr: addr.to_owned(),
            code,
            message,
        },
        other => ProbeError::Unexpected {
            addr: addr.to_owned(),
            what,
            answer: other.kind().to_owned(),
        },
    }
}

/// A connection past hello/welcome.
async fn connect(read: &ProbeRead, addr: &str, limits: Limits) -> Result<TcpStream, ProbeError> {
    let connecting = async {
        let mut last = None;
        for socket_addr in tokio::net::lookup_host(addr).await? {
            let socket = if socket_addr.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES)?;
            match socket.connect(socket_addr).await {
                Ok(stream) => return Ok(stream),
                Err(err) => last = Some(err),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("the host has no address")))
    };
    let mut stream = tokio::time::timeout(limits.connect, connecting)
        .await
        .map_err(|_| ProbeError::ConnectTimeout {
            addr: addr.to_owned(),
            limit: limits.connect,
        })?
        .map_err(|error| ProbeError::Connect {
            addr: addr.to_owned(),
            error,
        })?;
    let _ = stream.set_nodelay(true);
    let greeting = Greeting {
        secret: &read.secret,
        fingerprint: &read.fingerprint,
        engine_id: &read.source.engine_id,
        io: limits.io,
    };
    match handshake::greet(&mut stream, &greeting).await {
        Ok(_) => Ok(stream),
        Err(HandshakeError::Refused { code, message }) => Err(ProbeError::Refused {
            addr: addr.to_owned(),
            code,
            message,
        }),
        Err(error) => Err(ProbeError::Handshake {
            addr: addr.to_owned(),
            error,
        }),
    }
}

/// Says "done"; whether the lease existed.
async fn done(stream: &mut TcpStream, read: &ProbeRead, limits: Limits) -> Result<bool, WireError> {
    let done = Message::Done {
        request_id: read.source.request_id.clone(),
        lease_secret: read.source.lease_secret.clone(),
    };
    within(limits.io, wire::send(stream, &done)).await?;
    match within(limits.io, wire::receive(stream)).await? {
        Message::Ack { count } => Ok(count == 1),
        _ => Ok(false),
    }
}

/// "done" on a fresh connection.
async fn release(read: &ProbeRead, addr: &str, limits: Limits) -> Result<bool, ProbeError> {
    let mut stream = connect(read, addr, limits).await?;
    done(&mut stream, read, limits)
        .await
        .map_err(|error| ProbeError::Wire {
            addr: addr.to_owned(),
            error,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{KvDtype, KvLayout};
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    /// A hand-off server that welcomes, answers one read with `blocks` blocks of
    /// `fill` (or refuses it), and counts "done"s.
    async fn fake_worker(listener: TcpListener, refuse: bool) -> usize {
        let mut dones = 0;
        while let Ok((mut stream, _)) = listener.accept().await {
            let Some((fingerprint, engine_id)) = accept(&mut stream).await else {
                return dones;
            };
            let welcome = Message::Welcome {
                fingerprint,
                engine_id,
                device: None,
            };
            wire::send(&mut stream, &welcome).await.unwrap();
            while let Ok(message) = wire::receive(&mut stream).await {
                match message {
                    Message::Read { .. } if refuse => {
                        let error = Message::Error {
                            code: ErrorCode::UnknownRequest,
                            message: "no such lease".into(),
                        };
                        wire::send(&mut stream, &error).await.unwrap();
                    }
                    Message::Read { block_ids, .. } => {
                        let block_bytes = block_bytes(&wire::tiny_fingerprint());
                        let header = Message::ReadOk {
                            blocks: block_ids.len(),
                            block_bytes,
                        };
                        wire::send(&mut stream, &header).await.unwrap();
                        let body = vec![7u8; block_ids.len() * block_bytes];
                        stream.write_all(&body).await.unwrap();
                    }
                    Message::Done { .. } => {
                        dones += 1;
                        wire::send(&mut stream, &Message::Ack { count: 1 })
                            .await
                            .unwrap();
                        return dones;
                    }
                    _ => return dones,
                }
            }
        }
        dones
    }

    fn secret() -> ClusterSecret {
        ClusterSecret::new(b"a test cluster secret", "test").unwrap()
    }

    /// The server's side of the handshake; what the reader presented.
    async fn accept(stream: &mut tokio::net::TcpStream) -> Option<(Fingerprint, String)> {
        let io = std::time::Duration::from_secs(10);
        let presented = handshake::accept(stream, &secret(), io).await.ok()??;
        Some((presented.fingerprint, presented.engine_id))
    }

    async fn probe(refuse: bool) -> (Result<ProbeReport, ProbeError>, usize) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let worker = tokio::spawn(fake_worker(listener, refuse));
        let read = ProbeRead {
            source: RemotePrefill {
                engine_id: "e".into(),
                host: "127.0.0.1".into(),
                port,
                request_id: "r".into(),
                block_ids: vec![4, 5, 6],
                lease_secret: "5ec2e7".into(),
            },
            fingerprint: wire::tiny_fingerprint(),
            secret: secret(),
            num_tokens: 40,
            tokens_digest: wire::tokens_digest(&[1; 40]),
        };
        let outcome = measure_read(&read, Limits::default()).await;
        (outcome, worker.await.unwrap())
    }

    #[tokio::test]
    async fn a_read_moves_every_block_and_releases_the_lease() {
        let (outcome, dones) = probe(false).await;
        let report = outcome.unwrap();
        assert_eq!(report.blocks, 3);
        assert_eq!(report.bytes, 3 * 512);
        assert!(report.released);
        assert_eq!(dones, 1);
    }

    #[tokio::test]
    async fn a_refused_read_is_an_error_and_still_releases() {
        let (outcome, dones) = probe(true).await;
        let err = outcome.unwrap_err();
        assert!(
            matches!(
                err,
                ProbeError::Refused {
                    code: ErrorCode::UnknownRequest,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(dones, 1, "done on a fresh connection");
    }

    #[test]
    fn block_bytes_follow_the_fingerprint_like_the_store() {
        for dtype in [KvDtype::F16, KvDtype::F32] {
            let layout = KvLayout {
                num_layers: 30,
                num_kv_heads: 3,
                head_dim: 64,
                block_size: 16,
                dtype,
            };
            let fingerprint = Fingerprint::new("m".into(), layout);
            assert_eq!(block_bytes(&fingerprint), layout.bytes_per_block());
        }
    }
}
