//! The envelope every event is stored in, and its decoding.
//!
//! Stored JSON (one NATS message body per event):
//!
//! ```json
//! { "id": "<uuidv7>", "commandId": "<idempotency key>",
//!   "subject": "natter.ev.dm.<lo>.<hi>", "position": 3,
//!   "at": "2026-11-23T18:00:00Z", "type": "MessageSent", "v": 1,
//!   "data": { ... } }
//! ```
//!
//! `position` is the event's gapless position among the events of its
//! subject (1, 2, 3, ...), guarded on append by JetStream's expected last
//! subject sequence. `type` + `v` name the payload's schema: renaming a Rust
//! type never rewrites history, and older versions are upcast in [`upcast`]
//! before they reach the domain.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;
use uuid::Uuid;

use crate::{BlockChanged, MemberInvited, MemberJoined, MemberLeft, RoleChanged, MessageDeleted, MessageEdited, MessageSent, MessagesSeen, ReactionChanged, RoomMessageDeleted, RoomMessageEdited, RoomCreated, RoomMessageSent, RoomRead, UserRegistered};

/// Current schema version of an event type (what it is written as when it
/// fits: see [`crate::compact`]).
pub fn current_version(kind: &str) -> u32 {
    crate::compact::version(kind).unwrap_or_else(|| domain_version(kind))
}

/// The version of an event type whose JSON the domain type reads: older
/// payloads are upcast to it. A compact version (`MessageSent` v3,
/// `MessagesSeen` v2) is not JSON of the domain type but read with its
/// envelope ([`crate::compact`]).
fn domain_version(kind: &str) -> u32 {
    match kind {
        "MessageSent" => 2,
        _ => 1,
    }
}

/// The domain events, at their current schema version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    UserRegistered(UserRegistered),
    MessageSent(MessageSent),
    MessagesSeen(MessagesSeen),
    RoomCreated(RoomCreated),
    MemberJoined(MemberJoined),
    MemberLeft(MemberLeft),
    RoomRead(RoomRead),
    RoomMessageSent(RoomMessageSent),
    BlockChanged(BlockChanged),
    MessageEdited(MessageEdited),
    MessageDeleted(MessageDeleted),
    RoomMessageEdited(RoomMessageEdited),
    RoomMessageDeleted(RoomMessageDeleted),
    ReactionChanged(ReactionChanged),
    MemberInvited(MemberInvited),
    RoleChanged(RoleChanged),
}

impl Event {
    /// The direct conversation's state a direct-conversation event carries
    /// (after it); `None` for every other event.
    pub fn dm_state(&self) -> Option<&crate::DmState> {
        match self {
            Event::MessageSent(e) => Some(&e.state),
            Event::MessagesSeen(e) => Some(&e.state),
            Event::BlockChanged(e) => Some(&e.state),
            Event::MessageEdited(e) | Event::MessageDeleted(e) => Some(&e.message.state),
            Event::ReactionChanged(e) => e.state.as_ref(),
            _ => None,
        }
    }
}

/// One arm per event type: its stored name and payload type. Adding an
/// event type is one line here.
macro_rules! event_types {
    ($m:ident) => {
        $m! {
            UserRegistered, MessageSent, MessagesSeen, RoomCreated, MemberJoined, MemberLeft, RoomRead, RoomMessageSent, BlockChanged,
            MessageEdited, MessageDeleted, RoomMessageEdited, RoomMessageDeleted, ReactionChanged,
            MemberInvited, RoleChanged
        }
    };
}

macro_rules! type_name_impl {
    ($($t:ident),*) => {
        impl Event {
            pub fn type_name(&self) -> &'static str {
                match self {
                    $(Event::$t(_) => stringify!($t),)*
                }
            }

            fn payload(&self) -> Value {
                match self {
                    $(Event::$t(e) => serde_json::to_value(e),)*
                }
                .expect("event payloads always serialize")
            }

            fn from_payload(kind: &str, v: u32, data: Value) -> Result<Event, DecodeError> {
                let payload_err = |source| DecodeError::Payload { kind: kind.to_owned(), v, source };
                match kind {
                    $(stringify!($t) => Ok(Event::$t(serde_json::from_value(data).map_err(payload_err)?)),)*
                    other => Err(DecodeError::UnknownType(other.to_owned())),
                }
            }
        }
    };
}

