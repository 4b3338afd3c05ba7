//! What every request handler and socket shares: the application state the
//! composition root ([`crate::startup`]) builds once per node. The HTTP and
//! Socket.IO layers depend on this type, never on how it was assembled.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

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
    /// [`Phase`] as a number: only `/healthz`, `/readyz` and `/metrics`
    /// answer while starting or draining.
    phase: AtomicU8,
}

/// Where a node is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// The projections are not far enough to serve yet (an embedded node
    /// replaying its log).
    Starting = 0,
    Serving = 1,
    /// Stopping (SIGTERM): readiness fails and new requests are refused with
    /// 503 so a load balancer sends them elsewhere, then sockets close.
    Draining = 2,
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
        AppState { commands, auth, metrics, push, presence, rate, mode, limits, node_id, phase: AtomicU8::new(Phase::Starting as u8) }
    }

    pub fn views(&self) -> &dyn ViewStore {
        self.commands.views()
    }

    pub fn counts(&self) -> &dyn CountStore {
        self.commands.counts()
    }

    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Starting,
            1 => Phase::Serving,
            _ => Phase::Draining,
        }
    }

    /// Serving, or back to starting (a node taken out of service). A
    /// draining node stays draining.
    pub fn set_serving(&self, serving: bool) {
        let to = if serving { Phase::Serving } else { Phase::Starting };
        let _ = self.phase.fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| (p != Phase::Draining as u8).then_some(to as u8));
    }

    pub fn start_draining(&self) {
        self.phase.store(Phase::Draining as u8, Ordering::Release);
    }
}
