//! `/api/connections` (list, show, close), `/api/channels`, `/api/consumers`.
//!
//! Administrators and monitoring users see every connection; other users see their own.
//! Closing a connection sends `connection.close` 320 CONNECTION_FORCED, with the reason
//! from the `X-Reason` header or RabbitMQ's "Closed via management plugin".

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::get;
use serde_json::{Value, json};

use super::auth::Caller;
use super::fields::table_to_json;
use super::{ApiError, ApiResult, no_content, ok};
use crate::broker::Broker;
use crate::channel::ChannelShared;
use crate::connection::ConnShared;
use crate::queue::{Consumer, DeliveryTarget, Queue};

pub fn routes() -> Router<Arc<Broker>> {
    Router::new()
        .route("/api/connections", get(list_connections))
        .route(
            "/api/connections/{name}",
            get(show_connection).delete(close_connection),
        )
        .route("/api/connections/{name}/channels", get(connection_channels))
        .route("/api/vhosts/{vhost}/connections", get(vhost_connections))
        .route("/api/channels", get(list_channels))
        .route("/api/channels/{name}", get(show_channel))
        .route("/api/vhosts/{vhost}/channels", get(vhost_channels))
        .route("/api/consumers", get(list_consumers))
        .route("/api/consumers/{vhost}", get(vhost_consumers))
}

fn visible_connections(broker: &Broker, caller: &Caller) -> Vec<Arc<ConnShared>> {
    broker
        .connections
        .list()
        .into_iter()
        .filter(|c| caller.is_monitor() || c.user == caller.name())
        .collect()
}

fn connection_json(broker: &Broker, c: &ConnShared) -> Value {
    let i = &c.info;
    let mut v = json!({
        "name": i.name,
        "node": broker.node_name(),
        "vhost": c.vhost.name,
        "user": c.user,
        "protocol": "AMQP 0-9-1",
        "type": "network",
        "state": "running",
        "host": i.local.ip().to_string(),
        "port": i.local.port(),
        "peer_host": i.peer.ip().to_string(),
        "peer_port": i.peer.port(),
        "ssl": i.tls.is_some(),
        "auth_mechanism": i.auth_mechanism,
        "channels": c.control.channels().len(),
        "channel_max": i.channel_max,
        "frame_max": c.frame_max,
        "timeout": i.heartbeat,
        "client_properties": table_to_json(&i.client_properties),
        "connected_at": i.connected_at,
    });
    if let Some(t) = &i.tls {
        v["ssl_protocol"] = json!(t.protocol);
        v["ssl_cipher"] = json!(t.cipher);
    }
    v
}

fn channel_name(c: &ConnShared, number: u16) -> String {
    channel_name_of(&c.info.name, number)
}

fn channel_name_of(connection_name: &str, number: u16) -> String {
    format!("{connection_name} ({number})")
}

/// Consumers per channel, counted over the vhost's queues.
fn consumers_of(ch: &ChannelShared) -> usize {
    ch.conn
        .vhost
        .queues()
        .iter()
        .map(|q| {
            q.consumers()
                .iter()
                .filter(|c| c.target.target_id() == ch.target_id())
                .count()
        })
        .sum()
}

fn channel_json(broker: &Broker, ch: &ChannelShared) -> Value {
    let c = &ch.conn;
    json!({
        "name": channel_name(c, ch.id),
        "number": ch.id,
        "node": broker.node_name(),
        "vhost": c.vhost.name,
        "user": c.user,
        "state": "running",
        "connection_details": {
            "name": c.info.name,
            "peer_host": c.info.peer.ip().to_string(),
            "peer_port": c.info.peer.port(),
        },
        "consumer_count": consumers_of(ch),
        "messages_unacknowledged": ch.unacked_count(),
        "global_prefetch_count": ch.global_prefetch(),
    })
}

/// A consumer as RabbitMQ shows it; `position` is its place in the queue's consumer list
/// (for single-active-consumer queues, only the first is active).
pub fn consumer_json(
    broker: &Broker,
    vhost: &str,
    q: &Queue,
    c: &Consumer,
    position: usize,
) -> Value {
    let owner = c.target.owner();
    let active = !q.args.single_active_consumer || position == 0;
    let mut arguments = serde_json::Map::new();
    if c.priority != 0 {
        arguments.insert("x-priority".into(), json!(c.priority));
    }
    json!({
        "consumer_tag": c.tag,
        "queue": {"name": q.name, "vhost": vhost},
        "channel_details": {
            "name": channel_name_of(owner.connection_name, owner.channel),
            "number": owner.channel,
            "connection_name": owner.connection_name,
            "peer_host": owner.peer.ip().to_string(),
            "peer_port": owner.peer.port(),
            "user": owner.user,
            "node": broker.node_name(),
        },
        "ack_required": !c.no_ack,
        "exclusive": c.exclusive,
        "prefetch_count": c.prefetch,
        "arguments": arguments,
        "active": active,
        "activity_status": if active { "up" } else { "waiting" },
    })
}

