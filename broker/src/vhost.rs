//! A virtual host: its exchanges, queues and bindings, and routing across them.
//!
//! Routing follows exchange-to-exchange bindings and alternate exchanges, visiting each
//! exchange once, and returns each queue once however many paths lead to it.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use amq_protocol::types::FieldTable;
use parking_lot::{Mutex, RwLock};

use crate::channel::ChannelShared;
use crate::error::{AmqpError, Result};
use crate::exchange::{Binding, Destination, Exchange, ExchangeKind};
use crate::metrics::QueueCounters;
use crate::policy::{self, Policy};
use crate::queue::args::{self, QueueArgs};
use crate::queue::state::Millis;
use crate::queue::{DeadLetter, DeadLetterSink, Queue};
use crate::replicated::ReplicatedQueue;
use crate::store::log::MessageLog;

/// Pre-declared exchanges of every vhost.
const STANDARD_EXCHANGES: &[(&str, ExchangeKind)] = &[
    ("", ExchangeKind::Direct),
    ("amq.direct", ExchangeKind::Direct),
    ("amq.fanout", ExchangeKind::Fanout),
    ("amq.topic", ExchangeKind::Topic),
    ("amq.headers", ExchangeKind::Headers),
    ("amq.match", ExchangeKind::Headers),
];

pub const REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// A queue of this vhost that lives on another node of the cluster (its definition, as the
/// metadata group replicated it). Messages routed to it are forwarded to `node`.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteQueue {
    pub name: String,
    pub node: String,
    pub durable: bool,
    pub auto_delete: bool,
    pub exclusive: bool,
    pub arguments: FieldTable,
}

/// How a replicated queue was declared, as the record a redeclaration is compared with.
pub fn replicated_record(q: &ReplicatedQueue) -> RemoteQueue {
    RemoteQueue {
        name: q.name.clone(),
        node: q.members().first().cloned().unwrap_or_default(),
        durable: q.durable,
        auto_delete: q.auto_delete,
        exclusive: false,
        arguments: q.arguments.clone(),
    }
}

/// Queues a message is routed to: those on this node, and `(node, queue)` of those on other
/// nodes.
#[derive(Default)]
pub struct Routed {
    pub local: Vec<Arc<Queue>>,
    pub remote: Vec<(String, String)>,
    pub replicated: Vec<Arc<ReplicatedQueue>>,
}

impl Routed {
    pub fn is_empty(&self) -> bool {
        self.local.is_empty() && self.remote.is_empty() && self.replicated.is_empty()
    }

    pub fn len(&self) -> usize {
        self.local.len() + self.remote.len() + self.replicated.len()
    }
}

/// What [`Vhost::replace_with_replicated`] did.
pub enum Replaced {
    /// The queue was replicated already.
    Already,
    /// The classic queue lived on another node (or nowhere any more).
    Elsewhere,
    /// The classic queue lived here: its messages are to be moved.
    Here(Arc<Queue>),
}

/// Told the name of a local queue this node removed on its own.
pub type QueueGoneFn = Box<dyn Fn(&str) + Send + Sync>;

/// Forwards a message to queues on another node: `(node, queue names, message)`.
pub type ForwardFn = Box<dyn Fn(&str, Vec<String>, &crate::message::Message) + Send + Sync>;

pub struct Vhost {
    pub name: String,
    exchanges: RwLock<HashMap<String, Arc<Exchange>>>,
    queues: RwLock<HashMap<String, Arc<Queue>>>,
    /// Queues living on other nodes of the cluster.
    remote: RwLock<HashMap<String, RemoteQueue>>,
    /// Replicated queues (a Raft group each; this node may or may not hold a replica).
    replicated: RwLock<HashMap<String, Arc<ReplicatedQueue>>>,
    /// Local classic queues replaced by a replicated queue of the same name (a policy's
    /// `ha-mode` came to match them) whose messages are still being moved into it: no longer
    /// routed to, still saved (a restart resumes the move).
    moving: RwLock<HashMap<String, Arc<Queue>>>,
    /// Called with the name of a local queue removed by this node on its own (auto-delete,
    /// expiry, an exclusive queue's connection closed), so the cluster forgets it too.
    on_queue_gone: std::sync::OnceLock<QueueGoneFn>,
    /// Dead letters routed to queues on other nodes go through this.
    forward: std::sync::OnceLock<ForwardFn>,
    /// Direct reply-to consumers by token.
    reply_consumers: Mutex<HashMap<String, (Weak<ChannelShared>, String)>>,
    policies: RwLock<Vec<Policy>>,
    operator_policies: RwLock<Vec<Policy>>,
    /// Queue declarations, creations and deletions, counted for metrics (node-wide: the
    /// broker gives every vhost the same counters).
    pub queue_counters: Arc<QueueCounters>,
    /// The node's message log, when it has storage: durable queues persist through it.
    store: std::sync::OnceLock<Arc<MessageLog>>,
    /// The node's memory budget for message bodies and its page files, when it has storage.
    paging: std::sync::OnceLock<Arc<crate::paging::Paging>>,
    /// Called after a change a restart must remember (the node saves its metadata).
    on_durable_change: std::sync::OnceLock<DurableChangeHook>,
    /// Bumped when exchanges, queues, bindings or policies change: federation links follow
    /// the exchanges and queues policies select, and the bindings of federated exchanges.
    topology: std::sync::OnceLock<tokio::sync::watch::Sender<u64>>,
    me: Weak<Vhost>,
    /// This vhost's limits (`max-connections`, `max-queues`; see [`crate::limits`]).
    limits: RwLock<crate::limits::Limits>,
}

