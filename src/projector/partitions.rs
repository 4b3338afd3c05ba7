//! The partitioned feed of ordered projections (the push fan-out) in the
//! distributed mode.
//!
//! An ordered projection needs each conversation's and each room's events
//! one at a time, in log order; it does not need the whole log in one line.
//! So it does not consume the log directly: `<STREAM>_FANOUT`, a work-queue
//! stream, sources the log's direct-conversation, room and membership
//! subjects, and NATS's subject transforms put each into one of
//! [`PARTITIONS`] partitions by the conversation's user pair or the room id:
//!
//! ```text
//! <prefix>.ev.dm.<lo>.<hi>          → <prefix>.fan.<p(lo,hi)>.dm.<lo>.<hi>
//! <prefix>.ev.room.<room>           → <prefix>.fan.<p(room)>.room.<room>
//! <prefix>.ev.member.<room>.<user>  → <prefix>.fan.<p(room)>.member.<room>.<user>
//! ```
//!
//! A room's messages and its membership changes land in the same partition,
//! in log order. Each partition has its own durable consumer, and every node
//! pulls from every partition: a busy room holds up only its own partition,
//! the partitions are fanned out at once, and capacity grows with nodes.
//!
//! **One node works a partition at a time, in batches.** The consumer pins
//! one puller (NATS priority group [`GROUP`], policy `pinned_client`) and
//! hands it up to [`IN_HANDS`] events at once; the other nodes wait on
//! standby and take the pin when the pinned one stops pulling for
//! [`PINNED_FOR`] (it crashed, or lost NATS). The pinned node fans out what
//! it holds in log order, stores the deliveries together (one window of
//! publishes, not a round trip per event) and acknowledges them: a burst of
//! a thousand joins is a few batches, not a thousand turns of the cluster.
//! A pin moves without waiting for the old holder's events, so a node that
//! has just been pinned first waits until every event pending on the
//! consumer is in its own hands ([`Projector::consume_partition`]): the old
//! holder's events either were fanned out and acknowledged, or come back
//! to it (the ack wait, 5 s) to go first. Which node holds which
//! partition's pin is whichever pulled first: pins spread over the nodes
//! at random, and a node that joins later gets pins as others leave.
//! Sourcing keeps the log's order and says each event's log sequence in the
//! `Nats-Stream-Source` header ([`origin_seq`]); an event leaves the stream
//! once its partition acknowledged it. Account events make no deliveries
//! and are not sourced. NATS 2.15 or newer keeps a source's position across
//! server restarts even when the feed is empty (older servers would source
//! again from the feed's start): [`crate::log::nats::NatsLog::connect`]
//! refuses older servers.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::consumer::{AckPolicy, PriorityPolicy, pull};
use async_nats::jetstream::{self, AckKind, stream};
use futures::{FutureExt, StreamExt};
use natter_events::Envelope;
use tokio::sync::watch;

use super::jetstream::{Flow, Projector};
use super::{BatchNext, Next, consumer_name, project, project_batch};
use crate::metrics::Metrics;

/// Partitions of the fan-out. Fixed: the transforms of an existing stream
/// decide where events go, so changing it needs a new stream.
pub const PARTITIONS: u32 = 16;
/// The priority group every node pulls a partition in.
pub const GROUP: &str = "fanout";
/// Most events of a partition in one node's hands (its consumer's max
/// ack pending): the largest batch.
pub const IN_HANDS: usize = 256;
/// How long a pinned node keeps a partition without pulling: after that
/// another node takes it over (with the events the first one held, once
/// their ack wait has passed).
pub const PINNED_FOR: Duration = Duration::from_secs(5);
/// A pull's expiry: a pinned node renews its pin (by pulling again) well
/// within [`PINNED_FOR`].
const PULL_EXPIRES: Duration = Duration::from_secs(2);
/// An event fanned out and unacknowledged this long goes to another node.
const ACK_WAIT: Duration = Duration::from_secs(5);
/// Stream sequences a node remembers having acknowledged: an event
/// redelivered to it before its acknowledgement was processed is
/// acknowledged again, not fanned out a second time.
const ACKED_KEPT: usize = 4096;

/// The partitioned feed beside the log `stream`.
pub fn fanout_stream(stream: &str) -> String {
    format!("{stream}_FANOUT")
}

/// The subjects of partition `index`.
pub fn partition_subject(prefix: &str, index: u32) -> String {
    format!("{prefix}.fan.{index}.>")
}

