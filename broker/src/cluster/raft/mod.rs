//! The metadata group: one Raft group over every member of the cluster, replicating the
//! broker's definitions (see ARCHITECTURE.md, "Replicated metadata"). openraft is kept
//! behind this module: the broker sees [`Replicated`] (what it implements: apply a command,
//! export and install its state) and [`Metadata`] (propose, status), never an openraft type.
//!
//! * **Propose → commit → apply.** [`Metadata::propose`] hands a command (validated by the
//!   broker first) to the leader (forwarded over the link if this node is not it); the leader
//!   appends it, replicates it, and once a majority has it on disk it is committed and applied
//!   on every node in log order. `propose` returns after the command is applied *on this node*
//!   too, so the caller reads its own write. A node that cannot see a majority of the voters
//!   refuses at once, naming them ([`QUORUM_LOST`]), instead of waiting.
//! * **Bootstrap.** The seed is the node whose own address is the first of `cluster-peers`
//!   (pod 0 of a StatefulSet). A node with no Raft state asks its running peers; if one belongs
//!   to a group it asks to join (the leader adds it as a learner, then as a voter). The seed
//!   alone, when no peer has a group after [`SEED_WAIT`], creates the group with itself as the
//!   only voter and proposes its definitions, which every joiner then installs (as a node
//!   joining a RabbitMQ cluster takes the cluster's definitions over its own).
//! * **Identity.** A node's Raft id is its incarnation (drawn when its data directory is
//!   new), so a node whose data was wiped joins as a new member and replaces its old self.

mod log;
mod network;
mod state;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, Raft, ServerState};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::Cluster;

pub type NodeId = u64;

/// A voter of the metadata group: its node name and inter-node address.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    pub addr: String,
}

impl std::fmt::Display for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.name, self.addr)
    }
}

use std::io::Cursor;

/// A command as the log holds it: the broker's own encoding (JSON for the metadata, a
/// binary encoding for queue commands), opaque here. Serialized as bytes; postcard encodes
/// it as it encoded the `String` of earlier versions, so their logs read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blob(#[serde(with = "crate::cluster::wire::as_bytes")] pub Vec<u8>);

impl std::fmt::Display for Blob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} bytes", self.0.len())
    }
}

openraft::declare_raft_types!(
    /// Commands are the broker's own bytes; outcomes its own JSON.
    pub TypeConfig:
        D = Blob,
        R = String,
        NodeId = NodeId,
        Node = Member,
);

/// What the broker implements for the metadata group. Commands are opaque here.
pub trait Replicated: Send + Sync + 'static {
    /// Applies a committed command (on every node, in log order); returns its outcome.
    /// Must be deterministic and idempotent.
    fn apply(&self, command: &[u8]) -> String;
    /// The replicated state as of now, for a snapshot. Called in log order (between two
    /// applies); the returned closure encodes it later, off the apply path, so a large state
    /// costs apply a copy, not its encoding.
    fn snapshot(&self) -> Box<dyn FnOnce() -> String + Send + Sync>;
    /// Replaces the replicated state with a snapshot's.
    fn install(&self, snapshot: &str) -> Result<(), String>;
    /// A command that makes any node's state equal to this node's now (proposed once, by the
    /// node that creates the group).
    fn install_command(&self) -> Vec<u8>;
}

/// How long the seed waits for a peer that already has a group before creating one.
pub const SEED_WAIT: Duration = Duration::from_secs(3);
/// How long a proposal may take before the caller is told it did not commit.
pub const PROPOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Start of the error a minority side answers (HTTP 503 / AMQP 541).
pub const QUORUM_LOST: &str = "metadata quorum lost";
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a node passing a write on waits for a leader (within the caller's CALL_TIMEOUT).
const FORWARD_WAIT: Duration = Duration::from_secs(3);
/// The longest election timeout. It is also openraft's leader lease: a follower that heard
/// from its leader within it refuses to vote for anyone else.
const ELECTION_TIMEOUT_MAX: Duration = Duration::from_millis(2000);
const JOIN_TIMEOUT: Duration = Duration::from_secs(15);

/// The RPCs of the metadata group, carried in [`crate::cluster::rpc::Request::Raft`].
#[derive(Serialize, Deserialize)]
pub enum RaftCall {
    Append(openraft::raft::AppendEntriesRequest<TypeConfig>),
    Vote(openraft::raft::VoteRequest<NodeId>),
    Snapshot(openraft::raft::InstallSnapshotRequest<TypeConfig>),
    /// A proposal forwarded to the leader; answered with `Result<(index, outcome), String>`.
    Write(Blob),
    /// A node asks to become a voter; answered with `Result<(), String>`.
    Join {
        id: NodeId,
        member: Member,
    },
    /// Remove a (stopped) node by name; answered with `Result<(), String>`.
    Remove {
        name: String,
    },
    /// Answered with [`MetaStatus`].
    Status,
    /// Stand for election now (the leader is handing leadership over; a drain). Answered
    /// with `Result<(), String>`.
    Elect,
    /// Make a learner a voter, or a voter a learner (on the leader; a queue's grow and
    /// shrink). Answered with `Result<(), String>`.
    SetVoter {
        name: String,
        voter: bool,
    },
}

/// The outcome of [`Metadata::step_down`].
#[derive(Debug, Clone, PartialEq)]
pub enum StepDown {
    /// This node did not lead the group.
    NotLeader,
    /// Leadership moved to the named node.
    Moved(String),
    /// This node still leads, and why.
    Kept(String),
}

/// A call as it crosses the link: `to` names the Raft id the caller means, so a node whose
/// data was wiped (a new id under the same name) does not answer for its former self.
#[derive(Serialize, Deserialize)]
pub struct Envelope {
    /// The group: None for the metadata group, else a replicated queue's group.
    #[serde(default)]
    pub group: Option<String>,
    pub to: Option<NodeId>,
    pub call: RaftCall,
}

/// The metadata group as one node sees it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MetaStatus {
    /// This node belongs to a group (it has a membership with at least one voter).
    pub initialized: bool,
    /// This node is a voter.
    pub voter: bool,
    pub leader: Option<String>,
    /// Names of the voters.
    pub voters: Vec<String>,
    pub term: u64,
    /// Index of the last entry applied on this node.
    pub applied: u64,
}

