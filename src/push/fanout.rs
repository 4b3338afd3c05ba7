//! The fan-out projector: events → per-user deliveries in the inbox stream.
//!
//! - `MessageSent` → `newMessage` (the message, as REST shows it) to the
//!   receiver and to the sender (their other tabs and devices).
//! - `MessagesSeen` → `messagesSeen {readerId, senderId, upToSeq}` to the
//!   sender whose messages were read (read receipts) and to the reader's
//!   other tabs.
//! - `RoomMessageSent` → `message` (the room message) to every member of the
//!   room, as the views know them when the event is fanned out.
//! - `MemberJoined` / `MemberLeft` → `member-joined` / `member-left`
//!   `{roomId, userId}` to the members and the user concerned. Being in the
//!   same per-user streams as the messages, every member sees joins, leaves
//!   and messages in the same (log) order.
//!
//! Each delivery is published with `Nats-Msg-Id = <event id>:<user>`, so a
//! redelivered event does not deliver twice. The projection is `ordered`:
//! one event in flight across the cluster, so every user's deliveries are in
//! log order, and so in sequence order within each conversation.

use async_trait::async_trait;
use natter_events::{Envelope, Event};
use std::sync::Arc;

use natter_projections::{ApplyError, MessageView, Projection, RoomMessageView, ViewStore};
use serde_json::json;

use super::{Payload, PushBus};
use crate::commands::rooms::membership_after;
use crate::log::EventLog;
use crate::wire::{message_json, room_message_json};

pub struct FanOut {
    pub bus: Arc<dyn PushBus>,
    pub prefix: String,
    /// Room membership, to address room messages.
    pub views: Arc<dyn ViewStore>,
    /// The log, to confirm each addressee is still a member (the views may
    /// lag behind a leave).
    pub log: Arc<dyn EventLog>,
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
    /// The room's members per the views, each confirmed by the newest event
    /// of their member subject in the log: a member whose leave the views
    /// have not applied yet gets nothing more.
    async fn confirmed_members(&self, room: &str) -> Result<Vec<String>, ApplyError> {
        let candidates = self.views.room_members(room).await?;
        let subjects: Vec<String> = candidates.iter().map(|u| natter_events::subjects::member(&self.prefix, room, u)).collect();
        let lasts = futures::future::join_all(subjects.iter().map(|s| self.log.last(s))).await;
        let mut members = Vec::with_capacity(candidates.len());
        for (user, last) in candidates.into_iter().zip(lasts) {
            let last = last.map_err(|e| ApplyError::Unavailable(e.to_string()))?;
            if membership_after(last.as_ref()).member {
                members.push(user);
            }
        }
        Ok(members)
    }
}

#[async_trait]
impl Projection for FanOut {
    fn name(&self) -> &'static str {
        "push-fanout"
    }
    fn version(&self) -> u32 {
        1
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
            let mut members = self.confirmed_members(room).await?;
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
