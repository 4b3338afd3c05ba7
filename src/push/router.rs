//! A node's live feed from NATS, in the inbox stream's order.
//!
//! One task per node reads every push subscription the node has: each
//! subscribed user's own chain (`push.user.<id>`) and signals, and the
//! shared chain of every room one of them is a member of (`push.room.<id>`:
//! one subscription per room per node, however many of its members have
//! sockets here). The server sends one connection its messages in the
//! order it sends them, and async-nats queues them per subscription in
//! that order; the task takes everything ready on all subscriptions at
//! once and sorts it by inbox sequence, so a user's deliveries leave the
//! router in inbox order whichever chain they came on (their cursor stays
//! one number). A room delivery goes to the node's users who were members
//! as of its event ([`super::user_rooms`]); a user's own `member-joined`
//! / `member-left` keep their rooms (and the node's room subscriptions)
//! current.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use futures::FutureExt;
use futures::StreamExt;
use futures::stream::{AbortHandle, AbortRegistration, Abortable, BoxStream, SelectAll};
use tokio::sync::mpsc;

use super::user_rooms::{self, Timeline};
use super::{Delivery, MemberCheck, Payload, Pushed, push_subject, room_push_subject, signal_subject};
use crate::log::EventLog;

/// Live items a user's subscription may hold before new ones are dropped
/// (the socket then fills the gap from the inbox).
const LIVE_BUFFER: usize = 4096;
/// Most messages sorted and dispatched at once.
const BATCH: usize = 4096;
/// The header carrying a delivery's event's log sequence.
pub const LOG_SEQ: &str = "Natter-Log-Seq";

#[derive(Clone)]
enum Source {
    User(Arc<str>),
    Signal(Arc<str>),
    Room(Arc<str>),
}

type Feed = Abortable<BoxStream<'static, (Source, async_nats::Message)>>;
/// A message read, with its delivery decoded (none for a signal).
type Read = (Source, Option<(Delivery, u64)>, async_nats::Message);

struct UserSlot {
    subscribers: Vec<(u64, mpsc::Sender<Pushed>)>,
    rooms: HashMap<String, Timeline>,
    feeds: [AbortHandle; 2],
}

struct RoomSlot {
    /// This node's users who are members now.
    users: HashSet<Arc<str>>,
    feed: AbortHandle,
}

#[derive(Default)]
struct State {
    users: HashMap<Arc<str>, UserSlot>,
    rooms: HashMap<String, RoomSlot>,
}

pub struct Router {
    inner: Arc<Inner>,
}

struct Inner {
    client: async_nats::Client,
    prefix: String,
    log: Arc<dyn EventLog>,
    state: Mutex<State>,
    feeds: mpsc::UnboundedSender<Feed>,
    next_id: AtomicU64,
}

/// A header as a number.
pub fn header_u64(headers: Option<&async_nats::HeaderMap>, name: &str) -> Option<u64> {
    headers?.get(name)?.as_str().parse().ok()
}

/// A live delivery from its message: (delivery, its event's log sequence).
fn decode(msg: &async_nats::Message) -> Option<(Delivery, u64)> {
    let headers = msg.headers.as_ref();
    let (Some(cursor), Some(previous)) = (header_u64(headers, "Nats-Sequence"), header_u64(headers, "Nats-Last-Sequence")) else {
        tracing::warn!(subject = %msg.subject, "push without stream sequence headers; dropped");
        return None;
    };
    match serde_json::from_slice::<Payload>(&msg.payload) {
        Ok(payload) => Some((Delivery { cursor, previous, payload, check: None }, header_u64(headers, LOG_SEQ).unwrap_or(0))),
        Err(e) => {
            tracing::warn!(subject = %msg.subject, cursor, error = %e, "undecodable push; the socket will fetch it on the next gap check");
            None
        }
    }
}

