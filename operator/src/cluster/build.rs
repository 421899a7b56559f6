//! Pure builders of the objects a `RabbitCluster` owns. No I/O: everything a builder needs
//! (the credentials already in the cluster, for instance) is passed in, so every object the
//! operator applies can be checked by a unit test.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Resource;
use kube::ResourceExt;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::config::{self, ConfigError};
use super::merge::merge;
use crate::crd::cluster::RabbitCluster;
use crate::management::segment;

/// Ports the broker listens on in a pod.
pub const AMQP_PORT: i32 = 5672;
pub const AMQPS_PORT: i32 = 5671;
pub const MANAGEMENT_PORT: i32 = 15672;
/// The management API over HTTPS, on clusters with `spec.tls` (RabbitMQ's 15671).
pub const MANAGEMENT_TLS_PORT: i32 = 15671;
pub const PROMETHEUS_PORT: i32 = 15692;
/// Prometheus metrics over HTTPS, on clusters with `spec.tls` (RabbitMQ's 15691).
pub const PROMETHEUS_TLS_PORT: i32 = 15691;
/// Pod label set on TLS-only clusters (no plain HTTP metrics port), so one PodMonitor can
/// scrape `prometheus` over HTTP everywhere else and `prometheus-tls` over HTTPS there, never
/// both on one pod.
pub const TLS_ONLY_LABEL: &str = "warren.dev/tls-only";

/// Where things live in the broker container.
pub const DATA_DIR: &str = "/var/lib/warren";
pub const CONFIG_DIR: &str = "/etc/warren";
pub const CONFIG_FILE: &str = "warren.toml";
pub const TLS_DIR: &str = "/etc/warren/tls";
pub const CA_DIR: &str = "/etc/warren/ca";
/// The cluster secret's mount (outside CONFIG_DIR, a ConfigMap mount).
pub const CLUSTER_SECRET_DIR: &str = "/etc/warren-cluster";
/// The inter-node port (RabbitMQ's distribution port).
pub const CLUSTER_PORT: i32 = 25672;

/// Annotation on the pod template carrying a hash of everything that needs a restart to
/// take effect, so a change rolls the StatefulSet.
pub const CONFIG_HASH_ANNOTATION: &str = "warren.dev/config-hash";

/// The user id the broker runs as.
const BROKER_UID: i64 = 999;

/// Why a desired object cannot be built from the spec. Shown to the user in the
/// `ReconcileSuccess` condition.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum BuildError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("spec.override.{field} does not make a valid {kind}: {message}")]
    Override {
        field: &'static str,
        kind: &'static str,
        message: String,
    },
    #[error("spec.override.{0} must be an object")]
    OverrideNotObject(&'static str),
    /// An override may change an object, not which object it is.
    #[error(
        "spec.override.{field}.metadata.{key} may not be changed (it would make the operator \
         manage another object than its own: {from:?} → {to:?})"
    )]
    OverrideRenames {
        field: &'static str,
        key: &'static str,
        from: String,
        to: String,
    },
}

/// Credentials held in the cluster's Secrets, read by the controller before building.
#[derive(Clone, Debug, PartialEq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

pub fn server_name(rc: &RabbitCluster) -> String {
    format!("{}-server", rc.name_any())
}
/// The address every node is given as its peer: the first pod's name in the headless
/// Service (`<name>-server-0.<name>-nodes.<namespace>`).
pub fn seed_peer(rc: &RabbitCluster) -> String {
    let pod = format!("{}-0.{}", server_name(rc), nodes_service_name(rc));
    match rc.namespace() {
        Some(ns) => format!("{pod}.{ns}"),
        None => pod,
    }
}

pub fn nodes_service_name(rc: &RabbitCluster) -> String {
    format!("{}-nodes", rc.name_any())
}
pub fn client_service_name(rc: &RabbitCluster) -> String {
    rc.name_any()
}
pub fn default_user_secret_name(rc: &RabbitCluster) -> String {
    format!("{}-default-user", rc.name_any())
}
pub fn cluster_secret_name(rc: &RabbitCluster) -> String {
    format!("{}-cluster-secret", rc.name_any())
}
pub fn config_map_name(rc: &RabbitCluster) -> String {
    format!("{}-config", rc.name_any())
}
pub fn namespace(rc: &RabbitCluster) -> String {
    rc.namespace().unwrap_or_else(|| "default".to_string())
}

/// Labels every owned object carries.
pub fn labels(rc: &RabbitCluster) -> BTreeMap<String, String> {
    let mut l = selector_labels(rc);
    l.insert("app.kubernetes.io/part-of".into(), "warren".into());
    l.insert(
        "app.kubernetes.io/managed-by".into(),
        "warren-operator".into(),
    );
    l
}

/// Labels selecting the cluster's broker pods. Never change: a StatefulSet's selector is
/// immutable.
pub fn selector_labels(rc: &RabbitCluster) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), rc.name_any()),
        (
            "app.kubernetes.io/component".to_string(),
            "broker".to_string(),
        ),
    ])
}

