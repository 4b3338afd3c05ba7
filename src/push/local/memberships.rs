//! The embedded inbox's record of who was a member of which room when:
//! what a room's delivery, stored once for the room, is addressed by.
//!
//! Each user's joins and leaves are recorded with their log sequences as
//! the fan-out stores the user's own `member-joined` / `member-left`
//! deliveries. A replay needs membership only after the inbox's floor
//! (older cursors resync), so once a change is at or below the floor the
//! changes before it go, and it goes too if it is a leave (not a member is
//! where every timeline starts): what is kept grows with the memberships
//! that matter, not with every join and leave ever made.
//!
//! ```text
//! inbox-members       (user, room, log seq) → joined (true) or left (false)
//! inbox-members-order (log seq, user, room) → (): oldest first, for compaction
//! ```

use std::collections::HashMap;

use natter_projections::local::redb::{ReadTransaction, ReadableTable, TableDefinition, WriteTransaction};
use natter_projections::{ApplyError, StoreError};

use crate::push::user_rooms::Timeline;

const MEMBERS: TableDefinition<(&str, &str, u64), bool> = TableDefinition::new("inbox-members");
const ORDER: TableDefinition<(u64, &str, &str), ()> = TableDefinition::new("inbox-members-order");

/// Creates the tables if new.
pub fn open(tx: &WriteTransaction) -> Result<(), ApplyError> {
    tx.open_table(MEMBERS)?;
    tx.open_table(ORDER)?;
    Ok(())
}

/// Records `user` joining (or leaving) `room` at `log_seq`.
pub fn record(tx: &WriteTransaction, user: &str, room: &str, log_seq: u64, joined: bool) -> Result<(), ApplyError> {
    tx.open_table(MEMBERS)?.insert((user, room, log_seq), joined)?;
    tx.open_table(ORDER)?.insert((log_seq, user, room), ())?;
    Ok(())
}

/// `user`'s rooms over the log, as far as recorded (after the floor).
pub fn rooms_of(tx: &ReadTransaction, user: &str) -> Result<HashMap<String, Timeline>, StoreError> {
    let mut rooms: HashMap<String, Timeline> = HashMap::new();
    for entry in tx.open_table(MEMBERS)?.range((user, "", 0)..)? {
        let (k, v) = entry?;
        let (u, room, log_seq) = k.value();
        if u != user {
            break;
        }
        rooms.entry(room.to_owned()).or_default().record(log_seq, v.value());
    }
    Ok(rooms)
}

/// Forgets what no cursor at or above `floor` needs: the changes a later
/// one at or below the floor supersedes, and such a change itself if it
/// is a leave.
pub fn compact(tx: &WriteTransaction, floor: u64) -> Result<(), ApplyError> {
    let (mut order, mut members) = (tx.open_table(ORDER)?, tx.open_table(MEMBERS)?);
    loop {
        let Some((log_seq, user, room)) = order.first()?.map(|(k, _)| {
            let (s, u, r) = k.value();
            (s, u.to_owned(), r.to_owned())
        }) else {
            break;
        };
        if log_seq > floor {
            break;
        }
        order.remove((log_seq, user.as_str(), room.as_str()))?;
        let (u, r) = (user.as_str(), room.as_str());
        let before: Vec<u64> = members.range((u, r, 0)..(u, r, log_seq))?.map(|e| e.map(|(k, _)| k.value().2)).collect::<Result<_, _>>()?;
        for s in before {
            members.remove((u, r, s))?;
        }
        if members.get((u, r, log_seq))?.is_some_and(|v| !v.value()) {
            members.remove((u, r, log_seq))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use natter_projections::local::LocalStore;

    use super::*;

    #[test]
    fn changes_below_the_floor_are_forgotten_once_superseded() {
        let store = LocalStore::in_memory();
        store
            .write(|tx| {
                open(tx)?;
                for (user, s, joined) in [("amy", 3, true), ("amy", 6, false), ("bob", 4, true), ("amy", 10, true), ("kim", 5, true), ("kim", 12, false)] {
                    record(tx, user, "r", s, joined)?;
                }
                compact(tx, 8)
            })
            .unwrap();
        let runs = |user: &str| store.read(|tx| rooms_of(tx, user)).unwrap().get("r").map(|t| t.member_runs(8)).unwrap_or_default();
        // amy's join and leave before the floor are gone; bob's and kim's
        // joins are what they are members by.
        assert_eq!(runs("amy"), [(11, u64::MAX)]);
        assert_eq!(runs("bob"), [(9, u64::MAX)]);
        assert_eq!(runs("kim"), [(9, 11)]);
        let kept = store.read(|tx| Ok(tx.open_table(MEMBERS)?.iter()?.map(|e| e.unwrap().0.value().2).collect::<Vec<_>>())).unwrap();
        assert_eq!(kept, [10, 4, 5, 12], "amy 10; bob 4; kim 5 and 12");
        // Past kim's leave, nothing of kim's is kept.
        store.write(|tx| compact(tx, 12)).unwrap();
        assert_eq!(runs("kim"), []);
    }
}
