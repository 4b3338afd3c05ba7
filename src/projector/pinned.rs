//! How a node works a fan-out partition (see [`super::partitions`]): one
//! node at a time, in batches, in log order.
//!
//! - **Pinned.** A partition's durable consumer pins one puller (NATS
//!   priority group [`GROUP`], policy `pinned_client`) and hands it up to
//!   [`IN_HANDS`] events; the other nodes' pulls wait on standby. A node
//!   keeps pulling while it works a batch, so it keeps its pin however
//!   long the batch takes; when it stops pulling for [`PINNED_FOR`] (it
//!   crashed, or lost NATS), a standby node is pinned instead.
//! - **Batches.** The pinned node takes the events at hand, fans them out
//!   in log order (their deliveries stored in windows of publishes, not a
//!   round trip per event) and acknowledges them: a burst of a thousand
//!   joins is a few batches, not a thousand turns of the cluster. A store
//!   that is down is retried with the events kept in hand (a nak would let
//!   the next ones overtake them); a batch that has not finished after
//!   [`WORK_AT_MOST`] is let go (its events return after their ack wait).
//! - **No event before an older one.** NATS moves a pin without waiting
//!   for the events the old holder still has, and redelivers an event
//!   whose holder went quiet to whoever is pinned. So a node fans out only
//!   the run of the partition's oldest events left in the work queue that
//!   are all in its hands ([`Projector::ready`]: one read per event); an
//!   older event out with another node is either fanned out and
//!   acknowledged there (and leaves the queue) or comes back after its ack
//!   wait, and goes first. Once a node found nothing pending outside its
//!   hands under the consumer's current pin, what comes under that pin
//!   (only to it) goes out as it comes, with no reads.
//! - **Spread.** Whichever node pulls first gets a pin; every
//!   [`BALANCE_EVERY`] a node holding more pins than its share gives one
//!   up to a standby node (`natter_fanout_partitions_pinned`).
//!
//! What remains: a node frozen (not crashed) for longer than the ack wait
//! while holding events goes on with them when it wakes, while the node
//! pinned meanwhile fans out their copies: both in log order, so each
//! chain still gets each delivery once and in order, as long as the inbox
//! deduplicates (its duplicate window, 2 minutes). A batch retried after a
//! store outage longer than that stores again the deliveries of the events
//! before the failed one.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::consumer::{AckPolicy, PriorityPolicy, pull};
use async_nats::jetstream::{self, AckKind, stream};
use futures::{FutureExt, StreamExt};
use natter_events::Envelope;
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};

use super::jetstream::{Flow, PROGRESS_EVERY, Projector};
use super::partitions::{PARTITIONS, Pins, origin_seq, partition_subject};
use super::{BatchNext, Next, project, project_batch};
use crate::metrics::Metrics;

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
/// An event handed out and neither acknowledged nor kept (progress) this
/// long goes to another node.
const ACK_WAIT: Duration = Duration::from_secs(5);
/// An event in hand unkept this long may have been handed to another
/// node (the ack wait, less a margin for its time on the way).
const SUSPECT: Duration = Duration::from_secs(4);
/// Most reads of the queue one look of [`Projector::ready`] makes: enough
/// for a full hand, the events this node acknowledged that are not gone
/// yet, and the first one beyond.
const READY_READS: usize = IN_HANDS + 16;
/// How long a batch may take before its events are let go.
const WORK_AT_MOST: Duration = Duration::from_secs(120);
/// Stream sequences a node remembers having acknowledged: an event
/// redelivered to it before its acknowledgement was processed is
/// acknowledged again, not fanned out a second time.
const ACKED_KEPT: usize = 4096;
/// How often a node looks at the pin of each partition it works (and gives
/// up one pin when it holds more than its share).
const BALANCE_EVERY: Duration = Duration::from_secs(15);

/// The durable consumer of partition `index`: pinned to one node at a
/// time, [`IN_HANDS`] events in its hands.
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

