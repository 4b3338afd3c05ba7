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
//! Each socket has one task that owns its queue from the push hub and emits
//! in order, filling any gap it detects from the inbox stream first.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Value, json};
use socketioxide::extract::{Extension, SocketRef, State, TryData};
use tokio::sync::mpsc;

use super::{EmitError, SocketUser, StartCursor, emit_patiently, parse_cursor};
use crate::node::Node;
use crate::push::hub::{Pushed, Replay};
use crate::push::{Delivery, Payload};

/// How long a burst may keep a socket's buffer full before it is dropped.
const PATIENCE: Duration = Duration::from_secs(5);
/// Deliveries fetched per round trip while catching up.
const REPLAY_PAGE: usize = 256;

/// Messages from the socket's event handlers to its task.
enum Control {
    Sync(u64),
    Closed,
}

#[derive(Clone)]
struct ControlTx(mpsc::Sender<Control>);

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

fn error(code: &str, message: impl Into<String>) -> Value {
    json!({ "code": code, "message": message.into() })
}

pub async fn on_connect(
    s: SocketRef,
    State(node): State<Arc<Node>>,
    Extension(SocketUser(user)): Extension<SocketUser>,
    Extension(StartCursor(start)): Extension<StartCursor>,
) {
    node.metrics.socket_opened();
    let (tx, rx) = mpsc::channel(16);
    s.extensions.insert(ControlTx(tx));
    s.extensions.insert(TypingLimit(Arc::new(Mutex::new((f64::from(node.cfg.typing_per_sec) * 2.0, Instant::now())))));

    s.on("typing", on_typing);
    s.on("sync", async |s: SocketRef, Extension(ControlTx(tx)): Extension<ControlTx>, TryData(v): TryData<Value>| {
        match v.ok().as_ref().and_then(|v| v.get("cursor")).and_then(parse_cursor) {
            Some(cursor) => {
                let _ = tx.send(Control::Sync(cursor)).await;
            }
            None => {
                let _ = s.emit("error", &error("bad_request", "sync needs {cursor: <integer>}"));
            }
        }
    });
    s.on_disconnect(async |State(node): State<Arc<Node>>, Extension(ControlTx(tx)): Extension<ControlTx>| {
        node.metrics.socket_closed();
        let _ = tx.try_send(Control::Closed);
    });

    tokio::spawn(run(s, node, user, start, rx));
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
    State(node): State<Arc<Node>>,
    Extension(SocketUser(me)): Extension<SocketUser>,
    Extension(limit): Extension<TypingLimit>,
    TryData(input): TryData<TypingIn>,
) {
    let Ok(input) = input else {
        let _ = s.emit("error", &error("bad_request", "typing needs {to: <userId>, typing: <bool>}"));
        return;
    };
    if !limit.allow(node.cfg.typing_per_sec) {
        return; // rate-limited: typing notices are best-effort
    }
    if natter_events::validate_id(&input.to).is_err() || input.to == me {
        let _ = s.emit("error", &error("bad_request", "typing: `to` must be another user's id"));
        return;
    }
    match node.views.user(&input.to).await {
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
    let payload = Payload { event: "typing".into(), data: json!({ "from": me, "typing": input.typing }) };
    if let Err(e) = node.push.signal(&input.to, &payload).await {
        tracing::warn!(error = %e, "typing: relay failed");
    }
}

struct Session {
    s: SocketRef,
    node: Arc<Node>,
    user: String,
    cursor: u64,
}

enum Stop {
    /// Emit failed: the socket is gone or hopeless.
    Emit(EmitError),
    /// The inbox cannot be read.
    Unavailable(String),
}

impl Session {
    async fn emit_delivery(&mut self, d: &Delivery) -> Result<(), Stop> {
        let mut data = d.payload.data.clone();
        if let Some(obj) = data.as_object_mut() {
            obj.insert("cursor".into(), json!(d.cursor));
        }
        emit_patiently(&self.s, &d.payload.event, &data, PATIENCE).await.map_err(Stop::Emit)?;
        self.cursor = d.cursor;
        self.node.metrics.pushed();
        Ok(())
    }

    /// Emits every retained delivery after the cursor, oldest first.
    async fn catch_up(&mut self) -> Result<(), Stop> {
        loop {
            let replay = self
                .node
                .push
                .replay(&self.user, self.cursor, REPLAY_PAGE)
                .await
                .map_err(|e| Stop::Unavailable(format!("{e:#}")))?;
            match replay {
                Replay::TooOld { head } => {
                    let reason = "deliveries after your cursor are no longer retained; refetch over REST";
                    emit_patiently(&self.s, "resync", &json!({ "cursor": head, "reason": reason }), PATIENCE)
                        .await
                        .map_err(Stop::Emit)?;
                    self.cursor = head;
                    return Ok(());
                }
                Replay::Page(page) if page.is_empty() => return Ok(()),
                Replay::Page(page) => {
                    for d in &page {
                        self.emit_delivery(d).await?;
                        self.node.metrics.replayed();
                    }
                }
            }
        }
    }

    async fn synced(&self) -> Result<(), Stop> {
        emit_patiently(&self.s, "synced", &json!({ "cursor": self.cursor }), PATIENCE).await.map_err(Stop::Emit)
    }

    async fn live(&mut self, d: Delivery) -> Result<(), Stop> {
        if d.cursor <= self.cursor {
            return Ok(()); // already delivered (during a catch-up)
        }
        if d.previous > self.cursor {
            // A delivery of this user is missing: fetch it (and d) in order.
            self.catch_up().await?;
            if d.cursor <= self.cursor {
                return Ok(());
            }
        }
        self.emit_delivery(&d).await
    }
}

async fn run(s: SocketRef, node: Arc<Node>, user: String, start: Option<u64>, mut control: mpsc::Receiver<Control>) {
    // Without a cursor the client starts from "now": the head read *before*
    // subscribing, so a delivery stored in between is caught up, not lost.
    let joined = async {
        let cursor = match start {
            Some(c) => c,
            None => node.push.head().await?,
        };
        anyhow::Ok((cursor, node.push.join(&user).await?))
    };
    let (cursor, mut registration) = match joined.await {
        Ok(joined) => joined,
        Err(e) => {
            tracing::error!(%user, error = %format!("{e:#}"), "socket refused: push unavailable");
            let _ = s.emit("error", &error("unavailable", "real-time delivery is unavailable; retry shortly"));
            let _ = s.disconnect();
            return;
        }
    };
    let mut session = Session { s: s.clone(), node: node.clone(), user: user.clone(), cursor };
    let mut outcome = match session.catch_up().await {
        Ok(()) => session.synced().await,
        Err(e) => Err(e),
    };
    while outcome.is_ok() {
        outcome = tokio::select! {
            pushed = registration.rx.recv() => match pushed {
                Some(Pushed::Delivery(d)) => session.live(d).await,
                Some(Pushed::Signal(p)) => emit_patiently(&s, &p.event, &p.data, PATIENCE).await.map_err(Stop::Emit),
                None => break,
            },
            _ = registration.kicked.notified() => Err(Stop::Emit(EmitError::TooSlow)),
            c = control.recv() => match c {
                Some(Control::Sync(c)) => {
                    session.cursor = c;
                    match session.catch_up().await {
                        Ok(()) => session.synced().await,
                        Err(e) => Err(e),
                    }
                }
                Some(Control::Closed) | None => break,
            },
        };
    }
    drop(registration); // leave the hub before anything slow
    match outcome {
        Err(Stop::Emit(EmitError::TooSlow)) => {
            node.metrics.slow_consumer();
            tracing::warn!(%user, socket = %s.id, "disconnecting a socket too slow to keep up with its deliveries");
            let _ = s.emit("error", &error("slow_consumer", "disconnected: this client did not keep up with its deliveries; reconnect with your last cursor"));
            let _ = s.disconnect();
        }
        Err(Stop::Unavailable(e)) => {
            tracing::error!(%user, error = %e, "disconnecting a socket: inbox unavailable");
            let _ = s.emit("error", &error("unavailable", "real-time delivery is unavailable; reconnect with your last cursor"));
            let _ = s.disconnect();
        }
        _ => {}
    }
}
