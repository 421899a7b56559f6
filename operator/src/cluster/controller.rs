//! The `RabbitCluster` reconcile loop: reads what exists, builds what should exist (pure
//! builders in [`super::build`]), applies it with server-side apply under one field manager,
//! drains nodes before a scale-down, expands volumes, and reports status and Events.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{
    ConfigMap, ObjectReference, PersistentVolumeClaim, Pod, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PropagationPolicy};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Resource, ResourceExt};
use rand::Rng;
use rand::distr::Alphanumeric;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use super::build::{self, BuildError, Credentials};
use super::config::parse_quantity;
use crate::conditions;
use crate::crd::cluster::{
    DefaultUserStatus, DrainedNode, RabbitCluster, RabbitClusterStatus, SecretReference,
    ServiceReference,
};
use crate::management::management_client;
pub use crate::reconcile::{Context, Error};
use crate::security;
use crate::watch::{Triggers, scoped};

/// Field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "warren-operator";
/// Finalizer on every `RabbitCluster`.
pub const FINALIZER: &str = "warren.dev/cluster-cleanup";
/// Label that pauses reconciliation of a cluster while set to `"true"`.
pub const PAUSE_LABEL: &str = "warren.dev/pause-reconciliation";
/// Annotation overriding the management API URL the operator uses to drain nodes (for an
/// operator running outside the cluster, where pod DNS names do not resolve).
pub const MANAGEMENT_URI_ANNOTATION: &str = "warren.dev/management-uri";

const CONTROLLER: &str = "rabbitcluster";
/// Periodic resync of a settled cluster.
const RESYNC: Duration = Duration::from_secs(300);
/// Re-check interval while something is rolling, scaling or draining.
const PROGRESS_POLL: Duration = Duration::from_secs(5);

impl Context {
    async fn event(&self, rc: &RabbitCluster, type_: EventType, reason: &str, note: String) {
        self.event_about(rc, type_, reason, note, None).await
    }

    /// An Event about `rc`; `related` names the object acted on, so Events about different
    /// objects are not folded into one series.
    async fn event_about(
        &self,
        rc: &RabbitCluster,
        type_: EventType,
        reason: &str,
        note: String,
        related: Option<ObjectReference>,
    ) {
        let ev = Event {
            type_,
            reason: reason.to_string(),
            note: Some(crate::conditions::event_note(note)),
            action: reason.to_string(),
            secondary: related,
        };
        if let Err(e) = self.recorder.publish(&ev, &rc.object_ref(&())).await {
            tracing::warn!(cluster = %rc.name_any(), "cannot publish event {reason}: {e}");
        }
    }
}

/// Runs the controller until the stream ends (shutdown signal). RabbitClusters and Secrets
/// come from the scope's shared watches (`triggers`); the objects a cluster owns are watched
/// here.
pub async fn run(ctx: Arc<Context>, namespace: Option<String>, triggers: Triggers) {
    let client = &ctx.client;
    let (sts, svc, cm, sa, pdb) = (
        scoped::<StatefulSet>(client, &namespace),
        scoped::<Service>(client, &namespace),
        scoped::<ConfigMap>(client, &namespace),
        scoped::<ServiceAccount>(client, &namespace),
        scoped::<PodDisruptionBudget>(client, &namespace),
    );
    let owned = watcher::Config::default().labels("app.kubernetes.io/managed-by=warren-operator");
    let store = triggers.cluster_store.clone();
    Controller::for_shared_stream(triggers.clusters, triggers.cluster_store)
        .owns(sts, owned.clone())
        .owns(svc, owned.clone())
        .owns(cm, owned.clone())
        .owns(sa, owned.clone())
        .owns(pdb, owned)
        // Secrets: the cluster's own, and the ones it references (TLS certificates, an
        // imported default user), so a renewed certificate or a created Secret acts at once.
        // Metadata only: which cluster a Secret concerns is read from its name and owner, and
        // the reconcile GETs the few Secrets it uses.
        .watches_shared_stream(
            triggers.secrets,
            move |secret: Arc<PartialObjectMeta<Secret>>| {
                let ns = secret.namespace();
                let name = secret.name_any();
                store
                    .state()
                    .iter()
                    .filter(|rc| {
                        rc.namespace() == ns
                            && (references_secret(rc, &name)
                                || secret.owner_references().iter().any(|o| {
                                    o.kind == "RabbitCluster"
                                        && Some(&o.uid) == rc.metadata.uid.as_ref()
                                }))
                    })
                    .map(|rc| ObjectRef::from_obj(rc.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!("reconcile stream: {e}");
            }
        })
        .await;
}

/// Whether the cluster's spec names Secret `name` (TLS, CA, imported default user).
fn references_secret(rc: &RabbitCluster, name: &str) -> bool {
    let tls = rc.spec.tls.as_ref();
    tls.is_some_and(|t| t.secret_name == name || t.ca_secret_name.as_deref() == Some(name))
        || rc
            .spec
            .default_user
            .as_ref()
            .and_then(|d| d.secret_name.as_deref())
            == Some(name)
}

fn key(rc: &RabbitCluster) -> String {
    format!("{}/{}", rc.namespace().unwrap_or_default(), rc.name_any())
}

async fn reconcile(rc: Arc<RabbitCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.start(CONTROLLER);
    let ns = rc.namespace().unwrap_or_else(|| "default".into());
    let api: Api<RabbitCluster> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, FINALIZER, rc.clone(), |event| async {
        match event {
            Finalizer::Apply(rc) => apply(&rc, &ctx).await,
            Finalizer::Cleanup(rc) => cleanup(&rc, &ctx).await,
        }
    })
    .await;
    match result {
        Ok(action) => {
            ctx.succeeded(&key(&rc));
            Ok(action)
        }
        Err(kube::runtime::finalizer::Error::ApplyFailed(e))
        | Err(kube::runtime::finalizer::Error::CleanupFailed(e)) => Err(e),
        Err(e) => Err(Error::Finalizer(e.to_string())),
    }
}

