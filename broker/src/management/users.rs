//! `/api/users`, `/api/permissions`, `/api/topic-permissions` (administrators only), and
//! the per-user and per-vhost views of permissions.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::routing::get;
use bytes::Bytes;
use serde_json::{Value, json};

use super::auth::Caller;
use super::body::Body;
use super::{ApiError, ApiResult, apply, created_or_updated, no_content, ok};
use crate::auth::{Permission, TopicPermission, User, hash_password};
use crate::broker::Broker;
use crate::definitions::Change;
use crate::store::metadata::{PermissionDef, TopicPermissionDef, UserDef};

pub const HASHING_ALGORITHM: &str = "rabbit_password_hashing_sha256";

pub fn routes() -> Router<Arc<Broker>> {
    Router::new()
        .route("/api/users", get(list_users))
        .route(
            "/api/users/{user}",
            get(show_user).put(put_user).delete(delete_user),
        )
        .route("/api/users/{user}/permissions", get(user_permissions))
        .route(
            "/api/users/{user}/topic-permissions",
            get(user_topic_permissions),
        )
        .route("/api/permissions", get(list_permissions))
        .route(
            "/api/permissions/{vhost}/{user}",
            get(show_permission)
                .put(put_permission)
                .delete(delete_permission),
        )
        .route("/api/vhosts/{vhost}/permissions", get(vhost_permissions))
        .route("/api/topic-permissions", get(list_topic_permissions))
        .route(
            "/api/topic-permissions/{vhost}/{user}",
            get(show_topic_permissions)
                .put(put_topic_permission)
                .delete(delete_topic_permissions),
        )
        .route(
            "/api/vhosts/{vhost}/topic-permissions",
            get(vhost_topic_permissions),
        )
}

pub fn user_json(broker: &Broker, u: &User) -> Value {
    json!({
        "name": u.name,
        "password_hash": u.password_hash,
        "hashing_algorithm": HASHING_ALGORITHM,
        "tags": u.tags,
        "limits": crate::limits::to_json(&broker.access.user_limits(&u.name)),
    })
}

pub fn permission_json(user: &str, vhost: &str, p: &Permission) -> Value {
    json!({
        "user": user,
        "vhost": vhost,
        "configure": p.configure.as_str(),
        "write": p.write.as_str(),
        "read": p.read.as_str(),
    })
}

pub fn topic_permission_json(user: &str, vhost: &str, t: &TopicPermission) -> Value {
    json!({
        "user": user,
        "vhost": vhost,
        "exchange": t.exchange,
        "write": t.write.as_str(),
        "read": t.read.as_str(),
    })
}

async fn list_users(State(broker): State<Arc<Broker>>, caller: Caller) -> ApiResult {
    caller.require_admin()?;
    ok(Value::Array(
        broker
            .access
            .users()
            .iter()
            .map(|u| user_json(&broker, u))
            .collect(),
    ))
}

async fn show_user(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult {
    caller.require_admin()?;
    let u = broker.access.user(&name).ok_or_else(ApiError::not_found)?;
    ok(user_json(&broker, &u))
}

/// Creates or replaces a user from `{"password" | "password_hash", "tags",
/// "hashing_algorithm"}`. Without either password field the user keeps its password (or, if
/// new, gets none and cannot log in with one). Returns true if the user is new.
pub fn put_user_from(broker: &Broker, name: &str, body: &Body) -> ApiResult<Change> {
    if name.is_empty() {
        return Err(ApiError::bad_request("the user name must not be empty"));
    }
    if name == crate::auth::INTERNAL_USER {
        return Err(ApiError::bad_request(format!(
            "the user name '{name}' is reserved for the node's federation links and shovels"
        )));
    }
    if let Some(alg) = body.opt_str("hashing_algorithm")?
        && alg != HASHING_ALGORITHM
    {
        return Err(ApiError::bad_request(format!(
            "field 'hashing_algorithm': only {HASHING_ALGORITHM} is supported, got \"{alg}\""
        )));
    }
    let existing = broker.access.user(name);
    let password_hash = match (body.opt_str("password")?, body.opt_str("password_hash")?) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "fields 'password' and 'password_hash' are mutually exclusive",
            ));
        }
        (Some(p), None) => hash_password(p),
        (None, Some(h)) => {
            if !h.is_empty() && !crate::auth::is_password_hash(h) {
                return Err(ApiError::bad_request(format!(
                    "field 'password_hash' is not a base64 {HASHING_ALGORITHM} hash"
                )));
            }
            h.to_owned()
        }
        (None, None) => existing
            .as_ref()
            .map(|u| u.password_hash.clone())
            .unwrap_or_default(),
    };
    let tags = match body.tags("tags")? {
        Some(t) => t,
        None => existing
            .as_ref()
            .map(|u| u.tags.clone())
            .unwrap_or_default(),
    };
    Ok(Change::PutUser(UserDef {
        name: name.to_owned(),
        password_hash,
        tags,
    }))
}

async fn put_user(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path(name): Path<String>,
    bytes: Bytes,
) -> ApiResult {
    caller.require_admin()?;
    let body = Body::parse(&bytes)?;
    created_or_updated(apply(&broker, put_user_from(&broker, &name, &body)?).await?)
}

