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
//! order needs no manual step, and `forget` removes a node for good.

pub mod handshake;
pub mod link;
pub mod rpc;
pub mod wire;

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
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

/// A remote node this node knows of.
pub struct Peer {
    pub name: String,
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
    /// Where the member list is kept (None: not remembered, in tests).
    members_file: Option<PathBuf>,
}

impl Cluster {
    pub fn new(me: Identity, status: StatusFn, data_dir: Option<PathBuf>) -> Arc<Self> {
        Arc::new(Self {
            me,
            status,
            peers: RwLock::new(BTreeMap::new()),
            dialing: Mutex::new(HashSet::new()),
            members_file: data_dir.map(|d| d.join("cluster").join("members")),
        })
    }

    pub fn node_name(&self) -> &str {
        &self.me.node
    }

    /// Starts serving `listener` and dialling `peers` plus every member remembered from an
    /// earlier run.
    pub fn start(self: &Arc<Self>, listener: TcpListener, peers: &[String]) {
        tokio::spawn(accept_loop(self.clone(), listener));
        for (name, addr) in self.remembered() {
            self.peer(&name, &addr);
        }
        for addr in peers {
            self.dial(addr.clone());
        }
    }

    /// Every node of the cluster, this one first.
    pub fn nodes(&self) -> Vec<NodeView> {
        let mut out = vec![NodeView {
            name: self.me.node.clone(),
            running: true,
            status: Some((self.status)()),
        }];
        for p in self.peers.read().values() {
            out.push(NodeView {
                name: p.name.clone(),
                running: p.running(),
                status: p.status.lock().clone(),
            });
        }
        out
    }

    /// The peer named `name`, registered (and remembered) if new.
    fn peer(self: &Arc<Self>, name: &str, advertise: &str) -> Arc<Peer> {
        if let Some(p) = self.peers.read().get(name) {
            return p.clone();
        }
        let p = self
            .peers
            .write()
            .entry(name.to_owned())
            .or_insert_with(|| {
                Arc::new(Peer {
                    name: name.to_owned(),
                    advertise: Mutex::new(advertise.to_owned()),
                    link: Mutex::new(None),
                    last_seen: Mutex::new(None),
                    status: Mutex::new(None),
                })
            })
            .clone();
        self.remember();
        self.dial(advertise.to_owned());
        p
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

    fn remembered(&self) -> Vec<(String, String)> {
        let Some(path) = &self.members_file else {
            return Vec::new();
        };
        let Ok(text) = std::fs::read_to_string(path) else {
            return Vec::new();
        };
        text.lines()
            .filter_map(|l| l.split_once(' '))
            .filter(|(n, _)| *n != self.me.node)
            .map(|(n, a)| (n.to_owned(), a.to_owned()))
            .collect()
    }

    /// Writes the member list (name and address per line) atomically.
    fn remember(&self) {
        let Some(path) = &self.members_file else {
            return;
        };
        let text: String = self
            .peers
            .read()
            .values()
            .map(|p| format!("{} {}\n", p.name, p.advertise.lock()))
            .collect();
        let write = || -> std::io::Result<()> {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, text.as_bytes())?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        if let Err(e) = write() {
            tracing::error!(
                "cannot save the cluster's member list to {}: {e}",
                path.display()
            );
        }
    }

    fn handle_request(&self, req: Request) -> Response {
        match req {
            Request::Ping => Response::Pong {
                status: (self.status)(),
                members: self.members(),
            },
        }
    }
}

/// Answers requests arriving on any link.
struct Requests(std::sync::Weak<Cluster>);

impl Handler for Requests {
    fn handle(
        self: Arc<Self>,
        _from: String,
        body: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = Vec<u8>> + Send>> {
        Box::pin(async move {
            let response = match (self.0.upgrade(), wire::from_body::<Request>(&body)) {
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
            let _ = stream.set_nodelay(true);
            let mut stream = stream;
            let shake = handshake::accept(&mut stream, &cluster.me);
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, shake).await {
                Ok(Ok(hello)) => {
                    tracing::debug!(peer = %hello.node, %addr, "inter-node link accepted");
                    // A node this one did not know dialled in: dial it back, so both know each
                    // other (how a new node joins through one live peer).
                    cluster.peer(&hello.node, &hello.advertise);
                    let link = Link::start(
                        stream,
                        hello.node,
                        Arc::new(Requests(Arc::downgrade(&cluster))),
                    );
                    link.closed().await;
                }
                Ok(Err(HandshakeError::OwnAddress)) => {}
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
            let mut stream = TcpStream::connect(&addr).await?;
            let _ = stream.set_nodelay(true);
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
                let peer = cluster.peer(&hello.node, &hello.advertise);
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
                if let Ok(Response::Pong { status, members }) = wire::from_body(&body) {
                    *peer.status.lock() = Some(status);
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