fn error_policy(rc: Arc<RabbitCluster>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.failed(CONTROLLER, error.kind());
    // 1s, 2s, 4s … capped at 5 minutes.
    let (failures, delay) = ctx.failed(&key(&rc), Duration::from_secs(1), RESYNC);
    tracing::warn!(cluster = %key(&rc), attempt = failures, ?delay, "reconcile failed: {error}");
    Action::requeue(delay)
}

async fn cleanup(rc: &RabbitCluster, ctx: &Context) -> Result<Action, Error> {
    // Owned objects go with the cluster through their owner references; the volumes stay
    // (the StatefulSet's claim retention policy is Retain), so deleting a cluster by mistake
    // does not delete its messages. Say so where the user will look.
    ctx.event(
        rc,
        EventType::Normal,
        "Deleting",
        format!(
            "Deleting cluster {}: owned objects are garbage-collected; PersistentVolumeClaims \
             persistence-{}-N are kept and must be deleted by hand to free the volumes",
            rc.name_any(),
            build::server_name(rc)
        ),
    )
    .await;
    Ok(Action::await_change())
}

/// Server-side applies `obj`; returns whether it was created, changed or left as it was.
async fn ssa<K>(api: &Api<K>, obj: &K) -> Result<Applied, Error>
where
    K: Resource + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    let before = api.get_opt(&name).await?;
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let after = api.patch(&name, &params, &Patch::Apply(obj)).await?;
    Ok(match before {
        None => Applied::Created,
        Some(b) if b.meta().resource_version != after.meta().resource_version => Applied::Updated,
        Some(_) => Applied::Unchanged,
    })
}

#[derive(PartialEq, Eq, Clone, Copy)]
enum Applied {
    Created,
    Updated,
    Unchanged,
}

async fn apply_and_report<K>(ctx: &Context, rc: &RabbitCluster, obj: K) -> Result<(), Error>
where
    K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + Serialize
        + DeserializeOwned
        + std::fmt::Debug,
{
    let ns = build::namespace(rc);
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &ns);
    let kind = K::kind(&()).to_string();
    let name = obj.meta().name.clone().unwrap_or_default();
    let related = Some(ObjectReference {
        api_version: Some(K::api_version(&()).to_string()),
        kind: Some(kind.clone()),
        name: Some(name.clone()),
        namespace: Some(ns.clone()),
        ..Default::default()
    });
    match ssa(&api, &obj).await {
        Ok(Applied::Created) => {
            let note = format!("Created {kind} {name}");
            ctx.event_about(rc, EventType::Normal, "Created", note, related)
                .await
        }
        Ok(Applied::Updated) => {
            let note = format!("Updated {kind} {name}");
            ctx.event_about(rc, EventType::Normal, "Updated", note, related)
                .await
        }
        Ok(Applied::Unchanged) => {}
        Err(e) => {
            let note = format!("Cannot apply {kind} {name}: {e}");
            ctx.event_about(rc, EventType::Warning, "ApplyFailed", note, related)
                .await;
            return Err(e);
        }
    }
    Ok(())
}

