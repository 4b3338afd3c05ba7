//! Presence in study rooms: who is there now, announced to everyone
//! present, and the node-wide loop that keeps this node's presence alive
//! and announces users whose node went away.
//!
//! A change costs one `room-users` list to everyone present plus the
//! delta (`user-joined` / `user-left`).

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

/// Tells everyone present in `room` who is there now, after `change`
/// (`user-joined` / `user-left` of `who`) if any.
pub(crate) async fn announce(node: &AppState, room: &str, change: Option<(&str, &str)>) {
    let present = match node.presence.users(room).await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(%room, error = %e, "presence unavailable; room-users not announced");
            return;
        }
    };
    let mut users = Vec::with_capacity(present.len());
    for u in &present {
        users.push(user_json(node, u).await);
    }
    let mut payloads = Vec::new();
    if let Some((event, who)) = change {
        payloads.push(Payload { event: event.into(), data: json!({ "roomId": room, "user": user_json(node, who).await }) });
    }
    payloads.push(Payload { event: "room-users".into(), data: json!({ "roomId": room, "users": users }) });
    for u in &present {
        for p in &payloads {
            if let Err(e) = node.push.signal(u, p).await {
                tracing::warn!(%room, user = %u, error = %e, "presence signal not sent");
            }
        }
    }
}

/// Takes socket `s` of `me` out of `room`'s presence, announcing it when
/// it was `me`'s last connection there.
pub(crate) async fn exit_room(node: &AppState, s: &SocketRef, me: &str, room: &str) {
    match node.presence.exit(room, me, &connection(node, s)).await {
        Ok(true) => announce(node, room, Some(("user-left", me))).await,
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
    loop {
        tokio::select! {
            _ = beat.tick() => {
                if let Err(e) = node.presence.heartbeat().await {
                    tracing::warn!(error = %e, "presence heartbeat failed; this node's users may be announced as left");
                }
            }
            _ = sweep.tick() => match node.presence.sweep().await {
                Ok(gone) => {
                    for (room, user) in gone {
                        tracing::info!(%room, %user, "presence expired (node gone?); announcing user-left");
                        announce(&node, &room, Some(("user-left", &user))).await;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "presence sweep failed"),
            },
            _ = shutdown.changed() => return,
        }
    }
}
