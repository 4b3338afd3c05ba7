//! Request extractors shared by the HTTP areas.

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::state::AppState;

/// The client's IP, for per-IP limits ([`crate::ratelimit::client_ip`]).
pub struct ClientIp(pub String);

impl FromRequestParts<Arc<AppState>> for ClientIp {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        Ok(ClientIp(crate::ratelimit::client_ip(parts, &state.limits.client_ip_header)))
    }
}

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

/// An id in the path whose rejections are [`ApiError`]s (a segment that
/// is not UTF-8 or not decodable is a 400 in the usual shape, never axum's
/// plain-text answer).
pub struct ApiPath<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match <Path<T> as FromRequestParts<S>>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(ApiPath(value)),
            Err(e) => Err(ApiError::bad_request(format!("invalid path: {}", path_reason(&e)))),
        }
    }
}

fn path_reason(e: &PathRejection) -> String {
    match e {
        PathRejection::FailedToDeserializePathParams(inner) => inner.body_text(),
        other => other.body_text(),
    }
}