/// `user`'s own join or leave of a room, in a delivery: (room, joined).
pub fn own_change<'a>(payload: &'a Payload, user: &str) -> Option<(&'a str, bool)> {
    let joined = match payload.event.as_str() {
        "member-joined" => true,
        "member-left" => false,
        _ => return None,
    };
    (payload.data.get("userId")?.as_str()? == user).then_some(())?;
    Some((payload.data.get("roomId")?.as_str()?, joined))
}

/// Hands `pushed` to every subscription of a user; a full one misses it
/// (its socket fills the gap from the inbox).
fn hand(slot: &UserSlot, pushed: &Pushed) {
    for (_, tx) in &slot.subscribers {
        if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(pushed.clone()) {
            tracing::debug!("a user's live buffer is full; their sockets will fetch what it missed");
        }
    }
}

impl Router {
    pub fn new(client: async_nats::Client, prefix: String, log: Arc<dyn EventLog>) -> Router {
        let (feeds, rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner { client, prefix, log, state: Mutex::new(State::default()), feeds, next_id: AtomicU64::new(1) });
        tokio::spawn(run(Arc::downgrade(&inner), rx));
        Router { inner }
    }

    /// `user`'s live deliveries (their own and their rooms') and signals
    /// from the moment this returns, until the stream is dropped.
    pub async fn subscribe(&self, user: &str) -> anyhow::Result<BoxStream<'static, Pushed>> {
        let inner = &self.inner;
        let (tx, rx) = mpsc::channel(LIVE_BUFFER);
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        // Dropping it (a failure below included) leaves again.
        let subscription = Subscription { rx, inner: inner.clone(), user: user.into(), id };
        if let Some(slot) = inner.lock().users.get_mut(user) {
            slot.subscribers.push((id, tx));
            return Ok(subscription.boxed());
        }
        let own = inner.client.subscribe(push_subject(&inner.prefix, user)).await?;
        let signals = inner.client.subscribe(signal_subject(&inner.prefix, user)).await?;
        let user: Arc<str> = user.into();
        {
            let mut state = inner.lock();
            if let Some(slot) = state.users.get_mut(&user) {
                // Another subscription of the user got here first.
                slot.subscribers.push((id, tx));
                return Ok(subscription.boxed());
            }
            let own = inner.feed(own, Source::User(user.clone()));
            let signals = inner.feed(signals, Source::Signal(user.clone()));
            state.users.insert(user.clone(), UserSlot { subscribers: vec![(id, tx)], rooms: HashMap::new(), feeds: [own, signals] });
        }
        // The user's own chain is live before their rooms are read: a join
        // or leave is either in what is read or heard after it.
        inner.client.flush().await?;
        let read = user_rooms::load(&*inner.log, &inner.prefix, &user).await?;
        let mut new_rooms = Vec::new();
        {
            let mut state = inner.lock();
            let State { users, rooms } = &mut *state;
            let Some(slot) = users.get_mut(&user) else { anyhow::bail!("the push subscription of {user} ended while starting") };
            for (room, timeline) in read {
                slot.rooms.entry(room).or_insert_with(|| Timeline::from_newest(None)).take_in(timeline);
            }
            for (room, timeline) in &slot.rooms {
                if timeline.now()
                    && let Some(registration) = enter(rooms, room, &user)
                {
                    new_rooms.push((room.clone(), registration));
                }
            }
        }
        for (room, registration) in new_rooms {
            let sub = inner.client.subscribe(room_push_subject(&inner.prefix, &room)).await?;
            inner.add_feed(sub, Source::Room(room.as_str().into()), registration);
        }
        // The server has the subscriptions once it answers a flush.
        inner.client.flush().await?;
        // Other subscriptions of the user that joined while their rooms
        // were being read catch up now that they are complete.
        if let Some(slot) = inner.lock().users.get(&user) {
            for (other, tx) in &slot.subscribers {
                if *other != id {
                    let _ = tx.try_send(Pushed::Recheck);
                }
            }
        }
        Ok(subscription.boxed())
    }

    /// Whether `user` was a member of `room` as of log sequence `log_seq`
    /// (reading the member subject's history if need be).
    pub async fn member_at(&self, user: &str, room: &str, log_seq: u64) -> anyhow::Result<bool> {
        if let Some(known) = self.inner.lock().users.get(user).and_then(|slot| slot.rooms.get(room)).and_then(|t| t.at(log_seq)) {
            return Ok(known);
        }
        let history = user_rooms::history(&*self.inner.log, &self.inner.prefix, user, room).await?;
        let member = history.at(log_seq).unwrap_or(false);
        if let Some(slot) = self.inner.lock().users.get_mut(user) {
            slot.rooms.entry(room.to_owned()).or_insert_with(|| Timeline::from_newest(None)).take_in(history);
        }
        Ok(member)
    }

    /// `user`'s rooms as this node knows them (read from the log when the
    /// user has no subscription here).
    pub async fn rooms_of(&self, user: &str) -> anyhow::Result<HashMap<String, Timeline>> {
        if let Some(slot) = self.inner.lock().users.get(user) {
            return Ok(slot.rooms.clone());
        }
        Ok(user_rooms::load(&*self.inner.log, &self.inner.prefix, user).await?)
    }
}

