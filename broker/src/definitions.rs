//! Changes to the node's definitions — vhosts, users, permissions, topic permissions,
//! policies, operator policies and runtime parameters — as commands.
//!
//! A caller (the management API, a finished shovel) validates first and builds a [`Change`];
//! [`Broker::change`] then applies it here on a single node, or proposes it to the cluster's
//! metadata group, which applies it on every node once a majority has it (see
//! [`crate::cluster::raft`]). [`Broker::apply_change`] is the only place these definitions
//! are mutated, and it is deterministic: every node that applies the same commands in the
//! same order ends with the same definitions. Commands carry states, not deltas ("user U has
//! hash H and tags T"), so applying one twice changes nothing.
//!
//! In a cluster, exchanges, queues (with the node each lives on) and bindings are
//! definitions too ([`Change::DeclareQueue`] and the rest): every node knows all of them, so
//! any node routes any publish ([`crate::remote`] forwards what reaches queues elsewhere).
//! Exclusive queues stay on their connection's node, outside the definitions.

use std::sync::{Arc, Weak};

use serde::{Deserialize, Serialize};

use crate::auth::User;
use crate::broker::{Broker, VhostMetadata};
use crate::exchange::{Destination, ExchangeKind};
use crate::limits::{Limits, UserLimitsDef, VhostLimitsDef};
use crate::store::metadata::{
    self, BindingDef, ParameterDef, PermissionDef, PolicyDef, TopicPermissionDef, UserDef,
};
use crate::vhost::{QueueSpec, RemoteQueue, Vhost};

/// An exchange as the cluster knows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExchangeRecord {
    pub vhost: String,
    pub name: String,
    pub kind: String,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    /// The arguments table, encoded as the metadata store encodes it.
    pub arguments: String,
}

/// A queue as the cluster knows it: where it lives and how it was declared.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct QueueRecord {
    pub vhost: String,
    pub name: String,
    pub durable: bool,
    pub auto_delete: bool,
    pub arguments: String,
    /// The node the queue lives on (its messages and consumers are there).
    pub node: String,
    /// Exclusive to a connection on its node (known cluster-wide so that other nodes route
    /// to it; gone with the connection).
    #[serde(default)]
    pub exclusive: bool,
    /// A replicated queue: its Raft group and members (`node` is then its first member).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<crate::replicated::Replicas>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct VhostDef {
    pub name: String,
    pub description: String,
    pub tags: Vec<String>,
    pub default_queue_type: Option<String>,
}

/// Every definition, as a snapshot of the metadata group carries it.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Definitions {
    pub vhosts: Vec<VhostDef>,
    pub users: Vec<UserDef>,
    pub permissions: Vec<PermissionDef>,
    pub topic_permissions: Vec<TopicPermissionDef>,
    pub policies: Vec<PolicyDef>,
    pub parameters: Vec<ParameterDef>,
    /// Vhosts' and users' limits (absent in snapshots of nodes older than limits).
    #[serde(default)]
    pub vhost_limits: Vec<VhostLimitsDef>,
    #[serde(default)]
    pub user_limits: Vec<UserLimitsDef>,
    /// Exchanges, queues and bindings (absent in snapshots of nodes older than clustered
    /// queues).
    #[serde(default)]
    pub exchanges: Vec<ExchangeRecord>,
    #[serde(default)]
    pub queues: Vec<QueueRecord>,
    #[serde(default)]
    pub bindings: Vec<BindingDef>,
}

/// One validated change.
#[derive(Debug, Serialize, Deserialize)]
pub enum Change {
    PutVhost(VhostDef),
    DeleteVhost(String),
    PutUser(UserDef),
    DeleteUser(String),
    SetPermissions(PermissionDef),
    ClearPermissions {
        user: String,
        vhost: String,
    },
    SetTopicPermissions(TopicPermissionDef),
    /// All of a user's topic permissions in a vhost.
    ClearTopicPermissions {
        user: String,
        vhost: String,
    },
    PutPolicy(PolicyDef),
    DeletePolicy {
        vhost: String,
        name: String,
        operator: bool,
    },
    PutParameter(ParameterDef),
    DeleteParameter {
        component: String,
        vhost: String,
        name: String,
    },
    /// One limit of a vhost (`max-connections`, `max-queues`) is `value`.
    SetVhostLimit {
        vhost: String,
        name: String,
        value: i64,
    },
    ClearVhostLimit {
        vhost: String,
        name: String,
    },
    /// A vhost's limits are exactly these (an import).
    SetVhostLimits(VhostLimitsDef),
    /// One limit of a user (`max-connections`, `max-channels`) is `value`.
    SetUserLimit {
        user: String,
        name: String,
        value: i64,
    },
    ClearUserLimit {
        user: String,
        name: String,
    },
    /// A user's limits are exactly these (an import).
    SetUserLimits(UserLimitsDef),
    /// Replace every definition (a new metadata group takes its creator's).
    Install(Definitions),
    /// An exchange exists (declared on any node).
    DeclareExchange(ExchangeRecord),
    /// The exchange is gone, with every binding from or to it.
    DeleteExchange {
        vhost: String,
        name: String,
    },
    /// A queue exists on `node` (nothing changes if one by that name exists already).
    DeclareQueue(QueueRecord),
    /// The classic queue by that name becomes the replicated queue the record describes,
    /// keeping its bindings (a policy's `ha-mode` came to match it); its node moves its
    /// messages over. Nothing changes if it is replicated already.
    ReplicateQueue(QueueRecord),
    /// The queue is gone, with every binding to it.
    DeleteQueue {
        vhost: String,
        name: String,
    },
    Bind(BindingDef),
    Unbind(BindingDef),
}

