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
//! - `PATCH /api/rooms/{id}/messages/{messageId}` `{message}` and `DELETE`
//!   the same: its sender edits it, or deletes it for everyone.
//! - `PUT`/`DELETE /api/rooms/{id}/messages/{messageId}/reactions/{emoji}`:
//!   a member sets or takes back a reaction.
//! - `POST /api/rooms/{id}/invite` `{userId}`, `POST /api/rooms/{id}/kick`
//!   `{userId}` (owner or admin), `POST /api/rooms/{id}/role` `{userId,
//!   role}` (owner): private rooms and roles.
//! - `GET /api/rooms/{id}/users` → `{success, users: [{_id, name}], count}`:
//!   who is present now.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::auth::Caller;
use super::extract::{ApiJson, ApiPath};
use super::shown::{Shown, answered};
use crate::commands::moderation::Moderation;
use crate::commands::revise::Change;
use natter_events::Role;
use crate::error::ApiError;
use crate::state::AppState;
use crate::commands::rooms::{CreateRoom, SendRoomMessage};
use crate::wire::{Done, ErrorBody, ListedRoom, OneRoom, PresentUser, PresentUsers, Room, RoomAnswer, RoomMessage, RoomOfCaller, RoomsPage, SentRoomMessage};

pub const DEFAULT_PAGE: u32 = 100;
pub const MAX_PAGE: u32 = 500;

#[derive(Deserialize, ToSchema)]
struct CreateBody {
    /// 1 to 100 characters.
    name: String,
    /// Up to 1000 characters.
    description: Option<String>,
    /// Listed to members only and joined by invitation only (default false).
    #[serde(default)]
    private: bool,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct Page {
    /// 1 to 500 (default 100).
    limit: Option<u32>,
    /// Rooms: the `nextCursor` of the previous page.
    after: Option<String>,
    /// Messages: the page before this seq (default: the newest page).
    before: Option<u64>,
}

/// The `{id}` path parameter of room routes.
const ROOM_ID: &str = "the room's `_id`";

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

/// 404 unless the caller may know the room exists: a private room is for its
/// members and invitees only; anyone else is told there is no such room.
async fn room_for(node: &AppState, id: &str, me: &str) -> Result<(), ApiError> {
    natter_events::validate_id(id).map_err(|_| ApiError::not_found("Room not found"))?;
    // From the log, cached per room and node (a membership read for private
    // rooms only): no views read on every send, and no 404 while the views
    // lag behind a room just created.
    if !node.commands.may_see(id, me).await? {
        return Err(ApiError::not_found("Room not found"));
    }
    Ok(())
}

async fn room_or_404(node: &AppState, id: &str) -> Result<natter_projections::RoomView, ApiError> {
    natter_events::validate_id(id).map_err(|_| ApiError::not_found("Room not found"))?;
    node.views().room(id).await?.ok_or_else(|| ApiError::not_found("Room not found"))
}

/// Create a study room; the creator is a member.
#[utoipa::path(post, path = "/api/rooms", operation_id = "create_room", tag = "study rooms", security(("bearer" = [])), request_body = CreateBody,
    responses((status = 201, body = RoomAnswer)))]
async fn create(State(node): State<Arc<AppState>>, Caller(me): Caller, ApiJson(body): ApiJson<CreateBody>) -> Result<(StatusCode, Json<RoomAnswer>), ApiError> {
    node.rate.room_change(&me)?;
    let room = node.commands.create_room(CreateRoom { creator: me, name: body.name, description: body.description, private: body.private }).await?;
    Ok((StatusCode::CREATED, Json(RoomAnswer { success: true, room: Room::new(&room) })))
}

/// Every room, paged; for members also their unread count and how many are present.
#[utoipa::path(get, path = "/api/rooms", operation_id = "list_rooms", tag = "study rooms", security(("bearer" = [])), params(Page),
    responses((status = 200, body = RoomsPage)))]
