//! Entry points for fuzzing, not part of the broker's API.
//!
//! Each takes arbitrary bytes and drives the real parsers of what a peer sends or what is read
//! back from disk, panicking only when something that must hold does not: decoding never
//! panics, what decodes encodes back to the same bytes, recovery of the message log keeps each
//! live message tracked exactly once. The cargo-fuzz targets in `broker/fuzz` are one line
//! each around these, and `tests::corpus_replays` replays the committed corpus
//! (`broker/fuzz/corpus/<target>/`) through them on the stable toolchain, so an input that
//! crashed once stays fixed. `scripts/fuzz.sh` runs the targets.

use bytes::BytesMut;

use crate::codec::{self, FRAME_HEADER, FRAME_METHOD, FrameDecoder, RawFrame};
use crate::store::{frame, log, metadata, pages};

/// A fuzz target's entry point.
pub type Target = fn(&[u8]);

/// The targets, by the name of their corpus directory and fuzz target.
pub const TARGETS: &[(&str, Target)] = &[
    ("frames", frames),
    ("sasl", sasl),
    ("store_record", store_record),
    ("log_recovery", log_recovery),
    ("metadata", metadata),
    ("link_uri", link_uri),
];

/// Splits `data` into frames as a connection's reader does (the first byte picks the decoder
/// before or after `tune-ok`, the second how many bytes arrive at a time), decodes each method
/// and content header, and checks that what decodes re-encodes to bytes that decode to the
/// same encoding. Frames split the same whether the bytes arrive at once or piecemeal.
pub fn frames(data: &[u8]) {
    let [flags, step, rest @ ..] = data else {
        return;
    };
    let decoder = if flags & 1 == 0 {
        FrameDecoder::pre_tune()
    } else {
        FrameDecoder::new(131_072)
    };
    let (whole, whole_end) = split_frames(&decoder, rest, rest.len().max(1));
    let (piecemeal, piecemeal_end) = split_frames(&decoder, rest, 1 + (*step as usize % 64));
    assert_eq!(whole, piecemeal, "frames depend on how the bytes arrive");
    assert_eq!(whole_end, piecemeal_end);
    for f in &whole {
        match f.kind {
            FRAME_METHOD => {
                let Ok(m) = codec::decode_method(&f.payload) else {
                    continue;
                };
                let mut once = BytesMut::new();
                codec::encode_method(&mut once, f.channel, &m);
                let again = FrameDecoder::new(u32::MAX)
                    .decode(&mut once.clone())
                    .expect("an encoded method frame splits")
                    .expect("an encoded method frame is whole");
                let m2 = codec::decode_method(&again.payload)
                    .unwrap_or_else(|e| panic!("{m:?} encodes to a method that fails: {e:?}"));
                let mut twice = BytesMut::new();
                codec::encode_method(&mut twice, f.channel, &m2);
                assert_eq!(once, twice, "{m:?} does not survive a round trip");
            }
            FRAME_HEADER => {
                let Ok(h) = codec::decode_header(&f.payload) else {
                    continue;
                };
                let once = codec::encode_header_payload(h.body_size, &h.properties);
                let h2 = codec::decode_header(&once).unwrap_or_else(|e| {
                    panic!("{:?} encodes to a header that fails: {e:?}", h.properties)
                });
                let twice = codec::encode_header_payload(h2.body_size, &h2.properties);
                assert_eq!(
                    once, twice,
                    "{:?} does not survive a round trip",
                    h.properties
                );
            }
            _ => {}
        }
    }
}

/// The frames `decoder` splits off `data` fed `step` bytes at a time, and the error code it
/// stopped at (0: none).
fn split_frames(decoder: &FrameDecoder, data: &[u8], step: usize) -> (Vec<RawFrame>, u16) {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for chunk in data.chunks(step) {
        buf.extend_from_slice(chunk);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(f)) => out.push(f),
                Ok(None) => break,
                Err(e) => return (out, e.code),
            }
        }
    }
    (out, 0)
}

/// SASL responses as `connection.start-ok` carries them: PLAIN and AMQPLAIN. What PLAIN
/// accepts, it accepts again when re-encoded.
pub fn sasl(data: &[u8]) {
    if let Some((user, pass)) = crate::auth::parse_plain(data) {
        let again = format!("\0{user}\0{pass}");
        assert_eq!(
            crate::auth::parse_plain(again.as_bytes()),
            Some((user, pass))
        );
    }
    let _ = crate::auth::parse_amqplain(data);
}