impl Change {
    /// Exchanges, queues and bindings: each node's own store saves these as they are applied
    /// (its journal), so they need no full metadata save.
    pub fn is_topology(&self) -> bool {
        matches!(
            self,
            Change::DeclareExchange(_)
                | Change::DeleteExchange { .. }
                | Change::DeclareQueue(_)
                | Change::ReplicateQueue(_)
                | Change::DeleteQueue { .. }
                | Change::Bind(_)
                | Change::Unbind(_)
        )
    }
}

/// Pre-declared exchanges (every node has them) and federation's internal exchanges (each
/// node its own) are not cluster definitions.
fn replicated_exchange(e: &crate::exchange::Exchange) -> bool {
    !e.name.is_empty() && !e.name.starts_with("amq.") && e.kind != ExchangeKind::FederationUpstream
}

fn destination(b: &BindingDef) -> Destination {
    if b.destination_is_queue {
        Destination::Queue(b.destination.clone())
    } else {
        Destination::Exchange(b.destination.clone())
    }
}

/// What applying a change gave: for a put, whether the object is new; for a delete, whether
/// it existed. An error is a change that became invalid between validation and commit (the
/// vhost it names was deleted meanwhile).
pub type Outcome = Result<bool, String>;

/// Why [`Broker::change`] did not apply a change.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// Refused when applied (HTTP 400).
    #[error("{0}")]
    Refused(String),
    /// The cluster could not commit it (HTTP 503, AMQP 541): no majority, no leader.
    #[error("{0}")]
    Unavailable(String),
}

fn vhost_def(name: &str, m: &VhostMetadata) -> VhostDef {
    VhostDef {
        name: name.to_owned(),
        description: m.description.clone(),
        tags: m.tags.clone(),
        default_queue_type: m.default_queue_type.clone(),
    }
}

impl Broker {
    /// Applies `change` on this node, or (clustered) on every node once committed; returns
    /// its outcome as applied here.
    /// True on a node whose definitions are the cluster's (its metadata group started).
    pub fn clustered(&self) -> bool {
        self.cluster().and_then(|c| c.metadata()).is_some()
    }

    pub async fn change(&self, change: Change) -> Result<bool, ChangeError> {
        let Some(meta) = self.cluster().and_then(|c| c.metadata()).cloned() else {
            return self.apply_change(change).map_err(ChangeError::Refused);
        };
        let command = serde_json::to_vec(&change)
            .map_err(|e| ChangeError::Refused(format!("unencodable change: {e}")))?;
        let outcome = meta
            .propose(command)
            .await
            .map_err(ChangeError::Unavailable)?;
        serde_json::from_str::<Outcome>(&outcome)
            .map_err(|e| ChangeError::Refused(format!("undecodable outcome {outcome}: {e}")))?
            .map_err(ChangeError::Refused)
    }

