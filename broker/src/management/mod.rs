//! The management HTTP API, compatible with RabbitMQ's `rabbitmq_management` plugin: the same
//! paths, JSON shapes, status codes and error bodies (`{"error": …, "reason": …}`), so
//! `rabbitmqadmin`, monitoring tools and operators written for RabbitMQ work unchanged.
//!
//! Every request authenticates with HTTP basic auth against the node's users ([`auth`]); the
//! user's tags decide what it may do, as in RabbitMQ. Handlers live in one file per resource
//! group and act on the broker through the same vhost/queue/exchange operations AMQP clients
//! use, so both paths check and refuse the same things.
//!
//! Only the fields Warren can fill truthfully are served: no message rates, no Erlang
//! process statistics.

mod auth;
mod bindings;
mod body;
mod connections;
mod definitions;
mod exchanges;
mod fields;
mod limits;
mod overview;
mod parameters;
mod policies;
pub(crate) mod queues;
mod replicas;
mod users;
mod vhosts;
mod warren;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tracing::info;

use crate::broker::Broker;
use crate::error::AmqpError;

/// The RabbitMQ version whose management API Warren follows (checked against RabbitMQ 3.10's
/// responses). Tools read `rabbitmq_version` to decide which API features they may use.
pub const RABBITMQ_API_VERSION: &str = "3.10.8";

/// Serves the management API until `shutdown` resolves. Tests pass a listener bound to
/// `127.0.0.1:0`; the binary binds `--management-listen`.
pub async fn run(
    broker: Arc<Broker>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    tokio::spawn(sample_rates(Arc::downgrade(&broker)));
    serve(broker, listener, "http", shutdown).await
}

/// Serves the management API over HTTPS (`management-tls-listen`) until `shutdown` resolves.
/// Samples message rates itself only when the node has no plain HTTP listener (`run` does).
pub async fn run_tls(
    broker: Arc<Broker>,
    listener: crate::https::TlsListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    if broker.config.management_listen.is_none() {
        tokio::spawn(sample_rates(Arc::downgrade(&broker)));
    }
    serve(broker, listener, "https", shutdown).await
}

/// How long a client has to send a request's headers (the first request's, or the next one's
/// on a kept-alive connection): a client trickling bytes (slowloris) is cut off then.
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long one request may take, its body included; then 408.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

async fn serve<L>(
    broker: Arc<Broker>,
    mut listener: L,
    protocol: &'static str,
    shutdown: impl Future<Output = ()> + Send + 'static,
) where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "management API listener ({protocol}) started");
        broker.register_listener(protocol, addr);
    }
    // Each listener serves at most this many connections at once; further clients wait in
    // the listen backlog until one closes (`management-max-connections`).
    let max = broker.config.management_max_connections.max(1);
    let app = router(broker);
    // Hyper directly rather than `axum::serve`, which sets no timer and so no header-read
    // timeout, and takes every connection it is offered.
    let slots = Arc::new(tokio::sync::Semaphore::new(max));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(());
    // Polled only until it resolves: the loop ends then.
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = &mut shutdown => break,
        };
        let (io, peer) = tokio::select! {
            a = listener.accept() => a,
            _ = &mut shutdown => break,
        };
        let app = app.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(
                move |mut req: axum::http::Request<hyper::body::Incoming>| {
                    req.extensions_mut()
                        .insert(axum::extract::ConnectInfo(peer));
                    tower_service::Service::call(&mut app.clone(), req)
                },
            );
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(io), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, "management connection ended: {e}");
                    }
                }
                _ = stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    drop(stop_tx);
    // Requests in progress may finish; idle connections close at once.
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        slots.acquire_many(u32::try_from(max).unwrap_or(u32::MAX)),
    )
    .await;
    info!("management API listener ({protocol}) stopped");
}

/// How often message rates are sampled (RabbitMQ's default collection interval).
pub const RATE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Samples every queue's counters, so the API can report rates; ends with the broker.
async fn sample_rates(broker: std::sync::Weak<Broker>) {
    let mut tick = tokio::time::interval(RATE_INTERVAL);
    loop {
        tick.tick().await;
        let Some(b) = broker.upgrade() else { return };
        let now = std::time::Instant::now();
        for name in b.vhost_names() {
            if let Some(v) = b.vhost(&name) {
                for q in v.queues() {
                    q.stats.sample(now);
                }
            }
        }
    }
}

/// All routes of the API.
pub fn router(broker: Arc<Broker>) -> Router {
    let saver = broker.clone();
    Router::new()
        .merge(overview::routes())
        .merge(vhosts::routes())
        .merge(users::routes())
        .merge(queues::routes())
        .merge(exchanges::routes())
        .merge(bindings::routes())
        .merge(connections::routes())
        .merge(definitions::routes())
        .merge(policies::routes())
        .merge(parameters::routes())
        .merge(limits::routes())
        .merge(warren::routes())
        .merge(replicas::routes())
        .fallback(|| async { ApiError::not_found() })
        .layer(axum::middleware::from_fn(require_json))
        .layer(axum::middleware::from_fn(|req, next: axum::middleware::Next| async {
            match tokio::time::timeout(REQUEST_TIMEOUT, next.run(req)).await {
                Ok(r) => r,
                Err(_) => ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "request_timeout",
                    "the request took too long",
                )
                .into_response(),
            }
        }))
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "Method Not Allowed",
            )
        })
        .layer(axum::middleware::map_response(
            move |req_method: axum::http::Method,
                  uri: axum::http::Uri,
                  resp: axum::response::Response| {
                let saver = saver.clone();
                async move {
                    // Users, permissions, vhosts and parameters change only through this API:
                    // a successful change is saved before the client hears of it. Exchanges,
                    // queues, bindings and policies are journalled by the vhost as they change.
                    if req_method != axum::http::Method::GET
                        && resp.status().is_success()
                        && !journalled(uri.path())
                    {
                        let saved = tokio::task::spawn_blocking(move || saver.persist_metadata())
                            .await
                            .unwrap_or_else(|e| Err(format!("the metadata writer failed: {e}")));
                        // Not undone (the change is in effect here), but not acknowledged as
                        // saved either: a restart would lose it.
                        if let Err(why) = saved {
                            return ApiError::new(
                                StatusCode::SERVICE_UNAVAILABLE,
                                "internal_error",
                                format!(
                                    "the change is in effect on this node but could not be saved and will not survive a restart: {why}"
                                ),
                            )
                            .into_response();
                        }
                    }
                    resp
                }
            },
        ))
        .with_state(broker)
}

