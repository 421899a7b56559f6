//! Runtime parameters: per-vhost, per-component JSON values (`federation-upstream`,
//! `federation-upstream-set`, `shovel`), validated as RabbitMQ's plugins validate them.
//!
//! They are stored and listed here; [`crate::links`] runs the shovels and federation links they
//! define, and watches this store ([`Parameters::subscribe`]) to follow changes. Validation is
//! strict: an unknown key, a value of the wrong type or a URI that does not parse is refused
//! with a message naming the key, so a typo is not silently ignored.

use std::collections::BTreeMap;

use parking_lot::RwLock;
use serde_json::{Map, Value};
use tokio::sync::watch;

pub const COMPONENTS: &[&str] = &["federation-upstream", "federation-upstream-set", "shovel"];

/// One stored parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct Parameter {
    pub component: String,
    pub vhost: String,
    pub name: String,
    pub value: Value,
}

/// Parameters keyed by (component, vhost, name).
#[derive(Debug)]
pub struct Parameters {
    all: RwLock<BTreeMap<(String, String, String), Value>>,
    /// Bumped on every change.
    changed: watch::Sender<u64>,
}

impl Default for Parameters {
    fn default() -> Self {
        Self {
            all: RwLock::default(),
            changed: watch::channel(0).0,
        }
    }
}

impl Parameters {
    /// Wakes on every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn bump(&self) {
        self.changed.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// Validates and stores a parameter; returns true if it was new.
    pub fn put(
        &self,
        component: &str,
        vhost: &str,
        name: &str,
        value: Value,
    ) -> Result<bool, String> {
        validate(component, &value)?;
        let key = (component.to_owned(), vhost.to_owned(), name.to_owned());
        let new = self.all.write().insert(key, value).is_none();
        self.bump();
        Ok(new)
    }

    pub fn get(&self, component: &str, vhost: &str, name: &str) -> Option<Parameter> {
        let key = (component.to_owned(), vhost.to_owned(), name.to_owned());
        let value = self.all.read().get(&key)?.clone();
        Some(Parameter {
            component: key.0,
            vhost: key.1,
            name: key.2,
            value,
        })
    }

    pub fn delete(&self, component: &str, vhost: &str, name: &str) -> bool {
        let key = (component.to_owned(), vhost.to_owned(), name.to_owned());
        let removed = self.all.write().remove(&key).is_some();
        if removed {
            self.bump();
        }
        removed
    }

    /// Parameters, optionally of one component and one vhost, in key order.
    pub fn list(&self, component: Option<&str>, vhost: Option<&str>) -> Vec<Parameter> {
        self.all
            .read()
            .iter()
            .filter(|((c, v, _), _)| {
                component.is_none_or(|x| x == c) && vhost.is_none_or(|x| x == v)
            })
            .map(|((c, v, n), value)| Parameter {
                component: c.clone(),
                vhost: v.clone(),
                name: n.clone(),
                value: value.clone(),
            })
            .collect()
    }

    pub fn clear_vhost(&self, vhost: &str) {
        self.all.write().retain(|(_, v, _), _| v != vhost);
        self.bump();
    }
}

#[derive(Clone, Copy)]
enum Kind {
    /// A string or a non-empty list of strings (URIs).
    Uris,
    Str,
    Bool,
    /// A non-negative integer.
    Count,
    /// A non-negative number (integer or float).
    Number,
    Object,
    /// Message properties (`dest-publish-properties`): a JSON object of property names.
    Properties,
    OneOf(&'static [&'static str]),
    /// `src-delete-after`: `never`, `queue-length` or a non-negative integer.
    DeleteAfter,
}

const ACK_MODES: &[&str] = &["on-confirm", "on-publish", "no-ack"];

const UPSTREAM_KEYS: &[(&str, Kind)] = &[
    ("uri", Kind::Uris),
    ("prefetch-count", Kind::Count),
    ("reconnect-delay", Kind::Number),
    ("ack-mode", Kind::OneOf(ACK_MODES)),
    ("trust-user-id", Kind::Bool),
    ("exchange", Kind::Str),
    ("max-hops", Kind::Count),
    ("expires", Kind::Count),
    ("message-ttl", Kind::Count),
    ("queue", Kind::Str),
    ("consumer-tag", Kind::Str),
];

