//! `Exchange` → `PUT /api/exchanges/{vhost}/{name}` (a declare: idempotent while the
//! properties match, which the schema keeps so); deletion deletes the exchange.

use std::collections::BTreeMap;

use kube::ResourceExt;
use serde_json::{Value, json};

use super::{Target, Topology, subset, target_of};
use crate::crd::Exchange;
use crate::crd::common::DeletionPolicy;
use crate::management::segment;

impl Topology for Exchange {
    const CONTROLLER: &'static str = "exchange";
    const FINALIZER: &'static str = "warren.dev/exchange-cleanup";
    const NOUN: &'static str = "exchange";

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
        format!(
            "/api/exchanges/{}/{}",
            segment(&self.spec.vhost),
            segment(&self.broker_name())
        )
    }
    /// Arguments as a subset: a broker may list defaults it added.
    fn in_sync(&self, body: &Value, current: &Value) -> bool {
        ["type", "durable", "auto_delete", "internal"]
            .iter()
            .all(|k| body[k] == current[k])
            && subset(&body["arguments"], &current["arguments"])
    }
    fn body(&self, _: Option<&BTreeMap<String, String>>) -> Result<Value, String> {
        Ok(json!({
            "type": self.spec.type_,
            "durable": self.spec.durable,
            "auto_delete": self.spec.auto_delete,
            "internal": self.spec.internal,
            "arguments": self.spec.arguments,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::ExchangeSpec;

    #[test]
    fn body_and_path() {
        let spec: ExchangeSpec = serde_json::from_value(json!({
            "vhost": "prod/eu", "type": "topic", "internal": true,
            "arguments": {"alternate-exchange": "ae"}, "rabbitClusterReference": {"name": "c"},
        }))
        .expect("spec");
        let x = Exchange::new("orders", spec);
        assert_eq!(x.path(), "/api/exchanges/prod%2Feu/orders");
        assert_eq!(
            x.body(None).expect("body"),
            json!({"type": "topic", "durable": true, "auto_delete": false, "internal": true,
                   "arguments": {"alternate-exchange": "ae"}})
        );
        let spec: ExchangeSpec =
            serde_json::from_value(json!({"connectionSecret": {"name": "s"}})).expect("spec");
        let x = Exchange::new("plain", spec);
        assert_eq!(x.body(None).expect("body")["type"], "direct");
    }
}
