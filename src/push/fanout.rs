//! The fan-out projector: events → per-user deliveries in the inbox stream.
//!
//! - `MessageSent` → `newMessage` (the message, as REST shows it) to the
//!   receiver and to the sender (their other tabs and devices).
//! - `MessagesSeen` → `messagesSeen {readerId, senderId, upToSeq}` to the
//!   sender whose messages were read (read receipts) and to the reader's
//!   other tabs.
//! - `RoomMessageSent` → `message` (the room message) to every member of the
//!   room as of that event: each member subject of the room whose newest
//!   event before it in the log is a join (never the views, which may lag).
//! - `MemberJoined` / `MemberLeft` → `member-joined` / `member-left`
//!   `{roomId, userId}` to the members and the user concerned. Being in the
//!   same per-user streams as the messages, every member sees joins, leaves
//!   and messages in the same (log) order.
//!
//! Each delivery is published with `Nats-Msg-Id = <event id>:<user>`, so a
//! redelivered event does not deliver twice. The projection is `ordered`:
//! each conversation's and each room's events are fanned out one at a time,
//! in log order (distributed: one event in flight per partition of the
//! feed, see `projector::partitions`; embedded: the whole log in order), so
//! deliveries are in sequence order within each conversation and room.
//! A user's cursor stays exact whatever the partitions' interleaving: it is
//! the user's own inbox subject that numbers and chains their deliveries.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::StreamExt;
use natter_events::{Envelope, Event, MemberState};

use natter_projections::{ApplyError, MessageView, Projection, RoomMessageView};
use serde_json::json;

use super::{Payload, PushBus};
use crate::log::EventLog;
use crate::wire::{message_json, room_message_json};

/// Member subjects read at once while addressing a room event.
const MEMBER_READS: usize = 64;

/// The fan-out projection's name and version.
pub const NAME: &str = "push-fanout";
pub const VERSION: u32 = 1;

pub struct FanOut {
    pub bus: Arc<dyn PushBus>,
    pub prefix: String,
    /// The log, for room membership (who to address room messages to).
    pub log: Arc<dyn EventLog>,
    /// `Some` when this fan-out is given every event of the log in order
    /// from the first (the embedded projector): room membership is then
    /// tracked from the events themselves, exactly as of each event, so a
    /// replay of the log makes the very same deliveries.
    pub in_order: Option<Mutex<InOrder>>,
}

/// Room membership as of the last event fanned out.
#[derive(Default)]
pub struct InOrder {
    last_seq: u64,
    rooms: HashMap<String, BTreeSet<String>>,
}

impl FanOut {
    /// A fan-out that reads membership from the log (distributed: any node
    /// may fan out the next event).
    pub fn new(bus: Arc<dyn PushBus>, prefix: String, log: Arc<dyn EventLog>) -> FanOut {
        FanOut { bus, prefix, log, in_order: None }
    }

    /// A fan-out fed every event in log order (embedded).
    pub fn in_order(bus: Arc<dyn PushBus>, prefix: String, log: Arc<dyn EventLog>) -> FanOut {
        FanOut { bus, prefix, log, in_order: Some(Mutex::new(InOrder::default())) }
    }
}

/// The deliveries an event makes: (user, payload). Pure.
pub fn deliveries(env: &Envelope) -> Vec<(String, Payload)> {
    match &env.event {
        Event::MessageSent(e) => {
            let data = message_json(&MessageView::from_event(env, e), false);
            let payload = Payload { event: "newMessage".into(), data };
            vec![(e.receiver_id.clone(), payload.clone()), (e.sender_id.clone(), payload)]
        }
        Event::MessagesSeen(e) => {
            let data = json!({ "readerId": e.reader_id, "senderId": e.peer_id, "upToSeq": e.up_to_seq });
            let payload = Payload { event: "messagesSeen".into(), data };
            vec![(e.peer_id.clone(), payload.clone()), (e.reader_id.clone(), payload)]
        }
        _ => Vec::new(),
    }
}