/// The durable consumer of partition `index` of a projection.
pub fn partition_consumer(projection: &str, version: u32, index: u32) -> String {
    format!("{}-p{index}", consumer_name(projection, version))
}

/// The durable consumer of partition `index` (see the crate doc): pinned
/// to one node at a time, [`IN_HANDS`] events in its hands.
pub fn partition_config(durable: &str, prefix: &str, index: u32) -> pull::Config {
    pull::Config {
        durable_name: Some(durable.to_owned()),
        ack_policy: AckPolicy::Explicit,
        ack_wait: ACK_WAIT,
        max_ack_pending: IN_HANDS as i64,
        filter_subject: partition_subject(prefix, index),
        priority_policy: PriorityPolicy::PinnedClient,
        priority_groups: vec![GROUP.to_owned()],
        priority_timeout: PINNED_FOR,
        ..Default::default()
    }
}

/// How often a node looks at the pin of each partition it works (and gives
/// up one pin when it holds more than its share).
const BALANCE_EVERY: Duration = Duration::from_secs(15);

/// What a node knows of the fan-out partitions' pins, shared by its
/// partition projectors: which pins it holds, and how many pulls each
/// partition had waiting when last looked at (about one per node: the
/// pinned node's, and each standby node's).
#[derive(Debug, Default)]
pub struct Pins {
    held: AtomicU32,
    pullers: [AtomicUsize; PARTITIONS as usize],
}

impl Pins {
    /// Records what partition `index` showed; returns the pins this node
    /// holds and its share of the partitions.
    fn record(&self, index: u32, ours: bool, pullers: usize, metrics: &Metrics) -> (u32, u32) {
        let bit = 1 << index;
        let held = if ours { self.held.fetch_or(bit, Ordering::Relaxed) | bit } else { self.held.fetch_and(!bit, Ordering::Relaxed) & !bit };
        self.pullers[index as usize].store(pullers, Ordering::Relaxed);
        metrics.fanout_pinned(held.count_ones());
        // The fewest pulls any partition had: a lower bound on the nodes
        // (a node between two pulls is missed), so the share errs large.
        let nodes = self.pullers.iter().map(|p| p.load(Ordering::Relaxed)).filter(|&n| n > 0).min().unwrap_or(1).max(1) as u32;
        (held.count_ones(), PARTITIONS.div_ceil(nodes))
    }

    fn released(&self, index: u32, metrics: &Metrics) {
        let held = self.held.fetch_and(!(1 << index), Ordering::Relaxed) & !(1 << index);
        metrics.fanout_pinned(held.count_ones());
    }
}

/// The pin a partition's message was delivered under.
fn pin_of(msg: &jetstream::Message) -> Option<String> {
    Some(msg.headers.as_ref()?.get("Nats-Pin-Id")?.as_str().to_owned())
}

/// A partition's events in one node's hands, by stream sequence (a
/// redelivery replaces the copy held), and the ones it acknowledged lately.
#[derive(Default)]
struct Hands {
    held: BTreeMap<u64, jetstream::Message>,
    acked: HashSet<u64>,
    acked_order: VecDeque<u64>,
}

impl Hands {
    /// Takes `msg` in, unless it is one this node acknowledged already (a
    /// redelivery that crossed the acknowledgement): that one is
    /// acknowledged again.
    async fn take(&mut self, msg: jetstream::Message) {
        let Ok(seq) = msg.info().map(|i| i.stream_sequence) else {
            self.held.insert(0, msg);
            return;
        };
        if self.acked.contains(&seq) {
            let _ = msg.ack().await;
            return;
        }
        self.held.insert(seq, msg);
    }

    /// Remembers that these were acknowledged.
    fn acknowledged(&mut self, seqs: impl Iterator<Item = u64>) {
        for seq in seqs {
            if self.acked.insert(seq) {
                self.acked_order.push_back(seq);
            }
            if self.acked_order.len() > ACKED_KEPT
                && let Some(old) = self.acked_order.pop_front()
            {
                self.acked.remove(&old);
            }
        }
    }
}

