//! Who is in a room right now: ephemeral state, not history.
//!
//! The [`Presence`] port is implemented by [`redis::RedisPresence`] (shared
//! by every node, with heartbeats and a TTL so a crashed node's users leave)
//! and [`memory::MemoryPresence`] (the embedded node's, in process).
//!
//! A presence entry is one connection (socket) of a user in a room; a user
//! is present while they have at least one live entry. Entering says
//! whether this was the user's first live connection in the room (announce
//! `user-joined`), exiting whether it was the last (announce `user-left`).

pub mod memory;
pub mod redis;

use std::time::Duration;

use async_trait::async_trait;

#[async_trait]
pub trait Presence: Send + Sync {
    /// How long an entry lives without a heartbeat.
    fn ttl(&self) -> Duration;
    /// Marks `user` present in `room` through `conn` (unique per socket and
    /// node). Returns whether the user was not present before.
    async fn enter(&self, room: &str, user: &str, conn: &str) -> anyhow::Result<bool>;
    /// Removes one connection. Returns whether the user has no other live
    /// connection in the room (they left).
    async fn exit(&self, room: &str, user: &str, conn: &str) -> anyhow::Result<bool>;
    /// Distinct users present in `room`, sorted.
    async fn users(&self, room: &str) -> anyhow::Result<Vec<String>>;
    /// Refreshes the expiry of this node's connections.
    /// Returns the rooms whose entries it had to enter again because the
    /// store lost them (normally none).
    async fn heartbeat(&self) -> anyhow::Result<Vec<String>>;
    /// Removes expired connections; returns (room, user) for each user this
    /// call found gone from a room.
    async fn sweep(&self) -> anyhow::Result<Vec<(String, String)>>;
}