async fn list(State(node): State<Arc<AppState>>, Caller(me): Caller, page: Result<Query<Page>, QueryRejection>) -> Result<Json<RoomsPage>, ApiError> {
    let Query(page) = page?;
    let limit = limit_of(&page)?;
    if let Some(after) = &page.after {
        natter_events::validate_id(after).map_err(|e| ApiError::bad_request(format!("after is not a valid room id: {e}")))?;
    }
    let scanned = node.views().rooms(page.after.as_deref(), limit).await?;
    let memberships = futures::future::try_join_all(scanned.iter().map(|r| node.views().is_member(&r.id, &me))).await?;
    // A private room is listed to its members only (a page may then hold
    // fewer rooms than `limit`; `nextCursor` still pages on).
    let next = if scanned.len() == limit as usize { scanned.last().map(|r| r.id.clone()) } else { None };
    let (rooms, memberships): (Vec<_>, Vec<bool>) = scanned.into_iter().zip(memberships).filter(|(r, member)| !r.private || *member).unzip();
    let mine: Vec<String> = rooms.iter().zip(&memberships).filter(|(_, m)| **m).map(|(r, _)| r.id.clone()).collect();
    let unread = node.counts().room_unread(&me, &mine).await?;
    let mut out = Vec::with_capacity(rooms.len());
    for (r, member) in rooms.iter().zip(memberships) {
        let active_users = if member { Some(present(&node, &r.id).await?.len()) } else { None };
        let unread = if member { unread.get(&r.id).copied().unwrap_or(0) } else { 0 };
        out.push(ListedRoom { room: Room::new(r), is_member: member, unread, active_users });
    }
    Ok(Json(RoomsPage { success: true, rooms: out, next_cursor: next }))
}

/// One room, with whether the caller is a member.
#[utoipa::path(get, path = "/api/rooms/{id}", operation_id = "get_room", tag = "study rooms", security(("bearer" = [])), params(("id" = String, Path, description = ROOM_ID)),
    responses((status = 200, body = OneRoom), (status = 404, body = ErrorBody, description = "no such room")))]
async fn one(State(node): State<Arc<AppState>>, Caller(me): Caller, ApiPath(id): ApiPath<String>) -> Result<Json<OneRoom>, ApiError> {
    let room = room_or_404(&node, &id).await?;
    let (role, invited) = tokio::join!(node.commands.role_in(&id, &me), node.commands.invited(&id, &me));
    let (role, invited) = (role?, invited?);
    // A private room is for its members and invitees only.
    if room.private && role.is_none() && !invited {
        return Err(ApiError::not_found("Room not found"));
    }
    let room = RoomOfCaller { room: Room::new(&room), is_member: role.is_some(), role: role.map(|r| r.as_str().to_owned()), invited };
    Ok(Json(OneRoom { success: true, room }))
}

/// Join a room (nothing changes for a member).
#[utoipa::path(post, path = "/api/rooms/{id}/join", operation_id = "join_room", tag = "study rooms", security(("bearer" = [])), params(("id" = String, Path, description = ROOM_ID)),
    responses((status = 200, body = RoomAnswer), (status = 404, body = ErrorBody, description = "no such room")))]
async fn join(State(node): State<Arc<AppState>>, Caller(me): Caller, ApiPath(id): ApiPath<String>) -> Result<Json<RoomAnswer>, ApiError> {
    let room = room_or_404(&node, &id).await?;
    // Joining a room one is in changes nothing and costs nothing.
    if node.commands.require_member(&id, &me).await.is_err() {
        node.rate.room_change(&me)?;
    }
    node.commands.join_room(&me, &id).await?;
    Ok(Json(RoomAnswer { success: true, room: Room::new(&room) }))
}

/// Leave a room's membership (and its presence, on every socket of the caller).
#[utoipa::path(post, path = "/api/rooms/{id}/leave", operation_id = "leave_room", tag = "study rooms", security(("bearer" = [])), params(("id" = String, Path, description = ROOM_ID)),
    responses((status = 200, body = Done),
        (status = 403, body = ErrorBody, description = "not a member"),
        (status = 404, body = ErrorBody, description = "no such room")))]
async fn leave(State(node): State<Arc<AppState>>, Caller(me): Caller, ApiPath(id): ApiPath<String>) -> Result<Json<Done>, ApiError> {
    room_for(&node, &id, &me).await?;
    node.rate.room_change(&me)?;
    node.commands.leave_room(&me, &id).await?;
    Ok(Json(Done { success: true }))
}

/// A room's messages, oldest first (members only); marks the room read.
#[utoipa::path(get, path = "/api/rooms/{id}/messages", operation_id = "room_history", tag = "study rooms", security(("bearer" = [])),
    params(("id" = String, Path, description = ROOM_ID), Page),
    responses((status = 200, body = Vec<RoomMessage>),
        (status = 403, body = ErrorBody, description = "not a member"),
        (status = 404, body = ErrorBody, description = "no such room")))]