/// Saves a durable change; `Err` says why it could not be saved.
type DurableChangeHook = Box<dyn Fn(&str, DurableChange) -> Result<(), String> + Send + Sync>;

/// What a durable change touched; the node saves that object's state as it is when saved.
#[derive(Debug, Clone)]
pub enum DurableChange {
    Exchange(String),
    Queue(String),
    Binding {
        source: String,
        destination: Destination,
        routing_key: String,
        arguments: FieldTable,
    },
    Policy {
        name: String,
        operator: bool,
    },
}

/// Properties of a queue being declared.
pub struct QueueSpec<'a> {
    pub name: &'a str,
    pub durable: bool,
    pub exclusive_owner: Option<u64>,
    pub auto_delete: bool,
    pub arguments: &'a FieldTable,
}

impl Vhost {
    pub fn new(name: &str) -> Arc<Self> {
        Self::with_queue_counters(name, Arc::default())
    }

    pub fn with_queue_counters(name: &str, queue_counters: Arc<QueueCounters>) -> Arc<Self> {
        let v = Arc::new_cyclic(|me| Vhost {
            name: name.to_owned(),
            exchanges: RwLock::new(HashMap::new()),
            queues: RwLock::new(HashMap::new()),
            remote: RwLock::new(HashMap::new()),
            replicated: RwLock::new(HashMap::new()),
            moving: RwLock::new(HashMap::new()),
            on_queue_gone: std::sync::OnceLock::new(),
            forward: std::sync::OnceLock::new(),
            reply_consumers: Mutex::new(HashMap::new()),
            policies: RwLock::new(Vec::new()),
            operator_policies: RwLock::new(Vec::new()),
            queue_counters,
            store: std::sync::OnceLock::new(),
            paging: std::sync::OnceLock::new(),
            on_durable_change: std::sync::OnceLock::new(),
            topology: std::sync::OnceLock::new(),
            me: me.clone(),
            limits: RwLock::new(crate::limits::Limits::new()),
        });
        {
            let mut ex = v.exchanges.write();
            for (n, k) in STANDARD_EXCHANGES {
                ex.insert(
                    (*n).to_owned(),
                    Arc::new(Exchange::new(
                        n,
                        *k,
                        true,
                        false,
                        false,
                        FieldTable::default(),
                    )),
                );
            }
        }
        v
    }

    fn no_exchange(&self, name: &str) -> AmqpError {
        AmqpError::not_found(format!("no exchange '{name}' in vhost '{}'", self.name))
    }

    fn no_queue(&self, name: &str) -> AmqpError {
        AmqpError::not_found(format!("no queue '{name}' in vhost '{}'", self.name))
    }

    /// Sets what runs after every durable change (once).
    pub fn set_on_durable_change(
        &self,
        f: impl Fn(&str, DurableChange) -> Result<(), String> + Send + Sync + 'static,
    ) {
        let _ = self.on_durable_change.set(Box::new(f));
    }

    /// Sets the signal bumped on topology changes (once).
    pub fn set_topology_watch(&self, tx: tokio::sync::watch::Sender<u64>) {
        let _ = self.topology.set(tx);
    }

    fn topology_changed(&self) {
        if let Some(tx) = self.topology.get() {
            tx.send_modify(|g| *g = g.wrapping_add(1));
        }
    }

    /// Never called with a lock of this vhost held: the hook reads the whole vhost. `Err`
    /// (541 internal-error) if the change could not be saved: a declare must then not be
    /// acknowledged, since a restart would not bring the object back.
    fn durable_changed(&self, change: DurableChange) -> Result<()> {
        match self.on_durable_change.get() {
            Some(f) => f(&self.name, change).map_err(AmqpError::internal),
            None => Ok(()),
        }
    }

    /// A change that is done whether or not it could be saved (deletions, policies): the
    /// failure is logged and raises the node's `disk_io` alarm, nothing to undo.
    fn durable_changed_anyway(&self, change: DurableChange) {
        if let Err(e) = self.durable_changed(change) {
            tracing::error!(vhost = %self.name, "durable change not saved: {}", e.text);
        }
    }

