//! `events.idx`: where the embedded log's records are, written at a clean
//! stop, so the next open reads the index and only the records appended
//! after it, not the whole log.
//!
//! Binary, little-endian: `NATTERIX`, version (u32), the log length it
//! covers (u64), the last record's command id, each subject with its
//! sequences, each record's offset, the dedup window's length, secret and
//! probe key,
//! the command ids still inside it (as keys, with their sequence and
//! time), then a CRC32 of all that. An index
//! that fails its checksum, or whose last record does not sit where it
//! says in `events.log`, is ignored (the log is scanned instead).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

const MAGIC: &[u8; 8] = b"NATTERIX";
const VERSION: u32 = 3;

/// What the index holds (borrowing the log's tables when written, owning
/// them when read).
pub struct Index<'a> {
    /// The log's length in bytes when written: every record before it.
    pub end: u64,
    /// The command id of the last record (to tell the same log).
    pub last_id: String,
    pub offsets: Cow<'a, [u64]>,
    pub by_subject: Cow<'a, BTreeMap<String, Vec<u64>>>,
    /// The dedup window's command ids, oldest first: (key, sequence, the
    /// time it was appended in Unix milliseconds).
    pub recent: Vec<(u64, u64, i64)>,
    /// The dedup window (ms) `recent` covers (a reader with a longer one
    /// reads the log's end instead), the secret its keys are made with,
    /// and the key of a fixed probe id: a reader whose hash makes another
    /// key of it (another build's) does not use `recent`.
    pub window_ms: u64,
    pub secret: (u64, u64),
    pub probe: u64,
}

/// Writes `index` to `path` (through a temporary file renamed over it).
pub fn write(path: &Path, index: &Index<'_>) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(64 + index.offsets.len() * 16);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&index.end.to_le_bytes());
    let put_str = |out: &mut Vec<u8>, s: &str| {
        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    };
    put_str(&mut out, &index.last_id);
    out.extend_from_slice(&(index.by_subject.len() as u64).to_le_bytes());
    for (subject, seqs) in index.by_subject.iter() {
        put_str(&mut out, subject);
        out.extend_from_slice(&(seqs.len() as u64).to_le_bytes());
        seqs.iter().for_each(|s| out.extend_from_slice(&s.to_le_bytes()));
    }
    out.extend_from_slice(&(index.offsets.len() as u64).to_le_bytes());
    index.offsets.iter().for_each(|o| out.extend_from_slice(&o.to_le_bytes()));
    for v in [index.window_ms, index.secret.0, index.secret.1, index.probe] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&(index.recent.len() as u64).to_le_bytes());
    for (key, seq, at) in &index.recent {
        for v in [*key, *seq, *at as u64] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out.extend_from_slice(&crc32fast::hash(&out).to_le_bytes());
    let temporary = path.with_extension("idx.tmp");
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(&out)?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)
}

/// Reads the index at `path`, if there is one and it is whole.
pub fn read(path: &Path) -> Option<Index<'static>> {
    let bytes = std::fs::read(path).ok()?;
    let (body, crc) = bytes.split_at_checked(bytes.len().checked_sub(4)?)?;
    if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().ok()?) {
        return None;
    }
    let mut r = Reader(body);
    if r.take(8)? != MAGIC || r.u32()? != VERSION {
        return None;
    }
    let end = r.u64()?;
    let last_id = r.string()?;
    let mut by_subject = BTreeMap::new();
    for _ in 0..r.u64()? {
        let subject = r.string()?;
        let n = r.u64()? as usize;
        let mut seqs = Vec::with_capacity(n.min(body.len() / 8));
        for _ in 0..n {
            seqs.push(r.u64()?);
        }
        by_subject.insert(subject, seqs);
    }
    let n = r.u64()? as usize;
    let mut offsets = Vec::with_capacity(n.min(body.len() / 8));
    for _ in 0..n {
        offsets.push(r.u64()?);
    }
    let (window_ms, secret, probe) = (r.u64()?, (r.u64()?, r.u64()?), r.u64()?);
    let n = r.u64()? as usize;
    let mut recent = Vec::with_capacity(n.min(body.len() / 24));
    for _ in 0..n {
        recent.push((r.u64()?, r.u64()?, r.u64()? as i64));
    }
    r.0.is_empty().then_some(Index { end, last_id, offsets: offsets.into(), by_subject: Cow::Owned(by_subject), recent, window_ms, secret, probe })
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn string(&mut self) -> Option<String> {
        let n = self.u32()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_reads_back_and_a_damaged_one_is_ignored() {
        let dir = std::env::temp_dir().join(format!("natter-idx-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("events.idx");
        let by_subject = BTreeMap::from([("a.b".to_owned(), vec![1, 3]), ("a.c".to_owned(), vec![2])]);
        let recent = vec![(7, 2, 1_700_000_000_000), (9, 3, 1_700_000_000_500)];
        let index = Index {
            end: 300,
            last_id: "cmd-3".into(),
            offsets: vec![0, 100, 200].into(),
            by_subject: Cow::Borrowed(&by_subject),
            recent: recent.clone(),
            window_ms: 600_000,
            secret: (11, 12),
            probe: 13,
        };
        write(&path, &index).unwrap();
        let back = read(&path).unwrap();
        assert_eq!((back.end, back.last_id.as_str(), back.offsets.into_owned(), back.by_subject.into_owned(), back.recent), (300, "cmd-3", vec![0, 100, 200], by_subject, recent));
        assert_eq!((back.window_ms, back.secret, back.probe), (600_000, (11, 12), 13));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[20] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(read(&path).is_none(), "a damaged index is not read");
        std::fs::write(&path, &bytes[..bytes.len() - 9]).unwrap();
        assert!(read(&path).is_none(), "a cut one neither");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
