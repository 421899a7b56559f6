//! `/api/policies` and `/api/operator-policies`: list, show, put, delete. Validation is
//! [`crate::policy::parse_policy`]'s; a stored policy applies at once to the vhost's queues and
//! exchanges ([`crate::vhost::Vhost::put_policy`]).
//!
//! Anyone with access to a vhost may read its policies; changing them takes the
//! `policymaker` tag (or `administrator`). Operator policies are for administrators only.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::routing::get;
use bytes::Bytes;
use serde_json::{Value, json};

use super::auth::Caller;
use super::{ApiError, ApiResult, apply, created_or_updated, no_content, ok};
use crate::broker::Broker;
use crate::definitions::Change;
use crate::policy::{Policy, parse_policy};
use crate::vhost::Vhost;

pub fn routes() -> Router<Arc<Broker>> {
    Router::new()
        .route("/api/policies", get(list_all_policies))
        .route("/api/policies/{vhost}", get(list_vhost_policies))
        .route(
            "/api/policies/{vhost}/{name}",
            get(show_policy).put(put_policy).delete(delete_policy),
        )
        .route("/api/operator-policies", get(list_all_operator))
        .route("/api/operator-policies/{vhost}", get(list_vhost_operator))
        .route(
            "/api/operator-policies/{vhost}/{name}",
            get(show_operator).put(put_operator).delete(delete_operator),
        )
}

pub fn policy_json(p: &Policy) -> Value {
    json!({
        "vhost": p.vhost,
        "name": p.name,
        "pattern": p.pattern.as_str(),
        "apply-to": p.apply_to.as_str(),
        "definition": p.definition,
        "priority": p.priority,
    })
}

fn sorted(v: &Vhost, operator: bool) -> Vec<Value> {
    let mut ps = v.policies(operator);
    ps.sort_by(|a, b| a.name.cmp(&b.name));
    ps.iter().map(policy_json).collect()
}

fn list_all(broker: &Broker, caller: &Caller, operator: bool) -> ApiResult {
    if operator {
        caller.require_admin()?;
    }
    let mut out = Vec::new();
    for v in caller.visible_vhosts(broker) {
        out.extend(sorted(&v, operator));
    }
    ok(Value::Array(out))
}

fn list_vhost(broker: &Broker, caller: &Caller, vhost: &str, operator: bool) -> ApiResult {
    if operator {
        caller.require_admin()?;
    }
    let v = caller.vhost(broker, vhost)?;
    ok(Value::Array(sorted(&v, operator)))
}

fn show(broker: &Broker, caller: &Caller, vhost: &str, name: &str, operator: bool) -> ApiResult {
    if operator {
        caller.require_admin()?;
    }
    let v = caller.vhost(broker, vhost)?;
    let p = v
        .policies(operator)
        .into_iter()
        .find(|p| p.name == name)
        .ok_or_else(ApiError::not_found)?;
    ok(policy_json(&p))
}

/// Validates a policy PUT.
pub fn put_policy_value(v: &Vhost, name: &str, body: &Value, operator: bool) -> ApiResult<Change> {
    let p = parse_policy(name, &v.name, body, operator).map_err(ApiError::bad_request)?;
    Ok(Change::PutPolicy(crate::persistence::policy_def(
        &v.name, &p, operator,
    )))
}

async fn put(
    broker: &Broker,
    caller: &Caller,
    vhost: &str,
    name: &str,
    bytes: &Bytes,
    operator: bool,
) -> ApiResult {
    if operator {
        caller.require_admin()?;
    }
    let v = caller.policy_vhost(broker, vhost)?;
    let body: Value =
        serde_json::from_slice(bytes).map_err(|_| ApiError::bad_request("not_json"))?;
    let change = put_policy_value(&v, name, &body, operator)?;
    created_or_updated(apply(broker, change).await?)
}

async fn delete(
    broker: &Broker,
    caller: &Caller,
    vhost: &str,
    name: &str,
    operator: bool,
) -> ApiResult {
    if operator {
        caller.require_admin()?;
    }
    let v = caller.policy_vhost(broker, vhost)?;
    let change = Change::DeletePolicy {
        vhost: v.name.clone(),
        name: name.to_owned(),
        operator,
    };
    if !apply(broker, change).await? {
        return Err(ApiError::not_found());
    }
    no_content()
}

async fn list_all_policies(State(b): State<Arc<Broker>>, caller: Caller) -> ApiResult {
    list_all(&b, &caller, false)
}

async fn list_all_operator(State(b): State<Arc<Broker>>, caller: Caller) -> ApiResult {
    list_all(&b, &caller, true)
}

async fn list_vhost_policies(
    State(b): State<Arc<Broker>>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> ApiResult {
    list_vhost(&b, &caller, &vhost, false)
}

async fn list_vhost_operator(
    State(b): State<Arc<Broker>>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> ApiResult {
    list_vhost(&b, &caller, &vhost, true)
}

async fn show_policy(
    State(b): State<Arc<Broker>>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult {
    show(&b, &caller, &vhost, &name, false)
}

async fn show_operator(
    State(b): State<Arc<Broker>>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult {
    show(&b, &caller, &vhost, &name, true)
}

async fn put_policy(
    State(b): State<Arc<Broker>>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    bytes: Bytes,
) -> ApiResult {
    put(&b, &caller, &vhost, &name, &bytes, false).await
}

async fn put_operator(
    State(b): State<Arc<Broker>>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    bytes: Bytes,
) -> ApiResult {
    put(&b, &caller, &vhost, &name, &bytes, true).await
}

async fn delete_policy(
    State(b): State<Arc<Broker>>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult {
    delete(&b, &caller, &vhost, &name, false).await
}

async fn delete_operator(
    State(b): State<Arc<Broker>>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult {
    delete(&b, &caller, &vhost, &name, true).await
}
