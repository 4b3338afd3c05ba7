//! Reactions: a user sets or takes back an emoji on a message, direct
//! (participants only) or in a room (members only).
//!
//! `PUT /api/messages/:messageId/reactions/:emoji` and `DELETE` the same (and
//! under `/api/rooms/:roomId/messages/:messageId/reactions/:emoji`). Each
//! change is a [`ReactionChanged`] event on the message's own conversation
//! or room subject, so it is ordered and fanned out with the message. The
//! views keep one mark per (message, user, emoji) where the newest change
//! wins, so counts are exact however events are duplicated or reordered,
//! and setting what is already set appends nothing (idempotent per user
//! and emoji). A message holds at most [`MAX_EMOJI`] different emoji.

use natter_events::{Event, ReactionChanged, subjects};
use natter_projections::{MessageView, Reactions, RoomMessageView};

use super::{CommandError, Commands, Failure, Refusal};
use crate::log::Logged;

/// Most different emoji on one message.
pub const MAX_EMOJI: usize = 20;
/// Longest emoji, in characters (flags, skin tones and ZWJ sequences are
/// several) and in bytes.
const EMOJI_CHARS: usize = 10;
const EMOJI_BYTES: usize = 40;

/// An emoji is a short run of symbols: no letters, spaces, controls or
/// ASCII punctuation (digits, `#` and `*` only as part of a keycap). Pure.
pub fn validate_emoji(emoji: &str) -> Result<(), Refusal> {
    let bad = || Refusal::BadInput(format!("{emoji:?} is not an emoji (at most {EMOJI_CHARS} symbols, no letters or spaces)"));
    let chars = emoji.chars().count();
    if chars == 0 || chars > EMOJI_CHARS || emoji.len() > EMOJI_BYTES {
        return Err(bad());
    }
    let ascii_ok = |c: char| c.is_ascii_digit() || c == '#' || c == '*';
    let symbol = |c: char| !c.is_ascii() && !c.is_alphabetic() && !c.is_whitespace() && !c.is_control() && !invisible(c);
    let first = emoji.chars().next().expect("not empty");
    if !emoji.chars().all(|c| ascii_ok(c) || symbol(c)) || !emoji.chars().any(|c| !c.is_ascii()) || modifier(first) {
        return Err(bad());
    }
    Ok(())
}

/// Characters that show nothing or reorder text (zero-width spaces, word
/// joiners, bidirectional controls, byte-order marks): never in an emoji.
fn invisible(c: char) -> bool {
    matches!(c, '\u{200B}' | '\u{200C}' | '\u{200E}' | '\u{200F}' | '\u{061C}' | '\u{FEFF}')
        || ('\u{202A}'..='\u{202E}').contains(&c)
        || ('\u{2060}'..='\u{2069}').contains(&c)
}

/// Characters that only modify the one before them (joiner, variation
/// selectors, keycap, skin tones, tags): never an emoji's first.
fn modifier(c: char) -> bool {
    c == '\u{200D}'
        || c == '\u{20E3}'
        || ('\u{FE00}'..='\u{FE0F}').contains(&c)
        || ('\u{1F3FB}'..='\u{1F3FF}').contains(&c)
        || ('\u{E0020}'..='\u{E007F}').contains(&c)
}

/// The event that sets (`on`) or takes back `user`'s `emoji` on message
/// `message_id`, where the user's newest change of it left it `set` and the
/// message has `reactions`; `None` when that changes nothing. Pure.
pub fn decide(message_id: &str, user: &str, emoji: &str, on: bool, set: bool, reactions: &Reactions) -> Result<Option<ReactionChanged>, Refusal> {
    if set == on {
        return Ok(None);
    }
    if on && !reactions.contains_key(emoji) && reactions.len() >= MAX_EMOJI {
        return Err(Refusal::Conflict(format!("a message holds at most {MAX_EMOJI} different emoji")));
    }
    Ok(Some(ReactionChanged { message_id: message_id.to_owned(), user_id: user.to_owned(), emoji: emoji.to_owned(), on, state: None, last_seq: None }))
}

fn gone() -> Refusal {
    Refusal::Conflict("the message was deleted".into())
}

impl Commands {
    /// Whether `user`'s newest change of `emoji` on `message` set it, and
    /// the message's reactions, as the views hold them now (read again on
    /// every attempt of an append).
    async fn reaction_of(&self, message: &str, user: &str, emoji: &str) -> Result<(bool, Reactions), CommandError> {
        let ids = [message.to_owned()];
        let (mark, all) = tokio::join!(self.views.reaction_mark(message, user, emoji), self.views.reactions(&ids));
        Ok((mark? % 2 == 1, all?.remove(message).unwrap_or_default()))
    }

