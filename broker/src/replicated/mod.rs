//! Replicated queues (`x-queue-type: quorum`): one Raft group per queue over its member
//! nodes (see ARCHITECTURE.md, "Replicated queues").
//!
//! * **The state is replicated, not the outcomes.** A queue's messages, its consumers and
//!   what each consumer holds unacknowledged are a [`state::QueueState`] on every member,
//!   changed only by committed [`state::Command`]s. Which message goes to which consumer is
//!   decided by applying them, identically everywhere.
//! * **Propose → commit → apply.** Anything a client does (publish, consume, ack, nack,
//!   cancel, get, purge) is a command proposed to the queue's leader; a publisher confirm is
//!   sent once the enqueue is committed (on disk on a majority) and applied here. Commands
//!   from one queue's users on one node are proposed in order, many per Raft entry (one in
//!   flight at a time), so a burst of publishes costs one replication round.
//! * **Deliveries happen after commit, on the consumer's node.** Every member applies every
//!   command; each hands the deliveries decided for its own consumers to their channels
//!   ([`LocalConsumer`]). No delivery crosses the network after the commit.
//! * **Failures.** The leader releases the consumers of a node it cannot see (what they held
//!   returns, redelivered); a node releases its own consumers of earlier boots and re-attaches
//!   a live consumer the state lost. Paging and disk are node-local and outside commands.
//!
//! This module imports nothing of `channel` or `vhost`: channels are reached through
//! [`LocalConsumer`].

pub mod state;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use amq_protocol::types::FieldTable;
use bytes::Bytes;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::cluster::Cluster;
use crate::cluster::raft::{Member, Metadata, NodeId, Replicated};
use crate::message::Message;
use crate::queue::state::DeadLetterReason;
use crate::queue::{DeadLetter, DeadLetterSink};
use crate::remote::Answers;
use state::{Command, ConsumerKey, Delivery, MsgId, Outcome, QueueState};

/// How a replicated queue was created: its group, members and configuration (part of the
/// queue's record in the replicated definitions).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Replicas {
    /// The Raft group's name (unique: a queue deleted and declared again is a new group).
    pub group: String,
    /// `(raft id, node name, inter-node address)`; the first creates the group.
    pub members: Vec<(NodeId, String, String)>,
    #[serde(default)]
    pub config: state::Config,
}

/// A channel's consumer of a replicated queue on this node.
pub trait LocalConsumer: Send + Sync {
    /// Message `id` for consumer `key`, decided by a committed command. False if the consumer
    /// is gone (the queue then cancels it: what it holds returns).
    fn deliver_replicated(
        &self,
        queue: &Arc<ReplicatedQueue>,
        key: &ConsumerKey,
        id: MsgId,
        redelivered: bool,
        msg: Arc<Message>,
    ) -> bool;

    /// The queue was deleted: tell the client (`basic.cancel`) if it understands that.
    fn replicated_cancelled(&self, tag: &str);
}

struct Local {
    target: Weak<dyn LocalConsumer>,
    prefetch: u32,
}

struct Proposal {
    command: Command,
    answer: Option<oneshot::Sender<Result<Outcome, String>>>,
    bytes: usize,
}

/// Most bytes of proposals waiting for their turn; beyond it publishes are refused (nacked).
const MAX_PENDING_BYTES: usize = 256 << 20;
/// Most bytes of commands in one Raft entry.
const MAX_BATCH_BYTES: usize = 4 << 20;
/// A replica snapshots (and truncates its log, which it also keeps in memory) once this many
/// bytes of commands were applied since its last snapshot, or after 1,024 entries
/// (`WARREN_QUEUE_SNAPSHOT_LOGS` for tests) — and not before as many bytes were applied as its
/// last snapshot took ([`snapshot_due`]).
const SNAPSHOT_BYTES: usize = 64 << 20;

/// Whether a replica that applied `entries` entries of `bytes` bytes since its last snapshot,
/// which took `last_len` bytes, snapshots now. A snapshot encodes the whole queue (every
/// message waiting), so a deep queue taking one every 1,024 entries would spend most of its
/// time encoding the same messages again; waiting until as many bytes were applied keeps
/// snapshots to at most about one encoded byte per applied byte, and the log (on disk and in
/// memory) to about the queue's size, or 64 MiB when the queue is smaller.
fn snapshot_due(entries: u64, bytes: usize, last_len: usize, every: u64) -> bool {
    (entries >= every || bytes >= SNAPSHOT_BYTES) && bytes >= last_len
}

/// This process's boot: consumers of a restarted node's earlier boots are gone.
pub fn boot() -> u64 {
    static BOOT: OnceLock<u64> = OnceLock::new();
    *BOOT.get_or_init(rand::random)
}

