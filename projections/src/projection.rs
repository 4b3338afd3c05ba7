//! The projection port.

use async_trait::async_trait;
use natter_events::Envelope;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ApplyError {
    /// The event can never be applied (it contradicts the view's invariants).
    /// The runtime parks it on the dead-letter subject and moves on.
    #[error("poison event: {0}")]
    Poison(String),
    /// The store is unreachable or failed; retry later, never skip.
    #[error("view store unavailable: {0}")]
    Unavailable(String),
}

/// A named, versioned view of the log. `apply` must be idempotent and
/// commutative over events: the runtime may deliver an event more than once
/// and, across nodes, out of order.
#[async_trait]
pub trait Projection: Send + Sync {
    fn name(&self) -> &'static str;
    fn version(&self) -> u32;
    /// Whether the projection needs each conversation's and room's events
    /// in log order, from one node at a time (its effects are
    /// order-sensitive, like pushing deliveries). Order-free projections
    /// run with many in flight on every node.
    fn ordered(&self) -> bool {
        false
    }
    async fn apply(&self, env: &Envelope) -> Result<(), ApplyError>;
    /// Applies `env`, stored at `log_seq` in the log. Projectors call this;
    /// projections that key anything by log position override it.
    async fn apply_at(&self, env: &Envelope, log_seq: u64) -> Result<(), ApplyError> {
        let _ = log_seq;
        self.apply(env).await
    }
    /// Applies a batch of events (each with its log sequence), with the
    /// same outcome as applying them one by one in any order (an
    /// [`ordered`](Projection::ordered) one is given them in log order and
    /// applies them in that order); stores
    /// override it to write a batch in a few round trips. An error says
    /// nothing about which events were applied (some may have been: apply
    /// is idempotent), so the runtime retries them all, or applies them
    /// one by one to find a poison event.
    async fn apply_batch(&self, batch: &[(&Envelope, u64)]) -> Result<(), ApplyError> {
        for (env, log_seq) in batch {
            self.apply_at(env, *log_seq).await?;
        }
        Ok(())
    }
    /// The log sequence through which this projection's effects are kept
    /// where a restart finds them, recorded atomically with them by
    /// `apply_at` / `apply_batch`: a runtime replaying a local log feeds
    /// it the events after this only. 0: it keeps nothing of its own (in
    /// memory, or checkpointed by its consumer instead).
    async fn kept_through(&self) -> Result<u64, ApplyError> {
        Ok(0)
    }
}
