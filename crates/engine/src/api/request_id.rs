//! Request ids: the client's `X-Request-Id` when it sends one, else a fresh random
//! id; handlers read it from the request's extensions and the response echoes it.

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use rand::Rng;

pub const HEADER: &str = "x-request-id";

/// Longest client-supplied id kept; longer ones are replaced by a generated id.
const MAX_ID_LEN: usize = 256;

/// The id of the request being served.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// Middleware: attaches a [`RequestId`] and echoes it in the response header.
pub async fn assign(mut request: Request, next: Next) -> Response {
    let id = client_id(&request).unwrap_or_else(random_id);
    request.extensions_mut().insert(RequestId(id.clone()));
    let mut response = next.run(request).await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(HEADER, value);
    }
    response
}

fn client_id(request: &Request) -> Option<String> {
    let value = request.headers().get(HEADER)?.to_str().ok()?.trim();
    let usable = !value.is_empty() && value.len() <= MAX_ID_LEN;
    usable.then(|| value.to_owned())
}

/// 32 random hex digits, like vLLM's `random_uuid()`.
fn random_id() -> String {
    let value: u128 = rand::rng().random();
    format!("{value:032x}")
}
