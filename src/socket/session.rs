//! The per-socket delivery loop shared by the namespaces.
//!
//! Each socket has one task that owns its queue from the push hub and emits
//! in order, filling any gap it detects from the inbox stream first. The
//! cursor advances over every delivery of the user; a namespace's
//! [`Filter`] decides which of them its sockets emit.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use socketioxide::extract::{Extension, SocketRef, State, TryData};
use socketioxide::socket::DisconnectReason;
use tokio::sync::mpsc;

use super::emit::{EmitError, emit_patiently};
use super::handshake::{TokenExpiry, parse_cursor};
use super::presence::exit_room;
use crate::commands::CommandError;
use crate::state::AppState;
use crate::push::{Pushed, Replay};
use crate::push::{Delivery, Payload};

/// How long a burst may keep a socket's buffer full before it is dropped.
const PATIENCE: Duration = Duration::from_secs(5);
/// How often a socket checks the inbox for deliveries its live
/// subscription missed (core NATS is at most once; a missed delivery is
/// otherwise only noticed at the user's next one).
const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// Deliveries fetched per round trip while catching up.
const REPLAY_PAGE: usize = 256;

/// Messages from the socket's event handlers to its task.
pub enum Control {
    Sync(u64),
    /// The socket disconnected; `lost` when the connection died (heartbeat
    /// timeout, transport error) rather than being closed by either side.
    Closed { lost: bool },
}

#[derive(Clone)]
pub struct ControlTx(pub mpsc::Sender<Control>);

/// Set while a `sync` waits for the delivery loop: one at a time.
#[derive(Clone)]
pub struct SyncPending(Arc<std::sync::atomic::AtomicBool>);

/// Which deliveries and signals a namespace's sockets emit.
#[derive(Clone)]
pub enum Filter {
    /// `/`: direct messages, receipts, typing.
    Direct,
    /// `/chat`: room messages and membership; presence signals only for the
    /// rooms this socket has entered.
    Chat(Arc<Mutex<HashSet<String>>>),
}

impl Filter {
    /// A `/chat` socket whose user left `room`'s membership (over REST,
    /// from any node) leaves its presence there too: it no longer gets the
    /// room's presence, and the others see it go.
    fn left_room(&self, user: &str, p: &Payload) -> Option<String> {
        let Filter::Chat(entered) = self else { return None };
        let room = p.data.get("roomId").and_then(Value::as_str)?;
        let concerned = p.event == "member-left" && p.data.get("userId").and_then(Value::as_str) == Some(user);
        (concerned && entered.lock().expect("entered rooms lock").contains(room)).then(|| room.to_owned())
    }

    /// Takes `room` out of the rooms this socket entered; false if it was not in.
    fn forget(&self, room: &str) -> bool {
        matches!(self, Filter::Chat(entered) if entered.lock().expect("entered rooms lock").remove(room))
    }

    fn delivery(&self, p: &Payload) -> bool {
        // A changed message goes where the message went: a room's (it has
        // a `roomId`) to `/chat`, a direct one to `/`.
        let of_room = p.data.get("roomId").is_some();
        match self {
            Filter::Direct => match p.event.as_str() {
                "newMessage" | "messagesSeen" => true,
                "messageUpdated" | "messageDeleted" => !of_room,
                _ => false,
            },
            Filter::Chat(_) => match p.event.as_str() {
                "message" | "member-joined" | "member-left" | "room-invited" | "member-role" => true,
                "messageUpdated" | "messageDeleted" => of_room,
                _ => false,
            },
        }
    }

    fn signal(&self, p: &Payload) -> bool {
        match self {
            Filter::Direct => p.event == "typing",
            Filter::Chat(entered) => {
                let room = p.data.get("roomId").and_then(Value::as_str).unwrap_or_default();
                matches!(p.event.as_str(), "user-joined" | "user-left" | "room-users")
                    && entered.lock().expect("entered rooms lock").contains(room)
            }
        }
    }
}

