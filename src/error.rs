//! The one HTTP error type: `{ "success": false, "message", "code" }` with
//! the status its variant says. Internal details are logged, never returned.

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::auth::TokenError;
use crate::commands::{CommandError, Failure, Refusal};
use crate::log::LogError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// `Retry-After` (seconds); every 503 has one (1 s unless set).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into(), retry_after: None }
    }

    /// Asks the client to come back in `secs` (`Retry-After`).
    pub fn retry_in(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs.max(1));
        self
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// A body over `NATTER_MAX_BODY_BYTES`.
    pub fn payload_too_large() -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", "request body is too large")
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// A dependency failed: logged in full, answered without details.
    fn failed(f: &Failure) -> Self {
        match f {
            Failure::Store(natter_projections::StoreError::Rebuilding(what)) => {
                tracing::warn!(what, "request refused while a view is rebuilt");
                rebuilding(what)
            }
            Failure::Log(LogError::Unavailable(_)) | Failure::Log(LogError::Conflict) | Failure::Store(_) => {
                tracing::error!(error = %f, "request failed: dependency unavailable");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "the service is temporarily unavailable; retry shortly (with the same clientMsgId)",
                )
            }
            Failure::Log(LogError::TooLarge(why)) => {
                tracing::warn!(why, "request refused: its event is too large to store");
                Self::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", "the message is too large to store")
            }
            Failure::Busy(_) => {
                tracing::warn!("request refused: password checks saturated");
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "busy", "the server is busy; retry shortly").retry_in(1)
            }
            Failure::Log(LogError::Corrupt { .. }) | Failure::Internal(_) => {
                tracing::error!(error = %f, "request failed: internal error");
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "Internal Server Error")
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = crate::wire::ErrorBody { success: false, message: self.message, code: self.code.to_owned() };
        let retry_after = self.retry_after.or((self.status == StatusCode::SERVICE_UNAVAILABLE).then_some(1));
        let mut response = (self.status, Json(body)).into_response();
        if let Some(secs) = retry_after {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        response
    }
}

impl From<CommandError> for ApiError {
    fn from(e: CommandError) -> Self {
        match e {
            CommandError::Refused(r) => {
                let (status, code) = match &r {
                    Refusal::BadInput(_) => (StatusCode::BAD_REQUEST, "bad_request"),
                    Refusal::Unauthenticated(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
                    Refusal::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
                    Refusal::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
                    Refusal::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
                    Refusal::Blocked(_) => (StatusCode::FORBIDDEN, "blocked"),
                };
                ApiError::new(status, code, r.to_string())
            }
            CommandError::Failed(f) => ApiError::failed(&f),
        }
    }
}

impl From<natter_projections::StoreError> for ApiError {
    fn from(e: natter_projections::StoreError) -> Self {
        ApiError::failed(&Failure::Store(e))
    }
}

fn rebuilding(what: &str) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "rebuilding",
        format!("{what} are being rebuilt from the event log; retry in a few seconds"),
    )
    .retry_in(5)
}

impl From<crate::ratelimit::Limited> for ApiError {
    fn from(l: crate::ratelimit::Limited) -> Self {
        let secs = l.retry_after.as_secs_f64().ceil() as u64;
        Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", format!("too many {}; retry in {secs} s", l.what)).retry_in(secs)
    }
}

impl From<TokenError> for ApiError {
    fn from(e: TokenError) -> Self {
        match e {
            TokenError::Expired => Self::new(StatusCode::UNAUTHORIZED, "token_expired", "token expired; log in again"),
            TokenError::Invalid(why) => Self::new(StatusCode::UNAUTHORIZED, "invalid_token", format!("invalid token: {why}")),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        match &r {
            JsonRejection::JsonSyntaxError(_) => {
                Self::new(StatusCode::BAD_REQUEST, "invalid_json", format!("request body is not valid JSON: {}", r.body_text()))
            }
            JsonRejection::JsonDataError(_) => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_body",
                format!("request body has the wrong shape: {}", r.body_text()),
            ),
            JsonRejection::MissingJsonContentType(_) => Self::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "expected a JSON body with Content-Type: application/json",
            ),
            _ if r.status() == StatusCode::PAYLOAD_TOO_LARGE => Self::payload_too_large(),
            _ => Self::new(r.status(), "bad_request", r.body_text()),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        Self::bad_request(format!("invalid query string: {}", r.body_text()))
    }
}