pub(crate) fn random_string(len: usize) -> String {
    rand::rng()
        .sample_iter(&Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

fn secret_value(secret: &Secret, key: &str) -> Option<String> {
    if let Some(v) = secret.data.as_ref().and_then(|d| d.get(key)) {
        return String::from_utf8(v.0.clone()).ok();
    }
    secret
        .string_data
        .as_ref()
        .and_then(|d| d.get(key))
        .cloned()
}

/// The default user's credentials: imported from `spec.defaultUser.secretName`, else the
/// ones already generated, else new ones.
async fn default_credentials(rc: &RabbitCluster, ctx: &Context) -> Result<Credentials, Error> {
    let ns = build::namespace(rc);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    if let Some(name) = rc
        .spec
        .default_user
        .as_ref()
        .and_then(|d| d.secret_name.clone())
    {
        let Some(s) = secrets.get_opt(&name).await? else {
            return Err(Error::Spec(format!(
                "spec.defaultUser.secretName: Secret {ns}/{name} does not exist; create it with keys username and password"
            )));
        };
        let username = secret_value(&s, "username");
        let password = secret_value(&s, "password");
        return match (username, password) {
            (Some(u), Some(p)) if !u.is_empty() && !p.is_empty() => Ok(Credentials {
                username: u,
                password: p,
            }),
            _ => Err(Error::Spec(format!(
                "spec.defaultUser.secretName: Secret {ns}/{name} needs non-empty keys username and password"
            ))),
        };
    }
    let existing = secrets
        .get_opt(&build::default_user_secret_name(rc))
        .await?;
    if let Some(s) = existing
        && let (Some(u), Some(p)) = (secret_value(&s, "username"), secret_value(&s, "password"))
    {
        return Ok(Credentials {
            username: u,
            password: p,
        });
    }
    Ok(Credentials {
        username: format!("default_user_{}", random_string(20)),
        password: random_string(32),
    })
}

async fn cluster_secret_value(rc: &RabbitCluster, ctx: &Context) -> Result<String, Error> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &build::namespace(rc));
    if let Some(s) = secrets.get_opt(&build::cluster_secret_name(rc)).await?
        && let Some(v) = secret_value(&s, "secret")
    {
        return Ok(v);
    }
    Ok(random_string(64))
}

/// What the reconcile decided, for the status.
struct Outcome {
    reconciled: Result<(), String>,
    progressing: Option<String>,
    drained: Vec<DrainedNode>,
}

async fn apply(rc: &RabbitCluster, ctx: &Context) -> Result<Action, Error> {
    if rc.labels().get(PAUSE_LABEL).map(String::as_str) == Some("true") {
        let mut status = rc.status.clone().unwrap_or_default();
        conditions::set(
            &mut status.conditions,
            "ReconcileSuccess",
            false,
            "Paused",
            format!("reconciliation is paused by the label {PAUSE_LABEL}=true"),
            rc.metadata.generation,
        );
        patch_status(rc, ctx, status).await?;
        return Ok(Action::requeue(RESYNC));
    }

    // The drained nodes as the API server has them now: the cached object this reconcile was
    // handed may not show the previous reconcile's status yet, and acting on an older list
    // would drain the next node before the last one is forgotten (and never forget it).
    let fresh = Api::<RabbitCluster>::namespaced(ctx.client.clone(), &build::namespace(rc))
        .get_opt(&rc.name_any())
        .await?;
    let mut outcome = Outcome {
        reconciled: Ok(()),
        progressing: None,
        drained: fresh
            .as_ref()
            .unwrap_or(rc)
            .status
            .as_ref()
            .map(|s| s.drained_nodes.clone())
            .unwrap_or_default(),
    };
    match apply_objects(rc, ctx, &mut outcome).await {
        Ok(()) => {}
        Err(Error::Spec(message)) => {
            ctx.event(rc, EventType::Warning, "InvalidSpec", message.clone())
                .await;
            outcome.reconciled = Err(message);
        }
        Err(Error::Drain(message)) => {
            ctx.event(rc, EventType::Warning, "DrainFailed", message.clone())
                .await;
            outcome.progressing = Some(message);
        }
        Err(e) => return Err(e),
    }
    let settled = write_status(rc, ctx, outcome).await?;
    Ok(Action::requeue(if settled {
        RESYNC
    } else {
        PROGRESS_POLL
    }))
}

fn spec_error(e: BuildError) -> Error {
    Error::Spec(e.to_string())
}

