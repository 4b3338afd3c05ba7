//! The HTTP gateway. Each area exposes `router()`; [`router`] merges them
//! over one shared [`Node`] state, adds the body limit, request metrics and
//! the JSON 404.
//!
//! - [`auth`]: register, login, and the [`auth::Caller`] extractor.
//! - [`users`]: `GET /api/users`.
//! - [`messages`]: direct messages and seen marks.
//! - [`rooms`]: study rooms.
//! - [`ops`]: `/healthz`, `/readyz`, `/metrics`.

pub mod auth;
pub mod error;
pub mod messages;
pub mod ops;
pub mod rooms;
pub mod users;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use axum::{Router, extract::DefaultBodyLimit};
use serde::de::DeserializeOwned;

pub use error::ApiError;

use crate::node::Node;

pub type AppState = Arc<Node>;

/// A JSON body whose rejections are [`ApiError`]s (400 malformed, 422 wrong
/// shape, 413 too large, 415 not JSON).
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let axum::Json(value) = <axum::Json<T> as FromRequest<S>>::from_request(req, state)
            .await
            .map_err(|e: JsonRejection| ApiError::from(e))?;
        Ok(ApiJson(value))
    }
}

async fn record(state: axum::extract::State<AppState>, req: Request, next: Next) -> Response {
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
/// views would be wrong.
pub async fn gate(state: axum::extract::State<AppState>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if state.serving.load(std::sync::atomic::Ordering::Acquire) || matches!(path, "/healthz" | "/readyz" | "/metrics") {
        return next.run(req).await;
    }
    axum::response::IntoResponse::into_response(ApiError::new(
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        "starting",
        "natter is rebuilding its views from the event log; retry shortly",
    ))
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

pub fn router(state: AppState) -> Router {
    let limit = state.cfg.max_body_bytes;
    Router::new()
        .merge(auth::router())
        .merge(users::router())
        .merge(messages::router())
        .merge(rooms::router())
        .merge(ops::router())
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(state.clone(), record))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}