    /// Applies one change to this node's definitions (the only place they change).
    pub fn apply_change(&self, change: Change) -> Outcome {
        let need_vhost = |v: &str| {
            self.vhost(v)
                .ok_or_else(|| format!("vhost '{v}' not found"))
        };
        match change {
            Change::PutVhost(d) => {
                let created = self.vhost(&d.name).is_none();
                self.add_vhost(&d.name);
                self.set_vhost_metadata(
                    &d.name,
                    VhostMetadata {
                        description: d.description,
                        tags: d.tags,
                        default_queue_type: d.default_queue_type,
                    },
                );
                Ok(created)
            }
            Change::DeleteVhost(name) => Ok(self.delete_vhost(&name)),
            Change::PutUser(u) => {
                let created = self.access.user(&u.name).is_none();
                self.access.put_user(User {
                    name: u.name,
                    password_hash: u.password_hash,
                    tags: u.tags,
                });
                Ok(created)
            }
            Change::DeleteUser(name) => Ok(self.access.delete_user(&name)),
            Change::SetPermissions(p) => {
                need_vhost(&p.vhost)?;
                if self.access.user(&p.user).is_none() {
                    return Err(format!("user '{}' not found", p.user));
                }
                let created = self.access.vhost_permission(&p.user, &p.vhost).is_none();
                self.access
                    .set_permissions(&p.user, &p.vhost, &p.configure, &p.write, &p.read)?;
                Ok(created)
            }
            Change::ClearPermissions { user, vhost } => {
                let existed = self.access.vhost_permission(&user, &vhost).is_some();
                self.access.clear_permissions(&user, &vhost);
                Ok(existed)
            }
            Change::SetTopicPermissions(t) => {
                need_vhost(&t.vhost)?;
                if self.access.user(&t.user).is_none() {
                    return Err(format!("user '{}' not found", t.user));
                }
                let created = !self
                    .access
                    .topic_permissions()
                    .iter()
                    .any(|(u, v, x)| *u == t.user && *v == t.vhost && x.exchange == t.exchange);
                self.access.set_topic_permissions(
                    &t.user,
                    &t.vhost,
                    &t.exchange,
                    &t.write,
                    &t.read,
                )?;
                Ok(created)
            }
            Change::ClearTopicPermissions { user, vhost } => {
                Ok(self.access.clear_topic_permissions(&user, &vhost, None))
            }
            Change::PutPolicy(p) => {
                let v = need_vhost(&p.vhost)?;
                let policy = crate::policy::parse_policy(&p.name, &p.vhost, &p.body, p.operator)?;
                let created = !v.policies(p.operator).iter().any(|x| x.name == p.name);
                v.put_policy(policy, p.operator);
                crate::mirroring::policy_changed(self, &p.vhost);
                Ok(created)
            }
            Change::DeletePolicy {
                vhost,
                name,
                operator,
            } => {
                let existed =
                    (self.vhost(&vhost)).is_some_and(|v| v.delete_policy(&name, operator));
                crate::mirroring::policy_changed(self, &vhost);
                Ok(existed)
            }
            Change::PutParameter(p) => {
                need_vhost(&p.vhost)?;
                self.parameters
                    .put(&p.component, &p.vhost, &p.name, p.value)
            }
            Change::DeleteParameter {
                component,
                vhost,
                name,
            } => Ok(self.parameters.delete(&component, &vhost, &name)),
            Change::SetVhostLimit { vhost, name, value } => {
                Ok(need_vhost(&vhost)?.set_limit(&name, value))
            }
            Change::ClearVhostLimit { vhost, name } => {
                Ok(self.vhost(&vhost).is_some_and(|v| v.clear_limit(&name)))
            }
            Change::SetVhostLimits(d) => {
                need_vhost(&d.vhost)?.set_limits(d.limits);
                Ok(false)
            }
            Change::SetUserLimit { user, name, value } => {
                if self.access.user(&user).is_none() {
                    return Err(format!("user '{user}' not found"));
                }
                let mut limits = self.access.user_limits(&user);
                let created = limits.insert(name, value).is_none();
                self.access.set_user_limits(&user, limits);
                Ok(created)
            }
            Change::ClearUserLimit { user, name } => {
                let mut limits = self.access.user_limits(&user);
                let existed = limits.remove(&name).is_some();
                self.access.set_user_limits(&user, limits);
                Ok(existed)
            }
            Change::SetUserLimits(d) => {
                if self.access.user(&d.user).is_none() {
                    return Err(format!("user '{}' not found", d.user));
                }
                self.access.set_user_limits(&d.user, d.limits);
                Ok(false)
            }
            Change::Install(d) => {
                self.install_definitions(d);
                Ok(false)
            }
            Change::DeclareExchange(e) => {
                let v = need_vhost(&e.vhost)?;
                let created = v.exchange(&e.name).is_none();
                let args = metadata::decode_table(&e.arguments).unwrap_or_default();
                v.declare_exchange(
                    &e.name,
                    &e.kind,
                    false,
                    e.durable,
                    e.auto_delete,
                    e.internal,
                    &args,
                )
                .map_err(|x| x.text)?;
                Ok(created)
            }
            Change::DeleteExchange { vhost, name } => {
                let v = need_vhost(&vhost)?;
                let existed = v.exchange(&name).is_some();
                v.delete_exchange(&name, false).map_err(|x| x.text)?;
                Ok(existed)
            }
            Change::DeclareQueue(r) => {
                let v = need_vhost(&r.vhost)?;
                self.declare_queue_record(&v, r)
            }
            Change::ReplicateQueue(r) => {
                let v = need_vhost(&r.vhost)?;
                self.replicate_queue_record(&v, r)
            }
            Change::DeleteQueue { vhost, name } => {
                let v = need_vhost(&vhost)?;
                if let Some(q) = v.remove_replicated_queue(&name) {
                    stop_replica(q);
                    return Ok(true);
                }
                Ok(v.remove_queue_here(&name).is_some() || v.remove_remote_queue(&name))
            }
            Change::Bind(b) => {
                let v = need_vhost(&b.vhost)?;
                let args = metadata::decode_table(&b.arguments).unwrap_or_default();
                v.bind(&b.source, destination(&b), &b.routing_key, &args)
                    .map_err(|x| x.text)?;
                Ok(true)
            }
            Change::Unbind(b) => {
                let v = need_vhost(&b.vhost)?;
                let args = metadata::decode_table(&b.arguments).unwrap_or_default();
                v.unbind(&b.source, destination(&b), &b.routing_key, &args)
                    .map_err(|x| x.text)?;
                Ok(true)
            }
        }
    }

