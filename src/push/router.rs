//! A node's live feed from NATS, in the inbox stream's order.
//!
//! One task per node reads every push subscription the node has: each
//! subscribed user's own chain (`push.user.<id>`) and signals, and the
//! shared chain of every room one of them is a member of (`push.room.<id>`:
//! one subscription per room per node, however many of its members have
//! sockets here). The server sends one connection its messages in the
//! order it sends them, and async-nats queues them per subscription in
//! that order; the task dispatches, sorted by inbox sequence, what its
//! passes over the woken subscriptions prove complete (see [`run`]), so a user's
//! deliveries leave the router in inbox order whichever chain they came on
//! (their cursor stays one number). A room delivery goes to the node's users who were members
//! as of its event ([`super::user_rooms`]); a user's own `member-joined`
//! / `member-left` keep their rooms (and the node's room subscriptions)
//! current.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use futures::StreamExt;
use futures::stream::{AbortHandle, AbortRegistration, Abortable, BoxStream};
use tokio::sync::{mpsc, watch};

use super::user_rooms::{self, Timeline};
use super::woken::{Visited, Woken};
use super::{Delivery, MemberCheck, Payload, Pushed, push_subject, room_push_subject, signal_subject};
use crate::log::EventLog;

/// Live items a user's subscription may hold; one that overflows misses
/// what follows until it takes a recheck (see [`Sub`]).
const LIVE_BUFFER: usize = 4096;
/// Most messages taken from one subscription per pass (a subscription cut
/// short bounds what the pass may dispatch, see [`run`]).
const PER_FEED: usize = 4096;
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

/// One subscription of a user. A delivery it cannot take (full, or held
/// back while a room of the user's starts here) makes it `lagging`: it
/// gets nothing more until it takes a [`Pushed::Recheck`], which has its
/// sockets catch up from their cursors (before anything newer: exact).
struct Sub {
    id: u64,
    tx: mpsc::Sender<Arc<Pushed>>,
    lagging: bool,
}

struct UserSlot {
    subs: Vec<Sub>,
    rooms: HashMap<String, Timeline>,
    feeds: [AbortHandle; 2],
    /// Set once the user's rooms are read and entered (each holds the
    /// user's deliveries back until its subscription is live).
    loaded: watch::Sender<bool>,
    /// Rooms of the user whose subscription here is still starting:
    /// deliveries are held back (see [`Sub`]) until it is live.
    starting: usize,
}

struct RoomSlot {
    /// Which subscription of the room this is (a room left and joined
    /// again starts a new one).
    generation: u64,
    /// This node's users who are members now.
    users: HashSet<Arc<str>>,
    feed: AbortHandle,
    /// The subscription took effect; until then, `waiting` users' deliveries
    /// are held back.
    live: bool,
    waiting: Vec<Arc<str>>,
}

#[derive(Default)]
struct State {
    users: HashMap<Arc<str>, UserSlot>,
    rooms: HashMap<String, RoomSlot>,
    /// The client's connection count when last looked at.
    connects: u64,
    generations: u64,
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
        Ok(payload) => Some((Delivery::new(cursor, previous, payload), header_u64(headers, LOG_SEQ).unwrap_or(0))),
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

/// Hands `pushed` to every subscription of a user. A delivery one cannot
/// take makes it lagging; a lagging one takes a recheck first.
fn hand(slot: &mut UserSlot, pushed: &Arc<Pushed>) {
    let signal = matches!(**pushed, Pushed::Signal(_));
    for sub in &mut slot.subs {
        if signal {
            let _ = sub.tx.try_send(pushed.clone());
            continue;
        }
        if slot.starting > 0 {
            sub.lagging = true;
            continue;
        }
        if sub.lagging {
            if sub.tx.try_send(Arc::new(Pushed::Recheck)).is_err() {
                continue;
            }
            sub.lagging = false;
            if matches!(**pushed, Pushed::Recheck) {
                continue;
            }
        }
        if let Err(mpsc::error::TrySendError::Full(_)) = sub.tx.try_send(pushed.clone()) {
            tracing::warn!("a user's live buffer is full; their sockets catch up from the inbox once it drains");
            sub.lagging = true;
        }
    }
}

impl Router {
    pub fn new(client: async_nats::Client, prefix: String, log: Arc<dyn EventLog>) -> Router {
        let (feeds, rx) = mpsc::unbounded_channel();
        let connects = client.statistics().connects.load(Ordering::Relaxed);
        let state = State { connects, ..State::default() };
        let inner = Arc::new(Inner { client, prefix, log, state: Mutex::new(state), feeds, next_id: AtomicU64::new(1) });
        tokio::spawn(run(Arc::downgrade(&inner), rx));
        Router { inner }
    }

