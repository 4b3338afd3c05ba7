//! Room membership as of each event, for the fan-out: whether a join or a
//! leave is announced to the room depends on the room's size as of it
//! (`NATTER_ROOM_ANNOUNCE_MAX`).
//!
//! Membership as of an event: neither the views (which may lag behind a
//! join or a leave) nor a change made after it count. The fan-out keeps a
//! table per room of the members as of the last event it handled there
//! (`as_of`, a log sequence), so a join or a leave costs what the room's
//! membership changed since, not what it ever was:
//!
//! - **Fed in order** (embedded: the projector hands over every event of
//!   the log, in order, from the first or from where the inbox is kept):
//!   the table follows the membership events as they come; a room not seen
//!   since the start is built cold once (below).
//! - **Distributed**: any node may handle a room's next event (one node at a
//!   time works the room's partition, but its pin may have been another
//!   node's for the previous events), so before using its table a node
//!   asks the log for the room's membership events after `as_of` and
//!   before the event: one read when nothing changed, one more per change.
//! - **Cold** (a room first seen since start, or evicted): built from the
//!   log alone, reading each member subject the room has had as of the
//!   event. That costs a read per member it ever had, once per node.
//!
//! The table is bounded: past [`CAPACITY`] members in all, the rooms used
//! least recently are dropped (and built cold again when next needed).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use natter_events::{Event, MemberState, subjects};
use natter_projections::ApplyError;

use crate::log::{EventLog, LogError};

/// Members held in all rooms' tables before the least recently used
/// rooms are dropped (about 100 bytes each).
pub const CAPACITY: usize = 500_000;
/// Member subjects read at once while building a room's table cold.
const COLD_READS: usize = 64;

