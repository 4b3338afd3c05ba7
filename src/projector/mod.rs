//! Projectors: move events from the log into the projections.
//!
//! Two runtimes move events, one policy decides what becomes of each:
//!
//! - [`jetstream`]: one durable pull consumer per projection
//!   ([`consumer_name`]), shared by every distributed node; the consumer's
//!   acknowledged position is the projection's checkpoint.
//! - [`embedded`]: tails the embedded node's file log, every event to every
//!   projection in log order.
//! - [`project`], the policy both call: apply the event; a poison event
//!   (undecodable, or refused by the projection) is parked with its reason
//!   through the runtime's [`Parking`] and counted; a store that is down
//!   means "retry later". The checkpoint never passes an event that was
//!   neither applied nor parked.
//!
//! A mode hands the composition root a [`Runner`]: what must happen before
//! the node serves, and the projector tasks.

pub mod embedded;
pub mod jetstream;
pub mod partitions;
pub mod pinned;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use natter_events::Envelope;
use natter_projections::{ApplyError, Projection};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::metrics::Metrics;

/// The durable consumer (distributed) of a version of a projection.
pub fn consumer_name(projection: &str, version: u32) -> String {
    format!("{projection}-v{version}")
}

/// Where a runtime keeps the events a projection refused.
#[async_trait]
pub trait Parking: Send + Sync {
    /// Records `payload` (the event as stored, at log sequence `seq`) as
    /// refused by `projection` for `reason`. `Ok(false)`: it was recorded
    /// before (an embedded node meets its parked events again at every
    /// start). An error means the event must not be skipped yet.
    async fn park(&self, projection: &str, seq: u64, reason: &str, payload: &[u8]) -> Result<bool, String>;
}

/// What the runtime does after [`project`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Applied or parked: move on (acknowledge).
    Done,
    /// Not applied: offer the event again after this long.
    RetryAfter(Duration),
}

/// The one projector policy: applies `event` (the decoded event at log
/// sequence `seq`, or why it cannot be decoded) to `projection`, parks a
/// poison event, counts (under `label`: the projection, or one partition
/// of it), and says what the runtime does next. `lag` is how many events
/// are still to be projected after this one.
#[allow(clippy::too_many_arguments)]
pub async fn project(
    projection: &dyn Projection,
    label: &str,
    event: Result<&Envelope, String>,
    seq: u64,
    payload: &[u8],
    lag: u64,
    parking: &dyn Parking,
    metrics: &Metrics,
) -> Next {
    let name = projection.name();
    metrics.projection_lag(label, lag);
    let started = std::time::Instant::now();
    let outcome = match event {
        Err(reason) => Err(ApplyError::Poison(reason)),
        Ok(env) => {
            let span = tracing::debug_span!("project", projection = name, seq, event = %env.id, kind = env.event.type_name());
            tracing::Instrument::instrument(projection.apply_at(env, seq), span).await
        }
    };
    match outcome {
        Ok(()) => {
            metrics.projection_applied(name);
            metrics.projection_took(name, started.elapsed().as_secs_f64());
            Next::Done
        }
        Err(ApplyError::Poison(reason)) => match parking.park(name, seq, &reason, payload).await {
            Ok(recorded) => {
                if recorded {
                    tracing::error!(projection = name, seq, %reason, "parked a poison event; the projector goes on (see `natter parked list`)");
                } else {
                    tracing::warn!(projection = name, seq, %reason, "skipping an event parked before");
                }
                metrics.projection_parked(name);
                Next::Done
            }
            Err(e) => {
                tracing::error!(projection = name, seq, error = %e, "cannot park a poison event; retrying it in 1 s");
                Next::RetryAfter(Duration::from_secs(1))
            }
        },
        Err(ApplyError::Unavailable(e)) => {
            tracing::warn!(projection = name, seq, error = %e, "view store unavailable; the event will be applied again in 500 ms");
            Next::RetryAfter(Duration::from_millis(500))
        }
    }
}

/// What the runtime does with a batch after [`project_batch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchNext {
    /// All applied: acknowledge them all.
    Done,
    /// Not applied (a store is down): offer them all again after this long.
    RetryAfter(Duration),
    /// One of them is poison: put each through [`project`] on its own,
    /// which parks the culprit and applies the rest.
    OneByOne,
}

