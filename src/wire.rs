//! Shapes clients see, shared by REST, Socket.IO and the OpenAPI
//! description: each is one Rust type, serialized as is, so a message
//! pushed over a socket is the message REST returns, and the description
//! (`/api/openapi.json`, derived from these types) cannot drift from them.

use std::collections::{BTreeMap, HashMap};

use natter_projections::{Content, MessageView, Reactions, RoomMessageView, RoomView, UserView};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

fn to_value(v: impl Serialize) -> Value {
    serde_json::to_value(v).expect("client shapes serialize")
}

/// A direct message: the original app's shape plus `seq` and `clientMsgId`.
/// `message`, `attachment` and `clientMsgId` are absent (not null) when
/// unset, as the original app's documents.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Message {
    #[serde(rename = "_id")]
    pub id: String,
    pub sender_id: String,
    pub receiver_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// An http(s) URL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attachment: Option<String>,
    /// Whether the receiver's read watermark is at or past `seq`.
    pub seen: bool,
    /// Position in the conversation: 1, 2, 3, … with no gaps.
    pub seq: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_msg_id: Option<String>,
    /// RFC 3339, milliseconds, UTC.
    pub created_at: String,
    pub updated_at: String,
    /// The earlier message of the conversation this one answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<ReplyTo>,
    /// When its sender last edited it (then also `updatedAt`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub edited_at: Option<String>,
    /// Deleted for everyone: no `message`, `attachment` or `replyTo`; its
    /// `seq` stays taken (absent unless true).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    #[schema(required = false)]
    pub deleted: bool,
    /// Emoji → how many set it (absent while none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reactions: Option<BTreeMap<String, Reaction>>,
}

/// One emoji's reactions on a message.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Reaction {
    pub count: usize,
    /// Who set it, while at most [`REACTION_USERS`] did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_ids: Option<Vec<String>>,
    /// Whether the caller set it (REST answers; a push is shared, so it
    /// has `userIds` instead).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub me: Option<bool>,
}

/// Most users a reaction names.
pub const REACTION_USERS: usize = 20;

/// The client shape of a message's reactions, as seen by `caller` (`None`:
/// a push, shared by every recipient); `None` when there are none.
pub fn reactions_of(r: Option<&Reactions>, caller: Option<&str>) -> Option<BTreeMap<String, Reaction>> {
    let r = r.filter(|r| !r.is_empty())?;
    Some(
        r.iter()
            .map(|(emoji, users)| {
                let reaction = Reaction {
                    count: users.len(),
                    user_ids: (users.len() <= REACTION_USERS).then(|| users.clone()),
                    me: caller.map(|c| users.iter().any(|u| u == c)),
                };
                (emoji.clone(), reaction)
            })
            .collect(),
    )
}

/// Longest preview of an answered message a reply shows, in characters.
pub const PREVIEW_CHARS: usize = 80;

/// What a reply shows of the message it answers. Pure.
pub fn preview(text: Option<&str>, attachment: Option<&str>) -> String {
    match (text, attachment) {
        (Some(t), _) if t.chars().count() > PREVIEW_CHARS => format!("{}…", t.chars().take(PREVIEW_CHARS).collect::<String>()),
        (Some(t), _) => t.to_owned(),
        (None, Some(_)) => "[attachment]".to_owned(),
        (None, None) => String::new(),
    }
}

/// What a reply carries of the message it answers.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ReplyTo {
    #[serde(rename = "_id")]
    pub id: String,
    /// The start of its text (or `[attachment]`) as it reads now, read
    /// from it when shown (stored nowhere else); empty once it is deleted.
    pub preview: String,
    /// The answered message was deleted since (absent unless true).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    #[schema(required = false)]
    pub deleted: bool,
}

impl ReplyTo {
    /// Without its preview (filled by `answering` or [`fill_reply`]): a
    /// preview some older event or view still holds is never shown.
    fn of(r: &Option<natter_events::ReplyRef>) -> Option<ReplyTo> {
        r.as_ref().map(|r| ReplyTo { id: r.message_id.clone(), preview: String::new(), deleted: false })
    }
}

