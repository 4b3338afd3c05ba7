//! natter-events: the stored shape of natter's history.
//!
//! # Layout
//!
//! - [`ids`]: validation of the ids that end up in NATS subjects and MongoDB
//!   field paths (subject-safe tokens).
//! - [`subjects`]: the subject scheme (`<prefix>.ev.dm.<lo>.<hi>`, ...).
//! - [`envelope`]: the [`Envelope`] every event travels in, its stored JSON
//!   form, and decoding with upcasting of older schema versions.
//! - [`account`]: account events ([`UserRegistered`]).
//! - [`room`]: study-room events ([`RoomCreated`], [`MemberJoined`],
//!   [`MemberLeft`], [`RoomRead`], [`RoomMessageSent`], [`RoomMessageEdited`],
//!   [`RoomMessageDeleted`]).
//! - `compact`: the compact stored form of a direct message
//!   (`MessageSent` v3), read and written with its envelope.
//! - [`dm`]: direct-message events ([`MessageSent`], [`MessagesSeen`],
//!   [`BlockChanged`], [`MessageEdited`], [`MessageDeleted`],
//!   [`ReactionChanged`], which rooms share) and the
//!   conversation state snapshot ([`DmState`]) each of them carries, so that
//!   projections are arithmetic rather than queries.
//!
//! This crate does no I/O: serde, uuid and chrono only. Golden fixtures of
//! every event type and version live in `events/fixtures/` and are tested to
//! still decode.

pub mod account;
mod compact;
pub mod dm;
pub mod envelope;
pub mod ids;
pub mod room;
pub mod subjects;

pub use account::UserRegistered;
pub use dm::{BlockChanged, DmState, MAX_UNSEEN_DELETED, MessageDeleted, MessageEdited, MessageRevised, MessageSent, MessagesSeen, ReactionChanged, ReplyRef, Side};
pub use envelope::{DecodeError, Envelope, Event, StoredEvent, current_version};
pub use ids::{IdError, validate_id};
pub use room::{
    MemberInvited, MemberJoined, MemberLeft, MemberState, Role, RoleChanged, RoomCreated, RoomMessageDeleted, RoomMessageEdited, RoomMessageRevised, RoomMessageSent, RoomRead,
};