/// The policy for a batch of decoded events (each with its log sequence),
/// `lag` events still to be projected after them: apply them together,
/// count, and say what the runtime does next. The outcome of a single event
/// stays [`project`]'s call: a poison batch goes back to it one by one.
pub async fn project_batch(projection: &dyn Projection, label: &str, batch: &[(&Envelope, u64)], lag: u64, metrics: &Metrics) -> BatchNext {
    let name = projection.name();
    metrics.projection_lag(label, lag);
    let span = tracing::debug_span!("project_batch", projection = name, events = batch.len());
    let started = std::time::Instant::now();
    match tracing::Instrument::instrument(projection.apply_batch(batch), span).await {
        Ok(()) => {
            metrics.projection_applied_n(name, batch.len());
            metrics.projection_took(name, started.elapsed().as_secs_f64());
            BatchNext::Done
        }
        Err(ApplyError::Poison(reason)) => {
            tracing::warn!(projection = name, events = batch.len(), %reason, "a batch holds a poison event; applying its events one at a time (a bigger batch first in parts of 256)");
            BatchNext::OneByOne
        }
        Err(ApplyError::Unavailable(e)) => {
            tracing::warn!(projection = name, events = batch.len(), error = %e, "view store unavailable; the batch will be applied again in 500 ms");
            BatchNext::RetryAfter(Duration::from_millis(500))
        }
    }
}

/// How a mode runs its projectors.
#[async_trait]
pub trait Runner: Send {
    /// Whether every projection is given every event in log order, one at
    /// a time, from the first or from where it is kept (then the fan-out
    /// can track room membership from the events themselves).
    fn in_log_order(&self) -> bool;

    /// Brings the projections far enough to serve (embedded: replays the
    /// whole log into the in-process views; distributed: restores unread
    /// counts Redis lost), starts projecting new events until `shutdown`,
    /// and returns the tasks left running.
    async fn start(
        self: Box<Self>,
        projections: Vec<Arc<dyn Projection>>,
        metrics: Arc<Metrics>,
        shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<Vec<JoinHandle<()>>>;
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use natter_events::{Event, UserRegistered};

    use super::*;

    struct Refusing(Result<(), fn() -> ApplyError>);

    #[async_trait]
    impl Projection for Refusing {
        fn name(&self) -> &'static str {
            "test"
        }
        fn version(&self) -> u32 {
            1
        }
        async fn apply(&self, _env: &Envelope) -> Result<(), ApplyError> {
            self.0.map_err(|e| e())
        }
    }

    #[derive(Default)]
    struct Parked(Mutex<Vec<(u64, String)>>, bool);

    #[async_trait]
    impl Parking for Parked {
        async fn park(&self, _projection: &str, seq: u64, reason: &str, _payload: &[u8]) -> Result<bool, String> {
            if self.1 {
                return Err("stream unavailable".into());
            }
            self.0.lock().unwrap().push((seq, reason.to_owned()));
            Ok(true)
        }
    }

    fn event() -> Envelope {
        let e = UserRegistered { user_id: "u".into(), name: "U".into(), email: "u@x.io".into(), password_hash: "h".into() };
        Envelope::new("c".into(), "p.ev.account.k".into(), 1, Event::UserRegistered(e))
    }

    #[tokio::test]
    async fn applied_parked_or_retried() {
        let (env, metrics) = (event(), Metrics::default());
        let parked = Parked::default();
        let ok = Refusing(Ok(()));
        assert_eq!(project(&ok, "test", Ok(&env), 1, b"", 0, &parked, &metrics).await, Next::Done);
        assert_eq!(project(&ok, "test", Err("not JSON".into()), 2, b"x", 0, &parked, &metrics).await, Next::Done);
        let poison = Refusing(Err(|| ApplyError::Poison("contradicts the view".into())));
        assert_eq!(project(&poison, "test", Ok(&env), 3, b"", 0, &parked, &metrics).await, Next::Done);
        assert_eq!(*parked.0.lock().unwrap(), vec![(2, "not JSON".to_owned()), (3, "contradicts the view".to_owned())]);
        let down = Refusing(Err(|| ApplyError::Unavailable("connection refused".into())));
        assert!(matches!(project(&down, "test", Ok(&env), 4, b"", 0, &parked, &metrics).await, Next::RetryAfter(_)));
        // A poison event that cannot be parked is not skipped.
        let full = Parked(Mutex::default(), true);
        assert!(matches!(project(&poison, "test", Ok(&env), 5, b"", 0, &full, &metrics).await, Next::RetryAfter(_)));
        let text = metrics.render();
        assert!(text.contains("natter_projection_parked_total{projection=\"test\"} 2"), "{text}");
        assert!(text.contains("natter_projection_applied_total{projection=\"test\"} 1"), "{text}");
    }
}
