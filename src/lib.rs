//! natter: a horizontally scaled, event-sourced chat backend.
//!
//! # Layout
//!
//! The composition root, [`startup`], builds a node from the adapters of
//! its run mode and is imported by nothing below it. Arrows point down:
//!
//! - [`startup`]: `start(config, listener)` → a [`startup::RunningNode`]:
//!   connects the mode's [`adapters`], builds the application state, runs
//!   the projectors, serves, drains on shutdown.
//! - `embedded` / [`distributed`]: each mode's `connect`, returning the
//!   adapters (file log and in-process stores / JetStream, MongoDB, Redis)
//!   and its projector runner. `distributed` also holds the live version of
//!   each rebuildable projection and the Redis counts' recovery.
//! - `http` (REST, one module per area) and `socket` (Socket.IO
//!   namespaces, sessions, presence): the gateway. They depend on `state`
//!   (the application state every handler shares), `error` (the one error
//!   type with its status) and [`wire`] (JSON shapes), never on the wiring.
//! - [`commands`]: the command side. Pure decisions per command; one append
//!   path (read → decide → append with the expected sequence → retry →
//!   apply) and one idempotency check for all.
//! - `projector`: the one projector policy (applied / parked / retry
//!   later) and its two runtimes (JetStream consumers, the embedded tail).
//! - `push`: real-time delivery: the push port (NATS or the embedded inbox), the
//!   fan-out projection (log → per-user deliveries) and the node's hub
//!   (deliveries → sockets, resume).
//! - [`log`]: the event-log port and its adapters; `presence`: who is in a
//!   room now (port and adapters); `ratelimit`: per-IP and per-account
//!   limits (counters shared in Redis, or in-process); `auth`: tokens and passwords;
//!   `metrics`: Prometheus; [`telemetry`]: the tracing subscriber.
//! - [`config`]: every setting, declared once, layered flags > `NATTER_*` >
//!   TOML > defaults. [`cli`]: operator commands.
//!
//! Event types live in the `natter-events` crate; projections and view
//! stores in `natter-projections`.

mod adapters;
mod auth;
pub mod cli;
pub mod commands;
pub mod config;
pub mod distributed;
mod embedded;
mod error;
mod http;
pub mod log;
mod metrics;
mod presence;
mod projector;
mod push;
mod ratelimit;
mod socket;
pub mod startup;
mod state;
pub mod telemetry;
mod wire;

#[cfg(test)]
mod layering;
