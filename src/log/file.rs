//! The embedded event log: one append-only file in the data directory.
//!
//! Record: `[len: u32 LE][crc32 of body: u32 LE][body: len bytes]`, the body
//! a JSON object `{"seq", "msgId", "subject", "event"}` where `event` is the
//! stored envelope. On open the file is scanned: a record that is cut short
//! or fails its checksum can only be the tail of a write interrupted by a
//! crash (nothing was acknowledged for it), so the file is truncated there
//! and everything before it is kept.
//!
//! Appends are serialized by a lock and are acknowledged after the record is
//! written and, with [`SyncPolicy::Always`], fsynced. Optimistic concurrency
//! (expected last sequence of the subject) and command-id deduplication
//! (within the window) behave as JetStream's do.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_trait::async_trait;
use natter_events::{Envelope, StoredEvent};
use serde::{Deserialize, Serialize};

use super::{Appended, EventLog, LogError, Logged};

/// When an append reaches the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncPolicy {
    /// fsync before acknowledging: survives power loss.
    Always,
    /// Leave flushing to the OS: survives a process crash (`kill -9`), not
    /// a power loss; much faster.
    Os,
}

impl std::str::FromStr for SyncPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "always" => Ok(SyncPolicy::Always),
            "os" => Ok(SyncPolicy::Os),
            other => Err(format!("sync policy must be `always` or `os`, not {other:?}")),
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Record {
    seq: u64,
    msg_id: String,
    subject: String,
    event: StoredEvent,
}

struct State {
    file: std::fs::File,
    /// Byte offset of each record, by sequence - 1.
    offsets: Vec<u64>,
    end: u64,
    last_by_subject: BTreeMap<String, u64>,
    /// Command id → (sequence, when appended), for deduplication.
    recent: HashMap<String, (u64, Instant)>,
    /// The same command ids, oldest first, for pruning in O(expired).
    recent_order: VecDeque<(Instant, String)>,
}

pub struct FileLog {
    path: PathBuf,
    sync: SyncPolicy,
    dedup_window: Duration,
    state: Mutex<State>,
    /// The newest sequence, for tailing readers.
    head: tokio::sync::watch::Sender<u64>,
    /// The last write failed (disk full, I/O error): `/readyz` says so until
    /// one succeeds.
    failing: std::sync::atomic::AtomicBool,
}

const HEADER: u64 = 8;
/// A record larger than this is not one natter wrote: treat as corruption.
const MAX_RECORD: u32 = 16 * 1024 * 1024;

fn corrupt(path: &Path, e: impl std::fmt::Display) -> LogError {
    LogError::Unavailable(format!("event log {}: {e}", path.display()))
}

