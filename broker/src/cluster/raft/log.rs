//! The metadata group's Raft log on disk: one append-only file, `<data-dir>/cluster/raft/log`,
//! of checksummed records (entries, truncations, purges, votes, the commit index). Everything
//! is also kept in memory (metadata is small), so reads never touch the disk.
//!
//! Writes go, in order, to one writer thread that writes whatever is queued with one
//! `write` and one `fdatasync` and then tells openraft the entries are durable (group commit;
//! no fsync on an async worker). After an I/O error the writer fails every later write: the
//! node stops acknowledging log entries instead of acknowledging what it may not have kept.
//! When most of the file is dead (purged or truncated entries, old votes) it is rewritten
//! atomically (temporary file, fsync, rename, fsync of the directory).
//!
//! A record is `len: u32 LE | crc32(payload): u32 LE | payload (JSON)`. At startup an
//! incomplete or corrupt *last* record is a torn write and is cut off; a bad record followed
//! by good ones is damage and the node refuses to start rather than forget votes or entries.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{
    Entry, LogId, LogState, OptionalSend, RaftLogReader, StorageError, StorageIOError, Vote,
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::{NodeId, TypeConfig};

const HEADER: usize = 8;
/// Rewrite the file once this many records are dead and they outnumber the live ones.
const REWRITE_AFTER: usize = 1000;

#[derive(Serialize, Deserialize)]
enum Record {
    Entry(Entry<TypeConfig>),
    /// Entries at this index and after are gone (a conflicting suffix).
    Truncate(u64),
    /// Entries up to this one are gone (covered by a snapshot).
    Purge(LogId<NodeId>),
    Vote(Vote<NodeId>),
    Committed(Option<LogId<NodeId>>),
}

/// First byte of a postcard-encoded record; older logs hold JSON records (starting `{`).
const POSTCARD: u8 = 1;

fn encode(record: &Record, out: &mut Vec<u8>) {
    // Serialising these types cannot fail (plain data, no I/O).
    let mut payload = vec![POSTCARD];
    if let Ok(p) = postcard::to_allocvec(record) {
        payload.extend_from_slice(&p);
    }
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
}

#[derive(Default)]
struct State {
    entries: BTreeMap<u64, Entry<TypeConfig>>,
    last_purged: Option<LogId<NodeId>>,
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId<NodeId>>,
    /// Records in the file that no longer matter.
    dead: usize,
}

impl State {
    fn replay(&mut self, record: Record) {
        match record {
            Record::Entry(e) => {
                if self.entries.insert(e.log_id.index, e).is_some() {
                    self.dead += 1;
                }
            }
            Record::Truncate(index) => {
                let gone = self.entries.split_off(&index);
                self.dead += gone.len() + 1;
            }
            Record::Purge(log_id) => {
                let keep = self.entries.split_off(&(log_id.index + 1));
                self.dead += self.entries.len() + 1;
                self.entries = keep;
                self.last_purged = Some(log_id);
            }
            Record::Vote(v) => {
                self.dead += usize::from(self.vote.is_some());
                self.vote = Some(v);
            }
            Record::Committed(c) => {
                self.dead += usize::from(self.committed.is_some());
                self.committed = c;
            }
        }
    }

    /// The whole live state as records, for a rewrite.
    fn compacted(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Some(v) = self.vote {
            encode(&Record::Vote(v), &mut out);
        }
        if self.committed.is_some() {
            encode(&Record::Committed(self.committed), &mut out);
        }
        if let Some(p) = self.last_purged {
            encode(&Record::Purge(p), &mut out);
        }
        for e in self.entries.values() {
            encode(&Record::Entry(e.clone()), &mut out);
        }
        out
    }
}

/// What to tell once a write is on disk.
enum Done {
    Flushed(LogFlushed<TypeConfig>),
    Notify(tokio::sync::oneshot::Sender<std::io::Result<()>>),
    Nothing,
}

impl Done {
    fn complete(self, result: &std::io::Result<()>) {
        let copy = || match result {
            Ok(()) => Ok(()),
            Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
        };
        match self {
            Done::Flushed(cb) => cb.log_io_completed(copy()),
            Done::Notify(tx) => {
                let _ = tx.send(copy());
            }
            Done::Nothing => {}
        }
    }
}

enum Job {
    Append(Vec<u8>, Done),
    /// Replace the whole file with these bytes.
    Rewrite(Vec<u8>, Done),
}

/// The log store openraft drives (cheap to clone: the reader is a clone).
#[derive(Clone)]
pub struct LogStore {
    state: Arc<Mutex<State>>,
    writer: mpsc::Sender<Job>,
}

fn io_error(what: &str, path: &Path, e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(format!("{what} {}: {e}", path.display()))
}

