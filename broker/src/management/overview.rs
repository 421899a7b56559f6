//! `/api/overview`, `/api/whoami`, `/api/nodes` and the health checks.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use serde_json::{Value, json};

use super::auth::Caller;
use super::{ApiError, ApiResult, RABBITMQ_API_VERSION, ok};
use crate::broker::Broker;

pub fn routes() -> Router<Arc<Broker>> {
    Router::new()
        .route("/api/overview", get(overview))
        .route("/api/whoami", get(whoami))
        .route("/api/cluster-name", get(cluster_name))
        .route("/api/nodes", get(nodes))
        .route("/api/nodes/{node}", get(node).delete(forget_node))
        .route("/api/health/checks/alarms", get(alarms))
        .route("/api/health/checks/local-alarms", get(alarms))
        .route("/api/health/checks/virtual-hosts", get(virtual_hosts))
        .route(
            "/api/health/checks/node-is-quorum-critical",
            get(quorum_critical),
        )
        .route(
            "/api/health/checks/node-is-mirror-sync-critical",
            get(quorum_critical),
        )
        .route(
            "/api/health/checks/port-listener/{port}",
            get(port_listener),
        )
}

fn exchange_types() -> Value {
    json!([
        {"name": "direct", "description": "AMQP direct exchange, as per the AMQP specification", "enabled": true},
        {"name": "fanout", "description": "AMQP fanout exchange, as per the AMQP specification", "enabled": true},
        {"name": "headers", "description": "AMQP headers exchange, as per the AMQP specification", "enabled": true},
        {"name": "topic", "description": "AMQP topic exchange, as per the AMQP specification", "enabled": true},
    ])
}

fn listeners(broker: &Broker) -> Value {
    let node = broker.node_name();
    Value::Array(
        broker
            .listeners()
            .iter()
            .map(|l| {
                json!({
                    "node": node,
                    "protocol": l.protocol,
                    "ip_address": l.addr.ip().to_string(),
                    "port": l.addr.port(),
                })
            })
            .collect(),
    )
}

async fn overview(State(broker): State<Arc<Broker>>, caller: Caller) -> ApiResult {
    let (mut exchanges, mut queues, mut consumers) = (0u64, 0u64, 0u64);
    let (mut ready, mut unacked) = (0u64, 0u64);
    for v in caller.visible_vhosts(&broker) {
        exchanges += v.exchanges().len() as u64;
        for q in v.queues() {
            let (r, u, c) = q.counts();
            queues += 1;
            ready += r;
            unacked += u;
            consumers += c as u64;
        }
    }
    let conns: Vec<_> = broker
        .connections
        .list()
        .into_iter()
        .filter(|c| caller.is_monitor() || c.user == caller.name())
        .collect();
    let channels: usize = conns.iter().map(|c| c.control.channels().len()).sum();
    ok(json!({
        "management_version": RABBITMQ_API_VERSION,
        "rabbitmq_version": RABBITMQ_API_VERSION,
        "product_name": "Warren",
        "product_version": env!("CARGO_PKG_VERSION"),
        "cluster_name": broker.config.cluster_name,
        "node": broker.node_name(),
        "rates_mode": "none",
        "exchange_types": exchange_types(),
        "object_totals": {
            "connections": conns.len(),
            "channels": channels,
            "exchanges": exchanges,
            "queues": queues,
            "consumers": consumers,
        },
        "queue_totals": {
            "messages": ready + unacked,
            "messages_ready": ready,
            "messages_unacknowledged": unacked,
        },
        "listeners": listeners(&broker),
    }))
}

/// RabbitMQ's `GET /api/cluster-name`. The name comes from the `cluster-name` setting, so
/// there is no `PUT`.
async fn cluster_name(State(broker): State<Arc<Broker>>, _caller: Caller) -> ApiResult {
    ok(json!({"name": broker.config.cluster_name}))
}

