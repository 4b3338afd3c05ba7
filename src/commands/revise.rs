//! Edit and delete a message (direct or in a room), by its sender only.
//!
//! - Edit (`PATCH /api/messages/:messageId {message}`): the message keeps its
//!   `_id` and `seq`, takes the new text and gains `editedAt`.
//! - Delete for everyone (`DELETE /api/messages/:messageId`): the message
//!   stays in the sequence as a tombstone (`deleted: true`, no text,
//!   attachment or reply), so nothing looks like a gap; if its receiver had
//!   not read it, it stops counting as unseen (see
//!   [`natter_events::DmState::after_delete`]). Deleting is final and
//!   idempotent.
//!
//! Both append an event carrying the whole message as it reads afterwards
//! ([`natter_events::MessageRevised`]), so views and pushes need nothing
//! else. Someone else's message is 403 to its receiver and 404 to anyone
//! else (nothing is learnt about other conversations).
//!
//! Room messages likewise (`PATCH`/`DELETE
//! /api/rooms/:roomId/messages/:messageId`): the change is appended on the
//! room's subject with the room's newest seq, its deletion stops counting
//! as unread for members who had not read it, and editing needs the
//! sender to be a member still (deleting does not).

use chrono::{DateTime, Utc};
use natter_events::{DmState, Event, MessageRevised, MessageSent, RoomMessageRevised, RoomMessageSent, subjects};
use natter_projections::{MessageView, RoomMessageView};

use super::{CommandError, Commands, Failure, Refusal};
use crate::log::Logged;

/// What the sender does to their message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// New text.
    Edit(String),
    /// Delete for everyone.
    Delete,
}

impl Change {
    fn verb(&self) -> &'static str {
        match self {
            Change::Edit(_) => "edit",
            Change::Delete => "delete",
        }
    }
}

/// The message after a change, and whether its receiver has seen it.
#[derive(Debug, Clone)]
pub struct Revised {
    pub message: MessageView,
    pub seen: bool,
}

/// The event `change` makes of message `m` in a conversation in `state`
/// (sent at `sent_at`); `None` when it changes nothing (the same text, a
/// message already deleted). Pure.
pub fn decide(state: &DmState, m: &MessageView, sent_at: DateTime<Utc>, change: &Change) -> Result<Option<Event>, Refusal> {
    let mut message = MessageSent {
        message_id: m.id.clone(),
        client_msg_id: m.client_msg_id.clone(),
        sender_id: m.sender_id.clone(),
        receiver_id: m.receiver_id.clone(),
        message: m.message.clone(),
        attachments: m.attachment.iter().cloned().collect(),
        seq: m.seq,
        sender_count: m.sender_count,
        state: state.clone(),
        // The reference only: a preview an older view holds stays out of the log.
        reply_to: m.reply_to.as_ref().map(|r| natter_events::ReplyRef::to(r.message_id.clone())),
    };
    let revised = |message| MessageRevised { message, sent_at, sent_command_id: m.command_id.clone() };
    match change {
        _ if m.deleted && *change == Change::Delete => Ok(None),
        _ if m.deleted => Err(Refusal::Conflict("the message was deleted".into())),
        Change::Edit(text) if m.message.as_deref() == Some(text.as_str()) => Ok(None),
        Change::Edit(text) => {
            super::block::check_send(state, &m.sender_id)?;
            message.message = Some(text.clone());
            Ok(Some(Event::MessageEdited(revised(message))))
        }
        Change::Delete => {
            message.state = state.after_delete(&m.sender_id, m.seq).map_err(|()| {
                Refusal::Conflict(format!(
                    "more than {} of your messages to this user would stand deleted before they read them; try again once they have read on",
                    natter_events::MAX_UNSEEN_DELETED
                ))
            })?;
            (message.message, message.attachments, message.reply_to) = (None, Vec::new(), None);
            Ok(Some(Event::MessageDeleted(revised(message))))
        }
    }
}

/// The event `change` makes of room message `m` in a room whose newest
/// seq is `last_seq`; `None` when it changes nothing. Pure.
pub fn decide_room(m: &RoomMessageView, sent_at: DateTime<Utc>, last_seq: u64, change: &Change) -> Result<Option<Event>, Refusal> {
    let mut message = RoomMessageSent {
        message_id: m.id.clone(),
        room_id: m.room_id.clone(),
        sender_id: m.sender_id.clone(),
        client_msg_id: m.client_msg_id.clone(),
        message: m.message.clone(),
        attachment: m.attachment.clone(),
        seq: m.seq,
        // The reference only: a preview an older view holds stays out of the log.
        reply_to: m.reply_to.as_ref().map(|r| natter_events::ReplyRef::to(r.message_id.clone())),
    };
    let revised = |message| RoomMessageRevised { message, sent_at, sent_command_id: m.command_id.clone(), last_seq };
    match change {
        _ if m.deleted && *change == Change::Delete => Ok(None),
        _ if m.deleted => Err(Refusal::Conflict("the message was deleted".into())),
        Change::Edit(text) if m.message.as_deref() == Some(text.as_str()) => Ok(None),
        Change::Edit(text) => {
            message.message = Some(text.clone());
            Ok(Some(Event::RoomMessageEdited(revised(message))))
        }
        Change::Delete => {
            (message.message, message.attachment, message.reply_to) = (None, None, None);
            Ok(Some(Event::RoomMessageDeleted(revised(message))))
        }
    }
}

