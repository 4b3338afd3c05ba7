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
//! Tables (key → value):
//!
//! ```text
//! inbox   (user, cursor)         → the payload (JSON)
//! order   (cursor, user)         → the event's time (ms): oldest first, for pruning
//! shown   (message, user, cursor) → (): the deliveries showing a message's content
//! last    user                   → the user's newest cursor
//! inbox-meta  "head" | "floor" | "count"
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use futures::StreamExt;
use futures::stream::BoxStream;
use natter_projections::ApplyError;
use natter_projections::local::redb::{ReadableTable, TableDefinition, WriteTransaction};
use natter_projections::local::{LocalStore, keep};
use tokio::sync::mpsc;

use super::{Delivery, Payload, PushBus, Pushed, Replay, To};

/// Most deliveries kept for resume, whatever the retention.
pub const MAX_RETAINED: u64 = 250_000;
/// Live items a user's subscription may hold before new ones are dropped
/// (the socket then fills the gap from the inbox, as with core NATS).
const LIVE_BUFFER: usize = 4096;
/// The fan-out's name in the store's record of how far each projection is kept.
const KEPT_AS: &str = super::fanout::NAME;

const INBOX: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("inbox");
const ORDER: TableDefinition<(u64, &str), i64> = TableDefinition::new("inbox-order");
const SHOWN: TableDefinition<(&str, &str, u64), ()> = TableDefinition::new("inbox-shown");
const LAST: TableDefinition<&str, u64> = TableDefinition::new("inbox-last");
const META: TableDefinition<&str, u64> = TableDefinition::new("inbox-meta");

pub struct LocalPush {
    retention: Duration,
    store: Arc<LocalStore>,
    subscribers: Mutex<HashMap<String, Vec<mpsc::Sender<Arc<Pushed>>>>>,
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

impl LocalPush {
    /// The inbox in `store` (its tables created if new).
    pub fn new(store: Arc<LocalStore>, retention: Duration) -> Result<LocalPush, ApplyError> {
        store.write(|tx| {
            tx.open_table(INBOX)?;
            tx.open_table(ORDER)?;
            tx.open_table(SHOWN)?;
            tx.open_table(LAST)?;
            tx.open_table(META)?;
            Ok(())
        })?;
        Ok(LocalPush { retention, store, subscribers: Mutex::default() })
    }

    /// An inbox in memory (tests).
    #[cfg(test)]
    pub fn in_memory(retention: Duration) -> LocalPush {
        LocalPush::new(LocalStore::in_memory(), retention).expect("an in-memory inbox")
    }

    /// Sends to `user`'s live subscribers, forgetting closed ones.
    fn publish(&self, user: &str, pushed: &Arc<Pushed>) {
        let mut subscribers = self.subscribers.lock().expect("subscribers lock");
        if let Some(subs) = subscribers.get_mut(user) {
            subs.retain(|tx| !matches!(tx.try_send(pushed.clone()), Err(mpsc::error::TrySendError::Closed(_))));
            if subs.is_empty() {
                subscribers.remove(user);
            }
        }
    }

    /// Drops the oldest deliveries while they are past the retention or
    /// more than [`MAX_RETAINED`]; every cursor below the newest dropped
    /// then gets `resync`.
    fn prune(&self, tx: &WriteTransaction) -> Result<(), ApplyError> {
        let oldest = Utc::now().timestamp_millis() - self.retention.as_millis() as i64;
        let (mut count, mut floor) = (meta(tx, "count")?, meta(tx, "floor")?);
        let (mut order, mut inbox, mut shown) = (tx.open_table(ORDER)?, tx.open_table(INBOX)?, tx.open_table(SHOWN)?);
        loop {
            let Some((cursor, user, at)) = order.first()?.map(|(k, v)| (k.value().0, k.value().1.to_owned(), v.value())) else { break };
            if at >= oldest && count <= MAX_RETAINED {
                break;
            }
            order.remove((cursor, user.as_str()))?;
            let gone = inbox.remove((user.as_str(), cursor))?.map(|v| decode(v.value())).transpose()?;
            if let Some(id) = gone.as_ref().and_then(|p| crate::wire::content_of(&p.event, &p.data)) {
                shown.remove((id, user.as_str(), cursor))?;
            }
            count = count.saturating_sub(1);
            floor = floor.max(cursor);
        }
        drop((order, inbox, shown));
        set_meta(tx, "count", count)?;
        set_meta(tx, "floor", floor)
    }

