//! Federation: exchanges and queues selected by a policy's `federation-upstream` or
//! `federation-upstream-set` receive messages from the same-named (or the upstream's
//! `exchange` / `queue`) object on each upstream, as RabbitMQ's federation plugin (3.10) does,
//! so either side can be Warren or RabbitMQ.
//!
//! **Exchange federation.** On the upstream the link declares a queue
//! `federation: X -> <cluster>[:<vhost>:<X>]` (durable, `x-expires`/`x-message-ttl` from the
//! upstream) bound to an internal exchange `<queue> A|B` of type `x-federation-upstream`
//! (fanout filtered by hops and origin; plain fanout if the upstream lacks the type), itself
//! bound to the upstream exchange with each distinct binding key (and arguments) of the local
//! exchange. Local binds and unbinds are followed as they happen. Received messages are
//! republished to the local exchange with `x-received-from` prepended (`uri`, `exchange`,
//! `redelivered`, `cluster-name` and `vhost` of the upstream). Loops end two ways: a message
//! that already went through this cluster, or has made `max-hops` hops, is not passed on (by the
//! upstream's `x-federation-upstream` exchange, and checked again here); and bindings carry
//! `x-bound-from` with a hop count, so they propagate no further than messages can.
//!
//! **Queue federation.** The link consumes from the upstream queue (declared like the local
//! one) with consumer priority -1, only while the local queue has consumers and no ready
//! messages (checked every 50 ms), and republishes to the local queue.

use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions,
    ExchangeBindOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, ExchangeUnbindOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldArray, FieldTable, ShortString};
use lapin::{BasicProperties, Connection, Consumer, ExchangeKind as LapinKind};
use serde_json::{Value, json};
use tokio::sync::watch;

use super::connect::{self, Connected};
use super::forward::{AckMode, Forwarder, longstr, prepend_table_header};
use super::status::{LinkKind, LinkStatus};
use super::uri::LinkUri;
use super::{LinkKey, Spec, Stop, sleep_or_stop};
use crate::broker::Broker;
use crate::exchange::ExchangeKind;
use crate::message::value_as_string;
use crate::policy::{self, Policy};

const DEFAULT_PREFETCH: u64 = 1000;
const DEFAULT_RECONNECT_DELAY: f64 = 5.0;
const DEFAULT_MAX_HOPS: u64 = 1;
/// How often a queue link checks whether its local queue is starved.
const QUEUE_CHECK: Duration = Duration::from_millis(50);

const RECEIVED_FROM: &str = "x-received-from";
const BOUND_FROM: &str = "x-bound-from";
const MAX_HOPS_ARG: &str = "x-max-hops";
const DOWNSTREAM_NAME_ARG: &str = "x-downstream-name";
const DOWNSTREAM_VHOST_ARG: &str = "x-downstream-vhost";
const INTERNAL_PURPOSE: &str = "x-internal-purpose";

/// A `federation-upstream` parameter (with a set entry's overrides applied).
#[derive(Debug, Clone)]
pub struct Upstream {
    pub name: String,
    pub uris: Vec<LinkUri>,
    pub prefetch: u16,
    pub reconnect_delay: Duration,
    pub ack_mode: AckMode,
    pub trust_user_id: bool,
    pub exchange: Option<String>,
    pub queue: Option<String>,
    pub max_hops: u64,
    pub expires: Option<u64>,
    pub message_ttl: Option<u64>,
    pub consumer_tag: Option<String>,
    raw: Value,
}

impl Upstream {
    pub fn parse(name: &str, value: &Value) -> Result<Self, String> {
        let obj = value
            .as_object()
            .ok_or("the upstream value should be an object")?;
        let uris: Vec<&str> = match obj.get("uri") {
            Some(Value::String(s)) => vec![s.as_str()],
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
            _ => return Err("'uri' is required".into()),
        };
        if uris.is_empty() {
            return Err("'uri' is empty".into());
        }
        let s = |k: &str| obj.get(k).and_then(Value::as_str).map(str::to_owned);
        let n = |k: &str| obj.get(k).and_then(Value::as_u64);
        Ok(Upstream {
            name: name.to_owned(),
            uris: uris
                .into_iter()
                .map(|u| LinkUri::parse(u).map_err(|e| format!("uri: {e}")))
                .collect::<Result<_, _>>()?,
            prefetch: n("prefetch-count")
                .unwrap_or(DEFAULT_PREFETCH)
                .clamp(1, u64::from(u16::MAX)) as u16,
            reconnect_delay: Duration::try_from_secs_f64(
                obj.get("reconnect-delay")
                    .and_then(Value::as_f64)
                    .unwrap_or(DEFAULT_RECONNECT_DELAY),
            )
            .unwrap_or(Duration::ZERO),
            ack_mode: AckMode::parse(obj.get("ack-mode").and_then(Value::as_str)),
            trust_user_id: obj
                .get("trust-user-id")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            exchange: s("exchange"),
            queue: s("queue"),
            max_hops: n("max-hops").unwrap_or(DEFAULT_MAX_HOPS),
            expires: n("expires"),
            message_ttl: n("message-ttl"),
            consumer_tag: s("consumer-tag"),
            raw: value.clone(),
        })
    }
}