/// Whether the subject's newest event deleted message `id`: a deletion
/// appended since the views were read. Pure.
pub(super) fn deleted_by(last: Option<&Logged>, id: &str) -> bool {
    match last.map(|l| &l.envelope.event) {
        Some(Event::MessageDeleted(e)) => e.message.message_id == id,
        Some(Event::RoomMessageDeleted(e)) => e.message.message_id == id,
        _ => false,
    }
}

/// A message as its deletion leaves it.
fn tombstone(m: MessageView) -> MessageView {
    MessageView { deleted: true, message: None, attachment: None, reply_to: None, edited_at: None, ..m }
}

/// The time a view's `createdAt` says.
fn sent_at(created_at: &str, id: &str) -> Result<DateTime<Utc>, Failure> {
    DateTime::parse_from_rfc3339(created_at)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| Failure::Internal(format!("message {id} has a createdAt that is not RFC 3339: {e}")))
}

impl Commands {
    /// Edits or deletes `message_id` on behalf of `user`, who must have sent it.
    #[tracing::instrument(skip_all, fields(user = %user, message = %message_id, change = change.verb()))]
    pub async fn revise(&self, user: &str, message_id: &str, change: Change) -> Result<Revised, CommandError> {
        let not_found = || Refusal::NotFound("Message not found".into());
        natter_events::validate_id(message_id).map_err(|_| not_found())?;
        if let Change::Edit(text) = &change {
            super::send::validate_content(Some(text), None, None, &self.limits)?;
        }
        let m = self.views.message(message_id).await?.ok_or_else(not_found)?;
        if m.sender_id != user {
            return Err(if m.receiver_id == user {
                Refusal::Forbidden(format!("only the sender of a message can {} it", change.verb())).into()
            } else {
                not_found().into()
            });
        }
        let sent_at = sent_at(&m.created_at, message_id)?;
        let subject = &subjects::dm(&self.prefix, &m.sender_id, &m.receiver_id);
        let command_id = format!("{user}:{}:{}", change.verb(), uuid::Uuid::now_v7());
        let (m, change) = (&m, &change);
        let env = self
            .append(subject, &command_id, |last: Option<Logged>| async move {
                let state = last.as_ref().and_then(|l| l.envelope.event.dm_state());
                let state = state.ok_or_else(|| Failure::Internal(format!("{subject} holds message {message_id} but no conversation state")))?;
                // Read on every attempt: a deletion appended since (from
                // the sender's other device) is either the newest event or
                // in the views by now, and an edit never revives it.
                let current = self.views.message(message_id).await?.unwrap_or_else(|| m.clone());
                let gone = current.deleted || deleted_by(last.as_ref(), message_id);
                Ok(decide(state, &MessageView { deleted: gone, ..current }, sent_at, change)?)
            })
            .await?;
        let (message, state) = match &env {
            Some(env) => (MessageView::of(env).expect("a message change"), env.event.dm_state().cloned()),
            // Nothing changed: deleted already, or the same text.
            None if *change == Change::Delete => (tombstone(m.clone()), None),
            None => (m.clone(), None),
        };
        let seen = match state {
            Some(state) => state.side(&message.receiver_id).is_some_and(|r| r.seen_seq >= message.seq),
            None => self.views.watermarks(&message.conversation).await?.get(&message.receiver_id).is_some_and(|w| *w >= message.seq),
        };
        Ok(Revised { message, seen })
    }

