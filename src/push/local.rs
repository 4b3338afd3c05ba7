//! The embedded push bus: an inbox in the node's local store
//! (`natter_projections::local`, the data directory's `projections.redb`).
//!
//! A delivery's cursor is the log sequence of the event that made it (an
//! event makes at most one delivery per user), so cursors survive a
//! restart. The fan-out records how far it has fanned out (the inbox's
//! head) in the same transaction as the deliveries, so a restart fans out
//! only the log's tail, and a crash loses nothing the tail does not make
//! again, identically, before the node serves. Deliveries are kept for the
//! push retention (by the event's time) and at most [`MAX_RETAINED`] in
//! all; a cursor older than that gets `resync`. A message deleted for
//! everyone is rewritten out of the deliveries kept (see `forget_content`).
//!
//! A room's deliveries are stored once for the room ([`To::Room`]), as the
//! distributed inbox does, and addressed to its members as of each event
//! when read: a room message costs one write whatever the room's size. The
//! bus learns who was a member when from the users' own `member-joined` /
//! `member-left` deliveries (the fan-out always stores those on the user's
//! chain, in log order with the room's deliveries) and keeps them in
//! `members`. A replay merges the user's chain with the runs of each room's
//! chain they were a member for; a live room delivery goes to the
//! subscribed members, whose rooms the bus holds in memory.
//!
//! Tables (key → value):
//!
//! ```text
//! inbox        (user, cursor)          → the payload (JSON)
//! inbox-room   (room, cursor)          → the payload (JSON)
//! inbox-order  (cursor, user)          → the event's time (ms): oldest first, for pruning
//! inbox-room-order (cursor, room)      → the same, for the rooms' deliveries
//! inbox-shown  (message, user, cursor) → (): the deliveries showing a message's content
//! inbox-room-shown (message, room, cursor) → (): the same, in the rooms' chains
//! inbox-members (user, room, log seq)  → joined (true) or left (false)
//! inbox-meta   "head" | "floor" | "count" | "members"
//! ```

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use futures::StreamExt;
use futures::stream::BoxStream;
use natter_events::{Event, subjects};
use natter_projections::local::redb::{ReadTransaction, ReadableTable, TableDefinition, WriteTransaction};
use natter_projections::local::{LocalStore, keep};
use natter_projections::{ApplyError, StoreError};
use tokio::sync::mpsc;

use super::router::own_change;
use super::user_rooms::Timeline;
use super::{Delivery, Payload, PushBus, Pushed, Replay, To};
use crate::log::EventLog;

/// Most deliveries kept for resume, whatever the retention (a room's
/// delivery counts once).
pub const MAX_RETAINED: u64 = 250_000;
/// Live items a user's subscription may hold before new ones are dropped
/// (the socket then fills the gap from the inbox, as with core NATS).
const LIVE_BUFFER: usize = 4096;
/// The fan-out's name in the store's record of how far each projection is kept.
const KEPT_AS: &str = super::fanout::NAME;

const INBOX: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("inbox");
const ROOM_INBOX: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("inbox-room");
const ORDER: TableDefinition<(u64, &str), i64> = TableDefinition::new("inbox-order");
const ROOM_ORDER: TableDefinition<(u64, &str), i64> = TableDefinition::new("inbox-room-order");
const SHOWN: TableDefinition<(&str, &str, u64), ()> = TableDefinition::new("inbox-shown");
const ROOM_SHOWN: TableDefinition<(&str, &str, u64), ()> = TableDefinition::new("inbox-room-shown");
const MEMBERS: TableDefinition<(&str, &str, u64), bool> = TableDefinition::new("inbox-members");
const META: TableDefinition<&str, u64> = TableDefinition::new("inbox-meta");
/// Each user's newest cursor, kept by builds before room chains (gone:
/// a live delivery's previous cursor is now the subscription's own).
const LAST_BEFORE_ROOMS: TableDefinition<&str, u64> = TableDefinition::new("inbox-last");

/// One live subscription, with the cursor of the last delivery offered to
/// it (taken or dropped): the next one names it as its previous, so a
/// dropped one is a gap the socket fills from the inbox.
struct Sub {
    tx: mpsc::Sender<Arc<Pushed>>,
    last: u64,
}

/// A user with live subscriptions, and their rooms over the log.
#[derive(Default)]
struct Listener {
    subs: Vec<Sub>,
    rooms: HashMap<String, Timeline>,
}

#[derive(Default)]
struct Live {
    users: HashMap<String, Listener>,
    /// The listening users each room has a timeline for.
    rooms: HashMap<String, HashSet<String>>,
}