/// The pin a partition's message was delivered under (the server's
/// header is the last one).
fn pin_of(msg: &jetstream::Message) -> Option<&str> {
    Some(msg.headers.as_ref()?.get_last("Nats-Pin-Id")?.as_str())
}

/// An event in hand, and since when its ack wait runs.
struct Held {
    msg: jetstream::Message,
    kept: Instant,
}

/// A partition's events in one node's hands, by stream sequence (a
/// redelivery replaces the copy held), and the ones it acknowledged lately.
#[derive(Default)]
struct Hands {
    held: BTreeMap<u64, Held>,
    acked: HashSet<u64>,
    acked_order: VecDeque<u64>,
}

impl Hands {
    /// Takes `msg` in, unless it is one this node acknowledged already (a
    /// redelivery that crossed the acknowledgement): that one is
    /// acknowledged again.
    async fn take(&mut self, msg: jetstream::Message, label: &str) {
        let Ok(seq) = msg.info().map(|i| i.stream_sequence) else {
            tracing::error!(projection = label, subject = %msg.subject, "a fan-out feed message without JetStream metadata: dropped");
            let _ = msg.ack_with(AckKind::Term).await;
            return;
        };
        if self.acked.contains(&seq) {
            let _ = msg.ack().await;
            return;
        }
        self.held.insert(seq, Held { msg, kept: Instant::now() });
    }

    /// Whether every event in hand came under `pin`.
    fn all_under(&self, pin: Option<&str>) -> bool {
        pin.is_some() && self.held.values().all(|h| pin_of(&h.msg) == pin)
    }

    /// Keeps the events in hand that have waited a while (restarts their
    /// ack wait); not those that may have been handed to another node
    /// already ([`Hands::suspect`]).
    async fn keep(&mut self, older_than: Duration) {
        for h in self.held.values_mut().filter(|h| h.kept.elapsed() >= older_than && h.kept.elapsed() < SUSPECT) {
            let _ = h.msg.ack_with(AckKind::Progress).await;
            h.kept = Instant::now();
        }
    }

    /// Whether an event in hand has gone unkept long enough to have been
    /// handed to another node (this node was frozen, or cut off): then
    /// what is in hand is checked against the queue before it goes out.
    fn suspect(&self) -> bool {
        self.held.values().any(|h| h.kept.elapsed() >= SUSPECT)
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

/// The pin of partition `index` this node holds while it works it; no
/// longer held once the partition's consumer loop ends.
struct Holding<'a> {
    pins: &'a Pins,
    index: u32,
    metrics: &'a Metrics,
}

impl Drop for Holding<'_> {
    fn drop(&mut self) {
        self.pins.set(self.index, false, self.metrics);
    }
}

