//! `Binding` → `POST /api/bindings/{vhost}/e/{source}/q|e/{destination}` (idempotent: the
//! same binding twice is one binding). A binding has no name on the broker; deleting it
//! finds its properties key in `GET` of the same path (the entry with this routing key and
//! these arguments) and deletes `…/{properties_key}`.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::{Target, Topology, target_of};
use crate::crd::Binding;
use crate::crd::binding::DestinationType;
use crate::crd::common::DeletionPolicy;
use crate::management::segment;

impl Binding {
    /// The broker's entry for this binding in a listing of the bindings between its source
    /// and destination.
    fn find_in<'a>(&self, listed: &'a Value) -> Option<&'a Value> {
        let arguments = serde_json::to_value(&self.spec.arguments).ok()?;
        listed.as_array()?.iter().find(|b| {
            b["routing_key"].as_str() == Some(self.spec.routing_key.as_str())
                // A broker lists a binding without arguments as `{}` (or, some versions, `[]`).
                && (b["arguments"] == arguments
                    || (self.spec.arguments.is_empty()
                        && b["arguments"].as_array().is_some_and(Vec::is_empty)))
        })
    }
}

impl Topology for Binding {
    const CONTROLLER: &'static str = "binding";
    const FINALIZER: &'static str = "warren.dev/binding-cleanup";
    const NOUN: &'static str = "binding";
    const CREATED_BY_POST: bool = true;
    const DELETE_NEEDS_LOOKUP: bool = true;

    fn target(&self) -> Target<'_> {
        target_of(
            &self.spec.rabbit_cluster_reference,
            &self.spec.connection_secret,
        )
    }
    fn deletion_policy(&self) -> DeletionPolicy {
        self.spec.deletion_policy
    }
    /// For messages: `source -> destination (key)`.
    fn broker_name(&self) -> String {
        format!(
            "{} -> {} {} (routing key {:?})",
            self.spec.source,
            match self.spec.destination_type {
                DestinationType::Queue => "queue",
                DestinationType::Exchange => "exchange",
            },
            self.spec.destination,
            self.spec.routing_key
        )
    }
    /// The bindings between source and destination: POSTed to, listed, and the parent of
    /// each binding's own path.
    fn path(&self) -> String {
        format!(
            "/api/bindings/{}/e/{}/{}/{}",
            segment(&self.spec.vhost),
            segment(&self.spec.source),
            match self.spec.destination_type {
                DestinationType::Queue => "q",
                DestinationType::Exchange => "e",
            },
            segment(&self.spec.destination)
        )
    }
    fn delete_path(&self, current: Option<&Value>) -> Option<String> {
        let key = self.find_in(current?)?["properties_key"].as_str()?;
        Some(format!("{}/{}", self.path(), segment(key)))
    }
    fn in_sync(&self, _body: &Value, current: &Value) -> bool {
        self.find_in(current).is_some()
    }
    fn body(&self, _: Option<&BTreeMap<String, String>>) -> Result<Value, String> {
        Ok(json!({
            "routing_key": self.spec.routing_key,
            "arguments": self.spec.arguments,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::BindingSpec;

    fn binding(spec: Value) -> Binding {
        Binding::new(
            "b",
            serde_json::from_value::<BindingSpec>(spec).expect("spec"),
        )
    }

    #[test]
    fn body_and_paths() {
        let b = binding(
            json!({"vhost": "prod/eu", "source": "events", "destination": "a b",
                               "routingKey": "orders.#", "rabbitClusterReference": {"name": "c"}}),
        );
        assert_eq!(b.path(), "/api/bindings/prod%2Feu/e/events/q/a%20b");
        assert_eq!(
            b.body(None).expect("body"),
            json!({"routing_key": "orders.#", "arguments": {}})
        );
        let b = binding(json!({"source": "events", "destination": "audit",
                               "destinationType": "exchange", "arguments": {"x-match": "all"},
                               "connectionSecret": {"name": "s"}}));
        assert_eq!(b.path(), "/api/bindings/%2F/e/events/e/audit");
        assert_eq!(
            b.body(None).expect("body"),
            json!({"routing_key": "", "arguments": {"x-match": "all"}})
        );
    }

    #[test]
    fn deletes_the_entry_with_the_same_key_and_arguments() {
        let listed = json!([
            {"routing_key": "a", "arguments": {}, "properties_key": "a"},
            {"routing_key": "a", "arguments": {"x": 1}, "properties_key": "a~h/1"},
            {"routing_key": "", "arguments": [], "properties_key": "~"},
        ]);
        let b = binding(json!({"source": "s", "destination": "q", "routingKey": "a",
                               "arguments": {"x": 1}, "rabbitClusterReference": {"name": "c"}}));
        assert_eq!(
            b.delete_path(Some(&listed)).as_deref(),
            Some("/api/bindings/%2F/e/s/q/q/a~h%2F1")
        );
        let b = binding(json!({"source": "s", "destination": "q", "routingKey": "a",
                               "rabbitClusterReference": {"name": "c"}}));
        assert_eq!(
            b.delete_path(Some(&listed)).as_deref(),
            Some("/api/bindings/%2F/e/s/q/q/a")
        );
        let b = binding(json!({"source": "s", "destination": "q",
                               "rabbitClusterReference": {"name": "c"}}));
        assert_eq!(
            b.delete_path(Some(&listed)).as_deref(),
            Some("/api/bindings/%2F/e/s/q/q/~")
        );
        // Not on the broker: nothing to delete.
        let b = binding(
            json!({"source": "s", "destination": "q", "routingKey": "other",
                               "rabbitClusterReference": {"name": "c"}}),
        );
        assert_eq!(b.delete_path(Some(&listed)), None);
        assert_eq!(b.delete_path(None), None);
    }
}
