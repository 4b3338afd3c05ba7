//! The composition root: builds a node from its mode's adapters, serves,
//! and drains on shutdown. Both modes go through [`start`]; they differ
//! only in the [`Adapters`] they connect ([`crate::embedded::connect`],
//! [`crate::distributed::connect`]). Nothing else in the crate imports this
//! module.
//!
//! Start: connect the adapters → build the application state → listen at
//! once (everything but `/healthz`, `/readyz` and `/metrics` answers 503
//! `starting`) → let the projector runner bring the projections up to date
//! and spawn the projectors → serve (both modes answer 503 `starting` until
//! then). Stop: sockets end their sessions and close, the HTTP server
//! drains and the adapters' `after_drain` runs; projectors stop beside it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt;
use natter_projections::{CountStore, ViewStore};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::adapters::Adapters;
use crate::auth::Auth;
use crate::commands::Commands;
use crate::config::{Config, Mode};
use crate::log::EventLog;
use crate::metrics::Metrics;
use crate::push::fanout::FanOut;
use crate::push::hub::PushHub;
use crate::state::AppState;

/// A started node: its address, and the handle to stop it.
pub struct RunningNode {
    pub addr: SocketAddr,
    state: Arc<AppState>,
    log: Arc<dyn EventLog>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningNode {
    /// Stops accepting, ends sockets, lets in-flight requests finish, stops
    /// projectors.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        self.wait().await;
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

    pub fn mode(&self) -> Mode {
        self.state.mode
    }

    /// The command side (for embedding natter in another program, and the
    /// benchmarks).
    pub fn commands(&self) -> &Commands {
        &self.state.commands
    }

    pub fn log(&self) -> &Arc<dyn EventLog> {
        &self.log
    }

    pub fn views(&self) -> &dyn ViewStore {
        self.state.views()
    }

    pub fn counts(&self) -> &dyn CountStore {
        self.state.counts()
    }

    /// Sockets of `user` open on this node.
    pub fn sockets_of(&self, user: &str) -> usize {
        self.state.push.sockets_of(user)
    }

    /// Users with at least one socket on this node.
    pub fn subscribed_users(&self) -> usize {
        self.state.push.subscribed_users()
    }

    /// A view of this node's sockets that outlives [`RunningNode::stop`].
    pub fn sockets(&self) -> NodeSockets {
        NodeSockets(self.state.clone())
    }

    /// Takes the node out of service (every route but `/healthz`, `/readyz`
    /// and `/metrics` answers 503 `starting`) or puts it back.
    pub fn set_serving(&self, serving: bool) {
        self.state.set_serving(serving);
    }
}

/// This node's sockets, as its push hub sees them.
pub struct NodeSockets(Arc<AppState>);

impl NodeSockets {
    /// Users with at least one socket on the node.
    pub fn subscribed_users(&self) -> usize {
        self.0.push.subscribed_users()
    }
}

/// Starts a node on `listener`: embedded when no service is configured,
/// distributed when NATS, MongoDB and Redis all are.
pub async fn start(cfg: Config, listener: tokio::net::TcpListener) -> anyhow::Result<RunningNode> {
    let node_id = uuid::Uuid::new_v4().simple().to_string();
    let mode = cfg.mode()?;
    // Settings that would refuse the node later are checked before any
    // shared service is touched.
    crate::auth::check_settings(&cfg.auth, matches!(mode, Mode::Distributed))?;
    if matches!(mode, Mode::Distributed) {
        Auth::new(&cfg.auth, None)?;
    }
    cfg.server.cors()?;
    let adapters = match mode {
        Mode::Embedded => crate::embedded::connect(&cfg).await?,
        Mode::Distributed => crate::distributed::connect(&cfg, &node_id).await?,
    };
    let Adapters { mode, log, views, counts, projections, progress, bus, presence, counter, runner, stored_secret, after_drain, describe, collectors } = adapters;
    let auth = Auth::new(&cfg.auth, stored_secret)?;
    let metrics = Arc::new(Metrics::default());
    for collector in collectors {
        metrics.register_collector(collector);
    }
    let commands = Commands::new(log.clone(), views.clone(), counts.clone(), cfg.log.subject_prefix.clone(), cfg.limits.clone(), metrics.clone(), progress);
    let prefix = cfg.log.subject_prefix.clone();
    let fanout = if runner.in_log_order() {
        FanOut::in_order(bus.clone(), prefix, log.clone(), views.clone(), cfg.push.announce_max)
    } else {
        FanOut::new(bus.clone(), prefix, log.clone(), views.clone(), cfg.push.announce_max)
    };
    let mut projections = projections;
    projections.push(Arc::new(fanout));
    for p in &projections {
        metrics.projection_known(p.name());
    }
    let push = PushHub::new(bus, cfg.limits.socket_queue);
    let rate = crate::ratelimit::RateLimits::new(counter, &cfg.limits);
    let state = Arc::new(AppState::new(commands, auth, push, presence, rate, mode, cfg.limits.clone(), node_id));

    let (shutdown, shutdown_rx) = watch::channel(false);
    let addr = listener.local_addr()?;
    let cors = crate::http::cors(&cfg.server.cors()?);
    let mut tasks = vec![serve(state.clone(), listener, shutdown_rx.clone(), after_drain, cors, cfg.server.drain_delay)];
    match runner.start(projections, metrics, shutdown_rx.clone()).await {
        Ok(projectors) => tasks.extend(projectors),
        Err(e) => {
            let _ = shutdown.send(true);
            for task in tasks {
                let _ = task.await;
            }
            return Err(e);
        }
    }
    tasks.push(tokio::spawn(crate::socket::presence::presence_loop(state.clone(), shutdown_rx.clone())));
    tasks.push(tokio::spawn(rate_housekeeping(state.clone(), shutdown_rx)));
    state.set_serving(true);
    tracing::info!(%addr, mode = mode.name(), "natter node serving ({describe})");
    Ok(RunningNode { addr, state, log, shutdown, tasks })
}

/// Drops idle rate-limit buckets every minute, so they stay bounded.
async fn rate_housekeeping(state: Arc<AppState>, mut shutdown: watch::Receiver<bool>) {
    let mut every = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = every.tick() => state.rate.housekeeping(),
            _ = shutdown.changed() => return,
        }
    }
}

