//! The node: configuration, users, vhosts and node-wide state shared by every connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use parking_lot::RwLock;
use tokio::sync::watch;

use crate::auth::AccessControl;
use crate::config::Config;
use crate::links::Links;
use crate::metrics::Metrics;
use crate::parameters::Parameters;
use crate::registry::ConnectionRegistry;
use crate::store::log::{MessageLog, Recovered};
use crate::vhost::Vhost;

/// A listener the node serves, for the management API's overview and health checks.
#[derive(Debug, Clone)]
pub struct Listener {
    /// `amqp`, `http`, `prometheus`, as RabbitMQ names them.
    pub protocol: String,
    pub addr: SocketAddr,
}

/// A virtual host's description and tags (management metadata only).
#[derive(Debug, Clone, Default)]
pub struct VhostMetadata {
    pub description: String,
    pub tags: Vec<String>,
    pub default_queue_type: Option<String>,
}

pub struct Broker {
    pub config: Config,
    pub access: AccessControl,
    vhosts: RwLock<HashMap<String, Arc<Vhost>>>,
    next_connection_id: AtomicU64,
    pub open_connections: AtomicUsize,
    /// Active resource alarms (e.g. "memory", "disk"); publishers are blocked while any is on.
    alarms: watch::Sender<Vec<String>>,
    /// Counters for the Prometheus endpoint.
    pub metrics: Metrics,
    /// Open connections, for the management API.
    pub connections: ConnectionRegistry,
    /// Runtime parameters (federation upstreams, shovels).
    pub parameters: Parameters,
    /// Federation links and shovels running on this node.
    pub links: Links,
    vhost_metadata: RwLock<HashMap<String, VhostMetadata>>,
    listeners: RwLock<Vec<Listener>>,
    pub started_at: Instant,
    /// The message log, on a node with storage (see [`Broker::open_store`]).
    store: std::sync::OnceLock<Arc<MessageLog>>,
    /// The metadata snapshot and journal, on a node with storage (after recovery).
    pub(crate) meta: std::sync::OnceLock<parking_lot::Mutex<crate::store::metadata::MetaStore>>,
    /// The memory budget for message bodies and the page files, on a node with storage.
    paging: std::sync::OnceLock<Arc<crate::paging::Paging>>,
    /// The memory high watermark in bytes (the configured fraction of physical memory or of
    /// the container's memory limit, whichever is lower).
    memory_limit: AtomicU64,
    /// Set by [`Broker::recover`]: lets vhosts save the node's metadata on change.
    pub(crate) me: std::sync::OnceLock<std::sync::Weak<Broker>>,
    /// Maintenance mode: no client connections are served (see [`Broker::start_drain`]).
    draining: AtomicBool,
    /// The cluster this node belongs to, once joined (see [`Broker::start_cluster`]).
    cluster: std::sync::OnceLock<Arc<crate::cluster::Cluster>>,
    /// The first metadata write that failed (see [`Broker::disk_failure`]).
    meta_failure: std::sync::OnceLock<String>,
    /// Consumers and deliveries crossing nodes (see [`crate::remote`]).
    pub(crate) remote: crate::remote::Registry,
}

/// The alarm raised while the node's storage has failed (see [`Broker::disk_failure`]).
pub const DISK_IO_ALARM: &str = "disk_io";

/// Why a drained node closes and refuses connections (sent as `CONNECTION_FORCED - …`).
pub const DRAIN_REASON: &str = "node is being drained";

