//! The embedded projector runtime: tails the local event log and gives
//! the events, in log order, to each projection (views, counts, fan-out)
//! through the shared policy ([`project`], [`project_batch`]).
//!
//! Each projection is kept where a restart finds it (`projections.redb`,
//! with the log position it reflects), so at start-up the tail feeds each
//! one only the events after that ([`FileTail::resume`],
//! [`FileTail::catch_up`]) before the node serves, then follows new
//! appends. Up to [`BATCH`] events at a time, each projection taking them
//! as one batch (one transaction); the fan-out works through its batch
//! strictly in log order (it tracks room membership as of each event). A
//! poison event is recorded in `parked.jsonl` beside the log
//! ([`ParkedFile`]) and skipped for that projection, so it cannot stall the
//! others, and applied again at the next start; "retry later" waits and
//! applies the event again.

use std::collections::HashSet;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use natter_events::Envelope;
use natter_projections::Projection;
use serde_json::json;
use tokio::sync::watch;

use super::{BatchNext, Next, Parking, project, project_batch};
use crate::log::file::FileLog;
use crate::log::{EventLog, LogError, ViewsProgress};
use crate::metrics::Metrics;

/// Events read and applied at once while catching up.
const BATCH: u64 = 256;

/// `parked.jsonl`: one JSON object per parked (projection, event).
pub struct ParkedFile {
    path: PathBuf,
    /// (projection, seq) already in the file: every start replays the log
    /// and meets the same poison events again; they are recorded once.
    recorded: Mutex<HashSet<(String, u64)>>,
}

impl ParkedFile {
    pub fn open(path: PathBuf) -> ParkedFile {
        let recorded = std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| Some((v["projection"].as_str()?.to_owned(), v["seq"].as_u64()?)))
            .collect();
        ParkedFile { path, recorded: Mutex::new(recorded) }
    }
}

#[async_trait]
impl Parking for ParkedFile {
    /// A line that cannot be written (full or read-only disk) is an
    /// error: the event is not skipped until it is recorded, since a
    /// restart applies again only the events recorded here.
    async fn park(&self, projection: &str, seq: u64, reason: &str, _payload: &[u8]) -> Result<bool, String> {
        if self.recorded.lock().expect("parked set lock").contains(&(projection.to_owned(), seq)) {
            return Ok(false);
        }
        let line = json!({ "projection": projection, "seq": seq, "reason": reason, "at": chrono::Utc::now() });
        let written = std::fs::OpenOptions::new().create(true).append(true).open(&self.path).and_then(|mut f| writeln!(f, "{line}"));
        match written {
            Ok(()) => {
                self.recorded.lock().expect("parked set lock").insert((projection.to_owned(), seq));
                Ok(true)
            }
            Err(e) => Err(format!("cannot write {}: {e}", self.path.display())),
        }
    }
}

impl ParkedFile {
    /// The (projection, seq) recorded, oldest first.
    fn recorded(&self) -> Vec<(String, u64)> {
        let mut all: Vec<_> = self.recorded.lock().expect("parked set lock").iter().cloned().collect();
        all.sort_by_key(|(_, seq)| *seq);
        all
    }
}

/// How far the tail has applied the log to every projection (the views'
/// applied floor of the embedded mode), and whether it is still following
/// the log. A command waits on it for the tail to apply what it appended,
/// instead of applying it a second time.
pub struct TailPosition(watch::Sender<Tail>);

#[derive(Clone, Copy)]
struct Tail {
    applied: u64,
    /// The tail stopped (the node is stopping): nothing more is applied.
    stopped: bool,
}

impl Default for TailPosition {
    fn default() -> Self {
        TailPosition(watch::Sender::new(Tail { applied: 0, stopped: false }))
    }
}

impl TailPosition {
    /// Every projection has applied the log through `seq` (never backwards).
    fn advance(&self, seq: u64) {
        crate::log::raise(&self.0, seq, |tail| &mut tail.applied);
    }

    /// The tail follows the log no more: waiting for it is over.
    fn stop(&self) {
        self.0.send_modify(|tail| tail.stopped = true);
    }
}

#[async_trait]
impl ViewsProgress for TailPosition {
    async fn applied_through(&self) -> Result<u64, LogError> {
        Ok(self.0.borrow().applied)
    }

    async fn reached(&self, seq: u64, within: Duration) -> bool {
        let mut tail = self.0.subscribe();
        match tokio::time::timeout(within, tail.wait_for(|t| t.applied >= seq || t.stopped)).await {
            Ok(Ok(t)) => t.applied >= seq,
            _ => false,
        }
    }
}