    /// Sets (`on`) or takes back `user`'s `emoji` on direct message
    /// `message_id`: the message afterwards and whether its receiver has
    /// seen it.
    #[tracing::instrument(skip_all, fields(user = %user, message = %message_id, on))]
    pub async fn react(&self, user: &str, message_id: &str, emoji: &str, on: bool) -> Result<(MessageView, bool), CommandError> {
        let not_found = || Refusal::NotFound("Message not found".into());
        natter_events::validate_id(message_id).map_err(|_| not_found())?;
        validate_emoji(emoji)?;
        let m = self.views.message(message_id).await?.filter(|m| m.sender_id == user || m.receiver_id == user).ok_or_else(not_found)?;
        if m.deleted {
            return Err(gone().into());
        }
        let subject = &subjects::dm(&self.prefix, &m.sender_id, &m.receiver_id);
        let command_id = format!("{user}:react:{}", uuid::Uuid::now_v7());
        self.append(subject, &command_id, |last: Option<Logged>| async move {
            let state = last.as_ref().and_then(|l| l.envelope.event.dm_state()).cloned();
            let state = state.ok_or_else(|| Failure::Internal(format!("{subject} holds message {message_id} but no conversation state")))?;
            // Read on every attempt: a change appended since the last one
            // (a deletion, this user's other device) is seen.
            let (set, reactions) = self.reaction_of(message_id, user, emoji).await?;
            if super::revise::deleted_by(last.as_ref(), message_id) || self.views.message(message_id).await?.is_some_and(|m| m.deleted) {
                return Err(gone().into());
            }
            // Reacting is writing to the other: refused while either
            // blocks; taking a reaction back is not.
            if on {
                super::block::check_send(&state, user)?;
            }
            Ok(decide(message_id, user, emoji, on, set, &reactions)?.map(|e| Event::ReactionChanged(ReactionChanged { state: Some(state), ..e })))
        })
        .await?;
        let (fresh, marks) = tokio::join!(self.views.message(message_id), self.views.watermarks(&m.conversation));
        let m = fresh?.unwrap_or(m);
        let seen = marks?.get(&m.receiver_id).is_some_and(|w| *w >= m.seq);
        Ok((m, seen))
    }

    /// Sets (`on`) or takes back `user`'s `emoji` on message `message_id`
    /// of `room` (members only): the message afterwards.
    #[tracing::instrument(skip_all, fields(user = %user, room = %room, message = %message_id, on))]
    pub async fn react_room(&self, user: &str, room: &str, message_id: &str, emoji: &str, on: bool) -> Result<RoomMessageView, CommandError> {
        let not_found = || Refusal::NotFound("Message not found".into());
        self.require_member(room, user).await?;
        natter_events::validate_id(message_id).map_err(|_| not_found())?;
        validate_emoji(emoji)?;
        let m = self.views.room_message(message_id).await?.filter(|m| m.room_id == room).ok_or_else(not_found)?;
        if m.deleted {
            return Err(gone().into());
        }
        let subject = subjects::room(&self.prefix, room);
        let command_id = format!("{user}:react:{}", uuid::Uuid::now_v7());
        self.append(&subject, &command_id, |head: Option<Logged>| async move {
            let head = head.ok_or_else(|| Refusal::NotFound("Room not found".into()))?;
            let last_seq = super::rooms::room_last_seq(&head)?;
            let (set, reactions) = self.reaction_of(message_id, user, emoji).await?;
            if super::revise::deleted_by(Some(&head), message_id) || self.views.room_message(message_id).await?.is_some_and(|m| m.deleted) {
                return Err(gone().into());
            }
            Ok(decide(message_id, user, emoji, on, set, &reactions)?.map(|e| Event::ReactionChanged(ReactionChanged { last_seq: Some(last_seq), ..e })))
        })
        .await?;
        Ok(self.views.room_message(message_id).await?.unwrap_or(m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emoji_are_short_runs_of_symbols() {
        for ok in ["👍", "❤️", "👍🏽", "🇫🇷", "👩‍👩‍👧", "1️⃣", "#️⃣", "✅"] {
            assert!(validate_emoji(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a", "ok", "1", ":)", "👍 ", " ", "\u{0}", "é", "👍a", &"👍".repeat(11), "a.b", "日本", "\u{200D}", "\u{202E}", "\u{2060}", "👍\u{202E}", "\u{FE0F}", "\u{1F3FB}"] {
            assert!(validate_emoji(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn setting_what_is_set_changes_nothing_and_emoji_are_bounded() {
        let none = Reactions::new();
        assert!(decide("m", "amy", "👍", true, false, &none).unwrap().is_some());
        assert!(decide("m", "amy", "👍", true, true, &none).unwrap().is_none(), "already set");
        assert!(decide("m", "amy", "👍", false, false, &none).unwrap().is_none(), "nothing to take back");
        let full: Reactions = (0..MAX_EMOJI).map(|i| (format!("e{i}"), vec!["bob".to_owned()])).collect();
        assert!(matches!(decide("m", "amy", "👍", true, false, &full), Err(Refusal::Conflict(_))));
        assert!(decide("m", "amy", "e3", true, false, &full).unwrap().is_some(), "an emoji already there is fine");
    }
}