impl Live {
    /// Offers a delivery to every subscription of `user`; forgets closed
    /// ones (and the user with the last).
    fn offer(&mut self, user: &str, cursor: u64, payload: &Payload) {
        let Some(listener) = self.users.get_mut(user) else { return };
        listener.subs.retain_mut(|sub| {
            let d = Delivery { cursor, previous: sub.last, payload: payload.clone(), check: None };
            sub.last = cursor;
            !matches!(sub.tx.try_send(Arc::new(Pushed::Delivery(d))), Err(mpsc::error::TrySendError::Closed(_)))
        });
        if listener.subs.is_empty() {
            self.forget(user);
        }
    }

    fn forget(&mut self, user: &str) {
        let Some(listener) = self.users.remove(user) else { return };
        for room in listener.rooms.keys() {
            if let Some(users) = self.rooms.get_mut(room) {
                users.remove(user);
                if users.is_empty() {
                    self.rooms.remove(room);
                }
            }
        }
    }

    /// Takes in a listening user's join or leave.
    fn record(&mut self, user: &str, room: &str, log_seq: u64, joined: bool) {
        let Some(listener) = self.users.get_mut(user) else { return };
        listener.rooms.entry(room.to_owned()).or_default().record(log_seq, joined);
        self.rooms.entry(room.to_owned()).or_default().insert(user.to_owned());
    }

    /// Offers a room's delivery to the listening users who were members as
    /// of its event (a user's own join or leave reaches them on their chain).
    fn offer_room(&mut self, room: &str, cursor: u64, payload: &Payload) {
        let Some(users) = self.rooms.get(room) else { return };
        let members: Vec<String> = users
            .iter()
            .filter(|u| self.users.get(*u).and_then(|l| l.rooms.get(room)).is_some_and(|t| t.at(cursor) == Some(true)))
            .filter(|u| own_change(payload, u).is_none())
            .cloned()
            .collect();
        for user in members {
            self.offer(&user, cursor, payload);
        }
    }
}

/// What a committed batch hands to the live subscriptions, in log order.
enum Out {
    User(String, u64, Payload),
    Room(String, u64, Payload),
    /// A user joined (true) or left a room at a log sequence.
    Change { user: String, room: String, log_seq: u64, joined: bool },
}

pub struct LocalPush {
    retention: Duration,
    store: Arc<LocalStore>,
    live: Mutex<Live>,
}

fn failed(e: impl std::fmt::Display) -> ApplyError {
    ApplyError::Unavailable(format!("inbox: {e}"))
}

fn meta(tx: &WriteTransaction, key: &str) -> Result<u64, ApplyError> {
    Ok(tx.open_table(META)?.get(key)?.map_or(0, |v| v.value()))
}

fn set_meta(tx: &WriteTransaction, key: &str, value: u64) -> Result<(), ApplyError> {
    tx.open_table(META)?.insert(key, value)?;
    Ok(())
}

fn decode(bytes: &[u8]) -> Result<Payload, ApplyError> {
    serde_json::from_slice(bytes).map_err(|e| failed(format!("an unreadable delivery ({e})")))
}

/// The users' and the rooms' (order, inbox, shown) tables, open in `tx`.
fn open_chains(tx: &WriteTransaction) -> Result<[Chain<'_>; 2], ApplyError> {
    let open = |order, inbox, shown| -> Result<Chain<'_>, ApplyError> { Ok((tx.open_table(order)?, tx.open_table(inbox)?, tx.open_table(shown)?)) };
    Ok([open(ORDER, INBOX, SHOWN)?, open(ROOM_ORDER, ROOM_INBOX, ROOM_SHOWN)?])
}

type Chain<'tx> = (
    natter_projections::local::redb::Table<'tx, (u64, &'static str), i64>,
    natter_projections::local::redb::Table<'tx, (&'static str, u64), &'static [u8]>,
    natter_projections::local::redb::Table<'tx, (&'static str, &'static str, u64), ()>,
);

/// `user`'s rooms over the log, as the store has them.
fn rooms_of(tx: &ReadTransaction, user: &str) -> Result<HashMap<String, Timeline>, StoreError> {
    let mut rooms: HashMap<String, Timeline> = HashMap::new();
    for entry in tx.open_table(MEMBERS)?.range((user, "", 0)..)? {
        let (k, v) = entry?;
        let (u, room, log_seq) = k.value();
        if u != user {
            break;
        }
        rooms.entry(room.to_owned()).or_default().record(log_seq, v.value());
    }
    Ok(rooms)
}

