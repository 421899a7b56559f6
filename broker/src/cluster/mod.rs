//! Clustering: the inter-node transport on 25672, membership, and (to come) the replicated
//! metadata and queues. See ARCHITECTURE.md, "Clustering".
//!
//! * [`wire`] frames and checksums what crosses a link (no I/O);
//! * [`handshake`] authenticates both ends with the cluster secret;
//! * [`link`] runs one authenticated connection carrying requests both ways;
//! * [`rpc`] the requests and their answers;
//! * this module keeps the membership: which nodes belong, which are reachable now.
//!
//! **Membership.** A node dials every address in `cluster-peers` (its own address among
//! them is recognised at the handshake and dropped) and accepts links from any node that
//! proves it knows the secret; a node that dials in from an address nobody configured is
//! dialled back at the address it advertises, so a new node needs only one live peer in its
//! list to join. Each outgoing link is heartbeated every second; a peer that does not answer
//! within [`PING_TIMEOUT`] is marked down and redialled with backoff. The set of members is
//! remembered in the data directory (`cluster/members`), so a whole-cluster restart in any
//! order needs no manual step. [`Cluster::forget`] removes a stopped node: every member is
//! told (and members that were away learn it from heartbeat answers), and that node is
//! refused until its data directory is wiped — it then has a new incarnation and may join
//! again, as a reset RabbitMQ node can.

pub mod handshake;
pub mod link;
pub mod raft;
pub mod rpc;
pub mod wire;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use tokio::net::{TcpListener, TcpStream};

use handshake::{HandshakeError, Identity};
use link::{Handler, Link};
use rpc::{NodeStatus, Request, Response};

/// How often an outgoing link is heartbeated.
pub const PING_INTERVAL: Duration = Duration::from_secs(1);
/// A peer that has not answered a heartbeat for this long is down.
pub const PING_TIMEOUT: Duration = Duration::from_secs(4);
/// Connect plus handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
const REDIAL_MIN: Duration = Duration::from_millis(200);
const REDIAL_MAX: Duration = Duration::from_secs(3);

/// Reports this node's status for heartbeats (the broker provides it).
pub type StatusFn = Box<dyn Fn() -> NodeStatus + Send + Sync>;

/// The broker's side of [`Request::Broker`] calls from other nodes.
pub trait BrokerCalls: Send + Sync + 'static {
    /// Serves one call from `from`. Called on the link's reader in the order the calls were
    /// sent, so whatever must keep that order (enqueueing forwarded publishes) is done before
    /// this returns; the future produces the answer (after a disk sync, say).
    fn serve(&self, from: &str, call: Vec<u8>) -> link::Answer;
}

/// A remote node this node knows of.
pub struct Peer {
    pub name: String,
    incarnation: AtomicU64,
    advertise: Mutex<String>,
    link: Mutex<Option<Arc<Link>>>,
    last_seen: Mutex<Option<Instant>>,
    status: Mutex<Option<NodeStatus>>,
}

/// A node as the management API shows it.
#[derive(Debug, Clone)]
pub struct NodeView {
    pub name: String,
    pub running: bool,
    /// The node's own report (None for a node that has not answered since this one started).
    pub status: Option<NodeStatus>,
}

impl Peer {
    fn running(&self) -> bool {
        let up = self.link.lock().as_ref().is_some_and(|l| !l.is_closed());
        up && self
            .last_seen
            .lock()
            .is_some_and(|t| t.elapsed() < PING_TIMEOUT)
    }
}

pub struct Cluster {
    me: Identity,
    status: StatusFn,
    peers: RwLock<BTreeMap<String, Arc<Peer>>>,
    /// Addresses with a dial task running.
    dialing: Mutex<HashSet<String>>,
    /// `(name → incarnation)` of nodes removed from the cluster.
    forgotten: RwLock<BTreeMap<String, u64>>,
    /// Where the member and forgotten lists are kept (None: not remembered, in tests).
    dir: Option<PathBuf>,
    /// The metadata group, once started (see [`Cluster::start_metadata`]).
    meta: std::sync::OnceLock<Arc<raft::Metadata>>,
    /// Serves broker calls from other nodes (see [`Cluster::serve_broker_calls`]).
    broker: std::sync::OnceLock<Arc<dyn BrokerCalls>>,
    /// The groups of replicated queues this node is a member of, by group name.
    groups: RwLock<HashMap<String, Arc<raft::Metadata>>>,
}

