//! The embedded event log: one append-only file in the data directory (and
//! `events.idx`, where its records were at the last clean stop: see
//! `super::index`).
//!
//! Record: `[len: u32 LE][crc32 of body: u32 LE][body: len bytes]`, the body
//! a JSON object `{"seq", "msgId", "subject", "event"}` where `event` is the
//! stored envelope. On open the file is scanned (after the index, if one
//! describes it, only what follows the index): a record that is cut short
//! or fails its checksum can only be the tail of a write interrupted by a
//! crash (nothing was acknowledged for it), so the file is truncated there
//! and everything before it is kept.
//!
//! Damage is only cut when nothing valid follows it: if a checksum-valid
//! record exists anywhere after the first bad byte, the file was damaged in
//! the middle (not by an interrupted write) and opening is refused. Cut
//! bytes are kept beside the log in `events.log.cut-<unix time>`.
//!
//! Appends are written under a lock and acknowledged once on disk: with
//! [`SyncPolicy::Always`] after an fsync, which one thread runs outside the
//! lock so concurrent appends share one (group commit, `syncer.rs`).
//! Readers tailing the log, and a retry's search of a conversation
//! ([`EventLog::next_on`]), see an event only once it is on disk
//! ([`FileLog::watch_head`]), whether or not its append is still waiting.
//! Optimistic concurrency (expected last sequence of the subject) and
//! command-id deduplication (within the window) behave as JetStream's do.
//!
//! The log holds the data directory's lock (`lock`, an OS file lock released
//! with the process, however it ends) for as long as it is open: one
//! process per directory.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_trait::async_trait;
use natter_events::{Envelope, StoredEvent};
use serde::{Deserialize, Serialize};

use super::recent::Recent;
use super::syncer::Syncer;
use super::{Appended, EventLog, LogError, Logged};
use crate::config::SyncPolicy;

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Record {
    seq: u64,
    msg_id: String,
    /// The event's subject again: builds before 2026-11 need it to read the
    /// file at all (without it they would take the rest for a torn tail).
    /// Read as optional: two builds of 2026-11 did not write it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    subject: Option<String>,
    event: StoredEvent,
}

/// What opening the log reads of a record: its place and keys, not the
/// event's payload.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RecordHead<'a> {
    seq: u64,
    #[serde(borrow)]
    msg_id: std::borrow::Cow<'a, str>,
    #[serde(default, borrow)]
    subject: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    event: EventHead<'a>,
}

#[derive(Deserialize)]
struct EventHead<'a> {
    #[serde(borrow)]
    subject: std::borrow::Cow<'a, str>,
    at: chrono::DateTime<chrono::Utc>,
}

struct State {
    file: std::fs::File,
    /// Byte offset of each record, by sequence - 1.
    offsets: Vec<u64>,
    end: u64,
    /// Every event's sequence, by subject (the last is the subject's newest).
    by_subject: BTreeMap<String, Vec<u64>>,
    /// The command ids of the dedup window.
    recent: Recent,
    /// A write or fsync failed in a way that leaves the file's state
    /// unknown: no more appends until natter restarts and re-reads it.
    broken: Option<String>,
}

pub struct FileLog {
    path: PathBuf,
    sync: SyncPolicy,
    dedup_window: Duration,
    state: Mutex<State>,
    /// A second handle on the file, for fsyncs and range reads outside
    /// the state lock.
    sync_file: std::fs::File,
    /// With [`SyncPolicy::Always`], the thread whose fsyncs acknowledge
    /// appends.
    syncer: Option<Syncer>,
    /// The data directory's lock, held until the log is closed or dropped.
    dir_lock: Mutex<Option<std::fs::File>>,
    /// The newest sequence, for tailing readers.
    head: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
    /// The last write failed (disk full, I/O error): `/readyz` says so until
    /// one succeeds.
    failing: std::sync::atomic::AtomicBool,
    /// Whether appends write direct-conversation events in their compact
    /// form ([`FileLog::compact_events`]).
    compact: bool,
}

const HEADER: u64 = 8;
/// A record larger than this is not one natter wrote: treat as corruption.
const MAX_RECORD: u32 = 16 * 1024 * 1024;
/// Most bytes [`FileLog::read_many`] reads at once (a record bigger than
/// this is read alone).
const READ_CHUNK: u64 = 1 << 20;

fn corrupt(path: &Path, e: impl std::fmt::Display) -> LogError {
    LogError::Unavailable(format!("event log {}: {e}", path.display()))
}

