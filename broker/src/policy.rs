//! Policies and operator policies: validation, matching, and the effective settings of a
//! queue or exchange.
//!
//! As in RabbitMQ, at most one policy and one operator policy apply to an object: among those
//! whose pattern matches its name and whose `apply-to` covers its kind, the highest priority
//! wins (ties go to the name that sorts first, so the choice is deterministic). Client-supplied
//! arguments beat the policy; an operator policy caps the numeric limits of both, the lower
//! value winning.

use std::collections::BTreeMap;

use amq_protocol::types::FieldTable;
use regex::Regex;
use serde_json::Value;

use crate::queue::args::QueueArgs;
use crate::queue::state::{Overflow, QueueConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyTo {
    All,
    Queues,
    Exchanges,
    ClassicQueues,
    QuorumQueues,
    Streams,
}

impl ApplyTo {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "all" => Self::All,
            "queues" => Self::Queues,
            "exchanges" => Self::Exchanges,
            "classic_queues" => Self::ClassicQueues,
            "quorum_queues" => Self::QuorumQueues,
            "streams" => Self::Streams,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Queues => "queues",
            Self::Exchanges => "exchanges",
            Self::ClassicQueues => "classic_queues",
            Self::QuorumQueues => "quorum_queues",
            Self::Streams => "streams",
        }
    }

    fn covers_queue(self) -> bool {
        matches!(self, Self::All | Self::Queues | Self::ClassicQueues)
    }

    fn covers_exchange(self) -> bool {
        matches!(self, Self::All | Self::Exchanges)
    }
}

#[derive(Debug, Clone)]
pub struct Policy {
    pub name: String,
    pub vhost: String,
    pub pattern: Regex,
    pub apply_to: ApplyTo,
    pub priority: i64,
    pub definition: BTreeMap<String, Value>,
}

/// Keys a (user) policy may set, and the check each value must pass.
const POLICY_KEYS: &[(&str, Kind)] = &[
    ("message-ttl", Kind::NonNegInt),
    ("expires", Kind::PosInt),
    ("max-length", Kind::NonNegInt),
    ("max-length-bytes", Kind::NonNegInt),
    (
        "overflow",
        Kind::OneOf(&["drop-head", "reject-publish", "reject-publish-dlx"]),
    ),
    ("dead-letter-exchange", Kind::Str),
    ("dead-letter-routing-key", Kind::Str),
    ("alternate-exchange", Kind::Str),
    ("max-priority", Kind::Priority),
    ("queue-mode", Kind::OneOf(&["default", "lazy"])),
    ("ha-mode", Kind::OneOf(&["all", "exactly", "nodes"])),
    ("ha-params", Kind::Any),
    ("ha-sync-mode", Kind::OneOf(&["manual", "automatic"])),
    ("ha-sync-batch-size", Kind::PosInt),
    (
        "ha-promote-on-shutdown",
        Kind::OneOf(&["always", "when-synced"]),
    ),
    (
        "ha-promote-on-failure",
        Kind::OneOf(&["always", "when-synced"]),
    ),
    ("federation-upstream", Kind::Str),
    ("federation-upstream-set", Kind::Str),
    ("delivery-limit", Kind::NonNegInt),
];

/// Keys an operator policy may set (RabbitMQ's list).
const OPERATOR_POLICY_KEYS: &[(&str, Kind)] = &[
    ("message-ttl", Kind::NonNegInt),
    ("expires", Kind::PosInt),
    ("max-length", Kind::NonNegInt),
    ("max-length-bytes", Kind::NonNegInt),
    ("max-in-memory-length", Kind::NonNegInt),
    ("max-in-memory-bytes", Kind::NonNegInt),
    ("delivery-limit", Kind::NonNegInt),
];

#[derive(Debug, Clone, Copy)]
enum Kind {
    NonNegInt,
    PosInt,
    Priority,
    Str,
    OneOf(&'static [&'static str]),
    Any,
}

fn check(kind: Kind, key: &str, v: &Value) -> Result<(), String> {
    let int = || v.as_i64().filter(|_| v.is_i64() || v.is_u64());
    match kind {
        Kind::NonNegInt => match int() {
            Some(i) if i >= 0 => Ok(()),
            _ => Err(format!("{key} must be a non-negative integer, got {v}")),
        },
        Kind::PosInt => match int() {
            Some(i) if i > 0 => Ok(()),
            _ => Err(format!("{key} must be a positive integer, got {v}")),
        },
        Kind::Priority => match int() {
            Some(i) if (0..=255).contains(&i) => Ok(()),
            _ => Err(format!(
                "{key} must be an integer between 0 and 255, got {v}"
            )),
        },
        Kind::Str => match v {
            Value::String(_) => Ok(()),
            _ => Err(format!("{key} must be a string, got {v}")),
        },
        Kind::OneOf(options) => match v.as_str() {
            Some(s) if options.contains(&s) => Ok(()),
            _ => Err(format!(
                "{key} must be one of {}, got {v}",
                options.join(", ")
            )),
        },
        Kind::Any => Ok(()),
    }
}

