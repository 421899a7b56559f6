#![allow(clippy::unwrap_used)]
//! Property tests (proptest): codec round trips, topic matching against a reference regex
//! matcher, the message log against a model of what it must recover, and the queue state
//! machine's invariants. Pure functions only, no broker: the whole file runs in under two
//! seconds. The parsers also have fuzz targets (`broker/fuzz`, `scripts/fuzz.sh`).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use amq_protocol::frame::WriteContext;
use amq_protocol::protocol::basic::AMQPProperties;
use amq_protocol::types::{AMQPValue, DecimalValue, FieldArray, FieldTable, LongString};
use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;

use warren_broker::codec::{self, FRAME_END, FrameDecoder};
use warren_broker::exchange::topic;
use warren_broker::message::Message;
use warren_broker::queue::state::{Command, Effect, Overflow, QueueConfig, QueueState, Settlement};
use warren_broker::store::log::{Record, StoredMessage};
use warren_broker::store::metadata;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 128,
        // Failures are reported with the minimal case; nothing is written next to the tests.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Field values as a peer may send them; floats finite so that equality means something.
fn value() -> impl Strategy<Value = AMQPValue> {
    let leaf = prop_oneof![
        any::<bool>().prop_map(AMQPValue::Boolean),
        any::<i8>().prop_map(AMQPValue::ShortShortInt),
        any::<u8>().prop_map(AMQPValue::ShortShortUInt),
        any::<i16>().prop_map(AMQPValue::ShortInt),
        any::<u16>().prop_map(AMQPValue::ShortUInt),
        any::<i32>().prop_map(AMQPValue::LongInt),
        any::<u32>().prop_map(AMQPValue::LongUInt),
        any::<i64>().prop_map(AMQPValue::LongLongInt),
        (-1e6f32..1e6).prop_map(AMQPValue::Float),
        (-1e12f64..1e12).prop_map(AMQPValue::Double),
        (any::<u8>(), any::<u32>())
            .prop_map(|(scale, value)| AMQPValue::DecimalValue(DecimalValue { scale, value })),
        ".{0,12}".prop_map(|s| AMQPValue::LongString(LongString::from(s))),
        proptest::collection::vec(any::<u8>(), 0..12).prop_map(|b| AMQPValue::ByteArray(b.into())),
        any::<u64>().prop_map(AMQPValue::Timestamp),
        Just(AMQPValue::Void),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6)
                .prop_map(|v| AMQPValue::FieldArray(FieldArray::from(v))),
            proptest::collection::btree_map("[a-z-]{0,8}", inner, 0..6)
                .prop_map(|m| AMQPValue::FieldTable(table_of(m))),
        ]
    })
}

fn table_of(m: BTreeMap<String, AMQPValue>) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in m {
        t.insert(k.into(), v);
    }
    t
}

fn table() -> impl Strategy<Value = FieldTable> {
    proptest::collection::btree_map("[a-zA-Z-]{0,12}", value(), 0..8).prop_map(table_of)
}

fn encode(t: &FieldTable) -> Vec<u8> {
    amq_protocol::types::generation::gen_field_table(t)(WriteContext::from(Vec::new()))
        .unwrap()
        .into_inner()
        .0
}

/// How deep the deepest table or array in `t` nests, `t` counting as 1.
fn depth(t: &FieldTable) -> usize {
    fn of(v: &AMQPValue) -> usize {
        match v {
            AMQPValue::FieldTable(t) => depth(t),
            AMQPValue::FieldArray(a) => 1 + a.as_slice().iter().map(of).max().unwrap_or(0),
            _ => 0,
        }
    }
    1 + t.inner().values().map(of).max().unwrap_or(0)
}