impl Projector {
    /// Works partition `index` of the feed `stream` through its durable
    /// consumer (see the module doc): takes the events at hand, fans out
    /// those no older event outside its hands can precede, in log order,
    /// while pulling on, and acknowledges them.
    pub(super) async fn consume_partition(&self, stream: &str, index: u32, pins: &Pins, durable: &str, shutdown: &mut watch::Receiver<bool>) -> anyhow::Result<Flow> {
        let stream = self.js.get_stream(stream).await?;
        let config = partition_config(durable, &self.prefix, index);
        let mut consumer = stream.get_or_create_consumer(durable, config.clone()).await?;
        let had = &consumer.cached_info().config;
        if had.priority_policy != config.priority_policy
            || had.priority_groups != config.priority_groups
            || had.max_ack_pending != config.max_ack_pending
            || had.priority_timeout != config.priority_timeout
            || had.ack_wait != config.ack_wait
        {
            // Made by an earlier natter (one event in flight, no pin).
            consumer = stream.update_consumer(config).await.with_context(|| format!("pinning the fan-out consumer {durable}"))?;
            tracing::info!(consumer = durable, "fan-out partition consumer now pins one node and hands it batches");
        }
        let mut messages = consumer.stream().group(GROUP).expires(PULL_EXPIRES).max_messages_per_batch(IN_HANDS).messages().await?;
        let label = self.label();
        let _holding = Holding { pins, index, metrics: &self.metrics };
        let mut hands = Hands::default();
        // A pin under which nothing was pending outside this node's hands:
        // whatever comes under it may go out as it comes.
        let mut verified: Option<String> = None;
        // The pin the last batch fanned out came under.
        let mut last_pin: Option<String> = None;
        let mut version_check = tokio::time::interval(Duration::from_secs(1));
        version_check.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // The partitions look at their pins at different times.
        let first = Instant::now() + BALANCE_EVERY + BALANCE_EVERY * index / PARTITIONS;
        let mut balance = tokio::time::interval_at(first, BALANCE_EVERY);
        balance.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut wait = Duration::from_millis(5);
        // Since when this node has held events it may not fan out yet, and
        // whether the operator was told.
        let mut blocked: Option<(Instant, bool)> = None;
        loop {
            // The periodic looks, busy or not.
            if version_check.tick().now_or_never().is_some() && self.followed(durable) {
                return Ok(Flow::Follow);
            }
            if balance.tick().now_or_never().is_some() {
                self.balance(&stream, &consumer, index, pins, last_pin.as_deref()).await;
            }
            if hands.held.is_empty() {
                tokio::select! {
                    next = messages.next() => {
                        if let Some(msg) = self.taken(next, durable)? {
                            hands.take(msg, &label).await;
                        }
                    }
                    _ = version_check.tick() => {
                        if self.followed(durable) {
                            return Ok(Flow::Follow);
                        }
                        continue;
                    }
                    _ = balance.tick() => {
                        self.balance(&stream, &consumer, index, pins, last_pin.as_deref()).await;
                        continue;
                    }
                    _ = shutdown.changed() => return Ok(Flow::Stop),
                }
            }
            // What else is here already joins the batch.
            while let Some(next) = messages.next().now_or_never() {
                if let Some(msg) = self.taken(next, durable)? {
                    hands.take(msg, &label).await;
                }
            }
            if hands.held.is_empty() {
                continue;
            }
            let batch: Vec<Held> = if hands.all_under(verified.as_deref()) && !hands.suspect() {
                std::mem::take(&mut hands.held).into_values().collect()
            } else {
                self.ready(&stream, &consumer, index, &mut hands, &mut verified).await?
            };
            if batch.is_empty() {
                // An older event is out with another node: wait for it to be
                // fanned out there, or to come back here.
                let (since, told) = blocked.get_or_insert((Instant::now(), false));
                if !*told && since.elapsed() > 2 * (ACK_WAIT + PINNED_FOR) {
                    *told = true;
                    tracing::warn!(projection = %label, held = hands.held.len(), waited_s = since.elapsed().as_secs(), "fan-out partition waits for an older event another node holds: it goes on once that node fans it out or the event comes back (ack wait 5 s); if this lasts, look for a node that is stuck but still connected to NATS");
                }
                hands.keep(PROGRESS_EVERY / 2).await;
                let until = Instant::now() + wait;
                wait = (wait * 2).min(Duration::from_millis(50));
                loop {
                    tokio::select! {
                        next = messages.next() => {
                            if let Some(msg) = self.taken(next, durable)? {
                                hands.take(msg, &label).await;
                            }
                        }
                        _ = tokio::time::sleep_until(until) => break,
                        _ = shutdown.changed() => return Ok(Flow::Stop),
                    }
                }
                continue;
            }
            wait = Duration::from_millis(5);
            if let Some((since, true)) = blocked.take() {
                tracing::info!(projection = %label, waited_s = since.elapsed().as_secs(), "fan-out partition goes on: the older events it waited for were fanned out");
            }
            // Events that waited in hand are kept before the work starts.
            let waited = async {
                for h in batch.iter().filter(|h| h.kept.elapsed() >= PROGRESS_EVERY / 2) {
                    let _ = h.msg.ack_with(AckKind::Progress).await;
                }
            };
            let _ = tokio::time::timeout(PROGRESS_EVERY / 2, waited).await;
            // Work the batch while pulling on (which keeps the pin) and
            // keeping every event in hand.
            let work = self.fan_out_in_order(&batch);
            tokio::pin!(work);
            let started = Instant::now();
            let give_up = tokio::time::sleep_until(started + WORK_AT_MOST);
            tokio::pin!(give_up);
            let mut keep = tokio::time::interval_at(started + PROGRESS_EVERY / 2, PROGRESS_EVERY / 2);
            keep.set_missed_tick_behavior(MissedTickBehavior::Delay);
            let mut batch_kept = started;
            loop {
                tokio::select! {
                    () = &mut work => break,
                    next = messages.next() => {
                        if let Some(msg) = self.taken(next, durable)? {
                            hands.take(msg, &label).await;
                        }
                    }
                    _ = keep.tick() => {
                        // Bounded: NATS being away must not hold up the
                        // other arms (shutdown, giving up).
                        let kept = async {
                            if batch_kept.elapsed() >= PROGRESS_EVERY / 2 {
                                for h in &batch {
                                    let _ = h.msg.ack_with(AckKind::Progress).await;
                                }
                            }
                            hands.keep(PROGRESS_EVERY / 2).await;
                        };
                        if tokio::time::timeout(PROGRESS_EVERY / 2, kept).await.is_ok() {
                            batch_kept = Instant::now();
                        }
                    }
                    () = &mut give_up => anyhow::bail!("a fan-out batch of {} events has not finished in {} s: letting its events go back to the cluster", batch.len(), WORK_AT_MOST.as_secs()),
                    _ = shutdown.changed() => return Ok(Flow::Stop),
                }
            }
            for h in &batch {
                if let Err(e) = h.msg.ack().await {
                    tracing::warn!(projection = %label, error = %e, "acknowledgement lost; the event will be redelivered and fanned out again (its deliveries are deduplicated)");
                }
            }
            let seqs: Vec<u64> = batch.iter().filter_map(|h| h.msg.info().ok().map(|i| i.stream_sequence)).collect();
            // Copies of them that came meanwhile are done too.
            for seq in &seqs {
                hands.held.remove(seq);
            }
            hands.acknowledged(seqs.into_iter());
            last_pin = batch.last().and_then(|h| pin_of(&h.msg)).map(str::to_owned);
        }
    }