async fn apply_objects(
    rc: &RabbitCluster,
    ctx: &Context,
    outcome: &mut Outcome,
) -> Result<(), Error> {
    let ns = build::namespace(rc);
    // A management URI the operator would not send credentials to is reported at once, not
    // only when a scale-down needs it.
    management_url_of(rc, ctx, String::new)?;
    // Build everything first: an invalid spec changes nothing in the cluster.
    let creds = default_credentials(rc, ctx).await?;
    let cluster_secret = cluster_secret_value(rc, ctx).await?;
    let user_version = default_user_version(&creds, &cluster_secret);
    let user_secret = build::default_user_secret(rc, &creds).map_err(spec_error)?;
    let cluster_secret = build::cluster_secret(rc, &cluster_secret).map_err(spec_error)?;
    let config = build::config_map(rc).map_err(spec_error)?;
    let nodes = build::nodes_service(rc).map_err(spec_error)?;
    let client_svc = build::client_service(rc).map_err(spec_error)?;
    let sa = build::service_account(rc).map_err(spec_error)?;
    let pdb = build::pod_disruption_budget(rc).map_err(spec_error)?;
    let sts_api: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &ns);
    let current = sts_api.get_opt(&build::server_name(rc)).await?;
    let current_replicas = current
        .as_ref()
        .and_then(|s| s.spec.as_ref())
        .and_then(|s| s.replicas)
        .unwrap_or(rc.spec.replicas);
    // Validate the spec's StatefulSet even when the scale-down below keeps more replicas.
    let mut sts =
        build::stateful_set(rc, rc.spec.replicas, &ctx.broker_image).map_err(spec_error)?;
    // Pods with host access (through spec.override) only when the operator allows them.
    security::check_pods(&ctx.security, rc, &sts).map_err(Error::Spec)?;
    stamp_tls_version(rc, ctx, &mut sts).await?;
    // The pods take the default user from the Secret at start and set it on the broker
    // (`WARREN_DEFAULT_USER_SYNC`): a rotated user rolls them.
    if let Some(meta) = sts.spec.as_mut().and_then(|s| s.template.metadata.as_mut()) {
        meta.annotations
            .get_or_insert_with(Default::default)
            .insert(DEFAULT_USER_VERSION_ANNOTATION.to_string(), user_version);
    }
    check_storage(rc, ctx, current.as_ref()).await?;

    apply_and_report(ctx, rc, sa).await?;
    apply_and_report(ctx, rc, user_secret).await?;
    apply_and_report(ctx, rc, cluster_secret).await?;
    apply_and_report(ctx, rc, config).await?;
    apply_and_report(ctx, rc, nodes).await?;
    apply_and_report(ctx, rc, client_svc).await?;
    apply_and_report(ctx, rc, pdb).await?;

    let mut replicas = rc.spec.replicas;
    if let Some(current) = &current {
        // Nodes removed by an earlier scale-down step leave the broker cluster's membership
        // once their pods are gone; until then no further node is removed.
        let settled = forget_removed_nodes(rc, ctx, &creds, current_replicas, outcome).await?;
        let leftover = if rc.spec.replicas < current_replicas {
            removed_pod_left(rc, ctx, current_replicas).await?
        } else {
            None
        };
        if rc.spec.replicas < current_replicas && !settled {
            replicas = current_replicas;
        } else if let Some(pod) = leftover {
            // The StatefulSet is still removing a pod of an earlier step.
            replicas = current_replicas;
            outcome.progressing = Some(format!(
                "scaling down to {}: waiting for {pod} to be gone",
                rc.spec.replicas
            ));
        } else if rc.spec.replicas < current_replicas {
            // Scale down one node at a time, highest ordinal first: drain it (refusing a node
            // whose going would cost the cluster its majority), shrink the StatefulSet by
            // one, and forget the node once its pod is gone before the next. Forgetting needs
            // a majority, so removing several nodes at once could leave none able to forget.
            let ordinal = current_replicas - 1;
            let pod = format!("{}-{ordinal}", build::server_name(rc));
            if !outcome.drained.iter().any(|d| d.pod == pod) {
                outcome.progressing = Some(format!(
                    "scaling down from {current_replicas} to {}: draining {pod}",
                    rc.spec.replicas
                ));
                let drained = drain_node(rc, ctx, &pod, &creds).await?;
                outcome.drained.push(drained);
            }
            replicas = ordinal;
            ctx.event(
                rc,
                EventType::Normal,
                "ScaledDown",
                format!(
                    "Scaling StatefulSet {} from {current_replicas} to {replicas} after draining {pod}",
                    build::server_name(rc)
                ),
            )
            .await;
            outcome.progressing = Some(format!(
                "scaling down to {}: {pod} is being removed; it is forgotten by the cluster once its pod is gone",
                rc.spec.replicas
            ));
        } else if rc.spec.replicas > current_replicas {
            // Nodes coming back: they no longer count as drained.
            outcome
                .drained
                .retain(|d| ordinal_of(&d.pod).is_none_or(|o| o >= rc.spec.replicas));
        }
        expand_volumes(rc, ctx, current, &mut sts).await?;
    }
    if let Some(spec) = sts.spec.as_mut() {
        spec.replicas = Some(replicas);
    }
    apply_and_report(ctx, rc, sts).await?;
    Ok(())
}