impl Broker {
    /// A fresh node: the default vhost, and the default user with full permissions on it.
    pub fn new(config: Config) -> Arc<Self> {
        let access = AccessControl::default();
        access.set_loopback_users(config.loopback_users.clone());
        access.add_user(
            &config.default_user,
            &config.default_pass,
            &["administrator"],
        );
        if let Err(e) = access.set_permissions(
            &config.default_user,
            &config.default_vhost,
            ".*",
            ".*",
            ".*",
        ) {
            tracing::error!("{e}");
        }
        // The lower of physical memory and the container's limit. Without /proc/meminfo or a
        // cgroup limit, assume 1 GiB of memory rather than never alarming.
        let memory_limit = (crate::resources::total_memory_bytes().unwrap_or(1 << 30) as f64
            * config.vm_memory_high_watermark) as u64;
        let metrics = Metrics::default();
        let links = Links::default();
        let mut vhosts = HashMap::new();
        let default_vhost =
            Vhost::with_queue_counters(&config.default_vhost, metrics.queues.clone());
        default_vhost.set_topology_watch(links.topology_sender());
        vhosts.insert(config.default_vhost.clone(), default_vhost);
        let (alarms, _) = watch::channel(Vec::new());
        Arc::new(Self {
            config,
            access,
            vhosts: RwLock::new(vhosts),
            next_connection_id: AtomicU64::new(1),
            open_connections: AtomicUsize::new(0),
            alarms,
            metrics,
            connections: ConnectionRegistry::default(),
            parameters: Parameters::default(),
            links,
            vhost_metadata: RwLock::new(HashMap::new()),
            listeners: RwLock::new(Vec::new()),
            started_at: Instant::now(),
            store: std::sync::OnceLock::new(),
            meta: std::sync::OnceLock::new(),
            paging: std::sync::OnceLock::new(),
            memory_limit: AtomicU64::new(memory_limit),
            me: std::sync::OnceLock::new(),
            draining: AtomicBool::new(false),
            cluster: std::sync::OnceLock::new(),
            meta_failure: std::sync::OnceLock::new(),
            remote: Default::default(),
        })
    }

    /// Opens the message log under the data directory and returns what it recovered. Queues
    /// declared afterwards in any vhost persist their persistent messages.
    pub fn open_store(&self) -> std::io::Result<Recovered> {
        let (log, recovered) = MessageLog::open(&self.config.data_dir.join("messages"))?;
        let budget = self
            .config
            .message_memory_budget
            .bytes(self.memory_limit_bytes());
        let paging = crate::paging::Paging::open(
            budget,
            &self.config.data_dir.join("pages"),
            Some(log.clone()),
        )?;
        tracing::info!(
            budget,
            "message bodies beyond the memory budget are paged out to disk"
        );
        for v in self.vhosts.read().values() {
            v.attach_store(log.clone());
            v.attach_paging(paging.clone());
        }
        let _ = self.store.set(log);
        let _ = self.paging.set(paging);
        Ok(recovered)
    }

    /// Saves the node's metadata whenever `v` changes something durable.
    pub(crate) fn watch_durable_changes(me: std::sync::Weak<Broker>, v: &Vhost) {
        v.set_on_durable_change(move |vhost, change| match me.upgrade() {
            Some(b) => crate::persistence::off_the_runtime(|| b.persist_change(vhost, change)),
            None => Ok(()),
        });
    }

    pub(crate) fn set_self(self: &Arc<Self>) {
        let _ = self.me.set(Arc::downgrade(self));
        for v in self.vhosts.read().values() {
            Broker::watch_durable_changes(Arc::downgrade(self), v);
        }
    }

