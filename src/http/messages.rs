//! Direct messages, as the original app's routes:
//!
//! - `GET /api/messages/{peerId}?before=<seq>&limit=<n>`: the conversation,
//!   oldest first (the newest page unless `before`), and marks it seen.
//! - `POST /api/messages/{peerId}` `{message, clientMsgId?}`.
//! - `POST /api/attachments` `{otherId, attachmentSent, clientMsgId?}`.
//! - `PATCH /api/messages/{messageId}/seen`: that message and all before it.
//! - `PATCH /api/messages/{messageId}` `{message}`: its sender edits it.
//! - `DELETE /api/messages/{messageId}`: its sender deletes it for everyone.
//! - `PUT`/`DELETE /api/messages/{messageId}/reactions/{emoji}`: a
//!   participant sets or takes back a reaction.
//!
//! The caller is always the token's `sub`; a `senderId` in a body is ignored.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::auth::Caller;
use super::extract::{ApiJson, ApiPath};
use super::shown::{Shown, answered};
use crate::error::ApiError;
use crate::state::AppState;
use crate::commands::revise::Change;
use crate::commands::send::SendMessage;
use crate::wire::{ErrorBody, MarkedSeen, Message, SentMessage};

pub const DEFAULT_PAGE: u32 = 100;
pub const MAX_PAGE: u32 = 500;

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct HistoryQuery {
    /// The page before this message seq (default: the newest page).
    before: Option<u64>,
    /// 1 to 500 (default 100).
    limit: Option<u32>,
}

/// The conversation with a user, oldest first; marks it seen.
#[utoipa::path(get, path = "/api/messages/{id}", operation_id = "conversation", tag = "direct messages", security(("bearer" = [])),
    params(("id" = String, Path, description = "the other user's id"), HistoryQuery),
    responses((status = 200, body = Vec<Message>), (status = 404, body = ErrorBody, description = "no such user")))]
async fn history(
    State(node): State<Arc<AppState>>,
    Caller(me): Caller,
    ApiPath(peer): ApiPath<String>,
    query: Result<Query<HistoryQuery>, QueryRejection>,
) -> Result<Json<Vec<Message>>, ApiError> {
    let Query(q) = query?;
    let limit = q.limit.unwrap_or(DEFAULT_PAGE);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::bad_request(format!("limit must be 1 to {MAX_PAGE}")));
    }
    if q.before == Some(0) {
        return Err(ApiError::bad_request("before must be a message seq of 1 or more"));
    }
    node.commands.open_conversation(&me, &peer).await?;
    let conversation = natter_events::subjects::dm_conversation(&me, &peer);
    let (page, marks) = tokio::join!(
        node.views().messages(&conversation, q.before, limit),
        node.views().watermarks(&conversation)
    );
    let (page, marks) = (page?, marks?);
    let shown = Shown::read(&node, page.iter().map(|m| (&m.id, &m.reply_to))).await?;
    let out = page.iter().map(|m| shown.message(Message::new(m, marks.get(&m.receiver_id).is_some_and(|w| *w >= m.seq)), &me)).collect();
    Ok(Json(out))
}

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct SendBody {
    /// The text (up to `NATTER_MAX_MESSAGE_CHARS`, 4000).
    message: Option<String>,
    /// Idempotency key (letters, digits, `-`, `_`; up to 64): a retry with
    /// it returns the original message, at any age.
    client_msg_id: Option<String>,
    /// The `_id` of an earlier message of this conversation this one
    /// answers (400 for any other).
    reply_to: Option<String>,
}

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct AttachmentBody {
    /// The receiver's id.
    other_id: Option<String>,
    /// An http(s) URL.
    attachment_sent: Option<String>,
    client_msg_id: Option<String>,
    /// The `_id` of an earlier message of this conversation this one answers.
    reply_to: Option<String>,
}

async fn sent(node: &AppState, cmd: SendMessage, what: &str) -> Result<Json<SentMessage>, ApiError> {
    node.rate.send(&cmd.sender)?;
    let sent = node.commands.send(cmd).await?;
    let data = Message::new(&sent.message, sent.seen).answering(&answered(node, sent.message.reply_to.as_ref().map(|r| r.message_id.as_str())).await);
    Ok(Json(SentMessage { success: true, message: format!("{what} Sent Successfully"), data }))
}

