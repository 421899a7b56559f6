//! How a node with storage saves its metadata and comes back after a restart or a crash:
//! metadata from the snapshot first (vhosts, users, permissions, policies, durable exchanges
//! and queues, bindings), then the persistent messages of each durable queue from the log.

use std::sync::Arc;

use crate::auth::User;
use crate::broker::Broker;
use crate::exchange::{Binding, Destination, Exchange};
use crate::policy::Policy;
use crate::store::metadata::{
    self, BindingDef, Change, ExchangeDef, MetaStore, ParameterDef, PermissionDef, PolicyDef,
    QueueDef, Snapshot, TopicPermissionDef, UserDef,
};
use crate::vhost::{DurableChange, QueueSpec, Vhost};

fn exchange_def(vhost: &str, e: &Exchange) -> ExchangeDef {
    ExchangeDef {
        vhost: vhost.to_owned(),
        name: e.name.clone(),
        kind: e.kind.as_str().into(),
        auto_delete: e.auto_delete,
        internal: e.internal,
        arguments: metadata::encode_table(&e.arguments),
    }
}

pub(crate) fn policy_def(vhost: &str, p: &Policy, operator: bool) -> PolicyDef {
    PolicyDef {
        vhost: vhost.to_owned(),
        name: p.name.clone(),
        operator,
        body: serde_json::json!({
            "pattern": p.pattern.as_str(),
            "definition": p.definition,
            "priority": p.priority,
            "apply-to": p.apply_to.as_str(),
        }),
    }
}

pub(crate) fn binding_def(vhost: &str, source: &str, b: &Binding) -> BindingDef {
    BindingDef {
        vhost: vhost.to_owned(),
        source: source.to_owned(),
        destination: b.destination.name().to_owned(),
        destination_is_queue: matches!(b.destination, Destination::Queue(_)),
        routing_key: b.routing_key.clone(),
        arguments: metadata::encode_table(&b.arguments),
    }
}

/// A queue that a restart brings back.
fn durable_queue(v: &Vhost, name: &str) -> bool {
    v.queue(name)
        .is_some_and(|q| q.durable && q.exclusive_owner.is_none() && !q.is_deleted())
}

/// An exchange that a restart brings back (or that always exists, for `amq.*`).
fn durable_exchange(v: &Vhost, name: &str) -> Option<Arc<Exchange>> {
    v.exchange(name).filter(|e| e.durable && !e.name.is_empty())
}

/// Runs `write` (file writes and fsyncs) so that it never stalls other tasks: on a
/// multi-threaded runtime the calling worker hands its other tasks to the rest of the runtime
/// for the duration (`block_in_place`), so heartbeats, other clients and the caller's peers go
/// on while this task waits for the disk. The caller still waits, which is the point: a
/// durable declare is answered only once it is on disk.
pub(crate) fn off_the_runtime<T>(write: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(write)
        }
        _ => write(),
    }
}