/// `sync {cursor}`: replay from a cursor without reconnecting.
pub async fn on_sync(
    s: SocketRef,
    State(node): State<Arc<AppState>>,
    Extension(ControlTx(tx)): Extension<ControlTx>,
    Extension(SyncPending(pending)): Extension<SyncPending>,
    TryData(v): TryData<Value>,
) {
    match v.ok().as_ref().and_then(|v| v.get("cursor")).and_then(parse_cursor) {
        Some(cursor) => {
            if let Err(l) = node.rate.sync(&s.id.to_string()) {
                let e = crate::error::ApiError::from(l);
                let _ = s.emit("error", &error(e.code, e.message));
                return;
            }
            // A sync already waiting for the delivery loop is enough.
            if pending.swap(true, std::sync::atomic::Ordering::AcqRel) {
                let _ = s.emit("error", &error("rate_limited", "a sync is already pending on this socket"));
            } else if tx.try_send(Control::Sync(cursor)).is_err() {
                pending.store(false, std::sync::atomic::Ordering::Release);
                let _ = s.emit("error", &error("unavailable", "this socket is closing"));
            }
        }
        None => {
            let _ = s.emit("error", &error("bad_request", "sync needs {cursor: <integer>}"));
        }
    }
}

pub fn error(code: &str, message: impl Into<String>) -> Value {
    json!({ "code": code, "message": message.into() })
}

struct Session {
    filter: Filter,
    s: SocketRef,
    node: Arc<AppState>,
    user: String,
    cursor: u64,
    /// When a delivery was last handed to the socket.
    last_emit: Option<tokio::time::Instant>,
}

/// A connection that dies this soon after a delivery was handed to it died
/// while data was on its way: the node cuts a peer that leaves sent data
/// unacknowledged for 30 s (TCP_USER_TIMEOUT), so such a death means the
/// client stopped reading.
const DIED_SENDING: Duration = Duration::from_secs(40);

impl Session {
    fn died_sending(&self) -> bool {
        self.last_emit.is_some_and(|at| at.elapsed() < DIED_SENDING)
    }
}

enum Stop {
    /// Emit failed: the socket is gone or hopeless.
    Emit(EmitError),
    /// The inbox cannot be read.
    Unavailable(String),
    /// The socket's token expired.
    Expired,
}

impl Session {
    /// Emits `d` unless the socket's namespace filters it out; true if it
    /// was emitted.
    async fn emit_delivery(&mut self, d: &Delivery, live: bool) -> Result<bool, Stop> {
        if let Some(room) = self.filter.left_room(&self.user, &d.payload) {
            // A leave replayed from an old cursor must not take the socket
            // out of a room its user joined again since: the log decides.
            let refused = matches!(self.node.commands.require_member(&room, &self.user).await, Err(CommandError::Refused(_)));
            if refused && self.filter.forget(&room) {
                exit_room(&self.node, &self.s, &self.user, &room).await;
            }
        }
        if !self.filter.delivery(&d.payload) {
            self.cursor = d.cursor;
            return Ok(false);
        }
        self.last_emit = Some(tokio::time::Instant::now());
        // A live reply is stored without the preview of the message it
        // answers: each socket reads it as that message reads now (replays
        // are filled a page at a time by `redact`, before this). Anything
        // else goes out as encoded once for every socket it reaches.
        let payload = &d.payload;
        if live && crate::wire::content_of(&payload.event, &payload.data).is_some() && crate::wire::answered_of(&payload.data).is_some() {
            let mut data = d.data();
            with_preview(&self.node, &mut data).await;
            emit_patiently(&self.s, &payload.event, &data, PATIENCE).await.map_err(Stop::Emit)?;
        } else {
            // JSON text, written into the packet as it is by socketioxide's
            // default (JSON) parser, the only one natter uses: a MessagePack
            // parser would send it as a map, not as the object.
            emit_patiently(&self.s, &payload.event, d.encoded(), PATIENCE).await.map_err(Stop::Emit)?;
        }
        self.cursor = d.cursor;
        self.node.metrics.pushed();
        Ok(true)
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
                Replay::Page(mut page) => {
                    self.redact(&mut page).await?;
                    for d in &page {
                        if self.emit_delivery(d, false).await? {
                            self.node.metrics.replayed();
                        }
                    }
                }
            }
        }
    }

    /// Retained deliveries of messages deleted since they were stored are
    /// replayed as the messages' tombstones, and replies get the preview of
    /// the message they answer as it reads now (one views read per page
    /// that holds any message): deleted content is never served again.
    async fn redact(&self, page: &mut [Delivery]) -> Result<(), Stop> {
        use crate::wire::{answered_of, content_of};
        fn shown(d: &Delivery) -> Option<(String, Option<String>)> {
            let id = content_of(&d.payload.event, &d.payload.data)?;
            Some((id.to_owned(), answered_of(&d.payload.data).map(str::to_owned)))
        }
        let ids: Vec<String> = page.iter().filter_map(shown).flat_map(|(id, answered)| std::iter::once(id).chain(answered)).collect();
        if ids.is_empty() {
            return Ok(());
        }
        let contents = self.node.views().contents(&ids).await.map_err(|e| Stop::Unavailable(e.to_string()))?;
        for d in page.iter_mut() {
            let Some((id, _)) = shown(d) else { continue };
            if contents.get(&id).is_some_and(|c| c.deleted) {
                crate::wire::tombstone(&mut d.payload.data);
            } else {
                crate::wire::fill_reply(&mut d.payload.data, &contents);
            }
        }
        Ok(())
    }

    async fn synced(&self) -> Result<(), Stop> {
        emit_patiently(&self.s, "synced", &json!({ "cursor": self.cursor }), PATIENCE).await.map_err(Stop::Emit)
    }

    async fn live(&mut self, d: &Delivery) -> Result<(), Stop> {
        if d.cursor <= self.cursor {
            return Ok(()); // already delivered (during a catch-up)
        }
        if let Some(check) = &d.check {
            // A room delivery from around the time this node read the
            // user's rooms: for them only if they were a member then.
            let member = self.node.push.member_at(&self.user, &check.room, check.log_seq).await;
            if !member.map_err(|e| Stop::Unavailable(format!("{e:#}")))? {
                return Ok(());
            }
        }
        if d.previous > self.cursor {
            // A delivery of this user is missing: fetch it (and d) in order.
            self.catch_up().await?;
            if d.cursor <= self.cursor {
                return Ok(());
            }
            if d.previous > self.cursor {
                // The stream could not fill the gap (a lagging replica?):
                // never skip silently; tell the client to refetch.
                let reason = "a delivery could not be fetched; refetch over REST";
                emit_patiently(&self.s, "resync", &json!({ "cursor": d.previous, "reason": reason }), PATIENCE)
                    .await
                    .map_err(Stop::Emit)?;
                tracing::warn!(user = %self.user, missing_up_to = d.previous, cursor = self.cursor, "delivery gap not fillable; sent resync");
                self.cursor = d.previous;
            }
        }
        if !self.emit_delivery(d, true).await? {
            return Ok(());
        }
        // How long a live message took from its creation (on any node, by
        // its clock) to here.
        if let Some(created) = d.payload.data.get("createdAt").and_then(|v| v.as_str()) {
            if let Ok(at) = chrono::DateTime::parse_from_rfc3339(created) {
                let ms = (chrono::Utc::now() - at.with_timezone(&chrono::Utc)).num_milliseconds();
                self.node.metrics.delivered_after(ms.max(0) as f64 / 1000.0);
            }
        }
        Ok(())
    }
}

