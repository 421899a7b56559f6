//! Federation links and shovels: AMQP 0-9-1 clients (lapin) supervised inside the node, moving
//! messages between this node and other brokers (Warren or RabbitMQ) the way RabbitMQ's
//! `rabbitmq_shovel` and `rabbitmq_federation` plugins do.
//!
//! What runs is derived, never configured twice: every `shovel` runtime parameter is one shovel;
//! every exchange or queue whose policy names `federation-upstream` or
//! `federation-upstream-set` (including the implicit set `all`) has one link per upstream. One
//! reconciler task ([`start`]) recomputes that set whenever parameters, policies, exchanges or
//! queues change and starts, restarts (definition changed) or stops links to match.
//!
//! Each link is one task that owns its connections: it connects, runs until something fails,
//! reports why, waits the reconnect delay and starts over (a task tree of one; lapin's own
//! automatic recovery is off so that every failure goes through the same path). Memory is
//! bounded by the source prefetch: a link never holds more unacknowledged messages than that.
//!
//! Module map: [`uri`] parses RabbitMQ URIs; [`connect`] opens lapin connections (TCP and TLS
//! done here, local node via the internal account); [`forward`] moves messages and settles them
//! with the source per ack mode; [`shovel`] and [`federation`] are the two link kinds;
//! [`status`] is what the management API and metrics read.

pub mod connect;
pub mod federation;
pub mod forward;
pub mod shovel;
pub mod status;
pub mod uri;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;

use crate::broker::Broker;
use status::{LinkKind, LinkStatus};

/// Why a link is asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Keep running.
    No,
    /// Its definition is gone (parameter or policy deleted, object deleted): stop, and let a
    /// federation link delete what it declared on the upstream.
    Removed,
    /// The node is shutting down: stop cleanly, keep upstream resources (they buffer messages
    /// until the node is back).
    Shutdown,
    /// Its definition changed: stop cleanly, keep upstream resources for the new link.
    Restart,
}

/// Identifies a link.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LinkKey {
    Shovel {
        vhost: String,
        name: String,
    },
    Federation {
        vhost: String,
        kind: LinkKind,
        object: String,
        upstream: String,
    },
}

/// What a link should run: built from parameters and policies by the reconciler.
#[derive(Clone)]
pub enum Spec {
    Shovel(Box<shovel::ShovelDef>),
    Federation(Box<federation::FederationLink>),
}

impl Spec {
    /// Changes to this string restart the link.
    fn fingerprint(&self) -> String {
        match self {
            Spec::Shovel(d) => d.raw.to_string(),
            Spec::Federation(f) => f.fingerprint(),
        }
    }

    fn status(&self) -> LinkStatus {
        match self {
            Spec::Shovel(d) => d.status(),
            Spec::Federation(f) => f.status(),
        }
    }

    async fn run(self, broker: Weak<Broker>, status: Arc<LinkStatus>, stop: watch::Receiver<Stop>) {
        match self {
            Spec::Shovel(d) => shovel::run(broker, *d, status, stop).await,
            Spec::Federation(f) => federation::run(broker, *f, status, stop).await,
        }
    }
}

struct Running {
    fingerprint: String,
    status: Arc<LinkStatus>,
    stop: watch::Sender<Stop>,
    task: tokio::task::JoinHandle<()>,
}

/// The node's running links.
pub struct Links {
    running: Mutex<BTreeMap<LinkKey, Running>>,
    /// Bumped by vhosts when exchanges, queues, bindings or policies change.
    topology: watch::Sender<u64>,
    shutting_down: AtomicBool,
}

impl Default for Links {
    fn default() -> Self {
        Self {
            running: Mutex::new(BTreeMap::new()),
            topology: watch::channel(0).0,
            shutting_down: AtomicBool::new(false),
        }
    }
}

impl std::fmt::Debug for Links {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Links")
    }
}

impl Links {
    /// Something links depend on changed (called by vhosts).
    pub fn topology_changed(&self) {
        self.topology.send_modify(|g| *g = g.wrapping_add(1));
    }

    pub fn subscribe_topology(&self) -> watch::Receiver<u64> {
        self.topology.subscribe()
    }

    /// A clone of the change signal, for vhosts to bump.
    pub fn topology_sender(&self) -> watch::Sender<u64> {
        self.topology.clone()
    }

    fn statuses(&self, pick: impl Fn(&LinkKey) -> bool) -> Vec<Arc<LinkStatus>> {
        self.running
            .lock()
            .iter()
            .filter(|(k, _)| pick(k))
            .map(|(_, r)| r.status.clone())
            .collect()
    }

