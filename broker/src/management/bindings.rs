//! `/api/bindings`: list, create (`POST …/e/{source}/q|e/{destination}` → 201 with a
//! `Location`), show and delete one binding by its properties key, and the per-exchange and
//! per-queue views.
//!
//! A binding's properties key is its routing key when it has no arguments (`~` for an empty
//! key), else `routing_key~hash-of-arguments`, as in RabbitMQ (the hash differs from
//! RabbitMQ's, but clients only ever copy it from a listing).

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::auth::Caller;
use super::body::Body;
use super::exchanges::path_name;
use super::fields::{arguments, table_to_json};
use super::{ApiError, ApiResult, apply, no_content, ok};
use crate::auth::{Access, Resource};
use crate::broker::Broker;
use crate::channel::binding_def;
use crate::definitions::Change;
use crate::exchange::{Binding, Destination};
use crate::vhost::Vhost;

pub fn routes() -> Router<Arc<Broker>> {
    Router::new()
        .route("/api/bindings", get(list_all))
        .route("/api/bindings/{vhost}", get(list_vhost))
        .route(
            "/api/bindings/{vhost}/e/{source}/q/{destination}",
            get(list_between_q).post(create_q),
        )
        .route(
            "/api/bindings/{vhost}/e/{source}/e/{destination}",
            get(list_between_e).post(create_e),
        )
        .route(
            "/api/bindings/{vhost}/e/{source}/q/{destination}/{props}",
            get(show_q).delete(delete_q),
        )
        .route(
            "/api/bindings/{vhost}/e/{source}/e/{destination}/{props}",
            get(show_e).delete(delete_e),
        )
        .route(
            "/api/exchanges/{vhost}/{name}/bindings/source",
            get(exchange_source),
        )
        .route(
            "/api/exchanges/{vhost}/{name}/bindings/destination",
            get(exchange_destination),
        )
        .route("/api/queues/{vhost}/{name}/bindings", get(queue_bindings))
}

/// A binding as listed: (source, binding).
type Listed = (String, Binding);

pub fn properties_key(b: &Binding) -> String {
    let key = if b.routing_key.is_empty() {
        "~".to_owned()
    } else {
        b.routing_key.clone()
    };
    if b.arguments.inner().is_empty() {
        return key;
    }
    let canonical = table_to_json(&b.arguments).to_string();
    let digest = Sha256::digest(canonical.as_bytes());
    format!("{}~{}", b.routing_key, URL_SAFE_NO_PAD.encode(&digest[..6]))
}

pub fn binding_json(vhost: &str, source: &str, b: &Binding) -> Value {
    let (destination_type, destination) = match &b.destination {
        Destination::Queue(q) => ("queue", q),
        Destination::Exchange(e) => ("exchange", e),
    };
    json!({
        "source": source,
        "vhost": vhost,
        "destination": destination,
        "destination_type": destination_type,
        "routing_key": b.routing_key,
        "arguments": table_to_json(&b.arguments),
        "properties_key": properties_key(b),
    })
}

/// Every binding of a vhost, the default exchange's implicit ones first (as RabbitMQ lists
/// them), then by source.
pub fn all_bindings(v: &Vhost, include_default: bool) -> Vec<Listed> {
    let mut out = Vec::new();
    if include_default {
        let mut names: Vec<String> = v.queues().iter().map(|q| q.name.clone()).collect();
        names.sort();
        out.extend(names.into_iter().map(|n| {
            (
                String::new(),
                Binding {
                    destination: Destination::Queue(n.clone()),
                    routing_key: n,
                    arguments: Default::default(),
                },
            )
        }));
    }
    let mut exchanges = v.exchanges();
    exchanges.sort_by(|a, b| a.name.cmp(&b.name));
    for e in exchanges {
        for b in e.bindings.read().list() {
            out.push((e.name.clone(), b.clone()));
        }
    }
    out
}

fn to_json(v: &Vhost, list: &[Listed]) -> Value {
    Value::Array(
        list.iter()
            .map(|(s, b)| binding_json(&v.name, s, b))
            .collect(),
    )
}

async fn list_all(State(broker): State<Arc<Broker>>, caller: Caller) -> ApiResult {
    let mut out = Vec::new();
    for v in caller.visible_vhosts(&broker) {
        for (s, b) in all_bindings(&v, true) {
            out.push(binding_json(&v.name, &s, &b));
        }
    }
    ok(Value::Array(out))
}

