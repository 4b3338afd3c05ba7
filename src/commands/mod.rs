//! The command side: validate, decide, append, apply.
//!
//! Each command has its own file with a pure `decide`-style function (no
//! I/O, tested given/when/then) and the async method that runs it against
//! the ports. [`Commands::append_dm`] is the one write path of a direct
//! conversation: read the conversation's newest event, decide from the state
//! it carries, append with the expected per-subject sequence, retry on
//! conflict; then apply the event to the views at once (read-your-writes).
//!
//! Errors separate *refused* (the caller asked for something not allowed or
//! malformed: [`Refusal`], a 4xx) from *failed* (a dependency is down:
//! [`Failure`], a 503/500).

pub mod register;
pub mod rooms;
pub mod seen;
pub mod send;

use std::sync::Arc;
use std::time::Duration;

use natter_events::{DmState, Envelope, Event, subjects};
use natter_projections::{ApplyError, CountStore, StoreError, ViewStore};
use thiserror::Error;

use crate::log::{EventLog, LogError};
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

/// Validation limits of commands.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_message_chars: usize,
    pub max_attachment_chars: usize,
}

impl Limits {
    pub fn from_config(cfg: &crate::config::Config) -> Limits {
        Limits { max_message_chars: cfg.max_message_chars, max_attachment_chars: cfg.max_attachment_chars }
    }
}

/// How often an append is retried when other writers keep winning the race
/// for the same conversation.
pub(crate) const MAX_ATTEMPTS: u32 = 200;

pub struct Commands {
    pub(crate) log: Arc<dyn EventLog>,
    pub(crate) views: Arc<dyn ViewStore>,
    pub(crate) counts: Arc<dyn CountStore>,
    pub(crate) prefix: String,
    pub(crate) limits: Limits,
    pub(crate) metrics: Arc<Metrics>,
}

/// The conversation state an event on a DM subject carries.
fn dm_state(env: &Envelope) -> Option<&DmState> {
    match &env.event {
        Event::MessageSent(e) => Some(&e.state),
        Event::MessagesSeen(e) => Some(&e.state),
        _ => None,
    }
}

impl Commands {
    pub fn new(
        log: Arc<dyn EventLog>,
        views: Arc<dyn ViewStore>,
        counts: Arc<dyn CountStore>,
        prefix: String,
        limits: Limits,
        metrics: Arc<Metrics>,
    ) -> Self {
        Commands { log, views, counts, prefix, limits, metrics }
    }

    /// Applies a just-appended event to the views, so that a read through any
    /// node sees it as soon as the command returns. The durable projectors
    /// apply it again later; every projection is idempotent. If a store is
    /// down the event is still safely in the log: the projectors catch up.
    pub(crate) async fn apply_now(&self, env: &Envelope) {
        let (views, counts) = tokio::join!(self.views.apply(env), self.counts.apply(env));
        for (name, res) in [("mongo-views", views), ("redis-unseen", counts)] {
            match res {
                Ok(()) => {}
                Err(ApplyError::Unavailable(e)) => tracing::warn!(
                    projection = name, event = %env.id, error = %e,
                    "could not apply a new event at once; the projector will apply it when the store is back"
                ),
                Err(ApplyError::Poison(e)) => tracing::error!(
                    projection = name, event = %env.id, error = %e,
                    "a new event contradicts the view; the projector will park it"
                ),
            }
        }
    }

    /// The one write path of a direct conversation between `a` and `b`.
    /// `decide` gets the current state and returns the event to append, or
    /// `None` when there is nothing to do. Returns the appended event or, if
    /// `command_id` was already in the log, the original one.
    pub(crate) async fn append_dm<F>(
        &self,
        a: &str,
        b: &str,
        command_id: &str,
        decide: F,
    ) -> Result<Option<Envelope>, CommandError>
    where
        F: Fn(&DmState) -> Result<Option<Event>, Refusal>,
    {
        let subject = subjects::dm(&self.prefix, a, b);
        for attempt in 0..MAX_ATTEMPTS {
            let last = self.log.last(&subject).await?;
            let (state, position, expected) = match &last {
                Some(l) => {
                    let state = dm_state(&l.envelope).cloned().ok_or_else(|| {
                        Failure::Internal(format!("event at log sequence {} on {subject} is not a DM event", l.log_seq))
                    })?;
                    (state, l.envelope.position + 1, l.log_seq)
                }
                None => (DmState::new(a, b), 1, 0),
            };
            let Some(event) = decide(&state)? else { return Ok(None) };
            let env = Envelope::new(command_id.to_owned(), subject.clone(), position, event);
            match self.log.append(&env, expected).await {
                Ok(appended) if !appended.duplicate => {
                    self.metrics.event_appended(env.event.type_name());
                    self.apply_now(&env).await;
                    return Ok(Some(env));
                }
                Ok(appended) => {
                    let original = self.log.get(appended.log_seq).await?.envelope;
                    self.apply_now(&original).await;
                    return Ok(Some(original));
                }
                Err(LogError::Conflict) => {
                    self.metrics.append_conflict();
                    // Spread competing writers a little so they stop colliding.
                    let jitter = (uuid::Uuid::new_v4().as_u128() % 4) as u64 * u64::from(attempt.min(5));
                    tokio::time::sleep(Duration::from_millis(jitter)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(Failure::Internal(format!("{subject}: gave up after {MAX_ATTEMPTS} concurrent-append conflicts")).into())
    }

    /// Checks that `user` is a registered user; `what` names them in the error.
    pub(crate) async fn require_user(&self, user: &str, what: &str) -> Result<(), CommandError> {
        natter_events::validate_id(user).map_err(|e| Refusal::BadInput(format!("{what} id is not valid: {e}")))?;
        match self.views.user(user).await? {
            Some(_) => Ok(()),
            None => Err(Refusal::NotFound(format!("{what} not found")).into()),
        }
    }
}