impl FileLog {
    /// Opens (or creates) the log in `dir`, cutting off a torn last record.
    pub fn open(dir: &Path, sync: SyncPolicy, dedup_window: Duration) -> anyhow::Result<FileLog> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating data directory {}", dir.display()))?;
        let path = dir.join("events.log");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .with_context(|| format!("opening event log {}", path.display()))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).with_context(|| format!("reading event log {}", path.display()))?;
        let (mut offsets, mut last_by_subject, mut recent, mut recent_order) = (Vec::new(), BTreeMap::new(), HashMap::new(), VecDeque::new());
        let opened = Instant::now();
        let mut pos = 0usize;
        while pos < bytes.len() {
            match Self::parse(&bytes[pos..]) {
                Some((record, size)) if record.seq == offsets.len() as u64 + 1 => {
                    offsets.push(pos as u64);
                    last_by_subject.insert(record.subject, record.seq);
                    recent_order.push_back((opened, record.msg_id.clone()));
                    recent.insert(record.msg_id, (record.seq, opened));
                    pos += size;
                }
                _ => break,
            }
        }
        if pos < bytes.len() && !Self::is_torn_tail(&bytes[pos..]) {
            anyhow::bail!(
                "event log {} is corrupt at byte {pos} of {} with records after it: not an interrupted write, \
                 so nothing is cut off automatically; restore the file from a backup (events 1..{} before it are intact)",
                path.display(),
                bytes.len(),
                offsets.len()
            );
        }
        if pos < bytes.len() {
            tracing::warn!(
                path = %path.display(), kept = offsets.len(), cut_bytes = bytes.len() - pos,
                "event log ends with a torn or corrupt record (an interrupted write); cutting it off"
            );
            file.set_len(pos as u64).with_context(|| format!("truncating event log {}", path.display()))?;
            file.sync_all()?;
        }
        let head = tokio::sync::watch::Sender::new(offsets.len() as u64);
        Ok(FileLog {
            path,
            sync,
            dedup_window,
            state: Mutex::new(State { file, offsets, end: pos as u64, last_by_subject, recent, recent_order }),
            head,
            failing: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Whether the unreadable bytes at the end are one record cut short or
    /// damaged in the last write (as opposed to corruption with records
    /// after it).
    fn is_torn_tail(rest: &[u8]) -> bool {
        if rest.len() < HEADER as usize {
            return true;
        }
        let len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
        // Cut short, or exactly the last record (its checksum or body failed).
        rest.len() <= HEADER as usize + len
    }

    /// One record from the start of `bytes`: the record and its size.
    fn parse(bytes: &[u8]) -> Option<(Record, usize)> {
        if bytes.len() < HEADER as usize {
            return None;
        }
        let len = u32::from_le_bytes(bytes[0..4].try_into().ok()?);
        let crc = u32::from_le_bytes(bytes[4..8].try_into().ok()?);
        if len > MAX_RECORD || bytes.len() < HEADER as usize + len as usize {
            return None;
        }
        let body = &bytes[HEADER as usize..HEADER as usize + len as usize];
        if crc32fast::hash(body) != crc {
            return None;
        }
        let record = serde_json::from_slice(body).ok()?;
        Some((record, HEADER as usize + len as usize))
    }

    fn read_at(&self, state: &mut State, seq: u64) -> Result<Logged, LogError> {
        let offset = *state.offsets.get((seq as usize).wrapping_sub(1)).ok_or_else(|| corrupt(&self.path, format!("no event {seq}")))?;
        let mut header = [0u8; HEADER as usize];
        state.file.seek(SeekFrom::Start(offset)).map_err(|e| corrupt(&self.path, e))?;
        state.file.read_exact(&mut header).map_err(|e| corrupt(&self.path, e))?;
        let len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) as usize;
        let mut record = vec![0u8; HEADER as usize + len];
        record[..HEADER as usize].copy_from_slice(&header);
        state.file.read_exact(&mut record[HEADER as usize..]).map_err(|e| corrupt(&self.path, e))?;
        let (record, _) = Self::parse(&record).ok_or_else(|| corrupt(&self.path, format!("event {seq} fails its checksum")))?;
        let envelope = Envelope::from_stored(record.event).map_err(|source| LogError::Corrupt { seq, source })?;
        Ok(Logged { log_seq: seq, envelope })
    }

    /// Where the log file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The newest sequence, updated after every append (for tailing).
    pub fn watch_head(&self) -> tokio::sync::watch::Receiver<u64> {
        self.head.subscribe()
    }

    /// Every event after `after`, in order (for projectors and migration).
    pub fn read_after(&self, after: u64, limit: usize) -> Result<Vec<Logged>, LogError> {
        let mut state = self.state.lock().expect("event log lock");
        let head = state.offsets.len() as u64;
        (after + 1..=head.min(after + limit as u64)).map(|seq| self.read_at(&mut state, seq)).collect()
    }
}

#[async_trait]
impl EventLog for FileLog {
    async fn last(&self, subject: &str) -> Result<Option<Logged>, LogError> {
        let mut state = self.state.lock().expect("event log lock");
        match state.last_by_subject.get(subject).copied() {
            Some(seq) => self.read_at(&mut state, seq).map(Some),
            None => Ok(None),
        }
    }

    async fn append(&self, env: &Envelope, expected_last: u64) -> Result<Appended, LogError> {
        // The write (and fsync) blocks: keep it off the async workers' backs
        // where the runtime allows it.
        let appended = if tokio::runtime::Handle::current().runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread {
            tokio::task::block_in_place(|| self.append_blocking(env, expected_last))
        } else {
            self.append_blocking(env, expected_last)
        };
        match &appended {
            Ok(_) => self.failing.store(false, std::sync::atomic::Ordering::Relaxed),
            Err(LogError::Unavailable(_)) => self.failing.store(true, std::sync::atomic::Ordering::Relaxed),
            Err(_) => {}
        }
        let appended = appended?;
        if !appended.duplicate {
            self.head.send_replace(appended.log_seq);
        }
        Ok(appended)
    }

    async fn get(&self, seq: u64) -> Result<Logged, LogError> {
        let mut state = self.state.lock().expect("event log lock");
        self.read_at(&mut state, seq)
    }

    async fn head(&self) -> Result<u64, LogError> {
        Ok(self.state.lock().expect("event log lock").offsets.len() as u64)
    }

    async fn subjects(&self, prefix: &str) -> Result<Vec<String>, LogError> {
        let state = self.state.lock().expect("event log lock");
        Ok(state
            .last_by_subject
            .range(prefix.to_owned()..)
            .map(|(subject, _)| subject)
            .take_while(|subject| subject.starts_with(prefix))
            .filter(|subject| !subject[prefix.len()..].contains('.'))
            .cloned()
            .collect())
    }

    async fn check(&self) -> Result<(), LogError> {
        if self.failing.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(corrupt(&self.path, "the last append could not be written (disk full? see the error logged with it)"));
        }
        Ok(())
    }
}

impl Drop for FileLog {
    /// With [`SyncPolicy::Os`], a clean stop still leaves everything on disk.
    fn drop(&mut self) {
        if self.sync == SyncPolicy::Os {
            if let Ok(state) = self.state.get_mut() {
                let _ = state.file.sync_all();
            }
        }
    }
}