impl LocalPush {
    /// The inbox in `store` (its tables created if new).
    pub fn new(store: Arc<LocalStore>, retention: Duration) -> Result<LocalPush, ApplyError> {
        store.write(|tx| {
            tx.open_table(INBOX)?;
            tx.open_table(ROOM_INBOX)?;
            tx.open_table(ORDER)?;
            tx.open_table(ROOM_ORDER)?;
            tx.open_table(SHOWN)?;
            tx.open_table(ROOM_SHOWN)?;
            tx.open_table(MEMBERS)?;
            tx.open_table(META)?;
            tx.delete_table(LAST_BEFORE_ROOMS).map_err(failed)?;
            if meta(tx, "head")? == 0 {
                // Nothing fanned out yet: the fan-out records every change.
                set_meta(tx, "members", 1)?;
            }
            Ok(())
        })?;
        Ok(LocalPush { retention, store, live: Mutex::default() })
    }

    /// An inbox in memory (tests).
    #[cfg(test)]
    pub fn in_memory(retention: Duration) -> LocalPush {
        LocalPush::new(LocalStore::in_memory(), retention).expect("an in-memory inbox")
    }

    /// An inbox kept by a build before room chains fanned out membership
    /// changes it did not record: reads them from the log's member
    /// subjects, once (later ones come with the fan-out's deliveries).
    pub async fn record_earlier_members(&self, log: &dyn EventLog, prefix: &str) -> anyhow::Result<()> {
        let (recorded, head) = self.store.read(|tx| {
            let meta = tx.open_table(META)?;
            Ok((meta.get("members")?.map_or(0, |v| v.value()), meta.get("head")?.map_or(0, |v| v.value())))
        })?;
        if recorded == 1 {
            return Ok(());
        }
        let mut changes = Vec::new();
        for subject in log.subjects_matching(&subjects::member(prefix, "*", "*")).await? {
            for logged in log.history(&subject, head + 1).await? {
                match &logged.envelope.event {
                    Event::MemberJoined(e) => changes.push((e.user_id.clone(), e.room_id.clone(), logged.log_seq, true)),
                    Event::MemberLeft(e) => changes.push((e.user_id.clone(), e.room_id.clone(), logged.log_seq, false)),
                    _ => {}
                }
            }
        }
        let found = changes.len();
        self.store.write(|tx| {
            let mut members = tx.open_table(MEMBERS)?;
            for (user, room, log_seq, joined) in &changes {
                members.insert((user.as_str(), room.as_str(), *log_seq), joined)?;
            }
            drop(members);
            set_meta(tx, "members", 1)
        })?;
        tracing::info!(changes = found, through = head, "recorded the room memberships the inbox was fanned out with");
        Ok(())
    }

    /// Drops the oldest deliveries (a user's or a room's) while they are
    /// past the retention or more than [`MAX_RETAINED`]; every cursor
    /// below the newest dropped then gets `resync`.
    fn prune(&self, tx: &WriteTransaction) -> Result<(), ApplyError> {
        let oldest = Utc::now().timestamp_millis() - self.retention.as_millis() as i64;
        let (mut count, mut floor) = (meta(tx, "count")?, meta(tx, "floor")?);
        let mut chains = open_chains(tx)?;
        loop {
            let mut firsts = Vec::with_capacity(2);
            for (i, (order, _, _)) in chains.iter().enumerate() {
                if let Some((k, v)) = order.first()? {
                    firsts.push((k.value().0, i, k.value().1.to_owned(), v.value()));
                }
            }
            let Some((cursor, i, to, at)) = firsts.into_iter().min() else { break };
            if at >= oldest && count <= MAX_RETAINED {
                break;
            }
            let (order, inbox, shown) = &mut chains[i];
            order.remove((cursor, to.as_str()))?;
            let gone = inbox.remove((to.as_str(), cursor))?.map(|v| decode(v.value())).transpose()?;
            if let Some(id) = gone.as_ref().and_then(|p| crate::wire::content_of(&p.event, &p.data)) {
                shown.remove((id, to.as_str(), cursor))?;
            }
            count = count.saturating_sub(1);
            floor = floor.max(cursor);
        }
        drop(chains);
        set_meta(tx, "count", count)?;
        set_meta(tx, "floor", floor)
    }