    /// The shovels (of one vhost, or all), by vhost and name.
    pub fn shovels(&self, vhost: Option<&str>) -> Vec<Arc<LinkStatus>> {
        self.statuses(
            |k| matches!(k, LinkKey::Shovel { vhost: v, .. } if vhost.is_none_or(|x| x == v)),
        )
    }

    /// The federation links (of one vhost, or all).
    pub fn federation_links(&self, vhost: Option<&str>) -> Vec<Arc<LinkStatus>> {
        self.statuses(
            |k| matches!(k, LinkKey::Federation { vhost: v, .. } if vhost.is_none_or(|x| x == v)),
        )
    }

    /// Stops every link cleanly (in-flight messages settled, connections closed) and starts no
    /// more. Waits up to `timeout`; links still running then are aborted.
    pub async fn shutdown(&self, timeout: Duration) {
        self.shutting_down.store(true, Ordering::Release);
        let all: Vec<Running> = std::mem::take(&mut *self.running.lock())
            .into_values()
            .collect();
        for r in &all {
            let _ = r.stop.send(Stop::Shutdown);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        for r in all {
            let abort = r.task.abort_handle();
            if tokio::time::timeout_at(deadline, r.task).await.is_err() {
                abort.abort();
            }
        }
    }

    /// Starts, restarts and stops links so that exactly `desired` run.
    fn apply(&self, broker: &Arc<Broker>, desired: Vec<(LinkKey, Spec)>) {
        if self.shutting_down.load(Ordering::Acquire) {
            return;
        }
        let mut running = self.running.lock();
        let mut wanted: BTreeMap<LinkKey, Spec> = desired.into_iter().collect();
        running.retain(|k, r| match wanted.get(k) {
            // Unchanged: leave it, even if it ended by itself (a shovel with reconnect-delay
            // 0 stays terminated until its definition changes).
            Some(s) if s.fingerprint() == r.fingerprint => {
                wanted.remove(k);
                true
            }
            changed => {
                if !r.task.is_finished() {
                    tracing::info!(key = ?k, "link stopping");
                    let why = if changed.is_some() {
                        Stop::Restart
                    } else {
                        Stop::Removed
                    };
                    let _ = r.stop.send(why);
                }
                false
            }
        });
        for (key, spec) in wanted {
            let status = Arc::new(spec.status());
            let (stop, stop_rx) = watch::channel(Stop::No);
            let fingerprint = spec.fingerprint();
            tracing::info!(?key, "link starting");
            let task = tokio::spawn(supervise(
                key.clone(),
                spec,
                Arc::downgrade(broker),
                status.clone(),
                stop_rx,
            ));
            running.insert(
                key,
                Running {
                    fingerprint,
                    status,
                    stop,
                    task,
                },
            );
        }
    }
}

/// Runs a link in a task of its own and starts it again if it panics, after 1 s, then twice
/// as long each time up to a minute (a link that fails normally retries by itself, after its
/// reconnect delay; this only guards against a bug taking a link down for good).
async fn supervise(
    key: LinkKey,
    spec: Spec,
    broker: Weak<Broker>,
    status: Arc<LinkStatus>,
    stop: watch::Receiver<Stop>,
) {
    let mut backoff = Duration::from_secs(1);
    loop {
        let run = tokio::spawn(
            spec.clone()
                .run(broker.clone(), status.clone(), stop.clone()),
        );
        let abort = run.abort_handle();
        // Dropping this task (the node aborting a link that would not stop) aborts the link.
        struct AbortOnDrop(tokio::task::AbortHandle);
        impl Drop for AbortOnDrop {
            fn drop(&mut self) {
                self.0.abort();
            }
        }
        let _guard = AbortOnDrop(abort);
        match run.await {
            Ok(()) => return,
            Err(e) if e.is_panic() => {
                tracing::error!(?key, "link task panicked; restarting it in {backoff:?}");
                status.set_failed("internal error (the link restarts)");
            }
            Err(_) => return,
        }
        let mut stop = stop.clone();
        if sleep_or_stop(backoff, &mut stop).await {
            return;
        }
        backoff = (backoff * 2).min(Duration::from_secs(60));
    }
}

/// Enables the internal account and starts the reconciler. Call once, after the AMQP
/// listener is bound (local links connect to it). Runs until the broker is dropped.
pub fn start(broker: &Arc<Broker>) {
    connect::install_crypto_provider();
    if broker.access.internal_secret().is_none() {
        let bytes: [u8; 24] = rand::random();
        broker
            .access
            .set_internal_secret(bytes.iter().map(|b| format!("{b:02x}")).collect());
    }
    let weak = Arc::downgrade(broker);
    let mut params = broker.parameters.subscribe();
    let mut topology = broker.links.subscribe_topology();
    tokio::spawn(async move {
        loop {
            {
                let Some(b) = weak.upgrade() else { return };
                reconcile(&b);
            }
            tokio::select! {
                r = params.changed() => if r.is_err() { return },
                r = topology.changed() => if r.is_err() { return },
                // Links that end by themselves are noticed here too.
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
            // Changes come in bursts (a definitions import, a client declaring a topology):
            // reconcile once per burst.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}

/// Recomputes which links should run and applies it. On a cluster, each shovel runs on one
/// node only: the one of the running members that ranks first for it ([`owner`]); when that
/// node goes, the next in rank takes it over within a reconcile after the others see it down.
/// A federated queue's links run where the queue is (a queue lives on one node); a federated
/// exchange exists on every node, so each of its links runs on one, ranked the same way.
pub fn reconcile(broker: &Arc<Broker>) {
    let mut desired = shovel::desired(broker);
    desired.extend(federation::desired(broker));
    if let Some(cluster) = broker.cluster() {
        let me = cluster.node_name().to_owned();
        let mut running = cluster.running_peers();
        running.push(me.clone());
        desired.retain(|(key, _)| match key {
            LinkKey::Shovel { vhost, name } => owner(&running, vhost, name) == Some(&me),
            LinkKey::Federation {
                vhost,
                kind: LinkKind::Exchange,
                object,
                upstream,
            } => {
                let id = format!("federation\0{object}\0{upstream}");
                owner(&running, vhost, &id) == Some(&me)
            }
            LinkKey::Federation { .. } => true,
        });
    }
    broker.links.apply(broker, desired);
}

/// The node that runs the shovel `vhost`/`name`: rendezvous hashing over the running nodes,
/// so every node computes the same owner from the same view, and a node leaving moves only
/// its own shovels.
pub fn owner<'a>(nodes: &'a [String], vhost: &str, name: &str) -> Option<&'a String> {
    nodes.iter().max_by_key(|node| {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for part in [node.as_str(), "\0", vhost, "\0", name] {
            for b in part.bytes() {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        }
        // FNV-1a, then a final mix so similar names spread.
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^ (h >> 33)
    })
}

/// Resolves when the link is asked to stop, with why. A link whose supervisor is gone (the
/// node is being dropped) stops as for a shutdown.
pub(crate) async fn stopped(stop: &mut watch::Receiver<Stop>) -> Stop {
    let why = match stop.wait_for(|s| *s != Stop::No).await {
        Ok(r) => *r,
        Err(_) => Stop::No,
    };
    if why == Stop::No { Stop::Shutdown } else { why }
}

/// Waits `delay` or until asked to stop; true if asked to stop.
pub(crate) async fn sleep_or_stop(delay: Duration, stop: &mut watch::Receiver<Stop>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(delay) => false,
        _ = stopped(stop) => true,
    }
}

/// Closes a lapin connection, bounded in time (the peer may be gone).
pub(crate) async fn close(conn: &lapin::Connection) {
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        conn.close(200, "link stopped".into()),
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::owner;

    #[test]
    fn each_shovel_has_one_owner_and_only_a_leaving_nodes_shovels_move() {
        let three: Vec<String> = ["warren@a", "warren@b", "warren@c"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let two = &three[..2];
        let names: Vec<String> = (0..300).map(|i| format!("shovel-{i}")).collect();
        let mut per_node = [0usize; 3];
        for n in &names {
            let o = owner(&three, "/", n).expect("an owner");
            let i = three.iter().position(|x| x == o).expect("a member");
            per_node[i] += 1;
            // The same answer whatever order the members are listed in.
            let mut reversed = three.clone();
            reversed.reverse();
            assert_eq!(owner(&reversed, "/", n), Some(o));
            // Without node c, shovels on a or b stay where they are.
            if i < 2 {
                assert_eq!(owner(two, "/", n), Some(o));
            }
        }
        // Spread over every node (300 shovels: each gets well over a few).
        assert!(per_node.iter().all(|&c| c > 50), "{per_node:?}");
        assert_eq!(owner(&[], "/", "x"), None);
    }
}
