//! Controllers for the resources that configure a broker through its management HTTP API:
//! `Policy`, `Federation`, `Shovel`, `Vhost`, `User`, `Permission`, `TopicPermission`,
//! `Queue`, `Exchange`, `Binding` and `OperatorPolicy`.
//! One generic reconcile does the work; each kind says where its object lives on the broker,
//! how its body is made and what to report.
//!
//! The broker is found through a `rabbitClusterReference` (the cluster's client Service and
//! default-user Secret, or the cluster's `warren.dev/management-uri` annotation) or a
//! `connectionSecret` (any broker, a stock RabbitMQ included).

pub mod binding;
pub mod exchange;
pub mod federation;
pub mod operator_policy;
pub mod permission;
pub mod policy;
pub mod queue;
pub mod shovel;
pub mod topic_permission;
pub mod user;
pub mod vhost;

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Patch, PatchParams, PostParams};
use kube::core::{NamespaceResourceScope, PartialObjectMeta};
use kube::runtime::WatchStreamExt;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{Event, EventType};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::cluster::build;
use crate::cluster::controller::MANAGEMENT_URI_ANNOTATION;
use crate::conditions;
use crate::crd::common::{ConnectionSecretReference, DeletionPolicy, RabbitClusterReference};
use crate::crd::{RabbitCluster, User};
use crate::management::{ManagementClient, ManagementError, segment};
pub use crate::reconcile::{Context, Error};
use crate::security;
use crate::watch::{Triggers, scoped, trimmed_watch};

/// Annotation on a RabbitCluster listing the namespaces (comma-separated, or `*`) whose
/// topology resources (Policy, Vhost, User, …) may configure it.
pub const ALLOWED_NAMESPACES_ANNOTATION: &str = "warren.dev/topology-allowed-namespaces";

