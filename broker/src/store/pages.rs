//! Page files: where the bodies of messages that have no copy in the message log (transient
//! messages, and any message of a transient queue) go when memory is short.
//!
//! Nothing here must survive a restart — those messages would not either — so page files are
//! never synced, and every page file is deleted when the node starts. Files are written in
//! batches (one `write` for every message a queue pages out at once) into segments of
//! [`PAGE_SEGMENT_BYTES`]; each segment counts the messages still in it and is deleted when
//! the last one is released. Unlike the message log, a page file can go in any order: nothing
//! is ever replayed from it.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

use super::Content;
use super::frame::{self, Cursor};

/// Page files roll over at this size.
pub const PAGE_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
const READ_GAP: u64 = 64 * 1024;
const READ_SPAN: u64 = 8 * 1024 * 1024;

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
    /// Messages still in each page file.
    live: HashMap<u64, u64>,
}

pub struct PageStore {
    dir: PathBuf,
    inner: Mutex<Inner>,
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
                live: HashMap::new(),
            }),
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
            if g.live.get(&old).is_none_or(|n| *n == 0) {
                g.live.remove(&old);
                self.delete(old);
            }
        }
        let seg = g.seg;
        if g.file.is_none() {
            g.file = Some(
                OpenOptions::new()
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
        *g.live.entry(seg).or_insert(0) += locs.len() as u64;
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

    /// The message at `loc` is no longer needed; a page file is deleted with its last one.
    pub fn release(&self, loc: PageLoc) {
        let mut g = self.inner.lock();
        let Some(n) = g.live.get_mut(&loc.seg) else {
            return;
        };
        *n = n.saturating_sub(1);
        if *n == 0 && loc.seg != g.seg {
            g.live.remove(&loc.seg);
            self.delete(loc.seg);
        }
    }

    /// Page files on disk now (for tests and metrics).
    pub fn files(&self) -> usize {
        fs::read_dir(&self.dir).map_or(0, |d| d.count())
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

fn decode(framed: &[u8]) -> std::io::Result<Content> {
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
}
