//! Erasing a deleted message's retained deliveries from the distributed
//! inbox, exactly and durably.
//!
//! When the fan-out stores a `messageDeleted` tombstone it also queues a
//! job in `<STREAM>_ERASE` (a work-queue stream, subject `<prefix>.erase`)
//! naming the message, its time and, for each chain the tombstone went to
//! (the two participants', or the room's), the tombstone's inbox sequence;
//! the event is acknowledged only once both are stored. Every node's
//! [`Eraser`] pulls jobs from one shared durable consumer (`inbox-erase`)
//! and, per chain, reads the chain from a margin before the message's time
//! up to the tombstone, deleting every inbox message that shows the
//! message (`newMessage`, a room's `message`, `messageUpdated`).
//!
//! Why the walk is exact: a conversation's (or room's) events are fanned
//! out one at a time in log order, and a delivery is stored before its
//! event is acknowledged, so every copy of the message on a chain is stored
//! before the tombstone, and none after it (a copy is never stored before
//! the message was written: the margin covers node clocks up to
//! [`MARGIN`] ahead of the NATS servers'). A job is acknowledged once every
//! chain is walked; a node that stops or fails mid-way leaves it to be
//! delivered again (to any node), and erasing twice is harmless. Jobs live
//! as long as the inbox keeps deliveries (older copies have aged out).

use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream::{self, AckKind, consumer, stream};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::Payload;

/// How long before a deleted message's time its copies are looked for:
/// the most a node's clock may be ahead of the NATS servers'.
const MARGIN: chrono::Duration = chrono::Duration::minutes(10);
/// The shared consumer's acknowledgement wait (a long walk reports
/// progress well within it).
const ACK_WAIT: Duration = Duration::from_secs(30);
const PROGRESS_EVERY: Duration = Duration::from_secs(10);
/// Jobs in flight across the cluster.
const IN_FLIGHT: i64 = 8;
const CONSUMER: &str = "inbox-erase";

/// The job stream beside the log `stream`.
pub fn erase_stream(stream: &str) -> String {
    format!("{stream}_ERASE")
}

fn erase_subject(prefix: &str) -> String {
    format!("{prefix}.erase")
}

/// A deleted message to erase from the inbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// The message's `_id`.
    pub id: String,
    /// Its `createdAt` (RFC 3339).
    pub created_at: String,
    /// (inbox subject of a chain, the tombstone's sequence on it).
    pub chains: Vec<(String, u64)>,
}

/// Makes sure the job stream exists, its jobs kept as long as the inbox
/// keeps deliveries.
pub async fn ensure_stream(js: &jetstream::Context, stream: &str, prefix: &str, retention: Duration) -> anyhow::Result<()> {
    let name = erase_stream(stream);
    let config = stream::Config {
        name: name.clone(),
        subjects: vec![erase_subject(prefix)],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        max_age: retention,
        duplicate_window: Duration::from_secs(120).min(retention),
        ..Default::default()
    };
    let mut made = js.get_or_create_stream(config.clone()).await.with_context(|| format!("creating the inbox erase stream {name}"))?;
    // Made with another retention: jobs must live as long as deliveries.
    let now = made.info().await.with_context(|| format!("reading the inbox erase stream {name}"))?.config.clone();
    if now.max_age != config.max_age {
        js.update_stream(stream::Config { max_age: config.max_age, duplicate_window: config.duplicate_window, ..now })
            .await
            .with_context(|| format!("updating the inbox erase stream {name} (NATTER_PUSH_RETENTION_SECS)"))?;
    }
    Ok(())
}

/// Queues `job` (once per event: `key` deduplicates a redelivered event's).
pub async fn queue(js: &jetstream::Context, prefix: &str, key: &str, job: &Job) -> Result<(), String> {
    let body = serde_json::to_vec(job).map_err(|e| e.to_string())?;
    let publish = jetstream::message::PublishMessage::build().payload(body.into()).message_id(key);
    js.send_publish(erase_subject(prefix), publish)
        .await
        .map_err(|e| format!("nats: queueing an inbox erase: {e}"))?
        .await
        .map_err(|e| format!("nats: queueing an inbox erase: {e}"))?;
    Ok(())
}

/// A node's share of the erase jobs.
pub struct Eraser {
    pub js: jetstream::Context,
    /// The log stream's name (the inbox and job streams are named after it).
    pub stream: String,
}

impl Eraser {
    /// Takes jobs until `shutdown`; a lost consumer is taken up again.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut wait = Duration::from_secs(1);
        loop {
            let started = Instant::now();
            tokio::select! {
                result = self.take_jobs() => {
                    let e = result.err().unwrap_or_else(|| anyhow::anyhow!("the consumer's messages ended"));
                    if started.elapsed() > Duration::from_secs(60) {
                        wait = Duration::from_secs(1);
                    }
                    tracing::warn!(consumer = CONSUMER, error = %format!("{e:#}"), retry_in_s = wait.as_secs(), "inbox erase jobs cannot be read (is NATS up?); deleted messages' copies wait in the inbox (never served) until they can");
                }
                _ = shutdown.changed() => return,
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
            wait = (wait * 2).min(Duration::from_secs(30));
        }
    }

