//! The projector runtime over JetStream: consume → [`project`] → acknowledge.
//!
//! Each projection has its own durable pull consumer, `<name>-v<version>`
//! (ordered projections one per partition of their feed, worked by one
//! pinned node at a time: see [`super::partitions`] and [`super::pinned`]),
//! shared by every node: JetStream hands each event to one node at a time,
//! and the consumer's acknowledged position is the projection's checkpoint.
//! An event is acknowledged only after it has been applied, so the
//! checkpoint never passes an unapplied event. What becomes of an event is
//! the shared policy's call ([`project`]): "retry later" is a nak with that
//! delay on the log (a partition keeps the events in hand and retries
//! them, so that none overtakes them); poison events are parked on
//! `<prefix>.parked.<projection>`.

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_trait::async_trait;
use async_nats::jetstream::consumer::{AckPolicy, pull};
use async_nats::jetstream::{self, AckKind};
use futures::{FutureExt, StreamExt};
use natter_events::Envelope;
use natter_projections::Projection;
use tokio::sync::watch;

use super::partitions::{Pins, partition_consumer};
use super::{BatchNext, Next, Parking, consumer_name, project, project_batch};
use crate::log::nats::parked_subject;
use crate::metrics::Metrics;

/// How often a projector working on one event says so (well within the
/// shortest ack wait, 5 s).
pub(super) const PROGRESS_EVERY: Duration = Duration::from_secs(2);
/// How long one event may hold its place by progress acks.
const PROGRESS_AT_MOST: Duration = Duration::from_secs(120);
/// Most events an order-free projection applies together while live.
const BATCH: usize = 256;
/// Most events it applies together while catching up (a rebuild, or after
/// an outage): the stores' per-batch costs (a read mark per conversation,
/// a round trip per collection) then weigh little per event.
const CATCH_UP_BATCH: usize = 4096;
/// Most payload bytes a batch holds, and a pull buffers, whatever their
/// count (a body is at most `NATTER_MAX_BODY_BYTES`).
const BATCH_BYTES: usize = 8 << 20;
/// How long a batch waits for more events after its first: live, a few
/// events share the stores' round trips (reads stay fresh: the writing
/// node applied each event already); a rebuild's batches fill at once.
const LINGER: Duration = Duration::from_millis(20);

/// Why a consumer loop ended without an error.
pub(super) enum Flow {
    Stop,
    /// The projection's live version changed: consume its new durable.
    Follow,
}

/// The durable consumer of a projection, from the first event of the log.
pub fn consumer_config(durable: &str, ordered: bool) -> pull::Config {
    // Ordered projections get one event in flight across the cluster and a
    // short ack wait, so a crashed node holds the line only briefly;
    // a dead node's in-flight events return after the ack wait.
    // An order-free one has room for two catch-up batches: the next is
    // delivered while one is applied.
    let (max_ack_pending, ack_wait) = if ordered { (1, Duration::from_secs(5)) } else { (2 * CATCH_UP_BATCH as i64, Duration::from_secs(10)) };
    pull::Config {
        durable_name: Some(durable.to_owned()),
        ack_policy: AckPolicy::Explicit,
        ack_wait,
        max_ack_pending,
        ..Default::default()
    }
}

/// Where a projector's events come from.
#[derive(Debug, Clone)]
pub enum Feed {
    /// The log stream itself, through the durable of the projection's live
    /// version.
    Log { stream: String },
    /// One partition of an ordered projection's feed (see
    /// [`super::partitions`]): the events of its conversations and rooms,
    /// in log order, each with the log sequence it has in the log, worked
    /// in batches by the node pinned to it ([`super::pinned`]; `pins` is
    /// what this node knows of the pins it holds).
    Partition { stream: String, index: u32, pins: Arc<Pins> },
}

pub struct Projector {
    pub js: jetstream::Context,
    pub feed: Feed,
    pub prefix: String,
    pub projection: Arc<dyn Projection>,
    pub metrics: Arc<Metrics>,
}