/// The topic matcher spelled as a regular expression over the key's words, each prefixed
/// with a dot: `*` is one word, `#` any number of them.
fn reference_topic_match(pattern: &str, key: &str) -> bool {
    let words = |s: &str| -> Vec<String> {
        if s.is_empty() {
            Vec::new()
        } else {
            s.split('.').map(str::to_owned).collect()
        }
    };
    let mut re = String::from("^");
    for w in words(pattern) {
        re.push_str(match w.as_str() {
            "*" => r"\.[^.]*",
            "#" => r"(?:\.[^.]*)*",
            _ => {
                re.push_str(r"\.");
                re.push_str(&regex::escape(&w));
                continue;
            }
        });
    }
    re.push('$');
    let dotted: String = words(key).iter().map(|w| format!(".{w}")).collect();
    regex::Regex::new(&re).unwrap().is_match(&dotted)
}

fn words(alphabet: &'static [&'static str]) -> impl Strategy<Value = String> {
    proptest::collection::vec(proptest::sample::select(alphabet), 0..6).prop_map(|w| w.join("."))
}

proptest! {
    #![proptest_config(config())]

    /// Frames come back whole and in order however the bytes are cut.
    #[test]
    fn frames_split_back_however_the_bytes_arrive(
        frames in proptest::collection::vec(
            (prop_oneof![Just(1u8), Just(2), Just(3), Just(8)], any::<u16>(),
             proptest::collection::vec(any::<u8>(), 0..300)),
            0..8),
        step in 1usize..64,
    ) {
        let mut wire = BytesMut::new();
        for (kind, channel, payload) in &frames {
            wire.put_u8(*kind);
            wire.put_u16(*channel);
            wire.put_u32(payload.len() as u32);
            wire.extend_from_slice(payload);
            wire.put_u8(FRAME_END);
        }
        let d = FrameDecoder::new(4096);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for chunk in wire.chunks(step) {
            buf.extend_from_slice(chunk);
            while let Some(f) = d.decode(&mut buf).unwrap() {
                got.push((f.kind, f.channel, f.payload.to_vec()));
            }
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(got, frames);
    }

    /// Field tables: the non-recursive walker measures exactly what amq-protocol parses,
    /// accepts what nests within the limit, and the stored form round-trips.
    #[test]
    fn field_tables_round_trip(t in table(), tail in proptest::collection::vec(any::<u8>(), 0..8)) {
        let bytes = encode(&t);
        let mut with_tail = bytes.clone();
        with_tail.extend_from_slice(&tail);
        prop_assert!(depth(&t) <= codec::MAX_TABLE_DEPTH);
        prop_assert_eq!(codec::check_table(&with_tail, "t").unwrap(), bytes.len());
        let (_, parsed) = amq_protocol::types::parsing::parse_field_table(&bytes[..]).unwrap();
        prop_assert_eq!(&parsed, &t);
        prop_assert_eq!(metadata::decode_table(&metadata::encode_table(&t)), Some(t));
        // Cut anywhere, it is refused, never a panic.
        let cut = bytes.len() / 2;
        prop_assert!(cut < 4 || codec::check_table(&bytes[..cut], "t").is_err());
    }

    #[test]
    fn topic_matching_agrees_with_a_regex(
        pattern in words(&["a", "b", "ab", "", "*", "#"]),
        key in words(&["a", "b", "ab", "", "c"]),
    ) {
        prop_assert_eq!(
            topic::matches(&pattern, &key),
            reference_topic_match(&pattern, &key),
            "pattern {:?} key {:?}", pattern, key
        );
    }

    /// Log records of any content, spread over segments, recover to what a model of the
    /// queues holds: enqueues minus removals and purges (removals naming the wrong queue do
    /// nothing), every record decoding to the bytes it was encoded from.
    #[test]
    fn the_log_recovers_what_the_model_holds(
        ops in proptest::collection::vec((0u8..10, 0u64..12, 0usize..3, ".{0,8}",
            proptest::collection::vec(any::<u8>(), 0..40)), 0..40),
        cuts in proptest::collection::vec(any::<proptest::sample::Index>(), 0..3),
    ) {
        let queues = ["a", "b", "c"];
        let mut model: BTreeMap<&str, BTreeSet<u64>> = BTreeMap::new();
        let mut records = Vec::new();
        for (op, sid, q, text, body) in ops {
            let queue = queues[q];
            let rec = match op {
                0..=5 => {
                    // An id is enqueued at most once, as the node does.
                    if model.values().any(|s| s.contains(&sid)) || records.iter().any(
                        |r| matches!(r, Record::Enqueue(m) if m.sid == sid)) {
                        continue;
                    }
                    model.entry(queue).or_default().insert(sid);
                    Record::Enqueue(StoredMessage {
                        sid,
                        vhost: "/".into(),
                        queue: queue.into(),
                        expires_at: (op == 5).then_some(sid + 1),
                        exchange: text.clone(),
                        routing_key: text,
                        header_payload: codec::encode_header_payload(
                            body.len() as u64, &AMQPProperties::default()).to_vec(),
                        body,
                    })
                }
                6..=7 => {
                    if let Some(s) = model.get_mut(queue) {
                        s.remove(&sid);
                    }
                    Record::Remove { vhost: "/".into(), queue: queue.into(), sid }
                }
                8 => {
                    model.remove(queue);
                    Record::Purge { vhost: "/".into(), queue: queue.into() }
                }
                _ => Record::Delivered { sids: vec![sid, sid + 1] },
            };
            records.push(rec);
        }
        let mut cut_at: Vec<usize> = cuts.iter().map(|i| i.index(records.len() + 1)).collect();
        cut_at.sort_unstable();
        let mut segments = vec![Vec::new()];
        for (i, r) in records.iter().enumerate() {
            while cut_at.first() == Some(&i) {
                cut_at.remove(0);
                segments.push(Vec::new());
            }
            let mut framed = Vec::new();
            r.encode(&mut framed);
            // Decoding gives back the bytes it came from.
            warren_broker::fuzzing::store_record(&framed);
            segments.last_mut().unwrap().extend_from_slice(&framed);
        }
        let refs: Vec<&[u8]> = segments.iter().map(Vec::as_slice).collect();
        let rec = warren_broker::fuzzing::recover_segments(&refs).map_err(TestCaseError::fail)?;
        let got: BTreeMap<&str, BTreeSet<u64>> = rec.messages.iter()
            .map(|((_, q), l)| (queues.iter().find(|n| *n == q).copied().unwrap(),
                l.iter().map(|m| m.sid).collect()))
            .collect();
        model.retain(|_, s| !s.is_empty());
        prop_assert_eq!(got, model);
    }

    /// The queue state machine under any sequence of commands: no message is both ready and
    /// unacked or delivered twice while unacked, each leaves once, and the counts and byte
    /// totals match the messages it holds.
    #[test]
    fn queue_state_machine_keeps_its_invariants(
        max_length in proptest::option::of(0u64..6),
        overflow in prop_oneof![Just(Overflow::DropHead), Just(Overflow::RejectPublish),
            Just(Overflow::RejectPublishDlx)],
        dlx in any::<bool>(),
        ttl in proptest::option::of(1u64..50),
        max_priority in proptest::option::of(0u8..4),
        cmds in proptest::collection::vec((0u8..12, 0usize..40, 0u8..5, any::<bool>()), 0..80),
    ) {
        let mut q = QueueState::new(QueueConfig {
            message_ttl: ttl,
            max_length,
            overflow,
            dead_letter_exchange: dlx.then(|| "dlx".to_owned()),
            max_priority,
            ..QueueConfig::default()
        });
        // Live messages and their sizes, and those checked out and not settled.
        let mut live: HashMap<u64, u64> = HashMap::new();
        let mut unacked: HashSet<u64> = HashSet::new();
        let mut now = 0u64;
        for (op, n, prio, flag) in cmds {
            now += (op as u64) % 3 * 7;
            let mut known: Vec<u64> = unacked.iter().copied().collect();
            known.sort_unstable();
            let pick = |n: usize| known.get(n % known.len().max(1)).copied().unwrap_or(n as u64);
            let cmd = match op {
                0..=3 => Command::Enqueue { msg: Arc::new(Message::new(
                    String::new(), "q".into(),
                    AMQPProperties::default().with_priority(prio),
                    Bytes::from(vec![0u8; n]))) },
                4 => Command::Restore { msg: None, size: n as u64, priority: prio,
                    expires_at: flag.then_some(now + 5), redelivered: true },
                5..=6 => Command::Checkout { settled: flag },
                7 => Command::Settle { ids: vec![pick(n)], how: [Settlement::Ack,
                    Settlement::Requeue, Settlement::Discard][prio as usize % 3] },
                8 => Command::Expire,
                9 => Command::PageOut { ids: vec![pick(n), n as u64] },
                10 => Command::Discard { ids: vec![if flag { pick(n) } else { n as u64 }] },
                _ => Command::Purge,
            };
            let checkout_settled = matches!(cmd, Command::Checkout { settled: true });
            // What a requeue puts back among the ready messages.
            let requeued: Vec<u64> = match &cmd {
                Command::Settle { ids, how: Settlement::Requeue } => ids.clone(),
                _ => Vec::new(),
            };
            let sizes: HashMap<u64, u64> = match &cmd {
                Command::Enqueue { msg } => [(0, msg.size())].into(),
                Command::Restore { size, .. } => [(0, *size)].into(),
                _ => HashMap::new(),
            };
            let mut out = Vec::new();
            q.apply(cmd, now, &mut out);
            for id in requeued {
                unacked.remove(&id);
            }
            let mut removed_in_purge = 0;
            for e in &out {
                match e {
                    Effect::Accepted { id } => {
                        prop_assert!(live.insert(*id, sizes[&0]).is_none(), "id {} reused", id);
                    }
                    Effect::Delivery { id, .. } => {
                        prop_assert!(live.contains_key(id), "delivered {} not held", id);
                        prop_assert!(unacked.insert(*id), "{} delivered twice while unacked", id);
                        if checkout_settled {
                            unacked.remove(id);
                        }
                    }
                    Effect::Removed { id } => {
                        prop_assert!(live.remove(id).is_some(), "{} left twice", id);
                        unacked.remove(id);
                        removed_in_purge += 1;
                    }
                    Effect::Purged { count } => {
                        prop_assert_eq!(*count as usize, removed_in_purge);
                    }
                    Effect::DeadLetter { id: Some(id), .. } => {
                        prop_assert!(!live.contains_key(id), "{} dead-lettered but kept", id);
                    }
                    _ => {}
                }
            }
            prop_assert_eq!(q.unacked_count() as usize, unacked.len());
            prop_assert_eq!((q.ready_count() + q.unacked_count()) as usize, live.len());
            prop_assert_eq!(q.ready_bytes() + q.unacked_bytes(), live.values().sum::<u64>());
            prop_assert!(q.resident_bytes() <= q.ready_bytes() + q.unacked_bytes());
        }
    }
}

proptest! {
    // Fewer cases: each builds a table of headers and a body of up to 12 KB.
    #![proptest_config(ProptestConfig { cases: 32, ..config() })]

    /// A message split into content frames by any frame_max reads back as itself.
    #[test]
    fn content_round_trips_through_frames(
        body in proptest::collection::vec(any::<u8>(), 0..12_000),
        frame_max in 4096u32..10_000,
        headers in table(),
        priority in proptest::option::of(0u8..10),
    ) {
        let mut props = AMQPProperties::default().with_headers(headers);
        if let Some(p) = priority {
            props = props.with_priority(p);
        }
        let header = codec::encode_header_payload(body.len() as u64, &props);
        let mut out = BytesMut::new();
        codec::encode_content(&mut out, 5, &header, &body, frame_max);
        let d = FrameDecoder::new(frame_max);
        let h = d.decode(&mut out).unwrap().unwrap();
        let parsed = codec::decode_header(&h.payload).unwrap();
        prop_assert_eq!(parsed.body_size, body.len() as u64);
        prop_assert_eq!(parsed.properties, props);
        let mut back = Vec::new();
        while let Some(f) = d.decode(&mut out).unwrap() {
            prop_assert!(f.payload.len() + codec::FRAME_OVERHEAD <= frame_max as usize);
            back.extend_from_slice(&f.payload);
        }
        prop_assert_eq!(back, body);
    }
}
