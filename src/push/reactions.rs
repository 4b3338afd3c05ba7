//! What the fan-out pushes for a reaction, and the reactions an edit's push
//! carries.
//!
//! A reaction event names one user's change of one emoji; the push is
//! `messageUpdated` with the whole message and all its reactions, which
//! only the views hold (counts there are exact in any order, see
//! [`natter_events::ReactionChanged`]). So the fan-out waits until the
//! views hold this change (the writing node applies it before it answers,
//! so the wait is short), then reads the message and its reactions. The
//! fan-out handles a conversation's or room's events in log order, so
//! each push reflects at least every reaction before it. The fan-out never
//! depends on the views being up: if they stay behind longer than [`WAIT`]
//! the push goes out with what they hold, and if they cannot be read the
//! reaction is not pushed (logged): REST, and the next push of the
//! message, show the exact figures. Nothing else in the partition waits
//! longer than that.

use std::sync::Arc;
use std::time::Duration;

use natter_events::{Envelope, ReactionChanged};
use natter_projections::{ApplyError, Reactions, ViewStore};
use serde_json::Value;

use super::Payload;
use crate::wire::{Message, RoomMessage, reactions_of};

/// Longest wait for the views to hold a reaction before its push.
const WAIT: Duration = Duration::from_millis(500);
const POLL: Duration = Duration::from_millis(10);

/// Whom a reaction's push goes to.
pub enum Reacted {
    /// A direct message: both participants.
    Direct { users: [String; 2], payload: Payload },
    /// A room message: the room's members as of the event.
    Room { room: String, payload: Payload },
}

pub struct ReactionPushes {
    views: Arc<dyn ViewStore>,
}

fn store(e: natter_projections::StoreError) -> ApplyError {
    ApplyError::Unavailable(e.to_string())
}

impl ReactionPushes {
    pub fn new(views: Arc<dyn ViewStore>) -> ReactionPushes {
        ReactionPushes { views }
    }

    async fn reactions(&self, id: &str) -> Result<Option<Reactions>, ApplyError> {
        Ok(self.views.reactions(&[id.to_owned()]).await.map_err(store)?.remove(id))
    }

    /// The push of reaction `e` (at `env`'s position): `None` when its
    /// message is gone from the views (deleted since, or never applied) or
    /// the views cannot be read.
    pub async fn of(&self, env: &Envelope, e: &ReactionChanged) -> Option<Reacted> {
        match self.read(env, e).await {
            Ok(reacted) => reacted,
            Err(err) => {
                tracing::warn!(message = %e.message_id, event = %env.id, error = %err, "views unreadable: a reaction is not pushed (REST shows it)");
                None
            }
        }
    }

    async fn read(&self, env: &Envelope, e: &ReactionChanged) -> Result<Option<Reacted>, ApplyError> {
        let want = natter_projections::views::reaction_mark(env.position, e.on);
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.views.reaction_mark(&e.message_id, &e.user_id, &e.emoji).await.map_err(store)? < want {
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(message = %e.message_id, event = %env.id, "the views have not applied a reaction within 500 ms; pushing what they hold");
                break;
            }
            tokio::time::sleep(POLL).await;
        }
        let reactions = self.reactions(&e.message_id).await?;
        if let Some(state) = &e.state {
            let Some(m) = self.views.message(&e.message_id).await.map_err(store)?.filter(|m| !m.deleted) else { return Ok(None) };
            let seen = state.side(&m.receiver_id).is_some_and(|r| r.seen_seq >= m.seq);
            let data = to_value(Message::new(&m, seen).with_reactions(reactions.as_ref(), None));
            return Ok(Some(Reacted::Direct { users: [m.receiver_id, m.sender_id], payload: Payload { event: "messageUpdated".into(), data } }));
        }
        let Some(m) = self.views.room_message(&e.message_id).await.map_err(store)?.filter(|m| !m.deleted) else { return Ok(None) };
        let data = to_value(RoomMessage::new(&m).with_reactions(reactions.as_ref(), None));
        Ok(Some(Reacted::Room { room: m.room_id, payload: Payload { event: "messageUpdated".into(), data } }))
    }

    /// Prepares an edit's pushes of message `id`: adds its reactions, or
    /// returns false when the views say it is deleted (an edit that raced
    /// its deletion must not show the text again). If the views cannot be
    /// read the pushes go out as the event says.
    pub async fn edited(&self, id: &str, payloads: &mut [&mut Payload]) -> bool {
        let ids = [id.to_owned()];
        let (contents, reactions) = tokio::join!(self.views.contents(&ids), self.views.reactions(&ids));
        match (contents, reactions) {
            (Ok(contents), _) if contents.get(id).is_some_and(|c| c.deleted) => false,
            (Ok(_), Ok(mut reactions)) => {
                // A reply's preview is not stored with the delivery: each
                // socket's session reads it when it emits.
                if let Some(shown) = reactions_of(reactions.remove(id).as_ref(), None) {
                    let value = to_value(shown);
                    for p in payloads {
                        if let Some(fields) = p.data.as_object_mut() {
                            fields.insert("reactions".into(), value.clone());
                        }
                    }
                }
                true
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(message = %id, error = %e, "views unreadable: an edit is pushed without its reactions");
                true
            }
        }
    }
}

fn to_value(v: impl serde::Serialize) -> Value {
    serde_json::to_value(v).expect("client shapes serialize")
}
