//! `GET /api/users`: everyone but me, paged by id, with my unseen counts
//! (`unseenMessages`: peer id → count, non-zero only) from one Redis read,
//! and `blocked: true` on those I blocked. `PUT`/`DELETE
//! /api/users/:id/block`: block or unblock a user.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::auth::Caller;
use super::extract::ApiPath;
use crate::error::ApiError;
use crate::state::AppState;
use crate::wire::{BlockState, ErrorBody, PublicUser, UsersPage};

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
    let (users, unseen) = (users?, unseen?);
    let ids: Vec<String> = users.iter().map(|u| u.id.clone()).collect();
    let blocked: std::collections::HashSet<String> = node.views().blocked_among(&me, &ids).await?.into_iter().collect();
    let next = if users.len() == limit as usize { users.last().map(|u| u.id.clone()) } else { None };
    let users = users
        .iter()
        .map(|u| PublicUser { blocked: blocked.contains(&u.id), ..PublicUser::new(u) })
        .collect();
    Ok(Json(UsersPage { success: true, users, unseen_messages: unseen, next_cursor: next }))
}

async fn set_block(node: &AppState, me: &str, other: &str, on: bool) -> Result<Json<BlockState>, ApiError> {
    node.rate.block_change(me)?;
    node.commands.set_block(me, other, on).await?;
    Ok(Json(BlockState { success: true, blocked: on }))
}

/// Block a user: direct messages between you are refused both ways (they
/// get 403 `blocked` and learn nothing more) and their typing is not
/// relayed to you. Idempotent.
#[utoipa::path(put, path = "/api/users/{id}/block", operation_id = "block_user", tag = "direct messages", security(("bearer" = [])),
    params(("id" = String, Path, description = "the user to block")),
    responses((status = 200, body = BlockState), (status = 400, body = ErrorBody, description = "yourself, or not a valid id"), (status = 404, body = ErrorBody, description = "no such user")))]
async fn block(State(node): State<Arc<AppState>>, Caller(me): Caller, ApiPath(id): ApiPath<String>) -> Result<Json<BlockState>, ApiError> {
    set_block(&node, &me, &id, true).await
}

/// Unblock a user. Idempotent.
#[utoipa::path(delete, path = "/api/users/{id}/block", operation_id = "unblock_user", tag = "direct messages", security(("bearer" = [])),
    params(("id" = String, Path, description = "the user to unblock")),
    responses((status = 200, body = BlockState), (status = 400, body = ErrorBody, description = "yourself, or not a valid id"), (status = 404, body = ErrorBody, description = "no such user")))]
async fn unblock(State(node): State<Arc<AppState>>, Caller(me): Caller, ApiPath(id): ApiPath<String>) -> Result<Json<BlockState>, ApiError> {
    set_block(&node, &me, &id, false).await
}

pub fn router() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new().routes(routes!(list)).routes(routes!(block, unblock))
}
