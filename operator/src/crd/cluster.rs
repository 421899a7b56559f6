//! `RabbitCluster`: a Warren cluster — the StatefulSet of broker nodes and everything
//! around it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, LocalObjectReference, ResourceRequirements, Toleration,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The image used when `spec.image` is not set.
pub const DEFAULT_IMAGE: &str = concat!(
    "ghcr.io/warren-dev/warren-broker:",
    env!("CARGO_PKG_VERSION")
);

/// A Warren cluster: broker nodes in a StatefulSet, the Services clients use, the default
/// user's credentials and the broker configuration.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "warren.dev",
    version = "v1alpha1",
    kind = "RabbitCluster",
    namespaced,
    status = "RabbitClusterStatus",
    shortname = "rabbit",
    category = "warren",
    doc = "A Warren cluster: RabbitMQ-compatible broker nodes run by the Warren operator.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(
        name = "Available",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Available\")].status"
    ),
    printcolumn(
        name = "Reconciled",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"ReconcileSuccess\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct RabbitClusterSpec {
    /// Number of broker nodes. Odd numbers keep a majority through the loss of a node.
    /// Lowering it drains the highest-numbered nodes first; 0 stops the cluster and keeps
    /// its volumes.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 99))]
    pub replicas: i32,
    /// Broker container image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Secrets used to pull the image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,
    /// Where each node keeps its data.
    #[serde(default)]
    pub persistence: Persistence,
    /// CPU and memory for the broker container. Defaults to requests of 1 CPU and 2Gi, and a
    /// 2Gi memory limit. The broker's memory alarm is computed against the memory limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Pod affinity rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Pod tolerations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Node labels a broker pod's node must have.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Spread nodes over zones and hosts (a soft topology spread constraint on each).
    #[serde(default = "default_true")]
    pub spread_over_zones: bool,
    /// The client Service `<name>`.
    #[serde(default)]
    pub service: ServiceSpec,
    /// TLS for AMQP (amqps on 5671).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
    /// Broker configuration, typed and validated.
    #[serde(default)]
    pub config: BrokerConfig,
    /// Where the default user's credentials come from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_user: Option<DefaultUserSpec>,
    /// Fields merged into the objects the operator builds.
    #[serde(
        default,
        rename = "override",
        skip_serializing_if = "Override::is_empty"
    )]
    pub override_: Override,
    /// Seconds a node gets to drain and stop before it is killed.
    #[serde(default = "default_grace")]
    #[schemars(range(min = 0))]
    pub termination_grace_period_seconds: i64,
}

/// Storage for each node.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Persistence {
    /// StorageClass of each node's PersistentVolumeClaim; the cluster default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// Size of each node's volume. `0` puts the data in an emptyDir, which is lost with
    /// the pod. Raising it expands the claims when their StorageClass allows expansion;
    /// lowering it is refused.
    #[serde(default = "default_storage")]
    #[x_kube(validation = kube::core::Rule::new("type(self) == int ? self >= 0 : isQuantity(self)").message("storage is a quantity such as 10Gi, or 0 for an emptyDir"))]
    pub storage: Quantity,
}

impl Default for Persistence {
    fn default() -> Self {
        Persistence {
            storage_class_name: None,
            storage: default_storage(),
        }
    }
}

/// The client Service.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// Service type.
    #[serde(default, rename = "type")]
    pub type_: ServiceType,
    /// Annotations added to the Service (e.g. for a cloud load balancer).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Labels added to the Service.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// Kubernetes Service types.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
}

impl ServiceType {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        }
    }
}

/// TLS for client connections.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// A `kubernetes.io/tls` Secret (`tls.crt`, `tls.key`) with the server certificate.
    #[schemars(length(min = 1))]
    pub secret_name: String,
    /// A Secret whose `ca.crt` is the CA client certificates must chain to. Setting it
    /// requires every TLS client to present a certificate (mutual TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_name: Option<String>,
    /// Serve AMQP only over TLS (port 5671); the plain listener on 5672 is turned off.
    #[serde(default, rename = "disableNonTLSListeners")]
    pub disable_non_tls_listeners: bool,
}

