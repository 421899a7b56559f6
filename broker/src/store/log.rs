//! The message log: append-only segment files of checksummed records, written by one flusher
//! thread with group commit.
//!
//! Publishing tasks append encoded records to a shared buffer and get a sequence number; the
//! flusher takes everything buffered, writes it, calls `fdatasync` once, and publishes the
//! highest sequence number now on disk. Everything appended while one fsync runs goes out with
//! the next: many messages, from many channels and queues, per fsync. Segments whose every
//! enqueued message has been removed are deleted, so a queue with steady publish/ack does not
//! grow its files without bound.
//!
//! Record framing: `len: u32 | crc32(payload): u32 | payload`. At start-up a record that is
//! truncated or fails its checksum ends the recovery of that segment; what came before it is
//! kept and the loss is logged precisely.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use tokio::sync::watch;

/// Segments roll over at this size.
pub const SEGMENT_BYTES: u64 = 16 * 1024 * 1024;

const REC_ENQUEUE: u8 = 1;
const REC_REMOVE: u8 = 2;
const REC_PURGE: u8 = 3;

/// A persistent message in a durable queue, as recovered from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub sid: u64,
    pub vhost: String,
    pub queue: String,
    pub expires_at: Option<u64>,
    pub exchange: String,
    pub routing_key: String,
    pub header_payload: Vec<u8>,
    pub body: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Enqueue(StoredMessage),
    Remove {
        vhost: String,
        queue: String,
        sid: u64,
    },
    Purge {
        vhost: String,
        queue: String,
    },
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

impl Record {
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0u8; 8]);
        match self {
            Record::Enqueue(m) => {
                out.push(REC_ENQUEUE);
                put_str(out, &m.vhost);
                put_str(out, &m.queue);
                out.extend_from_slice(&m.sid.to_be_bytes());
                out.extend_from_slice(&m.expires_at.unwrap_or(0).to_be_bytes());
                put_str(out, &m.exchange);
                put_str(out, &m.routing_key);
                put_bytes(out, &m.header_payload);
                put_bytes(out, &m.body);
            }
            Record::Remove { vhost, queue, sid } => {
                out.push(REC_REMOVE);
                put_str(out, vhost);
                put_str(out, queue);
                out.extend_from_slice(&sid.to_be_bytes());
            }
            Record::Purge { vhost, queue } => {
                out.push(REC_PURGE);
                put_str(out, vhost);
                put_str(out, queue);
            }
        }
        let payload_len = (out.len() - start - 8) as u32;
        let crc = crc32fast::hash(&out[start + 8..]);
        out[start..start + 4].copy_from_slice(&payload_len.to_be_bytes());
        out[start + 4..start + 8].copy_from_slice(&crc.to_be_bytes());
    }

    fn decode(p: &[u8]) -> Option<Record> {
        let mut r = Cursor { b: p, at: 0 };
        let kind = r.u8()?;
        let rec = match kind {
            REC_ENQUEUE => {
                let vhost = r.string()?;
                let queue = r.string()?;
                let sid = r.u64()?;
                let exp = r.u64()?;
                Record::Enqueue(StoredMessage {
                    sid,
                    vhost,
                    queue,
                    expires_at: (exp != 0).then_some(exp),
                    exchange: r.string()?,
                    routing_key: r.string()?,
                    header_payload: r.bytes()?.to_vec(),
                    body: r.bytes()?.to_vec(),
                })
            }
            REC_REMOVE => Record::Remove {
                vhost: r.string()?,
                queue: r.string()?,
                sid: r.u64()?,
            },
            REC_PURGE => Record::Purge {
                vhost: r.string()?,
                queue: r.string()?,
            },
            _ => return None,
        };
        (r.at == p.len()).then_some(rec)
    }
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn string(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?.to_vec()).ok()
    }
}

/// What recovery found in one segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentReport {
    pub segment: u64,
    pub records: usize,
    /// Bytes after the last good record that were discarded (truncation or corruption).
    pub lost_bytes: u64,
    pub reason: Option<String>,
}