event_types!(type_name_impl);

/// An event with its metadata, as the domain sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub id: Uuid,
    /// Idempotency key of the command that produced the event; also its
    /// JetStream `Nats-Msg-Id`.
    pub command_id: String,
    pub subject: String,
    /// Gapless position among the events of `subject`, from 1.
    pub position: u64,
    pub at: DateTime<Utc>,
    pub event: Event,
}

/// The stored (wire) form of an envelope: payload kept as raw JSON until its
/// version is known.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredEvent {
    pub id: Uuid,
    pub command_id: String,
    pub subject: String,
    pub position: u64,
    pub at: DateTime<Utc>,
    #[serde(rename = "type")]
    pub kind: String,
    pub v: u32,
    pub data: Value,
}

#[derive(Debug, Error)]
pub enum DecodeError {
    #[error("event is not valid JSON of the envelope shape: {0}")]
    Envelope(serde_json::Error),
    #[error("unknown event type {0:?}")]
    UnknownType(String),
    #[error("{kind} v{v} is newer than this build understands; upgrade the node")]
    FutureVersion { kind: String, v: u32 },
    #[error("{kind} v{v} payload does not match its schema: {source}")]
    Payload { kind: String, v: u32, source: serde_json::Error },
    #[error("{kind} v{v} compact payload cannot be read: {why}")]
    Compact { kind: String, v: u32, why: String },
}

/// Brings a JSON payload of version `v` up to the version its domain type
/// reads, one step at a time. Each step has a golden fixture of the version
/// it reads (`events/fixtures/v<N>/`).
pub fn upcast(kind: &str, v: u32, data: Value) -> Result<Value, DecodeError> {
    let target = domain_version(kind);
    if v == 0 || v > target {
        return Err(DecodeError::FutureVersion { kind: kind.to_owned(), v });
    }
    let mut data = data;
    for from in v..target {
        data = match (kind, from) {
            ("MessageSent", 1) => message_sent_v1_to_v2(data),
            _ => return Err(DecodeError::FutureVersion { kind: kind.to_owned(), v }),
        };
    }
    Ok(data)
}

/// MessageSent v1 → v2: the optional `attachment` becomes `attachments`.
fn message_sent_v1_to_v2(mut data: Value) -> Value {
    if let Some(obj) = data.as_object_mut() {
        let attachments: Vec<Value> = obj.remove("attachment").filter(|a| !a.is_null()).into_iter().collect();
        obj.insert("attachments".into(), Value::Array(attachments));
    }
    data
}

impl Envelope {
    /// A new event. A direct message's envelope takes its message id (a
    /// UUID) as its own id, which its stored form then need not repeat.
    pub fn new(command_id: String, subject: String, position: u64, event: Event) -> Self {
        let id = match &event {
            Event::MessageSent(e) => Uuid::parse_str(&e.message_id).unwrap_or_else(|_| Uuid::now_v7()),
            _ => Uuid::now_v7(),
        };
        Envelope { id, command_id, subject, position, at: Utc::now(), event }
    }

    /// The stored form, at the current version of each type.
    pub fn to_stored(&self) -> StoredEvent {
        self.to_stored_as(true)
    }

    /// The stored form; `compact: false` writes direct-conversation events
    /// in their previous full versions (`MessageSent` v2, `MessagesSeen`
    /// v1), which builds before the compact forms read.
    pub fn to_stored_as(&self, compact: bool) -> StoredEvent {
        let kind = self.event.type_name();
        let compacted = if compact { crate::compact::encode(&self.event, &self.id, &self.subject, &self.command_id) } else { None };
        let (v, command_id, data) = match compacted {
            Some((command_id, data)) => (current_version(kind), command_id, data),
            None => (domain_version(kind), self.command_id.clone(), self.event.payload()),
        };
        StoredEvent { id: self.id, command_id, subject: self.subject.clone(), position: self.position, at: self.at, kind: kind.to_owned(), v, data }
    }