/// The selector as a string, for the scale subresource.
pub fn selector_string(rc: &RabbitCluster) -> String {
    selector_labels(rc)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn owner_reference(rc: &RabbitCluster) -> Option<OwnerReference> {
    rc.controller_owner_ref(&())
}

fn metadata(rc: &RabbitCluster, name: String) -> Value {
    json!({
        "name": name,
        "namespace": namespace(rc),
        "labels": labels(rc),
        "ownerReferences": owner_reference(rc).into_iter().collect::<Vec<_>>(),
    })
}

fn from_json<T: serde::de::DeserializeOwned>(
    value: Value,
    field: &'static str,
    kind: &'static str,
) -> Result<T, BuildError> {
    serde_json::from_value(value).map_err(|e| BuildError::Override {
        field,
        kind,
        message: e.to_string(),
    })
}

fn apply_override(
    mut base: Value,
    over: Option<&Value>,
    field: &'static str,
) -> Result<Value, BuildError> {
    if let Some(over) = over {
        if !over.is_object() {
            return Err(BuildError::OverrideNotObject(field));
        }
        let identity = |v: &Value, key: &str| v["metadata"][key].clone();
        let before = [
            ("name", identity(&base, "name")),
            ("namespace", identity(&base, "namespace")),
        ];
        merge(&mut base, over);
        for (key, was) in before {
            let now = identity(&base, key);
            if now != was {
                let text = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
                return Err(BuildError::OverrideRenames {
                    field,
                    key,
                    from: text(&was),
                    to: text(&now),
                });
            }
        }
    }
    Ok(base)
}

fn tls_only(rc: &RabbitCluster) -> bool {
    rc.spec
        .tls
        .as_ref()
        .is_some_and(|t| t.disable_non_tls_listeners)
}

/// The base URL of the management API on `host`: HTTPS on 15671 when the cluster serves it
/// over TLS only (`disableNonTLSListeners`), HTTP on 15672 otherwise.
pub fn management_url(rc: &RabbitCluster, host: &str) -> String {
    if tls_only(rc) {
        format!("https://{host}:{MANAGEMENT_TLS_PORT}")
    } else {
        format!("http://{host}:{MANAGEMENT_PORT}")
    }
}

/// The Secret whose `ca.crt` the operator trusts for the cluster's HTTPS management API:
/// `spec.tls.caSecretName`, else `spec.tls.secretName` (cert-manager puts the issuing CA there).
pub fn management_ca_secret(rc: &RabbitCluster) -> Option<&str> {
    let tls = rc.spec.tls.as_ref()?;
    Some(tls.ca_secret_name.as_deref().unwrap_or(&tls.secret_name))
}

/// An HTTP endpoint's ports: `(plain, port)` over HTTP unless the cluster is TLS only, and
/// `(tls, tls_port)` over HTTPS with TLS.
fn http_ports(
    rc: &RabbitCluster,
    (plain, port): (&'static str, i32),
    (tls, tls_port): (&'static str, i32),
) -> Vec<(&'static str, i32, &'static str)> {
    let mut ports = Vec::new();
    if !tls_only(rc) {
        ports.push((plain, port, "http"));
    }
    if rc.spec.tls.is_some() {
        ports.push((tls, tls_port, "https"));
    }
    ports
}

/// The management API's ports.
fn management_ports(rc: &RabbitCluster) -> Vec<(&'static str, i32, &'static str)> {
    http_ports(
        rc,
        ("management", MANAGEMENT_PORT),
        ("management-tls", MANAGEMENT_TLS_PORT),
    )
}

/// The Prometheus endpoint's ports.
fn prometheus_ports(rc: &RabbitCluster) -> Vec<(&'static str, i32, &'static str)> {
    http_ports(
        rc,
        ("prometheus", PROMETHEUS_PORT),
        ("prometheus-tls", PROMETHEUS_TLS_PORT),
    )
}

/// Headless Service giving each node a stable DNS name (`<pod>.<name>-nodes`); it publishes
/// addresses before pods are ready so nodes can find each other while starting.
pub fn nodes_service(rc: &RabbitCluster) -> Result<Service, BuildError> {
    let mut ports = vec![
        json!({"name": "amqp", "port": AMQP_PORT, "targetPort": AMQP_PORT, "protocol": "TCP"}),
    ];
    for (name, port, _) in management_ports(rc) {
        ports.push(json!({"name": name, "port": port, "targetPort": port, "protocol": "TCP"}));
    }
    ports.push(json!({"name": "cluster", "port": CLUSTER_PORT, "targetPort": CLUSTER_PORT, "protocol": "TCP"}));
    let v = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(rc, nodes_service_name(rc)),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": true,
            "selector": selector_labels(rc),
            "ports": ports,
        },
    });
    from_json(v, "service", "Service")
}