/// Fills a message's `replyTo` preview from the views (one read), as the
/// answered message reads now: previews are stored nowhere but in it.
pub(super) async fn with_preview(node: &AppState, data: &mut serde_json::Value) {
    let id = crate::wire::answered_of(data).map(str::to_owned);
    let contents = crate::http::shown::answered(node, id.as_deref()).await;
    crate::wire::fill_reply(data, &contents);
}

/// Opens a socket's session: counts it, gives its handlers the control
/// channel ([`ControlTx`]) and starts its delivery loop. The namespace
/// registers its own handlers; its disconnect handler calls [`closed`].
pub fn open(s: SocketRef, node: Arc<AppState>, user: String, start: Option<u64>, filter: Filter) {
    node.metrics.socket_opened();
    let (tx, rx) = mpsc::channel(16);
    s.extensions.insert(ControlTx(tx));
    let pending = Arc::new(std::sync::atomic::AtomicBool::new(false));
    s.extensions.insert(SyncPending(pending.clone()));
    let expires = s.extensions.get::<TokenExpiry>().map(|TokenExpiry(at)| at);
    tokio::spawn(run(s, node, user, start, filter, rx, expires, pending));
}

/// Longest single wait for a token's expiry (tokio's timers stop at about
/// two years; a later `exp` is waited for in steps).
const EXPIRY_STEP: Duration = Duration::from_secs(24 * 3600);

/// How long until `expires` (Unix seconds), at most [`EXPIRY_STEP`]; zero
/// when it has passed.
fn until_expiry(expires: u64) -> Duration {
    let at = std::time::UNIX_EPOCH + Duration::from_secs(expires.min(i64::MAX as u64 / 2));
    at.duration_since(std::time::SystemTime::now()).unwrap_or(Duration::ZERO).min(EXPIRY_STEP)
}

/// Ends a socket's session, once: from its disconnect handler, or at
/// shutdown (socketioxide's close does not run disconnect handlers).
/// Returns false when it had already ended.
pub fn release(node: &AppState, s: &SocketRef, reason: DisconnectReason) -> bool {
    match s.extensions.remove::<ControlTx>() {
        Some(control) => {
            closed(node, &control, reason);
            true
        }
        None => false,
    }
}