/// Everything recovered at start-up: live messages per (vhost, queue), in log order.
#[derive(Debug, Default)]
pub struct Recovered {
    pub messages: BTreeMap<(String, String), Vec<StoredMessage>>,
    pub segments: Vec<SegmentReport>,
}

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:08}.seg"))
}

/// Reads one segment's records; stops at the first damaged one.
pub fn read_segment(path: &Path, segment: u64) -> std::io::Result<(Vec<Record>, SegmentReport)> {
    let mut data = Vec::new();
    File::open(path)?.read_to_end(&mut data)?;
    let mut out = Vec::new();
    let mut at = 0usize;
    let mut reason = None;
    while at < data.len() {
        if data.len() - at < 8 {
            reason = Some(format!("truncated record header at offset {at}"));
            break;
        }
        let len = u32::from_be_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]) as usize;
        let crc = u32::from_be_bytes([data[at + 4], data[at + 5], data[at + 6], data[at + 7]]);
        let Some(payload) = data.get(at + 8..at + 8 + len) else {
            reason = Some(format!("truncated record of {len} bytes at offset {at}"));
            break;
        };
        if crc32fast::hash(payload) != crc {
            reason = Some(format!("checksum mismatch in record at offset {at}"));
            break;
        }
        let Some(rec) = Record::decode(payload) else {
            reason = Some(format!("undecodable record at offset {at}"));
            break;
        };
        out.push(rec);
        at += 8 + len;
    }
    let report = SegmentReport {
        segment,
        records: out.len(),
        lost_bytes: (data.len() - at) as u64,
        reason,
    };
    Ok((out, report))
}

struct Pending {
    /// Encoded records not yet written, per segment number.
    chunks: Vec<(u64, Vec<u8>)>,
    last_seq: u64,
    /// `last_seq` when the flusher last took the buffer.
    flushed_seq: u64,
    segment: u64,
    segment_bytes: u64,
    /// Segment of each live enqueued message, and live count per segment.
    sid_segment: HashMap<u64, u64>,
    live: BTreeMap<u64, u64>,
    /// Segments to delete once the current batch is on disk.
    deletable: Vec<u64>,
    shutdown: bool,
}

impl Pending {
    fn release(&mut self, sid: u64) {
        if let Some(s) = self.sid_segment.remove(&sid)
            && let Some(n) = self.live.get_mut(&s)
        {
            *n = n.saturating_sub(1);
        }
    }

    /// Deletes the oldest segments while they hold nothing live. Only a prefix may go: a
    /// later segment can hold the removal records of messages enqueued in an older one, and
    /// deleting it first would bring those messages back at the next start.
    fn collect_dead_prefix(&mut self) {
        while let Some((&s, &n)) = self.live.iter().next() {
            if n != 0 || s >= self.segment {
                break;
            }
            self.live.remove(&s);
            self.deletable.push(s);
        }
    }
}

pub struct MessageLog {
    dir: PathBuf,
    pending: Mutex<Pending>,
    wake: Condvar,
    next_sid: AtomicU64,
    synced_tx: watch::Sender<u64>,
    /// Number of fsyncs and records written, for benchmarks and metrics.
    pub fsyncs: AtomicU64,
    pub records_written: AtomicU64,
    pub bytes_written: AtomicU64,
}

