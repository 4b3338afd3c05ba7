//! The embedded node: what `cargo run` starts when no service is configured.
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
//! The command side, REST, Socket.IO, the fan-out and the sessions are the
//! same code as a distributed node's; only the adapters differ: the file log
//! instead of JetStream, in-memory views and counts (rebuilt from the log at
//! every start, before serving), an in-process push bus whose cursors are log
//! sequences, and in-process presence.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use natter_projections::memory::{MemoryCounts, MemoryViews};
use natter_projections::{CountStore, Projection, ViewStore};
use secrecy::SecretString;
use tokio::sync::watch;

use crate::auth::Auth;
use crate::commands::{Commands, Limits};
use crate::config::{Config, Mode};
use crate::log::EventLog;
use crate::log::file::FileLog;
use crate::metrics::Metrics;
use crate::node::{Node, RunningNode, serve};
use crate::presence::memory::MemoryPresence;
use crate::push::fanout::FanOut;
use crate::push::hub::PushHub;
use crate::push::memory::MemoryPush;
use crate::tail::Tail;

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

/// Opens the data directory, rebuilds the views from the log, serves. At
/// shutdown the log is closed (and the directory released) once the server
/// has drained.
pub async fn start(mut cfg: Config, listener: tokio::net::TcpListener) -> anyhow::Result<RunningNode> {
    let dir = cfg.data_dir.clone();
    // Opening takes the directory's lock (waiting a little for a node that
    // is stopping) and reads the whole file: keep it off the async workers.
    let (sync, window, at) = (cfg.sync, cfg.dedup_window, dir.clone());
    let file_log = Arc::new(tokio::task::spawn_blocking(move || FileLog::open(&at, sync, window)).await??);
    if cfg.jwt_secret.is_none() {
        cfg.jwt_secret = Some(stored_secret(&dir)?);
    }
    let auth = Auth::from_config(&cfg)?;
    let log: Arc<dyn EventLog> = file_log.clone();
    let views = Arc::new(MemoryViews::default());
    let counts = Arc::new(MemoryCounts::default());
    let bus = Arc::new(MemoryPush::new(cfg.push_retention));
    let metrics = Arc::new(Metrics::default());
    let commands = Commands::new(
        log.clone(),
        views.clone(),
        counts.clone(),
        cfg.subject_prefix.clone(),
        Limits::from_config(&cfg),
        metrics.clone(),
    );
    let fanout = Arc::new(FanOut::in_order(bus.clone(), cfg.subject_prefix.clone(), log.clone()));
    let projections: Vec<Arc<dyn Projection>> = vec![views.clone(), counts.clone(), fanout];
    let tail = Tail::new(file_log.clone(), projections, metrics.clone(), dir.join("parked.jsonl"));

    let node = Arc::new(Node {
        cfg: cfg.clone(),
        commands,
        log,
        views: views as Arc<dyn ViewStore>,
        counts: counts as Arc<dyn CountStore>,
        auth,
        metrics,
        push: PushHub::new(bus, cfg.socket_queue),
        presence: Arc::new(MemoryPresence::new(cfg.presence_ttl)),
        mode: Mode::Embedded,
        serving: std::sync::atomic::AtomicBool::new(false),
        node_id: uuid::Uuid::new_v4().simple().to_string(),
    });
    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    // Listen at once (liveness probes get /healthz during a long replay;
    // everything else answers 503 starting), rebuild the views, then serve.
    let addr = serve(node.clone(), listener, shutdown_rx.clone(), &mut tasks)?;
    // Once the server has drained, close the log: a request handler or
    // socket task still running is refused rather than allowed to append
    // after the data directory is released to a successor.
    let server = tasks.pop().expect("serve starts the HTTP server task");
    let closing = file_log.clone();
    tasks.push(tokio::spawn(async move {
        let _ = server.await;
        closing.close();
    }));
    let head = *file_log.watch_head().borrow();
    tracing::info!(%addr, events = head, "rebuilding the views from the event log before serving");
    let started = Instant::now();
    let replayed = tail.catch_up(0).await;
    tracing::info!(events = replayed, secs = format!("{:.2}", started.elapsed().as_secs_f64()), "views rebuilt from the event log");
    node.serving.store(true, std::sync::atomic::Ordering::Release);
    tasks.push(tokio::spawn(tail.run(replayed, shutdown_rx)));
    let sync = match cfg.sync {
        crate::config::SyncPolicy::Always => "always (fsync before every acknowledgement)",
        crate::config::SyncPolicy::Os => "os (flushed by the OS: survives a natter crash, not a power loss)",
    };
    tracing::info!(
        %addr, data = %std::fs::canonicalize(file_log.path()).unwrap_or_else(|_| file_log.path().to_owned()).display(), events = replayed, sync,
        "natter node serving (embedded mode: one node, no NATS/MongoDB/Redis; set NATTER_NATS_URL, NATTER_MONGO_URL and NATTER_REDIS_URL for the distributed mode)"
    );
    Ok(RunningNode::new(addr, node, shutdown, tasks))
}