async fn whoami(caller: Caller) -> ApiResult {
    ok(json!({"name": caller.user.name, "tags": caller.user.tags}))
}

fn node_json(broker: &Broker) -> Value {
    let alarms = broker.active_alarms();
    let mut n = json!({
        "name": broker.node_name(),
        "type": "disc",
        "running": true,
        "uptime": broker.started_at.elapsed().as_millis() as u64,
        "os_pid": std::process::id().to_string(),
        "processors": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "mem_alarm": alarms.iter().any(|a| a == "memory"),
        "mem_limit": broker.memory_limit_bytes(),
        "disk_free_limit": broker.config.disk_free_limit,
        "disk_free_alarm": alarms.iter().any(|a| a == "disk"),
        // Warren's own: the node's storage failed (see `Broker::disk_failure`).
        "disk_io_alarm": alarms.iter().any(|a| a == crate::broker::DISK_IO_ALARM),
        "partitions": [],
        "being_drained": broker.is_draining(),
        "exchange_types": exchange_types(),
        "auth_mechanisms": [
            {"name": "PLAIN", "description": "SASL PLAIN authentication mechanism", "enabled": true},
            {"name": "AMQPLAIN", "description": "QPid AMQPLAIN mechanism", "enabled": true},
            // Offered on AMQPS connections whose client certificate was verified (mutual TLS).
            {
                "name": "EXTERNAL",
                "description": "TLS peer verification-based authentication mechanism (client certificate)",
                "enabled": broker.config.amqps_listen.is_some() && broker.config.tls_ca_file.is_some(),
            },
        ],
    });
    if let Some(m) = crate::resources::resident_memory_bytes() {
        n["mem_used"] = json!(m);
    }
    if let Some(d) = crate::resources::disk_available(&broker.config.data_dir) {
        n["disk_free"] = json!(d);
    }
    n
}

