//! Read models and the store ports the gateway queries.

use std::collections::HashMap;

use async_trait::async_trait;
use chrono::SecondsFormat;
use natter_events::{Envelope, MessageSent, UserRegistered, subjects};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::projection::ApplyError;

#[derive(Debug, Error)]
#[error("view store unavailable: {0}")]
pub struct StoreError(pub String);

impl From<StoreError> for ApplyError {
    fn from(e: StoreError) -> Self {
        ApplyError::Unavailable(e.0)
    }
}

/// A registered user as the views keep them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserView {
    #[serde(rename = "_id")]
    pub id: String,
    pub name: String,
    pub email: String,
    #[serde(rename = "passwordHash")]
    pub password_hash: String,
    #[serde(rename = "createdAt")]
    pub created_at: String,
}

/// A direct message as the views keep it. `seen` is not stored: it is
/// derived from the receiver's watermark when read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageView {
    #[serde(rename = "_id")]
    pub id: String,
    pub conversation: String,
    pub seq: u64,
    /// The sender's running message count in the conversation (this one
    /// included): what a read watermark at this message counts as seen.
    #[serde(rename = "senderCount")]
    pub sender_count: u64,
    #[serde(rename = "commandId")]
    pub command_id: String,
    #[serde(rename = "clientMsgId", default, skip_serializing_if = "Option::is_none")]
    pub client_msg_id: Option<String>,
    #[serde(rename = "senderId")]
    pub sender_id: String,
    #[serde(rename = "receiverId")]
    pub receiver_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attachment: Option<String>,
    #[serde(rename = "createdAt")]
    pub created_at: String,
}

impl MessageView {
    /// The view of a `MessageSent` event.
    pub fn from_event(env: &Envelope, e: &MessageSent) -> MessageView {
        MessageView {
            id: e.message_id.clone(),
            conversation: subjects::dm_conversation(&e.sender_id, &e.receiver_id),
            seq: e.seq,
            sender_count: e.sender_count,
            command_id: env.command_id.clone(),
            client_msg_id: e.client_msg_id.clone(),
            sender_id: e.sender_id.clone(),
            receiver_id: e.receiver_id.clone(),
            message: e.message.clone(),
            attachment: e.attachment.clone(),
            created_at: timestamp(env),
        }
    }
}

impl UserView {
    /// The view of a `UserRegistered` event.
    pub fn from_event(env: &Envelope, e: &UserRegistered) -> UserView {
        UserView {
            id: e.user_id.clone(),
            name: e.name.clone(),
            email: e.email.clone(),
            password_hash: e.password_hash.clone(),
            created_at: timestamp(env),
        }
    }
}

/// An event's time as the views store it (RFC 3339, milliseconds, UTC).
pub fn timestamp(env: &Envelope) -> String {
    env.at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Users, messages and read watermarks (MongoDB in production).
#[async_trait]
pub trait ViewStore: Send + Sync {
    /// Whether the store answers now (for `/readyz`).
    async fn check(&self) -> Result<(), StoreError>;
    async fn apply(&self, env: &Envelope) -> Result<(), ApplyError>;
    async fn user(&self, id: &str) -> Result<Option<UserView>, StoreError>;
    async fn user_by_email(&self, email: &str) -> Result<Option<UserView>, StoreError>;
    /// Users other than `except`, ordered by id, after the cursor `after`.
    async fn users(&self, except: &str, after: Option<&str>, limit: u32) -> Result<Vec<UserView>, StoreError>;
    async fn message(&self, id: &str) -> Result<Option<MessageView>, StoreError>;
    async fn message_by_command(&self, command_id: &str) -> Result<Option<MessageView>, StoreError>;
    /// Up to `limit` messages of `conversation` with `seq < before`, newest
    /// page, returned oldest first.
    async fn messages(&self, conversation: &str, before: Option<u64>, limit: u32) -> Result<Vec<MessageView>, StoreError>;
    /// Read watermark of every participant of `conversation` (user → seq).
    async fn watermarks(&self, conversation: &str) -> Result<HashMap<String, u64>, StoreError>;
}

/// Unseen counts per user (Redis in production).
#[async_trait]
pub trait CountStore: Send + Sync {
    /// Whether the store answers now (for `/readyz`).
    async fn check(&self) -> Result<(), StoreError>;
    async fn apply(&self, env: &Envelope) -> Result<(), ApplyError>;
    /// peer → unseen count, non-zero entries only.
    async fn unseen(&self, user: &str) -> Result<HashMap<String, u64>, StoreError>;
}