    /// Edits or deletes room message `message_id` of `room` on behalf of
    /// `user`, who must have sent it (and, to edit, be a member still).
    #[tracing::instrument(skip_all, fields(user = %user, room = %room, message = %message_id, change = change.verb()))]
    pub async fn revise_room(&self, user: &str, room: &str, message_id: &str, change: Change) -> Result<RoomMessageView, CommandError> {
        let not_found = || Refusal::NotFound("Message not found".into());
        super::rooms::room_id(room)?;
        natter_events::validate_id(message_id).map_err(|_| not_found())?;
        if let Change::Edit(text) = &change {
            super::send::validate_content(Some(text), None, None, &self.limits)?;
        }
        let (member, m) = tokio::join!(self.membership(room, user), self.views.room_message(message_id));
        let (member, m) = (member?.member, m?.filter(|m| m.room_id == room));
        let m = match m {
            // Only members learn what a room holds.
            _ if !member && matches!(change, Change::Edit(_)) => return Err(super::rooms::not_member().into()),
            Some(m) if m.sender_id == user => m,
            Some(_) if member => return Err(Refusal::Forbidden(format!("only the sender of a message can {} it", change.verb())).into()),
            _ => return Err(not_found().into()),
        };
        let sent_at = sent_at(&m.created_at, message_id)?;
        let subject = &subjects::room(&self.prefix, room);
        let command_id = format!("{user}:{}:{}", change.verb(), uuid::Uuid::now_v7());
        let (m, change) = (&m, &change);
        let env = self
            .append(subject, &command_id, |last: Option<Logged>| async move {
                let head = last.as_ref().ok_or_else(|| Failure::Internal(format!("{subject} holds message {message_id} but no event")))?;
                let last_seq = super::rooms::room_last_seq(head)?;
                // Read on every attempt (see `revise`).
                let current = self.views.room_message(message_id).await?.unwrap_or_else(|| m.clone());
                let gone = current.deleted || deleted_by(last.as_ref(), message_id);
                Ok(decide_room(&RoomMessageView { deleted: gone, ..current }, sent_at, last_seq, change)?)
            })
            .await?;
        Ok(match &env {
            Some(env) => RoomMessageView::of(env).expect("a room message change"),
            None if *change == Change::Delete => {
                RoomMessageView { deleted: true, message: None, attachment: None, reply_to: None, edited_at: None, ..m.clone() }
            }
            None => m.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(state: &DmState) -> (DmState, MessageView) {
        let (state, seq, count) = state.after_send("amy");
        let m = MessageView {
            id: format!("m{seq}"),
            conversation: subjects::dm_conversation("amy", "bob"),
            seq,
            sender_count: count,
            command_id: format!("amy:c{seq}"),
            client_msg_id: None,
            sender_id: "amy".into(),
            receiver_id: "bob".into(),
            message: Some("hello".into()),
            attachment: Some("https://x.io/a.png".into()),
            created_at: "2026-11-28T09:00:00.000Z".into(),
            reply_to: None,
            edited_at: None,
            deleted: false,
            cpos: seq,
        };
        (state, m)
    }

    #[test]
    fn given_a_message_when_amy_edits_it_then_it_keeps_its_seq_and_counts() {
        let (state, m) = sent(&DmState::new("amy", "bob"));
        let Some(Event::MessageEdited(e)) = decide(&state, &m, Utc::now(), &Change::Edit("hi".into())).unwrap() else { panic!("an edit") };
        assert_eq!((e.message.seq, e.message.message.as_deref(), e.message.attachments.len()), (1, Some("hi"), 1));
        assert_eq!(e.message.state, state, "an edit changes no count");
        assert!(decide(&state, &m, Utc::now(), &Change::Edit("hello".into())).unwrap().is_none(), "the same text: nothing");
    }

    #[test]
    fn given_an_unseen_message_when_amy_deletes_it_then_it_no_longer_counts_and_is_final() {
        let (state, m) = sent(&DmState::new("amy", "bob"));
        assert_eq!(state.unseen("bob", "amy"), 1);
        let Some(Event::MessageDeleted(e)) = decide(&state, &m, Utc::now(), &Change::Delete).unwrap() else { panic!("a deletion") };
        assert_eq!((e.message.message.as_deref(), e.message.attachments.len(), e.message.seq), (None, 0, 1));
        assert_eq!(e.message.state.unseen("bob", "amy"), 0);
        let gone = MessageView { deleted: true, ..m };
        assert!(decide(&e.message.state, &gone, Utc::now(), &Change::Delete).unwrap().is_none(), "deleting again: nothing");
        assert!(matches!(decide(&e.message.state, &gone, Utc::now(), &Change::Edit("x".into())), Err(Refusal::Conflict(_))));
    }

    #[test]
    fn a_blocked_conversation_refuses_edits_but_not_deletions() {
        let (state, m) = sent(&DmState::new("amy", "bob"));
        let state = state.after_block("bob", true).unwrap();
        assert!(matches!(decide(&state, &m, Utc::now(), &Change::Edit("x".into())), Err(Refusal::Blocked(_))));
        assert!(decide(&state, &m, Utc::now(), &Change::Delete).unwrap().is_some());
    }
}
