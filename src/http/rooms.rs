//! Study rooms over REST. Reads and writes of a room's contents are for
//! members only; joining and leaving act for the caller only.
//!
//! - `POST /api/rooms` `{name, description?}` → 201 `{success, room}` (the
//!   creator is a member).
//! - `GET /api/rooms?limit=&after=` → `{success, rooms, nextCursor}`; each
//!   room has `isMember`, and for members `unread` (messages above my
//!   watermark) and `activeUsers` (how many are present now); who is in a
//!   room is for its members only.
//! - `GET /api/rooms/{id}` → `{success, room}`.
//! - `POST /api/rooms/{id}/join`, `POST /api/rooms/{id}/leave`.
//! - `GET /api/rooms/{id}/messages?before=&limit=` → oldest first; marks the
//!   room read.
//! - `POST /api/rooms/{id}/messages` `{message?, attachment?, clientMsgId?}`.
//! - `GET /api/rooms/{id}/users` → `{success, users: [{_id, name}], count}`:
//!   who is present now.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::Caller;
use super::extract::{ApiJson, ApiPath};
use crate::error::ApiError;
use crate::state::AppState;
use crate::commands::rooms::{CreateRoom, SendRoomMessage};
use crate::wire::{room_json, room_message_json};

pub const DEFAULT_PAGE: u32 = 100;
pub const MAX_PAGE: u32 = 500;

#[derive(Deserialize)]
struct CreateBody {
    name: String,
    description: Option<String>,
}

#[derive(Deserialize)]
struct Page {
    limit: Option<u32>,
    after: Option<String>,
    before: Option<u64>,
}

fn limit_of(p: &Page) -> Result<u32, ApiError> {
    let limit = p.limit.unwrap_or(DEFAULT_PAGE);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::bad_request(format!("limit must be 1 to {MAX_PAGE}")));
    }
    Ok(limit)
}

async fn present(node: &AppState, room: &str) -> Result<Vec<String>, ApiError> {
    node.presence.users(room).await.map_err(|e| {
        tracing::error!(%room, error = %e, "presence unavailable");
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "presence is temporarily unavailable")
    })
}

async fn room_or_404(node: &AppState, id: &str) -> Result<natter_projections::RoomView, ApiError> {
    natter_events::validate_id(id).map_err(|_| ApiError::not_found("Room not found"))?;
    node.views().room(id).await?.ok_or_else(|| ApiError::not_found("Room not found"))
}

async fn create(State(node): State<Arc<AppState>>, Caller(me): Caller, ApiJson(body): ApiJson<CreateBody>) -> Result<(StatusCode, Json<Value>), ApiError> {
    node.rate.room_change(&me)?;
    let room = node.commands.create_room(CreateRoom { creator: me, name: body.name, description: body.description }).await?;
    Ok((StatusCode::CREATED, Json(json!({ "success": true, "room": room_json(&room) }))))
}

async fn list(State(node): State<Arc<AppState>>, Caller(me): Caller, page: Result<Query<Page>, QueryRejection>) -> Result<Json<Value>, ApiError> {
    let Query(page) = page?;
    let limit = limit_of(&page)?;
    if let Some(after) = &page.after {
        natter_events::validate_id(after).map_err(|e| ApiError::bad_request(format!("after is not a valid room id: {e}")))?;
    }
    let rooms = node.views().rooms(page.after.as_deref(), limit).await?;
    let memberships = futures::future::try_join_all(rooms.iter().map(|r| node.views().is_member(&r.id, &me))).await?;
    let mine: Vec<String> = rooms.iter().zip(&memberships).filter(|(_, m)| **m).map(|(r, _)| r.id.clone()).collect();
    let unread = node.counts().room_unread(&me, &mine).await?;
    let mut out = Vec::with_capacity(rooms.len());
    for (r, member) in rooms.iter().zip(memberships) {
        let mut v = room_json(r);
        v["isMember"] = json!(member);
        v["unread"] = json!(if member { unread.get(&r.id).copied().unwrap_or(0) } else { 0 });
        if member {
            v["activeUsers"] = json!(present(&node, &r.id).await?.len());
        }
        out.push(v);
    }
    let next = if rooms.len() == limit as usize { rooms.last().map(|r| r.id.clone()) } else { None };
    Ok(Json(json!({ "success": true, "rooms": out, "nextCursor": next })))
}

