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
//! The log knows where each live message's record is (segment, offset, length), so a queue
//! that paged a persistent message's body out of memory reads it back from here
//! ([`MessageLog::read`]) instead of keeping a second copy anywhere.
//!
//! Compaction: a segment pinned by a few old messages (one unacked message is enough) would
//! keep every later segment too, since only a prefix of segments may be deleted. A compactor
//! thread copies the live records of a mostly-dead prefix of segments to the head of the log,
//! verbatim, and deletes the prefix once the copies are synced (see [`Pending::compaction`] for
//! the choice and its bound on write amplification).
//!
//! Record framing: `len: u32 | crc32(payload): u32 | payload`. At start-up a record that is
//! truncated or fails its checksum ends the recovery of that segment; what came before it is
//! kept and the loss is logged precisely. Recovery reads one record at a time and keeps only
//! each live message's metadata: bodies stay on disk until a queue needs them.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Condvar, Mutex};
use tokio::sync::watch;

use super::Content;
use super::frame::{self, Cursor};

/// Segments roll over at this size.
pub const SEGMENT_BYTES: u64 = 16 * 1024 * 1024;
/// After a bad record, how much of what follows recovery reads to tell a torn tail from
/// damage in the middle.
const RESYNC_WINDOW: u64 = 64 * 1024 * 1024;

const REC_ENQUEUE: u8 = 1;
const REC_REMOVE: u8 = 2;
const REC_PURGE: u8 = 3;
const REC_DELIVERED: u8 = 4;
const REC_CLEAN: u8 = 5;

/// How long a read waits for the flusher to write a record appended moments before.
const READ_WAIT: Duration = Duration::from_secs(10);
/// Reads of neighbouring records closer than this are merged into one.
const READ_GAP: u64 = 64 * 1024;
/// Largest single read.
const READ_SPAN: u64 = 8 * 1024 * 1024;
/// Small records are copied into write buffers of this size; larger ones (message bodies)
/// are written from where they already are, so the publish path never copies a body and no
/// buffer ever grows past this.
const SMALL_RECORD: usize = 16 * 1024;
const WRITE_BUFFER: usize = 128 * 1024;

/// A persistent message in a durable queue, as appended to the log.
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

/// An enqueue record's fields, borrowed from the message being published (no copy of the
/// body before it is encoded into the write buffer).
#[derive(Debug, Clone, Copy)]
pub struct EnqueueRef<'a> {
    pub sid: u64,
    pub vhost: &'a str,
    pub queue: &'a str,
    pub expires_at: Option<u64>,
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub header_payload: &'a [u8],
    pub body: &'a [u8],
}

impl EnqueueRef<'_> {
    /// Encodes everything but the body (which goes right after, see [`frame::framed_head`]).
    fn encode_head(&self, out: &mut Vec<u8>) {
        frame::framed_head(
            out,
            |out| {
                out.push(REC_ENQUEUE);
                frame::put_str(out, self.vhost);
                frame::put_str(out, self.queue);
                out.extend_from_slice(&self.sid.to_be_bytes());
                out.extend_from_slice(&self.expires_at.unwrap_or(0).to_be_bytes());
                frame::put_str(out, self.exchange);
                frame::put_str(out, self.routing_key);
                frame::put_bytes(out, self.header_payload);
                out.extend_from_slice(&(self.body.len() as u32).to_be_bytes());
            },
            self.body,
        );
    }

    fn encode(&self, out: &mut Vec<u8>) {
        self.encode_head(out);
        out.extend_from_slice(self.body);
    }
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
    /// These messages have been delivered at least once (written lazily, with whatever is
    /// synced next: see [`MessageLog::mark_delivered`]).
    Delivered {
        sids: Vec<u64>,
    },
    /// The node stopped cleanly: every record before this one, delivery markers included, was
    /// written and synced. Only meaningful as the very last record of the log.
    Clean,
}

impl Record {
    pub fn encode(&self, out: &mut Vec<u8>) {
        if let Record::Enqueue(m) = self {
            return EnqueueRef {
                sid: m.sid,
                vhost: &m.vhost,
                queue: &m.queue,
                expires_at: m.expires_at,
                exchange: &m.exchange,
                routing_key: &m.routing_key,
                header_payload: &m.header_payload,
                body: &m.body,
            }
            .encode(out);
        }
        frame::framed(out, |out| match self {
            Record::Enqueue(_) => {}
            Record::Remove { vhost, queue, sid } => {
                out.push(REC_REMOVE);
                frame::put_str(out, vhost);
                frame::put_str(out, queue);
                out.extend_from_slice(&sid.to_be_bytes());
            }
            Record::Purge { vhost, queue } => {
                out.push(REC_PURGE);
                frame::put_str(out, vhost);
                frame::put_str(out, queue);
            }
            Record::Delivered { sids } => {
                out.push(REC_DELIVERED);
                out.extend_from_slice(&(sids.len() as u32).to_be_bytes());
                for sid in sids {
                    out.extend_from_slice(&sid.to_be_bytes());
                }
            }
            Record::Clean => out.push(REC_CLEAN),
        });
    }

    fn decode(p: &[u8]) -> Option<Record> {
        let rec = match Meta::decode(p)? {
            Meta::Enqueue { vhost, queue, .. } => {
                // Decoded again, whole: the metadata pass checked the layout.
                let mut r = Cursor::new(p);
                r.u8()?;
                r.bytes()?;
                r.bytes()?;
                let sid = r.u64()?;
                let exp = r.u64()?;
                Record::Enqueue(StoredMessage {
                    sid,
                    vhost: vhost.to_owned(),
                    queue: queue.to_owned(),
                    expires_at: (exp != 0).then_some(exp),
                    exchange: r.string()?,
                    routing_key: r.string()?,
                    header_payload: r.bytes()?.to_vec(),
                    body: r.bytes()?.to_vec(),
                })
            }
            Meta::Remove { vhost, queue, sid } => Record::Remove {
                vhost: vhost.to_owned(),
                queue: queue.to_owned(),
                sid,
            },
            Meta::Purge { vhost, queue } => Record::Purge {
                vhost: vhost.to_owned(),
                queue: queue.to_owned(),
            },
            Meta::Delivered(sids) => Record::Delivered {
                sids: sids.collect(),
            },
            Meta::Clean => Record::Clean,
        };
        Some(rec)
    }
}

/// A record's fields without copying anything (recovery reads only these).
enum Meta<'a> {
    Enqueue {
        vhost: &'a str,
        queue: &'a str,
        sid: u64,
        expires_at: Option<u64>,
        header_payload: &'a [u8],
        body_len: u64,
    },
    Remove {
        vhost: &'a str,
        queue: &'a str,
        sid: u64,
    },
    Purge {
        vhost: &'a str,
        queue: &'a str,
    },
    Delivered(SidList<'a>),
    Clean,
}

/// The message ids of a delivery marker, read in place.
#[derive(Clone)]
struct SidList<'a>(&'a [u8]);

impl Iterator for SidList<'_> {
    type Item = u64;
    fn next(&mut self) -> Option<u64> {
        let (head, rest) = self.0.split_first_chunk::<8>()?;
        self.0 = rest;
        Some(u64::from_be_bytes(*head))
    }
}

impl<'a> Meta<'a> {
    fn decode(p: &'a [u8]) -> Option<Meta<'a>> {
        let mut r = Cursor::new(p);
        let m = match r.u8()? {
            REC_ENQUEUE => {
                let vhost = r.str()?;
                let queue = r.str()?;
                let sid = r.u64()?;
                let exp = r.u64()?;
                r.str()?;
                r.str()?;
                let header_payload = r.bytes()?;
                let body_len = r.bytes()?.len() as u64;
                Meta::Enqueue {
                    vhost,
                    queue,
                    sid,
                    expires_at: (exp != 0).then_some(exp),
                    header_payload,
                    body_len,
                }
            }
            REC_REMOVE => Meta::Remove {
                vhost: r.str()?,
                queue: r.str()?,
                sid: r.u64()?,
            },
            REC_PURGE => Meta::Purge {
                vhost: r.str()?,
                queue: r.str()?,
            },
            REC_DELIVERED => {
                let n = r.u32()? as usize;
                Meta::Delivered(SidList(r.take(n.checked_mul(8)?)?))
            }
            REC_CLEAN => Meta::Clean,
            _ => return None,
        };
        r.done().then_some(m)
    }
}

/// What recovery found in one segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentReport {
    pub segment: u64,
    pub records: usize,
    /// Bytes that were discarded: a torn tail, or damaged records.
    pub lost_bytes: u64,
    pub reason: Option<String>,
    /// Good records follow a bad one: damage in the middle of the segment (bit rot, a lost
    /// sector, a file edited), not the torn tail a crash leaves.
    pub damaged: bool,
}

