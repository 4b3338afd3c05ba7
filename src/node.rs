//! A natter node: connects its adapters, starts its projectors, serves HTTP,
//! and drains on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use mongodb::bson::doc;
use natter_projections::{CountStore, Projection, ViewStore};
use axum::serve::ListenerExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::auth::Auth;
use crate::commands::{Commands, Limits};
use crate::config::{Config, redact};
use crate::heal::Healer;
use crate::log::EventLog;
use crate::log::nats::NatsLog;
use crate::metrics::Metrics;
use crate::config::Mode;
use crate::presence::Presence;
use crate::presence::redis::RedisPresence;
use crate::projector::Projector;
use crate::push::fanout::FanOut;
use crate::push::hub::PushHub;
use crate::push::nats::NatsPush;
use crate::versions::Versions;

/// The state every request handler shares.
pub struct Node {
    pub cfg: Config,
    pub commands: Commands,
    pub log: Arc<dyn EventLog>,
    pub views: Arc<dyn ViewStore>,
    pub counts: Arc<dyn CountStore>,
    pub auth: Auth,
    pub metrics: Arc<Metrics>,
    pub push: Arc<PushHub>,
    pub presence: Arc<dyn Presence>,
    pub mode: Mode,
    /// False while an embedded node rebuilds its views at start-up: only
    /// `/healthz`, `/readyz` and `/metrics` answer until then.
    pub serving: std::sync::atomic::AtomicBool,
    /// Unique per process: names this node's presence connections.
    pub node_id: String,
}

/// A started node: its address, and the handle to stop it.
pub struct RunningNode {
    pub addr: SocketAddr,
    pub node: Arc<Node>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningNode {
    /// Stops accepting, lets in-flight requests finish, stops projectors.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }

    /// Waits until the node stops (after [`RunningNode::stop`] or a signal).
    pub async fn wait(self) {
        for task in self.tasks {
            let _ = task.await;
        }
    }

    pub fn shutdown_handle(&self) -> watch::Sender<bool> {
        self.shutdown.clone()
    }
}

pub async fn connect_mongo(url: &str, db: &str) -> anyhow::Result<mongodb::Database> {
    let mut options = mongodb::options::ClientOptions::parse(url)
        .await
        .with_context(|| format!("NATTER_MONGO_URL {:?} is not a valid MongoDB URL", redact(url)))?;
    options.app_name = Some("natter".into());
    options.server_selection_timeout = Some(Duration::from_secs(5));
    options.connect_timeout = Some(Duration::from_secs(5));
    let client = mongodb::Client::with_options(options)?;
    let db = client.database(db);
    db.run_command(doc! {"ping": 1})
        .await
        .with_context(|| format!("cannot reach MongoDB at {} (is it running?)", redact(url)))?;
    Ok(db)
}

pub async fn connect_redis(url: &str) -> anyhow::Result<redis::aio::ConnectionManager> {
    let client = redis::Client::open(url).with_context(|| format!("NATTER_REDIS_URL {:?} is not a valid Redis URL", redact(url)))?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(5)));
    let mut conn = tokio::time::timeout(Duration::from_secs(10), redis::aio::ConnectionManager::new_with_config(client, config))
        .await
        .map_err(|_| anyhow::anyhow!("cannot reach Redis at {} within 10 s", redact(url)))?
        .with_context(|| format!("cannot reach Redis at {} (is it running?)", redact(url)))?;
    redis::cmd("PING")
        .query_async::<String>(&mut conn)
        .await
        .with_context(|| format!("Redis at {} does not answer PING", redact(url)))?;
    Ok(conn)
}

/// Starts a node on `listener`: embedded when no service is configured,
/// distributed when NATS, MongoDB and Redis all are.
pub async fn start(cfg: Config, listener: tokio::net::TcpListener) -> anyhow::Result<RunningNode> {
    match cfg.mode()? {
        Mode::Embedded => crate::embedded::start(cfg, listener).await,
        Mode::Distributed => start_distributed(cfg, listener).await,
    }
}