    /// A queue the cluster declared: created here if it lives here, else known as remote.
    /// Nothing changes if a queue by that name exists already (the first declare won).
    fn declare_queue_record(&self, v: &Vhost, r: QueueRecord) -> Outcome {
        if v.has_queue(&r.name) {
            return Ok(false);
        }
        let args = metadata::decode_table(&r.arguments).unwrap_or_default();
        if let Some(replicas) = r.replicas.clone() {
            let q = self.replicated_queue_of(&r, args, replicas);
            if !v.add_replicated_queue(q.clone()) {
                return Ok(false);
            }
            start_replica(q);
            return Ok(true);
        }
        if r.node == self.node_name() && r.exclusive {
            // An exclusive queue is created by its connection before it is proposed: missing
            // here, its connection closed (a removal follows) or this node restarted since.
            self.forget_stale_queue(&r.vhost, &r.name);
            return Ok(false);
        }
        if r.node == self.node_name() {
            v.declare_queue(QueueSpec {
                name: &r.name,
                durable: r.durable,
                exclusive_owner: None,
                auto_delete: r.auto_delete,
                arguments: &args,
            })
            .map(|(_, created)| created)
            .map_err(|e| e.text)
        } else {
            Ok(v.add_remote_queue(RemoteQueue {
                name: r.name,
                node: r.node,
                durable: r.durable,
                auto_delete: r.auto_delete,
                exclusive: r.exclusive,
                arguments: args,
            }))
        }
    }

    /// A [`Change::ReplicateQueue`]: the classic queue `r.name` becomes replicated; if it
    /// lived here, its messages are moved into the new queue (see [`crate::mirroring`]).
    fn replicate_queue_record(&self, v: &Arc<Vhost>, r: QueueRecord) -> Outcome {
        let Some(replicas) = r.replicas.clone() else {
            return Err(format!("queue '{}' has no replicas to become", r.name));
        };
        let args = metadata::decode_table(&r.arguments).unwrap_or_default();
        let q = self.replicated_queue_of(&r, args, replicas);
        match v.replace_with_replicated(q.clone()) {
            crate::vhost::Replaced::Already => return Ok(false),
            crate::vhost::Replaced::Elsewhere => start_replica(q),
            crate::vhost::Replaced::Here(classic) => {
                start_replica(q.clone());
                crate::mirroring::move_messages(v.clone(), classic, q);
            }
        }
        Ok(true)
    }

    fn replicated_queue_of(
        &self,
        r: &QueueRecord,
        args: amq_protocol::types::FieldTable,
        replicas: crate::replicated::Replicas,
    ) -> Arc<crate::replicated::ReplicatedQueue> {
        crate::replicated::ReplicatedQueue::new(
            &r.vhost,
            &r.name,
            r.durable,
            r.auto_delete,
            args,
            replicas,
            &self.node_name(),
            self.cluster().map(Arc::downgrade).unwrap_or_default(),
        )
    }

    /// Proposes removing the exclusive queue `vhost`/`name` of this node that no longer
    /// exists (retrying while the metadata group has no leader, as at start-up).
    fn forget_stale_queue(&self, vhost: &str, name: &str) {
        let (Some(me), Ok(rt)) = (
            self.me.get().and_then(|w| w.upgrade()),
            tokio::runtime::Handle::try_current(),
        ) else {
            return;
        };
        let (vhost, name) = (vhost.to_owned(), name.to_owned());
        rt.spawn(async move {
            for _ in 0..60 {
                let exists = me.vhost(&vhost).is_some_and(|v| v.queue(&name).is_some());
                let known = me
                    .vhost(&vhost)
                    .is_some_and(|v| v.remote_queue(&name).is_some());
                if exists || !me.clustered() {
                    return;
                }
                let change = Change::DeleteQueue {
                    vhost: vhost.clone(),
                    name: name.clone(),
                };
                match me.change(change).await {
                    Ok(_) => return,
                    Err(e) => {
                        tracing::debug!(queue = %name, known, "stale exclusive queue not removed yet: {e}");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    }
                }
            }
        });
    }