async fn one(State(node): State<Arc<AppState>>, Caller(me): Caller, ApiPath(id): ApiPath<String>) -> Result<Json<Value>, ApiError> {
    let room = room_or_404(&node, &id).await?;
    let mut v = room_json(&room);
    v["isMember"] = json!(node.views().is_member(&id, &me).await?);
    Ok(Json(json!({ "success": true, "room": v })))
}

async fn join(State(node): State<Arc<AppState>>, Caller(me): Caller, ApiPath(id): ApiPath<String>) -> Result<Json<Value>, ApiError> {
    let room = room_or_404(&node, &id).await?;
    // Joining a room one is in changes nothing and costs nothing.
    if node.commands.require_member(&id, &me).await.is_err() {
        node.rate.room_change(&me)?;
    }
    node.commands.join_room(&me, &id).await?;
    Ok(Json(json!({ "success": true, "room": room_json(&room) })))
}

async fn leave(State(node): State<Arc<AppState>>, Caller(me): Caller, ApiPath(id): ApiPath<String>) -> Result<Json<Value>, ApiError> {
    room_or_404(&node, &id).await?;
    node.rate.room_change(&me)?;
    node.commands.leave_room(&me, &id).await?;
    Ok(Json(json!({ "success": true })))
}

async fn history(
    State(node): State<Arc<AppState>>,
    Caller(me): Caller,
    ApiPath(id): ApiPath<String>,
    page: Result<Query<Page>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(page) = page?;
    let limit = limit_of(&page)?;
    if page.before == Some(0) {
        return Err(ApiError::bad_request("before must be a message seq of 1 or more"));
    }
    node.commands.read_room(&me, &id).await?;
    let messages = node.views().room_messages(&id, page.before, limit).await?;
    Ok(Json(Value::Array(messages.iter().map(room_message_json).collect())))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SendBody {
    message: Option<String>,
    attachment: Option<String>,
    client_msg_id: Option<String>,
}

async fn send(
    State(node): State<Arc<AppState>>,
    Caller(me): Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<SendBody>,
) -> Result<Json<Value>, ApiError> {
    node.rate.send(&me)?;
    let m = node
        .commands
        .send_room(SendRoomMessage { sender: me, room: id, message: body.message, attachment: body.attachment, client_msg_id: body.client_msg_id })
        .await?;
    Ok(Json(json!({ "success": true, "message": "Message Sent Successfully", "data": room_message_json(&m) })))
}

async fn users(State(node): State<Arc<AppState>>, Caller(me): Caller, ApiPath(id): ApiPath<String>) -> Result<Json<Value>, ApiError> {
    node.commands.require_member(&id, &me).await?;
    let present = present(&node, &id).await?;
    let names: std::collections::HashMap<String, String> = node.views().users_by_ids(&present).await?.into_iter().map(|u| (u.id, u.name)).collect();
    let users: Vec<Value> = present.iter().map(|u| json!({ "_id": u, "name": names.get(u) })).collect();
    Ok(Json(json!({ "success": true, "users": users, "count": present.len() })))
}

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/rooms", post(create).get(list))
        .route("/api/rooms/{id}", get(one))
        .route("/api/rooms/{id}/join", post(join))
        .route("/api/rooms/{id}/leave", post(leave))
        .route("/api/rooms/{id}/messages", get(history).post(send))
        .route("/api/rooms/{id}/users", get(users))
}