pub struct Metadata {
    /// None: the metadata group; else the name of a replicated queue's group.
    group: Option<String>,
    raft: Raft<TypeConfig>,
    id: NodeId,
    me: Member,
    cluster: Weak<Cluster>,
    host: Arc<dyn Replicated>,
    applied: watch::Receiver<u64>,
    /// Membership changes one at a time on the leader.
    changes: tokio::sync::Mutex<()>,
    /// Set once, as a voter, this node has applied everything it holds under a known leader.
    caught_up: AtomicBool,
    /// A leader has reached this node since it started (a restarted node knows who led before
    /// it stopped, but has not heard from that leader yet).
    heard_leader: AtomicBool,
    /// The highest commit index a leader's successful append told this node of: caught up
    /// means applied at least that far.
    leader_commit: AtomicU64,
    /// The seed is creating the group: until its definitions are committed as the first
    /// command, nothing else is proposed and nobody joins.
    bootstrapping: AtomicBool,
    /// This node leads and is handing leadership over ([`Metadata::step_down`]): it appends
    /// nothing (writes wait), so the followers' leases run out and one is elected.
    stepping_down: AtomicBool,
}

fn text<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// A group's Raft configuration: a snapshot every `every` entries (`env` overrides it, for
/// tests), keeping at most `keep` entries behind it.
fn config(
    name: &str,
    env: &str,
    every: u64,
    keep: u64,
    snapshot_timeout_ms: u64,
) -> Result<openraft::Config, String> {
    let every = snapshot_every(env, every);
    openraft::Config {
        cluster_name: name.to_owned(),
        heartbeat_interval: 250,
        election_timeout_min: 1000,
        election_timeout_max: ELECTION_TIMEOUT_MAX.as_millis() as u64,
        install_snapshot_timeout: snapshot_timeout_ms,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(every),
        max_in_snapshot_log_to_keep: every.min(keep),
        ..Default::default()
    }
    .validate()
    .map_err(text)
}

/// Entries between snapshots: `default`, or what the environment variable `env` says (tests
/// lower it).
pub fn snapshot_every(env: &str, default: u64) -> u64 {
    std::env::var(env)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
        .max(1)
}

impl Metadata {
    /// Opens the group's log and state under `dir`, starts Raft, and (without state) joins
    /// or creates the group in the background.
    pub async fn start(
        cluster: &Arc<Cluster>,
        host: Arc<dyn Replicated>,
        dir: &Path,
        seed: bool,
    ) -> Result<Arc<Metadata>, String> {
        let dir = dir.join("raft");
        let log = log::LogStore::open(&dir).map_err(text)?;
        let fresh = !log.has_state();
        let (applied_tx, applied) = watch::channel(0);
        let sm = state::StateMachine::open(&dir, host.clone(), applied_tx).map_err(text)?;
        // Entries between snapshots (a snapshot lets the log be truncated, and is what a new
        // or far-behind node receives). WARREN_RAFT_SNAPSHOT_LOGS lowers it for tests.
        let config = config(
            "warren-metadata",
            "WARREN_RAFT_SNAPSHOT_LOGS",
            500,
            100,
            5000,
        )?;
        let id = cluster.me.incarnation;
        let network = network::Network {
            cluster: Arc::downgrade(cluster),
            group: None,
        };
        let raft = Raft::new(id, Arc::new(config), network, log, sm)
            .await
            .map_err(text)?;
        let meta = Arc::new(Metadata {
            group: None,
            raft,
            id,
            me: Member {
                name: cluster.me.node.clone(),
                addr: cluster.me.advertise.clone(),
            },
            cluster: Arc::downgrade(cluster),
            host,
            applied,
            changes: tokio::sync::Mutex::new(()),
            caught_up: AtomicBool::new(false),
            heard_leader: AtomicBool::new(false),
            leader_commit: AtomicU64::new(0),
            bootstrapping: AtomicBool::new(false),
            stepping_down: AtomicBool::new(false),
        });
        if fresh {
            tokio::spawn(meta.clone().bootstrap(seed));
        }
        tokio::spawn(exit_if_raft_fails(meta.raft.metrics()));
        Ok(meta)
    }

