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
//! chain, in log order with the room's deliveries) and records them
//! ([`memberships`]). A replay merges the user's chain with the runs of each room's
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
//! inbox-meta   "head" | "floor" | "count" | "members" (recorded through)
//! inbox-members, inbox-members-order   see [`memberships`]
//! ```

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

use self::live::{Hand, Live};
use super::router::own_change;
use super::{Delivery, Payload, PushBus, Pushed, Replay, To};
use crate::log::EventLog;

mod live;
mod memberships;

/// Most deliveries kept for resume, whatever the retention (a room's
/// delivery counts once).
pub const MAX_RETAINED: u64 = 250_000;
/// The fan-out's name in the store's record of how far each projection is kept.
const KEPT_AS: &str = super::fanout::NAME;

const INBOX: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("inbox");
const ROOM_INBOX: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("inbox-room");
const ORDER: TableDefinition<(u64, &str), i64> = TableDefinition::new("inbox-order");
const ROOM_ORDER: TableDefinition<(u64, &str), i64> = TableDefinition::new("inbox-room-order");
const SHOWN: TableDefinition<(&str, &str, u64), ()> = TableDefinition::new("inbox-shown");
const ROOM_SHOWN: TableDefinition<(&str, &str, u64), ()> = TableDefinition::new("inbox-room-shown");
const META: TableDefinition<&str, u64> = TableDefinition::new("inbox-meta");
/// Each user's newest cursor, kept by builds before room chains (gone:
/// a live delivery's previous cursor is now the subscription's own).
const LAST_BEFORE_ROOMS: TableDefinition<&str, u64> = TableDefinition::new("inbox-last");

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
    live: Arc<Mutex<Live>>,
    /// Held from a batch's commit through its hand-out, so deliveries
    /// reach the subscriptions in cursor order.
    writing: Mutex<()>,
}

fn failed(e: impl std::fmt::Display) -> ApplyError {
    ApplyError::Unavailable(format!("inbox: {e}"))
}

/// A value of `inbox-meta` (0: never set).
fn meta_in(table: &impl ReadableTable<&'static str, u64>, key: &str) -> Result<u64, natter_projections::local::redb::StorageError> {
    Ok(table.get(key)?.map_or(0, |v| v.value()))
}

fn meta(tx: &WriteTransaction, key: &str) -> Result<u64, ApplyError> {
    Ok(meta_in(&tx.open_table(META)?, key)?)
}

fn set_meta(tx: &WriteTransaction, key: &str, value: u64) -> Result<(), ApplyError> {
    tx.open_table(META)?.insert(key, value)?;
    Ok(())
}

/// The inbox's counters in `inbox-meta`, read once per write transaction
/// and written back once, those changed only.
#[derive(Clone, Copy)]
struct Counters {
    /// The newest log sequence fanned out.
    head: u64,
    /// Deliveries retained.
    count: u64,
    /// The newest cursor pruned: every cursor below it resyncs.
    floor: u64,
    /// Room memberships are recorded through this log sequence.
    members: u64,
}

type MetaTable<'tx> = natter_projections::local::redb::Table<'tx, &'static str, u64>;

impl Counters {
    fn read(meta: &MetaTable<'_>) -> Result<Counters, ApplyError> {
        let get = |key| meta_in(meta, key);
        Ok(Counters { head: get("head")?, count: get("count")?, floor: get("floor")?, members: get("members")? })
    }

    fn write(&self, meta: &mut MetaTable<'_>, before: &Counters) -> Result<(), ApplyError> {
        for (key, now, was) in [("head", self.head, before.head), ("count", self.count, before.count), ("floor", self.floor, before.floor), ("members", self.members, before.members)] {
            if now != was {
                meta.insert(key, now)?;
            }
        }
        Ok(())
    }
}