impl FanOut {
    /// The room's members as of the event at `log_seq`, from the log
    /// alone: every user with a member subject in the room whose newest
    /// event before `log_seq` is a join. (The views may lag behind a join
    /// or a leave; the log does not, and a change after the event does not
    /// count.)
    async fn members(&self, room: &str, log_seq: u64) -> Result<Vec<String>, ApplyError> {
        let unavailable = |e: crate::log::LogError| ApplyError::Unavailable(e.to_string());
        let prefix = natter_events::subjects::member(&self.prefix, room, "");
        let subjects = self.log.subjects(&prefix).await.map_err(unavailable)?;
        let reads: Vec<_> = subjects.iter().map(|s| self.log.last_before(s, log_seq)).collect();
        let states: Vec<_> = futures::stream::iter(reads).buffered(MEMBER_READS).collect().await;
        let mut members = Vec::with_capacity(subjects.len());
        for (subject, state) in subjects.iter().zip(states) {
            if MemberState::after(state.map_err(unavailable)?.as_ref().map(|l| &l.envelope.event)).member {
                members.push(subject[prefix.len()..].to_owned());
            }
        }
        Ok(members)
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
    async fn apply(&self, _env: &Envelope) -> Result<(), ApplyError> {
        Err(ApplyError::Unavailable("the fan-out needs the event's log sequence (apply_at)".into()))
    }

    async fn apply_at(&self, env: &Envelope, log_seq: u64) -> Result<(), ApplyError> {
        let mut deliveries = deliveries(env);
        let room = match &env.event {
            Event::RoomMessageSent(e) => {
                Some((&e.room_id, None, Payload { event: "message".into(), data: room_message_json(&RoomMessageView::from_event(env, e)) }))
            }
            Event::MemberJoined(e) => Some((
                &e.room_id,
                Some(&e.user_id),
                Payload { event: "member-joined".into(), data: json!({ "roomId": e.room_id, "userId": e.user_id }) },
            )),
            Event::MemberLeft(e) => Some((
                &e.room_id,
                Some(&e.user_id),
                Payload { event: "member-left".into(), data: json!({ "roomId": e.room_id, "userId": e.user_id }) },
            )),
            _ => None,
        };
        if let Some((room, concerned, payload)) = room {
            let mut members = match &self.in_order {
                Some(table) => {
                    let mut table = table.lock().expect("fan-out membership lock");
                    let members: Vec<String> = table.rooms.get(room.as_str()).map(|m| m.iter().cloned().collect()).unwrap_or_default();
                    if log_seq > table.last_seq {
                        table.last_seq = log_seq;
                        match &env.event {
                            Event::MemberJoined(e) => {
                                table.rooms.entry(e.room_id.clone()).or_default().insert(e.user_id.clone());
                            }
                            Event::MemberLeft(e) => {
                                table.rooms.entry(e.room_id.clone()).or_default().remove(&e.user_id);
                            }
                            _ => {}
                        }
                    }
                    members
                }
                None => self.members(room, log_seq).await?,
            };
            if let Some(user) = concerned {
                members.retain(|m| m != user);
                members.push(user.clone());
            }
            deliveries.extend(members.into_iter().map(|m| (m, payload.clone())));
        }
        self.bus.deliver(env, log_seq, deliveries).await.map_err(ApplyError::Unavailable)
    }
}

#[cfg(test)]
mod tests {
    use natter_events::{DmState, MessageSent, MessagesSeen};

    use super::*;