async fn list_connections(State(broker): State<Arc<Broker>>, caller: Caller) -> ApiResult {
    ok(Value::Array(
        visible_connections(&broker, &caller)
            .iter()
            .map(|c| connection_json(&broker, c))
            .collect(),
    ))
}

async fn vhost_connections(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> ApiResult {
    caller.vhost(&broker, &vhost)?;
    ok(Value::Array(
        visible_connections(&broker, &caller)
            .iter()
            .filter(|c| c.vhost.name == vhost)
            .map(|c| connection_json(&broker, c))
            .collect(),
    ))
}

fn lookup(broker: &Broker, caller: &Caller, name: &str) -> ApiResult<Arc<ConnShared>> {
    let c = broker
        .connections
        .by_name(name)
        .ok_or_else(ApiError::not_found)?;
    if !caller.is_monitor() && c.user != caller.name() {
        return Err(ApiError::not_authorised(
            "User not authorised to access object",
        ));
    }
    Ok(c)
}

async fn show_connection(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult {
    let c = lookup(&broker, &caller, &name)?;
    ok(connection_json(&broker, &c))
}

/// Administrators close any connection; other users only their own.
async fn close_connection(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    let c = lookup(&broker, &caller, &name)?;
    if !caller.is_admin() && c.user != caller.name() {
        return Err(ApiError::not_authorised(
            "User not authorised to access object",
        ));
    }
    let reason = headers
        .get("x-reason")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("Closed via management plugin");
    c.control.request_close(reason);
    no_content()
}

async fn connection_channels(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult {
    let c = lookup(&broker, &caller, &name)?;
    ok(Value::Array(
        c.control
            .channels()
            .iter()
            .map(|ch| channel_json(&broker, ch))
            .collect(),
    ))
}

fn visible_channels(broker: &Broker, caller: &Caller) -> Vec<Arc<ChannelShared>> {
    visible_connections(broker, caller)
        .iter()
        .flat_map(|c| c.control.channels())
        .collect()
}

async fn list_channels(State(broker): State<Arc<Broker>>, caller: Caller) -> ApiResult {
    ok(Value::Array(
        visible_channels(&broker, &caller)
            .iter()
            .map(|ch| channel_json(&broker, ch))
            .collect(),
    ))
}

async fn vhost_channels(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> ApiResult {
    caller.vhost(&broker, &vhost)?;
    ok(Value::Array(
        visible_channels(&broker, &caller)
            .iter()
            .filter(|ch| ch.conn.vhost.name == vhost)
            .map(|ch| channel_json(&broker, ch))
            .collect(),
    ))
}

async fn show_channel(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult {
    let ch = visible_channels(&broker, &caller)
        .into_iter()
        .find(|ch| channel_name(&ch.conn, ch.id) == name)
        .ok_or_else(ApiError::not_found)?;
    ok(channel_json(&broker, &ch))
}

/// Consumers on the queues of these vhosts (RabbitMQ filters consumers by vhost, not user).
fn consumers_in(broker: &Broker, vhosts: &[Arc<crate::vhost::Vhost>]) -> Value {
    let mut out = Vec::new();
    for v in vhosts {
        let mut queues = v.queues();
        queues.sort_by(|a, b| a.name.cmp(&b.name));
        for q in queues {
            for (i, c) in q.consumers().iter().enumerate() {
                out.push(consumer_json(broker, &v.name, &q, c, i));
            }
        }
    }
    Value::Array(out)
}

async fn list_consumers(State(broker): State<Arc<Broker>>, caller: Caller) -> ApiResult {
    let vhosts = caller.visible_vhosts(&broker);
    ok(consumers_in(&broker, &vhosts))
}

async fn vhost_consumers(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> ApiResult {
    let v = caller.vhost(&broker, &vhost)?;
    ok(consumers_in(&broker, &[v]))
}
