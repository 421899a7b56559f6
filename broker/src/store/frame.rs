//! Record framing shared by the message log and the page files: `len: u32 | crc32(payload):
//! u32 | payload`, big-endian, and the little reader/writer of payload fields.

/// Bytes of framing before each payload.
pub const HEADER: usize = 8;

/// Appends a framed record whose payload `write` produces.
pub fn framed(out: &mut Vec<u8>, write: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER]);
    write(out);
    let payload_len = (out.len() - start - HEADER) as u32;
    let crc = crc32fast::hash(&out[start + HEADER..]);
    out[start..start + 4].copy_from_slice(&payload_len.to_be_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_be_bytes());
}

/// Appends the framing and the first part of a record whose payload is that part followed by
/// `tail` (a message body), without copying `tail`: the caller writes it right after.
pub fn framed_head(out: &mut Vec<u8>, write: impl FnOnce(&mut Vec<u8>), tail: &[u8]) {
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER]);
    write(out);
    let payload_len = (out.len() - start - HEADER + tail.len()) as u32;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&out[start + HEADER..]);
    crc.update(tail);
    out[start..start + 4].copy_from_slice(&payload_len.to_be_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.finalize().to_be_bytes());
}

/// Writes all of `bufs` with as few `writev` calls as the kernel allows.
pub fn write_all_vectored(w: &mut impl std::io::Write, bufs: &[&[u8]]) -> std::io::Result<()> {
    let mut slices: Vec<std::io::IoSlice<'_>> =
        bufs.iter().map(|b| std::io::IoSlice::new(b)).collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let n = rest.len().min(1024);
        let written = w.write_vectored(&rest[..n])?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        std::io::IoSlice::advance_slices(&mut rest, written);
    }
    Ok(())
}

/// The payload length and checksum of a record header.
pub fn header(h: &[u8; HEADER]) -> (usize, u32) {
    (
        u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize,
        u32::from_be_bytes([h[4], h[5], h[6], h[7]]),
    )
}

/// The payload of the framed record at the start of `data`, if it is whole and its checksum
/// matches.
pub fn unframe(data: &[u8]) -> Option<&[u8]> {
    let h: &[u8; HEADER] = data.get(..HEADER)?.try_into().ok()?;
    let (len, crc) = header(h);
    let payload = data.get(HEADER..HEADER.checked_add(len)?)?;
    (crc32fast::hash(payload) == crc).then_some(payload)
}

/// Most payload bytes [`next_good_record`] checksums while searching for a record.
const RESYNC_BUDGET: usize = 256 << 20;

/// After a record at the start of `data` that is torn or fails its checksum: where the next
/// good record starts, if any. None means a torn tail (what a crash mid-append leaves: the
/// file ends inside the record, or only zeros or garbage with no good record follow); Some
/// means damage in the middle of the file (good records after a bad one: a flipped bit, a
/// lost sector, a file edited by hand), which is not what a crash leaves and is reported as
/// such. `.1` is true when the bad record's own length leads to the good one (only its
/// payload is damaged), so reading may resume there; otherwise the good record was found by
/// trying every offset, and may as well be bytes inside a message body that look like one.
/// `good` decides whether a checksummed payload is a real record.
pub fn next_good_record(data: &[u8], good: impl Fn(&[u8]) -> bool) -> Option<(usize, bool)> {
    let at_good = |at: usize| {
        let payload = unframe(data.get(at..)?)?;
        (!payload.is_empty() && good(payload)).then_some(())
    };
    if let Some(h) = data
        .get(..HEADER)
        .and_then(|h| <&[u8; HEADER]>::try_from(h).ok())
    {
        let next = HEADER.saturating_add(header(h).0);
        if next < data.len() && at_good(next).is_some() {
            return Some((next, true));
        }
    }
    let mut budget = RESYNC_BUDGET;
    for at in 1..data.len().saturating_sub(HEADER) {
        let Some(h) = data
            .get(at..at + HEADER)
            .and_then(|h| <&[u8; HEADER]>::try_from(h).ok())
        else {
            break;
        };
        let len = header(h).0;
        if len == 0 || len > data.len() - at - HEADER {
            continue;
        }
        if len > budget {
            break;
        }
        budget -= len;
        if at_good(at).is_some() {
            return Some((at, false));
        }
    }
    None
}

pub fn put_str(out: &mut Vec<u8>, s: &str) {
    put_bytes(out, s.as_bytes());
}

pub fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

/// Reads payload fields; every read is bounds-checked (a damaged record is `None`, never a
/// panic).
pub struct Cursor<'a> {
    pub b: &'a [u8],
    pub at: usize,
}