    /// Gives the vhost the node's message log (once, before any queue is declared).
    pub fn attach_store(&self, store: Arc<MessageLog>) {
        let _ = self.store.set(store);
    }

    /// Queues declared from now on page bodies out under the node's memory budget.
    pub fn attach_paging(&self, paging: Arc<crate::paging::Paging>) {
        let _ = self.paging.set(paging);
    }

    pub fn exchange(&self, name: &str) -> Option<Arc<Exchange>> {
        self.exchanges.read().get(name).cloned()
    }

    pub fn queue(&self, name: &str) -> Option<Arc<Queue>> {
        self.queues.read().get(name).cloned()
    }

    pub fn queues(&self) -> Vec<Arc<Queue>> {
        self.queues.read().values().cloned().collect()
    }

    /// A queue of this vhost living on another node.
    pub fn remote_queue(&self, name: &str) -> Option<RemoteQueue> {
        self.remote.read().get(name).cloned()
    }

    pub fn remote_queues(&self) -> Vec<RemoteQueue> {
        self.remote.read().values().cloned().collect()
    }

    /// Records a queue living on another node (applying the cluster's definitions). False if
    /// a queue by that name exists already, here or there.
    pub fn add_remote_queue(&self, q: RemoteQueue) -> bool {
        if self.queue(&q.name).is_some() {
            return false;
        }
        let mut remote = self.remote.write();
        if remote.contains_key(&q.name) {
            return false;
        }
        remote.insert(q.name.clone(), q);
        drop(remote);
        self.topology_changed();
        true
    }

    /// Forgets a queue living on another node, with the bindings to it.
    pub fn remove_remote_queue(&self, name: &str) -> bool {
        if self.remote.write().remove(name).is_none() {
            return false;
        }
        self.unbind_destination(&Destination::Queue(name.to_owned()));
        true
    }

    /// Replaces every remote queue (installing the cluster's definitions).
    pub fn set_remote_queues(&self, queues: Vec<RemoteQueue>) {
        let names: Vec<String> = self.remote.read().keys().cloned().collect();
        for n in names {
            if !queues.iter().any(|q| q.name == n) {
                self.remove_remote_queue(&n);
            }
        }
        let mut remote = self.remote.write();
        for q in queues {
            remote.insert(q.name.clone(), q);
        }
        drop(remote);
        self.topology_changed();
    }

    /// Whether a queue by this name exists, on this node or another.
    pub fn has_queue(&self, name: &str) -> bool {
        self.queue(name).is_some()
            || self.remote.read().contains_key(name)
            || self.replicated.read().contains_key(name)
    }

    /// A replicated queue of this vhost.
    pub fn replicated_queue(&self, name: &str) -> Option<Arc<ReplicatedQueue>> {
        self.replicated.read().get(name).cloned()
    }

    pub fn replicated_queues(&self) -> Vec<Arc<ReplicatedQueue>> {
        self.replicated.read().values().cloned().collect()
    }

    /// Records a replicated queue (applying the cluster's definitions). False if a queue by
    /// that name exists already.
    pub fn add_replicated_queue(&self, q: Arc<ReplicatedQueue>) -> bool {
        if self.queue(&q.name).is_some() || self.remote.read().contains_key(&q.name) {
            return false;
        }
        let mut r = self.replicated.write();
        if r.contains_key(&q.name) {
            return false;
        }
        let sink: Weak<dyn DeadLetterSink> = self.me.clone();
        q.set_sink(sink);
        r.insert(q.name.clone(), q);
        drop(r);
        self.topology_changed();
        true
    }

    /// Replaces the classic queue `q.name` (local, or another node's) with the replicated
    /// queue `q`, keeping the bindings to that name. Returns the local classic queue, whose
    /// messages the caller moves into `q` (see [`Vhost::done_moving`]). Nothing changes
    /// (`Replaced::Already`) if a replicated queue by that name exists already.
    pub fn replace_with_replicated(&self, q: Arc<ReplicatedQueue>) -> Replaced {
        let mut replicated = self.replicated.write();
        if replicated.contains_key(&q.name) {
            return Replaced::Already;
        }
        let classic = self.queues.write().remove(&q.name);
        if let Some(c) = &classic {
            c.cancel_consumers_for_move();
            self.moving.write().insert(q.name.clone(), c.clone());
        }
        self.remote.write().remove(&q.name);
        let sink: Weak<dyn DeadLetterSink> = self.me.clone();
        q.set_sink(sink);
        replicated.insert(q.name.clone(), q);
        drop(replicated);
        self.topology_changed();
        match classic {
            Some(c) => Replaced::Here(c),
            None => Replaced::Elsewhere,
        }
    }

    /// The classic queues whose messages are being moved into their replicated replacement.
    pub fn moving_queues(&self) -> Vec<Arc<Queue>> {
        self.moving.read().values().cloned().collect()
    }

