//! `/api/queues`: list, declare (PUT), show, delete, purge (`/contents`) and `/get`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

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
use super::{ApiError, ApiResult, apply, created_or_updated, no_content, ok};
use crate::auth::{Access, Resource};
use crate::broker::Broker;
use crate::definitions::{Change, QueueRecord};
use crate::error::AmqpError;
use crate::queue::Queue;
use crate::queue::state::Settlement;
use crate::remote::{Call, Reply};
use crate::store::metadata::encode_table;
use crate::vhost::{QueueSpec, RemoteQueue, Vhost};

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

/// How long a listing waits for another node's queues.
const NODE_TIMEOUT: Duration = Duration::from_secs(5);

/// A replicated queue as a node holding a replica sees it; a node without one asks a
/// running member (falling back to what it knows: members, no counts).
async fn replicated_view(
    broker: &Broker,
    v: &Vhost,
    q: &crate::replicated::ReplicatedQueue,
) -> Value {
    if !q.is_member() {
        let call = Call::QueueInfo {
            vhosts: vec![v.name.clone()],
            queue: Some(q.name.clone()),
        };
        for m in q.members() {
            if let Ok(Reply::Json(j)) = broker.node_call(&m, &call, NODE_TIMEOUT).await
                && let Ok(list) = serde_json::from_str::<Vec<Value>>(&j)
                && let Some(first) = list.into_iter().next()
            {
                return first;
            }
        }
    }
    replicated_json(v, q)
}

/// A replicated queue as this node sees it (its counts are this replica's).
pub fn replicated_json(v: &Vhost, q: &crate::replicated::ReplicatedQueue) -> Value {
    let i = q.info();
    let (policy, operator_policy) = v.queue_policy_names(&q.name);
    json!({
        "name": q.name,
        "vhost": v.name,
        "durable": q.durable,
        "auto_delete": q.auto_delete,
        "exclusive": false,
        "arguments": table_to_json(&q.arguments),
        "node": i.leader.clone().unwrap_or_else(|| i.members.first().cloned().unwrap_or_default()),
        "type": "quorum",
        "leader": i.leader,
        "members": i.members,
        "online": i.online,
        "state": match (i.replica, i.leader.is_some(), i.online.is_empty()) {
            (true, true, _) | (false, _, false) => "running",
            (true, false, _) => "minority",
            (false, _, true) => "down",
        },
        "messages": i.ready + i.unacked,
        "messages_ready": i.ready,
        "messages_unacknowledged": i.unacked,
        "consumers": i.consumers,
        "policy": policy,
        "operator_policy": operator_policy,
        "consumer_details": i.consumer_details.iter().map(|(k, prefetch, unacked)| json!({
            "consumer_tag": k.tag,
            "channel_details": {"node": k.node, "number": k.channel, "connection": k.conn},
            "prefetch_count": prefetch,
            "ack_required": true,
            "messages_unacknowledged": unacked,
        })).collect::<Vec<_>>(),
    })
}

/// A queue whose node cannot be reached, as RabbitMQ lists one (`"state": "down"`).
fn down_json(vhost: &str, r: &RemoteQueue) -> Value {
    json!({
        "name": r.name,
        "vhost": vhost,
        "durable": r.durable,
        "auto_delete": r.auto_delete,
        "exclusive": r.exclusive,
        "arguments": table_to_json(&r.arguments),
        "node": r.node,
        "type": "classic",
        "state": "down",
    })
}

