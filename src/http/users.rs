//! `GET /api/users`: everyone but me, paged by id, with my unseen counts
//! (`unseenMessages`: peer id → count, non-zero only) from one Redis read.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::auth::Caller;
use crate::error::ApiError;
use crate::state::AppState;
use crate::wire::{PublicUser, UsersPage};

pub const DEFAULT_PAGE: u32 = 100;
pub const MAX_PAGE: u32 = 500;

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct Page {
    /// 1 to 500 (default 100).
    limit: Option<u32>,
    /// The `nextCursor` of the previous page.
    after: Option<String>,
}

/// Everyone but the caller, paged by id, with the caller's unseen counts.
#[utoipa::path(get, path = "/api/users", operation_id = "list_users", tag = "direct messages", params(Page), security(("bearer" = [])),
    responses((status = 200, body = UsersPage)))]
async fn list(
    State(node): State<Arc<AppState>>,
    Caller(me): Caller,
    page: Result<Query<Page>, QueryRejection>,
) -> Result<Json<UsersPage>, ApiError> {
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
    Ok(Json(UsersPage { success: true, users: users.iter().map(PublicUser::new).collect(), unseen_messages: unseen, next_cursor: next }))
}

pub fn router() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new().routes(routes!(list))
}