    /// A message deleted for everyone leaves every retained delivery that
    /// showed it (whoever holds it, a user or a room): those become its
    /// tombstone. Replies hold no preview of it (sessions read previews
    /// when they emit).
    fn forget_content(tx: &WriteTransaction, deleted: &Payload) -> Result<(), ApplyError> {
        let Some(id) = deleted.data.get("_id").and_then(|v| v.as_str()) else { return Ok(()) };
        for (shown, inbox) in [(SHOWN, INBOX), (ROOM_SHOWN, ROOM_INBOX)] {
            let (mut shown, mut inbox) = (tx.open_table(shown)?, tx.open_table(inbox)?);
            let mut copies = Vec::new();
            for entry in shown.range((id, "", 0)..)? {
                let (k, _) = entry?;
                let (m, to, cursor) = k.value();
                if m != id {
                    break;
                }
                copies.push((to.to_owned(), cursor));
            }
            for (to, cursor) in copies {
                shown.remove((id, to.as_str(), cursor))?;
                let Some(mut p) = inbox.get((to.as_str(), cursor))?.map(|v| decode(v.value())).transpose()? else { continue };
                crate::wire::tombstone(&mut p.data);
                inbox.insert((to.as_str(), cursor), serde_json::to_vec(&p).map_err(failed)?.as_slice())?;
            }
        }
        Ok(())
    }

    /// Stores, in `tx`, the deliveries of the event `event_id` at
    /// `log_seq`, which happened at `at_ms` (events older than the
    /// retention deliver nothing, but their joins and leaves count), with
    /// how far the fan-out has gone; adds what to hand the live
    /// subscriptions once committed to `out`.
    fn store(&self, tx: &WriteTransaction, (log_seq, at_ms, event_id): (u64, i64, &str), deliveries: Vec<(To, Payload)>, out: &mut Vec<Out>) -> Result<(), ApplyError> {
        if log_seq <= meta(tx, "head")? {
            return Ok(()); // already fanned out
        }
        set_meta(tx, "head", log_seq)?;
        keep(tx, KEPT_AS, log_seq, event_id)?;
        let mut members = tx.open_table(MEMBERS)?;
        for (to, payload) in &deliveries {
            if let To::User(user) = to {
                if let Some((room, joined)) = own_change(payload, user) {
                    members.insert((user.as_str(), room, log_seq), joined)?;
                    out.push(Out::Change { user: user.clone(), room: room.to_owned(), log_seq, joined });
                }
            }
        }
        drop(members);
        if at_ms < Utc::now().timestamp_millis() - self.retention.as_millis() as i64 {
            return set_meta(tx, "floor", log_seq);
        }
        // An event deleting a message makes only its tombstones, all for
        // that one message (`fanout::deliveries`): its content is forgotten
        // once, before they are stored.
        if let Some((_, deleted)) = deliveries.iter().find(|(_, p)| p.event == "messageDeleted") {
            Self::forget_content(tx, deleted)?;
        }
        let mut count = meta(tx, "count")?;
        let mut chains = open_chains(tx)?;
        for (to, payload) in deliveries {
            let (chain, name) = match &to {
                To::User(user) => (0, user.as_str()),
                To::Room(room) => (1, room.as_str()),
            };
            let (order, inbox, shown) = &mut chains[chain];
            if let Some(id) = crate::wire::content_of(&payload.event, &payload.data) {
                shown.insert((id, name, log_seq), ())?;
            }
            order.insert((log_seq, name), at_ms)?;
            inbox.insert((name, log_seq), serde_json::to_vec(&payload).map_err(failed)?.as_slice())?;
            count += 1;
            out.push(match to {
                To::User(user) => Out::User(user, log_seq, payload),
                To::Room(room) => Out::Room(room, log_seq, payload),
            });
        }
        drop(chains);
        set_meta(tx, "count", count)
    }

    /// Stores the deliveries of several events (`(log_seq, at_ms,
    /// event_id)` and theirs, in log order) in one transaction, then
    /// hands them to the live subscriptions.
    fn store_all(&self, events: Vec<((u64, i64, &str), Vec<(To, Payload)>)>) -> Result<(), ApplyError> {
        let (mut out, mut floor) = (Vec::new(), 0);
        self.store.write(|tx| {
            for (event, deliveries) in events {
                self.store(tx, event, deliveries, &mut out)?;
            }
            self.prune(tx)?;
            floor = meta(tx, "floor")?;
            Ok(())
        })?;
        let mut live = self.live.lock().expect("live subscriptions lock");
        for item in out {
            match item {
                Out::Change { user, room, log_seq, joined } => live.record(&user, &room, log_seq, joined),
                // Not one the prune just dropped (its cursor would resync).
                Out::User(_, cursor, _) | Out::Room(_, cursor, _) if cursor <= floor => {}
                Out::User(user, cursor, payload) => live.offer(&user, cursor, &payload),
                Out::Room(room, cursor, payload) => live.offer_room(&room, cursor, &payload),
            }
        }
        Ok(())
    }