    /// This vhost's exchanges, queues and bindings as cluster definitions.
    fn topology(&self, name: &str, v: &Vhost, d: &mut Definitions) {
        let me = self.node_name();
        let mut exchanges = v.exchanges();
        exchanges.sort_by(|a, b| a.name.cmp(&b.name));
        for e in &exchanges {
            if replicated_exchange(e) {
                d.exchanges.push(ExchangeRecord {
                    vhost: name.to_owned(),
                    name: e.name.clone(),
                    kind: e.kind.as_str().into(),
                    durable: e.durable,
                    auto_delete: e.auto_delete,
                    internal: e.internal,
                    arguments: metadata::encode_table(&e.arguments),
                });
            }
            if e.name.is_empty() || e.kind == ExchangeKind::FederationUpstream {
                continue;
            }
            for b in e.bindings.read().list() {
                d.bindings
                    .push(crate::persistence::binding_def(name, &e.name, b));
            }
        }
        let mut queues: Vec<QueueRecord> = (v.queues().iter())
            .map(|q| QueueRecord {
                vhost: name.to_owned(),
                name: q.name.clone(),
                durable: q.durable,
                auto_delete: q.auto_delete,
                arguments: metadata::encode_table(&q.arguments),
                node: me.clone(),
                exclusive: q.exclusive_owner.is_some(),
                replicas: None,
            })
            .chain(v.remote_queues().into_iter().map(|r| QueueRecord {
                vhost: name.to_owned(),
                name: r.name,
                durable: r.durable,
                auto_delete: r.auto_delete,
                arguments: metadata::encode_table(&r.arguments),
                node: r.node,
                exclusive: r.exclusive,
                replicas: None,
            }))
            .chain(v.replicated_queues().into_iter().map(|q| QueueRecord {
                vhost: name.to_owned(),
                name: q.name.clone(),
                durable: q.durable,
                auto_delete: q.auto_delete,
                arguments: metadata::encode_table(&q.arguments),
                node: q.members().first().cloned().unwrap_or_default(),
                exclusive: false,
                replicas: Some(q.replicas.clone()),
            }))
            .collect();
        queues.sort_by(|a, b| a.name.cmp(&b.name));
        d.queues.extend(queues);
    }

    /// Makes this node's exchanges, remote queues and bindings exactly the cluster's. Local
    /// queues are created where missing but never removed here: a snapshot may predate a
    /// queue this node recovered from its own store (its later declare is replayed after),
    /// and removing it would lose its messages.
    fn install_topology(
        &self,
        exchanges: Vec<ExchangeRecord>,
        queues: Vec<QueueRecord>,
        bindings: Vec<BindingDef>,
    ) {
        let me = self.node_name();
        for name in self.vhost_names() {
            let Some(v) = self.vhost(&name) else { continue };
            for e in v.exchanges() {
                if replicated_exchange(&e)
                    && !exchanges
                        .iter()
                        .any(|x| x.vhost == name && x.name == e.name)
                {
                    let _ = v.delete_exchange(&e.name, false);
                }
            }
            for e in v.exchanges() {
                if e.name.is_empty() || e.kind == ExchangeKind::FederationUpstream {
                    continue;
                }
                let stale: Vec<crate::exchange::Binding> = (e.bindings.read().list().iter())
                    .filter(|b| {
                        let def = crate::persistence::binding_def(&name, &e.name, b);
                        !bindings.contains(&def)
                    })
                    .cloned()
                    .collect();
                for b in stale {
                    let _ = v.unbind(&e.name, b.destination, &b.routing_key, &b.arguments);
                }
            }
            let remote: Vec<RemoteQueue> = (queues.iter())
                .filter(|q| {
                    q.vhost == name
                        && q.node != me
                        && q.replicas.is_none()
                        && v.queue(&q.name).is_none()
                })
                .map(|q| RemoteQueue {
                    name: q.name.clone(),
                    node: q.node.clone(),
                    durable: q.durable,
                    auto_delete: q.auto_delete,
                    exclusive: q.exclusive,
                    arguments: metadata::decode_table(&q.arguments).unwrap_or_default(),
                })
                .collect();
            v.set_remote_queues(remote);
            for q in v.replicated_queues() {
                let kept = queues.iter().any(|r| {
                    r.vhost == name && r.name == q.name && r.replicas.as_ref() == Some(&q.replicas)
                });
                if !kept && let Some(q) = v.remove_replicated_queue(&q.name) {
                    stop_replica(q);
                }
            }
        }
        let changes = (exchanges.into_iter().map(Change::DeclareExchange))
            .chain(
                queues
                    .into_iter()
                    .filter(|q| q.node == me || q.replicas.is_some())
                    .map(|q| {
                        // A replicated queue that is still a classic queue here: this node
                        // restarted while moving its messages over (or missed the change).
                        let classic_here = q.replicas.is_some()
                            && self
                                .vhost(&q.vhost)
                                .is_some_and(|v| v.queue(&q.name).is_some());
                        if classic_here {
                            Change::ReplicateQueue(q)
                        } else {
                            Change::DeclareQueue(q)
                        }
                    }),
            )
            .chain(bindings.into_iter().map(Change::Bind));
        for c in changes {
            if let Err(e) = self.apply_change(c) {
                tracing::error!("installed definition skipped: {e}");
            }
        }
    }

