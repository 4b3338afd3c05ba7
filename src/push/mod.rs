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
//! - [`hub`]: a node's subscriptions (one per user with sockets here, gone
//!   with the user's last socket), typing relay, and replay from a cursor.
//!
//! A delivery's cursor is its sequence in the inbox stream. Because every
//! live delivery also names the user's previous cursor, a socket detects any
//! gap exactly and fills it from the stream before emitting, so a client
//! that resumes with its last cursor receives every missed delivery once, in
//! order, then live ones, with no gap or duplicate at the switch.

pub mod fanout;
pub mod hub;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What the fan-out stores per delivery (the inbox message body).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Payload {
    /// Socket.IO event name (`newMessage`, `messagesSeen`).
    pub event: String,
    pub data: Value,
}

/// A delivery as a socket receives it.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// Position in the inbox stream: the client's resume cursor.
    pub cursor: u64,
    /// The same user's previous delivery (0: none retained before it).
    pub previous: u64,
    pub payload: Payload,
}

/// Subjects of the push pipeline under a prefix.
pub fn inbox_subject(prefix: &str, user: &str) -> String {
    format!("{prefix}.inbox.user.{user}")
}

pub fn push_subject(prefix: &str, user: &str) -> String {
    format!("{prefix}.push.user.{user}")
}

pub fn signal_subject(prefix: &str, user: &str) -> String {
    format!("{prefix}.signal.user.{user}")
}

pub fn inbox_stream(stream: &str) -> String {
    format!("{stream}_INBOX")
}