/// One federated exchange's or queue's link to one upstream.
#[derive(Debug, Clone)]
pub struct FederationLink {
    pub vhost: String,
    pub kind: LinkKind,
    /// The local exchange or queue.
    pub object: String,
    pub policy: String,
    pub upstream: Upstream,
}

impl FederationLink {
    pub fn fingerprint(&self) -> String {
        json!([self.policy, self.upstream.raw]).to_string()
    }

    /// The exchange or queue on the upstream.
    fn upstream_object(&self) -> &str {
        let named = match self.kind {
            LinkKind::Exchange => &self.upstream.exchange,
            _ => &self.upstream.queue,
        };
        named.as_deref().unwrap_or(&self.object)
    }

    fn consumer_tag(&self) -> String {
        self.upstream
            .consumer_tag
            .clone()
            .unwrap_or_else(|| format!("federation-link-{}", self.upstream.name))
    }

    pub fn status(&self) -> LinkStatus {
        let endpoints = match self.kind {
            LinkKind::Exchange => vec![("upstream_exchange", self.upstream_object().to_owned())],
            _ => vec![
                ("upstream_queue", self.upstream_object().to_owned()),
                ("consumer_tag", self.consumer_tag()),
            ],
        };
        LinkStatus::new(
            self.kind,
            &self.vhost,
            &self.object,
            &self.upstream.name,
            endpoints,
        )
    }
}

/// The upstreams a policy names, with set entries' overrides.
fn upstreams_for(broker: &Broker, vhost: &str, p: &Policy) -> Vec<Upstream> {
    let param = |name: &str| broker.parameters.get("federation-upstream", vhost, name);
    let parse = |name: &str, v: &Value| match Upstream::parse(name, v) {
        Ok(u) => Some(u),
        Err(e) => {
            tracing::error!(%vhost, upstream = %name, "federation upstream ignored: {e}");
            None
        }
    };
    if let Some(name) = p
        .definition
        .get("federation-upstream")
        .and_then(Value::as_str)
    {
        return param(name)
            .and_then(|u| parse(name, &u.value))
            .into_iter()
            .collect();
    }
    let Some(set) = p
        .definition
        .get("federation-upstream-set")
        .and_then(Value::as_str)
    else {
        return Vec::new();
    };
    if set == "all" {
        return broker
            .parameters
            .list(Some("federation-upstream"), Some(vhost))
            .into_iter()
            .filter_map(|u| parse(&u.name, &u.value))
            .collect();
    }
    let Some(entries) = broker
        .parameters
        .get("federation-upstream-set", vhost, set)
        .and_then(|s| s.value.as_array().cloned())
    else {
        return Vec::new();
    };
    entries
        .iter()
        .filter_map(|entry| {
            let name = entry.get("upstream")?.as_str()?;
            let mut value = param(name)?.value;
            if let (Some(base), Some(overrides)) = (value.as_object_mut(), entry.as_object()) {
                for (k, v) in overrides {
                    if k != "upstream" {
                        base.insert(k.clone(), v.clone());
                    }
                }
            }
            parse(name, &value)
        })
        .collect()
}

fn has_internal_purpose(args: &FieldTable) -> bool {
    args.inner().contains_key(INTERNAL_PURPOSE)
}