impl Broker {
    /// All the metadata, as the snapshot file holds it.
    pub(crate) fn metadata_snapshot(&self) -> Snapshot {
        let mut s = Snapshot::default();
        let mut names = self.vhost_names();
        names.sort();
        for u in self.access.users() {
            s.users.push(UserDef {
                name: u.name.clone(),
                password_hash: u.password_hash.clone(),
                tags: u.tags.clone(),
            });
        }
        for (user, vhost, p) in self.access.permissions() {
            s.permissions.push(PermissionDef {
                user,
                vhost,
                configure: p.configure.as_str().into(),
                write: p.write.as_str().into(),
                read: p.read.as_str().into(),
            });
        }
        for (user, vhost, t) in self.access.topic_permissions() {
            s.topic_permissions.push(TopicPermissionDef {
                user,
                vhost,
                exchange: t.exchange.clone(),
                write: t.write.as_str().into(),
                read: t.read.as_str().into(),
            });
        }
        for name in &names {
            let Some(v) = self.vhost(name) else { continue };
            s.vhosts.push(name.clone());
            let limits = v.limits();
            if !limits.is_empty() {
                s.vhost_limits.push(crate::limits::VhostLimitsDef {
                    vhost: name.clone(),
                    limits,
                });
            }
            for operator in [false, true] {
                for p in v.policies(operator) {
                    s.policies.push(policy_def(name, &p, operator));
                }
            }
            let durable_exchanges: Vec<_> = v
                .exchanges()
                .into_iter()
                .filter(|e| e.durable && !e.name.is_empty())
                .collect();
            for e in &durable_exchanges {
                if !e.name.starts_with("amq.") {
                    s.exchanges.push(exchange_def(name, e));
                }
                for b in e.bindings.read().list() {
                    let keep = match &b.destination {
                        Destination::Queue(q) => durable_queue(&v, q),
                        Destination::Exchange(x) => durable_exchanges.iter().any(|d| &d.name == x),
                    };
                    if keep {
                        s.bindings.push(binding_def(name, &e.name, b));
                    }
                }
            }
            // A classic queue whose messages are being moved into its replicated replacement
            // stays saved until the move ends: a restart resumes it.
            for q in v.queues().into_iter().chain(v.moving_queues()) {
                if q.durable && q.exclusive_owner.is_none() && !q.is_deleted() {
                    s.queues.push(QueueDef {
                        vhost: name.clone(),
                        name: q.name.clone(),
                        auto_delete: q.auto_delete,
                        arguments: metadata::encode_table(&q.arguments),
                    });
                }
            }
        }
        for (user, limits) in self.access.all_user_limits() {
            s.user_limits
                .push(crate::limits::UserLimitsDef { user, limits });
        }
        for p in self.parameters.list(None, None) {
            s.parameters.push(ParameterDef {
                component: p.component,
                vhost: p.vhost,
                name: p.name,
                value: p.value,
            });
        }
        s.exchanges
            .sort_by(|a, b| (&a.vhost, &a.name).cmp(&(&b.vhost, &b.name)));
        s.queues
            .sort_by(|a, b| (&a.vhost, &a.name).cmp(&(&b.vhost, &b.name)));
        s
    }

    /// Saves all the metadata as a new snapshot, on a node with storage. Called after changes
    /// that a restart must remember and that have no journal record (users, permissions,
    /// vhosts, parameters); a failure raises the `disk_io` alarm and is returned (the change
    /// stays in effect in memory: the caller says it was not saved).
    pub fn persist_metadata(&self) -> Result<(), String> {
        let Some(meta) = self.meta.get() else {
            return Ok(());
        };
        let mut m = meta.lock();
        let saved = self.save_snapshot(&mut m);
        if let Err(why) = &saved {
            self.metadata_failed(why);
        }
        saved
    }

    fn save_snapshot(&self, m: &mut MetaStore) -> Result<(), String> {
        m.save(self.metadata_snapshot()).map_err(|e| {
            format!(
                "cannot save metadata to {}: {e}",
                self.config.data_dir.display()
            )
        })
    }

    /// Saves one durable change: a journal record of the object's state now (so whatever
    /// order racing changes arrive in, the last record is the final state), or a new snapshot
    /// when the journal has grown past it. `Err` when the change is not on disk: the caller
    /// must not acknowledge it (a declare answers 541 internal-error). Once the node's
    /// storage has failed (the message log or an earlier metadata write), nothing more is
    /// attempted: every change is refused until a restart.
    pub fn persist_change(&self, vhost: &str, change: DurableChange) -> Result<(), String> {
        let Some(meta) = self.meta.get() else {
            return Ok(());
        };
        if let Some(why) = self.disk_failure() {
            return Err(format!("the node's storage failed: {why}"));
        }
        let mut m = meta.lock();
        let Some(record) = self.change_record(vhost, change) else {
            return Ok(());
        };
        let saved = match m.append(&[record]) {
            Ok(false) => Ok(()),
            Ok(true) => {
                // The change is in the journal (or, with no journal open, in no file yet:
                // then this snapshot is what saves it).
                let in_journal = m.has_journal();
                match self.save_snapshot(&mut m) {
                    Err(why) if in_journal => {
                        self.metadata_failed(&why);
                        Ok(())
                    }
                    r => r,
                }
            }
            Err(e) => {
                tracing::error!("cannot append to the metadata journal: {e}; writing a snapshot");
                self.save_snapshot(&mut m)
                    .map_err(|why| format!("metadata journal append failed ({e}), and {why}"))
            }
        };
        if let Err(why) = &saved {
            self.metadata_failed(why);
        }
        saved
    }

