//! `/api/exchanges`: list, declare (PUT), show, delete, and `/publish`.
//! The default exchange is `amq.default` in paths, `""` in bodies.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use serde_json::{Value, json};

use super::auth::Caller;
use super::body::{Body, missing, query_flag};
use super::fields::{arguments, properties_from_json, table_to_json};
use super::{ApiError, ApiResult, apply, created_or_updated, no_content, ok};
use crate::auth::{Access, Resource};
use crate::broker::Broker;
use crate::definitions::{Change, ExchangeRecord};
use crate::error::AmqpError;
use crate::exchange::{Exchange, ExchangeKind};
use crate::message::Message;
use crate::queue::now_ms;
use crate::store::metadata::encode_table;
use crate::vhost::Vhost;

pub fn routes() -> Router<Arc<Broker>> {
    Router::new()
        .route("/api/exchanges", get(list_all))
        .route("/api/exchanges/{vhost}", get(list_vhost))
        .route(
            "/api/exchanges/{vhost}/{name}",
            get(show).put(declare).delete(remove),
        )
        .route("/api/exchanges/{vhost}/{name}/publish", post(publish))
}

/// The exchange name a path segment means.
pub fn path_name(segment: &str) -> &str {
    if segment == "amq.default" {
        ""
    } else {
        segment
    }
}

pub fn exchange_json(vhost: &str, e: &Exchange) -> Value {
    json!({
        "name": e.name,
        "vhost": vhost,
        "type": e.kind.as_str(),
        "durable": e.durable,
        "auto_delete": e.auto_delete,
        "internal": e.internal,
        "arguments": table_to_json(&e.arguments),
    })
}

fn sorted(v: &Vhost) -> Vec<Arc<Exchange>> {
    let mut xs = v.exchanges();
    xs.sort_by(|a, b| a.name.cmp(&b.name));
    xs
}

async fn list_all(State(broker): State<Arc<Broker>>, caller: Caller) -> ApiResult {
    let mut out = Vec::new();
    for v in caller.visible_vhosts(&broker) {
        out.extend(sorted(&v).iter().map(|e| exchange_json(&v.name, e)));
    }
    ok(Value::Array(out))
}

