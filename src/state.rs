//! What every request handler and socket shares: the application state the
//! composition root ([`crate::startup`]) builds once per node. The HTTP and
//! Socket.IO layers depend on this type, never on how it was assembled.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use natter_projections::{CountStore, ViewStore};

use crate::auth::Auth;
use crate::commands::Commands;
use crate::config::{Limits, Mode};
use crate::metrics::Metrics;
use crate::presence::Presence;
use crate::push::hub::PushHub;
use crate::ratelimit::RateLimits;

pub struct AppState {
    /// The write side, and through it the views it keeps up to date.
    pub commands: Commands,
    pub auth: Auth,
    pub metrics: Arc<Metrics>,
    /// This node's sockets' subscriptions.
    pub push: Arc<PushHub>,
    pub presence: Arc<dyn Presence>,
    pub rate: RateLimits,
    pub mode: Mode,
    pub limits: Limits,
    /// Unique per process: names this node's presence connections.
    pub node_id: String,
    /// False until the projections are far enough to serve (an embedded
    /// node replaying its log): only `/healthz`, `/readyz` and `/metrics`
    /// answer until then.
    serving: AtomicBool,
}

impl AppState {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        commands: Commands,
        auth: Auth,
        push: Arc<PushHub>,
        presence: Arc<dyn Presence>,
        rate: RateLimits,
        mode: Mode,
        limits: Limits,
        node_id: String,
    ) -> AppState {
        let metrics = commands.metrics().clone();
        AppState { commands, auth, metrics, push, presence, rate, mode, limits, node_id, serving: AtomicBool::new(false) }
    }

    pub fn views(&self) -> &dyn ViewStore {
        self.commands.views()
    }

    pub fn counts(&self) -> &dyn CountStore {
        self.commands.counts()
    }

    pub fn is_serving(&self) -> bool {
        self.serving.load(Ordering::Acquire)
    }

    pub fn set_serving(&self, serving: bool) {
        self.serving.store(serving, Ordering::Release);
    }
}
