//! Operations: `/healthz` (the process answers), `/readyz` (NATS, MongoDB
//! and Redis answer; 503 naming the failing one otherwise), `/metrics`
//! (Prometheus text).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::state::AppState;
use crate::config::Mode;

async fn healthz() -> impl IntoResponse {
    Json(json!({ "status": "ok" }))
}

async fn readyz(State(node): State<Arc<AppState>>) -> axum::response::Response {
    if !node.is_serving() {
        let detail = match node.mode {
            Mode::Embedded => "rebuilding the views from the event log",
            Mode::Distributed => "starting the projectors",
        };
        let body = json!({ "status": "starting", "mode": node.mode.name(), "detail": detail });
        return (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "1")], Json(body)).into_response();
    }
    let [log, views, counts] = node.commands.check().await;
    // Details go to the log for the operator; the (unauthenticated) answer
    // only says which dependency is down.
    let verdict = |name: &str, r: Result<(), String>| match r {
        Ok(()) => json!("ok"),
        Err(e) => {
            tracing::warn!(dependency = name, error = %e, "readiness check failed");
            json!("unavailable")
        }
    };
    let ok = log.is_ok() && views.is_ok() && counts.is_ok();
    let [log_name, views_name, counts_name] = match node.mode {
        Mode::Distributed => ["event log (NATS)", "views (MongoDB)", "counts (Redis)"],
        Mode::Embedded => ["event log (file)", "views (in process)", "counts (in process)"],
    };
    let body = json!({
        "status": if ok { "ready" } else { "unavailable" },
        "mode": node.mode.name(),
        "eventLog": verdict(log_name, log),
        "views": verdict(views_name, views),
        "counts": verdict(counts_name, counts),
    });
    match ok {
        true => (StatusCode::OK, Json(body)).into_response(),
        false => (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "1")], Json(body)).into_response(),
    }
}

async fn metrics(State(node): State<Arc<AppState>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], node.metrics.render())
}

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}
