//! natter-projections: the views natter builds from its event log.
//!
//! # Layout
//!
//! - [`projection`]: the [`Projection`] port (name, version, idempotent
//!   `apply`) and [`ApplyError`], which separates a poison event (park it)
//!   from a store that is down (retry, never skip).
//! - [`views`]: the read models the gateway queries ([`UserView`],
//!   [`MessageView`]) and the [`ViewStore`] / [`CountStore`] ports.
//! - [`mongo`]: MongoDB view store: users, messages, conversation
//!   watermarks. Every write is an upsert keyed by the event's own ids or a
//!   `$max`, so applying an event twice, or out of order, changes nothing.
//! - [`local`]: both in a local database (redb): the embedded node's
//!   stores, in a file of its data directory that a restart resumes from;
//!   over memory, the pure tests'.
//! - [`history`]: builds event histories from plain commands (tests,
//!   benchmarks, and the convergence property tests).
//! - [`redis_counts`]: Redis unseen counts, one hash per user
//!   (peer → count), guarded per conversation by event position.
//! - [`switch`]: a projection's active version and the one being rebuilt
//!   beside it (reads go to the active one, writes to both).
//!
//! Every projection here is *commutative and idempotent*: views converge to
//! the same state whatever the redelivery, duplication or interleaving
//! pattern, which is what lets a distributed node apply its own event at
//! once (read-your-writes) while the durable consumer applies it again
//! later (an embedded node waits for its tail instead, and applies an event
//! itself only when the tail is slow or stopped).

pub mod history;
pub mod local;
pub mod mongo;
pub mod projection;
pub mod redis_counts;
pub mod switch;
pub mod views;

pub use projection::{ApplyError, Projection};
pub use views::{Content, CountStore, MessageView, Reactions, RoomMessageView, RoomView, StoreError, UserView, ViewStore};
