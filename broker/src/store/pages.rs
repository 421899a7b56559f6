//! Page files: where the bodies of messages that have no copy in the message log (transient
//! messages, and any message of a transient queue) go when memory is short.
//!
//! Nothing here must survive a restart — those messages would not either — so page files are
//! never synced, and every page file is deleted when the node starts. Files are written in
//! batches (one `write` for every message a queue pages out at once) into segments of
//! [`PAGE_SEGMENT_BYTES`]; each segment counts the messages still in it and is deleted when
//! the last one is released. Unlike the message log, a page file can go in any order: nothing
//! is ever replayed from it.
//!
//! A page file that keeps a few messages for long (unacked, or far back in a queue) does not
//! keep the space of the others: released neighbours are merged into runs, and once a run
//! holds [`PUNCH_MIN`] bytes of whole filesystem blocks not yet given back, a hole is punched
//! over it (`fallocate(PUNCH_HOLE)`; the file keeps its size, the blocks are freed). So the
//! disk a page file uses is its live messages plus less than `PUNCH_MIN` and two blocks per
//! run between them, instead of the whole file.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

use super::Content;
use super::frame::{self, Cursor};

/// Page files roll over at this size.
pub const PAGE_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
const READ_GAP: u64 = 64 * 1024;
const READ_SPAN: u64 = 8 * 1024 * 1024;
/// A run of released messages is punched out of its page file once it holds this many bytes
/// of whole blocks not punched yet (so a syscall frees at least this much).
pub const PUNCH_MIN: u64 = 128 * 1024;
/// Holes are punched in whole blocks of this size (ext4's and xfs's usual block size; a
/// larger filesystem block only frees less, never something live).
const BLOCK: u64 = 4096;

/// Where a paged message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageLoc {
    pub seg: u64,
    pub off: u64,
    pub len: u32,
}

struct Inner {
    seg: u64,
    seg_bytes: u64,
    file: Option<File>,
    /// Each page file's live messages and released runs.
    segs: HashMap<u64, Segment>,
}

#[derive(Default)]
struct Segment {
    /// Messages still in the file.
    live: u64,
    /// Released runs of neighbouring records: start -> (end, bytes of it already punched).
    dead: BTreeMap<u64, (u64, u64)>,
}

impl Segment {
    /// Adds the released record `[start, end)` to the runs; returns the block-aligned range to
    /// punch if its run now has `PUNCH_MIN` bytes of whole blocks not punched yet.
    fn release(&mut self, start: u64, end: u64) -> Option<(u64, u64)> {
        let (mut from, mut to, mut punched) = (start, end, 0);
        let before = self
            .dead
            .range(..=start)
            .next_back()
            .map(|(s, (e, p))| (*s, *e, *p));
        if let Some((s, e, p)) = before {
            if e > start {
                // Released twice: a bug elsewhere; never punch over what may be live.
                return None;
            }
            if e == start {
                self.dead.remove(&s);
                from = s;
                punched += p;
            }
        }
        if let Some((e, p)) = self.dead.remove(&end) {
            to = e;
            punched += p;
        }
        let (a, b) = (from.next_multiple_of(BLOCK), to / BLOCK * BLOCK);
        let whole = b.saturating_sub(a);
        let punch = if whole >= punched + PUNCH_MIN {
            punched = whole;
            Some((a, b))
        } else {
            None
        };
        self.dead.insert(from, (to, punched));
        punch
    }
}

pub struct PageStore {
    dir: PathBuf,
    inner: Mutex<Inner>,
    /// Cleared when the filesystem cannot punch holes (page files then only go whole).
    can_punch: AtomicBool,
}

fn page_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:08}.page"))
}