    /// Every definition on this node.
    pub fn definitions(&self) -> Definitions {
        let mut names = self.vhost_names();
        names.sort();
        let mut d = Definitions::default();
        for name in &names {
            d.vhosts.push(vhost_def(name, &self.vhost_metadata(name)));
            let Some(v) = self.vhost(name) else { continue };
            if self.cluster().is_some() {
                self.topology(name, &v, &mut d);
            }
            for operator in [false, true] {
                for p in v.policies(operator) {
                    d.policies
                        .push(crate::persistence::policy_def(name, &p, operator));
                }
            }
        }
        let snap = self.metadata_snapshot();
        d.users = snap.users;
        d.permissions = snap.permissions;
        d.topic_permissions = snap.topic_permissions;
        d.parameters = snap.parameters;
        d.vhost_limits = snap.vhost_limits;
        d.user_limits = snap.user_limits;
        d
    }

    /// Makes this node's definitions exactly `d` (what is not in it is deleted).
    pub fn install_definitions(&self, mut d: Definitions) {
        let topology = (
            std::mem::take(&mut d.exchanges),
            std::mem::take(&mut d.queues),
            std::mem::take(&mut d.bindings),
        );
        let keep_vhosts: Vec<&str> = d.vhosts.iter().map(|v| v.name.as_str()).collect();
        for name in self.vhost_names() {
            if !keep_vhosts.contains(&name.as_str()) {
                self.delete_vhost(&name);
            }
        }
        for v in d.vhosts {
            let _ = self.apply_change(Change::PutVhost(v));
        }
        for u in self.access.users() {
            if !d.users.iter().any(|x| x.name == u.name) {
                self.access.delete_user(&u.name);
            }
        }
        for name in self.vhost_names() {
            let Some(v) = self.vhost(&name) else { continue };
            let limits = (d.vhost_limits.iter())
                .find(|l| l.vhost == name)
                .map(|l| l.limits.clone());
            v.set_limits(limits.unwrap_or_default());
        }
        for (user, _) in self.access.all_user_limits() {
            self.access.set_user_limits(&user, Limits::new());
        }
        for (user, vhost, _) in self.access.permissions() {
            if !d
                .permissions
                .iter()
                .any(|p| p.user == user && p.vhost == vhost)
            {
                self.access.clear_permissions(&user, &vhost);
            }
        }
        for (user, vhost, t) in self.access.topic_permissions() {
            if !d
                .topic_permissions
                .iter()
                .any(|p| p.user == user && p.vhost == vhost && p.exchange == t.exchange)
            {
                self.access
                    .clear_topic_permissions(&user, &vhost, Some(&t.exchange));
            }
        }
        for name in self.vhost_names() {
            let Some(v) = self.vhost(&name) else { continue };
            for operator in [false, true] {
                for p in v.policies(operator) {
                    if !d
                        .policies
                        .iter()
                        .any(|x| x.vhost == name && x.name == p.name && x.operator == operator)
                    {
                        v.delete_policy(&p.name, operator);
                    }
                }
            }
        }
        for p in self.parameters.list(None, None) {
            if !d
                .parameters
                .iter()
                .any(|x| x.component == p.component && x.vhost == p.vhost && x.name == p.name)
            {
                self.parameters.delete(&p.component, &p.vhost, &p.name);
            }
        }
        let changes = (d.users.into_iter().map(Change::PutUser))
            .chain(d.permissions.into_iter().map(Change::SetPermissions))
            .chain(
                d.topic_permissions
                    .into_iter()
                    .map(Change::SetTopicPermissions),
            )
            .chain(d.policies.into_iter().map(Change::PutPolicy))
            .chain(d.parameters.into_iter().map(Change::PutParameter))
            .chain(d.user_limits.into_iter().map(Change::SetUserLimits));
        for c in changes {
            if let Err(e) = self.apply_change(c) {
                tracing::error!("installed definition skipped: {e}");
            }
        }
        if self.cluster().is_some() {
            let (exchanges, queues, bindings) = topology;
            self.install_topology(exchanges, queues, bindings);
        }
    }
}

