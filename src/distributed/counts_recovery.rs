//! Self-healing unread counts.
//!
//! Redis holds a projection, not the truth: when it loses its data the
//! marker `counts-ready` goes with it (or, when Redis restarted from a
//! snapshot or failed over, the marker names another server run and is
//! withdrawn), reads answer "rebuilding" (never a
//! wrong number), and one node (under a Redis lock) restarts the
//! `redis-unseen` projector from the start of the log. When that consumer
//! has acknowledged everything the log held when the rebuild began, the
//! marker is written back and reads resume.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream;
use natter_projections::redis_counts::{Readiness, RedisCounts};
use natter_projections::switch::Switch;
use tokio::sync::watch;

use super::live_versions::{COUNTS, Versions};
use crate::log::EventLog;
use crate::projector::consumer_name;

/// Durable consumer of a version of the counts projection.
fn consumer(version: u32) -> String {
    consumer_name(COUNTS, version)
}

/// The rebuild lock lapses unless renewed: a healer that dies frees it.
const LOCK_TTL: Duration = Duration::from_secs(30);
/// A rebuild whose projector makes no progress for this long is abandoned
/// (the lock is released; the next check starts over).
const STALL: Duration = Duration::from_secs(120);

pub struct Healer {
    /// The counts, whichever version is live.
    pub counts: Arc<Switch<RedisCounts>>,
    pub js: jetstream::Context,
    pub stream: String,
    pub log: Arc<dyn EventLog>,
    pub owner: String,
    pub redis: redis::aio::ConnectionManager,
    pub redis_base: String,
}

impl Healer {
    /// If the counts are lost and no other node is rebuilding them: takes the
    /// lock, restarts the projector from the start of the log, and returns
    /// the log head the rebuild must reach.
    pub async fn begin(&self) -> anyhow::Result<Option<(u64, u32)>> {
        let (version, counts) = (self.counts.active_version(), self.counts.active());
        let readiness = counts.readiness().await?;
        if readiness == Readiness::Withdrawn {
            tracing::warn!(
                "Redis restarted (or failed over) since the unread counts were completed: writes after its last \
                 snapshot may be lost, so the counts are rebuilt from the log; until done, count reads answer 503 rebuilding"
            );
        }
        if readiness == Readiness::Ready || !counts.try_lock_heal(&self.owner, LOCK_TTL).await? {
            return Ok(None);
        }
        // A node that stopped mid-rebuild left its target: carry on from
        // where the projectors are, rather than start over.
        if let Some(target) = counts.heal_target().await? {
            tracing::info!(target, "resuming the unread counts rebuild a stopped node started");
            return Ok(Some((target, version)));
        }
        let head = self.log.head().await?;
        if head == 0 {
            tracing::info!("initialising the unread counts in Redis (the event log is empty)");
        } else {
            tracing::warn!(
                head,
                "unread counts are missing from Redis (first start against this log, FLUSHALL, or a restart \
                 without persistence): rebuilding them from the log; until done, count reads answer 503 rebuilding"
            );
        }
        let stream = self.js.get_stream(&self.stream).await.context("counts rebuild: stream")?;
        // Deleting the durable consumer makes every node's counts projector
        // recreate it from the first event.
        if let Err(e) = stream.delete_consumer(&consumer(version)).await {
            // Not there is fine (nothing to restart); anything else leaves
            // the old consumer past the target: no rebuild rests on it.
            use async_nats::jetstream::{ErrorCode, stream::ConsumerErrorKind};
            let not_found = matches!(e.kind(), ConsumerErrorKind::JetStream(j) if j.error_code() == ErrorCode::CONSUMER_NOT_FOUND);
            if !not_found {
                let _ = counts.unlock_heal(&self.owner).await;
                anyhow::bail!("counts rebuild: cannot restart the counts projector's consumer: {e}");
            }
        }
        // Only once the projector restarts from the first event: a target
        // recorded before that could be "reached" by the old consumer.
        counts.set_heal_target(head).await?;
        Ok(Some((head, version)))
    }

    /// Waits until the counts projector has acknowledged every event up to
    /// `head` (renewing the lock while it makes progress, however long the
    /// log), then declares the counts complete.
    pub async fn finish(&self, (head, version): (u64, u32)) -> anyhow::Result<()> {
        let counts = Versions::counts_at(&self.redis, &self.redis_base, version);
        let stream = self.js.get_stream(&self.stream).await.context("counts rebuild: stream")?;
        let started = tokio::time::Instant::now();
        let (mut floor, mut progressed) = (0, tokio::time::Instant::now());
        // An empty log has nothing to wait for.
        loop {
            if head == 0 {
                break;
            }
            if let Ok(info) = stream.consumer_info(consumer(version)).await {
                if info.ack_floor.stream_sequence >= head {
                    break;
                }
                if info.ack_floor.stream_sequence > floor {
                    (floor, progressed) = (info.ack_floor.stream_sequence, tokio::time::Instant::now());
                }
            }
            if progressed.elapsed() > STALL || !counts.renew_heal(&self.owner, LOCK_TTL).await? {
                // Start over next time: resuming a stalled rebuild would stall again.
                let _ = counts.clear_heal_target().await;
                let _ = counts.unlock_heal(&self.owner).await;
                anyhow::bail!("counts rebuild stalled at {floor}/{head} (or lost its lock); the next check starts over");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        counts.mark_ready().await?;
        counts.unlock_heal(&self.owner).await?;
        tracing::info!(head, took = ?started.elapsed(), "unread counts rebuilt from the log");
        Ok(())
    }

    /// Checks every second whether the counts were lost, and heals them.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            // A node stopping mid-rebuild stops waiting at once and hands
            // the lock back: another node (or the next start) resumes the
            // rebuild from its recorded target.
            let heal = async {
                match self.begin().await {
                    Ok(Some(target)) => self.finish(target).await,
                    Ok(None) => Ok(()),
                    Err(e) => Err(e),
                }
            };
            let outcome = tokio::select! {
                outcome = heal => outcome,
                _ = async { shutdown.wait_for(|stop| *stop).await.is_ok() } => {
                    let _ = tokio::time::timeout(Duration::from_secs(2), self.counts.active().unlock_heal(&self.owner)).await;
                    return;
                }
            };
            if let Err(e) = outcome {
                tracing::error!(error = %format!("{e:#}"), "unread counts rebuild failed; will retry");
            }
        }
    }
}
