//! Operations: `/healthz` (the process answers), `/readyz` (NATS, MongoDB
//! and Redis answer; 503 naming the failing one otherwise), `/metrics`
//! (Prometheus text).

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use super::AppState;

async fn healthz() -> impl IntoResponse {
    Json(json!({ "status": "ok" }))
}

async fn readyz(State(node): State<AppState>) -> impl IntoResponse {
    let (log, views, counts) = tokio::join!(node.log.check(), node.views.check(), node.counts.check());
    let verdict = |r: Result<(), String>| match r {
        Ok(()) => json!("ok"),
        Err(e) => json!(e),
    };
    let ok = log.is_ok() && views.is_ok() && counts.is_ok();
    let body = json!({
        "status": if ok { "ready" } else { "unavailable" },
        "eventLog": verdict(log.map_err(|e| e.to_string())),
        "views": verdict(views.map_err(|e| e.to_string())),
        "counts": verdict(counts.map_err(|e| e.to_string())),
    });
    if !ok {
        tracing::warn!(%body, "readiness check failed");
    }
    (if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, Json(body))
}

async fn metrics(State(node): State<AppState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], node.metrics.render())
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}