    /// Stores the deliveries of the event `event_id` at `log_seq`, which
    /// happened at `at_ms`, then publishes them (tests).
    #[cfg(test)]
    pub fn deliver_at(&self, log_seq: u64, at_ms: i64, event_id: &str, deliveries: Vec<(To, Payload)>) -> Result<(), ApplyError> {
        self.store_all(vec![((log_seq, at_ms, event_id), deliveries)])
    }

    /// How far the fan-out has gone: the log sequence of the newest event
    /// it fanned out (a restart resumes after it).
    pub fn kept_through(&self) -> Result<u64, ApplyError> {
        Ok(self.store.read(|tx| Ok(tx.open_table(META)?.get("head")?.map_or(0, |v| v.value())))?)
    }
}

/// The first `limit` deliveries of `user` after `cursor`: their own chain
/// and the runs of their rooms' chains they were a member for, merged in
/// cursor order.
fn page_of(tx: &ReadTransaction, user: &str, cursor: u64, limit: usize) -> Result<Vec<Delivery>, StoreError> {
    let unreadable = |e: serde_json::Error| StoreError::Unavailable(format!("inbox: an unreadable delivery ({e})"));
    let mut found: Vec<(u64, Vec<u8>)> = Vec::new();
    for entry in tx.open_table(INBOX)?.range((user, cursor + 1)..)?.take(limit) {
        let (k, v) = entry?;
        if k.value().0 != user {
            break;
        }
        found.push((k.value().1, v.value().to_vec()));
    }
    let room_inbox = tx.open_table(ROOM_INBOX)?;
    for (room, timeline) in rooms_of(tx, user)? {
        let mut taken = 0;
        for (first, last) in timeline.member_runs(cursor) {
            for entry in room_inbox.range((room.as_str(), first)..=(room.as_str(), last))?.take(limit - taken) {
                let (k, v) = entry?;
                found.push((k.value().1, v.value().to_vec()));
                taken += 1;
            }
            if taken == limit {
                break;
            }
        }
    }
    found.sort_unstable_by_key(|(c, _)| *c);
    found.dedup_by_key(|(c, _)| *c);
    found.truncate(limit);
    let mut previous = cursor;
    found
        .into_iter()
        .map(|(c, bytes)| {
            let payload = serde_json::from_slice(&bytes).map_err(unreadable)?;
            let d = Delivery { cursor: c, previous, payload, check: None };
            previous = c;
            Ok(d)
        })
        .collect()
}

#[async_trait]
impl PushBus for LocalPush {
    async fn deliver(&self, event: &natter_events::Envelope, log_seq: u64, deliveries: Vec<(To, Payload)>) -> Result<(), String> {
        self.deliver_batch(vec![(event, log_seq, deliveries)]).await
    }

    async fn deliver_batch(&self, batch: Vec<(&natter_events::Envelope, u64, Vec<(To, Payload)>)>) -> Result<(), String> {
        let ids: Vec<String> = batch.iter().map(|(event, _, _)| event.id.to_string()).collect();
        let mut events = Vec::with_capacity(batch.len());
        for ((event, log_seq, deliveries), id) in batch.into_iter().zip(&ids) {
            if log_seq == 0 {
                return Err("the embedded push bus needs the event's log sequence".into());
            }
            events.push(((log_seq, event.at.timestamp_millis(), id.as_str()), deliveries));
        }
        self.store_all(events).map_err(|e| e.to_string())
    }

    async fn kept_through(&self) -> u64 {
        self.kept_through().unwrap_or(0)
    }

    async fn head(&self) -> anyhow::Result<u64> {
        Ok(self.kept_through()?)
    }

    async fn replay(&self, user: &str, cursor: u64, limit: usize) -> anyhow::Result<Replay> {
        Ok(self.store.read(|tx| {
            let meta = tx.open_table(META)?;
            let (head, floor) = (meta.get("head")?.map_or(0, |v| v.value()), meta.get("floor")?.map_or(0, |v| v.value()));
            if cursor > head || cursor < floor {
                return Ok(Replay::TooOld { head });
            }
            Ok(Replay::Page(page_of(tx, user, cursor, limit)?))
        })?)
    }

