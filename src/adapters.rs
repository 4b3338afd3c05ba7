//! What a run mode connects: the one value the composition root
//! ([`crate::startup`]) builds a node from. [`crate::distributed`] and
//! [`crate::embedded`] each return one; nothing else differs between the
//! modes.

use std::sync::Arc;

use natter_projections::{CountStore, Projection, ViewStore};
use secrecy::SecretString;

use crate::config::Mode;
use crate::log::{EventLog, ViewsProgress};
use crate::presence::Presence;
use crate::projector::Runner;
use crate::push::PushBus;
use crate::ratelimit::Counter;

pub struct Adapters {
    pub mode: Mode,
    pub log: Arc<dyn EventLog>,
    pub views: Arc<dyn ViewStore>,
    pub counts: Arc<dyn CountStore>,
    /// `views` and `counts` again, as the projections that keep them (the
    /// root adds the push fan-out).
    pub projections: Vec<Arc<dyn Projection>>,
    /// How far `views` have applied the log (for recognising old retries).
    pub progress: Arc<dyn ViewsProgress>,
    pub bus: Arc<dyn PushBus>,
    pub presence: Arc<dyn Presence>,
    /// Rate-limit windows every node shares (login attempts, registrations).
    pub counter: Arc<dyn Counter>,
    /// Runs the projectors (views, counts and the push fan-out).
    pub runner: Box<dyn Runner>,
    /// The token secret the mode keeps for itself when none is configured
    /// (embedded: generated once into the data directory).
    pub stored_secret: Option<SecretString>,
    /// Runs once the HTTP server has drained (embedded: closes the log, so
    /// nothing still running can append after the data directory is
    /// released to a successor).
    pub after_drain: Box<dyn FnOnce() + Send>,
    /// Where the node's data lives, for the start-up log line.
    pub describe: String,
    /// Series the adapters keep themselves, added to `/metrics` (the
    /// distributed mode: its NATS connection).
    pub collectors: Vec<Box<dyn prometheus_client::collector::Collector>>,
}