/// Where a resource's broker is.
pub enum Target<'a> {
    Cluster(&'a RabbitClusterReference),
    Secret(&'a ConnectionSecretReference),
    /// Neither or both: the schema refuses this, but old objects may predate a rule.
    Invalid,
}

/// What a kind of topology resource contributes to the generic controller.
pub trait Topology:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Clone
    + Serialize
    + DeserializeOwned
    + Debug
    + Send
    + Sync
    + 'static
{
    /// Controller name in metrics and logs.
    const CONTROLLER: &'static str;
    /// Finalizer that removes the object from the broker.
    const FINALIZER: &'static str;
    /// What the object is called on the broker, for messages ("policy", "federation upstream").
    const NOUN: &'static str;

    fn target(&self) -> Target<'_>;
    fn deletion_policy(&self) -> DeletionPolicy;
    /// Name on the broker: `spec.name`, or `metadata.name`.
    fn broker_name(&self) -> String;
    /// Management API path of the object.
    fn path(&self) -> String;
    /// The spec field naming `uri_secret`, for messages.
    const SECRET_FIELD: &'static str = "spec.uriSecret";
    /// A Secret (in the resource's namespace) the body is built from.
    fn uri_secret(&self) -> Option<String> {
        None
    }
    /// A Secret the operator creates (owned by the resource) when it does not exist yet:
    /// generated credentials. Its name is what `uri_secret` returns.
    fn generated_secret(&self) -> Option<GeneratedSecret> {
        None
    }
    /// Whether `user_reference` can be set (the controller then watches Users).
    const USES_USER_REFERENCE: bool = false;
    /// The name of a `User` resource (same namespace) whose broker name this object needs.
    fn user_reference(&self) -> Option<&str> {
        None
    }
    /// This object with the referenced `User`'s broker name filled in, so that `path`,
    /// `body` and `broker_name` need nothing else.
    fn with_user(&self, _user: String) -> Self {
        self.clone()
    }
    /// The broker user this object rewrites or deletes (a `User`'s name): never the account
    /// the operator itself authenticates with, which would lock it out.
    fn broker_user(&self) -> Option<String> {
        None
    }
    /// Whether the object is created by POSTing the body to `path` (the broker names it, as
    /// it does a binding) rather than PUT at `path`.
    const CREATED_BY_POST: bool = false;
    /// Whether `delete_path` needs what a GET of `path` answers (a binding: DELETE needs
    /// the properties key the broker gave it).
    const DELETE_NEEDS_LOOKUP: bool = false;
    /// The path to DELETE; with `DELETE_NEEDS_LOOKUP`, `current` is what GET `path`
    /// answered (`None`: 404). `None`: nothing of this object is on the broker.
    fn delete_path(&self, _current: Option<&Value>) -> Option<String> {
        Some(self.path())
    }
    /// Limits of the object (vhost and user limits), written after the object.
    fn limits(&self) -> Option<Limits> {
        None
    }
    /// Whether the kind can remove itself from the broker when its work is done (a shovel
    /// with `srcDeleteAfter`); its status then has a `finished` field.
    const MAY_FINISH: bool = false;
    /// Whether this object removes itself from the broker when its work is done: once its
    /// generation was applied, its absence on the broker means it finished (recorded in
    /// status), not drift, and it is not written again until the spec changes.
    fn finishes(&self) -> bool {
        false
    }
    /// Whether what GET `path` answered (`current`) already is what writing `body` would
    /// make it: then resync writes nothing. By default each key of the body must have the
    /// same value in the answer; kinds whose GET answers in another shape say how.
    fn in_sync(&self, body: &Value, current: &Value) -> bool {
        same_keys(body, current)
    }
    /// The PUT (or POST) body; `secret` holds the `uri_secret`'s keys.
    fn body(&self, secret: Option<&BTreeMap<String, String>>) -> Result<Value, String>;
    /// Management API paths read after a successful apply, for the status.
    fn observe_paths(&self) -> Vec<String> {
        Vec::new()
    }
    /// Extra status fields from what `observe_paths` returned (None where a GET failed).
    fn observed_status(&self, _observed: &[Option<Value>]) -> serde_json::Map<String, Value> {
        serde_json::Map::new()
    }
}

/// Limits a resource sets on its broker object, apart from the object itself
/// (`/api/vhost-limits/{vhost}`, `/api/user-limits/{user}`).
pub struct Limits {
    /// GET: `[{"value": {"max-connections": 10, …}}]` (or `[]`).
    pub read: String,
    /// PUT `{"value": N}` at or DELETE `{prefix}/{name}`.
    pub prefix: String,
    /// Every limit the resource manages, and its desired value (`None`: removed).
    pub desired: Vec<(&'static str, Option<i64>)>,
}

/// The limit writes (PUT with a value, DELETE without) that make `current` (the broker's
/// `[{"value": {…}}]`) what `desired` says.
pub fn limit_changes(
    desired: &[(&'static str, Option<i64>)],
    current: &Value,
) -> Vec<(&'static str, Option<i64>)> {
    let now = &current[0]["value"];
    desired
        .iter()
        .filter(|(name, want)| now[*name].as_i64() != *want)
        .copied()
        .collect()
}

/// Every key of `body` has the same value in `current`.
pub fn same_keys(body: &Value, current: &Value) -> bool {
    body.as_object()
        .is_some_and(|b| b.iter().all(|(k, v)| current.get(k) == Some(v)))
}

/// Every key of the object `desired` has the same value in the object `current` (which may
/// hold more: defaults a broker adds to queue or exchange arguments). A missing or empty
/// `desired` matches a missing or empty `current`.
pub fn subset(desired: &Value, current: &Value) -> bool {
    let empty = serde_json::Map::new();
    let current = current.as_object().unwrap_or(&empty);
    desired
        .as_object()
        .unwrap_or(&empty)
        .iter()
        .all(|(k, v)| current.get(k) == Some(v))
}

/// Tags as a set, from a comma-separated string (what the operator sends) or an array
/// (what brokers answer).
pub fn tag_set(v: &Value) -> std::collections::BTreeSet<String> {
    match v {
        Value::String(s) => s
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect(),
        Value::Array(a) => a
            .iter()
            .filter_map(Value::as_str)
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect(),
        _ => Default::default(),
    }
}

/// A Secret the operator generates for a resource: `username` is stored with a random
/// `password`.
pub struct GeneratedSecret {
    pub name: String,
    pub username: String,
}

/// Where `rabbitClusterReference` and `connectionSecret` point (the schema allows exactly
/// one).
pub fn target_of<'a>(
    cluster: &'a Option<RabbitClusterReference>,
    secret: &'a Option<ConnectionSecretReference>,
) -> Target<'a> {
    match (cluster, secret) {
        (Some(r), None) => Target::Cluster(r),
        (None, Some(s)) => Target::Secret(s),
        _ => Target::Invalid,
    }
}

fn not_ready(reason: &'static str, message: impl Into<String>) -> Error {
    Error::NotReady {
        reason,
        message: message.into(),
    }
}

fn key<T: Topology>(obj: &T) -> String {
    format!(
        "{}/{}/{}",
        T::CONTROLLER,
        obj.namespace().unwrap_or_default(),
        obj.name_any()
    )
}

fn secret_map(secret: &Secret) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (k, v) in secret.data.iter().flatten() {
        if let Ok(s) = String::from_utf8(v.0.clone()) {
            out.insert(k.clone(), s);
        }
    }
    for (k, v) in secret.string_data.iter().flatten() {
        out.insert(k.clone(), v.clone());
    }
    out
}

async fn read_secret(
    client: &Client,
    ns: &str,
    name: &str,
    what: &str,
) -> Result<BTreeMap<String, String>, Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    match api.get_opt(name).await? {
        Some(s) => Ok(secret_map(&s)),
        None => Err(not_ready(
            "SecretNotFound",
            format!("{what}: Secret {ns}/{name} does not exist"),
        )),
    }
}

