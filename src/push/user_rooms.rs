//! A user's room memberships along the log: who a room's shared delivery
//! (stored once per room, [`super::To::Room`]) is for.
//!
//! A room delivery is for the users who were members as of its event (the
//! event's log sequence travels with it). A reader learns a user's rooms
//! from the newest event of each of their member subjects (one read per
//! room) and keeps them current from the user's own `member-joined` /
//! `member-left` deliveries: the fan-out stores those on the user's chain,
//! in log order with the room's own deliveries (one partition fans out a
//! room), so a reader always sees a change before the room deliveries that
//! follow it. Membership before the newest event of a member subject is
//! read from that subject's history, when a delivery that old turns up
//! (rarely: only deliveries still on their way when the user's rooms were
//! read).

use std::collections::HashMap;

use futures::StreamExt;
use natter_events::{Event, subjects};

use crate::log::{EventLog, LogError, Logged};

/// Member subjects read at once when loading a user's rooms.
const LOAD_READS: usize = 16;

/// One user's membership of one room over log sequences (by default:
/// never a member, as far as heard).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Timeline {
    /// Membership is known for the log sequences after this one.
    known_after: u64,
    /// Membership right after `known_after`.
    initial: bool,
    /// Joins (true) and leaves (false) after `known_after`, in log order.
    changes: Vec<(u64, bool)>,
}

/// A membership change: joined (true) or left (false).
fn change_of(event: &Event) -> Option<bool> {
    match event {
        Event::MemberJoined(_) => Some(true),
        Event::MemberLeft(_) => Some(false),
        _ => None,
    }
}

impl Timeline {
    /// Known from the newest event of the member subject on (`None`: the
    /// user never joined, so never a member before now either).
    pub fn from_newest(newest: Option<&Logged>) -> Timeline {
        match newest {
            None => Timeline { known_after: 0, initial: false, changes: Vec::new() },
            Some(l) => Timeline {
                known_after: l.log_seq,
                initial: natter_events::MemberState::after(Some(&l.envelope.event)).member,
                changes: Vec::new(),
            },
        }
    }

    /// Known for the whole log, from every event of the member subject.
    pub fn from_history(events: &[Logged]) -> Timeline {
        let changes = events.iter().filter_map(|l| change_of(&l.envelope.event).map(|c| (l.log_seq, c))).collect();
        Timeline { known_after: 0, initial: false, changes }
    }

    /// Was the user a member as of the event at `log_seq`? `None`: not
    /// known here (older than what was read; read the history).
    pub fn at(&self, log_seq: u64) -> Option<bool> {
        if log_seq <= self.known_after {
            return None;
        }
        let i = self.changes.partition_point(|&(s, _)| s < log_seq);
        Some(if i == 0 { self.initial } else { self.changes[i - 1].1 })
    }

    /// A member now (as far as this timeline has heard).
    pub fn now(&self) -> bool {
        self.changes.last().map_or(self.initial, |&(_, m)| m)
    }

    /// Not a member as of `log_seq`, and no change heard after it: nothing
    /// later in the room is for the user (as far as heard).
    pub fn ended_by(&self, log_seq: u64) -> bool {
        self.at(log_seq) == Some(false) && self.changes.last().is_none_or(|&(s, _)| s < log_seq)
    }

    /// The runs of log sequences after `after` that the user was a member
    /// for, as inclusive (first, last) pairs, leaving out the user's own
    /// changes (a change's own event goes on the user's chain, not the
    /// room's). Only what this timeline knows: nothing at or before
    /// `known_after`.
    pub fn member_runs(&self, after: u64) -> Vec<(u64, u64)> {
        let bounds = std::iter::once((self.known_after, self.initial)).chain(self.changes.iter().copied());
        let ends = self.changes.iter().map(|&(s, _)| s - 1).chain(std::iter::once(u64::MAX));
        bounds
            .zip(ends)
            .filter(|&((_, member), _)| member)
            .map(|((from, _), to)| (from.max(after) + 1, to))
            .filter(|&(first, last)| first <= last)
            .collect()
    }

