//! `/api/vhost-limits` and `/api/user-limits`: list, show, set (PUT `{"value": N}`) and clear
//! one limit, as RabbitMQ's management plugin (see [`crate::limits`]). Setting answers 204
//! whether or not the limit was set before, as RabbitMQ does.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, put};
use bytes::Bytes;
use serde_json::{Value, json};

use super::auth::Caller;
use super::body::Body;
use super::{ApiError, ApiResult, apply, no_content, ok};
use crate::broker::Broker;
use crate::definitions::Change;
use crate::limits::{self, Limits, Scope};

pub fn routes() -> Router<Arc<Broker>> {
    Router::new()
        .route("/api/vhost-limits", get(list_vhost_limits))
        .route("/api/vhost-limits/{vhost}", get(show_vhost_limits))
        .route(
            "/api/vhost-limits/{vhost}/{name}",
            put(put_vhost_limit).delete(delete_vhost_limit),
        )
        .route("/api/user-limits", get(list_user_limits))
        .route("/api/user-limits/{user}", get(show_user_limits))
        .route(
            "/api/user-limits/{user}/{name}",
            put(put_user_limit).delete(delete_user_limit),
        )
}

fn vhost_entry(vhost: &str, l: &Limits) -> Value {
    json!({"vhost": vhost, "value": limits::to_json(l)})
}

fn user_entry(user: &str, l: &Limits) -> Value {
    json!({"user": user, "value": limits::to_json(l)})
}

/// The `value` of a PUT body, checked as RabbitMQ checks it.
fn value_of(bytes: &Bytes, scope: Scope, name: &str) -> ApiResult<i64> {
    let body = Body::parse(bytes)?;
    let v = body
        .get("value")
        .ok_or_else(|| ApiError::bad_request("[{key_missing,value}]"))?;
    limits::validate(scope, name, v).map_err(ApiError::bad_request)
}

async fn list_vhost_limits(State(broker): State<Arc<Broker>>, caller: Caller) -> ApiResult {
    let list = caller
        .visible_vhosts(&broker)
        .iter()
        .map(|v| (v.name.clone(), v.limits()))
        .filter(|(_, l)| !l.is_empty())
        .map(|(v, l)| vhost_entry(&v, &l))
        .collect();
    ok(Value::Array(list))
}

async fn show_vhost_limits(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> ApiResult {
    let v = caller.vhost(&broker, &vhost)?;
    let l = v.limits();
    ok(if l.is_empty() {
        json!([])
    } else {
        json!([vhost_entry(&v.name, &l)])
    })
}

fn vhost_not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "vhost_not_found")
}

async fn put_vhost_limit(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    bytes: Bytes,
) -> ApiResult {
    caller.require_admin()?;
    broker.vhost(&vhost).ok_or_else(vhost_not_found)?;
    let value = value_of(&bytes, Scope::Vhost, &name)?;
    apply(&broker, Change::SetVhostLimit { vhost, name, value }).await?;
    no_content()
}

async fn delete_vhost_limit(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult {
    caller.require_admin()?;
    broker.vhost(&vhost).ok_or_else(vhost_not_found)?;
    apply(&broker, Change::ClearVhostLimit { vhost, name }).await?;
    no_content()
}

async fn list_user_limits(State(broker): State<Arc<Broker>>, caller: Caller) -> ApiResult {
    caller.require_admin()?;
    let list = broker
        .access
        .all_user_limits()
        .iter()
        .map(|(u, l)| user_entry(u, l))
        .collect();
    ok(Value::Array(list))
}

async fn show_user_limits(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path(user): Path<String>,
) -> ApiResult {
    caller.require_admin()?;
    broker.access.user(&user).ok_or_else(ApiError::not_found)?;
    let l = broker.access.user_limits(&user);
    ok(if l.is_empty() {
        json!([])
    } else {
        json!([user_entry(&user, &l)])
    })
}

async fn put_user_limit(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path((user, name)): Path<(String, String)>,
    bytes: Bytes,
) -> ApiResult {
    caller.require_admin()?;
    if broker.access.user(&user).is_none() {
        return Err(ApiError::bad_request(format!("no_such_user: '{user}'")));
    }
    let value = value_of(&bytes, Scope::User, &name)?;
    apply(&broker, Change::SetUserLimit { user, name, value }).await?;
    no_content()
}

async fn delete_user_limit(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path((user, name)): Path<(String, String)>,
) -> ApiResult {
    caller.require_admin()?;
    broker.access.user(&user).ok_or_else(ApiError::not_found)?;
    apply(&broker, Change::ClearUserLimit { user, name }).await?;
    no_content()
}