pub struct ReplicatedQueue {
    pub vhost: String,
    pub name: String,
    pub durable: bool,
    pub auto_delete: bool,
    pub arguments: FieldTable,
    pub replicas: Replicas,
    node: String,
    me: Weak<ReplicatedQueue>,
    state: Mutex<QueueState>,
    local: Mutex<HashMap<ConsumerKey, Local>>,
    /// Consumers of this node whose cancel was proposed (once each).
    cancelling: Mutex<HashSet<ConsumerKey>>,
    raft: OnceLock<Arc<Metadata>>,
    cluster: Weak<Cluster>,
    proposals: mpsc::UnboundedSender<Proposal>,
    pending_bytes: AtomicUsize,
    /// Bytes of commands applied since the last snapshot.
    since_snapshot: AtomicUsize,
    /// Entries applied since the last snapshot.
    entries_since_snapshot: AtomicU64,
    /// Bytes the last snapshot took (encoded).
    last_snapshot_len: Arc<AtomicUsize>,
    /// A snapshot was asked for and has not been taken yet.
    snapshot_asked: Arc<AtomicBool>,
    /// The leader is adding learners (one round at a time).
    adding_learners: Arc<AtomicBool>,
    /// `x-dead-letter-exchange` and `x-dead-letter-routing-key`.
    dead_letter: Option<(String, Option<String>)>,
    /// Where the leader hands dead letters (the vhost).
    sink: Mutex<Option<Weak<dyn DeadLetterSink>>>,
}

impl std::fmt::Debug for ReplicatedQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReplicatedQueue({}/{})", self.vhost, self.name)
    }
}

/// The message a replica keeps, as a client receives it.
fn message(m: &state::Msg) -> Option<Arc<Message>> {
    let header = Bytes::copy_from_slice(&m.header);
    let properties = crate::codec::decode_header(&header).ok()?.properties;
    Some(Arc::new(Message::with_header_payload(
        m.exchange.clone(),
        m.routing_key.clone(),
        properties,
        header,
        Bytes::copy_from_slice(&m.body),
    )))
}

/// A got message: id, message, redelivered, messages remaining.
pub type Got = (MsgId, Arc<Message>, bool, u32);

/// What the management API shows of a replicated queue on this node.
#[derive(Debug, Clone)]
pub struct Info {
    pub leader: Option<String>,
    pub members: Vec<String>,
    pub online: Vec<String>,
    pub ready: u32,
    pub unacked: u32,
    pub consumers: u32,
    /// This node holds a replica (its counts are current).
    pub replica: bool,
    /// `(consumer, prefetch, unacknowledged)`.
    pub consumer_details: Vec<(ConsumerKey, u32, u32)>,
}

