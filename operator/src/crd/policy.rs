//! `Policy`: a broker policy, applied through the management API.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{
    ConnectionSecretReference, DeletionPolicy, RabbitClusterReference, default_vhost,
};

/// A policy on a Warren or RabbitMQ broker.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "warren.dev",
    version = "v1alpha1",
    kind = "Policy",
    namespaced,
    status = "PolicyStatus",
    shortname = "wpol",
    category = "warren",
    doc = "A policy on a broker: queue and exchange settings chosen by a name pattern.",
    printcolumn(name = "Pattern", type_ = "string", json_path = ".spec.pattern"),
    printcolumn(name = "Apply-To", type_ = "string", json_path = ".spec.applyTo"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = super::common::exactly_one_target())]
#[x_kube(validation = super::common::cluster_reference_unchanged())]
#[x_kube(validation = super::common::connection_secret_unchanged())]
#[x_kube(validation = kube::core::Rule::new("(has(self.name) ? self.name : '') == (has(oldSelf.name) ? oldSelf.name : '')").message("name cannot be changed; delete the Policy and create a new one"))]
#[x_kube(validation = kube::core::Rule::new("self.vhost == oldSelf.vhost").message("vhost cannot be changed; delete the Policy and create a new one"))]
#[serde(rename_all = "camelCase")]
pub struct PolicySpec {
    /// Policy name on the broker; defaults to `metadata.name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub name: Option<String>,
    /// Virtual host the policy lives in.
    #[serde(default = "default_vhost")]
    #[schemars(length(min = 1))]
    pub vhost: String,
    /// Regular expression matched against queue and exchange names.
    #[schemars(length(min = 1))]
    pub pattern: String,
    /// Which objects the policy applies to: `all`, `queues`, `exchanges`, or (Warren, and
    /// RabbitMQ from 3.12) only `classic_queues`, `quorum_queues` or `streams`.
    #[serde(default)]
    pub apply_to: ApplyTo,
    /// Among policies matching the same object, the highest priority wins.
    #[serde(default)]
    pub priority: i32,
    /// The policy's settings.
    pub definition: PolicyDefinition,
    /// The Warren cluster to configure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rabbit_cluster_reference: Option<RabbitClusterReference>,
    /// Or any broker reachable through a management API URL and credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_secret: Option<ConnectionSecretReference>,
    /// Remove the policy from the broker when this resource is deleted, or keep it.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// Which objects a policy applies to: `all`, `queues`, `exchanges`, or (Warren, and RabbitMQ
/// from 3.12) only `classic_queues`, `quorum_queues` or `streams`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ApplyTo {
    /// Queues (of every type) and exchanges.
    #[default]
    All,
    /// Queues of every type.
    Queues,
    /// Classic queues only.
    ClassicQueues,
    /// Quorum queues only.
    QuorumQueues,
    /// Stream queues only.
    Streams,
    /// Exchanges only.
    Exchanges,
}

impl ApplyTo {
    pub fn as_str(self) -> &'static str {
        match self {
            ApplyTo::All => "all",
            ApplyTo::Queues => "queues",
            ApplyTo::ClassicQueues => "classic_queues",
            ApplyTo::QuorumQueues => "quorum_queues",
            ApplyTo::Streams => "streams",
            ApplyTo::Exchanges => "exchanges",
        }
    }
}

/// Policy keys. The keys listed are type-checked; other keys are passed to the broker,
/// which validates them.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[schemars(extend("minProperties" = 1))]
pub struct PolicyDefinition {
    /// Mirroring: `all`, `exactly` (with `ha-params` a count) or `nodes` (with `ha-params`
    /// a list of node names).
    #[serde(rename = "ha-mode", default, skip_serializing_if = "Option::is_none")]
    pub ha_mode: Option<HaMode>,
    /// Argument of `ha-mode`: a number of replicas for `exactly`, node names for `nodes`.
    #[serde(rename = "ha-params", default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::crd::any_value")]
    pub ha_params: Option<serde_json::Value>,
    /// When new mirrors synchronise: `manual` or `automatic`.
    #[serde(
        rename = "ha-sync-mode",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub ha_sync_mode: Option<HaSyncMode>,
    /// Per-queue message TTL in milliseconds.
    #[serde(
        rename = "message-ttl",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(range(min = 0))]
    pub message_ttl: Option<i64>,
    /// Delete unused queues after this many milliseconds.
    #[serde(rename = "expires", default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub expires: Option<i64>,
    /// Most ready messages a queue holds.
    #[serde(
        rename = "max-length",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(range(min = 0))]
    pub max_length: Option<i64>,
    /// Most bytes of ready message bodies a queue holds.
    #[serde(
        rename = "max-length-bytes",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(range(min = 0))]
    pub max_length_bytes: Option<i64>,
    /// What a full queue does.
    #[serde(rename = "overflow", default, skip_serializing_if = "Option::is_none")]
    pub overflow: Option<Overflow>,
    /// Exchange dead letters are published to.
    #[serde(
        rename = "dead-letter-exchange",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub dead_letter_exchange: Option<String>,
    /// Routing key dead letters are published with.
    #[serde(
        rename = "dead-letter-routing-key",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub dead_letter_routing_key: Option<String>,
    /// Exchange that receives messages an exchange cannot route.
    #[serde(
        rename = "alternate-exchange",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub alternate_exchange: Option<String>,
    /// Federate matching exchanges and queues from this upstream.
    #[serde(
        rename = "federation-upstream",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(length(min = 1))]
    pub federation_upstream: Option<String>,
    /// Federate from this upstream set (`all` means every upstream in the vhost).
    #[serde(
        rename = "federation-upstream-set",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(length(min = 1))]
    pub federation_upstream_set: Option<String>,
    /// Deliveries after which a message is dead-lettered (quorum queues).
    #[serde(
        rename = "delivery-limit",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(range(min = 0))]
    pub delivery_limit: Option<i64>,
    /// Other keys, passed to the broker as they are.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// Mirroring modes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum HaMode {
    All,
    Exactly,
    Nodes,
}

/// Mirror synchronisation modes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum HaSyncMode {
    Manual,
    Automatic,
}

/// Overflow behaviours.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Overflow {
    DropHead,
    RejectPublish,
    RejectPublishDlx,
}

/// What the operator observed of the policy.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    /// `Ready` is true once the broker holds the policy as the spec says; when the broker
    /// refuses, its message is the broker's error text.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Queues and exchanges the policy currently applies to (`queue <name>`,
    /// `exchange <name>`; at most 100).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub applies_to: Vec<String>,
}
