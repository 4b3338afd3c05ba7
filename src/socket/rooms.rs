//! Namespace `/chat`: study rooms, as the original app's clients use them.
//!
//! Client → server:
//! - `join-room` (`"<roomId>"` or `{roomId}`): joins the room's membership
//!   if needed, then enters its presence. Acknowledged with
//!   `{success, roomId, users}`.
//! - `leave-room` (`"<roomId>"` or `{roomId}`): leaves the room's presence
//!   (membership is left over REST).
//! - `send-message` `{roomId, message?, attachment?, clientMsgId?}`:
//!   acknowledged with `{success: true, data: <message>}` or
//!   `{success: false, code, message}`.
//! - `sync {cursor}`: replay from a cursor.
//!
//! Server → client:
//! - `message`: a room message (with `cursor`), for every room the user is
//!   a member of; `member-joined` / `member-left` `{roomId, userId, cursor}`.
//!   These come in log order: every member sees them in the same order.
//! - `room-users` `{roomId, users: [{_id, name}]}` to a socket when it
//!   enters a room, then `user-joined` / `user-left` `{roomId, user: {_id,
//!   name}}` deltas: presence, for the rooms this socket entered.
//! - `synced`, `resync`, `error` as on `/`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use serde::Deserialize;
use serde_json::{Value, json};
use socketioxide::extract::{AckSender, Extension, SocketRef, State, TryData};
use socketioxide::socket::DisconnectReason;

use super::handshake::{SocketUser, StartCursor, TOO_MANY_IN_FLIGHT, admit};
use super::presence::{announce_joined, connection, exit_room};
use super::session::{Filter, error, on_sync, open, release};
use crate::commands::rooms::SendRoomMessage;
use crate::error::ApiError;
use crate::state::AppState;
use crate::wire::room_message_json;

/// The rooms a socket has entered (its presence).
#[derive(Clone)]
struct Entered(Arc<Mutex<HashSet<String>>>);

pub(crate) async fn on_connect(
    s: SocketRef,
    State(node): State<Arc<AppState>>,
    Extension(SocketUser(user)): Extension<SocketUser>,
    Extension(StartCursor(start)): Extension<StartCursor>,
) {
    let entered = Arc::new(Mutex::new(HashSet::new()));
    s.extensions.insert(Entered(entered.clone()));
    s.on("join-room", on_join);
    s.on("leave-room", on_leave);
    s.on("send-message", on_send);
    s.on("sync", on_sync);
    s.on_disconnect(on_disconnect);
    open(s, node, user, start, Filter::Chat(entered));
}

/// `"<roomId>"` or `{roomId}`.
fn room_arg(v: &Value) -> Option<String> {
    let id = match v {
        Value::String(s) => s.as_str(),
        Value::Object(o) => o.get("roomId")?.as_str()?,
        _ => return None,
    };
    natter_events::validate_id(id).ok()?;
    Some(id.to_owned())
}

/// Refuses a client event: an `error` event, and the ack if one was asked for.
fn refuse(s: &SocketRef, ack: AckSender, code: &str, message: &str) {
    let _ = s.emit("error", &error(code, message));
    let _ = ack.send(&json!({ "success": false, "code": code, "message": message }));
}

/// Answers the ack of an event refused by [`admit`] (which emitted the `error`).
fn refuse_quietly(ack: AckSender) {
    let _ = ack.send(&json!({ "success": false, "code": "rate_limited", "message": TOO_MANY_IN_FLIGHT }));
}

/// Refuses a client event whose command failed (or was over a rate
/// limit), with the REST error's code.
fn refuse_command(s: &SocketRef, ack: AckSender, e: impl Into<ApiError>) {
    let e: ApiError = e.into();
    refuse(s, ack, e.code, &e.message);
}

