//! Reading a request body whole, within the size limit and the body read timeout,
//! before the application sees the request; and the answers when that fails, which
//! close the connection (its remaining bytes are not worth reading as a request).

use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::http::{HeaderValue, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::{Body as _, Incoming};
use tandem_protocol::openai::{ApiError, ErrorKind};

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
}

impl BodyError {
    /// The error as a client sees it.
    pub fn api_error(&self) -> ApiError {
        let kind = match self {
            BodyError::TooLarge { .. } => ErrorKind::PayloadTooLarge,
            BodyError::TimedOut(_) => ErrorKind::RequestTimeout,
            BodyError::Unreadable(_) => ErrorKind::BadRequest,
        };
        ApiError::new(kind, self.to_string())
    }
}

impl IntoResponse for BodyError {
    fn into_response(self) -> Response {
        error_response(self.api_error())
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
    }

    #[test]
    fn error_answers_close_the_connection() {
        let response = BodyError::TimedOut(Duration::from_secs(30)).into_response();
        assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
        assert_eq!(response.headers()[header::CONNECTION], "close");
    }
}
