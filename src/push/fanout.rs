//! The fan-out projector: events → deliveries in the inbox.
//!
//! - `MessageSent` → `newMessage` (the message, as REST shows it) to the
//!   receiver and to the sender (their other tabs and devices).
//! - `MessageEdited` / `MessageDeleted` → `messageUpdated` (the whole
//!   message) / `messageDeleted` (its tombstone: `_id`, `seq`, `deleted:
//!   true`, no content) to both participants.
//! - `MessagesSeen` → `messagesSeen {readerId, senderId, upToSeq}` to the
//!   sender whose messages were read (read receipts) and to the reader's
//!   other tabs.
//! - `RoomMessageSent` → `message` (the room message) to every member of the
//!   room as of that event: stored once for the room ([`To::Room`]), and
//!   addressed by the bus to the members as of the event when read (learnt
//!   from the users' own joins and leaves, never from the views, which may
//!   lag: [`super::user_rooms`]).
//! - `RoomMessageEdited` / `RoomMessageDeleted` → `messageUpdated` /
//!   `messageDeleted` (the room message, or its tombstone) to the room's
//!   members as of that event, as a room message.
//! - `ReactionChanged` → `messageUpdated` (the message with all its
//!   reactions, read from the views once they hold the change: see
//!   [`super::reactions`]) to both participants or to the room's members.
//! - `MemberInvited` → `room-invited {roomId, by}` and `RoleChanged` →
//!   `member-role {roomId, userId, role, by}`, to the user concerned only.
//! - `MemberJoined` / `MemberLeft` → `member-joined` / `member-left`
//!   `{roomId, userId}` to the user concerned (always, on their own chain:
//!   it tells a reader their rooms) and, in rooms of at most `announce_max`
//!   members, to every member. Members see joins, leaves and messages in
//!   the same (log) order.
//!
//! Each delivery is published with `Nats-Msg-Id = <event id>:<user>` (or
//! `<event id>@<room>`), so a redelivered event does not deliver twice. The
//! projection is `ordered`: each conversation's and each room's events are
//! fanned out in log order (distributed: by the one node pinned to the
//! partition of the feed, in batches, see `projector::pinned`; embedded: the
//! whole log in order), so deliveries are in sequence order within each
//! conversation and room. A user's cursor stays exact whatever the
//! partitions' interleaving: it numbers the user's own chain and their
//! rooms' chains in one inbox.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use natter_events::{Envelope, Event};

use natter_projections::{ApplyError, MessageView, Projection, RoomMessageView, ViewStore};
use serde_json::json;

use super::members::Membership;
use super::reactions::{ReactionPushes, Reacted};
use super::{Payload, PushBus, To};
use crate::log::EventLog;
use crate::wire::{message_json, room_message_json};

/// The fan-out projection's name and version.
pub const NAME: &str = "push-fanout";
pub const VERSION: u32 = 1;

pub struct FanOut {
    bus: Arc<dyn PushBus>,
    members: Membership,
    /// Rooms of more members than this (before the change) announce a
    /// join or a leave to the user concerned only.
    announce_max: usize,
    /// Rooms found larger than `announce_max`, and when (distributed
    /// only; see [`LARGE_FOR`]).
    large: Mutex<HashMap<String, Instant>>,
    /// Reactions' pushes, read from the views.
    reactions: ReactionPushes,
}

/// How long a room found larger than `announce_max` is taken to be, with
/// no membership read (distributed). Reading it costs a read per change
/// another node fanned out since this one last looked: in a burst of
/// joins, most of the partition's time. Taking a large room as large for
/// a minute costs, at worst, a minute of joins not announced in a room
/// that shrank below the limit meanwhile.
const LARGE_FOR: Duration = Duration::from_secs(60);
/// Deliveries a batch of events stores at once (see `apply_batch`).
const BATCH_DELIVERIES: usize = 10_000;
/// Most rooms remembered as large (forgotten all at once beyond).
const LARGE_ROOMS: usize = 10_000;

impl FanOut {
    /// A fan-out that may be handed any room's next event (distributed:
    /// any node may fan out the next event of a partition).
    pub fn new(bus: Arc<dyn PushBus>, prefix: String, log: Arc<dyn EventLog>, views: Arc<dyn ViewStore>, announce_max: usize) -> FanOut {
        let reactions = ReactionPushes::new(views);
        FanOut { bus, members: Membership::new(log, prefix, false), announce_max, large: Mutex::default(), reactions }
    }