impl ReplyTo {
    /// The preview and `deleted` of a reply to `id`, from what it shows now
    /// (`contents`, read from the views); an empty preview while the views
    /// do not hold it yet.
    fn shown(id: &str, contents: &HashMap<String, Content>) -> (String, bool) {
        match contents.get(id) {
            Some(c) if c.deleted => (String::new(), true),
            Some(c) => (preview(c.message.as_deref(), c.attachment.as_deref()), false),
            None => (String::new(), false),
        }
    }

    fn fill(reply: &mut Option<ReplyTo>, contents: &HashMap<String, Content>) {
        if let Some(r) = reply.as_mut() {
            (r.preview, r.deleted) = Self::shown(&r.id, contents);
        }
    }
}

impl Message {
    /// With the preview of the message it answers, from `contents`.
    pub fn answering(mut self, contents: &HashMap<String, Content>) -> Message {
        ReplyTo::fill(&mut self.reply_to, contents);
        self
    }

    pub fn new(m: &MessageView, seen: bool) -> Message {
        Message {
            id: m.id.clone(),
            sender_id: m.sender_id.clone(),
            receiver_id: m.receiver_id.clone(),
            message: m.message.clone(),
            attachment: m.attachment.clone(),
            seen,
            seq: m.seq,
            client_msg_id: m.client_msg_id.clone(),
            created_at: m.created_at.clone(),
            updated_at: m.edited_at.clone().unwrap_or_else(|| m.created_at.clone()),
            reply_to: ReplyTo::of(&m.reply_to),
            edited_at: m.edited_at.clone(),
            deleted: m.deleted,
            reactions: None,
        }
    }

    /// With the message's reactions as `caller` sees them (none on a tombstone).
    pub fn with_reactions(mut self, r: Option<&Reactions>, caller: Option<&str>) -> Message {
        self.reactions = if self.deleted { None } else { reactions_of(r, caller) };
        self
    }
}

/// The `_id` of the message a delivery of Socket.IO event `event` shows
/// the content of (`newMessage`, `messageUpdated`, a room's `message`), if any.
pub fn content_of<'a>(event: &str, data: &'a Value) -> Option<&'a str> {
    matches!(event, "newMessage" | "messageUpdated" | "message").then(|| data.get("_id")?.as_str()).flatten()
}

/// The `_id` of the message a delivered message answers, if any.
pub fn answered_of(data: &Value) -> Option<&str> {
    data.get("replyTo")?.get("_id")?.as_str()
}

/// Fills a pushed message's `replyTo` preview from `contents` (as
/// [`Message::answering`]): deliveries are stored without it.
pub fn fill_reply(data: &mut Value, contents: &HashMap<String, Content>) {
    let Some(reply) = data.get_mut("replyTo").and_then(Value::as_object_mut) else { return };
    let Some(id) = reply.get("_id").and_then(Value::as_str) else { return };
    let (preview, deleted) = ReplyTo::shown(id, contents);
    reply.insert("preview".into(), Value::String(preview));
    if deleted {
        reply.insert("deleted".into(), Value::Bool(true));
    } else {
        reply.remove("deleted");
    }
}

/// Turns a pushed message into its tombstone: no content, `deleted: true`.
pub fn tombstone(data: &mut Value) {
    if let Some(fields) = data.as_object_mut() {
        for f in ["message", "attachment", "replyTo", "editedAt", "reactions"] {
            fields.remove(f);
        }
        fields.insert("deleted".into(), Value::Bool(true));
    }
}

/// [`Message`] as a JSON value (a push adds its `cursor`).
pub fn message_json(m: &MessageView, seen: bool) -> Value {
    to_value(Message::new(m, seen))
}

/// A room message (REST history and the `/chat` `message` event).
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoomMessage {
    #[serde(rename = "_id")]
    pub id: String,
    pub room_id: String,
    pub sender_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attachment: Option<String>,
    /// Position in the room: gapless.
    pub seq: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_msg_id: Option<String>,
    pub created_at: String,
    /// The earlier message of the room this one answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<ReplyTo>,
    /// When its sender last edited it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub edited_at: Option<String>,
    /// Deleted for everyone: no `message`, `attachment` or `replyTo`
    /// (absent unless true).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    #[schema(required = false)]
    pub deleted: bool,
    /// Emoji → how many set it (absent while none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reactions: Option<BTreeMap<String, Reaction>>,
}