/// Starts this node's replica (or learner) of a replicated queue (in the background).
fn start_replica(q: Arc<crate::replicated::ReplicatedQueue>) {
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(async move {
            if let Err(e) = q.clone().start().await {
                tracing::error!(queue = %q.name, "the replica of this queue did not start: {e}");
            }
        });
    }
}

/// Stops this node's replica of a deleted replicated queue (in the background).
fn stop_replica(q: Arc<crate::replicated::ReplicatedQueue>) {
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(async move { q.stop().await });
    }
}

/// The broker's definitions as the metadata group's state.
pub struct Replicated(pub Weak<Broker>);

impl Replicated {
    fn broker(&self) -> Option<Arc<Broker>> {
        self.0.upgrade()
    }
}

/// How [`Broker::sync_default_user`] changed the stored default user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultUserSync {
    /// It already had the configured password.
    Unchanged,
    /// Its password was set to the configured one.
    PasswordSet,
    /// It did not exist: created as administrator with every permission on the default vhost.
    Created,
}

impl Broker {
    /// `default-user-sync`: makes the stored default user match the configured name and
    /// password (a rotated Secret). Changes go through the metadata group when clustered,
    /// as a `PUT /api/users` would; call it once the definitions are loaded (caught up).
    pub async fn sync_default_user(&self) -> Result<DefaultUserSync, ChangeError> {
        let (name, pass) = (&self.config.default_user, &self.config.default_pass);
        let current = self.access.user(name);
        if current
            .as_ref()
            .is_some_and(|u| crate::auth::verify_password(&u.password_hash, pass))
        {
            return Ok(DefaultUserSync::Unchanged);
        }
        let tags = current
            .as_ref()
            .map(|u| u.tags.clone())
            .unwrap_or_else(|| vec!["administrator".to_owned()]);
        let user = |password_hash: String| {
            Change::PutUser(UserDef {
                name: name.clone(),
                password_hash,
                tags: tags.clone(),
            })
        };
        let how = if current.is_some() {
            self.change(user(crate::auth::hash_password(pass))).await?;
            DefaultUserSync::PasswordSet
        } else {
            // A new user gets its permissions before its password: one that can log in has
            // them already (an empty hash matches no password).
            self.change(user(String::new())).await?;
            self.change(Change::SetPermissions(PermissionDef {
                user: name.clone(),
                vhost: self.config.default_vhost.clone(),
                configure: ".*".into(),
                write: ".*".into(),
                read: ".*".into(),
            }))
            .await?;
            self.change(user(crate::auth::hash_password(pass))).await?;
            DefaultUserSync::Created
        };
        if !self.clustered() {
            // Clustered, applying the change saved it; alone, save it as the API's changes are.
            let _ = crate::persistence::off_the_runtime(|| self.persist_metadata());
        }
        Ok(how)
    }
}