    /// A fan-out fed every event in log order (embedded), from the first
    /// or from where its inbox is kept: a replay of the log makes the very
    /// same deliveries.
    pub fn in_order(bus: Arc<dyn PushBus>, prefix: String, log: Arc<dyn EventLog>, views: Arc<dyn ViewStore>, announce_max: usize) -> FanOut {
        let reactions = ReactionPushes::new(views);
        FanOut { bus, members: Membership::new(log, prefix, true), announce_max, large: Mutex::default(), reactions }
    }

    /// Whether `room` was found large within [`LARGE_FOR`] (never when
    /// fed in order: the embedded table is exact and costs no read).
    fn known_large(&self, room: &str) -> bool {
        !self.members.fed_in_order() && self.large.lock().expect("large rooms lock").get(room).is_some_and(|at| at.elapsed() < LARGE_FOR)
    }

    fn found_large(&self, room: &str) {
        if self.members.fed_in_order() {
            return;
        }
        let mut large = self.large.lock().expect("large rooms lock");
        if large.len() >= LARGE_ROOMS {
            large.clear();
        }
        large.insert(room.to_owned(), Instant::now());
    }
}

/// The direct deliveries an event makes: (user, payload). Pure.
pub fn deliveries(env: &Envelope) -> Vec<(String, Payload)> {
    match &env.event {
        Event::MessageSent(e) => {
            let data = message_json(&MessageView::from_event(env, e), false);
            let payload = Payload { event: "newMessage".into(), data };
            vec![(e.receiver_id.clone(), payload.clone()), (e.sender_id.clone(), payload)]
        }
        Event::MessageEdited(e) | Event::MessageDeleted(e) => {
            let view = MessageView::of(env).expect("a message change");
            let seen = e.message.state.side(&view.receiver_id).is_some_and(|r| r.seen_seq >= view.seq);
            let event = if view.deleted { "messageDeleted" } else { "messageUpdated" };
            let payload = Payload { event: event.into(), data: message_json(&view, seen) };
            vec![(view.receiver_id.clone(), payload.clone()), (view.sender_id, payload)]
        }
        Event::MessagesSeen(e) => {
            let data = json!({ "readerId": e.reader_id, "senderId": e.peer_id, "upToSeq": e.up_to_seq });
            let payload = Payload { event: "messagesSeen".into(), data };
            vec![(e.peer_id.clone(), payload.clone()), (e.reader_id.clone(), payload)]
        }
        _ => Vec::new(),
    }
}

#[async_trait]
impl Projection for FanOut {
    fn name(&self) -> &'static str {
        NAME
    }
    fn version(&self) -> u32 {
        VERSION
    }
    fn ordered(&self) -> bool {
        true
    }
    async fn kept_through(&self) -> Result<u64, ApplyError> {
        Ok(self.bus.kept_through().await)
    }
    async fn apply(&self, _env: &Envelope) -> Result<(), ApplyError> {
        Err(ApplyError::Unavailable("the fan-out needs the event's log sequence (apply_at)".into()))
    }

    async fn apply_at(&self, env: &Envelope, log_seq: u64) -> Result<(), ApplyError> {
        let deliveries = self.deliveries_at(env, log_seq).await?;
        self.bus.deliver(env, log_seq, deliveries).await.map_err(ApplyError::Unavailable)
    }

    /// The events in the order given (log order), their deliveries stored
    /// together ([`PushBus::deliver_batch`]: one transaction embedded), at
    /// most about [`BATCH_DELIVERIES`] at a time. A failure leaves the room
    /// tables past events that will come again: they are dropped, to be read afresh once.
    async fn apply_batch(&self, batch: &[(&Envelope, u64)]) -> Result<(), ApplyError> {
        let applied = async {
            let (mut pending, mut held) = (Vec::new(), 0);
            for (env, log_seq) in batch {
                let deliveries = self.deliveries_at(env, *log_seq).await?;
                held += deliveries.len();
                pending.push((*env, *log_seq, deliveries));
                if held >= BATCH_DELIVERIES {
                    self.bus.deliver_batch(std::mem::take(&mut pending)).await.map_err(ApplyError::Unavailable)?;
                    held = 0;
                }
            }
            self.bus.deliver_batch(pending).await.map_err(ApplyError::Unavailable)
        }
        .await;
        if applied.is_err() {
            self.members.forget();
        }
        applied
    }
}

