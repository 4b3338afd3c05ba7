//! Presence in Redis, shared by every node.
//!
//! `<prefix>pres:<roomId>` is a hash `<userId>|<connection>` → expiry (ms);
//! `<prefix>pres-rooms` is the set of rooms with entries. Each node
//! refreshes the expiry of its own live connections every TTL/3 (one script
//! call per thousand connections; Redis only, no database write), and one
//! node per TTL/2 (whichever takes `<prefix>pres-sweep` first) sweeps expired
//! entries, so a crashed node's users are gone, and announced as left,
//! within 1.5 × TTL. `<prefix>pres-alive:<node>` marks a node's entries as
//! there: when Redis loses them (FLUSHALL, a restart without persistence),
//! the node's next heartbeat enters its live connections again, so presence
//! re-forms within TTL/3, and everyone present gets the whole list again
//! (whoever left meanwhile was announced to nobody). A connection that
//! exits during that heartbeat may linger until the next sweep.
//!
//! Entering and leaving are Lua scripts that also say whether this was the
//! user's first live connection in the room (announce `user-joined`) or the
//! last (announce `user-left`): atomic, so two tabs on two nodes announce
//! once. A sweep removes expired entries and names the users left with none,
//! and only the node whose script removed them announces it.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
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

/// Removes a connection; 1 when it was the user's last live one in the
/// room. An entry already gone (swept: announced then; or lost with Redis's
/// data: settled by the list sent when presence re-forms) says 0.
const EXIT: &str = r#"
local prefix = ARGV[1] .. '|'
if redis.call('HDEL', KEYS[1], prefix .. ARGV[2]) == 0 then return 0 end
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  if string.sub(all[i], 1, #prefix) == prefix and tonumber(all[i + 1]) > tonumber(ARGV[3]) then return 0 end
end
return 1
"#;

/// Refreshes the expiry of a batch of a node's entries: `KEYS[1]` the rooms
/// set, `KEYS[2]` the node's mark, then entry j's room hash `KEYS[2+j]`,
/// field `ARGV[2+2j]` and room id `ARGV[3+2j]`; `ARGV[1]` the expiry,
/// `ARGV[3]` how long the mark lives (ms). Only entries that still exist are
/// refreshed (a heartbeat must not resurrect an entry that exit or a sweep
/// removed) — unless the mode `ARGV[2]` is `reform`, or `auto` and the mark
/// is gone: Redis lost the node's entries, and they are entered again. The
/// check and the mark are one step, so a flush cannot fall between them;
/// a later batch (`refresh`/`reform`) that finds the mark gone does nothing
/// and says `lost`, and the next heartbeat enters everything again.
/// Returns the mode used.
const HEARTBEAT: &str = r#"
local mode = ARGV[2]
local marked = redis.call('EXISTS', KEYS[2]) == 1
if mode == 'auto' then
  if marked then mode = 'refresh' else mode = 'reform' end
elseif not marked then
  return 'lost'
end
redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
local reform = mode == 'reform'
for j = 1, #KEYS - 2 do
  local key, field, room = KEYS[2 + j], ARGV[2 + 2 * j], ARGV[3 + 2 * j]
  if reform or redis.call('HEXISTS', key, field) == 1 then
    redis.call('HSET', key, field, ARGV[1])
    if reform then redis.call('SADD', KEYS[1], room) end
  end
end
return mode
"#;

/// Entries refreshed per script call.
const HEARTBEAT_BATCH: usize = 1000;

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
    heartbeat: Script,
    sweep: Script,
    node: String,
    /// Whether this node has set its mark (its absence before is no loss).
    marked: AtomicBool,
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
            heartbeat: Script::new(HEARTBEAT),
            sweep: Script::new(SWEEP),
            node: uuid::Uuid::new_v4().simple().to_string(),
            marked: AtomicBool::new(false),
        }
    }

    fn key(&self, room: &str) -> String {
        format!("{}pres:{room}", self.prefix)
    }

    fn rooms_key(&self) -> String {
        format!("{}pres-rooms", self.prefix)
    }

    /// This node's mark that Redis holds its presence entries: gone after a
    /// FLUSHALL or a restart without persistence (and a TTL after the node
    /// stops heartbeating).
    fn alive_key(&self) -> String {
        format!("{}pres-alive:{}", self.prefix, self.node)
    }

    /// Held by the node sweeping this interval.
    fn sweep_key(&self) -> String {
        format!("{}pres-sweep", self.prefix)
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

    /// Refreshes the expiry of this node's connections: one script call per
    /// thousand connections (one call with none, to keep the node's mark).
    /// When Redis has lost them, enters them all again, so presence
    /// re-forms within one heartbeat.
    async fn heartbeat(&self) -> anyhow::Result<Vec<String>> {
        let entries: Vec<((String, String), String)> =
            self.local.lock().expect("presence lock").iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        // The mark lives as long as the entries: a node cut off from Redis
        // long enough for its entries to be swept enters them again.
        let (expiry, mark_for) = (self.expiry(), self.ttl.as_millis() as u64);
        let mut r = self.redis.clone();
        let mut mode = "auto".to_owned();
        for batch in entries.chunks(HEARTBEAT_BATCH).chain(entries.is_empty().then_some(&entries[..])) {
            let mut call = self.heartbeat.key(self.rooms_key());
            call.key(self.alive_key()).arg(expiry).arg(&mode).arg(mark_for);
            for ((room, conn), user) in batch {
                call.key(self.key(room)).arg(format!("{user}|{conn}")).arg(room);
            }
            let used: String = call.invoke_async(&mut r).await?;
            if used == "lost" {
                return Ok(Vec::new()); // flushed mid-heartbeat: the next one re-forms
            }
            if mode == "auto" && used == "reform" && self.marked.swap(true, Ordering::Relaxed) && !entries.is_empty() {
                tracing::warn!(connections = entries.len(), "presence data missing in Redis (flushed or restarted?); entered this node's connections again");
            }
            self.marked.store(true, Ordering::Relaxed);
            mode = used;
        }
        if mode != "reform" {
            return Ok(Vec::new());
        }
        let rooms: std::collections::BTreeSet<String> = entries.into_iter().map(|((room, _), _)| room).collect();
        Ok(rooms.into_iter().collect())
    }

    /// One node sweeps per interval (a lock that lapses before the next),
    /// so the work does not grow with the number of nodes.
    async fn sweep(&self) -> anyhow::Result<Vec<(String, String)>> {
        let mut r = self.redis.clone();
        let lease = (self.ttl / 2).saturating_sub(Duration::from_millis(50)).max(Duration::from_millis(100));
        let mine: Option<String> =
            redis::cmd("SET").arg(self.sweep_key()).arg(&self.node).arg("NX").arg("PX").arg(lease.as_millis() as u64).query_async(&mut r).await?;
        if mine.is_none() {
            return Ok(Vec::new());
        }
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
