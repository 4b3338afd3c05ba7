//! The rate-limit counters in Redis, shared by every node:
//! `<prefix>rl:<key>` holds the hits of the key's current window and
//! expires with it.

use std::time::Duration;

use async_trait::async_trait;
use redis::Script;
use redis::aio::ConnectionManager;

use super::Counter;

/// Counts a hit; the first hit of a window sets its expiry. Returns
/// {hits, milliseconds left}.
const HIT: &str = r"
local n = redis.call('INCR', KEYS[1])
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  ttl = tonumber(ARGV[1])
end
return {n, ttl}
";

/// Takes back a hit, never below zero.
const FORGIVE: &str = r"
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n > 0 then return redis.call('DECR', KEYS[1]) end
return 0
";

pub struct RedisCounter {
    conn: ConnectionManager,
    prefix: String,
    hit: Script,
    forgive: Script,
}

impl RedisCounter {
    pub fn new(conn: ConnectionManager, prefix: &str) -> RedisCounter {
        RedisCounter { conn, prefix: format!("{prefix}rl:"), hit: Script::new(HIT), forgive: Script::new(FORGIVE) }
    }
}

#[async_trait]
impl Counter for RedisCounter {
    async fn hit(&self, key: &str, window: Duration) -> anyhow::Result<(u64, Duration)> {
        let mut conn = self.conn.clone();
        let (n, ttl): (u64, i64) =
            self.hit.key(format!("{}{key}", self.prefix)).arg(window.as_millis() as u64).invoke_async(&mut conn).await?;
        Ok((n, Duration::from_millis(ttl.max(0) as u64)))
    }

    async fn forgive(&self, key: &str) -> anyhow::Result<()> {
        let mut conn = self.conn.clone();
        let _: i64 = self.forgive.key(format!("{}{key}", self.prefix)).invoke_async(&mut conn).await?;
        Ok(())
    }

}