    /// The journal record for a change: the object's state as it is now.
    fn change_record(&self, vhost: &str, change: DurableChange) -> Option<Change> {
        let v = self.vhost(vhost);
        let v = v.as_deref();
        Some(match change {
            DurableChange::Exchange(name) => match v.and_then(|v| durable_exchange(v, &name)) {
                // The amq.* exchanges always exist: nothing to save (and never a deletion,
                // which would drop their bindings).
                Some(_) if name.starts_with("amq.") => return None,
                Some(e) => Change::PutExchange(exchange_def(vhost, &e)),
                None => Change::DelExchange {
                    vhost: vhost.to_owned(),
                    name,
                },
            },
            DurableChange::Queue(name) => match v.filter(|v| durable_queue(v, &name)) {
                Some(v) => {
                    let q = v.queue(&name)?;
                    Change::PutQueue(QueueDef {
                        vhost: vhost.to_owned(),
                        name,
                        auto_delete: q.auto_delete,
                        arguments: metadata::encode_table(&q.arguments),
                    })
                }
                None => Change::DelQueue {
                    vhost: vhost.to_owned(),
                    name,
                },
            },
            DurableChange::Binding {
                source,
                destination,
                routing_key,
                arguments,
            } => {
                let b = Binding {
                    destination,
                    routing_key,
                    arguments,
                };
                let def = binding_def(vhost, &source, &b);
                let kept = v.is_some_and(|v| {
                    durable_exchange(v, &source)
                        .is_some_and(|src| src.bindings.read().list().contains(&b))
                        && match &b.destination {
                            Destination::Queue(q) => durable_queue(v, q),
                            Destination::Exchange(x) => durable_exchange(v, x).is_some(),
                        }
                });
                if kept {
                    Change::PutBinding(def)
                } else {
                    Change::DelBinding(def)
                }
            }
            DurableChange::Policy { name, operator } => {
                let p = v.and_then(|v| v.policies(operator).into_iter().find(|p| p.name == name));
                match p {
                    Some(p) => Change::PutPolicy(policy_def(vhost, &p, operator)),
                    None => Change::DelPolicy {
                        vhost: vhost.to_owned(),
                        name,
                        operator,
                    },
                }
            }
        })
    }