impl FanOut {
    /// The deliveries the event at `log_seq` makes (room membership as of
    /// it taken in).
    async fn deliveries_at(&self, env: &Envelope, log_seq: u64) -> Result<Vec<(To, Payload)>, ApplyError> {
        let reacted_room: String;
        let mut deliveries: Vec<(To, Payload)> = deliveries(env).into_iter().map(|(user, payload)| (To::User(user), payload)).collect();
        if let Event::MessageEdited(e) = &env.event {
            // An edited message's push shows its reactions too; none if it
            // was deleted meanwhile.
            if !self.reactions.edited(&e.message.message_id, &mut deliveries.iter_mut().map(|(_, p)| p).collect::<Vec<_>>()).await {
                deliveries.clear();
            }
        }
        let room = match &env.event {
            Event::RoomMessageSent(e) => {
                Some((&e.room_id, None, Payload { event: "message".into(), data: room_message_json(&RoomMessageView::from_event(env, e)) }))
            }
            Event::RoomMessageEdited(e) | Event::RoomMessageDeleted(e) => {
                let view = RoomMessageView::of(env).expect("a room message change");
                let event = if view.deleted { "messageDeleted" } else { "messageUpdated" };
                let mut payload = Payload { event: event.into(), data: room_message_json(&view) };
                let keep = view.deleted || self.reactions.edited(&view.id, &mut [&mut payload]).await;
                keep.then_some((&e.message.room_id, None, payload))
            }
            Event::ReactionChanged(e) => match self.reactions.of(env, e).await {
                Some(Reacted::Direct { users, payload }) => {
                    deliveries.extend(users.into_iter().map(|u| (To::User(u), payload.clone())));
                    None
                }
                Some(Reacted::Room { room, payload }) => {
                    reacted_room = room;
                    Some((&reacted_room, None, payload))
                }
                None => None,
            },
            Event::MemberJoined(e) => Some((
                &e.room_id,
                Some(&e.user_id),
                Payload { event: "member-joined".into(), data: json!({ "roomId": e.room_id, "userId": e.user_id }) },
            )),
            Event::MemberLeft(e) => {
                let mut data = json!({ "roomId": e.room_id, "userId": e.user_id });
                if let Some(by) = &e.by {
                    data["by"] = json!(by);
                }
                let payload = Payload { event: "member-left".into(), data };
                if e.withdrawn {
                    // An invitation withdrawn: the members never saw it.
                    deliveries.push((To::User(e.user_id.clone()), payload));
                    None
                } else {
                    Some((&e.room_id, Some(&e.user_id), payload))
                }
            }
            // An invitation and a new role concern one user: theirs only.
            Event::MemberInvited(e) => {
                let data = json!({ "roomId": e.room_id, "by": e.by });
                deliveries.push((To::User(e.user_id.clone()), Payload { event: "room-invited".into(), data }));
                None
            }
            Event::RoleChanged(e) => {
                let data = json!({ "roomId": e.room_id, "userId": e.user_id, "role": e.role.as_str(), "by": e.by });
                deliveries.push((To::User(e.user_id.clone()), Payload { event: "member-role".into(), data }));
                None
            }
            _ => None,
        };
        match room {
            // Stored once for the room: no membership to read here (the
            // bus addresses it to the members as of the event when read).
            Some((room, None, payload)) => deliveries.push((To::Room(room.clone()), payload)),
            // A large room's join or leave: the user concerned only.
            Some((room, Some(user), payload)) if self.known_large(room) => deliveries.push((To::User(user.clone()), payload)),
            Some((room, Some(user), payload)) => {
                // A large room's joins and leaves would cost the square of
                // its size in a burst: only the user concerned hears them
                // (the others see presence, and the member list over REST).
                // The user concerned always does, on their own chain: it is
                // what tells the bus their rooms.
                if self.members.size_as_of(room, log_seq, &env.event).await? <= self.announce_max {
                    // Before the user's own copy: a reader that skips the
                    // room's copy of a user's own change then sees no gap
                    // in the room's chain.
                    deliveries.push((To::Room(room.clone()), payload.clone()));
                } else {
                    self.found_large(room);
                }
                deliveries.push((To::User(user.clone()), payload));
            }
            None => {}
        }
        Ok(deliveries)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use natter_events::{DmState, MessageSent, MessagesSeen};

    use super::*;

    /// Room deliveries are addressed from the log alone, as of the message:
    /// without any view, a member who left before it does not get it, nor
    /// one who joined after it or a member of another room.
    #[tokio::test]
    async fn room_messages_reach_the_members_the_log_has_without_any_view() {
        use natter_events::{MemberJoined, MemberLeft, RoomMessageSent, subjects};

        use crate::config::SyncPolicy;
        use crate::log::file::FileLog;
        use crate::push::Replay;
        use crate::push::local::LocalPush;

        let dir = std::env::temp_dir().join(format!("natter-fanout-{}", uuid::Uuid::new_v4().simple()));
        let log = Arc::new(FileLog::open(&dir, SyncPolicy::Os, std::time::Duration::from_secs(60)).unwrap());
        let member = |room: &str, u: &str, joined: bool, n: u64| {
            let event = if joined {
                Event::MemberJoined(MemberJoined { room_id: room.into(), user_id: u.into(), seen_up_to: 0, ..Default::default() })
            } else {
                Event::MemberLeft(MemberLeft { room_id: room.into(), user_id: u.into(), ..Default::default() })
            };
            Envelope::new(format!("{u}:{room}:{n}"), subjects::member("p", room, u), n, event)
        };
        let msg = Envelope::new("amy:m1".into(), subjects::room("p", "r1"), 1, Event::RoomMessageSent(RoomMessageSent {
            message_id: "m1".into(),
            room_id: "r1".into(),
            sender_id: "amy".into(),
            client_msg_id: None,
            message: Some("hi".into()),
            attachment: None,
            seq: 1,
            reply_to: None,
        }));
        // Eve leaves before the message; after it, bob leaves and kim joins;
        // zed is a member of another room.
        let script = [
            member("r1", "amy", true, 1),
            member("r1", "bob", true, 1),
            member("r1", "eve", true, 1),
            member("r1", "eve", false, 2),
            member("r10", "zed", true, 1),
            msg,
            member("r1", "bob", false, 2),
            member("r1", "kim", true, 1),
        ];
        let bus = Arc::new(LocalPush::in_memory(std::time::Duration::from_secs(3600)));
        let fanout = FanOut::new(bus.clone(), "p".into(), log.clone(), Arc::new(natter_projections::local::LocalViews::default()), 100);
        let mut last: HashMap<String, u64> = HashMap::new();
        for env in &script {
            let seq = log.append(env, last.get(&env.subject).copied().unwrap_or(0)).await.unwrap().log_seq;
            last.insert(env.subject.clone(), seq);
            fanout.apply_at(env, seq).await.unwrap();
        }
        for (user, gets) in [("amy", true), ("bob", true), ("eve", false), ("zed", false), ("kim", false)] {
            let Replay::Page(page) = bus.replay(user, 0, 10).await.unwrap() else { panic!("too old") };
            assert_eq!(page.iter().any(|d| d.payload.event == "message"), gets, "{user}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Fed every event in order, the fan-out addresses each room event to
    /// the members as of that event, so replaying the log (an embedded
    /// restart) makes exactly the same deliveries.
    #[tokio::test]
    async fn in_order_membership_is_as_of_each_event_and_replays_identically() {
        use crate::config::SyncPolicy;
        use crate::log::file::FileLog;
        use crate::push::Replay;
        use crate::push::local::LocalPush;

        let dir = std::env::temp_dir().join(format!("natter-inorder-{}", uuid::Uuid::new_v4().simple()));
        let log: Arc<dyn EventLog> = Arc::new(FileLog::open(&dir, SyncPolicy::Os, std::time::Duration::from_secs(60)).unwrap());
        let events: Vec<Envelope> = [join("amy"), join("eve"), msg(1), leave("eve"), join("zed"), msg(2)]
            .into_iter()
            .enumerate()
            .map(|(i, (_, e))| Envelope::new(format!("c{i}"), "p.ev.x".into(), i as u64 + 1, e))
            .collect();
        let run = || async {
            let bus = Arc::new(LocalPush::in_memory(std::time::Duration::from_secs(3600)));
            let fanout = FanOut::in_order(bus.clone(), "p".into(), log.clone(), Arc::new(natter_projections::local::LocalViews::default()), 100);
            for (i, env) in events.iter().enumerate() {
                fanout.apply_at(env, i as u64 + 1).await.unwrap();
            }
            let mut seen = Vec::new();
            for user in ["amy", "eve", "zed"] {
                let Replay::Page(page) = bus.replay(user, 0, 10).await.unwrap() else { panic!("too old") };
                seen.push(page.iter().map(|d| (user, d.payload.event.clone(), d.cursor)).collect::<Vec<_>>());
            }
            seen
        };
        let first = run().await;
        let events_of = |u: usize| first[u].iter().map(|(_, e, c)| format!("{e}@{c}")).collect::<Vec<_>>();
        assert_eq!(events_of(0), ["member-joined@1", "member-joined@2", "message@3", "member-left@4", "member-joined@5", "message@6"]);
        assert_eq!(events_of(1), ["member-joined@2", "message@3", "member-left@4"], "eve: the message before she left, nothing after");
        assert_eq!(events_of(2), ["member-joined@5", "message@6"], "zed: nothing from before he joined");
        assert_eq!(run().await, first, "a replay makes the same deliveries");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Room `r`'s events under prefix `p`: (subject, event).
    fn join(u: &str) -> (String, Event) {
        let e = natter_events::MemberJoined { room_id: "r".into(), user_id: u.into(), seen_up_to: 0, ..Default::default() };
        (natter_events::subjects::member("p", "r", u), Event::MemberJoined(e))
    }

    fn leave(u: &str) -> (String, Event) {
        let e = natter_events::MemberLeft { room_id: "r".into(), user_id: u.into(), ..Default::default() };
        (natter_events::subjects::member("p", "r", u), Event::MemberLeft(e))
    }

    fn msg(n: u64) -> (String, Event) {
        let e = natter_events::RoomMessageSent {
            message_id: format!("m{n}"),
            room_id: "r".into(),
            sender_id: "amy".into(),
            client_msg_id: None,
            message: Some("hi".into()),
            attachment: None,
            seq: n,
            reply_to: None,
        };
        (natter_events::subjects::room("p", "r"), Event::RoomMessageSent(e))
    }

    /// Appends `event` on `subject` (its next position there, `positions`:
    /// subject → (position, its last log seq)); returns it with its log seq.
    async fn append(log: &Arc<dyn EventLog>, positions: &mut HashMap<String, (u64, u64)>, subject: String, event: Event) -> (Envelope, u64) {
        let (position, last) = positions.get(&subject).copied().unwrap_or((0, 0));
        let env = Envelope::new(format!("c{}", uuid::Uuid::new_v4().simple()), subject.clone(), position + 1, event);
        let seq = log.append(&env, last).await.unwrap().log_seq;
        positions.insert(subject, (position + 1, seq));
        (env, seq)
    }

    /// Two nodes take turns on a room's events (distributed: any node may
    /// handle the partition's next event): each catches up on the
    /// membership changes the other handled, reading only those.
    #[tokio::test]
    async fn a_node_catches_up_on_the_membership_changes_another_node_handled() {

        use crate::config::SyncPolicy;
        use crate::log::file::FileLog;
        use crate::push::Replay;
        use crate::push::local::LocalPush;

        let dir = std::env::temp_dir().join(format!("natter-turns-{}", uuid::Uuid::new_v4().simple()));
        let log: Arc<dyn EventLog> = Arc::new(FileLog::open(&dir, SyncPolicy::Os, std::time::Duration::from_secs(60)).unwrap());
        let bus = Arc::new(LocalPush::in_memory(std::time::Duration::from_secs(3600)));
        let nodes = [FanOut::new(bus.clone(), "p".into(), log.clone(), Arc::new(natter_projections::local::LocalViews::default()), 100), FanOut::new(bus.clone(), "p".into(), log.clone(), Arc::new(natter_projections::local::LocalViews::default()), 100)];
        let mut positions = HashMap::new();
        // (event, which node handles it)
        let script = [(join("amy"), 0), (join("bob"), 0), (msg(1), 0), (leave("bob"), 1), (join("kim"), 1), (msg(2), 0), (join("bob"), 1), (msg(3), 1), (leave("kim"), 0), (msg(4), 1)];
        for ((subject, event), node) in script {
            let (env, seq) = append(&log, &mut positions, subject, event).await;
            nodes[node].apply_at(&env, seq).await.unwrap();
        }
        let messages = |user: &str| {
            let bus = bus.clone();
            let user = user.to_owned();
            async move {
                let Replay::Page(page) = bus.replay(&user, 0, 100).await.unwrap() else { panic!("too old") };
                page.iter().filter(|d| d.payload.event == "message").map(|d| d.payload.data["_id"].as_str().unwrap().to_owned()).collect::<Vec<_>>()
            }
        };
        assert_eq!(messages("amy").await, ["m1", "m2", "m3", "m4"]);
        assert_eq!(messages("bob").await, ["m1", "m3", "m4"], "bob left before m2 and came back before m3");
        assert_eq!(messages("kim").await, ["m2", "m3"], "kim joined after m1 and left before m4");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A batch whose deliveries could not be stored (the store down) is
    /// handed over again: the room tables had moved past its events, and
    /// the deliveries made the second time are the ones a batch that never
    /// failed makes.
    #[tokio::test]
    async fn a_batch_applied_again_after_a_failure_makes_the_same_deliveries() {
        use std::sync::atomic::{AtomicBool, Ordering};

        use futures::stream::BoxStream;

        use crate::config::SyncPolicy;
        use crate::log::file::FileLog;
        use crate::push::local::LocalPush;
        use crate::push::{Pushed, Replay};

        /// A bus whose first batch fails.
        struct FailsOnce(Arc<LocalPush>, AtomicBool);

        #[async_trait]
        impl PushBus for FailsOnce {
            async fn deliver(&self, event: &Envelope, log_seq: u64, deliveries: Vec<(To, Payload)>) -> Result<(), String> {
                self.0.deliver(event, log_seq, deliveries).await
            }
            async fn deliver_batch(&self, batch: Vec<(&Envelope, u64, Vec<(To, Payload)>)>) -> Result<(), String> {
                if !self.1.swap(true, Ordering::SeqCst) {
                    return Err("the store is down".into());
                }
                self.0.deliver_batch(batch).await
            }
            async fn head(&self) -> anyhow::Result<u64> {
                self.0.head().await
            }
            async fn replay(&self, user: &str, cursor: u64, limit: usize) -> anyhow::Result<Replay> {
                self.0.replay(user, cursor, limit).await
            }
            async fn subscribe(&self, user: &str) -> anyhow::Result<BoxStream<'static, Arc<Pushed>>> {
                self.0.subscribe(user).await
            }
            async fn signal(&self, to: &str, payload: &Payload) -> anyhow::Result<()> {
                self.0.signal(to, payload).await
            }
        }

        let dir = std::env::temp_dir().join(format!("natter-retry-{}", uuid::Uuid::new_v4().simple()));
        let log: Arc<dyn EventLog> = Arc::new(FileLog::open(&dir, SyncPolicy::Os, std::time::Duration::from_secs(60)).unwrap());
        let mut positions = HashMap::new();
        let mut events = Vec::new();
        for (subject, event) in [join("amy"), join("bob"), msg(1), leave("bob"), join("kim"), msg(2), join("bob"), msg(3), leave("kim"), msg(4)] {
            events.push(append(&log, &mut positions, subject, event).await);
        }
        let batch: Vec<(&Envelope, u64)> = events.iter().map(|(env, seq)| (env, *seq)).collect();
        let inbox = |bus: Arc<LocalPush>| async move {
            let mut all = Vec::new();
            for user in ["amy", "bob", "kim"] {
                let Replay::Page(page) = bus.replay(user, 0, 100).await.unwrap() else { panic!("too old") };
                all.push(page.iter().map(|d| (user, d.cursor, d.previous, d.payload.clone())).collect::<Vec<_>>());
            }
            all
        };
        let views = || Arc::new(natter_projections::local::LocalViews::default());
        let clean = Arc::new(LocalPush::in_memory(std::time::Duration::from_secs(3600)));
        FanOut::in_order(clean.clone(), "p".into(), log.clone(), views(), 100).apply_batch(&batch).await.unwrap();
        let retried = Arc::new(LocalPush::in_memory(std::time::Duration::from_secs(3600)));
        let fanout = FanOut::in_order(Arc::new(FailsOnce(retried.clone(), AtomicBool::new(false))), "p".into(), log.clone(), views(), 100);
        assert!(fanout.apply_batch(&batch).await.is_err(), "the first attempt fails");
        fanout.apply_batch(&batch).await.unwrap();
        let expected = inbox(clean).await;
        let messages = |u: usize| expected[u].iter().filter(|d| d.3.event == "message").map(|d| d.3.data["_id"].as_str().unwrap().to_owned()).collect::<Vec<_>>();
        assert_eq!((messages(0), messages(1), messages(2)), (vec!["m1".into(), "m2".into(), "m3".into(), "m4".into()], vec!["m1".into(), "m3".into(), "m4".into()], vec!["m2".into(), "m3".into()]));
        assert_eq!(inbox(retried).await, expected);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Joins and leaves reach every member of a small room, and only the
    /// user concerned in a large one.
    #[tokio::test]
    async fn large_rooms_tell_only_the_user_concerned_of_a_join() {
        use natter_events::{MemberJoined, subjects};

        use crate::config::SyncPolicy;
        use crate::log::file::FileLog;
        use crate::push::Replay;
        use crate::push::local::LocalPush;

        let dir = std::env::temp_dir().join(format!("natter-announce-{}", uuid::Uuid::new_v4().simple()));
        let log: Arc<dyn EventLog> = Arc::new(FileLog::open(&dir, SyncPolicy::Os, std::time::Duration::from_secs(60)).unwrap());
        let bus = Arc::new(LocalPush::in_memory(std::time::Duration::from_secs(3600)));
        let fanout = FanOut::in_order(bus.clone(), "p".into(), log.clone(), Arc::new(natter_projections::local::LocalViews::default()), 2);
        for u in ["u1", "u2", "u3", "u4"] {
            let env = Envelope::new(format!("{u}:j"), subjects::member("p", "r", u), 1, Event::MemberJoined(MemberJoined {
                room_id: "r".into(),
                user_id: u.into(),
                seen_up_to: 0,
                ..Default::default()
            }));
            let seq = log.append(&env, 0).await.unwrap().log_seq;
            fanout.apply_at(&env, seq).await.unwrap();
        }
        let mut heard = Vec::new();
        for u in ["u1", "u2", "u3", "u4"] {
            let Replay::Page(page) = bus.replay(u, 0, 10).await.unwrap() else { panic!("too old") };
            heard.push(page.iter().map(|d| d.payload.data["userId"].as_str().unwrap().to_owned()).collect::<Vec<_>>());
        }
        // u3 joined a room of two (everyone hears); u4 a room of three (only u4).
        assert_eq!(heard, [vec!["u1", "u2", "u3"], vec!["u2", "u3"], vec!["u3"], vec!["u4"]]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_message_goes_to_both_participants_and_nobody_else() {
        let (state, seq, count) = DmState::new("amy", "bob").after_send("amy");
        let env = Envelope::new("amy:1".into(), "n.ev.dm.amy.bob".into(), 1, Event::MessageSent(MessageSent {
            message_id: "m1".into(),
            client_msg_id: None,
            sender_id: "amy".into(),
            receiver_id: "bob".into(),
            message: Some("hi".into()),
            attachments: vec![],
            seq,
            sender_count: count,
            state: state.clone(),
            reply_to: None,
        }));
        let d = deliveries(&env);
        let users: Vec<_> = d.iter().map(|(u, _)| u.as_str()).collect();
        assert_eq!(users, ["bob", "amy"]);
        assert_eq!(d[0].1.event, "newMessage");
        assert_eq!(d[0].1.data["_id"], "m1");
        assert_eq!(d[0].1.data["seq"], 1);

        let seen_state = state.after_seen("bob", 1, 1).unwrap();
        let env = Envelope::new("bob:s".into(), "n.ev.dm.amy.bob".into(), 2, Event::MessagesSeen(MessagesSeen {
            reader_id: "bob".into(),
            peer_id: "amy".into(),
            up_to_seq: 1,
            seen_count: 1,
            state: seen_state,
        }));
        let d = deliveries(&env);
        let users: Vec<_> = d.iter().map(|(u, _)| u.as_str()).collect();
        assert_eq!(users, ["amy", "bob"]);
        assert_eq!(d[0].1.data, json!({"readerId": "bob", "senderId": "amy", "upToSeq": 1}));
    }
}
