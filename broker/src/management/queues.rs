//! `/api/queues`: list, declare (PUT), show, delete, purge (`/contents`) and `/get`.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::routing::{delete, get, post};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use serde_json::{Value, json};

use super::auth::Caller;
use super::body::{Body, query_flag};
use super::connections::consumer_json;
use super::fields::{arguments, properties_to_json, table_to_json};
use super::{ApiError, ApiResult, created_or_updated, no_content, ok};
use crate::auth::{Access, Resource};
use crate::broker::Broker;
use crate::error::AmqpError;
use crate::queue::Queue;
use crate::queue::state::Settlement;
use crate::vhost::{QueueSpec, Vhost};

pub fn routes() -> Router<Arc<Broker>> {
    Router::new()
        .route("/api/queues", get(list_all))
        .route("/api/queues/{vhost}", get(list_vhost))
        .route(
            "/api/queues/{vhost}/{name}",
            get(show).put(declare).delete(remove),
        )
        .route("/api/queues/{vhost}/{name}/contents", delete(purge))
        .route("/api/queues/{vhost}/{name}/get", post(get_messages))
}

fn queue_type(q: &Queue) -> String {
    q.arguments
        .inner()
        .get("x-queue-type")
        .and_then(crate::message::value_as_string)
        .unwrap_or_else(|| "classic".to_owned())
}

pub fn queue_json(broker: &Broker, v: &Vhost, q: &Queue) -> Value {
    let (ready, unacked, consumers) = q.counts();
    let (policy, operator_policy) = v.queue_policy_names(&q.name);
    json!({
        "name": q.name,
        "vhost": v.name,
        "durable": q.durable,
        "auto_delete": q.auto_delete,
        "exclusive": q.exclusive_owner.is_some(),
        "arguments": table_to_json(&q.arguments),
        "node": broker.node_name(),
        "type": queue_type(q),
        "state": "running",
        "messages": ready + unacked,
        "messages_ready": ready,
        "messages_unacknowledged": unacked,
        "consumers": consumers,
        "policy": policy,
        "operator_policy": operator_policy,
        "message_stats": message_stats(q),
    })
}

/// RabbitMQ's `message_stats`: counts since declaration and `<name>_details.rate` (per second,
/// over the last sampling interval of [`super::RATE_INTERVAL`]).
pub fn message_stats(q: &Queue) -> Value {
    let mut m = serde_json::Map::new();
    for (name, count, rate) in q.stats.snapshot() {
        m.insert(name.into(), json!(count));
        m.insert(
            format!("{name}_details"),
            json!({ "rate": (rate * 10.0).round() / 10.0 }),
        );
    }
    Value::Object(m)
}

fn sorted_queues(v: &Vhost) -> Vec<Arc<Queue>> {
    let mut qs = v.queues();
    qs.sort_by(|a, b| a.name.cmp(&b.name));
    qs
}

async fn list_all(State(broker): State<Arc<Broker>>, caller: Caller) -> ApiResult {
    let mut out = Vec::new();
    for v in caller.visible_vhosts(&broker) {
        out.extend(sorted_queues(&v).iter().map(|q| queue_json(&broker, &v, q)));
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
        sorted_queues(&v)
            .iter()
            .map(|q| queue_json(&broker, &v, q))
            .collect(),
    ))
}

/// The vhost and queue named in the path: 404 if either is missing.
fn lookup(
    broker: &Broker,
    caller: &Caller,
    vhost: &str,
    name: &str,
) -> ApiResult<(Arc<Vhost>, Arc<Queue>)> {
    let v = caller.vhost(broker, vhost)?;
    let q = v.queue(name).ok_or_else(ApiError::not_found)?;
    Ok((v, q))
}

