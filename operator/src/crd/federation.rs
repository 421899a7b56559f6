//! `Federation`: a federation upstream, written as a `federation-upstream` runtime parameter.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{
    ConnectionSecretReference, DeletionPolicy, RabbitClusterReference, default_vhost,
};

/// A federation upstream: a remote broker that exchanges and queues selected by a policy
/// (`federation-upstream` / `federation-upstream-set`) receive messages from.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "warren.dev",
    version = "v1alpha1",
    kind = "Federation",
    namespaced,
    status = "FederationStatus",
    shortname = "wfed",
    category = "warren",
    doc = "A federation upstream on a broker.",
    printcolumn(name = "Vhost", type_ = "string", json_path = ".spec.vhost"),
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
#[x_kube(validation = kube::core::Rule::new("(has(self.name) ? self.name : '') == (has(oldSelf.name) ? oldSelf.name : '')").message("name cannot be changed; delete the Federation and create a new one"))]
#[x_kube(validation = kube::core::Rule::new("self.vhost == oldSelf.vhost").message("vhost cannot be changed; delete the Federation and create a new one"))]
#[serde(rename_all = "camelCase")]
pub struct FederationSpec {
    /// Upstream name on the broker; defaults to `metadata.name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub name: Option<String>,
    /// Virtual host of the downstream (the broker being configured).
    #[serde(default = "default_vhost")]
    #[schemars(length(min = 1))]
    pub vhost: String,
    /// A Secret whose key `uri` holds the upstream's AMQP URI, or several separated by
    /// commas to fail over between.
    pub uri_secret: UriSecretReference,
    /// Most unacknowledged messages in flight on the link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub prefetch_count: Option<i32>,
    /// When the link acknowledges the upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack_mode: Option<AckMode>,
    /// Seconds between reconnection attempts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub reconnect_delay: Option<i32>,
    /// Keep the `user-id` property of federated messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_user_id: Option<bool>,
    /// Upstream exchange name, when it differs from the downstream exchange's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exchange: Option<String>,
    /// How many federation links a message may cross.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_hops: Option<i32>,
    /// Milliseconds the upstream keeps the link's queue after the link goes away.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub expires: Option<i64>,
    /// Message TTL in milliseconds of the link's queue on the upstream.
    #[serde(
        default,
        rename = "messageTTL",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(range(min = 0))]
    pub message_ttl: Option<i64>,
    /// Upstream queue name, when it differs from the downstream queue's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// Consumer tag used by queue federation on the upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer_tag: Option<String>,
    /// The Warren cluster to configure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rabbit_cluster_reference: Option<RabbitClusterReference>,
    /// Or any broker reachable through a management API URL and credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_secret: Option<ConnectionSecretReference>,
    /// Remove the upstream from the broker when this resource is deleted, or keep it.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// A Secret in this resource's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UriSecretReference {
    /// Name of the Secret.
    #[schemars(length(min = 1))]
    pub name: String,
}

/// When a link acknowledges the source.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum AckMode {
    /// After the destination confirmed the message (no loss).
    OnConfirm,
    /// After the message was published to the destination.
    OnPublish,
    /// The source does not wait for acknowledgements (fastest, may lose messages).
    NoAck,
}

impl AckMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AckMode::OnConfirm => "on-confirm",
            AckMode::OnPublish => "on-publish",
            AckMode::NoAck => "no-ack",
        }
    }
}

/// What the operator observed of the upstream.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FederationStatus {
    /// `Ready` is true once the broker holds the upstream as the spec says.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Live links using this upstream, from the broker's `/api/federation-links`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<FederationLinkStatus>,
}

/// One federation link.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FederationLinkStatus {
    /// `exchange` or `queue`.
    #[serde(rename = "type")]
    pub type_: String,
    /// The federated exchange or queue on the downstream.
    pub name: String,
    /// `starting`, `running` or `error`.
    pub status: String,
    /// The broker's error text, when the link failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}
