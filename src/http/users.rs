//! `GET /api/users`: everyone but me, paged by id, with my unseen counts
//! (`unseenMessages`: peer id → count, non-zero only) from one Redis read.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::{Caller, public_user};
use crate::error::ApiError;
use crate::state::AppState;

pub const DEFAULT_PAGE: u32 = 100;
pub const MAX_PAGE: u32 = 500;

#[derive(Deserialize)]
struct Page {
    limit: Option<u32>,
    after: Option<String>,
}

async fn list(
    State(node): State<Arc<AppState>>,
    Caller(me): Caller,
    page: Result<Query<Page>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(page) = page?;
    let limit = page.limit.unwrap_or(DEFAULT_PAGE);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::bad_request(format!("limit must be 1 to {MAX_PAGE}")));
    }
    if let Some(after) = &page.after {
        natter_events::validate_id(after).map_err(|e| ApiError::bad_request(format!("after is not a valid user id: {e}")))?;
    }
    let (users, unseen) = tokio::join!(node.views().users(&me, page.after.as_deref(), limit), node.counts().unseen(&me));
    let users = users?;
    let unseen = unseen?;
    let next = if users.len() == limit as usize { users.last().map(|u| u.id.clone()) } else { None };
    Ok(Json(json!({
        "success": true,
        "users": users.iter().map(public_user).collect::<Vec<_>>(),
        "unseenMessages": unseen,
        "nextCursor": next,
    })))
}

pub fn router() -> Router<Arc<AppState>> {
    Router::new().route("/api/users", get(list))
}
