//! The embedded mode's adapters: what `cargo run` starts when no service is
//! configured.
//!
//! One process, one data directory:
//!
//! ```text
//! natter-data/
//!   events.log     the event log (length + CRC32 framed records, see log::file)
//!   jwt-secret     the token secret generated on first start (unless
//!                  NATTER_JWT_SECRET is set), so tokens survive restarts
//!   parked.jsonl   events a projection refused (normally absent)
//!   lock           held while a node runs: one node per directory
//! ```
//!
//! [`connect`] returns the [`Adapters`]; the node is assembled, served and
//! drained by the same composition root as a distributed one. Only the
//! adapters differ: the file log
//! instead of JetStream, in-memory views and counts (rebuilt from the log at
//! every start, before serving), an in-process push bus whose cursors are log
//! sequences, and in-process presence.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use async_trait::async_trait;
use natter_projections::Projection;
use natter_projections::memory::{MemoryCounts, MemoryViews};
use secrecy::SecretString;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::adapters::Adapters;
use crate::config::{Config, Mode, SyncPolicy};
use crate::log::file::FileLog;
use crate::metrics::Metrics;
use crate::presence::memory::MemoryPresence;
use crate::projector::Runner;
use crate::projector::embedded::{FileTail, ParkedFile, TailPosition};
use crate::push::memory::MemoryPush;

/// The token secret kept in the data directory, created on first start.
fn stored_secret(dir: &Path) -> anyhow::Result<SecretString> {
    let path = dir.join("jwt-secret");
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => return Ok(SecretString::from(s.trim().to_owned())),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let secret = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
    let mut options = std::fs::OpenOptions::new();
    options.create(true).write(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&path).with_context(|| format!("creating {}", path.display()))?;
    file.write_all(secret.as_bytes()).and_then(|()| file.sync_all()).with_context(|| format!("writing {}", path.display()))?;
    tracing::info!(path = %path.display(), "generated the token secret (set NATTER_JWT_SECRET to use your own)");
    Ok(SecretString::from(secret))
}

/// Opens the data directory (taking its lock) and the in-process stores.
/// The views are rebuilt from the log by the runner, before the node
/// serves; the log is closed (and the directory released) once the server
/// has drained.
pub async fn connect(cfg: &Config) -> anyhow::Result<Adapters> {
    let e = &cfg.embedded;
    // Opening takes the directory's lock (waiting a little for a node that
    // is stopping) and reads the whole file: keep it off the async workers.
    let (sync, window, at) = (e.sync, cfg.log.dedup_window, e.data_dir.clone());
    let compact = cfg.log.compact_events;
    let log = Arc::new(tokio::task::spawn_blocking(move || FileLog::open(&at, sync, window)).await??.compact_events(compact));
    let stored_secret = match cfg.auth.jwt_secret {
        Some(_) => None,
        None => Some(stored_secret(&e.data_dir)?),
    };
    let sync = match e.sync {
        SyncPolicy::Always => "always (fsync before every acknowledgement)",
        SyncPolicy::Os => "os (flushed by the OS: survives a natter crash, not a power loss)",
    };
    let data = std::fs::canonicalize(log.path()).unwrap_or_else(|_| log.path().to_owned());
    let closing = log.clone();
    let (views, counts) = (Arc::new(MemoryViews::default()), Arc::new(MemoryCounts::default()));
    let applied = Arc::new(TailPosition::default());
    Ok(Adapters {
        mode: Mode::Embedded,
        log: log.clone(),
        views: views.clone(),
        counts: counts.clone(),
        projections: vec![views, counts],
        progress: applied.clone(),
        bus: Arc::new(MemoryPush::new(cfg.push.retention)),
        presence: Arc::new(MemoryPresence::new(cfg.push.presence_ttl)),
        counter: Arc::new(crate::ratelimit::MemoryCounter::default()),
        runner: Box::new(ReplayThenTail { parked: ParkedFile::open(e.data_dir.join("parked.jsonl")), log, applied }),
        stored_secret,
        after_drain: Box::new(move || closing.close()),
        describe: format!(
            "embedded mode: one node, no NATS/MongoDB/Redis (set NATTER_NATS_URL, NATTER_MONGO_URL and NATTER_REDIS_URL \
             for the distributed mode); data {}; sync {sync}",
            data.display()
        ),
        collectors: Vec::new(),
    })
}

/// Replays the whole log into the in-process projections, then follows it.
struct ReplayThenTail {
    log: Arc<FileLog>,
    parked: ParkedFile,
    applied: Arc<TailPosition>,
}

#[async_trait]
impl Runner for ReplayThenTail {
    fn in_log_order(&self) -> bool {
        true
    }

    async fn start(
        self: Box<Self>,
        projections: Vec<Arc<dyn Projection>>,
        metrics: Arc<Metrics>,
        shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<Vec<JoinHandle<()>>> {
        let head = *self.log.watch_head().borrow();
        let tail = FileTail::new(self.log, projections, metrics, self.parked, self.applied);
        tracing::info!(events = head, "rebuilding the views from the event log before serving");
        let started = Instant::now();
        let replayed = tail.catch_up(0).await;
        tracing::info!(events = replayed, secs = format!("{:.2}", started.elapsed().as_secs_f64()), "views rebuilt from the event log");
        Ok(vec![tokio::spawn(tail.run(replayed, shutdown))])
    }
}