/// Every queue of `vhosts` in the cluster: this node's, and those other nodes hold (asked
/// in turn; a node that cannot be reached has its queues listed as down).
async fn cluster_queues(broker: &Broker, vhosts: &[Arc<Vhost>]) -> Vec<Value> {
    let mut out = Vec::new();
    let mut remote: BTreeMap<String, Vec<(String, RemoteQueue)>> = BTreeMap::new();
    for v in vhosts {
        out.extend(sorted_queues(v).iter().map(|q| queue_json(broker, v, q)));
        for q in v.replicated_queues() {
            out.push(replicated_view(broker, v, &q).await);
        }
        if broker.clustered() {
            for r in v
                .remote_queues()
                .into_iter()
                .filter(|r| v.queue(&r.name).is_none())
            {
                remote
                    .entry(r.node.clone())
                    .or_default()
                    .push((v.name.clone(), r));
            }
        }
    }
    let names: Vec<String> = vhosts.iter().map(|v| v.name.clone()).collect();
    let calls = remote.keys().map(|node| {
        let call = Call::QueueInfo {
            vhosts: names.clone(),
            queue: None,
        };
        async move { broker.node_call(node, &call, NODE_TIMEOUT).await }
    });
    let mut answers = Vec::new();
    for c in calls {
        answers.push(c.await);
    }
    for ((node, known), answer) in remote.into_iter().zip(answers) {
        match answer.map(|r| match r {
            Reply::Json(j) => serde_json::from_str::<Vec<Value>>(&j).map_err(|e| e.to_string()),
            other => Err(format!("{node} answered {other:?}")),
        }) {
            Ok(Ok(list)) => out.extend(list),
            Ok(Err(e)) | Err(e) => {
                tracing::debug!(node, "queues of a node not listed: {e}");
                out.extend(known.iter().map(|(v, r)| down_json(v, r)));
            }
        }
    }
    out.sort_by(|a, b| {
        let key = |j: &Value| {
            (
                j["vhost"].as_str().map(str::to_owned),
                j["name"].as_str().map(str::to_owned),
            )
        };
        key(a).cmp(&key(b))
    });
    out
}

async fn list_all(State(broker): State<Arc<Broker>>, caller: Caller) -> ApiResult {
    let vhosts = caller.visible_vhosts(&broker);
    ok(Value::Array(cluster_queues(&broker, &vhosts).await))
}