/// Serves REST and Socket.IO on `listener` until shutdown; then ends every
/// socket's session, drains, and runs `after_drain`.
fn serve(
    state: Arc<AppState>,
    listener: tokio::net::TcpListener,
    mut shutdown: watch::Receiver<bool>,
    after_drain: Box<dyn FnOnce() + Send>,
    cors: Option<tower_http::cors::CorsLayer>,
    drain_delay: Duration,
) -> JoinHandle<()> {
    let (sockets, io) = crate::socket::layer(state.clone());
    let app = crate::http::router(state.clone())
        .layer(sockets)
        .layer(axum::middleware::from_fn(crate::socket::own_request_head))
        .layer(axum::middleware::from_fn_with_state(state.clone(), crate::http::gate));
    // Outermost, so refusals (401, 429, 503) carry the headers a browser
    // needs to read them, and Socket.IO's long-polling is covered too.
    let app = match cors {
        Some(cors) => app.layer(cors),
        None => app,
    };
    // A peer that stops reading is cut off once unacknowledged data sits for
    // this long, so a stalled client cannot pin a connection (and its
    // buffers) forever.
    let listener = listener.tap_io(|tcp| {
        let _ = socket2::SockRef::from(&*tcp).set_tcp_user_timeout(Some(Duration::from_secs(30)));
    });
    tokio::spawn(async move {
        let stopped = async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
            // Readiness fails and new requests are refused first (for
            // NATTER_DRAIN_DELAY_MS), so a load balancer sends them, and the
            // sockets that reconnect next, to other nodes; then every
            // socket's session ends and its connection closes, the listener
            // closes and the server drains what is in flight.
            state.start_draining();
            if !drain_delay.is_zero() {
                tracing::info!(delay_ms = drain_delay.as_millis() as u64, "draining: readiness fails and new requests get 503 before sockets close");
                tokio::time::sleep(drain_delay).await;
            }
            crate::socket::close_all(&io, &state).await;
        };
        let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stopped).await {
            tracing::error!(error = %e, "HTTP server failed");
        }
        after_drain();
    })
}
