//! Shapes clients see, shared by REST and Socket.IO: one definition, so a
//! message pushed over a socket is byte-for-byte the message REST returns.

use natter_projections::{MessageView, RoomMessageView, RoomView};
use serde_json::{Value, json};

/// A message as clients see it: the original app's shape plus `seq` and
/// `clientMsgId`. `seen` is derived from the receiver's read watermark.
pub fn message_json(m: &MessageView, seen: bool) -> Value {
    let mut v = json!({
        "_id": m.id,
        "senderId": m.sender_id,
        "receiverId": m.receiver_id,
        "seen": seen,
        "seq": m.seq,
        "createdAt": m.created_at,
        "updatedAt": m.created_at,
    });
    with_content(&mut v, &m.message, &m.attachment, &m.client_msg_id);
    v
}

/// Adds the fields a message has only when set, as the original app's
/// documents did (absent, not null).
fn with_content(v: &mut Value, message: &Option<String>, attachment: &Option<String>, client_msg_id: &Option<String>) {
    let obj = v.as_object_mut().expect("message JSON is an object");
    for (key, value) in [("message", message), ("attachment", attachment), ("clientMsgId", client_msg_id)] {
        if let Some(value) = value {
            obj.insert(key.into(), json!(value));
        }
    }
}

/// A room message as clients see it (REST history and the `/chat` `message` event).
pub fn room_message_json(m: &RoomMessageView) -> Value {
    let mut v = json!({
        "_id": m.id,
        "roomId": m.room_id,
        "senderId": m.sender_id,
        "seq": m.seq,
        "createdAt": m.created_at,
    });
    with_content(&mut v, &m.message, &m.attachment, &m.client_msg_id);
    v
}

/// A room as clients see it.
pub fn room_json(r: &RoomView) -> Value {
    json!({
        "_id": r.id,
        "name": r.name,
        "description": r.description,
        "createdBy": r.created_by,
        "createdAt": r.created_at,
    })
}
