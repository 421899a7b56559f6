//! Queues on other nodes: the calls a node makes to a queue's home node over the inter-node
//! link, and how the home node serves them.
//!
//! Routing is local (every node has every exchange and binding), so a publish is routed
//! where it arrives; the queues it reaches on other nodes get the message forwarded, one
//! call per home node, in the order the node forwarded them (a link serves its broker calls
//! in order, [`crate::cluster::BrokerCalls`]). The home node enqueues before anything else
//! it reads from that link and answers once the message is as safe as a local publish
//! would be (on disk for a persistent message in a durable queue), which is when a
//! publisher confirm for it may go out.
//!
//! Consuming works the other way round: the client's node asks the home node to attach a
//! consumer for one of its channels ([`Call::Consume`]); the home node attaches a proxy
//! ([`proxy::Proxy`], a [`crate::queue::DeliveryTarget`]) that sends each delivery back
//! ([`Call::Deliver`]) and keeps it unacknowledged until the client's node settles it
//! ([`Call::Settle`]). So acks, requeues, prefetch and dead lettering happen in the queue,
//! where they would for a local consumer; the client's node ([`client`]) only renumbers
//! delivery tags. A proxy is tied to the link it was created over: when that link goes (the
//! client's node died, restarted or was cut off) the home node requeues what the proxy held,
//! and the client's node cancels the consumers it had there.

pub(crate) mod client;
mod proxy;

pub use client::{RemoteConsumer, RemoteSource};
pub use proxy::Proxy;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::broker::Broker;
use crate::channel::ChannelShared;
use crate::cluster::link::Answer;
use crate::error::{AmqpError, code};
use crate::message::Message;
use crate::queue::state::Settlement;

/// A call to a queue's home node.
#[derive(Debug, Serialize, Deserialize)]
pub enum Call {
    /// Enqueue a message routed on the calling node to these queues of `vhost`.
    Publish {
        vhost: String,
        queues: Vec<String>,
        exchange: String,
        routing_key: String,
        /// The content header frame's payload, as the publisher sent it.
        #[serde(with = "crate::cluster::wire::as_bytes")]
        header: Vec<u8>,
        #[serde(with = "crate::cluster::wire::as_bytes")]
        body: Vec<u8>,
    },
    /// Messages ready and consumers of a queue.
    Counts { vhost: String, queue: String },
    /// Purge a queue; answered with how many messages went.
    Purge { vhost: String, queue: String },
    /// Attach a consumer for channel `chan` of the calling node to a queue here.
    Consume {
        chan: ChanKey,
        vhost: String,
        queue: String,
        tag: String,
        /// The client does not acknowledge (the calling node settles once it delivered).
        no_ack: bool,
        prefetch: u32,
        exclusive: bool,
        priority: i32,
        user: String,
        connection: String,
    },
    /// Detach a consumer (its unacknowledged messages stay so until settled).
    Cancel { chan: ChanKey, tag: String },
    /// `basic.get` for channel `chan`; answered [`Reply::Got`].
    Get {
        chan: ChanKey,
        vhost: String,
        queue: String,
        no_ack: bool,
        user: String,
        connection: String,
    },
    /// Settle messages delivered to channel `chan` (`how`: see [`settlement_code`]).
    Settle {
        chan: ChanKey,
        queue: String,
        ids: Vec<u64>,
        how: u8,
    },
    /// Channel `chan` closed: detach its consumers, requeue what it holds.
    Close { chan: ChanKey },
    /// From a home node: a delivery to consumer `tag` of channel `chan` on the called node.
    /// Answered [`Reply::Delivered`] once written to the client (or buffered within bounds).
    Deliver {
        chan: ChanKey,
        tag: String,
        queue: String,
        id: u64,
        redelivered: bool,
        exchange: String,
        routing_key: String,
        #[serde(with = "crate::cluster::wire::as_bytes")]
        header: Vec<u8>,
        #[serde(with = "crate::cluster::wire::as_bytes")]
        body: Vec<u8>,
    },
    /// From a home node: the queue of consumer `tag` of channel `chan` went.
    Cancelled { chan: ChanKey, tag: String },
    /// The management API's view of the queues here in `vhosts` (or only `queue`, with its
    /// consumers); answered [`Reply::Json`], an array.
    QueueInfo {
        vhosts: Vec<String>,
        queue: Option<String>,
    },
    /// The management API's `POST /get` on a queue here; answered [`Reply::Json`].
    Peek {
        vhost: String,
        queue: String,
        count: u64,
        how: u8,
        base64: bool,
        truncate: Option<u64>,
    },
}