async fn history(
    State(node): State<Arc<AppState>>,
    Caller(me): Caller,
    ApiPath(id): ApiPath<String>,
    page: Result<Query<Page>, QueryRejection>,
) -> Result<Json<Vec<RoomMessage>>, ApiError> {
    let Query(page) = page?;
    let limit = limit_of(&page)?;
    if page.before == Some(0) {
        return Err(ApiError::bad_request("before must be a message seq of 1 or more"));
    }
    room_for(&node, &id, &me).await?;
    node.commands.read_room(&me, &id).await?;
    let messages = node.views().room_messages(&id, page.before, limit).await?;
    let shown = Shown::read(&node, messages.iter().map(|m| (&m.id, &m.reply_to))).await?;
    Ok(Json(messages.iter().map(|m| shown.room_message(RoomMessage::new(m), &me)).collect()))
}

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct SendBody {
    message: Option<String>,
    /// An http(s) URL.
    attachment: Option<String>,
    /// Idempotency key: a retry with it returns the original message.
    client_msg_id: Option<String>,
    /// The `_id` of an earlier message of this room this one answers (400 for any other).
    reply_to: Option<String>,
}

/// Send to a room (members only).
#[utoipa::path(post, path = "/api/rooms/{id}/messages", operation_id = "send_room_message", tag = "study rooms", security(("bearer" = [])),
    params(("id" = String, Path, description = ROOM_ID)), request_body = SendBody,
    responses((status = 200, body = SentRoomMessage),
        (status = 400, body = ErrorBody, description = "bad content, or a replyTo that is no earlier message of this room"),
        (status = 403, body = ErrorBody, description = "not a member"),
        (status = 404, body = ErrorBody, description = "no such room"),
        (status = 409, body = ErrorBody, description = "clientMsgId already used for another message")))]
async fn send(
    State(node): State<Arc<AppState>>,
    Caller(me): Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<SendBody>,
) -> Result<Json<SentRoomMessage>, ApiError> {
    room_for(&node, &id, &me).await?;
    node.rate.send(&me)?;
    let m = node
        .commands
        .send_room(SendRoomMessage {
            sender: me,
            room: id,
            message: body.message,
            attachment: body.attachment,
            client_msg_id: body.client_msg_id,
            reply_to: body.reply_to,
        })
        .await?;
    let data = RoomMessage::new(&m).answering(&answered(&node, m.reply_to.as_ref().map(|r| r.message_id.as_str())).await);
    Ok(Json(SentRoomMessage { success: true, message: "Message Sent Successfully".into(), data }))
}

#[derive(Deserialize, ToSchema)]
struct EditBody {
    /// The new text.
    message: Option<String>,
}

async fn revised(node: &AppState, me: String, room: String, id: String, change: Change, what: &str) -> Result<Json<SentRoomMessage>, ApiError> {
    // A sender may delete their message after leaving, a private room's
    // too: the command answers 404 to anyone who is neither a member nor
    // its sender, so a deletion learns nothing about a private room.
    if change != Change::Delete {
        room_for(node, &room, &me).await?;
    }
    node.rate.send(&me)?;
    let m = node.commands.revise_room(&me, &room, &id, change).await?;
    let data = Shown::after_change(node, &m.id, &m.reply_to).await.room_message(RoomMessage::new(&m), &me);
    Ok(Json(SentRoomMessage { success: true, message: format!("Message {what} Successfully"), data }))
}

async fn reacted(node: &AppState, me: String, (room, id, emoji): (String, String, String), on: bool) -> Result<Json<SentRoomMessage>, ApiError> {
    room_for(node, &room, &me).await?;
    node.rate.send(&me)?;
    let m = node.commands.react_room(&me, &room, &id, &emoji, on).await?;
    let data = Shown::after_change(node, &m.id, &m.reply_to).await.room_message(RoomMessage::new(&m), &me);
    Ok(Json(SentRoomMessage { success: true, message: "Reaction Saved Successfully".into(), data }))
}

/// React to a room message (members): members get `messageUpdated` with its `reactions`.
#[utoipa::path(put, path = "/api/rooms/{id}/messages/{messageId}/reactions/{emoji}", operation_id = "react_room", tag = "study rooms", security(("bearer" = [])),
    params(("id" = String, Path, description = ROOM_ID), ("messageId" = String, Path, description = "the message's `_id`"), ("emoji" = String, Path, description = "one emoji (URL-encoded)")),
    responses((status = 200, body = SentRoomMessage, description = "the message with its reactions"),
        (status = 400, body = ErrorBody, description = "not an emoji"),
        (status = 403, body = ErrorBody, description = "not a member"),
        (status = 404, body = ErrorBody, description = "no such room, or no such message in it"),
        (status = 409, body = ErrorBody, description = "the message was deleted, or holds 20 different emoji already")))]
