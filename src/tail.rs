//! The embedded projector: tails the local event log and applies every
//! event, in log order, to each in-process projection (views, counts,
//! fan-out) before the next.
//!
//! In-process views start empty, so an embedded node replays its whole log
//! at start-up ([`Tail::catch_up`]) before it serves, then follows new
//! appends. One event at a time, every projection in turn, strictly in log
//! order (the fan-out relies on it to track room membership as of each
//! event). A poison event (undecodable, or
//! refused by a projection) is recorded in `parked.jsonl` beside the log,
//! counted, and skipped for that projection, so it cannot stall the others.

use std::io::Write;
use std::path::PathBuf;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use natter_projections::{ApplyError, Projection};
use serde_json::json;
use tokio::sync::watch;

use crate::log::file::FileLog;
use crate::log::{EventLog, LogError};
use crate::metrics::Metrics;

pub struct Tail {
    log: Arc<FileLog>,
    projections: Vec<Arc<dyn Projection>>,
    metrics: Arc<Metrics>,
    /// Where poison events are recorded (one JSON object per line).
    parked: PathBuf,
    /// (projection, seq) already in that file: every start replays the log
    /// and meets the same poison events again; they are recorded once.
    recorded: Mutex<HashSet<(String, u64)>>,
}

impl Tail {
    pub fn new(log: Arc<FileLog>, projections: Vec<Arc<dyn Projection>>, metrics: Arc<Metrics>, parked: PathBuf) -> Tail {
        let recorded = std::fs::read_to_string(&parked)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| Some((v["projection"].as_str()?.to_owned(), v["seq"].as_u64()?)))
            .collect();
        Tail { log, projections, metrics, parked, recorded: Mutex::new(recorded) }
    }

    fn park(&self, projection: &str, seq: u64, reason: &str) {
        self.metrics.projection_parked(projection);
        if !self.recorded.lock().expect("parked set lock").insert((projection.to_owned(), seq)) {
            tracing::warn!(projection, seq, %reason, "skipping an event parked at an earlier start (see parked.jsonl)");
            return;
        }
        tracing::error!(projection, seq, %reason, "parked a poison event; the projector goes on");
        let line = json!({ "projection": projection, "seq": seq, "reason": reason, "at": chrono::Utc::now() });
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.parked)
            .and_then(|mut f| writeln!(f, "{line}"));
        if let Err(e) = written {
            tracing::error!(path = %self.parked.display(), error = %e, "cannot record a parked event");
        }
    }

    /// Reads the event at `seq`, retrying while the file cannot be read;
    /// `None` for an event that cannot be decoded (parked).
    async fn read(&self, seq: u64) -> Option<natter_events::Envelope> {
        loop {
            match self.log.get(seq).await {
                Ok(logged) => return Some(logged.envelope),
                Err(LogError::Corrupt { source, .. }) => {
                    for p in &self.projections {
                        self.park(p.name(), seq, &source.to_string());
                    }
                    return None;
                }
                Err(e) => {
                    // The file became unreadable: nothing sensible to skip to.
                    self.log.set_read_failure();
                    tracing::error!(seq, error = %e, "cannot read the event log; projections are stalled, retrying every second");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Applies the event at `seq` to every projection.
    async fn project(&self, seq: u64, head: u64) {
        let Some(env) = self.read(seq).await else { return };
        for p in &self.projections {
            let name = p.name();
            loop {
                match p.apply_at(&env, seq).await {
                    Ok(()) => {
                        self.metrics.projection_applied(name);
                        break;
                    }
                    Err(ApplyError::Poison(reason)) => {
                        self.park(name, seq, &reason);
                        break;
                    }
                    Err(ApplyError::Unavailable(e)) => {
                        tracing::warn!(projection = name, seq, error = %e, "projection unavailable; retrying the event");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
            self.metrics.projection_lag(name, head - seq);
        }
    }

    /// Applies every acknowledged event after `after` up to the log's head
    /// now; returns the last sequence applied.
    pub async fn catch_up(&self, after: u64) -> u64 {
        let head = *self.log.watch_head().borrow();
        for seq in after + 1..=head {
            self.project(seq, head).await;
        }
        head.max(after)
    }

    /// Follows the log from `after` until `shutdown` turns true.
    pub async fn run(self, mut after: u64, mut shutdown: watch::Receiver<bool>) {
        let mut appended = self.log.watch_head();
        loop {
            after = self.catch_up(after).await;
            tokio::select! {
                changed = appended.wait_for(|head| *head > after) => if changed.is_err() { return },
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
        }
    }
}