/// The Service clients connect to.
pub fn client_service(rc: &RabbitCluster) -> Result<Service, BuildError> {
    let mut ports = Vec::new();
    if !tls_only(rc) {
        ports.push(json!({"name": "amqp", "port": AMQP_PORT, "targetPort": AMQP_PORT, "protocol": "TCP", "appProtocol": "amqp"}));
    }
    if rc.spec.tls.is_some() {
        ports.push(json!({"name": "amqps", "port": AMQPS_PORT, "targetPort": AMQPS_PORT, "protocol": "TCP", "appProtocol": "amqps"}));
    }
    for (name, port, app) in management_ports(rc) {
        ports.push(json!({"name": name, "port": port, "targetPort": port, "protocol": "TCP", "appProtocol": app}));
    }
    for (name, port, app) in prometheus_ports(rc) {
        ports.push(json!({"name": name, "port": port, "targetPort": port, "protocol": "TCP", "appProtocol": app}));
    }
    let mut meta = metadata(rc, client_service_name(rc));
    let mut service_labels = labels(rc);
    for (k, v) in &rc.spec.service.labels {
        service_labels.insert(k.clone(), v.clone());
    }
    meta["labels"] = json!(service_labels);
    if !rc.spec.service.annotations.is_empty() {
        meta["annotations"] = json!(rc.spec.service.annotations);
    }
    let v = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "type": rc.spec.service.type_.as_str(),
            "selector": selector_labels(rc),
            "ports": ports,
        },
    });
    let v = apply_override(v, rc.spec.override_.service.as_ref(), "service")?;
    from_json(v, "service", "Service")
}

/// The default user's Secret, in the service-binding layout
/// (<https://servicebinding.io/spec/core/1.0.0/#well-known-secret-entries>).
pub fn default_user_secret(rc: &RabbitCluster, creds: &Credentials) -> Result<Secret, BuildError> {
    let host = format!("{}.{}.svc", client_service_name(rc), namespace(rc));
    let (scheme, port) = if tls_only(rc) {
        ("amqps", AMQPS_PORT)
    } else {
        ("amqp", AMQP_PORT)
    };
    let uri = format!(
        "{scheme}://{}:{}@{host}:{port}",
        segment(&creds.username),
        segment(&creds.password)
    );
    let v = json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata(rc, default_user_secret_name(rc)),
        "type": "servicebinding.io/rabbitmq",
        "stringData": {
            "username": creds.username,
            "password": creds.password,
            "host": host,
            "port": port.to_string(),
            "uri": uri,
            "management-uri": management_url(rc, &host),
            "type": "rabbitmq",
            "provider": "warren",
        },
    });
    from_json(v, "defaultUser", "Secret")
}

/// The secret nodes use to authenticate to each other.
pub fn cluster_secret(rc: &RabbitCluster, secret: &str) -> Result<Secret, BuildError> {
    let v = json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata(rc, cluster_secret_name(rc)),
        "type": "Opaque",
        "stringData": { "secret": secret },
    });
    from_json(v, "clusterSecret", "Secret")
}

/// The broker configuration file.
pub fn config_map(rc: &RabbitCluster) -> Result<ConfigMap, BuildError> {
    let text = config::render(rc)?;
    let v = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(rc, config_map_name(rc)),
        "data": { CONFIG_FILE: text },
    });
    from_json(v, "config", "ConfigMap")
}

/// The broker pods' ServiceAccount. The broker does not call the Kubernetes API, so no
/// token is mounted and no Role is bound.
pub fn service_account(rc: &RabbitCluster) -> Result<ServiceAccount, BuildError> {
    let v = json!({
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": metadata(rc, server_name(rc)),
        "automountServiceAccountToken": false,
    });
    from_json(v, "serviceAccount", "ServiceAccount")
}

/// At most one broker pod down at a time through voluntary disruptions (node drains).
pub fn pod_disruption_budget(rc: &RabbitCluster) -> Result<PodDisruptionBudget, BuildError> {
    let v = json!({
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata(rc, server_name(rc)),
        "spec": {
            "maxUnavailable": 1,
            "selector": { "matchLabels": selector_labels(rc) },
        },
    });
    from_json(v, "podDisruptionBudget", "PodDisruptionBudget")
}

/// Whether the data lives in an emptyDir (`persistence.storage: 0`).
pub fn ephemeral_storage(rc: &RabbitCluster) -> bool {
    matches!(
        config::parse_quantity(&rc.spec.persistence.storage.0),
        Ok(0)
    )
}

/// Hash of everything that only takes effect when a pod restarts: the configuration file
/// and the TLS Secrets' names.
pub fn config_hash(rc: &RabbitCluster) -> Result<String, BuildError> {
    let mut h = Sha256::new();
    h.update(config::render(rc)?.as_bytes());
    if let Some(tls) = &rc.spec.tls {
        h.update(tls.secret_name.as_bytes());
        h.update([0]);
        h.update(tls.ca_secret_name.as_deref().unwrap_or("").as_bytes());
    }
    let digest = h.finalize();
    Ok(digest.iter().take(8).map(|b| format!("{b:02x}")).collect())
}