impl PageStore {
    /// Opens the page directory, deleting what a previous run left there.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        fs::create_dir_all(dir)?;
        for e in fs::read_dir(dir)?.flatten() {
            if e.file_name().to_string_lossy().ends_with(".page") {
                fs::remove_file(e.path())?;
            }
        }
        Ok(Self {
            dir: dir.to_owned(),
            inner: Mutex::new(Inner {
                seg: 1,
                seg_bytes: 0,
                file: None,
                segs: HashMap::new(),
            }),
            can_punch: AtomicBool::new(true),
        })
    }

    /// Writes messages (exchange, routing key, content header payload, body) with one
    /// `writev` (bodies are not copied); returns where each went.
    pub fn write(&self, msgs: &[(&str, &str, &[u8], &[u8])]) -> std::io::Result<Vec<PageLoc>> {
        let mut heads = Vec::with_capacity(msgs.len());
        let mut lens = Vec::with_capacity(msgs.len());
        for (exchange, routing_key, header, body) in msgs {
            let mut head =
                Vec::with_capacity(32 + exchange.len() + routing_key.len() + header.len());
            frame::framed_head(
                &mut head,
                |out| {
                    frame::put_str(out, exchange);
                    frame::put_str(out, routing_key);
                    frame::put_bytes(out, header);
                    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
                },
                body,
            );
            lens.push((head.len() + body.len()) as u32);
            heads.push(head);
        }
        let parts: Vec<&[u8]> = heads
            .iter()
            .zip(msgs)
            .flat_map(|(h, m)| [&h[..], m.3])
            .collect();
        let total: u64 = lens.iter().map(|l| *l as u64).sum();
        let mut g = self.inner.lock();
        if g.seg_bytes > 0 && g.seg_bytes + total > PAGE_SEGMENT_BYTES {
            let old = g.seg;
            g.file = None;
            g.seg += 1;
            g.seg_bytes = 0;
            if g.segs.get(&old).is_none_or(|s| s.live == 0) {
                g.segs.remove(&old);
                self.delete(old);
            }
        }
        let seg = g.seg;
        if g.file.is_none() {
            g.file = Some(
                super::private_options()
                    .create(true)
                    .append(true)
                    .open(page_path(&self.dir, seg))?,
            );
        }
        let written = match g.file.as_mut() {
            Some(f) => frame::write_all_vectored(f, &parts),
            None => Ok(()),
        };
        if let Err(e) = written {
            // What reached the file is unknown: continue in a fresh one.
            g.file = None;
            g.seg += 1;
            g.seg_bytes = 0;
            return Err(e);
        }
        let mut off = g.seg_bytes;
        let locs = lens
            .into_iter()
            .map(|len| {
                let loc = PageLoc { seg, off, len };
                off += len as u64;
                loc
            })
            .collect::<Vec<_>>();
        g.seg_bytes = off;
        g.segs.entry(seg).or_default().live += locs.len() as u64;
        Ok(locs)
    }

    /// Reads messages back; neighbours are read together.
    pub fn read(&self, locs: &[PageLoc]) -> Vec<std::io::Result<Content>> {
        let mut out: Vec<Option<std::io::Result<Content>>> = locs.iter().map(|_| None).collect();
        let mut by_seg: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        for (i, l) in locs.iter().enumerate() {
            by_seg.entry(l.seg).or_default().push(i);
        }
        for (seg, items) in by_seg {
            let file = match File::open(page_path(&self.dir, seg)) {
                Ok(f) => f,
                Err(e) => {
                    for i in items {
                        out[i] = Some(Err(std::io::Error::new(e.kind(), e.to_string())));
                    }
                    continue;
                }
            };
            let places: Vec<(u64, u64)> = items
                .iter()
                .map(|&i| (locs[i].off, locs[i].len as u64))
                .collect();
            let (spans, which) = frame::plan_reads(&places, READ_GAP, READ_SPAN);
            let bufs: Vec<std::io::Result<Vec<u8>>> = spans
                .iter()
                .map(|s| {
                    let mut b = vec![0; s.len as usize];
                    file.read_exact_at(&mut b, s.off).map(|_| b)
                })
                .collect();
            for (k, i) in items.into_iter().enumerate() {
                let span = spans[which[k]];
                out[i] = Some(match &bufs[which[k]] {
                    Ok(b) => {
                        let start = (locs[i].off - span.off) as usize;
                        decode(&b[start..start + locs[i].len as usize])
                    }
                    Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
                });
            }
        }
        out.into_iter()
            .map(|o| o.unwrap_or_else(|| Err(std::io::ErrorKind::NotFound.into())))
            .collect()
    }

    /// The message at `loc` is no longer needed; a page file is deleted with its last one, and
    /// until then gives back the blocks of runs of released messages.
    pub fn release(&self, loc: PageLoc) {
        let punch = {
            let mut g = self.inner.lock();
            let current = g.seg;
            let Some(s) = g.segs.get_mut(&loc.seg) else {
                return;
            };
            s.live = s.live.saturating_sub(1);
            if s.live == 0 && loc.seg != current {
                g.segs.remove(&loc.seg);
                self.delete(loc.seg);
                return;
            }
            s.release(loc.off, loc.off + loc.len as u64)
        };
        // Outside the lock: writers and readers go on meanwhile. Segment numbers are never
        // reused, so a file deleted in between is simply not found.
        if let Some((a, b)) = punch
            && self.can_punch.load(Ordering::Relaxed)
        {
            self.punch(loc.seg, a, b);
        }
    }

    fn punch(&self, seg: u64, from: u64, to: u64) {
        let path = page_path(&self.dir, seg);
        let file = match OpenOptions::new().write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                tracing::warn!(
                    "cannot open page file {} to free space: {e}",
                    path.display()
                );
                return;
            }
        };
        let flags = rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE;
        if let Err(e) = rustix::fs::fallocate(&file, flags, from, to - from) {
            if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::NOSYS {
                self.can_punch.store(false, Ordering::Relaxed);
                tracing::info!(
                    "the filesystem of {} cannot punch holes: page files free their space only when their last message goes",
                    self.dir.display()
                );
            } else {
                tracing::warn!("cannot free space in page file {}: {e}", path.display());
            }
        }
    }

    /// Page files on disk now (for tests and metrics).
    pub fn files(&self) -> usize {
        fs::read_dir(&self.dir).map_or(0, |d| d.count())
    }

    /// Bytes the page files take on disk (allocated blocks, so punched holes do not count).
    pub fn disk_bytes(&self) -> u64 {
        fs::read_dir(&self.dir).map_or(0, |d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.blocks() * 512)
                .sum()
        })
    }

    fn delete(&self, seg: u64) {
        let path = page_path(&self.dir, seg);
        if let Err(e) = fs::remove_file(&path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!("cannot delete page file {}: {e}", path.display());
        }
    }
}

