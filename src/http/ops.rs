//! Operations: `/healthz` (the process answers), `/readyz` (NATS, MongoDB
//! and Redis answer; 503 naming the failing one otherwise), `/metrics`
//! (Prometheus text).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::Json;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::config::Mode;
use crate::state::{AppState, Phase};
use crate::wire::{Health, Readiness};

/// The process answers.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, body = Health)))]
async fn healthz() -> Json<Health> {
    Json(Health { status: "ok".into() })
}

/// Whether the node serves and its event log, views and counts answer
/// (details of a failure go to the node's log, not to this answer).
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, body = Readiness), (status = 503, body = Readiness, description = "starting, draining (shutting down), or a dependency is unavailable")))]
async fn readyz(State(node): State<Arc<AppState>>) -> axum::response::Response {
    let phase = node.phase();
    if phase != Phase::Serving {
        let (status, detail) = match (phase, node.mode) {
            (Phase::Draining, _) => ("draining", "shutting down: new requests go to other nodes"),
            (_, Mode::Embedded) => ("starting", "rebuilding the views from the event log"),
            (_, Mode::Distributed) => ("starting", "starting the projectors"),
        };
        let body = Readiness {
            status: status.into(),
            mode: node.mode.name().into(),
            detail: Some(detail.into()),
            event_log: None,
            views: None,
            counts: None,
        };
        return (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "1")], Json(body)).into_response();
    }
    let [log, views, counts] = node.commands.check().await;
    // Details go to the log for the operator; the (unauthenticated) answer
    // only says which dependency is down.
    let verdict = |name: &str, r: Result<(), String>| match r {
        Ok(()) => Some("ok".to_owned()),
        Err(e) => {
            tracing::warn!(dependency = name, error = %e, "readiness check failed");
            Some("unavailable".to_owned())
        }
    };
    let ok = log.is_ok() && views.is_ok() && counts.is_ok();
    let [log_name, views_name, counts_name] = match node.mode {
        Mode::Distributed => ["event log (NATS)", "views (MongoDB)", "counts (Redis)"],
        Mode::Embedded => ["event log (file)", "views (in process)", "counts (in process)"],
    };
    let body = Readiness {
        status: if ok { "ready" } else { "unavailable" }.into(),
        mode: node.mode.name().into(),
        detail: None,
        event_log: verdict(log_name, log),
        views: verdict(views_name, views),
        counts: verdict(counts_name, counts),
    };
    match ok {
        true => (StatusCode::OK, Json(body)).into_response(),
        false => (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "1")], Json(body)).into_response(),
    }
}

/// Prometheus metrics (OpenMetrics text format).
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, body = String, content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8")))]
async fn metrics(State(node): State<Arc<AppState>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], node.metrics.render())
}

pub fn router() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new().routes(routes!(healthz)).routes(routes!(readyz)).routes(routes!(metrics))
}
