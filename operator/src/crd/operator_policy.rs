//! `OperatorPolicy`: an operator policy (limits that apply on top of, and win over, user
//! policies), applied through the management API.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{
    ConnectionSecretReference, DeletionPolicy, RabbitClusterReference, TopologyStatus,
    default_vhost,
};

/// An operator policy on a Warren or RabbitMQ broker.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "warren.dev",
    version = "v1alpha1",
    kind = "OperatorPolicy",
    namespaced,
    status = "TopologyStatus",
    shortname = "wopol",
    category = "warren",
    doc = "An operator policy on a broker: queue limits chosen by a name pattern that apply whatever user policies say (the stricter value wins).",
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
#[x_kube(validation = kube::core::Rule::new("(has(self.name) ? self.name : '') == (has(oldSelf.name) ? oldSelf.name : '')").message("name cannot be changed; delete the OperatorPolicy and create a new one"))]
#[x_kube(validation = kube::core::Rule::new("self.vhost == oldSelf.vhost").message("vhost cannot be changed; delete the OperatorPolicy and create a new one"))]
#[serde(rename_all = "camelCase")]
pub struct OperatorPolicySpec {
    /// Operator policy name on the broker; defaults to `metadata.name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub name: Option<String>,
    /// Virtual host the operator policy lives in.
    #[serde(default = "default_vhost")]
    #[schemars(length(min = 1))]
    pub vhost: String,
    /// Regular expression matched against queue names.
    #[schemars(length(min = 1))]
    pub pattern: String,
    /// Which queues the operator policy applies to (`classic_queues` and `quorum_queues`
    /// need a broker that knows them: RabbitMQ 3.12+, Warren).
    #[serde(default)]
    pub apply_to: OperatorPolicyApplyTo,
    /// Among operator policies matching the same queue, the highest priority wins.
    #[serde(default)]
    pub priority: i32,
    /// The limits.
    pub definition: OperatorPolicyDefinition,
    /// The Warren cluster to configure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rabbit_cluster_reference: Option<RabbitClusterReference>,
    /// Or any broker reachable through a management API URL and credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_secret: Option<ConnectionSecretReference>,
    /// Remove the operator policy from the broker when this resource is deleted, or keep it.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// What an operator policy applies to.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OperatorPolicyApplyTo {
    /// Every queue.
    #[default]
    Queues,
    /// Classic queues only.
    ClassicQueues,
    /// Quorum queues only.
    QuorumQueues,
}

impl OperatorPolicyApplyTo {
    pub fn as_str(self) -> &'static str {
        match self {
            OperatorPolicyApplyTo::Queues => "queues",
            OperatorPolicyApplyTo::ClassicQueues => "classic_queues",
            OperatorPolicyApplyTo::QuorumQueues => "quorum_queues",
        }
    }
}

/// Operator policy keys. The keys listed are type-checked; other keys are passed to the
/// broker, which validates them.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[schemars(extend("minProperties" = 1))]
pub struct OperatorPolicyDefinition {
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
