//! What the views add to messages shown to a caller: each message's
//! reactions (with `me`), and which of the messages they answer were
//! deleted since (those replies show no preview). One read of each for a
//! whole page, however many messages it holds.

use std::collections::HashMap;

use natter_events::ReplyRef;
use natter_projections::Reactions;

use crate::error::ApiError;
use crate::state::AppState;
use crate::wire::{Message, RoomMessage};

pub(super) struct Shown {
    reactions: HashMap<String, Reactions>,
    deleted: Vec<String>,
}

impl Shown {
    /// Reads what `messages` (their ids and what they answer) need.
    pub(super) async fn read<'a>(node: &AppState, messages: impl Iterator<Item = (&'a String, &'a Option<ReplyRef>)>) -> Result<Shown, ApiError> {
        let (ids, answered): (Vec<String>, Vec<Option<String>>) = messages.map(|(id, r)| (id.clone(), r.as_ref().map(|r| r.message_id.clone()))).unzip();
        let answered: Vec<String> = answered.into_iter().flatten().collect();
        let (reactions, deleted) = tokio::join!(node.views().reactions(&ids), node.views().deleted_among(&answered));
        Ok(Shown { reactions: reactions?, deleted: deleted? })
    }

    pub(super) fn message(&self, m: Message, me: &str) -> Message {
        let reactions = self.reactions.get(&m.id);
        m.with_reactions(reactions, Some(me)).answering(&self.deleted)
    }

    pub(super) fn room_message(&self, m: RoomMessage, me: &str) -> RoomMessage {
        let reactions = self.reactions.get(&m.id);
        m.with_reactions(reactions, Some(me)).answering(&self.deleted)
    }
}
