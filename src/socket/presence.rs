//! Presence in study rooms: who is there now, announced to everyone
//! present, and the node-wide loop that keeps this node's presence alive
//! and announces users whose node went away.
//!
//! A change costs O(present): the socket that enters gets the whole list
//! (`room-users`), everyone else one delta (`user-joined` / `user-left`).

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Value, json};
use socketioxide::extract::SocketRef;
use tokio::sync::watch;

use crate::push::Payload;
use crate::state::AppState;

/// The presence connection of socket `s` on this node.
pub(crate) fn connection(node: &AppState, s: &SocketRef) -> String {
    format!("{}-{}", node.node_id, s.id)
}

async fn user_json(node: &AppState, user: &str) -> Value {
    let name = node.views().user(user).await.ok().flatten().map(|u| u.name);
    json!({ "_id": user, "name": name })
}

/// Sends `payload` to every user in `to` (each user's sockets that entered
/// the room).
async fn signal_all(node: &AppState, room: &str, to: &[String], payload: &Payload) {
    for u in to {
        if let Err(e) = node.push.signal(u, payload).await {
            tracing::warn!(%room, user = %u, error = %e, "presence signal not sent");
        }
    }
}

/// Who is present in `room`; `None` (logged, nothing announced) when
/// presence is unavailable.
async fn present(node: &AppState, room: &str) -> Option<Vec<String>> {
    match node.presence.users(room).await {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::warn!(%room, error = %e, "presence unavailable; presence change not announced");
            None
        }
    }
}

/// `{_id, name}` of each of `ids`, names resolved in one read (without
/// names when the views do not answer).
async fn named(node: &AppState, ids: &[String]) -> HashMap<String, Value> {
    let names: HashMap<String, String> = match node.views().users_by_ids(ids).await {
        Ok(users) => users.into_iter().map(|u| (u.id, u.name)).collect(),
        Err(e) => {
            tracing::warn!(error = %e, "user names unavailable; presence without names");
            HashMap::new()
        }
    };
    ids.iter().map(|id| (id.clone(), json!({ "_id": id, "name": names.get(id) }))).collect()
}

/// The `room-users` list of `present`.
fn list(room: &str, present: &[String], named: &HashMap<String, Value>) -> Value {
    json!({ "roomId": room, "users": present.iter().map(|u| &named[u]).collect::<Vec<_>>() })
}

/// `who`'s socket `s` entered `room`: it gets the whole present list
/// (`room-users`); when this was `who`'s first connection there (`first`),
/// everyone else present gets one `user-joined`. O(present) in all.
pub(crate) async fn announce_joined(node: &AppState, room: &str, who: &str, first: bool, s: &SocketRef) {
    let Some(present) = present(node, room).await else { return };
    let named = named(node, &present).await;
    let _ = s.emit("room-users", &list(room, &present, &named));
    if first {
        let user = named.get(who).cloned().unwrap_or_else(|| json!({ "_id": who, "name": null }));
        let delta = Payload { event: "user-joined".into(), data: json!({ "roomId": room, "user": user }) };
        let others: Vec<String> = present.iter().filter(|u| *u != who).cloned().collect();
        signal_all(node, room, &others, &delta).await;
    }
    // Someone who entered or left while the list was read and sent may have
    // had their delta reach this socket before the list: say it again.
    if let Ok(now) = node.presence.users(room).await {
        for late in now.iter().filter(|u| !present.contains(u)) {
            let _ = s.emit("user-joined", &json!({ "roomId": room, "user": user_json(node, late).await }));
        }
        for gone in present.iter().filter(|u| !now.contains(u)) {
            let _ = s.emit("user-left", &json!({ "roomId": room, "user": &named[gone] }));
        }
    }
}

/// Everyone present in `room` gets the whole list (after the store lost
/// presence and it re-formed: rare, so O(N²) bytes are fine here).
async fn announce_list(node: &AppState, room: &str) {
    let Some(present) = present(node, room).await else { return };
    let named = named(node, &present).await;
    let payload = Payload { event: "room-users".into(), data: list(room, &present, &named) };
    signal_all(node, room, &present, &payload).await;
}

/// `who` is no longer in `room`: everyone still present gets one
/// `user-left`.
pub(crate) async fn announce_left(node: &AppState, room: &str, who: &str) {
    let Some(present) = present(node, room).await else { return };
    let delta = Payload { event: "user-left".into(), data: json!({ "roomId": room, "user": user_json(node, who).await }) };
    signal_all(node, room, &present, &delta).await;
}

/// Takes socket `s` of `me` out of `room`'s presence, announcing it when
/// it was `me`'s last connection there.
pub(crate) async fn exit_room(node: &AppState, s: &SocketRef, me: &str, room: &str) {
    match node.presence.exit(room, me, &connection(node, s)).await {
        Ok(true) => announce_left(node, room, me).await,
        Ok(false) => {}
        Err(e) => tracing::warn!(%room, error = %e, "presence exit failed; the entry expires with its TTL"),
    }
}

/// Heartbeats this node's presence every TTL/3 and sweeps expired presence
/// every TTL/2, announcing users whose last connection expired (a crashed
/// node's users).
pub async fn presence_loop(node: Arc<AppState>, mut shutdown: watch::Receiver<bool>) {
    let ttl = node.presence.ttl();
    let mut beat = tokio::time::interval(ttl / 3);
    let mut sweep = tokio::time::interval(ttl / 2);
    // Rooms this node entered again after the store lost presence: whoever
    // left meanwhile was announced to nobody, so everyone present gets the
    // list again, one heartbeat later (when every node has re-formed).
    let mut reformed: Vec<String> = Vec::new();
    loop {
        tokio::select! {
            _ = beat.tick() => {
                for room in std::mem::take(&mut reformed) {
                    announce_list(&node, &room).await;
                }
                match node.presence.heartbeat().await {
                    Ok(rooms) => reformed = rooms,
                    Err(e) => tracing::warn!(error = %e, "presence heartbeat failed; this node's users may be announced as left"),
                }
            }
            _ = sweep.tick() => match node.presence.sweep().await {
                Ok(gone) => {
                    for (room, user) in gone {
                        tracing::info!(%room, %user, "presence expired (node gone?); announcing user-left");
                        announce_left(&node, &room, &user).await;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "presence sweep failed"),
            },
            _ = shutdown.changed() => return,
        }
    }
}
