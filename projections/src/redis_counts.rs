//! Redis unseen counts: one hash per user, `<prefix>unseen:<user>` (peer →
//! count), so the sidebar is one `HGETALL`. Beside it, `<prefix>unseen-pos:
//! <user>` (peer → position of the conversation event the count came from)
//! guards the write: a count only replaces one from an older event, so
//! duplicates and out-of-order deliveries cannot move it backwards.
//!
//! Rooms: `<prefix>room-last` (room → newest seq) and `<prefix>room-wm:<user>`
//! (room → that member's read watermark), both only ever raised (`max`),
//! and `<prefix>room-del:<room>` (a sorted set of the seqs of its deleted
//! messages, only ever added to), so unread = last − watermark − deleted
//! above the watermark, whatever the delivery order.
//!
//! Losing Redis' data (FLUSHALL, a restart without persistence, a restart
//! that reloads a snapshot older than the last writes, a failover to a
//! lagging replica) must never leave a wrong count: every read checks, in
//! the same transaction, the marker `<prefix>counts-ready`, which only a
//! completed rebuild writes, with the `run_id` of the Redis server it
//! completed on. While it is missing reads answer
//! [`StoreError::Rebuilding`] and a node rebuilds the counts from the log
//! (see the gateway's `heal` module); a marker from another server run is
//! withdrawn by the first node that notices (within a second).
//!
//! Every direct-message event carries the conversation's state, so the count
//! is arithmetic (`peer.sent - reader.seen_count`), never a query.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use natter_events::{DmState, Envelope, Event};
use redis::Script;
use redis::aio::ConnectionManager;

use crate::projection::{ApplyError, Projection};
use crate::views::{CountStore, StoreError};

/// Whether the counts in Redis can be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    /// No marker: never built, or Redis lost its data.
    Missing,
    /// Completed by an earlier run of the Redis server: withdrawn just now.
    Withdrawn,
}

const SET_IF_NEWER: &str = r#"
local cur = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
if tonumber(ARGV[2]) <= cur then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
if tonumber(ARGV[3]) > 0 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
else
  redis.call('HDEL', KEYS[1], ARGV[1])
end
return 1
"#;

/// Unread per room: `KEYS` = ready marker, room-last, the user's room-wm,
/// then each room's room-del; `ARGV` = the rooms. `{-1}` when not ready.
const ROOM_UNREAD: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1} end
local out = {}
for i, room in ipairs(ARGV) do
  local last = tonumber(redis.call('HGET', KEYS[2], room) or '0')
  local wm = tonumber(redis.call('HGET', KEYS[3], room) or '0')
  local n = last - wm
  if n > 0 then n = n - redis.call('ZCOUNT', KEYS[3 + i], '(' .. wm, '+inf') end
  if n < 0 then n = 0 end
  out[i] = n
end
return out
"#;

const RAISE: &str = r#"
local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if tonumber(ARGV[2]) > cur then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 0
"#;

#[derive(Clone)]
pub struct RedisCounts {
    conn: ConnectionManager,
    prefix: String,
    script: Script,
    raise: Script,
    /// Whether Redis was seen holding `script` and `raise` (see `write`).
    scripts_loaded: Arc<AtomicBool>,
}

/// Whether any command of a pipeline was refused for a script Redis does
/// not hold.
fn no_script(e: &redis::RedisError) -> bool {
    e.clone().into_server_errors().is_some_and(|errors| errors.iter().any(|(_, e)| e.code() == "NOSCRIPT"))
}

fn unavailable(e: redis::RedisError) -> StoreError {
    StoreError::Unavailable(format!("redis: {e}"))
}

impl RedisCounts {
    pub fn new(conn: ConnectionManager, prefix: impl Into<String>) -> Self {
        RedisCounts { conn, prefix: prefix.into(), script: Script::new(SET_IF_NEWER), raise: Script::new(RAISE), scripts_loaded: Arc::default() }
    }

    /// The key prefix of version `version` under `base`: `base` itself for
    /// version 1, `<base>v<N>:` after.
    pub fn versioned_prefix(base: &str, version: u32) -> String {
        if version <= 1 { base.to_owned() } else { format!("{base}v{version}:") }
    }