    /// A message deleted for everyone leaves every retained delivery that
    /// showed it (whoever holds it): those become its tombstone. Replies
    /// hold no preview of it (sessions read previews when they emit).
    fn forget_content(tx: &WriteTransaction, deleted: &Payload) -> Result<(), ApplyError> {
        let Some(id) = deleted.data.get("_id").and_then(|v| v.as_str()) else { return Ok(()) };
        let (mut shown, mut inbox) = (tx.open_table(SHOWN)?, tx.open_table(INBOX)?);
        let mut copies = Vec::new();
        for entry in shown.range((id, "", 0)..)? {
            let (k, _) = entry?;
            let (m, user, cursor) = k.value();
            if m != id {
                break;
            }
            copies.push((user.to_owned(), cursor));
        }
        for (user, cursor) in copies {
            shown.remove((id, user.as_str(), cursor))?;
            let Some(mut p) = inbox.get((user.as_str(), cursor))?.map(|v| decode(v.value())).transpose()? else { continue };
            crate::wire::tombstone(&mut p.data);
            inbox.insert((user.as_str(), cursor), serde_json::to_vec(&p).map_err(failed)?.as_slice())?;
        }
        Ok(())
    }

    /// Stores, in `tx`, the deliveries of the event `event_id` at
    /// `log_seq`, which happened at `at_ms` (events older than the
    /// retention deliver nothing), with how far the fan-out has gone; adds
    /// what to publish once committed to `pushed`.
    fn store(&self, tx: &WriteTransaction, (log_seq, at_ms, event_id): (u64, i64, &str), deliveries: Vec<(String, Payload)>, pushed: &mut Vec<(String, Arc<Pushed>)>) -> Result<(), ApplyError> {
        if log_seq <= meta(tx, "head")? {
            return Ok(()); // already fanned out
        }
        set_meta(tx, "head", log_seq)?;
        keep(tx, KEPT_AS, log_seq, event_id)?;
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
        let (mut shown, mut last, mut order, mut inbox) = (tx.open_table(SHOWN)?, tx.open_table(LAST)?, tx.open_table(ORDER)?, tx.open_table(INBOX)?);
        for (user, payload) in deliveries {
            if let Some(id) = crate::wire::content_of(&payload.event, &payload.data) {
                shown.insert((id, user.as_str(), log_seq), ())?;
            }
            let previous = last.insert(user.as_str(), log_seq)?.map_or(0, |v| v.value());
            order.insert((log_seq, user.as_str()), at_ms)?;
            inbox.insert((user.as_str(), log_seq), serde_json::to_vec(&payload).map_err(failed)?.as_slice())?;
            count += 1;
            pushed.push((user, Arc::new(Pushed::Delivery(Delivery { cursor: log_seq, previous, payload, check: None }))));
        }
        drop((shown, last, order, inbox));
        set_meta(tx, "count", count)
    }

    /// Stores the deliveries of several events (`(log_seq, at_ms,
    /// event_id)` and theirs, in log order) in one transaction, then
    /// publishes them.
    fn store_all(&self, events: Vec<((u64, i64, &str), Vec<(String, Payload)>)>) -> Result<(), ApplyError> {
        let (mut pushed, mut floor) = (Vec::new(), 0);
        self.store.write(|tx| {
            for (event, deliveries) in events {
                self.store(tx, event, deliveries, &mut pushed)?;
            }
            self.prune(tx)?;
            floor = meta(tx, "floor")?;
            Ok(())
        })?;
        for (user, p) in &pushed {
            // Not one the prune just dropped (its cursor would resync).
            if matches!(&**p, Pushed::Delivery(d) if d.cursor > floor) {
                self.publish(user, p);
            }
        }
        Ok(())
    }

    /// Stores the deliveries of the event `event_id` at `log_seq`, which
    /// happened at `at_ms`, then publishes them (tests).
    #[cfg(test)]
    pub fn deliver_at(&self, log_seq: u64, at_ms: i64, event_id: &str, deliveries: Vec<(String, Payload)>) -> Result<(), ApplyError> {
        self.store_all(vec![((log_seq, at_ms, event_id), deliveries)])
    }

