//! Dynamic shovels: one per `shovel` runtime parameter, as RabbitMQ's `rabbitmq_shovel` runs
//! them (3.10).
//!
//! A session connects to the source and the destination (one URI of each list, the next one
//! after every failure), declares what the definition asks for (a missing `src-queue` or
//! `dest-queue` is declared durable; `src-exchange` gets an exclusive server-named queue bound
//! with `src-exchange-key`), consumes with the prefetch, and republishes each message with its
//! properties (plus `dest-publish-properties`, `x-shovelled`, `x-shovelled-timestamp` when
//! asked) to `dest-queue` through the default exchange, to `dest-exchange` (with
//! `dest-exchange-key`, or the message's own routing key), or where it was published.
//!
//! Any failure ends the session: connections are closed, so the source requeues everything not
//! acknowledged, and after `reconnect-delay` seconds (default 5; 0 = never) a new session starts.
//! In on-confirm mode a message is acknowledged to the source only once the destination has
//! confirmed it, so nothing the source let go of can be lost — across disconnects, and across a
//! restart of this node (a stopping node settles what is in flight, then closes).

use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use futures_lite::StreamExt;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Connection};
use serde_json::{Map, Value};
use tokio::sync::watch;

use super::connect::{self, Connected};
use super::forward::{AckMode, Forwarder, longstr, prepend_table_header};
use super::status::{LinkKind, LinkStatus};
use super::uri::LinkUri;
use super::{LinkKey, Spec, Stop, sleep_or_stop};
use crate::broker::Broker;

/// RabbitMQ's defaults.
const DEFAULT_PREFETCH: u64 = 1000;
const DEFAULT_RECONNECT_DELAY: f64 = 5.0;

#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    Queue(String),
    Exchange { exchange: String, key: String },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Dest {
    Queue(String),
    Exchange {
        exchange: String,
        key: Option<String>,
    },
    /// Neither `dest-queue` nor `dest-exchange`: the exchange and routing key it was published
    /// with.
    AsPublished,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteAfter {
    Never,
    /// The source queue's length when the shovel starts.
    QueueLength,
    Count(u64),
}

/// A parsed `shovel` parameter.
#[derive(Debug, Clone)]
pub struct ShovelDef {
    pub vhost: String,
    pub name: String,
    pub src_uris: Vec<LinkUri>,
    pub source: Source,
    pub src_queue_args: FieldTable,
    pub src_consumer_args: FieldTable,
    pub prefetch: u16,
    pub delete_after: DeleteAfter,
    pub dest_uris: Vec<LinkUri>,
    pub dest: Dest,
    pub dest_queue_args: FieldTable,
    pub add_forward_headers: bool,
    pub add_timestamp_header: bool,
    pub publish_properties: Map<String, Value>,
    pub ack_mode: AckMode,
    /// Zero: a failed shovel is not restarted.
    pub reconnect_delay: Duration,
    /// The parameter value (a change restarts the shovel).
    pub raw: Value,
}

fn uris(v: Option<&Value>, key: &str) -> Result<Vec<LinkUri>, String> {
    let list: Vec<&str> = match v {
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        _ => return Err(format!("'{key}' is required")),
    };
    if list.is_empty() {
        return Err(format!("'{key}' is empty"));
    }
    list.into_iter()
        .map(|u| LinkUri::parse(u).map_err(|e| format!("{key}: {e}")))
        .collect()
}

/// JSON (as the management API takes it) to an AMQP value.
pub fn json_to_amqp(v: &Value) -> AMQPValue {
    match v {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => AMQPValue::LongLongInt(i),
            None => AMQPValue::Double(n.as_f64().unwrap_or_default()),
        },
        Value::String(s) => longstr(s),
        Value::Array(a) => {
            AMQPValue::FieldArray(a.iter().map(json_to_amqp).collect::<Vec<_>>().into())
        }
        Value::Object(m) => AMQPValue::FieldTable(json_to_table(m)),
    }
}

pub fn json_to_table(m: &Map<String, Value>) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in m {
        t.insert(k.as_str().into(), json_to_amqp(v));
    }
    t
}

fn table(obj: &Map<String, Value>, key: &str) -> FieldTable {
    obj.get(key)
        .and_then(Value::as_object)
        .map(json_to_table)
        .unwrap_or_default()
}