    /// Deletes every key of these counts (a replaced or abandoned build);
    /// presence keys, which share version 1's prefix, are left alone.
    pub async fn clear(&self) -> Result<u64, StoreError> {
        let mut conn = self.conn.clone();
        let mut deleted = 0;
        for pattern in ["unseen:*", "unseen-pos:*", "room-last", "room-wm:*", "room-del:*", "counts-ready", "counts-heal"] {
            let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{}{pattern}", self.prefix)).query_async(&mut conn).await.map_err(unavailable)?;
            for chunk in keys.chunks(500) {
                let n: u64 = redis::cmd("DEL").arg(chunk).query_async(&mut conn).await.map_err(unavailable)?;
                deleted += n;
            }
        }
        Ok(deleted)
    }

    fn counts_key(&self, user: &str) -> String {
        format!("{}unseen:{user}", self.prefix)
    }

    fn pos_key(&self, user: &str) -> String {
        format!("{}unseen-pos:{user}", self.prefix)
    }

    fn ready_key(&self) -> String {
        format!("{}counts-ready", self.prefix)
    }

    fn heal_lock_key(&self) -> String {
        format!("{}counts-heal", self.prefix)
    }

    /// The server's `run_id`: new at every Redis start (and on a failover
    /// to another server).
    async fn run_id(&self) -> Result<String, StoreError> {
        let mut conn = self.conn.clone();
        let info: String = redis::cmd("INFO").arg("server").query_async(&mut conn).await.map_err(unavailable)?;
        info.lines()
            .find_map(|l| l.strip_prefix("run_id:"))
            .map(|id| id.trim().to_owned())
            .ok_or_else(|| StoreError::Unavailable("redis: INFO server has no run_id".into()))
    }

    /// Whether the counts are complete. The marker names the Redis server
    /// run that completed them: after a restart (which reloads a snapshot
    /// that may miss the last writes) or a failover (a replica that may lag)
    /// the counts cannot be trusted, so the stale marker is withdrawn (reads
    /// answer "rebuilding" from then on) and [`Readiness::Withdrawn`] tells
    /// the caller to rebuild.
    pub async fn readiness(&self) -> Result<Readiness, StoreError> {
        let mut conn = self.conn.clone();
        let marker: Option<String> = redis::cmd("GET").arg(self.ready_key()).query_async(&mut conn).await.map_err(unavailable)?;
        let Some(marker) = marker else { return Ok(Readiness::Missing) };
        if marker == self.run_id().await? {
            return Ok(Readiness::Ready);
        }
        let _: i64 = Script::new("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end")
            .key(self.ready_key())
            .arg(&marker)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(Readiness::Withdrawn)
    }

    /// Whether the counts are complete (see [`RedisCounts::readiness`]).
    pub async fn is_ready(&self) -> Result<bool, StoreError> {
        Ok(self.readiness().await? == Readiness::Ready)
    }

    /// Declares the counts complete, for this run of the Redis server: only
    /// after a rebuild caught up.
    /// Any rebuild target is dropped in the same transaction, so a later
    /// loss of the counts never resumes a finished rebuild.
    pub async fn mark_ready(&self) -> Result<(), StoreError> {
        let run = self.run_id().await?;
        let mut conn = self.conn.clone();
        redis::pipe()
            .atomic()
            .set(self.ready_key(), run)
            .ignore()
            .del(self.heal_target_key())
            .ignore()
            .query_async::<()>(&mut conn)
            .await
            .map_err(unavailable)
    }

    fn heal_target_key(&self) -> String {
        format!("{}counts-heal-target", self.prefix)
    }

    /// The log head a rebuild in progress must reach, if one was started
    /// since this Redis server started (a rebuild started before a restart
    /// may have lost writes with it, and is not resumed).
    pub async fn heal_target(&self) -> Result<Option<u64>, StoreError> {
        let mut conn = self.conn.clone();
        let stored: Option<String> = redis::cmd("GET").arg(self.heal_target_key()).query_async(&mut conn).await.map_err(unavailable)?;
        let Some((run, head)) = stored.as_deref().and_then(|v| v.rsplit_once(':')) else { return Ok(None) };
        Ok((run == self.run_id().await?).then(|| head.parse().ok()).flatten())
    }