    /// Joins the cluster: serves the inter-node `listener` and dials `cluster-peers`. A node
    /// that its peers removed (forget) while it was down resets its cluster state first and
    /// joins as a new member, keeping its queues and messages.
    pub async fn start_cluster(
        self: &Arc<Self>,
        listener: tokio::net::TcpListener,
        secret: Vec<u8>,
    ) -> Result<(), String> {
        let advertise = self
            .config
            .cluster_advertise_addr()
            .ok_or("no inter-node listener (cluster-listen)")?;
        let data_dir = &self.config.data_dir;
        let tls = match (
            self.config.cluster_tls,
            &self.config.tls_cert_file,
            &self.config.tls_key_file,
        ) {
            (true, Some(cert), Some(key)) => {
                let files = crate::tls::TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                    ca: self.config.tls_ca_file.clone(),
                };
                let tls = crate::tls::cluster_tls(&files)
                    .map_err(|e| format!("inter-node TLS (cluster-tls): {e}"))?;
                Some(Arc::new(tls))
            }
            (true, _, _) => {
                return Err("cluster-tls needs tls-cert-file and tls-key-file".into());
            }
            (false, _, _) => None,
        };
        let identity = |incarnation| crate::cluster::handshake::Identity {
            node: self.node_name(),
            advertise: advertise.clone(),
            incarnation,
            secret: secret.clone().into(),
            tls: tls.clone(),
        };
        let incarnation = |dir| {
            crate::cluster::incarnation(dir).map_err(|e| {
                format!("cannot keep the node's incarnation in the data directory: {e}")
            })
        };
        let mut me = identity(incarnation(data_dir)?);
        let mut addrs = self.config.cluster_peer_addrs();
        addrs.extend(crate::cluster::remembered_addresses(data_dir));
        if let Some(refusal) = crate::cluster::forgotten_by(&me, &addrs).await {
            tracing::warn!(
                "this node was removed from the cluster while it was down ({refusal}); \
                 resetting its cluster state to join again as a new member (its queues and \
                 messages are kept)"
            );
            crate::cluster::reset_cluster_state(data_dir)
                .map_err(|e| format!("cannot reset the node's cluster state: {e}"))?;
            me = identity(incarnation(data_dir)?);
        }
        let weak = Arc::downgrade(self);
        let status: crate::cluster::StatusFn =
            Box::new(move || weak.upgrade().map(|b| b.node_status()).unwrap_or_default());
        let cluster = crate::cluster::Cluster::new(me, status, Some(self.config.data_dir.clone()));
        cluster.serve_broker_calls(Arc::new(crate::remote::BrokerSide(Arc::downgrade(self))));
        cluster.start(listener, &self.config.cluster_peer_addrs());
        self.cluster
            .set(cluster)
            .map_err(|_| "the node has already joined its cluster".to_owned())?;
        for v in self.vhosts.read().values() {
            Broker::forward_dead_letters(Arc::downgrade(self), v);
        }
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
            loop {
                tick.tick().await;
                match weak.upgrade() {
                    Some(b) => b.sweep_remote(),
                    None => break,
                }
            }
        });
        Ok(())
    }

    /// Dead letters routed to queues on other nodes are forwarded to them.
    fn forward_dead_letters(weak: std::sync::Weak<Broker>, v: &Vhost) {
        let vhost = v.name.clone();
        v.set_forward(Box::new(move |node, queues, msg| {
            if let Some(b) = weak.upgrade() {
                b.forward_publish(node, &vhost, queues, msg, None);
            }
        }));
    }

    /// Starts the cluster's metadata group (after [`Broker::start_cluster`]): from then on
    /// definitions change through it ([`Broker::change`]). This node may create the group if
    /// its own address is the first of `cluster-peers`.
    pub async fn start_metadata(self: &Arc<Self>) -> Result<(), String> {
        let Some(cluster) = self.cluster() else {
            return Ok(());
        };
        self.lazy_metadata_journal();
        let advertise = self.config.cluster_advertise_addr();
        let seed = self.config.cluster_peer_addrs().first() == advertise.as_ref();
        let host = Arc::new(crate::definitions::Replicated(Arc::downgrade(self)));
        cluster.start_metadata(host, seed).await?;
        for v in self.vhosts.read().values() {
            Broker::tell_cluster_of_removals(Arc::downgrade(self), v);
        }
        tokio::spawn(crate::mirroring::keep_following(Arc::downgrade(self)));
        Ok(())
    }

    /// On a clustered node the Raft log is the durable record of every definition: the
    /// node's own metadata journal is written without an fsync per change (one less on the
    /// path of every declare and bind), and synced before the message log's next fsync, so a
    /// persistent message is never on disk while the declaration of its queue is not.
    fn lazy_metadata_journal(self: &Arc<Self>) {
        let (Some(meta), Some(store)) = (self.meta.get(), self.store.get()) else {
            return;
        };
        meta.lock().set_lazy(true);
        let weak = Arc::downgrade(self);
        store.set_before_sync(Box::new(move || {
            let Some(b) = weak.upgrade() else {
                return Ok(());
            };
            let Some(meta) = b.meta.get() else {
                return Ok(());
            };
            meta.lock()
                .sync()
                .map_err(|e| format!("fdatasync of the metadata journal failed: {e}"))
        }));
    }

    /// Waits (at most `within`) until this node has joined the metadata group and caught up
    /// with its leader; true if it has (or the node is not clustered).
    pub async fn wait_metadata_caught_up(&self, within: std::time::Duration) -> bool {
        let Some(meta) = self.cluster().and_then(|c| c.metadata()).cloned() else {
            return true;
        };
        let deadline = tokio::time::Instant::now() + within;
        while !meta.caught_up() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        true
    }

    /// A queue this node removes on its own (auto-delete, expiry) is deleted cluster-wide.
    fn tell_cluster_of_removals(weak: std::sync::Weak<Broker>, v: &Vhost) {
        let vhost = v.name.clone();
        v.set_on_queue_gone(move |name| {
            let (Some(b), Ok(rt)) = (weak.upgrade(), tokio::runtime::Handle::try_current()) else {
                return;
            };
            let change = crate::definitions::Change::DeleteQueue {
                vhost: vhost.clone(),
                name: name.to_owned(),
            };
            let name = name.to_owned();
            rt.spawn(async move {
                if let Err(e) = b.change(change).await {
                    tracing::warn!(queue = %name, "the cluster was not told the queue is gone: {e}");
                }
            });
        });
    }

    /// The cluster, on a clustered node.
    pub fn cluster(&self) -> Option<&Arc<crate::cluster::Cluster>> {
        self.cluster.get()
    }

    /// What this node reports of itself to its peers and in `/api/nodes`.
    pub fn node_status(&self) -> crate::cluster::rpc::NodeStatus {
        crate::cluster::rpc::NodeStatus {
            uptime_ms: self.started_at.elapsed().as_millis() as u64,
            os_pid: std::process::id(),
            processors: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            mem_used: crate::resources::resident_memory_bytes(),
            mem_limit: self.memory_limit_bytes(),
            disk_free: crate::resources::disk_available(&self.config.data_dir),
            disk_free_limit: self.config.disk_free_limit,
            alarms: self.active_alarms(),
            being_drained: self.is_draining(),
            listeners: self
                .listeners()
                .iter()
                .map(|l| (l.protocol.clone(), l.addr.ip().to_string(), l.addr.port()))
                .collect(),
        }
    }

    /// The memory high watermark in bytes.
    pub fn memory_limit_bytes(&self) -> u64 {
        self.memory_limit.load(Ordering::Relaxed)
    }

    /// Changes the memory high watermark (as `rabbitmqctl set_vm_memory_high_watermark`).
    pub fn set_memory_limit_bytes(&self, bytes: u64) {
        self.memory_limit.store(bytes, Ordering::Relaxed);
    }

    pub fn store(&self) -> Option<&Arc<MessageLog>> {
        self.store.get()
    }

    /// The memory budget for message bodies and the page files, on a node with storage.
    pub fn paging(&self) -> Option<&Arc<crate::paging::Paging>> {
        self.paging.get()
    }

    /// The highest message-log sequence number on disk (everything, without storage).
    pub fn store_synced(&self) -> u64 {
        self.store.get().map_or(u64::MAX, |s| s.synced_now())
    }

    pub fn vhost(&self, name: &str) -> Option<Arc<Vhost>> {
        self.vhosts.read().get(name).cloned()
    }

    pub fn add_vhost(&self, name: &str) -> Arc<Vhost> {
        self.vhosts
            .write()
            .entry(name.to_owned())
            .or_insert_with(|| {
                let v = Vhost::with_queue_counters(name, self.metrics.queues.clone());
                v.set_topology_watch(self.links.topology_sender());
                if let Some(store) = self.store.get() {
                    v.attach_store(store.clone());
                }
                if let Some(paging) = self.paging.get() {
                    v.attach_paging(paging.clone());
                }
                if let Some(me) = self.me.get() {
                    Broker::watch_durable_changes(me.clone(), &v);
                    if let Some(c) = self.cluster.get() {
                        Broker::forward_dead_letters(me.clone(), &v);
                        if c.metadata().is_some() {
                            Broker::tell_cluster_of_removals(me.clone(), &v);
                        }
                    }
                }
                v
            })
            .clone()
    }

    /// Deletes a virtual host: its queues (consumers are cancelled), its permissions and
    /// parameters; its connections are closed. False if there was none by that name.
    pub fn delete_vhost(&self, name: &str) -> bool {
        let Some(vhost) = self.vhosts.write().remove(name) else {
            return false;
        };
        for q in vhost.queues() {
            vhost.remove_queue(&q.name);
        }
        self.access.clear_vhost(name);
        self.parameters.clear_vhost(name);
        self.vhost_metadata.write().remove(name);
        for c in self.connections.list() {
            if c.vhost.name == name {
                c.control
                    .request_close(&format!("vhost '{name}' is deleted"));
            }
        }
        true
    }

    pub fn vhost_metadata(&self, name: &str) -> VhostMetadata {
        self.vhost_metadata
            .read()
            .get(name)
            .cloned()
            .unwrap_or_default()
    }

    pub fn set_vhost_metadata(&self, name: &str, meta: VhostMetadata) {
        self.vhost_metadata.write().insert(name.to_owned(), meta);
    }

    /// Records a listener once it is bound (the port may have been chosen by the OS).
    pub fn register_listener(&self, protocol: &str, addr: SocketAddr) {
        self.listeners.write().push(Listener {
            protocol: protocol.to_owned(),
            addr,
        });
    }

    pub fn listeners(&self) -> Vec<Listener> {
        self.listeners.read().clone()
    }

    /// The node name shown by the management API and in metric labels (`node-name`).
    pub fn node_name(&self) -> String {
        self.config.node_name.clone()
    }

    pub fn vhost_names(&self) -> Vec<String> {
        self.vhosts.read().keys().cloned().collect()
    }

    /// Whether the node is being drained (RabbitMQ's `being_drained`).
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Starts draining: new client connections are refused and every open one is closed with
    /// 320 CONNECTION_FORCED. Returns how many connections were asked to close. Not persisted:
    /// a restarted node serves again.
    pub fn start_drain(&self) -> usize {
        self.draining.store(true, Ordering::Release);
        // A connection finishing its handshake right now checks the flag after it registers,
        // so none slips between the flag and this sweep.
        let open = self.connections.list();
        for c in &open {
            c.control.request_close(DRAIN_REASON);
        }
        open.len()
    }

    /// Stops the node's federation links and shovels (settling what they have in flight),
    /// then asks every client connection to close (`320 CONNECTION_FORCED`, after the confirms
    /// for what it already took) and waits up to `timeout` for them to go. New connections
    /// are refused meanwhile. For a clean stop on SIGTERM.
    pub async fn shutdown(&self, timeout: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        self.draining.store(true, Ordering::Release);
        self.links.shutdown(timeout / 2).await;
        for c in self.connections.list() {
            c.control
                .request_close("broker forced connection closure with reason 'shutdown'");
        }
        while !self.connections.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Ends draining: connections are accepted again.
    pub fn end_drain(&self) {
        self.draining.store(false, Ordering::Release);
    }

    /// Ends a graceful stop: everything the message log holds is written and synced, the
    /// flusher has stopped.
    pub fn close_store(&self) {
        if let Some(log) = self.store.get() {
            log.close();
        }
    }

    pub fn next_connection_id(&self) -> u64 {
        self.next_connection_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Raises a resource alarm: connections that publish are blocked until every alarm clears.
    pub fn set_alarm(&self, resource: &str) {
        self.alarms.send_modify(|a| {
            if !a.iter().any(|x| x == resource) {
                a.push(resource.to_owned());
            }
        });
    }

    pub fn clear_alarm(&self, resource: &str) {
        self.alarms.send_modify(|a| a.retain(|x| x != resource));
    }

    /// The alarms in effect now: the resource alarms, and `disk_io` while the node's storage
    /// has failed. `disk_io` does not block publishers (they are not in the watch of
    /// [`Broker::alarms`]): persistent publishes are refused one by one (nack, or a
    /// connection error) so confirm-mode publishers hear about it, and transient traffic
    /// goes on.
    pub fn active_alarms(&self) -> Vec<String> {
        let mut a = self.alarms.borrow().clone();
        if self.disk_failure().is_some() {
            a.push(DISK_IO_ALARM.to_owned());
        }
        a
    }

    /// Why this node's storage failed, if it did: a write or fsync of the message log, or a
    /// metadata write. Sticky until the node restarts: after a failed fsync nothing written
    /// since the last good one can be trusted, and a restart recovers what is really on disk.
    pub fn disk_failure(&self) -> Option<String> {
        if let Some(why) = self.store().and_then(|s| s.failure()) {
            return Some(format!("message store: {why}"));
        }
        self.meta_failure
            .get()
            .map(|why| format!("metadata store: {why}"))
    }

    /// Records a failed metadata write (the first one is kept) and raises the `disk_io` alarm.
    pub(crate) fn metadata_failed(&self, why: &str) {
        if self.meta_failure.set(why.to_owned()).is_ok() {
            tracing::error!(
                "metadata store failed: {why}; durable declares are refused until the node is restarted"
            );
        }
    }

    pub fn alarms(&self) -> watch::Receiver<Vec<String>> {
        self.alarms.subscribe()
    }
}