/// Finds the broker of `obj`: a client for its management API, and the user name the
/// client authenticates as.
async fn connect<T: Topology>(obj: &T, ctx: &Context) -> Result<(ManagementClient, String), Error> {
    let ns = obj.namespace().unwrap_or_else(|| "default".into());
    match obj.target() {
        Target::Invalid => Err(not_ready(
            "InvalidSpec",
            "set exactly one of spec.rabbitClusterReference and spec.connectionSecret",
        )),
        Target::Secret(r) => {
            let s = read_secret(&ctx.client, &ns, &r.name, "spec.connectionSecret").await?;
            let get = |k: &str| {
                s.get(k).filter(|v| !v.is_empty()).cloned().ok_or_else(|| {
                    not_ready(
                        "SecretIncomplete",
                        format!(
                            "spec.connectionSecret: Secret {ns}/{} has no key {k}",
                            r.name
                        ),
                    )
                })
            };
            let (uri, user, pass) = (get("uri")?, get("username")?, get("password")?);
            let client = ManagementClient::new(&uri, &user, &pass)
                .map_err(|e| not_ready("BrokerUnreachable", e.to_string()))?;
            Ok((client, user))
        }
        Target::Cluster(r) => {
            let cluster_ns = r.namespace.clone().unwrap_or_else(|| ns.clone());
            let clusters: Api<RabbitCluster> = Api::namespaced(ctx.client.clone(), &cluster_ns);
            let Some(rc) = clusters.get_opt(&r.name).await? else {
                return Err(not_ready(
                    "ClusterNotFound",
                    format!("RabbitCluster {cluster_ns}/{} does not exist", r.name),
                ));
            };
            if cluster_ns != ns {
                let allowed = rc
                    .annotations()
                    .get(ALLOWED_NAMESPACES_ANNOTATION)
                    .is_some_and(|list| {
                        list.split(',').map(str::trim).any(|n| n == "*" || n == ns)
                    });
                if !allowed {
                    return Err(not_ready(
                        "NamespaceNotAllowed",
                        format!(
                            "RabbitCluster {cluster_ns}/{} does not allow resources from namespace {ns}: \
                             add {ns} to its annotation {ALLOWED_NAMESPACES_ANNOTATION}",
                            r.name
                        ),
                    ));
                }
            }
            if rc.spec.replicas == 0 {
                return Err(not_ready(
                    "ClusterScaledToZero",
                    format!(
                        "RabbitCluster {cluster_ns}/{} is scaled to zero nodes",
                        r.name
                    ),
                ));
            }
            // The cluster's default user is an administrator: it goes to the annotation's
            // URI only if that is the cluster's own (or the operator allows any host).
            if let Some(uri) = rc.annotations().get(MANAGEMENT_URI_ANNOTATION) {
                security::check_management_uri(&ctx.security, &rc, MANAGEMENT_URI_ANNOTATION, uri)
                    .map_err(|m| {
                        not_ready(
                            "ManagementUriRefused",
                            format!("RabbitCluster {cluster_ns}/{}: {m}", r.name),
                        )
                    })?;
            }
            let Some(user) = rc.status.as_ref().and_then(|s| s.default_user.clone()) else {
                return Err(not_ready(
                    "ClusterNotReady",
                    format!(
                        "RabbitCluster {cluster_ns}/{} has no default user yet",
                        r.name
                    ),
                ));
            };
            let secret_ref = &user.secret_reference;
            let creds = read_secret(
                &ctx.client,
                &secret_ref.namespace,
                &secret_ref.name,
                "default user",
            )
            .await?;
            let (Some(u), Some(p)) = (creds.get("username"), creds.get("password")) else {
                return Err(not_ready(
                    "ClusterNotReady",
                    format!("Secret {} lacks username or password", secret_ref.name),
                ));
            };
            let url = rc
                .annotations()
                .get(MANAGEMENT_URI_ANNOTATION)
                .cloned()
                .unwrap_or_else(|| {
                    build::management_url(
                        &rc,
                        &format!(
                            "{}.{}.svc",
                            user.service_reference.name, user.service_reference.namespace
                        ),
                    )
                });
            let client = crate::management::management_client(&ctx.client, &rc, &url, u, p)
                .await
                .map_err(|e| not_ready("BrokerUnreachable", e))?;
            Ok((client, u.clone()))
        }
    }
}