    pub fn encode(&self) -> Vec<u8> {
        self.encode_as(true)
    }

    /// [`Envelope::encode`], in the compact form or not ([`Envelope::to_stored_as`]).
    pub fn encode_as(&self, compact: bool) -> Vec<u8> {
        serde_json::to_vec(&self.to_stored_as(compact)).expect("envelopes always serialize")
    }

    pub fn decode(bytes: &[u8]) -> Result<Envelope, DecodeError> {
        let stored: StoredEvent = serde_json::from_slice(bytes).map_err(DecodeError::Envelope)?;
        Envelope::from_stored(stored)
    }

    pub fn from_stored(s: StoredEvent) -> Result<Envelope, DecodeError> {
        let (command_id, event) = if crate::compact::version(&s.kind) == Some(s.v) {
            crate::compact::decode(&s.kind, s.data, &s.id, &s.subject, &s.command_id)
                .map_err(|why| DecodeError::Compact { kind: s.kind.clone(), v: s.v, why })?
        } else {
            let data = upcast(&s.kind, s.v, s.data)?;
            (s.command_id, Event::from_payload(&s.kind, s.v, data)?)
        };
        Ok(Envelope { id: s.id, command_id, subject: s.subject, position: s.position, at: s.at, event })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DmState;

    #[test]
    fn round_trips_through_the_stored_form() {
        let (state, seq, count) = DmState::new("a", "b").after_send("a");
        let env = Envelope::new(
            "a:c1".into(),
            "natter.ev.dm.a.b".into(),
            1,
            Event::MessageSent(MessageSent {
                message_id: Uuid::now_v7().to_string(),
                client_msg_id: Some("c1".into()),
                sender_id: "a".into(),
                receiver_id: "b".into(),
                message: Some("hi".into()),
                attachments: vec![],
                seq,
                sender_count: count,
                state,
                reply_to: None,
            }),
        );
        assert_eq!(Envelope::decode(&env.encode()).unwrap(), env);
        let v2 = env.to_stored_as(false);
        assert_eq!((v2.v, v2.command_id.as_str()), (2, "a:c1"), "written for builds before v3");
        assert_eq!(Envelope::decode(&env.encode_as(false)).unwrap(), env);
    }

    #[test]
    fn message_sent_v1_is_upcast_to_v2() {
        let v1 = serde_json::json!({"attachment": "https://x.io/a.png", "message": null});
        assert_eq!(upcast("MessageSent", 1, v1).unwrap()["attachments"], serde_json::json!(["https://x.io/a.png"]));
        let none = upcast("MessageSent", 1, serde_json::json!({"message": "hi"})).unwrap();
        assert_eq!(none["attachments"], serde_json::json!([]));
        assert!(matches!(upcast("MessageSent", 3, serde_json::json!({})), Err(DecodeError::FutureVersion { .. })), "v3 is not upcast JSON");
    }

    #[test]
    fn refuses_unknown_types_and_future_versions() {
        let mut s = Envelope::new("c".into(), "s".into(), 1, Event::UserRegistered(UserRegistered {
            user_id: "u".into(),
            name: "n".into(),
            email: "e@x".into(),
            password_hash: "h".into(),
        }))
        .to_stored();
        s.v = 99;
        assert!(matches!(Envelope::from_stored(s.clone()), Err(DecodeError::FutureVersion { .. })));
        s.v = 1;
        s.kind = "Nope".into();
        assert!(matches!(Envelope::from_stored(s), Err(DecodeError::UnknownType(_))));
        assert!(matches!(Envelope::decode(b"{"), Err(DecodeError::Envelope(_))));
    }
}
