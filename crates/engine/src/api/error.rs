//! Turning errors into HTTP responses: every error a client can cause leaves as an
//! OpenAI-shaped body (`{"error":{...}}`) with its status, including the ones axum
//! would otherwise answer in plain text (unreadable or oversized bodies, unknown
//! paths and methods).

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use tandem_protocol::openai::{ApiError, ErrorKind};

/// An [`ApiError`] on its way out as a response.
#[derive(Debug)]
pub struct HttpError(pub ApiError);

impl From<ApiError> for HttpError {
    fn from(error: ApiError) -> Self {
        Self(error)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.status()).unwrap_or(StatusCode::BAD_REQUEST);
        (status, Json(self.0.body())).into_response()
    }
}

/// Parses a request body as JSON of type `T`; a body that could not be read (too
/// large, connection lost) or parsed becomes an API error.
pub fn parse_json_body<T: DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = body.map_err(body_rejection)?;
    serde_json::from_slice(&bytes).map_err(|e| json_error(&e))
}

/// Parses a request body as a JSON object, screens its fields for `endpoint` (see
/// [`super::fields`]), then reads it as `T`.
pub fn parse_screened_body<T: DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
    endpoint: super::sse::Endpoint,
) -> Result<T, ApiError> {
    let value: serde_json::Value = parse_json_body(body)?;
    if let Some(fields) = value.as_object() {
        super::fields::screen(endpoint, fields)?;
    }
    serde_json::from_value(value).map_err(|e| json_error(&e))
}

fn body_rejection(rejection: BytesRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::new(
            ErrorKind::PayloadTooLarge,
            "The request body is larger than the server accepts.",
        );
    }
    ApiError::bad_request(format!("Could not read the request body: {rejection}"))
}

fn json_error(error: &serde_json::Error) -> ApiError {
    use serde_json::error::Category;
    let what = match error.classify() {
        Category::Data => "Invalid request",
        Category::Syntax | Category::Eof | Category::Io => "Invalid JSON in the request body",
    };
    ApiError::bad_request(format!("{what}: {error}"))
}

/// Answer for paths that do not exist.
pub async fn not_found() -> HttpError {
    HttpError(ApiError::not_found("Not Found"))
}

/// Answer for known paths asked with the wrong method.
pub async fn method_not_allowed() -> HttpError {
    HttpError(ApiError::new(
        ErrorKind::MethodNotAllowed,
        "Method Not Allowed",
    ))
}