fn closed(node: &AppState, ControlTx(tx): &ControlTx, reason: DisconnectReason) {
    node.metrics.socket_closed();
    let lost = matches!(reason, DisconnectReason::HeartbeatTimeout | DisconnectReason::TransportError);
    let _ = tx.try_send(Control::Closed { lost });
}

/// Runs a socket's deliveries until it disconnects or falls behind.
async fn run(
    s: SocketRef,
    node: Arc<AppState>,
    user: String,
    start: Option<u64>,
    filter: Filter,
    mut control: mpsc::Receiver<Control>,
    expires: Option<u64>,
    sync_pending: Arc<std::sync::atomic::AtomicBool>,
) {
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
    let mut session = Session { filter: filter.clone(), s: s.clone(), node: node.clone(), user: user.clone(), cursor, last_emit: None };
    let mut outcome = match session.catch_up().await {
        Ok(()) => session.synced().await,
        Err(e) => Err(e),
    };
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    sweep.tick().await; // the first tick is immediate: just caught up
    let expiry = tokio::time::sleep(expires.map_or(EXPIRY_STEP, until_expiry));
    tokio::pin!(expiry);
    while outcome.is_ok() {
        outcome = tokio::select! {
            _ = sweep.tick() => session.catch_up().await,
            _ = &mut expiry, if expires.is_some() => match expires.map(until_expiry) {
                Some(left) if left.is_zero() => Err(Stop::Expired),
                // Far in the future: wait another step.
                left => {
                    expiry.as_mut().reset(tokio::time::Instant::now() + left.unwrap_or(EXPIRY_STEP));
                    Ok(())
                }
            },
            pushed = registration.rx.recv() => match pushed.as_deref() {
                Some(Pushed::Delivery(d)) => session.live(d).await,
                Some(Pushed::Signal(p)) if filter.signal(&p) => emit_patiently(&s, &p.event, &p.data, PATIENCE).await.map_err(Stop::Emit),
                Some(Pushed::Signal(_)) => Ok(()),
                Some(Pushed::Recheck) => session.catch_up().await,
                // The hub drops a socket's queue only when the socket fell
                // too far behind (it is notified too, but may see this first).
                None => Err(Stop::Emit(EmitError::TooSlow)),
            },
            _ = registration.kicked.notified() => Err(Stop::Emit(EmitError::TooSlow)),
            c = control.recv() => match c {
                Some(Control::Sync(c)) => {
                    sync_pending.store(false, std::sync::atomic::Ordering::Release);
                    session.cursor = c;
                    match session.catch_up().await {
                        Ok(()) => session.synced().await,
                        Err(e) => Err(e),
                    }
                }
                // A connection that died while deliveries were backed up for
                // it, or right after we sent to it (a peer that stopped
                // reading misses its heartbeats, or is cut by the TCP user
                // timeout), fell behind as surely as one we drop.
                Some(Control::Closed { lost: true }) if !registration.rx.is_empty() || registration.rx.is_closed() || session.died_sending() => {
                    Err(Stop::Emit(EmitError::TooSlow))
                }
                Some(Control::Closed { .. }) | None => break,
            },
        };
    }
    // A socket whose connection died while deliveries were backed up for
    // it (the kernel's TCP_USER_TIMEOUT cuts a peer that stopped reading)
    // fell behind as surely as one we dropped.
    if matches!(outcome, Err(Stop::Emit(EmitError::Closed))) && (!registration.rx.is_empty() || registration.rx.is_closed() || session.died_sending()) {
        outcome = Err(Stop::Emit(EmitError::TooSlow));
    }
    if matches!(outcome, Err(Stop::Emit(EmitError::TooSlow))) {
        node.metrics.slow_consumer();
    }
    drop(registration); // leave the hub before anything slow
    match outcome {
        Err(Stop::Emit(EmitError::TooSlow)) => {
            tracing::warn!(%user, socket = %s.id, "disconnecting a socket too slow to keep up with its deliveries");
            let _ = s.emit("error", &error("slow_consumer", "disconnected: this client did not keep up with its deliveries; reconnect with your last cursor"));
            let _ = s.disconnect();
        }
        Err(Stop::Expired) => {
            tracing::debug!(%user, socket = %s.id, "token expired; disconnecting the socket");
            let _ = s.emit("error", &error("token_expired", "your token expired; reconnect with a fresh one and your last cursor"));
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
