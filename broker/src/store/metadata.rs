//! The node's metadata on disk: vhosts, users, permissions, policies, durable exchanges,
//! durable queues and the bindings between durable objects. Arguments are kept AMQP-encoded,
//! so types survive exactly.
//!
//! Two files: a snapshot (`metadata.json`, rewritten atomically: temporary file, fsync,
//! rename, fsync of the directory) and a journal (`metadata.journal`) of the changes since,
//! one checksummed record per declared or deleted exchange, queue, binding or policy,
//! appended and `fdatasync`ed before the client hears that the change succeeded. So a
//! `queue.declare` costs a small append, not a rewrite of every queue the node has. Once the
//! journal outgrows the snapshot (and 1 MiB), the next change writes a new snapshot and
//! starts an empty journal. Both carry an epoch: a journal whose epoch is not the snapshot's
//! is one the snapshot already contains (a crash between the two renames), and is ignored.
//! Changes that are rare (users, permissions, vhosts, parameters) rewrite the snapshot.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::frame;

use amq_protocol::types::FieldTable;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

pub const FILE_NAME: &str = "metadata.json";
pub const JOURNAL_NAME: &str = "metadata.journal";
/// The journal is folded into a new snapshot once it is larger than the snapshot and this.
const JOURNAL_MIN: u64 = 1 << 20;