    async fn subscribe(&self, user: &str) -> anyhow::Result<BoxStream<'static, Arc<Pushed>>> {
        let (tx, mut rx) = mpsc::channel(LIVE_BUFFER);
        // Under the lock: a batch committed after this read hands its joins
        // and leaves to the listener below, one committed before is in it.
        let mut live = self.live.lock().expect("live subscriptions lock");
        if !live.users.contains_key(user) {
            let rooms = self.store.read(|tx| rooms_of(tx, user))?;
            for room in rooms.keys() {
                live.rooms.entry(room.clone()).or_default().insert(user.to_owned());
            }
            live.users.insert(user.to_owned(), Listener { subs: Vec::new(), rooms });
        }
        let listener = live.users.get_mut(user).expect("just inserted");
        // Forget subscriptions already dropped, so a client reconnecting in
        // a loop to a quiet user cannot pile them up.
        listener.subs.retain(|sub| !sub.tx.is_closed());
        listener.subs.push(Sub { tx, last: 0 });
        Ok(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed())
    }

    async fn signal(&self, to: &str, payload: &Payload) -> anyhow::Result<()> {
        let mut live = self.live.lock().expect("live subscriptions lock");
        let Some(listener) = live.users.get_mut(to) else { return Ok(()) };
        let pushed = Arc::new(Pushed::Signal(payload.clone()));
        listener.subs.retain(|sub| !matches!(sub.tx.try_send(pushed.clone()), Err(mpsc::error::TrySendError::Closed(_))));
        if listener.subs.is_empty() {
            live.forget(to);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;
    use serde_json::json;

    use super::*;

    fn u(name: &str) -> To {
        To::User(name.into())
    }

    fn p(n: u64) -> Payload {
        Payload { event: "newMessage".into(), data: json!({ "n": n }) }
    }

    fn cursors(r: Replay) -> Vec<(u64, u64)> {
        match r {
            Replay::Page(page) => page.iter().map(|d| (d.cursor, d.previous)).collect(),
            Replay::TooOld { head } => panic!("too old, head {head}"),
        }
    }

    #[tokio::test]
    async fn cursors_are_log_sequences_and_replay_is_per_user() {
        let bus = LocalPush::in_memory(Duration::from_secs(3600));
        let mut live = bus.subscribe("bob").await.unwrap();
        let now = Utc::now().timestamp_millis();
        bus.deliver_at(1, now, "e", vec![(u("bob"), p(1)), (u("amy"), p(1))]).unwrap();
        bus.deliver_at(2, now, "e", vec![]).unwrap();
        bus.deliver_at(3, now, "e", vec![(u("amy"), p(3))]).unwrap();
        bus.deliver_at(4, now, "e", vec![(u("bob"), p(4))]).unwrap();
        // Delivering an event again does nothing.
        bus.deliver_at(4, now, "e", vec![(u("bob"), p(4))]).unwrap();
        assert_eq!(bus.head().await.unwrap(), 4);
        assert_eq!(cursors(bus.replay("bob", 0, 10).await.unwrap()), [(1, 0), (4, 1)]);
        assert_eq!(cursors(bus.replay("amy", 1, 10).await.unwrap()), [(3, 1)]);
        assert_eq!(cursors(bus.replay("bob", 4, 10).await.unwrap()), []);
        for want in [(1, 0), (4, 1)] {
            let Some(Pushed::Delivery(d)) = live.next().await.as_deref().cloned() else { panic!("no live delivery") };
            assert_eq!((d.cursor, d.previous), want);
        }
        assert!(matches!(bus.replay("bob", 5, 10).await.unwrap(), Replay::TooOld { head: 4 }));
    }

    #[tokio::test]
    async fn a_deleted_message_leaves_the_deliveries_kept() {
        let bus = LocalPush::in_memory(Duration::from_secs(3600));
        let now = Utc::now().timestamp_millis();
        let sent = |id: &str, text: &str| Payload { event: "newMessage".into(), data: json!({ "_id": id, "message": text, "seq": 1 }) };
        // Amy got the message too, then left: the tombstone goes to Bob only.
        bus.deliver_at(1, now, "e", vec![(u("bob"), sent("m1", "a secret")), (u("amy"), sent("m1", "a secret"))]).unwrap();
        bus.deliver_at(2, now, "e", vec![(u("bob"), Payload { event: "messageUpdated".into(), data: json!({ "_id": "m1", "message": "a secret, edited" }) })]).unwrap();
        bus.deliver_at(3, now, "e", vec![(u("bob"), sent("m2", "hm?"))]).unwrap();
        let deleted = Payload { event: "messageDeleted".into(), data: json!({ "_id": "m1", "seq": 1, "deleted": true }) };
        bus.deliver_at(4, now, "e", vec![(u("bob"), deleted)]).unwrap();
        for user in ["bob", "amy"] {
            let Replay::Page(page) = bus.replay(user, 0, 10).await.unwrap() else { panic!("a page") };
            assert_eq!(page[0].payload.data, json!({ "_id": "m1", "seq": 1, "deleted": true }), "{user}");
            let all = serde_json::to_string(&page.iter().map(|d| &d.payload.data).collect::<Vec<_>>()).unwrap();
            assert!(!all.contains("a secret"), "{user}: {all}");
        }
        // The deleted message left the index (its copies are tombstones).
        let shown = bus
            .store
            .read(|tx| Ok(tx.open_table(SHOWN)?.range::<(&str, &str, u64)>(..)?.map(|e| e.unwrap().0.value().0.to_owned()).collect::<Vec<_>>()))
            .unwrap();
        assert_eq!(shown, ["m2"]);
    }

    fn change(event: &str, user: &str) -> Payload {
        Payload { event: event.into(), data: json!({ "roomId": "r", "userId": user }) }
    }

    fn room(n: u64) -> Payload {
        Payload { event: "message".into(), data: json!({ "n": n }) }
    }

    /// The room's events as the fan-out stores them: amy and bob join,
    /// a message, amy leaves, a message, and a DM to amy.
    fn room_script(bus: &LocalPush, now: i64) {
        let r = || To::Room("r".into());
        bus.deliver_at(1, now, "e1", vec![(r(), change("member-joined", "amy")), (u("amy"), change("member-joined", "amy"))]).unwrap();
        bus.deliver_at(2, now, "e2", vec![(r(), change("member-joined", "bob")), (u("bob"), change("member-joined", "bob"))]).unwrap();
        bus.deliver_at(3, now, "e3", vec![(r(), room(3))]).unwrap();
        bus.deliver_at(4, now, "e4", vec![(r(), change("member-left", "amy")), (u("amy"), change("member-left", "amy"))]).unwrap();
        bus.deliver_at(5, now, "e5", vec![(r(), room(5))]).unwrap();
        bus.deliver_at(6, now, "e6", vec![(u("amy"), p(6))]).unwrap();
    }

    /// A room's delivery is stored once and reaches, replayed or live, the
    /// users who were members as of its event, merged with their own
    /// chain in cursor order; a user's own join or leave comes once.
    #[tokio::test]
    async fn room_deliveries_are_stored_once_and_addressed_to_the_members_as_of_each_event() {
        let bus = LocalPush::in_memory(Duration::from_secs(3600));
        let mut bob = bus.subscribe("bob").await.unwrap();
        let mut carol = bus.subscribe("carol").await.unwrap();
        room_script(&bus, Utc::now().timestamp_millis());
        let events = |r: Replay| match r {
            Replay::Page(page) => page.iter().map(|d| (d.cursor, d.previous, d.payload.event.clone())).collect::<Vec<_>>(),
            Replay::TooOld { head } => panic!("too old, head {head}"),
        };
        let amy = [(1, 0, "member-joined"), (2, 1, "member-joined"), (3, 2, "message"), (4, 3, "member-left"), (6, 4, "newMessage")];
        assert_eq!(events(bus.replay("amy", 0, 10).await.unwrap()), amy.map(|(c, p, e)| (c, p, e.to_owned())));
        let from_bob = [(2, 0, "member-joined"), (3, 2, "message"), (4, 3, "member-left"), (5, 4, "message")];
        assert_eq!(events(bus.replay("bob", 0, 10).await.unwrap()), from_bob.map(|(c, p, e)| (c, p, e.to_owned())));
        assert_eq!(cursors(bus.replay("bob", 3, 10).await.unwrap()), [(4, 3), (5, 4)]);
        assert_eq!(cursors(bus.replay("amy", 0, 2).await.unwrap()), [(1, 0), (2, 1)], "a page");
        assert_eq!(cursors(bus.replay("amy", 4, 10).await.unwrap()), [(6, 4)], "nothing of the room after amy left");
        assert_eq!(cursors(bus.replay("carol", 0, 10).await.unwrap()), []);
        // Live, bob gets what his replay has, with the same chain.
        for want in [(2, 0), (3, 2), (4, 3), (5, 4)] {
            let Some(Pushed::Delivery(d)) = bob.next().await.as_deref().cloned() else { panic!("no live delivery") };
            assert_eq!((d.cursor, d.previous), want);
        }
        assert!(carol.next().now_or_never().is_none(), "carol is in no room");
        // The room's deliveries are stored once each.
        let stored = bus.store.read(|tx| Ok(natter_projections::local::redb::ReadableTableMetadata::len(&tx.open_table(ROOM_INBOX)?)?)).unwrap();
        assert_eq!(stored, 5);
    }

    /// A user who subscribes after joining gets the room's live deliveries
    /// (their rooms are read from the store), and a live delivery dropped
    /// for a full subscription names it as the next one's previous.
    #[tokio::test]
    async fn a_later_subscription_knows_its_rooms_and_sees_a_dropped_delivery_as_a_gap() {
        let bus = LocalPush::in_memory(Duration::from_secs(3600));
        let now = Utc::now().timestamp_millis();
        let r = || To::Room("r".into());
        bus.deliver_at(1, now, "e1", vec![(r(), change("member-joined", "bob")), (u("bob"), change("member-joined", "bob"))]).unwrap();
        let mut bob = bus.subscribe("bob").await.unwrap();
        bus.deliver_at(2, now, "e2", vec![(r(), room(2))]).unwrap();
        let Some(Pushed::Delivery(d)) = bob.next().await.as_deref().cloned() else { panic!("no live delivery") };
        assert_eq!((d.cursor, d.previous, d.payload.event.as_str()), (2, 0, "message"));
        // Fill the subscription: the next delivery is dropped, and the one
        // after it (once there is room) names it.
        let mut cursor = 3;
        while bus.live.lock().unwrap().users["bob"].subs[0].tx.capacity() > 0 {
            bus.deliver_at(cursor, now, "e", vec![(u("bob"), p(cursor))]).unwrap();
            cursor += 1;
        }
        let dropped = cursor;
        bus.deliver_at(dropped, now, "e", vec![(r(), room(dropped))]).unwrap();
        for want in 3..dropped {
            let Some(Pushed::Delivery(d)) = bob.next().await.as_deref().cloned() else { panic!("no live delivery") };
            assert_eq!(d.cursor, want);
        }
        bus.deliver_at(dropped + 1, now, "e", vec![(r(), room(dropped + 1))]).unwrap();
        let Some(Pushed::Delivery(d)) = bob.next().await.as_deref().cloned() else { panic!("no live delivery") };
        assert_eq!((d.cursor, d.previous), (dropped + 1, dropped), "the dropped delivery is a gap");
    }

    /// An inbox fanned out before room chains learns the memberships it
    /// missed from the log, once.
    #[tokio::test]
    async fn an_inbox_from_before_room_chains_records_the_memberships_from_the_log() {
        use natter_events::{Envelope, MemberJoined, MemberLeft};

        use crate::config::SyncPolicy;
        use crate::log::file::FileLog;

        let dir = std::env::temp_dir().join(format!("natter-inbox-members-{}", uuid::Uuid::new_v4().simple()));
        let log = FileLog::open(&dir, SyncPolicy::Os, Duration::from_secs(60)).unwrap();
        let joined = |u: &str| Event::MemberJoined(MemberJoined { room_id: "r".into(), user_id: u.into(), seen_up_to: 0, ..Default::default() });
        let script = [("amy", 1, joined("amy")), ("bob", 1, joined("bob")), ("amy", 2, Event::MemberLeft(MemberLeft { room_id: "r".into(), user_id: "amy".into(), ..Default::default() }))];
        let mut last = HashMap::new();
        for (user, position, event) in script {
            let env = Envelope::new(format!("{user}:{position}"), subjects::member("p", "r", user), position, event);
            last.insert(user, log.append(&env, last.get(user).copied().unwrap_or(0)).await.unwrap().log_seq);
        }
        let bus = LocalPush::in_memory(Duration::from_secs(3600));
        // What an earlier build left: the events fanned out, no memberships.
        bus.store.write(|tx| {
            set_meta(tx, "head", 3)?;
            set_meta(tx, "members", 0)
        }).unwrap();
        bus.record_earlier_members(&log, "p").await.unwrap();
        bus.deliver_at(4, Utc::now().timestamp_millis(), "e4", vec![(To::Room("r".into()), room(4))]).unwrap();
        assert_eq!(cursors(bus.replay("bob", 3, 10).await.unwrap()), [(4, 3)]);
        assert_eq!(cursors(bus.replay("amy", 3, 10).await.unwrap()), [], "amy left");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn expired_deliveries_make_older_cursors_resync() {
        let bus = LocalPush::in_memory(Duration::from_secs(60));
        let old = Utc::now().timestamp_millis() - 120_000;
        bus.deliver_at(1, old, "e", vec![(u("bob"), p(1))]).unwrap();
        bus.deliver_at(2, Utc::now().timestamp_millis(), "e", vec![(u("bob"), p(2))]).unwrap();
        assert!(matches!(bus.replay("bob", 0, 10).await.unwrap(), Replay::TooOld { head: 2 }));
        assert_eq!(cursors(bus.replay("bob", 1, 10).await.unwrap()), [(2, 1)]);
    }
}
