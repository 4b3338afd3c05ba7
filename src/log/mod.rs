//! The event-log port: append with an expected per-subject position, read
//! the last event of a subject, read any event by its log sequence.
//!
//! The command side holds an `Arc<dyn EventLog>`; [`nats`] is the JetStream
//! adapter, [`file`] the embedded one (one append-only file with checksums,
//! `index`: where its records were at the last clean stop, `recent`: its
//! deduplication window, and `syncer`: its group commit).

pub mod file;
mod index;
pub mod nats;
mod recent;
mod syncer;

use async_trait::async_trait;
use natter_events::{DecodeError, Envelope};
use thiserror::Error;

/// An event as stored in the log.
#[derive(Debug, Clone)]
pub struct Logged {
    /// The log's own sequence (JetStream stream sequence).
    pub log_seq: u64,
    pub envelope: Envelope,
}

#[derive(Debug)]
pub struct Appended {
    pub log_seq: u64,
    /// The command id was already in the log: nothing was appended and
    /// `log_seq` is the original event's.
    pub duplicate: bool,
}

#[derive(Debug, Error)]
pub enum LogError {
    /// Another event was appended to the subject since it was read.
    #[error("the subject moved on since it was read (optimistic concurrency conflict)")]
    Conflict,
    #[error("event log unavailable: {0}")]
    Unavailable(String),
    #[error("event at log sequence {seq} cannot be decoded: {source}")]
    Corrupt { seq: u64, source: DecodeError },
    /// The event is larger than the log can store: nothing was appended,
    /// and retrying will not help.
    #[error("{0}")]
    TooLarge(String),
}

#[async_trait]
pub trait EventLog: Send + Sync {
    /// The newest event on `subject`, if any.
    async fn last(&self, subject: &str) -> Result<Option<Logged>, LogError>;
    /// The newest event on `subject` stored before log sequence `before`
    /// (what the subject said as of that point of the log).
    async fn last_before(&self, subject: &str, before: u64) -> Result<Option<Logged>, LogError>;
    /// Appends `env` on its subject if the subject's newest event is still
    /// the one at log sequence `expected_last` (0: the subject is empty).
    /// Deduplicates on `env.command_id`.
    async fn append(&self, env: &Envelope, expected_last: u64) -> Result<Appended, LogError>;
    /// The event at log sequence `seq`.
    async fn get(&self, seq: u64) -> Result<Logged, LogError>;
    /// Sequence of the newest event in the whole log (0: empty).
    async fn head(&self) -> Result<u64, LogError>;
    /// The subjects under `prefix` (which ends with `.`) holding at least
    /// one event, one token deeper: for `x.member.r1.` the subjects
    /// `x.member.r1.<user>`.
    async fn subjects(&self, prefix: &str) -> Result<Vec<String>, LogError>;
    /// The subjects matching `filter`, a subject whose tokens may be `*`
    /// (for `x.member.*.amy`: amy's member subjects in every room).
    async fn subjects_matching(&self, filter: &str) -> Result<Vec<String>, LogError>;
    /// Every event on `subject` stored before log sequence `before`,
    /// oldest first.
    async fn history(&self, subject: &str, before: u64) -> Result<Vec<Logged>, LogError>;
    /// The first event on `subject` at log sequence `from` or later.
    async fn next_on(&self, subject: &str, from: u64) -> Result<Option<Logged>, LogError>;
    /// The first event at log sequence `from` or later on any subject
    /// under `prefix` (which ends with `.`), one token deeper.
    async fn next_under(&self, prefix: &str, from: u64) -> Result<Option<Logged>, LogError>;
    /// Whether the log can take writes now (for `/readyz`).
    async fn check(&self) -> Result<(), LogError>;
    /// How long an appended command id is remembered: an append with the
    /// same id within this window returns the original.
    fn dedup_window(&self) -> std::time::Duration;
}

/// Moves the sequence `at` picks out of a watched value (a log's head, the
/// embedded tail's applied position) up to `seq`, never back, waking its
/// watchers only when it moves.
pub(crate) fn raise<T>(watched: &tokio::sync::watch::Sender<T>, seq: u64, at: impl Fn(&mut T) -> &mut u64) {
    watched.send_if_modified(|value| {
        let at = at(value);
        let newer = seq > *at;
        if newer {
            *at = seq;
        }
        newer
    });
}

/// How far the views have applied the log, for recognising a retry at any
/// age (`commands/retry.rs`). The distributed mode asks the views'
/// JetStream consumer, the embedded one its log tail.
#[async_trait]
pub trait ViewsProgress: Send + Sync {
    /// A log sequence at or below which every event is in the views (0:
    /// nothing is known to be). It only grows.
    async fn applied_through(&self) -> Result<u64, LogError>;

    /// Waits up to `within` for the views (and counts) to apply the log
    /// through `seq`; whether they have. An adapter that cannot watch them
    /// answers false at once, and the command side applies a new event
    /// itself (read-your-writes either way).
    async fn reached(&self, _seq: u64, _within: std::time::Duration) -> bool {
        false
    }
}