/// Connects to NATS, MongoDB and Redis, starts the projectors, serves.
async fn start_distributed(cfg: Config, listener: tokio::net::TcpListener) -> anyhow::Result<RunningNode> {
    let (nats_url, mongo_url, redis_url) = (
        cfg.nats_url.clone().unwrap_or_default(),
        cfg.mongo_url.clone().unwrap_or_default(),
        cfg.redis_url.clone().unwrap_or_default(),
    );
    let auth = Auth::from_config(&cfg)?;
    let (log, db, redis) = tokio::try_join!(
        NatsLog::connect(&nats_url, &cfg.stream, &cfg.subject_prefix, cfg.dedup_window),
        connect_mongo(&mongo_url, &cfg.mongo_db),
        connect_redis(&redis_url),
    )?;
    let versions = Arc::new(
        Versions::open(db, redis.clone(), &cfg.redis_prefix)
            .await
            .with_context(|| format!("opening the views in MongoDB database {}", cfg.mongo_db))?,
    );
    let (mongo, counts) = (versions.views.clone(), versions.counts.clone());
    let presence = Arc::new(RedisPresence::new(redis.clone(), &cfg.redis_prefix, cfg.presence_ttl));
    let metrics = Arc::new(Metrics::default());
    let bus = Arc::new(
        NatsPush::connect(log.client().clone(), log.jetstream().clone(), &cfg.stream, &cfg.subject_prefix, cfg.push_retention).await?,
    );
    let push = PushHub::new(bus.clone(), cfg.socket_queue);
    let log_port: Arc<dyn EventLog> = Arc::new(log.clone());
    let commands = Commands::new(
        log_port.clone(),
        mongo.clone(),
        counts.clone(),
        cfg.subject_prefix.clone(),
        Limits::from_config(&cfg),
        metrics.clone(),
    );
    let node = Arc::new(Node {
        cfg: cfg.clone(),
        commands,
        log: log_port,
        views: mongo.clone(),
        counts: counts.clone(),
        auth,
        metrics: metrics.clone(),
        push,
        presence,
        mode: Mode::Distributed,
        serving: std::sync::atomic::AtomicBool::new(true),
        node_id: uuid::Uuid::new_v4().simple().to_string(),
    });

    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    // Before the counts projector starts: if Redis has lost the counts (or
    // this is a fresh deployment), restart it from the beginning of the log.
    let healer = Healer {
        counts: counts.clone(),
        js: log.jetstream().clone(),
        stream: cfg.stream.clone(),
        log: node.log.clone(),
        owner: node.node_id.clone(),
        redis,
        redis_base: cfg.redis_prefix.clone(),
    };
    let heal_to = healer.begin().await.context("checking the unread counts in Redis")?;
    let fanout = Arc::new(FanOut::new(bus, cfg.subject_prefix.clone(), node.log.clone()));
    let projections: [Arc<dyn Projection>; 3] = [mongo, counts, fanout];
    for projection in projections {
        let projector = Projector {
            js: log.jetstream().clone(),
            stream: cfg.stream.clone(),
            prefix: cfg.subject_prefix.clone(),
            projection,
            metrics: metrics.clone(),
        };
        tasks.push(tokio::spawn(projector.run(shutdown_rx.clone())));
    }

    tasks.push(tokio::spawn(versions.clone().run(shutdown_rx.clone())));
    if let Some(target) = heal_to {
        // Serve only once the counts are whole when that is quick; if it is
        // not, serve anyway (count reads answer 503 rebuilding until done).
        if let Err(e) = healer.finish(target).await {
            tracing::error!(error = %format!("{e:#}"), "unread counts not rebuilt at start-up; serving, and retrying in the background");
        }
    }
    tasks.push(tokio::spawn(healer.run(shutdown_rx.clone())));

    let addr = serve(node.clone(), listener, shutdown_rx, &mut tasks)?;
    tracing::info!(
        %addr, nats = %redact(&nats_url), mongo = %redact(&mongo_url), redis = %redact(&redis_url),
        stream = %cfg.stream, db = %cfg.mongo_db, "natter node serving (distributed mode)"
    );
    Ok(RunningNode { addr, node, shutdown, tasks })
}

/// Serves REST and Socket.IO on `listener` until shutdown, and keeps the
/// node's presence alive. Returns the address served.
pub fn serve(
    node: Arc<Node>,
    listener: tokio::net::TcpListener,
    shutdown_rx: watch::Receiver<bool>,
    tasks: &mut Vec<JoinHandle<()>>,
) -> anyhow::Result<SocketAddr> {
    tasks.push(tokio::spawn(crate::socket::chat::presence_loop(node.clone(), shutdown_rx.clone())));
    let addr = listener.local_addr()?;
    let (sockets, io) = crate::socket::layer(node.clone());
    let app = crate::http::router(node.clone())
        .layer(sockets)
        .layer(axum::middleware::from_fn_with_state(node.clone(), crate::http::gate));
    // A peer that stops reading is cut off once unacknowledged data sits for
    // this long, so a stalled client cannot pin a connection (and its
    // buffers) forever.
    let listener = listener.tap_io(|tcp| {
        let _ = socket2::SockRef::from(&*tcp).set_tcp_user_timeout(Some(Duration::from_secs(30)));
    });
    let mut rx = shutdown_rx.clone();
    let closing_node = node.clone();
    tasks.push(tokio::spawn(async move {
        let stopped = async move {
            let _ = rx.wait_for(|stop| *stop).await;
            // End every socket's session, then close the connections so
            // the server can drain.
            crate::socket::close_all(&io, &closing_node).await;
        };
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stopped).await {
            tracing::error!(error = %e, "HTTP server failed");
        }
    }));
    Ok(addr)
}

impl RunningNode {
    pub fn new(addr: SocketAddr, node: Arc<Node>, shutdown: watch::Sender<bool>, tasks: Vec<JoinHandle<()>>) -> RunningNode {
        RunningNode { addr, node, shutdown, tasks }
    }
}