/// One record of the message log or of a page file, framed or not: decoding never panics,
/// and a record that decodes encodes back to the same bytes.
pub fn store_record(data: &[u8]) {
    check(log::check_record(data));
    if let Some(payload) = frame::unframe(data) {
        check(log::check_record(payload));
    }
    let _ = pages::decode(data);
}

/// Recovers a message log made of the segments in `data` (separated by [`SEGMENT_SEPARATOR`],
/// at most 8). If the first byte is odd, record checksums are fixed first so the fuzzer
/// explores what the records say rather than stopping at the first checksum.
pub fn log_recovery(data: &[u8]) {
    let [flags, rest @ ..] = data else {
        return;
    };
    let mut segments: Vec<Vec<u8>> = split_on(rest, SEGMENT_SEPARATOR)
        .take(8)
        .map(<[u8]>::to_vec)
        .collect();
    if flags & 1 == 1 {
        segments.iter_mut().for_each(|s| fix_checksums(s));
    }
    let refs: Vec<&[u8]> = segments.iter().map(Vec::as_slice).collect();
    check(recover_segments(&refs).map(|_| ()));
}

/// What recovery makes of these in-memory segments (oldest first), its invariants checked
/// as in [`log_recovery`]: for property tests that write the segments from a model.
pub fn recover_segments(segments: &[&[u8]]) -> Result<log::Recovered, String> {
    log::recover_and_check(segments)
}

/// Separates segments in [`log_recovery`]'s input.
pub const SEGMENT_SEPARATOR: &[u8] = b"SEG|";

/// What start-up makes of a `metadata.json` and a journal: `data` is the snapshot, a NUL
/// byte, a flags byte, then the journal (its record checksums fixed first if the flags byte
/// is odd). Then every stored argument table is decoded as the node does when it restores the
/// definitions, and must encode back to the same bytes.
pub fn metadata(data: &[u8]) {
    let (snapshot, journal) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let journal = match journal.split_first() {
        Some((flags, j)) if flags & 1 == 1 => {
            let mut j = j.to_vec();
            fix_checksums(&mut j);
            j
        }
        Some((_, j)) => j.to_vec(),
        None => Vec::new(),
    };
    let Ok(snap) = metadata::load_bytes(snapshot, &journal) else {
        return;
    };
    let tables = (snap.exchanges.iter().map(|e| &e.arguments))
        .chain(snap.queues.iter().map(|q| &q.arguments))
        .chain(snap.bindings.iter().map(|b| &b.arguments));
    for t in tables {
        // Compared encoded: a table holding a NaN is not equal to itself.
        if let Some(table) = metadata::decode_table(t) {
            let once = metadata::encode_table(&table);
            let again = metadata::decode_table(&once).map(|t| metadata::encode_table(&t));
            assert_eq!(again.as_ref(), Some(&once), "{table:?} does not round-trip");
        }
    }
}

/// A federation upstream's or shovel's URI as the management API takes it; its redacted form
/// (shown in statuses and logs) must parse to the same link less the credentials.
pub fn link_uri(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    use crate::links::uri::{LinkUri, redact_str};
    let redacted = redact_str(s);
    if let Ok(u) = LinkUri::parse(s) {
        // What status pages and logs show means the same link, only without credentials.
        let without_credentials = LinkUri {
            user: "guest".into(),
            password: "guest".into(),
            ..u.clone()
        };
        match LinkUri::parse(&redacted) {
            Ok(r) => assert!(
                r == without_credentials,
                "{s:?} redacted to {redacted:?} means another link"
            ),
            Err(e) => panic!("{s:?} parses but its redaction {redacted:?} does not: {e}"),
        }
        let _ = u.local_file_keys();
    }
}

fn check(r: Result<(), String>) {
    if let Err(e) = r {
        panic!("{e}");
    }
}

/// The parts of `data` between occurrences of `sep`.
fn split_on<'a>(data: &'a [u8], sep: &'a [u8]) -> impl Iterator<Item = &'a [u8]> {
    let mut rest = Some(data);
    std::iter::from_fn(move || {
        let r = rest?;
        match r.windows(sep.len()).position(|w| w == sep) {
            Some(i) => {
                rest = Some(&r[i + sep.len()..]);
                Some(&r[..i])
            }
            None => {
                rest = None;
                Some(r)
            }
        }
    })
}

