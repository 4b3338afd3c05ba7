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
    /// Whether the projection needs events strictly one at a time, in log
    /// order, across all nodes (its effects are order-sensitive, like
    /// pushing deliveries). Order-free projections run with many in flight.
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
}