impl RoomMessage {
    /// With the preview of the message it answers, from `contents`.
    pub fn answering(mut self, contents: &HashMap<String, Content>) -> RoomMessage {
        ReplyTo::fill(&mut self.reply_to, contents);
        self
    }

    pub fn new(m: &RoomMessageView) -> RoomMessage {
        RoomMessage {
            id: m.id.clone(),
            room_id: m.room_id.clone(),
            sender_id: m.sender_id.clone(),
            message: m.message.clone(),
            attachment: m.attachment.clone(),
            seq: m.seq,
            client_msg_id: m.client_msg_id.clone(),
            created_at: m.created_at.clone(),
            reply_to: ReplyTo::of(&m.reply_to),
            edited_at: m.edited_at.clone(),
            deleted: m.deleted,
            reactions: None,
        }
    }

    /// With the message's reactions as `caller` sees them (none on a tombstone).
    pub fn with_reactions(mut self, r: Option<&Reactions>, caller: Option<&str>) -> RoomMessage {
        self.reactions = if self.deleted { None } else { reactions_of(r, caller) };
        self
    }
}

/// [`RoomMessage`] as a JSON value (a push adds its `cursor`).
pub fn room_message_json(m: &RoomMessageView) -> Value {
    to_value(RoomMessage::new(m))
}

/// A study room.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Room {
    #[serde(rename = "_id")]
    pub id: String,
    pub name: String,
    pub description: Option<String>,
    pub created_by: String,
    pub created_at: String,
    /// Listed to members only, joined by invitation only (absent unless true).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    #[schema(required = false)]
    pub private: bool,
}

impl Room {
    pub fn new(r: &RoomView) -> Room {
        Room {
            id: r.id.clone(),
            name: r.name.clone(),
            description: r.description.clone(),
            created_by: r.created_by.clone(),
            created_at: r.created_at.clone(),
            private: r.private,
        }
    }
}

/// A room as the caller sees it in `GET /api/rooms`.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ListedRoom {
    #[serde(flatten)]
    pub room: Room,
    pub is_member: bool,
    /// Messages above the caller's read watermark (0 for non-members).
    pub unread: u64,
    /// How many members are present now (members only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active_users: Option<usize>,
}

/// A room with whether the caller is a member (`GET /api/rooms/{id}`).
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoomOfCaller {
    #[serde(flatten)]
    pub room: Room,
    pub is_member: bool,
    /// The caller's role while a member: `owner`, `admin` or `member`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// The caller is invited (and may join) but not a member yet.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    #[schema(required = false)]
    pub invited: bool,
}

/// Another user: who they are, never their email (a directory of
/// addresses is what spammers and phishers page through).
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PublicUser {
    #[serde(rename = "_id")]
    pub id: String,
    pub name: String,
    pub created_at: String,
    /// In `GET /api/users`: true for users the caller has blocked (absent
    /// otherwise).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    #[schema(required = false)]
    pub blocked: bool,
}

impl PublicUser {
    pub fn new(u: &UserView) -> PublicUser {
        PublicUser { id: u.id.clone(), name: u.name.clone(), created_at: u.created_at.clone(), blocked: false }
    }
}

/// `PUT`/`DELETE /api/users/:id/block`.
#[derive(Debug, Serialize, ToSchema)]
pub struct BlockState {
    pub success: bool,
    /// Whether the caller now blocks the user.
    pub blocked: bool,
}

/// The caller themselves (login answers): with their email.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OwnUser {
    #[serde(flatten)]
    pub user: PublicUser,
    pub email: String,
}

/// A user present in a room now.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PresentUser {
    #[serde(rename = "_id")]
    pub id: String,
    pub name: Option<String>,
}

/// Every error: `success` is false; `code` is stable, `message` is for people.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorBody {
    pub success: bool,
    pub message: String,
    /// `bad_request`, `invalid_json`, `invalid_body`, `unauthorized`,
    /// `token_expired`, `invalid_token`, `forbidden`, `not_found`,
    /// `conflict`, `blocked`, `payload_too_large`, `unsupported_media_type`,
    /// `rate_limited`, `busy`, `overloaded`, `timeout`, `unavailable`,
    /// `rebuilding`, `starting`, `draining`, `internal`.
    pub code: String,
}