/// Send a message to a user.
#[utoipa::path(post, path = "/api/messages/{id}", operation_id = "send_message", tag = "direct messages", security(("bearer" = [])),
    params(("id" = String, Path, description = "the receiver's id")), request_body = SendBody,
    responses((status = 200, body = SentMessage),
        (status = 400, body = ErrorBody, description = "bad content, or a replyTo that is no earlier message of this conversation"),
        (status = 403, body = ErrorBody, description = "`blocked`: one of the two blocked the other"),
        (status = 404, body = ErrorBody, description = "no such user"),
        (status = 409, body = ErrorBody, description = "clientMsgId already used for another message")))]
async fn send(
    State(node): State<Arc<AppState>>,
    Caller(me): Caller,
    ApiPath(peer): ApiPath<String>,
    ApiJson(body): ApiJson<SendBody>,
) -> Result<Json<SentMessage>, ApiError> {
    let cmd = SendMessage { sender: me, receiver: peer, message: body.message, attachment: None, client_msg_id: body.client_msg_id, reply_to: body.reply_to };
    sent(&node, cmd, "Message").await
}

/// Send an attachment (a URL) to a user.
#[utoipa::path(post, path = "/api/attachments", tag = "direct messages", security(("bearer" = [])), request_body = AttachmentBody,
    responses((status = 200, body = SentMessage),
        (status = 400, body = ErrorBody, description = "bad URL, or a replyTo that is no earlier message of this conversation"),
        (status = 403, body = ErrorBody, description = "`blocked`: one of the two blocked the other"),
        (status = 404, body = ErrorBody, description = "no such user"),
        (status = 409, body = ErrorBody, description = "clientMsgId already used for another message")))]
async fn send_attachment(
    State(node): State<Arc<AppState>>,
    Caller(me): Caller,
    ApiJson(body): ApiJson<AttachmentBody>,
) -> Result<Json<SentMessage>, ApiError> {
    let receiver = body.other_id.ok_or_else(|| ApiError::bad_request("otherId is required"))?;
    let attachment = body.attachment_sent.ok_or_else(|| ApiError::bad_request("attachmentSent is required"))?;
    let cmd = SendMessage { sender: me, receiver, message: None, attachment: Some(attachment), client_msg_id: body.client_msg_id, reply_to: body.reply_to };
    sent(&node, cmd, "Attachment").await
}

/// Mark a message, and every earlier one of its conversation, seen (its receiver only).
#[utoipa::path(patch, path = "/api/messages/{id}/seen", tag = "direct messages", security(("bearer" = [])),
    params(("id" = String, Path, description = "the message's `_id`")),
    responses((status = 200, body = MarkedSeen),
        (status = 403, body = ErrorBody, description = "the caller is not the message's receiver"),
        (status = 404, body = ErrorBody, description = "no such message")))]
async fn mark_seen(State(node): State<Arc<AppState>>, Caller(me): Caller, ApiPath(id): ApiPath<String>) -> Result<Json<MarkedSeen>, ApiError> {
    let up_to = node.commands.mark_seen(&me, &id).await?;
    Ok(Json(MarkedSeen { success: true, up_to_seq: up_to }))
}

#[derive(Deserialize, ToSchema)]
struct EditBody {
    /// The new text (up to `NATTER_MAX_MESSAGE_CHARS`, 4000).
    message: Option<String>,
}

async fn revised(node: &AppState, me: String, id: String, change: Change, what: &str) -> Result<Json<SentMessage>, ApiError> {
    node.rate.send(&me)?;
    let done = node.commands.revise(&me, &id, change).await?;
    let shown = Shown::after_change(node, &done.message.id, &done.message.reply_to).await;
    let data = shown.message(Message::new(&done.message, done.seen), &me);
    Ok(Json(SentMessage { success: true, message: format!("Message {what} Successfully"), data }))
}

/// Edit a message (its sender only): it keeps its `_id` and `seq` and gains
/// `editedAt`; both sides get `messageUpdated`.
#[utoipa::path(patch, path = "/api/messages/{id}", operation_id = "edit_message", tag = "direct messages", security(("bearer" = [])),
    params(("id" = String, Path, description = "the message's `_id`")), request_body = EditBody,
    responses((status = 200, body = SentMessage, description = "the message as it now reads"),
        (status = 400, body = ErrorBody, description = "empty or oversize text"),
        (status = 403, body = ErrorBody, description = "the caller received the message (only its sender edits it), or `blocked`"),
        (status = 404, body = ErrorBody, description = "no such message in the caller's conversations"),
        (status = 409, body = ErrorBody, description = "the message was deleted")))]