/// Why a node cannot be forgotten.
#[derive(Debug, thiserror::Error)]
pub enum ForgetError {
    #[error("{0} is not a member of this cluster")]
    NotMember(String),
    #[error("{0} is this node")]
    Itself(String),
    #[error("{0} is running: stop it before removing it from the cluster")]
    Running(String),
    /// The metadata group could not remove it (no quorum).
    #[error("{0}")]
    Metadata(String),
}

/// How a node refuses one it has forgotten (the refused node recognises it, see
/// [`forgotten_by`]).
const FORGOTTEN: &str = "was removed from this cluster (forget)";

/// Asks `addrs` (with a short timeout each) whether this node, as `me`, was removed from
/// the cluster; returns the refusal of the first that says so. A node forgotten while it
/// was down learns it here, at startup, and resets its cluster state
/// ([`reset_cluster_state`]) to join again as a new member.
/// A link's byte stream: plain TCP, or TLS over it (`cluster-tls`).
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Io for T {}
pub type Stream = Box<dyn Io>;

/// Connects to a peer at `addr` (`host:port`), in TLS when the cluster has it.
async fn connect(addr: &str, me: &Identity) -> std::io::Result<Stream> {
    let tcp = TcpStream::connect(addr).await?;
    let _ = tcp.set_nodelay(true);
    let Some(tls) = &me.tls else {
        return Ok(Box::new(tcp));
    };
    let host = addr
        .rsplit_once(':')
        .map_or(addr, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    // The name is only sent (SNI); the peer's certificate is checked against the CA.
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .or_else(|_| rustls::pki_types::ServerName::try_from("warren-node".to_owned()))
        .map_err(|e| std::io::Error::other(format!("no TLS name for {addr}: {e}")))?;
    let stream =
        tls.connector.connect(name, tcp).await.map_err(|e| {
            std::io::Error::other(format!("inter-node TLS with {addr} failed: {e}"))
        })?;
    Ok(Box::new(stream))
}

/// The server side of [`connect`].
async fn accept_stream(tcp: TcpStream, me: &Identity) -> std::io::Result<Stream> {
    let _ = tcp.set_nodelay(true);
    let Some(tls) = &me.tls else {
        return Ok(Box::new(tcp));
    };
    let stream = tls
        .acceptor
        .accept(tcp)
        .await
        .map_err(|e| std::io::Error::other(format!("inter-node TLS failed: {e}")))?;
    Ok(Box::new(stream))
}

pub async fn forgotten_by(me: &Identity, addrs: &[String]) -> Option<String> {
    let mut asks = tokio::task::JoinSet::new();
    let mut seen = HashSet::new();
    for addr in addrs {
        if *addr == me.advertise || !seen.insert(addr.clone()) {
            continue;
        }
        let (me, addr) = (me.clone(), addr.clone());
        asks.spawn(async move {
            let attempt = async {
                let mut stream = connect(&addr, &me).await?;
                handshake::dial(&mut stream, &me).await
            };
            match tokio::time::timeout(Duration::from_secs(2), attempt).await {
                Ok(Err(HandshakeError::Refused { node, reason })) if reason.contains(FORGOTTEN) => {
                    Some(format!("{node} ({addr}): {reason}"))
                }
                _ => None,
            }
        });
    }
    while let Some(answer) = asks.join_next().await {
        if let Ok(Some(refusal)) = answer {
            return Some(refusal);
        }
    }
    None
}

/// Addresses of the members remembered in `data_dir` (for [`forgotten_by`]).
pub fn remembered_addresses(data_dir: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(data_dir.join("cluster").join("members"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(1).map(str::to_owned))
        .collect()
}

/// Forgets this node's cluster identity: its incarnation, member lists and metadata group
/// state. Its own queues and messages (outside `cluster/`) are kept.
pub fn reset_cluster_state(data_dir: &std::path::Path) -> std::io::Result<()> {
    let dir = data_dir.join("cluster");
    match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// This node's incarnation: drawn once when its data directory has none, kept after.
pub fn incarnation(data_dir: &std::path::Path) -> std::io::Result<u64> {
    let path = data_dir.join("cluster").join("incarnation");
    if let Ok(text) = std::fs::read_to_string(&path)
        && let Ok(n) = text.trim().parse()
    {
        return Ok(n);
    }
    let n: u64 = rand::random();
    save(&path, &format!("{n}\n"))?;
    Ok(n)
}

/// Writes `text` to `path` atomically (temporary file, fsync, rename).
fn save(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    save_parts(path, &[text.as_bytes()])
}

/// Writes `parts`, one after the other, to `path` atomically.
fn save_parts(path: &std::path::Path, parts: &[&[u8]]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // A name of its own per write: two saves at once must not rename each other's file.
    let tmp = path.with_extension(format!("tmp.{:x}", rand::random::<u64>()));
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::with_capacity(1 << 20, crate::store::create_private(&tmp)?);
        for part in parts {
            f.write_all(part)?;
        }
        f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

impl Cluster {
    pub fn new(me: Identity, status: StatusFn, data_dir: Option<PathBuf>) -> Arc<Self> {
        let dir = data_dir.map(|d| d.join("cluster"));
        let forgotten = dir
            .as_ref()
            .and_then(|d| std::fs::read_to_string(d.join("forgotten")).ok())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once(' '))
            .filter_map(|(n, i)| Some((n.to_owned(), i.parse().ok()?)))
            .collect();
        Arc::new(Self {
            me,
            status,
            peers: RwLock::new(BTreeMap::new()),
            dialing: Mutex::new(HashSet::new()),
            forgotten: RwLock::new(forgotten),
            dir,
            meta: std::sync::OnceLock::new(),
            broker: std::sync::OnceLock::new(),
            groups: RwLock::new(HashMap::new()),
        })
    }

    /// Has `calls` serve the broker calls other nodes send this one.
    pub fn serve_broker_calls(&self, calls: Arc<dyn BrokerCalls>) {
        let _ = self.broker.set(calls);
    }

    /// Sends a broker call to `node` now, ordered after every call sent to it before, and
    /// returns where the answer arrives (an error if the link closes first). Fails at once
    /// when `node` is not reachable.
    pub fn start_broker_call(
        &self,
        node: &str,
        call: Vec<u8>,
    ) -> Result<impl std::future::Future<Output = Result<Vec<u8>, String>> + use<>, String> {
        let link = self
            .peers
            .read()
            .get(node)
            .filter(|p| p.running())
            .and_then(|p| p.link.lock().clone())
            .filter(|l| !l.is_closed())
            .ok_or_else(|| format!("node {node} is not reachable"))?;
        let body = wire::to_body(&Request::Broker(call)).map_err(|e| e.to_string())?;
        let rx = link.start_call(body).map_err(|e| e.to_string())?;
        let node = node.to_owned();
        Ok(async move {
            let answer = rx
                .await
                .map_err(|_| format!("the link to {node} closed before it answered"))?;
            match wire::from_body::<Response>(&answer).map_err(|e| e.to_string())? {
                Response::Broker(body) => Ok(body),
                Response::Error(e) => Err(format!("{node}: {e}")),
                other => Err(format!("{node} answered {other:?} to a broker call")),
            }
        })
    }

    /// Starts the metadata group (its files under the data directory's `cluster/`) with the
    /// broker's definitions as its state. `seed`: this node may create the group.
    pub async fn start_metadata(
        self: &Arc<Self>,
        host: Arc<dyn raft::Replicated>,
        seed: bool,
    ) -> Result<Arc<raft::Metadata>, String> {
        let dir = self
            .dir
            .clone()
            .ok_or("the metadata group needs a data directory")?;
        let meta = raft::Metadata::start(self, host, &dir, seed).await?;
        self.meta
            .set(meta.clone())
            .map_err(|_| "the metadata group is already started".to_owned())?;
        Ok(meta)
    }

    /// The metadata group, once started.
    pub fn metadata(&self) -> Option<&Arc<raft::Metadata>> {
        self.meta.get()
    }

    /// Serves a Raft call with the group it is for.
    async fn raft_request(&self, envelope: raft::Envelope) -> Response {
        match self.group_for(envelope.group.clone()) {
            Ok(meta) => match meta.handle(envelope).await {
                Ok(answer) => Response::Raft(answer),
                Err(e) => Response::Error(e),
            },
            Err(e) => Response::Error(e),
        }
    }

    /// The group a Raft call is for.
    fn group_for(&self, group: Option<String>) -> Result<Arc<raft::Metadata>, String> {
        match group {
            None => self
                .meta
                .get()
                .cloned()
                .ok_or_else(|| "the metadata group is not started yet".into()),
            Some(g) => self
                .groups
                .read()
                .get(&g)
                .cloned()
                .ok_or_else(|| format!("this node has no replica of {g} (yet)")),
        }
    }

    /// Starts (or reopens) the group of a replicated queue on this node, in `dir`.
    pub async fn start_queue_group(
        self: &Arc<Self>,
        host: Arc<dyn raft::Replicated>,
        dir: &Path,
        group: &str,
        members: BTreeMap<raft::NodeId, raft::Member>,
        initialize: bool,
    ) -> Result<Arc<raft::Metadata>, String> {
        if let Some(g) = self.groups.read().get(group) {
            return Ok(g.clone());
        }
        let g = raft::Metadata::start_group(self, host, dir, group.to_owned(), members, initialize)
            .await?;
        self.groups.write().insert(group.to_owned(), g.clone());
        Ok(g)
    }

    /// Proposes `command` to `group` through its member `member` (this node holds no
    /// replica): the member passes it on to the leader. Returns the outcome once committed.
    pub async fn group_write(
        &self,
        member: &str,
        group: &str,
        command: Vec<u8>,
    ) -> Result<String, String> {
        let envelope = raft::Envelope {
            group: Some(group.to_owned()),
            to: None,
            call: raft::RaftCall::Write(raft::Blob(command)),
        };
        let answer = self
            .raft_call(member, &envelope, raft::PROPOSE_TIMEOUT)
            .await?;
        serde_json::from_str::<Result<(u64, String), String>>(&answer)
            .map_err(|e| e.to_string())?
            .map(|(_, outcome)| outcome)
    }

    /// Makes node `name` a voter of `group` or not ([`raft::Metadata::set_voter`]) through
    /// the group's member `member` (this node's replica does not know the group yet).
    pub async fn group_set_voter(
        &self,
        member: &str,
        group: &str,
        name: &str,
        voter: bool,
    ) -> Result<(), String> {
        let envelope = raft::Envelope {
            group: Some(group.to_owned()),
            to: None,
            call: raft::RaftCall::SetVoter {
                name: name.to_owned(),
                voter,
            },
        };
        let answer = self
            .raft_call(member, &envelope, raft::PROPOSE_TIMEOUT)
            .await?;
        serde_json::from_str::<Result<(), String>>(&answer).map_err(|e| e.to_string())?
    }

    /// Stops this node's replica of `group` (the queue was deleted).
    pub async fn stop_queue_group(&self, group: &str) {
        let g = self.groups.write().remove(group);
        if let Some(g) = g {
            g.shutdown().await;
        }
    }

    /// Moves leadership of every group this node leads (the metadata group, replicated
    /// queues) to other nodes, all at once, and stops this node standing for election (a
    /// drain). Answers, per group it led (`None`: the metadata group), what happened.
    pub async fn step_down(&self, within: Duration) -> Vec<(Option<String>, raft::StepDown)> {
        let mut groups: Vec<(Option<String>, Arc<raft::Metadata>)> = (self.groups.read().iter())
            .map(|(g, m)| (Some(g.clone()), m.clone()))
            .collect();
        if let Some(m) = self.meta.get() {
            groups.push((None, m.clone()));
        }
        let mut set = tokio::task::JoinSet::new();
        for (g, m) in groups {
            set.spawn(async move { (g, m.step_down(within).await) });
        }
        let mut out = Vec::new();
        while let Some(r) = set.join_next().await {
            if let Ok((g, r)) = r
                && r != raft::StepDown::NotLeader
            {
                out.push((g, r));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// This node stands for election in every group again (a drain ended).
    pub fn resume_elections(&self) {
        if let Some(m) = self.meta.get() {
            m.resume_elections();
        }
        for m in self.groups.read().values() {
            m.resume_elections();
        }
    }

    /// This node's replica of a replicated queue's group, if it runs.
    pub fn queue_group(&self, group: &str) -> Option<Arc<raft::Metadata>> {
        self.groups.read().get(group).cloned()
    }

    /// This node's members of the metadata group as Raft ids and members (for new groups).
    pub fn metadata_voters(&self) -> Vec<(raft::NodeId, raft::Member)> {
        self.meta
            .get()
            .map(|m| m.voter_members())
            .unwrap_or_default()
    }

    /// This node's Raft id (its incarnation).
    pub fn raft_id(&self) -> raft::NodeId {
        self.me.incarnation
    }

    /// The data directory's `cluster/` directory.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Whether the member `name` is reachable now.
    pub fn is_running(&self, name: &str) -> bool {
        self.peers.read().get(name).is_some_and(|p| p.running())
    }

    /// The link to `name` while the member is reachable: its id changes when the link is
    /// replaced (the peer restarted or was away), so state tied to a link can tell.
    pub fn link_id(&self, name: &str) -> Option<u64> {
        self.peers
            .read()
            .get(name)
            .filter(|p| p.running())
            .and_then(|p| {
                p.link
                    .lock()
                    .as_ref()
                    .filter(|l| !l.is_closed())
                    .map(|l| l.id)
            })
    }

    /// Names of the members reachable now (this node not included).
    pub fn running_peers(&self) -> Vec<String> {
        self.peers
            .read()
            .values()
            .filter(|p| p.running())
            .map(|p| p.name.clone())
            .collect()
    }

    /// Sends a metadata group call to `name` over its link; returns the JSON answer.
    async fn raft_call(
        &self,
        name: &str,
        call: &raft::Envelope,
        timeout: Duration,
    ) -> Result<String, String> {
        let link = self
            .peers
            .read()
            .get(name)
            .and_then(|p| p.link.lock().clone())
            .filter(|l| !l.is_closed())
            .ok_or_else(|| format!("no link to {name}"))?;
        let body = postcard::to_allocvec(call).map_err(|e| e.to_string())?;
        let body = wire::to_body(&Request::RaftBin(body)).map_err(|e| e.to_string())?;
        let answer = link.call(body, timeout).await.map_err(|e| e.to_string())?;
        match wire::from_body::<Response>(&answer).map_err(|e| e.to_string())? {
            Response::Raft(json) => Ok(json),
            Response::Error(e) => Err(format!("{name}: {e}")),
            other => Err(format!("{name} answered {other:?} to a Raft call")),
        }
    }

    pub fn node_name(&self) -> &str {
        &self.me.node
    }

    /// Starts serving `listener` and dialling `peers` plus every member remembered from an
    /// earlier run.
    pub fn start(self: &Arc<Self>, listener: TcpListener, peers: &[String]) {
        tokio::spawn(accept_loop(self.clone(), listener));
        for (name, addr, incarnation) in self.remembered() {
            if let Some(p) = self.peer(&name, &addr) {
                p.incarnation.store(incarnation, Ordering::Relaxed);
            }
        }
        for addr in peers {
            self.dial(addr.clone());
        }
    }

    /// The other members, as this node sees them (callers add this node themselves: it
    /// reports its own status first-hand, without a heartbeat).
    pub fn peers(&self) -> Vec<NodeView> {
        self.peers
            .read()
            .values()
            .map(|p| NodeView {
                name: p.name.clone(),
                running: p.running(),
                status: p.status.lock().clone(),
            })
            .collect()
    }

    /// The peer named `name`, registered (and remembered) if new; None for a forgotten node.
    fn peer(self: &Arc<Self>, name: &str, advertise: &str) -> Option<Arc<Peer>> {
        if let Some(p) = self.peers.read().get(name) {
            return Some(p.clone());
        }
        if self.forgotten.read().contains_key(name) {
            return None;
        }
        let p = self
            .peers
            .write()
            .entry(name.to_owned())
            .or_insert_with(|| {
                Arc::new(Peer {
                    name: name.to_owned(),
                    incarnation: AtomicU64::new(0),
                    advertise: Mutex::new(advertise.to_owned()),
                    link: Mutex::new(None),
                    last_seen: Mutex::new(None),
                    status: Mutex::new(None),
                })
            })
            .clone();
        self.remember();
        self.dial(advertise.to_owned());
        Some(p)
    }

    /// Whether `name` in this incarnation was removed from the cluster.
    fn is_forgotten(&self, name: &str, incarnation: u64) -> bool {
        self.forgotten.read().get(name) == Some(&incarnation)
    }

    /// Removes a stopped member from the cluster: this node forgets it, tells every running
    /// member, and refuses it from now on (until its data is wiped). Returns how many other
    /// members were told; those that were away learn it from the next heartbeat.
    pub async fn forget(self: &Arc<Self>, name: &str) -> Result<usize, ForgetError> {
        if name == self.me.node {
            return Err(ForgetError::Itself(name.to_owned()));
        }
        let peer = self
            .peers
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| ForgetError::NotMember(name.to_owned()))?;
        if peer.running() {
            return Err(ForgetError::Running(name.to_owned()));
        }
        // Out of the metadata group first: that needs a majority, and a node that stays a
        // voter while forgotten would count against it for good.
        if let Some(meta) = self.meta.get() {
            meta.remove(name).await.map_err(ForgetError::Metadata)?;
        }
        let incarnation = peer.incarnation.load(Ordering::Relaxed);
        self.apply_forget(name, incarnation);
        let body = wire::to_body(&Request::Forget {
            name: name.to_owned(),
            incarnation,
        })
        .unwrap_or_default();
        let links: Vec<Arc<Link>> = self
            .peers
            .read()
            .values()
            .filter(|p| p.running())
            .filter_map(|p| p.link.lock().clone())
            .collect();
        let mut told = 0;
        for link in links {
            if link.call(body.clone(), PING_TIMEOUT).await.is_ok() {
                told += 1;
            }
        }
        Ok(told)
    }

    fn apply_forget(&self, name: &str, incarnation: u64) {
        if name == self.me.node || self.is_forgotten(name, incarnation) {
            return;
        }
        tracing::warn!(node = name, "node removed from the cluster (forget)");
        self.forgotten.write().insert(name.to_owned(), incarnation);
        if let Some(p) = self.peers.write().remove(name)
            && let Some(link) = p.link.lock().take()
        {
            link.close();
        }
        self.remember();
    }

    fn dial(self: &Arc<Self>, addr: String) {
        if addr.is_empty() || !self.dialing.lock().insert(addr.clone()) {
            return;
        }
        tokio::spawn(dial_loop(self.clone(), addr));
    }

    /// `(name, address)` of every member, this node included.
    fn members(&self) -> Vec<(String, String)> {
        let mut out = vec![(self.me.node.clone(), self.me.advertise.clone())];
        out.extend(
            self.peers
                .read()
                .values()
                .map(|p| (p.name.clone(), p.advertise.lock().clone())),
        );
        out
    }

    /// `(name, address, incarnation)` of the members saved by an earlier run.
    fn remembered(&self) -> Vec<(String, String, u64)> {
        let Some(dir) = &self.dir else {
            return Vec::new();
        };
        let Ok(text) = std::fs::read_to_string(dir.join("members")) else {
            return Vec::new();
        };
        text.lines()
            .filter_map(|l| {
                let mut f = l.split(' ');
                let (n, a) = (f.next()?, f.next()?);
                let i = f.next().and_then(|i| i.parse().ok()).unwrap_or(0);
                Some((n.to_owned(), a.to_owned(), i))
            })
            .filter(|(n, _, _)| *n != self.me.node)
            .collect()
    }

    /// Writes the member list (name and address per line) and the forgotten nodes.
    fn remember(&self) {
        let Some(dir) = &self.dir else {
            return;
        };
        let members: String = self
            .peers
            .read()
            .values()
            .map(|p| {
                let incarnation = p.incarnation.load(Ordering::Relaxed);
                format!("{} {} {incarnation}\n", p.name, p.advertise.lock())
            })
            .collect();
        let forgotten: String = self
            .forgotten
            .read()
            .iter()
            .map(|(n, i)| format!("{n} {i}\n"))
            .collect();
        for (file, text) in [("members", members), ("forgotten", forgotten)] {
            let path = dir.join(file);
            if let Err(e) = save(&path, &text) {
                tracing::error!(
                    "cannot save the cluster's {file} list to {}: {e}",
                    path.display()
                );
            }
        }
    }

    fn handle_request(&self, req: Request) -> Response {
        match req {
            Request::Ping => Response::Pong {
                status: (self.status)(),
                members: self.members(),
                forgotten: self
                    .forgotten
                    .read()
                    .iter()
                    .map(|(n, i)| (n.clone(), *i))
                    .collect(),
            },
            Request::Forget { name, incarnation } => {
                self.apply_forget(&name, incarnation);
                Response::Done
            }
            // Served by `Requests::handle` (asynchronously).
            Request::Raft(_) | Request::RaftBin(_) | Request::Broker(_) => {
                Response::Error("misrouted call".into())
            }
        }
    }
}

/// Answers requests arriving on any link.
struct Requests(std::sync::Weak<Cluster>);

impl Handler for Requests {
    fn handle(self: Arc<Self>, from: String, body: Vec<u8>) -> link::Answer {
        // Broker calls start here, on the link's reader, so they are served in order.
        let request = match wire::from_body::<Request>(&body) {
            Ok(Request::Broker(call)) => Ok(call),
            other => Err(other),
        };
        let request = match request {
            Err(other) => other,
            Ok(call) => {
                let calls = self.0.upgrade().and_then(|c| c.broker.get().cloned());
                let Some(calls) = calls else {
                    let body = wire::to_body(&Response::Error("the broker is not ready".into()));
                    return Box::pin(async move { body.unwrap_or_default() });
                };
                let answer = calls.serve(&from, call);
                return Box::pin(async move {
                    wire::to_body(&Response::Broker(answer.await)).unwrap_or_default()
                });
            }
        };
        Box::pin(async move {
            let response = match (self.0.upgrade(), request) {
                (Some(c), Ok(Request::Raft(call))) => {
                    match serde_json::from_str::<raft::Envelope>(&call) {
                        Ok(envelope) => c.raft_request(envelope).await,
                        Err(e) => Response::Error(format!("undecodable Raft call: {e}")),
                    }
                }
                (Some(c), Ok(Request::RaftBin(call))) => {
                    match postcard::from_bytes::<raft::Envelope>(&call) {
                        Ok(envelope) => c.raft_request(envelope).await,
                        Err(e) => Response::Error(format!("undecodable Raft call: {e}")),
                    }
                }
                (Some(c), Ok(req)) => c.handle_request(req),
                (None, _) => Response::Error("node is stopping".into()),
                (_, Err(e)) => Response::Error(format!("undecodable request: {e}")),
            };
            wire::to_body(&response).unwrap_or_default()
        })
    }
}

async fn accept_loop(cluster: Arc<Cluster>, listener: TcpListener) {
    loop {
        let (stream, addr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("inter-node listener: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let cluster = cluster.clone();
        tokio::spawn(async move {
            let admit = |hello: &wire::Hello| {
                let mut forgotten = cluster.forgotten.write();
                match forgotten.get(&hello.node) {
                    // 0: forgotten before this node ever learnt its incarnation; refused
                    // whatever its data.
                    Some(&i) if i == hello.incarnation || i == 0 => {
                        return Err(format!(
                            "{} {FORGOTTEN}; it rejoins as a new member when it restarts (its \
                             cluster state is reset, its queues and messages are kept)",
                            hello.node
                        ));
                    }
                    // Wiped and back: a new incarnation may join.
                    Some(_) => {
                        forgotten.remove(&hello.node);
                    }
                    None => {}
                }
                Ok(())
            };
            let shake = async {
                let mut stream = accept_stream(stream, &cluster.me).await?;
                let hello = handshake::accept(&mut stream, &cluster.me, admit).await?;
                Ok::<_, HandshakeError>((stream, hello))
            };
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, shake).await {
                Ok(Ok((stream, hello))) => {
                    tracing::debug!(peer = %hello.node, %addr, "inter-node link accepted");
                    // A node this one did not know dialled in: dial it back, so both know each
                    // other (how a new node joins through one live peer).
                    if let Some(p) = cluster.peer(&hello.node, &hello.advertise) {
                        p.incarnation.store(hello.incarnation, Ordering::Relaxed);
                    }
                    let link = Link::start(
                        stream,
                        hello.node,
                        Arc::new(Requests(Arc::downgrade(&cluster))),
                    );
                    link.closed().await;
                }
                Ok(Err(HandshakeError::OwnAddress)) => {}
                Ok(Err(e @ HandshakeError::NotAdmitted { .. })) => {
                    tracing::warn!(%addr, "inter-node link refused: {e}");
                }
                Ok(Err(e @ HandshakeError::WrongSecret { .. })) => {
                    tracing::error!(%addr, "inter-node link refused: {e}");
                }
                Ok(Err(e)) => tracing::warn!(%addr, "inter-node handshake failed: {e}"),
                Err(_) => tracing::warn!(%addr, "inter-node handshake timed out"),
            }
        });
    }
}

/// Keeps one outgoing link to `addr` up for as long as the node runs, heartbeating it.
async fn dial_loop(cluster: Arc<Cluster>, addr: String) {
    let mut backoff = REDIAL_MIN;
    let mut last_error = String::new();
    loop {
        let attempt = async {
            let mut stream = connect(&addr, &cluster.me).await?;
            let hello = handshake::dial(&mut stream, &cluster.me).await?;
            Ok::<_, HandshakeError>((stream, hello))
        };
        let result = match tokio::time::timeout(HANDSHAKE_TIMEOUT, attempt).await {
            Ok(r) => r,
            Err(_) => Err(HandshakeError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no answer within 5 s",
            ))),
        };
        match result {
            Ok((stream, hello)) => {
                backoff = REDIAL_MIN;
                last_error.clear();
                let peer = match cluster.peer(&hello.node, &hello.advertise) {
                    Some(p) if !cluster.is_forgotten(&hello.node, hello.incarnation) => p,
                    _ => {
                        tracing::info!(peer = %hello.node, %addr, "not dialling a node removed from the cluster");
                        cluster.dialing.lock().remove(&addr);
                        return;
                    }
                };
                peer.incarnation.store(hello.incarnation, Ordering::Relaxed);
                // Another address of the same node already has a live link: this one is an
                // alias (a configured DNS name beside the advertised one); let it go.
                if peer.running() {
                    cluster.dialing.lock().remove(&addr);
                    return;
                }
                tracing::info!(peer = %hello.node, %addr, "inter-node link up");
                let link = Link::start(
                    stream,
                    hello.node.clone(),
                    Arc::new(Requests(Arc::downgrade(&cluster))),
                );
                *peer.link.lock() = Some(link.clone());
                *peer.last_seen.lock() = Some(Instant::now());
                heartbeat(&cluster, &peer, &link).await;
                link.close();
                tracing::warn!(peer = %hello.node, %addr, "inter-node link down");
            }
            Err(HandshakeError::OwnAddress) => {
                tracing::debug!(%addr, "cluster peer address is this node; not dialled");
                return;
            }
            Err(e) => {
                let text = e.to_string();
                if text != last_error {
                    match e {
                        HandshakeError::WrongSecret { .. } | HandshakeError::Refused { .. } => {
                            tracing::error!(%addr, "cannot join peer: {text}")
                        }
                        _ => tracing::info!(%addr, "cannot reach peer (will retry): {text}"),
                    }
                    last_error = text;
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(REDIAL_MAX);
    }
}

/// Pings until the peer misses [`PING_TIMEOUT`] or the link closes.
async fn heartbeat(cluster: &Arc<Cluster>, peer: &Peer, link: &Arc<Link>) {
    let ping = wire::to_body(&Request::Ping).unwrap_or_default();
    loop {
        match link.call(ping.clone(), PING_TIMEOUT).await {
            Ok(body) => {
                *peer.last_seen.lock() = Some(Instant::now());
                if let Ok(Response::Pong {
                    status,
                    members,
                    forgotten,
                }) = wire::from_body(&body)
                {
                    *peer.status.lock() = Some(status);
                    for (name, incarnation) in forgotten {
                        cluster.apply_forget(&name, incarnation);
                    }
                    for (name, addr) in members {
                        if name != cluster.me.node {
                            cluster.peer(&name, &addr);
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(peer = %peer.name, "heartbeat failed: {e}");
                return;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(PING_INTERVAL) => {}
            _ = link.closed() => return,
        }
    }
}
