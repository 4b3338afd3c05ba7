//! Read models and the store ports the gateway queries.

use std::collections::HashMap;

use async_trait::async_trait;
use chrono::SecondsFormat;
use natter_events::{Envelope, MessageRevised, MessageSent, ReplyRef, RoomMessageRevised, RoomCreated, RoomMessageSent, UserRegistered, subjects};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::projection::ApplyError;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("view store unavailable: {0}")]
    Unavailable(String),
    /// The store lost its data and is being rebuilt from the log: answering
    /// now could be wrong, so it does not answer.
    #[error("{0} is being rebuilt from the log")]
    Rebuilding(&'static str),
}

impl From<StoreError> for ApplyError {
    fn from(e: StoreError) -> Self {
        ApplyError::Unavailable(e.to_string())
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

/// What a message shows now (see [`ViewStore::contents`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Content {
    pub message: Option<String>,
    pub attachment: Option<String>,
    /// Deleted for everyone (then neither of the above).
    pub deleted: bool,
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
    #[serde(rename = "replyTo", default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<ReplyRef>,
    /// When its sender last edited it.
    #[serde(rename = "editedAt", default, skip_serializing_if = "Option::is_none")]
    pub edited_at: Option<String>,
    /// Deleted for everyone: a tombstone, without text, attachment or reply.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
    /// The position (on the conversation's subject) of the event the
    /// content is from: a change replaces it only from a newer event, and
    /// a tombstone holds [`TOMBSTONE`], so nothing replaces it. 0 in views
    /// written before edits existed.
    #[serde(default)]
    pub cpos: u64,
}

/// What an edit or deletion at `env` sets on a message view, whichever
/// kind: the send's command id and time, `editedAt`, `deleted`, `cpos`.
fn revision(env: &Envelope, sent_at: &chrono::DateTime<chrono::Utc>, sent_command_id: &str, deleted: bool) -> (String, String, Option<String>, bool, u64) {
    let created_at = sent_at.to_rfc3339_opts(SecondsFormat::Millis, true);
    let (edited_at, cpos) = if deleted { (None, TOMBSTONE) } else { (Some(timestamp(env)), env.position) };
    (sent_command_id.to_owned(), created_at, edited_at, deleted, cpos)
}

/// The content position of a deleted message: above every event's.
pub const TOMBSTONE: u64 = i64::MAX as u64;

/// A study room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomView {
    #[serde(rename = "_id")]
    pub id: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(rename = "createdBy")]
    pub created_by: String,
    #[serde(rename = "createdAt")]
    pub created_at: String,
    /// Listed to members only, joined by invitation only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub private: bool,
}

impl RoomView {
    pub fn from_event(env: &Envelope, e: &RoomCreated) -> RoomView {
        RoomView {
            id: e.room_id.clone(),
            name: e.name.clone(),
            description: e.description.clone(),
            created_by: e.created_by.clone(),
            created_at: timestamp(env),
            private: e.private,
        }
    }
}

/// A message in a study room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomMessageView {
    #[serde(rename = "_id")]
    pub id: String,
    #[serde(rename = "roomId")]
    pub room_id: String,
    pub seq: u64,
    #[serde(rename = "commandId")]
    pub command_id: String,
    #[serde(rename = "clientMsgId", default, skip_serializing_if = "Option::is_none")]
    pub client_msg_id: Option<String>,
    #[serde(rename = "senderId")]
    pub sender_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attachment: Option<String>,
    #[serde(rename = "createdAt")]
    pub created_at: String,
    #[serde(rename = "replyTo", default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<ReplyRef>,
    /// When its sender last edited it.
    #[serde(rename = "editedAt", default, skip_serializing_if = "Option::is_none")]
    pub edited_at: Option<String>,
    /// Deleted for everyone (a tombstone, as [`MessageView::deleted`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
    /// The position of the event the content is from (see [`MessageView::cpos`]).
    #[serde(default)]
    pub cpos: u64,
}

impl RoomMessageView {
    pub fn from_event(env: &Envelope, e: &RoomMessageSent) -> RoomMessageView {
        RoomMessageView {
            id: e.message_id.clone(),
            room_id: e.room_id.clone(),
            seq: e.seq,
            command_id: env.command_id.clone(),
            client_msg_id: e.client_msg_id.clone(),
            sender_id: e.sender_id.clone(),
            message: e.message.clone(),
            attachment: e.attachment.clone(),
            created_at: timestamp(env),
            reply_to: e.reply_to.as_ref().map(|r| ReplyRef::to(r.message_id.clone())),
            edited_at: None,
            deleted: false,
            cpos: env.position,
        }
    }

    /// The view of a `RoomMessageEdited` or (`deleted`) `RoomMessageDeleted` event.
    pub fn from_revision(env: &Envelope, e: &RoomMessageRevised, deleted: bool) -> RoomMessageView {
        let mut view = RoomMessageView::from_event(env, &e.message);
        (view.command_id, view.created_at, view.edited_at, view.deleted, view.cpos) = revision(env, &e.sent_at, &e.sent_command_id, deleted);
        if deleted {
            (view.message, view.attachment, view.reply_to) = (None, None, None);
        }
        view
    }