/// A live message found at start-up: what its queue needs to hold it without its body (which
/// stays in the log until [`MessageLog::read`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveredMessage {
    pub sid: u64,
    pub expires_at: Option<u64>,
    /// Body size in bytes.
    pub size: u64,
    pub priority: u8,
    /// It may have been delivered before: a delivery marker says so, or the node did not stop
    /// cleanly (markers are written lazily, so after a crash any message may have been).
    pub redelivered: bool,
}

/// Everything recovered at start-up: live messages per (vhost, queue), in publish order.
#[derive(Debug, Default)]
pub struct Recovered {
    pub messages: BTreeMap<(String, String), Vec<RecoveredMessage>>,
    pub segments: Vec<SegmentReport>,
    /// The previous run stopped cleanly (its last record is a clean-stop record).
    pub clean: bool,
}

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:08}.seg"))
}

/// Reads one segment of `size` bytes a record at a time (memory: one record), calling
/// `f(offset, framed length, payload)` for each good one; `f` returns false for a payload it
/// cannot decode.
///
/// A bad record (torn, failing its checksum, or undecodable) at the end of the segment is a
/// torn tail: what a crash during an append leaves, dropped. A bad record followed by good
/// ones is damage, reported as such: reading resumes after it when its length is intact (only
/// that record is lost), otherwise the rest of the segment is lost.
fn scan_records(
    mut r: impl Read + Seek,
    size: u64,
    segment: u64,
    mut f: impl FnMut(u64, u32, &[u8]) -> bool,
) -> std::io::Result<SegmentReport> {
    let mut at = 0u64;
    let mut records = 0;
    let mut reasons: Vec<String> = Vec::new();
    let mut damaged = false;
    let mut lost_bytes = 0;
    let mut payload = Vec::new();
    'records: while at < size {
        let bad = 'record: {
            if size - at < frame::HEADER as u64 {
                break 'record format!("truncated record header at offset {at}");
            }
            let mut h = [0u8; frame::HEADER];
            r.read_exact(&mut h)?;
            let (len, crc) = frame::header(&h);
            // The length is checked against the file before anything is allocated for it.
            if len as u64 > size - at - frame::HEADER as u64 {
                break 'record format!("truncated record of {len} bytes at offset {at}");
            }
            payload.resize(len, 0);
            r.read_exact(&mut payload)?;
            if crc32fast::hash(&payload) != crc {
                break 'record format!("checksum mismatch in record at offset {at}");
            }
            if !f(at, (frame::HEADER + len) as u32, &payload) {
                break 'record format!("undecodable record at offset {at}");
            }
            records += 1;
            at += (frame::HEADER + len) as u64;
            continue 'records;
        };
        // Torn tail or damage? Look at what follows (at most a window of the rest).
        let window = (size - at).min(RESYNC_WINDOW) as usize;
        let mut rest = vec![0; window];
        r.seek(SeekFrom::Start(at))?;
        r.read_exact(&mut rest)?;
        let next = frame::next_good_record(&rest, |p| Meta::decode(p).is_some());
        drop(rest);
        match next {
            None => {
                reasons.push(format!("{bad} (a torn tail)"));
                lost_bytes += size - at;
                break;
            }
            Some((skip, resumable)) => {
                damaged = true;
                let next = at + skip as u64;
                if resumable {
                    reasons.push(format!(
                        "DAMAGE in the middle of the segment: {bad}, good records follow at offset {next}; this record is lost, reading goes on"
                    ));
                    lost_bytes += skip as u64;
                    at = next;
                    r.seek(SeekFrom::Start(at))?;
                } else {
                    reasons.push(format!(
                        "DAMAGE in the middle of the segment: {bad}, its length is damaged too; a good record follows at offset {next} but cannot be trusted as a record boundary, the rest of the segment is lost"
                    ));
                    lost_bytes += size - at;
                    break;
                }
            }
        }
    }
    Ok(SegmentReport {
        segment,
        records,
        lost_bytes,
        reason: (!reasons.is_empty()).then(|| reasons.join("; ")),
        damaged,
    })
}

/// Where a live message's enqueue record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Loc {
    seg: u64,
    off: u64,
    len: u32,
}

/// What the log knows about a live message.
#[derive(Debug, Clone, Copy)]
struct Live {
    loc: Loc,
    /// Delivered at least once (a marker is written or waiting in `delivered`).
    delivered: bool,
}

/// A segment's size and what in it is still live.
#[derive(Debug, Default, Clone, Copy)]
struct SegInfo {
    size: u64,
    live: u64,
    live_bytes: u64,
}

/// A prefix of sealed segments worth compacting.
#[derive(Debug, Clone, Copy)]
struct Compaction {
    last: u64,
    dead: u64,
    live: u64,
}

struct Pending {
    /// Segments roll over at this size ([`SEGMENT_BYTES`] outside tests).
    segment_limit: u64,
    /// The compactor must stop (the log is closing).
    compactor_stop: bool,
    /// Encoded records not yet written, per segment number: write buffers of small records,
    /// and message bodies as published (shared, not copied).
    pieces: Vec<(u64, Bytes)>,
    /// The write buffer being filled, for segment `small_seg`.
    small: Vec<u8>,
    small_seg: u64,
    last_seq: u64,
    /// `last_seq` when the flusher last took the buffer.
    flushed_seq: u64,
    segment: u64,
    segment_bytes: u64,
    /// The enqueue record of each live message.
    locs: HashMap<u64, Live>,
    /// Messages delivered for the first time whose marker is not written yet.
    delivered: Vec<u64>,
    /// Every segment on disk or being written, oldest first.
    segs: BTreeMap<u64, SegInfo>,
    /// Segments to delete once the current batch is on disk.
    deletable: Vec<u64>,
    /// How far the flusher has written: (segment, bytes written to it).
    written: (u64, u64),
    shutdown: bool,
    /// A write or fsync failed (see [`MessageLog::failure`]): nothing more is buffered.
    failed: bool,
}

impl Pending {
    fn new(segment_limit: u64) -> Self {
        Pending {
            segment_limit,
            compactor_stop: false,
            delivered: Vec::new(),
            pieces: Vec::new(),
            small: Vec::new(),
            small_seg: 0,
            last_seq: 0,
            flushed_seq: 0,
            segment: 0,
            segment_bytes: 0,
            locs: HashMap::new(),
            segs: BTreeMap::new(),
            deletable: Vec::new(),
            written: (0, 0),
            shutdown: false,
            failed: false,
        }
    }

    fn track(&mut self, sid: u64, loc: Loc) {
        let live = Live {
            loc,
            delivered: false,
        };
        if let Some(old) = self.locs.insert(sid, live) {
            self.untrack(old.loc);
            if let Some(l) = self.locs.get_mut(&sid) {
                l.delivered = old.delivered;
            }
        }
        let s = self.segs.entry(loc.seg).or_default();
        s.live += 1;
        s.live_bytes += loc.len as u64;
    }

    fn untrack(&mut self, loc: Loc) {
        if let Some(s) = self.segs.get_mut(&loc.seg) {
            s.live = s.live.saturating_sub(1);
            s.live_bytes = s.live_bytes.saturating_sub(loc.len as u64);
        }
    }

    fn release(&mut self, sid: u64) {
        if let Some(live) = self.locs.remove(&sid) {
            self.untrack(live.loc);
        }
    }

    /// Appends one record with the delivery markers waiting, for messages still live (a
    /// message acked before its marker was written needs none).
    fn push_markers(&mut self) {
        if self.delivered.is_empty() {
            return;
        }
        let mut sids = std::mem::take(&mut self.delivered);
        sids.retain(|sid| self.locs.contains_key(sid));
        if sids.is_empty() {
            return;
        }
        let mut buf = Vec::with_capacity(16 + 8 * sids.len());
        Record::Delivered { sids }.encode(&mut buf);
        self.push(buf);
    }