impl Projector {
    pub fn durable_name(&self) -> String {
        let (name, version) = (self.projection.name(), self.projection.version());
        match &self.feed {
            Feed::Log { .. } => consumer_name(name, version),
            Feed::Partition { index, .. } => partition_consumer(name, version, *index),
        }
    }

    /// What metrics and logs call this projector.
    pub(super) fn label(&self) -> String {
        match &self.feed {
            Feed::Log { .. } => self.projection.name().to_owned(),
            Feed::Partition { index, .. } => format!("{}-p{index}", self.projection.name()),
        }
    }

    /// Runs until `shutdown` turns true. Connection trouble is logged and
    /// retried; it never ends the loop.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let name = self.label();
        // Since when consuming has failed without a working stretch: a NATS
        // leader election or a stream just placed on a cluster fails for a
        // few seconds (a warning); longer is an operator's business.
        let mut failing_since: Option<std::time::Instant> = None;
        loop {
            if *shutdown.borrow() {
                return;
            }
            let started = std::time::Instant::now();
            match self.consume(&mut shutdown).await {
                Ok(Flow::Stop) => return,
                Ok(Flow::Follow) => failing_since = None,
                Err(e) => {
                    if started.elapsed() > Duration::from_secs(10) {
                        failing_since = None;
                    }
                    let since = *failing_since.get_or_insert(started);
                    if since.elapsed() > Duration::from_secs(15) {
                        tracing::error!(projection = name, error = %e, failing_for_s = since.elapsed().as_secs(), "projector cannot consume the log; retrying every second (is NATS up? see /readyz)");
                    } else {
                        tracing::warn!(projection = name, error = %e, "projector lost its consumer (a NATS leader election, or streams just placed); retrying in 1 s");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = shutdown.changed() => return,
                    }
                }
            }
        }
    }

    async fn consume(&self, shutdown: &mut watch::Receiver<bool>) -> anyhow::Result<Flow> {
        let durable = self.durable_name();
        let stream = match &self.feed {
            Feed::Log { stream } => stream,
            Feed::Partition { stream, index, pins } => return self.consume_partition(stream, *index, pins, &durable, shutdown).await,
        };
        let stream = self.js.get_stream(stream).await?;
        let consumer = stream.get_or_create_consumer(&durable, consumer_config(&durable, self.projection.ordered())).await?;
        // Half the consumer's room for unacknowledged events (a consumer
        // created before catch-up batches has 1,024), within what the
        // server lets one pull ask for (its `max_request_batch` and
        // `max_request_max_bytes`, when an operator set them). A pull's
        // byte budget is never below the connection's largest message,
        // which it could not deliver.
        let config = &consumer.cached_info().config;
        let limit = |value: i64| usize::try_from(value).ok().filter(|v| *v > 0);
        let in_flight = limit(config.max_ack_pending).unwrap_or(2 * CATCH_UP_BATCH);
        let catch_up = (in_flight / 2).min(limit(config.max_batch).unwrap_or(usize::MAX)).clamp(1, CATCH_UP_BATCH);
        let largest = self.js.client().max_payload();
        let pull_bytes = BATCH_BYTES.max(largest).min(limit(config.max_bytes).unwrap_or(usize::MAX));
        if pull_bytes < largest {
            tracing::warn!(
                projection = %self.label(),
                consumer = %durable,
                max_request_max_bytes = pull_bytes,
                max_payload = largest,
                "the consumer's max_request_max_bytes is below NATS's max_payload: an event larger than it is never delivered and the projection stalls on it"
            );
        }
        let mut messages =
            consumer.stream().max_messages_per_batch(catch_up).max_bytes_per_batch(pull_bytes).heartbeat(Duration::from_secs(15)).messages().await?;
        // A rebuilt projection becomes live under a new version: follow it
        // to its consumer.
        let mut version_check = tokio::time::interval(Duration::from_secs(1));
        loop {
            let next = tokio::select! {
                next = messages.next() => next,
                _ = version_check.tick() => {
                    if self.followed(&durable) {
                        return Ok(Flow::Follow);
                    }
                    continue;
                }
                _ = shutdown.changed() => return Ok(Flow::Stop),
            };
            let Some(msg) = self.taken(next, &durable)? else { continue };
            if !self.batches() {
                self.handle(&msg).await;
                continue;
            }
            // What else arrives within the linger joins the batch; behind
            // a backlog (a rebuild, an outage: events still on the server,
            // or already pulled and waiting here) the batch is bigger and
            // fills at once. An error or the end of the stream closes it,
            // and is dealt with once the batch is.
            let most = match msg.info() {
                Ok(info) if info.pending as usize >= BATCH => catch_up,
                _ => BATCH,
            };
            let mut bytes = msg.payload.len();
            let mut batch = vec![msg];
            let mut closed_by = None;
            let linger = tokio::time::Instant::now() + LINGER;
            while batch.len() < catch_up && bytes < BATCH_BYTES {
                let next = if batch.len() < most {
                    tokio::time::timeout_at(linger, messages.next()).await.ok()
                } else {
                    // Past a live batch's size: only what is here already
                    // (outside the task's budget, which would end it early).
                    tokio::task::unconstrained(messages.next()).now_or_never()
                };
                match next {
                    Some(Some(Ok(msg))) => {
                        bytes += msg.payload.len();
                        batch.push(msg);
                    }
                    Some(ended) => {
                        closed_by = Some(ended);
                        break;
                    }
                    None => break,
                }
            }
            self.handle_batch(&batch.iter().collect::<Vec<_>>()).await;
            // A passing error is logged; a lost consumer is taken up anew.
            if let Some(ended) = closed_by {
                self.taken(ended, &durable)?;
            }
        }
    }

    /// Whether the projection's live version moved on from `durable`
    /// (a rebuild switched): its consumer is then followed.
    pub(super) fn followed(&self, durable: &str) -> bool {
        let moved = self.durable_name() != durable;
        if moved {
            tracing::info!(from = %durable, to = %self.durable_name(), "projector follows the new live version");
        }
        moved
    }

    /// The message a consumer stream's next item holds; `None` after a
    /// passing error (logged), an error when the consumer must be taken up
    /// afresh (the pull went unanswered: its leader was not there yet, or
    /// was lost, and the stream may never pull again) or the stream ended.
    pub(super) fn taken(&self, next: Option<Result<jetstream::Message, pull::MessagesError>>, durable: &str) -> anyhow::Result<Option<jetstream::Message>> {
        match next {
            Some(Ok(msg)) => Ok(Some(msg)),
            Some(Err(e)) if lost(&e) => anyhow::bail!("consumer {durable}: {e}"),
            Some(Err(e)) => {
                tracing::warn!(projection = %self.label(), error = %e, "consumer stream error");
                Ok(None)
            }
            None => anyhow::bail!("consumer {durable} stream ended"),
        }
    }

    /// Whether events are applied in batches: order-free projections on
    /// the log (an ordered one has one event in flight anyway).
    fn batches(&self) -> bool {
        matches!(self.feed, Feed::Log { .. }) && !self.projection.ordered()
    }

    /// Applies `msgs` together ([`project_batch`]); an undecodable one goes
    /// through [`Projector::handle`]. A batch holding a poison event is
    /// applied again in parts of [`BATCH`], and only the part holding it
    /// one event at a time (which parks that one).
    async fn handle_batch(&self, msgs: &[&jetstream::Message]) {
        let label = self.label();
        let mut decoded = Vec::with_capacity(msgs.len());
        let mut lag = 0;
        for &msg in msgs {
            let (seq, pending) = msg.info().map(|i| (i.stream_sequence, i.pending)).unwrap_or((0, 0));
            lag = pending;
            match Envelope::decode(&msg.payload) {
                Ok(env) => decoded.push((env, seq, msg)),
                Err(_) => self.handle(msg).await,
            }
        }
        if decoded.is_empty() {
            return;
        }
        let events: Vec<(&Envelope, u64)> = decoded.iter().map(|(env, seq, _)| (env, *seq)).collect();
        let work = project_batch(self.projection.as_ref(), &label, &events, lag, &self.metrics);
        let next = self.keep_alive(work, decoded.iter().map(|(_, _, msg)| *msg)).await;
        let ack = match next {
            BatchNext::Done => AckKind::Ack,
            BatchNext::RetryAfter(delay) => AckKind::Nak(Some(delay)),
            BatchNext::OneByOne => {
                // The batch's other events wait their turn: keep them too.
                let one_by_one = async {
                    if decoded.len() > BATCH {
                        let msgs: Vec<&jetstream::Message> = decoded.iter().map(|(_, _, msg)| *msg).collect();
                        for part in msgs.chunks(BATCH) {
                            Box::pin(self.handle_batch(part)).await;
                        }
                        return;
                    }
                    for (_, _, msg) in &decoded {
                        self.handle(msg).await;
                    }
                };
                self.keep_alive(one_by_one, decoded.iter().map(|(_, _, msg)| *msg)).await;
                return;
            }
        };
        for (_, seq, msg) in &decoded {
            if let Err(e) = msg.ack_with(ack).await {
                tracing::warn!(projection = %label, seq, error = %e, "acknowledgement lost; the event will be redelivered and re-applied (idempotent)");
            }
        }
    }

    /// Runs `work` on `msgs`, telling JetStream every [`PROGRESS_EVERY`]
    /// that they are still being worked on (a big room's fan-out, a slow
    /// store), so the ack wait does not hand them to another node; not
    /// forever: work stuck longer than [`PROGRESS_AT_MOST`] lets them go
    /// back to the cluster after the ack wait.
    async fn keep_alive<'m, T>(&self, work: impl std::future::Future<Output = T>, msgs: impl Iterator<Item = &'m jetstream::Message> + Clone) -> T {
        tokio::pin!(work);
        let mut progress = tokio::time::interval(PROGRESS_EVERY);
        progress.tick().await;
        let started = tokio::time::Instant::now();
        loop {
            tokio::select! {
                done = &mut work => return done,
                _ = progress.tick(), if started.elapsed() < PROGRESS_AT_MOST => {
                    for msg in msgs.clone() {
                        let _ = msg.ack_with(AckKind::Progress).await;
                    }
                }
            }
        }
    }

    async fn handle(&self, msg: &jetstream::Message) {
        let (seq, pending) = msg.info().map(|i| (i.stream_sequence, i.pending)).unwrap_or((0, 0));
        let decoded = Envelope::decode(&msg.payload).map_err(|e| e.to_string());
        let label = self.label();
        let work = project(self.projection.as_ref(), &label, decoded.as_ref().map_err(Clone::clone), seq, &msg.payload, pending, self, &self.metrics);
        let next = self.keep_alive(work, std::iter::once(msg)).await;
        let ack = match next {
            Next::Done => AckKind::Ack,
            Next::RetryAfter(delay) => AckKind::Nak(Some(delay)),
        };
        if let Err(e) = msg.ack_with(ack).await {
            tracing::warn!(projection = %label, seq, error = %e, "acknowledgement lost; the event will be redelivered and re-applied (idempotent)");
        }
    }
}

/// A poison event goes to the parked stream, on `<prefix>.parked.<projection>`,
/// with its log sequence and the reason in headers.
#[async_trait]
impl Parking for Projector {
    async fn park(&self, projection: &str, seq: u64, reason: &str, payload: &[u8]) -> Result<bool, String> {
        let mut headers = HeaderMap::new();
        headers.insert("Natter-Stream-Seq", seq.to_string().as_str());
        headers.insert("Natter-Reason", reason.replace(['\r', '\n'], " ").as_str());
        self.js
            .publish_with_headers(parked_subject(&self.prefix, projection), headers, bytes::Bytes::copy_from_slice(payload))
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        Ok(true)
    }
}

/// A consumer stream error after which the stream may pull no more.
fn lost(e: &async_nats::jetstream::consumer::pull::MessagesError) -> bool {
    use async_nats::jetstream::consumer::pull::MessagesErrorKind as Kind;
    matches!(e.kind(), Kind::NoResponders | Kind::MissingHeartbeat | Kind::ConsumerDeleted | Kind::Pull)
}
