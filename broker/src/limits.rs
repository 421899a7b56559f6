//! Per-vhost and per-user limits, as RabbitMQ's `vhost-limits` and `user-limits`.
//!
//! A vhost may cap its connections (`max-connections`) and queues (`max-queues`); a user its
//! connections (`max-connections`) and channels (`max-channels`), counted over the whole node.
//! A negative value is no limit, 0 allows none. Limits are definitions: they change through
//! [`crate::definitions::Change`] like users and vhosts, are saved in the metadata snapshot and
//! exported with the definitions (vhost limits as the `vhost-limits` parameter named `limits`,
//! user limits as a user's `limits`, as RabbitMQ exports them).
//!
//! The vhost keeps its own limits (they go when it goes; the queue limit is checked under the
//! lock that inserts the queue); [`crate::auth::AccessControl`] keeps the users' (they go with
//! the user). A connection is counted and registered under the registry's lock before
//! `connection.open-ok` ([`crate::registry::ConnectionRegistry::register_within`]), so a burst
//! of handshakes cannot overshoot; channels are counted at `channel.open` over the user's
//! connections, each on its own task, so channels opened at the same instant on different
//! connections may overshoot `max-channels` by those in flight (RabbitMQ's channel tracking is
//! asynchronous too).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Limit name → value (negative: no limit).
pub type Limits = BTreeMap<String, i64>;

pub const MAX_CONNECTIONS: &str = "max-connections";
pub const MAX_QUEUES: &str = "max-queues";
pub const MAX_CHANNELS: &str = "max-channels";

/// What a vhost may limit.
pub const VHOST_LIMITS: &[&str] = &[MAX_CONNECTIONS, MAX_QUEUES];
/// What a user may limit.
pub const USER_LIMITS: &[&str] = &[MAX_CONNECTIONS, MAX_CHANNELS];

/// Whose limits: a vhost's or a user's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Vhost,
    User,
}

impl Scope {
    fn names(self) -> &'static [&'static str] {
        match self {
            Scope::Vhost => VHOST_LIMITS,
            Scope::User => USER_LIMITS,
        }
    }

    /// How RabbitMQ names the set in its validation errors.
    fn set_name(self) -> &'static str {
        match self {
            Scope::Vhost => "limits",
            Scope::User => "user-limits",
        }
    }
}

/// A vhost's limits, as definitions carry them.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct VhostLimitsDef {
    pub vhost: String,
    pub limits: Limits,
}

/// A user's limits, as definitions carry them.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct UserLimitsDef {
    pub user: String,
    pub limits: Limits,
}

/// The limit in force: `None` when there is none (unset or negative).
pub fn in_force(limits: &Limits, name: &str) -> Option<u64> {
    limits.get(name).and_then(|v| u64::try_from(*v).ok())
}

/// Checks one limit's name and value as RabbitMQ does (an integer; names it knows), with its
/// error texts.
pub fn validate(scope: Scope, name: &str, value: &Value) -> Result<i64, String> {
    if !scope.names().contains(&name) {
        return Err(match scope {
            Scope::Vhost => format!(
                "Validation failed\n\nUnrecognised terms [{{<<\"{name}\">>,{value}}}] in limits\n"
            ),
            Scope::User => {
                format!("Unrecognised terms [{{<<\"{name}\">>,{value}}}] in user-limits")
            }
        });
    }
    value.as_i64().ok_or_else(|| {
        let shown = match value {
            Value::String(s) => format!("<<\"{s}\">>"),
            v => v.to_string(),
        };
        format!("Validation failed\n\n{name} should be a number, actually was {shown}\n")
    })
}

/// Checks a whole set (an import's `limits` object).
pub fn validate_all(scope: Scope, value: &Value) -> Result<Limits, String> {
    let Value::Object(m) = value else {
        return Err(format!(
            "{} must be a JSON object, got {value}",
            scope.set_name()
        ));
    };
    m.iter()
        .map(|(k, v)| validate(scope, k, v).map(|n| (k.clone(), n)))
        .collect()
}

/// Limits as the management API shows them.
pub fn to_json(limits: &Limits) -> Value {
    Value::Object(
        limits
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(*v)))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn negative_is_no_limit_and_zero_allows_none() {
        let mut l = Limits::new();
        assert_eq!(in_force(&l, MAX_QUEUES), None);
        l.insert(MAX_QUEUES.into(), -1);
        assert_eq!(in_force(&l, MAX_QUEUES), None);
        l.insert(MAX_QUEUES.into(), 0);
        assert_eq!(in_force(&l, MAX_QUEUES), Some(0));
    }

    #[test]
    fn validation_matches_rabbitmq() {
        assert_eq!(validate(Scope::Vhost, MAX_QUEUES, &json!(5)), Ok(5));
        assert_eq!(validate(Scope::User, MAX_CHANNELS, &json!(-1)), Ok(-1));
        assert_eq!(
            validate(Scope::Vhost, MAX_QUEUES, &json!("3")).unwrap_err(),
            "Validation failed\n\nmax-queues should be a number, actually was <<\"3\">>\n"
        );
        assert!(validate(Scope::Vhost, MAX_QUEUES, &json!(1.5)).is_err());
        assert_eq!(
            validate(Scope::User, MAX_QUEUES, &json!(1)).unwrap_err(),
            "Unrecognised terms [{<<\"max-queues\">>,1}] in user-limits"
        );
        assert!(validate(Scope::Vhost, MAX_CHANNELS, &json!(1)).is_err());
        assert_eq!(
            validate_all(
                Scope::Vhost,
                &json!({"max-connections": 2, "max-queues": -1})
            ),
            Ok(Limits::from([
                (MAX_CONNECTIONS.into(), 2),
                (MAX_QUEUES.into(), -1)
            ]))
        );
        assert!(validate_all(Scope::User, &json!([1])).is_err());
    }
}