/// `POST /api/auth/login`.
#[derive(Debug, Serialize, ToSchema)]
pub struct LoggedIn {
    pub success: bool,
    /// A JWT for `Authorization: Bearer` and the Socket.IO handshake's `auth.token`.
    pub token: String,
    pub user: OwnUser,
}

/// `POST /api/auth/register`: the same whether or not the address was free.
#[derive(Debug, Serialize, ToSchema)]
pub struct Registered {
    pub success: bool,
    pub message: String,
}

/// `GET /api/users`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsersPage {
    pub success: bool,
    pub users: Vec<PublicUser>,
    /// Peer id → messages from them the caller has not seen (non-zero only).
    pub unseen_messages: HashMap<String, u64>,
    /// Pass as `after` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// A sent (or edited, or deleted) direct message.
#[derive(Debug, Serialize, ToSchema)]
pub struct SentMessage {
    pub success: bool,
    /// `Message Sent Successfully`, `Attachment Sent Successfully`,
    /// `Message Edited Successfully` or `Message Deleted Successfully`.
    pub message: String,
    pub data: Message,
}

/// A sent room message.
#[derive(Debug, Serialize, ToSchema)]
pub struct SentRoomMessage {
    pub success: bool,
    pub message: String,
    pub data: RoomMessage,
}

/// `PATCH /api/messages/{messageId}/seen`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MarkedSeen {
    pub success: bool,
    /// The caller has now seen every message of the conversation up to this seq.
    pub up_to_seq: u64,
}

/// A room (created, joined).
#[derive(Debug, Serialize, ToSchema)]
pub struct RoomAnswer {
    pub success: bool,
    pub room: Room,
}

/// `GET /api/rooms/{id}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct OneRoom {
    pub success: bool,
    pub room: RoomOfCaller,
}

/// `GET /api/rooms`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoomsPage {
    pub success: bool,
    pub rooms: Vec<ListedRoom>,
    pub next_cursor: Option<String>,
}

/// `GET /api/rooms/{id}/users`.
#[derive(Debug, Serialize, ToSchema)]
pub struct PresentUsers {
    pub success: bool,
    pub users: Vec<PresentUser>,
    pub count: usize,
}

/// An answer that only says it worked.
#[derive(Debug, Serialize, ToSchema)]
pub struct Done {
    pub success: bool,
}

/// `GET /healthz`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok`
    pub status: String,
}

/// `GET /readyz`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Readiness {
    /// `ready`, `unavailable`, `starting` or `draining`.
    pub status: String,
    /// `embedded` or `distributed`.
    pub mode: String,
    /// While starting or draining: what the node is doing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// `ok` or `unavailable` (once started).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_log: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub views: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub counts: Option<String>,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_preview_is_the_start_of_the_text_or_says_attachment() {
        assert_eq!(preview(Some("short"), None), "short");
        let long = "é".repeat(PREVIEW_CHARS + 5);
        assert_eq!(preview(Some(&long), Some("https://x.io/a")).chars().count(), PREVIEW_CHARS + 1);
        assert_eq!(preview(None, Some("https://x.io/a")), "[attachment]");
    }

    #[test]
    fn a_reply_shows_what_the_answered_message_reads_now() {
        let text = |t: &str| Content { message: Some(t.into()), ..Content::default() };
        let contents = HashMap::from([
            ("m1".to_owned(), text("edited since")),
            ("m2".to_owned(), Content { deleted: true, ..Content::default() }),
        ]);
        let mut reply = json!({ "_id": "r", "replyTo": { "_id": "m1", "preview": "" } });
        fill_reply(&mut reply, &contents);
        assert_eq!(reply["replyTo"], json!({ "_id": "m1", "preview": "edited since" }));
        let mut reply = json!({ "_id": "r", "replyTo": { "_id": "m2", "preview": "an old copy" } });
        fill_reply(&mut reply, &contents);
        assert_eq!(reply["replyTo"], json!({ "_id": "m2", "preview": "", "deleted": true }));
        // Not in the views yet: no preview rather than a stale one.
        let mut reply = json!({ "_id": "r", "replyTo": { "_id": "m3", "preview": "stale" } });
        fill_reply(&mut reply, &contents);
        assert_eq!(reply["replyTo"], json!({ "_id": "m3", "preview": "" }));
    }
}