impl FileLog {
    fn append_blocking(&self, env: &Envelope, expected_last: u64) -> Result<Appended, LogError> {
        let mut state = self.state.lock().expect("event log lock");
        let window = self.dedup_window;
        while state.recent_order.front().is_some_and(|(at, _)| at.elapsed() >= window) {
            if let Some((_, id)) = state.recent_order.pop_front() {
                state.recent.remove(&id);
            }
        }
        if let Some((seq, _)) = state.recent.get(&env.command_id) {
            return Ok(Appended { log_seq: *seq, duplicate: true });
        }
        if state.last_by_subject.get(&env.subject).copied().unwrap_or(0) != expected_last {
            return Err(LogError::Conflict);
        }
        let seq = state.offsets.len() as u64 + 1;
        let record = Record { seq, msg_id: env.command_id.clone(), subject: env.subject.clone(), event: env.to_stored() };
        let body = serde_json::to_vec(&record).map_err(|e| corrupt(&self.path, e))?;
        let mut bytes = Vec::with_capacity(HEADER as usize + body.len());
        bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        bytes.extend_from_slice(&body);
        let offset = state.end;
        let written = state.file.write_all(&bytes).and_then(|()| match self.sync {
            SyncPolicy::Always => state.file.sync_data(),
            SyncPolicy::Os => Ok(()),
        });
        if let Err(e) = written {
            // Leave no half record behind for the next append to follow.
            let _ = state.file.set_len(offset);
            tracing::error!(path = %self.path.display(), error = %e, "cannot write to the event log (disk full? read-only?); commands answer 503 until a write succeeds");
            return Err(corrupt(&self.path, format!("write failed: {e}")));
        }
        state.end += bytes.len() as u64;
        state.offsets.push(offset);
        state.last_by_subject.insert(env.subject.clone(), seq);
        let now = Instant::now();
        state.recent.insert(env.command_id.clone(), (seq, now));
        state.recent_order.push_back((now, env.command_id.clone()));
        Ok(Appended { log_seq: seq, duplicate: false })
    }
}

#[cfg(test)]
mod tests {
    use natter_events::{Event, UserRegistered};

    use super::*;

    fn env(cmd: &str, subject: &str, position: u64) -> Envelope {
        Envelope::new(cmd.into(), subject.into(), position, Event::UserRegistered(UserRegistered {
            user_id: cmd.into(),
            name: "n".into(),
            email: format!("{cmd}@x.io"),
            password_hash: "h".into(),
        }))
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("natter-filelog-{name}-{}", uuid::Uuid::new_v4().simple()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[tokio::test]
    async fn a_torn_tail_is_cut_off_and_everything_before_it_kept() {
        let d = dir("torn");
        {
            let log = FileLog::open(&d, SyncPolicy::Always, Duration::from_secs(60)).unwrap();
            log.append(&env("a", "s.a", 1), 0).await.unwrap();
            log.append(&env("b", "s.b", 1), 0).await.unwrap();
        }
        let path = d.join("events.log");
        let full = std::fs::read(&path).unwrap();
        // A third record cut in the middle, as a crash mid-write leaves it.
        {
            let log = FileLog::open(&d, SyncPolicy::Always, Duration::from_secs(60)).unwrap();
            log.append(&env("c", "s.c", 1), 0).await.unwrap();
        }
        let with_third = std::fs::read(&path).unwrap();
        std::fs::write(&path, &with_third[..full.len() + (with_third.len() - full.len()) / 2]).unwrap();
        let log = FileLog::open(&d, SyncPolicy::Always, Duration::from_secs(60)).unwrap();
        assert_eq!(log.head().await.unwrap(), 2);
        assert_eq!(std::fs::read(&path).unwrap(), full, "the torn bytes are gone");
        // and the log goes on from there
        assert_eq!(log.append(&env("c", "s.c", 1), 0).await.unwrap().log_seq, 3);
        // a flipped byte in the last record fails its checksum the same way
        drop(log);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 3;
        bytes[last] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let log = FileLog::open(&d, SyncPolicy::Os, Duration::from_secs(60)).unwrap();
        assert_eq!(log.head().await.unwrap(), 2);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[tokio::test]
    async fn corruption_before_the_end_is_refused_not_cut() {
        let d = dir("mid");
        {
            let log = FileLog::open(&d, SyncPolicy::Always, Duration::from_secs(60)).unwrap();
            for s in ["a", "b", "c"] {
                log.append(&env(s, &format!("s.{s}"), 1), 0).await.unwrap();
            }
        }
        let path = d.join("events.log");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[12] ^= 0xff; // inside the first record's body
        std::fs::write(&path, &bytes).unwrap();
        let err = FileLog::open(&d, SyncPolicy::Always, Duration::from_secs(60)).err().expect("refused");
        assert!(err.to_string().contains("corrupt at byte 0"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "nothing was cut");
        let _ = std::fs::remove_dir_all(&d);
    }
}
