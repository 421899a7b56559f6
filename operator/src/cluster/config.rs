//! Renders a `RabbitCluster`'s typed broker configuration into the TOML file the broker reads
//! (`warren-broker --config`), and validates what the schema cannot.

use std::collections::BTreeMap;

use toml::Value;

use super::build::{
    AMQP_PORT, AMQPS_PORT, CA_DIR, DATA_DIR, MANAGEMENT_PORT, MANAGEMENT_TLS_PORT, PROMETHEUS_PORT,
    PROMETHEUS_TLS_PORT, TLS_DIR,
};
use crate::crd::cluster::RabbitCluster;
use kube::ResourceExt;

/// Broker configuration keys the operator sets itself; `additionalConfig` may not.
const OPERATOR_KEYS: &[&str] = &[
    "data-dir",
    "amqp-listen",
    "management-listen",
    "management-tls-listen",
    "prometheus-listen",
    "prometheus-tls-listen",
    "amqps-listen",
    "tls-cert-file",
    "tls-key-file",
    "tls-ca-file",
    "default-user",
    "default-pass",
    "node-name",
    "config",
    "cluster-peers",
    "cluster-listen",
    "cluster-advertise",
    "cluster-secret-file",
];

/// Keys with a typed field in `spec.config`, by broker key, with the field's name.
const TYPED_KEYS: &[(&str, &str)] = &[
    ("vm-memory-high-watermark", "memoryHighWatermark"),
    ("disk-free-limit", "diskFreeLimit"),
    ("heartbeat", "heartbeat"),
    ("frame-max", "frameMax"),
    ("channel-max", "channelMax"),
    ("max-connections", "maxConnections"),
    ("max-message-size", "maxMessageSize"),
    ("cluster-name", "clusterName"),
    ("default-vhost", "defaultVhost"),
    ("log-level", "logLevel"),
];

/// Broker keys `additionalConfig` may set: those without a typed field here.
pub const ADDITIONAL_KEYS: &[&str] = &["loopback-users"];

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("spec.config.{field}: {message}")]
    Invalid { field: String, message: String },
}

fn invalid(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.to_string(),
        message: message.into(),
    }
}

/// Parses a Kubernetes quantity (`10Gi`, `500M`, `1e3`, `0`) into bytes.
pub fn parse_quantity(q: &str) -> Result<u64, String> {
    let q = q.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    if number.is_empty() {
        return Err(format!(
            "{q:?} is not a quantity (expected e.g. 2Gi or 500M)"
        ));
    }
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{q:?} is not a quantity (expected e.g. 2Gi or 500M)"))?;
    let multiplier: f64 = match suffix {
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0_f64.powi(4),
        "Pi" => 1024.0_f64.powi(5),
        "Ei" => 1024.0_f64.powi(6),
        s if s.starts_with('e') || s.starts_with('E') => {
            let exp: i32 = s[1..]
                .parse()
                .map_err(|_| format!("{q:?} is not a quantity"))?;
            10f64.powi(exp)
        }
        _ => return Err(format!("{q:?} has an unknown unit {suffix:?}")),
    };
    let bytes = value * multiplier;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(format!("{q:?} is out of range"));
    }
    Ok(bytes.ceil() as u64)
}

/// Guesses the TOML type of an `additionalConfig` value: integer, float, boolean, a list
/// written as TOML (`["a", "b"]`), else a string.
fn additional_value(raw: &str) -> Value {
    if let Ok(i) = raw.parse::<i64>() {
        return Value::Integer(i);
    }
    if let Ok(f) = raw.parse::<f64>() {
        return Value::Float(f);
    }
    if let Ok(b) = raw.parse::<bool>() {
        return Value::Boolean(b);
    }
    if raw.trim_start().starts_with('[')
        && let Ok(table) = format!("v = {raw}").parse::<toml::Table>()
        && let Some(v) = table.get("v")
    {
        return v.clone();
    }
    Value::String(raw.to_string())
}