fn broker_error(e: ManagementError) -> Error {
    match e {
        ManagementError::Refused { .. } => not_ready("BrokerRefused", e.to_string()),
        ManagementError::Unreachable { .. } => not_ready("BrokerUnreachable", e.to_string()),
        ManagementError::BadAnswer { .. } => not_ready("BrokerBadAnswer", e.to_string()),
    }
}

async fn event<T: Topology>(ctx: &Context, obj: &T, type_: EventType, reason: &str, note: String) {
    let ev = Event {
        type_,
        reason: reason.to_string(),
        note: Some(crate::conditions::event_note(note)),
        action: reason.to_string(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &obj.object_ref(&())).await {
        tracing::warn!(object = %key(obj), "cannot publish event {reason}: {e}");
    }
}

fn current_conditions<T: Topology>(obj: &T) -> Vec<Condition> {
    serde_json::to_value(obj)
        .ok()
        .and_then(|v| v.get("status")?.get("conditions").cloned())
        .and_then(|c| serde_json::from_value(c).ok())
        .unwrap_or_default()
}

/// Whether `obj`'s current generation was applied already (Ready at observedGeneration):
/// a difference on the broker now is drift, not a change of the spec.
fn applied<T: Topology>(obj: &T) -> bool {
    let observed = serde_json::to_value(obj)
        .ok()
        .and_then(|v| v.get("status")?.get("observedGeneration")?.as_i64());
    observed.is_some()
        && observed == obj.meta().generation
        && conditions::is_true(&current_conditions(obj), "Ready")
}

async fn write_status<T: Topology>(
    obj: &T,
    ctx: &Context,
    ready: Result<Option<(&str, String)>, (&str, String)>,
    extra: serde_json::Map<String, Value>,
) -> Result<(), Error> {
    let mut conds = current_conditions(obj);
    let generation = obj.meta().generation;
    match &ready {
        Ok(Some((reason, message))) => conditions::set(
            &mut conds,
            "Ready",
            true,
            reason,
            message.clone(),
            generation,
        ),
        Ok(None) => conditions::set(
            &mut conds,
            "Ready",
            true,
            "Applied",
            format!(
                "the broker holds {} {} as specified",
                T::NOUN,
                obj.broker_name()
            ),
            generation,
        ),
        Err((reason, message)) => conditions::set(
            &mut conds,
            "Ready",
            false,
            reason,
            message.clone(),
            generation,
        ),
    }
    let mut status = json!({"conditions": conds, "observedGeneration": generation});
    if let Some(map) = status.as_object_mut() {
        map.extend(extra);
    }
    let before = serde_json::to_value(obj)
        .ok()
        .and_then(|v| v.get("status").cloned());
    let mut merged = before.clone().unwrap_or_else(|| json!({}));
    crate::cluster::merge::merge(&mut merged, &status);
    if before.as_ref() == Some(&merged) {
        return Ok(());
    }
    let api: Api<T> = Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
    api.patch_status(
        &obj.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&json!({"status": status})),
    )
    .await?;
    Ok(())
}