/// Milliseconds each journal fsync is made to take longer (a slow disk), for tests that
/// check nothing else waits behind a metadata write. Zero outside those tests.
#[doc(hidden)]
pub static TEST_SYNC_DELAY_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn slow_disk_for_tests() {
    let ms = TEST_SYNC_DELAY_MS.load(std::sync::atomic::Ordering::Relaxed);
    if ms > 0 {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Snapshot {
    /// Which journal continues this snapshot (0 in files written before the journal).
    #[serde(default)]
    pub epoch: u64,
    pub vhosts: Vec<String>,
    pub users: Vec<UserDef>,
    pub permissions: Vec<PermissionDef>,
    pub topic_permissions: Vec<TopicPermissionDef>,
    pub policies: Vec<PolicyDef>,
    pub exchanges: Vec<ExchangeDef>,
    pub queues: Vec<QueueDef>,
    pub bindings: Vec<BindingDef>,
    /// Runtime parameters (federation upstreams, shovels), as the management API takes them.
    #[serde(default)]
    pub parameters: Vec<ParameterDef>,
    /// Vhosts' and users' limits (absent in files written before limits).
    #[serde(default)]
    pub vhost_limits: Vec<crate::limits::VhostLimitsDef>,
    #[serde(default)]
    pub user_limits: Vec<crate::limits::UserLimitsDef>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct ParameterDef {
    pub component: String,
    pub vhost: String,
    pub name: String,
    pub value: serde_json::Value,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct UserDef {
    pub name: String,
    pub password_hash: String,
    pub tags: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct PermissionDef {
    pub user: String,
    pub vhost: String,
    pub configure: String,
    pub write: String,
    pub read: String,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct TopicPermissionDef {
    pub user: String,
    pub vhost: String,
    pub exchange: String,
    pub write: String,
    pub read: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PolicyDef {
    pub vhost: String,
    pub name: String,
    pub operator: bool,
    /// The management API's body: pattern, definition, priority, apply-to.
    pub body: serde_json::Value,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct ExchangeDef {
    pub vhost: String,
    pub name: String,
    pub kind: String,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct QueueDef {
    pub vhost: String,
    pub name: String,
    pub auto_delete: bool,
    pub arguments: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct BindingDef {
    pub vhost: String,
    pub source: String,
    pub destination: String,
    pub destination_is_queue: bool,
    pub routing_key: String,
    pub arguments: String,
}

/// One journal record: the state of one object after a change (written while the node holds
/// the journal, from the object as it is then, so records of racing changes to the same
/// object still end with its final state).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    PutExchange(ExchangeDef),
    /// The exchange is gone, and with it every binding from or to it.
    DelExchange {
        vhost: String,
        name: String,
    },
    PutQueue(QueueDef),
    /// The queue is gone, and with it every binding to it.
    DelQueue {
        vhost: String,
        name: String,
    },
    PutBinding(BindingDef),
    DelBinding(BindingDef),
    PutPolicy(PolicyDef),
    DelPolicy {
        vhost: String,
        name: String,
        operator: bool,
    },
}

type Key = (String, String);

/// Applies journal records to a snapshot. Deletions cascade to bindings as in the broker: a
/// binding survives only if it was put after the last deletion of its source and destination.
pub fn apply(snap: &mut Snapshot, changes: Vec<Change>) {
    if changes.is_empty() {
        return;
    }
    let key = |v: &str, n: &str| (v.to_owned(), n.to_owned());
    let mut exchanges: BTreeMap<Key, ExchangeDef> = std::mem::take(&mut snap.exchanges)
        .into_iter()
        .map(|e| (key(&e.vhost, &e.name), e))
        .collect();
    let mut queues: BTreeMap<Key, QueueDef> = std::mem::take(&mut snap.queues)
        .into_iter()
        .map(|q| (key(&q.vhost, &q.name), q))
        .collect();
    let mut policies: BTreeMap<(String, String, bool), PolicyDef> =
        std::mem::take(&mut snap.policies)
            .into_iter()
            .map(|p| ((p.vhost.clone(), p.name.clone(), p.operator), p))
            .collect();
    // Bindings with the sequence number of the record that put them (0: the snapshot's).
    let mut bindings: BTreeMap<BindingDef, usize> = std::mem::take(&mut snap.bindings)
        .into_iter()
        .map(|b| (b, 0))
        .collect();
    let mut exchange_gone: BTreeMap<Key, usize> = BTreeMap::new();
    let mut queue_gone: BTreeMap<Key, usize> = BTreeMap::new();
    for (i, c) in changes.into_iter().enumerate() {
        let seq = i + 1;
        match c {
            Change::PutExchange(e) => {
                exchanges.insert(key(&e.vhost, &e.name), e);
            }
            Change::DelExchange { vhost, name } => {
                exchanges.remove(&key(&vhost, &name));
                exchange_gone.insert((vhost, name), seq);
            }
            Change::PutQueue(q) => {
                queues.insert(key(&q.vhost, &q.name), q);
            }
            Change::DelQueue { vhost, name } => {
                queues.remove(&key(&vhost, &name));
                queue_gone.insert((vhost, name), seq);
            }
            Change::PutBinding(b) => {
                bindings.insert(b, seq);
            }
            Change::DelBinding(b) => {
                bindings.remove(&b);
            }
            Change::PutPolicy(p) => {
                policies.insert((p.vhost.clone(), p.name.clone(), p.operator), p);
            }
            Change::DelPolicy {
                vhost,
                name,
                operator,
            } => {
                policies.remove(&(vhost, name, operator));
            }
        }
    }
    let after = |gone: &BTreeMap<Key, usize>, v: &str, n: &str, seq: usize| {
        gone.get(&key(v, n)).is_none_or(|g| seq > *g)
    };
    snap.bindings = bindings
        .into_iter()
        .filter(|(b, seq)| {
            after(&exchange_gone, &b.vhost, &b.source, *seq)
                && if b.destination_is_queue {
                    after(&queue_gone, &b.vhost, &b.destination, *seq)
                } else {
                    after(&exchange_gone, &b.vhost, &b.destination, *seq)
                }
        })
        .map(|(b, _)| b)
        .collect();
    snap.exchanges = exchanges.into_values().collect();
    snap.queues = queues.into_values().collect();
    snap.policies = policies.into_values().collect();
}

/// The metadata files of a node: writes snapshots and appends to the journal.
#[derive(Debug)]
pub struct MetaStore {
    dir: PathBuf,
    epoch: u64,
    journal: Option<File>,
    journal_bytes: u64,
    snapshot_bytes: u64,
    /// Appends are written but not synced one by one ([`MetaStore::sync`] makes them
    /// durable): on a clustered node, whose Raft log is the durable record of every change.
    lazy: bool,
    /// Appended since the last sync.
    dirty: bool,
}

impl MetaStore {
    /// The store for `data_dir`, continuing the epoch of what [`load`] read (a new snapshot
    /// is written before the first append).
    pub fn new(data_dir: &Path, loaded: Option<&Snapshot>) -> Self {
        Self {
            dir: data_dir.to_owned(),
            epoch: loaded.map_or(0, |s| s.epoch),
            journal: None,
            journal_bytes: 0,
            snapshot_bytes: 0,
            lazy: false,
            dirty: false,
        }
    }

    /// Appends from now on are synced only by [`MetaStore::sync`] (a clustered node).
    pub fn set_lazy(&mut self, lazy: bool) {
        self.lazy = lazy;
    }

    /// Makes the appends so far durable.
    pub fn sync(&mut self) -> std::io::Result<()> {
        if let (true, Some(f)) = (self.dirty, self.journal.as_mut()) {
            f.sync_data()?;
        }
        self.dirty = false;
        Ok(())
    }

    /// Writes `snap` as the new snapshot and starts an empty journal after it.
    pub fn save(&mut self, mut snap: Snapshot) -> std::io::Result<()> {
        self.journal = None;
        snap.epoch = self.epoch + 1;
        self.snapshot_bytes = save(&self.dir, &snap)?;
        self.epoch = snap.epoch;
        // The journal is replaced the same way, so a crash leaves the old one (whose epoch
        // then no longer matches: ignored) or the new empty one.
        let tmp = self.dir.join(format!("{JOURNAL_NAME}.tmp"));
        let mut header = Vec::new();
        frame::framed(&mut header, |out| {
            out.extend_from_slice(&self.epoch.to_be_bytes())
        });
        {
            let mut f = super::create_private(&tmp)?;
            f.write_all(&header)?;
            f.sync_all()?;
        }
        fs::rename(&tmp, self.dir.join(JOURNAL_NAME))?;
        File::open(&self.dir)?.sync_all()?;
        self.journal = Some(
            OpenOptions::new()
                .append(true)
                .open(self.dir.join(JOURNAL_NAME))?,
        );
        self.journal_bytes = header.len() as u64;
        self.dirty = false;
        Ok(())
    }

    /// Whether a journal is open for appends (none after a failed append, until a snapshot).
    pub fn has_journal(&self) -> bool {
        self.journal.is_some()
    }

    /// Appends changes and syncs them (unless lazy). Returns whether the journal has grown enough to be
    /// folded into a new snapshot. An error leaves the journal closed: the caller writes a
    /// snapshot (which also starts a new journal).
    pub fn append(&mut self, changes: &[Change]) -> std::io::Result<bool> {
        let Some(f) = self.journal.as_mut() else {
            return Ok(true);
        };
        let mut buf = Vec::new();
        for c in changes {
            let json = serde_json::to_vec(c).map_err(std::io::Error::other)?;
            frame::framed(&mut buf, |out| out.extend_from_slice(&json));
        }
        let lazy = self.lazy;
        let written = f.write_all(&buf).and_then(|_| {
            if lazy {
                return Ok(());
            }
            slow_disk_for_tests();
            f.sync_data()
        });
        self.dirty |= lazy;
        if let Err(e) = written {
            self.journal = None;
            return Err(e);
        }
        self.journal_bytes += buf.len() as u64;
        Ok(self.journal_bytes > self.snapshot_bytes.max(JOURNAL_MIN))
    }
}

/// How a journal read ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JournalEnd {
    /// Every byte was a good record.
    Complete,
    /// The last record is incomplete: a change cut off by a crash before it was acknowledged.
    TornTail { offset: usize, bytes: usize },
    /// A bad record with good ones after it: the file was damaged (not what a crash leaves).
    /// `resumed` says whether the records after it were read (the bad record's length was
    /// intact) or dropped.
    Damaged {
        offset: usize,
        next_good: usize,
        resumed: bool,
    },
}

/// The records of a journal whose epoch is `epoch` (none if the epoch differs), and how the
/// read ended. A torn tail is dropped quietly (that change was never acknowledged to anyone);
/// damage in the middle is reported loudly, and the records after a damaged one are kept when
/// its length is intact (each record is an object's whole state, so a later record does not
/// depend on the lost one).
pub fn read_journal_bytes(data: &[u8], epoch: u64) -> (Vec<Change>, JournalEnd) {
    let mut at = 0;
    match frame::unframe(data) {
        Some(h) if h == epoch.to_be_bytes() => at += frame::HEADER + h.len(),
        _ => return (Vec::new(), JournalEnd::Complete),
    }
    let mut out = Vec::new();
    let parse = |p: &[u8]| serde_json::from_slice::<Change>(p).ok();
    let mut end = JournalEnd::Complete;
    while at < data.len() {
        if let Some(p) = frame::unframe(&data[at..])
            && let Some(c) = parse(p)
        {
            out.push(c);
            at += frame::HEADER + p.len();
            continue;
        }
        match frame::next_good_record(&data[at..], |p| parse(p).is_some()) {
            None => {
                end = JournalEnd::TornTail {
                    offset: at,
                    bytes: data.len() - at,
                };
                break;
            }
            Some((skip, resumed)) => {
                end = JournalEnd::Damaged {
                    offset: at,
                    next_good: at + skip,
                    resumed,
                };
                if !resumed {
                    break;
                }
                at += skip;
            }
        }
    }
    (out, end)
}

fn read_journal(data_dir: &Path, epoch: u64) -> std::io::Result<Vec<Change>> {
    match fs::read(data_dir.join(JOURNAL_NAME)) {
        Ok(data) => Ok(parse_journal(&data, epoch)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// [`read_journal`] of the journal's bytes: the changes it holds, torn tail and damage
/// reported.
fn parse_journal(data: &[u8], epoch: u64) -> Vec<Change> {
    let (out, end) = read_journal_bytes(data, epoch);
    match end {
        JournalEnd::Complete => {}
        JournalEnd::TornTail { offset, bytes } => tracing::warn!(
            records = out.len(),
            offset,
            "metadata journal ends with {bytes} bytes of an incomplete record (a change cut off by a crash before it was acknowledged); ignored"
        ),
        JournalEnd::Damaged {
            offset,
            next_good,
            resumed,
        } => tracing::error!(
            records = out.len(),
            offset,
            next_good,
            "metadata journal DAMAGED (not a torn tail: good records follow a bad one at offset {offset}; disk or file corruption): {}",
            if resumed {
                "that change is lost, the records after it were applied"
            } else {
                "its length is damaged too, the records after it were dropped"
            }
        ),
    }
    out
}

/// A field table as base64 of its AMQP encoding.
pub fn encode_table(t: &FieldTable) -> String {
    use amq_protocol::frame::WriteContext;
    match amq_protocol::types::generation::gen_field_table(t)(WriteContext::from(Vec::new())) {
        Ok(ctx) => B64.encode(ctx.into_inner().0),
        Err(_) => String::new(),
    }
}

/// The field table stored by [`encode_table`]; `None` if it is not one. The file may have been
/// damaged or edited: the nesting is checked before `amq-protocol`'s recursive parser sees it,
/// so a deeply nested table is refused instead of overflowing the stack at start-up.
pub fn decode_table(s: &str) -> Option<FieldTable> {
    let raw = B64.decode(s).ok()?;
    crate::codec::check_table(&raw, "stored arguments").ok()?;
    amq_protocol::types::parsing::parse_field_table(&raw[..])
        .ok()
        .map(|(_, t)| t)
}

pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE_NAME)
}

/// Writes the snapshot so that a crash leaves either the old or the new file, never a mix.
/// Returns its size.
pub fn save(data_dir: &Path, snap: &Snapshot) -> std::io::Result<u64> {
    fs::create_dir_all(data_dir)?;
    let tmp = data_dir.join(format!("{FILE_NAME}.tmp"));
    let bytes = serde_json::to_vec(snap).map_err(std::io::Error::other)?;
    {
        let mut f = super::create_private(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path(data_dir))?;
    File::open(data_dir)?.sync_all()?;
    Ok(bytes.len() as u64)
}

/// Reads the saved snapshot with the journal's changes applied; `None` on a fresh node.
pub fn load(data_dir: &Path) -> std::io::Result<Option<Snapshot>> {
    let mut snap = match fs::read(path(data_dir)) {
        Ok(bytes) => parse_snapshot(&bytes)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let changes = read_journal(data_dir, snap.epoch)?;
    apply(&mut snap, changes);
    Ok(Some(snap))
}

fn parse_snapshot(bytes: &[u8]) -> std::io::Result<Snapshot> {
    serde_json::from_slice(bytes)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// [`load`] from the bytes of a snapshot and of a journal, for the fuzz target: what start-up
/// would make of them.
pub(crate) fn load_bytes(snapshot: &[u8], journal: &[u8]) -> std::io::Result<Snapshot> {
    let mut snap = parse_snapshot(snapshot)?;
    let changes = parse_journal(journal, snap.epoch);
    apply(&mut snap, changes);
    Ok(snap)
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::types::AMQPValue;

    #[test]
    fn round_trip_fresh_node_and_bad_file() {
        let dir = std::env::temp_dir().join(format!("warren-meta-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        assert!(load(&dir).unwrap().is_none());
        let mut t = FieldTable::default();
        t.insert("x-max-length".into(), AMQPValue::LongInt(5));
        let snap = Snapshot {
            vhosts: vec!["/".into()],
            queues: vec![QueueDef {
                vhost: "/".into(),
                name: "q".into(),
                auto_delete: false,
                arguments: encode_table(&t),
            }],
            ..Default::default()
        };
        save(&dir, &snap).unwrap();
        let back = load(&dir).unwrap().unwrap();
        assert_eq!(back, snap);
        assert_eq!(decode_table(&back.queues[0].arguments), Some(t));
        fs::write(path(&dir), b"{not json").unwrap();
        assert!(load(&dir).is_err());
    }

    /// Stored arguments nesting 200,000 arrays (a damaged or edited `metadata.json`) used to
    /// overflow the stack of the thread loading the definitions.
    #[test]
    fn deeply_nested_stored_arguments_are_refused_not_parsed() {
        let depth = 200_000;
        let mut v = Vec::new();
        for level in 0..depth {
            v.push(b'A');
            v.extend_from_slice(&((5 * (depth - 1 - level)) as u32).to_be_bytes());
        }
        let mut raw = ((2 + v.len()) as u32).to_be_bytes().to_vec();
        raw.extend_from_slice(&[1, b'k']);
        raw.extend_from_slice(&v);
        assert_eq!(decode_table(&B64.encode(&raw)), None);
        // Nesting within the limit is kept.
        let mut t = FieldTable::default();
        let mut inner = FieldTable::default();
        inner.insert("deep".into(), AMQPValue::LongInt(1));
        t.insert("x".into(), AMQPValue::FieldTable(inner));
        assert_eq!(decode_table(&encode_table(&t)), Some(t));
    }

    fn queue(name: &str) -> QueueDef {
        QueueDef {
            vhost: "/".into(),
            name: name.into(),
            auto_delete: false,
            arguments: String::new(),
        }
    }

    fn binding(source: &str, dest: &str, to_queue: bool) -> BindingDef {
        BindingDef {
            vhost: "/".into(),
            source: source.into(),
            destination: dest.into(),
            destination_is_queue: to_queue,
            routing_key: "k".into(),
            arguments: String::new(),
        }
    }

    fn exchange(name: &str) -> ExchangeDef {
        ExchangeDef {
            vhost: "/".into(),
            name: name.into(),
            kind: "topic".into(),
            auto_delete: false,
            internal: false,
            arguments: String::new(),
        }
    }

    #[test]
    fn a_lazy_journal_is_written_at_once_and_synced_on_demand() {
        let dir = std::env::temp_dir().join(format!("warren-meta-lazy-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let mut m = MetaStore::new(&dir, None);
        m.save(Snapshot::default()).unwrap();
        m.set_lazy(true);
        m.append(&[Change::PutQueue(queue("a"))]).unwrap();
        assert!(m.dirty);
        // In the file already (what a restart reads), before any sync.
        let loaded = load(&dir).unwrap().unwrap();
        assert_eq!(
            loaded
                .queues
                .iter()
                .map(|q| q.name.as_str())
                .collect::<Vec<_>>(),
            ["a"]
        );
        m.sync().unwrap();
        assert!(!m.dirty);
        m.append(&[Change::PutQueue(queue("b"))]).unwrap();
        m.save(load(&dir).unwrap().unwrap()).unwrap();
        assert!(!m.dirty, "a snapshot makes everything durable");
        assert_eq!(load(&dir).unwrap().unwrap().queues.len(), 2);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn journal_records_apply_with_deletions_cascading_to_bindings() {
        let mut snap = Snapshot {
            queues: vec![queue("a"), queue("b")],
            exchanges: vec![exchange("x")],
            bindings: vec![binding("x", "a", true), binding("amq.topic", "b", true)],
            ..Default::default()
        };
        apply(
            &mut snap,
            vec![
                // a goes (and its binding from x); comes back, bound again afterwards.
                Change::DelQueue {
                    vhost: "/".into(),
                    name: "a".into(),
                },
                Change::PutQueue(queue("a")),
                Change::PutBinding(binding("amq.topic", "a", true)),
                // b's binding is put, then b goes: the binding goes with it.
                Change::PutBinding(binding("x", "b", true)),
                Change::DelQueue {
                    vhost: "/".into(),
                    name: "b".into(),
                },
                // Exchange y bound to x, then x deleted: both directions go.
                Change::PutExchange(exchange("y")),
                Change::PutBinding(binding("y", "x", false)),
                Change::DelExchange {
                    vhost: "/".into(),
                    name: "x".into(),
                },
                Change::PutBinding(binding("y", "a", true)),
                Change::DelBinding(binding("y", "a", true)),
                Change::PutBinding(binding("amq.topic", "y", false)),
            ],
        );
        assert_eq!(snap.queues, vec![queue("a")]);
        assert_eq!(snap.exchanges, vec![exchange("y")]);
        assert_eq!(
            snap.bindings,
            vec![
                binding("amq.topic", "a", true),
                binding("amq.topic", "y", false)
            ]
        );
    }

    #[test]
    fn journal_survives_a_torn_tail_and_a_stale_epoch_is_ignored() {
        let dir = std::env::temp_dir().join(format!("warren-meta-j-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let mut store = MetaStore::new(&dir, None);
        store.save(Snapshot::default()).unwrap();
        for n in ["q1", "q2", "q3"] {
            assert!(!store.append(&[Change::PutQueue(queue(n))]).unwrap());
        }
        let names = |s: Snapshot| s.queues.into_iter().map(|q| q.name).collect::<Vec<_>>();
        assert_eq!(names(load(&dir).unwrap().unwrap()), ["q1", "q2", "q3"]);
        // A crash in the middle of the last append: the records before it stand.
        let j = dir.join(JOURNAL_NAME);
        let len = fs::metadata(&j).unwrap().len();
        let f = OpenOptions::new().write(true).open(&j).unwrap();
        f.set_len(len - 5).unwrap();
        assert_eq!(names(load(&dir).unwrap().unwrap()), ["q1", "q2"]);
        // A snapshot written after the journal (its epoch moved on) already holds what that
        // journal says: a crash before the journal was replaced leaves it ignored.
        let loaded = load(&dir).unwrap().unwrap();
        let mut store = MetaStore::new(&dir, Some(&loaded));
        let stale = fs::read(&j).unwrap();
        store
            .save(Snapshot {
                queues: vec![queue("only")],
                ..Default::default()
            })
            .unwrap();
        fs::write(&j, stale).unwrap();
        assert_eq!(names(load(&dir).unwrap().unwrap()), ["only"]);
        // The journal is folded into a snapshot once it outgrows it (and 1 MiB).
        let mut store = MetaStore::new(&dir, load(&dir).unwrap().as_ref());
        store.save(Snapshot::default()).unwrap();
        let mut folded = false;
        for i in 0..20_000 {
            if store
                .append(&[Change::PutQueue(queue(&format!("queue-{i}")))])
                .unwrap()
            {
                folded = true;
                break;
            }
        }
        assert!(folded, "the journal asked to be folded into a snapshot");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn journal_damage_in_the_middle_is_reported_as_damage_not_a_torn_tail() {
        let dir = std::env::temp_dir().join(format!("warren-meta-dmg-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let mut store = MetaStore::new(&dir, None);
        store.save(Snapshot::default()).unwrap();
        let j = dir.join(JOURNAL_NAME);
        let mut ends = vec![fs::metadata(&j).unwrap().len() as usize];
        for n in ["q1", "q2", "q3"] {
            store.append(&[Change::PutQueue(queue(n))]).unwrap();
            ends.push(fs::metadata(&j).unwrap().len() as usize);
        }
        let epoch = load(&dir).unwrap().unwrap().epoch;
        let good = fs::read(&j).unwrap();
        let names = |c: &[Change]| {
            c.iter()
                .filter_map(|c| match c {
                    Change::PutQueue(q) => Some(q.name.clone()),
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
        let (c, end) = read_journal_bytes(&good, epoch);
        assert_eq!(
            (names(&c), end),
            (
                vec!["q1".into(), "q2".into(), "q3".into()],
                JournalEnd::Complete
            )
        );
        // Torn tail: the last append cut off.
        let (c, end) = read_journal_bytes(&good[..good.len() - 3], epoch);
        assert_eq!(names(&c), ["q1", "q2"]);
        assert_eq!(
            end,
            JournalEnd::TornTail {
                offset: ends[2],
                bytes: ends[3] - ends[2] - 3
            }
        );
        // A flipped bit in q2's record, q3 intact after it: damage, q3 still applied.
        let mut bad = good.clone();
        bad[ends[1] + frame::HEADER + 3] ^= 0x20;
        let (c, end) = read_journal_bytes(&bad, epoch);
        assert_eq!(names(&c), ["q1", "q3"]);
        assert_eq!(
            end,
            JournalEnd::Damaged {
                offset: ends[1],
                next_good: ends[2],
                resumed: true
            }
        );
        fs::write(&j, &bad).unwrap();
        let loaded = load(&dir).unwrap().unwrap();
        let queues: Vec<_> = loaded.queues.into_iter().map(|q| q.name).collect();
        assert_eq!(queues, ["q1", "q3"]);
        // q2's length damaged: q3 is found (damage, not a torn tail) but not trusted.
        let mut bad = good.clone();
        bad[ends[1]..ends[1] + 4].copy_from_slice(&[0x7f, 0, 0, 0]);
        let (c, end) = read_journal_bytes(&bad, epoch);
        assert_eq!(names(&c), ["q1"]);
        assert_eq!(
            end,
            JournalEnd::Damaged {
                offset: ends[1],
                next_good: ends[2],
                resumed: false
            }
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_failed_append_closes_the_journal_and_is_an_error() {
        let dir = std::env::temp_dir().join(format!("warren-meta-full-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let mut store = MetaStore::new(&dir, None);
        store.save(Snapshot::default()).unwrap();
        // The kernel's own ENOSPC: /dev/full refuses every write.
        store.journal = Some(OpenOptions::new().write(true).open("/dev/full").unwrap());
        let e = store.append(&[Change::PutQueue(queue("q"))]).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(28), "{e}");
        assert!(!store.has_journal());
        // Nothing is appended after a failed append: the caller must write a snapshot.
        assert!(store.append(&[Change::PutQueue(queue("q"))]).unwrap());
        let _ = fs::remove_dir_all(&dir);
    }
}
