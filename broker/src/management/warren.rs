//! Warren's own endpoints, under `/api/warren/` (RabbitMQ has no equivalent):
//!
//! * `POST /api/warren/drain` (administrator): maintenance mode. The node refuses new client
//!   connections and closes the open ones with 320 CONNECTION_FORCED, waits up to
//!   [`DRAIN_WAIT`] for them to go, moves the leadership of every Raft group it leads (the
//!   metadata and each replicated queue) to another node and stops standing for election,
//!   and answers with what is left on the node: its queues with their messages and
//!   consumers, and where leadership went. Used by `warren-broker drain` (a pod's preStop
//!   hook, and the operator before a scale-down).
//! * `GET /api/warren/drain` (monitoring): the same report, without changing anything.
//! * `DELETE /api/warren/drain` (administrator): ends the drain; connections are served again
//!   and the node stands for election again.
//! * `GET /api/warren/metadata` (monitoring): the cluster's metadata group as this node sees it.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use serde_json::{Value, json};

use super::auth::Caller;
use super::{ApiResult, ok};
use crate::broker::Broker;
use crate::cluster::raft::StepDown;

/// How long `POST /api/warren/drain` waits for the closed connections to go (a client has up
/// to 3 s to answer `connection.close`), so the report shows the queues as they are left.
pub const DRAIN_WAIT: Duration = Duration::from_secs(3);
/// How long a drain waits for each group it leads to elect another leader.
pub const STEP_DOWN_WAIT: Duration = Duration::from_secs(10);

pub fn routes() -> Router<Arc<Broker>> {
    Router::new()
        .route("/api/warren/drain", get(status).post(start).delete(stop))
        .route("/api/warren/metadata", get(metadata))
}

/// The node's queues, by vhost and name.
fn queues(broker: &Broker) -> Vec<Value> {
    let mut names = broker.vhost_names();
    names.sort();
    let mut out = Vec::new();
    for vhost in names {
        let Some(v) = broker.vhost(&vhost) else {
            continue;
        };
        let mut qs = v.queues();
        qs.sort_by(|a, b| a.name.cmp(&b.name));
        for q in qs {
            let (ready, unacked, consumers) = q.counts();
            out.push(json!({
                "vhost": vhost,
                "name": q.name,
                "durable": q.durable,
                "messages": ready + unacked,
                "consumers": consumers,
            }));
        }
    }
    out
}

fn report(broker: &Broker) -> Value {
    json!({
        "node": broker.node_name(),
        "being_drained": broker.is_draining(),
        "connections_open": broker.connections.len(),
        "queues": queues(broker),
    })
}

/// The cluster's metadata group as this node sees it: voters, leader, term, applied index,
/// whether this node has caught up (404 on a node that is not clustered).
async fn metadata(State(broker): State<Arc<Broker>>, caller: Caller) -> ApiResult {
    caller.require_monitor()?;
    let meta = broker
        .cluster()
        .and_then(|c| c.metadata())
        .ok_or_else(super::ApiError::not_found)?;
    let s = meta.status();
    ok(json!({
        "node": broker.node_name(),
        "initialized": s.initialized,
        "voter": s.voter,
        "leader": s.leader,
        "voters": s.voters,
        "term": s.term,
        "applied": s.applied,
        "caught_up": meta.caught_up(),
        "quorum_critical": meta.critical(),
    }))
}

async fn status(State(broker): State<Arc<Broker>>, caller: Caller) -> ApiResult {
    caller.require_monitor()?;
    ok(report(&broker))
}

async fn start(State(broker): State<Arc<Broker>>, caller: Caller) -> ApiResult {
    caller.require_admin()?;
    let closed = broker.start_drain();
    tracing::warn!(
        user = %caller.name(),
        connections = closed,
        "node is being drained: closing client connections and refusing new ones"
    );
    let deadline = tokio::time::Instant::now() + DRAIN_WAIT;
    while !broker.connections.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let leadership = match broker.cluster() {
        Some(c) => c.step_down(STEP_DOWN_WAIT).await,
        None => Vec::new(),
    };
    let mut r = report(&broker);
    r["connections_closed"] = json!(closed);
    r["leadership"] = leadership_json(&broker, leadership);
    ok(r)
}

/// Where the leadership of each group this node led went, naming queues by vhost and name.
fn leadership_json(broker: &Broker, moved: Vec<(Option<String>, StepDown)>) -> Value {
    let queue = |group: &str| {
        broker.vhost_names().into_iter().find_map(|n| {
            let v = broker.vhost(&n)?;
            let q = v
                .replicated_queues()
                .into_iter()
                .find(|q| q.replicas.group == group)?;
            Some((n, q.name.clone()))
        })
    };
    let list = moved.into_iter().map(|(group, outcome)| {
        let mut j = match group.as_deref().and_then(queue) {
            Some((vhost, name)) => json!({"vhost": vhost, "queue": name}),
            None if group.is_none() => json!({"metadata": true}),
            None => json!({"group": group}),
        };
        match outcome {
            StepDown::Moved(to) => j["moved_to"] = json!(to),
            StepDown::Kept(why) => j["kept"] = json!(why),
            StepDown::NotLeader => {}
        }
        j
    });
    Value::Array(list.collect())
}

async fn stop(State(broker): State<Arc<Broker>>, caller: Caller) -> ApiResult {
    caller.require_admin()?;
    if broker.is_draining() {
        tracing::warn!(user = %caller.name(), "drain ended: serving client connections again");
    }
    broker.end_drain();
    if let Some(c) = broker.cluster() {
        c.resume_elections();
    }
    ok(report(&broker))
}