async fn edit(
    State(node): State<Arc<AppState>>,
    Caller(me): Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<EditBody>,
) -> Result<Json<SentMessage>, ApiError> {
    let text = body.message.ok_or_else(|| ApiError::bad_request("message is required"))?;
    revised(&node, me, id, Change::Edit(text), "Edited").await
}

/// Delete a message for everyone (its sender only): it stays in the
/// sequence as a tombstone (`deleted: true`, no content) and stops counting
/// as unseen; both sides get `messageDeleted`. Deleting again changes nothing.
#[utoipa::path(delete, path = "/api/messages/{id}", operation_id = "delete_message", tag = "direct messages", security(("bearer" = [])),
    params(("id" = String, Path, description = "the message's `_id`")),
    responses((status = 200, body = SentMessage, description = "the tombstone"),
        (status = 403, body = ErrorBody, description = "the caller received the message (only its sender deletes it)"),
        (status = 404, body = ErrorBody, description = "no such message in the caller's conversations"),
        (status = 409, body = ErrorBody, description = "too many of the caller's messages to this user stand deleted unread")))]
async fn delete(State(node): State<Arc<AppState>>, Caller(me): Caller, ApiPath(id): ApiPath<String>) -> Result<Json<SentMessage>, ApiError> {
    revised(&node, me, id, Change::Delete, "Deleted").await
}

async fn reacted(node: &AppState, me: String, (id, emoji): (String, String), on: bool) -> Result<Json<SentMessage>, ApiError> {
    node.rate.send(&me)?;
    let (m, seen) = node.commands.react(&me, &id, &emoji, on).await?;
    let data = Shown::after_change(node, &m.id, &m.reply_to).await.message(Message::new(&m, seen), &me);
    Ok(Json(SentMessage { success: true, message: "Reaction Saved Successfully".into(), data }))
}

/// React to a message of one's conversation: both sides get
/// `messageUpdated` with its `reactions`. Setting what is set changes nothing.
#[utoipa::path(put, path = "/api/messages/{id}/reactions/{emoji}", operation_id = "react", tag = "direct messages", security(("bearer" = [])),
    params(("id" = String, Path, description = "the message's `_id`"), ("emoji" = String, Path, description = "one emoji (URL-encoded)")),
    responses((status = 200, body = SentMessage, description = "the message with its reactions"),
        (status = 400, body = ErrorBody, description = "not an emoji"),
        (status = 403, body = ErrorBody, description = "`blocked`: one of the two blocked the other"),
        (status = 404, body = ErrorBody, description = "no such message in the caller's conversations"),
        (status = 409, body = ErrorBody, description = "the message was deleted, or holds 20 different emoji already")))]
async fn react(State(node): State<Arc<AppState>>, Caller(me): Caller, ApiPath(path): ApiPath<(String, String)>) -> Result<Json<SentMessage>, ApiError> {
    reacted(&node, me, path, true).await
}

/// Take back one's reaction (nothing changes if there was none).
#[utoipa::path(delete, path = "/api/messages/{id}/reactions/{emoji}", operation_id = "unreact", tag = "direct messages", security(("bearer" = [])),
    params(("id" = String, Path, description = "the message's `_id`"), ("emoji" = String, Path, description = "one emoji (URL-encoded)")),
    responses((status = 200, body = SentMessage, description = "the message with its reactions"),
        (status = 400, body = ErrorBody, description = "not an emoji"),
        (status = 404, body = ErrorBody, description = "no such message in the caller's conversations"),
        (status = 409, body = ErrorBody, description = "the message was deleted")))]
async fn unreact(State(node): State<Arc<AppState>>, Caller(me): Caller, ApiPath(path): ApiPath<(String, String)>) -> Result<Json<SentMessage>, ApiError> {
    reacted(&node, me, path, false).await
}

pub fn router() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new()
        .routes(routes!(history, send, edit, delete))
        .routes(routes!(mark_seen))
        .routes(routes!(send_attachment))
        .routes(routes!(react, unreact))
}
