//! Real-time delivery, derived from the log.
//!
//! ```text
//! events ──fan-out projector──▶ <STREAM>_INBOX  (<prefix>.inbox.user.<id>, kept for
//!                                 │               the push retention; JetStream
//!                                 │               republishes every stored delivery)
//!                                 ▼
//!                  <prefix>.push.user.<id>  (core NATS, headers Nats-Sequence and
//!                                 │          Nats-Last-Sequence: this delivery's
//!                                 │          cursor and the user's previous one)
//!              every node holding a socket of <id> subscribes
//!                                 ▼
//!              push hub ──bounded queue──▶ socket task ──▶ Socket.IO emit
//! ```
//!
//! - [`fanout`]: the projector that turns events into per-user deliveries
//!   (one at a time, in log order, deduplicated by `<event id>:<user>`).
//! - [`members`]: room membership as of each event, kept per room.
//! - [`hub`]: a node's subscriptions (one per user with sockets here, gone
//!   with the user's last socket), typing relay, and replay from a cursor.
//!
//! A delivery's cursor is its sequence in the inbox stream. Because every
//! live delivery also names the user's previous cursor, a socket detects any
//! gap exactly and fills it from the stream before emitting, so a client
//! that resumes with its last cursor receives every missed delivery once, in
//! order, then live ones, with no gap or duplicate at the switch.

//!
//! The hub and the fan-out talk to a [`PushBus`]: [`nats::NatsPush`] (the
//! inbox stream above, shared by every node) or [`local::LocalPush`] (the
//! embedded node's in-process inbox, whose cursors are log sequences).

pub mod erase;
pub mod fanout;
pub mod hub;
pub mod members;
pub mod local;
pub mod nats;
pub mod reactions;
pub mod router;
pub mod user_rooms;
mod woken;

use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What the fan-out stores per delivery (the inbox message body).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Payload {
    /// Socket.IO event name (`newMessage`, `messagesSeen`).
    pub event: String,
    pub data: Value,
}

/// Whom a delivery is stored for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum To {
    /// One user's own deliveries.
    User(String),
    /// Every member of the room as of the event (stored once, addressed
    /// when read).
    Room(String),
}

/// A delivery as a socket receives it.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// Position in the inbox stream: the client's resume cursor.
    pub cursor: u64,
    /// The previous delivery of the same chain (the user's own, or the
    /// room's for a room delivery; 0: none retained before it).
    pub previous: u64,
    pub payload: Payload,
    /// A room delivery whose recipient's membership as of the event is not
    /// known yet (it changed around the subscription): the session asks
    /// the log before emitting it.
    pub check: Option<MemberCheck>,
    /// What the sockets are sent: the payload with its cursor, encoded by
    /// the first socket that emits it (see [`Delivery::encoded`]).
    encoded: Encoded,
}

impl Delivery {
    pub fn new(cursor: u64, previous: u64, payload: Payload) -> Delivery {
        Delivery { cursor, previous, payload, check: None, encoded: Encoded::default() }
    }

    /// The Socket.IO data of this delivery (its payload with `cursor`),
    /// as JSON text: built once, by the first socket that emits it, and
    /// sent as it is by every other socket holding the same delivery (a
    /// user's tabs; in distributed mode also the room's members on the
    /// node whose membership is known, who share one). A copy of a
    /// delivery starts without it, so a replayed copy whose payload is
    /// changed before it is emitted (a deleted message's tombstone) is
    /// encoded anew.
    pub fn encoded(&self) -> &serde_json::value::RawValue {
        self.encoded.0.get_or_init(|| serde_json::value::to_raw_value(&self.data()).expect("a JSON value encodes"))
    }

    /// The Socket.IO data of this delivery as a JSON tree (its payload
    /// with `cursor`), for a socket that changes it before emitting.
    pub fn data(&self) -> Value {
        let mut data = self.payload.data.clone();
        if let Some(obj) = data.as_object_mut() {
            obj.insert("cursor".into(), self.cursor.into());
        }
        data
    }
}

/// A delivery's encoded form, once made. Left out of comparisons, and not
/// copied with the delivery.
#[derive(Default)]
struct Encoded(std::sync::OnceLock<Box<serde_json::value::RawValue>>);

impl Clone for Encoded {
    fn clone(&self) -> Self {
        Encoded::default()
    }
}

impl PartialEq for Encoded {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for Encoded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() { "encoded" } else { "not encoded yet" })
    }
}

/// "Was the user a member of `room` as of log sequence `log_seq`?"
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberCheck {
    pub room: String,
    pub log_seq: u64,
}

/// Subjects of the push pipeline under a prefix.
pub fn inbox_subject(prefix: &str, user: &str) -> String {
    format!("{prefix}.inbox.user.{user}")
}