    /// Takes in a change seen in the user's deliveries.
    pub fn record(&mut self, log_seq: u64, member: bool) {
        if log_seq <= self.known_after {
            return;
        }
        let i = self.changes.partition_point(|&(s, _)| s < log_seq);
        if self.changes.get(i).is_none_or(|&(s, _)| s != log_seq) {
            self.changes.insert(i, (log_seq, member));
        }
    }

    /// Takes in what the log says (the newest event, or the whole
    /// history), keeping the changes heard that it did not have yet.
    pub fn take_in(&mut self, read: Timeline) {
        let heard = std::mem::take(&mut self.changes);
        *self = read;
        for (s, m) in heard {
            self.record(s, m);
        }
    }
}

/// The room of a member subject of `user` (`<prefix>.ev.member.<room>.<user>`).
fn room_of<'a>(subject: &'a str, prefix: &str, user: &str) -> Option<&'a str> {
    // `<prefix>.ev.member.` is the member subject of no room and no user, less a dot.
    let under = subjects::member(prefix, "", "");
    subject.strip_prefix(&under[..under.len() - 1])?.strip_suffix(user)?.strip_suffix('.')
}

/// Every room `user` has a member subject in, with what its newest event says.
pub async fn load(log: &dyn EventLog, prefix: &str, user: &str) -> Result<HashMap<String, Timeline>, LogError> {
    let filter = subjects::member(prefix, "*", user);
    let subjects = log.subjects_matching(&filter).await?;
    let reads: Vec<_> = subjects.iter().map(|s| log.last(s)).collect();
    let newest: Vec<_> = futures::stream::iter(reads).buffered(LOAD_READS).collect().await;
    let mut rooms = HashMap::with_capacity(subjects.len());
    for (subject, newest) in subjects.iter().zip(newest) {
        if let Some(room) = room_of(subject, prefix, user) {
            rooms.insert(room.to_owned(), Timeline::from_newest(newest?.as_ref()));
        }
    }
    Ok(rooms)
}

/// The whole membership history of `user` in `room`, from the log.
pub async fn history(log: &dyn EventLog, prefix: &str, user: &str, room: &str) -> Result<Timeline, LogError> {
    Ok(Timeline::from_history(&log.history(&subjects::member(prefix, room, user), u64::MAX).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn membership_as_of_each_event() {
        // Newest event: a join at 10; heard since: left at 20, joined at 30.
        let mut t = Timeline { known_after: 10, initial: true, changes: Vec::new() };
        t.record(20, false);
        t.record(30, true);
        t.record(20, false); // heard twice: once
        assert_eq!([5, 10, 11, 19, 21, 29, 31].map(|s| t.at(s)), [None, None, Some(true), Some(true), Some(false), Some(false), Some(true)]);
        assert!(t.now());
        assert!(!t.ended_by(25), "joined again later");
        // The history fills in what came before: joined at 3, left at 6, joined at 10.
        t.take_in(Timeline { known_after: 0, initial: false, changes: vec![(3, true), (6, false), (10, true)] });
        assert_eq!([2, 4, 7, 11, 21, 31].map(|s| t.at(s)), [Some(false), Some(true), Some(false), Some(true), Some(false), Some(true)]);
        t.record(40, false);
        assert!(t.ended_by(41) && !t.now());
    }

    #[test]
    fn the_runs_a_user_was_a_member_for() {
        let mut t = Timeline::default();
        for (s, m) in [(3, true), (6, false), (10, true), (11, false), (20, true)] {
            t.record(s, m);
        }
        assert_eq!(t.member_runs(0), [(4, 5), (21, u64::MAX)], "joined at 10 and left at 11: no event between");
        assert_eq!(t.member_runs(4), [(5, 5), (21, u64::MAX)]);
        assert_eq!(t.member_runs(30), [(31, u64::MAX)]);
        let known = Timeline { known_after: 8, initial: true, changes: vec![(12, false)] };
        assert_eq!(known.member_runs(0), [(9, 11)]);
        assert!(Timeline::default().member_runs(0).is_empty());
    }

    #[test]
    fn the_room_of_a_member_subject() {
        assert_eq!(room_of("p.ev.member.r1.amy", "p", "amy"), Some("r1"));
        assert_eq!(room_of("p.ev.member.r1.xamy", "p", "amy"), None);
    }
}
