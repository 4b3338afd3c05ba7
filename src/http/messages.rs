//! Direct messages, as the original app's routes:
//!
//! - `GET /api/messages/{peerId}?before=<seq>&limit=<n>`: the conversation,
//!   oldest first (the newest page unless `before`), and marks it seen.
//! - `POST /api/messages/{peerId}` `{message, clientMsgId?}`.
//! - `POST /api/attachments` `{otherId, attachmentSent, clientMsgId?}`.
//! - `PATCH /api/messages/{messageId}/seen`: that message and all before it.
//!
//! The caller is always the token's `sub`; a `senderId` in a body is ignored.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::routing::{get, patch, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::Caller;
use super::extract::{ApiJson, ApiPath};
use crate::error::ApiError;
use crate::state::AppState;
use crate::commands::send::SendMessage;
use crate::wire::message_json;

pub const DEFAULT_PAGE: u32 = 100;
pub const MAX_PAGE: u32 = 500;

#[derive(Deserialize)]
struct HistoryQuery {
    before: Option<u64>,
    limit: Option<u32>,
}

async fn history(
    State(node): State<Arc<AppState>>,
    Caller(me): Caller,
    ApiPath(peer): ApiPath<String>,
    query: Result<Query<HistoryQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
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
    let out: Vec<Value> = page
        .iter()
        .map(|m| message_json(m, marks.get(&m.receiver_id).is_some_and(|w| *w >= m.seq)))
        .collect();
    Ok(Json(Value::Array(out)))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SendBody {
    message: Option<String>,
    client_msg_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AttachmentBody {
    other_id: Option<String>,
    attachment_sent: Option<String>,
    client_msg_id: Option<String>,
}

async fn sent(node: &AppState, cmd: SendMessage, what: &str) -> Result<Json<Value>, ApiError> {
    node.rate.send(&cmd.sender)?;
    let sent = node.commands.send(cmd).await?;
    Ok(Json(json!({ "success": true, "message": format!("{what} Sent Successfully"), "data": message_json(&sent.message, sent.seen) })))
}

async fn send(
    State(node): State<Arc<AppState>>,
    Caller(me): Caller,
    ApiPath(peer): ApiPath<String>,
    ApiJson(body): ApiJson<SendBody>,
) -> Result<Json<Value>, ApiError> {
    let cmd = SendMessage { sender: me, receiver: peer, message: body.message, attachment: None, client_msg_id: body.client_msg_id };
    sent(&node, cmd, "Message").await
}

async fn send_attachment(
    State(node): State<Arc<AppState>>,
    Caller(me): Caller,
    ApiJson(body): ApiJson<AttachmentBody>,
) -> Result<Json<Value>, ApiError> {
    let receiver = body.other_id.ok_or_else(|| ApiError::bad_request("otherId is required"))?;
    let attachment = body.attachment_sent.ok_or_else(|| ApiError::bad_request("attachmentSent is required"))?;
    let cmd = SendMessage { sender: me, receiver, message: None, attachment: Some(attachment), client_msg_id: body.client_msg_id };
    sent(&node, cmd, "Attachment").await
}

async fn mark_seen(State(node): State<Arc<AppState>>, Caller(me): Caller, ApiPath(id): ApiPath<String>) -> Result<Json<Value>, ApiError> {
    let up_to = node.commands.mark_seen(&me, &id).await?;
    Ok(Json(json!({ "success": true, "upToSeq": up_to })))
}

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/messages/{id}", get(history).post(send))
        .route("/api/messages/{id}/seen", patch(mark_seen))
        .route("/api/attachments", post(send_attachment))
}
