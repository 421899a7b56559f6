//! `/api/vhosts`: list, create (PUT), show, delete.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::routing::get;
use bytes::Bytes;
use serde_json::{Value, json};

use super::auth::Caller;
use super::body::Body;
use super::{ApiError, ApiResult, apply, created_or_updated, no_content, ok};
use crate::broker::Broker;
use crate::definitions::{Change, VhostDef};
use crate::vhost::Vhost;

pub fn routes() -> Router<Arc<Broker>> {
    Router::new()
        .route("/api/vhosts", get(list))
        .route("/api/vhosts/{vhost}", get(show).put(put).delete(delete))
}

pub fn vhost_json(broker: &Broker, v: &Vhost) -> Value {
    let meta = broker.vhost_metadata(&v.name);
    let (mut ready, mut unacked) = (0u64, 0u64);
    for q in v.queues() {
        let (r, u, _) = q.counts();
        ready += r;
        unacked += u;
    }
    json!({
        "name": v.name,
        "description": meta.description,
        "tags": meta.tags,
        "default_queue_type": meta.default_queue_type.as_deref().unwrap_or("undefined"),
        "metadata": {"description": meta.description, "tags": meta.tags},
        "tracing": false,
        "cluster_state": {broker.node_name(): "running"},
        "messages": ready + unacked,
        "messages_ready": ready,
        "messages_unacknowledged": unacked,
    })
}

async fn list(State(broker): State<Arc<Broker>>, caller: Caller) -> ApiResult {
    let mut names = broker.vhost_names();
    names.sort();
    let list: Vec<Value> = names
        .iter()
        .filter(|n| caller.is_monitor() || caller.can_access(&broker, n))
        .filter_map(|n| broker.vhost(n))
        .map(|v| vhost_json(&broker, &v))
        .collect();
    ok(Value::Array(list))
}

async fn show(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult {
    let v = broker.vhost(&name).ok_or_else(ApiError::not_found)?;
    if !caller.is_monitor() && !caller.can_access(&broker, &name) {
        return Err(ApiError::not_authorised(
            "User not authorised to access virtual host",
        ));
    }
    ok(vhost_json(&broker, &v))
}

/// Validates a vhost PUT: creates a vhost, or updates its description and tags. The
/// creator gets no permissions (as in RabbitMQ, they are granted separately).
pub fn put_vhost(broker: &Broker, name: &str, body: &Body) -> ApiResult<Change> {
    if name.is_empty() {
        return Err(ApiError::bad_request("the vhost name must not be empty"));
    }
    let mut meta = broker.vhost_metadata(name);
    if let Some(d) = body.opt_str("description")? {
        meta.description = d.to_owned();
    }
    if let Some(t) = body.tags("tags")? {
        meta.tags = t;
    }
    // RabbitMQ 3.11+ reads `default_queue_type`; 3.10 only `defaultqueuetype`.
    let mut default_type = None;
    for key in ["default_queue_type", "defaultqueuetype"] {
        if let Some(q) = body.opt_str(key)? {
            default_type = Some((key, q));
            break;
        }
    }
    if let Some((key, q)) = default_type {
        if !matches!(q, "classic" | "quorum" | "undefined") {
            return Err(ApiError::bad_request(format!(
                "field '{key}' must be classic or quorum, got \"{q}\""
            )));
        }
        meta.default_queue_type = (q != "undefined").then(|| q.to_owned());
    }
    Ok(Change::PutVhost(VhostDef {
        name: name.to_owned(),
        description: meta.description,
        tags: meta.tags,
        default_queue_type: meta.default_queue_type,
    }))
}

async fn put(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path(name): Path<String>,
    bytes: Bytes,
) -> ApiResult {
    caller.require_admin()?;
    let body = Body::parse(&bytes)?;
    created_or_updated(apply(&broker, put_vhost(&broker, &name, &body)?).await?)
}

async fn delete(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult {
    caller.require_admin()?;
    if !apply(&broker, Change::DeleteVhost(name)).await? {
        return Err(ApiError::not_found());
    }
    no_content()
}