async fn react(State(node): State<Arc<AppState>>, Caller(me): Caller, ApiPath(path): ApiPath<(String, String, String)>) -> Result<Json<SentRoomMessage>, ApiError> {
    reacted(&node, me, path, true).await
}

/// Take back one's reaction to a room message.
#[utoipa::path(delete, path = "/api/rooms/{id}/messages/{messageId}/reactions/{emoji}", operation_id = "unreact_room", tag = "study rooms", security(("bearer" = [])),
    params(("id" = String, Path, description = ROOM_ID), ("messageId" = String, Path, description = "the message's `_id`"), ("emoji" = String, Path, description = "one emoji (URL-encoded)")),
    responses((status = 200, body = SentRoomMessage, description = "the message with its reactions"),
        (status = 400, body = ErrorBody, description = "not an emoji"),
        (status = 403, body = ErrorBody, description = "not a member"),
        (status = 404, body = ErrorBody, description = "no such room, or no such message in it"),
        (status = 409, body = ErrorBody, description = "the message was deleted")))]
async fn unreact(State(node): State<Arc<AppState>>, Caller(me): Caller, ApiPath(path): ApiPath<(String, String, String)>) -> Result<Json<SentRoomMessage>, ApiError> {
    reacted(&node, me, path, false).await
}

/// Edit a room message (its sender, a member): it keeps its `_id` and
/// `seq` and gains `editedAt`; members get `messageUpdated` on `/chat`.
#[utoipa::path(patch, path = "/api/rooms/{id}/messages/{messageId}", operation_id = "edit_room_message", tag = "study rooms", security(("bearer" = [])),
    params(("id" = String, Path, description = ROOM_ID), ("messageId" = String, Path, description = "the message's `_id`")), request_body = EditBody,
    responses((status = 200, body = SentRoomMessage, description = "the message as it now reads"),
        (status = 400, body = ErrorBody, description = "empty or oversize text"),
        (status = 403, body = ErrorBody, description = "not a member, or not the message's sender"),
        (status = 404, body = ErrorBody, description = "no such room, or no such message in it"),
        (status = 409, body = ErrorBody, description = "the message was deleted")))]
async fn edit(
    State(node): State<Arc<AppState>>,
    Caller(me): Caller,
    ApiPath((room, id)): ApiPath<(String, String)>,
    ApiJson(body): ApiJson<EditBody>,
) -> Result<Json<SentRoomMessage>, ApiError> {
    let text = body.message.ok_or_else(|| ApiError::bad_request("message is required"))?;
    revised(&node, me, room, id, Change::Edit(text), "Edited").await
}

/// Delete a room message for everyone (its sender, even after leaving):
/// it stays as a tombstone (`deleted: true`, no content, its `seq` kept)
/// and stops counting as unread; members get `messageDeleted` on `/chat`.
#[utoipa::path(delete, path = "/api/rooms/{id}/messages/{messageId}", operation_id = "delete_room_message", tag = "study rooms", security(("bearer" = [])),
    params(("id" = String, Path, description = ROOM_ID), ("messageId" = String, Path, description = "the message's `_id`")),
    responses((status = 200, body = SentRoomMessage, description = "the tombstone"),
        (status = 403, body = ErrorBody, description = "a member who is not the message's sender"),
        (status = 404, body = ErrorBody, description = "no such room, or no such message of the caller's in it")))]
async fn delete(State(node): State<Arc<AppState>>, Caller(me): Caller, ApiPath((room, id)): ApiPath<(String, String)>) -> Result<Json<SentRoomMessage>, ApiError> {
    revised(&node, me, room, id, Change::Delete, "Deleted").await
}

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct UserBody {
    /// The user's id.
    user_id: Option<String>,
}

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct RoleBody {
    /// The member's id.
    user_id: Option<String>,
    /// `admin` or `member`.
    role: Option<String>,
}

async fn moderated(node: &AppState, me: String, room: String, target: Option<String>, what: Moderation) -> Result<Json<Done>, ApiError> {
    let target = target.ok_or_else(|| ApiError::bad_request("userId is required"))?;
    room_for(node, &room, &me).await?;
    node.rate.room_change(&me)?;
    node.commands.moderate(&me, &room, &target, what).await?;
    Ok(Json(Done { success: true }))
}

