//! Reading a request body whole, within the size limit and the body read timeout,
//! before the application sees the request; the server-wide budget of body bytes in
//! flight ([`BodyBudget`]); and the answers when either fails, which close the
//! connection (its remaining bytes are not worth reading as a request).

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::http::{HeaderValue, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::{Body as _, Incoming, SizeHint};
use tandem_protocol::openai::{ApiError, ErrorKind};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::HttpLimits;

/// Why a request body was not read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("The request body is larger than the server accepts ({limit} bytes at most).")]
    TooLarge { limit: usize },
    #[error("The request body did not arrive within {} s.", .0.as_secs_f64())]
    TimedOut(Duration),
    #[error("Could not read the request body: {0}")]
    Unreadable(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error(
        "The server holds as many request bodies as it takes at once ({} MiB); retry shortly.",
        .budget_bytes >> 20
    )]
    Busy { budget_bytes: usize },
}

impl BodyError {
    /// The error as a client sees it.
    pub fn api_error(&self) -> ApiError {
        let kind = match self {
            BodyError::TooLarge { .. } => ErrorKind::PayloadTooLarge,
            BodyError::TimedOut(_) => ErrorKind::RequestTimeout,
            BodyError::Unreadable(_) => ErrorKind::BadRequest,
            BodyError::Busy { .. } => ErrorKind::Unavailable,
        };
        ApiError::new(kind, self.to_string())
    }
}

impl IntoResponse for BodyError {
    fn into_response(self) -> Response {
        let busy = matches!(self, BodyError::Busy { .. });
        let mut response = error_response(self.api_error());
        if busy {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

/// The bytes of request bodies a server holds at once, counted in KiB: each request
/// with a body reserves its share before the first byte is read and keeps it until the
/// application has begun its answer (the parsed and re-encoded copies of a body live
/// that long), so many large bodies at once wait for room instead of growing memory
/// without bound.
#[derive(Debug)]
pub struct BodyBudget {
    kib: Arc<Semaphore>,
    bytes: usize,
}

/// A request's share of the [`BodyBudget`], given back when dropped.
#[derive(Debug)]
pub struct BodyReservation {
    _permit: OwnedSemaphorePermit,
}

impl BodyBudget {
    pub fn new(bytes: usize) -> Self {
        Self {
            kib: Arc::new(Semaphore::new(
                bytes.div_ceil(1024).min(Semaphore::MAX_PERMITS),
            )),
            bytes,
        }
    }

    /// Reserves the share of a body of `size` (its `Content-Length`, else `limit`, the
    /// largest accepted); `None` for a request without a body, or one declared over
    /// `limit` (refused unread); [`BodyError::Busy`] when the budget has no room for it
    /// now.
    pub fn reserve(
        &self,
        size: &SizeHint,
        limit: usize,
    ) -> Result<Option<BodyReservation>, BodyError> {
        let bytes = match size.exact() {
            Some(0) => return Ok(None),
            Some(declared) if declared_too_large(declared, limit) => return Ok(None),
            Some(declared) => usize::try_from(declared).unwrap_or(limit),
            None => limit,
        };
        let kib = u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX);
        Arc::clone(&self.kib)
            .try_acquire_many_owned(kib)
            .map(|permit| Some(BodyReservation { _permit: permit }))
            .map_err(|_| BodyError::Busy {
                budget_bytes: self.bytes,
            })
    }
}

/// `error` as an OpenAI error body with its status, closing the connection after it.
pub fn error_response(error: ApiError) -> Response {
    let status = StatusCode::from_u16(error.status()).unwrap_or(StatusCode::BAD_REQUEST);
    let mut response = (status, Json(error.body())).into_response();
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// The request with its body read whole: refused from `Content-Length` before any
/// byte is read when it declares more than the limit, else read until it ends, passes
/// the limit or runs out of time.
pub async fn read_whole(
    request: Request<Incoming>,
    limits: &HttpLimits,
) -> Result<Request<Body>, BodyError> {
    let (parts, body) = request.into_parts();
    let limit = limits.max_body_bytes;
    if declared_too_large(body.size_hint().lower(), limit) {
        return Err(BodyError::TooLarge { limit });
    }
    let read = Limited::new(body, limit).collect();
    let collected = tokio::time::timeout(limits.body_read_timeout, read)
        .await
        .map_err(|_| BodyError::TimedOut(limits.body_read_timeout))?
        .map_err(|error| {
            if error.is::<LengthLimitError>() {
                BodyError::TooLarge { limit }
            } else {
                BodyError::Unreadable(error)
            }
        })?;
    Ok(Request::from_parts(parts, Body::from(collected.to_bytes())))
}

fn declared_too_large(declared: u64, limit: usize) -> bool {
    usize::try_from(declared).map_or(true, |declared| declared > limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_lengths_over_the_limit_are_refused() {
        assert!(!declared_too_large(0, 10));
        assert!(!declared_too_large(10, 10));
        assert!(declared_too_large(11, 10));
        assert!(declared_too_large(u64::MAX, usize::MAX - 1));
    }

    #[test]
    fn errors_have_the_openai_statuses() {
        let status = |error: BodyError| error.api_error().status();
        assert_eq!(status(BodyError::TooLarge { limit: 1 }), 413);
        assert_eq!(status(BodyError::TimedOut(Duration::from_secs(1))), 408);
        assert_eq!(status(BodyError::Unreadable("broken".into())), 400);
        assert_eq!(status(BodyError::Busy { budget_bytes: 1 }), 503);
    }

    #[test]
    fn the_budget_reserves_declared_lengths_and_the_limit_for_chunked_bodies() {
        let budget = BodyBudget::new(3 * 1024);
        assert!(
            budget
                .reserve(&SizeHint::with_exact(0), 2048)
                .unwrap()
                .is_none()
        );
        let first = budget.reserve(&SizeHint::with_exact(1024), 2048).unwrap();
        // A chunked body counts as the largest accepted (2 KiB): 3 KiB in all.
        let chunked = budget.reserve(&SizeHint::new(), 2048).unwrap();
        assert!(matches!(
            budget.reserve(&SizeHint::with_exact(1), 2048),
            Err(BodyError::Busy { budget_bytes: 3072 })
        ));
        drop(first);
        // A declared length past the limit reserves nothing: it gets 413 unread.
        assert!(
            budget
                .reserve(&SizeHint::with_exact(1 << 40), 1024)
                .unwrap()
                .is_none()
        );
        assert!(
            budget
                .reserve(&SizeHint::with_exact(1024), 2048)
                .unwrap()
                .is_some()
        );
        drop(chunked);
    }

    #[test]
    fn busy_answers_say_when_to_retry() {
        let response = BodyError::Busy {
            budget_bytes: 1 << 20,
        }
        .into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        assert_eq!(response.headers()[header::CONNECTION], "close");
    }

    #[test]
    fn error_answers_close_the_connection() {
        let response = BodyError::TimedOut(Duration::from_secs(30)).into_response();
        assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
        assert_eq!(response.headers()[header::CONNECTION], "close");
    }
}
