//! natter: a horizontally scaled, event-sourced chat backend.
//!
//! # Layout
//!
//! - [`cli`]: operator commands (`natter projections`, `natter parked …`).
//! - [`config`]: layered settings (flags > `NATTER_*` env > TOML > defaults).
//! - [`telemetry`]: the tracing subscriber.
//! - [`auth`]: JWT issue/verify, argon2id password hashing.
//! - [`commands`]: the command side. Validation and decisions are pure
//!   functions; [`commands::Commands`] appends to the log with optimistic
//!   concurrency and applies new events to the views at once.
//! - [`log`]: the event-log port ([`log::EventLog`]), its JetStream adapter
//!   and the embedded file log.
//! - [`projector`]: the projector runtime over durable JetStream consumers;
//!   [`tail`]: the embedded one, tailing the file log.
//! - [`heal`]: rebuilds the Redis unread counts when Redis loses its data.
//! - [`http`]: the REST gateway (axum), one module per area.
//! - [`push`]: real-time delivery: the push port ([`push::PushBus`], NATS
//!   or in-process), the fan-out projector (log → per-user deliveries) and
//!   the node's push hub (deliveries → sockets, resume).
//! - [`presence`]: who is in a room now (port; Redis with heartbeats and a
//!   TTL, or in-process).
//! - [`socket`]: Socket.IO namespaces (handshake auth, push, resume).
//! - [`versions`]: which version of each rebuildable projection is live.
//! - [`wire`]: the JSON shapes clients see (REST and Socket.IO alike).
//! - [`metrics`]: Prometheus counters and gauges.
//! - [`node`]: wires a node together, serves, drains on shutdown;
//!   [`embedded`]: the single-node mode with no services (the default).
//!
//! Event types live in the `natter-events` crate; projections and view
//! stores in `natter-projections`.

pub mod auth;
pub mod cli;
pub mod commands;
pub mod config;
pub mod embedded;
pub mod heal;
pub mod http;
pub mod log;
pub mod metrics;
pub mod node;
pub mod presence;
pub mod projector;
pub mod push;
pub mod socket;
pub mod tail;
pub mod telemetry;
pub mod versions;
pub mod wire;