    /// `user`'s live deliveries (their own and their rooms') and signals
    /// from the moment this returns, until the stream is dropped (or ended
    /// by the router when it cannot keep it exact: reconnect and resume).
    pub async fn subscribe(&self, user: &str) -> anyhow::Result<BoxStream<'static, Arc<Pushed>>> {
        let inner = &self.inner;
        let (tx, rx) = mpsc::channel(LIVE_BUFFER);
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        // Dropping it (a failure below included) leaves again.
        let subscription = Subscription { rx, inner: inner.clone(), user: user.into(), id };
        let user: Arc<str> = user.into();
        let mut tx = Some(tx);
        loop {
            // Another subscription of the user is here or starting: once
            // their rooms are read, join it.
            let loaded = inner.lock().users.get(&user).map(|slot| slot.loaded.subscribe());
            let Some(mut loaded) = loaded else { break };
            if loaded.wait_for(|done| *done).await.is_ok()
                && let Some(slot) = inner.lock().users.get_mut(&user)
                && *slot.loaded.borrow()
            {
                slot.subs.push(Sub { id, tx: tx.take().expect("joined once"), lagging: false });
                return Ok(subscription.boxed());
            }
            // It failed and left: start over.
        }
        let own = inner.client.subscribe(push_subject(&inner.prefix, &user)).await?;
        let signals = inner.client.subscribe(signal_subject(&inner.prefix, &user)).await?;
        let raced = {
            let mut state = inner.lock();
            let raced = state.users.contains_key(&user);
            if !raced {
                let own = inner.feed(own, Source::User(user.clone()));
                let signals = inner.feed(signals, Source::Signal(user.clone()));
                let sub = Sub { id, tx: tx.take().expect("one sender"), lagging: false };
                let slot = UserSlot { subs: vec![sub], rooms: HashMap::new(), feeds: [own, signals], loaded: watch::channel(false).0, starting: 0 };
                state.users.insert(user.clone(), slot);
            }
            raced
        };
        if raced {
            // Another subscription of the user started meanwhile: join it.
            drop(subscription);
            return Box::pin(self.subscribe(&user)).await;
        }
        // The user's own chain is subscribed before their rooms are read
        // (the SUB is written out first, and the server handles one
        // connection's commands in order): a join or leave is either in what
        // is read or heard after it. (On a cluster, interest reaches the
        // stream's leader a little later; a delivery missed in between is
        // found by the next gap check or the sweep.)
        inner.client.flush().await?;
        let read = user_rooms::load(&*inner.log, &inner.prefix, &user).await?;
        let mut starts = Vec::new();
        {
            let mut state = inner.lock();
            // Only the slot this call made (it may have ended, and another
            // subscription made a new one, while the rooms were read).
            let mine = |slot: &&mut UserSlot| slot.subs.iter().any(|sub| sub.id == id);
            let Some(slot) = state.users.get_mut(&user).filter(mine) else {
                anyhow::bail!("the push subscription of {user} ended while starting")
            };
            for (room, timeline) in read {
                slot.rooms.entry(room).or_default().take_in(timeline);
            }
            let member_of: Vec<String> = slot.rooms.iter().filter(|(_, t)| t.now()).map(|(r, _)| r.clone()).collect();
            // Deliveries are held back until each room is live here, then
            // the user's sockets catch up (a room whose subscription fails
            // ends its members' feeds here).
            for room in member_of {
                if let Some(start) = enter(&mut state, &room, &user) {
                    starts.push((room, start));
                }
            }
            if let Some(slot) = state.users.get_mut(&user).filter(mine) {
                slot.loaded.send_replace(true);
            }
        }
        for (room, start) in starts {
            let inner = inner.clone();
            tokio::spawn(async move { inner.start_room(room, start).await });
        }
        Ok(subscription.boxed())
    }