/// Invite a user (the room's owner or an admin): they may join it, private
/// or not; they get `room-invited` on `/chat`. Nothing changes for a
/// member or a user invited already.
#[utoipa::path(post, path = "/api/rooms/{id}/invite", operation_id = "invite", tag = "study rooms", security(("bearer" = [])),
    params(("id" = String, Path, description = ROOM_ID)), request_body = UserBody,
    responses((status = 200, body = Done),
        (status = 400, body = ErrorBody, description = "no userId, or yourself"),
        (status = 403, body = ErrorBody, description = "the caller is not the owner or an admin"),
        (status = 404, body = ErrorBody, description = "no such room or user")))]
async fn invite(State(node): State<Arc<AppState>>, Caller(me): Caller, ApiPath(id): ApiPath<String>, ApiJson(body): ApiJson<UserBody>) -> Result<Json<Done>, ApiError> {
    moderated(&node, me, id, body.user_id, Moderation::Invite).await
}

/// Remove a member, or withdraw an invitation (the owner, or an admin for
/// plain members): they receive nothing of the room from then on.
#[utoipa::path(post, path = "/api/rooms/{id}/kick", operation_id = "kick", tag = "study rooms", security(("bearer" = [])),
    params(("id" = String, Path, description = ROOM_ID)), request_body = UserBody,
    responses((status = 200, body = Done),
        (status = 400, body = ErrorBody, description = "no userId, or yourself"),
        (status = 403, body = ErrorBody, description = "the caller may not remove that member"),
        (status = 404, body = ErrorBody, description = "no such room or user")))]
async fn kick(State(node): State<Arc<AppState>>, Caller(me): Caller, ApiPath(id): ApiPath<String>, ApiJson(body): ApiJson<UserBody>) -> Result<Json<Done>, ApiError> {
    moderated(&node, me, id, body.user_id, Moderation::Kick).await
}

/// Set a member's role (the owner only): `admin` or `member`.
#[utoipa::path(post, path = "/api/rooms/{id}/role", operation_id = "set_role", tag = "study rooms", security(("bearer" = [])),
    params(("id" = String, Path, description = ROOM_ID)), request_body = RoleBody,
    responses((status = 200, body = Done),
        (status = 400, body = ErrorBody, description = "no userId, or a role other than admin or member"),
        (status = 403, body = ErrorBody, description = "the caller is not the owner"),
        (status = 404, body = ErrorBody, description = "no such room, or the user is no member")))]
async fn set_role(State(node): State<Arc<AppState>>, Caller(me): Caller, ApiPath(id): ApiPath<String>, ApiJson(body): ApiJson<RoleBody>) -> Result<Json<Done>, ApiError> {
    let role = match body.role.as_deref() {
        Some("admin") => Role::Admin,
        Some("member") => Role::Member,
        _ => return Err(ApiError::bad_request("role must be \"admin\" or \"member\"")),
    };
    moderated(&node, me, id, body.user_id, Moderation::SetRole(role)).await
}

/// Who is present in a room now (members only).
#[utoipa::path(get, path = "/api/rooms/{id}/users", operation_id = "room_users", tag = "study rooms", security(("bearer" = [])), params(("id" = String, Path, description = ROOM_ID)),
    responses((status = 200, body = PresentUsers),
        (status = 403, body = ErrorBody, description = "not a member"),
        (status = 404, body = ErrorBody, description = "no such room")))]
async fn users(State(node): State<Arc<AppState>>, Caller(me): Caller, ApiPath(id): ApiPath<String>) -> Result<Json<PresentUsers>, ApiError> {
    room_for(&node, &id, &me).await?;
    node.commands.require_member(&id, &me).await?;
    let present = present(&node, &id).await?;
    let names: std::collections::HashMap<String, String> = node.views().users_by_ids(&present).await?.into_iter().map(|u| (u.id, u.name)).collect();
    let users = present.iter().map(|u| PresentUser { id: u.clone(), name: names.get(u).cloned() }).collect();
    Ok(Json(PresentUsers { success: true, users, count: present.len() }))
}

pub fn router() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new()
        .routes(routes!(create, list))
        .routes(routes!(one))
        .routes(routes!(join))
        .routes(routes!(leave))
        .routes(routes!(history, send))
        .routes(routes!(edit, delete))
        .routes(routes!(react, unreact))
        .routes(routes!(invite))
        .routes(routes!(kick))
        .routes(routes!(set_role))
        .routes(routes!(users))
}