impl ReplicatedQueue {
    /// The queue as this node knows it; a member then [`ReplicatedQueue::start`]s its replica.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vhost: &str,
        name: &str,
        durable: bool,
        auto_delete: bool,
        arguments: FieldTable,
        replicas: Replicas,
        node: &str,
        cluster: Weak<Cluster>,
    ) -> Arc<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let dead_letter = crate::queue::args::parse(&arguments, name, vhost)
            .ok()
            .and_then(|a| {
                let c = a.config;
                c.dead_letter_exchange
                    .map(|x| (x, c.dead_letter_routing_key))
            });
        let q = Arc::new_cyclic(|me| ReplicatedQueue {
            vhost: vhost.to_owned(),
            name: name.to_owned(),
            durable,
            auto_delete,
            arguments,
            state: Mutex::new(QueueState::new(replicas.config.clone())),
            replicas,
            node: node.to_owned(),
            me: me.clone(),
            local: Mutex::new(HashMap::new()),
            cancelling: Mutex::new(HashSet::new()),
            raft: OnceLock::new(),
            cluster,
            proposals: tx,
            pending_bytes: AtomicUsize::new(0),
            since_snapshot: AtomicUsize::new(0),
            entries_since_snapshot: AtomicU64::new(0),
            last_snapshot_len: Arc::new(AtomicUsize::new(0)),
            snapshot_asked: Arc::new(AtomicBool::new(false)),
            adding_learners: Arc::new(AtomicBool::new(false)),
            dead_letter,
            sink: Mutex::new(None),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(propose_loop(Arc::downgrade(&q), rx));
        }
        q
    }

    /// Where dead letters go (the vhost holding the queue).
    pub fn set_sink(&self, sink: Weak<dyn DeadLetterSink>) {
        *self.sink.lock() = Some(sink);
    }

    /// The leader dead-letters what applying a command killed (at most once, as RabbitMQ's
    /// default `at-most-once` strategy: a leader lost in between loses them).
    fn dead_letter(&self, dead: Vec<(state::Msg, state::Dead)>) {
        let Some((dlx, dlrk)) = &self.dead_letter else {
            return;
        };
        if !self.raft.get().is_some_and(|r| r.leading()) {
            return;
        }
        let Some(sink) = self.sink.lock().as_ref().and_then(Weak::upgrade) else {
            return;
        };
        let now = crate::queue::now_ms();
        for (m, why) in dead {
            let Some(msg) = message(&m) else { continue };
            let reason = match why {
                state::Dead::Rejected => DeadLetterReason::Rejected,
                state::Dead::DeliveryLimit => DeadLetterReason::DeliveryLimit,
            };
            let (letter, keys) = crate::dead_letter::dead_letter(
                &msg,
                &self.name,
                reason,
                now / 1000,
                dlx,
                dlrk.as_deref(),
            );
            let letter = DeadLetter {
                msg: Arc::new(letter),
                routing_keys: keys,
            };
            if !sink.dead_letter(dlx, letter, now) {
                tracing::debug!(queue = %self.name, dlx = %dlx, "dead-letter exchange missing; message dropped");
            }
        }
    }

    /// Waits until this replica runs and knows a leader, at most `within`.
    async fn wait_leader(&self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline {
            if self.raft.get().is_some_and(|r| r.has_leader()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether this node is a member (a voter of the queue's group).
    pub fn is_member(&self) -> bool {
        self.members().contains(&self.node)
    }

    /// Where this replica's Raft log and snapshots are kept.
    fn dir(cluster: &Cluster, group: &str) -> Option<PathBuf> {
        cluster.dir().map(|d| d.join("queues").join(group))
    }

    /// Opens this node's replica (creating the group if this node is the first member), then
    /// keeps it swept. Every node opens one: a node that is not a member follows as a Raft
    /// learner (the leader adds it), so its consumers are served where they are.
    pub async fn start(self: Arc<Self>) -> Result<(), String> {
        let cluster = self.cluster.upgrade().ok_or("node is stopping")?;
        let dir = Self::dir(&cluster, &self.replicas.group)
            .ok_or("a replicated queue needs a data directory")?;
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let members: BTreeMap<NodeId, Member> = self
            .replicas
            .members
            .iter()
            .map(|(id, name, addr)| {
                (
                    *id,
                    Member {
                        name: name.clone(),
                        addr: addr.clone(),
                    },
                )
            })
            .collect();
        // The first member creates the group (not a later incarnation of it: its data was
        // wiped, and the group exists without it).
        let first = self.replicas.members.first().map(|m| (m.0, m.1.as_str()))
            == Some((cluster.raft_id(), self.node.as_str()));
        let host: Arc<dyn Replicated> = self.clone();
        let raft = cluster
            .start_queue_group(host, &dir, &self.replicas.group, members, first)
            .await?;
        let _ = self.raft.set(raft);
        tokio::spawn(sweep_loop(Arc::downgrade(&self)));
        Ok(())
    }

    /// Stops this node's replica and removes its files (the queue was deleted).
    pub async fn stop(&self) {
        let Some(cluster) = self.cluster.upgrade() else {
            return;
        };
        cluster.stop_queue_group(&self.replicas.group).await;
        if let Some(dir) = Self::dir(&cluster, &self.replicas.group) {
            let _ = std::fs::remove_dir_all(dir);
        }
        let local: Vec<(ConsumerKey, Local)> = self.local.lock().drain().collect();
        for (k, l) in local {
            if k.tag != state::GET_TAG
                && let Some(t) = l.target.upgrade()
            {
                t.replicated_cancelled(&k.tag);
            }
        }
    }

    /// The key of a consumer of this node.
    pub fn key(&self, conn: u64, channel: u16, tag: &str) -> ConsumerKey {
        ConsumerKey {
            node: self.node.clone(),
            boot: boot(),
            conn,
            channel,
            tag: tag.to_owned(),
        }
    }

    fn submit(&self, command: Command, answer: Option<oneshot::Sender<Result<Outcome, String>>>) {
        let bytes = match &command {
            Command::Enqueue(m) => m.body.len() + m.header.len() + 64,
            _ => 64,
        };
        self.pending_bytes.fetch_add(bytes, Ordering::AcqRel);
        let p = Proposal {
            command,
            answer,
            bytes,
        };
        if let Err(mpsc::error::SendError(p)) = self.proposals.send(p) {
            self.pending_bytes.fetch_sub(p.bytes, Ordering::AcqRel);
            if let Some(a) = p.answer {
                let _ = a.send(Err("the queue is stopping".into()));
            }
        }
    }

    /// Proposes `command`; resolves once it is committed and applied on this node.
    pub async fn call(&self, command: Command) -> Result<Outcome, String> {
        let (tx, rx) = oneshot::channel();
        self.submit(command, Some(tx));
        rx.await.map_err(|_| "the queue is stopping".to_owned())?
    }

    /// Publishes `msg`: with `answers`, a confirm waits for the commit (a refusal is a nack).
    /// False if refused at once (too much waiting to be proposed).
    pub fn publish(&self, msg: &Message, answers: Option<&Arc<Answers>>) -> bool {
        if self.pending_bytes.load(Ordering::Acquire) > MAX_PENDING_BYTES {
            return false;
        }
        let command = Command::Enqueue(state::Msg {
            exchange: msg.exchange.clone(),
            routing_key: msg.routing_key.clone(),
            header: msg.header_payload.to_vec(),
            body: msg.body.to_vec(),
            returned: 0,
        });
        let Some(answers) = answers else {
            self.submit(command, None);
            return true;
        };
        answers.expect();
        let (tx, rx) = oneshot::channel();
        self.submit(command, Some(tx));
        let answers = answers.clone();
        tokio::spawn(async move {
            let ok = matches!(rx.await, Ok(Ok(_)));
            answers.answered(ok);
        });
        true
    }

    /// Attaches a consumer of this node (its deliveries go to `target`).
    pub async fn consume(
        &self,
        key: ConsumerKey,
        prefetch: u32,
        target: Weak<dyn LocalConsumer>,
    ) -> Result<(), String> {
        self.check_replica()?;
        self.local
            .lock()
            .insert(key.clone(), Local { target, prefetch });
        let r = self
            .call(Command::Checkout {
                consumer: key.clone(),
                prefetch,
            })
            .await;
        if r.is_err() {
            self.local.lock().remove(&key);
        }
        r.map(|_| ())
    }

    /// Detaches a consumer of this node (what it holds returns to the queue).
    pub fn cancel(&self, key: ConsumerKey) {
        self.local.lock().remove(&key);
        self.submit(Command::Cancel { consumer: key }, None);
    }

    /// Settles what `key` holds.
    pub fn settle(&self, key: &ConsumerKey, ids: Vec<MsgId>, how: crate::queue::state::Settlement) {
        use crate::queue::state::Settlement;
        let consumer = key.clone();
        let command = match how {
            Settlement::Ack => Command::Settle { consumer, ids },
            Settlement::Requeue => Command::Return { consumer, ids },
            Settlement::Discard => Command::Discard { consumer, ids },
        };
        self.submit(command, None);
    }

    /// `basic.get` for a channel of this node (held under its get key unless `no_ack`).
    pub async fn get(
        &self,
        key: ConsumerKey,
        no_ack: bool,
        target: Weak<dyn LocalConsumer>,
    ) -> Result<Option<Got>, String> {
        self.check_replica()?;
        if !no_ack {
            self.local.lock().insert(
                key.clone(),
                Local {
                    target,
                    prefetch: 0,
                },
            );
        }
        match self
            .call(Command::Get {
                consumer: key,
                no_ack,
            })
            .await?
        {
            Outcome::Got(Some((id, m, redelivered, remaining))) => {
                Ok(message(&m).map(|msg| (id, msg, redelivered, remaining)))
            }
            _ => Ok(None),
        }
    }

    pub async fn purge(&self) -> Result<u32, String> {
        self.check_replica()?;
        match self.call(Command::Purge).await? {
            Outcome::Count(n) => Ok(n),
            _ => Ok(0),
        }
    }

    /// A node without a replica proposes through a running member (which passes the
    /// command on to the leader).
    async fn propose_through_member(&self, command: Vec<u8>) -> Result<String, String> {
        let group = &self.replicas.group;
        self.ask_members(false, |cluster, m| {
            let command = command.clone();
            async move { cluster.group_write(&m, group, command).await }
        })
        .await
    }

    /// Asks each running member in turn (not this node if `skip_me`) with `call`: the first
    /// answer, or the last refusal.
    async fn ask_members<T, F, Fut>(&self, skip_me: bool, call: F) -> Result<T, String>
    where
        F: Fn(Arc<Cluster>, String) -> Fut,
        Fut: std::future::Future<Output = Result<T, String>>,
    {
        let cluster = self.cluster.upgrade().ok_or("node is stopping")?;
        let mut last = format!(
            "no member of queue '{}' is reachable ({})",
            self.name,
            self.members().join(", ")
        );
        for m in self.members() {
            if (skip_me && m == self.node) || !cluster.is_running(&m) {
                continue;
            }
            match call(cluster.clone(), m).await {
                Ok(answer) => return Ok(answer),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn check_replica(&self) -> Result<(), String> {
        if self.raft.get().is_some() || self.is_member() {
            Ok(())
        } else {
            Err(format!(
                "replicated queue '{}' has no replica on this node ({}); connect to one of \
                 its members: {}",
                self.name,
                self.node,
                self.members().join(", ")
            ))
        }
    }

    /// The member nodes: the voters of the queue's group as this replica knows them (grow and
    /// shrink change them), else those it was declared with.
    pub fn members(&self) -> Vec<String> {
        if let Some(raft) = self.raft.get() {
            let mut voters: Vec<String> = raft
                .voter_members()
                .into_iter()
                .map(|(_, m)| m.name)
                .collect();
            if !voters.is_empty() {
                // In declaration order (the declaring node first), then members added later.
                let declared = |n: &String| {
                    self.replicas
                        .members
                        .iter()
                        .position(|(_, m, _)| m == n)
                        .unwrap_or(usize::MAX)
                };
                voters.sort_by(|a, b| (declared(a), a).cmp(&(declared(b), b)));
                voters.dedup();
                return voters;
            }
        }
        self.replicas
            .members
            .iter()
            .map(|(_, n, _)| n.clone())
            .collect()
    }

    /// Makes `node` a member of the queue (a voter of its group: grow) or not (shrink; it
    /// follows as a learner again). Through this node's replica, on the group's leader; a
    /// replica the leader has not reached yet asks a running member.
    pub async fn set_member(&self, node: &str, member: bool) -> Result<(), String> {
        self.change_member(node, member).await?;
        // Read your write: this replica learns the new members as the change reaches it.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while self.members().iter().any(|m| m == node) != member
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    async fn change_member(&self, node: &str, member: bool) -> Result<(), String> {
        self.wait_leader(Duration::from_secs(5)).await;
        if let Some(raft) = self.raft.get()
            && !raft.voter_members().is_empty()
        {
            return raft.set_voter(node, member).await;
        }
        let group = &self.replicas.group;
        self.ask_members(true, |cluster, m| async move {
            cluster.group_set_voter(&m, group, node, member).await
        })
        .await
    }

    /// `(ready, consumers)` as this replica has them.
    pub fn counts(&self) -> (u32, u32) {
        let s = self.state.lock();
        (s.ready_len(), s.consumer_count())
    }

    /// The group's leader as this replica knows it.
    pub fn leader(&self) -> Option<String> {
        self.raft.get().and_then(|r| r.status().leader)
    }

    pub fn info(&self) -> Info {
        let cluster = self.cluster.upgrade();
        let members = self.members();
        let online = members
            .iter()
            .filter(|n| {
                **n == self.node || cluster.as_ref().is_some_and(|c| c.is_running(n.as_str()))
            })
            .cloned()
            .collect();
        let s = self.state.lock();
        Info {
            leader: self.leader(),
            members,
            online,
            ready: s.ready_len(),
            unacked: s.unacked_len(),
            consumers: s.consumer_count(),
            replica: self.raft.get().is_some(),
            consumer_details: s
                .consumers
                .iter()
                .map(|(k, c)| (k.clone(), c.prefetch, c.checked.len() as u32))
                .collect(),
        }
    }

    /// Whether this node is a voter of the queue's group that has not caught up with a
    /// leader since it started (not ready yet).
    pub fn catching_up(&self) -> bool {
        self.raft
            .get()
            .is_some_and(|r| !r.caught_up() && r.status().voter)
    }

    /// Whether this node leading the queue matters for a majority (draining it now would
    /// leave the queue's voters without one).
    pub fn critical(&self) -> bool {
        let Some(raft) = self.raft.get() else {
            return false;
        };
        raft.critical()
    }

    /// Hands deliveries for this node's consumers to their channels.
    fn deliver(&self, deliveries: Vec<Delivery>) {
        let Some(me) = self.me.upgrade() else {
            return;
        };
        let mut gone = Vec::new();
        for d in deliveries {
            if d.consumer.node != self.node || d.consumer.boot != boot() {
                continue;
            }
            let target = self
                .local
                .lock()
                .get(&d.consumer)
                .and_then(|l| l.target.upgrade());
            let delivered = match (target, message(&d.msg)) {
                (Some(t), Some(msg)) => {
                    t.deliver_replicated(&me, &d.consumer, d.id, d.redelivered, msg)
                }
                _ => false,
            };
            if !delivered {
                gone.push(d.consumer);
            }
        }
        for k in gone {
            if self.cancelling.lock().insert(k.clone()) {
                self.local.lock().remove(&k);
                self.submit(Command::Cancel { consumer: k }, None);
            }
        }
    }

    /// On the leader: running voters of the metadata group that are not in the queue's group
    /// join it as learners (in the background, one sweep at a time).
    fn add_learners(&self, raft: &Arc<Metadata>) {
        let Some(cluster) = self.cluster.upgrade() else {
            return;
        };
        let known = raft.node_ids();
        let missing: Vec<(NodeId, Member)> = cluster
            .metadata_voters()
            .into_iter()
            .filter(|(id, m)| !known.contains(id) && cluster.is_running(&m.name))
            .collect();
        if missing.is_empty()
            || raft.stepping_down()
            || self.adding_learners.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let raft = raft.clone();
        let name = self.name.clone();
        let adding = self.adding_learners.clone();
        tokio::spawn(async move {
            for (id, m) in missing {
                let node = m.name.clone();
                match raft.add_learner(id, m).await {
                    Ok(()) => {
                        tracing::info!(queue = %name, %node, "a node without a replica follows the queue as a learner")
                    }
                    Err(e) => tracing::debug!(queue = %name, %node, "learner not added yet: {e}"),
                }
            }
            adding.store(false, Ordering::Release);
        });
    }

    /// One sweep: release the consumers of nodes the leader cannot see, and of this node's
    /// earlier boots; cancel consumers of this node that are gone; re-attach live ones the
    /// state lost (released while this node was cut off).
    fn sweep(&self) {
        let Some(raft) = self.raft.get() else {
            return;
        };
        let cluster = self.cluster.upgrade();
        let (nodes, stale_boot, dead, present): (
            HashSet<String>,
            bool,
            Vec<ConsumerKey>,
            HashSet<ConsumerKey>,
        ) = {
            let s = self.state.lock();
            let local = self.local.lock();
            let mut nodes = HashSet::new();
            let mut stale_boot = false;
            let mut dead = Vec::new();
            let mut present = HashSet::new();
            for k in s.consumers.keys() {
                if k.node != self.node {
                    nodes.insert(k.node.clone());
                } else if k.boot != boot() {
                    stale_boot = true;
                } else if local.get(k).is_none_or(|l| l.target.strong_count() == 0) {
                    dead.push(k.clone());
                } else {
                    present.insert(k.clone());
                }
            }
            (nodes, stale_boot, dead, present)
        };
        if raft.leading() {
            self.add_learners(raft);
            for n in nodes {
                if !cluster.as_ref().is_some_and(|c| c.is_running(&n)) {
                    tracing::info!(queue = %self.name, node = %n, "releasing the consumers of a node this leader cannot see");
                    self.submit(
                        Command::Release {
                            node: n,
                            keep_boot: None,
                        },
                        None,
                    );
                }
            }
        }
        if stale_boot {
            self.submit(
                Command::Release {
                    node: self.node.clone(),
                    keep_boot: Some(boot()),
                },
                None,
            );
        }
        for k in dead {
            if self.cancelling.lock().insert(k.clone()) {
                self.submit(Command::Cancel { consumer: k }, None);
            }
        }
        let lost: Vec<(ConsumerKey, u32)> = self
            .local
            .lock()
            .iter()
            .filter(|(k, l)| {
                k.tag != state::GET_TAG && !present.contains(*k) && l.target.strong_count() > 0
            })
            .map(|(k, l)| (k.clone(), l.prefetch))
            .collect();
        for (consumer, prefetch) in lost {
            self.submit(Command::Checkout { consumer, prefetch }, None);
        }
        let state = self.state.lock();
        self.cancelling
            .lock()
            .retain(|k| state.consumers.contains_key(k));
    }
}

impl Replicated for ReplicatedQueue {
    fn apply(&self, command: &[u8]) -> String {
        static EVERY: OnceLock<u64> = OnceLock::new();
        let every = *EVERY.get_or_init(|| {
            crate::cluster::raft::snapshot_every("WARREN_QUEUE_SNAPSHOT_LOGS", 1024)
        });
        let bytes = self
            .since_snapshot
            .fetch_add(command.len(), Ordering::Relaxed)
            + command.len();
        let entries = self.entries_since_snapshot.fetch_add(1, Ordering::Relaxed) + 1;
        let last_len = self.last_snapshot_len.load(Ordering::Relaxed);
        if snapshot_due(entries, bytes, last_len, every)
            && !self.snapshot_asked.swap(true, Ordering::AcqRel)
            && let Some(raft) = self.raft.get().cloned()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let asked = self.snapshot_asked.clone();
            rt.spawn(async move {
                if let Err(e) = raft.snapshot_now().await {
                    tracing::warn!("queue snapshot not taken: {e}");
                    asked.store(false, Ordering::Release);
                }
            });
        }
        let commands: Vec<Command> = match decode_commands(command) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(queue = %self.name, "undecodable queue command skipped: {e}");
                return "[]".into();
            }
        };
        let mut deliveries = Vec::new();
        let (outcomes, dead): (Vec<Outcome>, _) = {
            let mut s = self.state.lock();
            let outcomes = commands
                .into_iter()
                .map(|c| s.apply(c, &mut deliveries))
                .collect();
            (outcomes, std::mem::take(&mut s.dead))
        };
        if !deliveries.is_empty() {
            self.deliver(deliveries);
        }
        if !dead.is_empty() {
            self.dead_letter(dead);
        }
        serde_json::to_string(&outcomes).unwrap_or_else(|_| "[]".into())
    }

    fn snapshot(&self) -> Box<dyn FnOnce() -> String + Send + Sync> {
        self.since_snapshot.store(0, Ordering::Relaxed);
        self.entries_since_snapshot.store(0, Ordering::Relaxed);
        self.snapshot_asked.store(false, Ordering::Release);
        // A copy now (in log order); the encoding, the costly part, later.
        let state = self.state.lock().clone();
        let (name, last_len) = (self.name.clone(), self.last_snapshot_len.clone());
        Box::new(move || {
            // The state is plain data with string-keyed maps: serialising it cannot fail.
            let text = serde_json::to_string(&state).unwrap_or_else(|e| {
                tracing::error!(queue = %name, "queue state not serialisable: {e}");
                String::new()
            });
            last_len.store(text.len(), Ordering::Relaxed);
            text
        })
    }

    fn install(&self, snapshot: &str) -> Result<(), String> {
        let state: QueueState = serde_json::from_str(snapshot).map_err(|e| e.to_string())?;
        // The entries a snapshot skips decided deliveries this node never handed to its
        // consumers' channels: what the state says they hold goes back to the queue.
        let unseen: Vec<(ConsumerKey, Vec<MsgId>)> = state
            .consumers
            .iter()
            .filter(|(k, c)| k.node == self.node && k.boot == boot() && !c.checked.is_empty())
            .map(|(k, c)| (k.clone(), c.checked.keys().copied().collect()))
            .collect();
        *self.state.lock() = state;
        for (consumer, ids) in unseen {
            self.submit(Command::Return { consumer, ids }, None);
        }
        Ok(())
    }

    fn install_command(&self) -> Vec<u8> {
        b"[]".to_vec()
    }
}

/// First byte of a Raft entry of queue commands in postcard (never the first byte of JSON,
/// which entries of earlier versions are).
const POSTCARD_COMMANDS: u8 = 0;

/// A Raft entry's commands: postcard, message bodies as bytes (no JSON, no base64).
/// `capacity`: about the bytes the commands take.
fn encode_commands(commands: &[&Command], capacity: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(capacity + 64 * commands.len() + 1);
    out.push(POSTCARD_COMMANDS);
    postcard::to_extend(commands, out).map_err(|e| e.to_string())
}

fn decode_commands(entry: &[u8]) -> Result<Vec<Command>, String> {
    match entry.split_first() {
        Some((&POSTCARD_COMMANDS, rest)) => postcard::from_bytes(rest).map_err(|e| e.to_string()),
        _ => serde_json::from_slice(entry).map_err(|e| e.to_string()),
    }
}

type Outcomes = Result<Vec<Outcome>, String>;

/// Proposes a queue's commands in order, as many as are waiting per Raft entry, one entry in
/// flight at a time. When an entry is not committed (no quorum, the leader lost),
/// commands with a waiting answer (a confirm, a get) are told so; the others (settlements,
/// cancels, checkouts, releases: idempotent, and nobody else would send them again) are
/// proposed again, ahead of anything newer, after a pause.
async fn propose_loop(q: Weak<ReplicatedQueue>, mut rx: mpsc::UnboundedReceiver<Proposal>) {
    // Commands of an entry that was not committed, to propose again first.
    let mut again: Vec<Proposal> = Vec::new();
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut batch = std::mem::take(&mut again);
        let retrying = !batch.is_empty();
        if batch.is_empty() {
            match rx.recv().await {
                Some(p) => batch.push(p),
                None => return,
            }
        }
        if retrying {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        } else {
            backoff = Duration::from_millis(100);
        }
        let mut bytes: usize = batch.iter().map(|p| p.bytes).sum();
        while bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(p) => {
                    bytes += p.bytes;
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let Some(queue) = q.upgrade() else {
            return;
        };
        if queue.raft.get().is_some() || queue.is_member() {
            // A new replica starting, a learner not added yet, or an election: wait
            // (bounded) rather than refuse.
            queue.wait_leader(Duration::from_secs(5)).await;
        }
        let raft = queue.raft.get().cloned();
        let commands: Vec<&Command> = batch.iter().map(|p| &p.command).collect();
        let entry = encode_commands(&commands, bytes);
        drop(commands);
        let decode = |out: Result<String, String>| -> Outcomes {
            out.and_then(|o| serde_json::from_str::<Vec<Outcome>>(&o).map_err(|e| e.to_string()))
        };
        let result: Outcomes = match (raft, entry) {
            (_, Err(e)) => Err(e),
            (Some(raft), Ok(entry)) => {
                drop(queue);
                decode(raft.propose(entry).await)
            }
            (None, Ok(entry)) if !queue.is_member() => {
                let r = queue.propose_through_member(entry).await;
                drop(queue);
                decode(r)
            }
            (None, Ok(_)) => Err(format!(
                "the replica of queue '{}' on this node is not running",
                queue.name
            )),
        };
        again = finish(&q, batch, bytes, result);
    }
}

/// Answers an entry's commands with its outcomes, or its failure; returns the commands
/// nobody waits for, to be proposed again.
fn finish(
    q: &Weak<ReplicatedQueue>,
    batch: Vec<Proposal>,
    bytes: usize,
    result: Outcomes,
) -> Vec<Proposal> {
    // An entry whose commands did not all apply (undecodable) confirms nothing.
    let result = result.and_then(|o| {
        if o.len() == batch.len() {
            Ok(o)
        } else {
            Err(format!(
                "{} outcomes for {} commands: the entry did not apply",
                o.len(),
                batch.len()
            ))
        }
    });
    match result {
        Ok(outcomes) => {
            if let Some(queue) = q.upgrade() {
                queue.pending_bytes.fetch_sub(bytes, Ordering::AcqRel);
            }
            for (p, o) in batch.into_iter().zip(outcomes) {
                if let Some(a) = p.answer {
                    let _ = a.send(Ok(o));
                }
            }
            Vec::new()
        }
        Err(e) => {
            tracing::debug!("queue commands not committed: {e}");
            let mut dropped = 0;
            let mut again = Vec::new();
            for p in batch {
                if p.answer.is_none() && !matches!(p.command, Command::Enqueue(_)) {
                    again.push(p);
                    continue;
                }
                dropped += p.bytes;
                if let Some(a) = p.answer {
                    let _ = a.send(Err(e.clone()));
                }
            }
            if let Some(queue) = q.upgrade() {
                queue.pending_bytes.fetch_sub(dropped, Ordering::AcqRel);
            }
            again
        }
    }
}

async fn sweep_loop(q: Weak<ReplicatedQueue>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(q) = q.upgrade() else {
            return;
        };
        if q.raft.get().is_none() {
            continue;
        }
        q.sweep();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deep_queue_snapshots_no_more_often_than_it_applies_its_size() {
        // A small queue: every 1,024 entries, or every 64 MiB of commands.
        assert!(!snapshot_due(1023, 1 << 20, 2_000, 1024));
        assert!(snapshot_due(1024, 1 << 20, 2_000, 1024));
        assert!(snapshot_due(10, SNAPSHOT_BYTES, 2_000, 1024));
        // A queue whose last snapshot took 500 MB: not before 500 MB more were applied.
        assert!(!snapshot_due(5_000, SNAPSHOT_BYTES, 500 << 20, 1024));
        assert!(!snapshot_due(50_000, (500 << 20) - 1, 500 << 20, 1024));
        assert!(snapshot_due(50_000, 500 << 20, 500 << 20, 1024));
    }

    fn key() -> ConsumerKey {
        ConsumerKey {
            node: "warren@a".into(),
            boot: 7,
            conn: 1,
            channel: 2,
            tag: "ctag".into(),
        }
    }

    fn commands() -> Vec<Command> {
        vec![
            Command::Enqueue(state::Msg {
                exchange: "x".into(),
                routing_key: "rk".into(),
                header: vec![0, 60, 0, 0, 1, 2, 3],
                body: (0..=255).collect(),
                returned: 1,
            }),
            Command::Checkout {
                consumer: key(),
                prefetch: 10,
            },
            Command::Settle {
                consumer: key(),
                ids: vec![1, 2, 3],
            },
            Command::Release {
                node: "warren@b".into(),
                keep_boot: Some(9),
            },
            Command::Purge,
        ]
    }

    /// Entries are postcard with bodies as bytes (a 256-byte body costs 256 bytes, not 344
    /// of base64 inside JSON); JSON entries of earlier versions still apply.
    #[test]
    fn commands_round_trip_in_postcard_and_json_entries_still_decode() {
        let commands = commands();
        let refs: Vec<&Command> = commands.iter().collect();
        let entry = encode_commands(&refs, 300).unwrap();
        assert_eq!(entry[0], POSTCARD_COMMANDS);
        assert!(entry.len() < 400, "{} bytes", entry.len());
        assert_eq!(decode_commands(&entry).unwrap(), commands);
        let json = serde_json::to_vec(&commands).unwrap();
        assert!(json.len() > entry.len() + 100);
        assert_eq!(decode_commands(&json).unwrap(), commands);
        assert!(decode_commands(b"\x00garbage").is_err());
    }
}
