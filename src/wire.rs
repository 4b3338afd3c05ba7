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
    let obj = v.as_object_mut().expect("object");
    if let Some(text) = &m.message {
        obj.insert("message".into(), json!(text));
    }
    if let Some(url) = &m.attachment {
        obj.insert("attachment".into(), json!(url));
    }
    if let Some(c) = &m.client_msg_id {
        obj.insert("clientMsgId".into(), json!(c));
    }
    v
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
    let obj = v.as_object_mut().expect("object");
    if let Some(text) = &m.message {
        obj.insert("message".into(), json!(text));
    }
    if let Some(url) = &m.attachment {
        obj.insert("attachment".into(), json!(url));
    }
    if let Some(c) = &m.client_msg_id {
        obj.insert("clientMsgId".into(), json!(c));
    }
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
