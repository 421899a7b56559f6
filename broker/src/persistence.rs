//! How a node with storage saves its metadata and comes back after a restart or a crash:
//! metadata from the snapshot first (vhosts, users, permissions, policies, durable exchanges
//! and queues, bindings), then the persistent messages of each durable queue from the log.

use std::sync::Arc;

use parking_lot::Mutex;

use crate::auth::User;
use crate::broker::Broker;
use crate::exchange::Destination;
use crate::store::metadata::{
    self, BindingDef, ExchangeDef, ParameterDef, PermissionDef, PolicyDef, QueueDef, Snapshot,
    TopicPermissionDef, UserDef,
};
use crate::vhost::QueueSpec;

/// Serialises snapshot writes (they are whole-file rewrites).
static SAVING: Mutex<()> = Mutex::new(());

impl Broker {
    fn snapshot(&self) -> Snapshot {
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
            for operator in [false, true] {
                for p in v.policies(operator) {
                    s.policies.push(PolicyDef {
                        vhost: name.clone(),
                        name: p.name.clone(),
                        operator,
                        body: serde_json::json!({
                            "pattern": p.pattern.as_str(),
                            "definition": p.definition,
                            "priority": p.priority,
                            "apply-to": p.apply_to.as_str(),
                        }),
                    });
                }
            }
            let durable_exchanges: Vec<_> = v
                .exchanges()
                .into_iter()
                .filter(|e| e.durable && !e.name.is_empty())
                .collect();
            let durable_queue = |n: &str| {
                v.queue(n)
                    .is_some_and(|q| q.durable && q.exclusive_owner.is_none())
            };
            for e in &durable_exchanges {
                if !e.name.starts_with("amq.") {
                    s.exchanges.push(ExchangeDef {
                        vhost: name.clone(),
                        name: e.name.clone(),
                        kind: e.kind.as_str().into(),
                        auto_delete: e.auto_delete,
                        internal: e.internal,
                        arguments: metadata::encode_table(&e.arguments),
                    });
                }
                for b in e.bindings.read().list() {
                    let (dest, is_queue, keep) = match &b.destination {
                        Destination::Queue(q) => (q.clone(), true, durable_queue(q)),
                        Destination::Exchange(x) => (
                            x.clone(),
                            false,
                            durable_exchanges.iter().any(|d| &d.name == x),
                        ),
                    };
                    if keep {
                        s.bindings.push(BindingDef {
                            vhost: name.clone(),
                            source: e.name.clone(),
                            destination: dest,
                            destination_is_queue: is_queue,
                            routing_key: b.routing_key.clone(),
                            arguments: metadata::encode_table(&b.arguments),
                        });
                    }
                }
            }
            for q in v.queues() {
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

    /// Saves the metadata, on a node with storage. Called after every change that a restart
    /// must remember; a failure is logged (the change stays in effect in memory).
    pub fn persist_metadata(&self) {
        if self.store().is_none() {
            return;
        }
        let _guard = SAVING.lock();
        if let Err(e) = metadata::save(&self.config.data_dir, &self.snapshot()) {
            tracing::error!(
                "cannot save metadata to {}: {e}",
                self.config.data_dir.display()
            );
        }
    }

    /// Opens storage under the data directory and restores what a previous run left.
    pub fn recover(self: &Arc<Self>) -> std::io::Result<()> {
        let snapshot = metadata::load(&self.config.data_dir)?;
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
        self.persist_metadata();
        Ok(())
    }
}
