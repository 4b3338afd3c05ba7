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
//!   projections.redb  the views, unread counts (natter_projections::local)
//!                  and push inbox (push::local), each kept through a log
//!                  position: a restart replays only the events after it
//!   parked.jsonl   events a projection refused (normally absent)
//!   lock           held while a node runs: one node per directory
//! ```
//!
//! [`connect`] returns the [`Adapters`]; the node is assembled, served and
//! drained by the same composition root as a distributed one. Only the
//! adapters differ: the file log instead of JetStream, views, counts and
//! the push inbox (whose cursors are log sequences) in `projections.redb`
//! (brought up to the log's head before serving; rebuilt from the log when
//! missing, damaged or from another log), and in-process presence.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use async_trait::async_trait;
use natter_projections::Projection;
use natter_projections::local::{LocalCounts, LocalStore, LocalViews, OpenError};
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
use crate::push::local::LocalPush;

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
    let started = Instant::now();
    let log = Arc::new(tokio::task::spawn_blocking(move || FileLog::open(&at, sync, window)).await??.compact_events(compact));
    tracing::info!(events = *log.watch_head().borrow(), secs = format!("{:.2}", started.elapsed().as_secs_f64()), "event log opened");
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
    let (reading, dir, cache) = (log.clone(), e.data_dir.clone(), e.store_cache as usize);
    let started = Instant::now();
    let store = tokio::task::spawn_blocking(move || open_store(&dir, cache, &reading)).await??;
    if e.sync == SyncPolicy::Os {
        // Appends are not synced one by one: the store must not reach the
        // disk ahead of the events it reflects.
        let synced = log.clone();
        store.sync_first(move || synced.sync_to_disk().map_err(|e| e.to_string()));
    }
    tracing::info!(secs = format!("{:.2}", started.elapsed().as_secs_f64()), "projections.redb opened and checked");
    let (views, counts) = (Arc::new(LocalViews::new(store.clone())), Arc::new(LocalCounts::new(store.clone())));
    let applied = Arc::new(TailPosition::default());
    let closing_store = store.clone();
    let bus = Arc::new(LocalPush::new(store.clone(), cfg.push.retention).context("opening the push inbox")?);
    bus.record_earlier_members(&*log, &cfg.log.subject_prefix).await.context("recording the room memberships of the push inbox")?;
    Ok(Adapters {
        mode: Mode::Embedded,
        log: log.clone(),
        views: views.clone(),
        counts: counts.clone(),
        projections: vec![views, counts],
        progress: applied.clone(),
        bus,
        presence: Arc::new(MemoryPresence::new(cfg.push.presence_ttl)),
        counter: Arc::new(crate::ratelimit::MemoryCounter::default()),
        runner: Box::new(ReplayThenTail { parked: ParkedFile::open(e.data_dir.join("parked.jsonl")), log, applied, store }),
        stored_secret,
        after_drain: Box::new(move || {
            if let Err(e) = closing_store.close() {
                tracing::warn!(error = %e, "the view store could not be made durable at stop; the next start replays the log's tail into it");
            }
            closing.close()
        }),
        describe: format!(
            "embedded mode: one node, no NATS/MongoDB/Redis (set NATTER_NATS_URL, NATTER_MONGO_URL and NATTER_REDIS_URL \
             for the distributed mode); data {}; sync {sync}",
            data.display()
        ),
        collectors: Vec::new(),
    })
}

/// Opens the store `projections.redb` if it is readable and was built from
/// this log; else sets it aside (as `projections.redb.discarded`, replacing an
/// older one) and starts an empty one, which the tail fills from the log
/// before the node serves. Blocks (file I/O).
fn open_store(dir: &Path, cache: usize, log: &FileLog) -> anyhow::Result<Arc<LocalStore>> {
    let path = dir.join("projections.redb");
    // redb reports most damage as an error, but may panic on some.
    let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let store = LocalStore::open(&path, cache)?;
        match built_from(&store, log) {
            Ok(()) => Ok(store),
            Err(why) => {
                let _ = store.close();
                Err(OpenError::Unusable(why))
            }
        }
    }));
    let why = match opened {
        Ok(Ok(store)) => return Ok(store),
        Ok(Err(OpenError::Io(e))) => anyhow::bail!("cannot open {} ({e}): check the data directory's permissions and free space", path.display()),
        Ok(Err(OpenError::Unusable(why))) => why,
        Err(_) => "reading it failed (the file is damaged)".into(),
    };
    let aside = dir.join("projections.redb.discarded");
    std::fs::rename(&path, &aside).with_context(|| format!("setting the unusable view store {} aside", path.display()))?;
    tracing::warn!(
        path = %path.display(), reason = %why, kept_as = %aside.display(),
        "the view store cannot be used; rebuilding it from the event log before serving (this takes a while on a long log)"
    );
    LocalStore::open(&path, cache).with_context(|| format!("creating the view store {}", path.display()))
}

/// Whether every projection in `store` is kept through an event of this
/// log, and that event is the one it was built from.
fn built_from(store: &LocalStore, log: &FileLog) -> Result<(), String> {
    let head = *log.watch_head().borrow();
    for (projection, seq, id) in store.kept().map_err(|e| e.to_string())? {
        if seq > head {
            return Err(format!("{projection} is kept through event {seq}, but the log ends at {head} (the log was replaced or restored from an older copy)"));
        }
        let at = log.read_after(seq.saturating_sub(1), 1).map_err(|e| e.to_string())?;
        if at.first().map(|l| l.envelope.id.to_string()) != Some(id) {
            return Err(format!("{projection} was built from another log (event {seq} is not the one it was built from)"));
        }
    }
    Ok(())
}

/// Brings the projections from where each is kept up to the log's head,
/// then follows the log.
struct ReplayThenTail {
    log: Arc<FileLog>,
    parked: ParkedFile,
    applied: Arc<TailPosition>,
    store: Arc<LocalStore>,
}

#[async_trait]
impl Runner for ReplayThenTail {
    /// Every event after where each projection is kept, in order: the
    /// fan-out follows room membership from the events themselves (a room
    /// it has not seen since the start is read from the log once).
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
        let mut tail = FileTail::new(self.log, projections, metrics, self.parked, self.applied, shutdown.clone());
        let from = tail.resume().await;
        tail.retry_parked().await;
        tracing::info!(log_head = head, kept_through = %tail.kept(), "bringing the projections up to the event log's head before serving");
        let started = Instant::now();
        let replayed = tail.catch_up(from).await;
        tracing::info!(events = replayed - from, secs = format!("{:.2}", started.elapsed().as_secs_f64()), "projections up to the log's head");
        let flusher = tokio::spawn(flush_every_second(self.store, shutdown.clone()));
        Ok(vec![tokio::spawn(tail.run(replayed, shutdown)), flusher])
    }
}

/// Makes the view store's commits durable about once a second (each
/// projected event commits in memory first: see natter_projections::local).
async fn flush_every_second(store: Arc<LocalStore>, mut shutdown: watch::Receiver<bool>) {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        match store.flush() {
            Ok(()) if failing => {
                failing = false;
                tracing::info!("the view store is written to disk again");
            }
            Ok(()) => {}
            Err(e) if !failing => {
                failing = true;
                tracing::error!(error = %e, "cannot make the view store durable (disk full?); a crash now would replay more of the log at the next start");
            }
            Err(_) => {}
        }
    }
}