    /// The move out of classic queue `q` ended (it is empty, or its replacement is gone):
    /// drops it and what it still holds, and saves that it is gone.
    pub fn done_moving(&self, q: &Arc<Queue>) {
        let mut moving = self.moving.write();
        if !moving.get(&q.name).is_some_and(|x| Arc::ptr_eq(x, q)) {
            return;
        }
        moving.remove(&q.name);
        drop(moving);
        q.mark_deleted();
        if q.durable && self.queue(&q.name).is_none() {
            self.durable_changed_anyway(DurableChange::Queue(q.name.clone()));
        }
    }

    /// Forgets a replicated queue, with the bindings to it; the caller stops its replica.
    pub fn remove_replicated_queue(&self, name: &str) -> Option<Arc<ReplicatedQueue>> {
        let q = self.replicated.write().remove(name)?;
        self.unbind_destination(&Destination::Queue(name.to_owned()));
        Some(q)
    }

    /// Sets what runs when this node removes a local queue on its own (once).
    pub fn set_on_queue_gone(&self, f: impl Fn(&str) + Send + Sync + 'static) {
        let _ = self.on_queue_gone.set(Box::new(f));
    }

    /// Sets how dead letters reach queues on other nodes (once).
    pub fn set_forward(&self, f: ForwardFn) {
        let _ = self.forward.set(f);
    }

    /// Removes every binding to `dest`, and auto-delete exchanges left without bindings.
    fn unbind_destination(&self, dest: &Destination) {
        let touched: Vec<Arc<Exchange>> = self
            .exchanges
            .read()
            .values()
            .filter(|e| e.bindings.write().remove_destination(dest))
            .cloned()
            .collect();
        self.topology_changed();
        for e in touched {
            self.auto_delete_exchange(&e);
        }
    }

    pub fn exchanges(&self) -> Vec<Arc<Exchange>> {
        self.exchanges.read().values().cloned().collect()
    }

    #[allow(clippy::too_many_arguments)]
    pub fn declare_exchange(
        &self,
        name: &str,
        kind: &str,
        passive: bool,
        durable: bool,
        auto_delete: bool,
        internal: bool,
        arguments: &FieldTable,
    ) -> Result<()> {
        if passive {
            return self
                .exchange(name)
                .map(|_| ())
                .ok_or_else(|| self.no_exchange(name));
        }
        let Some(k) = ExchangeKind::parse(kind) else {
            return Err(AmqpError::command_invalid(format!(
                "unknown exchange type '{kind}'"
            )));
        };
        let mut all = self.exchanges.write();
        if let Some(e) = all.get(name) {
            let mismatch = |arg: &str, got: String, current: String| {
                AmqpError::precondition(format!(
                    "inequivalent arg '{arg}' for exchange '{name}' in vhost '{}': received '{got}' but current is '{current}'",
                    self.name
                ))
            };
            if e.kind != k {
                return Err(mismatch("type", k.as_str().into(), e.kind.as_str().into()));
            }
            if e.durable != durable {
                return Err(mismatch(
                    "durable",
                    durable.to_string(),
                    e.durable.to_string(),
                ));
            }
            if e.auto_delete != auto_delete {
                return Err(mismatch(
                    "auto_delete",
                    auto_delete.to_string(),
                    e.auto_delete.to_string(),
                ));
            }
            if e.internal != internal {
                return Err(mismatch(
                    "internal",
                    internal.to_string(),
                    e.internal.to_string(),
                ));
            }
            let new_ae =
                Exchange::new(name, k, durable, auto_delete, internal, arguments.clone()).alternate;
            if e.alternate != new_ae {
                return Err(mismatch(
                    "alternate-exchange",
                    new_ae.unwrap_or_default(),
                    e.alternate.clone().unwrap_or_default(),
                ));
            }
            return Ok(());
        }
        let e = Exchange::new(name, k, durable, auto_delete, internal, arguments.clone());
        *e.policy_alternate.write() =
            policy::policy_alternate_exchange(policy::select(&self.policies.read(), name, false));
        let e = Arc::new(e);
        all.insert(name.to_owned(), e.clone());
        drop(all);
        self.topology_changed();
        if durable && let Err(err) = self.durable_changed(DurableChange::Exchange(name.to_owned()))
        {
            // Not acknowledged, so not kept: a restart would not bring it back.
            let mut all = self.exchanges.write();
            if all.get(name).is_some_and(|x| Arc::ptr_eq(x, &e)) {
                all.remove(name);
            }
            drop(all);
            self.topology_changed();
            return Err(AmqpError::internal(format!(
                "cannot save durable exchange '{name}' in vhost '{}': {}",
                self.name, err.text
            )));
        }
        Ok(())
    }

