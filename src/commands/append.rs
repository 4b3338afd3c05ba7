//! The one write path of every command, and the one idempotency check of
//! every send.

use std::future::Future;
use std::time::Duration;

use natter_events::{DmState, Envelope, Event, subjects};
use natter_projections::{ApplyError, StoreError};

use super::{CommandError, Commands, Failure, MAX_ATTEMPTS, Refusal};
use crate::log::{LogError, Logged};

/// Where an event after `last` (the subject's newest) goes: its position
/// on the subject, and the log sequence the subject must still end at (0:
/// empty). Pure.
fn next_on(last: Option<&Logged>) -> (u64, u64) {
    last.map_or((1, 0), |l| (l.envelope.position + 1, l.log_seq))
}

/// The command id of a send: the sender's `clientMsgId` under `scope`
/// (the sender, and what they send to), or a new one.
pub(crate) fn command_id(scope: &str, client_msg_id: Option<&str>) -> String {
    match client_msg_id {
        Some(c) => format!("{scope}:{c}"),
        None => format!("{scope}:{}", uuid::Uuid::now_v7()),
    }
}

/// How long a command waits for the projectors to apply its event before
/// applying it itself.
const SETTLE_WAIT: Duration = Duration::from_secs(1);

fn reused_key() -> Refusal {
    Refusal::Conflict("clientMsgId was already used for a different message".into())
}