    /// How far the fan-out has gone: the log sequence of the newest event
    /// it fanned out (a restart resumes after it).
    pub fn kept_through(&self) -> Result<u64, ApplyError> {
        Ok(self.store.read(|tx| Ok(tx.open_table(META)?.get("head")?.map_or(0, |v| v.value())))?)
    }
}

/// The deliveries as (user, payload): this bus stores none per room.
fn users_only(deliveries: Vec<(To, Payload)>) -> Result<Vec<(String, Payload)>, String> {
    deliveries
        .into_iter()
        .map(|(to, payload)| match to {
            To::User(user) => Ok((user, payload)),
            To::Room(room) => Err(format!("the embedded push bus addresses users only (a delivery for room {room})")),
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
            events.push(((log_seq, event.at.timestamp_millis(), id.as_str()), users_only(deliveries)?));
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
            let (inbox, mut previous, mut page) = (tx.open_table(INBOX)?, cursor, Vec::new());
            for entry in inbox.range((user, cursor + 1)..)?.take(limit) {
                let (k, v) = entry?;
                let (u, c) = k.value();
                if u != user {
                    break;
                }
                let payload = serde_json::from_slice(v.value())
                    .map_err(|e| natter_projections::StoreError::Unavailable(format!("inbox: an unreadable delivery ({e})")))?;
                page.push(Delivery { cursor: c, previous, payload, check: None });
                previous = c;
            }
            Ok(Replay::Page(page))
        })?)
    }

    async fn subscribe(&self, user: &str) -> anyhow::Result<BoxStream<'static, Arc<Pushed>>> {
        let (tx, mut rx) = mpsc::channel(LIVE_BUFFER);
        let mut subscribers = self.subscribers.lock().expect("subscribers lock");
        let subs = subscribers.entry(user.to_owned()).or_default();
        // Forget subscriptions already dropped, so a client reconnecting in
        // a loop to a quiet user cannot pile them up.
        subs.retain(|tx| !tx.is_closed());
        subs.push(tx);
        Ok(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed())
    }

    async fn signal(&self, to: &str, payload: &Payload) -> anyhow::Result<()> {
        self.publish(to, &Arc::new(Pushed::Signal(payload.clone())));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

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
        bus.deliver_at(1, now, "e", vec![("bob".into(), p(1)), ("amy".into(), p(1))]).unwrap();
        bus.deliver_at(2, now, "e", vec![]).unwrap();
        bus.deliver_at(3, now, "e", vec![("amy".into(), p(3))]).unwrap();
        bus.deliver_at(4, now, "e", vec![("bob".into(), p(4))]).unwrap();
        // Delivering an event again does nothing.
        bus.deliver_at(4, now, "e", vec![("bob".into(), p(4))]).unwrap();
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
        bus.deliver_at(1, now, "e", vec![("bob".into(), sent("m1", "a secret")), ("amy".into(), sent("m1", "a secret"))]).unwrap();
        bus.deliver_at(2, now, "e", vec![("bob".into(), Payload { event: "messageUpdated".into(), data: json!({ "_id": "m1", "message": "a secret, edited" }) })]).unwrap();
        bus.deliver_at(3, now, "e", vec![("bob".into(), sent("m2", "hm?"))]).unwrap();
        let deleted = Payload { event: "messageDeleted".into(), data: json!({ "_id": "m1", "seq": 1, "deleted": true }) };
        bus.deliver_at(4, now, "e", vec![("bob".into(), deleted)]).unwrap();
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

    #[tokio::test]
    async fn expired_deliveries_make_older_cursors_resync() {
        let bus = LocalPush::in_memory(Duration::from_secs(60));
        let old = Utc::now().timestamp_millis() - 120_000;
        bus.deliver_at(1, old, "e", vec![("bob".into(), p(1))]).unwrap();
        bus.deliver_at(2, Utc::now().timestamp_millis(), "e", vec![("bob".into(), p(2))]).unwrap();
        assert!(matches!(bus.replay("bob", 0, 10).await.unwrap(), Replay::TooOld { head: 2 }));
        assert_eq!(cursors(bus.replay("bob", 1, 10).await.unwrap()), [(2, 1)]);
    }
}