    /// Deletes an exchange and every binding to or from it. Deleting a missing exchange is
    /// not an error (RabbitMQ ≥ 3.x behaves the same).
    pub fn delete_exchange(&self, name: &str, if_unused: bool) -> Result<()> {
        let mut all = self.exchanges.write();
        let Some(e) = all.get(name).cloned() else {
            return Ok(());
        };
        if if_unused && !e.bindings.read().is_empty() {
            return Err(AmqpError::precondition(format!(
                "exchange '{name}' in vhost '{}' in use",
                self.name
            )));
        }
        all.remove(name);
        let dest = Destination::Exchange(name.to_owned());
        for other in all.values() {
            other.bindings.write().remove_destination(&dest);
        }
        drop(all);
        self.topology_changed();
        if e.durable {
            self.durable_changed_anyway(DurableChange::Exchange(name.to_owned()));
        }
        Ok(())
    }

    /// The source exchange of a binding, after checking both ends: the default exchange
    /// cannot be bound (403); a missing source or destination is 404.
    fn binding_source(&self, source: &str, dest: &Destination) -> Result<Arc<Exchange>> {
        if source.is_empty() || matches!(dest, Destination::Exchange(n) if n.is_empty()) {
            return Err(AmqpError::access_refused(
                "operation not permitted on the default exchange",
            ));
        }
        let src = self
            .exchange(source)
            .ok_or_else(|| self.no_exchange(source))?;
        match dest {
            Destination::Queue(q) => {
                if !self.has_queue(q) {
                    return Err(self.no_queue(q));
                }
            }
            Destination::Exchange(x) => {
                self.exchange(x).ok_or_else(|| self.no_exchange(x))?;
            }
        }
        Ok(src)
    }

    /// Checks a binding could be made (or removed): both ends exist, the default exchange is
    /// not involved, a headers binding's arguments are valid.
    pub fn check_binding(&self, source: &str, dest: &Destination, args: &FieldTable) -> Result<()> {
        let src = self.binding_source(source, dest)?;
        if src.kind == ExchangeKind::Headers {
            crate::exchange::headers::validate(args)?;
        }
        Ok(())
    }

    /// Binds `source` to a queue or exchange. Missing source or destination: 404.
    pub fn bind(
        &self,
        source: &str,
        dest: Destination,
        routing_key: &str,
        args: &FieldTable,
    ) -> Result<()> {
        let src = self.binding_source(source, &dest)?;
        if src.kind == ExchangeKind::Headers {
            crate::exchange::headers::validate(args)?;
        }
        let binding = Binding {
            destination: dest.clone(),
            routing_key: routing_key.to_owned(),
            arguments: args.clone(),
        };
        let added = src.bindings.write().add(binding.clone());
        self.topology_changed();
        if src.durable
            && let Err(err) = self.durable_changed(DurableChange::Binding {
                source: source.to_owned(),
                destination: dest,
                routing_key: routing_key.to_owned(),
                arguments: args.clone(),
            })
        {
            if added {
                src.bindings.write().remove(&binding);
                self.topology_changed();
            }
            return Err(AmqpError::internal(format!(
                "cannot save binding of exchange '{source}' in vhost '{}': {}",
                self.name, err.text
            )));
        }
        Ok(())
    }

    pub fn unbind(
        &self,
        source: &str,
        dest: Destination,
        routing_key: &str,
        args: &FieldTable,
    ) -> Result<()> {
        let src = self.binding_source(source, &dest)?;
        let removed = src.bindings.write().remove(&Binding {
            destination: dest.clone(),
            routing_key: routing_key.to_owned(),
            arguments: args.clone(),
        });
        if removed {
            self.topology_changed();
            if src.durable {
                self.durable_changed_anyway(DurableChange::Binding {
                    source: source.to_owned(),
                    destination: dest,
                    routing_key: routing_key.to_owned(),
                    arguments: args.clone(),
                });
            }
            self.auto_delete_exchange(&src);
        }
        Ok(())
    }

    /// An auto-delete exchange goes when its last binding goes.
    fn auto_delete_exchange(&self, e: &Arc<Exchange>) {
        if e.auto_delete && e.bindings.read().is_empty() {
            let _ = self.delete_exchange(&e.name, true);
        }
    }

    /// Declares a queue, or checks an existing one. Returns it and whether it was created.
    /// This vhost's limits.
    pub fn limits(&self) -> crate::limits::Limits {
        self.limits.read().clone()
    }

    /// The limit `name` in force (none if unset or negative).
    pub fn limit(&self, name: &str) -> Option<u64> {
        crate::limits::in_force(&self.limits.read(), name)
    }

    /// Sets one limit; true if it was not set before.
    pub fn set_limit(&self, name: &str, value: i64) -> bool {
        self.limits.write().insert(name.to_owned(), value).is_none()
    }

    /// Clears one limit; true if it was set.
    pub fn clear_limit(&self, name: &str) -> bool {
        self.limits.write().remove(name).is_some()
    }