/// Rewrites the checksum of each whole record (`len | crc | payload`) in `data`.
fn fix_checksums(data: &mut [u8]) {
    let mut at = 0;
    while let Some(h) = data.get(at..at + frame::HEADER) {
        let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
        let Some(end) = (at + frame::HEADER)
            .checked_add(len)
            .filter(|&e| e <= data.len())
        else {
            break;
        };
        let crc = crc32fast::hash(&data[at + frame::HEADER..end]);
        data[at + 4..at + 8].copy_from_slice(&crc.to_be_bytes());
        at = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Replays every committed corpus input through its target: inputs that crashed once
    /// (kept in the corpus with the fix) must not crash again.
    #[test]
    fn corpus_replays() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
        let mut replayed = 0;
        for (name, target) in TARGETS {
            let dir = root.join(name);
            let entries =
                std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()));
            let mut n = 0;
            for e in entries {
                let path = e.unwrap().path();
                let data = std::fs::read(&path).unwrap();
                let r = std::panic::catch_unwind(|| target(&data));
                assert!(r.is_ok(), "{name}: {} crashes", path.display());
                n += 1;
            }
            assert!(n > 0, "corpus {} is empty", dir.display());
            replayed += n;
        }
        assert!(replayed >= TARGETS.len());
    }

    /// The seed corpus: valid inputs of each target, from the real encoders.
    fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
        use amq_protocol::protocol::{AMQPClass, basic, connection, queue};
        use amq_protocol::types::{AMQPValue, FieldArray, FieldTable};
        let mut out = Vec::new();

        let mut args = FieldTable::default();
        args.insert("x-max-length".into(), AMQPValue::LongInt(10));
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("classic".into()),
        );
        let mut nested = FieldTable::default();
        nested.insert("inner".into(), AMQPValue::FieldTable(args.clone()));
        nested.insert(
            "list".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![
                AMQPValue::Boolean(true),
                AMQPValue::Double(1.5),
                AMQPValue::Timestamp(7),
            ])),
        );
        let mut stream = BytesMut::new();
        codec::encode_method(
            &mut stream,
            0,
            &AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties: nested.clone(),
                mechanism: "PLAIN".into(),
                response: "\0guest\0guest".into(),
                locale: "en_US".into(),
            })),
        );
        codec::encode_method(
            &mut stream,
            1,
            &AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
                queue: "q".into(),
                passive: false,
                durable: true,
                exclusive: false,
                auto_delete: false,
                nowait: false,
                arguments: args.clone(),
            })),
        );
        codec::encode_method(
            &mut stream,
            1,
            &AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                exchange: "".into(),
                routing_key: "q".into(),
                mandatory: true,
                immediate: false,
            })),
        );
        let props = basic::AMQPProperties::default()
            .with_content_type("text/plain".into())
            .with_headers(nested.clone())
            .with_delivery_mode(2)
            .with_priority(3)
            .with_expiration("60000".into());
        let header = codec::encode_header_payload(5, &props);
        codec::encode_content(&mut stream, 1, &header, b"hello", 4096);
        codec::encode_heartbeat(&mut stream);
        for flags in [0u8, 1] {
            let mut v = vec![flags, 7];
            v.extend_from_slice(&stream);
            out.push(("frames", ["pre_tune", "tuned"][flags as usize], v));
        }

        out.push(("sasl", "plain", b"\0guest\0guest".to_vec()));
        let mut login = FieldTable::default();
        login.insert("LOGIN".into(), AMQPValue::LongString("guest".into()));
        login.insert("PASSWORD".into(), AMQPValue::LongString("guest".into()));
        let table = metadata::encode_table(&login);
        let raw =
            base64::Engine::decode(&base64::engine::general_purpose::STANDARD, table).unwrap();
        out.push(("sasl", "amqplain", raw[4..].to_vec()));

        let msg = |sid: u64, q: &str, body: &[u8]| {
            log::Record::Enqueue(log::StoredMessage {
                sid,
                vhost: "/".into(),
                queue: q.into(),
                expires_at: sid.is_multiple_of(2).then_some(1_000 + sid),
                exchange: "amq.direct".into(),
                routing_key: q.into(),
                header_payload: header.to_vec(),
                body: body.to_vec(),
            })
        };
        let records = [
            msg(1, "a", b"one"),
            msg(2, "b", b"two"),
            msg(3, "a", b"three"),
            log::Record::Remove {
                vhost: "/".into(),
                queue: "a".into(),
                sid: 1,
            },
            log::Record::Delivered { sids: vec![2, 3] },
            log::Record::Purge {
                vhost: "/".into(),
                queue: "b".into(),
            },
            log::Record::Clean,
        ];
        let mut segments = Vec::new();
        for (i, r) in records.iter().enumerate() {
            let mut framed = Vec::new();
            r.encode(&mut framed);
            out.push((
                "store_record",
                [
                    "enqueue",
                    "enqueue2",
                    "enqueue3",
                    "remove",
                    "delivered",
                    "purge",
                    "clean",
                ][i],
                framed,
            ));
            if i == 3 {
                segments.extend_from_slice(SEGMENT_SEPARATOR);
            }
            r.encode(&mut segments);
        }
        let mut page = Vec::new();
        frame::framed(&mut page, |o| {
            frame::put_str(o, "ex");
            frame::put_str(o, "rk");
            frame::put_bytes(o, &header);
            frame::put_bytes(o, b"paged body");
        });
        out.push(("store_record", "page", page));
        for flags in [0u8, 1] {
            let mut v = vec![flags];
            v.extend_from_slice(&segments);
            out.push((
                "log_recovery",
                ["two_segments", "two_segments_fix_crc"][flags as usize],
                v,
            ));
        }

        let snap = metadata::Snapshot {
            epoch: 3,
            vhosts: vec!["/".into()],
            queues: vec![metadata::QueueDef {
                vhost: "/".into(),
                name: "q".into(),
                auto_delete: false,
                arguments: metadata::encode_table(&nested),
            }],
            exchanges: vec![metadata::ExchangeDef {
                vhost: "/".into(),
                name: "x".into(),
                kind: "topic".into(),
                auto_delete: false,
                internal: false,
                arguments: metadata::encode_table(&args),
            }],
            ..Default::default()
        };
        let mut v = serde_json::to_vec(&snap).unwrap();
        v.extend_from_slice(&[0, 1]);
        frame::framed(&mut v, |o| o.extend_from_slice(&3u64.to_be_bytes()));
        let changes = [
            metadata::Change::PutBinding(metadata::BindingDef {
                vhost: "/".into(),
                source: "x".into(),
                destination: "q".into(),
                destination_is_queue: true,
                routing_key: "a.*.#".into(),
                arguments: metadata::encode_table(&args),
            }),
            metadata::Change::DelQueue {
                vhost: "/".into(),
                name: "q".into(),
            },
        ];
        for c in &changes {
            frame::framed(&mut v, |o| {
                o.extend_from_slice(&serde_json::to_vec(c).unwrap())
            });
        }
        out.push(("metadata", "snapshot_and_journal", v));

        for (name, uri) in [
            (
                "plain",
                "amqp://bob:s%40cret@10.0.0.2:5673/%2f?heartbeat=5&connection_timeout=2000",
            ),
            ("local", "amqp:///b"),
            (
                "tls",
                "amqps://h?cacertfile=/a&certfile=/b&keyfile=/c&verify=verify_none&server_name_indication=x",
            ),
            (
                "ipv6",
                "amqp://[::1]:5000/v?auth_mechanism=external&channel_max=9&frame_max=4096",
            ),
        ] {
            out.push(("link_uri", name, uri.as_bytes().to_vec()));
        }
        out
    }

    /// Every seed is a valid input its target accepts.
    #[test]
    fn seeds_pass() {
        let seeds = seeds();
        for (name, _) in TARGETS {
            assert!(
                seeds.iter().any(|(t, _, _)| t == name),
                "no seed for {name}"
            );
        }
        for (t, name, data) in seeds {
            let target = TARGETS.iter().find(|(n, _)| *n == t).unwrap().1;
            target(&data);
            if t == "log_recovery" {
                let segments: Vec<&[u8]> = split_on(&data[1..], SEGMENT_SEPARATOR).collect();
                let rec = log::recover_and_check(&segments).unwrap();
                assert_eq!(
                    rec.messages.len(),
                    1,
                    "{name}: only queue a keeps a message"
                );
                assert!(rec.clean);
            }
        }
    }

    /// Writes the seeds into `broker/fuzz/corpus` (run by hand after changing them:
    /// `cargo test -p warren-broker --lib fuzzing::tests::write_seed_corpus -- --ignored`).
    #[test]
    #[ignore]
    fn write_seed_corpus() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
        for (t, name, data) in seeds() {
            let dir = root.join(t);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(format!("seed-{name}")), data).unwrap();
        }
    }
}