    /// Opens storage under the data directory and restores what a previous run left.
    pub fn recover(self: &Arc<Self>) -> std::io::Result<()> {
        let snapshot = metadata::load(&self.config.data_dir)?;
        let _ = self.meta.set(parking_lot::Mutex::new(MetaStore::new(
            &self.config.data_dir,
            snapshot.as_ref(),
        )));
        let recovered = self.open_store()?;
        if let (Some(paging), Ok(rt)) = (self.paging(), tokio::runtime::Handle::try_current()) {
            rt.spawn(crate::paging::run_pager(
                Arc::downgrade(self),
                paging.clone(),
            ));
        }
        let mut queues = 0;
        if let Some(s) = snapshot {
            for name in &s.vhosts {
                self.add_vhost(name);
            }
            // The snapshot is the truth about users: a default user deleted before the
            // restart must not come back.
            for u in self.access.users() {
                if !s.users.iter().any(|d| d.name == u.name) {
                    self.access.delete_user(&u.name);
                }
            }
            for u in s.users {
                self.access.put_user(User {
                    name: u.name,
                    password_hash: u.password_hash,
                    tags: u.tags,
                });
            }
            for p in s.permissions {
                if let Err(e) =
                    self.access
                        .set_permissions(&p.user, &p.vhost, &p.configure, &p.write, &p.read)
                {
                    tracing::error!("stored permissions of {} skipped: {e}", p.user);
                }
            }
            for t in s.topic_permissions {
                if let Err(e) = self.access.set_topic_permissions(
                    &t.user,
                    &t.vhost,
                    &t.exchange,
                    &t.write,
                    &t.read,
                ) {
                    tracing::error!("stored topic permissions of {} skipped: {e}", t.user);
                }
            }
            for p in s.policies {
                let Some(v) = self.vhost(&p.vhost) else {
                    continue;
                };
                match crate::policy::parse_policy(&p.name, &p.vhost, &p.body, p.operator) {
                    Ok(pol) => v.put_policy(pol, p.operator),
                    Err(e) => tracing::error!("stored policy {} skipped: {e}", p.name),
                }
            }
            for p in s.parameters {
                if let Err(e) = self
                    .parameters
                    .put(&p.component, &p.vhost, &p.name, p.value)
                {
                    tracing::error!("stored parameter {}/{} skipped: {e}", p.component, p.name);
                }
            }
            for e in s.exchanges {
                let Some(v) = self.vhost(&e.vhost) else {
                    continue;
                };
                let args = metadata::decode_table(&e.arguments).unwrap_or_default();
                if let Err(err) = v.declare_exchange(
                    &e.name,
                    &e.kind,
                    false,
                    true,
                    e.auto_delete,
                    e.internal,
                    &args,
                ) {
                    tracing::error!("stored exchange {} skipped: {}", e.name, err.text);
                }
            }
            for q in s.queues {
                let Some(v) = self.vhost(&q.vhost) else {
                    continue;
                };
                let args = metadata::decode_table(&q.arguments).unwrap_or_default();
                match v.declare_queue(QueueSpec {
                    name: &q.name,
                    durable: true,
                    exclusive_owner: None,
                    auto_delete: q.auto_delete,
                    arguments: &args,
                }) {
                    Ok(_) => queues += 1,
                    Err(err) => tracing::error!("stored queue {} skipped: {}", q.name, err.text),
                }
            }
            // After the queues: a limit lowered below what the vhost holds must not drop them.
            for l in s.vhost_limits {
                if let Some(v) = self.vhost(&l.vhost) {
                    v.set_limits(l.limits);
                }
            }
            for l in s.user_limits {
                if self.access.user(&l.user).is_some() {
                    self.access.set_user_limits(&l.user, l.limits);
                }
            }
            for b in s.bindings {
                let Some(v) = self.vhost(&b.vhost) else {
                    continue;
                };
                let args = metadata::decode_table(&b.arguments).unwrap_or_default();
                let dest = if b.destination_is_queue {
                    Destination::Queue(b.destination)
                } else {
                    Destination::Exchange(b.destination)
                };
                if let Err(err) = v.bind(&b.source, dest, &b.routing_key, &args) {
                    tracing::error!("stored binding from {} skipped: {}", b.source, err.text);
                }
            }
        }
        let mut messages = 0;
        let clean = recovered.clean;
        for ((vhost, queue), list) in recovered.messages {
            let target = self.vhost(&vhost).and_then(|v| v.queue(&queue));
            match target {
                Some(q) => {
                    messages += list.len();
                    q.restore(list);
                }
                None => {
                    tracing::warn!(%vhost, %queue, count = list.len(), "stored messages of a queue that no longer exists dropped");
                    if let Some(store) = self.store() {
                        let sids: Vec<u64> = list.iter().map(|m| m.sid).collect();
                        store.purge(&vhost, &queue, &sids);
                    }
                }
            }
        }
        tracing::info!(
            queues,
            messages,
            clean_shutdown = clean,
            "recovered from {}",
            self.config.data_dir.display()
        );
        // From now on every durable change is saved; save once now, so the snapshot always
        // reflects this node (default user and vhost included).
        self.set_self();
        // A failure raised the disk_io alarm: the node serves, but is not ready.
        let _ = self.persist_metadata();
        Ok(())
    }
}