/// Runs [`Broker::sync_default_user`] once this node's definitions are the cluster's (when
/// clustered: caught up with the metadata group), retrying while no majority answers.
pub async fn keep_default_user_synced(broker: Arc<Broker>) {
    let clustered = !broker.config.cluster_peers.is_empty();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(600);
    loop {
        let ready = !clustered
            || broker
                .cluster()
                .and_then(|c| c.metadata())
                .is_some_and(|m| m.caught_up());
        if ready {
            match broker.sync_default_user().await {
                Ok(DefaultUserSync::Unchanged) => return,
                Ok(how) => {
                    tracing::warn!(user = %broker.config.default_user, ?how, "default user synced with the configuration (default-user-sync)");
                    return;
                }
                Err(ChangeError::Refused(e)) => {
                    tracing::error!(user = %broker.config.default_user, "default user not synced: {e}");
                    return;
                }
                Err(ChangeError::Unavailable(e)) => {
                    tracing::debug!("default user not synced yet: {e}");
                }
            }
        }
        if tokio::time::Instant::now() > deadline {
            tracing::error!(user = %broker.config.default_user, "default user not synced within 10 minutes (default-user-sync): the cluster's metadata has no majority");
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

impl crate::cluster::raft::Replicated for Replicated {
    fn apply(&self, command: &[u8]) -> String {
        let outcome: Outcome = match (self.broker(), serde_json::from_slice::<Change>(command)) {
            (Some(b), Ok(c)) => {
                let topology = c.is_topology();
                let o = b.apply_change(c);
                // A failed save is logged and raises the disk_io alarm; the change itself is
                // kept by the metadata group's log, which a restart replays.
                if !topology {
                    let _ = crate::persistence::off_the_runtime(|| b.persist_metadata());
                }
                o
            }
            (None, _) => Err("node is stopping".into()),
            (_, Err(e)) => Err(format!("undecodable change: {e}")),
        };
        serde_json::to_string(&outcome).unwrap_or_default()
    }

    fn snapshot(&self) -> Box<dyn FnOnce() -> String + Send + Sync> {
        let d = self.broker().map(|b| b.definitions()).unwrap_or_default();
        Box::new(move || serde_json::to_string(&d).unwrap_or_default())
    }

    fn install(&self, snapshot: &str) -> Result<(), String> {
        let d: Definitions = serde_json::from_str(snapshot).map_err(|e| e.to_string())?;
        let b = self.broker().ok_or("node is stopping")?;
        b.install_definitions(d);
        let _ = crate::persistence::off_the_runtime(|| b.persist_metadata());
        Ok(())
    }

    fn install_command(&self) -> Vec<u8> {
        let d = self.broker().map(|b| b.definitions()).unwrap_or_default();
        serde_json::to_vec(&Change::Install(d)).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn set_vhost_limit(vhost: &str, name: &str, value: i64) -> Change {
        Change::SetVhostLimit {
            vhost: vhost.into(),
            name: name.into(),
            value,
        }
    }

    #[test]
    fn limits_are_definitions_applied_idempotently_and_installed_exactly() {
        let b = Broker::new(Config::default());
        assert_eq!(
            b.apply_change(set_vhost_limit("/", "max-queues", 3)),
            Ok(true)
        );
        // The same state twice changes nothing.
        assert_eq!(
            b.apply_change(set_vhost_limit("/", "max-queues", 3)),
            Ok(false)
        );
        assert!(
            b.apply_change(set_vhost_limit("nosuch", "max-queues", 3))
                .is_err()
        );
        let user_limit = || Change::SetUserLimit {
            user: "guest".into(),
            name: "max-channels".into(),
            value: 5,
        };
        assert_eq!(b.apply_change(user_limit()), Ok(true));
        assert_eq!(b.apply_change(user_limit()), Ok(false));

        // Through a Raft log: commands survive their JSON encoding.
        let d = b.definitions();
        let encoded = serde_json::to_string(&Change::Install(d)).unwrap();
        let other = Broker::new(Config::default());
        other
            .apply_change(set_vhost_limit("/", "max-connections", 1))
            .unwrap();
        other
            .apply_change(serde_json::from_str(&encoded).unwrap())
            .unwrap();
        // Installed exactly: the limit not in the definitions is gone.
        let v = other.vhost("/").unwrap();
        assert_eq!(v.limits(), Limits::from([("max-queues".into(), 3)]));
        assert_eq!(v.limit("max-queues"), Some(3));
        assert_eq!(
            other.access.user_limits("guest"),
            Limits::from([("max-channels".into(), 5)])
        );
        // An older snapshot, without limits, still decodes.
        let old: Definitions = serde_json::from_str(
            r#"{"vhosts":[],"users":[],"permissions":[],"topic_permissions":[],"policies":[],"parameters":[]}"#,
        )
        .unwrap();
        assert!(old.vhost_limits.is_empty() && old.user_limits.is_empty());

        // Cleared, and gone with their vhost or user.
        assert_eq!(
            b.apply_change(Change::ClearVhostLimit {
                vhost: "/".into(),
                name: "max-queues".into()
            }),
            Ok(true)
        );
        assert!(b.vhost("/").unwrap().limits().is_empty());
        b.apply_change(Change::DeleteUser("guest".into())).unwrap();
        assert!(b.access.all_user_limits().is_empty());
    }

    #[test]
    fn the_queue_limit_is_checked_when_a_queue_is_created() {
        let b = Broker::new(Config::default());
        b.apply_change(set_vhost_limit("/", "max-queues", 1))
            .unwrap();
        let v = b.vhost("/").unwrap();
        let args = amq_protocol::types::FieldTable::default();
        let spec = |name| crate::vhost::QueueSpec {
            name,
            durable: false,
            exclusive_owner: None,
            auto_delete: false,
            arguments: &args,
        };
        v.declare_queue(spec("a")).unwrap();
        v.declare_queue(spec("a")).unwrap();
        let e = v.declare_queue(spec("b")).unwrap_err();
        assert_eq!(e.code, crate::error::code::PRECONDITION_FAILED);
        assert_eq!(
            e.text,
            "cannot declare queue 'b': queue limit in vhost '/' (1) is reached"
        );
    }
}