async fn delete_user(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult {
    caller.require_admin()?;
    if !apply(&broker, Change::DeleteUser(name)).await? {
        return Err(ApiError::not_found());
    }
    no_content()
}

async fn user_permissions(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path(user): Path<String>,
) -> ApiResult {
    caller.require_admin()?;
    broker.access.user(&user).ok_or_else(ApiError::not_found)?;
    ok(Value::Array(
        broker
            .access
            .permissions()
            .iter()
            .filter(|(u, _, _)| *u == user)
            .map(|(u, v, p)| permission_json(u, v, p))
            .collect(),
    ))
}

async fn vhost_permissions(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> ApiResult {
    caller.require_admin()?;
    broker.vhost(&vhost).ok_or_else(ApiError::not_found)?;
    ok(Value::Array(
        broker
            .access
            .permissions()
            .iter()
            .filter(|(_, v, _)| *v == vhost)
            .map(|(u, v, p)| permission_json(u, v, p))
            .collect(),
    ))
}

async fn list_permissions(State(broker): State<Arc<Broker>>, caller: Caller) -> ApiResult {
    caller.require_admin()?;
    ok(Value::Array(
        broker
            .access
            .permissions()
            .iter()
            .map(|(u, v, p)| permission_json(u, v, p))
            .collect(),
    ))
}

async fn show_permission(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path((vhost, user)): Path<(String, String)>,
) -> ApiResult {
    caller.require_admin()?;
    let p = broker
        .access
        .vhost_permission(&user, &vhost)
        .ok_or_else(ApiError::not_found)?;
    ok(permission_json(&user, &vhost, &p))
}

/// Sets a user's permissions on a vhost from `{"configure", "write", "read"}`.
pub fn put_permission_from(
    broker: &Broker,
    vhost: &str,
    user: &str,
    body: &Body,
) -> ApiResult<Change> {
    let configure = body.req_str("configure")?;
    let write = body.req_str("write")?;
    let read = body.req_str("read")?;
    if broker.vhost(vhost).is_none() || broker.access.user(user).is_none() {
        return Err(ApiError::bad_request("vhost_or_user_not_found"));
    }
    for pattern in [configure, write, read] {
        check_pattern(pattern)?;
    }
    Ok(Change::SetPermissions(PermissionDef {
        user: user.to_owned(),
        vhost: vhost.to_owned(),
        configure: configure.to_owned(),
        write: write.to_owned(),
        read: read.to_owned(),
    }))
}

/// A permission pattern must be a regular expression (checked before it is proposed).
fn check_pattern(pattern: &str) -> ApiResult<()> {
    crate::auth::compile(pattern)
        .map(|_| ())
        .map_err(ApiError::bad_request)
}

async fn put_permission(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path((vhost, user)): Path<(String, String)>,
    bytes: Bytes,
) -> ApiResult {
    caller.require_admin()?;
    let body = Body::parse(&bytes)?;
    let change = put_permission_from(&broker, &vhost, &user, &body)?;
    created_or_updated(apply(&broker, change).await?)
}

async fn delete_permission(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path((vhost, user)): Path<(String, String)>,
) -> ApiResult {
    caller.require_admin()?;
    if !apply(&broker, Change::ClearPermissions { user, vhost }).await? {
        return Err(ApiError::not_found());
    }
    no_content()
}

fn topic_list(broker: &Broker, keep: impl Fn(&str, &str) -> bool) -> Value {
    Value::Array(
        broker
            .access
            .topic_permissions()
            .iter()
            .filter(|(u, v, _)| keep(u, v))
            .map(|(u, v, t)| topic_permission_json(u, v, t))
            .collect(),
    )
}

async fn list_topic_permissions(State(broker): State<Arc<Broker>>, caller: Caller) -> ApiResult {
    caller.require_admin()?;
    ok(topic_list(&broker, |_, _| true))
}

async fn user_topic_permissions(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path(user): Path<String>,
) -> ApiResult {
    caller.require_admin()?;
    broker.access.user(&user).ok_or_else(ApiError::not_found)?;
    ok(topic_list(&broker, |u, _| u == user))
}

async fn vhost_topic_permissions(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> ApiResult {
    caller.require_admin()?;
    broker.vhost(&vhost).ok_or_else(ApiError::not_found)?;
    ok(topic_list(&broker, |_, v| v == vhost))
}

async fn show_topic_permissions(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path((vhost, user)): Path<(String, String)>,
) -> ApiResult {
    caller.require_admin()?;
    let list = topic_list(&broker, |u, v| u == user && v == vhost);
    if list.as_array().is_none_or(|a| a.is_empty()) {
        return Err(ApiError::not_found());
    }
    ok(list)
}

/// Sets a user's topic permissions for one exchange from `{"exchange", "write", "read"}`.
pub fn put_topic_permission_from(
    broker: &Broker,
    vhost: &str,
    user: &str,
    body: &Body,
) -> ApiResult<Change> {
    let exchange = body.req_str("exchange")?;
    let write = body.req_str("write")?;
    let read = body.req_str("read")?;
    if broker.vhost(vhost).is_none() || broker.access.user(user).is_none() {
        return Err(ApiError::bad_request("vhost_or_user_not_found"));
    }
    check_pattern(write)?;
    check_pattern(read)?;
    Ok(Change::SetTopicPermissions(TopicPermissionDef {
        user: user.to_owned(),
        vhost: vhost.to_owned(),
        exchange: exchange.to_owned(),
        write: write.to_owned(),
        read: read.to_owned(),
    }))
}

async fn put_topic_permission(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path((vhost, user)): Path<(String, String)>,
    bytes: Bytes,
) -> ApiResult {
    caller.require_admin()?;
    let body = Body::parse(&bytes)?;
    let change = put_topic_permission_from(&broker, &vhost, &user, &body)?;
    created_or_updated(apply(&broker, change).await?)
}

async fn delete_topic_permissions(
    State(broker): State<Arc<Broker>>,
    caller: Caller,
    Path((vhost, user)): Path<(String, String)>,
) -> ApiResult {
    caller.require_admin()?;
    if !apply(&broker, Change::ClearTopicPermissions { user, vhost }).await? {
        return Err(ApiError::not_found());
    }
    no_content()
}
