//! `/api/definitions`: export and import of RabbitMQ definitions files (users, vhosts,
//! permissions, topic permissions, parameters, policies, queues, exchanges, bindings), node-wide
//! or for one vhost (`/api/definitions/{vhost}`, without the node-wide sections).
//!
//! Import goes through the same validation as the individual endpoints and stops at the first
//! invalid entry with a 400 naming it; what came before it stays imported, as in RabbitMQ.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::routing::get;
use bytes::Bytes;
use serde_json::{Map, Value, json};

use super::auth::Caller;
use super::bindings::all_bindings;
use super::body::Body;
use super::fields::table_to_json;
use super::policies::{policy_json, put_policy_value};
use super::{ApiError, ApiResult, RABBITMQ_API_VERSION, apply, no_content, ok};
use crate::broker::Broker;
use crate::definitions::Change;
use crate::exchange::Destination;
use crate::vhost::Vhost;

/// The runtime parameter component that carries a vhost's limits in definitions files.
const VHOST_LIMITS_COMPONENT: &str = "vhost-limits";

pub fn routes() -> Router<Arc<Broker>> {
    Router::new()
        .route("/api/definitions", get(export_all).post(import_all))
        .route(
            "/api/definitions/{vhost}",
            get(export_vhost).post(import_vhost),
        )
}

/// The vhost's own objects: parameters, policies, durable-or-not queues (not exclusive ones),
/// exchanges (not the predeclared ones) and bindings (not the default exchange's).
fn vhost_sections(broker: &Broker, v: &Vhost, with_vhost: bool) -> Map<String, Value> {
    let tag = |mut j: Value| {
        if !with_vhost && let Some(o) = j.as_object_mut() {
            o.remove("vhost");
        }
        j
    };
    let mut queues = v.queues();
    queues.sort_by(|a, b| a.name.cmp(&b.name));
    let queues: Vec<Value> = queues
        .iter()
        .filter(|q| q.exclusive_owner.is_none())
        .map(|q| {
            tag(json!({
                "name": q.name,
                "vhost": v.name,
                "durable": q.durable,
                "auto_delete": q.auto_delete,
                "arguments": table_to_json(&q.arguments),
            }))
        })
        .collect();
    let mut exchanges = v.exchanges();
    exchanges.sort_by(|a, b| a.name.cmp(&b.name));
    let exchanges: Vec<Value> = exchanges
        .iter()
        .filter(|e| !e.name.is_empty() && !e.name.starts_with("amq."))
        .map(|e| {
            tag(json!({
                "name": e.name,
                "vhost": v.name,
                "type": e.kind.as_str(),
                "durable": e.durable,
                "auto_delete": e.auto_delete,
                "internal": e.internal,
                "arguments": table_to_json(&e.arguments),
            }))
        })
        .collect();
    let bindings: Vec<Value> = all_bindings(v, false)
        .iter()
        .map(|(source, b)| {
            let (dt, d) = match &b.destination {
                Destination::Queue(q) => ("queue", q),
                Destination::Exchange(e) => ("exchange", e),
            };
            tag(json!({
                "source": source,
                "vhost": v.name,
                "destination": d,
                "destination_type": dt,
                "routing_key": b.routing_key,
                "arguments": table_to_json(&b.arguments),
            }))
        })
        .collect();
    let mut policies = v.policies(false);
    policies.sort_by(|a, b| a.name.cmp(&b.name));
    let parameters: Vec<Value> = broker
        .parameters
        .list(None, Some(&v.name))
        .iter()
        .map(|p| tag(super::parameters::parameter_json(p)))
        .collect();
    let mut parameters = parameters;
    let limits = v.limits();
    if !limits.is_empty() {
        // RabbitMQ keeps a vhost's limits as this runtime parameter, and exports them so.
        parameters.push(tag(json!({
            "value": crate::limits::to_json(&limits),
            "vhost": v.name,
            "component": VHOST_LIMITS_COMPONENT,
            "name": "limits",
        })));
    }
    let mut m = Map::new();
    m.insert("parameters".into(), Value::Array(parameters));
    m.insert(
        "policies".into(),
        Value::Array(policies.iter().map(|p| tag(policy_json(p))).collect()),
    );
    m.insert("queues".into(), Value::Array(queues));
    m.insert("exchanges".into(), Value::Array(exchanges));
    m.insert("bindings".into(), Value::Array(bindings));
    m
}