impl FileLog {
    /// Opens (or creates) the log in `dir`, cutting off a torn last record.
    /// Blocks (file I/O, and up to a few seconds for the directory lock).
    pub fn open(dir: &Path, sync: SyncPolicy, dedup_window: Duration) -> anyhow::Result<FileLog> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating data directory {}", dir.display()))?;
        let dir_lock = lock_dir(dir)?;
        let path = dir.join("events.log");
        let created = !path.exists();
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .with_context(|| format!("opening event log {}", path.display()))?;
        if created {
            // Make the new file's name durable too.
            std::fs::File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("syncing data directory {}", dir.display()))?;
        }
        let (mut offsets, mut by_subject, mut recent) = (Vec::new(), BTreeMap::<String, Vec<u64>>::new(), Recent::new(dedup_window, None));
        let (opened, now) = (Instant::now(), chrono::Utc::now());
        let (mut pos, mut body) = (0u64, Vec::new());
        // Where the records were at the last clean stop (events.idx): only
        // those appended since are read; the command ids still inside the
        // dedup window come with the index.
        let len = file.metadata().with_context(|| format!("reading event log {}", path.display()))?.len();
        if let Some(ix) = super::index::read(&dir.join("events.idx")) {
            if Self::index_fits(&file, &ix, len) {
                (offsets, by_subject, pos) = (ix.offsets.into_owned(), ix.by_subject.into_owned(), ix.end);
                let kept = Recent::new(dedup_window, Some(ix.secret));
                if kept.key(Recent::PROBE) == ix.probe && dedup_window.as_millis() <= u128::from(ix.window_ms) {
                    recent = kept;
                    for (key, seq, at_ms) in ix.recent {
                        let age = Duration::from_millis(now.timestamp_millis().saturating_sub(at_ms).max(0) as u64);
                        let Some(at) = opened.checked_sub(age).filter(|_| age < dedup_window) else { continue };
                        recent.push_newest(key, seq, at);
                    }
                } else {
                    // A longer window than the index covers, or keys made
                    // otherwise (another build's hash): read the window's
                    // records back.
                    for (i, &offset) in offsets.iter().enumerate().rev() {
                        let head = Self::body_at(&file, offset, &mut body).and_then(|()| serde_json::from_slice::<RecordHead<'_>>(&body).ok());
                        let Some(head) = head else { break };
                        let age = (now - head.event.at).to_std().unwrap_or_default();
                        let Some(at) = opened.checked_sub(age).filter(|_| age < dedup_window) else { break };
                        recent.push_oldest(recent.key(&head.msg_id), i as u64 + 1, at);
                    }
                }
            } else {
                tracing::warn!(path = %path.display(), "events.idx does not describe this events.log (replaced, restored or cut?); reading the whole log");
                let _ = std::fs::remove_file(dir.join("events.idx"));
            }
        }
        // Streamed, each record's header fields only (the event's payload
        // is skipped, not decoded): a long log opens without holding it
        // in memory.
        let mut reader = std::io::BufReader::with_capacity(1 << 20, &file);
        reader.seek(SeekFrom::Start(pos)).with_context(|| format!("reading event log {}", path.display()))?;
        while Self::next_head(&mut reader, &mut body).is_some() {
            let Ok(head) = serde_json::from_slice::<RecordHead<'_>>(&body) else { break };
            if head.seq != offsets.len() as u64 + 1 {
                break;
            }
            offsets.push(pos);
            // Only the command ids still inside the dedup window (by the
            // event's time) are remembered: a long log's ids would
            // otherwise all sit in memory for a window.
            let age = (now - head.event.at).to_std().unwrap_or_default();
            if age < dedup_window
                && let Some(at) = opened.checked_sub(age)
            {
                recent.push_newest(recent.key(&head.msg_id), head.seq, at);
            }
            let subject = head.subject.unwrap_or(head.event.subject);
            match by_subject.get_mut(subject.as_ref()) {
                Some(seqs) => seqs.push(head.seq),
                None => {
                    by_subject.insert(subject.into_owned(), vec![head.seq]);
                }
            }
            pos += HEADER + body.len() as u64;
        }
        drop(reader);
        if pos < len {
            // What follows the last whole record: a torn write, or damage.
            let mut rest = Vec::new();
            file.seek(SeekFrom::Start(pos)).and_then(|_| file.read_to_end(&mut rest)).with_context(|| format!("reading event log {}", path.display()))?;
            if let Some(valid) = Self::valid_record_after(&rest, 0) {
                anyhow::bail!(
                    "event log {} is corrupt at byte {pos} of {len}, and a valid record follows at byte {}: this is damage \
                     in the middle of the file, not an interrupted write, so nothing is cut off automatically. Restore \
                     events.log from a backup (events 1..{} before the damage are intact)",
                    path.display(),
                    pos + valid as u64,
                    offsets.len()
                );
            }
            let keep = dir.join(format!("events.log.cut-{}", chrono::Utc::now().timestamp()));
            std::fs::write(&keep, &rest).with_context(|| format!("saving the torn tail to {}", keep.display()))?;
            tracing::warn!(
                path = %path.display(), kept_events = offsets.len(), cut_bytes = rest.len(), saved_to = %keep.display(),
                "event log ends with a torn or damaged record (an interrupted write); cutting it off"
            );
            file.set_len(pos).with_context(|| format!("truncating event log {}", path.display()))?;
            file.sync_all().with_context(|| format!("syncing event log {} after truncating it", path.display()))?;
        }
        let head = std::sync::Arc::new(tokio::sync::watch::Sender::new(offsets.len() as u64));
        let sync_file = file.try_clone().with_context(|| format!("opening event log {}", path.display()))?;
        let syncer = match sync {
            SyncPolicy::Always => Some(
                Syncer::start(sync_file.try_clone()?, offsets.len() as u64, pos, head.clone())
                    .with_context(|| format!("starting the fsync thread of {}", path.display()))?,
            ),
            SyncPolicy::Os => None,
        };
        Ok(FileLog {
            path,
            sync,
            dedup_window,
            state: Mutex::new(State { file, offsets, end: pos, by_subject, recent, broken: None }),
            sync_file,
            syncer,
            dir_lock: Mutex::new(Some(dir_lock)),
            head,
            failing: std::sync::atomic::AtomicBool::new(false),
            compact: true,
        })
    }

    /// Appends write direct-conversation events in their compact form
    /// (`true`, the default) or in the full one, which a build without the
    /// compact forms can still read (before a downgrade).
    pub fn compact_events(mut self, compact: bool) -> Self {
        self.compact = compact;
        self
    }

    /// Reads a record's header and body through `read` (which fills each
    /// buffer from where the last one ended) into `body`, if it is whole
    /// and its checksum holds (else `None`: the end, or a torn or damaged
    /// record).
    fn read_body(mut read: impl FnMut(&mut [u8]) -> std::io::Result<()>, body: &mut Vec<u8>) -> Option<()> {
        let mut header = [0u8; HEADER as usize];
        read(&mut header).ok()?;
        let len = u32::from_le_bytes(header[0..4].try_into().ok()?);
        let crc = u32::from_le_bytes(header[4..8].try_into().ok()?);
        if len > MAX_RECORD {
            return None;
        }
        body.resize(len as usize, 0);
        read(body).ok()?;
        (crc32fast::hash(body) == crc).then_some(())
    }

    /// Reads the next record of `reader` into `body` ([`FileLog::read_body`]).
    fn next_head(reader: &mut impl Read, body: &mut Vec<u8>) -> Option<()> {
        Self::read_body(|buf| reader.read_exact(buf), body)
    }

    /// Reads the record at `offset` into `body` ([`FileLog::read_body`]).
    fn body_at(file: &std::fs::File, offset: u64, body: &mut Vec<u8>) -> Option<()> {
        use std::os::unix::fs::FileExt;
        let mut at = offset;
        Self::read_body(
            |buf| {
                file.read_exact_at(buf, at)?;
                at += buf.len() as u64;
                Ok(())
            },
            body,
        )
    }

    /// Whether `ix` describes this file: its last record is where it says,
    /// whole, with its sequence and command id, and ends where it says.
    fn index_fits(file: &std::fs::File, ix: &super::index::Index, len: u64) -> bool {
        let Some(&last) = ix.offsets.last() else { return false };
        let mut body = Vec::new();
        if ix.end > len || Self::body_at(file, last, &mut body).is_none() || last + HEADER + body.len() as u64 != ix.end {
            return false;
        }
        serde_json::from_slice::<RecordHead<'_>>(&body).is_ok_and(|h| h.seq == ix.offsets.len() as u64 && h.msg_id == ix.last_id)
    }

    /// Where, after the unreadable byte at `from`, a checksum-valid record
    /// starts (records are JSON objects beginning `{"seq":`), if anywhere.
    fn valid_record_after(bytes: &[u8], from: usize) -> Option<usize> {
        const START: &[u8] = b"{\"seq\":";
        let mut at = from + 1;
        while at + START.len() <= bytes.len() {
            let found = bytes[at..].windows(START.len()).position(|w| w == START)?;
            let body = at + found;
            if body >= from + HEADER as usize && Self::parse(&bytes[body - HEADER as usize..]).is_some() {
                return Some(body - HEADER as usize);
            }
            at = body + 1;
        }
        None
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

    /// Where record `seq` lies in the file: records are back to back, so
    /// it ends where the next begins (the last one, where the file's
    /// written part ends).
    fn span(&self, state: &State, seq: u64) -> Result<(u64, u64), LogError> {
        let i = (seq as usize).wrapping_sub(1);
        let start = *state.offsets.get(i).ok_or_else(|| corrupt(&self.path, format!("no event {seq}")))?;
        let end = state.offsets.get(i + 1).copied().unwrap_or(state.end);
        if end <= start || end - start > HEADER + MAX_RECORD as u64 {
            // The index said where records are, wrongly.
            return Err(self.damaged(state, format!("event {seq} has no valid extent")));
        }
        Ok((start, end))
    }

    /// The event `seq` from its record's bytes; `Err(None)`: the record
    /// is damaged (see [`FileLog::damaged`]).
    fn decode(seq: u64, bytes: &[u8]) -> Result<Logged, Option<LogError>> {
        let (record, _) = Self::parse(bytes).filter(|(_, size)| *size == bytes.len()).ok_or(None)?;
        let envelope = Envelope::from_stored(record.event).map_err(|source| LogError::Corrupt { seq, source })?;
        Ok(Logged { log_seq: seq, envelope })
    }

    /// A record found damaged (`why`): the next start scans the whole
    /// file (and names the damage) instead of trusting the index over it.
    /// Called holding the state lock, so that `close` cannot write the
    /// index again after this removed it.
    fn damaged(&self, _state: &State, why: String) -> LogError {
        let _ = std::fs::remove_file(self.index_path());
        self.set_read_failure();
        corrupt(&self.path, why)
    }

    /// One event, in one read of its record.
    fn read_at(&self, state: &State, seq: u64) -> Result<Logged, LogError> {
        use std::os::unix::fs::FileExt;
        let (start, end) = self.span(state, seq)?;
        let mut bytes = vec![0u8; (end - start) as usize];
        state.file.read_exact_at(&mut bytes, start).map_err(|e| corrupt(&self.path, e))?;
        Self::decode(seq, &bytes).map_err(|e| e.unwrap_or_else(|| self.damaged(state, format!("event {seq} fails its checksum"))))
    }

    /// The events `from..=to` (those there are), read [`READ_CHUNK`] bytes
    /// at a time rather than a read per event. The outer error is a read
    /// that failed; each event's own is why it cannot be decoded.
    pub fn read_many(&self, from: u64, to: u64) -> Result<Vec<Result<Logged, LogError>>, LogError> {
        self.read_range(from, to, false)
    }

    /// [`FileLog::read_many`]; with `first_error_ends`, nothing after the
    /// first event that fails is read. The extents are taken under the
    /// lock, the bytes read outside it (appends go on meanwhile): what
    /// lies below the written end never changes while the log is open
    /// (appends go after it, and a failed one is cut back to it).
    fn read_range(&self, from: u64, to: u64, first_error_ends: bool) -> Result<Vec<Result<Logged, LogError>>, LogError> {
        use std::os::unix::fs::FileExt;
        let from = from.max(1);
        let spans: Vec<(u64, u64)> = {
            let state = self.state.lock().expect("event log lock");
            let to = to.min(state.offsets.len() as u64);
            (from..=to).map(|seq| self.span(&state, seq)).collect::<Result<_, _>>()?
        };
        let mut out = Vec::with_capacity(spans.len());
        let mut i = 0;
        while i < spans.len() {
            // A chunk: this record, and the ones after it that fit.
            let start = spans[i].0;
            let mut last = i;
            while last + 1 < spans.len() && spans[last + 1].1 - start <= READ_CHUNK {
                last += 1;
            }
            let mut bytes = vec![0u8; (spans[last].1 - start) as usize];
            self.sync_file.read_exact_at(&mut bytes, start).map_err(|e| corrupt(&self.path, e))?;
            for (seq, (a, b)) in (from + i as u64..).zip(&spans[i..=last]) {
                let event = Self::decode(seq, &bytes[(a - start) as usize..(b - start) as usize])
                    .map_err(|e| e.unwrap_or_else(|| self.damaged(&self.state.lock().expect("event log lock"), format!("event {seq} fails its checksum"))));
                let failed = event.is_err();
                out.push(event);
                if failed && first_error_ends {
                    return Ok(out);
                }
            }
            i = last + 1;
        }
        Ok(out)
    }

    /// Where the log file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The newest sequence on disk (for tailing: an event is visible here
    /// only once it is; with [`SyncPolicy::Always`] the fsync thread moves
    /// it, for every record it made durable).
    pub fn watch_head(&self) -> tokio::sync::watch::Receiver<u64> {
        self.head.subscribe()
    }

    /// Closes the log for appends (they are refused from now on), flushes it
    /// and releases the data directory: another process may open it at once.
    pub fn close(&self) {
        let mut state = self.state.lock().expect("event log lock");
        let fresh = state.broken.is_none() && !self.failing.load(std::sync::atomic::Ordering::Relaxed);
        state.broken = Some("the node is stopping".into());
        if let Err(e) = state.file.sync_all() {
            tracing::error!(path = %self.path.display(), error = %e, "event log fsync at close failed");
        } else if fresh && !state.offsets.is_empty() {
            // The next open reads this instead of the whole log.
            let mut body = Vec::new();
            let last = *state.offsets.last().expect("not empty");
            let last_id = Self::body_at(&state.file, last, &mut body)
                .and_then(|()| serde_json::from_slice::<RecordHead<'_>>(&body).ok().map(|h| h.msg_id.into_owned()))
                .ok_or_else(|| "the last record does not read back".to_owned());
            let now_ms = chrono::Utc::now().timestamp_millis();
            let recent = state.recent.entries().map(|(key, seq, age)| (key, seq, now_ms - age.as_millis() as i64)).collect();
            let written = last_id.and_then(|last_id| {
                let index = super::index::Index {
                    end: state.end,
                    last_id,
                    offsets: state.offsets.as_slice().into(),
                    by_subject: std::borrow::Cow::Borrowed(&state.by_subject),
                    recent,
                    window_ms: u64::try_from(self.dedup_window.as_millis()).unwrap_or(u64::MAX),
                    secret: state.recent.secret(),
                    probe: state.recent.key(Recent::PROBE),
                };
                super::index::write(&self.index_path(), &index).map_err(|e| e.to_string())
            });
            if let Err(e) = written {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot write events.idx; the next start reads the whole log");
            }
        }
        if let Some(syncer) = &self.syncer {
            syncer.stop();
        }
        drop(self.dir_lock.lock().expect("data directory lock").take());
    }

    /// Syncs every append so far to disk (with [`SyncPolicy::Os`], appends
    /// are acknowledged before it).
    pub fn sync_to_disk(&self) -> std::io::Result<()> {
        self.sync_file.sync_data().inspect_err(|e| {
            // What is on disk is unknown (a failed writeback is reported
            // once): no more appends, and no index written at close.
            tracing::error!(path = %self.path.display(), error = %e, "event log fsync failed; refusing appends until restarted");
            self.state.lock().expect("event log lock").broken = Some(format!("an fsync failed ({e}): restart natter"));
            self.failing.store(true, std::sync::atomic::Ordering::Relaxed);
        })
    }

    /// Marks the log as failing for `/readyz` (a reader found it damaged).
    pub fn set_read_failure(&self) {
        self.failing.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Where the index of this log is.
    fn index_path(&self) -> PathBuf {
        self.path.with_file_name("events.idx")
    }

    /// Every event after `after`, in order (for projectors and migration).
    pub fn read_after(&self, after: u64, limit: usize) -> Result<Vec<Logged>, LogError> {
        self.read_range(after + 1, after.saturating_add(limit as u64), true)?.into_iter().collect()
    }
}

#[async_trait]
impl EventLog for FileLog {
    async fn last(&self, subject: &str) -> Result<Option<Logged>, LogError> {
        let mut state = self.state.lock().expect("event log lock");
        match state.by_subject.get(subject).and_then(|seqs| seqs.last()).copied() {
            Some(seq) => self.read_at(&mut state, seq).map(Some),
            None => Ok(None),
        }
    }

    async fn append(&self, env: &Envelope, expected_last: u64) -> Result<Appended, LogError> {
        let appended = self.append_durably(env, expected_last).await;
        match &appended {
            Ok(_) => self.failing.store(false, std::sync::atomic::Ordering::Relaxed),
            Err(LogError::Unavailable(_)) => self.failing.store(true, std::sync::atomic::Ordering::Relaxed),
            Err(_) => {}
        }
        appended
    }

    async fn get(&self, seq: u64) -> Result<Logged, LogError> {
        let mut state = self.state.lock().expect("event log lock");
        self.read_at(&mut state, seq)
    }

    async fn head(&self) -> Result<u64, LogError> {
        Ok(self.state.lock().expect("event log lock").offsets.len() as u64)
    }

    async fn last_before(&self, subject: &str, before: u64) -> Result<Option<Logged>, LogError> {
        let mut state = self.state.lock().expect("event log lock");
        let seqs = state.by_subject.get(subject).map(|seqs| seqs.as_slice()).unwrap_or_default();
        match seqs.partition_point(|&s| s < before).checked_sub(1).map(|i| seqs[i]) {
            Some(seq) => self.read_at(&mut state, seq).map(Some),
            None => Ok(None),
        }
    }

    async fn subjects_matching(&self, filter: &str) -> Result<Vec<String>, LogError> {
        let state = self.state.lock().expect("event log lock");
        let wanted: Vec<&str> = filter.split('.').collect();
        let matches = |subject: &str| {
            let tokens: Vec<&str> = subject.split('.').collect();
            tokens.len() == wanted.len() && tokens.iter().zip(&wanted).all(|(t, w)| *w == "*" || t == w)
        };
        Ok(state.by_subject.keys().filter(|s| matches(s)).cloned().collect())
    }

    async fn history(&self, subject: &str, before: u64) -> Result<Vec<Logged>, LogError> {
        let mut state = self.state.lock().expect("event log lock");
        let seqs: Vec<u64> = state.by_subject.get(subject).map(|seqs| seqs.iter().copied().take_while(|&s| s < before).collect()).unwrap_or_default();
        seqs.into_iter().map(|seq| self.read_at(&mut state, seq)).collect()
    }

    async fn subjects(&self, prefix: &str) -> Result<Vec<String>, LogError> {
        let state = self.state.lock().expect("event log lock");
        Ok(state
            .by_subject
            .range(prefix.to_owned()..)
            .map(|(subject, _)| subject)
            .take_while(|subject| subject.starts_with(prefix))
            .filter(|subject| !subject[prefix.len()..].contains('.'))
            .cloned()
            .collect())
    }

    /// Only what is on disk: a retry's search must not adopt an original
    /// whose fsync may yet fail (JetStream's reads see acknowledged
    /// messages only, too). The retry's append then meets it in the dedup
    /// window and waits for it.
    async fn next_on(&self, subject: &str, from: u64) -> Result<Option<Logged>, LogError> {
        let head = *self.head.borrow();
        let mut state = self.state.lock().expect("event log lock");
        let next = state.by_subject.get(subject).and_then(|seqs| seqs.get(seqs.partition_point(|&s| s < from)).copied());
        next.filter(|&seq| seq <= head).map(|seq| self.read_at(&mut state, seq)).transpose()
    }

    async fn next_under(&self, prefix: &str, from: u64) -> Result<Option<Logged>, LogError> {
        let mut state = self.state.lock().expect("event log lock");
        let next = state
            .by_subject
            .range(prefix.to_owned()..)
            .take_while(|(subject, _)| subject.starts_with(prefix))
            .filter(|(subject, _)| !subject[prefix.len()..].contains('.'))
            .filter_map(|(_, seqs)| seqs.get(seqs.partition_point(|&s| s < from)).copied())
            .min();
        next.map(|seq| self.read_at(&mut state, seq)).transpose()
    }

    fn dedup_window(&self) -> Duration {
        self.dedup_window
    }

    async fn check(&self) -> Result<(), LogError> {
        if let Some(why) = &self.state.lock().expect("event log lock").broken {
            return Err(corrupt(&self.path, why));
        }
        if self.failing.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(corrupt(&self.path, "the event log could not be written or read (disk full? damaged? see the errors logged)"));
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
    /// Writes the record (on the caller's thread: a write into the page
    /// cache takes microseconds) and, with [`SyncPolicy::Always`], waits
    /// for the fsync thread to have it on disk before acknowledging it (a
    /// duplicate's original too: it may have been written just now).
    async fn append_durably(&self, env: &Envelope, expected_last: u64) -> Result<Appended, LogError> {
        let appended = self.write_record(env, expected_last)?;
        if let Some(syncer) = &self.syncer
            && let Err(why) = syncer.acknowledged(appended.log_seq).await
        {
            return Err(self.stop_appending(why));
        }
        Ok(appended)
    }

    /// After a failed fsync the kernel's view of the file is unknown (and
    /// other appends may follow ours): appends are refused from now on; a
    /// restart re-reads what is really there.
    fn stop_appending(&self, why: String) -> LogError {
        let mut state = self.state.lock().expect("event log lock");
        if state.broken.is_none() {
            tracing::error!(path = %self.path.display(), reason = %why, "event log fsync failed; refusing appends until restarted");
            state.broken = Some(why.clone());
        }
        corrupt(&self.path, why)
    }

    /// Writes `env` at the end of the file, unless its command id is in the
    /// window (the original's sequence) or its subject moved on.
    fn write_record(&self, env: &Envelope, expected_last: u64) -> Result<Appended, LogError> {
        if let Some(why) = self.syncer.as_ref().and_then(Syncer::failure) {
            return Err(self.stop_appending(why));
        }
        let mut state = self.state.lock().expect("event log lock");
        if let Some(why) = &state.broken {
            return Err(corrupt(&self.path, why));
        }
        state.recent.expire();
        for seq in state.recent.candidates(&env.command_id) {
            // The key matches: the event it names tells whether the id
            // does (a damaged record is reported as any read of it is).
            if self.read_at(&mut state, seq)?.envelope.command_id == env.command_id {
                return Ok(Appended { log_seq: seq, duplicate: true });
            }
        }
        if state.by_subject.get(&env.subject).and_then(|seqs| seqs.last()).copied().unwrap_or(0) != expected_last {
            return Err(LogError::Conflict);
        }
        let seq = state.offsets.len() as u64 + 1;
        let record = Record { seq, msg_id: env.command_id.clone(), subject: Some(env.subject.clone()), event: env.to_stored_as(self.compact) };
        let body = serde_json::to_vec(&record).map_err(|e| corrupt(&self.path, e))?;
        if body.len() > MAX_RECORD as usize {
            // Refused before it is written: it could not be read back.
            return Err(LogError::TooLarge(format!(
                "an event of {} bytes is larger than the embedded log's records ({MAX_RECORD} bytes); are NATTER_MAX_MESSAGE_CHARS and NATTER_MAX_BODY_BYTES far above their defaults?",
                body.len()
            )));
        }
        let mut bytes = Vec::with_capacity(HEADER as usize + body.len());
        bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        bytes.extend_from_slice(&body);
        let offset = state.end;
        if let Err(e) = state.file.write_all(&bytes) {
            // Leave no half record behind for the next append to follow.
            tracing::error!(path = %self.path.display(), error = %e, "cannot write to the event log (disk full? read-only?); commands answer 503 until a write succeeds");
            if let Err(cut) = state.file.set_len(offset) {
                state.broken = Some(format!("a failed write could not be undone ({cut}): restart natter"));
                tracing::error!(path = %self.path.display(), error = %cut, "cannot undo a failed write; refusing appends until restarted");
            }
            return Err(corrupt(&self.path, format!("write failed: {e}")));
        }
        state.end += bytes.len() as u64;
        state.offsets.push(offset);
        state.by_subject.entry(env.subject.clone()).or_default().push(seq);
        let key = state.recent.key(&env.command_id);
        state.recent.push_newest(key, seq, Instant::now());
        // Acknowledged (tailing readers may see it) once on disk: at once,
        // or by the fsync thread, whatever becomes of this append's caller
        // (nothing can cancel it between the write and this).
        match &self.syncer {
            Some(syncer) => syncer.wrote(seq, state.end),
            None => super::raise(&self.head, seq, |head| head),
        }
        Ok(Appended { log_seq: seq, duplicate: false })
    }
}

/// Takes the data directory's lock (`dir/lock`). A node that is just
/// stopping, or a process being spawned (which holds a copy of the
/// descriptor for an instant), releases it shortly: wait a little.
fn lock_dir(dir: &Path) -> anyhow::Result<std::fs::File> {
    const WAIT: Duration = Duration::from_secs(3);
    let path = dir.join("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let deadline = Instant::now() + WAIT;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
                "another natter process is using the data directory {} (one embedded node per directory; \
                 stop it, or set NATTER_DATA_DIR to another directory)",
                dir.display()
            ),
            Err(std::fs::TryLockError::Error(e)) => return Err(e).with_context(|| format!("locking {}", path.display())),
        }
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

    /// Reading a range reads the events appended (in chunks, a record
    /// bigger than a chunk alone), as reading each does, after a reopen
    /// through the index and through a scan too; it stops at the head and
    /// names a record that fails its checksum among the others.
    #[tokio::test]
    async fn a_range_reads_as_each_event_does() {
        let d = dir("range");
        let big = "x".repeat(READ_CHUNK as usize + 1000);
        let names = ["a", "b", big.as_str(), "c", "d", "e"];
        {
            let log = FileLog::open(&d, SyncPolicy::Os, Duration::from_secs(60)).unwrap();
            for (i, name) in names.iter().enumerate() {
                log.append(&env(name, &format!("s.{i}"), 1), 0).await.unwrap();
            }
            log.close();
        }
        for reopened in ["through events.idx", "through a scan"] {
            if reopened == "through a scan" {
                std::fs::remove_file(d.join("events.idx")).unwrap();
            }
            let log = FileLog::open(&d, SyncPolicy::Os, Duration::from_secs(60)).unwrap();
            let all: Vec<Logged> = log.read_many(1, 6).unwrap().into_iter().map(Result::unwrap).collect();
            assert_eq!(all.iter().map(|l| l.envelope.command_id.as_str()).collect::<Vec<_>>(), names, "{reopened}");
            assert_eq!(all.iter().map(|l| l.log_seq).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5, 6], "{reopened}");
            for l in &all {
                assert_eq!(log.get(l.log_seq).await.unwrap().envelope.command_id, l.envelope.command_id, "{reopened}");
            }
            assert_eq!(log.read_many(5, 100).unwrap().len(), 2, "up to the head");
            assert!(log.read_many(7, 9).unwrap().is_empty());
            assert_eq!(log.read_after(1, 3).unwrap().iter().map(|l| l.log_seq).collect::<Vec<_>>(), vec![2, 3, 4]);
            log.close();
        }

        let log = FileLog::open(&d, SyncPolicy::Os, Duration::from_secs(60)).unwrap();
        // A byte flipped inside event 4: it fails, its neighbours read.
        let (start, _) = log.span(&log.state.lock().unwrap(), 4).unwrap();
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(d.join("events.log")).unwrap();
            f.write_all_at(b"#", start + HEADER + 3).unwrap();
        }
        let read = log.read_many(3, 5).unwrap();
        assert!(read[0].is_ok() && read[2].is_ok(), "the records beside it");
        assert!(read[1].as_ref().is_err_and(|e| e.to_string().contains("event 4 fails its checksum")), "{:?}", read[1].as_ref().err());
        assert_eq!(log.read_after(2, 3).unwrap_err().to_string(), read[1].as_ref().unwrap_err().to_string(), "the first failure ends it");
        // An extent that holds two records is not taken for one.
        log.state.lock().unwrap().offsets.remove(1);
        assert!(log.get(1).await.is_err_and(|e| e.to_string().contains("event 1 fails its checksum")));
        drop(log);
        let _ = std::fs::remove_dir_all(&d);
    }

    /// An event larger than a record can be is refused before it is
    /// written (it could not be read back), as too large, not as the log
    /// being down: the log stays ready and takes the next event.
    #[tokio::test]
    async fn an_event_too_large_for_a_record_is_refused_and_nothing_is_written() {
        let d = dir("toolarge");
        let log = FileLog::open(&d, SyncPolicy::Os, Duration::from_secs(60)).unwrap();
        log.append(&env("a", "s.a", 1), 0).await.unwrap();
        let huge = "x".repeat(MAX_RECORD as usize / 3);
        let refused = log.append(&env(&huge, "s.b", 1), 0).await;
        assert!(matches!(refused, Err(LogError::TooLarge(_))), "{:?}", refused.err());
        assert_eq!(log.head().await.unwrap(), 1, "nothing appended");
        assert!(log.check().await.is_ok(), "still ready");
        assert_eq!(log.append(&env("c", "s.c", 1), 0).await.unwrap().log_seq, 2);
        assert_eq!(log.get(2).await.unwrap().envelope.command_id, "c");
        drop(log);
        let _ = std::fs::remove_dir_all(&d);
    }

    /// Records without the subject (written by two builds of 2026-11) are
    /// read, not taken for a torn tail.
    #[tokio::test]
    async fn records_without_their_subject_are_read() {
        let d = dir("nosubject");
        {
            let log = FileLog::open(&d, SyncPolicy::Always, Duration::from_secs(60)).unwrap();
            log.append(&env("a", "s.a", 1), 0).await.unwrap();
        }
        let path = d.join("events.log");
        let mut bytes = std::fs::read(&path).unwrap();
        let second = env("b", "s.b", 1);
        let record = serde_json::json!({"seq": 2, "msgId": "b", "event": second.to_stored()});
        let body = serde_json::to_vec(&record).unwrap();
        bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        bytes.extend_from_slice(&body);
        std::fs::write(&path, &bytes).unwrap();
        let log = FileLog::open(&d, SyncPolicy::Always, Duration::from_secs(60)).unwrap();
        assert_eq!(log.head().await.unwrap(), 2, "nothing cut");
        assert_eq!(log.last("s.b").await.unwrap().unwrap().envelope, second);
        assert!(log.append(&env("b", "s.b", 2), 2).await.unwrap().duplicate, "its command id is known");
        drop(log);
        let _ = std::fs::remove_dir_all(&d);
    }

    /// Two command ids whose keys collide are each deduplicated, and
    /// neither is taken for the other; a clean restart keeps the keys.
    #[tokio::test]
    async fn ids_whose_keys_collide_are_told_apart() {
        let d = dir("collide");
        let log = FileLog::open(&d, SyncPolicy::Os, Duration::from_secs(60)).unwrap();
        assert!(!log.append(&env("a", "s.a", 1), 0).await.unwrap().duplicate);
        {
            // As if "b" hashed to "a"'s key: its key names a's event.
            let mut state = log.state.lock().unwrap();
            let key = state.recent.key("b");
            state.recent.push_newest(key, 1, Instant::now());
        }
        let b = log.append(&env("b", "s.b", 1), 0).await.unwrap();
        assert_eq!((b.log_seq, b.duplicate), (2, false), "b is not a");
        let again = log.append(&env("b", "s.b", 1), 0).await.unwrap();
        assert_eq!((again.log_seq, again.duplicate), (2, true));
        log.close();
        drop(log);
        let log = FileLog::open(&d, SyncPolicy::Os, Duration::from_secs(60)).unwrap();
        for (id, subject, seq) in [("a", "s.a", 1), ("b", "s.b", 2)] {
            let again = log.append(&env(id, subject, 1), 0).await.unwrap();
            assert_eq!((again.log_seq, again.duplicate), (seq, true), "{id} after a restart");
        }
        drop(log);
        let _ = std::fs::remove_dir_all(&d);
    }

    /// An index whose keys were made otherwise (another build's hash: its
    /// probe key differs) is not trusted for them: the window is read back
    /// from the log.
    #[tokio::test]
    async fn keys_made_by_another_hash_are_not_trusted() {
        let d = dir("probe");
        let log = FileLog::open(&d, SyncPolicy::Os, Duration::from_secs(60)).unwrap();
        log.append(&env("a", "s.a", 1), 0).await.unwrap();
        log.close();
        drop(log);
        let path = d.join("events.idx");
        let mut ix = super::super::index::read(&path).expect("an index at a clean stop");
        ix.probe ^= 1;
        ix.recent = ix.recent.iter().map(|&(key, seq, at)| (!key, seq, at)).collect();
        super::super::index::write(&path, &ix).unwrap();
        let log = FileLog::open(&d, SyncPolicy::Os, Duration::from_secs(60)).unwrap();
        let again = log.append(&env("a", "s.a", 1), 0).await.unwrap();
        assert_eq!((again.log_seq, again.duplicate), (1, true));
        drop(log);
        let _ = std::fs::remove_dir_all(&d);
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

    #[tokio::test]
    async fn a_damaged_length_in_the_middle_is_refused_however_long_it_claims() {
        let d = dir("len");
        {
            let log = FileLog::open(&d, SyncPolicy::Os, Duration::from_secs(60)).unwrap();
            for s in ["a", "b", "c", "d"] {
                log.append(&env(s, &format!("s.{s}"), 1), 0).await.unwrap();
            }
        }
        let path = d.join("events.log");
        let original = std::fs::read(&path).unwrap();
        let second = {
            let first_len = u32::from_le_bytes(original[0..4].try_into().unwrap()) as usize;
            HEADER as usize + first_len
        };
        // The second record's length now points past the end of the file:
        // it looks like a record cut short, but valid records follow it.
        for claimed in [u32::MAX, original.len() as u32, 0] {
            let mut bytes = original.clone();
            bytes[second..second + 4].copy_from_slice(&claimed.to_le_bytes());
            std::fs::write(&path, &bytes).unwrap();
            let err = FileLog::open(&d, SyncPolicy::Os, Duration::from_secs(60)).err().expect("refused");
            assert!(err.to_string().contains(&format!("corrupt at byte {second}")), "{err}");
            assert_eq!(std::fs::read(&path).unwrap(), bytes, "nothing was cut");
        }
        let _ = std::fs::remove_dir_all(&d);
    }

    #[tokio::test]
    async fn a_zero_filled_tail_is_cut_and_kept_aside() {
        let d = dir("zeros");
        {
            let log = FileLog::open(&d, SyncPolicy::Os, Duration::from_secs(60)).unwrap();
            log.append(&env("a", "s.a", 1), 0).await.unwrap();
        }
        let path = d.join("events.log");
        let whole = std::fs::read(&path).unwrap();
        let mut bytes = whole.clone();
        bytes.extend_from_slice(&[0u8; 4096]); // space allocated, never written (power loss)
        std::fs::write(&path, &bytes).unwrap();
        let log = FileLog::open(&d, SyncPolicy::Os, Duration::from_secs(60)).unwrap();
        assert_eq!(log.head().await.unwrap(), 1);
        assert_eq!(std::fs::read(&path).unwrap(), whole);
        let kept: Vec<_> = std::fs::read_dir(&d).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().starts_with("events.log.cut-")).collect();
        assert_eq!(kept.len(), 1, "the cut bytes are kept aside");
        assert_eq!(std::fs::read(kept[0].path()).unwrap().len(), 4096);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[tokio::test]
    async fn one_process_per_data_directory() {
        let d = dir("lock");
        let _log = FileLog::open(&d, SyncPolicy::Os, Duration::from_secs(60)).unwrap();
        let err = FileLog::open(&d, SyncPolicy::Os, Duration::from_secs(60)).err().expect("refused");
        assert!(err.to_string().contains("another natter process is using the data directory"), "{err}");
        drop(_log);
        FileLog::open(&d, SyncPolicy::Os, Duration::from_secs(60)).expect("free again once closed");
        let _ = std::fs::remove_dir_all(&d);
    }
}