impl ShovelDef {
    /// Reads a validated `shovel` parameter value (the current key names first, then the older
    /// ones RabbitMQ still accepts).
    pub fn parse(vhost: &str, name: &str, value: &Value) -> Result<Self, String> {
        let obj = value
            .as_object()
            .ok_or("the shovel value should be an object")?;
        let s = |k: &str| obj.get(k).and_then(Value::as_str).map(str::to_owned);
        let source = match (s("src-queue"), s("src-exchange")) {
            (Some(q), None) => Source::Queue(q),
            (None, Some(x)) => Source::Exchange {
                exchange: x,
                key: s("src-exchange-key").unwrap_or_default(),
            },
            _ => return Err("exactly one of 'src-queue' and 'src-exchange' is required".into()),
        };
        let dest = match (s("dest-queue"), s("dest-exchange")) {
            (Some(q), None) => Dest::Queue(q),
            (None, Some(x)) => Dest::Exchange {
                exchange: x,
                key: s("dest-exchange-key"),
            },
            (None, None) => Dest::AsPublished,
            _ => return Err("cannot specify both 'dest-exchange' and 'dest-queue'".into()),
        };
        let delete_after = match obj
            .get("src-delete-after")
            .or_else(|| obj.get("delete-after"))
        {
            None => DeleteAfter::Never,
            Some(Value::String(x)) if x == "never" => DeleteAfter::Never,
            Some(Value::String(x)) if x == "queue-length" => DeleteAfter::QueueLength,
            Some(v) => DeleteAfter::Count(
                v.as_u64()
                    .ok_or("src-delete-after should be never, queue-length or a number")?,
            ),
        };
        let prefetch = obj
            .get("src-prefetch-count")
            .or_else(|| obj.get("prefetch-count"))
            .and_then(Value::as_u64)
            .unwrap_or(DEFAULT_PREFETCH);
        let delay = obj
            .get("reconnect-delay")
            .and_then(Value::as_f64)
            .unwrap_or(DEFAULT_RECONNECT_DELAY);
        let bool_of = |new: &str, old: &str| {
            obj.get(new)
                .or_else(|| obj.get(old))
                .and_then(Value::as_bool)
                .unwrap_or(false)
        };
        Ok(ShovelDef {
            vhost: vhost.to_owned(),
            name: name.to_owned(),
            src_uris: uris(obj.get("src-uri"), "src-uri")?,
            source,
            src_queue_args: table(obj, "src-queue-args"),
            src_consumer_args: table(obj, "src-consumer-args"),
            // 0 means unlimited in AMQP; a link keeps a bound all the same.
            prefetch: prefetch.clamp(1, u64::from(u16::MAX)) as u16,
            delete_after,
            dest_uris: uris(obj.get("dest-uri"), "dest-uri")?,
            dest,
            dest_queue_args: table(obj, "dest-queue-args"),
            add_forward_headers: bool_of("dest-add-forward-headers", "add-forward-headers"),
            add_timestamp_header: bool_of("dest-add-timestamp-header", "add-timestamp-header"),
            publish_properties: obj
                .get("dest-publish-properties")
                .or_else(|| obj.get("publish-properties"))
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default(),
            ack_mode: AckMode::parse(obj.get("ack-mode").and_then(Value::as_str)),
            reconnect_delay: Duration::try_from_secs_f64(delay).unwrap_or(Duration::ZERO),
            raw: value.clone(),
        })
    }

    /// The endpoint fields shown while running, and put in `x-shovelled`.
    fn endpoints(&self) -> Vec<(&'static str, String)> {
        let mut e = Vec::new();
        match &self.source {
            Source::Queue(q) => e.push(("src_queue", q.clone())),
            Source::Exchange { exchange, key } => {
                e.push(("src_exchange", exchange.clone()));
                e.push(("src_exchange_key", key.clone()));
            }
        }
        match &self.dest {
            Dest::Queue(q) => e.push(("dest_queue", q.clone())),
            Dest::Exchange { exchange, key } => {
                e.push(("dest_exchange", exchange.clone()));
                if let Some(k) = key {
                    e.push(("dest_exchange_key", k.clone()));
                }
            }
            Dest::AsPublished => {}
        }
        e
    }

    pub fn status(&self) -> LinkStatus {
        LinkStatus::new(
            LinkKind::Shovel,
            &self.vhost,
            &self.name,
            "",
            self.endpoints(),
        )
    }

