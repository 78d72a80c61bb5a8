//! The HTTP server loop of every tandem server (the worker's OpenAI API, the router):
//! it accepts connections and serves an axum [`Router`] over HTTP/1.1 (hyper) on each,
//! within limits that keep one client from holding connections or memory:
//!
//! - a **header read timeout**: a connection that has not sent complete request
//!   headers within it is closed; the deadline runs from the moment the server waits
//!   for a request, so it also ends connections that send nothing and idle
//!   keep-alive connections;
//! - a **body read timeout**: the whole body must arrive within it, else 408;
//! - a **body size limit**: 413 from `Content-Length` before anything is read, or as
//!   soon as a chunked body passes the limit;
//! - after an answer that closes the connection (408, 413), the server stops writing
//!   and reads what the client still sends, for a bounded time, before it closes
//!   ([`conn`]): closing on unread bytes would reset the connection and could destroy
//!   the answer before the client reads it.
//!
//! Bodies are read whole before the router sees the request ([`body`]), so handlers
//! get a body that is complete and within the limit. Errors leave in the OpenAI shape
//! (`{"error":{...}}`). Shutdown is graceful: no new connections, idle ones closed, and
//! requests in flight finish. [`bind`] listens with a backlog that holds a burst of
//! connections, and [`raise_open_files_limit`] lets a server hold many. [`auth`] holds
//! the bearer-key check the servers share.

pub mod auth;
mod body;
mod conn;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;

pub use body::{BodyError, error_response};

/// Raises this process's soft limit on open files to its hard limit (often 1,024
/// against 524,288): every connection a server holds, clients' and hand-offs', takes a
/// file descriptor, and running out of them would stop the whole process, not just the
/// connections over the limit. Returns the limit now in force.
pub fn raise_open_files_limit() -> std::io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `limit`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: setrlimit reads one rlimit from `limit`.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(limit.rlim_cur)
}

/// Connections the kernel queues for a server before it accepts them. The usual 128
/// (std's and mio's) overflows under a burst of connections, and a connection dropped
/// from the queue waits a second for its SYN to be sent again.
pub const LISTEN_BACKLOG: u32 = 1024;

/// Largest request body accepted by default (a worker's default).
pub const DEFAULT_MAX_BODY_BYTES: usize = 8 << 20;
/// Request bodies a server holds at once by default, in bytes: 16 of the largest.
pub const DEFAULT_MAX_BODY_BYTES_IN_FLIGHT: usize = 128 << 20;
/// Default time a connection gets to send complete request headers.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a request gets to send its whole body, once its headers are in.
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// What a server accepts from a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Time to send complete request headers (also the most a connection stays idle).
    pub header_read_timeout: Duration,
    /// Time to send the whole body once the headers are in (408 after it).
    pub body_read_timeout: Duration,
    /// Largest request body (413 above it).
    pub max_body_bytes: usize,
    /// Bytes of request bodies held at once, from their first byte read until the
    /// application has begun its answer; a request that would pass it gets 503 with
    /// `Retry-After` before its body is read. A body's share is its `Content-Length`,
    /// or `max_body_bytes` when it is sent in chunks of unknown total.
    pub max_body_bytes_in_flight: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            body_read_timeout: DEFAULT_BODY_READ_TIMEOUT,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_body_bytes_in_flight: DEFAULT_MAX_BODY_BYTES_IN_FLIGHT,
        }
    }
}

/// Limits that cannot be served with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitsError {
    #[error("the header read timeout must be positive")]
    ZeroHeaderReadTimeout,
    #[error("the body read timeout must be positive")]
    ZeroBodyReadTimeout,
    #[error("the body size limit must be at least 1 byte")]
    ZeroBodyLimit,
    #[error(
        "the bytes of bodies in flight ({in_flight}) must be at least the largest body \
         ({body})"
    )]
    InFlightBelowBodyLimit { in_flight: usize, body: usize },
}

impl HttpLimits {
    /// The limits as given, or the first that makes no sense.
    pub fn validate(self) -> Result<Self, LimitsError> {
        if self.header_read_timeout.is_zero() {
            return Err(LimitsError::ZeroHeaderReadTimeout);
        }
        if self.body_read_timeout.is_zero() {
            return Err(LimitsError::ZeroBodyReadTimeout);
        }
        if self.max_body_bytes == 0 {
            return Err(LimitsError::ZeroBodyLimit);
        }
        if self.max_body_bytes_in_flight < self.max_body_bytes {
            return Err(LimitsError::InFlightBelowBodyLimit {
                in_flight: self.max_body_bytes_in_flight,
                body: self.max_body_bytes,
            });
        }
        Ok(self)
    }
}

/// Serves `app` on `listener` until `shutdown` completes; then stops accepting,
/// closes idle connections and returns once the requests in flight have finished.
/// Every connection gets `TCP_NODELAY` (a streamed token must not wait for the
/// client's delayed ACK of the previous segment).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let (stop, stopping) = watch::channel(false);
    let (alive, connections) = watch::channel(());
    let bodies = Arc::new(body::BodyBudget::new(limits.max_body_bytes_in_flight));
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        match accepted {
            Ok((stream, _peer)) => {
                let connection = conn::Connection {
                    app: app.clone(),
                    limits,
                    bodies: bodies.clone(),
                    stopping: stopping.clone(),
                    _alive: connections.clone(),
                };
                tokio::spawn(connection.serve(stream));
            }
            Err(error) => accept_failed(error).await,
        }
    }
    drop(listener);
    let _ = stop.send(true);
    drop(connections);
    alive.closed().await;
}

/// Listens on the first address `host:port` resolves to that can be bound, with
/// [`LISTEN_BACKLOG`].
pub async fn bind(host: &str, port: u16) -> std::io::Result<TcpListener> {
    let mut failure = None;
    for address in tokio::net::lookup_host((host, port)).await? {
        match listen_on(address) {
            Ok(listener) => return Ok(listener),
            Err(error) => failure = Some(error),
        }
    }
    Err(failure.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::AddrNotAvailable,
            format!("{host} resolves to no address"),
        )
    }))
}

fn listen_on(address: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if address.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(LISTEN_BACKLOG)
}

/// A failed accept: the peer's doing (go on), or the process's (out of file
/// descriptors: wait a moment rather than spin).
async fn accept_failed(error: std::io::Error) {
    use std::io::ErrorKind;
    if matches!(
        error.kind(),
        ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::ConnectionRefused
    ) {
        return;
    }
    tracing::warn!(%error, "accepting a connection failed; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_limits_are_refused() {
        let limits = HttpLimits::default();
        assert_eq!(limits.validate(), Ok(limits));
        let zero = |change: fn(&mut HttpLimits)| {
            let mut limits = HttpLimits::default();
            change(&mut limits);
            limits.validate().unwrap_err()
        };
        assert_eq!(
            zero(|l| l.header_read_timeout = Duration::ZERO),
            LimitsError::ZeroHeaderReadTimeout
        );
        assert_eq!(
            zero(|l| l.body_read_timeout = Duration::ZERO),
            LimitsError::ZeroBodyReadTimeout
        );
        assert_eq!(zero(|l| l.max_body_bytes = 0), LimitsError::ZeroBodyLimit);
        assert_eq!(
            zero(|l| l.max_body_bytes_in_flight = l.max_body_bytes - 1),
            LimitsError::InFlightBelowBodyLimit {
                in_flight: DEFAULT_MAX_BODY_BYTES - 1,
                body: DEFAULT_MAX_BODY_BYTES
            }
        );
    }
}