async fn export_all(State(broker): State<Arc<Broker>>, caller: Caller) -> ApiResult {
    caller.require_admin()?;
    let mut names = broker.vhost_names();
    names.sort();
    let vhosts: Vec<Arc<Vhost>> = names.iter().filter_map(|n| broker.vhost(n)).collect();
    let mut sections: Map<String, Value> = Map::new();
    for key in ["parameters", "policies", "queues", "exchanges", "bindings"] {
        sections.insert(key.into(), Value::Array(Vec::new()));
    }
    for v in &vhosts {
        for (k, list) in vhost_sections(&broker, v, true) {
            if let (Some(Value::Array(all)), Value::Array(items)) = (sections.get_mut(&k), list) {
                all.extend(items);
            }
        }
    }
    let mut out = json!({
        "rabbit_version": RABBITMQ_API_VERSION,
        "rabbitmq_version": RABBITMQ_API_VERSION,
        "product_name": "Warren",
        "product_version": env!("CARGO_PKG_VERSION"),
        "users": broker.access.users().iter().map(|u| super::users::user_json(&broker, u)).collect::<Vec<_>>(),
        "vhosts": vhosts.iter().map(|v| {
            let meta = broker.vhost_metadata(&v.name);
            json!({"name": v.name, "description": meta.description, "tags": meta.tags})
        }).collect::<Vec<_>>(),
        "permissions": broker.access.permissions().iter()
            .map(|(u, v, p)| super::users::permission_json(u, v, p)).collect::<Vec<_>>(),
        "topic_permissions": broker.access.topic_permissions().iter()
            .map(|(u, v, t)| super::users::topic_permission_json(u, v, t)).collect::<Vec<_>>(),
        "global_parameters": [],
    });
    if let Some(o) = out.as_object_mut() {
        o.extend(sections);
    }
    ok(out)
}

async fn export_vhost(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> ApiResult {
    caller.require_admin()?;
    let v = broker.vhost(&vhost).ok_or_else(ApiError::not_found)?;
    let mut out =
        json!({"rabbit_version": RABBITMQ_API_VERSION, "rabbitmq_version": RABBITMQ_API_VERSION});
    if let Some(o) = out.as_object_mut() {
        o.extend(vhost_sections(&broker, &v, false));
    }
    ok(out)
}

/// The entries of one section, each a JSON object.
fn entries(doc: &Map<String, Value>, section: &str) -> ApiResult<Vec<Body>> {
    match doc.get(section) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(list)) => list
            .iter()
            .enumerate()
            .map(|(i, e)| match e {
                Value::Object(m) => Ok(Body(m.clone())),
                _ => Err(ApiError::bad_request(format!(
                    "{section}[{i}] must be a JSON object"
                ))),
            })
            .collect(),
        Some(_) => Err(ApiError::bad_request(format!(
            "field '{section}' must be a list"
        ))),
    }
}

/// Prefixes an entry's error with where it is in the file.
fn at<T>(section: &str, i: usize, r: ApiResult<T>) -> ApiResult<T> {
    r.map_err(|mut e| {
        e.reason = format!("{section}[{i}]: {}", e.reason);
        e
    })
}