    /// Where a message goes: the exchange and routing key to publish with.
    fn route(
        &self,
        exchange: &ShortString,
        routing_key: &ShortString,
    ) -> (ShortString, ShortString) {
        match &self.dest {
            Dest::Queue(q) => ("".into(), q.as_str().into()),
            Dest::Exchange { exchange, key } => (
                exchange.as_str().into(),
                key.as_deref()
                    .map_or_else(|| routing_key.clone(), Into::into),
            ),
            Dest::AsPublished => (exchange.clone(), routing_key.clone()),
        }
    }

    /// The properties to publish with: the message's, then `dest-publish-properties`, then the
    /// `x-shovelled` and `x-shovelled-timestamp` headers when asked for.
    fn properties(
        &self,
        mut p: BasicProperties,
        cluster_name: &str,
        src_uri: &str,
        dest_uri: &str,
    ) -> BasicProperties {
        p = apply_properties(p, &self.publish_properties);
        if self.add_forward_headers || self.add_timestamp_header {
            let mut headers = p.headers().clone().unwrap_or_default();
            if self.add_forward_headers {
                let mut t = FieldTable::default();
                t.insert("shovelled-by".into(), longstr(cluster_name));
                t.insert("shovel-type".into(), longstr("dynamic"));
                t.insert("shovel-name".into(), longstr(&self.name));
                t.insert("shovel-vhost".into(), longstr(&self.vhost));
                t.insert("src-uri".into(), longstr(src_uri));
                t.insert("dest-uri".into(), longstr(dest_uri));
                for (k, v) in self.endpoints() {
                    t.insert(k.replace('_', "-").into(), longstr(&v));
                }
                prepend_table_header(&mut headers, "x-shovelled", t);
            }
            if self.add_timestamp_header {
                let now = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                headers.insert(
                    "x-shovelled-timestamp".into(),
                    AMQPValue::LongLongInt(now as i64),
                );
            }
            p = p.with_headers(headers);
        }
        p
    }
}

/// Overrides properties with `dest-publish-properties` (validated by
/// [`crate::parameters`]).
pub fn apply_properties(mut p: BasicProperties, m: &Map<String, Value>) -> BasicProperties {
    let short = |v: &Value| -> Option<ShortString> { v.as_str().map(Into::into) };
    for (k, v) in m {
        p = match k.as_str() {
            "content_type" => short(v).map_or(p.clone(), |s| p.clone().with_content_type(s)),
            "content_encoding" => {
                short(v).map_or(p.clone(), |s| p.clone().with_content_encoding(s))
            }
            "headers" => v
                .as_object()
                .map_or(p.clone(), |o| p.clone().with_headers(json_to_table(o))),
            "delivery_mode" => v.as_u64().map_or(p.clone(), |n| {
                p.clone().with_delivery_mode(n.min(255) as u8)
            }),
            "priority" => v
                .as_u64()
                .map_or(p.clone(), |n| p.clone().with_priority(n.min(255) as u8)),
            "correlation_id" => short(v).map_or(p.clone(), |s| p.clone().with_correlation_id(s)),
            "reply_to" => short(v).map_or(p.clone(), |s| p.clone().with_reply_to(s)),
            "expiration" => short(v).map_or(p.clone(), |s| p.clone().with_expiration(s)),
            "message_id" => short(v).map_or(p.clone(), |s| p.clone().with_message_id(s)),
            "timestamp" => v
                .as_u64()
                .map_or(p.clone(), |n| p.clone().with_timestamp(n)),
            "type" => short(v).map_or(p.clone(), |s| p.clone().with_type(s)),
            "user_id" => short(v).map_or(p.clone(), |s| p.clone().with_user_id(s)),
            "app_id" => short(v).map_or(p.clone(), |s| p.clone().with_app_id(s)),
            "cluster_id" => short(v).map_or(p.clone(), |s| p.clone().with_cluster_id(s)),
            _ => p,
        };
    }
    p
}

/// A shovel for every `shovel` parameter.
pub fn desired(broker: &Broker) -> Vec<(LinkKey, Spec)> {
    broker
        .parameters
        .list(Some("shovel"), None)
        .into_iter()
        .filter_map(|p| match ShovelDef::parse(&p.vhost, &p.name, &p.value) {
            Ok(d) => Some((
                LinkKey::Shovel {
                    vhost: p.vhost,
                    name: p.name,
                },
                Spec::Shovel(Box::new(d)),
            )),
            Err(e) => {
                tracing::error!(vhost = %p.vhost, shovel = %p.name, "shovel not started: {e}");
                None
            }
        })
        .collect()
}