async fn list_vhost(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> ApiResult {
    let v = caller.vhost(&broker, &vhost)?;
    ok(Value::Array(cluster_queues(&broker, &[v]).await))
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

/// A queue with its consumers (`GET /api/queues/{vhost}/{name}`).
pub fn queue_details(broker: &Broker, v: &Vhost, q: &Arc<Queue>) -> Value {
    let mut j = queue_json(broker, v, q);
    let consumers: Vec<Value> = q
        .consumers()
        .iter()
        .enumerate()
        .map(|(i, c)| consumer_json(broker, &v.name, q, c, i))
        .collect();
    j["consumer_details"] = Value::Array(consumers);
    j
}

/// The queue `name` of `v` on another node, if the cluster has one.
fn remote(broker: &Broker, v: &Vhost, name: &str) -> Option<RemoteQueue> {
    if !broker.clustered() || v.queue(name).is_some() {
        return None;
    }
    v.remote_queue(name)
}

async fn show(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult {
    let v = caller.vhost(&broker, &vhost)?;
    if let Some(q) = v.replicated_queue(&name) {
        return ok(replicated_view(&broker, &v, &q).await);
    }
    if let Some(r) = remote(&broker, &v, &name) {
        let call = Call::QueueInfo {
            vhosts: vec![v.name.clone()],
            queue: Some(name.clone()),
        };
        return match broker.node_call(&r.node, &call, NODE_TIMEOUT).await {
            Ok(Reply::Json(j)) => {
                let list: Vec<Value> = serde_json::from_str(&j).map_err(ApiError::internal)?;
                list.into_iter()
                    .next()
                    .map(ok)
                    .unwrap_or_else(|| Err(ApiError::not_found()))
            }
            Ok(other) => Err(ApiError::internal(format!("{} answered {other:?}", r.node))),
            Err(_) => ok(down_json(&v.name, &r)),
        };
    }
    let (v, q) = lookup(&broker, &caller, &vhost, &name)?;
    ok(queue_details(&broker, &v, &q))
}

/// A queue PUT checked (reserved name, configure permission) and read: durable,
/// auto_delete, arguments.
fn queue_request(
    broker: &Broker,
    caller: &Caller,
    v: &Vhost,
    name: &str,
    body: &Body,
) -> ApiResult<(bool, bool, amq_protocol::types::FieldTable)> {
    if name.starts_with("amq.") {
        return Err(AmqpError::access_refused(format!(
            "queue name '{name}' contains reserved prefix 'amq.*'"
        ))
        .into());
    }
    caller.check(broker, &v.name, Resource::Queue, name, Access::Configure)?;
    Ok((
        body.bool_or("durable", false)?,
        body.bool_or("auto_delete", false)?,
        arguments(body)?,
    ))
}

/// Declares a queue from `{"durable", "auto_delete", "arguments"}`; true if it was created.
pub fn declare_queue(
    broker: &Broker,
    caller: &Caller,
    v: &Vhost,
    name: &str,
    body: &Body,
) -> ApiResult<bool> {
    let (durable, auto_delete, args) = queue_request(broker, caller, v, name, body)?;
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
    if broker.clustered() && v.queue(&name).is_none() {
        return created_or_updated(cluster_declare(&broker, &caller, &v, &name, &body).await?);
    }
    created_or_updated(declare_queue(&broker, &caller, &v, &name, &body)?)
}

/// `PUT` of a queue this node does not hold, on a clustered node: a queue elsewhere must be
/// declared the same way (204); a new one is proposed to live on this node, 201 once
/// committed.
async fn cluster_declare(
    broker: &Broker,
    caller: &Caller,
    v: &Vhost,
    name: &str,
    body: &Body,
) -> ApiResult<bool> {
    let (durable, auto_delete, args) = queue_request(broker, caller, v, name, body)?;
    let elsewhere = v.remote_queue(name).or_else(|| {
        v.replicated_queue(name)
            .map(|q| crate::vhost::replicated_record(&q))
    });
    if let Some(r) = elsewhere {
        let mismatch = |arg: &str, got: bool, current: bool| -> ApiError {
            AmqpError::precondition(format!(
                "inequivalent arg '{arg}' for queue '{name}' in vhost '{}': received '{got}' but current is '{current}'",
                v.name
            ))
            .into()
        };
        if r.durable != durable {
            return Err(mismatch("durable", durable, r.durable));
        }
        if r.auto_delete != auto_delete {
            return Err(mismatch("auto_delete", auto_delete, r.auto_delete));
        }
        crate::queue::args::check_equivalent(&r.arguments, &args, name, &v.name)?;
        return Ok(false);
    }
    let parsed = crate::queue::args::parse(&args, name, &v.name)?;
    let replicas = broker.replicas_for(v, name, durable, auto_delete, false, &args)?;
    let node = match &replicas {
        Some(_) => broker.node_name(),
        None => broker.place_queue(parsed.locator),
    };
    let record = QueueRecord {
        vhost: v.name.clone(),
        name: name.to_owned(),
        durable,
        auto_delete,
        arguments: encode_table(&args),
        node,
        exclusive: false,
        replicas,
    };
    apply(broker, Change::DeclareQueue(record)).await
}

async fn remove(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult {
    let v = caller.vhost(&broker, &vhost)?;
    let local = v.queue(&name);
    let exclusive = local.as_ref().is_some_and(|q| q.exclusive_owner.is_some());
    if let Some(q) = v.replicated_queue(&name) {
        caller.check(&broker, &vhost, Resource::Queue, &name, Access::Configure)?;
        let (ready, consumers) = q.counts();
        check_unused_empty(&query, &vhost, &name, ready as u64, consumers as u64)?;
        let change = Change::DeleteQueue {
            vhost: v.name.clone(),
            name: name.clone(),
        };
        apply(&broker, change).await?;
        return no_content();
    }
    if broker.clustered() && !exclusive && (local.is_some() || v.remote_queue(&name).is_some()) {
        caller.check(&broker, &vhost, Resource::Queue, &name, Access::Configure)?;
        let (ready, consumers) = match (&local, v.remote_queue(&name)) {
            (Some(q), _) => {
                let (ready, _, consumers) = q.counts();
                (ready, consumers as u64)
            }
            (None, Some(r)) => {
                let call = Call::Counts {
                    vhost: v.name.clone(),
                    queue: name.clone(),
                };
                // Its node down: deleted anyway, as RabbitMQ deletes a classic queue whose
                // node is gone.
                match broker.node_call(&r.node, &call, NODE_TIMEOUT).await {
                    Ok(Reply::Counts {
                        messages,
                        consumers,
                    }) => (messages as u64, consumers as u64),
                    _ => (0, 0),
                }
            }
            (None, None) => return Err(ApiError::not_found()),
        };
        check_unused_empty(&query, &vhost, &name, ready, consumers)?;
        let change = Change::DeleteQueue {
            vhost: v.name.clone(),
            name: name.clone(),
        };
        apply(&broker, change).await?;
        return no_content();
    }
    let (v, q) = lookup(&broker, &caller, &vhost, &name)?;
    caller.check(&broker, &vhost, Resource::Queue, &name, Access::Configure)?;
    let (ready, _, consumers) = q.counts();
    check_unused_empty(&query, &vhost, &name, ready, consumers as u64)?;
    v.remove_queue(&name);
    no_content()
}

/// `if-unused` and `if-empty` of a `DELETE`.
fn check_unused_empty(
    query: &HashMap<String, String>,
    vhost: &str,
    name: &str,
    ready: u64,
    consumers: u64,
) -> ApiResult<()> {
    if query_flag(query, "if-unused") && consumers > 0 {
        return Err(
            AmqpError::precondition(format!("queue '{name}' in vhost '{vhost}' in use")).into(),
        );
    }
    if query_flag(query, "if-empty") && ready > 0 {
        return Err(AmqpError::precondition(format!(
            "queue '{name}' in vhost '{vhost}' not empty"
        ))
        .into());
    }
    Ok(())
}

async fn purge(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult {
    let v = caller.vhost(&broker, &vhost)?;
    if let Some(r) = remote(&broker, &v, &name) {
        caller.check(&broker, &vhost, Resource::Queue, &name, Access::Read)?;
        let call = Call::Purge {
            vhost: v.name.clone(),
            queue: name.clone(),
        };
        broker.queue_call(&r.node, call).await?;
        return no_content();
    }
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
    let v = caller.vhost(&broker, &vhost)?;
    let home = remote(&broker, &v, &name);
    let q = match &home {
        Some(_) => None,
        None => Some(lookup(&broker, &caller, &vhost, &name)?.1),
    };
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
    let truncate = body.opt_u64("truncate")?;
    match (q, home) {
        (Some(q), _) => ok(Value::Array(take_messages(
            &q, count, settlement, base64, truncate,
        ))),
        (None, Some(r)) => {
            let call = Call::Peek {
                vhost: v.name.clone(),
                queue: name.clone(),
                count,
                how: crate::remote::settlement_code(settlement),
                base64,
                truncate,
            };
            match broker.queue_call(&r.node, call).await? {
                Reply::Json(j) => ok(serde_json::from_str(&j).map_err(ApiError::internal)?),
                other => Err(ApiError::internal(format!("{} answered {other:?}", r.node))),
            }
        }
        (None, None) => Err(ApiError::not_found()),
    }
}

/// Takes up to `count` messages of `q` (bounded, see [`GET_MAX_MESSAGES`]) and settles them
/// all as `settlement` says; the messages as `POST /get` shows them.
pub fn take_messages(
    q: &Queue,
    count: u64,
    settlement: Settlement,
    base64: bool,
    truncate: Option<u64>,
) -> Vec<Value> {
    let truncate = truncate.map(|t| t as usize);
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
    out
}