    /// Gives up the partition's pin if this node holds it (its last batch
    /// came under `pin`, and the consumer still names that pin) and
    /// holds more pins than its share of the partitions: the pin goes to
    /// another node's waiting pull (or back to this one), so pins spread
    /// over the nodes, including ones started after the others. Errors
    /// only postpone this to the next look.
    async fn balance(&self, stream: &stream::Stream, consumer: &jetstream::consumer::Consumer<pull::Config>, index: u32, pins: &Pins, pin: Option<&str>) {
        let Ok(info) = consumer.get_info().await else { return };
        let pinned = info.priority_groups.iter().find(|g| g.group == GROUP).and_then(|g| g.pinned_client_id.as_deref());
        let ours = pin.is_some() && pinned == pin;
        let held = pins.set(index, ours, &self.metrics);
        let share = pins.share(index, info.num_waiting);
        if ours && held > share && stream.unpin_consumer(&info.name, GROUP).await.is_ok() {
            pins.set(index, false, &self.metrics);
            tracing::info!(partition = index, held, share, "gave up a fan-out partition's pin: this node held more than its share, and a node on standby takes it over");
        }
    }

    /// The events in `hands` that may go out now: the run of the
    /// partition's oldest events left in the work queue that are all in
    /// hand (read one by one from the stream, at most [`READY_READS`]
    /// reads), in log order. Copies of events that left the queue (acknowledged here
    /// or elsewhere) are dropped. When the run is everything in hand, no
    /// event the consumer handed out beyond it is left in the queue, and it
    /// all came under the consumer's current pin, that pin is `verified`:
    /// nothing handed out is outside this node's hands.
    async fn ready(
        &self,
        stream: &stream::Stream,
        consumer: &jetstream::consumer::Consumer<pull::Config>,
        index: u32,
        hands: &mut Hands,
        verified: &mut Option<String>,
    ) -> anyhow::Result<Vec<Held>> {
        let subject = partition_subject(&self.prefix, index);
        let first_left = |from: u64| {
            let subject = &subject;
            async move {
                match stream.get_first_raw_message_by_subject(subject, from).await {
                    Ok(msg) => Ok(Some(msg.sequence)),
                    Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => Ok(None),
                    Err(e) => Err(anyhow::Error::from(e)),
                }
            }
        };
        let mut run = Vec::new();
        let mut from = 0;
        let mut reads = 0;
        let mut beyond = None;
        loop {
            let last = hands.held.range(from..).next().is_none();
            if last && run.is_empty() {
                break;
            }
            if reads == READY_READS {
                break;
            }
            reads += 1;
            let next = first_left(from).await?;
            // Held copies of events before `next` (or of all, when none is
            // left) were acknowledged by whoever fanned them out.
            let gone: Vec<u64> = hands.held.range(from..next.unwrap_or(u64::MAX)).map(|(&seq, _)| seq).collect();
            for seq in gone {
                hands.held.remove(&seq);
            }
            match next {
                // Acknowledged here, not yet gone from the queue.
                Some(seq) if hands.acked.contains(&seq) => from = seq + 1,
                Some(seq) if hands.held.contains_key(&seq) => {
                    run.push(seq);
                    from = seq + 1;
                }
                _ => {
                    if hands.held.range(from..).next().is_none() {
                        // The first event left beyond everything in hand.
                        beyond = Some(next);
                    }
                    break;
                }
            }
        }
        if !run.is_empty() && run.len() == hands.held.len() && beyond.is_some() {
            // Read after the walk: an event handed out since is counted as
            // out (and one handed out after it goes to this node, under
            // the pin read, if that pin is the one in hand).
            let info = consumer.get_info().await?;
            let pinned = info.priority_groups.iter().find(|g| g.group == GROUP).and_then(|g| g.pinned_client_id.clone());
            if beyond.is_some_and(|b| b.is_none_or(|seq| seq > info.delivered.stream_sequence)) && hands.all_under(pinned.as_deref()) {
                *verified = pinned;
            }
        }
        Ok(run.iter().filter_map(|seq| hands.held.remove(seq)).collect())
    }