/// How a session ended.
enum Outcome {
    /// Asked to stop.
    Stopped,
    /// `src-delete-after` reached: the shovel deletes itself.
    Finished,
    Failed(String),
}

impl From<lapin::Error> for Outcome {
    fn from(e: lapin::Error) -> Self {
        Outcome::Failed(connect::describe(&e))
    }
}

/// Runs a shovel until it is stopped, finishes, or fails with `reconnect-delay` 0.
pub async fn run(
    broker: Weak<Broker>,
    def: ShovelDef,
    status: Arc<LinkStatus>,
    mut stop: watch::Receiver<Stop>,
) {
    let mut attempt = 0usize;
    loop {
        status.set_starting();
        match session(&broker, &def, &status, &mut stop, attempt).await {
            Outcome::Stopped => return,
            Outcome::Finished => {
                tracing::info!(vhost = %def.vhost, shovel = %def.name, "shovel finished (src-delete-after); deleting it");
                if let Some(b) = broker.upgrade() {
                    let change = crate::definitions::Change::DeleteParameter {
                        component: "shovel".into(),
                        vhost: def.vhost.clone(),
                        name: def.name.clone(),
                    };
                    match b.change(change).await {
                        Ok(true) => {
                            // A failure is logged and raises the disk_io alarm.
                            let _ = tokio::task::spawn_blocking(move || b.persist_metadata()).await;
                        }
                        Ok(false) => {}
                        Err(e) => {
                            tracing::error!(vhost = %def.vhost, shovel = %def.name, "finished shovel not deleted: {e}");
                        }
                    }
                }
                return;
            }
            Outcome::Failed(reason) => {
                tracing::warn!(vhost = %def.vhost, shovel = %def.name, "shovel terminated: {reason}");
                status.set_failed(&reason);
                if def.reconnect_delay.is_zero()
                    || sleep_or_stop(def.reconnect_delay, &mut stop).await
                {
                    return;
                }
            }
        }
        attempt = attempt.wrapping_add(1);
    }
}

/// Opens a connection unless asked to stop first.
async fn open_or_stop(
    broker: &Broker,
    uri: &LinkUri,
    name: &str,
    stop: &mut watch::Receiver<Stop>,
    what: &str,
) -> Result<Connected, Outcome> {
    tokio::select! {
        r = connect::open(broker, uri, "/", name) => r.map_err(|e| {
            Outcome::Failed(format!("{what} {}: {e}", uri.redacted))
        }),
        _ = super::stopped(stop) => Err(Outcome::Stopped),
    }
}

async fn session(
    broker: &Weak<Broker>,
    def: &ShovelDef,
    status: &Arc<LinkStatus>,
    stop: &mut watch::Receiver<Stop>,
    attempt: usize,
) -> Outcome {
    let Some(b) = broker.upgrade() else {
        return Outcome::Stopped;
    };
    let cluster_name = b.config.cluster_name.clone();
    let name = format!("Shovel {}", def.name);
    let src_uri = &def.src_uris[attempt % def.src_uris.len()];
    let dest_uri = &def.dest_uris[attempt % def.dest_uris.len()];
    status.set_uri(&src_uri.redacted);
    let src = match open_or_stop(&b, src_uri, &name, stop, "cannot connect to the source").await {
        Ok(c) => c,
        Err(o) => return o,
    };
    let dest = match open_or_stop(
        &b,
        dest_uri,
        &name,
        stop,
        "cannot connect to the destination",
    )
    .await
    {
        Ok(c) => c,
        Err(o) => {
            super::close(&src.conn).await;
            return o;
        }
    };
    drop(b);
    let outcome = transfer(def, status, &src, &dest, stop, &cluster_name).await;
    // Destination first: everything it confirmed has been acked to the source by now; closing
    // the source then requeues whatever was not.
    super::close(&dest.conn).await;
    super::close(&src.conn).await;
    outcome
}