/// Reads the records of `bytes`; returns them and the length of the good prefix.
fn parse(bytes: &[u8], path: &Path) -> std::io::Result<(Vec<Record>, usize)> {
    let mut records = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let rest = &bytes[at..];
        let torn = |why: &str| {
            tracing::warn!(
                offset = at,
                "{}: torn last record ({why}); cut off",
                path.display()
            );
        };
        if rest.len() < HEADER {
            torn("incomplete header");
            break;
        }
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
        if rest.len() < HEADER + len {
            torn("incomplete payload");
            break;
        }
        let payload = &rest[HEADER..HEADER + len];
        let good = crc32fast::hash(payload) == crc;
        let record = if good {
            match payload.split_first() {
                Some((&POSTCARD, rest)) => postcard::from_bytes::<Record>(rest).ok(),
                _ => serde_json::from_slice::<Record>(payload).ok(),
            }
        } else {
            None
        };
        match record {
            Some(r) => records.push(r),
            None if at + HEADER + len == bytes.len() => {
                torn("bad checksum");
                break;
            }
            None => {
                return Err(io_error(
                    "damaged Raft log",
                    path,
                    format!(
                        "bad record at offset {at} followed by {} more bytes; not a torn \
                         write. Restore the file or wipe this node's data directory and \
                         let it rejoin",
                        bytes.len() - at - HEADER - len
                    ),
                ));
            }
        }
        at += HEADER + len;
    }
    Ok((records, at))
}

impl LogStore {
    /// Opens (or creates) the log in `dir` and starts its writer thread.
    pub fn open(dir: &Path) -> std::io::Result<LogStore> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("log");
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io_error("cannot read", &path, e)),
        };
        let (records, good) = parse(&bytes, &path)?;
        let mut state = State::default();
        for r in records {
            state.replay(r);
        }
        let file = crate::store::private_options()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| io_error("cannot open", &path, e))?;
        if good < bytes.len() {
            file.set_len(good as u64)?;
            file.sync_all()?;
        }
        let (tx, rx) = mpsc::channel();
        let thread_path = path.clone();
        std::thread::Builder::new()
            .name("raft-log".into())
            .spawn(move || write_loop(thread_path, file, rx))?;
        Ok(LogStore {
            state: Arc::new(Mutex::new(state)),
            writer: tx,
        })
    }

    /// Whether this node has ever taken part in a group (a vote or an entry on disk).
    pub fn has_state(&self) -> bool {
        let s = self.state.lock();
        s.vote.is_some() || !s.entries.is_empty() || s.last_purged.is_some()
    }

    // openraft's storage traits return its (large) StorageError; this helper feeds them.
    #[allow(clippy::result_large_err)]
    fn submit(&self, job: Job) -> Result<(), StorageError<NodeId>> {
        self.writer.send(job).map_err(|_| {
            StorageIOError::write_logs(&std::io::Error::other("the Raft log writer has stopped"))
                .into()
        })
    }
}

fn write_loop(path: PathBuf, mut file: File, rx: mpsc::Receiver<Job>) {
    let mut failed: Option<String> = None;
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while let Ok(more) = rx.try_recv() {
            jobs.push(more);
        }
        let mut done = Vec::with_capacity(jobs.len());
        let mut result: std::io::Result<()> = Ok(());
        let mut buf = Vec::new();
        for job in jobs {
            if result.is_err() || failed.is_some() {
                done.push(match job {
                    Job::Append(_, d) | Job::Rewrite(_, d) => d,
                });
                continue;
            }
            match job {
                Job::Append(bytes, d) => {
                    buf.extend_from_slice(&bytes);
                    done.push(d);
                }
                Job::Rewrite(bytes, d) => {
                    // What was queued before the rewrite is in `bytes` already.
                    buf.clear();
                    result = rewrite(&path, &bytes).map(|f| file = f);
                    done.push(d);
                }
            }
        }
        // Only records nobody waits for (commit indexes): written, not synced — the next
        // synced append makes them durable, and a lost one only means re-applying a little
        // more. Saves an fsync per change on every node.
        let sync = done.iter().any(|d| !matches!(d, Done::Nothing));
        if result.is_ok() && failed.is_none() && !buf.is_empty() {
            result = file
                .write_all(&buf)
                .and_then(|_| if sync { file.sync_data() } else { Ok(()) });
        }
        if let Some(why) = &failed {
            result = Err(std::io::Error::other(why.clone()));
        } else if let Err(e) = &result {
            let why = format!(
                "the Raft log {} failed ({e}); this node no longer accepts entries until it \
                 is restarted",
                path.display()
            );
            tracing::error!("{why}");
            failed = Some(why);
        }
        for d in done {
            d.complete(&result);
        }
    }
}

