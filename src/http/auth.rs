//! `POST /api/auth/register`, `POST /api/auth/login`, and the [`Caller`]
//! extractor that every other `/api` route uses.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::{Json, extract::State};
use serde::Deserialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::extract::{ApiJson, ClientIp};
use crate::error::ApiError;
use crate::state::AppState;
use crate::commands::register::Register;
use crate::wire::{ErrorBody, LoggedIn, OwnUser, PublicUser, Registered};

/// The authenticated caller's user id, from `Authorization: Bearer <jwt>`.
pub struct Caller(pub String);

impl FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer <token> header"))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| ApiError::unauthorized("Authorization header must be `Bearer <token>`"))?;
        Ok(Caller(state.auth.verify(token)?.user))
    }
}

#[derive(Deserialize, ToSchema)]
struct RegisterBody {
    /// 1 to 100 characters.
    name: String,
    email: String,
    /// 8 to 1024 characters.
    password: String,
}

#[derive(Deserialize, ToSchema)]
struct LoginBody {
    email: String,
    password: String,
}

/// What a registration answers, whether or not the address was free: a
/// different answer (or a token) would tell anyone which addresses have an
/// account. The client logs in next, as with any account.
const REGISTERED: &str = "If this email had no account, it has one now: log in with this email and password";

/// Create an account. The answer is the same whether or not the address
/// already had one (so it tells nobody which addresses do): log in next.
#[utoipa::path(post, path = "/api/auth/register", tag = "accounts", request_body = RegisterBody,
    responses((status = 202, body = Registered, description = "accepted; log in with this email and password")))]
async fn register(
    State(node): State<Arc<AppState>>,
    ClientIp(ip): ClientIp,
    ApiJson(body): ApiJson<RegisterBody>,
) -> Result<(StatusCode, Json<Registered>), ApiError> {
    node.rate.register(&ip).await?;
    let created = node
        .commands
        .register(Register { name: body.name, email: body.email, password: body.password })
        .await?;
    if created.is_none() {
        tracing::debug!("a registration for an address that has an account: answered like any other");
    }
    Ok((StatusCode::ACCEPTED, Json(Registered { success: true, message: REGISTERED.into() })))
}

/// Log in: a token, and the caller's own user (with their email). An
/// unknown address and a wrong password get the same 401.
#[utoipa::path(post, path = "/api/auth/login", tag = "accounts", request_body = LoginBody,
    responses((status = 200, body = LoggedIn), (status = 401, body = ErrorBody, description = "invalid email or password")))]
async fn login(State(node): State<Arc<AppState>>, ClientIp(ip): ClientIp, ApiJson(body): ApiJson<LoginBody>) -> Result<Json<LoggedIn>, ApiError> {
    let account = crate::commands::register::email_key(&body.email);
    node.rate.login(&ip, &account).await?;
    let user = match node.commands.login(&body.email, body.password).await {
        Ok(user) => {
            node.rate.login_counted_out(&ip, &account).await;
            user
        }
        // A wrong address or password stays counted as a failure.
        Err(e @ crate::commands::CommandError::Refused(_)) => return Err(e.into()),
        Err(e) => {
            node.rate.login_counted_out(&ip, &account).await;
            return Err(e.into());
        }
    };
    let token = node.auth.issue(&user.id);
    Ok(Json(LoggedIn { success: true, token, user: OwnUser { user: PublicUser::new(&user), email: user.email.clone() } }))
}

pub fn router() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new().routes(routes!(register)).routes(routes!(login))
}