/// Annotation on the pod template with the TLS Secrets' resource versions: the broker reads
/// its certificate at start, so a renewed certificate rolls the pods one at a time.
pub const TLS_VERSION_ANNOTATION: &str = "warren.dev/tls-secret-version";
/// Pod-template annotation that changes when the default user's credentials do.
pub const DEFAULT_USER_VERSION_ANNOTATION: &str = "warren.dev/default-user-version";

/// A digest of the default user's credentials, keyed with the cluster secret (so the
/// annotation tells nothing of the password to whoever may read pods).
fn default_user_version(creds: &Credentials, cluster_secret: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for part in [cluster_secret, &creds.username, &creds.password] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

async fn stamp_tls_version(
    rc: &RabbitCluster,
    ctx: &Context,
    sts: &mut StatefulSet,
) -> Result<(), Error> {
    let Some(tls) = &rc.spec.tls else {
        return Ok(());
    };
    let ns = build::namespace(rc);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let mut versions = Vec::new();
    for (field, name, keys) in [
        (
            "spec.tls.secretName",
            Some(&tls.secret_name),
            &["tls.crt", "tls.key"][..],
        ),
        (
            "spec.tls.caSecretName",
            tls.ca_secret_name.as_ref(),
            &["ca.crt"][..],
        ),
    ] {
        let Some(name) = name else { continue };
        let Some(secret) = secrets.get_opt(name).await? else {
            return Err(Error::Spec(format!(
                "{field}: Secret {ns}/{name} does not exist; create it (keys {})",
                keys.join(", ")
            )));
        };
        if let Some(missing) = keys.iter().find(|k| secret_value(&secret, k).is_none()) {
            return Err(Error::Spec(format!(
                "{field}: Secret {ns}/{name} has no key {missing}"
            )));
        }
        versions.push(secret.metadata.resource_version.unwrap_or_default());
    }
    if let Some(meta) = sts.spec.as_mut().and_then(|s| s.template.metadata.as_mut()) {
        meta.annotations
            .get_or_insert_with(Default::default)
            .insert(TLS_VERSION_ANNOTATION.to_string(), versions.join(","));
    }
    Ok(())
}

/// The management API URL the operator uses for `rc`: its `warren.dev/management-uri`
/// annotation when set — if the operator allows its host ([`security::check_management_uri`]):
/// the default user is an administrator, and the annotation may be set by anyone who may edit
/// the cluster — else `default()`.
fn management_url_of(
    rc: &RabbitCluster,
    ctx: &Context,
    default: impl FnOnce() -> String,
) -> Result<String, Error> {
    match rc.annotations().get(MANAGEMENT_URI_ANNOTATION) {
        Some(uri) => {
            security::check_management_uri(&ctx.security, rc, MANAGEMENT_URI_ANNOTATION, uri)
                .map_err(Error::Spec)?;
            Ok(uri.clone())
        }
        None => Ok(default()),
    }
}

/// The pod the last scale-down step removed (ordinal `replicas`: steps remove one pod at a
/// time, highest first), if it is still there. A `get`, as the chart's RBAC allows on pods.
async fn removed_pod_left(
    rc: &RabbitCluster,
    ctx: &Context,
    replicas: i32,
) -> Result<Option<String>, Error> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &build::namespace(rc));
    let pod = format!("{}-{replicas}", build::server_name(rc));
    Ok(pods.get_opt(&pod).await?.map(|_| pod))
}

/// Where the operator reaches `pod`: its name under the nodes Service, or its IP
/// (`--reach-pods-by-ip`).
async fn pod_host(rc: &RabbitCluster, ctx: &Context, pod: &str) -> Result<String, Error> {
    let ns = build::namespace(rc);
    if !ctx.reach_pods_by_ip {
        return Ok(format!("{pod}.{}.{ns}.svc", build::nodes_service_name(rc)));
    }
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    pods.get_opt(pod)
        .await?
        .and_then(|p| p.status?.pod_ip)
        .ok_or_else(|| Error::Drain(format!("{pod} has no IP yet")))
}

/// Where the operator reaches the cluster's management API: its client Service, or the IP
/// of its lowest Ready pod (`--reach-pods-by-ip`).
async fn cluster_host(rc: &RabbitCluster, ctx: &Context) -> Result<String, Error> {
    let ns = build::namespace(rc);
    if !ctx.reach_pods_by_ip {
        return Ok(format!("{}.{ns}.svc", build::client_service_name(rc)));
    }
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let list = pods
        .list(&ListParams::default().labels(&build::selector_string(rc)))
        .await?;
    let mut ready: Vec<(i32, String)> = list
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none() && pod_ready(p))
        .filter_map(|p| {
            let ordinal = ordinal_of(&p.name_any())?;
            Some((ordinal, p.status?.pod_ip?))
        })
        .collect();
    ready.sort();
    ready
        .into_iter()
        .next()
        .map(|(_, ip)| ip)
        .ok_or_else(|| Error::Drain(format!("no pod of {} is Ready", rc.name_any())))
}

fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn ordinal_of(pod: &str) -> Option<i32> {
    pod.rsplit('-').next().and_then(|o| o.parse().ok())
}

/// The broker node name of `pod` (the StatefulSet's `node-name`: `warren@<pod>.<nodes>.<ns>`).
fn node_name(rc: &RabbitCluster, pod: &str) -> String {
    format!(
        "warren@{pod}.{}.{}",
        build::nodes_service_name(rc),
        build::namespace(rc)
    )
}

/// Forgets, through the cluster's management API (any running node), every drained node
/// whose pod the StatefulSet no longer has and that is gone. True when none is left to
/// forget (the next scale-down step may go ahead).
async fn forget_removed_nodes(
    rc: &RabbitCluster,
    ctx: &Context,
    creds: &Credentials,
    current_replicas: i32,
    outcome: &mut Outcome,
) -> Result<bool, Error> {
    let ns = build::namespace(rc);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let mut settled = true;
    for i in 0..outcome.drained.len() {
        let d = &outcome.drained[i];
        if d.forgotten || ordinal_of(&d.pod).is_none_or(|o| o < current_replicas) {
            continue;
        }
        let pod = d.pod.clone();
        if pods.get_opt(&pod).await?.is_some() {
            outcome.progressing = Some(format!(
                "waiting for {pod} to stop before the cluster forgets it"
            ));
            settled = false;
            continue;
        }
        let host = cluster_host(rc, ctx).await?;
        let url = management_url_of(rc, ctx, || build::management_url(rc, &host))?;
        let node = node_name(rc, &pod);
        let client = management_client(&ctx.client, rc, &url, &creds.username, &creds.password)
            .await
            .map_err(|e| Error::Drain(format!("cannot forget {node}: {e}")))?;
        client.forget(&node).await.map_err(|e| {
            Error::Drain(format!(
                "cannot remove {node} from the broker cluster, so the scale-down waits: {e}"
            ))
        })?;
        ctx.event(
            rc,
            EventType::Normal,
            "Forgotten",
            format!("{node} ({pod}) removed from the broker cluster's membership"),
        )
        .await;
        outcome.drained[i].forgotten = true;
    }
    Ok(settled)
}

/// Drains one node through its management API before it is removed.
async fn drain_node(
    rc: &RabbitCluster,
    ctx: &Context,
    pod: &str,
    creds: &Credentials,
) -> Result<DrainedNode, Error> {
    let ns = build::namespace(rc);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let running = pods.get_opt(pod).await?.is_some_and(|p| {
        p.status
            .and_then(|s| s.phase)
            .is_some_and(|phase| phase == "Running")
    });
    if !running {
        // Nothing runs there to drain; its data stays on its retained volume.
        ctx.event(
            rc,
            EventType::Warning,
            "NodeNotRunning",
            format!(
                "{pod} is not running, so it cannot be drained; removing it. Its data, if any, stays on PersistentVolumeClaim persistence-{pod}"
            ),
        )
        .await;
        return Ok(DrainedNode {
            pod: pod.to_string(),
            drained_at: now,
            queues: vec!["(node not running: not drained; data kept on its volume)".into()],
            forgotten: false,
        });
    }
    let host = pod_host(rc, ctx, pod).await?;
    let url = management_url_of(rc, ctx, || build::management_url(rc, &host))?;
    let client = management_client(&ctx.client, rc, &url, &creds.username, &creds.password)
        .await
        .map_err(|e| Error::Drain(format!("cannot drain {pod}: {e}")))?;
    // A node whose going would leave the cluster without a majority stays until the others
    // are back (RabbitMQ's node-is-quorum-critical check, as its operator does).
    let critical = client
        .quorum_critical()
        .await
        .map_err(|e| Error::Drain(format!("cannot drain {pod}, so the scale-down waits: {e}")))?;
    if let Some(reason) = critical {
        return Err(Error::Drain(format!(
            "{pod} is quorum-critical, so the scale-down waits until the other nodes are up: {reason}"
        )));
    }
    let queues = client
        .drain()
        .await
        .map_err(|e| Error::Drain(format!("cannot drain {pod}, so the scale-down waits: {e}")))?;
    let described: Vec<String> = queues
        .iter()
        .map(|q| format!("{}/{}: {} messages", q.vhost, q.name, q.messages))
        .collect();
    let note = if described.is_empty() {
        format!("Drained {pod}: no queues were left on it")
    } else {
        format!(
            "Drained {pod}: {} queues were left on it (kept on its volume): {}",
            described.len(),
            described.join(", ")
        )
    };
    ctx.event(rc, EventType::Normal, "Drained", note).await;
    Ok(DrainedNode {
        pod: pod.to_string(),
        drained_at: now,
        queues: described,
        forgotten: false,
    })
}

