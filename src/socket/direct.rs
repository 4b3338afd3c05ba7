//! Namespace `/`: direct-message push.
//!
//! Server → client:
//! - `newMessage`: the message (REST's shape) plus `cursor`.
//! - `messagesSeen`: `{readerId, senderId, upToSeq, cursor}`: `readerId` has
//!   seen every message `senderId` sent them up to `upToSeq`.
//! - `typing`: `{from, typing}` (ephemeral, no cursor).
//! - `synced`: `{cursor}`: everything up to `cursor` has been delivered; live
//!   deliveries follow.
//! - `resync`: `{cursor, reason}`: deliveries after the client's cursor are no
//!   longer retained; refetch over REST and continue from `cursor`.
//! - `error`: `{message, code}`.
//!
//! Client → server: `typing {to, typing}`; `sync {cursor}` (resume from a
//! cursor without reconnecting). The handshake may carry `auth.cursor`.
//!
//! The delivery loop itself is [`super::session`].

use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Deserialize;
use serde_json::json;
use socketioxide::extract::{Extension, SocketRef, State, TryData};
use socketioxide::socket::DisconnectReason;

use super::session::{Filter, error, on_sync, open, release};
use super::handshake::{SocketUser, StartCursor};
use crate::state::AppState;
use crate::push::Payload;

/// Token bucket for `typing`.
#[derive(Clone)]
struct TypingLimit(Arc<Mutex<(f64, Instant)>>);

impl TypingLimit {
    fn allow(&self, per_sec: u32) -> bool {
        let mut guard = self.0.lock().expect("typing limit lock");
        let (tokens, last) = &mut *guard;
        let now = Instant::now();
        let rate = f64::from(per_sec.max(1));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * rate).min(rate * 2.0);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

pub(crate) async fn on_connect(
    s: SocketRef,
    State(node): State<Arc<AppState>>,
    Extension(SocketUser(user)): Extension<SocketUser>,
    Extension(StartCursor(start)): Extension<StartCursor>,
) {
    s.extensions.insert(TypingLimit(Arc::new(Mutex::new((f64::from(node.limits.typing_per_sec) * 2.0, Instant::now())))));
    s.on("typing", on_typing);
    s.on("sync", on_sync);
    s.on_disconnect(async |s: SocketRef, State(node): State<Arc<AppState>>, reason: DisconnectReason| {
        release(&node, &s, reason);
    });
    open(s, node, user, start, Filter::Direct);
}

#[derive(Deserialize)]
struct TypingIn {
    to: String,
    #[serde(default = "yes")]
    typing: bool,
}

fn yes() -> bool {
    true
}

async fn on_typing(
    s: SocketRef,
    State(node): State<Arc<AppState>>,
    Extension(SocketUser(me)): Extension<SocketUser>,
    Extension(limit): Extension<TypingLimit>,
    TryData(input): TryData<TypingIn>,
) {
    let Ok(input) = input else {
        let _ = s.emit("error", &error("bad_request", "typing needs {to: <userId>, typing: <bool>}"));
        return;
    };
    if !limit.allow(node.limits.typing_per_sec) {
        return; // rate-limited: typing notices are best-effort
    }
    if natter_events::validate_id(&input.to).is_err() || input.to == me {
        let _ = s.emit("error", &error("bad_request", "typing: `to` must be another user's id"));
        return;
    }
    match node.views().user(&input.to).await {
        Ok(Some(_)) => {}
        Ok(None) => {
            let _ = s.emit("error", &error("not_found", "typing: no such user"));
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, "typing: user lookup failed");
            return;
        }
    }
    // Between users one of whom blocked the other, typing goes nowhere
    // (silently: the blocked side learns nothing from it).
    match node.commands.blocked_between(&me, &input.to).await {
        Ok(false) => {}
        Ok(true) => return,
        Err(e) => {
            tracing::warn!(error = %e, "typing: could not read whether the users blocked each other; not relayed");
            return;
        }
    }
    let payload = Payload { event: "typing".into(), data: json!({ "from": me, "typing": input.typing }) };
    if let Err(e) = node.push.signal(&input.to, &payload).await {
        tracing::warn!(error = %e, "typing: relay failed");
    }
}