/// Refuses (415) a request that carries a body but does not say it is JSON. Every body this
/// API takes is JSON; a browser can send a cross-site form (`text/plain`,
/// `application/x-www-form-urlencoded`, `multipart/form-data`) with the credentials it holds
/// for this host without asking first, but not `application/json`: this is the CSRF guard.
async fn require_json(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if !json_or_no_body(req.method(), req.headers()) {
        return ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "request bodies must be sent as Content-Type: application/json",
        )
        .into_response();
    }
    next.run(req).await
}

fn json_or_no_body(method: &axum::http::Method, headers: &axum::http::HeaderMap) -> bool {
    use axum::http::Method;
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return true;
    }
    match headers.get(header::CONTENT_TYPE) {
        Some(ct) => ct
            .to_str()
            .ok()
            .and_then(|ct| ct.split(';').next())
            .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json")),
        // No type: fine only without a body (`curl -X PUT`, `DELETE`).
        None => {
            headers.get(header::TRANSFER_ENCODING).is_none()
                && headers
                    .get(header::CONTENT_LENGTH)
                    .is_none_or(|l| l.as_bytes() == b"0")
        }
    }
}

/// API paths whose changes the vhost journals itself (one record per object), so they need no
/// snapshot of all the metadata. Deleting a vhost, or importing definitions, is not one of them.
fn journalled(path: &str) -> bool {
    [
        "/api/exchanges/",
        "/api/queues/",
        "/api/bindings/",
        "/api/policies/",
        "/api/operator-policies/",
    ]
    .iter()
    .any(|p| path.starts_with(p))
}

/// Applies a validated definitions change (through the cluster's metadata group when
/// clustered): for a put, whether the object is new; for a delete, whether it existed.
pub async fn apply(broker: &Broker, change: crate::definitions::Change) -> ApiResult<bool> {
    broker.change(change).await.map_err(|e| match e {
        crate::definitions::ChangeError::Refused(r) => ApiError::bad_request(r),
        crate::definitions::ChangeError::Unavailable(r) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", r)
        }
    })
}

/// An API error: status and RabbitMQ's `{"error", "reason"}` body.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    error: &'static str,
    reason: String,
    /// Ask the client for credentials (bad or missing login).
    challenge: bool,
}

pub type ApiResult<T = Response> = Result<T, ApiError>;

impl ApiError {
    pub fn new(status: StatusCode, error: &'static str, reason: impl Into<String>) -> Self {
        Self {
            status,
            error,
            reason: reason.into(),
            challenge: false,
        }
    }

    pub fn bad_request(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", reason)
    }

    /// RabbitMQ's answer for any missing object.
    /// 500: something this node cannot make sense of (another node's answer, say).
    pub fn internal(reason: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_server_error",
            reason.to_string(),
        )
    }

    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "Object Not Found", "Not Found")
    }

    /// Authenticated, but not allowed (RabbitMQ answers 401, not 403).
    pub fn not_authorised(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "not_authorised", reason)
    }

    /// Bad or missing credentials.
    pub fn login_failed(reason: impl Into<String>) -> Self {
        Self {
            challenge: true,
            ..Self::new(StatusCode::UNAUTHORIZED, "not_authorized", reason)
        }
    }
}

/// AMQP errors from vhost/queue operations, mapped as RabbitMQ's management plugin maps them.
impl From<AmqpError> for ApiError {
    fn from(e: AmqpError) -> Self {
        match e.code {
            crate::error::code::ACCESS_REFUSED => Self::not_authorised(e.text),
            crate::error::code::NOT_FOUND => Self::new(StatusCode::NOT_FOUND, "not_found", e.text),
            // The node could not do it (its storage failed): not the client's fault.
            crate::error::code::INTERNAL_ERROR => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "internal_error", e.text)
            }
            _ => Self::bad_request(e.text),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            axum::Json(json!({"error": self.error, "reason": self.reason})),
        )
            .into_response();
        if self.challenge {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"RabbitMQ Management\""),
            );
        }
        r
    }
}

/// 200 with a JSON body.
pub fn ok(v: Value) -> ApiResult {
    Ok(axum::Json(v).into_response())
}

/// 201 when an object was created, 204 when an existing one was updated (RabbitMQ's PUT).
pub fn created_or_updated(created: bool) -> ApiResult {
    Ok(if created {
        StatusCode::CREATED
    } else {
        StatusCode::NO_CONTENT
    }
    .into_response())
}

pub fn no_content() -> ApiResult {
    Ok(StatusCode::NO_CONTENT.into_response())
}
