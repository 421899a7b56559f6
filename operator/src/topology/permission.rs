//! `Permission` → `PUT /api/permissions/{vhost}/{user}`, the user named directly or through
//! a `User` resource.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::{Target, Topology, target_of};
use crate::crd::Permission;
use crate::crd::common::DeletionPolicy;
use crate::management::segment;

impl Permission {
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

impl Topology for Permission {
    const CONTROLLER: &'static str = "permission";
    const FINALIZER: &'static str = "warren.dev/permission-cleanup";
    const NOUN: &'static str = "permissions of user";
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
        format!("{} in vhost {}", self.user_name(), self.spec.vhost)
    }
    fn path(&self) -> String {
        format!(
            "/api/permissions/{}/{}",
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
    fn body(&self, _: Option<&BTreeMap<String, String>>) -> Result<Value, String> {
        if self.user_name().is_empty() {
            return Err("set exactly one of spec.user and spec.userReference".into());
        }
        Ok(json!({
            "configure": self.spec.configure,
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
    use crate::crd::PermissionSpec;

    #[test]
    fn a_referenced_user_is_filled_in() {
        let spec: PermissionSpec = serde_json::from_value(json!({
            "vhost": "prod/eu", "userReference": {"name": "app-user"},
            "configure": "^app\\.", "write": ".*", "read": ".*",
            "rabbitClusterReference": {"name": "c"},
        }))
        .expect("spec");
        let p = Permission::new("app", spec);
        assert_eq!(p.user_reference(), Some("app-user"));
        let resolved = p.with_user("app svc".into());
        assert_eq!(resolved.path(), "/api/permissions/prod%2Feu/app%20svc");
        assert_eq!(
            resolved.body(None).expect("body"),
            json!({"configure": "^app\\.", "write": ".*", "read": ".*"})
        );
        assert_eq!(resolved.observed_status(&[])["user"], "app svc");
    }

    #[test]
    fn a_user_by_name() {
        let spec: PermissionSpec = serde_json::from_value(json!({
            "user": "bob", "read": ".*", "connectionSecret": {"name": "s"},
        }))
        .expect("spec");
        let p = Permission::new("bob", spec);
        assert_eq!(p.user_reference(), None);
        assert_eq!(p.path(), "/api/permissions/%2F/bob");
        assert_eq!(
            p.body(None).expect("body"),
            json!({"configure": "", "write": "", "read": ".*"})
        );
    }
}