    async fn take_jobs(&self) -> anyhow::Result<()> {
        let jobs = self.js.get_stream(erase_stream(&self.stream)).await?;
        let config = consumer::pull::Config {
            durable_name: Some(CONSUMER.into()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: ACK_WAIT,
            max_ack_pending: IN_FLIGHT,
            ..Default::default()
        };
        let consumer = jobs.get_or_create_consumer(CONSUMER, config).await?;
        // One job at a time per node: none waits in a node's buffer while
        // another node could take it.
        let mut messages = consumer.stream().max_messages_per_batch(1).messages().await?;
        let inbox_name = super::inbox_stream(&self.stream);
        let inbox = self.js.get_stream_no_info(&inbox_name).await?;
        while let Some(msg) = messages.next().await {
            let msg = msg?;
            let job: Job = match serde_json::from_slice(&msg.payload) {
                Ok(job) => job,
                Err(e) => {
                    tracing::error!(error = %e, "an inbox erase job is not readable; dropping it");
                    msg.ack_with(AckKind::Term).await.map_err(|e| anyhow::anyhow!("{e}"))?;
                    continue;
                }
            };
            // A time that cannot be read never will be: the job goes.
            let Ok(created) = chrono::DateTime::parse_from_rfc3339(&job.created_at) else {
                tracing::error!(message = %job.id, created_at = %job.created_at, "an inbox erase job names an unreadable time; dropping it");
                msg.ack_with(AckKind::Term).await.map_err(|e| anyhow::anyhow!("{e}"))?;
                continue;
            };
            let start = (created.with_timezone(&chrono::Utc) - MARGIN).to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
            match erase(&self.js, &inbox_name, &inbox, &job, &start, &msg).await {
                Ok(erased) => {
                    tracing::debug!(message = %job.id, erased, "deleted message erased from the inbox");
                    msg.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
                }
                Err(e) => {
                    tracing::warn!(message = %job.id, error = %format!("{e:#}"), "could not erase a deleted message's deliveries from the inbox (never served meanwhile: replays send the tombstone); retrying in 5 s");
                    msg.ack_with(AckKind::Nak(Some(Duration::from_secs(5)))).await.map_err(|e| anyhow::anyhow!("{e}"))?;
                }
            }
        }
        Ok(())
    }
}

/// Walks each chain of `job` up to its tombstone (one direct read per
/// message: it ends where the chain does, whatever was deleted or aged out
/// meanwhile), deleting the copies of the message; returns how many.
async fn erase(js: &jetstream::Context, inbox_name: &str, inbox: &stream::Stream<()>, job: &Job, start: &str, taken: &jetstream::Message) -> anyhow::Result<usize> {
    let mut erased = 0;
    let mut reported = Instant::now();
    for (subject, until) in &job.chains {
        let mut next = first_since(js, inbox_name, subject, start).await?;
        while let Some(msg) = next.take() {
            if msg.sequence > *until {
                break;
            }
            if shows(&msg.payload, &job.id) {
                // Gone already (aged out, or erased by a node that took the
                // job before): fine.
                if let Err(e) = inbox.delete_message(msg.sequence).await {
                    tracing::debug!(seq = msg.sequence, error = %e, "inbox message not erased");
                }
                erased += 1;
            }
            if reported.elapsed() > PROGRESS_EVERY {
                taken.ack_with(AckKind::Progress).await.map_err(|e| anyhow::anyhow!("{e}"))?;
                reported = Instant::now();
            }
            if msg.sequence < *until {
                next = found(inbox.direct_get_next_for_subject(subject, Some(msg.sequence + 1)).await)?;
            }
        }
    }
    Ok(erased)
}

/// A direct read's message (none: nothing there).
fn found(read: Result<jetstream::message::StreamMessage, stream::DirectGetError>) -> anyhow::Result<Option<jetstream::message::StreamMessage>> {
    match read {
        Ok(msg) => Ok(Some(msg)),
        Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The chain's first message stored at or after `start` (RFC 3339).
async fn first_since(js: &jetstream::Context, inbox: &str, subject: &str, start: &str) -> anyhow::Result<Option<jetstream::message::StreamMessage>> {
    let request = serde_json::json!({ "start_time": start, "next_by_subj": subject });
    let reply = js.client().request(format!("$JS.API.DIRECT.GET.{inbox}"), serde_json::to_vec(&request)?.into()).await?;
    match reply.status {
        Some(s) if s == async_nats::StatusCode::NOT_FOUND => Ok(None),
        Some(s) if !s.is_success() => anyhow::bail!("direct get by time answered {s}: {:?}", reply.description),
        _ => Ok(Some(jetstream::message::StreamMessage::try_from(reply).context("direct get by time")?)),
    }
}

/// Whether an inbox message shows the content of message `id`.
fn shows(body: &[u8], id: &str) -> bool {
    serde_json::from_slice::<Payload>(body).is_ok_and(|d| crate::wire::content_of(&d.event, &d.data) == Some(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_deliveries_showing_the_message_are_erased() {
        let body = |event: &str, id: &str| serde_json::to_vec(&serde_json::json!({"event": event, "data": {"_id": id}})).unwrap();
        assert!(shows(&body("newMessage", "m1"), "m1"));
        assert!(shows(&body("message", "m1"), "m1"));
        assert!(shows(&body("messageUpdated", "m1"), "m1"));
        // The tombstone stays; other messages stay.
        assert!(!shows(&body("messageDeleted", "m1"), "m1"));
        assert!(!shows(&body("newMessage", "m2"), "m1"));
        assert!(!shows(b"not json", "m1"));
    }
}
