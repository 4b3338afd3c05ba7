//! Group commit for the embedded log under `NATTER_SYNC=always`.
//!
//! An append writes its record on the caller's thread (a `write` into the
//! page cache: microseconds) and tells this syncer, before anything can
//! cancel the append ([`Syncer::wrote`]); then it waits, without holding a
//! thread, until the record is on disk ([`Syncer::acknowledged`]). One
//! thread runs the fsyncs: each makes durable everything written when it
//! starts, so the appends waiting meanwhile share it, and it moves the
//! log's head (what tailing readers may read) past the records it made
//! durable, whether or not their appends are still waiting. Before, each
//! append handed its worker to another thread for the fsync
//! (`block_in_place`): a thread switch or two per append, and under bursts
//! dozens of threads, each keeping an allocator heap.
//!
//! A failed fsync stops the syncer for good: what the kernel put on disk is
//! unknown after one, so every append from then on is refused
//! ([`Syncer::failure`]) until natter restarts and re-reads the file.

use std::sync::{Arc, Condvar, Mutex};

use tokio::sync::watch;

/// The fsync thread of one log file; stopped (after the fsyncs asked for)
/// by [`Syncer::stop`] or when dropped.
pub(super) struct Syncer {
    shared: Arc<Shared>,
}

struct Shared {
    wanted: Mutex<Wanted>,
    wake: Condvar,
    /// The newest record known to be on disk; the reason once an fsync
    /// failed (or the thread died).
    durable: watch::Sender<Result<u64, String>>,
    /// The log's head, moved here once its records are on disk.
    head: Arc<watch::Sender<u64>>,
}

/// What the appends ask of the thread: the newest record written, and
/// where the file ends after it.
struct Wanted {
    seq: u64,
    end: u64,
    stop: bool,
}

impl Syncer {
    /// Starts the thread for `file` (a handle on the log), whose records up
    /// to `seq` (the file's first `end` bytes) are on disk already.
    pub(super) fn start(file: std::fs::File, seq: u64, end: u64, head: Arc<watch::Sender<u64>>) -> std::io::Result<Syncer> {
        let shared = Arc::new(Shared {
            wanted: Mutex::new(Wanted { seq, end, stop: false }),
            wake: Condvar::new(),
            durable: watch::Sender::new(Ok(seq)),
            head,
        });
        let running = shared.clone();
        std::thread::Builder::new().name("natter-log-fsync".into()).spawn(move || {
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&running, &file, end)));
            if ran.is_err() {
                running.durable.send_modify(|d| *d = Err("the event log's fsync thread failed: restart natter".into()));
            }
        })?;
        Ok(Syncer { shared })
    }

    /// Why records can no longer be made durable, if they cannot.
    pub(super) fn failure(&self) -> Option<String> {
        self.shared.durable.borrow().as_ref().err().cloned()
    }

    /// Record `seq`, ending the file at `end`, was just written: the thread
    /// makes it durable and moves the head past it, whatever becomes of the
    /// append that wrote it. Call with no await since the write.
    pub(super) fn wrote(&self, seq: u64, end: u64) {
        let mut wanted = lock(&self.shared.wanted);
        if seq > wanted.seq {
            (wanted.seq, wanted.end) = (seq, end);
            self.shared.wake.notify_one();
        }
    }

    /// Waits until record `seq` is on disk; the reason if it never will be.
    pub(super) async fn acknowledged(&self, seq: u64) -> Result<(), String> {
        let mut durable = self.shared.durable.subscribe();
        let state = durable.wait_for(|d| d.as_ref().map_or(true, |at| *at >= seq)).await;
        // The sender lives in `shared`, beside this receiver: never closed.
        state.map_or_else(|_| Err("the event log's fsync thread is gone".into()), |d| d.clone().map(|_| ()))
    }

    /// Makes durable what was written so far, then ends the thread.
    pub(super) fn stop(&self) {
        lock(&self.shared.wanted).stop = true;
        self.shared.wake.notify_one();
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn lock(wanted: &Mutex<Wanted>) -> std::sync::MutexGuard<'_, Wanted> {
    wanted.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The thread: fsyncs whenever a record written is not yet on disk, until
/// stopped with nothing left to sync or an fsync fails.
fn run(shared: &Shared, file: &std::fs::File, mut done: u64) {
    loop {
        let (seq, end) = {
            let mut wanted = lock(&shared.wanted);
            while wanted.end <= done && !wanted.stop {
                wanted = shared.wake.wait(wanted).unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            if wanted.end <= done {
                return; // stopped, nothing written since the last fsync
            }
            (wanted.seq, wanted.end)
        };
        // Every record written before this call is covered, through `seq`
        // at least (records are written in sequence order).
        if let Err(e) = file.sync_data() {
            shared.durable.send_modify(|d| *d = Err(format!("an fsync failed ({e}): restart natter")));
            return;
        }
        done = end;
        // The head first: an acknowledged append is visible to the tail.
        super::raise(&shared.head, seq, |head| head);
        shared.durable.send_modify(|d| {
            if let Ok(at) = d {
                *at = (*at).max(seq);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(10), f).await.expect(what)
    }

    #[tokio::test]
    async fn a_record_is_acknowledged_and_its_head_moved_once_synced_even_if_nobody_waits() {
        let path = std::env::temp_dir().join(format!("natter-syncer-{}", uuid::Uuid::new_v4().simple()));
        let file = std::fs::File::create(&path).unwrap();
        let head = Arc::new(watch::Sender::new(0));
        let syncer = Syncer::start(file.try_clone().unwrap(), 0, 0, head.clone()).unwrap();

        std::io::Write::write_all(&mut &file, b"one").unwrap();
        syncer.wrote(1, 3);
        within("acknowledged", syncer.acknowledged(1)).await.unwrap();
        assert_eq!(*head.borrow(), 1);

        // Nobody waits for records 2 and 3 (their appends were cancelled):
        // the head still moves past them, and one fsync covers both.
        std::io::Write::write_all(&mut &file, b"twothree").unwrap();
        syncer.wrote(3, 11);
        syncer.wrote(2, 6); // an earlier record told late changes nothing
        let mut moved = head.subscribe();
        within("the head moves", moved.wait_for(|h| *h == 3)).await.unwrap();
        within("acknowledged", syncer.acknowledged(2)).await.unwrap();
        assert_eq!(syncer.failure(), None);

        // Stopped, it still syncs what was written before.
        std::io::Write::write_all(&mut &file, b"four").unwrap();
        syncer.wrote(4, 15);
        syncer.stop();
        within("acknowledged", syncer.acknowledged(4)).await.unwrap();
        assert_eq!(*head.borrow(), 4);
        let _ = std::fs::remove_file(&path);
    }
}