fn claim_storage(sts: &StatefulSet) -> Option<(String, Option<String>)> {
    let claim = sts
        .spec
        .as_ref()?
        .volume_claim_templates
        .as_ref()?
        .iter()
        .find(|c| c.metadata.name.as_deref() == Some("persistence"))?;
    let spec = claim.spec.as_ref()?;
    let size = spec
        .resources
        .as_ref()?
        .requests
        .as_ref()?
        .get("storage")?
        .0
        .clone();
    Some((size, spec.storage_class_name.clone()))
}

/// Refuses storage changes a StatefulSet cannot take, before anything is applied.
async fn check_storage(
    rc: &RabbitCluster,
    ctx: &Context,
    current: Option<&StatefulSet>,
) -> Result<(), Error> {
    let Some(current) = current else {
        return Ok(());
    };
    let existing = claim_storage(current);
    let ephemeral = build::ephemeral_storage(rc);
    match (&existing, ephemeral) {
        (None, true) => return Ok(()),
        (None, false) | (Some(_), true) => {
            return Err(Error::Spec(
                "spec.persistence.storage cannot switch between 0 (emptyDir) and a volume on an existing cluster; \
                 restore the previous value or create a new cluster"
                    .into(),
            ));
        }
        (Some(_), false) => {}
    }
    let Some((size, class)) = existing else {
        return Ok(());
    };
    if rc.spec.persistence.storage_class_name.is_some()
        && rc.spec.persistence.storage_class_name != class
    {
        return Err(Error::Spec(format!(
            "spec.persistence.storageClassName cannot change on an existing cluster (it is {}); restore it",
            class.as_deref().unwrap_or("the default class")
        )));
    }
    let have = parse_quantity(&size).map_err(Error::Spec)?;
    let want = parse_quantity(&rc.spec.persistence.storage.0)
        .map_err(|m| Error::Spec(format!("spec.persistence.storage: {m}")))?;
    if want < have {
        return Err(Error::Spec(format!(
            "spec.persistence.storage cannot shrink from {size} to {}: volumes only grow; restore {size}",
            rc.spec.persistence.storage.0
        )));
    }
    if want > have {
        let class_name = match &class {
            Some(c) => Some(c.clone()),
            None => default_storage_class(ctx).await?,
        };
        let allowed = match &class_name {
            Some(name) => Api::<StorageClass>::all(ctx.client.clone())
                .get_opt(name)
                .await?
                .and_then(|c| c.allow_volume_expansion)
                .unwrap_or(false),
            None => false,
        };
        if !allowed {
            return Err(Error::Spec(format!(
                "spec.persistence.storage cannot grow from {size} to {}: StorageClass {} does not allow volume expansion (allowVolumeExpansion)",
                rc.spec.persistence.storage.0,
                class_name.as_deref().unwrap_or("(none)")
            )));
        }
    }
    Ok(())
}

async fn default_storage_class(ctx: &Context) -> Result<Option<String>, Error> {
    let classes = Api::<StorageClass>::all(ctx.client.clone())
        .list(&Default::default())
        .await?;
    Ok(classes
        .items
        .into_iter()
        .find(|c| {
            c.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get("storageclass.kubernetes.io/is-default-class"))
                .is_some_and(|v| v == "true")
        })
        .and_then(|c| c.metadata.name))
}

/// Grows the volumes: each claim is resized, then the StatefulSet (whose claim template is
/// immutable) is deleted without its pods and applied again with the new template.
async fn expand_volumes(
    rc: &RabbitCluster,
    ctx: &Context,
    current: &StatefulSet,
    desired: &mut StatefulSet,
) -> Result<(), Error> {
    let (Some((have, _)), Some((want, _))) = (claim_storage(current), claim_storage(desired))
    else {
        return Ok(());
    };
    let (Ok(h), Ok(w)) = (parse_quantity(&have), parse_quantity(&want)) else {
        return Ok(());
    };
    if w <= h {
        return Ok(());
    }
    let ns = build::namespace(rc);
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    let replicas = current.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);
    for ordinal in 0..replicas {
        let name = format!("persistence-{}-{ordinal}", build::server_name(rc));
        if pvcs.get_opt(&name).await?.is_none() {
            continue;
        }
        let patch = json!({"spec": {"resources": {"requests": {"storage": want}}}});
        pvcs.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }
    let sts: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &ns);
    let orphan = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Orphan),
        ..Default::default()
    };
    sts.delete(&build::server_name(rc), &orphan).await?;
    // Wait for the old StatefulSet to be gone before applying the new one.
    for _ in 0..50 {
        if sts.get_opt(&build::server_name(rc)).await?.is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ctx.event(
        rc,
        EventType::Normal,
        "VolumesExpanded",
        format!(
            "Expanded the volumes of {} from {have} to {want}",
            build::server_name(rc)
        ),
    )
    .await;
    Ok(())
}