    /// The prefix of sealed segments to compact, if any: among the prefixes whose live bytes
    /// are at most half their dead bytes and whose dead bytes are at least two segments, the
    /// one freeing the most (dead minus live: what is freed, less what is rewritten). Copying
    /// at most half as many bytes as a compaction frees bounds what compaction ever writes
    /// by what was appended (each byte copied is paid for by two bytes of garbage, and copies
    /// become garbage at most once each time: total copies ≤ total appended), and leaves the
    /// sealed segments at most three times their live bytes, plus two segments.
    fn compaction(&self) -> Option<Compaction> {
        let min_dead = 2 * self.segment_limit;
        let (mut size, mut live) = (0u64, 0u64);
        let mut best: Option<(u64, Compaction)> = None;
        for (&s, info) in self.segs.range(..self.segment) {
            size += info.size;
            live += info.live_bytes;
            let dead = size.saturating_sub(live);
            if dead >= min_dead && live * 2 <= dead {
                let gain = dead - live;
                if best.is_none_or(|(g, _)| gain > g) {
                    best = Some((
                        gain,
                        Compaction {
                            last: s,
                            dead,
                            live,
                        },
                    ));
                }
            }
        }
        best.map(|(_, c)| c)
    }

    /// Deletes the oldest segments while they hold nothing live. Only a prefix may go: a
    /// later segment can hold the removal records of messages enqueued in an older one, and
    /// deleting it first would bring those messages back at the next start.
    fn collect_dead_prefix(&mut self) {
        while let Some((&s, info)) = self.segs.iter().next() {
            if info.live != 0 || s >= self.segment {
                break;
            }
            self.segs.remove(&s);
            self.deletable.push(s);
        }
    }

    /// Adds an encoded record to the current segment (rolling over when it is full) and the
    /// write buffer; returns where it goes.
    fn push(&mut self, buf: Vec<u8>) -> Loc {
        self.push_parts(buf, None)
    }

    /// Adds a record made of `head` and then `tail` (a message body, written from where it
    /// is) to the current segment; returns where it goes.
    fn push_parts(&mut self, head: Vec<u8>, tail: Option<&Bytes>) -> Loc {
        let len = (head.len() + tail.map_or(0, Bytes::len)) as u64;
        if self.failed {
            // The log stopped writing: keep nothing (memory stays flat), and hand out a
            // sequence number that will never be synced.
            self.last_seq += 1;
            return Loc {
                seg: self.segment,
                off: self.segment_bytes,
                len: len as u32,
            };
        }
        if self.segment_bytes + len > self.segment_limit && self.segment_bytes > 0 {
            self.segment += 1;
            self.segment_bytes = 0;
            self.segs.entry(self.segment).or_default();
            self.collect_dead_prefix();
        }
        let loc = Loc {
            seg: self.segment,
            off: self.segment_bytes,
            len: len as u32,
        };
        self.segment_bytes += len;
        self.segs.entry(loc.seg).or_default().size = self.segment_bytes;
        if head.len() >= SMALL_RECORD {
            self.seal_small();
            self.pieces.push((loc.seg, Bytes::from(head)));
        } else {
            self.append_small(loc.seg, &head);
        }
        if let Some(t) = tail {
            if t.len() >= SMALL_RECORD {
                self.seal_small();
                self.pieces.push((loc.seg, t.clone()));
            } else {
                self.append_small(loc.seg, t);
            }
        }
        self.last_seq += 1;
        loc
    }

    fn append_small(&mut self, seg: u64, data: &[u8]) {
        if seg != self.small_seg || self.small.len() + data.len() > WRITE_BUFFER {
            self.seal_small();
            self.small_seg = seg;
        }
        if self.small.capacity() == 0 {
            self.small.reserve(WRITE_BUFFER);
        }
        self.small.extend_from_slice(data);
    }

    /// Moves the write buffer being filled behind what is queued for the flusher.
    fn seal_small(&mut self) {
        if !self.small.is_empty() {
            let b = std::mem::take(&mut self.small);
            self.pieces.push((self.small_seg, Bytes::from(b)));
        }
    }

    fn nothing_to_write(&self) -> bool {
        self.pieces.is_empty() && self.small.is_empty()
    }

    fn is_written(&self, loc: Loc) -> bool {
        loc.seg < self.written.0
            || (loc.seg == self.written.0 && loc.off + loc.len as u64 <= self.written.1)
    }
}

pub struct MessageLog {
    dir: PathBuf,
    pending: Mutex<Pending>,
    wake: Condvar,
    /// Signalled when the flusher has written more (readers of fresh records wait on it).
    written: Condvar,
    next_sid: AtomicU64,
    synced_tx: watch::Sender<u64>,
    /// The flusher thread, joined by [`MessageLog::close`].
    flusher: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Wakes the compactor (a segment was sealed).
    compact_wake: Condvar,
    compactor: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Compactions done and the bytes they copied, for operators and tests.
    pub compactions: AtomicU64,
    pub compacted_bytes: AtomicU64,
    /// Number of fsyncs and records written, for benchmarks and metrics.
    pub fsyncs: AtomicU64,
    pub records_written: AtomicU64,
    pub bytes_written: AtomicU64,
    /// Why the log stopped writing, once a write or fsync failed. Sticky: after a failed
    /// fsync the kernel may have dropped the dirty pages, so neither retrying nor appending
    /// after a possibly partial record is safe; only a restart (which recovers what is on
    /// disk and truncates a torn tail) brings the log back.
    failure: std::sync::OnceLock<String>,
    /// A fault the next write reports instead of writing (the fault-injecting layer of tests).
    injected: Mutex<Option<std::io::ErrorKind>>,
    /// Run before each fsync of the segments: what must be durable before any message the
    /// fsync makes durable (a clustered node's metadata journal, which declares the queues).
    before_sync: Mutex<Option<BeforeSync>>,
}

/// See [`MessageLog::set_before_sync`].
pub type BeforeSync = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

/// The recovery of one (vhost, queue): its live messages by sid (publish order).
type Recovering = BTreeMap<(String, String), BTreeMap<u64, RecoveredMessage>>;

impl MessageLog {
    /// Opens (creating) the log in `dir`, recovers what is there, and starts the flusher and
    /// the compactor.
    pub fn open(dir: &Path) -> std::io::Result<(Arc<Self>, Recovered)> {
        Self::open_with(dir, SEGMENT_BYTES)
    }