/// Adds `user` to `room`'s local members; a registration for a feed to
/// start when the node had no subscription to the room yet.
fn enter(rooms: &mut HashMap<String, RoomSlot>, room: &str, user: &Arc<str>) -> Option<AbortRegistration> {
    if let Some(slot) = rooms.get_mut(room) {
        slot.users.insert(user.clone());
        return None;
    }
    let (feed, registration) = AbortHandle::new_pair();
    rooms.insert(room.to_owned(), RoomSlot { users: HashSet::from([user.clone()]), feed });
    Some(registration)
}

/// Takes `user` out of `room`'s local members, ending the node's
/// subscription to the room with its last one.
fn exit(rooms: &mut HashMap<String, RoomSlot>, room: &str, user: &str) {
    if let Some(slot) = rooms.get_mut(room) {
        slot.users.remove(user);
        if slot.users.is_empty() {
            slot.feed.abort();
            rooms.remove(room);
        }
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("push router lock")
    }

    /// Starts reading `sub` in the router task, until the registration's
    /// handle aborts it.
    fn add_feed(&self, sub: async_nats::Subscriber, source: Source, registration: AbortRegistration) {
        let stream = sub.map(move |m| (source.clone(), m)).boxed();
        let _ = self.feeds.send(Abortable::new(stream, registration));
    }

    /// As [`Inner::add_feed`], with a new handle.
    fn feed(&self, sub: async_nats::Subscriber, source: Source) -> AbortHandle {
        let (handle, registration) = AbortHandle::new_pair();
        self.add_feed(sub, source, registration);
        handle
    }

    fn release(&self, user: &str, id: u64) {
        let mut state = self.lock();
        let Some(slot) = state.users.get_mut(user) else { return };
        slot.subscribers.retain(|(i, _)| *i != id);
        if !slot.subscribers.is_empty() {
            return;
        }
        let Some(slot) = state.users.remove(user) else { return };
        for feed in &slot.feeds {
            feed.abort();
        }
        for room in slot.rooms.keys() {
            exit(&mut state.rooms, room, user);
        }
    }

    /// Hands a sorted batch to the users it is for.
    fn dispatch(self: &Arc<Self>, batch: Vec<(Source, async_nats::Message)>) {
        let mut items: Vec<Read> =
            batch.into_iter().map(|(source, msg)| (source.clone(), if matches!(source, Source::Signal(_)) { None } else { decode(&msg) }, msg)).collect();
        // Signals (no cursor) first; deliveries in inbox order.
        items.sort_by_key(|(_, d, _)| d.as_ref().map_or(0, |(d, _)| d.cursor));
        let mut state = self.lock();
        let mut new_rooms = Vec::new();
        for (source, decoded, msg) in items {
            match source {
                Source::Signal(user) => {
                    if let (Some(slot), Ok(payload)) = (state.users.get(&*user), serde_json::from_slice::<Payload>(&msg.payload)) {
                        hand(slot, &Pushed::Signal(payload));
                    }
                }
                Source::User(user) => {
                    let Some((d, log_seq)) = decoded else { continue };
                    let State { users, rooms } = &mut *state;
                    let Some(slot) = users.get_mut(&*user) else { continue };
                    if let Some((room, joined)) = own_change(&d.payload, &user)
                        && log_seq > 0
                    {
                        slot.rooms.entry(room.to_owned()).or_insert_with(|| Timeline::from_newest(None)).record(log_seq, joined);
                        if joined {
                            if let Some(registration) = enter(rooms, room, &user) {
                                new_rooms.push((room.to_owned(), registration));
                            }
                        } else {
                            exit(rooms, room, &user);
                        }
                    }
                    hand(slot, &Pushed::Delivery(d));
                }
                Source::Room(room) => {
                    let Some((d, log_seq)) = decoded else { continue };
                    let Some(members) = state.rooms.get(&*room) else { continue };
                    for user in &members.users {
                        let Some(slot) = state.users.get(user) else { continue };
                        // Their own join or leave came on their own chain.
                        if own_change(&d.payload, user).is_some() {
                            continue;
                        }
                        match slot.rooms.get(&*room).and_then(|t| t.at(log_seq)) {
                            Some(true) => hand(slot, &Pushed::Delivery(d.clone())),
                            Some(false) => {}
                            None => {
                                let check = Some(MemberCheck { room: room.to_string(), log_seq });
                                hand(slot, &Pushed::Delivery(Delivery { check, ..d.clone() }));
                            }
                        }
                    }
                }
            }
        }
        drop(state);
        for (room, registration) in new_rooms {
            let inner = self.clone();
            tokio::spawn(async move { inner.start_room(room, registration).await });
        }
    }

    /// Subscribes the node to a room one of its users just joined, then has
    /// the room's local members catch up on what was stored before the
    /// subscription took effect.
    async fn start_room(self: Arc<Self>, room: String, registration: AbortRegistration) {
        match self.client.subscribe(room_push_subject(&self.prefix, &room)).await {
            Ok(sub) => {
                self.add_feed(sub, Source::Room(room.as_str().into()), registration);
                if let Err(e) = self.client.flush().await {
                    tracing::warn!(%room, error = %e, "flushing a room subscription failed; its members catch up on their next check");
                }
            }
            Err(e) => {
                tracing::error!(%room, error = %e, "cannot subscribe to a room's live deliveries; its members here get them from their periodic catch-up");
            }
        }
        let state = self.lock();
        if let Some(members) = state.rooms.get(&room) {
            for user in &members.users {
                if let Some(slot) = state.users.get(user) {
                    hand(slot, &Pushed::Recheck);
                }
            }
        }
    }
}