/// The broker configuration file for the cluster's nodes.
pub fn render(rc: &RabbitCluster) -> Result<String, ConfigError> {
    let c = &rc.spec.config;
    let mut t: BTreeMap<String, Value> = BTreeMap::new();
    let s = |v: &str| Value::String(v.to_string());
    t.insert("data-dir".into(), s(DATA_DIR));
    let tls_only = rc
        .spec
        .tls
        .as_ref()
        .is_some_and(|t| t.disable_non_tls_listeners);
    t.insert(
        "amqp-listen".into(),
        s(&if tls_only {
            "none".to_string()
        } else {
            format!("0.0.0.0:{AMQP_PORT}")
        }),
    );
    // With TLS the management API is also served over HTTPS (RabbitMQ's 15671); TLS only
    // turns plain HTTP off, as RabbitMQ's operator does.
    t.insert(
        "management-listen".into(),
        s(&if tls_only {
            "none".to_string()
        } else {
            format!("0.0.0.0:{MANAGEMENT_PORT}")
        }),
    );
    // Prometheus likewise: HTTPS on 15691 with TLS, plain HTTP off when TLS only.
    t.insert(
        "prometheus-listen".into(),
        s(&if tls_only {
            "none".to_string()
        } else {
            format!("0.0.0.0:{PROMETHEUS_PORT}")
        }),
    );
    if let Some(tls) = &rc.spec.tls {
        t.insert("amqps-listen".into(), s(&format!("0.0.0.0:{AMQPS_PORT}")));
        t.insert(
            "management-tls-listen".into(),
            s(&format!("0.0.0.0:{MANAGEMENT_TLS_PORT}")),
        );
        t.insert(
            "prometheus-tls-listen".into(),
            s(&format!("0.0.0.0:{PROMETHEUS_TLS_PORT}")),
        );
        t.insert("tls-cert-file".into(), s(&format!("{TLS_DIR}/tls.crt")));
        t.insert("tls-key-file".into(), s(&format!("{TLS_DIR}/tls.key")));
        if tls.ca_secret_name.is_some() {
            t.insert("tls-ca-file".into(), s(&format!("{CA_DIR}/ca.crt")));
        }
    }
    // Every node is given the first pod as its peer: members learn the others from it and
    // remember them, so the list does not change (nor roll the pods) when the cluster scales.
    // Pod 0 recognises its own address.
    t.insert(
        "cluster-peers".into(),
        Value::Array(vec![s(&super::build::seed_peer(rc))]),
    );
    t.insert(
        "cluster-listen".into(),
        s(&format!("0.0.0.0:{}", super::build::CLUSTER_PORT)),
    );
    t.insert(
        "cluster-secret-file".into(),
        s(&format!("{}/secret", super::build::CLUSTER_SECRET_DIR)),
    );
    // The default user may connect from anywhere; it is never `guest`.
    t.insert("loopback-users".into(), Value::Array(vec![]));
    t.insert(
        "cluster-name".into(),
        s(c.cluster_name.as_deref().unwrap_or(&rc.name_any())),
    );
    if let Some(w) = c.memory_high_watermark {
        if !(w > 0.0 && w <= 1.0) {
            return Err(invalid(
                "memoryHighWatermark",
                format!("{w} is not a fraction between 0 (exclusive) and 1"),
            ));
        }
        t.insert("vm-memory-high-watermark".into(), Value::Float(w));
    }
    if let Some(q) = &c.disk_free_limit {
        let bytes = parse_quantity(&q.0).map_err(|m| invalid("diskFreeLimit", m))?;
        let bytes = i64::try_from(bytes).map_err(|_| invalid("diskFreeLimit", "too large"))?;
        t.insert("disk-free-limit".into(), Value::Integer(bytes));
    }
    let ints = [
        ("heartbeat", c.heartbeat.map(i64::from)),
        ("frame-max", c.frame_max),
        ("channel-max", c.channel_max.map(i64::from)),
        ("max-connections", c.max_connections),
        ("max-message-size", c.max_message_size),
    ];
    for (key, value) in ints {
        if let Some(v) = value {
            t.insert(key.into(), Value::Integer(v));
        }
    }
    if let Some(v) = &c.default_vhost {
        t.insert("default-vhost".into(), s(v));
    }
    if let Some(l) = c.log_level {
        t.insert("log-level".into(), s(l.as_str()));
    }
    for (key, raw) in &c.additional_config {
        let field = format!("additionalConfig.{key}");
        if OPERATOR_KEYS.contains(&key.as_str()) {
            return Err(invalid(
                &field,
                "is set by the operator and cannot be overridden",
            ));
        }
        if let Some((_, typed)) = TYPED_KEYS.iter().find(|(k, _)| k == key) {
            return Err(invalid(&field, format!("use spec.config.{typed} instead")));
        }
        if !ADDITIONAL_KEYS.contains(&key.as_str()) {
            return Err(invalid(
                &field,
                format!(
                    "is not a broker setting (settings without a typed field: {})",
                    ADDITIONAL_KEYS.join(", ")
                ),
            ));
        }
        t.insert(key.clone(), additional_value(raw));
    }
    let table: toml::Table = t.into_iter().collect();
    toml::to_string(&table).map_err(|e| invalid("", e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::cluster::{RabbitCluster, RabbitClusterSpec};
    use serde_json::json;

    fn cluster(spec: serde_json::Value) -> RabbitCluster {
        let spec: RabbitClusterSpec = serde_json::from_value(spec).expect("spec");
        RabbitCluster::new("hare", spec)
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("0"), Ok(0));
        assert_eq!(parse_quantity("10Gi"), Ok(10 * 1024 * 1024 * 1024));
        assert_eq!(parse_quantity("500M"), Ok(500_000_000));
        assert_eq!(parse_quantity("1.5Ki"), Ok(1536));
        assert_eq!(parse_quantity("2e3"), Ok(2000));
        assert!(parse_quantity("lots").is_err());
        assert!(parse_quantity("5Xi").is_err());
    }

    /// The rendered file must be one the broker itself accepts: parse it with the broker's
    /// own configuration loader.
    fn broker_accepts(text: &str) -> warren_broker::config::Config {
        let dir = std::env::temp_dir().join(format!(
            "warren-operator-config-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("warren.toml");
        std::fs::write(&path, text).expect("write");
        let cli = warren_broker::config::Cli {
            config: Some(path),
            ..Default::default()
        };
        let config = warren_broker::config::Config::resolve(cli);
        let _ = std::fs::remove_dir_all(&dir);
        match config {
            Ok(c) => c,
            Err(e) => panic!("broker rejects the rendered configuration: {e}\n{text}"),
        }
    }

    #[test]
    fn minimal_config_is_understood_by_the_broker() {
        let text = render(&cluster(json!({}))).expect("render");
        let c = broker_accepts(&text);
        assert_eq!(c.data_dir, std::path::PathBuf::from(DATA_DIR));
        assert!(c.loopback_users.is_empty());
    }

    #[test]
    fn nodes_are_clustered_through_the_first_pod() {
        let mut rc = cluster(json!({}));
        rc.metadata.namespace = Some("ns".into());
        let c = broker_accepts(&render(&rc).expect("render"));
        let seed = super::super::build::seed_peer(&rc);
        assert_eq!(seed, "hare-server-0.hare-nodes.ns");
        assert_eq!(c.cluster_peers, [seed]);
        assert_eq!(
            c.cluster_peer_addrs(),
            [format!("{}:25672", c.cluster_peers[0])]
        );
        assert_eq!(c.cluster_listen.map(|a| a.port()), Some(25672));
        assert_eq!(
            c.cluster_secret_file.as_deref(),
            Some(std::path::Path::new("/etc/warren-cluster/secret"))
        );
        let err = render(&cluster(json!({"config": {"additionalConfig": {
            "cluster-peers": "elsewhere"
        }}})))
        .expect_err("operator key");
        assert!(err.to_string().contains("set by the operator"), "{err}");
    }

    #[test]
    fn typed_config_reaches_the_broker() {
        let text = render(&cluster(json!({"config": {
            "memoryHighWatermark": 0.6,
            "diskFreeLimit": "2Gi",
            "heartbeat": 30,
            "frameMax": 262144,
            "channelMax": 128,
            "maxConnections": 1000,
            "maxMessageSize": 1048576,
            "defaultVhost": "apps",
            "logLevel": "debug",
            "additionalConfig": {"loopback-users": "[\"ops\"]"},
        }})))
        .expect("render");
        let c = broker_accepts(&text);
        assert_eq!(c.vm_memory_high_watermark, 0.6);
        assert_eq!(c.disk_free_limit, 2 * 1024 * 1024 * 1024);
        assert_eq!(c.heartbeat, 30);
        assert_eq!(c.frame_max, 262144);
        assert_eq!(c.channel_max, 128);
        assert_eq!(c.max_connections, 1000);
        assert_eq!(c.max_message_size, 1048576);
        assert_eq!(c.default_vhost, "apps");
        assert_eq!(c.log_level, "debug");
        assert_eq!(c.loopback_users, vec!["ops".to_string()]);
    }

    #[test]
    fn tls_serves_management_over_https_and_tls_only_turns_http_off() {
        let text = render(&cluster(json!({}))).expect("render");
        let c = broker_accepts(&text);
        assert_eq!(c.management_listen, Some(([0, 0, 0, 0], 15672).into()));
        assert_eq!(c.management_tls_listen, None);
        assert_eq!(c.prometheus_tls_listen, None);

        let text = render(&cluster(json!({"tls": {"secretName": "t"}}))).expect("render");
        let c = broker_accepts(&text);
        assert_eq!(c.management_listen, Some(([0, 0, 0, 0], 15672).into()));
        assert_eq!(c.management_tls_listen, Some(([0, 0, 0, 0], 15671).into()));
        assert!(c.https_files().is_some());
        assert_eq!(c.amqp_listen, Some(([0, 0, 0, 0], 5672).into()));
        assert_eq!(c.prometheus_listen, Some(([0, 0, 0, 0], 15692).into()));
        assert_eq!(c.prometheus_tls_listen, Some(([0, 0, 0, 0], 15691).into()));

        let text = render(&cluster(json!({"tls": {
            "secretName": "t", "caSecretName": "ca", "disableNonTLSListeners": true,
        }})))
        .expect("render");
        let c = broker_accepts(&text);
        assert_eq!(c.management_listen, None);
        assert_eq!(c.management_tls_listen, Some(([0, 0, 0, 0], 15671).into()));
        assert_eq!(c.amqp_listen, None);
        assert_eq!(c.amqps_listen, Some(([0, 0, 0, 0], 5671).into()));
        // The management listener asks for no client certificate, even with a CA.
        assert_eq!(c.https_files().expect("https").ca, None);
        assert!(c.tls_files().expect("amqps").ca.is_some());
        // Prometheus is served over HTTPS only, as RabbitMQ's operator does.
        assert_eq!(c.prometheus_listen, None);
        assert_eq!(c.prometheus_tls_listen, Some(([0, 0, 0, 0], 15691).into()));

        let err = render(&cluster(json!({"config": {"additionalConfig": {
            "management-tls-listen": "\"0.0.0.0:1\"",
        }}})))
        .expect_err("operator key");
        assert!(err.to_string().contains("set by the operator"), "{err}");
    }

    #[test]
    fn additional_config_cannot_shadow_typed_or_operator_keys() {
        let err = render(&cluster(
            json!({"config": {"additionalConfig": {"heartbeat": "5"}}}),
        ))
        .expect_err("typed key");
        assert!(err.to_string().contains("spec.config.heartbeat"), "{err}");
        let err = render(&cluster(
            json!({"config": {"additionalConfig": {"data-dir": "/x"}}}),
        ))
        .expect_err("operator key");
        assert!(err.to_string().contains("set by the operator"), "{err}");
        let err = render(&cluster(
            json!({"config": {"additionalConfig": {"hartbeat": "5"}}}),
        ))
        .expect_err("unknown key");
        assert!(err.to_string().contains("not a broker setting"), "{err}");
    }

    #[test]
    fn bad_disk_limit_is_a_clear_error() {
        let err = render(&cluster(json!({"config": {"diskFreeLimit": "plenty"}})))
            .expect_err("bad quantity");
        assert!(
            err.to_string().starts_with("spec.config.diskFreeLimit"),
            "{err}"
        );
    }
}
