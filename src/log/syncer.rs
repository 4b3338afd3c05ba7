//! Group commit for the embedded log under `NATTER_SYNC=always`.
//!
//! An append writes its record on the caller's thread (a `write` into the
//! page cache: microseconds), then asks this syncer for the file to be on
//! disk up to the record's end and waits for it without holding a thread.
//! One thread runs the fsyncs: each makes durable everything written when
//! it starts, so the appends waiting meanwhile share it. Before, each
//! append handed its worker to another thread for the fsync
//! (`block_in_place`): a thread switch or two per append, and under bursts
//! dozens of threads, each keeping an allocator heap.
//!
//! A failed fsync stops the syncer for good: what the kernel put on disk is
//! unknown after one, so the log refuses appends until natter restarts.

use std::sync::{Arc, Condvar, Mutex};

use tokio::sync::watch;

/// The fsync thread of one log file; stopped (after the fsyncs asked for)
/// when dropped.
pub(super) struct Syncer {
    shared: Arc<Shared>,
}

struct Shared {
    wanted: Mutex<Wanted>,
    wake: Condvar,
    /// How far the file is known to be on disk; the reason once an fsync
    /// failed.
    synced: watch::Sender<Result<u64, String>>,
}

/// What the appends ask of the thread.
struct Wanted {
    /// The file's end the newest waiting append needs on disk.
    end: u64,
    stop: bool,
}

impl Syncer {
    /// Starts the thread for `file` (a handle on the log), whose first
    /// `synced` bytes are on disk already.
    pub(super) fn start(file: std::fs::File, synced: u64) -> std::io::Result<Syncer> {
        let shared = Arc::new(Shared {
            wanted: Mutex::new(Wanted { end: synced, stop: false }),
            wake: Condvar::new(),
            synced: watch::Sender::new(Ok(synced)),
        });
        let running = shared.clone();
        std::thread::Builder::new().name("natter-log-fsync".into()).spawn(move || run(&running, &file, synced))?;
        Ok(Syncer { shared })
    }

    /// Waits until the file is on disk up to `end`; the reason if it never
    /// will be (an fsync failed, or the log is closing).
    pub(super) async fn durable(&self, end: u64) -> Result<(), String> {
        let mut synced = self.shared.synced.subscribe();
        {
            let mut wanted = self.shared.wanted.lock().expect("log fsync lock");
            if wanted.stop {
                return Err("the log is closing".into());
            }
            if end > wanted.end {
                wanted.end = end;
                self.shared.wake.notify_one();
            }
        }
        match synced.wait_for(|s| s.as_ref().map_or(true, |at| *at >= end)).await {
            Ok(state) => state.clone().map(|_| ()),
            Err(_) => Err("the log's fsync thread is gone".into()),
        }
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.shared.wanted.lock().expect("log fsync lock").stop = true;
        self.shared.wake.notify_one();
    }
}

/// The thread: fsyncs whenever an append waits for more than is on disk,
/// until stopped with nothing left to sync or an fsync fails.
fn run(shared: &Shared, file: &std::fs::File, mut done: u64) {
    loop {
        let want = {
            let mut wanted = shared.wanted.lock().expect("log fsync lock");
            while wanted.end <= done && !wanted.stop {
                wanted = shared.wake.wait(wanted).expect("log fsync lock");
            }
            if wanted.end <= done {
                return; // stopped, nothing waiting
            }
            wanted.end
        };
        // Everything written before this call is covered: at least `want`.
        match file.sync_data() {
            Ok(()) => {
                done = want;
                shared.synced.send_modify(|s| *s = Ok(want));
            }
            Err(e) => {
                shared.synced.send_modify(|s| *s = Err(format!("fsync failed ({e}): restart natter")));
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn appends_wait_for_their_bytes_on_disk_and_a_stopped_syncer_takes_no_more() {
        let path = std::env::temp_dir().join(format!("natter-syncer-{}", uuid::Uuid::new_v4().simple()));
        let file = std::fs::File::create(&path).unwrap();
        let syncer = Syncer::start(file.try_clone().unwrap(), 0).unwrap();
        std::io::Write::write_all(&mut &file, b"one record").unwrap();
        syncer.durable(10).await.unwrap();
        assert_eq!(*syncer.shared.synced.borrow(), Ok(10));
        // Many appends waiting at once are all answered.
        std::io::Write::write_all(&mut &file, b"and more").unwrap();
        let waits: Vec<_> = (11..=18).map(|end| syncer.durable(end)).collect();
        for w in futures::future::join_all(waits).await {
            w.unwrap();
        }
        syncer.durable(5).await.expect("already on disk");
        let shared = syncer.shared.clone();
        drop(syncer);
        assert!(shared.wanted.lock().unwrap().stop);
        let stopped = Syncer { shared };
        assert!(stopped.durable(100).await.is_err(), "a closing log syncs no more");
        let _ = std::fs::remove_file(&path);
    }
}
