//! One connection: HTTP/1.1 with the header read timeout, each request's body read
//! whole within the limits (and the server's budget of body bytes in flight) before
//! the application sees it, graceful shutdown, and a lingering close.
//!
//! Lingering close: when the server ends a connection while the client is still
//! sending (a 413 answered from `Content-Length`, a 408), closing the socket with
//! unread bytes in it makes the kernel send a reset, which can destroy the answer
//! before the client reads it. So the server shuts its sending side (the client sees
//! the end of the answer) and reads and drops what still comes, for at most
//! [`LINGER`], before it closes.

use std::convert::Infallible;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tower::ServiceExt;

use crate::body::BodyBudget;
use crate::{HttpLimits, body};

/// Longest time a closing connection keeps reading what the client still sends.
pub const LINGER: Duration = Duration::from_secs(5);

type Answer = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

/// Everything one connection's task needs.
pub struct Connection {
    pub app: Router,
    pub limits: HttpLimits,
    /// The server's bytes of request bodies in flight, shared by its connections.
    pub bodies: Arc<BodyBudget>,
    /// Turns true when the server shuts down.
    pub stopping: watch::Receiver<bool>,
    /// Held while the connection lives (the server waits for all to be dropped).
    pub _alive: watch::Receiver<()>,
}

impl Connection {
    /// Serves requests on `stream` until either side ends the connection, a timeout
    /// closes it, or the server shuts down (after the request in flight).
    pub async fn serve(mut self, stream: TcpStream) {
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY on a connection");
        }
        let (app, limits, bodies) = (self.app.clone(), self.limits, self.bodies.clone());
        let service = service_fn(move |request| -> Answer {
            Box::pin(answer(app.clone(), limits, bodies.clone(), request))
        });
        let mut http = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .serve_connection(TokioIo::new(stream), service);
        let mut stopping = *self.stopping.borrow();
        if stopping {
            Pin::new(&mut http).graceful_shutdown();
        }
        let ended = loop {
            tokio::select! {
                ended = poll_fn(|cx| http.poll_without_shutdown(cx)) => break ended,
                _ = self.stopping.changed(), if !stopping => stopping = true,
            }
            Pin::new(&mut http).graceful_shutdown();
        };
        match ended {
            Ok(()) if !stopping => linger(http.into_parts().io.into_inner(), self.stopping).await,
            Ok(()) => {}
            // Header read timeouts, malformed requests, clients gone: nothing to answer.
            Err(error) => tracing::debug!(%error, "connection ended"),
        }
    }
}

/// The application's answer to a request whose body arrived whole, or the error. The
/// body's share of the budget is held until the answer has begun.
async fn answer(
    app: Router,
    limits: HttpLimits,
    bodies: Arc<BodyBudget>,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let refused = |error: body::BodyError| {
        tracing::debug!(%error, "request body refused");
        Ok(axum::response::IntoResponse::into_response(error))
    };
    let size = hyper::body::Body::size_hint(request.body());
    let _reservation = match bodies.reserve(&size, limits.max_body_bytes) {
        Ok(reservation) => reservation,
        Err(error) => return refused(error),
    };
    match body::read_whole(request, &limits).await {
        Ok(request) => app.oneshot(request).await,
        Err(error) => refused(error),
    }
}

/// Ends the sending side, then drops what the client still sends until it closes,
/// [`LINGER`] passes or the server shuts down.
async fn linger(mut stream: TcpStream, mut stopping: watch::Receiver<bool>) {
    if stream.shutdown().await.is_err() {
        return;
    }
    let drain = async {
        let mut buffer = [0u8; 4096];
        while matches!(stream.read(&mut buffer).await, Ok(read) if read > 0) {}
    };
    tokio::select! {
        _ = tokio::time::timeout(LINGER, drain) => {}
        _ = stopping.wait_for(|stop| *stop) => {}
    }
}