/// The router task: reads every feed, dispatching what is ready in inbox order.
async fn run(inner: Weak<Inner>, mut feeds: mpsc::UnboundedReceiver<Feed>) {
    let mut live: SelectAll<Feed> = SelectAll::new();
    loop {
        tokio::select! {
            biased;
            feed = feeds.recv() => match feed {
                Some(feed) => live.push(feed),
                None => break,
            },
            Some(first) = live.next(), if !live.is_empty() => {
                let mut batch = vec![first];
                // Everything already queued: a message queued before one
                // seen here is queued by now too (one connection, one
                // order), so sorting the batch restores the server's order.
                let mut idle = 0;
                while batch.len() < BATCH && idle < 3 {
                    match live.next().now_or_never() {
                        Some(Some(item)) => {
                            batch.push(item);
                            idle = 0;
                        }
                        Some(None) => break,
                        None => idle += 1,
                    }
                }
                let Some(inner) = inner.upgrade() else { break };
                inner.dispatch(batch);
            }
        }
    }
}

/// A user's live feed; dropping it leaves the router.
struct Subscription {
    rx: mpsc::Receiver<Pushed>,
    inner: Arc<Inner>,
    user: String,
    id: u64,
}

impl futures::Stream for Subscription {
    type Item = Pushed;
    fn poll_next(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Pushed>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.inner.release(&self.user, self.id);
    }
}