    /// Records the log head the rebuild just started must reach, so that a
    /// node taking over the lock resumes it rather than starting again.
    pub async fn set_heal_target(&self, head: u64) -> Result<(), StoreError> {
        let run = self.run_id().await?;
        let mut conn = self.conn.clone();
        redis::cmd("SET").arg(self.heal_target_key()).arg(format!("{run}:{head}")).query_async::<()>(&mut conn).await.map_err(unavailable)
    }

    pub async fn clear_heal_target(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        redis::cmd("DEL").arg(self.heal_target_key()).query_async::<()>(&mut conn).await.map_err(unavailable)
    }

    /// Takes the cluster-wide "I am rebuilding the counts" lock for `ttl`.
    pub async fn try_lock_heal(&self, owner: &str, ttl: std::time::Duration) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let set: Option<String> = redis::cmd("SET")
            .arg(self.heal_lock_key())
            .arg(owner)
            .arg("NX")
            .arg("PX")
            .arg(ttl.as_millis() as u64)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(set.is_some())
    }

    /// Extends the lock if `owner` still holds it; false if it lapsed.
    pub async fn renew_heal(&self, owner: &str, ttl: std::time::Duration) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let renewed: i64 = Script::new(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end",
        )
        .key(self.heal_lock_key())
        .arg(owner)
        .arg(ttl.as_millis() as u64)
        .invoke_async(&mut conn)
        .await
        .map_err(unavailable)?;
        Ok(renewed == 1)
    }

    /// Releases the lock if `owner` holds it (never another node's).
    pub async fn unlock_heal(&self, owner: &str) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: i64 = Script::new("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end")
            .key(self.heal_lock_key())
            .arg(owner)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    fn room_last_key(&self) -> String {
        format!("{}room-last", self.prefix)
    }

    fn room_wm_key(&self, user: &str) -> String {
        format!("{}room-wm:{user}", self.prefix)
    }

    fn room_deleted_key(&self, room: &str) -> String {
        format!("{}room-del:{room}", self.prefix)
    }

    /// Writes what `events` change, in one round trip: per conversation
    /// the counts of its newest event in the batch (each guarded by the
    /// event's position, so an older state never replaces a newer one),
    /// per room watermark the highest value (only ever raised).
    async fn write<'a>(&self, events: &[&'a Envelope]) -> Result<(), StoreError> {
        let mut states: HashMap<&str, (u64, &DmState)> = HashMap::new();
        let mut raises: HashMap<(String, &'a str), u64> = HashMap::new();
        let mut deleted: Vec<(String, u64)> = Vec::new();
        let mut raise = |key: String, field: &'a str, value: u64| {
            let v = raises.entry((key, field)).or_insert(value);
            *v = (*v).max(value);
        };
        for env in events {
            if let Some(state) = env.event.dm_state() {
                let newest = states.entry(env.subject.as_str()).or_insert((env.position, state));
                if env.position > newest.0 {
                    *newest = (env.position, state);
                }
                continue;
            }
            match &env.event {
                Event::RoomMessageSent(e) => {
                    raise(self.room_last_key(), &e.room_id, e.seq);
                    raise(self.room_wm_key(&e.sender_id), &e.room_id, e.seq);
                }
                Event::MemberJoined(e) => raise(self.room_wm_key(&e.user_id), &e.room_id, e.seen_up_to),
                Event::RoomRead(e) => raise(self.room_wm_key(&e.user_id), &e.room_id, e.up_to_seq),
                Event::RoomMessageDeleted(e) => deleted.push((self.room_deleted_key(&e.message.room_id), e.message.seq)),
                _ => {}
            }
        }
        if states.is_empty() && raises.is_empty() && deleted.is_empty() {
            return Ok(());
        }
        // The scripts are loaded (in the same pipeline, before their first
        // use) until Redis is known to hold them; a Redis that lost them
        // (restarted, `SCRIPT FLUSH`) answers NOSCRIPT, and the pipeline
        // goes again with them (every command in it is idempotent).
        let pipeline = |load: bool| {
            let mut pipe = redis::pipe();
            if load {
                pipe.cmd("SCRIPT").arg("LOAD").arg(SET_IF_NEWER).ignore();
                pipe.cmd("SCRIPT").arg("LOAD").arg(RAISE).ignore();
            }
            for (position, state) in states.values() {
                for (reader, peer) in [(&state.lo, &state.hi), (&state.hi, &state.lo)] {
                    let count = state.unseen(&reader.user_id, &peer.user_id);
                    pipe.cmd("EVALSHA")
                        .arg(self.script.get_hash())
                        .arg(2)
                        .arg(self.counts_key(&reader.user_id))
                        .arg(self.pos_key(&reader.user_id))
                        .arg(&peer.user_id)
                        .arg(*position)
                        .arg(count)
                        .ignore();
                }
            }
            for ((key, field), value) in &raises {
                pipe.cmd("EVALSHA").arg(self.raise.get_hash()).arg(1).arg(key).arg(*field).arg(*value).ignore();
            }
            for (key, seq) in &deleted {
                pipe.cmd("ZADD").arg(key).arg(*seq).arg(*seq).ignore();
            }
            pipe
        };
        let mut conn = self.conn.clone();
        let load = !self.scripts_loaded.load(Ordering::Relaxed);
        let written = match pipeline(load).query_async::<()>(&mut conn).await {
            Err(e) if !load && no_script(&e) => pipeline(true).query_async::<()>(&mut conn).await,
            other => other,
        };
        // Any failure: load them again next time (whatever it was, Redis
        // may have lost them with it).
        self.scripts_loaded.store(written.is_ok(), Ordering::Relaxed);
        written.map_err(unavailable)
    }
}