    /// Replaces every limit.
    pub fn set_limits(&self, limits: crate::limits::Limits) {
        *self.limits.write() = limits;
    }

    pub fn declare_queue(&self, spec: QueueSpec<'_>) -> Result<(Arc<Queue>, bool)> {
        let mut all = self.queues.write();
        if let Some(q) = all.get(spec.name) {
            self.check_exclusive(q, spec.exclusive_owner)?;
            let mismatch = |arg: &str, got: bool, current: bool| {
                AmqpError::precondition(format!(
                    "inequivalent arg '{arg}' for queue '{}' in vhost '{}': received '{got}' but current is '{current}'",
                    spec.name, self.name
                ))
            };
            if q.durable != spec.durable {
                return Err(mismatch("durable", spec.durable, q.durable));
            }
            if q.exclusive_owner.is_some() != spec.exclusive_owner.is_some() {
                // RabbitMQ reports an exclusivity mismatch as a locked queue.
                return Err(self.locked(&q.name));
            }
            if q.auto_delete != spec.auto_delete {
                return Err(mismatch("auto_delete", spec.auto_delete, q.auto_delete));
            }
            args::check_equivalent(&q.arguments, spec.arguments, spec.name, &self.name)?;
            q.touch();
            self.queue_counters.declared();
            return Ok((q.clone(), false));
        }
        // Under the lock that inserts the queue: concurrent declares cannot overshoot it.
        if let Some(max) = self.limit(crate::limits::MAX_QUEUES)
            && all.len() as u64 >= max
        {
            return Err(AmqpError::precondition(format!(
                "cannot declare queue '{}': queue limit in vhost '{}' ({max}) is reached",
                spec.name, self.name
            )));
        }
        let parsed: QueueArgs = args::parse(spec.arguments, spec.name, &self.name)?;
        let effective = self.effective_queue_config(spec.name, &parsed, spec.arguments);
        let q = Queue::new(
            spec.name.to_owned(),
            spec.durable,
            spec.auto_delete,
            spec.exclusive_owner,
            spec.arguments.clone(),
            parsed,
            self.name.clone(),
            self.me.clone(),
            effective,
            self.store.get().cloned(),
            self.paging.get().cloned(),
        );
        all.insert(spec.name.to_owned(), q.clone());
        drop(all);
        self.topology_changed();
        self.queue_counters.declared();
        self.queue_counters.created();
        if spec.durable
            && spec.exclusive_owner.is_none()
            && let Err(err) = self.durable_changed(DurableChange::Queue(spec.name.to_owned()))
        {
            // Not acknowledged, so not kept: a restart would not bring it back.
            let mut all = self.queues.write();
            if all.get(spec.name).is_some_and(|x| Arc::ptr_eq(x, &q)) {
                all.remove(spec.name);
                drop(all);
                self.queue_counters.deleted();
                q.mark_deleted();
                self.topology_changed();
            }
            return Err(AmqpError::internal(format!(
                "cannot save durable queue '{}' in vhost '{}': {}",
                spec.name, self.name, err.text
            )));
        }
        Ok((q, true))
    }

    pub fn locked(&self, queue: &str) -> AmqpError {
        AmqpError::resource_locked(format!(
            "cannot obtain exclusive access to locked queue '{queue}' in vhost '{}'. It could be originally declared on another connection or the exclusive property value does not match that of the original declaration.",
            self.name
        ))
    }

    /// 405 if `q` is exclusive to another connection.
    pub fn check_exclusive(&self, q: &Queue, conn: Option<u64>) -> Result<()> {
        match q.exclusive_owner {
            Some(owner) if Some(owner) != conn => Err(self.locked(&q.name)),
            _ => Ok(()),
        }
    }

    /// Looks a queue up for a connection: 404 if missing, 405 if exclusive elsewhere.
    pub fn queue_for(&self, name: &str, conn: u64) -> Result<Arc<Queue>> {
        if self.queue(name).is_none()
            && let Some(r) = self.remote_queue(name)
        {
            return Err(AmqpError::precondition(format!(
                "queue '{name}' in vhost '{}' lives on node {}, which this operation cannot \
                 reach from here: connect to {}",
                self.name, r.node, r.node
            )));
        }
        let q = self.queue(name).ok_or_else(|| self.no_queue(name))?;
        self.check_exclusive(&q, Some(conn))?;
        Ok(q)
    }

    /// `queue.delete`: returns the number of messages deleted. A missing queue is not an error.
    pub fn delete_queue(
        &self,
        name: &str,
        conn: u64,
        if_unused: bool,
        if_empty: bool,
    ) -> Result<u32> {
        let Some(q) = self.queue(name) else {
            return Ok(0);
        };
        self.check_exclusive(&q, Some(conn))?;
        let (ready, _, consumers) = q.counts();
        if if_unused && consumers > 0 {
            return Err(AmqpError::precondition(format!(
                "queue '{name}' in vhost '{}' in use",
                self.name
            )));
        }
        if if_empty && ready > 0 {
            return Err(AmqpError::precondition(format!(
                "queue '{name}' in vhost '{}' not empty",
                self.name
            )));
        }
        Ok(self.remove_queue(name))
    }