/// Status field recording the broker name of a `userReference`'s User, so that deleting
/// the resource after its User still removes it from the broker.
const RESOLVED_USER_FIELD: &str = "user";

/// `obj` with its `userReference` resolved (and the User's broker name), or `None` on
/// cleanup when the User is gone and no earlier apply recorded its name.
async fn resolve_user<T: Topology>(
    obj: &T,
    ctx: &Context,
    cleanup: bool,
) -> Result<Option<(T, Option<String>)>, Error> {
    let Some(reference) = obj.user_reference() else {
        return Ok(Some((obj.clone(), None)));
    };
    let ns = obj.namespace().unwrap_or_else(|| "default".into());
    let users: Api<User> = Api::namespaced(ctx.client.clone(), &ns);
    let name = match users.get_opt(reference).await? {
        Some(u) => u.broker_name(),
        None if cleanup => {
            let recorded = serde_json::to_value(obj).ok().and_then(|v| {
                v.get("status")?
                    .get(RESOLVED_USER_FIELD)?
                    .as_str()
                    .map(str::to_owned)
            });
            match recorded {
                Some(n) => n,
                None => return Ok(None),
            }
        }
        None => {
            return Err(not_ready(
                "UserNotFound",
                format!("spec.userReference: User {ns}/{reference} does not exist"),
            ));
        }
    };
    Ok(Some((obj.with_user(name.clone()), Some(name))))
}

