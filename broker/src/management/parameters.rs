//! `/api/parameters/{component}/{vhost}/{name}` for `federation-upstream`,
//! `federation-upstream-set` and `shovel` (validated by [`crate::parameters`]), and the status
//! of the links they start ([`crate::links`]): `/api/federation-links` and `/api/shovels`, in
//! RabbitMQ 3.10's shape plus two counters of Warren's own, `forwarded` and `pending`.

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
use crate::parameters::{COMPONENTS, Parameter};
use crate::store::metadata::ParameterDef;

pub fn routes() -> Router<Arc<Broker>> {
    Router::new()
        .route("/api/parameters", get(list_all))
        .route("/api/parameters/{component}", get(list_component))
        .route("/api/parameters/{component}/{vhost}", get(list_vhost))
        .route(
            "/api/parameters/{component}/{vhost}/{name}",
            get(show).put(put).delete(delete),
        )
        .route("/api/federation-links", get(federation_links))
        .route("/api/federation-links/{vhost}", get(federation_links_vhost))
        .route("/api/shovels", get(shovels))
        .route("/api/shovels/{vhost}", get(shovels_vhost))
}

pub fn parameter_json(p: &Parameter) -> Value {
    json!({
        "value": p.value,
        "vhost": p.vhost,
        "component": p.component,
        "name": p.name,
    })
}

/// Reading parameters takes the policymaker tag, as in RabbitMQ.
fn visible(broker: &Broker, caller: &Caller, component: Option<&str>) -> ApiResult<Vec<Value>> {
    if !caller.is_policymaker() {
        return Err(ApiError::not_authorised(
            "User not authorised to access object",
        ));
    }
    Ok(broker
        .parameters
        .list(component, None)
        .iter()
        .filter(|p| caller.can_access(broker, &p.vhost))
        .map(parameter_json)
        .collect())
}

async fn list_all(State(broker): State<Arc<Broker>>, caller: Caller) -> ApiResult {
    ok(Value::Array(visible(&broker, &caller, None)?))
}

async fn list_component(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path(component): Path<String>,
) -> ApiResult {
    ok(Value::Array(visible(&broker, &caller, Some(&component))?))
}

async fn list_vhost(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path((component, vhost)): Path<(String, String)>,
) -> ApiResult {
    caller.policy_vhost(&broker, &vhost)?;
    ok(Value::Array(
        broker
            .parameters
            .list(Some(&component), Some(&vhost))
            .iter()
            .map(parameter_json)
            .collect(),
    ))
}

async fn show(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path((component, vhost, name)): Path<(String, String, String)>,
) -> ApiResult {
    caller.policy_vhost(&broker, &vhost)?;
    let p = broker
        .parameters
        .get(&component, &vhost, &name)
        .ok_or_else(ApiError::not_found)?;
    ok(parameter_json(&p))
}

/// Validates `value` (the body's `value` field, or the definitions file entry's) on behalf of
/// `caller`, whose access bounds what the parameter's links may reach.
pub fn put_parameter(
    broker: &Broker,
    caller: &Caller,
    component: &str,
    vhost: &str,
    name: &str,
    value: Value,
) -> ApiResult<Change> {
    if !COMPONENTS.contains(&component) {
        return Err(ApiError::bad_request(format!(
            "component {component} not found"
        )));
    }
    if broker.vhost(vhost).is_none() {
        return Err(ApiError::bad_request(format!("vhost '{vhost}' not found")));
    }
    let invalid =
        |e: String| ApiError::bad_request(format!("Validation failed: {e} (parameter {name})"));
    crate::parameters::validate(component, &value).map_err(invalid)?;
    let may_access = |v: &str| caller.can_access(broker, v);
    let acting = crate::parameters::ActingUser {
        name: caller.name(),
        administrator: caller.is_admin(),
        may_access: &may_access,
    };
    crate::parameters::check_acting_user(component, vhost, &value, &acting).map_err(invalid)?;
    Ok(Change::PutParameter(ParameterDef {
        component: component.to_owned(),
        vhost: vhost.to_owned(),
        name: name.to_owned(),
        value,
    }))
}

async fn put(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path((component, vhost, name)): Path<(String, String, String)>,
    bytes: Bytes,
) -> ApiResult {
    caller.policy_vhost(&broker, &vhost)?;
    let body = super::body::Body::parse(&bytes)?;
    let value = body
        .get("value")
        .cloned()
        .ok_or_else(|| super::body::missing("value"))?;
    let change = put_parameter(&broker, &caller, &component, &vhost, &name, value)?;
    created_or_updated(apply(&broker, change).await?)
}

async fn delete(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path((component, vhost, name)): Path<(String, String, String)>,
) -> ApiResult {
    caller.policy_vhost(&broker, &vhost)?;
    let change = Change::DeleteParameter {
        component,
        vhost,
        name,
    };
    if !apply(&broker, change).await? {
        return Err(ApiError::not_found());
    }
    no_content()
}

fn federation_json(broker: &Broker, caller: &Caller, vhost: Option<&str>) -> Value {
    let node = broker.node_name();
    Value::Array(
        broker
            .links
            .federation_links(vhost)
            .iter()
            .filter(|l| caller.can_access(broker, &l.vhost))
            .map(|l| l.federation_json(&node))
            .collect(),
    )
}

fn shovels_json(broker: &Broker, caller: &Caller, vhost: Option<&str>) -> Value {
    let node = broker.node_name();
    Value::Array(
        broker
            .links
            .shovels(vhost)
            .iter()
            .filter(|l| caller.can_access(broker, &l.vhost))
            .map(|l| l.shovel_json(&node))
            .collect(),
    )
}

async fn federation_links(State(broker): State<Arc<Broker>>, caller: Caller) -> ApiResult {
    caller.require_monitor()?;
    ok(federation_json(&broker, &caller, None))
}

async fn federation_links_vhost(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> ApiResult {
    caller.vhost(&broker, &vhost)?;
    ok(federation_json(&broker, &caller, Some(&vhost)))
}

async fn shovels(State(broker): State<Arc<Broker>>, caller: Caller) -> ApiResult {
    ok(shovels_json(&broker, &caller, None))
}

async fn shovels_vhost(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> ApiResult {
    caller.vhost(&broker, &vhost)?;
    ok(shovels_json(&broker, &caller, Some(&vhost)))
}
