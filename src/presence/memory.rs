//! The embedded node's presence: every connection is in this process, so
//! entries leave with their sockets and never expire.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;

use super::Presence;

pub struct MemoryPresence {
    ttl: Duration,
    /// room → user → that user's connections in the room.
    rooms: Mutex<HashMap<String, BTreeMap<String, BTreeSet<String>>>>,
}

impl MemoryPresence {
    pub fn new(ttl: Duration) -> MemoryPresence {
        MemoryPresence { ttl, rooms: Mutex::new(HashMap::new()) }
    }
}

#[async_trait]
impl Presence for MemoryPresence {
    fn ttl(&self) -> Duration {
        self.ttl
    }

    async fn enter(&self, room: &str, user: &str, conn: &str) -> anyhow::Result<bool> {
        let mut rooms = self.rooms.lock().expect("presence lock");
        let conns = rooms.entry(room.to_owned()).or_default().entry(user.to_owned()).or_default();
        let first = conns.is_empty();
        conns.insert(conn.to_owned());
        Ok(first)
    }

    async fn exit(&self, room: &str, user: &str, conn: &str) -> anyhow::Result<bool> {
        let mut rooms = self.rooms.lock().expect("presence lock");
        let Some(users) = rooms.get_mut(room) else { return Ok(false) };
        let Some(conns) = users.get_mut(user) else { return Ok(false) };
        if !conns.remove(conn) {
            return Ok(false);
        }
        let last = conns.is_empty();
        if last {
            users.remove(user);
            if users.is_empty() {
                rooms.remove(room);
            }
        }
        Ok(last)
    }

    async fn users(&self, room: &str) -> anyhow::Result<Vec<String>> {
        let rooms = self.rooms.lock().expect("presence lock");
        Ok(rooms.get(room).map(|users| users.keys().cloned().collect()).unwrap_or_default())
    }

    async fn heartbeat(&self) -> anyhow::Result<Vec<String>> {
        Ok(Vec::new())
    }

    async fn sweep(&self) -> anyhow::Result<Vec<(String, String)>> {
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn first_tab_joins_last_tab_leaves() {
        let p = MemoryPresence::new(Duration::from_secs(30));
        assert!(p.enter("r", "bob", "c1").await.unwrap());
        assert!(!p.enter("r", "bob", "c2").await.unwrap());
        assert!(p.enter("r", "amy", "c3").await.unwrap());
        assert_eq!(p.users("r").await.unwrap(), ["amy", "bob"]);
        assert!(!p.exit("r", "bob", "c1").await.unwrap());
        // Exiting a connection twice says nothing the second time.
        assert!(!p.exit("r", "bob", "c1").await.unwrap());
        assert!(p.exit("r", "bob", "c2").await.unwrap());
        assert_eq!(p.users("r").await.unwrap(), ["amy"]);
    }
}
