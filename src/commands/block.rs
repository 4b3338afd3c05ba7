//! Blocking: a user blocks (or unblocks) another. While either has blocked
//! the other, direct messages between them are refused (403 `blocked`) and
//! typing is not relayed. The block lives in the conversation's state (see
//! [`natter_events::BlockChanged`]), so a send learns it from the one read
//! of the conversation it makes anyway.

use natter_events::{BlockChanged, DmState, Event, subjects};

use super::{CommandError, Commands, Refusal};

/// The event that sets `user`'s block of `other` to `on`; `None` when it is
/// already so. Pure.
pub fn decide(state: &DmState, user: &str, other: &str, on: bool) -> Option<BlockChanged> {
    let next = state.after_block(user, on)?;
    Some(BlockChanged { user_id: user.to_owned(), other_id: other.to_owned(), blocked: on, state: next })
}

/// Refuses a direct message from `sender` in a conversation where either
/// side has blocked the other. The blocked side is told only that it
/// cannot write. Pure.
pub fn check_send(state: &DmState, sender: &str) -> Result<(), Refusal> {
    let Some(me) = state.side(sender) else { return Ok(()) };
    if me.blocked {
        return Err(Refusal::Blocked("you blocked this user: unblock them to write to them".into()));
    }
    if state.any_block() {
        return Err(Refusal::Blocked("you cannot send messages to this user".into()));
    }
    Ok(())
}

impl Commands {
    /// `PUT`/`DELETE /api/users/:id/block`: `user` blocks (`on`) or unblocks
    /// `other`. Idempotent: nothing is appended when it is already so.
    #[tracing::instrument(skip_all, fields(user = %user, other = %other, on))]
    pub async fn set_block(&self, user: &str, other: &str, on: bool) -> Result<(), CommandError> {
        if user == other {
            return Err(Refusal::BadInput("you cannot block yourself".into()).into());
        }
        self.require_user(other, "user").await?;
        let command_id = format!("{user}:block:{}", uuid::Uuid::now_v7());
        self.append_dm(user, other, &command_id, |state| Ok(decide(state, user, other, on).map(Event::BlockChanged))).await?;
        Ok(())
    }

    /// Whether either of `a` and `b` has blocked the other (one read of the
    /// newest event of their conversation).
    pub async fn blocked_between(&self, a: &str, b: &str) -> Result<bool, CommandError> {
        let last = self.log.last(&subjects::dm(&self.prefix, a, b)).await?;
        Ok(last.as_ref().and_then(|l| l.envelope.event.dm_state()).is_some_and(DmState::any_block))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_bob_blocked_amy_then_neither_writes_and_blocking_again_appends_nothing() {
        let s = DmState::new("amy", "bob");
        assert!(check_send(&s, "amy").is_ok());
        let e = decide(&s, "bob", "amy", true).expect("a change");
        assert!(decide(&e.state, "bob", "amy", true).is_none(), "already blocked");
        assert!(matches!(check_send(&e.state, "amy"), Err(Refusal::Blocked(m)) if !m.contains("blocked")), "amy is not told she is blocked");
        assert!(matches!(check_send(&e.state, "bob"), Err(Refusal::Blocked(_))));
        let e = decide(&e.state, "bob", "amy", false).expect("unblock");
        assert!(check_send(&e.state, "amy").is_ok());
    }
}
