//! The members of replicated queues, as RabbitMQ's HTTP API (and `rabbitmq-queues`) manage
//! quorum queues' replicas (administrator only):
//!
//! * `POST /api/queues/quorum/{vhost}/{name}/replicas/add` `{"node": N}`: N becomes a member
//!   (204).
//! * `DELETE /api/queues/quorum/{vhost}/{name}/replicas/delete` `{"node": N}`: N stops being
//!   a member (202). The last member cannot be removed.
//! * `POST /api/queues/quorum/replicas/on/{node}/grow` `{"strategy": "all"|"even",
//!   "vhost_pattern", "queue_pattern"}`: the node becomes a member of every matching queue
//!   (`even`: only those with an even number of members) (204).
//! * `DELETE /api/queues/quorum/replicas/on/{node}/shrink`: the node stops being a member of
//!   every queue (200, a line per queue).
//!
//! A member is a voter of the queue's Raft group; every other node follows the group as a
//! learner, so adding a member promotes a replica that is already caught up.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{delete, post};
use bytes::Bytes;
use serde_json::{Value, json};

use super::auth::Caller;
use super::body::Body;
use super::{ApiError, ApiResult, no_content, ok};
use crate::broker::Broker;
use crate::replicated::ReplicatedQueue;

pub fn routes() -> Router<Arc<Broker>> {
    Router::new()
        .route(
            "/api/queues/quorum/{vhost}/{name}/replicas/add",
            post(add_member),
        )
        .route(
            "/api/queues/quorum/{vhost}/{name}/replicas/delete",
            delete(delete_member),
        )
        .route("/api/queues/quorum/replicas/on/{node}/grow", post(grow))
        .route(
            "/api/queues/quorum/replicas/on/{node}/shrink",
            delete(shrink),
        )
}

/// A change that did not happen: 503 while the queue has no majority or leader (retry),
/// else 400 (the request cannot work as it is).
fn refused(e: String) -> ApiError {
    let retry = [
        "quorum lost",
        "no leader",
        "retry",
        "not running yet",
        "stopping",
    ];
    if retry.iter().any(|r| e.contains(r)) {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", e)
    } else {
        ApiError::bad_request(e)
    }
}

/// The replicated queue named in the path (404 if missing; 400 for a classic queue).
fn replicated(
    broker: &Broker,
    caller: &Caller,
    vhost: &str,
    name: &str,
) -> ApiResult<Arc<ReplicatedQueue>> {
    let v = caller.vhost(broker, vhost)?;
    match v.replicated_queue(name) {
        Some(q) => Ok(q),
        None if v.has_queue(name) => Err(ApiError::bad_request(format!(
            "queue '{name}' in vhost '{vhost}' is not a quorum queue"
        ))),
        None => Err(ApiError::not_found()),
    }
}

/// The node a request names: a member of the cluster.
fn cluster_node(broker: &Broker, node: &str) -> ApiResult<()> {
    let known = broker
        .cluster()
        .map(|c| c.metadata_voters().iter().any(|(_, m)| m.name == node))
        .unwrap_or(false);
    if known {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "node '{node}' is not a member of this cluster"
        )))
    }
}

async fn add_member(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    bytes: Bytes,
) -> ApiResult {
    change_member(&broker, &caller, &vhost, &name, &bytes, true).await?;
    no_content()
}

async fn delete_member(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    bytes: Bytes,
) -> ApiResult {
    change_member(&broker, &caller, &vhost, &name, &bytes, false).await?;
    Ok(StatusCode::ACCEPTED.into_response())
}

/// Makes the body's `node` a member of the queue (`member`) or not.
async fn change_member(
    broker: &Broker,
    caller: &Caller,
    vhost: &str,
    name: &str,
    bytes: &Bytes,
    member: bool,
) -> ApiResult<()> {
    caller.require_admin()?;
    let body = Body::parse(bytes)?;
    let node = body.req_str("node")?;
    let q = replicated(broker, caller, vhost, name)?;
    if member {
        cluster_node(broker, node)?;
    }
    q.set_member(node, member).await.map_err(refused)?;
    let what = if member { "added" } else { "removed" };
    tracing::info!(queue = %name, %vhost, %node, user = %caller.name(), "member {what}");
    Ok(())
}

/// Every replicated queue of the vhosts `caller` may see, with its vhost.
fn all_queues(broker: &Broker, caller: &Caller) -> Vec<(String, Arc<ReplicatedQueue>)> {
    let mut names = broker.vhost_names();
    names.sort();
    let mut out = Vec::new();
    for n in names {
        if let Ok(v) = caller.vhost(broker, &n) {
            let mut qs = v.replicated_queues();
            qs.sort_by(|a, b| a.name.cmp(&b.name));
            out.extend(qs.into_iter().map(|q| (n.clone(), q)));
        }
    }
    out
}

fn pattern(body: &Body, key: &str) -> ApiResult<regex::Regex> {
    let p = body.opt_str(key)?.unwrap_or(".*");
    regex::Regex::new(p).map_err(|e| ApiError::bad_request(format!("{key}: {e}")))
}

async fn grow(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path(node): Path<String>,
    bytes: Bytes,
) -> ApiResult {
    caller.require_admin()?;
    let body = if bytes.is_empty() {
        Body::parse(&Bytes::from_static(b"{}"))?
    } else {
        Body::parse(&bytes)?
    };
    let even = match body.opt_str("strategy")?.unwrap_or("all") {
        "all" => false,
        "even" => true,
        other => {
            return Err(ApiError::bad_request(format!(
                "strategy '{other}': expected 'all' or 'even'"
            )));
        }
    };
    let (vhosts, queues) = (
        pattern(&body, "vhost_pattern")?,
        pattern(&body, "queue_pattern")?,
    );
    cluster_node(&broker, &node)?;
    let mut failed = Vec::new();
    for (vhost, q) in all_queues(&broker, &caller) {
        let members = q.members();
        if !vhosts.is_match(&vhost)
            || !queues.is_match(&q.name)
            || members.contains(&node)
            || (even && members.len() % 2 != 0)
        {
            continue;
        }
        match q.set_member(&node, true).await {
            Ok(()) => tracing::info!(queue = %q.name, %vhost, %node, "member added (grow)"),
            Err(e) => failed.push(format!("queue '{}' in vhost '{vhost}': {e}", q.name)),
        }
    }
    if failed.is_empty() {
        no_content()
    } else {
        Err(refused(format!(
            "{node} was not added to {} queue(s): {}",
            failed.len(),
            failed.join("; ")
        )))
    }
}

async fn shrink(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path(node): Path<String>,
) -> ApiResult {
    caller.require_admin()?;
    let mut out = Vec::new();
    for (vhost, q) in all_queues(&broker, &caller) {
        let members = q.members();
        if !members.contains(&node) {
            continue;
        }
        let result = match q.set_member(&node, false).await {
            Ok(()) => "ok".to_owned(),
            Err(e) => format!("error: {e}"),
        };
        let size = q.members().len();
        out.push(json!({"vhost": vhost, "name": q.name, "size": size, "result": result}));
    }
    ok(Value::Array(out))
}