const SHOVEL_KEYS: &[(&str, Kind)] = &[
    ("src-uri", Kind::Uris),
    ("src-protocol", Kind::OneOf(&["amqp091"])),
    ("src-queue", Kind::Str),
    ("src-queue-args", Kind::Object),
    ("src-exchange", Kind::Str),
    ("src-exchange-key", Kind::Str),
    ("src-prefetch-count", Kind::Count),
    ("src-delete-after", Kind::DeleteAfter),
    ("src-consumer-args", Kind::Object),
    ("dest-uri", Kind::Uris),
    ("dest-protocol", Kind::OneOf(&["amqp091"])),
    ("dest-queue", Kind::Str),
    ("dest-queue-args", Kind::Object),
    ("dest-exchange", Kind::Str),
    ("dest-exchange-key", Kind::Str),
    ("dest-add-forward-headers", Kind::Bool),
    ("dest-add-timestamp-header", Kind::Bool),
    ("dest-publish-properties", Kind::Properties),
    ("ack-mode", Kind::OneOf(ACK_MODES)),
    ("reconnect-delay", Kind::Number),
    // Older names RabbitMQ still accepts.
    ("add-forward-headers", Kind::Bool),
    ("publish-properties", Kind::Properties),
    ("delete-after", Kind::DeleteAfter),
    ("prefetch-count", Kind::Count),
];

fn check(kind: Kind, key: &str, v: &Value) -> Result<(), String> {
    let ok = match kind {
        Kind::Uris => match v {
            Value::String(_) => true,
            Value::Array(a) => !a.is_empty() && a.iter().all(Value::is_string),
            _ => false,
        },
        Kind::Properties => v.is_object(),
        Kind::Str => v.is_string(),
        Kind::Bool => v.is_boolean(),
        Kind::Count => v.is_u64(),
        Kind::Number => v.as_f64().is_some_and(|n| n >= 0.0),
        Kind::Object => v.is_object(),
        Kind::OneOf(options) => v.as_str().is_some_and(|s| options.contains(&s)),
        Kind::DeleteAfter => v.is_u64() || matches!(v.as_str(), Some("never" | "queue-length")),
    };
    if ok {
        return match (kind, v) {
            (Kind::Uris, Value::String(u)) => check_uri(key, u),
            (Kind::Uris, Value::Array(a)) => a
                .iter()
                .filter_map(Value::as_str)
                .try_for_each(|u| check_uri(key, u)),
            (Kind::Properties, Value::Object(m)) => check_properties(key, m),
            _ => Ok(()),
        };
    }
    let expected = match kind {
        Kind::Uris => "a URI string or a non-empty list of URI strings".to_owned(),
        Kind::Str => "a string".to_owned(),
        Kind::Bool => "a boolean".to_owned(),
        Kind::Count => "a non-negative integer".to_owned(),
        Kind::Number => "a non-negative number".to_owned(),
        Kind::Object | Kind::Properties => "a JSON object".to_owned(),
        Kind::OneOf(options) => format!("one of {}", options.join(", ")),
        Kind::DeleteAfter => "never, queue-length or a non-negative integer".to_owned(),
    };
    Err(format!("{key} should be {expected}, actually was {v}"))
}

fn check_uri(key: &str, uri: &str) -> Result<(), String> {
    crate::links::uri::LinkUri::parse(uri)
        .map(|_| ())
        .map_err(|e| {
            format!(
                "{key}: \"{}\" is not a valid URI: {e}",
                crate::links::uri::redact_str(uri)
            )
        })
}

/// The message properties a shovel may set on what it publishes (RabbitMQ's `P_basic` fields).
pub const PUBLISH_PROPERTIES: &[&str] = &[
    "content_type",
    "content_encoding",
    "headers",
    "delivery_mode",
    "priority",
    "correlation_id",
    "reply_to",
    "expiration",
    "message_id",
    "timestamp",
    "type",
    "user_id",
    "app_id",
    "cluster_id",
];

