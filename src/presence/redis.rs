//! Presence in Redis, shared by every node.
//!
//! `<prefix>pres:<roomId>` is a hash `<userId>|<connection>` → expiry (ms);
//! `<prefix>pres-rooms` is the set of rooms with entries. Each node
//! refreshes the expiry of its own live connections every TTL/3 (Redis only,
//! no database write) and sweeps expired entries every TTL/2, so
//! a crashed node's users are gone, and announced as left, within 1.5 × TTL.
//!
//! Entering and leaving are Lua scripts that also say whether this was the
//! user's first live connection in the room (announce `user-joined`) or the
//! last (announce `user-left`): atomic, so two tabs on two nodes announce
//! once. A sweep removes expired entries and names the users left with none,
//! and only the node whose script removed them announces it.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use redis::Script;

use super::Presence;
use redis::aio::ConnectionManager;

const ENTER: &str = r#"
local prefix = ARGV[1] .. '|'
local had = 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  if string.sub(all[i], 1, #prefix) == prefix and tonumber(all[i + 1]) > tonumber(ARGV[4]) then had = 1 end
end
redis.call('HSET', KEYS[1], prefix .. ARGV[2], ARGV[3])
redis.call('SADD', KEYS[2], ARGV[5])
if had == 0 then return 1 else return 0 end
"#;

const EXIT: &str = r#"
local prefix = ARGV[1] .. '|'
if redis.call('HDEL', KEYS[1], prefix .. ARGV[2]) == 0 then return 0 end
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  if string.sub(all[i], 1, #prefix) == prefix and tonumber(all[i + 1]) > tonumber(ARGV[3]) then return 0 end
end
return 1
"#;

/// Refreshes an entry's expiry only if it still exists (a heartbeat must
/// not resurrect an entry that exit or a sweep removed).
const REFRESH: &str = r#"
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 0
"#;

const SWEEP: &str = r#"
local all = redis.call('HGETALL', KEYS[1])
local expired, live, out = {}, {}, {}
for i = 1, #all, 2 do
  local user = string.match(all[i], '^([^|]+)|')
  if tonumber(all[i + 1]) <= tonumber(ARGV[1]) then
    redis.call('HDEL', KEYS[1], all[i])
    expired[user] = true
  else
    live[user] = true
  end
end
for user, _ in pairs(expired) do
  if not live[user] then table.insert(out, user) end
end
if redis.call('HLEN', KEYS[1]) == 0 then redis.call('SREM', KEYS[2], ARGV[2]) end
return out
"#;

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

pub struct RedisPresence {
    redis: ConnectionManager,
    prefix: String,
    ttl: Duration,
    /// This node's connections: (room, connection) → user.
    local: Mutex<HashMap<(String, String), String>>,
    enter: Script,
    exit: Script,
    refresh: Script,
    sweep: Script,
}

impl RedisPresence {
    pub fn new(redis: ConnectionManager, prefix: &str, ttl: Duration) -> RedisPresence {
        RedisPresence {
            redis,
            prefix: prefix.to_owned(),
            ttl,
            local: Mutex::new(HashMap::new()),
            enter: Script::new(ENTER),
            exit: Script::new(EXIT),
            refresh: Script::new(REFRESH),
            sweep: Script::new(SWEEP),
        }
    }

    fn key(&self, room: &str) -> String {
        format!("{}pres:{room}", self.prefix)
    }

    fn rooms_key(&self) -> String {
        format!("{}pres-rooms", self.prefix)
    }

    fn expiry(&self) -> u64 {
        now_ms() + self.ttl.as_millis() as u64
    }
}

#[async_trait]
impl Presence for RedisPresence {
    fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Marks `user` present in `room` through `conn` (unique per socket and
    /// node). Returns whether the user was not present before.
    async fn enter(&self, room: &str, user: &str, conn: &str) -> anyhow::Result<bool> {
        let mut r = self.redis.clone();
        let first: i64 = self
            .enter
            .key(self.key(room))
            .key(self.rooms_key())
            .arg(user)
            .arg(conn)
            .arg(self.expiry())
            .arg(now_ms())
            .arg(room)
            .invoke_async(&mut r)
            .await?;
        self.local.lock().expect("presence lock").insert((room.to_owned(), conn.to_owned()), user.to_owned());
        Ok(first == 1)
    }

    /// Removes one connection. Returns whether the user has no other live
    /// connection in the room (they left).
    async fn exit(&self, room: &str, user: &str, conn: &str) -> anyhow::Result<bool> {
        self.local.lock().expect("presence lock").remove(&(room.to_owned(), conn.to_owned()));
        let mut r = self.redis.clone();
        let last: i64 = self.exit.key(self.key(room)).arg(user).arg(conn).arg(now_ms()).invoke_async(&mut r).await?;
        Ok(last == 1)
    }

    /// Distinct users present in `room`, sorted.
    async fn users(&self, room: &str) -> anyhow::Result<Vec<String>> {
        let mut r = self.redis.clone();
        let all: HashMap<String, u64> = redis::cmd("HGETALL").arg(self.key(room)).query_async(&mut r).await?;
        let now = now_ms();
        let users: BTreeSet<String> = all
            .into_iter()
            .filter(|(_, exp)| *exp > now)
            .filter_map(|(field, _)| field.split_once('|').map(|(u, _)| u.to_owned()))
            .collect();
        Ok(users.into_iter().collect())
    }

    /// Refreshes the expiry of this node's connections (one round trip).
    async fn heartbeat(&self) -> anyhow::Result<()> {
        let entries: Vec<((String, String), String)> =
            self.local.lock().expect("presence lock").iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        if entries.is_empty() {
            return Ok(());
        }
        let expiry = self.expiry();
        let mut r = self.redis.clone();
        for ((room, conn), user) in &entries {
            let _: i64 = self.refresh.key(self.key(room)).arg(format!("{user}|{conn}")).arg(expiry).invoke_async(&mut r).await?;
        }
        Ok(())
    }

    /// Removes expired connections everywhere; returns (room, user) for each
    /// user this call found gone from a room.
    async fn sweep(&self) -> anyhow::Result<Vec<(String, String)>> {
        let mut r = self.redis.clone();
        let rooms: Vec<String> = redis::cmd("SMEMBERS").arg(self.rooms_key()).query_async(&mut r).await?;
        let mut gone = Vec::new();
        for room in rooms {
            let users: Vec<String> =
                self.sweep.key(self.key(&room)).key(self.rooms_key()).arg(now_ms()).arg(&room).invoke_async(&mut r).await?;
            gone.extend(users.into_iter().map(|u| (room.clone(), u)));
        }
        Ok(gone)
    }
}