impl MessageLog {
    /// Opens (creating) the log in `dir`, recovers what is there, and starts the flusher.
    pub fn open(dir: &Path) -> std::io::Result<(Arc<Self>, Recovered)> {
        fs::create_dir_all(dir)?;
        let mut segs: Vec<u64> = fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_suffix(".seg")?.parse().ok()
            })
            .collect();
        segs.sort_unstable();
        let mut recovered = Recovered::default();
        let mut sid_segment: HashMap<u64, u64> = HashMap::new();
        let mut live: BTreeMap<u64, u64> = BTreeMap::new();
        let mut index: HashMap<u64, (String, String)> = HashMap::new();
        let mut max_sid = 0;
        for &s in &segs {
            let (records, report) = read_segment(&segment_path(dir, s), s)?;
            if let Some(why) = &report.reason {
                tracing::error!(
                    segment = s,
                    recovered_records = report.records,
                    lost_bytes = report.lost_bytes,
                    "message store damaged: {why}; kept the {} records before it, discarded {} bytes",
                    report.records,
                    report.lost_bytes
                );
            }
            live.entry(s).or_insert(0);
            for rec in records {
                match rec {
                    Record::Enqueue(m) => {
                        max_sid = max_sid.max(m.sid);
                        sid_segment.insert(m.sid, s);
                        *live.entry(s).or_insert(0) += 1;
                        index.insert(m.sid, (m.vhost.clone(), m.queue.clone()));
                        recovered
                            .messages
                            .entry((m.vhost.clone(), m.queue.clone()))
                            .or_default()
                            .push(m);
                    }
                    Record::Remove { vhost, queue, sid } => {
                        if let Some(seg) = sid_segment.remove(&sid)
                            && let Some(n) = live.get_mut(&seg)
                        {
                            *n = n.saturating_sub(1);
                        }
                        index.remove(&sid);
                        if let Some(list) = recovered.messages.get_mut(&(vhost, queue)) {
                            list.retain(|m| m.sid != sid);
                        }
                    }
                    Record::Purge { vhost, queue } => {
                        if let Some(list) = recovered.messages.remove(&(vhost, queue)) {
                            for m in list {
                                if let Some(seg) = sid_segment.remove(&m.sid)
                                    && let Some(n) = live.get_mut(&seg)
                                {
                                    *n = n.saturating_sub(1);
                                }
                            }
                        }
                    }
                }
            }
            recovered.segments.push(report);
        }
        recovered.messages.retain(|_, v| !v.is_empty());
        // New writes go to a fresh segment: a damaged tail is never appended to.
        let segment = segs.last().map_or(1, |s| s + 1);
        let log = Arc::new(MessageLog {
            dir: dir.to_owned(),
            pending: Mutex::new(Pending {
                chunks: Vec::new(),
                last_seq: 0,
                flushed_seq: 0,
                segment,
                segment_bytes: 0,
                sid_segment,
                live,
                deletable: Vec::new(),
                shutdown: false,
            }),
            wake: Condvar::new(),
            next_sid: AtomicU64::new(max_sid + 1),
            synced_tx: watch::channel(0).0,
            fsyncs: AtomicU64::new(0),
            records_written: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
        });
        log.pending.lock().collect_dead_prefix();
        let flusher = log.clone();
        std::thread::Builder::new()
            .name("warren-log-flusher".into())
            .spawn(move || flusher.flush_loop())?;
        Ok((log, recovered))
    }

    pub fn next_sid(&self) -> u64 {
        self.next_sid.fetch_add(1, Ordering::Relaxed)
    }

    /// Appends a record; returns the sequence number to wait for (see [`Self::synced`]).
    pub fn append(&self, rec: &Record) -> u64 {
        let mut p = self.pending.lock();
        let mut buf = Vec::with_capacity(64);
        rec.encode(&mut buf);
        if p.segment_bytes + buf.len() as u64 > SEGMENT_BYTES && p.segment_bytes > 0 {
            p.segment += 1;
            p.segment_bytes = 0;
            p.collect_dead_prefix();
        }
        let seg = p.segment;
        p.live.entry(seg).or_insert(0);
        p.segment_bytes += buf.len() as u64;
        match rec {
            Record::Enqueue(m) => {
                p.sid_segment.insert(m.sid, seg);
                *p.live.entry(seg).or_insert(0) += 1;
            }
            Record::Remove { sid, .. } => {
                p.release(*sid);
                p.collect_dead_prefix();
            }
            Record::Purge { .. } => {}
        }
        match p.chunks.last_mut() {
            Some((s, chunk)) if *s == seg => chunk.extend_from_slice(&buf),
            _ => p.chunks.push((seg, buf)),
        }
        p.last_seq += 1;
        let seq = p.last_seq;
        drop(p);
        self.wake.notify_one();
        seq
    }

    /// Forgets messages removed without a record (a purged or deleted queue's).
    pub fn forget(&self, sids: &[u64]) {
        let mut p = self.pending.lock();
        for sid in sids {
            p.release(*sid);
        }
        p.collect_dead_prefix();
    }

    /// The highest sequence number on disk.
    pub fn synced(&self) -> watch::Receiver<u64> {
        self.synced_tx.subscribe()
    }

    /// The sequence number of the last record appended (on disk or not).
    pub fn appended_seq(&self) -> u64 {
        self.pending.lock().last_seq
    }

    pub fn synced_now(&self) -> u64 {
        *self.synced_tx.borrow()
    }

    /// Stops the flusher after it wrote what is buffered.
    pub fn shutdown(&self) {
        self.pending.lock().shutdown = true;
        self.wake.notify_one();
    }

    fn flush_loop(self: Arc<Self>) {
        let mut files: BTreeMap<u64, File> = BTreeMap::new();
        let mut last_report = std::time::Instant::now();
        let mut reported_fsyncs = 0;
        loop {
            // Group commit at work, for operators and benchmarks: records per fsync.
            if last_report.elapsed() >= Duration::from_secs(10) {
                let fsyncs = self.fsyncs.load(Ordering::Relaxed);
                if fsyncs != reported_fsyncs {
                    let records = self.records_written.load(Ordering::Relaxed);
                    tracing::info!(
                        records,
                        fsyncs,
                        bytes = self.bytes_written.load(Ordering::Relaxed),
                        records_per_fsync = records as f64 / fsyncs.max(1) as f64,
                        "message store totals"
                    );
                    reported_fsyncs = fsyncs;
                }
                last_report = std::time::Instant::now();
            }
            let (chunks, seq, deletable, shutdown, records) = {
                let mut p = self.pending.lock();
                while p.chunks.is_empty() && p.deletable.is_empty() && !p.shutdown {
                    self.wake.wait_for(&mut p, Duration::from_millis(200));
                }
                let records = p.last_seq - p.flushed_seq;
                p.flushed_seq = p.last_seq;
                (
                    std::mem::take(&mut p.chunks),
                    p.last_seq,
                    std::mem::take(&mut p.deletable),
                    p.shutdown,
                    records,
                )
            };
            let mut ok = true;
            for (seg, data) in &chunks {
                let file = match files.get_mut(seg) {
                    Some(f) => f,
                    None => match OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(segment_path(&self.dir, *seg))
                    {
                        Ok(f) => files.entry(*seg).or_insert(f),
                        Err(e) => {
                            tracing::error!("cannot open segment {seg}: {e}");
                            ok = false;
                            break;
                        }
                    },
                };
                if let Err(e) = file.write_all(data) {
                    tracing::error!("cannot write segment {seg}: {e}");
                    ok = false;
                    break;
                }
                self.bytes_written
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            if ok {
                for (seg, _) in &chunks {
                    if let Some(f) = files.get(seg)
                        && let Err(e) = f.sync_data()
                    {
                        tracing::error!("fdatasync of segment {seg} failed: {e}");
                        ok = false;
                    }
                }
            }
            if ok && !chunks.is_empty() {
                self.fsyncs.fetch_add(1, Ordering::Relaxed);
                self.records_written.fetch_add(records, Ordering::Relaxed);
                // Only now may publishers be told their messages are safe.
                self.synced_tx.send_replace(seq);
            }
            if !ok {
                // Never confirm what is not on disk; retry the same data would risk
                // duplicates of partial writes, so stop confirming and say why.
                tracing::error!(
                    "message store write failed; persistent publishes will not be confirmed"
                );
                return;
            }
            // Keep only the newest segment's handle open.
            if let Some(&newest) = files.keys().next_back() {
                files.retain(|s, _| *s == newest);
            }
            for s in deletable {
                files.remove(&s);
                let path = segment_path(&self.dir, s);
                if let Err(e) = fs::remove_file(&path)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    tracing::warn!("cannot delete segment {}: {e}", path.display());
                }
            }
            if shutdown {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(sid: u64, q: &str, body: &str) -> StoredMessage {
        StoredMessage {
            sid,
            vhost: "/".into(),
            queue: q.into(),
            expires_at: None,
            exchange: "".into(),
            routing_key: q.into(),
            header_payload: vec![0, 60, 0, 0],
            body: body.as_bytes().to_vec(),
        }
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("warren-log-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    async fn wait_synced(log: &MessageLog, seq: u64) {
        let mut rx = log.synced();
        while *rx.borrow_and_update() < seq {
            rx.changed().await.unwrap();
        }
    }

    #[tokio::test]
    async fn records_survive_reopen_and_removes_apply() {
        let dir = tmp("reopen");
        let (log, rec) = MessageLog::open(&dir).unwrap();
        assert!(rec.messages.is_empty());
        for i in 1..=3 {
            log.append(&Record::Enqueue(msg(i, "q", &i.to_string())));
        }
        let seq = log.append(&Record::Remove {
            vhost: "/".into(),
            queue: "q".into(),
            sid: 2,
        });
        wait_synced(&log, seq).await;
        assert!(log.fsyncs.load(Ordering::Relaxed) >= 1);
        log.shutdown();
        let (log2, rec) = MessageLog::open(&dir).unwrap();
        let bodies: Vec<_> = rec.messages[&("/".into(), "q".into())]
            .iter()
            .map(|m| m.body.clone())
            .collect();
        assert_eq!(bodies, vec![b"1".to_vec(), b"3".to_vec()]);
        assert!(log2.next_sid() > 3);
        log2.shutdown();
    }

    #[tokio::test]
    async fn damage_keeps_the_prefix() {
        let dir = tmp("damage");
        let (log, _) = MessageLog::open(&dir).unwrap();
        let mut seq = 0;
        for i in 1..=10 {
            seq = log.append(&Record::Enqueue(msg(i, "q", "body")));
        }
        wait_synced(&log, seq).await;
        log.shutdown();
        std::thread::sleep(Duration::from_millis(50));
        // Flip a byte in the 6th record's payload.
        let path = segment_path(&dir, 1);
        let mut data = fs::read(&path).unwrap();
        let rec_len = data.len() / 10;
        data[5 * rec_len + 12] ^= 0xFF;
        fs::write(&path, &data).unwrap();
        let (log, rec) = MessageLog::open(&dir).unwrap();
        assert_eq!(rec.messages[&("/".into(), "q".into())].len(), 5);
        let report = &rec.segments[0];
        assert_eq!(report.records, 5);
        assert_eq!(report.lost_bytes as usize, 5 * rec_len);
        assert!(report.reason.as_deref().unwrap().contains("checksum"));
        log.shutdown();
    }

    #[tokio::test]
    async fn fully_acked_segments_are_deleted() {
        let dir = tmp("compact");
        let (log, _) = MessageLog::open(&dir).unwrap();
        let big = "x".repeat(1024 * 1024);
        let mut seq = 0;
        for i in 1..=40 {
            log.append(&Record::Enqueue(msg(i, "q", &big)));
            seq = log.append(&Record::Remove {
                vhost: "/".into(),
                queue: "q".into(),
                sid: i,
            });
        }
        wait_synced(&log, seq).await;
        // One more write lets the flusher delete what the last batch emptied.
        let s = log.append(&Record::Purge {
            vhost: "/".into(),
            queue: "none".into(),
        });
        wait_synced(&log, s).await;
        let segs = fs::read_dir(&dir).unwrap().count();
        assert!(
            segs <= 2,
            "{segs} segments left for 40 MiB published and acked"
        );
        log.shutdown();
    }
}