/// Declares a queue the way RabbitMQ's shovel does: it is used as is if it exists, else
/// declared durable with `args`.
async fn ensure_queue(conn: &Connection, queue: &str, args: &FieldTable) -> lapin::Result<()> {
    let ch = conn.create_channel().await?;
    let passive = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    match passive {
        Ok(_) => {
            let _ = ch.close(200, "ok".into()).await;
            Ok(())
        }
        Err(e) if matches!(e.kind(), lapin::ErrorKind::ProtocolError(p) if p.get_id() == 404) => {
            let ch = conn.create_channel().await?;
            ch.queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args.clone(),
            )
            .await?;
            let _ = ch.close(200, "ok".into()).await;
            Ok(())
        }
        Err(e) => Err(e),
    }
}

async fn transfer(
    def: &ShovelDef,
    status: &Arc<LinkStatus>,
    src: &Connected,
    dest: &Connected,
    stop: &mut watch::Receiver<Stop>,
    cluster_name: &str,
) -> Outcome {
    match transfer_inner(def, status, src, dest, stop, cluster_name).await {
        Ok(o) | Err(o) => o,
    }
}

async fn transfer_inner(
    def: &ShovelDef,
    status: &Arc<LinkStatus>,
    src: &Connected,
    dest: &Connected,
    stop: &mut watch::Receiver<Stop>,
    cluster_name: &str,
) -> Result<Outcome, Outcome> {
    let sch = src.conn.create_channel().await?;
    let queue = match &def.source {
        Source::Queue(q) => {
            ensure_queue(&src.conn, q, &def.src_queue_args).await?;
            q.clone()
        }
        Source::Exchange { exchange, key } => {
            let q = sch
                .queue_declare(
                    "".into(),
                    QueueDeclareOptions {
                        exclusive: true,
                        ..Default::default()
                    },
                    def.src_queue_args.clone(),
                )
                .await?;
            sch.queue_bind(
                q.name().clone(),
                exchange.as_str().into(),
                key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
            q.name().to_string()
        }
    };
    sch.basic_qos(def.prefetch, BasicQosOptions::default())
        .await?;
    let remaining = match def.delete_after {
        DeleteAfter::Never => None,
        DeleteAfter::Count(n) => Some(n),
        DeleteAfter::QueueLength => Some(u64::from(
            sch.queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?
            .message_count(),
        )),
    };
    if remaining == Some(0) {
        return Ok(Outcome::Finished);
    }
    let dch = dest.conn.create_channel().await?;
    if let Dest::Queue(q) = &def.dest {
        ensure_queue(&dest.conn, q, &def.dest_queue_args).await?;
    }
    if def.ack_mode == AckMode::OnConfirm {
        dch.confirm_select(ConfirmSelectOptions::default()).await?;
    }
    let mut consumer = sch
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            def.src_consumer_args.clone(),
        )
        .await?;
    let tag = consumer.tag();
    status.set_running(&src.redacted, &dest.redacted, None);
    tracing::info!(vhost = %def.vhost, shovel = %def.name, src = %src.redacted, dest = %dest.redacted, "shovel running");
    let mut fwd = Forwarder::new(sch.clone(), dch, def.ack_mode, status.clone());
    let mut src_events = connect::events(&src.conn);
    let mut dest_events = connect::events(&dest.conn);
    let mut health = tokio::time::interval(connect::HEALTH_CHECK);
    let window = usize::from(def.prefetch);
    let mut published = 0u64;
    let mut settled = 0u64;
    let mut consuming = true;
    let result: Result<Outcome, Outcome> = async {
        loop {
            tokio::select! {
                biased;
                _ = super::stopped(stop) => {
                    // Stop taking messages, settle what is in flight; closing requeues the rest.
                    let _ = sch.basic_cancel(tag.clone(), BasicCancelOptions::default()).await;
                    fwd.drain().await?;
                    return Ok(Outcome::Stopped);
                }
                why = connect::failed(&mut src_events) => {
                    return Err(Outcome::Failed(format!("source connection: {why}")));
                }
                why = connect::failed(&mut dest_events) => {
                    return Err(Outcome::Failed(format!("destination connection: {why}")));
                }
                _ = health.tick() => {
                    if let Some(why) = connect::closed(&[("source", &src.conn), ("destination", &dest.conn)]) {
                        return Err(Outcome::Failed(why));
                    }
                }
                r = fwd.settle_next() => {
                    settled += r?.forwarded;
                    if remaining.is_some_and(|n| settled >= n) {
                        fwd.drain().await?;
                        return Ok(Outcome::Finished);
                    }
                }
                d = consumer.next(), if consuming && fwd.in_flight() < window => {
                    let delivery = match d {
                        None => return Err(Outcome::Failed("the source cancelled the shovel's consumer".into())),
                        Some(Err(e)) => return Err(e.into()),
                        Some(Ok(d)) => d,
                    };
                    if remaining.is_some_and(|n| published >= n) {
                        // Beyond src-delete-after: left unacknowledged, requeued when we close.
                        continue;
                    }
                    fwd.received();
                    let (exchange, routing_key) = def.route(&delivery.exchange, &delivery.routing_key);
                    let props = def.properties(delivery.properties, cluster_name, &src.redacted, &dest.redacted);
                    fwd.forward(delivery.delivery_tag, exchange, routing_key, delivery.data, props).await?;
                    published += 1;
                    if remaining.is_some_and(|n| published >= n) {
                        consuming = false;
                        let _ = sch.basic_cancel(tag.clone(), BasicCancelOptions::default()).await;
                    }
                }
            }
        }
    }
    .await;
    if result.is_err() {
        fwd.salvage().await;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_definitions_like_rabbitmq() {
        let d = ShovelDef::parse(
            "/",
            "s",
            &json!({"src-uri": ["amqp://a", "amqp://b"], "src-exchange": "x", "src-exchange-key": "k.#",
                    "dest-uri": "amqp://", "dest-exchange": "y", "ack-mode": "on-publish",
                    "src-delete-after": "queue-length", "reconnect-delay": 0.5, "src-prefetch-count": 10}),
        )
        .unwrap();
        assert_eq!(d.src_uris.len(), 2);
        assert_eq!(
            d.source,
            Source::Exchange {
                exchange: "x".into(),
                key: "k.#".into()
            }
        );
        assert_eq!(
            d.dest,
            Dest::Exchange {
                exchange: "y".into(),
                key: None
            }
        );
        assert_eq!(d.delete_after, DeleteAfter::QueueLength);
        assert_eq!(d.ack_mode, AckMode::OnPublish);
        assert_eq!(d.reconnect_delay, Duration::from_millis(500));
        assert_eq!(d.prefetch, 10);
        let d = ShovelDef::parse(
            "/",
            "s",
            &json!({"src-uri": "amqp://", "src-queue": "q", "dest-uri": "amqp://"}),
        )
        .unwrap();
        assert_eq!(d.dest, Dest::AsPublished);
        assert_eq!(d.ack_mode, AckMode::OnConfirm);
        assert_eq!(d.reconnect_delay, Duration::from_secs(5));
        assert_eq!(d.prefetch, 1000);
        assert_eq!(d.delete_after, DeleteAfter::Never);
    }

    #[test]
    fn routes_and_properties() {
        let d = ShovelDef::parse(
            "v",
            "s",
            &json!({"src-uri": "amqp://", "src-queue": "q", "dest-uri": "amqp://h", "dest-queue": "d",
                    "dest-add-forward-headers": true, "dest-add-timestamp-header": true,
                    "dest-publish-properties": {"delivery_mode": 2, "app_id": "shv"}}),
        )
        .unwrap();
        let (x, k) = d.route(&"ex".into(), &"rk".into());
        assert_eq!((x.as_str(), k.as_str()), ("", "d"));
        let p = d.properties(
            BasicProperties::default().with_priority(3),
            "c",
            "amqp://",
            "amqp://h",
        );
        assert_eq!(p.delivery_mode(), &Some(2));
        assert_eq!(p.priority(), &Some(3));
        assert_eq!(p.app_id().as_ref().map(|s| s.as_str()), Some("shv"));
        let h = p.headers().clone().unwrap();
        let Some(AMQPValue::FieldArray(a)) = h.inner().get("x-shovelled") else {
            panic!("no x-shovelled: {h:?}")
        };
        let Some(AMQPValue::FieldTable(t)) = a.as_slice().first() else {
            panic!()
        };
        for (k, v) in [
            ("shovelled-by", "c"),
            ("shovel-type", "dynamic"),
            ("shovel-name", "s"),
            ("shovel-vhost", "v"),
            ("src-uri", "amqp://"),
            ("dest-uri", "amqp://h"),
            ("src-queue", "q"),
            ("dest-queue", "d"),
        ] {
            assert_eq!(
                t.inner()
                    .get(k)
                    .and_then(crate::message::value_as_string)
                    .as_deref(),
                Some(v),
                "{k}"
            );
        }
        assert!(h.inner().contains_key("x-shovelled-timestamp"));
    }
}