async fn on_join(
    s: SocketRef,
    State(node): State<Arc<AppState>>,
    Extension(SocketUser(me)): Extension<SocketUser>,
    Extension(Entered(entered)): Extension<Entered>,
    TryData(v): TryData<Value>,
    ack: AckSender,
) {
    let Some(_request) = admit(&s) else {
        return refuse_quietly(ack);
    };
    let Some(room) = v.ok().as_ref().and_then(room_arg) else {
        return refuse(&s, ack, "bad_request", "join-room needs a room id");
    };
    let cap = node.limits.rooms_per_socket;
    let full = |entered: &HashSet<String>| !entered.contains(&room) && cap > 0 && entered.len() >= cap;
    let too_many = format!("this socket is in {cap} rooms already; leave one first");
    let (is_full, already_in) = {
        let entered = entered.lock().expect("entered rooms lock");
        (full(&entered), entered.contains(&room))
    };
    if is_full {
        return refuse(&s, ack, "too_many_rooms", &too_many);
    }
    // Entering a room's presence is limited per user (a burst of a whole
    // socket's rooms, for a reconnect); joining its membership as well.
    let limited = if already_in { Ok(()) } else { node.rate.enter_room(&me) };
    let limited = match limited {
        Ok(()) if node.commands.require_member(&room, &me).await.is_err() => node.rate.room_change(&me),
        other => other,
    };
    if let Err(l) = limited {
        return refuse_command(&s, ack, l);
    }
    if let Err(e) = node.commands.join_room(&me, &room).await {
        return refuse_command(&s, ack, e);
    }
    {
        // The cap is checked again where the place is taken: joins run
        // concurrently.
        let mut entered = entered.lock().expect("entered rooms lock");
        if full(&entered) {
            drop(entered);
            return refuse(&s, ack, "too_many_rooms", &too_many);
        }
        entered.insert(room.clone());
    }
    match node.presence.enter(&room, &me, &connection(&node, &s)).await {
        Ok(first) => {
            // Handlers run concurrently: if the socket left the room (or
            // disconnected) meanwhile, undo the entry rather than leave a
            // ghost that heartbeats keep alive.
            // Removed between the join and the entry (its `member-left`
            // found the room not entered yet): no presence either.
            let still_in = s.connected() && entered.lock().expect("entered rooms lock").contains(&room);
            let member = node.commands.require_member(&room, &me).await.is_ok();
            if still_in && !member {
                entered.lock().expect("entered rooms lock").remove(&room);
            }
            let still_in = still_in && member;
            if !still_in {
                exit_room(&node, &s, &me, &room).await;
                let _ = ack.send(&json!({ "success": false, "code": "left", "message": "the socket left the room while entering it" }));
                return;
            }
            announce_joined(&node, &room, &me, first, &s).await;
        }
        Err(e) => {
            tracing::warn!(%room, error = %e, "presence unavailable on join-room");
            return refuse(&s, ack, "unavailable", "presence is unavailable; retry shortly");
        }
    }
    let users = node.presence.users(&room).await.unwrap_or_default();
    let _ = ack.send(&json!({ "success": true, "roomId": room, "users": users }));
}

async fn on_leave(
    s: SocketRef,
    State(node): State<Arc<AppState>>,
    Extension(SocketUser(me)): Extension<SocketUser>,
    Extension(Entered(entered)): Extension<Entered>,
    TryData(v): TryData<Value>,
    ack: AckSender,
) {
    let Some(_request) = admit(&s) else {
        return refuse_quietly(ack);
    };
    let Some(room) = v.ok().as_ref().and_then(room_arg) else {
        return refuse(&s, ack, "bad_request", "leave-room needs a room id");
    };
    let was_in = entered.lock().expect("entered rooms lock").remove(&room);
    if was_in {
        exit_room(&node, &s, &me, &room).await;
    }
    let _ = ack.send(&json!({ "success": true, "roomId": room }));
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SendIn {
    room_id: String,
    message: Option<String>,
    attachment: Option<String>,
    client_msg_id: Option<String>,
    reply_to: Option<String>,
}

async fn on_send(
    s: SocketRef,
    State(node): State<Arc<AppState>>,
    Extension(SocketUser(me)): Extension<SocketUser>,
    TryData(input): TryData<SendIn>,
    ack: AckSender,
) {
    let Some(_request) = admit(&s) else {
        return refuse_quietly(ack);
    };
    let Ok(input) = input else {
        return refuse(&s, ack, "bad_request", "send-message needs {roomId, message?, attachment?, clientMsgId?, replyTo?}");
    };
    let cmd = SendRoomMessage {
        sender: me,
        room: input.room_id,
        message: input.message,
        attachment: input.attachment,
        client_msg_id: input.client_msg_id,
        reply_to: input.reply_to,
    };
    if let Err(l) = node.rate.send(&cmd.sender) {
        return refuse_command(&s, ack, l);
    }
    match node.commands.send_room(cmd).await {
        Ok(m) => {
            let mut data = room_message_json(&m);
            super::session::with_preview(&node, &mut data).await;
            let _ = ack.send(&json!({ "success": true, "data": data }));
        }
        Err(e) => refuse_command(&s, ack, e),
    }
}

async fn on_disconnect(s: SocketRef, State(node): State<Arc<AppState>>, reason: DisconnectReason) {
    release_chat(&node, &s, reason).await;
}

/// Ends a `/chat` socket's session and presence, once (at disconnect or
/// shutdown).
pub(crate) async fn release_chat(node: &AppState, s: &SocketRef, reason: DisconnectReason) {
    if !release(node, s, reason) {
        return;
    }
    let (Some(SocketUser(me)), Some(Entered(entered))) = (s.extensions.get::<SocketUser>(), s.extensions.get::<Entered>()) else { return };
    let rooms: Vec<String> = entered.lock().expect("entered rooms lock").drain().collect();
    for room in rooms {
        exit_room(node, s, &me, &room).await;
    }
}