/// A meta value, read in a read transaction (0: never set).
fn read_meta(tx: &ReadTransaction, key: &str) -> Result<u64, StoreError> {
    Ok(meta_in(&tx.open_table(META)?, key)?)
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
            memberships::open(tx)?;
            tx.open_table(META)?;
            tx.delete_table(LAST_BEFORE_ROOMS).map_err(failed)?;
            Ok(())
        })?;
        Ok(LocalPush { retention, store, live: Arc::default(), writing: Mutex::default() })
    }

    /// An inbox in memory (tests).
    #[cfg(test)]
    pub fn in_memory(retention: Duration) -> LocalPush {
        LocalPush::new(LocalStore::in_memory(), retention).expect("an in-memory inbox")
    }

    /// Records the joins and leaves of events a build before room chains
    /// fanned out (it kept no memberships): read from the log's member
    /// subjects, once (the fan-out records those of later events).
    pub async fn record_earlier_members(&self, log: &dyn EventLog, prefix: &str) -> anyhow::Result<()> {
        let (through, head) = self.store.read(|tx| Ok((read_meta(tx, "members")?, read_meta(tx, "head")?)))?;
        if through >= head {
            return Ok(());
        }
        let mut changes = Vec::new();
        for subject in log.subjects_matching(&subjects::member(prefix, "*", "*")).await? {
            for logged in log.history(&subject, head + 1).await?.into_iter().filter(|l| l.log_seq > through) {
                match &logged.envelope.event {
                    Event::MemberJoined(e) => changes.push((e.user_id.clone(), e.room_id.clone(), logged.log_seq, true)),
                    Event::MemberLeft(e) => changes.push((e.user_id.clone(), e.room_id.clone(), logged.log_seq, false)),
                    _ => {}
                }
            }
        }
        let found = changes.len();
        self.store.write(|tx| {
            for (user, room, log_seq, joined) in &changes {
                memberships::record(tx, user, room, *log_seq, *joined)?;
            }
            memberships::compact(tx, meta(tx, "floor")?)?;
            set_meta(tx, "members", head)
        })?;
        tracing::info!(changes = found, after = through, through = head, "recorded the room memberships of events fanned out by an earlier build");
        Ok(())
    }

    /// Drops the oldest deliveries (a user's or a room's) while they are
    /// past the retention or more than [`MAX_RETAINED`]; every cursor
    /// below the newest dropped then gets `resync`.
    fn prune(&self, chains: &mut [Chain<'_>; 2], counters: &mut Counters) -> Result<(), ApplyError> {
        let oldest = Utc::now().timestamp_millis() - self.retention.as_millis() as i64;
        loop {
            let mut firsts = Vec::with_capacity(2);
            for (i, (order, _, _)) in chains.iter().enumerate() {
                if let Some((k, v)) = order.first()? {
                    firsts.push((k.value().0, i, k.value().1.to_owned(), v.value()));
                }
            }
            let Some((cursor, i, to, at)) = firsts.into_iter().min() else { break };
            if at >= oldest && counters.count <= MAX_RETAINED {
                break;
            }
            let (order, inbox, shown) = &mut chains[i];
            order.remove((cursor, to.as_str()))?;
            let gone = inbox.remove((to.as_str(), cursor))?.map(|v| decode(v.value())).transpose()?;
            if let Some(id) = gone.as_ref().and_then(|p| crate::wire::content_of(&p.event, &p.data)) {
                shown.remove((id, to.as_str(), cursor))?;
            }
            counters.count = counters.count.saturating_sub(1);
            counters.floor = counters.floor.max(cursor);
        }
        Ok(())
    }

    /// A message deleted for everyone leaves every retained delivery that
    /// showed it (whoever holds it, a user or a room): those become its
    /// tombstone. Replies hold no preview of it (sessions read previews
    /// when they emit).
    fn forget_content(chains: &mut [Chain<'_>; 2], deleted: &Payload) -> Result<(), ApplyError> {
        let Some(id) = deleted.data.get("_id").and_then(|v| v.as_str()) else { return Ok(()) };
        for (_, inbox, shown) in chains.iter_mut() {
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

    /// Stores, in `tx`, the deliveries of the event at `log_seq`, which
    /// happened at `at_ms` (events older than the retention deliver
    /// nothing, but their joins and leaves count), with how far the
    /// fan-out has gone (`counters`); adds what to hand the live
    /// subscriptions once committed to `out`. False if it was fanned out
    /// before.
    fn store(
        &self,
        tx: &WriteTransaction,
        chains: &mut [Chain<'_>; 2],
        counters: &mut Counters,
        (log_seq, at_ms): (u64, i64),
        deliveries: Vec<(To, Payload)>,
        out: &mut Vec<Out>,
    ) -> Result<bool, ApplyError> {
        if log_seq <= counters.head {
            return Ok(false); // already fanned out
        }
        counters.head = log_seq;
        for (to, payload) in &deliveries {
            if let To::User(user) = to {
                if let Some((room, joined)) = own_change(payload, user) {
                    memberships::record(tx, user, room, log_seq, joined)?;
                    out.push(Out::Change { user: user.clone(), room: room.to_owned(), log_seq, joined });
                }
            }
        }
        if at_ms < Utc::now().timestamp_millis() - self.retention.as_millis() as i64 {
            counters.floor = log_seq;
            return Ok(true);
        }
        // An event deleting a message makes only its tombstones, all for
        // that one message (`fanout::deliveries`): its content is forgotten
        // once, before they are stored.
        if let Some((_, deleted)) = deliveries.iter().find(|(_, p)| p.event == "messageDeleted") {
            Self::forget_content(chains, deleted)?;
        }
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
            counters.count += 1;
            out.push(match to {
                To::User(user) => Out::User(user, log_seq, payload),
                To::Room(room) => Out::Room(room, log_seq, payload),
            });
        }
        Ok(true)
    }

    /// Stores the deliveries of several events (`(log_seq, at_ms,
    /// event_id)` and theirs, in log order) in one transaction, then
    /// hands them to the live subscriptions. Each table is opened once
    /// and each counter written once per transaction: opening a table
    /// costs a lookup in the store's table of tables, and was most of a
    /// DM's inbox write.
    fn store_all(&self, events: Vec<((u64, i64, &str), Vec<(To, Payload)>)>) -> Result<(), ApplyError> {
        let (mut out, mut floor) = (Vec::new(), 0);
        // One writer (the fan-out), so never waited for in practice. Nothing
        // in the commit or the hand-out panics (a failed write is an error,
        // the hand-out only updates maps and tries sends).
        let _writing = self.writing.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.store.write(|tx| {
            let mut meta = tx.open_table(META)?;
            let before = Counters::read(&meta)?;
            let mut counters = before;
            let mut chains = open_chains(tx)?;
            let mut newest = None;
            for ((log_seq, at_ms, event_id), deliveries) in events {
                if self.store(tx, &mut chains, &mut counters, (log_seq, at_ms), deliveries, &mut out)? {
                    newest = Some((log_seq, event_id));
                }
            }
            if let Some((log_seq, event_id)) = newest {
                keep(tx, KEPT_AS, log_seq, event_id)?;
            }
            // Every membership change of what was fanned out is recorded.
            counters.members = counters.head;
            self.prune(&mut chains, &mut counters)?;
            drop(chains);
            // The membership changes the floor passed, once it moved or
            // more were recorded (an earlier transaction compacted up to
            // its floor).
            if counters.floor > before.floor || out.iter().any(|o| matches!(o, Out::Change { .. })) {
                memberships::compact(tx, counters.floor)?;
            }
            counters.write(&mut meta, &before)?;
            floor = counters.floor;
            Ok(())
        })?;
        let mut live = self.live();
        for item in out {
            // One the prune just dropped is not sent (its cursor would
            // resync) but still counts as offered: a gap for the socket.
            let hand = |cursor| if cursor > floor { Hand::Send } else { Hand::Skip };
            match item {
                Out::Change { user, room, log_seq, joined } => live.record(&user, &room, log_seq, joined),
                Out::User(user, cursor, payload) => live.offer(&user, cursor, &payload, hand(cursor)),
                Out::Room(room, cursor, payload) => live.offer_room(&room, cursor, &payload, hand(cursor)),
            }
        }
        Ok(())
    }

    fn live(&self) -> std::sync::MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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
        Ok(self.store.read(|tx| read_meta(tx, "head"))?)
    }
}

/// The first `limit` deliveries of `user` after `cursor`: their own chain
/// and the runs of their rooms' chains they were a member for, merged in
/// cursor order. Cursors are gathered first (each room read only up to the
/// `limit`-th found so far), then the page's payloads read.
fn page_of(tx: &ReadTransaction, user: &str, cursor: u64, limit: usize) -> Result<Vec<Delivery>, StoreError> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    // (cursor, the room whose chain it is on; None: the user's own)
    let mut found: Vec<(u64, Option<String>)> = Vec::new();
    let inbox = tx.open_table(INBOX)?;
    for entry in inbox.range((user, cursor + 1)..)?.take(limit) {
        let (k, _) = entry?;
        if k.value().0 != user {
            break;
        }
        found.push((k.value().1, None));
    }
    let bound = |found: &[(u64, Option<String>)]| if found.len() < limit { u64::MAX } else { found[limit - 1].0 };
    let room_inbox = tx.open_table(ROOM_INBOX)?;
    for (room, timeline) in memberships::rooms_of(tx, user)? {
        for (first, last) in timeline.member_runs(cursor) {
            // `found` is sorted and at most `limit` long here: nothing past
            // its last entry can make the page once it is full.
            let last = last.min(bound(&found));
            if first > last {
                break;
            }
            let before = found.len();
            for entry in room_inbox.range((room.as_str(), first)..=(room.as_str(), last))?.take(limit) {
                found.push((entry?.0.value().1, Some(room.clone())));
            }
            if found.len() > before {
                found.sort(); // the user's own first on a (never expected) tie
                found.dedup_by_key(|(c, _)| *c);
                found.truncate(limit);
            }
        }
    }
    let unreadable = |e: serde_json::Error| StoreError::Unavailable(format!("inbox: an unreadable delivery ({e})"));
    let mut previous = cursor;
    let mut page = Vec::with_capacity(found.len());
    for (c, room) in found {
        let bytes = match &room {
            None => inbox.get((user, c))?,
            Some(room) => room_inbox.get((room.as_str(), c))?,
        };
        let Some(bytes) = bytes else { continue };
        let payload = serde_json::from_slice(bytes.value()).map_err(unreadable)?;
        page.push(Delivery::new(c, previous, payload));
        previous = c;
    }
    Ok(page)
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
            let (head, floor) = (read_meta(tx, "head")?, read_meta(tx, "floor")?);
            if cursor > head || cursor < floor {
                return Ok(Replay::TooOld { head });
            }
            Ok(Replay::Page(page_of(tx, user, cursor, limit)?))
        })?)
    }

    async fn subscribe(&self, user: &str) -> anyhow::Result<BoxStream<'static, Arc<Pushed>>> {
        // Under the lock: a batch committed after this read hands its joins
        // and leaves to the listener, one committed before is in the read.
        let mut live = self.live();
        let rooms = if live.listening(user) { None } else { Some(self.store.read(|tx| memberships::rooms_of(tx, user))?) };
        Ok(Live::subscribe(&self.live, &mut live, user, rooms).boxed())
    }

    async fn signal(&self, to: &str, payload: &Payload) -> anyhow::Result<()> {
        self.live().signal(to, payload);
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

    /// The next live delivery of a subscription.
    async fn next_live(live: &mut BoxStream<'static, Arc<Pushed>>) -> Delivery {
        let Some(Pushed::Delivery(d)) = live.next().await.as_deref().cloned() else { panic!("no live delivery") };
        d
    }

    /// The next `n` live deliveries' (cursor, previous).
    async fn live_cursors(live: &mut BoxStream<'static, Arc<Pushed>>, n: usize) -> Vec<(u64, u64)> {
        let mut got = Vec::with_capacity(n);
        for _ in 0..n {
            let d = next_live(live).await;
            got.push((d.cursor, d.previous));
        }
        got
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
        assert_eq!(live_cursors(&mut live, 2).await, [(1, 0), (4, 1)]);
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
        assert_eq!(live_cursors(&mut bob, 4).await, [(2, 0), (3, 2), (4, 3), (5, 4)]);
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
        let d = next_live(&mut bob).await;
        assert_eq!((d.cursor, d.previous, d.payload.event.as_str()), (2, 0, "message"));
        // Fill the subscription: the next delivery is dropped, and the one
        // after it (once there is room) names it.
        let mut cursor = 3;
        while bus.live.lock().unwrap().capacity_of("bob") > 0 {
            bus.deliver_at(cursor, now, "e", vec![(u("bob"), p(cursor))]).unwrap();
            cursor += 1;
        }
        let dropped = cursor;
        bus.deliver_at(dropped, now, "e", vec![(r(), room(dropped))]).unwrap();
        for want in 3..dropped {
            let d = next_live(&mut bob).await;
            assert_eq!(d.cursor, want);
        }
        bus.deliver_at(dropped + 1, now, "e", vec![(r(), room(dropped + 1))]).unwrap();
        let d = next_live(&mut bob).await;
        assert_eq!((d.cursor, d.previous), (dropped + 1, dropped), "the dropped delivery is a gap");
    }

    /// A page merges several rooms' chains with the user's own, in cursor
    /// order, and stops at its limit across all of them.
    #[tokio::test]
    async fn a_page_merges_several_rooms_in_cursor_order() {
        let bus = LocalPush::in_memory(Duration::from_secs(3600));
        let now = Utc::now().timestamp_millis();
        let joined = |room: &str| Payload { event: "member-joined".into(), data: json!({ "roomId": room, "userId": "amy" }) };
        bus.deliver_at(1, now, "e", vec![(u("amy"), joined("a"))]).unwrap();
        bus.deliver_at(2, now, "e", vec![(u("amy"), joined("b"))]).unwrap();
        for n in 3..=12 {
            let to = match n % 3 {
                0 => To::Room("a".into()),
                1 => To::Room("b".into()),
                _ => u("amy"),
            };
            bus.deliver_at(n, now, "e", vec![(to, p(n))]).unwrap();
        }
        let all: Vec<(u64, u64)> = (1..=12).map(|c| (c, c - 1)).collect();
        assert_eq!(cursors(bus.replay("amy", 0, 100).await.unwrap()), all);
        assert_eq!(cursors(bus.replay("amy", 0, 4).await.unwrap()), all[..4]);
        assert_eq!(cursors(bus.replay("amy", 5, 3).await.unwrap()), all[5..8]);
        let Replay::Page(page) = bus.replay("amy", 8, 2).await.unwrap() else { panic!("a page") };
        assert_eq!(page.iter().map(|d| d.payload.data["n"].as_u64().unwrap()).collect::<Vec<_>>(), [9, 10], "each from its own chain");
    }

    /// A user who left a room and joined it again gets both stretches, in
    /// order with their own deliveries, however the pages fall.
    #[tokio::test]
    async fn pages_across_a_leave_and_a_rejoin_miss_nothing() {
        let bus = LocalPush::in_memory(Duration::from_secs(3600));
        let now = Utc::now().timestamp_millis();
        let r = || To::Room("r".into());
        let own = |event: &str| vec![(u("amy"), change(event, "amy"))];
        bus.deliver_at(1, now, "e", own("member-joined")).unwrap();
        bus.deliver_at(2, now, "e", vec![(r(), room(2))]).unwrap();
        bus.deliver_at(3, now, "e", vec![(r(), room(3))]).unwrap();
        bus.deliver_at(4, now, "e", own("member-left")).unwrap();
        bus.deliver_at(5, now, "e", own("member-joined")).unwrap();
        bus.deliver_at(6, now, "e", vec![(r(), room(6))]).unwrap();
        bus.deliver_at(7, now, "e", vec![(r(), room(7))]).unwrap();
        bus.deliver_at(8, now, "e", vec![(u("amy"), p(8))]).unwrap();
        assert_eq!(cursors(bus.replay("amy", 2, 4).await.unwrap()), [(3, 2), (4, 3), (5, 4), (6, 5)]);
        for limit in 1..=8 {
            let (mut cursor, mut all) = (0, Vec::new());
            loop {
                let Replay::Page(page) = bus.replay("amy", cursor, limit).await.unwrap() else { panic!("a page") };
                let Some(last) = page.last() else { break };
                cursor = last.cursor;
                all.extend(page.iter().map(|d| d.cursor));
            }
            assert_eq!(all, [1, 2, 3, 4, 5, 6, 7, 8], "pages of {limit}");
        }
    }

    /// A delivery the prune drops as it is stored is not sent live, but
    /// the next one names it: the socket sees the gap (and resyncs).
    #[tokio::test]
    async fn a_delivery_pruned_as_it_is_stored_is_a_gap_live() {
        let bus = LocalPush::in_memory(Duration::from_secs(3600));
        let now = Utc::now().timestamp_millis();
        let mut bob = bus.subscribe("bob").await.unwrap();
        bus.deliver_at(1, now, "e1", vec![(u("bob"), p(1))]).unwrap();
        // As if the inbox were full: the batch below makes 1 and 2 go.
        bus.store.write(|tx| set_meta(tx, "count", MAX_RETAINED)).unwrap();
        bus.store_all(vec![((2, now, "e2"), vec![(u("bob"), p(2))]), ((3, now, "e3"), vec![(u("bob"), p(3))])]).unwrap();
        assert_eq!(live_cursors(&mut bob, 2).await, [(1, 0), (3, 2)]);
        assert!(matches!(bus.replay("bob", 1, 10).await.unwrap(), Replay::TooOld { head: 3 }));
    }

    /// A message deleted for everyone leaves a room's chain too.
    #[tokio::test]
    async fn a_deleted_room_message_leaves_the_rooms_chain() {
        let bus = LocalPush::in_memory(Duration::from_secs(3600));
        let now = Utc::now().timestamp_millis();
        let r = || To::Room("r".into());
        bus.deliver_at(1, now, "e1", vec![(r(), change("member-joined", "bob")), (u("bob"), change("member-joined", "bob"))]).unwrap();
        let sent = Payload { event: "message".into(), data: json!({ "_id": "m1", "message": "a secret", "seq": 1 }) };
        bus.deliver_at(2, now, "e2", vec![(r(), sent)]).unwrap();
        let deleted = Payload { event: "messageDeleted".into(), data: json!({ "_id": "m1", "seq": 1, "deleted": true }) };
        bus.deliver_at(3, now, "e3", vec![(r(), deleted)]).unwrap();
        let Replay::Page(page) = bus.replay("bob", 1, 10).await.unwrap() else { panic!("a page") };
        assert_eq!(page[0].payload.data, json!({ "_id": "m1", "seq": 1, "deleted": true }));
        assert!(!serde_json::to_string(&page.iter().map(|d| &d.payload.data).collect::<Vec<_>>()).unwrap().contains("a secret"));
    }

    /// The room's chain is pruned with the users' (oldest first, a room's
    /// delivery counted once); what is pruned makes older cursors resync.
    #[tokio::test]
    async fn a_rooms_chain_is_pruned_with_the_users() {
        let bus = LocalPush::in_memory(Duration::from_secs(3600));
        let now = Utc::now().timestamp_millis();
        let r = || To::Room("r".into());
        bus.deliver_at(1, now, "e1", vec![(r(), change("member-joined", "bob")), (u("bob"), change("member-joined", "bob"))]).unwrap();
        bus.deliver_at(2, now, "e2", vec![(r(), room(2))]).unwrap();
        bus.deliver_at(3, now, "e3", vec![(r(), room(3))]).unwrap();
        // As if the inbox held MAX_RETAINED − 2 deliveries besides these
        // four: the next one makes the three oldest go.
        bus.store.write(|tx| set_meta(tx, "count", MAX_RETAINED + 2)).unwrap();
        bus.deliver_at(4, now, "e4", vec![(r(), room(4))]).unwrap();
        assert!(matches!(bus.replay("bob", 1, 10).await.unwrap(), Replay::TooOld { head: 4 }));
        assert_eq!(cursors(bus.replay("bob", 2, 10).await.unwrap()), [(3, 2), (4, 3)]);
        let kept = bus.store.read(|tx| Ok(tx.open_table(ROOM_INBOX)?.iter()?.map(|e| e.unwrap().0.value().1).collect::<Vec<_>>())).unwrap();
        assert_eq!(kept, [3, 4]);
        let count = bus.store.read(|tx| read_meta(tx, "count")).unwrap();
        assert_eq!(count, MAX_RETAINED);
    }

    /// An inbox whose memberships are recorded through its head is not
    /// read from the log again (the log's changes are the fan-out's to
    /// record), and one recorded part of the way is read for the rest only.
    #[tokio::test]
    async fn memberships_are_read_from_the_log_only_past_where_they_are_recorded() {
        use natter_events::{Envelope, MemberJoined};

        use crate::config::SyncPolicy;
        use crate::log::file::FileLog;

        let dir = std::env::temp_dir().join(format!("natter-inbox-through-{}", uuid::Uuid::new_v4().simple()));
        let log = FileLog::open(&dir, SyncPolicy::Os, Duration::from_secs(60)).unwrap();
        for user in ["amy", "bob"] {
            let joined = Event::MemberJoined(MemberJoined { room_id: "r".into(), user_id: user.into(), seen_up_to: 0, ..Default::default() });
            log.append(&Envelope::new(format!("{user}:1"), subjects::member("p", "r", user), 1, joined), 0).await.unwrap();
        }
        let now = Utc::now().timestamp_millis();
        let r = || To::Room("r".into());
        // Made-up inboxes that recorded neither join, to tell a read of the
        // log apart. Recorded through 2 (the head): the log is not read.
        let recorded = LocalPush::in_memory(Duration::from_secs(3600));
        recorded.deliver_at(1, now, "e1", vec![]).unwrap();
        recorded.deliver_at(2, now, "e2", vec![]).unwrap();
        recorded.record_earlier_members(&log, "p").await.unwrap();
        recorded.deliver_at(3, now, "e3", vec![(r(), room(3))]).unwrap();
        for user in ["amy", "bob"] {
            assert_eq!(cursors(recorded.replay(user, 2, 10).await.unwrap()), [], "{user}: the log was not read");
        }
        // Recorded through 1 only: bob's join at 2 is read, amy's at 1 not.
        let partly = LocalPush::in_memory(Duration::from_secs(3600));
        partly.deliver_at(1, now, "e1", vec![]).unwrap();
        partly.store.write(|tx| set_meta(tx, "head", 2)).unwrap();
        partly.record_earlier_members(&log, "p").await.unwrap();
        partly.deliver_at(3, now, "e3", vec![(r(), room(3))]).unwrap();
        assert_eq!(cursors(partly.replay("bob", 2, 10).await.unwrap()), [(3, 2)]);
        assert_eq!(cursors(partly.replay("amy", 2, 10).await.unwrap()), [], "what is recorded through 1 is not read again");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A listening user gets a room's live deliveries while a member only:
    /// not between a leave and a rejoin, and a subscription made after a
    /// leave holds no room.
    #[tokio::test]
    async fn live_room_deliveries_stop_at_a_leave_and_start_again_at_a_rejoin() {
        let bus = LocalPush::in_memory(Duration::from_secs(3600));
        let now = Utc::now().timestamp_millis();
        let r = || To::Room("r".into());
        let mut amy = bus.subscribe("amy").await.unwrap();
        let own = |event: &str| vec![(r(), change(event, "amy")), (u("amy"), change(event, "amy"))];
        bus.deliver_at(1, now, "e", own("member-joined")).unwrap();
        bus.deliver_at(2, now, "e", vec![(r(), room(2))]).unwrap();
        bus.deliver_at(3, now, "e", own("member-left")).unwrap();
        bus.deliver_at(4, now, "e", vec![(r(), room(4))]).unwrap();
        bus.deliver_at(5, now, "e", own("member-joined")).unwrap();
        bus.deliver_at(6, now, "e", vec![(r(), room(6))]).unwrap();
        bus.deliver_at(7, now, "e", own("member-left")).unwrap();
        assert_eq!(live_cursors(&mut amy, 6).await.iter().map(|(c, _)| *c).collect::<Vec<_>>(), [1, 2, 3, 5, 6, 7]);
        assert!(amy.next().now_or_never().is_none());
        assert_eq!(bus.live().held(), (1, 0), "amy left: no room held");
        drop(amy);
        let _later = bus.subscribe("amy").await.unwrap();
        assert_eq!(bus.live().held(), (1, 0), "subscribed after leaving: no room held");
    }

    /// A dropped stream leaves: the user and their rooms are no longer held.
    #[tokio::test]
    async fn a_dropped_subscription_is_forgotten_with_its_rooms() {
        let bus = LocalPush::in_memory(Duration::from_secs(3600));
        let now = Utc::now().timestamp_millis();
        bus.deliver_at(1, now, "e1", vec![(To::Room("r".into()), change("member-joined", "bob")), (u("bob"), change("member-joined", "bob"))]).unwrap();
        let (first, second) = (bus.subscribe("bob").await.unwrap(), bus.subscribe("bob").await.unwrap());
        assert_eq!(bus.live.lock().unwrap().held(), (1, 1));
        drop(first);
        assert_eq!(bus.live.lock().unwrap().held(), (1, 1), "one subscription left");
        drop(second);
        assert_eq!(bus.live.lock().unwrap().held(), (0, 0));
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
        let mut last = std::collections::HashMap::new();
        for (user, position, event) in script {
            let env = Envelope::new(format!("{user}:{position}"), subjects::member("p", "r", user), position, event);
            last.insert(user, log.append(&env, last.get(user).copied().unwrap_or(0)).await.unwrap().log_seq);
        }
        let bus = LocalPush::in_memory(Duration::from_secs(3600));
        // What an earlier build left: the events fanned out, no memberships.
        bus.store.write(|tx| set_meta(tx, "head", 3)).unwrap();
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