async fn list_vhost(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> ApiResult {
    let v = caller.vhost(&broker, &vhost)?;
    ok(Value::Array(
        sorted(&v)
            .iter()
            .map(|e| exchange_json(&v.name, e))
            .collect(),
    ))
}

async fn show(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult {
    let v = caller.vhost(&broker, &vhost)?;
    let e = v
        .exchange(path_name(&name))
        .ok_or_else(ApiError::not_found)?;
    ok(exchange_json(&v.name, &e))
}

fn reserved(name: &str) -> Option<ApiError> {
    (name.is_empty() || name.starts_with("amq.")).then(|| {
        AmqpError::access_refused(format!(
            "exchange name '{name}' contains reserved prefix 'amq.*'"
        ))
        .into()
    })
}

/// Declares an exchange from `{"type", "durable", "auto_delete", "internal", "arguments"}`;
/// true if it was created.
pub fn declare_exchange(
    broker: &Broker,
    caller: &Caller,
    v: &Vhost,
    name: &str,
    body: &Body,
) -> ApiResult<bool> {
    if let Some(e) = reserved(name) {
        return Err(e);
    }
    caller.check(broker, &v.name, Resource::Exchange, name, Access::Configure)?;
    let kind = body.opt_str("type")?.unwrap_or("direct");
    let durable = body.bool_or("durable", false)?;
    let auto_delete = body.bool_or("auto_delete", false)?;
    let internal = body.bool_or("internal", false)?;
    let args = arguments(body)?;
    let created = v.exchange(name).is_none();
    v.declare_exchange(name, kind, false, durable, auto_delete, internal, &args)?;
    Ok(created)
}

async fn declare(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    bytes: Bytes,
) -> ApiResult {
    let v = caller.vhost(&broker, &vhost)?;
    let body = Body::parse(&bytes)?;
    if broker.clustered() && v.exchange(&name).is_none() {
        // New: declared through the cluster's metadata group, 201 once committed.
        if let Some(e) = reserved(&name) {
            return Err(e);
        }
        caller.check(
            &broker,
            &v.name,
            Resource::Exchange,
            &name,
            Access::Configure,
        )?;
        let kind = body.opt_str("type")?.unwrap_or("direct");
        if ExchangeKind::parse(kind).is_none() {
            return Err(ApiError::bad_request(format!(
                "unknown exchange type '{kind}'"
            )));
        }
        let record = ExchangeRecord {
            vhost: v.name.clone(),
            name: name.clone(),
            kind: kind.to_owned(),
            durable: body.bool_or("durable", false)?,
            auto_delete: body.bool_or("auto_delete", false)?,
            internal: body.bool_or("internal", false)?,
            arguments: encode_table(&arguments(&body)?),
        };
        apply(&broker, Change::DeclareExchange(record)).await?;
        return created_or_updated(true);
    }
    created_or_updated(declare_exchange(&broker, &caller, &v, &name, &body)?)
}

async fn remove(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult {
    let v = caller.vhost(&broker, &vhost)?;
    let name = path_name(&name);
    v.exchange(name).ok_or_else(ApiError::not_found)?;
    if let Some(e) = reserved(name) {
        return Err(e);
    }
    caller.check(&broker, &vhost, Resource::Exchange, name, Access::Configure)?;
    if broker.clustered() {
        let in_use = v
            .exchange(name)
            .is_some_and(|e| !e.bindings.read().is_empty());
        if query_flag(&query, "if-unused") && in_use {
            return Err(AmqpError::precondition(format!(
                "exchange '{name}' in vhost '{vhost}' in use"
            ))
            .into());
        }
        let change = Change::DeleteExchange {
            vhost: v.name.clone(),
            name: name.to_owned(),
        };
        apply(&broker, change).await?;
        return no_content();
    }
    v.delete_exchange(name, query_flag(&query, "if-unused"))?;
    no_content()
}

/// `POST /publish` `{"properties", "routing_key", "payload", "payload_encoding"}` →
/// `{"routed": bool}`. Goes through the same permission check and routing as
/// `basic.publish`.
async fn publish(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    bytes: Bytes,
) -> ApiResult {
    let v = caller.vhost(&broker, &vhost)?;
    let body = Body::parse(&bytes)?;
    let name = path_name(&name);
    let props = body
        .opt_object("properties")?
        .ok_or_else(|| missing("properties"))?;
    let routing_key = body.req_str("routing_key")?;
    let payload = body.req_str("payload")?;
    let payload = match body.req_str("payload_encoding")? {
        "string" => payload.as_bytes().to_vec(),
        "base64" => B64
            .decode(payload)
            .map_err(|_| ApiError::bad_request("field 'payload' is not valid base64"))?,
        other => {
            return Err(ApiError::bad_request(format!(
                "field 'payload_encoding' must be string or base64, got \"{other}\""
            )));
        }
    };
    if payload.len() as u64 > broker.config.max_message_size {
        return Err(ApiError::bad_request(format!(
            "message size {} is larger than the configured max size {}",
            payload.len(),
            broker.config.max_message_size
        )));
    }
    if routing_key.len() > 255 {
        return Err(ApiError::bad_request(
            "field 'routing_key' is longer than 255 bytes",
        ));
    }
    let props = properties_from_json(props)?;
    if let Some(u) = props.user_id()
        && u.as_str() != caller.name()
    {
        return Err(ApiError::bad_request(format!(
            "PRECONDITION_FAILED - user_id property set to '{}' but authenticated user was '{}'",
            u.as_str(),
            caller.name()
        )));
    }
    let e = v.exchange(name).ok_or_else(|| {
        ApiError::bad_request(format!(
            "NOT_FOUND - no exchange '{name}' in vhost '{vhost}'"
        ))
    })?;
    if e.internal {
        return Err(AmqpError::access_refused(format!(
            "cannot publish to internal exchange '{name}' in vhost '{vhost}'"
        ))
        .into());
    }
    caller.check(&broker, &vhost, Resource::Exchange, name, Access::Write)?;
    if e.kind == ExchangeKind::Topic {
        broker
            .access
            .check_topic(caller.name(), &vhost, name, routing_key, Access::Write)?;
    }
    let msg = Arc::new(Message::new(
        name.to_owned(),
        routing_key.to_owned(),
        props,
        Bytes::from(payload),
    ));
    let targets = v.route(name, &[routing_key], msg.headers())?;
    let now = now_ms();
    for q in &targets.local {
        q.publish(msg.clone(), now);
    }
    let routed = !targets.is_empty();
    let mut remote = targets.remote;
    remote.sort();
    for (node, group) in crate::vhost::group_by_node(remote) {
        broker.forward_publish(&node, &vhost, group, &msg, None);
    }
    ok(json!({"routed": routed}))
}