impl Commands {
    /// Appends the event `decide` makes of `subject`'s newest event (`None`:
    /// the subject is empty), if the subject has not moved meanwhile; when
    /// it has, reads again and decides again (with a little jitter, so that
    /// competing writers stop colliding). `decide` may refuse, or return
    /// `None` when there is nothing to do. An event whose `command_id` is
    /// already in the log is not appended again: the original is returned.
    /// The event is in the views before this returns ([`Commands::settle`]),
    /// so a read through any node sees it (unless a store is down, or the
    /// event is poison to a projection and parked: then it is safe in the
    /// log and the projectors catch up, or the operator replays it).
    pub(crate) async fn append<D, F>(&self, subject: &str, command_id: &str, decide: D) -> Result<Option<Envelope>, CommandError>
    where
        D: Fn(Option<Logged>) -> F,
        F: Future<Output = Result<Option<Event>, CommandError>>,
    {
        let started = std::time::Instant::now();
        for attempt in 0..MAX_ATTEMPTS {
            let last = self.log.last(subject).await?;
            let (position, expected) = next_on(last.as_ref());
            let Some(event) = decide(last).await? else { return Ok(None) };
            let env = Envelope::new(command_id.to_owned(), subject.to_owned(), position, event);
            match self.log.append(&env, expected).await {
                Ok(appended) if !appended.duplicate => {
                    self.metrics.event_appended(env.event.type_name());
                    self.metrics.append_took(started.elapsed().as_secs_f64());
                    self.settle(&env, appended.log_seq).await;
                    return Ok(Some(env));
                }
                Ok(appended) => {
                    let original = self.log.get(appended.log_seq).await?;
                    self.settle(&original.envelope, original.log_seq).await;
                    return Ok(Some(original.envelope));
                }
                Err(LogError::Conflict) => {
                    self.metrics.append_conflict();
                    let jitter = (uuid::Uuid::new_v4().as_u128() % 4) as u64 * u64::from(attempt.min(5));
                    tokio::time::sleep(Duration::from_millis(jitter)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(Failure::Internal(format!("{subject}: gave up after {MAX_ATTEMPTS} concurrent-append conflicts")).into())
    }

    /// [`Commands::append`] on the direct conversation of `a` and `b`,
    /// deciding from the conversation state its newest event carries.
    pub(crate) async fn append_dm<F>(&self, a: &str, b: &str, command_id: &str, decide: F) -> Result<Option<Envelope>, CommandError>
    where
        F: Fn(&DmState) -> Result<Option<Event>, Refusal>,
    {
        let subject = subjects::dm(&self.prefix, a, b);
        self.append(&subject, command_id, |last: Option<Logged>| {
            let state = match &last {
                Some(l) => l.envelope.event.dm_state().cloned().ok_or_else(|| {
                    Failure::Internal(format!("event at log sequence {} on {} is not a DM event", l.log_seq, l.envelope.subject)).into()
                }),
                None => Ok(DmState::new(a, b)),
            };
            std::future::ready(state.and_then(|state| Ok(decide(&state)?)))
        })
        .await
    }

    /// The one idempotency check of every send. With a `clientMsgId`
    /// (`key`: the conversation's subject and the command id), a message
    /// already in the views (`stored`) or in the log above what they have
    /// applied (`logged` reads it from its event) is a retry, however long
    /// after (see `retry.rs`); otherwise `append` makes it (the log also
    /// deduplicates within its window and returns the original). When
    /// `append` refuses (the conversation changed since the original: a
    /// block, a room left), the log's dedup never sees the retry, so the
    /// conversation above the views' floor is searched for the original
    /// before the refusal is answered. Either way the message returned must
    /// be what this command asks for (`same`): a key reused for another
    /// message is a 409.
    pub(crate) async fn once<V, S, A>(
        &self,
        key: Option<(&str, &str)>,
        stored: S,
        logged: impl Fn(&Envelope) -> Option<V>,
        append: A,
        same: impl Fn(&V) -> bool,
    ) -> Result<V, CommandError>
    where
        S: Future<Output = Result<Option<V>, StoreError>>,
        A: Future<Output = Result<Option<V>, CommandError>>,
    {
        let (found, floor) = match key {
            None => (None, None),
            Some((subject, command_id)) => {
                // The floor first: whatever is at or below it is in the
                // views by the time they are read.
                let floor = self.views_floor().await?;
                let found = match stored.await? {
                    Some(m) => Some(m),
                    None => match self.logged_since(subject, floor, command_id, false).await? {
                        Some(original) => Some(self.adopt(&original, &logged).await?),
                        None => None,
                    },
                };
                (found, Some(floor))
            }
        };
        let message = match found {
            Some(m) => m,
            None => match (append.await, key.zip(floor)) {
                (Ok(appended), _) => appended.ok_or_else(reused_key)?,
                (Err(CommandError::Refused(refusal)), Some(((subject, command_id), floor))) => {
                    match self.logged_since(subject, floor, command_id, true).await? {
                        Some(original) => self.adopt(&original, &logged).await?,
                        None => return Err(refusal.into()),
                    }
                }
                (Err(e), _) => return Err(e),
            },
        };
        if same(&message) { Ok(message) } else { Err(reused_key().into()) }
    }

    /// A retry's original found in the log: in the views (they had not
    /// applied it), and read as the command's result.
    async fn adopt<V>(&self, original: &Logged, logged: &impl Fn(&Envelope) -> Option<V>) -> Result<V, CommandError> {
        self.settle(&original.envelope, original.log_seq).await;
        Ok(logged(&original.envelope).ok_or_else(reused_key)?)
    }

    /// Sees that the event at log sequence `log_seq` is in the views and
    /// counts before the command answers (read-your-writes): where the
    /// projectors can be watched (the embedded tail), by waiting for them
    /// to pass it, so it is applied once; else, or if they are slow
    /// ([`SETTLE_WAIT`]) or stopped (the node is stopping), by applying it
    /// now (the projectors apply it again, idempotently). A projection that
    /// parked the event as poison has passed it without applying it: so
    /// would this apply have failed.
    async fn settle(&self, env: &Envelope, log_seq: u64) {
        if self.progress.reached(log_seq, SETTLE_WAIT).await {
            return;
        }
        self.apply_now(env).await;
    }

    /// Applies an event to the views and counts.
    async fn apply_now(&self, env: &Envelope) {
        let (views, counts) = tokio::join!(self.views.apply(env), self.counts.apply(env));
        for (name, res) in [("mongo-views", views), ("redis-unseen", counts)] {
            match res {
                Ok(()) => {}
                Err(ApplyError::Unavailable(e)) => tracing::warn!(
                    projection = name, event = %env.id, error = %e,
                    "could not apply a new event at once; the projector will apply it when the store is back"
                ),
                Err(ApplyError::Poison(e)) => tracing::error!(
                    projection = name, event = %env.id, error = %e,
                    "a new event contradicts the view; the projector will park it"
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use natter_events::MemberLeft;

    use super::*;

    #[test]
    fn the_next_event_follows_the_newest_one_of_its_subject() {
        assert_eq!(next_on(None), (1, 0), "first on an empty subject");
        let left = Event::MemberLeft(MemberLeft { room_id: "r".into(), user_id: "u".into(), ..Default::default() });
        let last = Logged { log_seq: 9, envelope: Envelope::new("c".into(), "s".into(), 3, left) };
        assert_eq!(next_on(Some(&last)), (4, 9), "position 4, appended only while the subject still ends at log seq 9");
    }

    #[test]
    fn a_send_with_a_client_id_has_a_stable_command_id() {
        assert_eq!(command_id("amy", Some("c-1")), "amy:c-1");
        assert_eq!(command_id("amy:room", Some("c-1")), "amy:room:c-1");
        assert_ne!(command_id("amy", None), command_id("amy", None));
        }
}