/// A link for every (federated exchange or queue, upstream) the policies ask for.
pub fn desired(broker: &Broker) -> Vec<(LinkKey, Spec)> {
    let mut out = Vec::new();
    for vname in broker.vhost_names() {
        if broker
            .parameters
            .list(Some("federation-upstream"), Some(&vname))
            .is_empty()
        {
            continue;
        }
        let Some(v) = broker.vhost(&vname) else {
            continue;
        };
        let policies = v.policies(false);
        let federating = |p: &&Policy| {
            p.definition.contains_key("federation-upstream")
                || p.definition.contains_key("federation-upstream-set")
        };
        if !policies.iter().any(|p| federating(&p)) {
            continue;
        }
        let mut add = |kind: LinkKind, object: &str, p: &Policy| {
            for upstream in upstreams_for(broker, &vname, p) {
                out.push((
                    LinkKey::Federation {
                        vhost: vname.clone(),
                        kind,
                        object: object.to_owned(),
                        upstream: upstream.name.clone(),
                    },
                    Spec::Federation(Box::new(FederationLink {
                        vhost: vname.clone(),
                        kind,
                        object: object.to_owned(),
                        policy: p.name.clone(),
                        upstream,
                    })),
                ));
            }
        };
        for e in v.exchanges() {
            if e.name.is_empty()
                || e.internal
                || e.kind == ExchangeKind::FederationUpstream
                || has_internal_purpose(&e.arguments)
            {
                continue;
            }
            if let Some(p) = policy::select(&policies, &e.name, false).filter(federating) {
                add(LinkKind::Exchange, &e.name, p);
            }
        }
        for q in v.queues() {
            if q.exclusive_owner.is_some() || q.is_deleted() || has_internal_purpose(&q.arguments) {
                continue;
            }
            if let Some(p) = policy::select(&policies, &q.name, true).filter(federating) {
                add(LinkKind::Queue, &q.name, p);
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Loop prevention

fn table_get_str(t: &FieldTable, k: &str) -> Option<String> {
    t.inner().get(k).and_then(value_as_string)
}

fn as_int(v: &AMQPValue) -> Option<i64> {
    Some(match v {
        AMQPValue::ShortShortInt(n) => i64::from(*n),
        AMQPValue::ShortShortUInt(n) => i64::from(*n),
        AMQPValue::ShortInt(n) => i64::from(*n),
        AMQPValue::ShortUInt(n) => i64::from(*n),
        AMQPValue::LongInt(n) => i64::from(*n),
        AMQPValue::LongUInt(n) => i64::from(*n),
        AMQPValue::LongLongInt(n) => *n,
        _ => return None,
    })
}

/// Has an entry of a routing-header array been written by (cluster, vhost)?
fn already_seen(cluster: &str, vhost: &str, list: &[AMQPValue]) -> bool {
    list.iter().any(|e| {
        matches!(e, AMQPValue::FieldTable(t)
            if table_get_str(t, "cluster-name").as_deref() == Some(cluster)
                && table_get_str(t, "vhost").as_deref() == Some(vhost))
    })
}

/// Whether a message should go on to the downstream (cluster, vhost): fewer than `max_hops`
/// entries in `x-received-from`, none from that downstream (RabbitMQ's `should_forward`).
pub fn should_forward(
    headers: Option<&FieldTable>,
    max_hops: u64,
    downstream: &str,
    downstream_vhost: &str,
) -> bool {
    match headers.and_then(|h| h.inner().get(RECEIVED_FROM)) {
        Some(AMQPValue::FieldArray(a)) => {
            (a.as_slice().len() as u64) < max_hops
                && !already_seen(downstream, downstream_vhost, a.as_slice())
        }
        _ => true,
    }
}

/// The `x-federation-upstream` exchange's filter, from its arguments.
pub fn upstream_exchange_forwards(args: &FieldTable, headers: Option<&FieldTable>) -> bool {
    let max_hops = args
        .inner()
        .get(MAX_HOPS_ARG)
        .and_then(as_int)
        .map_or(DEFAULT_MAX_HOPS, |n| n.max(0) as u64);
    let name = table_get_str(args, DOWNSTREAM_NAME_ARG).unwrap_or_default();
    let vhost = table_get_str(args, DOWNSTREAM_VHOST_ARG).unwrap_or_default();
    should_forward(headers, max_hops, &name, &vhost)
}

/// The arguments to bind on the upstream for a local binding, or `None` if the binding should
/// propagate no further (RabbitMQ's `update_binding`: bindings obey `max-hops` like messages).
fn upstream_binding_args(
    args: &FieldTable,
    max_hops: u64,
    upstream_cluster: Option<&str>,
    upstream_vhost: &str,
    cluster: &str,
    vhost: &str,
    down_exchange: &str,
) -> Option<FieldTable> {
    let hops = match args.inner().get(BOUND_FROM) {
        Some(AMQPValue::FieldArray(all)) => {
            let all = all.as_slice();
            let prev = match all.first() {
                Some(AMQPValue::FieldTable(t)) => {
                    t.inner().get("hops").and_then(as_int).unwrap_or(0)
                }
                _ => 0,
            };
            if upstream_cluster.is_some_and(|u| already_seen(u, upstream_vhost, all)) {
                0
            } else {
                (prev - 1).min(max_hops as i64)
            }
        }
        _ => max_hops as i64,
    };
    if hops <= 0 {
        return None;
    }
    let mut info = FieldTable::default();
    info.insert("cluster-name".into(), longstr(cluster));
    info.insert("vhost".into(), longstr(vhost));
    info.insert("exchange".into(), longstr(down_exchange));
    info.insert(
        "hops".into(),
        AMQPValue::ShortInt(hops.min(i64::from(i16::MAX)) as i16),
    );
    let mut out = args.clone();
    prepend_table_header(&mut out, BOUND_FROM, info);
    Some(out)
}

/// `federation: X -> cluster[:vhost:X']`, RabbitMQ's name for the upstream queue.
fn upstream_queue_name(
    upstream_x: &str,
    upstream_vhost: &str,
    cluster: &str,
    vhost: &str,
    x: &str,
) -> String {
    let down = if upstream_vhost == vhost {
        if upstream_x == x {
            String::new()
        } else {
            format!(":{x}")
        }
    } else {
        format!(":{vhost}:{x}")
    };
    format!("federation: {upstream_x} -> {cluster}{down}")
}

// ---------------------------------------------------------------------------------------------
// Running a link

enum Outcome {
    Stopped,
    Failed(String),
}

impl From<lapin::Error> for Outcome {
    fn from(e: lapin::Error) -> Self {
        Outcome::Failed(connect::describe(&e))
    }
}

fn is_code(e: &lapin::Error, code: u16) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(p) if p.get_id() == code)
}

/// Runs a link until it is stopped.
pub async fn run(
    broker: Weak<Broker>,
    link: FederationLink,
    status: Arc<LinkStatus>,
    mut stop: watch::Receiver<Stop>,
) {
    let mut attempt = 0usize;
    loop {
        status.set_starting();
        let uri = &link.upstream.uris[attempt % link.upstream.uris.len()];
        status.set_uri(&uri.redacted);
        match session(&broker, &link, uri, &status, &mut stop).await {
            Outcome::Stopped => return,
            Outcome::Failed(reason) => {
                tracing::warn!(vhost = %link.vhost, object = %link.object, upstream = %link.upstream.name,
                    "federation link error: {reason}");
                status.set_failed(&reason);
                let delay = link
                    .upstream
                    .reconnect_delay
                    .max(Duration::from_millis(100));
                if sleep_or_stop(delay, &mut stop).await {
                    return;
                }
            }
        }
        attempt = attempt.wrapping_add(1);
    }
}

fn local_uri(vhost: &str) -> LinkUri {
    let mut u = LinkUri::parse("amqp://").expect("a valid URI");
    u.vhost = Some(vhost.to_owned());
    u
}

async fn session(
    broker: &Weak<Broker>,
    link: &FederationLink,
    uri: &LinkUri,
    status: &Arc<LinkStatus>,
    stop: &mut watch::Receiver<Stop>,
) -> Outcome {
    let Some(b) = broker.upgrade() else {
        return Outcome::Stopped;
    };
    let name = format!(
        "Federation link (upstream: {}, policy: {})",
        link.upstream.name, link.policy
    );
    let opened = async {
        let props = connect::server_properties(&b, uri, &link.vhost).await?;
        let up = connect::open(&b, uri, &link.vhost, &name).await?;
        let down = match connect::open(&b, &local_uri(&link.vhost), &link.vhost, &name).await {
            Ok(d) => d,
            Err(e) => {
                super::close(&up.conn).await;
                return Err(format!("local connection: {e}"));
            }
        };
        Ok::<_, String>((props, up, down))
    };
    let (props, up, down) = tokio::select! {
        r = opened => match r {
            Ok(x) => x,
            Err(e) => return Outcome::Failed(e),
        },
        _ = super::stopped(stop) => return Outcome::Stopped,
    };
    let ctx = Ctx {
        cluster: b.config.cluster_name.clone(),
        upstream_cluster: connect::table_str(&props, "cluster_name"),
        upstream_vhost: uri.vhost_or(&link.vhost).to_owned(),
        topology: b.links.subscribe_topology(),
    };
    drop(b);
    let r = match link.kind {
        LinkKind::Exchange => exchange_link(broker, link, status, &up, &down, stop, ctx).await,
        _ => queue_link(broker, link, status, &up, &down, stop, ctx).await,
    };
    let outcome = match r {
        Ok(o) | Err(o) => o,
    };
    super::close(&down.conn).await;
    super::close(&up.conn).await;
    outcome
}

struct Ctx {
    cluster: String,
    upstream_cluster: Option<String>,
    upstream_vhost: String,
    topology: watch::Receiver<u64>,
}

/// Runs `f` on a channel of its own (a channel error there does not end the link).
async fn on_disposable_channel<T, F>(conn: &Connection, f: F) -> lapin::Result<T>
where
    F: AsyncFnOnce(&lapin::Channel) -> lapin::Result<T>,
{
    let ch = conn.create_channel().await?;
    let r = f(&ch).await;
    if ch.status().connected() {
        let _ = ch.close(200, "ok".into()).await;
    }
    r
}

async fn exchange_exists(conn: &Connection, name: &str) -> lapin::Result<bool> {
    let r = on_disposable_channel(conn, async |ch| {
        ch.exchange_declare(
            name.into(),
            LapinKind::Fanout,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
    })
    .await;
    match r {
        Ok(()) => Ok(true),
        Err(e) if is_code(&e, 404) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The local exchange's distinct (routing key, arguments) bindings.
fn local_bindings(broker: &Weak<Broker>, vhost: &str, x: &str) -> Vec<(String, FieldTable)> {
    let Some(e) = broker
        .upgrade()
        .and_then(|b| b.vhost(vhost))
        .and_then(|v| v.exchange(x))
    else {
        return Vec::new();
    };
    let mut out: Vec<(String, FieldTable)> = Vec::new();
    for b in e.bindings.read().list() {
        let k = (b.routing_key.clone(), b.arguments.clone());
        if !out.contains(&k) {
            out.push(k);
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
async fn exchange_link(
    broker: &Weak<Broker>,
    link: &FederationLink,
    status: &Arc<LinkStatus>,
    up: &Connected,
    down: &Connected,
    stop: &mut watch::Receiver<Stop>,
    mut ctx: Ctx,
) -> Result<Outcome, Outcome> {
    let ux = link.upstream_object().to_owned();
    let local = broker
        .upgrade()
        .and_then(|b| b.vhost(&link.vhost))
        .and_then(|v| v.exchange(&link.object))
        .ok_or_else(|| Outcome::Failed(format!("exchange '{}' not found", link.object)))?;
    // The upstream exchange: used if it exists, else declared like the local one.
    if !exchange_exists(&up.conn, &ux).await? {
        let ch = up.conn.create_channel().await?;
        ch.exchange_declare(
            ux.as_str().into(),
            LapinKind::Custom(local.kind.as_str().to_owned()),
            ExchangeDeclareOptions {
                durable: local.durable,
                auto_delete: local.auto_delete,
                internal: local.internal,
                ..Default::default()
            },
            local.arguments.clone(),
        )
        .await?;
        let _ = ch.close(200, "ok".into()).await;
    }
    let queue = upstream_queue_name(
        &ux,
        &ctx.upstream_vhost,
        &ctx.cluster,
        &link.vhost,
        &link.object,
    );
    // Alternate the internal exchange's name on every start, so bindings removed while the
    // link was down do not survive: bind a fresh one, then delete the old.
    let (suffix, old) = if exchange_exists(&up.conn, &format!("{queue} A")).await? {
        ("B", "A")
    } else {
        ("A", "B")
    };
    let internal_x = format!("{queue} {suffix}");
    let cmd = up.conn.create_channel().await?;
    cmd.exchange_delete(internal_x.as_str().into(), ExchangeDeleteOptions::default())
        .await?;
    let mut purpose = FieldTable::default();
    purpose.insert(INTERNAL_PURPOSE.into(), longstr("federation"));
    let mut xfu_args = purpose.clone();
    xfu_args.insert(
        MAX_HOPS_ARG.into(),
        AMQPValue::LongLongInt(link.upstream.max_hops as i64),
    );
    xfu_args.insert(DOWNSTREAM_NAME_ARG.into(), longstr(&ctx.cluster));
    xfu_args.insert(DOWNSTREAM_VHOST_ARG.into(), longstr(&link.vhost));
    let internal_opts = ExchangeDeclareOptions {
        durable: true,
        internal: true,
        auto_delete: true,
        ..Default::default()
    };
    let xfu = on_disposable_channel(&up.conn, async |ch| {
        ch.exchange_declare(
            internal_x.as_str().into(),
            LapinKind::Custom("x-federation-upstream".into()),
            internal_opts,
            xfu_args.clone(),
        )
        .await
    })
    .await;
    match xfu {
        Ok(()) => {}
        // An upstream without the type: a fanout, filtering on receipt only.
        Err(e) if is_code(&e, 503) => {
            cmd.exchange_declare(
                internal_x.as_str().into(),
                LapinKind::Fanout,
                internal_opts,
                purpose.clone(),
            )
            .await?;
        }
        Err(e) => return Err(e.into()),
    }
    let mut qargs = purpose.clone();
    if let Some(x) = link.upstream.expires {
        qargs.insert("x-expires".into(), AMQPValue::LongLongInt(x as i64));
    }
    if let Some(t) = link.upstream.message_ttl {
        qargs.insert("x-message-ttl".into(), AMQPValue::LongLongInt(t as i64));
    }
    let uch = up.conn.create_channel().await?;
    uch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        qargs,
    )
    .await?;
    uch.queue_bind(
        queue.as_str().into(),
        internal_x.as_str().into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let down_label = format!("{}:{} {suffix}", link.vhost, link.object);
    let binding_args = |args: &FieldTable| {
        upstream_binding_args(
            args,
            link.upstream.max_hops,
            ctx.upstream_cluster.as_deref(),
            &ctx.upstream_vhost,
            &ctx.cluster,
            &link.vhost,
            &down_label,
        )
    };
    // (local key and arguments, what was bound upstream)
    let mut bound: Vec<((String, FieldTable), FieldTable)> = Vec::new();
    for (key, args) in local_bindings(broker, &link.vhost, &link.object) {
        if let Some(up_args) = binding_args(&args) {
            cmd.exchange_bind(
                internal_x.as_str().into(),
                ux.as_str().into(),
                key.as_str().into(),
                ExchangeBindOptions::default(),
                up_args.clone(),
            )
            .await?;
            bound.push(((key, args), up_args));
        }
    }
    let _ = cmd
        .exchange_delete(
            format!("{queue} {old}").as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await;
    // A prefetch in every ack mode (no-ack acknowledges on receipt, see `AckMode::NoAck`).
    uch.basic_qos(link.upstream.prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = uch
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let dch = down.conn.create_channel().await?;
    if link.upstream.ack_mode == AckMode::OnConfirm {
        dch.confirm_select(ConfirmSelectOptions::default()).await?;
    }
    status.set_running(&up.redacted, "", Some(down.name.clone()));
    tracing::info!(vhost = %link.vhost, exchange = %link.object, upstream = %link.upstream.name, uri = %up.redacted, "federation link running");
    let mut fwd = Forwarder::new(uch.clone(), dch, link.upstream.ack_mode, status.clone());
    let mut up_events = connect::events(&up.conn);
    let mut down_events = connect::events(&down.conn);
    let mut health = tokio::time::interval(connect::HEALTH_CHECK);
    let window = usize::from(link.upstream.prefetch);
    let local_x: ShortString = link.object.as_str().into();
    let result: Result<Outcome, Outcome> = async {
        loop {
            tokio::select! {
                biased;
                why = super::stopped(stop) => {
                    let _ = uch.basic_cancel(consumer.tag(), BasicCancelOptions::default()).await;
                    fwd.drain().await?;
                    if why == Stop::Removed {
                        // Nothing federates this exchange from that upstream any more.
                        let _ = cmd.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await;
                        let _ = cmd.exchange_delete(internal_x.as_str().into(), ExchangeDeleteOptions::default()).await;
                    }
                    return Ok(Outcome::Stopped);
                }
                why = connect::failed(&mut up_events) => {
                    return Err(Outcome::Failed(format!("upstream connection: {why}")));
                }
                why = connect::failed(&mut down_events) => {
                    return Err(Outcome::Failed(format!("local connection: {why}")));
                }
                _ = health.tick() => {
                    if let Some(why) = connect::closed(&[("upstream", &up.conn), ("local", &down.conn)]) {
                        return Err(Outcome::Failed(why));
                    }
                }
                r = fwd.settle_next() => { r?; }
                r = ctx.topology.changed() => {
                    if r.is_err() {
                        return Ok(Outcome::Stopped);
                    }
                    let now = local_bindings(broker, &link.vhost, &link.object);
                    let mut kept = Vec::with_capacity(bound.len());
                    for (local_b, up_args) in std::mem::take(&mut bound) {
                        if now.contains(&local_b) {
                            kept.push((local_b, up_args));
                        } else {
                            cmd.exchange_unbind(
                                internal_x.as_str().into(),
                                ux.as_str().into(),
                                local_b.0.as_str().into(),
                                ExchangeUnbindOptions::default(),
                                up_args,
                            )
                            .await?;
                        }
                    }
                    bound = kept;
                    for (key, args) in now {
                        if bound.iter().any(|(b, _)| b.0 == key && b.1 == args) {
                            continue;
                        }
                        if let Some(up_args) = binding_args(&args) {
                            cmd.exchange_bind(
                                internal_x.as_str().into(),
                                ux.as_str().into(),
                                key.as_str().into(),
                                ExchangeBindOptions::default(),
                                up_args.clone(),
                            )
                            .await?;
                            bound.push(((key, args), up_args));
                        }
                    }
                }
                d = consumer.next(), if fwd.in_flight() < window => {
                    let d = match d {
                        None => return Err(Outcome::Failed("the upstream cancelled the link's consumer".into())),
                        Some(Err(e)) => return Err(e.into()),
                        Some(Ok(d)) => d,
                    };
                    fwd.received();
                    if !should_forward(d.properties.headers().as_ref(), link.upstream.max_hops, &ctx.cluster, &link.vhost) {
                        fwd.drop_message(d.delivery_tag).await?;
                        continue;
                    }
                    let mut entry = FieldTable::default();
                    entry.insert("uri".into(), longstr(&up.redacted));
                    entry.insert("exchange".into(), longstr(&ux));
                    entry.insert("redelivered".into(), AMQPValue::Boolean(d.redelivered));
                    if let Some(c) = &ctx.upstream_cluster {
                        entry.insert("cluster-name".into(), longstr(c));
                    }
                    entry.insert("vhost".into(), longstr(&ctx.upstream_vhost));
                    let mut headers = d.properties.headers().clone().unwrap_or_default();
                    prepend_table_header(&mut headers, RECEIVED_FROM, entry);
                    let props = republish_properties(d.properties, headers, link.upstream.trust_user_id);
                    fwd.forward(d.delivery_tag, local_x.clone(), d.routing_key, d.data, props).await?;
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

/// The message's properties with new headers; `user-id` dropped unless the upstream is
/// trusted to have checked it (`trust-user-id`).
fn republish_properties(
    p: BasicProperties,
    headers: FieldTable,
    trust_user_id: bool,
) -> BasicProperties {
    let mut out = BasicProperties::default().with_headers(headers);
    macro_rules! copy {
        ($get:ident, $with:ident) => {
            if let Some(v) = p.$get() {
                out = out.$with(v.clone());
            }
        };
    }
    copy!(content_type, with_content_type);
    copy!(content_encoding, with_content_encoding);
    copy!(delivery_mode, with_delivery_mode);
    copy!(priority, with_priority);
    copy!(correlation_id, with_correlation_id);
    copy!(reply_to, with_reply_to);
    copy!(expiration, with_expiration);
    copy!(message_id, with_message_id);
    copy!(timestamp, with_timestamp);
    copy!(kind, with_type);
    copy!(app_id, with_app_id);
    copy!(cluster_id, with_cluster_id);
    if trust_user_id {
        copy!(user_id, with_user_id);
    }
    out
}

/// Headers of a message moved by a queue link (RabbitMQ's queue link `update_headers`): the
/// first move records `x-original-exchange` and `x-original-routing-key`; each move prepends an
/// `x-received-from` entry with a visit count per upstream; `CC` becomes `x-original-cc` so
/// the message is not copied again by the local routing.
fn queue_link_headers(
    headers: Option<&FieldTable>,
    uri: &str,
    queue: &str,
    redelivered: bool,
    exchange: &str,
    routing_key: &str,
) -> FieldTable {
    let mut h = headers.cloned().unwrap_or_default();
    let mut count = 0;
    match h.inner().get(RECEIVED_FROM).cloned() {
        Some(AMQPValue::FieldArray(been)) => {
            let mut rest = Vec::new();
            for e in been.as_slice() {
                let same = matches!(e, AMQPValue::FieldTable(t)
                    if table_get_str(t, "uri").as_deref() == Some(uri)
                        && table_get_str(t, "queue").as_deref() == Some(queue)
                        && table_get_str(t, "virtual_host").is_none());
                if same {
                    if let AMQPValue::FieldTable(t) = e {
                        count = t.inner().get("visit-count").and_then(as_int).unwrap_or(0);
                    }
                } else {
                    rest.push(e.clone());
                }
            }
            h.insert(
                RECEIVED_FROM.into(),
                AMQPValue::FieldArray(FieldArray::from(rest)),
            );
        }
        _ => {
            h.insert("x-original-exchange".into(), longstr(exchange));
            h.insert("x-original-routing-key".into(), longstr(routing_key));
        }
    }
    let mut entry = FieldTable::default();
    entry.insert("uri".into(), longstr(uri));
    entry.insert("queue".into(), longstr(queue));
    entry.insert("redelivered".into(), AMQPValue::Boolean(redelivered));
    entry.insert("visit-count".into(), AMQPValue::LongLongInt(count + 1));
    prepend_table_header(&mut h, RECEIVED_FROM, entry);
    if let Some(cc) = h.inner().get("CC").cloned() {
        let mut renamed = FieldTable::default();
        for (k, v) in h.inner() {
            if k.as_str() == "CC" {
                renamed.insert("x-original-cc".into(), cc.clone());
            } else {
                renamed.insert(k.clone(), v.clone());
            }
        }
        h = renamed;
    }
    h
}

#[allow(clippy::too_many_arguments)]
async fn queue_link(
    broker: &Weak<Broker>,
    link: &FederationLink,
    status: &Arc<LinkStatus>,
    up: &Connected,
    down: &Connected,
    stop: &mut watch::Receiver<Stop>,
    _ctx: Ctx,
) -> Result<Outcome, Outcome> {
    let uq = link.upstream_object().to_owned();
    let local = broker
        .upgrade()
        .and_then(|b| b.vhost(&link.vhost))
        .and_then(|v| v.queue(&link.object))
        .ok_or_else(|| Outcome::Failed(format!("queue '{}' not found", link.object)))?;
    let uch = up.conn.create_channel().await?;
    // The upstream queue, declared as the local one is (a mismatch is the upstream's 406).
    uch.queue_declare(
        uq.as_str().into(),
        QueueDeclareOptions {
            durable: local.durable,
            auto_delete: local.auto_delete,
            ..Default::default()
        },
        local.arguments.clone(),
    )
    .await?;
    uch.basic_qos(link.upstream.prefetch, BasicQosOptions::default())
        .await?;
    let dch = down.conn.create_channel().await?;
    if link.upstream.ack_mode == AckMode::OnConfirm {
        dch.confirm_select(ConfirmSelectOptions::default()).await?;
    }
    status.set_running(&up.redacted, "", Some(down.name.clone()));
    tracing::info!(vhost = %link.vhost, queue = %link.object, upstream = %link.upstream.name, uri = %up.redacted, "federation link running");
    let tag = link.consumer_tag();
    let mut consumer: Option<Consumer> = None;
    let mut cancelling = false;
    let mut fwd = Forwarder::new(uch.clone(), dch, link.upstream.ack_mode, status.clone());
    let mut up_events = connect::events(&up.conn);
    let mut down_events = connect::events(&down.conn);
    let mut health = tokio::time::interval(connect::HEALTH_CHECK);
    let window = usize::from(link.upstream.prefetch);
    let local_q: ShortString = link.object.as_str().into();
    let mut tick = tokio::time::interval(QUEUE_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result: Result<Outcome, Outcome> = async {
        loop {
            tokio::select! {
                biased;
                _ = super::stopped(stop) => {
                    if consumer.is_some() && !cancelling {
                        let _ = uch.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await;
                    }
                    fwd.drain().await?;
                    return Ok(Outcome::Stopped);
                }
                why = connect::failed(&mut up_events) => {
                    return Err(Outcome::Failed(format!("upstream connection: {why}")));
                }
                why = connect::failed(&mut down_events) => {
                    return Err(Outcome::Failed(format!("local connection: {why}")));
                }
                _ = health.tick() => {
                    if let Some(why) = connect::closed(&[("upstream", &up.conn), ("local", &down.conn)]) {
                        return Err(Outcome::Failed(why));
                    }
                }
                r = fwd.settle_next() => { r?; }
                _ = tick.tick() => {
                    if local.is_deleted() {
                        return Err(Outcome::Failed(format!("queue '{}' was deleted", link.object)));
                    }
                    let (ready, _, consumers) = local.counts();
                    let starved = consumers > 0 && ready == 0;
                    if starved && consumer.is_none() {
                        let mut args = FieldTable::default();
                        args.insert("x-priority".into(), AMQPValue::LongInt(-1));
                        consumer = Some(uch.basic_consume(
                            uq.as_str().into(),
                            tag.as_str().into(),
                            BasicConsumeOptions::default(),
                            args,
                        ).await?);
                    } else if !starved && consumer.is_some() && !cancelling {
                        cancelling = true;
                        uch.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await?;
                    }
                }
                d = async { consumer.as_mut()?.next().await }, if consumer.is_some() && fwd.in_flight() < window => {
                    let d = match d {
                        None => {
                            if !cancelling {
                                return Err(Outcome::Failed("the upstream cancelled the link's consumer".into()));
                            }
                            consumer = None;
                            cancelling = false;
                            continue;
                        }
                        Some(Err(e)) => return Err(e.into()),
                        Some(Ok(d)) => d,
                    };
                    fwd.received();
                    let headers = queue_link_headers(
                        d.properties.headers().as_ref(),
                        &up.redacted,
                        &uq,
                        d.redelivered,
                        d.exchange.as_str(),
                        d.routing_key.as_str(),
                    );
                    let props = republish_properties(d.properties, headers, link.upstream.trust_user_id);
                    fwd.forward(d.delivery_tag, "".into(), local_q.clone(), d.data, props).await?;
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

    fn entry(cluster: &str, vhost: &str) -> AMQPValue {
        let mut t = FieldTable::default();
        t.insert("cluster-name".into(), longstr(cluster));
        t.insert("vhost".into(), longstr(vhost));
        AMQPValue::FieldTable(t)
    }

    fn received(entries: Vec<AMQPValue>) -> FieldTable {
        let mut h = FieldTable::default();
        h.insert(RECEIVED_FROM.into(), AMQPValue::FieldArray(entries.into()));
        h
    }

    #[test]
    fn loops_and_hops() {
        assert!(should_forward(None, 1, "a", "/"));
        let h = received(vec![entry("b", "/")]);
        assert!(
            !should_forward(Some(&h), 1, "a", "/"),
            "one hop made, max 1"
        );
        assert!(should_forward(Some(&h), 2, "a", "/"));
        assert!(!should_forward(Some(&h), 5, "b", "/"), "b saw it already");
        assert!(
            should_forward(Some(&h), 5, "b", "other"),
            "another vhost of b did not"
        );
        let mut args = FieldTable::default();
        args.insert(MAX_HOPS_ARG.into(), AMQPValue::LongInt(3));
        args.insert(DOWNSTREAM_NAME_ARG.into(), longstr("b"));
        args.insert(DOWNSTREAM_VHOST_ARG.into(), longstr("/"));
        assert!(!upstream_exchange_forwards(&args, Some(&h)));
        assert!(upstream_exchange_forwards(&args, None));
    }

    #[test]
    fn bindings_propagate_as_far_as_messages() {
        let plain = FieldTable::default();
        let a = upstream_binding_args(&plain, 2, Some("up"), "/", "me", "/", "/:x A").unwrap();
        let Some(AMQPValue::FieldArray(l)) = a.inner().get(BOUND_FROM) else {
            panic!()
        };
        let Some(AMQPValue::FieldTable(t)) = l.as_slice().first() else {
            panic!()
        };
        assert_eq!(t.inner().get("hops").and_then(as_int), Some(2));
        // One link further, hops count down to 1, then stop.
        let b = upstream_binding_args(&a, 5, Some("next"), "/", "up", "/", "/:x A").unwrap();
        let Some(AMQPValue::FieldArray(l)) = b.inner().get(BOUND_FROM) else {
            panic!()
        };
        let Some(AMQPValue::FieldTable(t)) = l.as_slice().first() else {
            panic!()
        };
        assert_eq!(t.inner().get("hops").and_then(as_int), Some(1));
        assert!(upstream_binding_args(&b, 5, Some("far"), "/", "next", "/", "/:x A").is_none());
        // Never back to where it came from.
        assert!(upstream_binding_args(&a, 5, Some("me"), "/", "up", "/", "/:x A").is_none());
    }

    #[test]
    fn names_follow_rabbitmq() {
        assert_eq!(
            upstream_queue_name("x", "/", "c", "/", "x"),
            "federation: x -> c"
        );
        assert_eq!(
            upstream_queue_name("y", "/", "c", "/", "x"),
            "federation: y -> c:x"
        );
        assert_eq!(
            upstream_queue_name("x", "up", "c", "/", "x"),
            "federation: x -> c:/:x"
        );
    }

    #[test]
    fn queue_link_headers_count_visits() {
        let mut h = FieldTable::default();
        h.insert("CC".into(), longstr("k"));
        let once = queue_link_headers(Some(&h), "amqp://u", "q", false, "ex", "rk");
        assert_eq!(
            table_get_str(&once, "x-original-exchange").as_deref(),
            Some("ex")
        );
        assert!(once.inner().contains_key("x-original-cc"));
        assert!(!once.inner().contains_key("CC"));
        let twice = queue_link_headers(Some(&once), "amqp://u", "q", true, "", "q");
        let Some(AMQPValue::FieldArray(l)) = twice.inner().get(RECEIVED_FROM) else {
            panic!()
        };
        assert_eq!(l.as_slice().len(), 1);
        let Some(AMQPValue::FieldTable(t)) = l.as_slice().first() else {
            panic!()
        };
        assert_eq!(t.inner().get("visit-count").and_then(as_int), Some(2));
        assert_eq!(
            table_get_str(&twice, "x-original-routing-key").as_deref(),
            Some("rk")
        );
    }
}