async fn show(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult {
    let (v, q) = lookup(&broker, &caller, &vhost, &name)?;
    let mut j = queue_json(&broker, &v, &q);
    let consumers: Vec<Value> = q
        .consumers()
        .iter()
        .enumerate()
        .map(|(i, c)| consumer_json(&broker, &v.name, &q, c, i))
        .collect();
    j["consumer_details"] = Value::Array(consumers);
    ok(j)
}

/// Declares a queue from `{"durable", "auto_delete", "arguments"}`; true if it was created.
pub fn declare_queue(
    broker: &Broker,
    caller: &Caller,
    v: &Vhost,
    name: &str,
    body: &Body,
) -> ApiResult<bool> {
    if name.starts_with("amq.") {
        return Err(AmqpError::access_refused(format!(
            "queue name '{name}' contains reserved prefix 'amq.*'"
        ))
        .into());
    }
    caller.check(broker, &v.name, Resource::Queue, name, Access::Configure)?;
    let durable = body.bool_or("durable", false)?;
    let auto_delete = body.bool_or("auto_delete", false)?;
    let args = arguments(body)?;
    let (_, created) = v.declare_queue(QueueSpec {
        name,
        durable,
        exclusive_owner: None,
        auto_delete,
        arguments: &args,
    })?;
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
    created_or_updated(declare_queue(&broker, &caller, &v, &name, &body)?)
}

async fn remove(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult {
    let (v, q) = lookup(&broker, &caller, &vhost, &name)?;
    caller.check(&broker, &vhost, Resource::Queue, &name, Access::Configure)?;
    let (ready, _, consumers) = q.counts();
    if query_flag(&query, "if-unused") && consumers > 0 {
        return Err(
            AmqpError::precondition(format!("queue '{name}' in vhost '{vhost}' in use")).into(),
        );
    }
    if query_flag(&query, "if-empty") && ready > 0 {
        return Err(AmqpError::precondition(format!(
            "queue '{name}' in vhost '{vhost}' not empty"
        ))
        .into());
    }
    v.remove_queue(&name);
    no_content()
}

async fn purge(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult {
    let (_, q) = lookup(&broker, &caller, &vhost, &name)?;
    caller.check(&broker, &vhost, Resource::Queue, &name, Access::Read)?;
    q.purge();
    no_content()
}

/// Most messages one `POST /get` returns, whatever `count` asks for.
pub const GET_MAX_MESSAGES: u64 = 1000;
/// Most message bytes one `POST /get` takes (it stops after the message that passes this).
pub const GET_MAX_BYTES: usize = 64 * 1024 * 1024;

/// `POST /get`: takes up to `count` messages and acks or requeues them all, as rabbitmqadmin
/// and the UI use it (`ackmode`: `ack_requeue_true|false`, `reject_requeue_true|false`).
async fn get_messages(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    bytes: Bytes,
) -> ApiResult {
    let (_, q) = lookup(&broker, &caller, &vhost, &name)?;
    caller.check(&broker, &vhost, Resource::Queue, &name, Access::Read)?;
    let body = Body::parse(&bytes)?;
    let count = body
        .opt_u64("count")?
        .ok_or_else(|| super::body::missing("count"))?;
    let settlement = match body.req_str("ackmode")? {
        "ack_requeue_true" | "reject_requeue_true" => Settlement::Requeue,
        "ack_requeue_false" => Settlement::Ack,
        "reject_requeue_false" => Settlement::Discard,
        other => {
            return Err(ApiError::bad_request(format!(
                "field 'ackmode' must be ack_requeue_true, ack_requeue_false, reject_requeue_true or reject_requeue_false, got \"{other}\""
            )));
        }
    };
    let base64 = match body.req_str("encoding")? {
        "auto" => false,
        "base64" => true,
        _ => {
            return Err(ApiError::bad_request(
                "Unsupported encoding. Please use auto or base64.",
            ));
        }
    };
    let truncate = body.opt_u64("truncate")?.map(|t| t as usize);
    let mut out = Vec::new();
    let mut taken = Vec::new();
    // Bounded however large `count` is or the queue is: at most GET_MAX_MESSAGES messages and
    // (after the first) GET_MAX_BYTES of bodies, so one request cannot pull a whole queue into
    // memory and into one response.
    let mut bytes_taken = 0usize;
    for _ in 0..count.min(GET_MAX_MESSAGES) {
        if bytes_taken >= GET_MAX_BYTES {
            break;
        }
        let Some(r) = q.get(false) else { break };
        let full = &r.msg.body[..];
        bytes_taken += full.len();
        let shown = match truncate {
            Some(t) if t < full.len() => &full[..t],
            _ => full,
        };
        let (payload, encoding) = match std::str::from_utf8(shown) {
            Ok(s) if !base64 => (s.to_owned(), "string"),
            _ => (B64.encode(shown), "base64"),
        };
        out.push(json!({
            "payload_bytes": full.len(),
            "redelivered": r.redelivered,
            "exchange": r.msg.exchange,
            "routing_key": r.msg.routing_key,
            "message_count": r.remaining,
            "properties": properties_to_json(&r.msg.properties),
            "payload": payload,
            "payload_encoding": encoding,
        }));
        taken.push(r.id);
    }
    if !taken.is_empty() {
        q.settle(taken, settlement);
    }
    ok(Value::Array(out))
}
