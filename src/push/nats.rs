//! The distributed push bus: the inbox stream `<STREAM>_INBOX`, republished
//! on core NATS, shared by every node.
//!
//! The inbox holds two kinds of chains: a user's own deliveries
//! (`<prefix>.inbox.user.<id>`: direct messages, receipts, their own joins
//! and leaves) and a room's (`<prefix>.inbox.room.<id>`: its messages and,
//! in small rooms, its joins and leaves), stored once per room event
//! whatever the room's size. A user's deliveries are their own chain and
//! their rooms' chains while they were members ([`super::user_rooms`]),
//! merged in inbox order: live by the node's [`Router`], on replay here.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{self, stream};
use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt, TryStreamExt};

use super::router::{LOG_SEQ, Router, header_u64, own_change};
use super::{Delivery, Payload, PushBus, Pushed, Replay, To, inbox_stream, inbox_subject, room_inbox_subject, signal_subject};
use crate::log::EventLog;

/// How much the inbox keeps for resume: deliveries older than `retention`
/// or beyond `max_bytes` (oldest first) go, and their cursors get `resync`.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub retention: Duration,
    pub max_bytes: u64,
}

impl From<&crate::config::Push> for Bounds {
    fn from(push: &crate::config::Push) -> Bounds {
        Bounds { retention: push.retention, max_bytes: push.max_bytes }
    }
}

/// Deliveries of one chain a deletion walks at most (see [`erase`]).
const PURGE_WALK: usize = 5_000;
/// How long before a deleted message's time its deliveries are looked for.
const PURGE_MARGIN: chrono::Duration = chrono::Duration::seconds(60);
/// How long one chain's erase may take.
const PURGE_TIME: Duration = Duration::from_secs(10);
/// Erases waiting per node; beyond, a deletion's copies stay in the inbox
/// until its retention (never served: replays send the tombstone).
const PURGE_QUEUE: usize = 1024;

/// Works through a node's queue of deleted messages to erase, one chain
/// at a time, each within [`PURGE_TIME`]: best effort, beside the fan-out
/// (which never waits for it). Ends with the bus.
async fn erase_deleted(client: async_nats::Client, js: jetstream::Context, inbox: String, mut queued: tokio::sync::mpsc::Receiver<Purge>) {
    while let Some(p) = queued.recv().await {
        match tokio::time::timeout(PURGE_TIME, erase(&client, &js, &inbox, &p)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(subject = %p.subject, message = %p.id, error = %format!("{e:#}"), "could not erase a deleted message's deliveries from the inbox; they stay until its retention (never served: replays send the tombstone)"),
            Err(_) => tracing::warn!(subject = %p.subject, message = %p.id, "erasing a deleted message's deliveries took over 10 s; the rest stay until the inbox retention (never served)"),
        }
    }
}