    /// Opens (or creates) the group `group` of a replicated queue under `dir`, its state the
    /// queue (`host`). A new group is created by the node with `initialize`, with `members`
    /// as its voters; the others wait to be reached by its leader.
    pub async fn start_group(
        cluster: &Arc<Cluster>,
        host: Arc<dyn Replicated>,
        dir: &Path,
        group: String,
        members: BTreeMap<NodeId, Member>,
        initialize: bool,
    ) -> Result<Arc<Metadata>, String> {
        let log = log::LogStore::open(dir).map_err(text)?;
        let fresh = !log.has_state();
        let (applied_tx, applied) = watch::channel(0);
        let sm = state::StateMachine::open(dir, host.clone(), applied_tx).map_err(text)?;
        // A queue decides itself when to snapshot (`ReplicatedQueue::apply`: after 1,024
        // entries or 64 MiB, and not before as many bytes were applied as its last snapshot
        // took), so openraft never does.
        let mut config = config(
            &format!("warren-{group}"),
            "WARREN_QUEUE_SNAPSHOT_LOGS",
            1024,
            16,
            10000,
        )?;
        config.snapshot_policy = openraft::SnapshotPolicy::Never;
        let id = cluster.me.incarnation;
        let network = network::Network {
            cluster: Arc::downgrade(cluster),
            group: Some(group.clone()),
        };
        let raft = Raft::new(id, Arc::new(config), network, log, sm)
            .await
            .map_err(text)?;
        if fresh && initialize {
            raft.initialize(members).await.map_err(text)?;
        }
        let me = Member {
            name: cluster.me.node.clone(),
            addr: cluster.me.advertise.clone(),
        };
        Ok(Arc::new(Metadata {
            group: Some(group),
            raft,
            id,
            me,
            cluster: Arc::downgrade(cluster),
            host,
            applied,
            changes: tokio::sync::Mutex::new(()),
            caught_up: AtomicBool::new(false),
            heard_leader: AtomicBool::new(false),
            leader_commit: AtomicU64::new(0),
            bootstrapping: AtomicBool::new(false),
            stepping_down: AtomicBool::new(false),
        }))
    }

    /// The voters as `(id, member)`.
    pub fn voter_members(&self) -> Vec<(NodeId, Member)> {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        membership
            .voter_ids()
            .filter_map(|id| membership.get_node(&id).map(|n| (id, n.clone())))
            .collect()
    }

    /// Raft ids of every node of the group, voters and learners.
    pub fn node_ids(&self) -> Vec<NodeId> {
        let m = self.raft.metrics().borrow().clone();
        m.membership_config
            .membership()
            .nodes()
            .map(|(id, _)| *id)
            .collect()
    }

    /// Adds `member` as a learner (on the leader): it receives and applies the log but does
    /// not vote.
    pub async fn add_learner(&self, id: NodeId, member: Member) -> Result<(), String> {
        self.raft
            .add_learner(id, member, false)
            .await
            .map(|_| ())
            .map_err(text)
    }

    /// Takes a snapshot now (and truncates the log behind it).
    pub async fn snapshot_now(&self) -> Result<(), String> {
        self.raft.trigger().snapshot().await.map_err(text)
    }

