//! The command side: validate, decide, append, apply.
//!
//! Each command has its own file with a pure `decide`-style function (no
//! I/O, tested given/when/then) and the async method that runs it against
//! the ports. Every command writes through one path, `append` (in
//! `append.rs`): read the subject's newest event, decide from it, append
//! with the expected per-subject sequence, retry with jitter on conflict,
//! count, then see the event in the views before answering (read-your-writes:
//! the embedded tail is waited for, the distributed views applied at once).
//! Every send goes through one idempotency check, `once`.
//!
//! Errors separate *refused* (the caller asked for something not allowed or
//! malformed: [`Refusal`], a 4xx) from *failed* (a dependency is down:
//! [`Failure`], a 503/500).

mod append;
pub mod block;
mod retry;
pub mod register;
pub mod moderation;
pub mod react;
pub mod revise;
pub mod rooms;
pub mod seen;
pub mod send;

use std::sync::Arc;

use natter_projections::{CountStore, StoreError, ViewStore};
use thiserror::Error;

use crate::config::Limits;
use crate::log::{EventLog, LogError, ViewsProgress};
use crate::metrics::Metrics;

/// A command refused for what it asks: nothing was appended.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("{0}")]
    BadInput(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Conflict(String),
    /// A direct message between users one of whom has blocked the other.
    #[error("{0}")]
    Blocked(String),
}

/// A command that could not be carried out because a dependency failed.
#[derive(Debug, Error)]
pub enum Failure {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Internal(String),
    /// The node is saturated (its password checks): retry shortly.
    #[error(transparent)]
    Busy(#[from] crate::auth::Busy),
}

impl From<crate::auth::HashError> for Failure {
    fn from(e: crate::auth::HashError) -> Self {
        match e {
            crate::auth::HashError::Busy(busy) => Failure::Busy(busy),
            crate::auth::HashError::Failed(why) => Failure::Internal(why),
        }
    }
}

#[derive(Debug, Error)]
pub enum CommandError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error(transparent)]
    Failed(#[from] Failure),
}

impl From<LogError> for CommandError {
    fn from(e: LogError) -> Self {
        CommandError::Failed(e.into())
    }
}

impl From<StoreError> for CommandError {
    fn from(e: StoreError) -> Self {
        CommandError::Failed(e.into())
    }
}

/// How often an append is retried when other writers keep winning the race
/// for the same subject.
pub(crate) const MAX_ATTEMPTS: u32 = 200;

pub struct Commands {
    pub(crate) log: Arc<dyn EventLog>,
    pub(crate) views: Arc<dyn ViewStore>,
    pub(crate) counts: Arc<dyn CountStore>,
    pub(crate) prefix: String,
    pub(crate) limits: Limits,
    pub(crate) metrics: Arc<Metrics>,
    /// How far the views have applied the log, for recognising retries.
    progress: Arc<dyn ViewsProgress>,
    /// The views' applied floor as last read: its log sequence, the time of
    /// the event there, and when it was read (see `retry.rs`).
    floor: std::sync::Mutex<Option<FloorRead>>,
    /// Users known to exist (accounts are never deleted): a send to one of
    /// them needs no views read. Bounded: emptied when full.
    known_users: std::sync::Mutex<std::collections::HashSet<String>>,
    /// What rooms' `RoomCreated` says (it never changes): privacy and owner.
    room_facts: std::sync::Mutex<std::collections::HashMap<String, RoomFacts>>,
}

/// What a room's first event, `RoomCreated`, says for good.
#[derive(Debug, Clone)]
pub struct RoomFacts {
    pub private: bool,
    /// Its creator, the owner.
    pub owner: String,
}

/// The views' applied floor as read: its log sequence, the time of the
/// event there (`None`: unknown), and when it was read.
type FloorRead = (u64, Option<chrono::DateTime<chrono::Utc>>, std::time::Instant);

/// Users [`Commands`] remembers as existing before it starts afresh.
const KNOWN_USERS: usize = 100_000;

impl Commands {
    pub fn new(
        log: Arc<dyn EventLog>,
        views: Arc<dyn ViewStore>,
        counts: Arc<dyn CountStore>,
        prefix: String,
        limits: Limits,
        metrics: Arc<Metrics>,
        progress: Arc<dyn ViewsProgress>,
    ) -> Self {
        Commands { log, views, counts, prefix, limits, metrics, progress, floor: Default::default(), known_users: Default::default(), room_facts: Default::default() }
    }

    /// The views this command side keeps up to date (read-your-writes).
    pub fn views(&self) -> &dyn ViewStore {
        self.views.as_ref()
    }

    pub fn counts(&self) -> &dyn CountStore {
        self.counts.as_ref()
    }

    pub(crate) fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Whether the log, the views and the counts answer (for `/readyz`).
    pub async fn check(&self) -> [Result<(), String>; 3] {
        let (log, views, counts) = tokio::join!(self.log.check(), self.views.check(), self.counts.check());
        [log.map_err(|e| e.to_string()), views.map_err(|e| e.to_string()), counts.map_err(|e| e.to_string())]
    }

    /// Checks that `user` is a registered user; `what` names them in the error.
    pub(crate) async fn require_user(&self, user: &str, what: &str) -> Result<(), CommandError> {
        natter_events::validate_id(user).map_err(|e| Refusal::BadInput(format!("{what} id is not valid: {e}")))?;
        if self.known_users.lock().expect("known users lock").contains(user) {
            return Ok(());
        }
        match self.views.user(user).await? {
            Some(_) => {
                let mut known = self.known_users.lock().expect("known users lock");
                if known.len() >= KNOWN_USERS {
                    known.clear();
                }
                known.insert(user.to_owned());
                Ok(())
            }
            None => Err(Refusal::NotFound(format!("{what} not found")).into()),
        }
    }
}
