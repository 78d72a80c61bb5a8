//! The error body every endpoint returns, `{"error":{"message","type","param","code"}}`
//! (vLLM's format: `type` names the error class and `code` repeats the HTTP status),
//! and [`ApiError`], the typed error that carries its HTTP status until it is sent.

use serde::{Deserialize, Serialize};

/// The class of an API error; decides the HTTP status and the body's `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// 400: the request is malformed or asks for something impossible.
    BadRequest,
    /// 401: a missing or wrong API key.
    Unauthorized,
    /// 404: unknown model or path.
    NotFound,
    /// 405: the path exists but not with this method.
    MethodNotAllowed,
    /// 408: the request body did not arrive in time.
    RequestTimeout,
    /// 409: the request conflicts with the server's state (an admin change that
    /// cannot be made now).
    Conflict,
    /// 413: the body is over the size limit.
    PayloadTooLarge,
    /// 500: the server failed while serving a valid request.
    Internal,
    /// 502: an upstream worker failed (the router's answer).
    BadGateway,
    /// 503: the engine is not running, or no worker can take the request.
    Unavailable,
}

impl ErrorKind {
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::BadRequest => 400,
            ErrorKind::Unauthorized => 401,
            ErrorKind::NotFound => 404,
            ErrorKind::MethodNotAllowed => 405,
            ErrorKind::RequestTimeout => 408,
            ErrorKind::Conflict => 409,
            ErrorKind::PayloadTooLarge => 413,
            ErrorKind::Internal => 500,
            ErrorKind::BadGateway => 502,
            ErrorKind::Unavailable => 503,
        }
    }

    /// The body's `type` field (vLLM's exception class names).
    pub fn type_name(self) -> &'static str {
        match self {
            ErrorKind::BadRequest => "BadRequestError",
            ErrorKind::Unauthorized => "AuthenticationError",
            ErrorKind::NotFound => "NotFoundError",
            ErrorKind::MethodNotAllowed => "MethodNotAllowedError",
            ErrorKind::RequestTimeout => "RequestTimeoutError",
            ErrorKind::Conflict => "ConflictError",
            ErrorKind::PayloadTooLarge => "RequestEntityTooLargeError",
            ErrorKind::Internal => "InternalServerError",
            ErrorKind::BadGateway => "BadGatewayError",
            ErrorKind::Unavailable => "ServiceUnavailableError",
        }
    }
}

/// An error to report to a client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
    /// The request field at fault, when there is one.
    pub param: Option<String>,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            param: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadRequest, message)
    }

    /// A 400 about one request field.
    pub fn invalid_param(param: &str, message: impl Into<String>) -> Self {
        Self::bad_request(message).with_param(param)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, message)
    }

    pub fn with_param(mut self, param: &str) -> Self {
        self.param = Some(param.to_owned());
        self
    }

    pub fn status(&self) -> u16 {
        self.kind.status()
    }

    /// The JSON body to send.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                message: self.message.clone(),
                kind: self.kind.type_name().to_owned(),
                param: self.param.clone(),
                code: self.status(),
            },
        }
    }
}

/// `{"error": {...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    /// The HTTP status.
    pub code: u16,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_has_vllms_four_fields() {
        let error = ApiError::invalid_param("temperature", "temperature must be >= 0");
        let json = serde_json::to_value(error.body()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"error": {
                "message": "temperature must be >= 0",
                "type": "BadRequestError",
                "param": "temperature",
                "code": 400
            }})
        );
    }

    #[test]
    fn param_is_null_when_absent_and_code_is_the_status() {
        let json = serde_json::to_value(ApiError::not_found("no such model").body()).unwrap();
        assert_eq!(json["error"]["param"], serde_json::Value::Null);
        assert_eq!(json["error"]["code"], 404);
        assert_eq!(json["error"]["type"], "NotFoundError");
    }
}