/// Validates and builds a policy from the management API's JSON body
/// (`{"pattern", "definition", "priority", "apply-to"}`). Errors name the offending field.
pub fn parse_policy(
    name: &str,
    vhost: &str,
    body: &Value,
    operator: bool,
) -> Result<Policy, String> {
    let obj = body
        .as_object()
        .ok_or_else(|| "the policy must be a JSON object".to_owned())?;
    for k in obj.keys() {
        if !matches!(
            k.as_str(),
            "pattern" | "definition" | "priority" | "apply-to" | "name" | "vhost"
        ) {
            return Err(format!("unknown field '{k}'"));
        }
    }
    let pattern = obj
        .get("pattern")
        .and_then(Value::as_str)
        .ok_or_else(|| "field 'pattern' is required and must be a string".to_owned())?;
    let regex =
        Regex::new(pattern).map_err(|e| format!("field 'pattern' is not a valid regex: {e}"))?;
    let apply_to = match obj.get("apply-to") {
        None => ApplyTo::All,
        Some(v) => v
            .as_str()
            .and_then(ApplyTo::parse)
            .ok_or_else(|| format!("field 'apply-to' must be one of all, queues, exchanges, classic_queues, quorum_queues, streams, got {v}"))?,
    };
    let priority = match obj.get("priority") {
        None => 0,
        Some(v) => v
            .as_i64()
            .ok_or_else(|| format!("field 'priority' must be an integer, got {v}"))?,
    };
    let def = obj
        .get("definition")
        .and_then(Value::as_object)
        .ok_or_else(|| "field 'definition' is required and must be an object".to_owned())?;
    if def.is_empty() {
        return Err("field 'definition' must not be empty".to_owned());
    }
    let allowed = if operator {
        OPERATOR_POLICY_KEYS
    } else {
        POLICY_KEYS
    };
    let mut definition = BTreeMap::new();
    for (k, v) in def {
        let Some((_, kind)) = allowed.iter().find(|(name, _)| name == k) else {
            return Err(format!(
                "definition key '{k}' is not a recognised {}policy setting",
                if operator { "operator " } else { "" }
            ));
        };
        check(*kind, &format!("definition key '{k}'"), v)?;
        definition.insert(k.clone(), v.clone());
    }
    if definition.contains_key("federation-upstream")
        && definition.contains_key("federation-upstream-set")
    {
        return Err("definition keys 'federation-upstream' and 'federation-upstream-set' are mutually exclusive".into());
    }
    Ok(Policy {
        name: name.to_owned(),
        vhost: vhost.to_owned(),
        pattern: regex,
        apply_to,
        priority,
        definition,
    })
}

/// The policy that applies to an object with this name, if any.
pub fn select<'a>(policies: &'a [Policy], name: &str, queue: bool) -> Option<&'a Policy> {
    policies
        .iter()
        .filter(|p| {
            (if queue {
                p.apply_to.covers_queue()
            } else {
                p.apply_to.covers_exchange()
            }) && p.pattern.is_match(name)
        })
        .max_by(|a, b| {
            a.priority
                .cmp(&b.priority)
                .then_with(|| b.name.cmp(&a.name))
        })
}

fn int(p: Option<&Policy>, key: &str) -> Option<u64> {
    p?.definition.get(key)?.as_u64()
}

fn string(p: Option<&Policy>, key: &str) -> Option<String> {
    Some(p?.definition.get(key)?.as_str()?.to_owned())
}

fn min_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, y) => x.or(y),
    }
}

/// Effective settings of a queue: client arguments, then the policy, capped by the operator
/// policy. `args` are the validated client arguments, `raw` their table (to see which keys the
/// client actually set). Returns the state machine's config and the queue's `expires`.
pub fn effective_queue_config(
    args: &QueueArgs,
    raw: &FieldTable,
    policy: Option<&Policy>,
    operator: Option<&Policy>,
) -> (QueueConfig, Option<u64>) {
    let has = |k: &str| raw.inner().contains_key(k);
    let mut c = args.config.clone();
    let mut expires = args.expires;
    if !has("x-message-ttl") {
        c.message_ttl = int(policy, "message-ttl");
    }
    if !has("x-expires") {
        expires = int(policy, "expires");
    }
    if !has("x-max-length") {
        c.max_length = int(policy, "max-length");
    }
    if !has("x-max-length-bytes") {
        c.max_length_bytes = int(policy, "max-length-bytes");
    }
    if !has("x-overflow") {
        c.overflow = match string(policy, "overflow").as_deref() {
            Some("reject-publish") => Overflow::RejectPublish,
            Some("reject-publish-dlx") => Overflow::RejectPublishDlx,
            _ => Overflow::DropHead,
        };
    }
    if !has("x-dead-letter-exchange") {
        c.dead_letter_exchange = string(policy, "dead-letter-exchange");
    }
    if !has("x-dead-letter-routing-key") {
        c.dead_letter_routing_key = string(policy, "dead-letter-routing-key");
    }
    if !has("x-max-priority") {
        c.max_priority = int(policy, "max-priority").map(|p| p.min(255) as u8);
    }
    c.message_ttl = min_opt(c.message_ttl, int(operator, "message-ttl"));
    c.max_length = min_opt(c.max_length, int(operator, "max-length"));
    c.max_length_bytes = min_opt(c.max_length_bytes, int(operator, "max-length-bytes"));
    expires = min_opt(expires, int(operator, "expires"));
    (c, expires)
}