    /// Fans out `batch` (consecutive events of one partition, in log
    /// order) together; a poison batch one event at a time. A store that
    /// is down is retried until it answers (the caller keeps the events
    /// in hand, and lets them go after [`WORK_AT_MOST`]).
    async fn fan_out_in_order(&self, batch: &[Held]) {
        let label = self.label();
        let lag = batch.last().and_then(|h| h.msg.info().ok()).map_or(0, |i| i.pending);
        let decoded: Vec<(u64, Result<Envelope, String>)> = batch.iter().map(|h| decode(&h.msg)).collect();
        if decoded.iter().all(|(_, d)| d.is_ok()) {
            let events: Vec<(&Envelope, u64)> = decoded.iter().map(|(seq, env)| (env.as_ref().expect("decoded"), *seq)).collect();
            loop {
                match project_batch(self.projection.as_ref(), &label, &events, lag, &self.metrics).await {
                    BatchNext::Done => return,
                    BatchNext::RetryAfter(delay) => tokio::time::sleep(delay).await,
                    BatchNext::OneByOne => break,
                }
            }
        }
        for ((seq, env), h) in decoded.iter().zip(batch) {
            while let Next::RetryAfter(delay) = project(self.projection.as_ref(), &label, env.as_ref().map_err(Clone::clone), *seq, &h.msg.payload, lag, self, &self.metrics).await {
                tokio::time::sleep(delay).await;
            }
        }
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use async_trait::async_trait;
    use natter_events::{Event, RoomMessageSent};
    use natter_projections::{ApplyError, Projection};

    use super::*;
    use crate::projector::jetstream::Feed;
    use crate::projector::partitions::{ensure_feed, fanout_stream, partition_consumer};

    /// Records the room messages' seqs in the order fanned out, and which
    /// node fanned each out; takes `slow` over each.
    struct Recorder {
        applied: Arc<Mutex<Vec<u64>>>,
        by: Arc<Mutex<Vec<usize>>>,
        node: usize,
        slow: Duration,
    }

    impl Recorder {
        fn new(applied: &Arc<Mutex<Vec<u64>>>, by: &Arc<Mutex<Vec<usize>>>, node: usize, slow: Duration) -> Recorder {
            Recorder { applied: applied.clone(), by: by.clone(), node, slow }
        }
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
            tokio::time::sleep(self.slow).await;
            if let Event::RoomMessageSent(e) = &env.event {
                self.applied.lock().unwrap().push(e.seq);
                self.by.lock().unwrap().push(self.node);
            }
            Ok(())
        }
    }

