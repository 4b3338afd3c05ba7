//! The HTTP gateway. Each area exposes `router()`; [`router`] merges them
//! over the one shared [`AppState`], adds the body limit, request metrics
//! and the JSON 404; [`gate`] holds requests off until the node serves.
//!
//! - [`auth`]: register, login, and the [`auth::Caller`] extractor.
//! - [`users`]: `GET /api/users`.
//! - [`messages`]: direct messages and seen marks.
//! - [`rooms`]: study rooms.
//! - [`ops`]: `/healthz`, `/readyz`, `/metrics`.
//! - [`admission`]: how many requests a node works on at once (503 `overloaded` beyond).
//! - [`web`]: the web client at `/` (files compiled in from `web/`).
//! - [`extract`]: [`extract::ApiJson`], a JSON body whose rejections are
//!   [`ApiError`]s.
//! - [`openapi`]: the OpenAPI 3.1 description at `/api/openapi.json`, built
//!   from the handlers' `#[utoipa::path]` and the shapes in `wire.rs`:
//!   routes are registered through `routes!`, so a route cannot be served
//!   without being described.

mod admission;
mod auth;
mod extract;
mod messages;
mod openapi;
mod ops;
mod rooms;
pub(crate) mod shown;
mod users;
mod web;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use axum::{Router, extract::DefaultBodyLimit};

use crate::error::ApiError;
use crate::state::{AppState, Phase};

async fn record(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let started = Instant::now();
    let response = next.run(req).await;
    state.metrics.http_request(&route, response.status().as_u16(), started.elapsed().as_secs_f64());
    response
}

/// Until the node serves (an embedded node rebuilding its views from the
/// log at start-up), everything but `/healthz`, `/readyz` and `/metrics` —
/// Socket.IO included — answers 503 `starting`: answers from half-built
/// views would be wrong. A draining node (SIGTERM) answers 503 `draining`,
/// so a load balancer (or the client) sends the request to another node.
pub async fn gate(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let phase = state.phase();
    if phase == Phase::Serving || matches!(path, "/healthz" | "/readyz" | "/metrics") {
        return next.run(req).await;
    }
    let refusal = match phase {
        Phase::Draining => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "draining", "this node is shutting down; retry (another node will answer)"),
        _ => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "starting", "natter is rebuilding its views from the event log; retry shortly"),
    };
    axum::response::IntoResponse::into_response(refusal)
}

/// Bounds a node's REST work: at most as many requests at once as
/// [`admission`] allows (`NATTER_MAX_IN_FLIGHT`, lowered while requests
/// queue; more are answered 503 `overloaded` at once, so a burst costs a
/// refusal each instead of a queue and its memory), each within
/// `NATTER_REQUEST_TIMEOUT_MS` (then 503 `timeout`: a stalled store or
/// client holds no request forever). Health, readiness and metrics are
/// exempt, so the operator and the load balancer can still see the node.
#[derive(Clone)]
struct Overload {
    admission: Arc<admission::Admission>,
    timeout: Option<std::time::Duration>,
    max_body: usize,
    metrics: Arc<crate::metrics::Metrics>,
}

async fn shed(State(o): State<Overload>, req: Request, next: Next) -> Response {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    if matches!(req.uri().path(), "/healthz" | "/readyz" | "/metrics") {
        return next.run(req).await;
    }
    let Some(ticket) = o.admission.admit() else {
        o.metrics.http_shed();
        return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", "this node is at capacity; retry shortly").into_response();
    };
    // Work whose latency says whether requests queue (see `admission`).
    let path = req.uri().path();
    let work = path.starts_with("/api/") && !path.starts_with("/api/auth/") && path != "/api/openapi.json";
    // When the body had arrived: the work is timed from then.
    let body_done = std::sync::OnceLock::new();
    let run = async {
        // The body first (at most NATTER_MAX_BODY_BYTES): how long a client
        // takes to send it is not the node's latency. GET and HEAD bodies
        // are left unread, as the routes leave them.
        let (parts, body) = req.into_parts();
        let body = if matches!(parts.method, axum::http::Method::GET | axum::http::Method::HEAD) {
            body
        } else {
            match axum::body::to_bytes(body, o.max_body).await {
                Ok(body) => axum::body::Body::from(body),
                Err(e) => {
                    let refusal = if e.into_inner().is::<http_body_util::LengthLimitError>() {
                        ApiError::payload_too_large()
                    } else {
                        ApiError::bad_request("the request body could not be read")
                    };
                    return (refusal.into_response(), false);
                }
            }
        };
        body_done.get_or_init(std::time::Instant::now);
        let response = next.run(Request::from_parts(parts, body)).await;
        let status = response.status();
        let sampled = work && (status.is_success() || status.is_server_error());
        (response, sampled)
    };
    let (response, sampled) = match o.timeout {
        None => run.await,
        Some(limit) => match tokio::time::timeout(limit, run).await {
            Ok(done) => done,
            Err(_) => {
                o.metrics.http_timeout();
                tracing::warn!(timeout_ms = limit.as_millis() as u64, "a request took longer than NATTER_REQUEST_TIMEOUT_MS: answered 503 (is a store stalled? see /readyz)");
                let timeout = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "timeout", "the request took too long; retry shortly (sends: with the same clientMsgId)");
                // Work that timed out is the slowest sample there is; a
                // body that never finished arriving is the client's (below).
                (timeout.into_response(), work)
            }
        },
    };
    // Timed from when the body had arrived.
    match body_done.get().filter(|_| sampled).map(|t| t.elapsed()) {
        Some(latency) => ticket.sample(latency),
        None => drop(ticket),
    }
    response
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

/// The CORS layer for the configured origins (`None`: same origin only).
/// Tokens travel in headers and the Socket.IO handshake, never cookies, so
/// credentials are not allowed.
pub fn cors(origins: &crate::config::CorsOrigins) -> Option<tower_http::cors::CorsLayer> {
    use axum::http::{HeaderValue, Method, header};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let allow = match origins {
        crate::config::CorsOrigins::None => return None,
        crate::config::CorsOrigins::Any => AllowOrigin::any(),
        crate::config::CorsOrigins::List(list) => AllowOrigin::list(list.iter().filter_map(|o| HeaderValue::from_str(o).ok())),
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::PATCH, Method::PUT, Method::DELETE])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
            .expose_headers([header::RETRY_AFTER])
            .max_age(std::time::Duration::from_secs(600)),
    )
}

pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.limits.max_body_bytes;
    let (api, doc) = utoipa_axum::router::OpenApiRouter::with_openapi(openapi::base())
        .merge(auth::router())
        .merge(users::router())
        .merge(messages::router())
        .merge(rooms::router())
        .merge(ops::router())
        .split_for_parts();
    let overload = Overload {
        admission: Arc::new(admission::Admission::new(
            state.limits.max_in_flight,
            state.limits.overload_latency,
            state.limits.overload_window,
            state.metrics.admission_gauge(),
        )),
        timeout: (!state.limits.request_timeout.is_zero()).then_some(state.limits.request_timeout),
        max_body: limit,
        metrics: state.metrics.clone(),
    };
    api.merge(openapi::router(doc))
        .merge(web::router())
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(overload, shed))
        .layer(axum::middleware::from_fn_with_state(state.clone(), record))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}