/// The broker StatefulSet. `replicas` is passed in: during a scale-down it stays above
/// `spec.replicas` until the nodes being removed are drained. `default_image` is the broker
/// image when `spec.image` is not set (the operator's `--broker-image`).
pub fn stateful_set(
    rc: &RabbitCluster,
    replicas: i32,
    default_image: &str,
) -> Result<StatefulSet, BuildError> {
    let ns = namespace(rc);
    let nodes = nodes_service_name(rc);
    let user_secret = default_user_secret_name(rc);
    let image = rc
        .spec
        .image
        .clone()
        .unwrap_or_else(|| default_image.to_string());

    let mut ports = Vec::new();
    if !tls_only(rc) {
        ports.push(json!({"name": "amqp", "containerPort": AMQP_PORT, "protocol": "TCP"}));
    }
    for (name, port, _) in management_ports(rc) {
        ports.push(json!({"name": name, "containerPort": port, "protocol": "TCP"}));
    }
    for (name, port, _) in prometheus_ports(rc) {
        ports.push(json!({"name": name, "containerPort": port, "protocol": "TCP"}));
    }
    if rc.spec.tls.is_some() {
        ports.push(json!({"name": "amqps", "containerPort": AMQPS_PORT, "protocol": "TCP"}));
    }
    ports.push(json!({"name": "cluster", "containerPort": CLUSTER_PORT, "protocol": "TCP"}));
    // The startup probe waits for the management API, on whichever port serves it; the
    // readiness probe and preStop hook (`warren-broker check ready`, `drain`) read the same
    // configuration file as the node (WARREN_CONFIG below) and use HTTPS when plain HTTP is
    // off.
    let management_port = if tls_only(rc) {
        "management-tls"
    } else {
        "management"
    };

    let mut mounts = vec![
        json!({"name": "persistence", "mountPath": DATA_DIR}),
        json!({"name": "config", "mountPath": CONFIG_DIR, "readOnly": true}),
        json!({"name": "tmp", "mountPath": "/tmp"}),
        json!({"name": "cluster-secret", "mountPath": CLUSTER_SECRET_DIR, "readOnly": true}),
    ];
    let mut volumes = vec![
        json!({"name": "config", "configMap": {"name": config_map_name(rc)}}),
        json!({"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}),
        // Readable by the broker's group only (fsGroup): 0440.
        json!({"name": "cluster-secret", "secret": {"secretName": cluster_secret_name(rc), "defaultMode": 0o440}}),
    ];
    if let Some(tls) = &rc.spec.tls {
        mounts.push(json!({"name": "tls", "mountPath": TLS_DIR, "readOnly": true}));
        volumes.push(json!({"name": "tls", "secret": {"secretName": tls.secret_name}}));
        if let Some(ca) = &tls.ca_secret_name {
            mounts.push(json!({"name": "tls-ca", "mountPath": CA_DIR, "readOnly": true}));
            volumes.push(json!({"name": "tls-ca", "secret": {"secretName": ca}}));
        }
    }
    let ephemeral = ephemeral_storage(rc);
    if ephemeral {
        volumes.push(json!({"name": "persistence", "emptyDir": {}}));
    }

    let resources = match &rc.spec.resources {
        Some(r) => serde_json::to_value(r).unwrap_or(Value::Null),
        None => json!({
            "requests": {"cpu": "1", "memory": "2Gi"},
            "limits": {"memory": "2Gi"},
        }),
    };

    let mut pod_spec = json!({
        "serviceAccountName": server_name(rc),
        "automountServiceAccountToken": false,
        "terminationGracePeriodSeconds": rc.spec.termination_grace_period_seconds,
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": BROKER_UID,
            "runAsGroup": BROKER_UID,
            "fsGroup": BROKER_UID,
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [{
            "name": "warren",
            "image": image,
            "args": ["--config", format!("{CONFIG_DIR}/{CONFIG_FILE}")],
            "env": [
                // The exec probe and hook (`warren-broker check ready`, `drain`) get no
                // `--config`: through the environment they read the node's file too, so on a
                // TLS-only cluster they reach the management API over HTTPS.
                {"name": "WARREN_CONFIG", "value": format!("{CONFIG_DIR}/{CONFIG_FILE}")},
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "WARREN_NODE_NAME", "value": format!("warren@$(POD_NAME).{nodes}.{ns}")},
                {"name": "WARREN_DEFAULT_USER", "valueFrom": {"secretKeyRef": {"name": user_secret, "key": "username"}}},
                {"name": "WARREN_DEFAULT_PASS", "valueFrom": {"secretKeyRef": {"name": user_secret, "key": "password"}}},
                // A rotated default user (the pods roll) is set on the broker at start.
                {"name": "WARREN_DEFAULT_USER_SYNC", "value": "true"},
            ],
            "ports": ports,
            "resources": resources,
            "readinessProbe": {
                "exec": {"command": ["warren-broker", "check", "ready"]},
                "initialDelaySeconds": 5,
                "periodSeconds": 10,
                "timeoutSeconds": 8,
                "failureThreshold": 3,
            },
            "startupProbe": {
                "tcpSocket": {"port": management_port},
                "periodSeconds": 5,
                "failureThreshold": 120,
            },
            "lifecycle": {
                "preStop": {"exec": {"command": ["warren-broker", "drain"]}},
            },
            "volumeMounts": mounts,
            "securityContext": {
                "allowPrivilegeEscalation": false,
                "readOnlyRootFilesystem": true,
                "runAsNonRoot": true,
                "capabilities": {"drop": ["ALL"]},
            },
        }],
        "volumes": volumes,
    });
    if !rc.spec.image_pull_secrets.is_empty() {
        pod_spec["imagePullSecrets"] = json!(rc.spec.image_pull_secrets);
    }
    if let Some(affinity) = &rc.spec.affinity {
        pod_spec["affinity"] = json!(affinity);
    }
    if !rc.spec.tolerations.is_empty() {
        pod_spec["tolerations"] = json!(rc.spec.tolerations);
    }
    if !rc.spec.node_selector.is_empty() {
        pod_spec["nodeSelector"] = json!(rc.spec.node_selector);
    }
    if rc.spec.spread_over_zones {
        let spread = |key: &str| {
            json!({
                "maxSkew": 1,
                "topologyKey": key,
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": selector_labels(rc)},
            })
        };
        pod_spec["topologySpreadConstraints"] = json!([
            spread("topology.kubernetes.io/zone"),
            spread("kubernetes.io/hostname"),
        ]);
    }

    let mut template_labels = labels(rc);
    template_labels.extend(selector_labels(rc));
    if tls_only(rc) {
        template_labels.insert(TLS_ONLY_LABEL.to_string(), "true".to_string());
    }
    let mut spec = json!({
        "replicas": replicas,
        "serviceName": nodes,
        "podManagementPolicy": "Parallel",
        "selector": {"matchLabels": selector_labels(rc)},
        "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"partition": 0}},
        "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Retain", "whenScaled": "Retain"},
        "template": {
            "metadata": {
                "labels": template_labels,
                "annotations": {CONFIG_HASH_ANNOTATION: config_hash(rc)?},
            },
            "spec": pod_spec,
        },
    });
    if !ephemeral {
        let mut claim_spec = json!({
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": rc.spec.persistence.storage}},
        });
        if let Some(class) = &rc.spec.persistence.storage_class_name {
            claim_spec["storageClassName"] = json!(class);
        }
        spec["volumeClaimTemplates"] = json!([{
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "persistence", "labels": selector_labels(rc)},
            "spec": claim_spec,
        }]);
    }
    let v = json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": metadata(rc, server_name(rc)),
        "spec": spec,
    });
    let v = apply_override(v, rc.spec.override_.stateful_set.as_ref(), "statefulSet")?;
    from_json(v, "statefulSet", "StatefulSet")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::cluster::{DEFAULT_IMAGE, RabbitClusterSpec, TlsSpec};
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    fn cluster(spec: serde_json::Value) -> RabbitCluster {
        let spec: RabbitClusterSpec = serde_json::from_value(spec).expect("spec");
        let mut rc = RabbitCluster::new("hare", spec);
        rc.metadata.namespace = Some("apps".into());
        rc.metadata.uid = Some("1234".into());
        rc
    }

    fn creds() -> Credentials {
        Credentials {
            username: "default_user_x".into(),
            password: "p@ss/word".into(),
        }
    }

    #[test]
    fn defaults_fill_a_minimal_spec() {
        let rc = cluster(json!({}));
        assert_eq!(rc.spec.replicas, 3);
        assert_eq!(rc.spec.persistence.storage, Quantity("10Gi".into()));
        assert_eq!(rc.spec.termination_grace_period_seconds, 600);
    }

    #[test]
    fn every_object_is_owned_by_the_cluster_and_labelled() {
        let rc = cluster(json!({}));
        let metas = vec![
            nodes_service(&rc).expect("svc").metadata,
            client_service(&rc).expect("svc").metadata,
            default_user_secret(&rc, &creds()).expect("secret").metadata,
            cluster_secret(&rc, "s").expect("secret").metadata,
            config_map(&rc).expect("cm").metadata,
            service_account(&rc).expect("sa").metadata,
            pod_disruption_budget(&rc).expect("pdb").metadata,
            stateful_set(&rc, 3, DEFAULT_IMAGE).expect("sts").metadata,
        ];
        for m in metas {
            let owners = m.owner_references.expect("owner references");
            assert_eq!(owners.len(), 1);
            assert_eq!(owners[0].kind, "RabbitCluster");
            assert_eq!(owners[0].name, "hare");
            assert_eq!(owners[0].controller, Some(true));
            assert_eq!(m.namespace.as_deref(), Some("apps"));
            let labels = m.labels.expect("labels");
            assert_eq!(labels["app.kubernetes.io/name"], "hare");
            assert_eq!(labels["app.kubernetes.io/managed-by"], "warren-operator");
        }
    }

    #[test]
    fn headless_service_publishes_not_ready_addresses() {
        let svc = nodes_service(&cluster(json!({}))).expect("svc");
        let spec = svc.spec.expect("spec");
        assert_eq!(svc.metadata.name.as_deref(), Some("hare-nodes"));
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
        assert_eq!(spec.publish_not_ready_addresses, Some(true));
    }

    #[test]
    fn client_service_ports_follow_tls() {
        let names = |rc: &RabbitCluster| -> Vec<String> {
            client_service(rc)
                .expect("svc")
                .spec
                .expect("spec")
                .ports
                .expect("ports")
                .into_iter()
                .filter_map(|p| p.name)
                .collect()
        };
        assert_eq!(
            names(&cluster(json!({}))),
            ["amqp", "management", "prometheus"]
        );
        assert_eq!(
            names(&cluster(json!({"tls": {"secretName": "t"}}))),
            [
                "amqp",
                "amqps",
                "management",
                "management-tls",
                "prometheus",
                "prometheus-tls"
            ]
        );
        assert_eq!(
            names(&cluster(
                json!({"tls": {"secretName": "t", "disableNonTLSListeners": true}})
            )),
            ["amqps", "management-tls", "prometheus-tls"]
        );
        let tls_port = |name: &str| {
            let p = client_service(&cluster(json!({"tls": {"secretName": "t"}})))
                .expect("svc")
                .spec
                .expect("spec")
                .ports
                .expect("ports")
                .into_iter()
                .find(|p| p.name.as_deref() == Some(name))
                .expect("port");
            (p.port, p.app_protocol)
        };
        assert_eq!(tls_port("management-tls"), (15671, Some("https".into())));
        assert_eq!(tls_port("prometheus-tls"), (15691, Some("https".into())));
    }

    #[test]
    fn management_over_https_follows_tls() {
        let ports = |rc: &RabbitCluster| -> (Vec<i32>, Vec<i32>) {
            let nodes = nodes_service(rc).expect("svc").spec.expect("spec");
            let nodes = nodes.ports.expect("ports").iter().map(|p| p.port).collect();
            let pod = stateful_set(rc, 1, DEFAULT_IMAGE)
                .expect("sts")
                .spec
                .expect("spec")
                .template
                .spec
                .expect("pod");
            let container = pod.containers[0]
                .ports
                .clone()
                .expect("ports")
                .iter()
                .map(|p| p.container_port)
                .collect();
            (nodes, container)
        };
        let plain = cluster(json!({}));
        // 25672: the inter-node port, in the headless Service and on every pod.
        assert_eq!(
            ports(&plain),
            (vec![5672, 15672, 25672], vec![5672, 15672, 15692, 25672])
        );
        let tls = cluster(json!({"tls": {"secretName": "t"}}));
        assert_eq!(
            ports(&tls),
            (
                vec![5672, 15672, 15671, 25672],
                vec![5672, 15672, 15671, 15692, 15691, 5671, 25672]
            )
        );
        let only = cluster(json!({"tls": {"secretName": "t", "disableNonTLSListeners": true}}));
        assert_eq!(
            ports(&only),
            (vec![5672, 15671, 25672], vec![15671, 15691, 5671, 25672])
        );
        // Only TLS-only pods carry the label a PodMonitor uses to scrape them over HTTPS.
        let tls_only_label = |rc: &RabbitCluster| {
            stateful_set(rc, 1, DEFAULT_IMAGE)
                .expect("sts")
                .spec
                .expect("spec")
                .template
                .metadata
                .expect("meta")
                .labels
                .expect("labels")
                .get(TLS_ONLY_LABEL)
                .cloned()
        };
        assert_eq!(tls_only_label(&tls), None);
        assert_eq!(tls_only_label(&only).as_deref(), Some("true"));

        // The operator's URL, the default user's management-uri and the CA it trusts.
        assert_eq!(management_url(&plain, "h"), "http://h:15672");
        assert_eq!(management_url(&tls, "h"), "http://h:15672");
        assert_eq!(management_url(&only, "h"), "https://h:15671");
        let uri = |rc: &RabbitCluster| {
            default_user_secret(rc, &creds())
                .expect("secret")
                .string_data
                .expect("data")["management-uri"]
                .clone()
        };
        assert_eq!(uri(&plain), "http://hare.apps.svc:15672");
        assert_eq!(uri(&only), "https://hare.apps.svc:15671");
        assert_eq!(management_ca_secret(&plain), None);
        assert_eq!(management_ca_secret(&only), Some("t"));
        let with_ca = cluster(json!({"tls": {"secretName": "t", "caSecretName": "ca"}}));
        assert_eq!(management_ca_secret(&with_ca), Some("ca"));

        // The startup probe waits on the port that serves the API.
        let startup = |rc: &RabbitCluster| {
            let pod = stateful_set(rc, 1, DEFAULT_IMAGE)
                .expect("sts")
                .spec
                .expect("spec")
                .template
                .spec
                .expect("pod");
            let probe = pod.containers[0].startup_probe.clone().expect("probe");
            serde_json::to_value(probe.tcp_socket.expect("tcp").port).expect("port")
        };
        assert_eq!(startup(&tls), json!("management"));
        assert_eq!(startup(&only), json!("management-tls"));
    }

    #[test]
    fn client_service_takes_type_annotations_and_override() {
        let rc = cluster(json!({
            "service": {"type": "LoadBalancer", "annotations": {"a": "b"}, "labels": {"team": "x"}},
            "override": {"service": {"spec": {"loadBalancerSourceRanges": ["10.0.0.0/8"]}}},
        }));
        let svc = client_service(&rc).expect("svc");
        let spec = svc.spec.expect("spec");
        assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
        assert_eq!(
            spec.load_balancer_source_ranges,
            Some(vec!["10.0.0.0/8".to_string()])
        );
        assert_eq!(svc.metadata.annotations.expect("ann")["a"], "b");
        assert_eq!(svc.metadata.labels.expect("labels")["team"], "x");
    }

    #[test]
    fn default_user_secret_has_the_service_binding_keys() {
        let s = default_user_secret(&cluster(json!({})), &creds()).expect("secret");
        let data = s.string_data.expect("data");
        for key in [
            "username", "password", "host", "port", "uri", "type", "provider",
        ] {
            assert!(data.contains_key(key), "missing {key}");
        }
        assert_eq!(data["host"], "hare.apps.svc");
        assert_eq!(data["port"], "5672");
        assert_eq!(
            data["uri"],
            "amqp://default_user_x:p%40ss%2Fword@hare.apps.svc:5672"
        );
        assert_eq!(data["type"], "rabbitmq");
        let tls = cluster(json!({"tls": {"secretName": "t", "disableNonTLSListeners": true}}));
        let data = default_user_secret(&tls, &creds())
            .expect("secret")
            .string_data
            .expect("d");
        assert!(data["uri"].starts_with("amqps://"));
        assert_eq!(data["port"], "5671");
    }

    #[test]
    fn stateful_set_is_hardened_and_probed() {
        let sts = stateful_set(&cluster(json!({})), 3, DEFAULT_IMAGE).expect("sts");
        assert_eq!(sts.metadata.name.as_deref(), Some("hare-server"));
        let spec = sts.spec.expect("spec");
        assert_eq!(spec.replicas, Some(3));
        assert_eq!(spec.service_name.as_deref(), Some("hare-nodes"));
        let template = spec.template;
        assert!(
            template
                .metadata
                .as_ref()
                .and_then(|m| m.annotations.as_ref())
                .is_some_and(|a| a.contains_key(CONFIG_HASH_ANNOTATION))
        );
        let pod = template.spec.expect("pod spec");
        let psc = pod.security_context.expect("pod security context");
        assert_eq!(psc.run_as_non_root, Some(true));
        let c = &pod.containers[0];
        let sc = c
            .security_context
            .as_ref()
            .expect("container security context");
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(
            sc.capabilities.as_ref().and_then(|c| c.drop.clone()),
            Some(vec!["ALL".to_string()])
        );
        let ready = c
            .readiness_probe
            .as_ref()
            .and_then(|p| p.exec.as_ref())
            .expect("probe");
        assert_eq!(
            ready.command.as_deref(),
            Some(&["warren-broker".to_string(), "check".into(), "ready".into()][..])
        );
        let pre_stop = c
            .lifecycle
            .as_ref()
            .and_then(|l| l.pre_stop.as_ref())
            .and_then(|h| h.exec.as_ref())
            .expect("preStop");
        assert_eq!(
            pre_stop.command.as_deref(),
            Some(&["warren-broker".to_string(), "drain".into()][..])
        );
        assert_eq!(
            c.args.as_deref(),
            Some(&["--config".to_string(), "/etc/warren/warren.toml".into()][..])
        );
        // The probe and hook run without args: they find the config through the environment.
        let config_env = c
            .env
            .as_ref()
            .and_then(|env| env.iter().find(|e| e.name == "WARREN_CONFIG"))
            .and_then(|e| e.value.as_deref());
        assert_eq!(config_env, Some("/etc/warren/warren.toml"));
        let claims = spec.volume_claim_templates.expect("claims");
        assert_eq!(claims[0].metadata.name.as_deref(), Some("persistence"));
        assert_eq!(pod.topology_spread_constraints.map(|t| t.len()), Some(2));
    }

    #[test]
    fn spec_image_wins_over_the_operator_default() {
        let image = |rc: &RabbitCluster| {
            stateful_set(rc, 1, "registry.example.com/warren-broker:1.2.3")
                .expect("sts")
                .spec
                .and_then(|s| s.template.spec)
                .and_then(|p| p.containers[0].image.clone())
        };
        assert_eq!(
            image(&cluster(json!({}))).as_deref(),
            Some("registry.example.com/warren-broker:1.2.3")
        );
        assert_eq!(
            image(&cluster(json!({"image": "mine/warren:dev"}))).as_deref(),
            Some("mine/warren:dev")
        );
    }

    #[test]
    fn zero_storage_means_empty_dir() {
        let rc = cluster(json!({"persistence": {"storage": "0"}}));
        let spec = stateful_set(&rc, 1, DEFAULT_IMAGE)
            .expect("sts")
            .spec
            .expect("spec");
        assert!(spec.volume_claim_templates.is_none());
        let pod = spec.template.spec.expect("pod");
        let vols = pod.volumes.expect("volumes");
        assert!(
            vols.iter()
                .any(|v| v.name == "persistence" && v.empty_dir.is_some())
        );
    }

    #[test]
    fn tls_mounts_the_secrets() {
        let rc = cluster(json!({"tls": {"secretName": "cert", "caSecretName": "ca"}}));
        let pod = stateful_set(&rc, 1, DEFAULT_IMAGE)
            .expect("sts")
            .spec
            .expect("spec")
            .template
            .spec
            .expect("pod");
        let vols = pod.volumes.expect("volumes");
        assert!(
            vols.iter()
                .any(|v| v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) == Some("cert"))
        );
        assert!(
            vols.iter()
                .any(|v| v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) == Some("ca"))
        );
        let ports: Vec<_> = pod.containers[0]
            .ports
            .clone()
            .expect("ports")
            .into_iter()
            .map(|p| p.container_port)
            .collect();
        assert!(ports.contains(&5671));
    }

    #[test]
    fn config_change_changes_the_hash_and_nothing_else_does() {
        let a = cluster(json!({}));
        let b = cluster(json!({"replicas": 5}));
        let c = cluster(json!({"config": {"heartbeat": 30}}));
        assert_eq!(config_hash(&a).expect("a"), config_hash(&b).expect("b"));
        assert_ne!(config_hash(&a).expect("a"), config_hash(&c).expect("c"));
    }

    #[test]
    fn override_merges_into_the_stateful_set() {
        let rc = cluster(
            json!({"override": {"statefulSet": {"spec": {"template": {"spec": {
                "containers": [{"name": "warren", "env": [{"name": "EXTRA", "value": "1"}]}],
                "priorityClassName": "high",
            }}}}}}),
        );
        let pod = stateful_set(&rc, 1, DEFAULT_IMAGE)
            .expect("sts")
            .spec
            .expect("spec")
            .template
            .spec
            .expect("pod");
        assert_eq!(pod.priority_class_name.as_deref(), Some("high"));
        assert_eq!(pod.containers.len(), 1);
        let env = pod.containers[0].env.clone().expect("env");
        assert!(env.iter().any(|e| e.name == "EXTRA"));
        assert!(env.iter().any(|e| e.name == "WARREN_DEFAULT_USER"));
    }

    #[test]
    fn a_broken_override_is_an_error_not_a_panic() {
        let rc = cluster(json!({"override": {"statefulSet": {"spec": {"replicas": "many"}}}}));
        let err = stateful_set(&rc, 1, DEFAULT_IMAGE).expect_err("must fail");
        assert!(
            err.to_string().contains("spec.override.statefulSet"),
            "{err}"
        );
    }

    #[test]
    fn an_override_may_not_rename_an_object_or_move_it_to_another_namespace() {
        for (field, key, value) in [
            ("statefulSet", "name", "someone-elses"),
            ("statefulSet", "namespace", "kube-system"),
            ("service", "name", "other-service"),
            ("service", "namespace", "kube-system"),
        ] {
            let rc = cluster(json!({"override": {field: {"metadata": {key: value}}}}));
            let err = if field == "statefulSet" {
                stateful_set(&rc, 1, DEFAULT_IMAGE).map(|_| ())
            } else {
                client_service(&rc).map(|_| ())
            }
            .expect_err("an override that renames must fail");
            let text = err.to_string();
            assert!(
                text.contains(&format!(
                    "spec.override.{field}.metadata.{key} may not be changed"
                )) && text.contains(value),
                "{text}"
            );
        }
        // Labels and annotations still merge.
        let rc =
            cluster(json!({"override": {"statefulSet": {"metadata": {"labels": {"team": "a"}}}}}));
        let sts = stateful_set(&rc, 1, DEFAULT_IMAGE).expect("labels may be added");
        assert_eq!(
            sts.metadata
                .labels
                .expect("labels")
                .get("team")
                .map(String::as_str),
            Some("a")
        );
    }

    #[test]
    fn tls_spec_default_keeps_plain_listener() {
        let t = TlsSpec::default();
        assert!(!t.disable_non_tls_listeners);
    }
}