    /// [`Self::open`] with segments of `segment_limit` bytes (small ones in tests).
    pub fn open_with(dir: &Path, segment_limit: u64) -> std::io::Result<(Arc<Self>, Recovered)> {
        fs::create_dir_all(dir)?;
        let mut segs_on_disk: Vec<u64> = fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_suffix(".seg")?.parse().ok()
            })
            .collect();
        segs_on_disk.sort_unstable();
        let mut p = Pending::new(segment_limit);
        let (recovered, max_sid) = recover(&mut p, &segs_on_disk, |s| {
            let file = File::open(segment_path(dir, s))?;
            let size = file.metadata()?.len();
            Ok((BufReader::with_capacity(256 * 1024, file), size))
        })?;
        // New writes go to a fresh segment: a damaged tail is never appended to.
        p.segment = segs_on_disk.last().map_or(1, |s| s + 1);
        p.segs.entry(p.segment).or_default();
        p.written = (p.segment, 0);
        p.collect_dead_prefix();
        let log = Arc::new(MessageLog {
            dir: dir.to_owned(),
            pending: Mutex::new(p),
            wake: Condvar::new(),
            written: Condvar::new(),
            next_sid: AtomicU64::new(max_sid + 1),
            synced_tx: watch::channel(0).0,
            flusher: Mutex::new(None),
            compact_wake: Condvar::new(),
            compactor: Mutex::new(None),
            compactions: AtomicU64::new(0),
            compacted_bytes: AtomicU64::new(0),
            fsyncs: AtomicU64::new(0),
            records_written: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            failure: std::sync::OnceLock::new(),
            injected: Mutex::new(None),
            before_sync: Mutex::new(None),
        });
        let flusher = log.clone();
        let handle = std::thread::Builder::new()
            .name("warren-log-flusher".into())
            .spawn(move || flusher.flush_loop())?;
        *log.flusher.lock() = Some(handle);
        let compactor = log.clone();
        let handle = std::thread::Builder::new()
            .name("warren-log-compactor".into())
            .spawn(move || compactor.compact_loop())?;
        *log.compactor.lock() = Some(handle);
        Ok((log, recovered))
    }

    /// Runs `f` before every fsync of the segments; its failure fails the log (nothing the
    /// fsync would have made durable is confirmed).
    pub fn set_before_sync(&self, f: BeforeSync) {
        *self.before_sync.lock() = Some(f);
    }

    pub fn next_sid(&self) -> u64 {
        self.next_sid.fetch_add(1, Ordering::Relaxed)
    }

    /// Appends a record; returns the sequence number to wait for (see [`Self::synced`]).
    pub fn append(&self, rec: &Record) -> u64 {
        let mut buf = Vec::with_capacity(64);
        rec.encode(&mut buf);
        let mut p = self.pending.lock();
        let before = p.segment;
        let loc = p.push(buf);
        self.sealed(before, p.segment);
        match rec {
            Record::Enqueue(m) => p.track(m.sid, loc),
            Record::Remove { sid, .. } => {
                p.release(*sid);
                p.collect_dead_prefix();
            }
            Record::Purge { .. } | Record::Delivered { .. } | Record::Clean => {}
        }
        let seq = p.last_seq;
        drop(p);
        self.wake.notify_one();
        seq
    }

    /// A segment was sealed: the compactor looks whether there is work.
    fn sealed(&self, before: u64, now: u64) {
        if now != before {
            self.compact_wake.notify_one();
        }
    }

    /// Notes that a message has been delivered. The marker is written lazily — with the
    /// next batch the flusher writes, or within half a second when nothing else is — and
    /// never costs an fsync of its own; markers of messages removed before that are dropped.
    /// Recovery after a clean stop trusts the markers (a message without one comes back with
    /// `redelivered=false`); after a crash every message comes back redelivered.
    pub fn mark_delivered(&self, sid: u64) {
        let mut p = self.pending.lock();
        if p.failed {
            return;
        }
        if let Some(l) = p.locs.get_mut(&sid)
            && !l.delivered
        {
            l.delivered = true;
            p.delivered.push(sid);
        }
    }

    /// Appends an enqueue record (the publish path): `m.body` must be `body`'s bytes, which
    /// are written from where they are, not copied.
    pub fn append_enqueue(&self, m: &EnqueueRef<'_>, body: &Bytes) -> u64 {
        debug_assert_eq!(m.body.len(), body.len());
        let mut head = Vec::with_capacity(64 + m.header_payload.len());
        m.encode_head(&mut head);
        let mut p = self.pending.lock();
        let before = p.segment;
        let loc = p.push_parts(head, Some(body));
        self.sealed(before, p.segment);
        p.track(m.sid, loc);
        let seq = p.last_seq;
        drop(p);
        self.wake.notify_one();
        seq
    }

    /// Drops every message of a deleted (or vanished) queue: one purge record, and the log
    /// forgets `sids`, the queue's messages. Both under one lock, so nothing can be appended
    /// between the record and the forgetting.
    pub fn purge(&self, vhost: &str, queue: &str, sids: &[u64]) -> u64 {
        let mut buf = Vec::with_capacity(64);
        Record::Purge {
            vhost: vhost.to_owned(),
            queue: queue.to_owned(),
        }
        .encode(&mut buf);
        let mut p = self.pending.lock();
        p.push(buf);
        for sid in sids {
            p.release(*sid);
        }
        p.collect_dead_prefix();
        let seq = p.last_seq;
        drop(p);
        self.wake.notify_one();
        seq
    }

    /// Reads live messages back (a queue paging a body in). Records appended moments ago are
    /// waited for until the flusher has written them. Neighbouring records are read together.
    pub fn read(&self, sids: &[u64]) -> Vec<std::io::Result<Content>> {
        let mut out: Vec<Option<std::io::Result<Content>>> = sids.iter().map(|_| None).collect();
        let mut todo: Vec<usize> = (0..sids.len()).collect();
        for attempt in 0..3 {
            let mut by_seg: BTreeMap<u64, Vec<(usize, Loc)>> = BTreeMap::new();
            for (i, loc) in todo.iter().copied().zip(self.locate(sids, &todo)) {
                match loc {
                    Ok(loc) => by_seg.entry(loc.seg).or_default().push((i, loc)),
                    Err(e) => out[i] = Some(Err(e)),
                }
            }
            let mut retry = Vec::new();
            for (seg, items) in by_seg {
                let file = match File::open(segment_path(&self.dir, seg)) {
                    Ok(f) => f,
                    // The record moved on (a message removed meanwhile): look it up again.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound && attempt < 2 => {
                        retry.extend(items.iter().map(|(i, _)| *i));
                        continue;
                    }
                    Err(e) => {
                        for (i, _) in items {
                            out[i] = Some(Err(std::io::Error::new(e.kind(), e.to_string())));
                        }
                        continue;
                    }
                };
                let places: Vec<(u64, u64)> =
                    items.iter().map(|(_, l)| (l.off, l.len as u64)).collect();
                let (spans, which) = frame::plan_reads(&places, READ_GAP, READ_SPAN);
                let bufs: Vec<std::io::Result<Vec<u8>>> = spans
                    .iter()
                    .map(|s| {
                        let mut b = vec![0; s.len as usize];
                        file.read_exact_at(&mut b, s.off).map(|_| b)
                    })
                    .collect();
                for (k, (i, loc)) in items.into_iter().enumerate() {
                    let span = spans[which[k]];
                    out[i] = Some(match &bufs[which[k]] {
                        Ok(b) => {
                            let start = (loc.off - span.off) as usize;
                            decode_content(&b[start..start + loc.len as usize], sids[i])
                        }
                        Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
                    });
                }
            }
            todo = retry;
            if todo.is_empty() {
                break;
            }
        }
        out.into_iter()
            .map(|o| o.unwrap_or_else(|| Err(std::io::ErrorKind::NotFound.into())))
            .collect()
    }

    /// Where the records of `sids[i]` for `i` in `which` are, once they are written.
    fn locate(&self, sids: &[u64], which: &[usize]) -> Vec<std::io::Result<Loc>> {
        let deadline = Instant::now() + READ_WAIT;
        let mut p = self.pending.lock();
        loop {
            let locs: Vec<Option<Loc>> = which
                .iter()
                .map(|&i| p.locs.get(&sids[i]).map(|l| l.loc))
                .collect();
            let unwritten = locs.iter().flatten().any(|l| !p.is_written(*l));
            if !unwritten || p.failed || Instant::now() >= deadline {
                return locs
                    .into_iter()
                    .zip(which)
                    .map(|(l, &i)| match l {
                        Some(l) if p.is_written(l) => Ok(l),
                        Some(_) if p.failed => Err(std::io::Error::other(format!(
                            "message {} was never written: {}",
                            sids[i],
                            self.failure().unwrap_or("the message store failed")
                        ))),
                        Some(_) => Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!(
                                "message {} not written to the log in {READ_WAIT:?}",
                                sids[i]
                            ),
                        )),
                        None => Err(std::io::Error::new(
                            std::io::ErrorKind::NotFound,
                            format!("message {} is not in the log", sids[i]),
                        )),
                    })
                    .collect();
            }
            self.wake.notify_one();
            self.written.wait_until(&mut p, deadline);
        }
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

    /// Why the log stopped writing, if a write or fsync failed. From then on nothing appended
    /// is ever synced: publishers waiting for a confirm must be told no, and persistent
    /// messages must be refused rather than held in memory.
    pub fn failure(&self) -> Option<&str> {
        self.failure.get().map(String::as_str)
    }

    /// Makes the next write of the flusher fail with `kind`, as if the kernel had reported it
    /// (the fault-injecting layer of tests; the failure is as sticky as a real one).
    #[doc(hidden)]
    pub fn inject_fault(&self, kind: std::io::ErrorKind) {
        *self.injected.lock() = Some(kind);
        self.wake.notify_one();
    }

    /// Enters the failed state (once): drops everything buffered, wakes whoever waits for a
    /// sync or a write so they see the failure.
    fn fail(&self, why: String) {
        if self.failure.set(why.clone()).is_ok() {
            tracing::error!(
                "message store failed: {why}; persistent messages are refused and unconfirmed \
                 publishes nacked until the node is restarted"
            );
        }
        {
            let mut p = self.pending.lock();
            p.failed = true;
            p.pieces = Vec::new();
            p.small = Vec::new();
            p.delivered = Vec::new();
        }
        self.written.notify_all();
        self.compact_wake.notify_all();
        // Not a new sequence number: a wake-up, so waiters look at `failure`.
        self.synced_tx.send_modify(|_| {});
    }

    /// Stops the flusher after it wrote what is buffered, and waits for it — without the
    /// clean-stop record ([`Self::close`]): the next start treats this like a crash.
    pub fn shutdown(&self) {
        self.stop_compactor();
        self.pending.lock().shutdown = true;
        self.wake.notify_one();
        let handle = self.flusher.lock().take();
        if let Some(h) = handle
            && h.join().is_err()
        {
            tracing::error!("the message store's flusher panicked");
        }
    }

    /// A clean stop: everything appended is written and synced when this returns, and the
    /// flusher has stopped; the last record says so, and the next start trusts the delivery
    /// markers. Nothing may be appended afterwards.
    pub fn close(&self) {
        self.stop_compactor();
        {
            let mut p = self.pending.lock();
            if !p.shutdown {
                p.push_markers();
                let mut buf = Vec::new();
                Record::Clean.encode(&mut buf);
                p.push(buf);
            }
        }
        self.shutdown();
        tracing::info!(
            records = self.records_written.load(Ordering::Relaxed),
            fsyncs = self.fsyncs.load(Ordering::Relaxed),
            bytes = self.bytes_written.load(Ordering::Relaxed),
            "message store closed"
        );
    }

    fn stop_compactor(&self) {
        self.pending.lock().compactor_stop = true;
        self.compact_wake.notify_all();
        self.written.notify_all();
        let handle = self.compactor.lock().take();
        if let Some(h) = handle
            && h.join().is_err()
        {
            tracing::error!("the message store's compactor panicked");
        }
    }

    fn compact_loop(self: Arc<Self>) {
        loop {
            let plan = {
                let mut p = self.pending.lock();
                loop {
                    if p.compactor_stop || p.shutdown || p.failed {
                        return;
                    }
                    if let Some(plan) = p.compaction() {
                        break plan;
                    }
                    self.compact_wake
                        .wait_for(&mut p, Duration::from_millis(500));
                }
            };
            if let Err(e) = self.compact(plan) {
                // Nothing was deleted: the segments stay as they were.
                tracing::error!("message store compaction failed: {e}");
                std::thread::sleep(Duration::from_secs(5));
            }
        }
    }

    /// Copies the live records of segments up to `plan.last` to the head of the log, then
    /// has the flusher delete those segments once the copies are synced.
    fn compact(&self, plan: Compaction) -> std::io::Result<()> {
        let stopping = |p: &Pending| p.compactor_stop || p.shutdown || p.failed;
        // The prefix is sealed; wait until it is all written to its files.
        let mut todo: Vec<(u64, Loc)> = {
            let mut p = self.pending.lock();
            while p.written.0 <= plan.last && !stopping(&p) {
                self.written.wait_for(&mut p, Duration::from_millis(100));
            }
            if stopping(&p) {
                return Ok(());
            }
            p.locs
                .iter()
                .filter(|(_, l)| l.loc.seg <= plan.last)
                .map(|(sid, l)| (*sid, l.loc))
                .collect()
        };
        // In log order, so copies keep the order the originals had.
        todo.sort_unstable_by_key(|(_, l)| (l.seg, l.off));
        let (mut copied, mut count) = (0u64, 0usize);
        let mut at = 0;
        while at < todo.len() {
            // Batches of up to 4 MiB: read outside the lock, append under it.
            let mut end = at;
            let mut bytes = 0u64;
            while end < todo.len() && (end == at || bytes + todo[end].1.len as u64 <= 4 << 20) {
                bytes += todo[end].1.len as u64;
                end += 1;
            }
            let batch = &todo[at..end];
            at = end;
            let records = self.read_records(batch)?;
            let mut p = self.pending.lock();
            if stopping(&p) {
                return Ok(());
            }
            let before = p.segment;
            for ((sid, old), rec) in batch.iter().zip(records) {
                // Removed or moved meanwhile: nothing to copy.
                let Some(live) = p.locs.get(sid).copied() else {
                    continue;
                };
                if live.loc != *old {
                    continue;
                }
                copied += rec.len() as u64;
                count += 1;
                let new = p.push(rec);
                p.track(*sid, new);
                if live.delivered {
                    // Its marker may be in the prefix: write it again after the copy.
                    p.delivered.push(*sid);
                }
            }
            self.sealed(before, p.segment);
            drop(p);
            self.wake.notify_one();
        }
        let mut p = self.pending.lock();
        if p.locs.values().any(|l| l.loc.seg <= plan.last) {
            tracing::warn!(
                last = plan.last,
                "message store compaction left live messages behind; segments kept"
            );
            return Ok(());
        }
        let gone: Vec<u64> = p.segs.range(..=plan.last).map(|(s, _)| *s).collect();
        for s in &gone {
            p.segs.remove(s);
            p.deletable.push(*s);
        }
        drop(p);
        self.wake.notify_one();
        self.compactions.fetch_add(1, Ordering::Relaxed);
        self.compacted_bytes.fetch_add(copied, Ordering::Relaxed);
        tracing::info!(
            segments = gone.len(),
            last_segment = plan.last,
            messages = count,
            copied_bytes = copied,
            live_bytes_planned = plan.live,
            freed_bytes = plan.dead,
            "message store compacted: live records of mostly-dead segments copied to the head"
        );
        Ok(())
    }

    /// The framed records at `locs` (checked), read from their segment files.
    fn read_records(&self, locs: &[(u64, Loc)]) -> std::io::Result<Vec<Vec<u8>>> {
        let mut out: Vec<Vec<u8>> = vec![Vec::new(); locs.len()];
        let mut by_seg: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        for (i, (_, l)) in locs.iter().enumerate() {
            by_seg.entry(l.seg).or_default().push(i);
        }
        for (seg, items) in by_seg {
            let file = File::open(segment_path(&self.dir, seg))?;
            let places: Vec<(u64, u64)> = items
                .iter()
                .map(|&i| (locs[i].1.off, locs[i].1.len as u64))
                .collect();
            let (spans, which) = frame::plan_reads(&places, READ_GAP, READ_SPAN);
            let mut bufs = Vec::with_capacity(spans.len());
            for s in &spans {
                let mut b = vec![0; s.len as usize];
                file.read_exact_at(&mut b, s.off)?;
                bufs.push(b);
            }
            for (k, i) in items.into_iter().enumerate() {
                let span = spans[which[k]];
                let l = locs[i].1;
                let start = (l.off - span.off) as usize;
                let rec = &bufs[which[k]][start..start + l.len as usize];
                if frame::unframe(rec).is_none() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("damaged record in segment {seg} at offset {}", l.off),
                    ));
                }
                out[i] = rec.to_vec();
            }
        }
        Ok(out)
    }

    fn flush_loop(self: Arc<Self>) {
        let mut files: BTreeMap<u64, File> = BTreeMap::new();
        let mut last_report = Instant::now();
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
                last_report = Instant::now();
            }
            let (pieces, seq, deletable, shutdown, records) = {
                let mut p = self.pending.lock();
                let mut waited = false;
                while p.nothing_to_write() && p.deletable.is_empty() && !p.shutdown {
                    // Delivery markers alone wait for a pause of their own, then go.
                    if waited && !p.delivered.is_empty() {
                        break;
                    }
                    self.wake.wait_for(&mut p, Duration::from_millis(200));
                    waited = true;
                }
                p.push_markers();
                let records = p.last_seq - p.flushed_seq;
                p.flushed_seq = p.last_seq;
                p.seal_small();
                (
                    std::mem::take(&mut p.pieces),
                    p.last_seq,
                    std::mem::take(&mut p.deletable),
                    p.shutdown,
                    records,
                )
            };
            let mut failed: Option<String> = None;
            // Consecutive pieces of one segment go out in one writev.
            let mut chunks: Vec<(u64, Vec<&[u8]>, u64)> = Vec::new();
            for (seg, b) in &pieces {
                match chunks.last_mut() {
                    Some((s, parts, len)) if s == seg => {
                        parts.push(b);
                        *len += b.len() as u64;
                    }
                    _ => chunks.push((*seg, vec![&b[..]], b.len() as u64)),
                }
            }
            for (seg, parts, len) in &chunks {
                let file = match files.get_mut(seg) {
                    Some(f) => f,
                    None => match super::private_options()
                        .create(true)
                        .append(true)
                        .open(segment_path(&self.dir, *seg))
                    {
                        Ok(f) => files.entry(*seg).or_insert(f),
                        Err(e) => {
                            failed = Some(format!("cannot open segment {seg}: {e}"));
                            break;
                        }
                    },
                };
                let injected = self.injected.lock().take();
                let written = match injected {
                    Some(kind) => Err(std::io::Error::new(kind, "injected fault")),
                    None => frame::write_all_vectored(file, parts),
                };
                if let Err(e) = written {
                    failed = Some(format!("cannot write segment {seg}: {e}"));
                    break;
                }
                self.bytes_written.fetch_add(*len, Ordering::Relaxed);
                // Readable from now on (the page cache has it; durable after the sync).
                {
                    let mut p = self.pending.lock();
                    if *seg > p.written.0 {
                        p.written = (*seg, 0);
                    }
                    p.written.1 += len;
                }
                self.written.notify_all();
            }
            if failed.is_none()
                && !chunks.is_empty()
                && let Some(before) = self.before_sync.lock().as_ref()
                && let Err(why) = before()
            {
                failed = Some(why);
            }
            if failed.is_none() {
                for (seg, _, _) in &chunks {
                    if let Some(f) = files.get(seg)
                        && let Err(e) = f.sync_data()
                    {
                        failed = Some(format!("fdatasync of segment {seg} failed: {e}"));
                        break;
                    }
                }
            }
            if failed.is_none() && !chunks.is_empty() {
                self.fsyncs.fetch_add(1, Ordering::Relaxed);
                self.records_written.fetch_add(records, Ordering::Relaxed);
                // Only now may publishers be told their messages are safe.
                self.synced_tx.send_replace(seq);
            }
            if let Some(why) = failed {
                // Never confirm what is not on disk. Retrying is not safe either: a partial
                // write may have left half a record, and after a failed fsync the kernel may
                // have dropped the dirty pages while reporting the next fsync as a success.
                self.fail(why);
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

/// Rebuilds `p` (where each live message is, what each segment holds) and the queues' live
/// messages from the segments `segs`, oldest first, which `open` gives as a reader and its
/// size. Returns those messages and the highest message id seen.
fn recover<R: Read + Seek>(
    p: &mut Pending,
    segs: &[u64],
    mut open: impl FnMut(u64) -> std::io::Result<(R, u64)>,
) -> std::io::Result<(Recovered, u64)> {
    let mut reports = Vec::new();
    let mut recovering = Recovering::new();
    let mut max_sid = 0;
    // Whether the last record seen so far is a clean-stop record.
    let mut clean = false;
    let mut damaged = false;
    for &s in segs {
        p.segs.entry(s).or_default();
        let (reader, size) = open(s)?;
        let report = scan_records(reader, size, s, |off, len, payload| {
            let Some(meta) = Meta::decode(payload) else {
                return false;
            };
            p.segs.entry(s).or_default().size = off + len as u64;
            clean = matches!(meta, Meta::Clean);
            recover_record(p, &mut recovering, s, off, len, meta, &mut max_sid);
            true
        })?;
        damaged |= report.reason.is_some();
        match &report.reason {
            Some(why) if report.damaged => tracing::error!(
                segment = s,
                recovered_records = report.records,
                lost_bytes = report.lost_bytes,
                "message store DAMAGED (not a torn tail: good records follow bad ones; \
                 disk or file corruption): {why}; kept {} records, discarded {} bytes",
                report.records,
                report.lost_bytes
            ),
            Some(why) => tracing::warn!(
                segment = s,
                recovered_records = report.records,
                lost_bytes = report.lost_bytes,
                "message store segment ends with an incomplete record (an append cut off \
                 by a crash, never confirmed): {why}; kept the {} records before it, \
                 discarded {} bytes",
                report.records,
                report.lost_bytes
            ),
            None => {}
        }
        reports.push(report);
    }
    let clean = clean && !damaged;
    let recovered = Recovered {
        messages: recovering
            .into_iter()
            .filter(|(_, m)| !m.is_empty())
            .map(|(k, m)| {
                let list = m
                    .into_values()
                    .map(|mut r| {
                        let delivered = p.locs.get(&r.sid).is_some_and(|l| l.delivered);
                        r.redelivered = delivered || !clean;
                        r
                    })
                    .collect();
                (k, list)
            })
            .collect(),
        segments: reports,
        clean,
    };
    Ok((recovered, max_sid))
}

/// One record of recovery applied to what is being rebuilt.
fn recover_record(
    p: &mut Pending,
    recovering: &mut Recovering,
    seg: u64,
    off: u64,
    len: u32,
    meta: Meta<'_>,
    max_sid: &mut u64,
) {
    match meta {
        Meta::Enqueue {
            vhost,
            queue,
            sid,
            expires_at,
            header_payload,
            body_len,
        } => {
            *max_sid = (*max_sid).max(sid);
            let key = (vhost.to_owned(), queue.to_owned());
            // A later record of a message replaces the earlier one (compaction copies live
            // records verbatim). One naming another queue (a damaged log) takes the message
            // from that queue: it can only be in one, since only one record is tracked.
            if p.locs.contains_key(&sid)
                && !recovering.get(&key).is_some_and(|q| q.contains_key(&sid))
            {
                for q in recovering.values_mut() {
                    q.remove(&sid);
                }
            }
            p.track(sid, Loc { seg, off, len });
            let priority = crate::codec::decode_header(header_payload)
                .ok()
                .and_then(|h| *h.properties.priority())
                .unwrap_or(0);
            recovering.entry(key).or_default().insert(
                sid,
                RecoveredMessage {
                    sid,
                    expires_at,
                    size: body_len,
                    priority,
                    redelivered: true,
                },
            );
        }
        Meta::Remove { vhost, queue, sid } => {
            // Only a removal from the message's own queue releases its record: one naming
            // another queue (a damaged log) would leave the message live in its queue with its
            // segment no longer counted as holding it, and so deleted under it.
            let key = (vhost.to_owned(), queue.to_owned());
            if recovering
                .get_mut(&key)
                .is_some_and(|q| q.remove(&sid).is_some())
            {
                p.release(sid);
            }
        }
        Meta::Purge { vhost, queue } => {
            if let Some(q) = recovering.remove(&(vhost.to_owned(), queue.to_owned())) {
                for sid in q.into_keys() {
                    p.release(sid);
                }
            }
        }
        Meta::Delivered(sids) => {
            for sid in sids {
                if let Some(l) = p.locs.get_mut(&sid) {
                    l.delivered = true;
                }
            }
        }
        Meta::Clean => {}
    }
}

/// A message's content from its enqueue record's bytes (framing included).
fn decode_content(framed: &[u8], sid: u64) -> std::io::Result<Content> {
    let bad = |why: &str| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("message {sid}: {why}"),
        )
    };
    let payload = frame::unframe(framed).ok_or_else(|| bad("damaged record in the log"))?;
    match Record::decode(payload) {
        Some(Record::Enqueue(m)) if m.sid == sid => Ok(Content {
            exchange: m.exchange,
            routing_key: m.routing_key,
            header_payload: m.header_payload,
            body: m.body,
        }),
        _ => Err(bad("the log holds another record there")),
    }
}

