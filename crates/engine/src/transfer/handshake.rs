//! The reader's side of the KV port's handshake (protocol v2), shared by the decode
//! worker's puller and `tandem kv --measure`: send a fresh nonce, check the server's
//! proof that it holds the cluster secret before telling it anything, prove the same,
//! and only then present the fingerprint and the engine id the reader was given.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use super::auth::{self, ClusterSecret, Nonce};
use super::wire::{self, DeviceExport, ErrorCode, Fingerprint, Message, WireError, within};
use crate::metrics as names;

/// What the reader presents.
#[derive(Debug, Clone, Copy)]
pub struct Greeting<'a> {
    pub secret: &'a ClusterSecret,
    pub fingerprint: &'a Fingerprint,
    /// The `remote_engine_id` the reader was given.
    pub engine_id: &'a str,
    /// Deadline of each message.
    pub io: Duration,
}

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("handshake: {0}")]
    Wire(#[from] WireError),
    #[error("the peer does not hold this cluster's secret")]
    PeerNotAuthenticated,
    #[error("the peer refused this worker's proof: the two hold different KV secrets")]
    ProofRefused,
    #[error("the peer refused the handshake ({code:?}): {message}")]
    Refused { code: ErrorCode, message: String },
    #[error("the peer answered as engine {engine_id} with {differences}")]
    Mismatch {
        engine_id: String,
        differences: String,
    },
    #[error("unexpected answer to the {step}: {answer}")]
    Unexpected { step: &'static str, answer: String },
}

impl HandshakeError {
    fn is_authentication(&self) -> bool {
        matches!(self, Self::PeerNotAuthenticated | Self::ProofRefused)
    }
}

/// Runs the handshake on a fresh connection; returns what the server offers same-host
/// readers of GPU memory.
pub async fn greet(
    stream: &mut (impl AsyncRead + AsyncWrite + Unpin),
    greeting: &Greeting<'_>,
) -> Result<Option<DeviceExport>, HandshakeError> {
    let outcome = exchange(stream, greeting).await;
    if outcome
        .as_ref()
        .is_err_and(HandshakeError::is_authentication)
    {
        metrics::counter!(names::KV_AUTH_FAILURES_TOTAL, names::SIDE => "client").increment(1);
    }
    outcome
}

async fn exchange(
    stream: &mut (impl AsyncRead + AsyncWrite + Unpin),
    greeting: &Greeting<'_>,
) -> Result<Option<DeviceExport>, HandshakeError> {
    let io = greeting.io;
    let client = Nonce::random();
    let hello = Message::Hello {
        client_nonce: client.to_hex(),
    };
    within(io, wire::send(stream, &hello)).await?;
    let server = match within(io, wire::receive(stream)).await? {
        Message::Challenge {
            server_nonce,
            server_proof,
        } => Nonce::from_hex(&server_nonce)
            .filter(|server| {
                auth::verify_server_proof(greeting.secret, &client, server, &server_proof)
            })
            .ok_or(HandshakeError::PeerNotAuthenticated)?,
        other => return Err(answer_error("hello", other)),
    };
    let auth = Message::Auth {
        client_proof: auth::client_proof(greeting.secret, &client, &server),
        fingerprint: greeting.fingerprint.clone(),
        engine_id: greeting.engine_id.to_owned(),
    };
    within(io, wire::send(stream, &auth)).await?;
    match within(io, wire::receive(stream)).await? {
        Message::Welcome {
            fingerprint,
            engine_id,
            device,
        } => {
            let diffs = greeting.fingerprint.differences(&fingerprint);
            if !diffs.is_empty() || engine_id != greeting.engine_id {
                return Err(HandshakeError::Mismatch {
                    engine_id,
                    differences: diffs.join("; "),
                });
            }
            Ok(device)
        }
        Message::Error {
            code: ErrorCode::Unauthorized,
            ..
        } => Err(HandshakeError::ProofRefused),
        other => Err(answer_error("proof", other)),
    }
}

fn answer_error(step: &'static str, answer: Message) -> HandshakeError {
    match answer {
        Message::Error { code, message } => HandshakeError::Refused { code, message },
        other => HandshakeError::Unexpected {
            step,
            answer: format!("{other:?}"),
        },
    }
}