    /// Removes a queue, its bindings, and auto-delete exchanges left without bindings; in a
    /// cluster, the other nodes are told (see [`Vhost::set_on_queue_gone`]).
    pub fn remove_queue(&self, name: &str) -> u32 {
        let removed = self.remove_queue_here(name);
        if removed.is_some()
            && let Some(gone) = self.on_queue_gone.get()
        {
            gone(name);
        }
        removed.unwrap_or(0)
    }

    /// [`Vhost::remove_queue`] without telling the cluster (applying its own deletion).
    /// None if there was no such queue here.
    pub fn remove_queue_here(&self, name: &str) -> Option<u32> {
        let q = self.queues.write().remove(name)?;
        self.queue_counters.deleted();
        let count = q.mark_deleted();
        self.unbind_destination(&Destination::Queue(name.to_owned()));
        if q.durable && q.exclusive_owner.is_none() {
            self.durable_changed_anyway(DurableChange::Queue(name.to_owned()));
        }
        Some(count)
    }

    /// Deletes the exclusive queues of a closed connection.
    pub fn remove_exclusive_queues(&self, conn: u64) {
        let names: Vec<String> = self
            .queues
            .read()
            .values()
            .filter(|q| q.exclusive_owner == Some(conn))
            .map(|q| q.name.clone())
            .collect();
        for n in names {
            self.remove_queue(&n);
        }
    }

    /// The queues a message published to `exchange` with these routing keys reaches.
    /// Err if the exchange does not exist.
    pub fn route(
        &self,
        exchange: &str,
        routing_keys: &[&str],
        headers: Option<&FieldTable>,
    ) -> Result<Routed> {
        let queues = self.queues.read();
        let remote = self.remote.read();
        let replicated = self.replicated.read();
        let exchanges = self.exchanges.read();
        let mut routed = Routed::default();
        let mut to_queue = |n: &str, out: &mut Vec<Arc<Queue>>| {
            if let Some(q) = queues.get(n) {
                if !out.iter().any(|x| Arc::ptr_eq(x, q)) {
                    out.push(q.clone());
                }
            } else if let Some(q) = replicated.get(n) {
                if !routed.replicated.iter().any(|x| Arc::ptr_eq(x, q)) {
                    routed.replicated.push(q.clone());
                }
            } else if let Some(r) = remote.get(n)
                && !routed.remote.iter().any(|(_, x)| x == n)
            {
                routed.remote.push((r.node.clone(), n.to_owned()));
            }
        };
        if exchange.is_empty() {
            // The default exchange: every queue is bound by its own name.
            let mut out: Vec<Arc<Queue>> = Vec::with_capacity(routing_keys.len());
            for k in routing_keys {
                to_queue(k, &mut out);
            }
            routed.local = out;
            return Ok(routed);
        }
        let start = exchanges
            .get(exchange)
            .ok_or_else(|| self.no_exchange(exchange))?;
        let mut out: Vec<Arc<Queue>> = Vec::new();
        // Exchange graphs are small: a Vec of visited pointers beats hashing names.
        let mut visited: Vec<*const Exchange> = Vec::new();
        let mut pending: Vec<&Arc<Exchange>> = vec![start];
        while let Some(ex) = pending.pop() {
            if visited.contains(&Arc::as_ptr(ex)) {
                continue;
            }
            visited.push(Arc::as_ptr(ex));
            if ex.kind == ExchangeKind::FederationUpstream
                && !crate::links::federation::upstream_exchange_forwards(&ex.arguments, headers)
            {
                continue;
            }
            let mut matched = false;
            ex.bindings
                .read()
                .for_each_match(ex.kind, routing_keys, headers, |d| {
                    matched = true;
                    match d {
                        Destination::Queue(n) => to_queue(n, &mut out),
                        Destination::Exchange(n) => {
                            if let Some(e) = exchanges.get(n) {
                                pending.push(e);
                            }
                        }
                    }
                });
            if !matched {
                let ae = match &ex.alternate {
                    Some(a) => Some(a.clone()),
                    None => ex.policy_alternate.read().clone(),
                };
                if let Some(ae) = ae.and_then(|a| exchanges.get(&a)) {
                    pending.push(ae);
                }
            }
        }
        routed.local = out;
        Ok(routed)
    }

    fn effective_queue_config(
        &self,
        name: &str,
        args: &QueueArgs,
        raw: &FieldTable,
    ) -> (crate::queue::state::QueueConfig, Option<u64>) {
        let policies = self.policies.read();
        let operator = self.operator_policies.read();
        policy::effective_queue_config(
            args,
            raw,
            policy::select(&policies, name, true),
            policy::select(&operator, name, true),
        )
    }