/// What a membership event changes.
#[derive(Debug, Clone, Copy)]
pub enum Change<'a> {
    Joined(&'a str),
    Left(&'a str),
}

impl<'a> Change<'a> {
    fn of(event: &'a Event) -> Option<Change<'a>> {
        match event {
            Event::MemberJoined(e) => Some(Change::Joined(&e.user_id)),
            Event::MemberLeft(e) => Some(Change::Left(&e.user_id)),
            _ => None,
        }
    }

    /// Applies the change; returns what it did (`None`: nothing).
    fn apply(self, members: &mut BTreeSet<String>) -> Option<Did> {
        match self {
            Change::Joined(user) => members.insert(user.to_owned()).then_some(Did::Add),
            Change::Left(user) => members.remove(user).then_some(Did::Remove),
        }
    }
}

/// What the last change a room's table took in did to it.
#[derive(Debug, Clone, Copy)]
enum Did {
    Add,
    Remove,
}

pub struct Membership {
    log: Arc<dyn EventLog>,
    prefix: String,
    /// Every event of the log comes in order, from the first.
    fed_in_order: bool,
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    rooms: HashMap<String, Room>,
    /// Rooms by when they were last used, oldest first.
    by_use: BTreeMap<u64, String>,
    /// Members held in all rooms.
    held: usize,
    clock: u64,
}

struct Room {
    /// Every membership change of the room up to this log sequence is in.
    as_of: u64,
    members: BTreeSet<String>,
    /// What the event at `as_of` changed, if anything: the size before
    /// it, for a retry of that very event.
    did: Option<Did>,
    used: u64,
}

impl Room {
    /// What the table holds for the room (at least one, so empty rooms count).
    fn weight(&self) -> usize {
        self.members.len() + 1
    }
}

impl Table {
    fn take(&mut self, room: &str) -> Option<Room> {
        let taken = self.rooms.remove(room)?;
        self.by_use.remove(&taken.used);
        self.held -= taken.weight();
        Some(taken)
    }

    fn put(&mut self, id: &str, mut room: Room) {
        self.take(id);
        self.clock += 1;
        room.used = self.clock;
        self.held += room.weight();
        self.by_use.insert(room.used, id.to_owned());
        self.rooms.insert(id.to_owned(), room);
        while self.held > CAPACITY && self.rooms.len() > 1 {
            let Some((_, coldest)) = self.by_use.pop_first() else { break };
            if coldest == id {
                // Never the room just put: back at the newest end.
                self.by_use.insert(self.clock, coldest);
                continue;
            }
            if let Some(dropped) = self.rooms.remove(&coldest) {
                self.held -= dropped.weight();
            }
        }
    }
}

impl Membership {
    pub fn new(log: Arc<dyn EventLog>, prefix: String, fed_in_order: bool) -> Membership {
        Membership { log, prefix, fed_in_order, table: Mutex::new(Table::default()) }
    }

    /// Fed every event in log order (embedded): the tables are exact
    /// without reading the log.
    pub fn fed_in_order(&self) -> bool {
        self.fed_in_order
    }

    /// Drops every room's table (each is built from the log again when
    /// next needed): after a batch whose tables moved past events that
    /// will be handed over again.
    pub fn forget(&self) {
        *self.table() = Table::default();
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().expect("membership table lock")
    }

    /// How many members `room` had as of the event at `log_seq` (changes
    /// before it count, its own and later ones do not); then takes in the
    /// event's own change, if it is a membership event of the room.
    pub async fn size_as_of(&self, room: &str, log_seq: u64, event: &Event) -> Result<usize, ApplyError> {
        let taken = self.table().take(room);
        let mut entry = match taken {
            Some(entry) if entry.as_of < log_seq => entry,
            Some(same) if same.as_of == log_seq => {
                // The table's own last event again (its delivery failed and
                // it came back here): the size before it is the table's
                // with that event's change taken back.
                let before = match same.did {
                    Some(Did::Add) => same.members.len() - 1,
                    Some(Did::Remove) => same.members.len() + 1,
                    None => same.members.len(),
                };
                self.table().put(room, same);
                return Ok(before);
            }
            Some(newer) => {
                // An older event (a parked event retried): answered from
                // the log, the table kept.
                self.table().put(room, newer);
                return Ok(self.read_cold(room, log_seq).await?.len());
            }
            None => Room { as_of: log_seq - 1, members: self.read_cold(room, log_seq).await?.into_iter().collect(), did: None, used: 0 },
        };
        if let Err(e) = if self.fed_in_order { Ok(()) } else { self.catch_up(room, &mut entry, log_seq).await } {
            self.table().put(room, entry);
            return Err(e);
        }
        let members = entry.members.len();
        entry.did = Change::of(event).and_then(|change| change.apply(&mut entry.members));
        entry.as_of = log_seq;
        self.table().put(room, entry);
        Ok(members)
    }

    /// Takes in the room's membership events after the table's `as_of`
    /// and before `log_seq`.
    async fn catch_up(&self, room: &str, entry: &mut Room, log_seq: u64) -> Result<(), ApplyError> {
        let prefix = subjects::member(&self.prefix, room, "");
        let mut from = entry.as_of + 1;
        // Taken in only once every change is read: a failure leaves the
        // table exactly as it was (as of `as_of`, with what it did).
        let mut found_events = Vec::new();
        while from < log_seq {
            match self.log.next_under(&prefix, from).await.map_err(unavailable)? {
                Some(found) if found.log_seq < log_seq => {
                    from = found.log_seq + 1;
                    found_events.push(found.envelope.event);
                }
                _ => break,
            }
        }
        for event in &found_events {
            if let Some(change) = Change::of(event) {
                change.apply(&mut entry.members);
            }
        }
        entry.as_of = log_seq - 1;
        entry.did = None;
        Ok(())
    }

    /// The room's members as of `log_seq`, from the log alone: every user
    /// with a member subject in the room whose newest event before
    /// `log_seq` is a join.
    async fn read_cold(&self, room: &str, log_seq: u64) -> Result<Vec<String>, ApplyError> {
        let prefix = subjects::member(&self.prefix, room, "");
        let subjects = self.log.subjects(&prefix).await.map_err(unavailable)?;
        let reads: Vec<_> = subjects.iter().map(|s| self.log.last_before(s, log_seq)).collect();
        let states: Vec<_> = futures::stream::iter(reads).buffered(COLD_READS).collect().await;
        let mut members = Vec::with_capacity(subjects.len());
        for (subject, state) in subjects.iter().zip(states) {
            if MemberState::after(state.map_err(unavailable)?.as_ref().map(|l| &l.envelope.event)).member {
                members.push(subject[prefix.len()..].to_owned());
            }
        }
        Ok(members)
    }
}

fn unavailable(e: LogError) -> ApplyError {
    ApplyError::Unavailable(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A retry of the table's own last event (its delivery failed) gets the
    /// members before that event, without reading the log again.
    #[tokio::test]
    async fn a_retry_of_the_last_event_gets_the_members_before_it() {
        use natter_events::{Envelope, MemberJoined};

        use crate::config::SyncPolicy;
        use crate::log::file::FileLog;

        let dir = std::env::temp_dir().join(format!("natter-members-{}", uuid::Uuid::new_v4().simple()));
        let log: Arc<dyn EventLog> = Arc::new(FileLog::open(&dir, SyncPolicy::Os, std::time::Duration::from_secs(60)).unwrap());
        let join = |u: &str| Event::MemberJoined(MemberJoined { room_id: "r".into(), user_id: u.into(), seen_up_to: 0, ..Default::default() });
        let mut seqs = Vec::new();
        for u in ["amy", "bob"] {
            let env = Envelope::new(format!("{u}:j"), subjects::member("p", "r", u), 1, join(u));
            seqs.push((log.append(&env, 0).await.unwrap().log_seq, env.event));
        }
        let m = Membership::new(log.clone(), "p".into(), false);
        assert_eq!(m.size_as_of("r", seqs[0].0, &seqs[0].1).await.unwrap(), 0);
        assert_eq!(m.size_as_of("r", seqs[1].0, &seqs[1].1).await.unwrap(), 1, "amy");
        assert_eq!(m.size_as_of("r", seqs[1].0, &seqs[1].1).await.unwrap(), 1, "the retry: bob's join not yet in");
        assert_eq!(m.size_as_of("r", seqs[1].0 + 1, &Event::MemberLeft(natter_events::MemberLeft { room_id: "r".into(), user_id: "zed".into(), ..Default::default() })).await.unwrap(), 2, "amy and bob");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A catch-up that fails part way leaves the table as it was: a retry
    /// of its last event still gets the members before that event.
    #[tokio::test]
    async fn a_failed_catch_up_leaves_the_table_as_it_was() {
        use std::sync::atomic::{AtomicBool, Ordering};

        use async_trait::async_trait;
        use natter_events::{Envelope, MemberJoined};

        use crate::config::SyncPolicy;
        use crate::log::file::FileLog;
        use crate::log::{Appended, Logged};

        /// The file log, with `next_under` failing after its first answer.
        struct Flaky(Arc<dyn EventLog>, AtomicBool);
        #[async_trait]
        impl EventLog for Flaky {
            async fn last(&self, s: &str) -> Result<Option<Logged>, LogError> {
                self.0.last(s).await
            }
            async fn last_before(&self, s: &str, b: u64) -> Result<Option<Logged>, LogError> {
                self.0.last_before(s, b).await
            }
            async fn append(&self, e: &Envelope, x: u64) -> Result<Appended, LogError> {
                self.0.append(e, x).await
            }
            async fn get(&self, seq: u64) -> Result<Logged, LogError> {
                self.0.get(seq).await
            }
            async fn head(&self) -> Result<u64, LogError> {
                self.0.head().await
            }
            async fn subjects(&self, p: &str) -> Result<Vec<String>, LogError> {
                self.0.subjects(p).await
            }
            async fn subjects_matching(&self, f: &str) -> Result<Vec<String>, LogError> {
                self.0.subjects_matching(f).await
            }
            async fn history(&self, s: &str, b: u64) -> Result<Vec<Logged>, LogError> {
                self.0.history(s, b).await
            }
            async fn next_on(&self, s: &str, from: u64) -> Result<Option<Logged>, LogError> {
                self.0.next_on(s, from).await
            }
            async fn next_under(&self, p: &str, from: u64) -> Result<Option<Logged>, LogError> {
                if self.1.swap(true, Ordering::SeqCst) {
                    return Err(LogError::Unavailable("flaky".into()));
                }
                self.0.next_under(p, from).await
            }
            async fn check(&self) -> Result<(), LogError> {
                self.0.check().await
            }
            fn dedup_window(&self) -> std::time::Duration {
                self.0.dedup_window()
            }
        }

        let dir = std::env::temp_dir().join(format!("natter-flaky-{}", uuid::Uuid::new_v4().simple()));
        let file: Arc<dyn EventLog> = Arc::new(FileLog::open(&dir, SyncPolicy::Os, std::time::Duration::from_secs(60)).unwrap());
        let join = |u: &str| Event::MemberJoined(MemberJoined { room_id: "r".into(), user_id: u.into(), seen_up_to: 0, ..Default::default() });
        let mut seqs = Vec::new();
        for u in ["amy", "bob", "carol"] {
            let env = Envelope::new(format!("{u}:j"), subjects::member("p", "r", u), 1, join(u));
            seqs.push((file.append(&env, 0).await.unwrap().log_seq, env.event));
        }
        let flaky = Arc::new(Flaky(file, AtomicBool::new(true)));
        let m = Membership::new(flaky.clone(), "p".into(), false);
        assert_eq!(m.size_as_of("r", seqs[0].0, &seqs[0].1).await.unwrap(), 0);
        // The next event is past bob's and carol's joins: the catch-up reads
        // bob's, then fails.
        flaky.1.store(false, Ordering::SeqCst);
        let msg = Event::MemberLeft(natter_events::MemberLeft { room_id: "r".into(), user_id: "zed".into(), ..Default::default() });
        assert!(m.size_as_of("r", seqs[2].0 + 1, &msg).await.is_err());
        assert_eq!(m.size_as_of("r", seqs[0].0, &seqs[0].1).await.unwrap(), 0, "amy's join retried: still nobody before it");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_table_drops_the_rooms_used_least_recently_past_its_capacity() {
        let mut table = Table::default();
        let room = |n: usize, tag: &str| Room { as_of: 1, members: (0..n).map(|i| format!("{tag}{i}")).collect(), did: None, used: 0 };
        // Each room weighs its members plus one.
        table.put("old", room(CAPACITY / 2 - 1, "o"));
        table.put("mid", room(CAPACITY / 4 - 1, "m"));
        let _ = table.take("old").map(|r| table.put("old", r)); // used again: now the newest
        table.put("new", room(CAPACITY / 2 - 1, "n"));
        assert!(table.held <= CAPACITY, "{}", table.held);
        let mut kept: Vec<_> = table.rooms.keys().cloned().collect();
        kept.sort();
        assert_eq!(kept, ["new", "old"], "the room used least recently went first");
        assert_eq!(table.held, CAPACITY);
        // Empty rooms weigh too: enough of them push the others out.
        for i in 0..CAPACITY {
            table.put(&format!("empty{i}"), room(0, ""));
        }
        assert!(table.held <= CAPACITY && !table.rooms.contains_key("old"), "{}", table.held);
        // A room bigger than the whole table is still kept (alone).
        table.put("huge", room(CAPACITY + 1, "h"));
        assert_eq!(table.rooms.keys().collect::<Vec<_>>(), ["huge"]);
        assert_eq!(table.held, CAPACITY + 2);
    }
}