/// Imports a definitions document. With `only_vhost`, every object goes into that vhost and
/// the node-wide sections are ignored.
async fn import(
    broker: &Broker,
    caller: &Caller,
    doc: &Map<String, Value>,
    only_vhost: Option<&str>,
) -> ApiResult<()> {
    let vhost_of = |e: &Body| -> ApiResult<String> {
        match only_vhost {
            Some(v) => Ok(v.to_owned()),
            None => Ok(e.req_str("vhost")?.to_owned()),
        }
    };
    let existing_vhost = |name: &str| -> ApiResult<Arc<Vhost>> {
        broker
            .vhost(name)
            .ok_or_else(|| ApiError::bad_request(format!("no_such_vhost: '{name}'")))
    };
    // Definitions are validated and applied one by one (each through the cluster's metadata
    // group when clustered), so an entry may refer to one earlier in the file.
    if only_vhost.is_none() {
        for (i, e) in entries(doc, "users")?.iter().enumerate() {
            let change = at(
                "users",
                i,
                e.req_str("name")
                    .and_then(|n| super::users::put_user_from(broker, n, e)),
            )?;
            at("users", i, apply(broker, change).await)?;
            if let Some(l) = e.get("limits") {
                let change = at(
                    "users",
                    i,
                    crate::limits::validate_all(crate::limits::Scope::User, l)
                        .map_err(ApiError::bad_request)
                        .and_then(|limits| {
                            Ok(Change::SetUserLimits(crate::limits::UserLimitsDef {
                                user: e.req_str("name")?.to_owned(),
                                limits,
                            }))
                        }),
                )?;
                at("users", i, apply(broker, change).await)?;
            }
        }
        for (i, e) in entries(doc, "vhosts")?.iter().enumerate() {
            let change = at(
                "vhosts",
                i,
                e.req_str("name")
                    .and_then(|n| super::vhosts::put_vhost(broker, n, e)),
            )?;
            at("vhosts", i, apply(broker, change).await)?;
        }
        for (i, e) in entries(doc, "permissions")?.iter().enumerate() {
            let change = at(
                "permissions",
                i,
                (|| {
                    super::users::put_permission_from(
                        broker,
                        e.req_str("vhost")?,
                        e.req_str("user")?,
                        e,
                    )
                })(),
            )?;
            at("permissions", i, apply(broker, change).await)?;
        }
        for (i, e) in entries(doc, "topic_permissions")?.iter().enumerate() {
            let change = at(
                "topic_permissions",
                i,
                (|| {
                    super::users::put_topic_permission_from(
                        broker,
                        e.req_str("vhost")?,
                        e.req_str("user")?,
                        e,
                    )
                })(),
            )?;
            at("topic_permissions", i, apply(broker, change).await)?;
        }
    }
    for (i, e) in entries(doc, "parameters")?.iter().enumerate() {
        let change = at(
            "parameters",
            i,
            (|| {
                let value = e
                    .get("value")
                    .cloned()
                    .ok_or_else(|| super::body::missing("value"))?;
                if e.req_str("component")? == VHOST_LIMITS_COMPONENT {
                    caller.require_admin()?;
                    let vhost = existing_vhost(&vhost_of(e)?)?.name.clone();
                    let limits = crate::limits::validate_all(crate::limits::Scope::Vhost, &value)
                        .map_err(ApiError::bad_request)?;
                    return Ok(Change::SetVhostLimits(crate::limits::VhostLimitsDef {
                        vhost,
                        limits,
                    }));
                }
                super::parameters::put_parameter(
                    broker,
                    caller,
                    e.req_str("component")?,
                    &vhost_of(e)?,
                    e.req_str("name")?,
                    value,
                )
            })(),
        )?;
        at("parameters", i, apply(broker, change).await)?;
    }
    for (i, e) in entries(doc, "policies")?.iter().enumerate() {
        let change = at(
            "policies",
            i,
            (|| {
                let v = existing_vhost(&vhost_of(e)?)?;
                let mut body = e.0.clone();
                body.insert("vhost".into(), Value::String(v.name.clone()));
                put_policy_value(&v, e.req_str("name")?, &Value::Object(body), false)
            })(),
        )?;
        at("policies", i, apply(broker, change).await)?;
    }
    for (i, e) in entries(doc, "queues")?.iter().enumerate() {
        at(
            "queues",
            i,
            (|| {
                let v = existing_vhost(&vhost_of(e)?)?;
                super::queues::declare_queue(broker, caller, &v, e.req_str("name")?, e)
            })(),
        )?;
    }
    for (i, e) in entries(doc, "exchanges")?.iter().enumerate() {
        at(
            "exchanges",
            i,
            (|| {
                let v = existing_vhost(&vhost_of(e)?)?;
                super::exchanges::declare_exchange(broker, caller, &v, e.req_str("name")?, e)
            })(),
        )?;
    }
    for (i, e) in entries(doc, "bindings")?.iter().enumerate() {
        at(
            "bindings",
            i,
            (|| {
                let v = existing_vhost(&vhost_of(e)?)?;
                let dest = e.req_str("destination")?.to_owned();
                let dest = match e.opt_str("destination_type")?.unwrap_or("queue") {
                    "queue" => Destination::Queue(dest),
                    "exchange" => Destination::Exchange(dest),
                    other => {
                        return Err(ApiError::bad_request(format!(
                            "field 'destination_type' must be queue or exchange, got \"{other}\""
                        )));
                    }
                };
                super::bindings::create_binding(broker, caller, &v, e.req_str("source")?, dest, e)
            })(),
        )?;
    }
    Ok(())
}

fn parse_doc(bytes: &Bytes) -> ApiResult<Map<String, Value>> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(ApiError::bad_request("failed_to_parse_json")),
    }
}

async fn import_all(State(broker): State<Arc<Broker>>, caller: Caller, bytes: Bytes) -> ApiResult {
    caller.require_admin()?;
    let doc = parse_doc(&bytes)?;
    import(&broker, &caller, &doc, None).await?;
    no_content()
}

async fn import_vhost(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path(vhost): Path<String>,
    bytes: Bytes,
) -> ApiResult {
    caller.require_admin()?;
    broker.vhost(&vhost).ok_or_else(ApiError::not_found)?;
    let doc = parse_doc(&bytes)?;
    import(&broker, &caller, &doc, Some(&vhost)).await?;
    no_content()
}