#[async_trait]
impl CountStore for RedisCounts {
    async fn check(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        redis::cmd("PING").query_async::<String>(&mut conn).await.map(|_| ()).map_err(unavailable)
    }

    async fn apply(&self, env: &Envelope) -> Result<(), ApplyError> {
        Ok(self.write(&[env]).await?)
    }

    async fn room_unread(&self, user: &str, rooms: &[String]) -> Result<HashMap<String, u64>, StoreError> {
        if rooms.is_empty() {
            return Ok(HashMap::new());
        }
        let unread = Script::new(ROOM_UNREAD);
        let mut script = unread.prepare_invoke();
        script.key(self.ready_key()).key(self.room_last_key()).key(self.room_wm_key(user));
        for room in rooms {
            script.key(self.room_deleted_key(room));
        }
        for room in rooms {
            script.arg(room);
        }
        let mut conn = self.conn.clone();
        let unread: Vec<i64> = script.invoke_async(&mut conn).await.map_err(unavailable)?;
        if unread.first() == Some(&-1) {
            return Err(StoreError::Rebuilding("unread counts"));
        }
        Ok(rooms.iter().cloned().zip(unread.into_iter().map(|n| n.max(0) as u64)).collect())
    }

    async fn unseen(&self, user: &str) -> Result<HashMap<String, u64>, StoreError> {
        let mut conn = self.conn.clone();
        let (ready, raw): (bool, HashMap<String, u64>) = redis::pipe()
            .atomic()
            .cmd("EXISTS")
            .arg(self.ready_key())
            .cmd("HGETALL")
            .arg(self.counts_key(user))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        if !ready {
            return Err(StoreError::Rebuilding("unread counts"));
        }
        Ok(raw.into_iter().filter(|(_, n)| *n > 0).collect())
    }
}

#[async_trait]
impl Projection for RedisCounts {
    fn name(&self) -> &'static str {
        "redis-unseen"
    }
    fn version(&self) -> u32 {
        1
    }
    async fn apply(&self, env: &Envelope) -> Result<(), ApplyError> {
        CountStore::apply(self, env).await
    }
    async fn apply_batch(&self, batch: &[(&Envelope, u64)]) -> Result<(), ApplyError> {
        let events: Vec<&Envelope> = batch.iter().map(|(env, _)| *env).collect();
        Ok(self.write(&events).await?)
    }
}