/// Erases from the chain `p.subject` every stored delivery that shows
/// message `p.id` (its `newMessage` or room `message`, its
/// `messageUpdated`): walked from a minute before the message's time (node
/// clocks, fan-out lag), at most [`PURGE_WALK`] deliveries. A replay skips
/// erased inbox messages. Replies' deliveries hold no preview of it
/// (sessions read previews when they emit). Not erased: copies beyond the
/// walk.
async fn erase(client: &async_nats::Client, js: &jetstream::Context, inbox: &str, p: &Purge) -> anyhow::Result<()> {
    let stream = js.get_stream_no_info(inbox).await?;
    let start = chrono::DateTime::parse_from_rfc3339(&p.created_at).context("a deleted message's createdAt")?.with_timezone(&chrono::Utc) - PURGE_MARGIN;
    let request = serde_json::json!({ "start_time": start.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true), "next_by_subj": p.subject });
    let reply = client.request(format!("$JS.API.DIRECT.GET.{inbox}"), serde_json::to_vec(&request)?.into()).await?;
    match reply.status {
        // Nothing on the chain since.
        Some(s) if s == async_nats::StatusCode::NOT_FOUND => return Ok(()),
        Some(s) if !s.is_success() => anyhow::bail!("direct get by time answered {s}: {:?}", reply.description),
        _ => {}
    }
    let mut msg = jetstream::message::StreamMessage::try_from(reply).context("direct get by time")?;
    for _ in 0..PURGE_WALK {
        let shows = serde_json::from_slice::<Payload>(&msg.payload).is_ok_and(|d| crate::wire::content_of(&d.event, &d.data) == Some(p.id.as_str()));
        if shows {
            // Gone already (aged out, or another node erased it): fine.
            if let Err(e) = stream.delete_message(msg.sequence).await {
                tracing::debug!(seq = msg.sequence, error = %e, "inbox message not erased");
            }
        }
        match stream.direct_get_next_for_subject(&p.subject, Some(msg.sequence + 1)).await {
            Ok(next) => msg = next,
            Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
    tracing::warn!(
        subject = %p.subject,
        message = %p.id,
        "more than {PURGE_WALK} deliveries on this chain since a deleted message: copies of it beyond them stay in the inbox until its retention (never served: replays send the tombstone)"
    );
    Ok(())
}

/// Chains read at once by a replay.
const REPLAY_READS: usize = 16;

/// Deliveries published before their acks are awaited. Every fan-out
/// partition of a node may be publishing a window at once, through this
/// context, whose pending acks are limited to 5,000: 16 × 256 stays under.
const PUBLISH_WINDOW: usize = 256;

pub struct NatsPush {
    client: async_nats::Client,
    js: jetstream::Context,
    prefix: String,
    inbox: String,
    router: Router,
    /// Deleted messages to erase from inbox chains, in the background.
    purges: tokio::sync::mpsc::Sender<Purge>,
}

/// A deleted message (`id`, sent at `created_at`) to erase from `subject`.
struct Purge {
    subject: String,
    id: String,
    created_at: String,
}

impl NatsPush {
    /// Makes sure the inbox stream exists (with republish to the push
    /// subjects). Deliveries are published through a JetStream context of
    /// their own: a large fan-out never takes pending-ack slots from the
    /// log's appends. A stream created now numbers its first delivery
    /// `first` when given (so cursors from an earlier deployment fall
    /// before it and get `resync`).
    pub async fn connect(
        client: async_nats::Client,
        js: jetstream::Context,
        log: Arc<dyn EventLog>,
        stream_name: &str,
        prefix: &str,
        bounds: Bounds,
        first: Option<u64>,
    ) -> anyhow::Result<NatsPush> {
        let Bounds { retention, max_bytes } = bounds;
        let inbox = inbox_stream(stream_name);
        let subjects = vec![format!("{prefix}.inbox.user.*"), format!("{prefix}.inbox.room.*")];
        let republish = stream::Republish {
            source: format!("{prefix}.inbox.>"),
            destination: format!("{prefix}.push.>"),
            headers_only: false,
        };
        let mut created = js
            .get_or_create_stream(stream::Config {
            name: inbox.clone(),
            subjects: subjects.clone(),
            storage: stream::StorageType::File,
            max_age: retention,
            max_bytes: max_bytes as i64,
            discard: stream::DiscardPolicy::Old,
            duplicate_window: Duration::from_secs(120).min(retention),
            allow_direct: true,
            first_sequence: first,
            republish: Some(republish.clone()),
            ..Default::default()
        })
        .await
        .with_context(|| format!("creating the push inbox stream {inbox}"))?;
        // An inbox made with other bounds (or before room chains) takes
        // the configured ones.
        let config = created.info().await.with_context(|| format!("reading the push inbox stream {inbox}"))?.config.clone();
        if config.max_age != retention || config.max_bytes != max_bytes as i64 || config.subjects != subjects || config.republish.as_ref() != Some(&republish) {
            let duplicate_window = Duration::from_secs(120).min(retention);
            js.update_stream(stream::Config {
                max_age: retention,
                max_bytes: max_bytes as i64,
                duplicate_window,
                subjects,
                republish: Some(republish),
                ..config
            })
            .await
            .with_context(|| format!("updating the push inbox stream {inbox} (bounds, room chains)"))?;
        }
        let js = jetstream::new(client.clone());
        let router = Router::new(client.clone(), prefix.to_owned(), log);
        let (purges, queued) = tokio::sync::mpsc::channel(PURGE_QUEUE);
        tokio::spawn(erase_deleted(client.clone(), js.clone(), inbox.clone(), queued));
        Ok(NatsPush { client, js, prefix: prefix.to_owned(), inbox, router, purges })
    }

    async fn stream_state(&self) -> anyhow::Result<stream::State> {
        let mut s = self.js.get_stream(&self.inbox).await?;
        Ok(s.info().await?.state.clone())
    }
}

#[async_trait]
impl PushBus for NatsPush {
    async fn deliver(&self, event: &natter_events::Envelope, log_seq: u64, deliveries: Vec<(To, Payload)>) -> Result<(), String> {
        // Send a window of deliveries, then wait for its acks: a round trip
        // per window rather than per member (publishes on one connection are
        // stored in the order sent), and never more acks pending than the
        // context allows, whatever the room's size (waiting on more than
        // that would wait forever).
        // A message deleted for everyone is erased from the chains its
        // tombstone goes to (its two participants', or its room's), in the
        // background once the tombstone is stored.
        let mut purges = Vec::new();
        for (to, payload) in deliveries.iter().filter(|(_, p)| p.event == "messageDeleted") {
            let (Some(id), Some(at)) = (payload.data.get("_id").and_then(|v| v.as_str()), payload.data.get("createdAt").and_then(|v| v.as_str())) else {
                continue;
            };
            let subject = match to {
                To::User(user) => inbox_subject(&self.prefix, user),
                To::Room(room) => room_inbox_subject(&self.prefix, room),
            };
            purges.push(Purge { subject, id: id.to_owned(), created_at: at.to_owned() });
        }
        let mut deliveries = deliveries.into_iter().peekable();
        while deliveries.peek().is_some() {
            let mut acks = Vec::with_capacity(PUBLISH_WINDOW);
            for (to, payload) in deliveries.by_ref().take(PUBLISH_WINDOW) {
                let body = serde_json::to_vec(&payload).map_err(|e| e.to_string())?;
                let (subject, id) = match &to {
                    To::User(user) => (inbox_subject(&self.prefix, user), format!("{}:{user}", event.id)),
                    To::Room(room) => (room_inbox_subject(&self.prefix, room), format!("{}@{room}", event.id)),
                };
                let publish = jetstream::message::PublishMessage::build().payload(body.into()).message_id(id).header(LOG_SEQ, log_seq.to_string().as_str());
                acks.push(self.js.send_publish(subject, publish).await.map_err(|e| format!("nats: {e}"))?);
            }
            for ack in acks {
                ack.await.map_err(|e| format!("nats: {e}"))?;
            }
        }
        for p in purges {
            if self.purges.try_send(p).is_err() {
                tracing::warn!("the inbox erase queue is full: a deleted message's deliveries stay until the inbox retention (never served)");
            }
        }
        Ok(())
    }

    fn shares_rooms(&self) -> bool {
        true
    }

    async fn head(&self) -> anyhow::Result<u64> {
        Ok(self.stream_state().await?.last_sequence)
    }

    async fn replay(&self, user: &str, cursor: u64, limit: usize) -> anyhow::Result<Replay> {
        let state = self.stream_state().await?;
        if cursor > state.last_sequence || cursor + 1 < state.first_sequence {
            return Ok(Replay::TooOld { head: state.last_sequence });
        }
        let stream = self.js.get_stream(&self.inbox).await?;
        let mut rooms = self.router.rooms_of(user).await?;
        let mut chains = vec![Chain::new(inbox_subject(&self.prefix, user), None, cursor)];
        chains.extend(rooms.keys().map(|room| Chain::new(room_inbox_subject(&self.prefix, room), Some(room.clone()), cursor)));
        let mut page = Vec::new();
        let mut previous = cursor;
        while page.len() < limit {
            // Each chain's next message (16 reads at a time), then the
            // oldest of them.
            let mut reads = Vec::new();
            for chain in chains.iter_mut() {
                if chain.head.is_none() && !chain.done {
                    reads.push(chain.fill(&stream).boxed());
                }
            }
            futures::stream::iter(reads).buffer_unordered(REPLAY_READS).try_collect::<Vec<()>>().await?;
            // Up to the head as it was when the replay began: a chain found
            // empty is not read again, so anything stored since might be
            // passed over (the caller asks again until a page is empty).
            let Some(chain) = chains
                .iter_mut()
                .filter(|c| c.head.as_ref().is_some_and(|m| m.sequence <= state.last_sequence))
                .min_by_key(|c| c.head.as_ref().map(|m| m.sequence))
            else {
                break;
            };
            let msg = chain.head.take().expect("a chain with a head");
            chain.from = msg.sequence + 1;
            let payload: Payload = serde_json::from_slice(&msg.payload).with_context(|| format!("inbox message {} is not a delivery", msg.sequence))?;
            let log_seq = header_u64(Some(&msg.headers), LOG_SEQ).unwrap_or(0);
            let mut joined_room = None;
            let include = match &chain.room {
                None => {
                    if let Some((room, joined)) = own_change(&payload, user) {
                        rooms.entry(room.to_owned()).or_default().record(log_seq, joined);
                        joined_room = joined.then(|| room.to_owned());
                    }
                    true
                }
                // Their own join or leave came on their own chain.
                Some(_) if own_change(&payload, user).is_some() => false,
                Some(room) => {
                    let timeline = rooms.entry(room.clone()).or_default();
                    if timeline.at(log_seq).is_none() {
                        // Older than what was read: the router reads (and
                        // keeps) the member subject's history.
                        timeline.take_in(self.router.history_of(user, room).await?);
                    }
                    chain.done = timeline.ended_by(log_seq);
                    timeline.at(log_seq).unwrap_or(false)
                }
            };
            if let Some(room) = joined_room {
                // A room joined after the cursor: its chain from the join on
                // (a chain that ended before is read again from there).
                let from = msg.sequence + 1;
                match chains.iter_mut().find(|c| c.room.as_deref() == Some(room.as_str())) {
                    Some(c) if c.done => *c = Chain::new(c.subject.clone(), Some(room), from - 1),
                    Some(_) => {}
                    None => chains.push(Chain::new(room_inbox_subject(&self.prefix, &room), Some(room), from - 1)),
                }
            }
            if include {
                page.push(Delivery { cursor: msg.sequence, previous, payload, check: None });
                previous = msg.sequence;
            }
        }
        Ok(Replay::Page(page))
    }

    async fn subscribe(&self, user: &str) -> anyhow::Result<BoxStream<'static, Arc<Pushed>>> {
        self.router.subscribe(user).await
    }

    async fn member_at(&self, user: &str, room: &str, log_seq: u64) -> anyhow::Result<bool> {
        self.router.member_at(user, room, log_seq).await
    }

    async fn signal(&self, to: &str, payload: &Payload) -> anyhow::Result<()> {
        let body = serde_json::to_vec(payload)?;
        self.client.publish(signal_subject(&self.prefix, to), body.into()).await?;
        Ok(())
    }
}

/// One chain of a replay: the user's own, or one of their rooms'.
struct Chain {
    subject: String,
    room: Option<String>,
    /// The next inbox sequence to read from.
    from: u64,
    head: Option<jetstream::message::StreamMessage>,
    /// Nothing further on it is for the user.
    done: bool,
}

impl Chain {
    fn new(subject: String, room: Option<String>, cursor: u64) -> Chain {
        Chain { subject, room, from: cursor + 1, head: None, done: false }
    }

    /// Reads the chain's next message (none: done).
    async fn fill(&mut self, stream: &stream::Stream) -> anyhow::Result<()> {
        match stream.direct_get_next_for_subject(&self.subject, Some(self.from)).await {
            Ok(msg) => self.head = Some(msg),
            Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => self.done = true,
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }
}