impl Projector {
    /// Works partition `index` of the feed `stream` through its durable
    /// consumer: while this node holds the partition's pin, takes the
    /// events at hand (up to [`IN_HANDS`]), fans them out in log order and
    /// acknowledges them. Under a new pin (first pulls, or another node's
    /// pin expired), it first waits until every event pending on the
    /// consumer is in its hands, so none older is still out with another
    /// node. Stores that are down are retried with the events kept in hand
    /// (a nak would let the next events overtake them).
    pub(super) async fn consume_partition(&self, stream: &str, index: u32, pins: &Pins, durable: &str, shutdown: &mut watch::Receiver<bool>) -> anyhow::Result<Flow> {
        let stream = self.js.get_stream(stream).await?;
        let config = partition_config(durable, &self.prefix, index);
        let mut consumer = stream.get_or_create_consumer(durable, config.clone()).await?;
        let had = &consumer.cached_info().config;
        if had.priority_policy != config.priority_policy || had.max_ack_pending != config.max_ack_pending || had.priority_timeout != config.priority_timeout {
            // Made by an earlier natter (one event in flight, no pin).
            consumer = stream.update_consumer(config).await.with_context(|| format!("pinning the fan-out consumer {durable}"))?;
            tracing::info!(consumer = durable, "fan-out partition consumer now pins one node and hands it batches");
        }
        let mut messages = consumer.stream().group(GROUP).expires(PULL_EXPIRES).max_messages_per_batch(IN_HANDS).messages().await?;
        let mut hands = Hands::default();
        let mut verified: Option<String> = None;
        let mut version_check = tokio::time::interval(Duration::from_secs(1));
        // The partitions look at their pins at different times.
        let first = tokio::time::Instant::now() + BALANCE_EVERY + BALANCE_EVERY * index / PARTITIONS;
        let mut balance = tokio::time::interval_at(first, BALANCE_EVERY);
        loop {
            let next = tokio::select! {
                next = messages.next() => next,
                _ = version_check.tick() => {
                    if self.followed(durable) {
                        return Ok(Flow::Follow);
                    }
                    continue;
                }
                _ = balance.tick() => {
                    self.balance(&stream, &consumer, index, pins, verified.as_deref()).await;
                    continue;
                }
                _ = shutdown.changed() => return Ok(Flow::Stop),
            };
            let Some(msg) = self.taken(next, durable)? else { continue };
            hands.take(msg).await;
            // What else is here already joins the batch.
            while hands.held.len() < IN_HANDS {
                match messages.next().now_or_never() {
                    Some(next @ Some(Ok(_))) => hands.take(self.taken(next, durable)?.expect("a message")).await,
                    _ => break,
                }
            }
            let pin = hands.held.values().next_back().and_then(pin_of);
            if pin.is_none() || pin != verified {
                let Some(pin) = self.await_older(&consumer, &mut messages, &mut hands, durable, shutdown).await? else {
                    return Ok(Flow::Stop);
                };
                verified = pin;
            }
            let batch: Vec<jetstream::Message> = std::mem::take(&mut hands.held).into_values().collect();
            if batch.is_empty() {
                continue;
            }
            self.fan_out_in_order(&batch).await;
            for msg in &batch {
                if let Err(e) = msg.ack().await {
                    tracing::warn!(projection = %self.label(), error = %e, "acknowledgement lost; the event will be redelivered and fanned out again (deliveries are deduplicated)");
                }
            }
            hands.acknowledged(batch.iter().filter_map(|m| m.info().ok().map(|i| i.stream_sequence)));
        }
    }

    /// Gives up the partition's pin if this node holds it (it fanned out
    /// events under `pin`, and the consumer still names that pin) and
    /// holds more pins than its share of the partitions: the pin goes to
    /// another node's waiting pull (or back to this one), so pins spread
    /// over the nodes, including ones started after the others. Errors
    /// only postpone this to the next look.
    async fn balance(&self, stream: &stream::Stream, consumer: &jetstream::consumer::Consumer<pull::Config>, index: u32, pins: &Pins, pin: Option<&str>) {
        let Ok(info) = consumer.get_info().await else { return };
        let pinned = info.priority_groups.iter().find(|g| g.group == GROUP).and_then(|g| g.pinned_client_id.as_deref());
        let ours = pin.is_some() && pinned == pin;
        let (held, share) = pins.record(index, ours, info.num_waiting, &self.metrics);
        if ours && held > share && stream.unpin_consumer(&info.name, GROUP).await.is_ok() {
            pins.released(index, &self.metrics);
            tracing::info!(partition = index, held, share, "gave up a fan-out partition's pin: this node held more than its share, and a node on standby takes it over");
        }
    }