/// Decodes `payload` as a record's payload and, if it is one, checks that encoding it again
/// gives the same bytes and that an enqueue record reads back as its content. For the fuzz
/// target; `Err` says what differed.
pub(crate) fn check_record(payload: &[u8]) -> Result<(), String> {
    let Some(rec) = Record::decode(payload) else {
        return Ok(());
    };
    let mut framed = Vec::new();
    rec.encode(&mut framed);
    if frame::unframe(&framed) != Some(payload) {
        return Err(format!(
            "{rec:?} encodes to other bytes than it was decoded from"
        ));
    }
    if let Record::Enqueue(m) = &rec {
        let c = decode_content(&framed, m.sid).map_err(|e| e.to_string())?;
        if (c.header_payload.as_slice(), c.body.as_slice()) != (&m.header_payload[..], &m.body[..])
        {
            return Err(format!("message {} reads back as other content", m.sid));
        }
    }
    Ok(())
}

/// Recovers a log whose segments are `segments` (in memory, oldest first) and checks what
/// recovery built: each recovered message is tracked exactly once, at the enqueue record of
/// that message in that queue, and each segment counts the live records in it (a segment
/// counted as holding nothing is deleted). For the fuzz target; `Err` says what is wrong.
pub(crate) fn recover_and_check(segments: &[&[u8]]) -> Result<Recovered, String> {
    let mut p = Pending::new(SEGMENT_BYTES);
    let ids: Vec<u64> = (1..=segments.len() as u64).collect();
    let (rec, max_sid) = recover(&mut p, &ids, |s| {
        let b = segments[(s - 1) as usize];
        Ok((std::io::Cursor::new(b), b.len() as u64))
    })
    .map_err(|e| format!("recovery failed: {e}"))?;
    let total: usize = rec.messages.values().map(Vec::len).sum();
    if total != p.locs.len() {
        return Err(format!(
            "{total} messages recovered but {} records tracked",
            p.locs.len()
        ));
    }
    for ((vhost, queue), list) in &rec.messages {
        for m in list {
            if m.sid > max_sid {
                return Err(format!("message {} above the highest id {max_sid}", m.sid));
            }
            let live = p
                .locs
                .get(&m.sid)
                .ok_or_else(|| format!("message {} in {vhost}/{queue} is not tracked", m.sid))?;
            let Loc { seg, off, len } = live.loc;
            let bytes = segments
                .get((seg - 1) as usize)
                .and_then(|b| b.get(off as usize..off as usize + len as usize))
                .ok_or_else(|| format!("message {} tracked outside its segment", m.sid))?;
            match frame::unframe(bytes).and_then(Record::decode) {
                Some(Record::Enqueue(e))
                    if e.sid == m.sid
                        && (&e.vhost, &e.queue) == (vhost, queue)
                        && e.body.len() as u64 == m.size => {}
                other => {
                    return Err(format!(
                        "message {} of {vhost}/{queue} is tracked at {other:?}",
                        m.sid
                    ));
                }
            }
        }
    }
    for (&s, info) in &p.segs {
        let (live, bytes) = p
            .locs
            .values()
            .filter(|l| l.loc.seg == s)
            .fold((0, 0), |(n, b), l| (n + 1, b + l.loc.len as u64));
        if (info.live, info.live_bytes) != (live, bytes) {
            return Err(format!(
                "segment {s} counts {} live records ({} bytes), holds {live} ({bytes} bytes)",
                info.live, info.live_bytes
            ));
        }
    }
    Ok(rec)
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

    fn sids(rec: &Recovered, q: &str) -> Vec<u64> {
        rec.messages[&("/".into(), q.into())]
            .iter()
            .map(|m| m.sid)
            .collect()
    }

    fn bodies(log: &MessageLog, sids: &[u64]) -> Vec<Vec<u8>> {
        log.read(sids)
            .into_iter()
            .map(|c| c.unwrap().body)
            .collect()
    }

    /// Recovery used to release a message's record on a removal naming another queue: the
    /// message stayed in its queue, its segment counted nothing live and was deleted at once,
    /// and the body could no longer be read.
    #[test]
    fn a_removal_naming_another_queue_leaves_the_message_alone() {
        let mut seg = Vec::new();
        Record::Enqueue(msg(1, "a", "x")).encode(&mut seg);
        Record::Remove {
            vhost: "/".into(),
            queue: "b".into(),
            sid: 1,
        }
        .encode(&mut seg);
        let rec = recover_and_check(&[&seg]).unwrap();
        assert_eq!(sids(&rec, "a"), [1]);
        let dir = tmp("remove-elsewhere");
        fs::create_dir_all(&dir).unwrap();
        fs::write(segment_path(&dir, 1), &seg).unwrap();
        let (log, rec) = MessageLog::open(&dir).unwrap();
        assert_eq!(sids(&rec, "a"), [1]);
        assert_eq!(bodies(&log, &[1]), vec![b"x".to_vec()]);
        log.close();
        // The same id enqueued again in another queue: the later record wins, in one queue.
        let mut seg = Vec::new();
        Record::Enqueue(msg(1, "a", "x")).encode(&mut seg);
        Record::Enqueue(msg(1, "b", "y")).encode(&mut seg);
        let rec = recover_and_check(&[&seg]).unwrap();
        assert!(!rec.messages.contains_key(&("/".into(), "a".into())));
        assert_eq!(sids(&rec, "b"), [1]);
    }

    #[tokio::test]
    async fn records_survive_reopen_and_removes_apply() {
        let dir = tmp("reopen");
        let (log, rec) = MessageLog::open(&dir).unwrap();
        assert!(rec.messages.is_empty());
        for i in 1..=3 {
            log.append(&Record::Enqueue(msg(i, "q", &i.to_string())));
        }
        // Readable at once (the read waits for the flusher).
        assert_eq!(bodies(&log, &[2]), vec![b"2".to_vec()]);
        let seq = log.append(&Record::Remove {
            vhost: "/".into(),
            queue: "q".into(),
            sid: 2,
        });
        wait_synced(&log, seq).await;
        assert!(log.fsyncs.load(Ordering::Relaxed) >= 1);
        assert!(log.read(&[2])[0].is_err(), "a removed message is gone");
        log.close();
        let (log2, rec) = MessageLog::open(&dir).unwrap();
        let recovered = &rec.messages[&("/".into(), "q".into())];
        assert_eq!(recovered[0].size, 1);
        assert_eq!(sids(&rec, "q"), vec![1, 3]);
        assert_eq!(bodies(&log2, &[3, 1]), vec![b"3".to_vec(), b"1".to_vec()]);
        assert!(log2.next_sid() > 3);
        log2.close();
    }

    #[tokio::test]
    async fn purge_forgets_a_queue() {
        let dir = tmp("purge");
        let (log, _) = MessageLog::open(&dir).unwrap();
        for i in 1..=4 {
            log.append(&Record::Enqueue(msg(
                i,
                if i % 2 == 0 { "a" } else { "b" },
                "x",
            )));
        }
        log.purge("/", "a", &[2, 4]);
        assert!(log.read(&[2])[0].is_err());
        log.close();
        let (log, rec) = MessageLog::open(&dir).unwrap();
        assert!(!rec.messages.contains_key(&("/".into(), "a".into())));
        assert_eq!(sids(&rec, "b"), vec![1, 3]);
        log.close();
    }

    /// Ten records of equal size in segment 1; returns the segment's path and a record's size.
    async fn ten_records(dir: &Path) -> (PathBuf, usize) {
        let (log, _) = MessageLog::open(dir).unwrap();
        let mut seq = 0;
        for i in 1..=10 {
            seq = log.append(&Record::Enqueue(msg(i, "q", "body")));
        }
        wait_synced(&log, seq).await;
        log.shutdown();
        let path = segment_path(dir, 1);
        let len = fs::metadata(&path).unwrap().len() as usize;
        (path, len / 10)
    }

    #[tokio::test]
    async fn a_torn_tail_is_dropped_quietly() {
        let dir = tmp("torn");
        let (path, rec_len) = ten_records(&dir).await;
        // The last append cut off halfway, then the file extended with zeros (what some
        // file systems leave after a crash).
        let mut data = fs::read(&path).unwrap();
        data.truncate(9 * rec_len + rec_len / 2);
        data.extend_from_slice(&[0; 100]);
        fs::write(&path, &data).unwrap();
        let (log, rec) = MessageLog::open(&dir).unwrap();
        assert_eq!(sids(&rec, "q"), (1..=9).collect::<Vec<_>>());
        let report = &rec.segments[0];
        assert!(!report.damaged, "{report:?}");
        assert_eq!(report.records, 9);
        assert_eq!(report.lost_bytes as usize, rec_len / 2 + 100);
        assert!(report.reason.as_deref().unwrap().contains("torn tail"));
        log.close();
    }

    #[tokio::test]
    async fn damage_in_the_middle_is_reported_and_skipped() {
        let dir = tmp("damage");
        let (path, rec_len) = ten_records(&dir).await;
        // Flip a byte in the 6th record's payload: records 7..10 are intact after it.
        let good = fs::read(&path).unwrap();
        let mut data = good.clone();
        data[5 * rec_len + 12] ^= 0xFF;
        fs::write(&path, &data).unwrap();
        let (log, rec) = MessageLog::open(&dir).unwrap();
        assert_eq!(sids(&rec, "q"), [1, 2, 3, 4, 5, 7, 8, 9, 10]);
        let report = &rec.segments[0];
        assert!(report.damaged, "{report:?}");
        assert_eq!(report.records, 9);
        assert_eq!(report.lost_bytes as usize, rec_len);
        let why = report.reason.as_deref().unwrap();
        assert!(why.contains("DAMAGE"), "{why}");
        assert!(why.contains(&format!("offset {}", 5 * rec_len)), "{why}");
        assert!(!rec.clean);
        log.close();
        // A length field pointing far past the end of the file, with good records after it:
        // damage too (no allocation of gigabytes), but the rest cannot be trusted.
        let dir = tmp("damage-len");
        let (path, rec_len) = ten_records(&dir).await;
        let mut data = fs::read(&path).unwrap();
        data[2 * rec_len..2 * rec_len + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        fs::write(&path, &data).unwrap();
        let (log, rec) = MessageLog::open(&dir).unwrap();
        let report = &rec.segments[0];
        assert_eq!(report.records, 2);
        assert!(report.damaged, "{report:?}");
        assert!(report.reason.as_deref().unwrap().contains("truncated"));
        log.close();
    }

    #[tokio::test]
    async fn a_failed_write_is_sticky_nothing_more_is_kept_or_confirmed() {
        let dir = tmp("fault");
        let (log, _) = MessageLog::open(&dir).unwrap();
        let seq = log.append(&Record::Enqueue(msg(1, "q", "before")));
        wait_synced(&log, seq).await;
        assert!(log.failure().is_none());
        let mut rx = log.synced();
        rx.borrow_and_update();
        log.inject_fault(std::io::ErrorKind::StorageFull);
        let lost = log.append(&Record::Enqueue(msg(2, "q", "lost")));
        // Waiters are woken and see the failure; the sequence number is never synced.
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .unwrap()
            .unwrap();
        let why = log.failure().unwrap().to_owned();
        assert!(why.contains("injected fault"), "{why}");
        assert!(log.synced_now() < lost);
        // Reading the unwritten message fails at once, not after a timeout.
        let t = Instant::now();
        assert!(log.read(&[2])[0].is_err());
        assert!(t.elapsed() < Duration::from_secs(1));
        // Nothing more is buffered: a megabyte body appended after the failure is dropped.
        let body = Bytes::from(vec![b'x'; 1 << 20]);
        for sid in 3..50 {
            let m = EnqueueRef {
                sid,
                vhost: "/",
                queue: "q",
                expires_at: None,
                exchange: "",
                routing_key: "q",
                header_payload: &[0, 60, 0, 0],
                body: &body,
            };
            assert!(log.append_enqueue(&m, &body) > log.synced_now());
        }
        {
            let p = log.pending.lock();
            assert!(p.pieces.is_empty() && p.small.is_empty());
        }
        assert_eq!(log.failure(), Some(why.as_str()));
        log.close();
        // What was synced before the failure survives a restart.
        let (log, rec) = MessageLog::open(&dir).unwrap();
        assert_eq!(sids(&rec, "q"), [1]);
        log.close();
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
        log.close();
    }

    #[tokio::test]
    async fn delivery_markers_count_after_a_clean_stop_only() {
        let dir = tmp("markers");
        let (log, rec) = MessageLog::open(&dir).unwrap();
        assert!(!rec.clean, "a new log has no clean stop behind it");
        for i in 1..=4 {
            log.append(&Record::Enqueue(msg(i, "q", "x")));
        }
        log.mark_delivered(2);
        log.mark_delivered(3);
        log.mark_delivered(3);
        // 3 is acked before its marker is written: no marker needed.
        log.append(&Record::Remove {
            vhost: "/".into(),
            queue: "q".into(),
            sid: 3,
        });
        log.close();
        let flags = |rec: &Recovered| -> Vec<(u64, bool)> {
            rec.messages[&("/".into(), "q".into())]
                .iter()
                .map(|m| (m.sid, m.redelivered))
                .collect()
        };
        let (log, rec) = MessageLog::open(&dir).unwrap();
        assert!(rec.clean);
        assert_eq!(flags(&rec), vec![(1, false), (2, true), (4, false)]);
        // A crash (no clean-stop record at the end): every message may have been delivered.
        log.append(&Record::Enqueue(msg(5, "q", "x")));
        log.shutdown();
        let (log, rec) = MessageLog::open(&dir).unwrap();
        assert!(!rec.clean);
        assert_eq!(
            flags(&rec),
            vec![(1, true), (2, true), (4, true), (5, true)]
        );
        // (The queue runtime marks what it restored as redelivered again; here 4 and 5 are
        // not.) Markers written lazily, without a close, are there after the next clean stop.
        log.mark_delivered(1);
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(
            log.fsyncs.load(Ordering::Relaxed) >= 1,
            "markers alone get written"
        );
        log.close();
        let (log, rec) = MessageLog::open(&dir).unwrap();
        assert_eq!(
            flags(&rec),
            vec![(1, true), (2, true), (4, false), (5, false)]
        );
        log.close();
    }

    fn segment_files(dir: &Path) -> usize {
        fs::read_dir(dir).unwrap().count()
    }

    #[tokio::test]
    async fn compaction_keeps_the_log_small_around_a_stuck_message() {
        let dir = tmp("compaction");
        let (log, _) = MessageLog::open_with(&dir, 64 * 1024).unwrap();
        // One old message that is never acked, delivered once.
        log.append(&Record::Enqueue(msg(1, "stuck", "old")));
        log.mark_delivered(1);
        let body = "x".repeat(4000);
        let mut most = 0;
        // ~8 MiB published and acked: 120 segments of 64 KiB.
        for i in 2..2000 {
            log.append(&Record::Enqueue(msg(i, "q", &body)));
            let seq = log.append(&Record::Remove {
                vhost: "/".into(),
                queue: "q".into(),
                sid: i,
            });
            if i % 50 == 0 {
                wait_synced(&log, seq).await;
                tokio::time::sleep(Duration::from_millis(5)).await;
                most = most.max(segment_files(&dir));
            }
        }
        assert!(log.compactions.load(Ordering::Relaxed) > 5);
        // Two dead segments trigger a compaction: the pinned one, those two, the current one,
        // and what the compactor has not caught up with yet.
        assert!(most <= 10, "{most} segment files at once");
        let copied = log.compacted_bytes.load(Ordering::Relaxed);
        assert!(
            copied < 100 * 1024,
            "{copied} bytes copied for one small message"
        );
        // Still readable where it is now.
        assert_eq!(log.read(&[1])[0].as_ref().unwrap().body, b"old");
        log.close();
        let (log, rec) = MessageLog::open_with(&dir, 64 * 1024).unwrap();
        assert!(rec.clean);
        let stuck = &rec.messages[&("/".into(), "stuck".into())];
        assert_eq!(
            (stuck.len(), stuck[0].redelivered),
            (1, true),
            "marker kept"
        );
        assert!(!rec.messages.contains_key(&("/".into(), "q".into())));
        assert_eq!(log.read(&[1])[0].as_ref().unwrap().body, b"old");
        log.close();
    }

    #[tokio::test]
    async fn a_copy_and_its_original_recover_as_one_message() {
        // A crash between a compaction's copy and the deletion of the original's segment.
        let dir = tmp("dupe");
        let (log, _) = MessageLog::open_with(&dir, 4096).unwrap();
        log.append(&Record::Enqueue(msg(1, "q", "one")));
        log.append(&Record::Enqueue(msg(2, "q", &"y".repeat(5000))));
        log.append(&Record::Enqueue(msg(1, "q", "one")));
        log.append(&Record::Enqueue(msg(3, "q", "three")));
        log.shutdown();
        let (log, rec) = MessageLog::open_with(&dir, 4096).unwrap();
        assert_eq!(sids(&rec, "q"), vec![1, 2, 3]);
        assert_eq!(bodies(&log, &[1]), vec![b"one".to_vec()]);
        log.close();
    }

    #[tokio::test]
    async fn reads_across_segments_and_in_any_order() {
        let dir = tmp("read");
        let (log, _) = MessageLog::open(&dir).unwrap();
        // ~40 MiB: three segments, read back in a scrambled order in one call.
        let n = 40u64;
        for i in 1..=n {
            let body = format!("{i:>8}").repeat(128 * 1024);
            log.append(&Record::Enqueue(msg(i, "q", &body)));
        }
        let want: Vec<u64> = (1..=n).rev().step_by(3).chain([1, 2]).collect();
        for (sid, c) in want.iter().zip(log.read(&want)) {
            let c = c.unwrap();
            assert_eq!(c.body.len(), 1024 * 1024);
            assert_eq!(&c.body[..8], format!("{sid:>8}").as_bytes());
            assert_eq!(c.routing_key, "q");
        }
        assert!(fs::read_dir(&dir).unwrap().count() >= 3);
        log.close();
    }
}