pub struct FileTail {
    log: Arc<FileLog>,
    projections: Vec<Arc<dyn Projection>>,
    /// Each projection's [`Projection::kept_through`] at start: it is fed
    /// the events after it only.
    kept: Vec<u64>,
    /// Turns true when the node stops: an event that cannot be applied
    /// (the stores are closing) is then left for the next start.
    stopping: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
    parked: ParkedFile,
    applied: Arc<TailPosition>,
}

impl FileTail {
    pub fn new(
        log: Arc<FileLog>,
        projections: Vec<Arc<dyn Projection>>,
        metrics: Arc<Metrics>,
        parked: ParkedFile,
        applied: Arc<TailPosition>,
        stopping: watch::Receiver<bool>,
    ) -> FileTail {
        FileTail { log, projections, kept: Vec::new(), stopping, metrics, parked, applied }
    }

    /// Waits `delay` before a retry; false if the node is stopping.
    async fn retry_after(&self, delay: Duration) -> bool {
        let mut stopping = self.stopping.clone();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stopping.wait_for(|stop| *stop) => {}
        }
        !*self.stopping.borrow()
    }

    /// Asks each projection how far it is kept (a store that cannot say
    /// is fed everything); returns the lowest: where the replay starts.
    pub async fn resume(&mut self) -> u64 {
        self.kept.clear();
        for p in &self.projections {
            let kept = p.kept_through().await.unwrap_or_else(|e| {
                tracing::warn!(projection = p.name(), error = %e, "cannot tell how far the projection is kept; replaying the whole log into it");
                0
            });
            self.kept.push(kept);
        }
        self.kept.iter().copied().min().unwrap_or(0)
    }

    /// Applies again, once, each parked event that its projection is kept
    /// past (the tail will not reach it): fixed since (a newer build, a
    /// store back), it is applied; still poison, it stays parked. Apply is
    /// idempotent. Order-free projections only: the fan-out's deliveries
    /// for it are past.
    pub async fn retry_parked(&self) {
        for (name, seq) in self.parked.recorded() {
            // The fan-out is not: its deliveries are past, and an old event
            // would set its room membership tables back.
            let Some(i) = self.projections.iter().position(|p| p.name() == name && !p.ordered()) else { continue };
            if self.kept.get(i).is_none_or(|&kept| seq > kept) {
                continue;
            }
            let event = match self.log.get(seq).await {
                Ok(logged) => Ok(logged.envelope),
                Err(LogError::Corrupt { source, .. }) => Err(source.to_string()),
                Err(e) => {
                    tracing::warn!(projection = name, seq, error = %e, "cannot read a parked event to apply it again");
                    continue;
                }
            };
            let p = &self.projections[i];
            let head = *self.log.watch_head().borrow();
            if let Next::RetryAfter(_) = project(p.as_ref(), &name, event.as_ref().map_err(Clone::clone), seq, &[], head - seq, &self.parked, &self.metrics).await {
                tracing::warn!(projection = name, seq, "a parked event could not be applied again now; it is tried at the next start");
            }
        }
    }

    /// Each projection with how far it is kept, for the start-up log line.
    pub fn kept(&self) -> String {
        self.projections.iter().zip(&self.kept).map(|(p, k)| format!("{} {k}", p.name())).collect::<Vec<_>>().join(", ")
    }

    /// The event at `seq` (or why it cannot be decoded); `None` if the node
    /// stopped while the file could not be read.
    async fn read(&self, seq: u64) -> Option<Result<Envelope, String>> {
        loop {
            match self.log.get(seq).await {
                Ok(logged) => return Some(Ok(logged.envelope)),
                Err(LogError::Corrupt { source, .. }) => return Some(Err(source.to_string())),
                Err(e) => {
                    // The file became unreadable: nothing sensible to skip to.
                    self.log.set_read_failure();
                    tracing::error!(seq, error = %e, "cannot read the event log; projections are stalled, retrying every second");
                    if !self.retry_after(Duration::from_secs(1)).await {
                        return None;
                    }
                }
            }
        }
    }

    /// The events `from..=to` (each, or why it cannot be decoded), read
    /// together; a read that fails goes event by event ([`FileTail::read`],
    /// which waits for the file to be readable). `None` if the node stopped
    /// meanwhile.
    async fn read_range(&self, from: u64, to: u64) -> Option<Vec<(u64, Result<Envelope, String>)>> {
        debug_assert!(from >= 1 && to >= from, "a range of the log: {from}..={to}");
        match self.log.read_many(from, to) {
            Ok(read) => {
                let events: Option<Vec<_>> = read
                    .into_iter()
                    .map(|logged| match logged {
                        Ok(logged) => Some((logged.log_seq, Ok(logged.envelope))),
                        Err(LogError::Corrupt { seq, source }) => Some((seq, Err(source.to_string()))),
                        Err(_) => None,
                    })
                    .collect();
                let whole = |events: &Vec<(u64, _)>| events.iter().map(|(seq, _)| *seq).eq(from..=to);
                if let Some(events) = events.filter(whole) {
                    return Some(events);
                }
            }
            Err(e) => tracing::warn!(from, to, error = %e, "cannot read a range of the event log at once; reading its events one by one"),
        }
        let mut events = Vec::new();
        for seq in from..=to {
            events.push((seq, self.read(seq).await?));
        }
        Some(events)
    }

    /// Applies the events `from..=to` to every projection (each from
    /// after where it is kept), as one batch (the views and counts in one
    /// transaction; the fan-out works through them in log order and
    /// stores their deliveries in one); a batch holding a poison event
    /// goes one event at a time.
    /// False if the node stopped first (then they may be applied in part:
    /// every projection applies an event again idempotently).
    async fn project_range(&self, from: u64, to: u64, head: u64) -> bool {
        let Some(events) = self.read_range(from, to).await else { return false };
        for (i, p) in self.projections.iter().enumerate() {
            let kept = self.kept.get(i).copied().unwrap_or(0);
            // Events are in log order: this projection's are a tail.
            let mine = &events[events.partition_point(|(seq, _)| *seq <= kept)..];
            if mine.len() > 1 && mine.iter().all(|(_, event)| event.is_ok()) {
                let batch: Vec<(&Envelope, u64)> = mine.iter().filter_map(|(seq, event)| Some((event.as_ref().ok()?, *seq))).collect();
                let applied = loop {
                    match project_batch(p.as_ref(), p.name(), &batch, head - to, &self.metrics).await {
                        BatchNext::Done => break true,
                        BatchNext::OneByOne => break false,
                        BatchNext::RetryAfter(delay) => {
                            if !self.retry_after(delay).await {
                                return false;
                            }
                        }
                    }
                };
                if applied {
                    continue;
                }
            }
            for (seq, event) in mine {
                while let Next::RetryAfter(delay) =
                    project(p.as_ref(), p.name(), event.as_ref().map_err(Clone::clone), *seq, &[], head - seq, &self.parked, &self.metrics).await
                {
                    if !self.retry_after(delay).await {
                        return false;
                    }
                }
            }
        }
        true
    }

    /// Applies every event on disk after `after` up to the log's head
    /// now (or until the node stops), [`BATCH`] at a time; returns the last
    /// sequence applied.
    pub async fn catch_up(&self, after: u64) -> u64 {
        // Every projection is kept through `after` at least.
        self.applied.advance(after);
        let head = *self.log.watch_head().borrow();
        let mut from = after + 1;
        while from <= head {
            let to = (from + BATCH - 1).min(head);
            if !self.project_range(from, to, head).await {
                return from - 1;
            }
            self.applied.advance(to);
            from = to + 1;
        }
        head.max(after)
    }

    /// Follows the log from `after` until `shutdown` turns true.
    pub async fn run(self, after: u64, shutdown: watch::Receiver<bool>) {
        /// Marks the tail stopped however `follow` ends (a panic too).
        struct Stopped(Arc<TailPosition>);
        impl Drop for Stopped {
            fn drop(&mut self) {
                self.0.stop();
            }
        }
        let _stopped = Stopped(self.applied.clone());
        self.follow(after, shutdown).await;
    }

    async fn follow(&self, mut after: u64, mut shutdown: watch::Receiver<bool>) {
        let mut appended = self.log.watch_head();
        loop {
            after = self.catch_up(after).await;
            if *shutdown.borrow() {
                return;
            }
            tokio::select! {
                changed = appended.wait_for(|head| *head > after) => if changed.is_err() { return },
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_command_waits_for_the_tail_to_pass_its_event_and_no_longer() {
        let tail = Arc::new(TailPosition::default());
        tail.advance(3);
        assert!(tail.reached(3, Duration::from_millis(1)).await, "already applied");
        assert!(!tail.reached(4, Duration::from_millis(50)).await, "not applied within the wait: the command applies it itself");
        let waiter = |seq| {
            let tail = tail.clone();
            tokio::spawn(async move { tail.reached(seq, Duration::from_secs(30)).await })
        };
        let waiting = waiter(5);
        tokio::task::yield_now().await; // it waits now
        tail.advance(4);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "not before the tail passes it");
        tail.advance(6);
        let woken = tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("woken as soon as the tail passes it");
        assert!(woken.unwrap());
        tail.advance(2);
        assert_eq!(tail.applied_through().await.unwrap(), 6, "never backwards");

        // A stopped tail applies nothing more: no command waits for it.
        let waiting = waiter(7);
        tokio::task::yield_now().await;
        tail.stop();
        let answered = tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("answered as soon as the tail stops");
        assert!(!answered.unwrap(), "not applied: the command applies it itself");
        assert!(!tail.reached(8, Duration::from_secs(30)).await);
    }
}