    /// Waits until every event pending on the partition's consumer is in
    /// `hands` (taking in what arrives meanwhile, and keeping what it holds
    /// from going back to the cluster); returns the pin the newest held
    /// event came under, `None` at shutdown.
    async fn await_older(
        &self,
        consumer: &jetstream::consumer::Consumer<pull::Config>,
        messages: &mut pull::Stream,
        hands: &mut Hands,
        durable: &str,
        shutdown: &mut watch::Receiver<bool>,
    ) -> anyhow::Result<Option<Option<String>>> {
        let started = tokio::time::Instant::now();
        let mut progressed = started;
        let mut wait = Duration::from_millis(10);
        let mut warned = false;
        loop {
            let pending = consumer.get_info().await?.num_ack_pending;
            if pending <= hands.held.len() {
                return Ok(Some(hands.held.values().next_back().and_then(pin_of)));
            }
            if progressed.elapsed() >= super::jetstream::PROGRESS_EVERY {
                for msg in hands.held.values() {
                    let _ = msg.ack_with(AckKind::Progress).await;
                }
                progressed = tokio::time::Instant::now();
            }
            if !warned && started.elapsed() > 2 * ACK_WAIT {
                warned = true;
                tracing::warn!(projection = %self.label(), pending, held = hands.held.len(), "fan-out partition waits for events another node holds (they come back after the ack wait, or when that node acknowledges them)");
            }
            let until = tokio::time::Instant::now() + wait;
            loop {
                tokio::select! {
                    next = messages.next() => {
                        if let Some(msg) = self.taken(next, durable)? {
                            hands.take(msg).await;
                        }
                    }
                    _ = tokio::time::sleep_until(until) => break,
                    _ = shutdown.changed() => return Ok(None),
                }
            }
            wait = (wait * 2).min(Duration::from_millis(200));
        }
    }

    /// Fans out `batch` (consecutive events of one partition, in log
    /// order) together; a poison batch one event at a time. A store that
    /// is down is retried until it answers: the events stay in hand.
    async fn fan_out_in_order(&self, batch: &[jetstream::Message]) {
        let label = self.label();
        let lag = batch.last().and_then(|m| m.info().ok()).map_or(0, |i| i.pending);
        let decoded: Vec<(u64, Result<Envelope, String>)> = batch.iter().map(decode).collect();
        let all_decoded = decoded.iter().all(|(_, d)| d.is_ok());
        if all_decoded {
            let events: Vec<(&Envelope, u64)> = decoded.iter().map(|(seq, env)| (env.as_ref().expect("decoded"), *seq)).collect();
            loop {
                let work = project_batch(self.projection.as_ref(), &label, &events, lag, &self.metrics);
                match self.keep_alive(work, batch.iter()).await {
                    BatchNext::Done => return,
                    BatchNext::RetryAfter(delay) => self.hold(batch, delay).await,
                    BatchNext::OneByOne => break,
                }
            }
        }
        for ((seq, env), msg) in decoded.iter().zip(batch) {
            loop {
                let work = project(self.projection.as_ref(), &label, env.as_ref().map_err(Clone::clone), *seq, &msg.payload, lag, self, &self.metrics);
                match self.keep_alive(work, batch.iter()).await {
                    Next::Done => break,
                    Next::RetryAfter(delay) => self.hold(batch, delay).await,
                }
            }
        }
    }

    /// Keeps `batch` in hand for `delay` (it stays this node's).
    async fn hold(&self, batch: &[jetstream::Message], delay: Duration) {
        for msg in batch {
            let _ = msg.ack_with(AckKind::Progress).await;
        }
        tokio::time::sleep(delay).await;
    }
}

/// A feed message's log sequence and event (or why it has none).
fn decode(msg: &jetstream::Message) -> (u64, Result<Envelope, String>) {
    match origin_seq(msg.headers.as_ref()) {
        Some(seq) => (seq, Envelope::decode(&msg.payload).map_err(|e| e.to_string())),
        None => {
            let at = msg.info().map_or(0, |i| i.stream_sequence);
            (0, Err(format!("fan-out feed message {at} has no Nats-Stream-Source log sequence")))
        }
    }
}

