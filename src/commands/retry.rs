//! Recognising a retry at any age.
//!
//! A send with a `clientMsgId` may be retried seconds or days later (a
//! phone back online, an outbox replayed). Every earlier event of the
//! conversation carrying its command id is in at least one of three places:
//!
//! - at or below the views' applied floor ([`crate::log::ViewsProgress`]:
//!   every event up to that log sequence has been applied to the views, or
//!   parked), so the views' unique index on the command id finds it;
//! - appended within the log's deduplication window (`Nats-Msg-Id`, the
//!   embedded log's window), so the append itself returns the original;
//! - above the floor and older than that window: the views may not hold it
//!   yet and the log has forgotten its id, so the conversation's subject is
//!   walked from the floor, stopping at the first event young enough for
//!   the window to cover it (events of a subject are in time order).
//!
//! The floor is read *before* the views are asked, so an event applied in
//! between is in the views by the time they are read. A floor is read at
//! most every [`FLOOR_TTL`] per node, with the time of the event it stands
//! at: while the views keep up (that event is younger than the window),
//! nothing is walked at all. Only when the views lag further behind than
//! the window does a send walk, and then never more than [`MAX_WALK`]
//! events: past that it answers 503 rather than risk a second copy.
//!
//! Limits, named so they are not mistaken for guarantees: an event a
//! projector *parked* is below the floor yet not in the views; a key reused
//! by the same sender in another conversation is looked up in that
//! conversation only; and "young" is judged by the event's own timestamp,
//! so node clocks must agree to within [`margin`] (NTP does).

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use super::{CommandError, Commands, Failure};
use crate::log::{LogError, Logged};

/// Events of one conversation a retry check walks at most.
pub(crate) const MAX_WALK: usize = 10_000;

/// How long a floor read is used before it is read again.
const FLOOR_TTL: Duration = Duration::from_millis(200);

/// The views' applied floor: the log sequence, and the time of the event
/// there (`None`: unknown).
#[derive(Clone, Copy)]
pub(crate) struct Floor {
    seq: u64,
    at: Option<DateTime<Utc>>,
}

/// How much younger than the dedup window an event must be for the window
/// to be trusted with it: room for clock skew between nodes and for the
/// time between an event's timestamp and its append.
fn margin(window: Duration) -> Duration {
    (window / 2).min(Duration::from_secs(60))
}

/// Whether the log's deduplication still covers an event stamped `at`. Pure.
fn covered(at: DateTime<Utc>, now: DateTime<Utc>, window: Duration) -> bool {
    let trusted = chrono::Duration::from_std(window - margin(window)).unwrap_or(chrono::Duration::MAX);
    now - at < trusted
}

impl Commands {
    /// The views' applied floor, read at most every [`FLOOR_TTL`].
    pub(crate) async fn views_floor(&self) -> Result<Floor, CommandError> {
        if let Some((seq, at, read)) = *self.floor.lock().expect("floor lock")
            && read.elapsed() < FLOOR_TTL
        {
            return Ok(Floor { seq, at });
        }
        let read = Instant::now();
        let seq = self.progress.applied_through().await?;
        let at = match seq {
            0 => None,
            _ => self.log.get(seq).await.ok().map(|l| l.envelope.at),
        };
        *self.floor.lock().expect("floor lock") = Some((seq, at, read));
        Ok(Floor { seq, at })
    }

    /// The event on `subject` above `floor` carrying `command_id` that the
    /// log's deduplication no longer covers, if any: what neither the views
    /// nor the append would recognise. With `whole`, any such event however
    /// young (the append was refused, so its deduplication never ran).
    pub(crate) async fn logged_since(&self, subject: &str, floor: Floor, command_id: &str, whole: bool) -> Result<Option<Logged>, CommandError> {
        let (window, now) = (self.log.dedup_window(), Utc::now());
        let covered = |at: DateTime<Utc>| !whole && covered(at, now, window);
        if floor.at.is_some_and(covered) {
            return Ok(None);
        }
        let mut from = floor.seq + 1;
        for _ in 0..MAX_WALK {
            match self.log.next_on(subject, from).await {
                Ok(None) => return Ok(None),
                Ok(Some(l)) if l.envelope.command_id == command_id => return Ok(Some(l)),
                Ok(Some(l)) if covered(l.envelope.at) => return Ok(None),
                Ok(Some(l)) => from = l.log_seq + 1,
                // An event this build cannot read is not this command's.
                Err(LogError::Corrupt { seq, .. }) => from = seq + 1,
                Err(e) => return Err(e.into()),
            }
        }
        tracing::warn!(
            subject,
            floor = floor.seq,
            "the views are more than {MAX_WALK} events behind the log on this conversation: a send with a clientMsgId \
             cannot be checked for a retry, answered 503 (is the mongo-views projector running? see `natter projections`)"
        );
        Err(Failure::Log(LogError::Unavailable(format!(
            "the views are too far behind the log to recognise a retry on {subject}; retry shortly"
        )))
        .into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_is_trusted_with_events_well_inside_it() {
        let now = Utc::now();
        let window = Duration::from_secs(600);
        assert_eq!(margin(window), Duration::from_secs(60));
        assert!(covered(now - chrono::Duration::seconds(10), now, window));
        assert!(covered(now - chrono::Duration::seconds(539), now, window));
        assert!(!covered(now - chrono::Duration::seconds(541), now, window), "inside the window, but within the margin");
        assert!(!covered(now - chrono::Duration::days(3), now, window));
        // A short window keeps half of itself.
        let short = Duration::from_secs(1);
        assert!(covered(now - chrono::Duration::milliseconds(400), now, short));
        assert!(!covered(now - chrono::Duration::milliseconds(600), now, short));
    }
}