    /// Whether this node knows a leader of the group (no copy of the metrics).
    pub fn has_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader.is_some()
    }

    /// Whether this node leads the group now.
    pub fn leading(&self) -> bool {
        self.is_leader()
    }

    /// Asks this node to stand for election (the leader is moving leadership here).
    async fn trigger_election(&self) -> Result<(), String> {
        self.raft.trigger().elect().await.map_err(text)
    }

    /// Moves leadership of the group off this node (a drain, before the node stops), and
    /// stops this node standing for election until [`Metadata::resume_elections`] (or a
    /// restart). As leader it appends nothing more (writes here wait, none are refused) so
    /// the followers' leases run out, then asks the most up-to-date voter to stand; once
    /// another node leads, waiting writes go to it. openraft 0.9 has no leadership transfer
    /// of its own. Gives up after `within`.
    pub async fn step_down(&self, within: Duration) -> StepDown {
        self.raft.runtime_config().elect(false);
        if !self.is_leader() {
            return StepDown::NotLeader;
        }
        let deadline = tokio::time::Instant::now() + within;
        let target = {
            let m = self.raft.metrics().borrow().clone();
            let membership = m.membership_config.membership();
            let matched = |id: &NodeId| {
                m.replication
                    .as_ref()
                    .and_then(|r| r.get(id).cloned().flatten())
                    .map(|l| l.index)
            };
            let cluster = self.cluster.upgrade();
            membership
                .voter_ids()
                .filter(|v| *v != self.id)
                .filter_map(|v| membership.get_node(&v).map(|n| (v, n.clone())))
                .filter(|(_, n)| cluster.as_ref().is_some_and(|c| c.is_running(&n.name)))
                .max_by_key(|(v, _)| matched(v))
        };
        let Some((target, member)) = target else {
            return StepDown::Kept("no other voter is running to take over".into());
        };
        self.stepping_down.store(true, Ordering::Release);
        self.raft.runtime_config().heartbeat(false);
        tokio::time::sleep(ELECTION_TIMEOUT_MAX + Duration::from_millis(100)).await;
        while self.is_leader() && tokio::time::Instant::now() < deadline {
            let envelope = Envelope {
                group: self.group.clone(),
                to: Some(target),
                call: RaftCall::Elect,
            };
            if let Some(cluster) = self.cluster.upgrade()
                && let Err(e) = cluster
                    .raft_call(&member.name, &envelope, CALL_TIMEOUT)
                    .await
            {
                tracing::debug!(node = %member.name, "asked to stand for election: {e}");
            }
            let until = tokio::time::Instant::now() + Duration::from_secs(1);
            while self.is_leader() && tokio::time::Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        self.raft.runtime_config().heartbeat(true);
        self.stepping_down.store(false, Ordering::Release);
        if self.is_leader() {
            return StepDown::Kept(format!("no other voter was elected within {within:?}"));
        }
        while tokio::time::Instant::now() < deadline {
            if let Some(l) = self.leader()
                && l.name != self.me.name
            {
                return StepDown::Moved(l.name);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        StepDown::Moved(member.name)
    }

    /// This node stands for election again (a drain ended).
    pub fn resume_elections(&self) {
        self.raft.runtime_config().elect(true);
    }

    /// While this node hands leadership over, writes wait (bounded by the caller's timeout)
    /// instead of extending the followers' leases.
    async fn wait_step_down(&self) {
        while self.stepping_down.load(Ordering::Acquire) && self.is_leader() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether this node is handing leadership over (it starts nothing new as leader).
    pub fn stepping_down(&self) -> bool {
        self.stepping_down.load(Ordering::Acquire)
    }

    pub fn status(&self) -> MetaStatus {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let name = |id: &NodeId| membership.get_node(id).map(|n| n.name.clone());
        let voters: Vec<String> = membership.voter_ids().filter_map(|id| name(&id)).collect();
        MetaStatus {
            initialized: !voters.is_empty() && !self.bootstrapping.load(Ordering::Acquire),
            voter: membership.voter_ids().any(|v| v == self.id),
            leader: m.current_leader.as_ref().and_then(name),
            voters,
            term: m.current_term,
            applied: *self.applied.borrow(),
        }
    }

    /// Voters this node cannot reach (itself excluded), and how many voters there are.
    fn unreachable_voters(&self) -> (Vec<String>, usize) {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let cluster = self.cluster.upgrade();
        let mut down = Vec::new();
        let mut n = 0;
        for id in membership.voter_ids() {
            n += 1;
            let Some(node) = membership.get_node(&id) else {
                continue;
            };
            if id != self.id && !cluster.as_ref().is_some_and(|c| c.is_running(&node.name)) {
                down.push(node.name.clone());
            }
        }
        (down, n)
    }

    /// Whether this node going away would leave the voters without a majority.
    pub fn critical(&self) -> bool {
        let (down, n) = self.unreachable_voters();
        let status = self.status();
        status.voter && n > 0 && (n - down.len() - 1) * 2 <= n
    }

    /// How errors name the group's lost quorum.
    fn lost(&self) -> String {
        match &self.group {
            None => QUORUM_LOST.to_owned(),
            Some(g) => format!("queue quorum lost ({g})"),
        }
    }

    fn check_quorum(&self) -> Result<(), String> {
        let (down, n) = self.unreachable_voters();
        let lost = self.lost();
        if n == 0 {
            return Err(match self.group {
                None => {
                    format!("{lost}: this node has not joined the cluster's metadata group yet")
                }
                Some(_) => format!(
                    "{lost}: the queue's leader has not reached this node's replica yet; retry"
                ),
            });
        }
        let up = n - down.len();
        if up * 2 <= n {
            return Err(format!(
                "{lost}: {up} of {n} nodes reachable (down: {}); changes are refused \
                 until a majority is back",
                down.join(", ")
            ));
        }
        Ok(())
    }

    /// Proposes `command`; returns its outcome once committed and applied on this node.
    pub async fn propose(&self, command: Vec<u8>) -> Result<String, String> {
        let command = Blob(command);
        if self.bootstrapping.load(Ordering::Acquire) {
            return Err(format!(
                "{QUORUM_LOST}: the cluster's metadata group is being created; retry"
            ));
        }
        self.check_quorum()?;
        let lost = self.lost();
        let work = async {
            let (index, outcome) = loop {
                self.wait_step_down().await;
                // A follower that knows the leader sends the change there directly, without
                // first asking its own Raft core (which would only answer "forward").
                if let Some(leader) = self.other_leader() {
                    let answer = self.call(&leader, RaftCall::Write(command.clone())).await?;
                    break serde_json::from_str::<Result<(u64, String), String>>(&answer)
                        .map_err(text)??;
                }
                match self.raft.client_write(command.clone()).await {
                    Ok(r) => break (r.log_id.index, r.data),
                    Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                        let Some(leader) = f.leader_node else {
                            // An election (a majority is reachable): wait for its outcome.
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        };
                        let answer = self.call(&leader.name, RaftCall::Write(command)).await?;
                        break serde_json::from_str::<Result<(u64, String), String>>(&answer)
                            .map_err(text)??;
                    }
                    Err(e) => return Err(e.to_string()),
                }
            };
            let mut applied = self.applied.clone();
            applied
                .wait_for(|a| *a >= index)
                .await
                .map_err(|_| "node is stopping".to_owned())?;
            Ok(outcome)
        };
        match tokio::time::timeout(PROPOSE_TIMEOUT, work).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "{lost}: the change was not committed within {PROPOSE_TIMEOUT:?} (no \
                 majority answering); it may still be applied"
            )),
        }
    }

    /// Proposes `command` at the leader `name` (Raft id `id`), which does not forward it again.
    async fn write_at(
        &self,
        name: &str,
        id: NodeId,
        command: Blob,
    ) -> Result<(u64, String), String> {
        let cluster = self.cluster.upgrade().ok_or("node is stopping")?;
        let envelope = Envelope {
            group: self.group.clone(),
            to: Some(id),
            call: RaftCall::Write(command),
        };
        let answer = cluster.raft_call(name, &envelope, CALL_TIMEOUT).await?;
        serde_json::from_str::<Result<(u64, String), String>>(&answer).map_err(text)?
    }

    async fn call(&self, name: &str, call: RaftCall) -> Result<String, String> {
        let cluster = self.cluster.upgrade().ok_or("node is stopping")?;
        let envelope = Envelope {
            group: self.group.clone(),
            to: None,
            call,
        };
        cluster.raft_call(name, &envelope, CALL_TIMEOUT).await
    }

    fn leader(&self) -> Option<Member> {
        let m = self.raft.metrics().borrow().clone();
        let id = m.current_leader?;
        m.membership_config.membership().get_node(&id).cloned()
    }

    /// The leader's name, when it is known and is another node.
    fn other_leader(&self) -> Option<String> {
        let m = self.raft.metrics();
        let m = m.borrow();
        let id = m.current_leader.filter(|id| *id != self.id)?;
        let member = m.membership_config.membership().get_node(&id)?;
        Some(member.name.clone())
    }

    fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().state == ServerState::Leader
    }

    /// Serves an RPC from a peer; returns the JSON answer, or why the call is not for this
    /// node (sent back as an error: the caller treats the target as unreachable).
    pub async fn handle(&self, envelope: Envelope) -> Result<String, String> {
        if let Some(to) = envelope.to
            && to != self.id
        {
            return Err(format!(
                "{} is Raft member {}, not {to} (its data directory was wiped; it rejoins as a \
                 new member)",
                self.me.name, self.id
            ));
        }
        let call = envelope.call;
        let json = |r: Result<serde_json::Value, serde_json::Error>| match r {
            Ok(v) => v.to_string(),
            Err(e) => serde_json::json!({"Err": e.to_string()}).to_string(),
        };
        Ok(match call {
            RaftCall::Append(req) => {
                let commit = req.leader_commit.map_or(0, |l| l.index);
                let r = self.raft.append_entries(req).await;
                if r.as_ref().is_ok_and(|a| a.is_success()) {
                    self.leader_commit.fetch_max(commit, Ordering::Relaxed);
                    self.heard_leader.store(true, Ordering::Relaxed);
                }
                json(serde_json::to_value(r))
            }
            RaftCall::Vote(req) => json(serde_json::to_value(self.raft.vote(req).await)),
            RaftCall::Snapshot(req) => {
                json(serde_json::to_value(self.raft.install_snapshot(req).await))
            }
            RaftCall::Write(command) => {
                // A leader handing over, or an election: wait (bounded, within the caller's
                // timeout) rather than refuse.
                let deadline = tokio::time::Instant::now() + FORWARD_WAIT;
                let _ = tokio::time::timeout_at(deadline, self.wait_step_down()).await;
                let r = loop {
                    match self.raft.client_write(command.clone()).await {
                        Ok(r) => break Ok((r.log_id.index, r.data)),
                        // From a node outside the group, or a member that took this node for
                        // the leader (`to` unset): one hop on to the leader.
                        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))
                            if envelope.to.is_none() =>
                        {
                            match (f.leader_id, f.leader_node) {
                                (Some(id), Some(leader)) if id != self.id => {
                                    break self.write_at(&leader.name, id, command).await;
                                }
                                _ if tokio::time::Instant::now() < deadline => {
                                    tokio::time::sleep(Duration::from_millis(20)).await
                                }
                                _ => {
                                    break Err(format!(
                                        "{}: no leader elected yet; retry",
                                        self.lost()
                                    ));
                                }
                            }
                        }
                        Err(e) => break Err(e.to_string()),
                    }
                };
                json(serde_json::to_value(r))
            }
            RaftCall::Join { id, member } => {
                json(serde_json::to_value(self.join(id, member).await))
            }
            RaftCall::Remove { name } => json(serde_json::to_value(self.remove(&name).await)),
            RaftCall::Status => json(serde_json::to_value(self.status())),
            RaftCall::Elect => json(serde_json::to_value(self.trigger_election().await)),
            RaftCall::SetVoter { name, voter } => {
                json(serde_json::to_value(self.set_voter(&name, voter).await))
            }
        })
    }

    /// Passes a membership change on to the leader (one hop); `no_leader` says why when
    /// there is none.
    async fn on_leader(&self, call: RaftCall, no_leader: String) -> Result<(), String> {
        let leader = self.leader().ok_or(no_leader)?;
        if leader.name == self.me.name {
            return Err("leadership is changing; retry".into());
        }
        let answer = self.call(&leader.name, call).await?;
        serde_json::from_str::<Result<(), String>>(&answer).map_err(text)?
    }

    /// On the leader: makes `id` a voter — first a learner caught up with the log
    /// (`learner_first`, within [`JOIN_TIMEOUT`]) — then takes `replaced` (earlier
    /// incarnations of the node) out of the voters.
    async fn promote(
        &self,
        id: NodeId,
        member: Member,
        learner_first: bool,
        replaced: BTreeSet<NodeId>,
    ) -> Result<(), String> {
        let name = member.name.clone();
        if learner_first {
            tokio::time::timeout(JOIN_TIMEOUT, self.raft.add_learner(id, member, true))
                .await
                .map_err(|_| format!("{name} did not catch up within {JOIN_TIMEOUT:?}"))?
                .map_err(text)?;
        }
        self.raft
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
            .await
            .map_err(text)?;
        if !replaced.is_empty() {
            tracing::info!(node = %name, "removing the node's earlier incarnation from the group");
            self.raft
                .change_membership(ChangeMembers::RemoveVoters(replaced), false)
                .await
                .map_err(text)?;
        }
        Ok(())
    }

    /// Adds a node as a voter (on the leader; elsewhere forwarded to it, one hop).
    async fn join(&self, id: NodeId, member: Member) -> Result<(), String> {
        if self.bootstrapping.load(Ordering::Acquire) {
            return Err("the metadata group is being created; retry".into());
        }
        if !self.is_leader() {
            let no_leader = "no metadata leader yet".to_owned();
            return self
                .on_leader(RaftCall::Join { id, member }, no_leader)
                .await;
        }
        let _one = self.changes.lock().await;
        let membership = self.raft.metrics().borrow().membership_config.clone();
        let membership = membership.membership();
        if membership.voter_ids().any(|v| v == id) {
            return Ok(());
        }
        // The same node with an earlier incarnation (its data was wiped): replaced.
        let stale: BTreeSet<NodeId> = membership
            .nodes()
            .filter(|(i, n)| n.name == member.name && **i != id)
            .map(|(i, _)| *i)
            .collect();
        tracing::info!(node = %member.name, "adding a node to the metadata group");
        self.promote(id, member, true, stale).await
    }

    /// Makes node `name` a voter of the group (`voter`), or takes it out of the voters (it
    /// then follows as a learner again once the leader's sweep adds it back), on the leader;
    /// elsewhere forwarded to it, one hop. A queue's grow and shrink. The node's
    /// Raft id is its id in the metadata group (its incarnation now).
    pub async fn set_voter(&self, name: &str, voter: bool) -> Result<(), String> {
        // A group just created, or electing: wait (bounded) for its leader.
        let deadline = tokio::time::Instant::now() + PROPOSE_TIMEOUT;
        while !self.has_leader() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.check_quorum()?;
        if !self.is_leader() {
            let call = RaftCall::SetVoter {
                name: name.to_owned(),
                voter,
            };
            let no_leader = format!("{}: no leader elected yet; retry", self.lost());
            return self.on_leader(call, no_leader).await;
        }
        let _one = self.changes.lock().await;
        let membership = self.raft.metrics().borrow().membership_config.clone();
        let membership = membership.membership();
        let voters: BTreeSet<NodeId> = membership
            .voter_ids()
            .filter(|v| membership.get_node(v).is_some_and(|n| n.name == name))
            .collect();
        if !voter {
            if voters.is_empty() {
                return Ok(());
            }
            if membership.voter_ids().count() <= voters.len() {
                return Err(format!("{name} is the only member; it cannot be removed"));
            }
            if voters.contains(&self.id) {
                // The leader does not remove itself (openraft 0.9 trips over a leader that
                // left the voters): leadership moves first, and the new leader removes it.
                drop(_one);
                let moved = self.step_down(PROPOSE_TIMEOUT * 2).await;
                self.resume_elections();
                let StepDown::Moved(to) = moved else {
                    return Err(format!(
                        "{name} leads the queue and could not hand leadership over ({moved:?}); retry"
                    ));
                };
                let call = RaftCall::SetVoter {
                    name: name.to_owned(),
                    voter,
                };
                let answer = self.call(&to, call).await?;
                return serde_json::from_str::<Result<(), String>>(&answer).map_err(text)?;
            }
            self.raft
                .change_membership(ChangeMembers::RemoveVoters(voters), false)
                .await
                .map_err(text)?;
            return Ok(());
        }
        let cluster = self.cluster.upgrade().ok_or("node is stopping")?;
        // The node as it is now: its Raft id in the metadata group.
        let (id, member) = cluster
            .metadata_voters()
            .into_iter()
            .find(|(_, m)| m.name == name)
            .ok_or_else(|| format!("{name} is not a member of the cluster"))?;
        if voters.contains(&id) {
            return Ok(());
        }
        if !cluster.is_running(name) && name != self.me.name {
            return Err(format!("{name} is not running"));
        }
        let known = membership.nodes().any(|(i, _)| *i == id);
        // Earlier incarnations of the node (its data was wiped) are replaced.
        self.promote(id, member, !known, voters).await
    }

    /// Removes `name` from the voters (on the leader; elsewhere forwarded to it).
    pub async fn remove(&self, name: &str) -> Result<(), String> {
        let status = self.status();
        if !status.initialized || !status.voters.iter().any(|v| v == name) && self.is_leader() {
            // Not (or no longer) a member of the group as this node knows it.
            return Ok(());
        }
        self.check_quorum()?;
        if !self.is_leader() {
            let call = RaftCall::Remove {
                name: name.to_owned(),
            };
            return self
                .on_leader(call, format!("{QUORUM_LOST}: no metadata leader"))
                .await;
        }
        let _one = self.changes.lock().await;
        let membership = self.raft.metrics().borrow().membership_config.clone();
        let ids: BTreeSet<NodeId> = membership
            .membership()
            .nodes()
            .filter(|(_, n)| n.name == name)
            .map(|(i, _)| *i)
            .collect();
        if ids.is_empty() {
            return Ok(());
        }
        let voters: BTreeSet<NodeId> = membership
            .membership()
            .voter_ids()
            .filter(|v| ids.contains(v))
            .collect();
        let change = if voters.is_empty() {
            ChangeMembers::RemoveNodes(ids)
        } else {
            ChangeMembers::RemoveVoters(voters)
        };
        tokio::time::timeout(PROPOSE_TIMEOUT, self.raft.change_membership(change, false))
            .await
            .map_err(|_| format!("{QUORUM_LOST}: removing {name} did not commit"))?
            .map_err(text)?;
        Ok(())
    }

    /// Joins a group through a running peer, or (the seed, when none has one) creates it.
    async fn bootstrap(self: Arc<Self>, seed: bool) {
        let started = Instant::now();
        let mut last_error = String::new();
        loop {
            if self.status().initialized {
                return;
            }
            let peers = self
                .cluster
                .upgrade()
                .map(|c| c.running_peers())
                .unwrap_or_default();
            let mut grouped = false;
            for name in peers {
                let Ok(answer) = self.call(&name, RaftCall::Status).await else {
                    continue;
                };
                let Ok(status) = serde_json::from_str::<MetaStatus>(&answer) else {
                    continue;
                };
                if !status.initialized {
                    continue;
                }
                grouped = true;
                let join = RaftCall::Join {
                    id: self.id,
                    member: self.me.clone(),
                };
                let result = match self.call(&name, join).await {
                    Ok(a) => serde_json::from_str::<Result<(), String>>(&a)
                        .map_err(text)
                        .and_then(|r| r),
                    Err(e) => Err(e),
                };
                match result {
                    Ok(()) => {
                        tracing::info!(through = %name, "joined the cluster's metadata group");
                        return;
                    }
                    Err(e) if e != last_error => {
                        tracing::info!(through = %name, "cannot join the metadata group yet: {e}");
                        last_error = e;
                    }
                    Err(_) => {}
                }
            }
            if seed && !grouped && started.elapsed() >= SEED_WAIT {
                match self.create().await {
                    Ok(()) => return,
                    Err(e) => tracing::warn!("cannot create the metadata group: {e}"),
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Creates the group with this node as its only voter and commits this node's definitions
    /// as its first command, before any other proposal or join is accepted.
    async fn create(&self) -> Result<(), String> {
        self.bootstrapping.store(true, Ordering::Release);
        let result = async {
            let me = BTreeMap::from([(self.id, self.me.clone())]);
            self.raft.initialize(me).await.map_err(text)?;
            let mut metrics = self.raft.metrics();
            tokio::time::timeout(
                PROPOSE_TIMEOUT,
                metrics.wait_for(|m| m.state == ServerState::Leader),
            )
            .await
            .map_err(|_| "not leader of the new group within 5 s".to_owned())?
            .map_err(text)?;
            let install = self.host.install_command();
            let done = self.raft.client_write(Blob(install)).await.map_err(text)?;
            let mut applied = self.applied.clone();
            applied
                .wait_for(|a| *a >= done.log_id.index)
                .await
                .map_err(text)?;
            Ok::<(), String>(())
        }
        .await;
        self.bootstrapping.store(false, Ordering::Release);
        if result.is_ok() {
            tracing::info!(
                "created the cluster's metadata group with this node's definitions (this node \
                 is the seed: the first of cluster-peers)"
            );
        }
        result
    }

    /// Whether this node has joined the group as a voter and caught up with a leader since it
    /// started (readiness).
    pub fn caught_up(&self) -> bool {
        if self.caught_up.load(Ordering::Relaxed) {
            return true;
        }
        let m = self.raft.metrics().borrow().clone();
        let voter = m
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == self.id);
        let led = (m.state == ServerState::Leader && !self.bootstrapping.load(Ordering::Acquire))
            || self.heard_leader.load(Ordering::Relaxed);
        let applied = m.last_applied.map(|l| l.index);
        if voter
            && led
            && m.current_leader.is_some()
            && applied.is_some()
            && applied >= m.last_log_index
            && applied >= Some(self.leader_commit.load(Ordering::Relaxed))
        {
            self.caught_up.store(true, Ordering::Relaxed);
            match &self.group {
                None => tracing::info!("caught up with the cluster's metadata group"),
                Some(g) => tracing::info!(group = %g, "caught up with the queue's leader"),
            }
            return true;
        }
        false
    }

    pub async fn shutdown(&self) {
        let _ = self.raft.shutdown().await;
    }
}

/// A Raft core that stopped on a storage error or a panic cannot recover in place: this node
/// would go on serving, ready, with definitions that no longer follow the cluster. Exit
/// instead, so the supervisor (the kubelet, systemd) restarts it from its log.
async fn exit_if_raft_fails(mut metrics: watch::Receiver<openraft::RaftMetrics<NodeId, Member>>) {
    loop {
        let state = metrics.borrow_and_update().running_state.clone();
        match state {
            Ok(()) | Err(openraft::error::Fatal::Stopped) => {}
            Err(fatal) => {
                tracing::error!(
                    "the cluster's metadata group stopped on this node ({fatal}); exiting so \
                     the node restarts and rejoins"
                );
                std::process::exit(70);
            }
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod postcard_tests {
    use super::*;

    /// A command is bytes now; postcard wrote the `String` of earlier versions the same way,
    /// and JSON wrote a string, so their logs and calls read.
    #[test]
    fn blobs_read_what_strings_wrote() {
        let text = "[{\"x\":1}]".to_owned();
        let s = postcard::to_allocvec(&text).unwrap();
        assert_eq!(
            s,
            postcard::to_allocvec(&Blob(text.clone().into_bytes())).unwrap()
        );
        let b: Blob = postcard::from_bytes(&s).unwrap();
        assert_eq!(b.0, text.as_bytes());
        let j: Blob = serde_json::from_str(&serde_json::to_string(&text).unwrap()).unwrap();
        assert_eq!(j.0, text.as_bytes());
    }

    #[test]
    fn raft_calls_round_trip_through_postcard() {
        use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Vote};
        let entry = Entry::<TypeConfig> {
            log_id: LogId::new(CommittedLeaderId::new(3, 7), 11),
            payload: EntryPayload::Normal(Blob(b"[{\"x\":1}]".to_vec())),
        };
        let req = openraft::raft::AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new_committed(3, 7),
            prev_log_id: Some(LogId::new(CommittedLeaderId::new(2, 7), 10)),
            entries: vec![entry],
            leader_commit: Some(LogId::new(CommittedLeaderId::new(3, 7), 10)),
        };
        let env = Envelope {
            group: Some("q1".into()),
            to: Some(7),
            call: RaftCall::Append(req),
        };
        let bytes = postcard::to_allocvec(&env).expect("encode");
        let back: Envelope = postcard::from_bytes(&bytes).expect("decode");
        assert_eq!(back.group.as_deref(), Some("q1"));
        let RaftCall::Append(r) = back.call else {
            panic!("not an append");
        };
        assert_eq!(r.entries.len(), 1);
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            serde_json::to_string(&match env.call {
                RaftCall::Append(r) => r,
                _ => unreachable!(),
            })
            .unwrap()
        );
    }
}