async fn list_vhost(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> ApiResult {
    let v = caller.vhost(&broker, &vhost)?;
    ok(to_json(&v, &all_bindings(&v, true)))
}

fn destination(queue: bool, name: &str) -> Destination {
    if queue {
        Destination::Queue(name.to_owned())
    } else {
        Destination::Exchange(path_name(name).to_owned())
    }
}

/// The vhost, after checking that both ends exist (404 otherwise).
fn ends(
    broker: &Broker,
    caller: &Caller,
    vhost: &str,
    source: &str,
    dest: &Destination,
) -> ApiResult<Arc<Vhost>> {
    let v = caller.vhost(broker, vhost)?;
    v.exchange(source).ok_or_else(ApiError::not_found)?;
    let exists = match dest {
        Destination::Queue(q) => v.queue(q).is_some(),
        Destination::Exchange(e) => v.exchange(e).is_some(),
    };
    if !exists {
        return Err(ApiError::not_found());
    }
    Ok(v)
}

fn between(v: &Vhost, source: &str, dest: &Destination) -> Vec<Listed> {
    all_bindings(v, true)
        .into_iter()
        .filter(|(s, b)| s == source && &b.destination == dest)
        .collect()
}

async fn list_between(
    broker: Arc<Broker>,
    caller: Caller,
    vhost: String,
    source: String,
    dest: Destination,
) -> ApiResult {
    let source = path_name(&source);
    let v = ends(&broker, &caller, &vhost, source, &dest)?;
    ok(to_json(&v, &between(&v, source, &dest)))
}

async fn list_between_q(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path((vhost, source, dest)): Path<(String, String, String)>,
) -> ApiResult {
    list_between(broker, caller, vhost, source, destination(true, &dest)).await
}

async fn list_between_e(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path((vhost, source, dest)): Path<(String, String, String)>,
) -> ApiResult {
    list_between(broker, caller, vhost, source, destination(false, &dest)).await
}

/// The permission checks `queue.bind`/`exchange.bind` make: write on the destination, read
/// on the source.
fn check_bind(
    broker: &Broker,
    caller: &Caller,
    vhost: &str,
    source: &str,
    dest: &Destination,
) -> ApiResult<()> {
    let (kind, name) = match dest {
        Destination::Queue(q) => (Resource::Queue, q.as_str()),
        Destination::Exchange(e) => (Resource::Exchange, e.as_str()),
    };
    caller.check(broker, vhost, kind, name, Access::Write)?;
    caller.check(broker, vhost, Resource::Exchange, source, Access::Read)
}

/// Creates a binding from `{"routing_key", "arguments"}`; returns its properties key.
pub fn create_binding(
    broker: &Broker,
    caller: &Caller,
    v: &Vhost,
    source: &str,
    dest: Destination,
    body: &Body,
) -> ApiResult<String> {
    let routing_key = body.opt_str("routing_key")?.unwrap_or("");
    let args = arguments(body)?;
    check_bind(broker, caller, &v.name, source, &dest)?;
    v.bind(source, dest.clone(), routing_key, &args)?;
    Ok(properties_key(&Binding {
        destination: dest,
        routing_key: routing_key.to_owned(),
        arguments: args,
    }))
}

async fn create(
    broker: Arc<Broker>,
    caller: Caller,
    vhost: String,
    source: String,
    dest: Destination,
    bytes: Bytes,
) -> ApiResult {
    let body = Body::parse(&bytes)?;
    let source = path_name(&source);
    let v = caller.vhost(&broker, &vhost)?;
    let key = if broker.clustered() && !exclusive(&v, &dest) {
        // Through the cluster's metadata group, 201 once committed.
        let routing_key = body.opt_str("routing_key")?.unwrap_or("").to_owned();
        let args = arguments(&body)?;
        check_bind(&broker, &caller, &v.name, source, &dest)?;
        v.check_binding(source, &dest, &args)?;
        let def = binding_def(&v.name, source, &dest, &routing_key, &args);
        apply(&broker, Change::Bind(def)).await?;
        properties_key(&Binding {
            destination: dest.clone(),
            routing_key,
            arguments: args,
        })
    } else {
        create_binding(&broker, &caller, &v, source, dest.clone(), &body)?
    };
    let location = format!("{}/{}", percent_encode(dest.name()), percent_encode(&key));
    let mut r = StatusCode::CREATED.into_response();
    if let Ok(h) = HeaderValue::from_str(&location) {
        r.headers_mut().insert(header::LOCATION, h);
    }
    Ok(r)
}

/// Percent-encodes a path segment (everything but unreserved characters and `~`).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

async fn create_q(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path((vhost, source, dest)): Path<(String, String, String)>,
    bytes: Bytes,
) -> ApiResult {
    create(
        broker,
        caller,
        vhost,
        source,
        destination(true, &dest),
        bytes,
    )
    .await
}

async fn create_e(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path((vhost, source, dest)): Path<(String, String, String)>,
    bytes: Bytes,
) -> ApiResult {
    create(
        broker,
        caller,
        vhost,
        source,
        destination(false, &dest),
        bytes,
    )
    .await
}

fn find(
    broker: &Broker,
    caller: &Caller,
    vhost: &str,
    source: &str,
    dest: &Destination,
    props: &str,
) -> ApiResult<(Arc<Vhost>, Binding)> {
    let v = ends(broker, caller, vhost, source, dest)?;
    let b = between(&v, source, dest)
        .into_iter()
        .map(|(_, b)| b)
        .find(|b| properties_key(b) == props)
        .ok_or_else(ApiError::not_found)?;
    Ok((v, b))
}

async fn show_q(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path((vhost, source, dest, props)): Path<(String, String, String, String)>,
) -> ApiResult {
    let source = path_name(&source);
    let (v, b) = find(
        &broker,
        &caller,
        &vhost,
        source,
        &destination(true, &dest),
        &props,
    )?;
    ok(binding_json(&v.name, source, &b))
}

async fn show_e(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path((vhost, source, dest, props)): Path<(String, String, String, String)>,
) -> ApiResult {
    let source = path_name(&source);
    let (v, b) = find(
        &broker,
        &caller,
        &vhost,
        source,
        &destination(false, &dest),
        &props,
    )?;
    ok(binding_json(&v.name, source, &b))
}

/// A binding to a connection's exclusive queue stays on its node.
fn exclusive(v: &Vhost, dest: &Destination) -> bool {
    matches!(dest, Destination::Queue(q) if v.queue(q).is_some_and(|q| q.exclusive_owner.is_some()))
}

async fn delete_binding(
    broker: &Broker,
    caller: &Caller,
    vhost: &str,
    source: &str,
    dest: Destination,
    props: &str,
) -> ApiResult {
    let (v, b) = find(broker, caller, vhost, source, &dest, props)?;
    check_bind(broker, caller, vhost, source, &dest)?;
    if broker.clustered() && !exclusive(&v, &b.destination) {
        let def = binding_def(
            &v.name,
            source,
            &b.destination,
            &b.routing_key,
            &b.arguments,
        );
        apply(broker, Change::Unbind(def)).await?;
        return no_content();
    }
    v.unbind(source, b.destination, &b.routing_key, &b.arguments)?;
    no_content()
}

async fn delete_q(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path((vhost, source, dest, props)): Path<(String, String, String, String)>,
) -> ApiResult {
    delete_binding(
        &broker,
        &caller,
        &vhost,
        path_name(&source),
        destination(true, &dest),
        &props,
    )
    .await
}

async fn delete_e(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path((vhost, source, dest, props)): Path<(String, String, String, String)>,
) -> ApiResult {
    delete_binding(
        &broker,
        &caller,
        &vhost,
        path_name(&source),
        destination(false, &dest),
        &props,
    )
    .await
}

async fn exchange_source(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult {
    let v = caller.vhost(&broker, &vhost)?;
    let name = path_name(&name);
    v.exchange(name).ok_or_else(ApiError::not_found)?;
    let list: Vec<Listed> = all_bindings(&v, true)
        .into_iter()
        .filter(|(s, _)| s == name)
        .collect();
    ok(to_json(&v, &list))
}

async fn exchange_destination(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult {
    let v = caller.vhost(&broker, &vhost)?;
    let name = path_name(&name);
    v.exchange(name).ok_or_else(ApiError::not_found)?;
    let dest = Destination::Exchange(name.to_owned());
    let list: Vec<Listed> = all_bindings(&v, false)
        .into_iter()
        .filter(|(_, b)| b.destination == dest)
        .collect();
    ok(to_json(&v, &list))
}

async fn queue_bindings(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult {
    let v = caller.vhost(&broker, &vhost)?;
    v.queue(&name).ok_or_else(ApiError::not_found)?;
    let dest = Destination::Queue(name);
    let list: Vec<Listed> = all_bindings(&v, true)
        .into_iter()
        .filter(|(_, b)| b.destination == dest)
        .collect();
    ok(to_json(&v, &list))
}
