//! `TopicPermission` → `PUT /api/topic-permissions/{vhost}/{user}` with the exchange in the
//! body. Deletion is `DELETE` on the same path, which removes all of the user's topic
//! permissions in the virtual host (the management API has no per-exchange delete); other
//! TopicPermissions of the same user and vhost are put back by their next resync.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::{Target, Topology, target_of};
use crate::crd::TopicPermission;
use crate::crd::common::DeletionPolicy;
use crate::management::segment;

impl TopicPermission {
    /// The user's name on the broker: `spec.user`, or (before the reference is resolved)
    /// the referenced User resource's name.
    fn user_name(&self) -> &str {
        match (&self.spec.user, &self.spec.user_reference) {
            (Some(u), _) => u,
            (None, Some(r)) => &r.name,
            (None, None) => "",
        }
    }
}

impl Topology for TopicPermission {
    const CONTROLLER: &'static str = "topicpermission";
    const FINALIZER: &'static str = "warren.dev/topicpermission-cleanup";
    const NOUN: &'static str = "topic permissions of user";
    const USES_USER_REFERENCE: bool = true;

    fn target(&self) -> Target<'_> {
        target_of(
            &self.spec.rabbit_cluster_reference,
            &self.spec.connection_secret,
        )
    }
    fn deletion_policy(&self) -> DeletionPolicy {
        self.spec.deletion_policy
    }
    fn broker_name(&self) -> String {
        format!(
            "{} in vhost {} on exchange {}",
            self.user_name(),
            self.spec.vhost,
            self.spec.exchange
        )
    }
    fn path(&self) -> String {
        format!(
            "/api/topic-permissions/{}/{}",
            segment(&self.spec.vhost),
            segment(self.user_name())
        )
    }
    fn user_reference(&self) -> Option<&str> {
        self.spec.user_reference.as_ref().map(|r| r.name.as_str())
    }
    fn with_user(&self, user: String) -> Self {
        let mut resolved = self.clone();
        resolved.spec.user = Some(user);
        resolved
    }
    /// The broker answers the user's topic permissions on every exchange of the vhost.
    fn in_sync(&self, body: &Value, current: &Value) -> bool {
        current.as_array().is_some_and(|all| {
            all.iter().any(|p| {
                p["exchange"] == body["exchange"]
                    && p["write"] == body["write"]
                    && p["read"] == body["read"]
            })
        })
    }
    fn body(&self, _: Option<&BTreeMap<String, String>>) -> Result<Value, String> {
        if self.user_name().is_empty() {
            return Err("set exactly one of spec.user and spec.userReference".into());
        }
        Ok(json!({
            "exchange": self.spec.exchange,
            "write": self.spec.write,
            "read": self.spec.read,
        }))
    }
    fn observed_status(&self, _: &[Option<Value>]) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        m.insert("user".into(), json!(self.user_name()));
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::TopicPermissionSpec;

    #[test]
    fn body_and_path() {
        let spec: TopicPermissionSpec = serde_json::from_value(json!({
            "user": "bob", "exchange": "amq.topic", "write": "^orders\\.", "read": ".*",
            "rabbitClusterReference": {"name": "c"},
        }))
        .expect("spec");
        let p = TopicPermission::new("bob-orders", spec);
        assert_eq!(p.path(), "/api/topic-permissions/%2F/bob");
        assert_eq!(
            p.body(None).expect("body"),
            json!({"exchange": "amq.topic", "write": "^orders\\.", "read": ".*"})
        );
    }
}