fn check_properties(key: &str, m: &Map<String, Value>) -> Result<(), String> {
    for (k, v) in m {
        let ok = match k.as_str() {
            "headers" => v.is_object(),
            "delivery_mode" | "priority" => v.as_u64().is_some_and(|n| n <= 255),
            "timestamp" => v.is_u64(),
            name if PUBLISH_PROPERTIES.contains(&name) => {
                v.as_str().is_some_and(|s| s.len() <= 255)
            }
            _ => {
                return Err(format!(
                    "{key}: unexpected property '{k}' (expected one of {})",
                    PUBLISH_PROPERTIES.join(", ")
                ));
            }
        };
        if !ok {
            return Err(format!("{key}: property '{k}' has the wrong type: {v}"));
        }
    }
    Ok(())
}

fn check_keys(
    obj: &Map<String, Value>,
    allowed: &[(&str, Kind)],
    what: &str,
) -> Result<(), String> {
    for (k, v) in obj {
        let Some((_, kind)) = allowed.iter().find(|(name, _)| name == k) else {
            return Err(format!("unrecognised key '{k}' in {what}"));
        };
        check(*kind, k, v)?;
    }
    Ok(())
}

fn object<'a>(v: &'a Value, what: &str) -> Result<&'a Map<String, Value>, String> {
    v.as_object()
        .ok_or_else(|| format!("{what} should be a JSON object, actually was {v}"))
}

/// Validates the `value` of a parameter for its component.
pub fn validate(component: &str, value: &Value) -> Result<(), String> {
    match component {
        "federation-upstream" => {
            let obj = object(value, "the federation-upstream value")?;
            check_keys(obj, UPSTREAM_KEYS, "federation-upstream")?;
            if !obj.contains_key("uri") {
                return Err("key 'uri' is required in federation-upstream".into());
            }
            Ok(())
        }
        "federation-upstream-set" => {
            let Some(list) = value.as_array() else {
                return Err(format!(
                    "the federation-upstream-set value should be a list of {{\"upstream\": name}} objects, actually was {value}"
                ));
            };
            for (i, entry) in list.iter().enumerate() {
                let obj = object(entry, &format!("federation-upstream-set entry {i}"))?;
                for (k, v) in obj {
                    if k == "upstream" {
                        check(Kind::Str, "upstream", v)?;
                        continue;
                    }
                    let Some((_, kind)) = UPSTREAM_KEYS
                        .iter()
                        .find(|(name, _)| name == k && *name != "uri")
                    else {
                        return Err(format!(
                            "unrecognised key '{k}' in federation-upstream-set entry {i}"
                        ));
                    };
                    check(*kind, k, v)?;
                }
                if !obj.contains_key("upstream") {
                    return Err(format!(
                        "key 'upstream' is required in federation-upstream-set entry {i}"
                    ));
                }
            }
            Ok(())
        }
        "shovel" => {
            let obj = object(value, "the shovel value")?;
            check_keys(obj, SHOVEL_KEYS, "shovel")?;
            for required in ["src-uri", "dest-uri"] {
                if !obj.contains_key(required) {
                    return Err(format!("key '{required}' is required in shovel"));
                }
            }
            match (
                obj.contains_key("src-queue"),
                obj.contains_key("src-exchange"),
            ) {
                (true, true) => Err("cannot specify both 'src-exchange' and 'src-queue'".into()),
                (false, false) => Err("one of 'src-queue' or 'src-exchange' is required".into()),
                _ if obj.contains_key("dest-queue") && obj.contains_key("dest-exchange") => {
                    Err("cannot specify both 'dest-exchange' and 'dest-queue'".into())
                }
                _ if obj.get("ack-mode").and_then(Value::as_str) == Some("no-ack")
                    && ["src-delete-after", "delete-after"]
                        .iter()
                        .any(|k| obj.get(*k).is_some_and(Value::is_u64)) =>
                {
                    Err("cannot specify 'no-ack' and numerical 'delete-after'".into())
                }
                _ => Ok(()),
            }
        }
        other => Err(format!("component {other} not found")),
    }
}

