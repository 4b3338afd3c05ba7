//! What the views add to messages shown to a caller: each message's
//! reactions (with `me`), and the preview of the messages they answer as
//! those read now (none once deleted). One read of each for a whole page,
//! however many messages it holds.

use std::collections::HashMap;

use natter_events::ReplyRef;
use natter_projections::{Content, Reactions};

use crate::error::ApiError;
use crate::state::AppState;
use crate::wire::{Message, RoomMessage};

pub(super) struct Shown {
    reactions: HashMap<String, Reactions>,
    answered: HashMap<String, Content>,
}

impl Shown {
    /// Reads what `messages` (their ids and what they answer) need.
    pub(super) async fn read<'a>(node: &AppState, messages: impl Iterator<Item = (&'a String, &'a Option<ReplyRef>)>) -> Result<Shown, ApiError> {
        let (ids, answered): (Vec<String>, Vec<Option<String>>) = messages.map(|(id, r)| (id.clone(), r.as_ref().map(|r| r.message_id.clone()))).unzip();
        let answered: Vec<String> = answered.into_iter().flatten().collect();
        let (reactions, answered) = tokio::join!(node.views().reactions(&ids), node.views().contents(&answered));
        Ok(Shown { reactions: reactions?, answered: answered? })
    }

    /// [`Shown::read`] for a message just changed (edited, deleted,
    /// reacted to): the change is in the log already, so if the views
    /// cannot be read it is answered without reactions and preview, never
    /// as a failure (a retry would repeat or refuse the change).
    pub(super) async fn after_change(node: &AppState, id: &String, reply_to: &Option<ReplyRef>) -> Shown {
        Self::read(node, std::iter::once((id, reply_to))).await.unwrap_or_else(|e| {
            tracing::warn!(message = %id, error = ?e, "views unreadable: a changed message is answered without its reactions and preview");
            Shown { reactions: HashMap::new(), answered: HashMap::new() }
        })
    }

    pub(super) fn message(&self, m: Message, me: &str) -> Message {
        let reactions = self.reactions.get(&m.id);
        m.with_reactions(reactions, Some(me)).answering(&self.answered)
    }

    pub(super) fn room_message(&self, m: RoomMessage, me: &str) -> RoomMessage {
        let reactions = self.reactions.get(&m.id);
        m.with_reactions(reactions, Some(me)).answering(&self.answered)
    }
}

/// What the message `id` answers reads now, for a just-sent or just-pushed
/// reply (one read; none without `id`). The reply is stored already: if
/// the views cannot be read it is shown without the preview, never as a
/// failure (a client would retry, or a socket be dropped, for a preview).
pub(crate) async fn answered(node: &AppState, id: Option<&str>) -> HashMap<String, Content> {
    let Some(id) = id else { return HashMap::new() };
    node.views().contents(&[id.to_owned()]).await.unwrap_or_else(|e| {
        tracing::warn!(answered = %id, error = %e, "views unreadable: a reply is shown without the preview of what it answers");
        HashMap::new()
    })
}