async fn patch_status(
    rc: &RabbitCluster,
    ctx: &Context,
    status: RabbitClusterStatus,
) -> Result<(), Error> {
    let api: Api<RabbitCluster> = Api::namespaced(ctx.client.clone(), &build::namespace(rc));
    let patch = json!({"status": status});
    api.patch_status(
        &rc.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

/// Writes the status; returns whether the cluster is settled (nothing in progress).
async fn write_status(rc: &RabbitCluster, ctx: &Context, outcome: Outcome) -> Result<bool, Error> {
    let ns = build::namespace(rc);
    let sts = Api::<StatefulSet>::namespaced(ctx.client.clone(), &ns)
        .get_opt(&build::server_name(rc))
        .await?;
    let st = sts
        .as_ref()
        .and_then(|s| s.status.clone())
        .unwrap_or_default();
    let sts_replicas = sts
        .as_ref()
        .and_then(|s| s.spec.as_ref())
        .and_then(|s| s.replicas)
        .unwrap_or(0);
    let ready = st.ready_replicas.unwrap_or(0);
    let updated = st.updated_replicas.unwrap_or(0);
    let generation = rc.metadata.generation;
    let mut status = rc.status.clone().unwrap_or_default();
    status.ready_replicas = ready;
    status.replicas = st.replicas;
    status.selector = build::selector_string(rc);
    status.observed_generation = generation;
    status.drained_nodes = outcome.drained;
    status.default_user = Some(DefaultUserStatus {
        secret_reference: SecretReference {
            name: build::default_user_secret_name(rc),
            namespace: ns.clone(),
            keys: [("username", "username"), ("password", "password")]
                .into_iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
        },
        service_reference: ServiceReference {
            name: build::client_service_name(rc),
            namespace: ns.clone(),
        },
    });
    let c = &mut status.conditions;
    let want = rc.spec.replicas;
    let all_ready = ready >= want && st.replicas == want && sts_replicas == want;
    conditions::set(
        c,
        "AllReplicasReady",
        all_ready,
        if all_ready {
            "AllPodsReady"
        } else {
            "NotAllPodsReady"
        },
        format!("{ready} of {want} nodes ready"),
        generation,
    );
    let available = ready > 0;
    conditions::set(
        c,
        "Available",
        available,
        if available {
            "AtLeastOneNodeReady"
        } else {
            "NoNodeReady"
        },
        if available {
            format!(
                "clients can connect through Service {}",
                build::client_service_name(rc)
            )
        } else {
            "no node is ready to accept clients".to_string()
        },
        generation,
    );
    match &outcome.reconciled {
        Ok(()) => conditions::set(
            c,
            "ReconcileSuccess",
            true,
            "Success",
            "the spec is applied",
            generation,
        ),
        Err(message) => conditions::set(
            c,
            "ReconcileSuccess",
            false,
            "InvalidSpec",
            message.clone(),
            generation,
        ),
    }
    let rolling = st.current_revision.is_some()
        && st.update_revision.is_some()
        && st.current_revision != st.update_revision;
    let progressing = outcome.progressing.clone().or_else(|| {
        if sts_replicas != want {
            Some(format!("scaling from {sts_replicas} to {want} nodes"))
        } else if rolling || updated < st.replicas {
            Some(format!(
                "rolling out a new configuration: {updated} of {} nodes updated",
                st.replicas
            ))
        } else if st.observed_generation.unwrap_or(0)
            < sts
                .as_ref()
                .and_then(|s| s.metadata.generation)
                .unwrap_or(0)
        {
            Some("the StatefulSet controller has not seen the latest change yet".into())
        } else if !all_ready {
            Some(format!("waiting for nodes: {ready} of {want} ready"))
        } else {
            None
        }
    });
    match &progressing {
        Some(message) => conditions::set(
            c,
            "Progressing",
            true,
            "Progressing",
            message.clone(),
            generation,
        ),
        None => conditions::set(
            c,
            "Progressing",
            false,
            "Settled",
            "nothing in progress",
            generation,
        ),
    }
    let settled = progressing.is_none() && outcome.reconciled.is_ok();
    if rc.status.as_ref() != Some(&status) {
        patch_status(rc, ctx, status).await?;
    }
    Ok(settled)
}
