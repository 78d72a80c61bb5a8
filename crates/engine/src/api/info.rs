//! The informational endpoints: `/v1/models` (the served model's card), `/health`
//! and `/ping` (200, or 503 once the engine loop has stopped), `/version` and
//! `/metrics` (Prometheus text).

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use tandem_protocol::openai::{ModelCard, ModelList};

use super::SharedState;

pub async fn models(State(state): State<SharedState>) -> Json<ModelList> {
    let model = &state.model;
    Json(ModelList::new(vec![ModelCard::new(
        model.name.clone(),
        model.root.clone(),
        state.started,
        model.max_model_len,
    )]))
}

/// 200 with an empty body while the engine runs (as vLLM), else 503.
pub async fn health(State(state): State<SharedState>) -> StatusCode {
    if state.engine.is_alive() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// `{"version": …}`, as vLLM answers it (tandem's version).
pub async fn version() -> Json<serde_json::Value> {
    Json(serde_json::json!({"version": env!("CARGO_PKG_VERSION")}))
}

pub async fn metrics(State(state): State<SharedState>) -> Response {
    let text = match &state.metrics {
        Some(handle) => {
            handle.run_upkeep();
            handle.render()
        }
        None => String::new(),
    };
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}