    /// The view a room-message event makes or changes, if any.
    pub fn of(env: &Envelope) -> Option<RoomMessageView> {
        match &env.event {
            natter_events::Event::RoomMessageSent(e) => Some(RoomMessageView::from_event(env, e)),
            natter_events::Event::RoomMessageEdited(e) => Some(RoomMessageView::from_revision(env, e, false)),
            natter_events::Event::RoomMessageDeleted(e) => Some(RoomMessageView::from_revision(env, e, true)),
            _ => None,
        }
    }
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
            // The client shape has one attachment (the original app's).
            attachment: e.attachments.first().cloned(),
            created_at: timestamp(env),
            reply_to: e.reply_to.as_ref().map(|r| ReplyRef::to(r.message_id.clone())),
            edited_at: None,
            deleted: false,
            cpos: env.position,
        }
    }

    /// The view of a `MessageEdited` or (`deleted`) `MessageDeleted` event:
    /// the whole message as it reads after the change.
    pub fn from_revision(env: &Envelope, e: &MessageRevised, deleted: bool) -> MessageView {
        let mut view = MessageView::from_event(env, &e.message);
        (view.command_id, view.created_at, view.edited_at, view.deleted, view.cpos) = revision(env, &e.sent_at, &e.sent_command_id, deleted);
        if deleted {
            (view.message, view.attachment, view.reply_to) = (None, None, None);
        }
        view
    }

    /// The view a direct-message event makes or changes, if any.
    pub fn of(env: &Envelope) -> Option<MessageView> {
        match &env.event {
            natter_events::Event::MessageSent(e) => Some(MessageView::from_event(env, e)),
            natter_events::Event::MessageEdited(e) => Some(MessageView::from_revision(env, e, false)),
            natter_events::Event::MessageDeleted(e) => Some(MessageView::from_revision(env, e, true)),
            _ => None,
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

/// A block change as one number that only grows with the log: the newest
/// change (highest position) wins under `max`, and its parity says whether
/// it blocked.
pub fn block_mark(position: u64, blocked: bool) -> u64 {
    position * 2 + u64::from(blocked)
}

/// The reactions on one message: emoji → the users who set it, sorted.
pub type Reactions = std::collections::BTreeMap<String, Vec<String>>;

/// A reaction change as one number that only grows on its subject (like
/// [`block_mark`]): the newest change of a (message, user, emoji) wins.
pub fn reaction_mark(position: u64, on: bool) -> u64 {
    block_mark(position, on)
}

/// Users, messages and read watermarks (MongoDB in production).
#[async_trait]
pub trait ViewStore: Send + Sync {
    /// Whether the store answers now (for `/readyz`).
    async fn check(&self) -> Result<(), StoreError>;
    async fn apply(&self, env: &Envelope) -> Result<(), ApplyError>;
    async fn user(&self, id: &str) -> Result<Option<UserView>, StoreError>;
    /// The users among `ids` that exist, in one read (any order).
    async fn users_by_ids(&self, ids: &[String]) -> Result<Vec<UserView>, StoreError>;
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
    /// What each of `ids` (direct or room messages) shows now, for those
    /// the views hold (one bounded read): replays serve the deleted ones'
    /// deliveries as tombstones, and replies read their previews from it
    /// (a reply stores only the answered message's id).
    async fn contents(&self, ids: &[String]) -> Result<HashMap<String, Content>, StoreError>;
    /// The reactions on each of `ids` that has any (one bounded read).
    async fn reactions(&self, ids: &[String]) -> Result<HashMap<String, Reactions>, StoreError>;
    /// The newest reaction mark applied for (message, user, emoji) (0: none).
    async fn reaction_mark(&self, message: &str, user: &str, emoji: &str) -> Result<u64, StoreError>;
    /// Those of `others` whom `user` has blocked (one bounded read).
    async fn blocked_among(&self, user: &str, others: &[String]) -> Result<Vec<String>, StoreError>;

    async fn room(&self, id: &str) -> Result<Option<RoomView>, StoreError>;
    /// Rooms ordered by id, after the cursor `after`.
    async fn rooms(&self, after: Option<&str>, limit: u32) -> Result<Vec<RoomView>, StoreError>;
    /// Current members of a room, by id.
    async fn room_members(&self, room: &str) -> Result<Vec<String>, StoreError>;
    async fn is_member(&self, room: &str, user: &str) -> Result<bool, StoreError>;
    async fn room_message_by_command(&self, command_id: &str) -> Result<Option<RoomMessageView>, StoreError>;
    async fn room_message(&self, id: &str) -> Result<Option<RoomMessageView>, StoreError>;
    /// Up to `limit` messages of `room` with `seq < before`, newest page,
    /// returned oldest first.
    async fn room_messages(&self, room: &str, before: Option<u64>, limit: u32) -> Result<Vec<RoomMessageView>, StoreError>;
}

/// Unseen counts per user (Redis in production).
#[async_trait]
pub trait CountStore: Send + Sync {
    /// Whether the store answers now (for `/readyz`).
    async fn check(&self) -> Result<(), StoreError>;
    async fn apply(&self, env: &Envelope) -> Result<(), ApplyError>;
    /// peer → unseen count, non-zero entries only.
    async fn unseen(&self, user: &str) -> Result<HashMap<String, u64>, StoreError>;
    /// room → messages above `user`'s read watermark, for each of `rooms`.
    async fn room_unread(&self, user: &str, rooms: &[String]) -> Result<HashMap<String, u64>, StoreError>;
}