    /// Room deliveries are addressed from the log alone, as of the message:
    /// a member whose join no view has applied yet gets it, one who left
    /// before it does not, and changes after it do not count.
    #[tokio::test]
    async fn room_messages_reach_the_members_the_log_has_without_any_view() {
        use natter_events::{MemberJoined, MemberLeft, RoomMessageSent, subjects};

        use crate::config::SyncPolicy;
        use crate::log::file::FileLog;
        use crate::push::Replay;
        use crate::push::memory::MemoryPush;

        let dir = std::env::temp_dir().join(format!("natter-fanout-{}", uuid::Uuid::new_v4().simple()));
        let log = Arc::new(FileLog::open(&dir, SyncPolicy::Os, std::time::Duration::from_secs(60)).unwrap());
        let member = |u: &str, joined: bool, n: u64| {
            let event = if joined {
                Event::MemberJoined(MemberJoined { room_id: "r1".into(), user_id: u.into(), seen_up_to: 0 })
            } else {
                Event::MemberLeft(MemberLeft { room_id: "r1".into(), user_id: u.into() })
            };
            Envelope::new(format!("{u}:{n}"), subjects::member("p", "r1", u), n, event)
        };
        let mut expected: HashMap<String, u64> = HashMap::new();
        for (u, joined, n) in [("amy", true, 1), ("bob", true, 1), ("eve", true, 1), ("eve", false, 2)] {
            let env = member(u, joined, n);
            let appended = log.append(&env, expected.get(u).copied().unwrap_or(0)).await.unwrap();
            expected.insert(u.into(), appended.log_seq);
        }
        // Another room's member is no member of this one.
        log.append(&Envelope::new("zed:1".into(), subjects::member("p", "r10", "zed"), 1, Event::MemberJoined(MemberJoined {
            room_id: "r10".into(),
            user_id: "zed".into(),
            seen_up_to: 0,
        })), 0)
        .await
        .unwrap();
        let msg = Envelope::new("amy:m1".into(), subjects::room("p", "r1"), 2, Event::RoomMessageSent(RoomMessageSent {
            message_id: "m1".into(),
            room_id: "r1".into(),
            sender_id: "amy".into(),
            client_msg_id: None,
            message: Some("hi".into()),
            attachment: None,
            seq: 1,
        }));
        let seq = log.append(&msg, 0).await.unwrap().log_seq;
        // After the message (the fan-out is behind): bob leaves, kim joins.
        log.append(&member("bob", false, 2), expected["bob"]).await.unwrap();
        log.append(&member("kim", true, 1), 0).await.unwrap();
        let bus = Arc::new(MemoryPush::new(std::time::Duration::from_secs(3600)));
        let fanout = FanOut::new(bus.clone(), "p".into(), log.clone());
        fanout.apply_at(&msg, seq).await.unwrap();
        // Membership as of the message: bob still in, kim not yet.
        for (user, gets) in [("amy", true), ("bob", true), ("eve", false), ("zed", false), ("kim", false)] {
            let Replay::Page(page) = bus.replay(user, 0, 10).await.unwrap() else { panic!("too old") };
            assert_eq!(page.len(), usize::from(gets), "{user}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Fed every event in order, the fan-out addresses each room event to
    /// the members as of that event, so replaying the log (an embedded
    /// restart) makes exactly the same deliveries.
    #[tokio::test]
    async fn in_order_membership_is_as_of_each_event_and_replays_identically() {
        use natter_events::{MemberJoined, MemberLeft, RoomMessageSent};

        use crate::config::SyncPolicy;
        use crate::log::file::FileLog;
        use crate::push::Replay;
        use crate::push::memory::MemoryPush;

        let dir = std::env::temp_dir().join(format!("natter-inorder-{}", uuid::Uuid::new_v4().simple()));
        let log: Arc<dyn EventLog> = Arc::new(FileLog::open(&dir, SyncPolicy::Os, std::time::Duration::from_secs(60)).unwrap());
        let join = |u: &str| Event::MemberJoined(MemberJoined { room_id: "r".into(), user_id: u.into(), seen_up_to: 0 });
        let leave = |u: &str| Event::MemberLeft(MemberLeft { room_id: "r".into(), user_id: u.into() });
        let msg = |seq: u64| {
            Event::RoomMessageSent(RoomMessageSent {
                message_id: format!("m{seq}"),
                room_id: "r".into(),
                sender_id: "amy".into(),
                client_msg_id: None,
                message: Some("hi".into()),
                attachment: None,
                seq,
            })
        };
        let events: Vec<Envelope> = [join("amy"), join("eve"), msg(1), leave("eve"), join("zed"), msg(2)]
            .into_iter()
            .enumerate()
            .map(|(i, e)| Envelope::new(format!("c{i}"), "p.ev.x".into(), i as u64 + 1, e))
            .collect();
        let run = || async {
            let bus = Arc::new(MemoryPush::new(std::time::Duration::from_secs(3600)));
            let fanout = FanOut::in_order(bus.clone(), "p".into(), log.clone());
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