/// Who is setting a parameter: what the links it defines may reach depends on it.
pub struct ActingUser<'a> {
    pub name: &'a str,
    pub administrator: bool,
    /// May the user act in this vhost (as the management API decides)?
    pub may_access: &'a dyn Fn(&str) -> bool,
}

/// The link URIs of a valid parameter value: (key, URI, the vhost a URI without a path opens
/// — `/` for a shovel, as RabbitMQ's `amqp_uri`; the parameter's own for an upstream).
fn link_uris<'a>(
    component: &str,
    vhost: &'a str,
    value: &'a Value,
) -> Vec<(&'static str, &'a str, &'a str)> {
    let keys: &[&'static str] = match component {
        "shovel" => &["src-uri", "dest-uri"],
        "federation-upstream" => &["uri"],
        _ => &[],
    };
    let default_vhost = if component == "shovel" { "/" } else { vhost };
    let mut out = Vec::new();
    for &key in keys {
        match value.get(key) {
            Some(Value::String(u)) => out.push((key, u.as_str(), default_vhost)),
            Some(Value::Array(list)) => out.extend(
                list.iter()
                    .filter_map(Value::as_str)
                    .map(|u| (key, u, default_vhost)),
            ),
            _ => {}
        }
    }
    out
}

/// Refuses a (validated) parameter whose links would reach further than `user` may:
///
/// * a URI without a host connects to this node as its internal account, which may do
///   anything in any vhost; so its vhost must be one the user may access (RabbitMQ checks
///   the acting user's vhost access for such direct URIs), or the parameter would let a
///   policymaker of one vhost read and write another;
/// * `cacertfile`, `certfile` and `keyfile` make the node read files of its own choosing
///   and present them to a peer, so only an administrator may set them.
pub fn check_acting_user(
    component: &str,
    vhost: &str,
    value: &Value,
    user: &ActingUser<'_>,
) -> Result<(), String> {
    for (key, uri, default_vhost) in link_uris(component, vhost, value) {
        let Ok(parsed) = crate::links::uri::LinkUri::parse(uri) else {
            continue;
        };
        if parsed.local {
            let target = parsed.vhost_or(default_vhost);
            if !(user.may_access)(target) {
                return Err(format!(
                    "{key}: user '{}' may not access vhost '{target}', which a URI without a \
                     host ({}) would connect to on this node",
                    user.name, parsed.redacted
                ));
            }
        }
        let files = parsed.local_file_keys();
        if !files.is_empty() && !user.administrator {
            return Err(format!(
                "{key}: the URI parameters {} make the node read files of its own; only a \
                 user tagged administrator may set them (user '{}' is not)",
                files.join(", "),
                user.name
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn upstream_validation_names_the_key() {
        assert!(validate("federation-upstream", &json!({"uri": "amqp://h"})).is_ok());
        assert!(
            validate(
                "federation-upstream",
                &json!({"uri": ["amqp://a", "amqp://b"], "ack-mode": "no-ack", "max-hops": 2})
            )
            .is_ok()
        );
        let e = validate(
            "federation-upstream",
            &json!({"uri": "amqp://h", "bogus": 1}),
        )
        .unwrap_err();
        assert!(e.contains("bogus"), "{e}");
        let e = validate(
            "federation-upstream",
            &json!({"uri": "amqp://h", "prefetch-count": "x"}),
        )
        .unwrap_err();
        assert!(e.contains("prefetch-count"), "{e}");
        let e = validate("federation-upstream", &json!({"prefetch-count": 1})).unwrap_err();
        assert!(e.contains("uri"), "{e}");
        let e = validate("federation-upstream", &json!({"uri": 5})).unwrap_err();
        assert!(e.contains("uri"), "{e}");
    }

    #[test]
    fn upstream_sets_and_shovels() {
        assert!(
            validate(
                "federation-upstream-set",
                &json!([{"upstream": "a"}, {"upstream": "b", "max-hops": 2}])
            )
            .is_ok()
        );
        let e = validate(
            "federation-upstream-set",
            &json!([{"upstream": "a", "x": 1}]),
        )
        .unwrap_err();
        assert!(e.contains("'x'"), "{e}");
        let ok = json!({"src-uri": "amqp://", "src-queue": "a", "dest-uri": "amqp://", "dest-queue": "b"});
        assert!(validate("shovel", &ok).is_ok());
        let e = validate("shovel", &json!({"src-uri": "amqp://", "src-queue": "a", "src-exchange": "x", "dest-uri": "amqp://"})).unwrap_err();
        assert!(e.contains("src-exchange"), "{e}");
        let e = validate("shovel", &json!({"src-uri": "amqp://", "src-queue": "a", "dest-uri": "amqp://", "src-delete-after": "later"})).unwrap_err();
        assert!(e.contains("src-delete-after"), "{e}");
        assert!(validate("nope", &json!({})).is_err());
    }

    #[test]
    fn links_reach_only_vhosts_and_files_the_acting_user_may() {
        let only_a = |v: &str| v == "a";
        let pm = ActingUser {
            name: "pm",
            administrator: false,
            may_access: &only_a,
        };
        let shovel = |src: &str, dest: &str| json!({"src-uri": src, "src-queue": "q", "dest-uri": dest, "dest-queue": "q"});
        let check = |c: &str, v: &Value, u: &ActingUser<'_>| check_acting_user(c, "a", v, u);
        assert!(check("shovel", &shovel("amqp:///a", "amqp://u:p@remote/b"), &pm).is_ok());
        let e = check("shovel", &shovel("amqp:///a", "amqp:///b"), &pm).unwrap_err();
        assert!(
            e.contains("dest-uri") && e.contains("'b'") && e.contains("'pm'"),
            "{e}"
        );
        // A shovel URI without a path is vhost "/"; an upstream's is its own vhost.
        let e = check("shovel", &shovel("amqp://", "amqp:///a"), &pm).unwrap_err();
        assert!(e.contains("src-uri") && e.contains("'/'"), "{e}");
        assert!(check("federation-upstream", &json!({"uri": "amqp://"}), &pm).is_ok());
        let e = check(
            "federation-upstream",
            &json!({"uri": ["amqp:///a", "amqp:///b"]}),
            &pm,
        )
        .unwrap_err();
        assert!(e.contains("'b'"), "{e}");
        let e = check(
            "federation-upstream",
            &json!({"uri": "amqps://h?cacertfile=/etc/passwd"}),
            &pm,
        )
        .unwrap_err();
        assert!(
            e.contains("cacertfile") && e.contains("administrator"),
            "{e}"
        );
        let anywhere = |_: &str| true;
        let admin = ActingUser {
            name: "root",
            administrator: true,
            may_access: &anywhere,
        };
        assert!(
            check(
                "shovel",
                &shovel("amqps://h?certfile=/c&keyfile=/k", "amqp:///b"),
                &admin
            )
            .is_ok()
        );
    }

    #[test]
    fn store_lists_by_component_and_vhost() {
        let p = Parameters::default();
        assert!(
            p.put("federation-upstream", "/", "u1", json!({"uri": "amqp://a"}))
                .unwrap()
        );
        assert!(
            !p.put("federation-upstream", "/", "u1", json!({"uri": "amqp://b"}))
                .unwrap()
        );
        p.put(
            "shovel",
            "v2",
            "s",
            json!({"src-uri": "amqp://", "src-queue": "a", "dest-uri": "amqp://"}),
        )
        .unwrap();
        assert_eq!(p.list(None, None).len(), 2);
        assert_eq!(p.list(Some("shovel"), None).len(), 1);
        assert_eq!(p.list(None, Some("/")).len(), 1);
        p.clear_vhost("v2");
        assert_eq!(p.list(None, None).len(), 1);
        assert!(p.delete("federation-upstream", "/", "u1"));
        assert!(p.get("federation-upstream", "/", "u1").is_none());
    }
}