/// The log sequence of a sourced event, from its `Nats-Stream-Source`
/// header (`<stream> <seq> …`).
pub fn origin_seq(headers: Option<&async_nats::HeaderMap>) -> Option<u64> {
    headers?.get("Nats-Stream-Source")?.as_str().split(' ').nth(1)?.parse().ok()
}

/// Makes sure the partitioned feed of the log `stream` exists, with
/// `replicas` copies. A feed created now starts at log sequence `start`
/// (default: the first event).
/// Two nodes creating it at once with different starts both succeed: the
/// first one's feed stands.
pub async fn ensure_feed(js: &jetstream::Context, stream: &str, prefix: &str, start: Option<u64>, replicas: usize) -> anyhow::Result<()> {
    let name = fanout_stream(stream);
    if js.get_stream(&name).await.is_ok() {
        return Ok(());
    }
    let n = PARTITIONS;
    let transform = |source: String, destination: String| stream::SubjectTransform { source, destination };
    let transforms = vec![
        transform(format!("{prefix}.ev.dm.*.*"), format!("{prefix}.fan.{{{{partition({n},1,2)}}}}.dm.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}")),
        transform(format!("{prefix}.ev.room.*"), format!("{prefix}.fan.{{{{partition({n},1)}}}}.room.{{{{wildcard(1)}}}}")),
        transform(
            format!("{prefix}.ev.member.*.*"),
            format!("{prefix}.fan.{{{{partition({n},1)}}}}.member.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}"),
        ),
    ];
    let created = js
        .get_or_create_stream(stream::Config {
        name: name.clone(),
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        // Made with its final replicas: a sourcing stream is not moved to
        // another group right after it starts sourcing.
        num_replicas: replicas.max(1),
        sources: Some(vec![stream::Source {
            name: stream.to_owned(),
            start_sequence: start,
            subject_transforms: transforms,
            ..Default::default()
        }]),
        ..Default::default()
    })
        .await;
    match created {
        Ok(_) => Ok(()),
        Err(_) if js.get_stream(&name).await.is_ok() => Ok(()), // another node made it meanwhile
        Err(e) => Err(e).with_context(|| format!("creating the fan-out feed {name}")),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use async_trait::async_trait;
    use natter_events::{Event, RoomMessageSent};
    use natter_projections::{ApplyError, Projection};
    use tokio::sync::Semaphore;

    use super::*;
    use crate::metrics::Metrics;
    use crate::projector::jetstream::Feed;

    /// Records the room messages' seqs in the order applied, by every
    /// node; a node with a gate applies nothing until the gate opens.
    struct Recorder {
        applied: Arc<Mutex<Vec<u64>>>,
        gate: Option<Arc<Semaphore>>,
        /// Told when this node holds a batch (before the gate).
        holding: Arc<tokio::sync::Notify>,
    }

    #[async_trait]
    impl Projection for Recorder {
        fn name(&self) -> &'static str {
            "order-test"
        }
        fn version(&self) -> u32 {
            1
        }
        fn ordered(&self) -> bool {
            true
        }
        async fn apply(&self, env: &Envelope) -> Result<(), ApplyError> {
            self.holding.notify_one();
            if let Some(gate) = &self.gate {
                let _open = gate.acquire().await.expect("gate");
            }
            if let Event::RoomMessageSent(e) = &env.event {
                self.applied.lock().unwrap().push(e.seq);
            }
            Ok(())
        }
    }

    /// A node stuck on a partition's events past its pin (alive, so its
    /// events stay its own): the node pinned next gets the later events
    /// and fans out none of them before the stuck node's, which go first.
    /// Without the wait for older events, the second node would fan out
    /// 6–10 while 1–5 are still out.
    #[tokio::test]
    async fn a_new_pin_waits_for_the_events_an_old_one_still_holds() {
        let url = std::env::var("NATTER_NATS_URL").expect("NATTER_NATS_URL (scripts/test.sh starts NATS and sets it)");
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let (stream, prefix) = (format!("ORDER{tag}"), format!("o{tag}"));
        let node = || async { jetstream::new(async_nats::connect(&url).await.expect("NATS")) };
        let js = node().await;
        js.create_stream(stream::Config { name: stream.clone(), subjects: vec![format!("{prefix}.ev.>")], ..Default::default() }).await.unwrap();
        ensure_feed(&js, &stream, &prefix, None, 1).await.unwrap();
        let subject = natter_events::subjects::room(&prefix, "r1");
        let publish = |from: u64, to: u64| {
            let (js, subject) = (js.clone(), subject.clone());
            async move {
                for seq in from..=to {
                    let e = RoomMessageSent { message_id: format!("m{seq}"), room_id: "r1".into(), sender_id: "amy".into(), client_msg_id: None, message: Some("hi".into()), attachment: None, seq, reply_to: None };
                    let env = Envelope::new(format!("c{seq}"), subject.clone(), seq, Event::RoomMessageSent(e));
                    js.publish(subject.clone(), env.encode().into()).await.unwrap().await.unwrap();
                }
            }
        };
        publish(1, 5).await;
        // The partition the room's events are in.
        let feed = fanout_stream(&stream);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let index = loop {
            let s = js.get_stream(&feed).await.unwrap();
            let info = s.info_with_subjects(format!("{prefix}.fan.>")).await.unwrap();
            let subjects: Vec<(String, usize)> = futures::TryStreamExt::try_collect(info).await.unwrap();
            let found = subjects.into_iter().find_map(|(subject, _)| subject.split('.').nth(2).and_then(|p| p.parse::<u32>().ok()));
            if let Some(index) = found {
                break index;
            }
            assert!(std::time::Instant::now() < deadline, "the feed never sourced the room's events");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let applied = Arc::new(Mutex::new(Vec::new()));
        let (shutdown_tx, shutdown) = watch::channel(false);
        let start = |gate: Option<Arc<Semaphore>>, js: jetstream::Context| {
            let holding = Arc::new(tokio::sync::Notify::new());
            let projection = Arc::new(Recorder { applied: applied.clone(), gate, holding: holding.clone() });
            let projector = Projector { js, feed: Feed::Partition { stream: feed.clone(), index, pins: Arc::default() }, prefix: prefix.clone(), projection, metrics: Arc::new(Metrics::default()) };
            (tokio::spawn(projector.run(shutdown.clone())), holding)
        };
        // Node A takes the pin and 1–5, and is stuck on them.
        let consumer = partition_consumer("order-test", 1, index);
        let pinned = || async {
            let info = js.get_stream(&feed).await.unwrap().get_consumer::<pull::Config>(&consumer).await.unwrap().get_info().await.unwrap();
            (info.priority_groups.first().and_then(|g| g.pinned_client_id.clone()), info.num_ack_pending)
        };
        let gate = Arc::new(Semaphore::new(0));
        let (a, a_holding) = start(Some(gate.clone()), node().await);
        tokio::time::timeout(Duration::from_secs(10), a_holding.notified()).await.expect("node A got the events");
        let (a_pin, _) = pinned().await;
        assert!(a_pin.is_some(), "A holds the pin");
        // Node B waits on standby; 6–10 come.
        let (b, _) = start(None, node().await);
        publish(6, 10).await;
        // A's pin expires (it does not pull while stuck) and B is handed 6–10.
        let deadline = std::time::Instant::now() + PINNED_FOR * 4;
        loop {
            let (pin, pending) = pinned().await;
            // (Handed 6–10: all ten pending, or some fanned out already.)
            if pin.is_some() && pin != a_pin && (pending == 10 || !applied.lock().unwrap().is_empty()) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "B was never handed 6–10 (pin {pin:?}, pending {pending})");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // B fans out nothing while A holds 1–5.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert_eq!(*applied.lock().unwrap(), Vec::<u64>::new(), "B went ahead of the events A holds");
        gate.add_permits(100);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while applied.lock().unwrap().len() < 10 {
            assert!(std::time::Instant::now() < deadline, "not all fanned out: {:?}", applied.lock().unwrap());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(*applied.lock().unwrap(), (1..=10).collect::<Vec<u64>>());
        shutdown_tx.send(true).unwrap();
        let _ = (a.await, b.await);
        let _ = js.delete_stream(&feed).await;
        let _ = js.delete_stream(&stream).await;
    }

    #[test]
    fn the_log_sequence_comes_from_the_source_header() {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Nats-Stream-Source", "NATTER 1234 t.ev.dm.*.*\u{c}t.ev.room.* t.fan.x t.ev.dm.a.b OURchBd0");
        assert_eq!(origin_seq(Some(&h)), Some(1234));
        assert_eq!(origin_seq(None), None);
        assert_eq!(partition_consumer("push-fanout", 1, 7), "push-fanout-v1-p7");
        assert_eq!(partition_subject("t", 3), "t.fan.3.>");
    }
}