    /// Deletes the test's streams, whatever the outcome.
    struct Cleanup(String, Vec<String>);

    impl Drop for Cleanup {
        fn drop(&mut self) {
            let (url, names) = (self.0.clone(), std::mem::take(&mut self.1));
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
                rt.block_on(async {
                    if let Ok(client) = async_nats::connect(&url).await {
                        let js = jetstream::new(client);
                        for name in names {
                            let _ = js.delete_stream(name).await;
                        }
                    }
                });
            })
            .join();
        }
    }

    /// A log and its fan-out feed of their own, with room `r1`'s events.
    struct Fixture {
        url: String,
        js: jetstream::Context,
        prefix: String,
        feed: String,
        subject: String,
        _cleanup: Cleanup,
    }

    impl Fixture {
        async fn new(name: &str) -> Fixture {
            let url = std::env::var("NATTER_NATS_URL").expect("NATTER_NATS_URL (scripts/test.sh starts NATS and sets it)");
            let tag = uuid::Uuid::new_v4().simple().to_string();
            let (stream, prefix) = (format!("{name}{tag}"), format!("{}{tag}", name.to_lowercase()));
            let feed = fanout_stream(&stream);
            let _cleanup = Cleanup(url.clone(), vec![feed.clone(), stream.clone()]);
            let js = jetstream::new(async_nats::connect(&url).await.expect("NATS"));
            js.create_stream(stream::Config { name: stream.clone(), subjects: vec![format!("{prefix}.ev.>")], ..Default::default() }).await.unwrap();
            ensure_feed(&js, &stream, &prefix, None, 1).await.unwrap();
            let subject = natter_events::subjects::room(&prefix, "r1");
            Fixture { url, js, prefix, feed, subject, _cleanup }
        }

        /// A connection of its own (a node).
        async fn node(&self) -> jetstream::Context {
            jetstream::new(async_nats::connect(&self.url).await.expect("NATS"))
        }

        /// Room messages `from..=to`, appended to the log.
        async fn publish(&self, from: u64, to: u64) {
            for seq in from..=to {
                let e = RoomMessageSent { message_id: format!("m{seq}"), room_id: "r1".into(), sender_id: "amy".into(), client_msg_id: None, message: Some("hi".into()), attachment: None, seq, reply_to: None };
                let env = Envelope::new(format!("c{seq}"), self.subject.clone(), seq, Event::RoomMessageSent(e));
                self.js.publish(self.subject.clone(), env.encode().into()).await.unwrap().await.unwrap();
            }
        }

        /// The partition the room's events are in (once one is sourced).
        async fn partition(&self) -> u32 {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                let info = self.js.get_stream(&self.feed).await.unwrap().info_with_subjects(format!("{}.fan.>", self.prefix)).await.unwrap();
                let subjects: Vec<(String, usize)> = futures::TryStreamExt::try_collect(info).await.unwrap();
                if let Some(index) = subjects.into_iter().find_map(|(s, _)| s.split('.').nth(2).and_then(|p| p.parse::<u32>().ok())) {
                    return index;
                }
                assert!(std::time::Instant::now() < deadline, "the feed never sourced the room's events");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }

        /// A projector node on partition `index` recording into `projection`.
        async fn projector(&self, index: u32, projection: Recorder) -> Projector {
            Projector {
                js: self.node().await,
                feed: Feed::Partition { stream: self.feed.clone(), index, pins: Arc::default() },
                prefix: self.prefix.clone(),
                projection: Arc::new(projection),
                metrics: Arc::new(Metrics::default()),
            }
        }
    }

    /// Waits until `n` events were fanned out (at most `within`).
    async fn await_fanned_out(applied: &Mutex<Vec<u64>>, n: usize, within: Duration) {
        let deadline = std::time::Instant::now() + within;
        while applied.lock().unwrap().len() < n {
            assert!(std::time::Instant::now() < deadline, "not all fanned out: {:?}", applied.lock().unwrap());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Node A holds a partition's events 1–5 (keeping them, not
    /// acknowledging them) and stops pulling, so its pin expires; node B is
    /// pinned and handed 6–10. B fans out none of them until A has fanned
    /// out and acknowledged 1–5, and nothing is fanned out twice. Without
    /// the wait for older events, B would fan out 6–10 first.
    #[tokio::test]
    async fn a_new_pin_waits_for_the_events_an_old_holder_still_has() {
        let f = Fixture::new("ORDER").await;
        f.publish(1, 5).await;
        let index = f.partition().await;
        let durable = partition_consumer("order-test", 1, index);
        let consumer = f.js.get_stream(&f.feed).await.unwrap().get_or_create_consumer(&durable, partition_config(&durable, &f.prefix, index)).await.unwrap();
        // Node A: pinned first, takes 1–5, stops pulling, keeps them.
        let a_js = f.node().await;
        let a_consumer: jetstream::consumer::Consumer<pull::Config> = a_js.get_stream(&f.feed).await.unwrap().get_consumer(&durable).await.unwrap();
        let mut pulls = a_consumer.stream().group(GROUP).expires(PULL_EXPIRES).max_messages_per_batch(IN_HANDS).messages().await.unwrap();
        let mut a_held = Vec::new();
        while a_held.len() < 5 {
            a_held.push(tokio::time::timeout(Duration::from_secs(10), pulls.next()).await.expect("A is handed 1–5").unwrap().unwrap());
        }
        drop(pulls);
        let a_pin = pin_of(&a_held[0]).map(str::to_owned);
        assert!(a_pin.is_some(), "A holds the pin");
        let applied = Arc::new(Mutex::new(Vec::new()));
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let a = tokio::spawn({
            let applied = applied.clone();
            async move {
                tokio::pin!(released);
                loop {
                    tokio::select! {
                        _ = &mut released => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => for m in &a_held {
                            m.ack_with(AckKind::Progress).await.unwrap();
                        },
                    }
                }
                // A fans out 1–5, then acknowledges them.
                applied.lock().unwrap().extend(1..=5);
                for m in &a_held {
                    m.double_ack().await.unwrap();
                }
            }
        });
        // Node B: a projector, on standby until A's pin expires; 6–10 come.
        let (shutdown_tx, shutdown) = watch::channel(false);
        let projector = f.projector(index, Recorder::new(&applied, &Arc::default(), 1, Duration::ZERO)).await;
        let b = tokio::spawn(projector.run(shutdown));
        f.publish(6, 10).await;
        let deadline = std::time::Instant::now() + PINNED_FOR * 4;
        loop {
            let info = consumer.get_info().await.unwrap();
            let pin = info.priority_groups.first().and_then(|g| g.pinned_client_id.clone());
            // B pinned and handed 6–10: all ten pending, or some fanned out.
            if pin.is_some() && pin != a_pin && (info.num_ack_pending == 10 || !applied.lock().unwrap().is_empty()) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "B was never handed 6–10 (pin {pin:?}, pending {})", info.num_ack_pending);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(*applied.lock().unwrap(), Vec::<u64>::new(), "B went ahead of the events A holds");
        release.send(()).unwrap();
        a.await.unwrap();
        await_fanned_out(&applied, 10, Duration::from_secs(20)).await;
        // Nothing more comes (no event handed out twice and fanned out again).
        tokio::time::sleep(ACK_WAIT + Duration::from_secs(1)).await;
        assert_eq!(*applied.lock().unwrap(), (1..=10).collect::<Vec<u64>>());
        shutdown_tx.send(true).unwrap();
        b.await.unwrap();
    }

    /// Two nodes work a partition while its pin is taken away every ten
    /// events (as a node giving up a pin does), one of them slow, so that
    /// a pin often moves while the other node holds events: every event is
    /// fanned out once, in log order, by both nodes in turn, and the
    /// partition never stalls with each node waiting on the other.
    #[tokio::test]
    async fn pins_moving_under_two_nodes_keep_order_and_never_stall() {
        let f = Fixture::new("MOVE").await;
        f.publish(1, 1).await;
        let index = f.partition().await;
        let (applied, by) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(Vec::new())));
        let (shutdown_tx, shutdown) = watch::channel(false);
        let mut nodes = Vec::new();
        for (node_index, slow) in [(0, Duration::from_millis(20)), (1, Duration::ZERO)] {
            let projector = f.projector(index, Recorder::new(&applied, &by, node_index, slow)).await;
            nodes.push(tokio::spawn(projector.run(shutdown.clone())));
        }
        let durable = partition_consumer("order-test", 1, index);
        let feed_stream = f.js.get_stream(&f.feed).await.unwrap();
        for seq in 2..=300u64 {
            f.publish(seq, seq).await;
            if seq % 10 == 0 {
                feed_stream.unpin_consumer(&durable, GROUP).await.unwrap();
            }
            if seq % 5 == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        // At most one pin timeout and one ack wait (a node's pulls lost in
        // a move), with room for a slow machine.
        await_fanned_out(&applied, 300, 2 * (PINNED_FOR + ACK_WAIT) + Duration::from_secs(10)).await;
        assert_eq!(*applied.lock().unwrap(), (1..=300).collect::<Vec<u64>>());
        let by = by.lock().unwrap().clone();
        assert!(by.contains(&0) && by.contains(&1), "both nodes took turns: {by:?}");
        shutdown_tx.send(true).unwrap();
        for n in nodes {
            n.await.unwrap();
        }
    }

    /// A partition consumer made by an earlier natter (one event in flight,
    /// no pin) is turned into a pinned one when a node starts on it, and
    /// the events it held go out in order.
    #[tokio::test]
    async fn an_earlier_partition_consumer_is_pinned_in_place() {
        let f = Fixture::new("UPGRADE").await;
        f.publish(1, 3).await;
        let index = f.partition().await;
        let durable = partition_consumer("order-test", 1, index);
        let mut earlier = crate::projector::jetstream::consumer_config(&durable, true);
        earlier.filter_subject = partition_subject(&f.prefix, index);
        let feed = f.js.get_stream(&f.feed).await.unwrap();
        feed.create_consumer(earlier).await.unwrap();
        let applied = Arc::new(Mutex::new(Vec::new()));
        let (shutdown_tx, shutdown) = watch::channel(false);
        let node = tokio::spawn(f.projector(index, Recorder::new(&applied, &Arc::default(), 0, Duration::ZERO)).await.run(shutdown));
        f.publish(4, 6).await;
        await_fanned_out(&applied, 6, Duration::from_secs(20)).await;
        assert_eq!(*applied.lock().unwrap(), (1..=6).collect::<Vec<u64>>());
        let config = feed.get_consumer::<pull::Config>(&durable).await.unwrap().get_info().await.unwrap().config;
        assert_eq!((config.priority_policy, config.max_ack_pending, config.priority_groups), (PriorityPolicy::PinnedClient, IN_HANDS as i64, vec![GROUP.to_owned()]));
        shutdown_tx.send(true).unwrap();
        node.await.unwrap();
    }
}
