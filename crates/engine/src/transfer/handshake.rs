//! The KV port's handshake (protocol v2). The reader's side ([`greet`]), shared by the
//! decode worker's puller and `tandem kv --measure`: send a fresh nonce, check the
//! server's proof that it holds the cluster secret before telling it anything, prove
//! the same, and only then present the fingerprint and the engine id the reader was
//! given. The server's side up to that point ([`accept`]), shared by the KV server and
//! the test peers that play one.

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

/// What a reader presented once it proved the cluster secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presented {
    pub fingerprint: Fingerprint,
    pub engine_id: String,
}

/// The server's side of the mutual proof: the reader's nonce, this side's nonce and
/// proof, the reader's proof, all within `limit` and in messages of at most
/// [`wire::MAX_HANDSHAKE_BYTES`]. `Ok(None)` when the peer failed it (sent something
/// else, or a wrong proof): the caller refuses it, telling it nothing. Connection
/// failures and the deadline stay errors.
pub async fn accept(
    stream: &mut (impl AsyncRead + AsyncWrite + Unpin),
    secret: &ClusterSecret,
    limit: Duration,
) -> Result<Option<Presented>, WireError> {
    within(limit, accept_within(stream, secret)).await
}

async fn accept_within(
    stream: &mut (impl AsyncRead + AsyncWrite + Unpin),
    secret: &ClusterSecret,
) -> Result<Option<Presented>, WireError> {
    let client = match received(wire::receive_at_most(stream, wire::MAX_HANDSHAKE_BYTES).await)? {
        Some(Message::Hello { client_nonce }) => Nonce::from_hex(&client_nonce),
        _ => None,
    };
    let Some(client) = client else {
        return Ok(None);
    };
    let server = Nonce::random();
    let challenge = Message::Challenge {
        server_nonce: server.to_hex(),
        server_proof: auth::server_proof(secret, &client, &server),
    };
    wire::send(stream, &challenge).await?;
    Ok(
        match received(wire::receive_at_most(stream, wire::MAX_HANDSHAKE_BYTES).await)? {
            Some(Message::Auth {
                client_proof,
                fingerprint,
                engine_id,
            }) if auth::verify_client_proof(secret, &client, &server, &client_proof) => {
                Some(Presented {
                    fingerprint,
                    engine_id,
                })
            }
            _ => None,
        },
    )
}

/// A message, or `None` for bytes that are not one (a peer to refuse); connection
/// failures stay errors (nothing to answer).
fn received(outcome: Result<Message, WireError>) -> Result<Option<Message>, WireError> {
    match outcome {
        Ok(message) => Ok(Some(message)),
        Err(WireError::Malformed(_) | WireError::TooLarge { .. }) => Ok(None),
        Err(err) => Err(err),
    }
}

fn answer_error(step: &'static str, answer: Message) -> HandshakeError {
    match answer {
        Message::Error { code, message } => HandshakeError::Refused { code, message },
        other => HandshakeError::Unexpected {
            step,
            answer: other.kind().to_owned(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLUSTER: &str = "the cluster secret";
    const OTHER: &str = "another cluster's secret";

    fn secret(text: &str) -> ClusterSecret {
        ClusterSecret::new(text.as_bytes(), "test").unwrap()
    }

    /// The server's side, proving itself with `key` and checking the reader's proof
    /// with `check`: welcomes a reader whose proof holds, refuses others as the KV
    /// server does; `Ok(())` when it welcomed.
    async fn serve(
        mut stream: tokio::io::DuplexStream,
        key: ClusterSecret,
        check: ClusterSecret,
    ) -> Result<(), &'static str> {
        let Ok(Message::Hello { client_nonce }) = wire::receive(&mut stream).await else {
            return Err("no hello");
        };
        let client = Nonce::from_hex(&client_nonce).ok_or("bad nonce")?;
        let server = Nonce::random();
        let challenge = Message::Challenge {
            server_nonce: server.to_hex(),
            server_proof: auth::server_proof(&key, &client, &server),
        };
        wire::send(&mut stream, &challenge)
            .await
            .map_err(|_| "send")?;
        let answer = match wire::receive(&mut stream).await {
            Ok(Message::Auth {
                client_proof,
                fingerprint,
                engine_id,
            }) if auth::verify_client_proof(&check, &client, &server, &client_proof) => {
                Message::Welcome {
                    fingerprint,
                    engine_id,
                    device: None,
                }
            }
            Ok(_) => Message::Error {
                code: ErrorCode::Unauthorized,
                message: "authentication failed".into(),
            },
            Err(_) => return Err("the reader left"),
        };
        let welcomed = matches!(answer, Message::Welcome { .. });
        wire::send(&mut stream, &answer).await.map_err(|_| "send")?;
        if welcomed { Ok(()) } else { Err("refused") }
    }

    /// A reader holding `client_key` against a server proving `server_key` and checking
    /// proofs with `check_key`.
    async fn handshake(
        client_key: &str,
        server_key: &str,
        check_key: &str,
    ) -> (Result<(), HandshakeError>, Result<(), &'static str>) {
        let (mut reader, server_end) = tokio::io::duplex(1 << 16);
        let keys = (secret(server_key), secret(check_key));
        let server = tokio::spawn(serve(server_end, keys.0, keys.1));
        let key = secret(client_key);
        let fingerprint = wire::tiny_fingerprint();
        let greeting = Greeting {
            secret: &key,
            fingerprint: &fingerprint,
            engine_id: "e",
            io: Duration::from_secs(5),
        };
        let outcome = greet(&mut reader, &greeting).await.map(|_| ());
        drop(reader);
        (outcome, server.await.unwrap())
    }

    #[tokio::test]
    async fn both_sides_holding_the_secret_are_welcomed() {
        let (client, server) = handshake(CLUSTER, CLUSTER, CLUSTER).await;
        client.unwrap();
        server.unwrap();
    }

    #[tokio::test]
    async fn a_server_without_the_secret_learns_nothing_about_the_reader() {
        let (client, server) = handshake(CLUSTER, OTHER, OTHER).await;
        assert!(
            matches!(client, Err(HandshakeError::PeerNotAuthenticated)),
            "{client:?}"
        );
        assert_eq!(
            client.unwrap_err().to_string(),
            "the peer does not hold this cluster's secret"
        );
        // The reader left before sending its fingerprint or the engine id.
        assert_eq!(server, Err("the reader left"));
    }

    #[tokio::test]
    async fn a_reader_with_another_secret_stops_at_the_servers_proof() {
        let (client, server) = handshake(OTHER, CLUSTER, CLUSTER).await;
        assert!(
            matches!(client, Err(HandshakeError::PeerNotAuthenticated)),
            "{client:?}"
        );
        assert_eq!(server, Err("the reader left"));
    }

    #[tokio::test]
    async fn a_refused_proof_is_reported_as_such() {
        // A server whose proof holds but which checks readers against another secret.
        let (client, server) = handshake(CLUSTER, CLUSTER, OTHER).await;
        assert!(
            matches!(client, Err(HandshakeError::ProofRefused)),
            "{client:?}"
        );
        assert_eq!(server, Err("refused"));
    }
}
