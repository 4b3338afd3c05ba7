//! The subject scheme. Every subject starts with a configurable prefix
//! (`natter` in production) so that test runs and tenants can share one NATS
//! server without their streams' subjects overlapping.
//!
//! - `<prefix>.ev.dm.<lo>.<hi>`: a direct conversation, user ids sorted.
//! - `<prefix>.ev.user.<userId>`: events about one user.
//! - `<prefix>.ev.room.<roomId>`: a study room and its messages.
//! - `<prefix>.ev.member.<roomId>.<userId>`: one user's membership and read
//!   watermark in a room.
//! - `<prefix>.ev.account.<emailKey>`: registration claims; the key is derived
//!   from the normalised e-mail address so that appending with "expected last
//!   subject sequence = 0" makes e-mail addresses unique without a lock.
//!
//! Callers must pass ids already checked with [`crate::validate_id`].

/// All event subjects under a prefix (the stream's subject filter).
pub fn all_events(prefix: &str) -> String {
    format!("{prefix}.ev.>")
}

/// The two participants of a direct conversation, in sorted order.
pub fn dm_pair<'a>(a: &'a str, b: &'a str) -> (&'a str, &'a str) {
    if a <= b { (a, b) } else { (b, a) }
}

/// Conversation id of a direct conversation: `<lo>.<hi>`.
pub fn dm_conversation(a: &str, b: &str) -> String {
    let (lo, hi) = dm_pair(a, b);
    format!("{lo}.{hi}")
}

pub fn dm(prefix: &str, a: &str, b: &str) -> String {
    format!("{prefix}.ev.dm.{}", dm_conversation(a, b))
}

pub fn user(prefix: &str, user_id: &str) -> String {
    format!("{prefix}.ev.user.{user_id}")
}

pub fn room(prefix: &str, room_id: &str) -> String {
    format!("{prefix}.ev.room.{room_id}")
}

pub fn member(prefix: &str, room_id: &str, user_id: &str) -> String {
    format!("{prefix}.ev.member.{room_id}.{user_id}")
}

/// `email_key` is a hex digest of the normalised address (see the gateway).
pub fn account(prefix: &str, email_key: &str) -> String {
    format!("{prefix}.ev.account.{email_key}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dm_subject_is_the_same_from_both_sides() {
        assert_eq!(dm("natter", "b", "a"), "natter.ev.dm.a.b");
        assert_eq!(dm("natter", "a", "b"), "natter.ev.dm.a.b");
        assert_eq!(dm_conversation("zed", "amy"), "amy.zed");
    }

    #[test]
    fn every_subject_is_under_the_stream_filter() {
        let filter = all_events("t1");
        let base = filter.trim_end_matches('>');
        for s in [dm("t1", "a", "b"), user("t1", "a"), account("t1", "ff"), room("t1", "r"), member("t1", "r", "a")] {
            assert!(s.starts_with(base), "{s}");
        }
    }
}