/// Another node as its last heartbeat reported it; a node that is down shows little more
/// than its name, as in RabbitMQ.
fn peer_json(view: &crate::cluster::NodeView) -> Value {
    let mut n = json!({
        "name": view.name,
        "type": "disc",
        "running": view.running,
    });
    if let (true, Some(s)) = (view.running, &view.status) {
        let extra = json!({
            "uptime": s.uptime_ms,
            "os_pid": s.os_pid.to_string(),
            "processors": s.processors,
            "mem_alarm": s.alarms.iter().any(|a| a == "memory"),
            "mem_limit": s.mem_limit,
            "mem_used": s.mem_used,
            "disk_free_limit": s.disk_free_limit,
            "disk_free": s.disk_free,
            "disk_free_alarm": s.alarms.iter().any(|a| a == "disk"),
            "disk_io_alarm": s.alarms.iter().any(|a| a == crate::broker::DISK_IO_ALARM),
            "partitions": [],
            "being_drained": s.being_drained,
            "exchange_types": exchange_types(),
        });
        if let (Some(n), Some(extra)) = (n.as_object_mut(), extra.as_object()) {
            n.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
    }
    n
}

/// Every node of the cluster, this one first.
fn all_nodes(broker: &Broker) -> Vec<Value> {
    let mut out = vec![node_json(broker)];
    if let Some(cluster) = broker.cluster() {
        out.extend(cluster.peers().iter().map(peer_json));
    }
    out
}

async fn nodes(State(broker): State<Arc<Broker>>, caller: Caller) -> ApiResult {
    caller.require_monitor()?;
    ok(Value::Array(all_nodes(&broker)))
}

async fn node(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult {
    caller.require_monitor()?;
    all_nodes(&broker)
        .into_iter()
        .find(|n| n["name"] == name.as_str())
        .map_or_else(|| Err(ApiError::not_found()), ok)
}

/// Removes a stopped node from the cluster (`rabbitmqctl forget_cluster_node`): 204; 400
/// naming the reason when the node is running or is this one; 404 when it is no member.
async fn forget_node(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult {
    caller.require_admin()?;
    let Some(cluster) = broker.cluster() else {
        return Err(ApiError::not_found());
    };
    match cluster.forget(&name).await {
        Ok(_) => {
            // Its classic queues go with it (RabbitMQ's forget_cluster_node deletes the
            // durable queues that lived on the node); the answer names them.
            let mut deleted = Vec::new();
            let mut names = broker.vhost_names();
            names.sort();
            for vname in names {
                let Some(v) = broker.vhost(&vname) else {
                    continue;
                };
                let mut queues: Vec<String> = (v.remote_queues().into_iter())
                    .filter(|r| r.node == name)
                    .map(|r| r.name)
                    .collect();
                queues.sort();
                for q in queues {
                    let change = crate::definitions::Change::DeleteQueue {
                        vhost: vname.clone(),
                        name: q.clone(),
                    };
                    match super::apply(&broker, change).await {
                        Ok(_) => deleted.push(json!({"vhost": vname, "name": q})),
                        Err(e) => tracing::warn!(
                            queue = %q,
                            vhost = %vname,
                            "queue of forgotten node {name} not deleted: {e:?}"
                        ),
                    }
                }
            }
            // Its replicas leave the replicated queues' voters, so their majorities are
            // counted over the nodes left (`rabbitmq-queues shrink`).
            let mut shrink = tokio::task::JoinSet::new();
            for vname in broker.vhost_names() {
                let Some(v) = broker.vhost(&vname) else {
                    continue;
                };
                for q in v.replicated_queues() {
                    if q.members().contains(&name) {
                        let (vname, node) = (vname.clone(), name.clone());
                        shrink.spawn(async move {
                            let r = q.set_member(&node, false).await;
                            (vname, q.name.clone(), r)
                        });
                    }
                }
            }
            let mut shrunk = Vec::new();
            while let Some(Ok((vname, q, r))) = shrink.join_next().await {
                if let Err(e) = &r {
                    tracing::warn!(queue = %q, vhost = %vname, "replica of forgotten node {name} not removed: {e}");
                }
                shrunk.push(json!({
                    "vhost": vname,
                    "name": q,
                    "result": r.map(|()| "ok".to_owned()).unwrap_or_else(|e| format!("error: {e}")),
                }));
            }
            shrunk.sort_by(|a, b| {
                (a["vhost"].as_str(), a["name"].as_str())
                    .cmp(&(b["vhost"].as_str(), b["name"].as_str()))
            });
            ok(json!({"node": name, "queues_deleted": deleted, "queues_shrunk": shrunk}))
        }
        Err(e @ crate::cluster::ForgetError::NotMember(_)) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "Object Not Found",
            e.to_string(),
        )),
        Err(e) => Err(ApiError::bad_request(e.to_string())),
    }
}

fn failed(body: Value) -> ApiResult {
    Ok((StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response())
}

async fn alarms(State(broker): State<Arc<Broker>>, _caller: Caller) -> ApiResult {
    let alarms = broker.active_alarms();
    if alarms.is_empty() {
        return ok(json!({"status": "ok"}));
    }
    let node = broker.node_name();
    let mut body = json!({
        "status": "failed",
        "reason": "resource alarm(s) in effect in the cluster",
        "alarms": alarms.iter().map(|a| json!({"node": node, "resource": a})).collect::<Vec<_>>(),
    });
    if let Some(why) = broker.disk_failure() {
        body["disk_io_error"] = json!(why);
    }
    failed(body)
}

/// Every vhost of this node is served (they have no separate processes that could be down),
/// unless the node's storage failed: then no vhost can keep what it is given, and the node
/// must not be counted as ready. A clustered node is not ready either until it is a voter of
/// the metadata group and has caught up with a leader once (`warren-broker check ready` asks
/// this).
async fn virtual_hosts(State(broker): State<Arc<Broker>>, _caller: Caller) -> ApiResult {
    if let Some(why) = broker.disk_failure() {
        return failed(json!({
            "status": "failed",
            "reason": format!("storage failed, durable data cannot be written: {why}"),
            "virtual-hosts": broker.vhost_names(),
        }));
    }
    let clustered = !broker.config.cluster_peers.is_empty();
    let meta = broker.cluster().and_then(|c| c.metadata());
    if clustered && meta.is_none() {
        return failed(json!({
            "status": "failed",
            "reason": "this node is starting its cluster membership (cluster-peers is set)",
        }));
    }
    if let Some(meta) = meta {
        let status = meta.status();
        if !meta.caught_up() {
            let reason = if !status.initialized {
                "this node has not joined the cluster's metadata group yet".to_owned()
            } else if !status.voter {
                "this node is catching up with the cluster's metadata before it becomes a voter"
                    .to_owned()
            } else {
                "this node has not caught up with the cluster's metadata leader yet".to_owned()
            };
            return failed(json!({"status": "failed", "reason": reason}));
        }
        // A restarted member of a replicated queue is ready once its replica has caught up
        // with the queue's leader: a rolling restart then never takes the next node down
        // while this one still lacks entries (the queue keeps an up-to-date majority).
        let mut behind = Vec::new();
        for vhost in broker.vhost_names() {
            if let Some(v) = broker.vhost(&vhost) {
                behind.extend(
                    (v.replicated_queues().iter())
                        .filter(|q| q.catching_up())
                        .map(|q| format!("'{}' in vhost '{vhost}'", q.name)),
                );
            }
        }
        if !behind.is_empty() {
            behind.sort();
            return failed(json!({
                "status": "failed",
                "reason": format!(
                    "this node's replicas of {} replicated queue(s) have not caught up with \
                     their leaders yet: {}",
                    behind.len(),
                    behind.join(", ")
                ),
            }));
        }
    }
    ok(json!({"status": "ok"}))
}

/// Whether stopping this node would leave the metadata group, or a replicated queue with a
/// replica here, without a majority (RabbitMQ lists the queues).
async fn quorum_critical(State(broker): State<Arc<Broker>>, _caller: Caller) -> ApiResult {
    let Some(meta) = broker.cluster().and_then(|c| c.metadata()) else {
        return ok(json!({"status": "ok", "reason": "single node cluster"}));
    };
    let mut queues = Vec::new();
    let mut names = Vec::new();
    for vhost in broker.vhost_names() {
        let Some(v) = broker.vhost(&vhost) else {
            continue;
        };
        for q in v.replicated_queues() {
            if q.critical() {
                names.push(format!("'{}' in vhost '{vhost}'", q.name));
                queues.push(json!({"name": q.name, "virtual_host": vhost, "type": "quorum"}));
            }
        }
    }
    if meta.critical() {
        let status = meta.status();
        return failed(json!({
            "status": "failed",
            "reason": format!(
                "stopping this node would leave the cluster's metadata group ({} voters: {}) \
                 without a majority",
                status.voters.len(),
                status.voters.join(", ")
            ),
            "queues": queues,
        }));
    }
    if !queues.is_empty() {
        return failed(json!({
            "status": "failed",
            "reason": format!(
                "stopping this node would leave replicated queues without a majority of their \
                 replicas: {}",
                names.join(", ")
            ),
            "queues": queues,
        }));
    }
    ok(json!({"status": "ok"}))
}

async fn port_listener(
    State(broker): State<Arc<Broker>>,
    _caller: Caller,
    Path(port): Path<String>,
) -> ApiResult {
    let port: u16 = port
        .parse()
        .map_err(|_| ApiError::bad_request("Invalid port"))?;
    let mut ports: Vec<u16> = broker.listeners().iter().map(|l| l.addr.port()).collect();
    ports.sort_unstable();
    if ports.contains(&port) {
        ok(json!({"status": "ok", "port": port}))
    } else {
        failed(json!({
            "status": "failed",
            "reason": "No active listener",
            "missing": port,
            "ports": ports,
        }))
    }
}