/// A channel of one node, as other nodes name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChanKey {
    /// The connection's id on its node.
    pub conn: u64,
    pub channel: u16,
}

/// A message taken by `basic.get` on a home node.
#[derive(Debug, Serialize, Deserialize)]
pub struct Got {
    pub id: u64,
    pub redelivered: bool,
    pub remaining: u32,
    pub exchange: String,
    pub routing_key: String,
    #[serde(with = "crate::cluster::wire::as_bytes")]
    pub header: Vec<u8>,
    #[serde(with = "crate::cluster::wire::as_bytes")]
    pub body: Vec<u8>,
}

pub(crate) fn settlement_code(how: Settlement) -> u8 {
    match how {
        Settlement::Ack => 0,
        Settlement::Requeue => 1,
        Settlement::Discard => 2,
    }
}

fn settlement(code: u8) -> Settlement {
    match code {
        0 => Settlement::Ack,
        1 => Settlement::Requeue,
        _ => Settlement::Discard,
    }
}

/// Consumers and deliveries that cross nodes, on both sides.
#[derive(Default)]
pub struct Registry {
    /// Client side: this node's channels with consumers or deliveries from other nodes.
    channels: parking_lot::Mutex<HashMap<ChanKey, Weak<ChannelShared>>>,
    /// Home side: proxies of other nodes' channels, by (node, channel).
    proxies: parking_lot::Mutex<HashMap<(String, ChanKey), Arc<Proxy>>>,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    /// Every queue took the message (false: one refused it, a publisher hears a nack).
    Published(bool),
    Counts {
        messages: u32,
        consumers: u32,
    },
    Purged(u32),
    /// A call that needs no data back was done.
    Done,
    /// `basic.get`: a message, or none (empty).
    Got(Option<Got>),
    /// The delivery reached the client's channel (false: no such consumer any more).
    Delivered(bool),
    /// A JSON document (management API answers).
    Json(String),
    /// An AMQP error the caller hands to its client.
    Error {
        code: u16,
        text: String,
    },
}

/// How a policy's `ha-mode` (with `ha-params`) places a mirrored queue's replicas.
#[derive(Debug, Clone, PartialEq)]
pub enum HaMode {
    All,
    Exactly(usize),
    Nodes(Vec<String>),
}

