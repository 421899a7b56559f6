//! `User` → `PUT /api/users/{name}` with the password from its credentials Secret. The
//! Secret is watched (as every referenced Secret is), so a new password reaches the broker
//! at once.

use std::collections::BTreeMap;

use kube::ResourceExt;
use serde_json::{Value, json};

use super::{GeneratedSecret, Limits, Target, Topology, tag_set, target_of};
use crate::crd::User;
use crate::crd::common::DeletionPolicy;
use crate::management::segment;

/// Whether `hash` (base64 of a 4-byte salt and SHA-256 of salt and password) is
/// `password`'s.
fn sha256_password_matches(hash: &str, password: &str) -> bool {
    use base64::Engine;
    use sha2::{Digest, Sha256};
    let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(hash) else {
        return false;
    };
    if raw.len() != 36 {
        return false;
    }
    let (salt, digest) = raw.split_at(4);
    let mut h = Sha256::new();
    h.update(salt);
    h.update(password.as_bytes());
    h.finalize().as_slice() == digest
}

impl User {
    /// The Secret holding the credentials: the imported one, or the generated
    /// `<metadata.name>-user-credentials`.
    pub fn credentials_secret(&self) -> String {
        match &self.spec.import_credentials_secret {
            Some(s) => s.name.clone(),
            None => format!("{}-user-credentials", self.name_any()),
        }
    }
}

impl Topology for User {
    const CONTROLLER: &'static str = "user";
    const FINALIZER: &'static str = "warren.dev/user-cleanup";
    const NOUN: &'static str = "user";
    const SECRET_FIELD: &'static str = "the credentials Secret";

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
        self.spec.name.clone().unwrap_or_else(|| self.name_any())
    }
    fn path(&self) -> String {
        format!("/api/users/{}", segment(&self.broker_name()))
    }
    fn uri_secret(&self) -> Option<String> {
        Some(self.credentials_secret())
    }
    fn broker_user(&self) -> Option<String> {
        Some(self.broker_name())
    }
    fn generated_secret(&self) -> Option<GeneratedSecret> {
        self.spec
            .import_credentials_secret
            .is_none()
            .then(|| GeneratedSecret {
                name: self.credentials_secret(),
                username: self.broker_name(),
            })
    }
    /// The password is checked against the broker's salted hash (RabbitMQ's
    /// `rabbit_password_hashing_sha256`, which Warren uses too); another algorithm counts
    /// as different, so the password is written.
    fn in_sync(&self, body: &Value, current: &Value) -> bool {
        tag_set(&body["tags"]) == tag_set(&current["tags"])
            && current["hashing_algorithm"] == "rabbit_password_hashing_sha256"
            && matches!(
                (body["password"].as_str(), current["password_hash"].as_str()),
                (Some(p), Some(h)) if sha256_password_matches(h, p)
            )
    }
    fn limits(&self) -> Option<Limits> {
        let l = self.spec.limits.as_ref()?;
        let user = segment(&self.broker_name());
        Some(Limits {
            read: format!("/api/user-limits/{user}"),
            prefix: format!("/api/user-limits/{user}"),
            desired: vec![
                ("max-connections", l.max_connections),
                ("max-channels", l.max_channels),
            ],
        })
    }
    fn body(&self, secret: Option<&BTreeMap<String, String>>) -> Result<Value, String> {
        let name = self.broker_name();
        let secret_name = self.credentials_secret();
        let secret =
            secret.ok_or_else(|| format!("the credentials Secret {secret_name} was not read"))?;
        if let Some(u) = secret.get("username").filter(|u| !u.is_empty())
            && *u != name
        {
            return Err(format!(
                "the credentials Secret {secret_name} has username {u:?}, but this User is {name:?} \
                 on the broker: set spec.name to {u:?} or change the Secret"
            ));
        }
        let password = secret
            .get("password")
            .filter(|p| !p.is_empty())
            .ok_or_else(|| format!("the credentials Secret {secret_name} has no key password"))?;
        Ok(json!({"password": password, "tags": self.spec.tags.join(",")}))
    }
    fn observed_status(&self, _: &[Option<Value>]) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        m.insert("credentialsSecret".into(), json!(self.credentials_secret()));
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::UserSpec;

    /// Compared with what the broker stores: a hash Warren made (the same scheme as
    /// RabbitMQ's default), tags in any order.
    #[test]
    fn in_sync_checks_tags_and_the_password_hash() {
        let u = user(json!({"tags": ["b", "a"], "rabbitClusterReference": {"name": "c"}}));
        let secret = BTreeMap::from([("password".to_string(), "pw".to_string())]);
        let body = u.body(Some(&secret)).expect("body");
        let stored = |password: &str, tags: Value, algorithm: &str| {
            json!({"name": "app", "tags": tags, "hashing_algorithm": algorithm,
                   "password_hash": warren_broker::auth::hash_password(password)})
        };
        let sha = "rabbit_password_hashing_sha256";
        assert!(u.in_sync(&body, &stored("pw", json!(["a", "b"]), sha)));
        assert!(!u.in_sync(&body, &stored("other", json!(["a", "b"]), sha)));
        assert!(!u.in_sync(&body, &stored("pw", json!(["a"]), sha)));
        assert!(!u.in_sync(
            &body,
            &stored("pw", json!(["a", "b"]), "rabbit_password_hashing_md5")
        ));
        assert!(!u.in_sync(
            &body,
            &json!({"tags": ["a", "b"], "hashing_algorithm": sha,
                                          "password_hash": "not base64!"})
        ));
    }

    fn user(spec: Value) -> User {
        User::new(
            "app",
            serde_json::from_value::<UserSpec>(spec).expect("spec"),
        )
    }

    #[test]
    fn generated_credentials_by_default() {
        let u = user(
            json!({"tags": ["monitoring", "management"], "rabbitClusterReference": {"name": "c"}}),
        );
        assert_eq!(u.path(), "/api/users/app");
        assert_eq!(u.credentials_secret(), "app-user-credentials");
        let g = u.generated_secret().expect("generated");
        assert_eq!(
            (g.name.as_str(), g.username.as_str()),
            ("app-user-credentials", "app")
        );
        let s = BTreeMap::from([
            ("username".to_string(), "app".to_string()),
            ("password".to_string(), "pw".to_string()),
        ]);
        assert_eq!(
            u.body(Some(&s)).expect("body"),
            json!({"password": "pw", "tags": "monitoring,management"})
        );
    }

    #[test]
    fn imported_credentials_must_name_the_same_user() {
        let u = user(
            json!({"name": "svc", "importCredentialsSecret": {"name": "creds"},
                            "connectionSecret": {"name": "s"}}),
        );
        assert!(u.generated_secret().is_none());
        assert_eq!(u.uri_secret().as_deref(), Some("creds"));
        let other = BTreeMap::from([
            ("username".to_string(), "someone".to_string()),
            ("password".to_string(), "pw".to_string()),
        ]);
        let err = u.body(Some(&other)).expect_err("other user");
        assert!(err.contains("\"someone\""), "{err}");
        let no_password = BTreeMap::from([("username".to_string(), "svc".to_string())]);
        assert!(u.body(Some(&no_password)).is_err());
        let ok = BTreeMap::from([("password".to_string(), "pw".to_string())]);
        assert_eq!(
            u.body(Some(&ok)).expect("body"),
            json!({"password": "pw", "tags": ""})
        );
    }
}