/// Creates the Secret of generated credentials unless it exists; the resource owns it, so
/// it goes with the resource.
async fn ensure_generated_secret<T: Topology>(
    obj: &T,
    generated: &GeneratedSecret,
    ctx: &Context,
) -> Result<(), Error> {
    let ns = obj.namespace().unwrap_or_else(|| "default".into());
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    if api.get_opt(&generated.name).await?.is_some() {
        return Ok(());
    }
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(generated.name.clone()),
            namespace: Some(ns),
            owner_references: obj.controller_owner_ref(&()).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        string_data: Some(BTreeMap::from([
            ("username".to_string(), generated.username.clone()),
            (
                "password".to_string(),
                crate::cluster::controller::random_string(GENERATED_PASSWORD_LEN),
            ),
        ])),
        ..Secret::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok(()),
        // Created by an earlier reconcile a moment ago: keep its password.
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Length of generated passwords (alphanumeric: about 143 bits).
const GENERATED_PASSWORD_LEN: usize = 24;

async fn apply<T: Topology>(obj: &T, ctx: &Context) -> Result<Action, Error> {
    let result: Result<(T, serde_json::Map<String, Value>, bool), Error> = async {
        let ns = obj.namespace().unwrap_or_else(|| "default".into());
        let Some((resolved, user)) = resolve_user(obj, ctx, false).await? else {
            return Err(not_ready(
                "UserNotFound",
                "spec.userReference: no such User",
            ));
        };
        if let Some(generated) = obj.generated_secret() {
            ensure_generated_secret(obj, &generated, ctx).await?;
        }
        let secret = match obj.uri_secret() {
            Some(name) => Some(read_secret(&ctx.client, &ns, &name, T::SECRET_FIELD).await?),
            None => None,
        };
        let body = resolved
            .body(secret.as_ref())
            .map_err(|m| not_ready("InvalidSpec", m))?;
        let (client, operator_user) = connect(obj, ctx).await?;
        if let Some(user) = resolved.broker_user()
            && user == operator_user
        {
            return Err(not_ready(
                "InvalidSpec",
                format!(
                    "{} {user} is the account the operator configures this broker with: \
                     changing it here could lock the operator out; manage it through the \
                     RabbitCluster's default user or the connection Secret",
                    T::NOUN
                ),
            ));
        }
        // Compare before writing: a resync that finds the broker as specified writes
        // nothing (a rewrite is not free: a shovel or federation link restarts, a user's
        // password is re-hashed). A write at an already applied generation corrects drift.
        let current = client
            .get_opt::<Value>(&resolved.path())
            .await
            .map_err(broker_error)?;
        if T::MAY_FINISH && resolved.finishes() && current.is_none() && applied(obj) {
            let mut extra = serde_json::Map::new();
            extra.insert("finished".into(), Value::Bool(true));
            extra.insert("state".into(), json!("finished"));
            extra.insert(
                "reason".into(),
                json!("it reached srcDeleteAfter and deleted itself; it is not created again unless the spec changes"),
            );
            return Ok((resolved, extra, true));
        }
        if !current.as_ref().is_some_and(|c| resolved.in_sync(&body, c)) {
            if applied(obj) {
                ctx.metrics.drift_corrected(T::CONTROLLER);
                tracing::info!(object = %key(obj), "the broker differs from the spec: correcting");
            }
            let write = if T::CREATED_BY_POST {
                client.post(&resolved.path(), &body).await
            } else {
                client.put(&resolved.path(), &body).await
            };
            write.map_err(broker_error)?;
            ctx.metrics.wrote(T::CONTROLLER);
        }
        if let Some(limits) = resolved.limits() {
            let current = client
                .get_opt::<Value>(&limits.read)
                .await
                .map_err(broker_error)?
                .unwrap_or(Value::Null);
            let changes = limit_changes(&limits.desired, &current);
            if !changes.is_empty() && applied(obj) {
                ctx.metrics.drift_corrected(T::CONTROLLER);
            }
            for (name, value) in changes {
                let path = format!("{}/{}", limits.prefix, segment(name));
                match value {
                    Some(v) => client.put(&path, &json!({"value": v})).await,
                    None => client.delete(&path).await,
                }
                .map_err(broker_error)?;
                ctx.metrics.wrote(T::CONTROLLER);
            }
        }
        let mut observed = Vec::new();
        for path in resolved.observe_paths() {
            observed.push(client.get::<Value>(&path).await.ok());
        }
        let mut extra = resolved.observed_status(&observed);
        if let Some(user) = user {
            extra.insert(RESOLVED_USER_FIELD.into(), Value::String(user));
        }
        if T::MAY_FINISH {
            extra.insert("finished".into(), Value::Bool(false));
            // A reason the broker no longer gives (or one written when it finished) goes.
            extra.entry("reason").or_insert(Value::Null);
        }
        Ok((resolved, extra, false))
    }
    .await;
    match result {
        Ok((resolved, extra, finished)) => {
            let obj = &resolved;
            let was_ready = conditions::is_true(&current_conditions(obj), "Ready");
            let was_finished = serde_json::to_value(obj)
                .ok()
                .and_then(|v| v.get("status")?.get("finished")?.as_bool())
                == Some(true);
            let readiness = if finished {
                Ok(Some((
                    "Finished",
                    format!(
                        "{} {} finished: it reached srcDeleteAfter and deleted itself; it is not created again unless the spec changes",
                        T::NOUN,
                        obj.broker_name()
                    ),
                )))
            } else {
                Ok(None)
            };
            write_status(obj, ctx, readiness, extra).await?;
            if finished && !was_finished {
                event(
                    ctx,
                    obj,
                    EventType::Normal,
                    "Finished",
                    format!(
                        "{} {} finished (srcDeleteAfter) and deleted itself on the broker",
                        T::NOUN,
                        obj.broker_name()
                    ),
                )
                .await;
            }
            if !was_ready {
                event(
                    ctx,
                    obj,
                    EventType::Normal,
                    "Applied",
                    format!("Applied {} {} on the broker", T::NOUN, obj.broker_name()),
                )
                .await;
            }
            Ok(Action::requeue(ctx.resync))
        }
        Err(Error::NotReady { reason, message }) => {
            write_status(
                obj,
                ctx,
                Err((reason, message.clone())),
                serde_json::Map::new(),
            )
            .await?;
            event(ctx, obj, EventType::Warning, reason, message.clone()).await;
            Err(Error::NotReady { reason, message })
        }
        Err(e) => Err(e),
    }
}

async fn cleanup<T: Topology>(obj: &T, ctx: &Context) -> Result<Action, Error> {
    if obj.deletion_policy() == DeletionPolicy::Retain {
        event(
            ctx,
            obj,
            EventType::Normal,
            "Retained",
            format!(
                "Left {} {} on the broker (deletionPolicy: retain)",
                T::NOUN,
                obj.broker_name()
            ),
        )
        .await;
        return Ok(Action::await_change());
    }
    // A permission whose User is gone and was never applied has nothing on the broker.
    let Some((resolved, _)) = resolve_user(obj, ctx, true).await? else {
        return Ok(Action::await_change());
    };
    let obj = &resolved;
    let client = match connect(obj, ctx).await {
        Ok((c, operator_user)) => {
            if obj.broker_user().is_some_and(|u| u == operator_user) {
                event(
                    ctx,
                    obj,
                    EventType::Warning,
                    "Retained",
                    format!(
                        "Left {} {operator_user} on the broker: it is the account the operator \
                         configures the broker with",
                        T::NOUN
                    ),
                )
                .await;
                return Ok(Action::await_change());
            }
            c
        }
        // Nothing left to delete from.
        Err(Error::NotReady {
            reason: "ClusterNotFound",
            ..
        }) => return Ok(Action::await_change()),
        // The broker cannot be known any more (its connection Secret is gone: deleted by
        // hand, or before this resource when their namespace is deleted). Waiting would keep
        // this resource, and its namespace, forever: it goes, and says what may be left.
        Err(Error::NotReady {
            reason: reason @ ("SecretNotFound" | "InvalidSpec"),
            message,
        }) => {
            event(
                ctx,
                obj,
                EventType::Warning,
                reason,
                format!(
                    "Could not delete {} {} from its broker ({message}); the resource is                      removed and the broker may still hold it",
                    T::NOUN,
                    obj.broker_name()
                ),
            )
            .await;
            return Ok(Action::await_change());
        }
        Err(e) => return Err(e),
    };
    let current = if T::DELETE_NEEDS_LOOKUP {
        client
            .get_opt::<Value>(&obj.path())
            .await
            .map_err(broker_error)?
    } else {
        None
    };
    if let Some(path) = obj.delete_path(current.as_ref()) {
        client.delete(&path).await.map_err(broker_error)?;
    }
    event(
        ctx,
        obj,
        EventType::Normal,
        "Deleted",
        format!("Deleted {} {} from the broker", T::NOUN, obj.broker_name()),
    )
    .await;
    Ok(Action::await_change())
}

async fn reconcile<T: Topology>(obj: Arc<T>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.start(T::CONTROLLER);
    let ns = obj.namespace().unwrap_or_else(|| "default".into());
    let api: Api<T> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, T::FINALIZER, obj.clone(), |event| async {
        match event {
            Finalizer::Apply(o) => apply(&*o, &ctx).await,
            Finalizer::Cleanup(o) => cleanup(&*o, &ctx).await,
        }
    })
    .await;
    match result {
        Ok(action) => {
            ctx.succeeded(&key(&*obj));
            Ok(action)
        }
        Err(kube::runtime::finalizer::Error::ApplyFailed(e))
        | Err(kube::runtime::finalizer::Error::CleanupFailed(e)) => Err(e),
        Err(e) => Err(Error::Finalizer(e.to_string())),
    }
}

