//! Recognising a retry at any age.
//!
//! A send with a `clientMsgId` may be retried seconds or days later (a
//! phone back online, an outbox replayed). The log's own deduplication
//! (`Nats-Msg-Id`, the embedded log's window) only covers the broker's
//! window, and the views only hold what the projector has applied. Every
//! event of a conversation is in one of two places:
//!
//! - at or below the views' applied floor ([`crate::log::ViewsProgress`]: every event
//!   up to that log sequence is in the views), so the views' index on the
//!   command id finds it;
//! - above the floor, so walking the conversation's subject in the log from
//!   the floor finds it.
//!
//! The floor is read *before* the views are asked, so an event applied in
//! between is in the views by the time they are read. A floor read earlier
//! is still a valid lower bound (it only grows), so it is cached briefly.
//! When the views fall far behind (a stopped projector), the walk is
//! bounded: past [`MAX_WALK`] events the send is answered 503 instead of
//! risking a second copy.

use std::time::{Duration, Instant};

use natter_events::Envelope;

use super::{CommandError, Commands, Failure};
use crate::log::LogError;

/// Events of one conversation a retry check walks at most.
pub(crate) const MAX_WALK: usize = 10_000;

/// How long a floor read is used before it is read again.
const FLOOR_TTL: Duration = Duration::from_millis(200);

impl Commands {
    /// The views' applied floor, read at most every [`FLOOR_TTL`].
    pub(crate) async fn views_floor(&self) -> Result<u64, CommandError> {
        if let Some((floor, at)) = *self.floor.lock().expect("floor lock") {
            if at.elapsed() < FLOOR_TTL {
                return Ok(floor);
            }
        }
        let floor = self.progress.applied_through().await?;
        let mut cached = self.floor.lock().expect("floor lock");
        // Two concurrent reads: keep the higher one.
        if cached.is_none_or(|(old, _)| old <= floor) {
            *cached = Some((floor, Instant::now()));
        }
        Ok(floor)
    }

    /// The event on `subject` above log sequence `floor` carrying
    /// `command_id`, if any: what the views may not hold yet.
    pub(crate) async fn logged_since(&self, subject: &str, floor: u64, command_id: &str) -> Result<Option<Envelope>, CommandError> {
        let mut from = floor + 1;
        for _ in 0..MAX_WALK {
            match self.log.next_on(subject, from).await? {
                None => return Ok(None),
                Some(l) if l.envelope.command_id == command_id => return Ok(Some(l.envelope)),
                Some(l) => from = l.log_seq + 1,
            }
        }
        tracing::warn!(
            subject,
            floor,
            "the views are more than {MAX_WALK} events behind the log on this conversation: a send with a clientMsgId \
             cannot be checked for a retry, answered 503 (is the mongo-views projector running? see `natter projections`)"
        );
        Err(Failure::Log(LogError::Unavailable(format!(
            "the views are too far behind the log to recognise a retry on {subject}; retry shortly"
        )))
        .into())
    }
}