pub fn push_subject(prefix: &str, user: &str) -> String {
    format!("{prefix}.push.user.{user}")
}

/// A room's shared chain (stored once per room event).
pub fn room_inbox_subject(prefix: &str, room: &str) -> String {
    format!("{prefix}.inbox.room.{room}")
}

pub fn room_push_subject(prefix: &str, room: &str) -> String {
    format!("{prefix}.push.room.{room}")
}

pub fn signal_subject(prefix: &str, user: &str) -> String {
    format!("{prefix}.signal.user.{user}")
}

pub fn inbox_stream(stream: &str) -> String {
    format!("{stream}_INBOX")
}

/// What a user's live subscription carries.
#[derive(Debug, Clone)]
pub enum Pushed {
    /// A stored delivery, with its cursor.
    Delivery(Delivery),
    /// An ephemeral signal (typing, presence): no cursor, never replayed.
    Signal(Payload),
    /// Deliveries may have been stored that the live subscription could
    /// not see (it just started listening to a room): catch up from the
    /// cursor.
    Recheck,
}

/// Where a replay stands.
pub enum Replay {
    /// Up to a page of deliveries after the cursor, oldest first (empty: caught up).
    Page(Vec<Delivery>),
    /// Deliveries after the cursor are no longer retained (or the cursor is
    /// from the future): the client must refetch over REST and continue
    /// from `head`.
    TooOld { head: u64 },
}

/// The push port: per-user deliveries stored for resume and published live,
/// and ephemeral signals.
#[async_trait]
pub trait PushBus: Send + Sync {
    /// Stores and publishes the deliveries of `event` (at log sequence
    /// `log_seq`). Delivering the same event again delivers nothing twice.
    async fn deliver(&self, event: &natter_events::Envelope, log_seq: u64, deliveries: Vec<(To, Payload)>) -> Result<(), String>;
    /// Stores and publishes the deliveries of several events, in the
    /// order given (log order); a bus that can store them together
    /// overrides it. An error says nothing about which were stored
    /// (delivering an event again delivers nothing twice).
    async fn deliver_batch(&self, batch: Vec<(&natter_events::Envelope, u64, Vec<(To, Payload)>)>) -> Result<(), String> {
        for (event, log_seq, deliveries) in batch {
            self.deliver(event, log_seq, deliveries).await?;
        }
        Ok(())
    }
    /// The newest cursor (0: nothing delivered yet).
    async fn head(&self) -> anyhow::Result<u64>;
    /// The log sequence through which the fan-out's deliveries are kept
    /// where a restart finds them (see [`natter_projections::Projection::kept_through`]):
    /// a bus kept beside a local log. 0: the fan-out is fed from the first
    /// event (or checkpointed by its consumer).
    async fn kept_through(&self) -> u64 {
        0
    }
    /// The deliveries of `user` after `cursor` (a page of at most `limit`).
    async fn replay(&self, user: &str, cursor: u64, limit: usize) -> anyhow::Result<Replay>;
    /// Live deliveries and signals of `user` from the moment this returns,
    /// until the stream is dropped. Best-effort: a delivery missed here is
    /// found by the socket's gap check.
    async fn subscribe(&self, user: &str) -> anyhow::Result<BoxStream<'static, Arc<Pushed>>>;
    /// Relays an ephemeral signal to `to`'s sockets on every node.
    async fn signal(&self, to: &str, payload: &Payload) -> anyhow::Result<()>;
    /// Whether `user` was a member of `room` as of log sequence `log_seq`
    /// (for a delivery that came with a [`MemberCheck`]; only a bus that
    /// learns rooms from the log after it subscribed sends those).
    async fn member_at(&self, _user: &str, _room: &str, _log_seq: u64) -> anyhow::Result<bool> {
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    #[test]
    fn a_delivery_is_encoded_once_with_its_cursor_and_a_copy_is_encoded_anew() {
        let d = Delivery::new(7, 3, Payload { event: "newMessage".into(), data: json!({ "_id": "m1", "message": "hi" }) });
        let sent: Value = serde_json::from_str(d.encoded().get()).unwrap();
        assert_eq!(sent, json!({ "_id": "m1", "message": "hi", "cursor": 7 }));
        assert!(std::ptr::eq(d.encoded(), d.encoded()), "built once, then shared");
        // A replayed copy changed before it is emitted (a tombstone) is
        // sent as it now reads, never as the original was encoded.
        let mut copy = d.clone();
        assert_eq!(copy, d, "the encoding is not part of what a delivery is");
        copy.payload.data["message"] = Value::Null;
        let sent: Value = serde_json::from_str(copy.encoded().get()).unwrap();
        assert_eq!(sent, json!({ "_id": "m1", "message": null, "cursor": 7 }));
        assert_eq!(serde_json::from_str::<Value>(d.encoded().get()).unwrap()["message"], "hi");
    }
}