pub(crate) fn decode(framed: &[u8]) -> std::io::Result<Content> {
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "damaged page record");
    let payload = frame::unframe(framed).ok_or_else(bad)?;
    let mut r = Cursor::new(payload);
    let c = Content {
        exchange: r.string().ok_or_else(bad)?,
        routing_key: r.string().ok_or_else(bad)?,
        header_payload: r.bytes().ok_or_else(bad)?.to_vec(),
        body: r.bytes().ok_or_else(bad)?.to_vec(),
    };
    if !r.done() {
        return Err(bad());
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_read_release() {
        let dir = std::env::temp_dir().join(format!("warren-pages-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("00000007.page"), b"left over").unwrap();
        let store = PageStore::open(&dir).unwrap();
        assert_eq!(store.files(), 0, "a previous run's pages are deleted");
        let body = vec![7u8; 1000];
        let locs = store
            .write(&[("ex", "a", b"\x00\x3c", &body), ("", "b", b"h", b"")])
            .unwrap();
        let more = store.write(&[("x", "c", b"h", b"tail")]).unwrap();
        let got = store.read(&[more[0], locs[1], locs[0]]);
        let got: Vec<Content> = got.into_iter().map(Result::unwrap).collect();
        assert_eq!(got[0].body, b"tail");
        assert_eq!(got[1].routing_key, "b");
        assert_eq!((got[2].exchange.as_str(), got[2].body.len()), ("ex", 1000));
        // The current file stays while written to; an older one goes with its last message.
        for l in locs.iter().chain(&more) {
            store.release(*l);
        }
        assert_eq!(store.files(), 1);
        let big = vec![0u8; PAGE_SEGMENT_BYTES as usize];
        let l = store.write(&[("", "big", b"", &big)]).unwrap();
        let l2 = store.write(&[("", "next", b"", b"x")]).unwrap();
        assert_ne!(l[0].seg, l2[0].seg);
        store.release(l[0]);
        assert_eq!(store.files(), 1, "the full file went with its only message");
        assert_eq!(store.read(&l2)[0].as_ref().unwrap().body, b"x");
        // A damaged record is an error, not a panic.
        let path = page_path(&dir, l2[0].seg);
        let mut data = fs::read(&path).unwrap();
        let last = data.len() - 1;
        data[last] ^= 1;
        fs::write(&path, data).unwrap();
        assert!(store.read(&l2)[0].is_err());
    }

    #[test]
    fn released_runs_merge_and_punch_whole_blocks_once() {
        let mut s = Segment::default();
        // Three neighbours of 100 KiB: no run reaches PUNCH_MIN until the middle one joins.
        let k = 100 * 1024;
        assert_eq!(s.release(0, k), None);
        assert_eq!(s.release(2 * k, 3 * k), None);
        assert_eq!(s.release(k, 2 * k), Some((0, 3 * k / BLOCK * BLOCK)));
        assert_eq!(s.dead.len(), 1);
        // What was punched is not punched again for a small neighbour...
        assert_eq!(s.release(3 * k, 3 * k + 10), None);
        // ...and a released record never overlaps a run (a double release is ignored).
        assert_eq!(s.release(10, 20), None);
        // A run far away starts its own count, aligned inwards.
        assert_eq!(s.release(10_000_001, 10_000_001 + PUNCH_MIN + BLOCK), {
            let a = 10_000_001u64.next_multiple_of(BLOCK);
            Some((a, (10_000_001 + PUNCH_MIN + BLOCK) / BLOCK * BLOCK))
        });
    }

    #[test]
    fn a_page_file_pinned_by_a_few_messages_gives_back_the_rest() {
        let dir = std::env::temp_dir().join(format!("warren-pages-punch-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let store = PageStore::open(&dir).unwrap();
        // Large bodies, and many small ones, in the same file.
        let big: Vec<Vec<u8>> = (0..64u8).map(|i| vec![i; 64 * 1024]).collect();
        let items: Vec<(&str, &str, &[u8], &[u8])> =
            big.iter().map(|b| ("", "big", &b"h"[..], &b[..])).collect();
        let big_locs = store.write(&items).unwrap();
        let small: Vec<Vec<u8>> = (0..20_000u32).map(|i| i.to_be_bytes().repeat(25)).collect();
        let items: Vec<(&str, &str, &[u8], &[u8])> =
            small.iter().map(|b| ("", "s", &b"h"[..], &b[..])).collect();
        let small_locs = store.write(&items).unwrap();
        let before = store.disk_bytes();
        assert!(before > 6 << 20, "{before} bytes written");
        let keep = [10usize, 50];
        let keep_small = [0usize, 7_000, 19_999];
        for (i, l) in big_locs.iter().enumerate() {
            if !keep.contains(&i) {
                store.release(*l);
            }
        }
        for (i, l) in small_locs.iter().enumerate() {
            if !keep_small.contains(&i) {
                store.release(*l);
            }
        }
        let after = store.disk_bytes();
        // Live: two 64 KiB bodies and three tiny ones; each run between them may keep less
        // than PUNCH_MIN plus two partial blocks.
        assert!(
            after < 2 * 65 * 1024 + 5 * (PUNCH_MIN + 2 * BLOCK),
            "{after} bytes still allocated of {before}"
        );
        // What is still live reads back intact.
        let live: Vec<PageLoc> = keep
            .iter()
            .map(|&i| big_locs[i])
            .chain(keep_small.iter().map(|&i| small_locs[i]))
            .collect();
        let got: Vec<Content> = store.read(&live).into_iter().map(Result::unwrap).collect();
        assert_eq!(got[0].body, big[10]);
        assert_eq!(got[1].body, big[50]);
        assert_eq!(got[2].body, small[0]);
        assert_eq!(got[3].body, small[7_000]);
        assert_eq!(got[4].body, small[19_999]);
        let _ = fs::remove_dir_all(&dir);
    }
}
