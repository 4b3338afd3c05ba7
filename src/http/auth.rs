//! `POST /api/auth/register`, `POST /api/auth/login`, and the [`Caller`]
//! extractor that every other `/api` route uses.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::routing::post;
use axum::{Json, Router, extract::State};
use natter_projections::UserView;
use serde::Deserialize;
use serde_json::{Value, json};

use super::extract::{ApiJson, ClientIp};
use crate::error::ApiError;
use crate::state::AppState;
use crate::commands::register::Register;

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

/// Another user as clients see them: who they are, never their email (a
/// directory of addresses is what spammers and phishers page through).
pub fn public_user(u: &UserView) -> Value {
    json!({ "_id": u.id, "name": u.name, "createdAt": u.created_at })
}

/// The caller themselves (login answers): with their email.
fn own_user(u: &UserView) -> Value {
    let mut v = public_user(u);
    v["email"] = json!(u.email);
    v
}

#[derive(Deserialize)]
struct RegisterBody {
    name: String,
    email: String,
    password: String,
}

#[derive(Deserialize)]
struct LoginBody {
    email: String,
    password: String,
}

/// What a registration answers, whether or not the address was free: a
/// different answer (or a token) would tell anyone which addresses have an
/// account. The client logs in next, as with any account.
const REGISTERED: &str = "If this email had no account, it has one now: log in with this email and password";

async fn register(
    State(node): State<Arc<AppState>>,
    ClientIp(ip): ClientIp,
    ApiJson(body): ApiJson<RegisterBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    node.rate.register(&ip).await?;
    let created = node
        .commands
        .register(Register { name: body.name, email: body.email, password: body.password })
        .await?;
    if created.is_none() {
        tracing::debug!("a registration for an address that has an account: answered like any other");
    }
    Ok((StatusCode::ACCEPTED, Json(json!({ "success": true, "message": REGISTERED }))))
}

async fn login(State(node): State<Arc<AppState>>, ClientIp(ip): ClientIp, ApiJson(body): ApiJson<LoginBody>) -> Result<Json<Value>, ApiError> {
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
    Ok(Json(json!({ "success": true, "token": token, "user": own_user(&user) })))
}

pub fn router() -> Router<Arc<AppState>> {
    Router::new().route("/api/auth/register", post(register)).route("/api/auth/login", post(login))
}