impl HaMode {
    /// The `ha-mode` of the policy that applies to queue `name` of `v`, if any.
    pub fn of(v: &crate::vhost::Vhost, name: &str) -> Option<HaMode> {
        let def = v.queue_policy_definition(name)?;
        match def.get("ha-mode")?.as_str()? {
            "all" => Some(HaMode::All),
            "exactly" => Some(HaMode::Exactly(
                def.get("ha-params").and_then(|p| p.as_u64()).unwrap_or(1) as usize,
            )),
            "nodes" => Some(HaMode::Nodes(
                def.get("ha-params")
                    .and_then(|p| p.as_array())
                    .map(|a| {
                        a.iter()
                            .filter_map(|n| n.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default(),
            )),
            _ => None,
        }
    }
}

/// The answers a publish waits for from other nodes before its confirm may go out.
pub struct Answers {
    pending: AtomicUsize,
    refused: AtomicBool,
    /// Woken when the last answer arrives (the connection waiting to send confirms).
    wake: Arc<Notify>,
}

impl Answers {
    pub fn new(wake: Arc<Notify>) -> Arc<Self> {
        Arc::new(Self {
            pending: AtomicUsize::new(0),
            refused: AtomicBool::new(false),
            wake,
        })
    }

    /// True once every node answered.
    pub fn done(&self) -> bool {
        self.pending.load(Ordering::Acquire) == 0
    }

    /// True if some node refused, or did not answer before its link closed.
    pub fn refused(&self) -> bool {
        self.refused.load(Ordering::Acquire)
    }

    /// One more answer to wait for.
    pub fn expect(&self) {
        self.pending.fetch_add(1, Ordering::AcqRel);
    }

    /// An answer came: `ok`, or a refusal.
    pub fn answered(&self, ok: bool) {
        if !ok {
            self.refused.store(true, Ordering::Release);
        }
        if self.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.wake.notify_one();
        }
    }
}

fn encode(call: &Call) -> Result<Vec<u8>, String> {
    postcard::to_allocvec(call).map_err(|e| format!("unencodable call: {e}"))
}

fn decode_reply(body: &[u8]) -> Result<Reply, String> {
    postcard::from_bytes(body).map_err(|e| format!("undecodable answer: {e}"))
}

/// A failed call as the client's error: the home node down or unreachable is 404-like
/// (`NOT_FOUND`, as RabbitMQ answers for a queue whose home node is down).
fn unreachable(queue: &str, vhost: &str, why: String) -> AmqpError {
    AmqpError::not_found(format!(
        "queue '{queue}' in vhost '{vhost}' is on a node that cannot be reached: {why}"
    ))
}

impl Broker {
    /// Whether a new queue declared on this node is replicated, and its replicas: a
    /// `x-queue-type: quorum` queue, a durable, not exclusive, not auto-delete one declared
    /// without `x-queue-type` in a vhost whose default queue type is quorum (as RabbitMQ
    /// does; exclusive and transient queues stay classic), or a durable, not auto-delete
    /// classic one (declared `x-queue-type: classic` or without a type) matched by a policy's
    /// `ha-mode` (RabbitMQ's mirrored classic queues). The
    /// replicas are this node first, then the other running voters of the metadata group
    /// by name, as many as `x-quorum-initial-group-size` or `ha-params` asks (default: all).
    pub fn replicas_for(
        &self,
        v: &crate::vhost::Vhost,
        name: &str,
        durable: bool,
        auto_delete: bool,
        exclusive: bool,
        arguments: &amq_protocol::types::FieldTable,
    ) -> Result<Option<crate::replicated::Replicas>, AmqpError> {
        let vhost = v.name.as_str();
        let mut queue_type = crate::queue::args::parse(arguments, name, vhost)?.queue_type;
        if queue_type.is_none() && durable && !auto_delete && !exclusive {
            // A default of "classic" leaves the queue to the policies, as no default does.
            queue_type = self
                .vhost_metadata(vhost)
                .default_queue_type
                .filter(|t| t == "quorum");
        }
        // Classic queues (declared so, or by default) are mirrored by a policy's `ha-mode`, as
        // in RabbitMQ; quorum queues ignore `ha-*`.
        let ha = (queue_type.as_deref().is_none_or(|t| t == "classic") && durable && !auto_delete)
            .then(|| HaMode::of(v, name))
            .flatten();
        if queue_type.as_deref() != Some("quorum") && ha.is_none() {
            return Ok(None);
        }
        let broker = self;
        let invalid = |what: &str| {
            AmqpError::precondition(format!(
                "invalid property '{what}' for queue '{name}' in vhost '{vhost}'"
            ))
        };
        if !durable {
            return Err(invalid("non-durable"));
        }
        if auto_delete {
            return Err(invalid("auto-delete"));
        }
        if exclusive {
            return Err(invalid("exclusive-owner"));
        }
        let int_arg = |k: &str| -> Result<Option<u32>, AmqpError> {
            match arguments.inner().get(k) {
                None => Ok(None),
                Some(v) => crate::queue::args::as_int(v)
                    .and_then(|n| u32::try_from(n).ok())
                    .map(Some)
                    .ok_or_else(|| {
                        AmqpError::precondition(format!(
                            "invalid arg '{k}' for queue '{name}' in vhost '{vhost}': not a \
                         non-negative integer"
                        ))
                    }),
            }
        };
        let size = int_arg("x-quorum-initial-group-size")?;
        let delivery_limit = int_arg("x-delivery-limit")?;
        let cluster = broker
            .cluster()
            .ok_or_else(|| AmqpError::internal("not clustered"))?;
        let me = broker.node_name();
        let mut voters = cluster.metadata_voters();
        voters.retain(|(_, m)| m.name == me || cluster.is_running(&m.name));
        voters.sort_by(|a, b| (a.1.name != me, &a.1.name).cmp(&(b.1.name != me, &b.1.name)));
        let by_policy = ha.is_some();
        match ha {
            // A policy's ha-mode (RabbitMQ's mirrored classic queues) places the replicas.
            Some(HaMode::Exactly(n)) => voters.truncate(n.max(1)),
            Some(HaMode::Nodes(names)) => {
                voters.retain(|(_, m)| names.contains(&m.name));
                if voters.first().is_none_or(|(_, m)| m.name != me) {
                    // Declared on a node not listed: the first listed running node leads.
                    if voters.is_empty() {
                        return Err(AmqpError::precondition(format!(
                            "queue '{name}' in vhost '{vhost}': none of the ha-params nodes \
                             ({}) is running",
                            names.join(", ")
                        )));
                    }
                }
            }
            Some(HaMode::All) => {}
            None => {
                if let Some(n) = size.filter(|n| *n > 0) {
                    voters.truncate(n as usize);
                }
            }
        }
        if voters.is_empty() || (!by_policy && voters[0].1.name != me) {
            return Err(AmqpError::internal(
                "this node is not a voter of the cluster's metadata group yet",
            ));
        }
        Ok(Some(crate::replicated::Replicas {
            group: format!("q{:016x}", rand::random::<u64>()),
            members: voters
                .into_iter()
                .map(|(id, m)| (id, m.name, m.addr))
                .collect(),
            config: crate::replicated::state::Config { delivery_limit },
        }))
    }

    /// The node a new queue is to live on, as `locator` says: this one, the running member
    /// holding the fewest queues (this one on a tie), or any running member.
    pub fn place_queue(&self, locator: crate::queue::args::Locator) -> String {
        use crate::queue::args::Locator;
        let me = self.node_name();
        let Some(cluster) = self.cluster() else {
            return me;
        };
        let mut running = cluster.running_peers();
        running.sort();
        match locator {
            Locator::ClientLocal => me,
            Locator::Random => {
                running.push(me);
                let i = rand::random_range(0..running.len());
                running.swap_remove(i)
            }
            Locator::Balanced => {
                let mut count: HashMap<String, usize> = HashMap::new();
                count.insert(me.clone(), 0);
                for n in &running {
                    count.insert(n.clone(), 0);
                }
                for name in self.vhost_names() {
                    let Some(v) = self.vhost(&name) else { continue };
                    *count.entry(me.clone()).or_default() += v.queues().len();
                    for r in v.remote_queues() {
                        if let Some(c) = count.get_mut(&r.node) {
                            *c += 1;
                        }
                    }
                }
                let mine = count[&me];
                running
                    .into_iter()
                    .map(|n| (count[&n], n))
                    .filter(|(c, _)| *c < mine)
                    .min()
                    .map(|(_, n)| n)
                    .unwrap_or(me)
            }
        }
    }

    /// Calls `node` and waits up to `timeout` for its answer (an AMQP error it answers is
    /// passed on as its text).
    pub async fn node_call(
        &self,
        node: &str,
        call: &Call,
        timeout: std::time::Duration,
    ) -> Result<Reply, String> {
        let cluster = self.cluster().ok_or("this node is not in a cluster")?;
        let answer = cluster.start_broker_call(node, encode(call)?)?;
        let body = tokio::time::timeout(timeout, answer)
            .await
            .map_err(|_| format!("{node} did not answer in {} s", timeout.as_secs()))??;
        decode_reply(&body)
    }

    /// Forwards `msg` to `queues` of `vhost` on `node`. With `answers`, the answer is counted
    /// there (a confirm waits for it); a node that cannot be reached counts as a refusal.
    pub fn forward_publish(
        &self,
        node: &str,
        vhost: &str,
        queues: Vec<String>,
        msg: &Message,
        answers: Option<&Arc<Answers>>,
    ) {
        let call = Call::Publish {
            vhost: vhost.to_owned(),
            queues,
            exchange: msg.exchange.clone(),
            routing_key: msg.routing_key.clone(),
            header: msg.header_payload.to_vec(),
            body: msg.body.to_vec(),
        };
        if let Some(a) = answers {
            a.pending.fetch_add(1, Ordering::AcqRel);
        }
        let started = match (self.cluster(), encode(&call)) {
            (Some(c), Ok(body)) => c.start_broker_call(node, body),
            (None, _) => Err("this node is not in a cluster".to_owned()),
            (_, Err(e)) => Err(e),
        };
        let answers = answers.cloned();
        match started {
            Ok(answer) => {
                tokio::spawn(async move {
                    let ok = match answer.await.map(|b| decode_reply(&b)) {
                        Ok(Ok(Reply::Published(ok))) => ok,
                        Ok(Ok(other)) => {
                            tracing::warn!("forwarded publish answered {other:?}");
                            false
                        }
                        Ok(Err(e)) | Err(e) => {
                            tracing::debug!("forwarded publish failed: {e}");
                            false
                        }
                    };
                    if let Some(a) = answers {
                        a.answered(ok);
                    }
                });
            }
            Err(e) => {
                tracing::debug!(node, "publish not forwarded: {e}");
                if let Some(a) = answers {
                    a.answered(false);
                }
            }
        }
    }

    /// Calls `queue`'s home `node` and waits for its answer.
    pub async fn queue_call(self: &Arc<Self>, node: &str, call: Call) -> Result<Reply, AmqpError> {
        let (vhost, queue) = match &call {
            Call::Counts { vhost, queue }
            | Call::Purge { vhost, queue }
            | Call::Consume { vhost, queue, .. }
            | Call::Peek { vhost, queue, .. }
            | Call::Get { vhost, queue, .. } => (vhost.clone(), queue.clone()),
            Call::Publish { vhost, .. } => (vhost.clone(), String::new()),
            _ => (String::new(), String::new()),
        };
        let cluster = self
            .cluster()
            .ok_or_else(|| AmqpError::internal("this node is not in a cluster"))?;
        let answer = cluster
            .start_broker_call(node, encode(&call).map_err(AmqpError::internal)?)
            .map_err(|e| unreachable(&queue, &vhost, e))?;
        let body = tokio::time::timeout(std::time::Duration::from_secs(10), answer)
            .await
            .map_err(|_| unreachable(&queue, &vhost, format!("{node} did not answer in 10 s")))?
            .map_err(|e| unreachable(&queue, &vhost, e))?;
        match decode_reply(&body).map_err(AmqpError::internal)? {
            Reply::Error { code, text } => Err(AmqpError::new(code, text)),
            reply => Ok(reply),
        }
    }

    /// Serves one call from another node (on the link's reader: see [`BrokerSide`]).
    fn serve_call(self: &Arc<Self>, from: &str, call: Call) -> Answer {
        let reply = |r: Reply| -> Answer {
            let body = postcard::to_allocvec(&r).unwrap_or_default();
            Box::pin(async move { body })
        };
        let error = |e: AmqpError| {
            reply(Reply::Error {
                code: e.code,
                text: e.text,
            })
        };
        let no_vhost = |v: &str| AmqpError::not_found(format!("no vhost '{v}' on this node"));
        match call {
            Call::Publish {
                vhost,
                queues,
                exchange,
                routing_key,
                header,
                body,
            } => {
                let Some(v) = self.vhost(&vhost) else {
                    return error(no_vhost(&vhost));
                };
                let header = Bytes::from(header);
                let properties = match crate::codec::decode_header(&header) {
                    Ok(h) => h.properties,
                    Err(e) => {
                        tracing::warn!(
                            node = from,
                            "forwarded publish with a bad header: {}",
                            e.text
                        );
                        return reply(Reply::Published(false));
                    }
                };
                let msg = Arc::new(Message::with_header_payload(
                    exchange,
                    routing_key,
                    properties,
                    header,
                    Bytes::from(body),
                ));
                let now = crate::queue::now_ms();
                let (mut ok, mut wait) = (true, 0);
                for q in queues.iter().filter_map(|n| v.queue(n)) {
                    let p = q.publish(msg.clone(), now);
                    ok &= p.accepted;
                    wait = wait.max(p.wait_for);
                }
                let store = self.store().cloned();
                Box::pin(async move {
                    if let Some(store) = store
                        && wait > 0
                    {
                        let mut synced = store.synced();
                        while *synced.borrow_and_update() < wait && store.failure().is_none() {
                            if synced.changed().await.is_err() {
                                break;
                            }
                        }
                        ok &= *synced.borrow() >= wait;
                    }
                    postcard::to_allocvec(&Reply::Published(ok)).unwrap_or_default()
                })
            }
            Call::Counts { vhost, queue } => {
                match self.vhost(&vhost).and_then(|v| v.queue(&queue)) {
                    Some(q) => reply(Reply::Counts {
                        messages: q.message_count(),
                        consumers: q.consumer_count(),
                    }),
                    None => error(AmqpError::not_found(format!(
                        "no queue '{queue}' in vhost '{vhost}'"
                    ))),
                }
            }
            Call::Purge { vhost, queue } => {
                match self.vhost(&vhost).and_then(|v| v.queue(&queue)) {
                    Some(q) => reply(Reply::Purged(q.purge())),
                    None => error(AmqpError::not_found(format!(
                        "no queue '{queue}' in vhost '{vhost}'"
                    ))),
                }
            }
            Call::Consume {
                chan,
                vhost,
                queue,
                tag,
                no_ack,
                prefetch,
                exclusive,
                priority,
                user,
                connection,
            } => {
                let (v, q) = match self.for_other_node(&vhost, &queue) {
                    Ok(found) => found,
                    Err(e) => return error(e),
                };
                let proxy = self.proxy(from, chan, &v, user, &connection);
                match proxy.consume(q, tag, no_ack, prefetch, exclusive, priority) {
                    Ok(()) => reply(Reply::Done),
                    Err(e) => error(e),
                }
            }
            Call::Get {
                chan,
                vhost,
                queue,
                no_ack,
                user,
                connection,
            } => {
                let (v, q) = match self.for_other_node(&vhost, &queue) {
                    Ok(found) => found,
                    Err(e) => return error(e),
                };
                let Some(r) = q.get(no_ack) else {
                    return reply(Reply::Got(None));
                };
                if !no_ack {
                    self.proxy(from, chan, &v, user, &connection).hold(&q, r.id);
                }
                reply(Reply::Got(Some(Got {
                    id: r.id,
                    redelivered: r.redelivered,
                    remaining: r.remaining,
                    exchange: r.msg.exchange.clone(),
                    routing_key: r.msg.routing_key.clone(),
                    header: r.msg.header_payload.to_vec(),
                    body: r.msg.body.to_vec(),
                })))
            }
            Call::Settle {
                chan,
                queue,
                ids,
                how,
            } => {
                let proxy = self
                    .remote
                    .proxies
                    .lock()
                    .get(&(from.to_owned(), chan))
                    .cloned();
                if let Some(p) = proxy {
                    p.settle(&queue, &ids, settlement(how));
                }
                reply(Reply::Done)
            }
            Call::Cancel { chan, tag } => {
                let proxy = self
                    .remote
                    .proxies
                    .lock()
                    .get(&(from.to_owned(), chan))
                    .cloned();
                if let Some(p) = proxy {
                    p.cancel(&tag);
                }
                reply(Reply::Done)
            }
            Call::Close { chan } => {
                let proxy = self.remote.proxies.lock().remove(&(from.to_owned(), chan));
                if let Some(p) = proxy {
                    p.close();
                }
                reply(Reply::Done)
            }
            Call::Deliver {
                chan,
                tag,
                queue: _,
                id,
                redelivered,
                exchange,
                routing_key,
                header,
                body,
            } => self.serve_deliver(
                chan,
                &tag,
                id,
                redelivered,
                exchange,
                routing_key,
                header,
                body,
            ),
            Call::Cancelled { chan, tag } => self.serve_cancelled(chan, &tag),
            Call::QueueInfo { vhosts, queue } => {
                let mut out = Vec::new();
                for v in vhosts.iter().filter_map(|n| self.vhost(n)) {
                    match &queue {
                        Some(name) => {
                            out.extend(
                                v.queue(name).map(|q| {
                                    crate::management::queues::queue_details(self, &v, &q)
                                }),
                            );
                            out.extend(
                                v.replicated_queue(name)
                                    .filter(|q| q.is_member())
                                    .map(|q| crate::management::queues::replicated_json(&v, &q)),
                            );
                        }
                        None => out.extend(
                            v.queues()
                                .iter()
                                .map(|q| crate::management::queues::queue_json(self, &v, q)),
                        ),
                    }
                }
                reply(Reply::Json(serde_json::Value::Array(out).to_string()))
            }
            Call::Peek {
                vhost,
                queue,
                count,
                how,
                base64,
                truncate,
            } => match self.vhost(&vhost).and_then(|v| v.queue(&queue)) {
                Some(q) => {
                    let got = crate::management::queues::take_messages(
                        &q,
                        count,
                        settlement(how),
                        base64,
                        truncate,
                    );
                    reply(Reply::Json(serde_json::Value::Array(got).to_string()))
                }
                None => error(AmqpError::not_found(format!(
                    "no queue '{queue}' in vhost '{vhost}'"
                ))),
            },
        }
    }

    /// A queue here, looked up for a channel of another node: 404 if missing, 405 if it is
    /// exclusive (to a connection here).
    fn for_other_node(
        &self,
        vhost: &str,
        queue: &str,
    ) -> Result<(Arc<crate::vhost::Vhost>, Arc<crate::queue::Queue>), AmqpError> {
        let v = self
            .vhost(vhost)
            .ok_or_else(|| AmqpError::not_found(format!("no vhost '{vhost}' on this node")))?;
        let q = v.queue_for(queue, u64::MAX)?;
        Ok((v, q))
    }

    /// The proxy of channel `chan` of node `from` (a new one if it has none, or its old one
    /// closed).
    fn proxy(
        self: &Arc<Self>,
        from: &str,
        chan: ChanKey,
        vhost: &Arc<crate::vhost::Vhost>,
        user: String,
        connection: &str,
    ) -> Arc<Proxy> {
        let mut proxies = self.remote.proxies.lock();
        let key = (from.to_owned(), chan);
        if let Some(p) = proxies.get(&key)
            && !p.is_closed()
        {
            return p.clone();
        }
        let p = Proxy::new(self, from, chan, vhost.clone(), user, connection);
        proxies.insert(key, p.clone());
        p
    }
}

/// The broker as the server of other nodes' calls.
pub struct BrokerSide(pub std::sync::Weak<Broker>);

impl crate::cluster::BrokerCalls for BrokerSide {
    fn serve(&self, from: &str, call: Vec<u8>) -> Answer {
        let fail = |text: String| -> Answer {
            let body = postcard::to_allocvec(&Reply::Error {
                code: code::INTERNAL_ERROR,
                text,
            })
            .unwrap_or_default();
            Box::pin(async move { body })
        };
        let Some(broker) = self.0.upgrade() else {
            return fail("node is stopping".into());
        };
        match postcard::from_bytes::<Call>(&call) {
            Ok(call) => broker.serve_call(from, call),
            Err(e) => fail(format!("undecodable call: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::vhost::{QueueSpec, RemoteQueue};
    use amq_protocol::protocol::basic::AMQPProperties;
    use amq_protocol::types::FieldTable;
    use std::time::Duration;

    /// A node clustered over loopback, its data in a directory of its own.
    async fn node(name: &str, dir: &std::path::Path, peers: Vec<String>) -> Arc<Broker> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = Config {
            node_name: name.to_owned(),
            data_dir: dir.join(name),
            cluster_listen: Some(addr),
            cluster_advertise: Some(addr.to_string()),
            cluster_peers: peers,
            ..Config::default()
        };
        std::fs::create_dir_all(&config.data_dir).unwrap();
        let b = Broker::new(config);
        b.start_cluster(listener, b"s3cret".to_vec()).await.unwrap();
        b
    }

    async fn until(what: &str, mut ok: impl FnMut() -> bool) {
        for _ in 0..200 {
            if ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("timed out waiting for {what}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_message_routed_on_one_node_reaches_a_queue_on_another_in_order() {
        let dir = std::env::temp_dir().join(format!("warren-remote-{}", rand::random::<u64>()));
        let a = node("warren@a", &dir, Vec::new()).await;
        let a_addr = a.config.cluster_advertise_addr().unwrap();
        let b = node("warren@b", &dir, vec![a_addr]).await;
        until("the link both ways", || {
            a.cluster().unwrap().is_running("warren@b")
                && b.cluster().unwrap().is_running("warren@a")
        })
        .await;

        // "q" lives on b; a knows it as a remote queue bound to amq.fanout.
        let args = FieldTable::default();
        let vb = b.vhost("/").unwrap();
        vb.declare_queue(QueueSpec {
            name: "q",
            durable: false,
            exclusive_owner: None,
            auto_delete: false,
            arguments: &args,
        })
        .unwrap();
        let va = a.vhost("/").unwrap();
        assert!(va.add_remote_queue(RemoteQueue {
            name: "q".into(),
            node: "warren@b".into(),
            durable: false,
            auto_delete: false,
            exclusive: false,
            arguments: args.clone(),
        }));
        va.bind(
            "amq.fanout",
            crate::exchange::Destination::Queue("q".into()),
            "",
            &args,
        )
        .unwrap();

        // Routed on a, forwarded to b, confirmed once b answered; order kept.
        let wake = Arc::new(Notify::new());
        let answers = Answers::new(wake.clone());
        for i in 0..100u32 {
            let routed = va.route("amq.fanout", &[""], None).unwrap();
            assert!(routed.local.is_empty());
            assert_eq!(routed.remote, vec![("warren@b".to_owned(), "q".to_owned())]);
            let msg = Message::new(
                "amq.fanout".into(),
                String::new(),
                AMQPProperties::default(),
                Bytes::from(i.to_be_bytes().to_vec()),
            );
            a.forward_publish("warren@b", "/", vec!["q".into()], &msg, Some(&answers));
        }
        tokio::time::timeout(Duration::from_secs(10), async {
            while !answers.done() {
                wake.notified().await;
            }
        })
        .await
        .expect("b answered every forwarded publish");
        assert!(!answers.refused());
        let q = vb.queue("q").unwrap();
        assert_eq!(q.message_count(), 100);
        for i in 0..100u32 {
            let got = q.get(true).expect("a message");
            assert_eq!(got.msg.body.as_ref(), &i.to_be_bytes());
        }

        // Counts and purge as calls to the home node; an unknown queue is 404.
        let msg = Message::new(
            "".into(),
            "q".into(),
            AMQPProperties::default(),
            Bytes::new(),
        );
        a.forward_publish("warren@b", "/", vec!["q".into()], &msg, None);
        until("the fire-and-forget publish", || q.message_count() == 1).await;
        let counts = a
            .queue_call(
                "warren@b",
                Call::Counts {
                    vhost: "/".into(),
                    queue: "q".into(),
                },
            )
            .await
            .unwrap();
        assert!(matches!(
            counts,
            Reply::Counts {
                messages: 1,
                consumers: 0
            }
        ));
        let purged = a
            .queue_call(
                "warren@b",
                Call::Purge {
                    vhost: "/".into(),
                    queue: "q".into(),
                },
            )
            .await
            .unwrap();
        assert!(matches!(purged, Reply::Purged(1)));
        let e = a
            .queue_call(
                "warren@b",
                Call::Counts {
                    vhost: "/".into(),
                    queue: "nope".into(),
                },
            )
            .await
            .unwrap_err();
        assert_eq!(e.code, code::NOT_FOUND);

        // A node nobody can reach: the publish counts as refused (a confirm would be a nack),
        // a call is 404 naming why.
        let lost = Answers::new(wake.clone());
        a.forward_publish("warren@c", "/", vec!["q".into()], &msg, Some(&lost));
        assert!(lost.done() && lost.refused());
        let e = a
            .queue_call(
                "warren@c",
                Call::Counts {
                    vhost: "/".into(),
                    queue: "q".into(),
                },
            )
            .await
            .unwrap_err();
        assert_eq!(e.code, code::NOT_FOUND);
        assert!(e.text.contains("cannot be reached"), "{}", e.text);

        // Forgetting the remote queue takes its bindings with it.
        assert!(va.remove_remote_queue("q"));
        assert!(va.route("amq.fanout", &[""], None).unwrap().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
