//! The router's own errors as OpenAI-shaped responses (`{"error":{...}}` with the
//! status), the same shape workers use, so clients cannot tell who answered.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tandem_protocol::openai::ApiError;

pub fn error_response(error: ApiError) -> Response {
    let status = StatusCode::from_u16(error.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(error.body())).into_response()
}