    /// The definition of the (user) policy that applies to queue `name`, if any.
    pub fn queue_policy_definition(
        &self,
        name: &str,
    ) -> Option<std::collections::BTreeMap<String, serde_json::Value>> {
        let policies = self.policies.read();
        policy::select(&policies, name, true).map(|p| p.definition.clone())
    }

    /// Adds or replaces a policy (or operator policy) and applies it to existing objects.
    pub fn put_policy(&self, p: Policy, operator: bool) {
        {
            let mut list = if operator {
                self.operator_policies.write()
            } else {
                self.policies.write()
            };
            list.retain(|x| x.name != p.name);
            list.push(p.clone());
        }
        self.reapply_policies();
        self.durable_changed_anyway(DurableChange::Policy {
            name: p.name,
            operator,
        });
    }

    /// Removes a policy; false if there was none by that name.
    pub fn delete_policy(&self, name: &str, operator: bool) -> bool {
        let removed = {
            let mut list = if operator {
                self.operator_policies.write()
            } else {
                self.policies.write()
            };
            let before = list.len();
            list.retain(|x| x.name != name);
            list.len() != before
        };
        if removed {
            self.reapply_policies();
            self.durable_changed_anyway(DurableChange::Policy {
                name: name.to_owned(),
                operator,
            });
        }
        removed
    }

    pub fn policies(&self, operator: bool) -> Vec<Policy> {
        if operator {
            self.operator_policies.read().clone()
        } else {
            self.policies.read().clone()
        }
    }

    /// The names of the policy and operator policy applying to a queue (for the API).
    pub fn queue_policy_names(&self, name: &str) -> (Option<String>, Option<String>) {
        let p = self.policies.read();
        let o = self.operator_policies.read();
        (
            policy::select(&p, name, true).map(|x| x.name.clone()),
            policy::select(&o, name, true).map(|x| x.name.clone()),
        )
    }

    /// Recomputes every queue's and exchange's effective settings after a policy change.
    /// `max-priority` is fixed at declaration, as in RabbitMQ.
    fn reapply_policies(&self) {
        self.topology_changed();
        for q in self.queues() {
            let (config, expires) = self.effective_queue_config(&q.name, &q.args, &q.arguments);
            q.apply_config(config, expires);
        }
        let policies = self.policies.read().clone();
        for e in self.exchanges() {
            *e.policy_alternate.write() =
                policy::policy_alternate_exchange(policy::select(&policies, &e.name, false));
        }
    }

    pub fn register_reply_consumer(&self, token: &str, ch: &Arc<ChannelShared>, tag: &str) {
        self.reply_consumers
            .lock()
            .insert(token.to_owned(), (Arc::downgrade(ch), tag.to_owned()));
    }

    pub fn unregister_reply_consumer(&self, token: &str) {
        self.reply_consumers.lock().remove(token);
    }

    /// The channel and consumer tag behind a direct reply-to address.
    pub fn reply_consumer(&self, token: &str) -> Option<(Arc<ChannelShared>, String)> {
        let g = self.reply_consumers.lock();
        let (w, tag) = g.get(token)?;
        Some((w.upgrade()?, tag.clone()))
    }
}

/// What a queue hands its vhost: dead letters to route and its own expiry. Installed (as a
/// weak reference) in every queue the vhost creates, so queues need not know the vhost.
impl DeadLetterSink for Vhost {
    fn dead_letter(&self, exchange: &str, letter: DeadLetter, now: Millis) -> bool {
        let keys: Vec<&str> = letter.routing_keys.iter().map(String::as_str).collect();
        let Ok(targets) = self.route(exchange, &keys, letter.msg.headers()) else {
            return false;
        };
        for t in targets.local {
            if crate::dead_letter::is_cycle(&letter.msg, &t.name) {
                continue;
            }
            t.publish(letter.msg.clone(), now);
        }
        for q in targets.replicated {
            if !crate::dead_letter::is_cycle(&letter.msg, &q.name) {
                q.publish(&letter.msg, None);
            }
        }
        if let Some(forward) = self.forward.get() {
            let mut remote = targets.remote;
            remote.retain(|(_, q)| !crate::dead_letter::is_cycle(&letter.msg, q));
            remote.sort();
            for (node, group) in group_by_node(remote) {
                forward(&node, group, &letter.msg);
            }
        }
        true
    }

    fn queue_expired(&self, queue: &str) {
        self.remove_queue(queue);
    }
}

/// `(node, queue)` pairs sorted by node, as each node with its queues.
pub fn group_by_node(pairs: Vec<(String, String)>) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for (node, queue) in pairs {
        match out.last_mut() {
            Some((n, qs)) if *n == node => qs.push(queue),
            _ => out.push((node, vec![queue])),
        }
    }
    out
}