/// Broker settings. Unset fields keep the broker's defaults.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BrokerConfig {
    /// Memory alarm threshold as a fraction of the container's memory limit (RabbitMQ's
    /// `vm_memory_high_watermark.relative`). Publishers are blocked above it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new("self > 0.0 && self <= 1.0").message("memoryHighWatermark is a fraction between 0 (exclusive) and 1"))]
    pub memory_high_watermark: Option<f64>,
    /// Disk alarm threshold: free disk space below which publishers are blocked, as a
    /// quantity (e.g. `2Gi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new("type(self) == int ? self >= 0 : isQuantity(self)").message("diskFreeLimit is a quantity such as 2Gi"))]
    pub disk_free_limit: Option<Quantity>,
    /// Heartbeat interval the broker proposes, in seconds; 0 disables heartbeats.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 65535))]
    pub heartbeat: Option<i32>,
    /// Largest frame the broker accepts, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 4096, max = 2147483647))]
    pub frame_max: Option<i64>,
    /// Most channels per connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub channel_max: Option<i32>,
    /// Most client connections per node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_connections: Option<i64>,
    /// Largest message body accepted, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 536870912))]
    pub max_message_size: Option<i64>,
    /// Cluster name shown by the management API; defaults to the RabbitCluster's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_name: Option<String>,
    /// Virtual host created on a fresh node, where the default user gets every permission.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub default_vhost: Option<String>,
    /// Log level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_level: Option<LogLevel>,
    /// Further broker settings by their configuration-file key (see `warren-broker --help`),
    /// for settings without a typed field here. Keys the broker does not know, and keys
    /// that have a typed field or are set by the operator, are refused.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub additional_config: BTreeMap<String, String>,
}

/// Broker log levels.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

/// Where the default user comes from. Without it the operator generates a user name and a
/// random password once and keeps them in `<name>-default-user`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DefaultUserSpec {
    /// Import the credentials from this Secret (keys `username` and `password`), in the
    /// cluster's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
}

/// Fields merged into the objects the operator builds: maps merge key by key, lists of
/// named items (containers, volumes, env, ports) merge by name, other lists are replaced.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Override {
    /// Merged into the StatefulSet `<name>-server`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::crd::free_form_object")]
    pub stateful_set: Option<serde_json::Value>,
    /// Merged into the client Service `<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::crd::free_form_object")]
    pub service: Option<serde_json::Value>,
}

impl Override {
    pub fn is_empty(&self) -> bool {
        self.stateful_set.is_none() && self.service.is_none()
    }
}

/// What the operator observed of the cluster.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RabbitClusterStatus {
    /// `Available` (clients can connect: at least one node is ready), `AllReplicasReady`,
    /// `ReconcileSuccess` (the last reconcile applied the spec; false with the reason when
    /// the spec cannot be applied) and `Progressing` (a rollout, scale or drain is under way).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Nodes whose pod is ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Nodes the StatefulSet currently runs (the scale subresource reads it).
    #[serde(default)]
    pub replicas: i32,
    /// Label selector of the broker pods (the scale subresource reads it).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub selector: String,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Where applications find the default user's credentials and the client Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_user: Option<DefaultUserStatus>,
    /// Nodes drained for a scale-down, with what was left on them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drained_nodes: Vec<DrainedNode>,
}

/// References to the default user's Secret and the client Service.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DefaultUserStatus {
    /// The Secret `<name>-default-user`.
    pub secret_reference: SecretReference,
    /// The client Service `<name>`.
    pub service_reference: ServiceReference,
}

/// A Secret and the keys in it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretReference {
    /// Secret name.
    pub name: String,
    /// Secret namespace.
    pub namespace: String,
    /// Key names in the Secret, by meaning (`username`, `password`).
    pub keys: BTreeMap<String, String>,
}

/// A Service.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceReference {
    /// Service name.
    pub name: String,
    /// Service namespace.
    pub namespace: String,
}

/// A node drained before the StatefulSet shrank.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DrainedNode {
    /// Pod name.
    pub pod: String,
    /// When the drain finished (RFC 3339).
    pub drained_at: String,
    /// Queues that were on the node, with their message counts (`vhost/name: messages`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub queues: Vec<String>,
    /// The node has been removed from the broker cluster's membership (forgotten) after its
    /// pod went away, so it no longer counts towards the cluster's majority.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub forgotten: bool,
}

fn default_replicas() -> i32 {
    3
}
fn default_true() -> bool {
    true
}
fn default_grace() -> i64 {
    600
}
fn default_storage() -> Quantity {
    Quantity("10Gi".to_string())
}