impl<'a> Cursor<'a> {
    pub fn new(b: &'a [u8]) -> Self {
        Self { b, at: 0 }
    }
    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }
    pub fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    pub fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
    pub fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }
    pub fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    pub fn str(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.bytes()?).ok()
    }
    pub fn string(&mut self) -> Option<String> {
        self.str().map(str::to_owned)
    }
    pub fn done(&self) -> bool {
        self.at == self.b.len()
    }
}

/// A byte range of a file to read, covering one or more records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub off: u64,
    pub len: u64,
}

/// Groups record locations (`(offset, length)`, any order) into few reads: neighbours closer
/// than `max_gap` bytes are read together, up to `max_span` bytes per read. Returns the spans
/// and, for each input, its span's index.
pub fn plan_reads(locs: &[(u64, u64)], max_gap: u64, max_span: u64) -> (Vec<Span>, Vec<usize>) {
    let mut order: Vec<usize> = (0..locs.len()).collect();
    order.sort_by_key(|&i| locs[i].0);
    let mut spans: Vec<Span> = Vec::new();
    let mut which = vec![0; locs.len()];
    for i in order {
        let (off, len) = locs[i];
        match spans.last_mut() {
            Some(s)
                if off >= s.off
                    && off <= s.off + s.len + max_gap
                    && (off + len).max(s.off + s.len) - s.off <= max_span =>
            {
                s.len = (off + len).max(s.off + s.len) - s.off;
            }
            _ => spans.push(Span { off, len }),
        }
        which[i] = spans.len() - 1;
    }
    (spans, which)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_roundtrip_and_damage() {
        let mut out = Vec::new();
        framed(&mut out, |o| put_str(o, "hello"));
        let p = unframe(&out).unwrap();
        let mut c = Cursor::new(p);
        assert_eq!(c.str(), Some("hello"));
        assert!(c.done());
        out[HEADER + 5] ^= 1;
        assert!(unframe(&out).is_none());
        assert!(unframe(&out[..5]).is_none());
        // A length field pointing past the end is not a panic.
        let mut bad = vec![0xff; 8];
        bad.extend_from_slice(b"x");
        assert!(unframe(&bad).is_none());
        assert!(Cursor::new(&[0, 0, 0, 9, 1]).bytes().is_none());
    }

    #[test]
    fn a_record_framed_in_two_parts_is_one_record() {
        let mut whole = Vec::new();
        framed(&mut whole, |o| {
            put_str(o, "meta");
            put_bytes(o, b"the body");
        });
        let mut head = Vec::new();
        framed_head(
            &mut head,
            |o| {
                put_str(o, "meta");
                o.extend_from_slice(&8u32.to_be_bytes());
            },
            b"the body",
        );
        let mut file = Vec::new();
        write_all_vectored(&mut file, &[&head, b"the body"]).unwrap();
        assert_eq!(file, whole);
    }

    #[test]
    fn a_torn_tail_is_not_damage_but_a_bad_record_before_good_ones_is() {
        let mut file = Vec::new();
        for word in ["one", "two", "three"] {
            framed(&mut file, |o| put_str(o, word));
        }
        let second = unframe(&file).unwrap().len() + HEADER;
        let third = second + unframe(&file[second..]).unwrap().len() + HEADER;
        let any = |_: &[u8]| true;
        // Cut inside the last record, or followed by zeros: a torn tail.
        assert_eq!(next_good_record(&file[third..file.len() - 2], any), None);
        let mut zeros = file[third..].to_vec();
        zeros[HEADER + 1] ^= 1;
        zeros.extend_from_slice(&[0; 64]);
        assert_eq!(next_good_record(&zeros, any), None);
        // A flipped payload bit in the middle: the next record is where the length says.
        let mut bad = file.clone();
        bad[second + HEADER + 2] ^= 1;
        assert!(unframe(&bad[second..]).is_none());
        assert_eq!(
            next_good_record(&bad[second..], any),
            Some((third - second, true))
        );
        // A damaged length: found by searching, not a place to resume from.
        let mut bad = file.clone();
        bad[second..second + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            next_good_record(&bad[second..], any),
            Some((third - second, false))
        );
        // A record the caller does not accept does not count.
        assert_eq!(next_good_record(&bad[second..], |_| false), None);
    }

    #[test]
    fn reads_are_merged_when_close() {
        let locs = [(100, 10), (0, 50), (60, 30), (10_000, 5)];
        let (spans, which) = plan_reads(&locs, 16, 1 << 20);
        assert_eq!(
            spans,
            vec![
                Span { off: 0, len: 110 },
                Span {
                    off: 10_000,
                    len: 5
                }
            ]
        );
        assert_eq!(which, vec![0, 0, 0, 1]);
        // A span never grows past max_span.
        let (spans, _) = plan_reads(&[(0, 60), (60, 60)], 0, 100);
        assert_eq!(spans.len(), 2);
    }
}
