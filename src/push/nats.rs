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

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{self, stream};
use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt, TryStreamExt};

use super::router::{LOG_SEQ, Router, header_u64, own_change};
use super::{Delivery, Payload, PushBus, Pushed, Replay, To, erase, inbox_stream, inbox_subject, room_inbox_subject, signal_subject};
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

/// The inbox stream's metadata key naming the layout of its deliveries;
/// an inbox without this layout is emptied once at start-up.
const LAYOUT_KEY: &str = "natter_inbox_layout";
/// 2: replies' deliveries hold no preview (read when shown).
const LAYOUT: &str = "2";

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
            metadata: [(LAYOUT_KEY.to_owned(), LAYOUT.to_owned())].into(),
            ..Default::default()
        })
        .await
        .with_context(|| format!("creating the push inbox stream {inbox}"))?;
        // An inbox made with other bounds (or before room chains) takes
        // the configured ones.
        let info = created.info().await.with_context(|| format!("reading the push inbox stream {inbox}"))?;
        let (config, last) = (info.config.clone(), info.state.last_sequence);
        let old_layout = config.metadata.get(LAYOUT_KEY).map(String::as_str) != Some(LAYOUT);
        if old_layout {
            // Deliveries stored by natter before this layout may hold reply
            // previews of messages deleted since: they go, once, and every
            // client resumes with `resync` (refetch over REST).
            // Up to what was read: a node that started at the same time
            // and purged first may have stored new deliveries since.
            created.purge().sequence(last + 1).await.with_context(|| format!("emptying the push inbox stream {inbox} of an older layout"))?;
            tracing::warn!(stream = %inbox, "the push inbox was written by an older natter (deliveries may hold reply previews): emptied once; clients refetch over REST (resync)");
        }
        if old_layout || config.max_age != retention || config.max_bytes != max_bytes as i64 || config.subjects != subjects || config.republish.as_ref() != Some(&republish) {
            let duplicate_window = Duration::from_secs(120).min(retention);
            let mut metadata = config.metadata.clone();
            metadata.insert(LAYOUT_KEY.to_owned(), LAYOUT.to_owned());
            js.update_stream(stream::Config {
                max_age: retention,
                max_bytes: max_bytes as i64,
                duplicate_window,
                subjects,
                republish: Some(republish),
                metadata,
                ..config
            })
            .await
            .with_context(|| format!("updating the push inbox stream {inbox} (bounds, room chains)"))?;
        }
        erase::ensure_stream(&js, stream_name, prefix, retention).await?;
        let js = jetstream::new(client.clone());
        let router = Router::new(client.clone(), prefix.to_owned(), log);
        Ok(NatsPush { client, js, prefix: prefix.to_owned(), inbox, router })
    }

    async fn stream_state(&self) -> anyhow::Result<stream::State> {
        let mut s = self.js.get_stream(&self.inbox).await?;
        Ok(s.info().await?.state.clone())
    }
}

#[async_trait]
impl PushBus for NatsPush {
    async fn deliver(&self, event: &natter_events::Envelope, log_seq: u64, deliveries: Vec<(To, Payload)>) -> Result<(), String> {
        self.deliver_batch(vec![(event, log_seq, deliveries)]).await
    }

    async fn deliver_batch(&self, batch: Vec<(&natter_events::Envelope, u64, Vec<(To, Payload)>)>) -> Result<(), String> {
        // Send a window of deliveries (of one event or of several, in the
        // order given), then wait for its acks: a round trip per window
        // rather than per member or per event (publishes on one connection
        // are stored in the order sent), and never more acks pending than
        // the context allows, whatever the room's size (waiting on more
        // than that would wait forever).
        // A publish can fail while later ones are stored, so a window never
        // holds two deliveries to one chain (the later one waits for the
        // window's acks), and a room's delivery never shares a window with
        // another event's: a reader learns a member's join or leave on the
        // user's own chain in log order with the room's deliveries.
        // A message deleted for everyone is erased from the chains its
        // tombstone goes to (the two participants', or its room's) by an
        // erase job queued once the tombstone is stored ([`erase`]); one
        // event deletes one message, so its tombstones share the job.
        let mut erasing: Vec<(String, erase::Job)> = Vec::new();
        let mut acks = Vec::with_capacity(PUBLISH_WINDOW);
        // The chains the window holds deliveries to, and whether one is a
        // room's.
        let mut chains: HashSet<String> = HashSet::new();
        let mut room_in_window = false;
        for (event, log_seq, deliveries) in batch {
            let mut job: Option<usize> = None;
            // Whether the window holds deliveries of earlier events.
            let mut earlier = !acks.is_empty();
            for (to, payload) in deliveries {
                let to_room = matches!(to, To::Room(_));
                let (subject, id) = match &to {
                    To::User(user) => (inbox_subject(&self.prefix, user), format!("{}:{user}", event.id)),
                    To::Room(room) => (room_inbox_subject(&self.prefix, room), format!("{}@{room}", event.id)),
                };
                if acks.len() == PUBLISH_WINDOW || chains.contains(&subject) || (earlier && (to_room || room_in_window)) {
                    settle(&mut acks, &mut erasing).await?;
                    chains.clear();
                    room_in_window = false;
                    earlier = false;
                }
                chains.insert(subject.clone());
                room_in_window |= to_room;
                let body = serde_json::to_vec(&payload).map_err(|e| e.to_string())?;
                let mut tombstone = None;
                if payload.event == "messageDeleted"
                    && let (Some(id), Some(at)) = (payload.data.get("_id").and_then(|v| v.as_str()), payload.data.get("createdAt").and_then(|v| v.as_str()))
                {
                    let index = *job.get_or_insert_with(|| {
                        erasing.push((format!("{}:erase", event.id), erase::Job { id: id.to_owned(), created_at: at.to_owned(), chains: Vec::new() }));
                        erasing.len() - 1
                    });
                    tombstone = Some((index, subject.clone()));
                }
                let publish = jetstream::message::PublishMessage::build().payload(body.into()).message_id(id).header(LOG_SEQ, log_seq.to_string().as_str());
                acks.push((self.js.send_publish(subject, publish).await.map_err(|e| format!("nats: {e}"))?, tombstone));
            }
        }
        settle(&mut acks, &mut erasing).await?;
        for (id, job) in erasing.iter().filter(|(_, job)| !job.chains.is_empty()) {
            erase::queue(&self.js, &self.prefix, id, job).await?;
        }
        Ok(())
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
                page.push(Delivery::new(msg.sequence, previous, payload));
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

/// A window of publishes awaiting their acks, each with the erase job (an
/// index into the jobs) and chain of the tombstone it is, if one.
type Window = Vec<(jetstream::context::PublishAckFuture, Option<(usize, String)>)>;

/// Waits for a window's acks; a stored tombstone's place goes to its job.
async fn settle(acks: &mut Window, erasing: &mut [(String, erase::Job)]) -> Result<(), String> {
    for (ack, tombstone) in acks.drain(..) {
        let stored = ack.await.map_err(|e| format!("nats: {e}"))?;
        if let Some((job, subject)) = tombstone {
            erasing[job].1.chains.push((subject, stored.sequence));
        }
    }
    Ok(())
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