    /// Whether `user` was a member of `room` as of log sequence `log_seq`
    /// (reading the member subject's history if need be).
    pub async fn member_at(&self, user: &str, room: &str, log_seq: u64) -> anyhow::Result<bool> {
        if let Some(known) = self.inner.lock().users.get(user).and_then(|slot| slot.rooms.get(room)).and_then(|t| t.at(log_seq)) {
            return Ok(known);
        }
        Ok(self.history_of(user, room).await?.at(log_seq).unwrap_or(false))
    }

    /// `user`'s whole membership of `room`, read from the log (and kept for
    /// a user with a subscription here, so it is read once).
    pub async fn history_of(&self, user: &str, room: &str) -> anyhow::Result<Timeline> {
        let history = user_rooms::history(&*self.inner.log, &self.inner.prefix, user, room).await?;
        match self.inner.lock().users.get_mut(user) {
            Some(slot) => {
                let timeline = slot.rooms.entry(room.to_owned()).or_default();
                timeline.take_in(history);
                Ok(timeline.clone())
            }
            None => Ok(history),
        }
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

/// A room subscription to start: (generation, registration).
type Start = (u64, AbortRegistration);

/// Adds `user` to `room`'s local members, with a subscription to start
/// when the node had none to the room yet. The user's deliveries are held
/// back until the room's subscription is live.
fn enter(state: &mut State, room: &str, user: &Arc<str>) -> Option<Start> {
    let State { users, rooms, generations, .. } = state;
    let start = match rooms.get_mut(room) {
        Some(slot) => {
            slot.users.insert(user.clone());
            None
        }
        None => {
            let (feed, registration) = AbortHandle::new_pair();
            *generations += 1;
            let slot = RoomSlot { generation: *generations, users: HashSet::from([user.clone()]), feed, live: false, waiting: Vec::new() };
            rooms.insert(room.to_owned(), slot);
            Some((*generations, registration))
        }
    };
    let hold = rooms.get(room).is_some_and(|slot| !slot.live);
    if hold
        && let (Some(slot), Some(u)) = (rooms.get_mut(room), users.get_mut(user))
        && !slot.waiting.contains(user)
    {
        slot.waiting.push(user.clone());
        u.starting += 1;
    }
    start
}

/// Takes `user` out of `room`'s local members, ending the node's
/// subscription to the room with its last one.
fn exit(rooms: &mut HashMap<String, RoomSlot>, users: &mut HashMap<Arc<str>, UserSlot>, room: &str, user: &str) {
    if let Some(slot) = rooms.get_mut(room) {
        slot.users.remove(user);
        if let Some(i) = slot.waiting.iter().position(|w| &**w == user) {
            slot.waiting.swap_remove(i);
            release_hold(users, user);
        }
        if slot.users.is_empty() {
            slot.feed.abort();
            for waiting in std::mem::take(&mut slot.waiting) {
                release_hold(users, &waiting);
            }
            rooms.remove(room);
        }
    }
}

/// One room `user` waited for is live (or gone): when it was the last,
/// their subscriptions recheck before anything newer.
fn release_hold(users: &mut HashMap<Arc<str>, UserSlot>, user: &str) {
    if let Some(slot) = users.get_mut(user) {
        slot.starting = slot.starting.saturating_sub(1);
        if slot.starting == 0 {
            hand(slot, &Arc::new(Pushed::Recheck));
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
        slot.subs.retain(|sub| sub.id != id);
        if slot.subs.is_empty() {
            remove_user(&mut state, user);
        }
    }

    /// Hands a batch, in inbox order, to the users it is for.
    fn dispatch(self: &Arc<Self>, mut items: Vec<Read>) {
        items.sort_by_key(seq_of);
        let mut state = self.lock();
        // Messages published while the connection was down were lost to
        // every subscription at once, after everything handed so far:
        // every user here catches up from their cursor before anything
        // newer.
        let connects = self.client.statistics().connects.load(Ordering::Relaxed);
        if connects != state.connects {
            state.connects = connects;
            tracing::warn!("the push connection to NATS reconnected; every socket here catches up from its cursor");
            for slot in state.users.values_mut() {
                hand(slot, &Arc::new(Pushed::Recheck));
            }
        }
        let mut new_rooms = Vec::new();
        for (source, decoded, msg) in items {
            let state = &mut *state;
            match source {
                Source::Signal(user) => {
                    if let (Some(slot), Ok(payload)) = (state.users.get_mut(&*user), serde_json::from_slice::<Payload>(&msg.payload)) {
                        hand(slot, &Arc::new(Pushed::Signal(payload)));
                    }
                }
                Source::User(user) => {
                    let Some((d, log_seq)) = decoded else { continue };
                    let Some(slot) = state.users.get_mut(&*user) else { continue };
                    let change = own_change(&d.payload, &user).filter(|_| log_seq > 0).map(|(room, joined)| (room.to_owned(), joined));
                    if let Some((room, joined)) = &change {
                        slot.rooms.entry(room.clone()).or_default().record(log_seq, *joined);
                    }
                    // The user's own join is handed before the hold starts:
                    // their cursor is then before anything of the room's.
                    hand(slot, &Arc::new(Pushed::Delivery(d)));
                    match change {
                        Some((room, true)) => {
                            if let Some(start) = enter(state, &room, &user) {
                                new_rooms.push((room, start));
                            }
                        }
                        Some((room, false)) => exit(&mut state.rooms, &mut state.users, &room, &user),
                        None => {}
                    }
                }
                Source::Room(room) => {
                    let Some((d, log_seq)) = decoded else { continue };
                    let State { users, rooms, .. } = state;
                    let Some(members) = rooms.get(&*room) else { continue };
                    // One copy for every member known to be in the room then.
                    let mut shared: Option<Arc<Pushed>> = None;
                    for user in &members.users {
                        let Some(slot) = users.get_mut(user) else { continue };
                        // Their own join or leave came on their own chain.
                        if own_change(&d.payload, user).is_some() {
                            continue;
                        }
                        match slot.rooms.get(&*room).and_then(|t| t.at(log_seq)) {
                            Some(true) => hand(slot, shared.get_or_insert_with(|| Arc::new(Pushed::Delivery(d.clone())))),
                            Some(false) => {}
                            None => {
                                let check = Some(MemberCheck { room: room.to_string(), log_seq });
                                hand(slot, &Arc::new(Pushed::Delivery(Delivery { check, ..d.clone() })));
                            }
                        }
                    }
                }
            }
        }
        drop(state);
        for (room, start) in new_rooms {
            let inner = self.clone();
            tokio::spawn(async move { inner.start_room(room, start).await });
        }
    }

    /// Subscribes the node to a room one of its users just joined; the
    /// users waiting for it then catch up on what was stored before the
    /// subscription took effect.
    async fn start_room(self: Arc<Self>, room: String, (generation, registration): Start) {
        let started = async {
            let sub = self.client.subscribe(room_push_subject(&self.prefix, &room)).await?;
            self.add_feed(sub, Source::Room(room.as_str().into()), registration);
            self.client.flush().await?;
            anyhow::Ok(())
        };
        let outcome = started.await;
        let mut state = self.lock();
        // The room may have been left (and joined again) meanwhile: only
        // this subscription's slot is ours.
        if state.rooms.get(&room).is_none_or(|slot| slot.generation != generation) {
            return;
        }
        match outcome {
            Ok(()) => {
                let State { users, rooms, .. } = &mut *state;
                if let Some(slot) = rooms.get_mut(&room) {
                    slot.live = true;
                    for waiting in std::mem::take(&mut slot.waiting) {
                        release_hold(users, &waiting);
                    }
                }
            }
            Err(e) => {
                // Without the room's feed its members here would miss its
                // messages: their sockets reconnect (and subscribe again).
                tracing::error!(%room, error = %format!("{e:#}"), "cannot subscribe to a room's live deliveries; disconnecting its members' sockets on this node so they resume elsewhere or again");
                let members: Vec<Arc<str>> = state.rooms.get(&room).map(|slot| slot.users.iter().cloned().collect()).unwrap_or_default();
                for user in members {
                    remove_user(&mut state, &user);
                }
            }
        }
    }
}

/// Ends a user's live feed here (their subscriptions see it end).
fn remove_user(state: &mut State, user: &str) {
    let Some(slot) = state.users.remove(user) else { return };
    for feed in &slot.feeds {
        feed.abort();
    }
    for room in slot.rooms.keys() {
        exit(&mut state.rooms, &mut state.users, room, user);
    }
}

/// Takes what is ready on every feed woken since its last visit (see
/// [`Woken`]): each until it has nothing more or gave [`PER_FEED`]. Returns
/// the messages and the highest sequence at or below which the pass is
/// sure to hold every message a cut-short feed still has (`u64::MAX` when
/// none was cut short).
fn drain(live: &mut Woken<Feed>, cx: &mut std::task::Context<'_>) -> (Vec<Read>, u64) {
    let (mut out, mut cut) = (Vec::new(), u64::MAX);
    live.pass(cx, |feed, cx| {
        let (mut taken, mut last) = (0, None);
        loop {
            if taken == PER_FEED {
                // What the feed still holds comes after what it gave (signals
                // have no order to keep).
                if let Some(last) = last {
                    cut = cut.min(last);
                }
                return Visited::More;
            }
            match feed.poll_next_unpin(cx) {
                std::task::Poll::Ready(Some((source, msg))) => {
                    taken += 1;
                    let decoded = if matches!(source, Source::Signal(_)) { None } else { decode(&msg) };
                    if let Some((d, _)) = &decoded {
                        last = Some(d.cursor);
                    }
                    out.push((source, decoded, msg));
                }
                std::task::Poll::Ready(None) => return Visited::Ended,
                // Pending for want of task budget says nothing of the
                // channel (the passes run unconstrained; this is a guard).
                std::task::Poll::Pending if !tokio::task::coop::has_budget_remaining() => return Visited::More,
                std::task::Poll::Pending => return Visited::Drained,
            }
        }
    });
    (out, cut)
}

fn seq_of(read: &Read) -> u64 {
    read.1.as_ref().map_or(0, |(d, _)| d.cursor)
}

/// The highest inbox sequence among `reads` (none: only signals).
fn highest(reads: &[Read]) -> Option<u64> {
    reads.iter().map(seq_of).filter(|&s| s > 0).max()
}

/// The router task. NATS sends the connection its messages in order and
/// async-nats queues them per subscription in that order, each queued (and
/// its subscription woken) before the next: once a pass has seen a
/// message, every earlier one is queued on a subscription that is woken,
/// so the next pass (over the woken subscriptions, [`Woken`]) takes it.
/// Everything up to the previous pass's highest sequence is therefore in
/// hand after this pass, and is dispatched sorted; the rest waits for the
/// next pass (at once when this pass found nothing new).
async fn run(inner: Weak<Inner>, mut feeds: mpsc::UnboundedReceiver<Feed>) {
    let mut live: Woken<Feed> = Woken::default();
    let mut held: Vec<Read> = Vec::new();
    let mut previous_max = 0u64;
    loop {
        // Wait for something new unless messages are held.
        if held.is_empty() {
            tokio::select! {
                feed = feeds.recv() => match feed {
                    Some(feed) => live.push(feed),
                    None => return,
                },
                // Outside tokio's task budget, as every pass: a channel
                // polled with the budget spent answers Pending without
                // registering its waker, and its feed would be taken for
                // drained (see [`Woken`]).
                batch = tokio::task::unconstrained(futures::future::poll_fn(|cx| {
                    let (out, cut) = drain(&mut live, cx);
                    if out.is_empty() { std::task::Poll::Pending } else { std::task::Poll::Ready((out, cut)) }
                })) => {
                    let (out, cut) = batch;
                    previous_max = highest(&out).unwrap_or(previous_max).min(cut);
                    held = out;
                }
            }
            while let Ok(feed) = feeds.try_recv() {
                live.push(feed);
            }
            continue;
        }
        // One more pass (not subject to the task budget: it must empty every
        // woken feed to tell what is complete).
        let (out, cut) = tokio::task::unconstrained(futures::future::poll_fn(|cx| std::task::Poll::Ready(drain(&mut live, cx)))).await;
        let bound = if out.is_empty() { u64::MAX } else { previous_max.min(cut) };
        previous_max = highest(&out).unwrap_or(previous_max).min(cut);
        held.extend(out);
        let (ready, later): (Vec<Read>, Vec<Read>) = held.drain(..).partition(|r| seq_of(r) <= bound);
        held = later;
        let Some(inner) = inner.upgrade() else { return };
        if !ready.is_empty() {
            inner.dispatch(ready);
        }
        while let Ok(feed) = feeds.try_recv() {
            live.push(feed);
        }
        tokio::task::yield_now().await;
    }
}

/// A user's live feed; dropping it leaves the router.
struct Subscription {
    rx: mpsc::Receiver<Arc<Pushed>>,
    inner: Arc<Inner>,
    user: String,
    id: u64,
}

impl futures::Stream for Subscription {
    type Item = Arc<Pushed>;
    fn poll_next(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Arc<Pushed>>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.inner.release(&self.user, self.id);
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn delivery(cursor: u64) -> Arc<Pushed> {
        Arc::new(Pushed::Delivery(Delivery::new(cursor, 0, Payload { event: "message".into(), data: json!({}) })))
    }

    fn taken(rx: &mut mpsc::Receiver<Arc<Pushed>>) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(p) = rx.try_recv() {
            out.push(match &*p {
                Pushed::Delivery(d) => d.cursor.to_string(),
                Pushed::Recheck => "recheck".into(),
                Pushed::Signal(_) => "signal".into(),
            });
        }
        out
    }

    /// A delivery a subscription cannot take (held back while a room
    /// starts, or a full buffer) is never followed by a newer one before
    /// a recheck: the socket catches up from its cursor first.
    #[test]
    fn nothing_newer_reaches_a_subscription_before_the_recheck_of_what_it_missed() {
        let (tx, mut rx) = mpsc::channel(2);
        let user: Arc<str> = "amy".into();
        let mut state = State::default();
        let feeds = [AbortHandle::new_pair().0, AbortHandle::new_pair().0];
        let slot = UserSlot { subs: vec![Sub { id: 1, tx, lagging: false }], rooms: HashMap::new(), feeds, loaded: watch::channel(true).0, starting: 0 };
        state.users.insert(user.clone(), slot);
        // A room that starts here: what comes meanwhile is held back.
        let (generation, _registration) = enter(&mut state, "r", &user).expect("a subscription to start");
        assert!(enter(&mut state, "r", &user).is_none(), "entered twice: still one subscription, one hold");
        hand(state.users.get_mut(&user).unwrap(), &delivery(5));
        assert!(taken(&mut rx).is_empty());
        let State { users, rooms, .. } = &mut state;
        let slot = rooms.get_mut("r").unwrap();
        assert_eq!(slot.generation, generation);
        slot.live = true;
        for waiting in std::mem::take(&mut slot.waiting) {
            release_hold(users, &waiting);
        }
        hand(state.users.get_mut(&user).unwrap(), &delivery(6));
        assert_eq!(taken(&mut rx), ["recheck", "6"]);
        // A full buffer: 7 and 8 fit, 9 does not; 10 comes after a recheck.
        for c in 7..=9 {
            hand(state.users.get_mut(&user).unwrap(), &delivery(c));
        }
        assert_eq!(taken(&mut rx), ["7", "8"]);
        hand(state.users.get_mut(&user).unwrap(), &delivery(10));
        assert_eq!(taken(&mut rx), ["recheck", "10"]);
        // Leaving a room still starting releases the hold.
        assert!(enter(&mut state, "s", &user).is_some());
        exit(&mut state.rooms, &mut state.users, "s", &user);
        assert_eq!(taken(&mut rx), ["recheck"]);
        hand(state.users.get_mut(&user).unwrap(), &delivery(11));
        assert_eq!(taken(&mut rx), ["11"]);
    }
}