/// The alternate exchange a policy gives an exchange that has none of its own.
pub fn policy_alternate_exchange(policy: Option<&Policy>) -> Option<String> {
    string(policy, "alternate-exchange")
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::types::AMQPValue;
    use serde_json::json;

    fn pol(name: &str, pattern: &str, prio: i64, def: Value) -> Policy {
        parse_policy(
            name,
            "/",
            &json!({"pattern": pattern, "priority": prio, "definition": def}),
            false,
        )
        .unwrap()
    }

    #[test]
    fn validation_names_the_field() {
        let e = parse_policy(
            "p",
            "/",
            &json!({"pattern": ".*", "definition": {"max-length": "x"}}),
            false,
        )
        .unwrap_err();
        assert!(e.contains("max-length"), "{e}");
        let e = parse_policy(
            "p",
            "/",
            &json!({"pattern": ".*", "definition": {"bogus": 1}}),
            false,
        )
        .unwrap_err();
        assert!(e.contains("bogus"), "{e}");
        let e = parse_policy(
            "p",
            "/",
            &json!({"pattern": ".*", "definition": {"ha-mode": "all"}}),
            true,
        )
        .unwrap_err();
        assert!(e.contains("ha-mode"), "{e}");
        let e = parse_policy(
            "p",
            "/",
            &json!({"pattern": "(", "definition": {"max-length": 1}}),
            false,
        )
        .unwrap_err();
        assert!(e.contains("pattern"), "{e}");
        let e = parse_policy(
            "p",
            "/",
            &json!({"pattern": ".*", "definition": {"max-length": 1}, "extra": 1}),
            false,
        )
        .unwrap_err();
        assert!(e.contains("extra"), "{e}");
        assert!(parse_policy("p", "/", &json!({"pattern": ".*", "definition": {"ha-mode": "all", "ha-params": 2, "federation-upstream-set": "all"}}), false).is_ok());
    }

    #[test]
    fn highest_priority_wins_and_apply_to_is_respected() {
        let ps = vec![
            pol("low", "^q", 1, json!({"max-length": 10})),
            pol("high", "^q", 5, json!({"max-length": 20})),
            parse_policy("ex", "/", &json!({"pattern": "^q", "priority": 9, "apply-to": "exchanges", "definition": {"alternate-exchange": "ae"}}), false).unwrap(),
        ];
        assert_eq!(select(&ps, "q1", true).unwrap().name, "high");
        assert_eq!(select(&ps, "q1", false).unwrap().name, "ex");
        assert!(select(&ps, "other", true).is_none());
    }

    #[test]
    fn client_args_beat_policy_and_operator_policy_caps() {
        let p = pol(
            "p",
            ".*",
            0,
            json!({"max-length": 100, "message-ttl": 5000, "dead-letter-exchange": "dlx", "overflow": "reject-publish"}),
        );
        let op = parse_policy(
            "op",
            "/",
            &json!({"pattern": ".*", "definition": {"max-length": 50, "expires": 1000}}),
            true,
        )
        .unwrap();
        let mut raw = FieldTable::default();
        raw.insert("x-message-ttl".into(), AMQPValue::LongInt(100));
        raw.insert("x-max-length".into(), AMQPValue::LongInt(10));
        let args = crate::queue::args::parse(&raw, "q", "/").unwrap();
        let (c, expires) = effective_queue_config(&args, &raw, Some(&p), Some(&op));
        assert_eq!(c.message_ttl, Some(100), "client argument wins");
        assert_eq!(c.max_length, Some(10), "client 10 below operator cap 50");
        assert_eq!(
            c.dead_letter_exchange.as_deref(),
            Some("dlx"),
            "policy fills the gap"
        );
        assert_eq!(c.overflow, Overflow::RejectPublish);
        assert_eq!(expires, Some(1000), "operator policy alone");
        let empty = FieldTable::default();
        let args = crate::queue::args::parse(&empty, "q", "/").unwrap();
        let (c, _) = effective_queue_config(&args, &empty, Some(&p), Some(&op));
        assert_eq!(
            c.max_length,
            Some(50),
            "operator policy caps the policy's 100"
        );
    }
}