fn error_policy<T: Topology>(obj: Arc<T>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.failed(T::CONTROLLER, error.kind());
    // 2s, 4s, 8s … capped at 5 minutes: an unreachable broker is retried, not hammered.
    let (failures, delay) = ctx.failed(
        &key(&*obj),
        Duration::from_secs(2),
        Duration::from_secs(300),
    );
    tracing::warn!(object = %key(&*obj), attempt = failures, ?delay, "{error}");
    Action::requeue(delay)
}

/// Reconciles of one kind in flight at once, per scope.
const RECONCILES_AT_ONCE: u16 = 16;

/// Names of the Secrets `obj` reads.
fn referenced_secrets<T: Topology>(obj: &T) -> Vec<String> {
    let mut names = Vec::new();
    if let Some(s) = obj.uri_secret() {
        names.push(s);
    }
    if let Target::Secret(r) = obj.target() {
        names.push(r.name.clone());
    }
    names
}

/// Runs the controller of kind `T` until shutdown. Secrets a resource references and the
/// RabbitCluster it targets (and the User it names) are followed through the scope's shared
/// watches (`triggers`), so rotating a Secret or a cluster becoming ready re-applies at once.
pub async fn run<T: Topology>(ctx: Arc<Context>, namespace: Option<String>, triggers: Triggers) {
    let objects = scoped::<T>(&ctx.client, &namespace);
    let (store, writer) = reflector::store();
    let watch = reflector::reflector(writer, trimmed_watch(objects, watcher::Config::default()))
        .applied_objects();
    let controller = Controller::for_stream(watch, store.clone());
    let store2 = store.clone();
    // Kinds naming a User resource follow it: a User created (or renamed on the broker)
    // after them applies them at once instead of at the next retry.
    let controller = match triggers.users {
        Some(users) if T::USES_USER_REFERENCE => {
            let store3 = store.clone();
            controller.watches_shared_stream(users, move |user: Arc<User>| {
                let ns = user.namespace();
                let name = user.name_any();
                store3
                    .state()
                    .iter()
                    .filter(|o| o.namespace() == ns && o.user_reference() == Some(name.as_str()))
                    .map(|o| ObjectRef::from_obj(o.as_ref()))
                    .collect::<Vec<_>>()
            })
        }
        _ => controller,
    };
    controller
        // A Secret's name says which resources to re-apply; their reconcile GETs the Secret.
        .watches_shared_stream(
            triggers.secrets,
            move |secret: Arc<PartialObjectMeta<Secret>>| {
                let ns = secret.namespace();
                let name = secret.name_any();
                store
                    .state()
                    .iter()
                    .filter(|o| {
                        o.namespace() == ns && referenced_secrets(o.as_ref()).contains(&name)
                    })
                    .map(|o| ObjectRef::from_obj(o.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .watches_shared_stream(triggers.clusters, move |rc: Arc<RabbitCluster>| {
            let rc_ns = rc.namespace();
            let name = rc.name_any();
            store2
                .state()
                .iter()
                .filter(|o| match o.target() {
                    Target::Cluster(r) => {
                        r.name == name && r.namespace.clone().or_else(|| o.namespace()) == rc_ns
                    }
                    _ => false,
                })
                .map(|o| ObjectRef::from_obj(o.as_ref()))
                .collect::<Vec<_>>()
        })
        // At most this many reconciles of a kind at once: each holds its broker's answer and
        // the object's patches; thousands created together would all be in flight at once.
        .with_config(controller::Config::default().concurrency(RECONCILES_AT_ONCE))
        .shutdown_on_signal()
        .run(reconcile::<T>, error_policy::<T>, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!("reconcile stream: {e}");
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comparing_what_the_broker_answers() {
        let body = json!({"pattern": "^a", "definition": {"max-length": 1}, "priority": 0});
        assert!(same_keys(
            &body,
            &json!({"name": "p", "pattern": "^a", "definition": {"max-length": 1}, "priority": 0})
        ));
        // A key added on the broker inside a value is drift.
        assert!(!same_keys(
            &body,
            &json!({"pattern": "^a", "definition": {"max-length": 1, "expires": 5}, "priority": 0})
        ));
        assert!(!same_keys(&body, &json!({"pattern": "^a", "priority": 0})));
        assert!(subset(
            &json!({"x": 1}),
            &json!({"x": 1, "x-queue-type": "classic"})
        ));
        assert!(!subset(&json!({"x": 1}), &json!({"x": 2})));
        assert!(subset(&json!({}), &Value::Null));
        assert_eq!(tag_set(&json!("b, a,")), tag_set(&json!(["a", "b"])));
        let desired = [("max-connections", Some(10)), ("max-queues", None)];
        assert_eq!(
            limit_changes(&desired, &json!([{"value": {"max-connections": 10}}])),
            vec![]
        );
        assert_eq!(
            limit_changes(
                &desired,
                &json!([{"value": {"max-connections": 5, "max-queues": 1}}])
            ),
            vec![("max-connections", Some(10)), ("max-queues", None)]
        );
        assert_eq!(
            limit_changes(&desired, &json!([])),
            vec![("max-connections", Some(10))]
        );
    }
}
