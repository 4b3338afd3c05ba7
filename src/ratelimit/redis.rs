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

pub struct RedisCounter {
    conn: ConnectionManager,
    prefix: String,
    hit: Script,
}

impl RedisCounter {
    pub fn new(conn: ConnectionManager, prefix: &str) -> RedisCounter {
        RedisCounter { conn, prefix: format!("{prefix}rl:"), hit: Script::new(HIT) }
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

    async fn peek(&self, key: &str) -> anyhow::Result<(u64, Duration)> {
        let mut conn = self.conn.clone();
        let k = format!("{}{key}", self.prefix);
        let (n, ttl): (Option<u64>, i64) = redis::pipe().get(&k).pttl(&k).query_async(&mut conn).await?;
        Ok((n.unwrap_or(0), Duration::from_millis(ttl.max(0) as u64)))
    }
}