fn rewrite(path: &Path, bytes: &[u8]) -> std::io::Result<File> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = crate::store::create_private(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    OpenOptions::new().append(true).open(path)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let s = self.state.lock();
        Ok(s.entries.range(range).map(|(_, e)| e.clone()).collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let s = self.state.lock();
        let last = s.entries.values().next_back().map(|e| e.log_id);
        Ok(LogState {
            last_purged_log_id: s.last_purged,
            last_log_id: last.or(s.last_purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let mut s = self.state.lock();
            s.replay(Record::Vote(*vote));
            let mut buf = Vec::new();
            encode(&Record::Vote(*vote), &mut buf);
            self.submit(Job::Append(buf, Done::Notify(tx)))?;
        }
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StorageIOError::write_vote(&e).into()),
            Err(_) => Err(StorageIOError::write_vote(&std::io::Error::other(
                "the Raft log writer has stopped",
            ))
            .into()),
        }
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        Ok(self.state.lock().vote)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        let mut s = self.state.lock();
        s.replay(Record::Committed(committed));
        let mut buf = Vec::new();
        encode(&Record::Committed(committed), &mut buf);
        // Not waited for: a lost commit index only means re-applying a little more.
        self.submit(Job::Append(buf, Done::Nothing))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self.state.lock().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut s = self.state.lock();
        let mut buf = Vec::new();
        for e in entries {
            encode(&Record::Entry(e.clone()), &mut buf);
            s.replay(Record::Entry(e));
        }
        self.submit(Job::Append(buf, Done::Flushed(callback)))
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut s = self.state.lock();
        s.replay(Record::Truncate(log_id.index));
        let mut buf = Vec::new();
        encode(&Record::Truncate(log_id.index), &mut buf);
        // Ordered before any later append, whose fsync makes it durable.
        self.submit(Job::Append(buf, Done::Nothing))
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut s = self.state.lock();
        s.replay(Record::Purge(log_id));
        if s.dead > REWRITE_AFTER && s.dead > s.entries.len() {
            let bytes = s.compacted();
            s.dead = 0;
            return self.submit(Job::Rewrite(bytes, Done::Nothing));
        }
        let mut buf = Vec::new();
        encode(&Record::Purge(log_id), &mut buf);
        self.submit(Job::Append(buf, Done::Nothing))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload};

    fn entry(term: u64, index: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Normal(super::super::Blob(format!("cmd{index}").into_bytes())),
        }
    }

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "warren-raft-log-{name}-{}-{:x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    fn write(path: &Path, records: &[Record]) -> Vec<u8> {
        let mut buf = Vec::new();
        for r in records {
            encode(r, &mut buf);
        }
        std::fs::write(path, &buf).expect("write");
        buf
    }

    #[test]
    fn replay_applies_truncate_purge_and_vote() {
        let dir = tmp("replay");
        let path = dir.join("log");
        write(
            &path,
            &[
                Record::Vote(Vote::new(1, 1)),
                Record::Entry(entry(1, 1)),
                Record::Entry(entry(1, 2)),
                Record::Entry(entry(1, 3)),
                Record::Truncate(3),
                Record::Entry(entry(2, 3)),
                Record::Purge(entry(1, 1).log_id),
                Record::Vote(Vote::new(2, 1)),
            ],
        );
        let store = LogStore::open(&dir).expect("open");
        let s = store.state.lock();
        assert_eq!(s.vote, Some(Vote::new(2, 1)));
        assert_eq!(s.entries.keys().copied().collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(s.entries[&3].log_id.leader_id.term, 2);
        assert_eq!(s.last_purged.map(|l| l.index), Some(1));
    }

    #[test]
    fn a_torn_last_record_is_cut_off_but_damage_in_the_middle_refuses_to_start() {
        let dir = tmp("torn");
        let path = dir.join("log");
        let buf = write(
            &path,
            &[Record::Entry(entry(1, 1)), Record::Entry(entry(1, 2))],
        );
        // Torn: the last record lost its end.
        std::fs::write(&path, &buf[..buf.len() - 3]).expect("write");
        let store = LogStore::open(&dir).expect("torn tail is not an error");
        assert_eq!(store.state.lock().entries.len(), 1);
        drop(store);
        let first_len = HEADER + u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        assert_eq!(
            std::fs::metadata(&path).expect("meta").len() as usize,
            first_len
        );
        // Damage: the first record's payload flipped, the second intact.
        let mut bad = buf.clone();
        bad[HEADER + 2] ^= 0xff;
        std::fs::write(&path, &bad).expect("write");
        let err = LogStore::open(&dir).err().expect("damage refused");
        assert!(err.to_string().contains("damaged Raft log"), "{err}");
        assert!(err.to_string().contains("offset 0"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_log_of_json_records_written_by_earlier_versions_still_opens() {
        let dir = tmp("json");
        let mut buf = Vec::new();
        for r in [Record::Vote(Vote::new(4, 1)), Record::Entry(entry(4, 1))] {
            let payload = serde_json::to_vec(&r).expect("json");
            buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            buf.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
            buf.extend_from_slice(&payload);
        }
        // And one record as this version writes it, after them.
        encode(&Record::Entry(entry(4, 2)), &mut buf);
        std::fs::write(dir.join("log"), &buf).expect("write");
        let store = LogStore::open(&dir).expect("open");
        let s = store.state.lock();
        assert_eq!(s.vote, Some(Vote::new(4, 1)));
        assert_eq!(s.entries.keys().copied().collect::<Vec<_>>(), vec![1, 2]);
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
