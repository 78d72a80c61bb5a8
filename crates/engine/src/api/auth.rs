//! The worker's API key (`--api-key`, as vLLM's): every `/v1/*`, `/tokenize` and
//! `/detokenize` request must carry `Authorization: Bearer KEY`, else 401; `/health`
//! and `/metrics` stay open.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tandem_protocol::openai::{ApiError, ErrorKind};

use super::HttpError;

/// Middleware: lets the request through when it carries the key, else answers 401.
pub async fn require_key(State(key): State<Arc<str>>, request: Request, next: Next) -> Response {
    if tandem_httpd::auth::bearer_matches(request.headers(), &key) {
        return next.run(request).await;
    }
    HttpError(ApiError::new(
        ErrorKind::Unauthorized,
        "Unauthorized: a valid API key is required.",
    ))
    .into_response()
}
