//! One AMQP channel: its methods, content assembly, publisher confirms, transactions,
//! consumers and the deliveries awaiting acknowledgement.
//!
//! [`Channel`] is owned by the connection's reader task and handles what the client sends.
//! [`ChannelShared`] is the part queues reach from other tasks: the delivery-tag counter, the
//! unacked map and the connection's outbox. Queues see it only as a
//! [`DeliveryTarget`], which it implements.

mod cluster;
mod remote;
mod replicated;

pub use cluster::Deferred;
pub(crate) use cluster::binding_def;
pub use remote::RemoteDelivery;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use amq_protocol::protocol::{AMQPClass, basic, channel, confirm, exchange, queue, tx};
use amq_protocol::types::FieldTable;
use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;

use crate::auth::{Access, Resource};
use crate::codec::{self, ContentHeader};
use crate::connection::ConnShared;
use crate::error::{AmqpError, Result};
use crate::exchange::{Destination, ExchangeKind};
use crate::message::{Message, rebuild_properties};
use crate::metrics::{ChannelStats, DeliveryStats, PublishStats};
use crate::outbox::Wake;
use crate::queue::state::{MsgId, Settlement};
use crate::queue::{Consumer, DeliveryTarget, Queue, TargetId, TargetOwner, now_ms};
use crate::remote::client::RemoteSide;
use crate::remote::{Answers, RemoteSource};
use crate::vhost::{QueueSpec, REPLY_TO};

/// Where a delivery came from: a queue on this node, or one on another node.
#[derive(Debug, Clone)]
enum Source {
    Local(Arc<Queue>),
    Remote(Arc<RemoteSource>),
    Replicated(Arc<replicated::ReplicatedSource>),
}

impl Source {
    fn name(&self) -> &str {
        match self {
            Source::Local(q) => &q.name,
            Source::Remote(r) => &r.queue,
            Source::Replicated(r) => &r.queue.name,
        }
    }

    fn same(&self, other: &Source) -> bool {
        match (self, other) {
            (Source::Local(a), Source::Local(b)) => Arc::ptr_eq(a, b),
            (Source::Remote(a), Source::Remote(b)) => Arc::ptr_eq(a, b),
            (Source::Replicated(a), Source::Replicated(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    fn settle(&self, ids: Vec<MsgId>, how: Settlement) {
        match self {
            Source::Local(q) => q.settle(ids, how),
            Source::Remote(r) => r.settle(ids, how),
            Source::Replicated(r) => r.settle(ids, how),
        }
    }
}

/// A delivery awaiting acknowledgement.
#[derive(Debug)]
pub struct Unacked {
    source: Source,
    id: MsgId,
    consumer: Option<Arc<Consumer>>,
}

#[derive(Debug, Default)]
pub struct Deliveries {
    next_tag: u64,
    unacked: BTreeMap<u64, Unacked>,
}

/// The part of a channel that queues deliver through.
#[derive(Debug)]
pub struct ChannelShared {
    pub id: u16,
    pub conn: Arc<ConnShared>,
    deliveries: Mutex<Deliveries>,
    unacked_count: AtomicU32,
    /// `basic.qos` with global=true; 0 is unlimited.
    global_prefetch: AtomicU32,
    open: AtomicBool,
    /// Publish and delivery counters (metrics).
    pub stats: ChannelStats,
    /// Consumers and deliveries of queues on other nodes (lock before `deliveries`).
    remote: Mutex<RemoteSide>,
    /// Consumers and gets of replicated queues (lock before `deliveries`).
    replicated: Mutex<replicated::ReplicatedSide>,
}

impl ChannelShared {
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// Deliveries awaiting acknowledgement on this channel.
    pub fn unacked_count(&self) -> u32 {
        self.unacked_count.load(Ordering::Relaxed)
    }

    /// `basic.qos` with global=true; 0 is unlimited.
    pub fn global_prefetch(&self) -> u32 {
        self.global_prefetch.load(Ordering::Relaxed)
    }

    /// A direct reply-to delivery: no queue, no acknowledgement.
    fn deliver_direct(&self, consumer_tag: &str, msg: &Message) {
        let mut d = self.deliveries.lock();
        if !self.open.load(Ordering::Acquire) {
            return;
        }
        d.next_tag += 1;
        let tag = d.next_tag;
        self.write_deliver(consumer_tag, tag, false, msg);
    }

    /// `basic.deliver` and the content frames, into the connection's outbox. Called with the
    /// deliveries lock held, so tags reach the wire in order.
    fn write_deliver(&self, consumer_tag: &str, tag: u64, redelivered: bool, msg: &Message) {
        let mut out = self.conn.outbox.writer();
        codec::encode_deliver(
            &mut out,
            self.id,
            consumer_tag,
            tag,
            redelivered,
            &msg.exchange,
            &msg.routing_key,
        );
        codec::encode_content(
            &mut out,
            self.id,
            &msg.header_payload,
            &msg.body,
            self.conn.frame_max,
        );
    }
}

/// How a queue delivers to a channel on this node.
impl DeliveryTarget for ChannelShared {
    fn target_id(&self) -> TargetId {
        TargetId::of(self)
    }

    fn has_credit(&self) -> bool {
        let limit = self.global_prefetch.load(Ordering::Relaxed);
        limit == 0 || self.unacked_count.load(Ordering::Relaxed) < limit
    }

    fn writable(&self, waker: &std::sync::Weak<dyn Wake>) -> bool {
        self.open.load(Ordering::Acquire) && self.conn.outbox.writable_or_wait(waker)
    }

    /// Writes a `basic.deliver` and records it as unacked. False if the channel has closed.
    fn deliver(
        &self,
        consumer: &Arc<Consumer>,
        queue: &Arc<Queue>,
        id: MsgId,
        msg: &Message,
        redelivered: bool,
    ) -> bool {
        let mut d = self.deliveries.lock();
        if !self.open.load(Ordering::Acquire) {
            return false;
        }
        d.next_tag += 1;
        let tag = d.next_tag;
        if !consumer.no_ack {
            d.unacked.insert(
                tag,
                Unacked {
                    source: Source::Local(queue.clone()),
                    id,
                    consumer: Some(consumer.clone()),
                },
            );
            self.unacked_count.fetch_add(1, Ordering::Relaxed);
            consumer.unacked.fetch_add(1, Ordering::Relaxed);
            consumer.stats.delivered_ack.fetch_add(1, Ordering::Relaxed);
        } else {
            consumer.stats.delivered.fetch_add(1, Ordering::Relaxed);
        }
        if redelivered {
            consumer.stats.redelivered.fetch_add(1, Ordering::Relaxed);
        }
        self.write_deliver(&consumer.tag, tag, redelivered, msg);
        true
    }

    /// The queue was deleted under a consumer: tell the client if it understands `basic.cancel`.
    fn cancelled_by_server(&self, tag: &str) {
        if self.conn.cancel_notify && self.open.load(Ordering::Acquire) {
            let m = AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                consumer_tag: tag.into(),
                nowait: true,
            }));
            codec::encode_method(&mut self.conn.outbox.writer(), self.id, &m);
        }
    }

    fn owner(&self) -> TargetOwner<'_> {
        TargetOwner {
            connection: self.conn.id,
            channel: self.id,
            connection_name: &self.conn.info.name,
            peer: self.conn.info.peer,
            user: &self.conn.user,
        }
    }
}

struct ConsumerEntry {
    queue: Arc<Queue>,
}

/// A publish whose content is being received.
struct PendingPublish {
    exchange: String,
    routing_key: String,
    mandatory: bool,
    header: Option<ContentHeader>,
    body: BytesMut,
}

/// Most publishes and acknowledgements one transaction buffers before `tx.commit`; one more
/// closes the channel (406), rolling the transaction back. RabbitMQ sets no bound; a
/// transaction is held in memory until committed, so Warren does.
pub const TX_MAX_OPS: usize = 65_536;
/// Most message bytes one transaction buffers (or the largest message, if larger).
pub const TX_MAX_BYTES: u64 = 64 * 1024 * 1024;

enum TxOp {
    Publish {
        exchange: String,
        routing_key: String,
        mandatory: bool,
        header: Box<ContentHeader>,
        body: Bytes,
    },
    Settle {
        tag: u64,
        multiple: bool,
        how: Settlement,
    },
}

pub struct Channel {
    pub shared: Arc<ChannelShared>,
    /// Closing: we sent `channel.close` and wait for `close-ok`, ignoring everything else.
    pub closing: bool,
    content: Option<PendingPublish>,
    /// Next publish sequence number in confirm mode.
    confirm_seq: Option<u64>,
    /// Highest sequence number acked but not yet told to the client (sent in batches).
    confirm_pending_ack: Option<u64>,
    /// Confirms that wait for the message log: (publish seq, log seq needed, ack?), in order.
    /// Later confirms queue behind them so a `multiple` ack never covers an unsynced message.
    /// With the answers of other nodes a publish was forwarded to, when it was.
    confirm_waiting: VecDeque<(u64, u64, bool, Option<Arc<Answers>>)>,
    /// The log sequence number the publish being routed must wait for.
    route_wait: u64,
    /// The answers of other nodes the publish being routed (or the transaction being
    /// committed) must wait for.
    route_remote: Option<Arc<Answers>>,
    /// A `tx.commit` whose persistent messages are not on disk yet: `commit-ok` waits for the
    /// message log to sync past this sequence number, and the connection reads nothing more
    /// until then (so no later reply overtakes it).
    commit_waiting: Option<(u64, Option<Arc<Answers>>)>,
    tx: Option<Vec<TxOp>>,
    /// Message bytes buffered by the transaction in progress.
    tx_bytes: u64,
    consumers: HashMap<String, ConsumerEntry>,
    prefetch: u32,
    /// Name of the last queue declared on this channel (used when a method names no queue).
    last_queue: Option<String>,
    /// The answer of a method that waits for the cluster (see [`cluster`]).
    deferred: Option<Deferred>,
    reply_to: Option<(String, String)>,
    /// Exchange last checked for write access (the common case: publish to one exchange).
    write_ok: Option<String>,
    /// A queue this channel published to that asked publishers to pause.
    flow_wait: Option<Arc<Queue>>,
    /// Counters of the exchange last published to (the common case: one exchange).
    pub_stats: Option<Arc<PublishStats>>,
}

fn reply(ctx: &ConnShared, ch: u16, m: AMQPClass) {
    codec::encode_method(&mut ctx.outbox.writer(), ch, &m);
}

impl Channel {
    pub fn new(id: u16, conn: Arc<ConnShared>) -> Self {
        let ch = Self {
            shared: Arc::new(ChannelShared {
                id,
                conn,
                deliveries: Mutex::new(Deliveries::default()),
                unacked_count: AtomicU32::new(0),
                global_prefetch: AtomicU32::new(0),
                open: AtomicBool::new(true),
                stats: ChannelStats::default(),
                remote: Mutex::new(RemoteSide::default()),
                replicated: Mutex::new(replicated::ReplicatedSide::default()),
            }),
            closing: false,
            content: None,
            confirm_seq: None,
            confirm_pending_ack: None,
            confirm_waiting: VecDeque::new(),
            route_wait: 0,
            route_remote: None,
            commit_waiting: None,
            tx: None,
            tx_bytes: 0,
            consumers: HashMap::new(),
            prefetch: 0,
            last_queue: None,
            deferred: None,
            reply_to: None,
            write_ok: None,
            flow_wait: None,
            pub_stats: None,
        };
        ch.ctx().broker.metrics.channel_opened(&ch.shared);
        ch
    }

    fn id(&self) -> u16 {
        self.shared.id
    }

    fn ctx(&self) -> &ConnShared {
        &self.shared.conn
    }

    /// The queue (if any) whose backlog should pause this connection's reading.
    pub fn take_flow_wait(&mut self) -> Option<Arc<Queue>> {
        self.flow_wait.take()
    }

    pub fn expecting_content(&self) -> bool {
        self.content.is_some()
    }

    /// Sends the batched publisher-confirm ack, if any, after releasing the confirms whose
    /// messages the log has now synced. Once the log has failed, what it will never sync is
    /// nacked, and a waiting `tx.commit` fails: the error returned (541) closes the
    /// connection.
    pub fn flush_confirms(&mut self) -> Option<AmqpError> {
        let mut error = None;
        if self.awaiting_sync() {
            error = self.release_waiting();
        }
        if let Some(tag) = self.confirm_pending_ack.take() {
            codec::encode_confirm(&mut self.ctx().outbox.writer(), self.id(), tag, true, true);
        }
        error
    }

    /// The part of [`Self::flush_confirms`] for what waits on the message log.
    fn release_waiting(&mut self) -> Option<AmqpError> {
        let synced = self.ctx().broker.store_synced();
        let failure = self.store_failure();
        let mut error = None;
        if let Some((wait, remote)) = &self.commit_waiting {
            let remote_done = remote.as_ref().is_none_or(|a| a.done());
            let remote_refused = remote.as_ref().is_some_and(|a| a.done() && a.refused());
            if *wait <= synced && remote_done && !remote_refused {
                self.commit_waiting = None;
                self.commit_ok();
            } else if remote_refused {
                self.commit_waiting = None;
                error = Some(
                    AmqpError::internal(
                        "tx.commit failed: a node holding a queue the transaction published to \
                         did not take its messages",
                    )
                    .on_method(90, 20),
                );
            } else if let Some(why) = &failure {
                self.commit_waiting = None;
                error = Some(
                    AmqpError::internal(format!(
                        "tx.commit failed: persistent messages could not be written: {why}"
                    ))
                    .on_method(90, 20),
                );
            }
        }
        while let Some((seq, wait, ok, remote)) = self.confirm_waiting.front() {
            let (seq, wait, ok) = (*seq, *wait, *ok);
            if remote.as_ref().is_some_and(|a| !a.done()) {
                break;
            }
            let refused = remote.as_ref().is_some_and(|a| a.refused());
            if wait > synced {
                if failure.is_none() {
                    break;
                }
                self.confirm_waiting.pop_front();
                self.nack_now(seq);
                continue;
            }
            self.confirm_waiting.pop_front();
            self.confirm_now(seq, ok && !refused);
        }
        error
    }

    /// Why the node's message log stopped writing, if it did.
    fn store_failure(&self) -> Option<String> {
        self.ctx()
            .broker
            .store()
            .and_then(|s| s.failure().map(str::to_owned))
    }

    /// Sends a nack for `seq` now, after the batched ack of what came before it.
    fn nack_now(&mut self, seq: u64) {
        if let Some(tag) = self.confirm_pending_ack.take() {
            codec::encode_confirm(&mut self.ctx().outbox.writer(), self.id(), tag, true, true);
        }
        codec::encode_confirm(
            &mut self.ctx().outbox.writer(),
            self.id(),
            seq,
            false,
            false,
        );
    }

    /// True while some confirm or a `tx.commit` waits for the message log.
    pub fn awaiting_sync(&self) -> bool {
        !self.confirm_waiting.is_empty() || self.commit_waiting.is_some()
    }

    /// True while a `tx.commit` waits for the message log: the connection must not handle
    /// further frames until it is answered.
    pub fn commit_pending(&self) -> bool {
        self.commit_waiting.is_some()
    }

    fn commit_ok(&self) {
        reply(
            self.ctx(),
            self.id(),
            AMQPClass::Tx(tx::AMQPMethod::CommitOk(tx::CommitOk {})),
        );
    }

    fn confirm(&mut self, seq: u64, ok: bool, wait: u64, remote: Option<Arc<Answers>>) {
        if wait > 0 || remote.is_some() || !self.confirm_waiting.is_empty() {
            self.confirm_waiting.push_back((seq, wait, ok, remote));
            return;
        }
        self.confirm_now(seq, ok);
    }

    fn confirm_now(&mut self, seq: u64, ok: bool) {
        if ok {
            self.confirm_pending_ack = Some(seq);
        } else {
            // Not in a transaction (no commit waits), so no error to hand on.
            let _ = self.flush_confirms();
            codec::encode_confirm(
                &mut self.ctx().outbox.writer(),
                self.id(),
                seq,
                false,
                false,
            );
        }
    }

    /// Releases everything the channel holds: consumers are removed, unacked messages
    /// requeued (with redelivered set), the direct reply-to address withdrawn.
    pub fn cleanup(&mut self) {
        let taken = {
            let mut d = self.shared.deliveries.lock();
            self.shared.open.store(false, Ordering::Release);
            std::mem::take(&mut d.unacked)
        };
        self.ctx().broker.metrics.channel_closed(&self.shared);
        let vhost = self.ctx().vhost.clone();
        for (tag, e) in self.consumers.drain() {
            if e.queue.remove_consumer(&tag, self.shared.target_id()) {
                vhost.remove_queue(&e.queue.name);
            }
        }
        if let Some((token, _)) = self.reply_to.take() {
            vhost.unregister_reply_consumer(&token);
        }
        settle_grouped(taken.into_values(), Settlement::Requeue);
        self.close_remote();
        self.close_replicated();
    }

    fn queue_name(&self, name: &str) -> Result<String> {
        if !name.is_empty() {
            return Ok(name.to_owned());
        }
        self.last_queue
            .clone()
            .ok_or_else(|| AmqpError::not_found("no previously declared queue"))
    }

    fn check(&self, resource: Resource, name: &str, access: Access) -> Result<()> {
        let c = self.ctx();
        c.broker
            .access
            .check(&c.user, &c.vhost.name, resource, name, access)
    }

    /// Handles a method frame on this channel.
    pub fn handle_method(&mut self, method: AMQPClass) -> Result<()> {
        let (class_id, method_id) = (method.get_amqp_class_id(), method.get_amqp_method_id());
        self.dispatch(method)
            .map_err(|e| e.on_method(class_id, method_id))
    }

    fn dispatch(&mut self, method: AMQPClass) -> Result<()> {
        let ch = self.id();
        match method {
            AMQPClass::Channel(channel::AMQPMethod::Flow(f)) => {
                if !f.active {
                    return Err(AmqpError::not_implemented("active=false"));
                }
                reply(
                    self.ctx(),
                    ch,
                    AMQPClass::Channel(channel::AMQPMethod::FlowOk(channel::FlowOk {
                        active: true,
                    })),
                );
                Ok(())
            }
            AMQPClass::Channel(channel::AMQPMethod::Open(_)) => {
                Err(AmqpError::channel_error("second 'channel.open' seen"))
            }
            AMQPClass::Exchange(m) => self.exchange_method(m),
            AMQPClass::Queue(m) => self.queue_method(m),
            AMQPClass::Basic(m) => self.basic_method(m),
            AMQPClass::Confirm(confirm::AMQPMethod::Select(s)) => {
                if self.tx.is_some() {
                    return Err(AmqpError::precondition(
                        "cannot switch from tx to confirm mode",
                    ));
                }
                if self.confirm_seq.is_none() {
                    self.confirm_seq = Some(1);
                }
                if !s.nowait {
                    reply(
                        self.ctx(),
                        ch,
                        AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(confirm::SelectOk {})),
                    );
                }
                Ok(())
            }
            AMQPClass::Tx(m) => self.tx_method(m),
            AMQPClass::Access(_) => {
                Err(AmqpError::not_implemented("access class is not supported"))
            }
            other => Err(AmqpError::command_invalid(format!(
                "method {}.{} is not valid from a client on a channel",
                other.get_amqp_class_id(),
                other.get_amqp_method_id()
            ))),
        }
    }

    fn exchange_method(&mut self, m: exchange::AMQPMethod) -> Result<()> {
        let ch = self.id();
        let vhost = self.ctx().vhost.clone();
        match m {
            exchange::AMQPMethod::Declare(d) => {
                let name = d.exchange.as_str();
                if !d.passive {
                    if name.is_empty() {
                        return Err(AmqpError::access_refused(
                            "operation not permitted on the default exchange",
                        ));
                    }
                    if name.starts_with("amq.") && vhost.exchange(name).is_none() {
                        return Err(AmqpError::access_refused(format!(
                            "exchange name '{name}' contains reserved prefix 'amq.*'"
                        )));
                    }
                }
                self.check(Resource::Exchange, name, Access::Configure)?;
                if self.cluster_declare_exchange(&d)? {
                    return Ok(());
                }
                vhost.declare_exchange(
                    name,
                    d.kind.as_str(),
                    d.passive,
                    d.durable,
                    d.auto_delete,
                    d.internal,
                    &d.arguments,
                )?;
                if !d.nowait {
                    reply(
                        self.ctx(),
                        ch,
                        AMQPClass::Exchange(exchange::AMQPMethod::DeclareOk(
                            exchange::DeclareOk {},
                        )),
                    );
                }
            }
            exchange::AMQPMethod::Delete(d) => {
                let name = d.exchange.as_str();
                if name.is_empty() {
                    return Err(AmqpError::access_refused(
                        "operation not permitted on the default exchange",
                    ));
                }
                if name.starts_with("amq.") {
                    return Err(AmqpError::access_refused(format!(
                        "deletion of system exchange '{name}' in vhost '{}' not allowed",
                        vhost.name
                    )));
                }
                self.check(Resource::Exchange, name, Access::Configure)?;
                if self.cluster_delete_exchange(&d)? {
                    return Ok(());
                }
                vhost.delete_exchange(name, d.if_unused)?;
                if !d.nowait {
                    reply(
                        self.ctx(),
                        ch,
                        AMQPClass::Exchange(exchange::AMQPMethod::DeleteOk(exchange::DeleteOk {})),
                    );
                }
            }
            exchange::AMQPMethod::Bind(b) => {
                self.check(Resource::Exchange, b.destination.as_str(), Access::Write)?;
                self.check(Resource::Exchange, b.source.as_str(), Access::Read)?;
                let ok = exchange::AMQPMethod::BindOk(exchange::BindOk {});
                self.change_binding(
                    (40, 30),
                    true,
                    b.source.as_str(),
                    Destination::Exchange(b.destination.to_string()),
                    b.routing_key.as_str(),
                    &b.arguments,
                    (!b.nowait).then_some(AMQPClass::Exchange(ok)),
                )?;
            }
            exchange::AMQPMethod::Unbind(b) => {
                self.check(Resource::Exchange, b.destination.as_str(), Access::Write)?;
                self.check(Resource::Exchange, b.source.as_str(), Access::Read)?;
                let ok = exchange::AMQPMethod::UnbindOk(exchange::UnbindOk {});
                self.change_binding(
                    (40, 40),
                    false,
                    b.source.as_str(),
                    Destination::Exchange(b.destination.to_string()),
                    b.routing_key.as_str(),
                    &b.arguments,
                    (!b.nowait).then_some(AMQPClass::Exchange(ok)),
                )?;
            }
            _ => {
                return Err(AmqpError::command_invalid(
                    "exchange method is not valid from a client",
                ));
            }
        }
        Ok(())
    }

    fn queue_method(&mut self, m: queue::AMQPMethod) -> Result<()> {
        let ch = self.id();
        let vhost = self.ctx().vhost.clone();
        let conn_id = self.ctx().id;
        match m {
            queue::AMQPMethod::Declare(d) => {
                let mut name = d.queue.to_string();
                if name.is_empty() && !d.passive {
                    name = format!("amq.gen-{}", random_token(22));
                } else if name.is_empty() {
                    name = self.queue_name("")?;
                }
                if !d.passive && name.starts_with("amq.") && !d.queue.as_str().is_empty() {
                    return Err(AmqpError::access_refused(format!(
                        "queue name '{name}' contains reserved prefix 'amq.*'"
                    )));
                }
                self.check(Resource::Queue, &name, Access::Configure)?;
                if self.cluster_declare_queue(&d, &name)? {
                    self.last_queue = Some(name);
                    return Ok(());
                }
                let q = if d.passive {
                    let q = vhost.queue_for(&name, conn_id)?;
                    q.touch();
                    q
                } else {
                    let (q, created) = vhost.declare_queue(QueueSpec {
                        name: &name,
                        durable: d.durable,
                        exclusive_owner: d.exclusive.then_some(conn_id),
                        auto_delete: d.auto_delete,
                        arguments: &d.arguments,
                    })?;
                    if created && d.exclusive && self.clustered() {
                        // Made known cluster-wide, so every node routes to it.
                        self.last_queue = Some(name.clone());
                        self.propose_exclusive(&d, &name);
                        return Ok(());
                    }
                    q
                };
                self.last_queue = Some(name.clone());
                if !d.nowait {
                    reply(
                        self.ctx(),
                        ch,
                        AMQPClass::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
                            queue: name.into(),
                            message_count: q.message_count(),
                            consumer_count: q.consumer_count(),
                        })),
                    );
                }
            }
            queue::AMQPMethod::Bind(b) => {
                let name = self.queue_name(b.queue.as_str())?;
                self.check(Resource::Queue, &name, Access::Write)?;
                self.check(Resource::Exchange, b.exchange.as_str(), Access::Read)?;
                // Missing or another connection's exclusive queue (a queue on another node is
                // checked by the metadata group).
                if vhost.queue(&name).is_some() || !self.clustered() {
                    vhost.queue_for(&name, conn_id)?;
                }
                let ok = AMQPClass::Queue(queue::AMQPMethod::BindOk(queue::BindOk {}));
                self.change_binding(
                    (50, 20),
                    true,
                    b.exchange.as_str(),
                    Destination::Queue(name),
                    b.routing_key.as_str(),
                    &b.arguments,
                    (!b.nowait).then_some(ok),
                )?;
            }
            queue::AMQPMethod::Unbind(b) => {
                let name = self.queue_name(b.queue.as_str())?;
                self.check(Resource::Queue, &name, Access::Write)?;
                self.check(Resource::Exchange, b.exchange.as_str(), Access::Read)?;
                if vhost.queue(&name).is_some() || !self.clustered() {
                    vhost.queue_for(&name, conn_id)?;
                }
                let ok = AMQPClass::Queue(queue::AMQPMethod::UnbindOk(queue::UnbindOk {}));
                self.change_binding(
                    (50, 50),
                    false,
                    b.exchange.as_str(),
                    Destination::Queue(name),
                    b.routing_key.as_str(),
                    &b.arguments,
                    Some(ok),
                )?;
            }
            queue::AMQPMethod::Purge(p) => {
                let name = self.queue_name(p.queue.as_str())?;
                self.check(Resource::Queue, &name, Access::Read)?;
                if self.cluster_purge(&name, p.nowait)? {
                    return Ok(());
                }
                let q = vhost.queue_for(&name, conn_id)?;
                let n = q.purge();
                if !p.nowait {
                    reply(
                        self.ctx(),
                        ch,
                        AMQPClass::Queue(queue::AMQPMethod::PurgeOk(queue::PurgeOk {
                            message_count: n,
                        })),
                    );
                }
            }
            queue::AMQPMethod::Delete(d) => {
                let name = self.queue_name(d.queue.as_str())?;
                self.check(Resource::Queue, &name, Access::Configure)?;
                if let Some(q) = vhost.queue(&name) {
                    vhost.check_exclusive(&q, Some(conn_id))?;
                }
                if self.cluster_delete_queue(&d, &name)? {
                    return Ok(());
                }
                let n = vhost.delete_queue(&name, conn_id, d.if_unused, d.if_empty)?;
                if !d.nowait {
                    reply(
                        self.ctx(),
                        ch,
                        AMQPClass::Queue(queue::AMQPMethod::DeleteOk(queue::DeleteOk {
                            message_count: n,
                        })),
                    );
                }
            }
            _ => {
                return Err(AmqpError::command_invalid(
                    "queue method is not valid from a client",
                ));
            }
        }
        Ok(())
    }

    fn basic_method(&mut self, m: basic::AMQPMethod) -> Result<()> {
        let ch = self.id();
        match m {
            basic::AMQPMethod::Publish(p) => {
                if p.immediate {
                    return Err(AmqpError::not_implemented("immediate=true"));
                }
                self.content = Some(PendingPublish {
                    exchange: p.exchange.to_string(),
                    routing_key: p.routing_key.to_string(),
                    mandatory: p.mandatory,
                    header: None,
                    body: BytesMut::new(),
                });
                Ok(())
            }
            basic::AMQPMethod::Qos(q) => {
                if q.global {
                    self.shared
                        .global_prefetch
                        .store(q.prefetch_count as u32, Ordering::Relaxed);
                } else {
                    self.prefetch = q.prefetch_count as u32;
                }
                reply(
                    self.ctx(),
                    ch,
                    AMQPClass::Basic(basic::AMQPMethod::QosOk(basic::QosOk {})),
                );
                for e in self.consumers.values() {
                    e.queue.kick();
                }
                Ok(())
            }
            basic::AMQPMethod::Consume(c) => self.consume(c),
            basic::AMQPMethod::Cancel(c) => {
                let tag = c.consumer_tag.to_string();
                self.cancel_remote(&tag);
                self.cancel_replicated(&tag);
                if let Some(e) = self.consumers.remove(&tag)
                    && e.queue.remove_consumer(&tag, self.shared.target_id())
                {
                    self.ctx().vhost.remove_queue(&e.queue.name);
                }
                if self.reply_to.as_ref().is_some_and(|(_, t)| *t == tag)
                    && let Some((token, _)) = self.reply_to.take()
                {
                    self.ctx().vhost.unregister_reply_consumer(&token);
                }
                if !c.nowait {
                    reply(
                        self.ctx(),
                        ch,
                        AMQPClass::Basic(basic::AMQPMethod::CancelOk(basic::CancelOk {
                            consumer_tag: tag.into(),
                        })),
                    );
                }
                Ok(())
            }
            basic::AMQPMethod::Get(g) => self.get(g),
            basic::AMQPMethod::Ack(a) => {
                self.settle_or_buffer(a.delivery_tag, a.multiple, Settlement::Ack)
            }
            basic::AMQPMethod::Nack(n) => self.settle_or_buffer(
                n.delivery_tag,
                n.multiple,
                if n.requeue {
                    Settlement::Requeue
                } else {
                    Settlement::Discard
                },
            ),
            basic::AMQPMethod::Reject(r) => self.settle_or_buffer(
                r.delivery_tag,
                false,
                if r.requeue {
                    Settlement::Requeue
                } else {
                    Settlement::Discard
                },
            ),
            basic::AMQPMethod::Recover(_) | basic::AMQPMethod::RecoverAsync(_) => {
                let taken = std::mem::take(&mut self.shared.deliveries.lock().unacked);
                self.release_credit(taken.values());
                settle_grouped(taken.into_values(), Settlement::Requeue);
                if matches!(m, basic::AMQPMethod::Recover(_)) {
                    reply(
                        self.ctx(),
                        ch,
                        AMQPClass::Basic(basic::AMQPMethod::RecoverOk(basic::RecoverOk {})),
                    );
                }
                Ok(())
            }
            _ => Err(AmqpError::command_invalid(
                "basic method is not valid from a client",
            )),
        }
    }

    fn consume(&mut self, c: basic::Consume) -> Result<()> {
        let ch = self.id();
        let vhost = self.ctx().vhost.clone();
        let mut tag = c.consumer_tag.to_string();
        if tag.is_empty() {
            tag = format!("amq.ctag-{}", random_token(22));
        }
        if self
            .consumers
            .get(&tag)
            .is_some_and(|e| !e.queue.is_retired())
            || self.reply_to.as_ref().is_some_and(|(_, t)| *t == tag)
            || self.shared.remote.lock().consumers.contains_key(&tag)
            || self.shared.replicated.lock().has_consumer(&tag)
        {
            return Err(AmqpError::not_allowed(format!(
                "attempt to reuse consumer tag '{tag}'"
            )));
        }
        let max = self.ctx().broker.config.consumer_max_per_channel as usize;
        if self.consumers.len() >= max {
            self.consumers.retain(|_, e| !e.queue.is_retired());
            if self.consumers.len() >= max {
                return Err(AmqpError::not_allowed(format!(
                    "reached maximum ({max}) of consumers per channel"
                )));
            }
        }
        if c.queue.as_str() == REPLY_TO {
            if !c.no_ack {
                return Err(AmqpError::precondition("reply consumer cannot acknowledge"));
            }
            if self.reply_to.is_some() {
                return Err(AmqpError::precondition("reply consumer already set"));
            }
            let token = random_token(24);
            vhost.register_reply_consumer(&token, &self.shared, &tag);
            self.reply_to = Some((token, tag.clone()));
            if !c.nowait {
                reply(
                    self.ctx(),
                    ch,
                    AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                        consumer_tag: tag.into(),
                    })),
                );
            }
            return Ok(());
        }
        let name = self.queue_name(c.queue.as_str())?;
        self.check(Resource::Queue, &name, Access::Read)?;
        let priority = match c.arguments.inner().get("x-priority") {
            None => 0,
            Some(v) => crate::queue::args::as_int(v)
                .and_then(|p| i32::try_from(p).ok())
                .ok_or_else(|| AmqpError::precondition("invalid x-priority consumer argument"))?,
        };
        if let Some(q) = vhost.replicated_queue(&name) {
            self.consume_replicated(&c, tag, q);
            return Ok(());
        }
        if vhost.queue(&name).is_none()
            && let Some(r) = vhost.remote_queue(&name)
        {
            self.consume_remote(&c, tag, r, priority);
            return Ok(());
        }
        let q = vhost.queue_for(&name, self.ctx().id)?;
        let consumer = Arc::new(Consumer {
            tag: tag.clone(),
            target: self.shared.clone(),
            no_ack: c.no_ack,
            prefetch: self.prefetch,
            unacked: AtomicU32::new(0),
            priority,
            exclusive: c.exclusive,
            stats: self.delivery_stats(&q.name),
        });
        q.add_consumer(consumer)?;
        self.consumers
            .insert(tag.clone(), ConsumerEntry { queue: q.clone() });
        if !c.nowait {
            reply(
                self.ctx(),
                ch,
                AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                    consumer_tag: tag.into(),
                })),
            );
        }
        q.kick();
        Ok(())
    }

    fn get(&mut self, g: basic::Get) -> Result<()> {
        let ch = self.id();
        let name = self.queue_name(g.queue.as_str())?;
        self.check(Resource::Queue, &name, Access::Read)?;
        if let Some(q) = self.ctx().vhost.replicated_queue(&name) {
            self.get_replicated(&g, q);
            return Ok(());
        }
        if self.ctx().vhost.queue(&name).is_none()
            && let Some(r) = self.ctx().vhost.remote_queue(&name)
        {
            self.get_remote(&g, r);
            return Ok(());
        }
        let q = self.ctx().vhost.queue_for(&name, self.ctx().id)?;
        let stats = self.delivery_stats(&q.name);
        let Some(r) = q.get(g.no_ack) else {
            stats.get_empty.fetch_add(1, Ordering::Relaxed);
            reply(
                self.ctx(),
                ch,
                AMQPClass::Basic(basic::AMQPMethod::GetEmpty(basic::GetEmpty {})),
            );
            return Ok(());
        };
        if g.no_ack { &stats.get } else { &stats.get_ack }.fetch_add(1, Ordering::Relaxed);
        if r.redelivered {
            stats.redelivered.fetch_add(1, Ordering::Relaxed);
        }
        let mut d = self.shared.deliveries.lock();
        d.next_tag += 1;
        let tag = d.next_tag;
        if !g.no_ack {
            d.unacked.insert(
                tag,
                Unacked {
                    source: Source::Local(q.clone()),
                    id: r.id,
                    consumer: None,
                },
            );
            self.shared.unacked_count.fetch_add(1, Ordering::Relaxed);
        }
        let mut out = self.ctx().outbox.writer();
        codec::encode_get_ok(
            &mut out,
            ch,
            tag,
            r.redelivered,
            &r.msg.exchange,
            &r.msg.routing_key,
            r.remaining,
        );
        codec::encode_content(
            &mut out,
            ch,
            &r.msg.header_payload,
            &r.msg.body,
            self.ctx().frame_max,
        );
        Ok(())
    }

    fn settle_or_buffer(&mut self, tag: u64, multiple: bool, how: Settlement) -> Result<()> {
        if let Some(ops) = &mut self.tx {
            // Validate now so the client learns of a bad tag at once, as RabbitMQ does.
            let d = self.shared.deliveries.lock();
            if tag != 0 && !d.unacked.contains_key(&tag) {
                return Err(AmqpError::precondition(format!(
                    "unknown delivery tag {tag}"
                )));
            }
            drop(d);
            if ops.len() >= TX_MAX_OPS {
                return Err(tx_too_large(ops.len()));
            }
            ops.push(TxOp::Settle { tag, multiple, how });
            return Ok(());
        }
        self.settle(tag, multiple, how)
    }

    fn settle(&mut self, tag: u64, multiple: bool, how: Settlement) -> Result<()> {
        let taken: Vec<Unacked> = {
            let mut d = self.shared.deliveries.lock();
            if multiple {
                if tag == 0 {
                    std::mem::take(&mut d.unacked).into_values().collect()
                } else {
                    if !d.unacked.contains_key(&tag) {
                        return Err(AmqpError::precondition(format!(
                            "unknown delivery tag {tag}"
                        )));
                    }
                    let rest = d.unacked.split_off(&(tag + 1));
                    std::mem::replace(&mut d.unacked, rest)
                        .into_values()
                        .collect()
                }
            } else {
                match d.unacked.remove(&tag) {
                    Some(u) => vec![u],
                    None => {
                        return Err(AmqpError::precondition(format!(
                            "unknown delivery tag {tag}"
                        )));
                    }
                }
            }
        };
        self.release_credit(taken.iter());
        if how == Settlement::Ack {
            for u in &taken {
                match &u.consumer {
                    Some(c) => c.stats.acked.fetch_add(1, Ordering::Relaxed),
                    None => self
                        .delivery_stats(u.source.name())
                        .acked
                        .fetch_add(1, Ordering::Relaxed),
                };
            }
        }
        let global = self.shared.global_prefetch.load(Ordering::Relaxed) > 0;
        settle_grouped(taken.into_iter(), how);
        if global {
            // Channel-wide credit freed by one queue's ack may let another queue deliver.
            for e in self.consumers.values() {
                e.queue.kick();
            }
        }
        Ok(())
    }

    fn release_credit<'a>(&self, taken: impl Iterator<Item = &'a Unacked>) {
        let mut n = 0;
        for u in taken {
            n += 1;
            if let Some(c) = &u.consumer {
                c.unacked.fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.shared.unacked_count.fetch_sub(n, Ordering::Relaxed);
    }

    fn tx_method(&mut self, m: tx::AMQPMethod) -> Result<()> {
        let ch = self.id();
        match m {
            tx::AMQPMethod::Select(_) => {
                if self.confirm_seq.is_some() {
                    return Err(AmqpError::precondition(
                        "cannot switch from confirm to tx mode",
                    ));
                }
                if self.tx.is_none() {
                    self.tx = Some(Vec::new());
                }
                reply(
                    self.ctx(),
                    ch,
                    AMQPClass::Tx(tx::AMQPMethod::SelectOk(tx::SelectOk {})),
                );
            }
            tx::AMQPMethod::Commit(_) => {
                let Some(ops) = self.tx.replace(Vec::new()) else {
                    return Err(AmqpError::precondition("channel is not transactional"));
                };
                self.tx_bytes = 0;
                for op in ops {
                    match op {
                        TxOp::Publish {
                            exchange,
                            routing_key,
                            mandatory,
                            header,
                            body,
                        } => {
                            self.route_and_enqueue(
                                &exchange,
                                &routing_key,
                                mandatory,
                                *header,
                                body,
                            )?;
                        }
                        TxOp::Settle { tag, multiple, how } => self.settle(tag, multiple, how)?,
                    }
                }
                // As with confirms: persistent messages of durable queues must be on disk
                // before the client hears the transaction is committed.
                let wait = std::mem::take(&mut self.route_wait);
                let remote = self.route_remote.take();
                if wait > self.ctx().broker.store_synced() || remote.is_some() {
                    if let Some(why) = self.store_failure() {
                        return Err(AmqpError::internal(format!(
                            "tx.commit failed: persistent messages could not be written: {why}"
                        )));
                    }
                    self.commit_waiting = Some((wait, remote));
                    // Answers that came in already are acted on now.
                    if let Some(e) = self.release_waiting() {
                        return Err(e);
                    }
                } else {
                    self.commit_ok();
                }
            }
            tx::AMQPMethod::Rollback(_) => {
                if self.tx.replace(Vec::new()).is_none() {
                    return Err(AmqpError::precondition("channel is not transactional"));
                }
                self.tx_bytes = 0;
                reply(
                    self.ctx(),
                    ch,
                    AMQPClass::Tx(tx::AMQPMethod::RollbackOk(tx::RollbackOk {})),
                );
            }
            _ => {
                return Err(AmqpError::command_invalid(
                    "tx method is not valid from a client",
                ));
            }
        }
        Ok(())
    }

    /// Content header frame of the publish in progress.
    pub fn handle_header(&mut self, header: ContentHeader) -> Result<()> {
        let max = self.ctx().broker.config.max_message_size;
        let Some(p) = &mut self.content else {
            return Err(AmqpError::unexpected_frame(
                "content header without basic.publish",
            ));
        };
        if p.header.is_some() {
            return Err(AmqpError::unexpected_frame(
                "second content header for one message",
            ));
        }
        if header.class_id != 60 {
            return Err(AmqpError::unexpected_frame(format!(
                "content header for class {}, expected 60",
                header.class_id
            )));
        }
        if header.body_size > max {
            self.content = None;
            return Err(AmqpError::precondition(format!(
                "message size {} is larger than configured max size {max}",
                header.body_size
            ))
            .on_method(60, 40));
        }
        let empty = header.body_size == 0;
        p.body.reserve(header.body_size as usize);
        p.header = Some(header);
        if empty {
            self.complete_publish()?;
        }
        Ok(())
    }

    /// Content body frame of the publish in progress.
    pub fn handle_body(&mut self, payload: Bytes) -> Result<()> {
        let Some(p) = &mut self.content else {
            return Err(AmqpError::unexpected_frame(
                "content body without basic.publish",
            ));
        };
        let Some(h) = &p.header else {
            return Err(AmqpError::unexpected_frame(
                "content body before content header",
            ));
        };
        let expected = h.body_size;
        if p.body.len() as u64 + payload.len() as u64 > expected {
            return Err(AmqpError::frame_error(format!(
                "content body larger than the {expected} bytes announced in its header"
            )));
        }
        p.body.extend_from_slice(&payload);
        if p.body.len() as u64 == expected {
            self.complete_publish()?;
        }
        Ok(())
    }

    fn complete_publish(&mut self) -> Result<()> {
        let Some(mut p) = self.content.take() else {
            return Ok(());
        };
        let Some(header) = p.header.take() else {
            return Ok(());
        };
        let body = p.body.split().freeze();
        let seq = self.confirm_seq;
        if let Some(s) = seq {
            self.confirm_seq = Some(s + 1);
        }
        let result = if let Some(ops) = &self.tx {
            let max_bytes = TX_MAX_BYTES.max(self.ctx().broker.config.max_message_size);
            if ops.len() >= TX_MAX_OPS {
                Err(tx_too_large(ops.len()))
            } else if self.tx_bytes + body.len() as u64 > max_bytes {
                Err(AmqpError::precondition(format!(
                    "transaction too large: its uncommitted messages would exceed {max_bytes} bytes; commit or roll back sooner"
                )))
            } else {
                Ok(())
            }
            .and_then(|_| self.validate_publish(&p.exchange, &p.routing_key, &header))
                .map(|_| {
                    self.tx_bytes += body.len() as u64;
                    if let Some(ops) = &mut self.tx {
                        ops.push(TxOp::Publish {
                            exchange: p.exchange,
                            routing_key: p.routing_key,
                            mandatory: p.mandatory,
                            header: Box::new(header),
                            body,
                        });
                    }
                    true
                })
        } else {
            self.route_and_enqueue(&p.exchange, &p.routing_key, p.mandatory, header, body)
        };
        let accepted = result.map_err(|e| e.on_method(60, 40))?;
        if let Some(seq) = seq {
            let wait = std::mem::take(&mut self.route_wait);
            let remote = self.route_remote.take();
            self.confirm(seq, accepted, wait, remote);
            // `pub_stats` is this publish's exchange: routing set it.
            if accepted && let Some(s) = &self.pub_stats {
                s.confirmed.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Checks a publish is allowed: exchange exists, is not internal, write access, user-id.
    fn validate_publish(
        &mut self,
        exchange: &str,
        routing_key: &str,
        header: &ContentHeader,
    ) -> Result<Option<ExchangeKind>> {
        let ctx = self.shared.conn.clone();
        let kind = if exchange.is_empty() {
            None
        } else {
            let ex = ctx.vhost.exchange(exchange).ok_or_else(|| {
                AmqpError::not_found(format!(
                    "no exchange '{exchange}' in vhost '{}'",
                    ctx.vhost.name
                ))
            })?;
            if ex.internal {
                return Err(AmqpError::access_refused(format!(
                    "cannot publish to internal exchange '{exchange}' in vhost '{}'",
                    ctx.vhost.name
                )));
            }
            Some(ex.kind)
        };
        if self.write_ok.as_deref() != Some(exchange) {
            self.check(Resource::Exchange, exchange, Access::Write)?;
            self.write_ok = Some(exchange.to_owned());
        }
        if kind == Some(ExchangeKind::Topic) {
            ctx.broker.access.check_topic(
                &ctx.user,
                &ctx.vhost.name,
                exchange,
                routing_key,
                Access::Write,
            )?;
        }
        if let Some(exp) = header.properties.expiration() {
            validate_expiration(exp.as_str())?;
        }
        if let Some(uid) = header.properties.user_id()
            && uid.as_str() != ctx.user
            && !ctx.broker.access.may_impersonate(&ctx.user)
        {
            return Err(AmqpError::precondition(format!(
                "user_id property set to '{}' but authenticated user was '{}'",
                uid.as_str(),
                ctx.user
            )));
        }
        Ok(kind)
    }

    /// Routes a complete message and enqueues it. Returns false if a queue refused it.
    fn route_and_enqueue(
        &mut self,
        exchange: &str,
        routing_key: &str,
        mandatory: bool,
        header: ContentHeader,
        body: Bytes,
    ) -> Result<bool> {
        self.validate_publish(exchange, routing_key, &header)?;
        let stats = self.publish_stats(exchange);
        stats.published.fetch_add(1, Ordering::Relaxed);
        let ctx = self.shared.conn.clone();
        let mut props = header.properties;
        let mut props_changed = false;

        // Sender-selected distribution: CC and BCC add routing keys; BCC is not delivered.
        let mut keys: Vec<String> = vec![routing_key.to_owned()];
        if let Some(h) = props.headers() {
            let extra = Message::sender_selected_keys(Some(h));
            if !extra.is_empty() {
                keys.extend(extra);
                if h.contains_key("BCC") {
                    let mut t = FieldTable::default();
                    for (k, v) in h.inner() {
                        if k.as_str() != "BCC" {
                            t.insert(k.clone(), v.clone());
                        }
                    }
                    props = rebuild_properties(&props, Some(t), true);
                    props_changed = true;
                }
            }
        }

        // Direct reply-to: the reply address names this channel's reply consumer.
        if props
            .reply_to()
            .as_ref()
            .is_some_and(|r| r.as_str() == REPLY_TO)
        {
            let Some((token, _)) = &self.reply_to else {
                return Err(AmqpError::precondition(
                    "fast reply consumer does not exist",
                ));
            };
            props = props.with_reply_to(format!("{REPLY_TO}.{token}").into());
            props_changed = true;
        }

        let msg = if props_changed {
            Message::new(exchange.to_owned(), routing_key.to_owned(), props, body)
        } else {
            Message::with_header_payload(
                exchange.to_owned(),
                routing_key.to_owned(),
                props,
                header.raw,
                body,
            )
        };

        if exchange.is_empty()
            && let Some(token) = routing_key
                .strip_prefix(REPLY_TO)
                .and_then(|t| t.strip_prefix('.'))
        {
            if let Some((target, tag)) = ctx.vhost.reply_consumer(token) {
                target.deliver_direct(&tag, &msg);
                return Ok(true);
            }
            if mandatory {
                stats.returned.fetch_add(1, Ordering::Relaxed);
                self.send_return(&msg);
            } else {
                stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
            return Ok(true);
        }

        let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let queues = ctx.vhost.route(exchange, &key_refs, msg.headers())?;
        if queues.is_empty() {
            if mandatory {
                stats.returned.fetch_add(1, Ordering::Relaxed);
                self.send_return(&msg);
            } else {
                stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
            return Ok(true);
        }
        let routed = queues.len() as u64;
        stats.routed.fetch_add(routed, Ordering::Relaxed);
        let msg = Arc::new(msg);
        let now = now_ms();
        let mut accepted = true;
        let mut store_failed = false;
        if !queues.remote.is_empty() || !queues.replicated.is_empty() {
            // Queues on other nodes: the message is forwarded to each home node; a confirm
            // (or the transaction's commit-ok) waits for their answers. A replicated queue's
            // answer is the commit of its enqueue.
            let waits = self.confirm_seq.is_some() || self.tx.is_some();
            let answers = match (&self.route_remote, waits) {
                (Some(a), true) => Some(a.clone()),
                (None, true) => Some(Answers::new(ctx.wake.clone())),
                (_, false) => None,
            };
            let mut remote = queues.remote;
            remote.sort();
            for (node, group) in crate::vhost::group_by_node(remote) {
                ctx.broker
                    .forward_publish(&node, &ctx.vhost.name, group, &msg, answers.as_ref());
            }
            for q in &queues.replicated {
                accepted &= q.publish(&msg, answers.as_ref());
            }
            self.route_remote = answers;
        }
        for q in queues.local {
            let published = q.publish(msg.clone(), now);
            accepted &= published.accepted;
            store_failed |= published.store_failed;
            self.route_wait = self.route_wait.max(published.wait_for);
            if q.flow_pressure() {
                self.flow_wait = Some(q);
            }
        }
        // A confirm-mode publisher hears a nack; any other must not believe its persistent
        // message is kept, and has no other way to hear it.
        if store_failed && self.confirm_seq.is_none() {
            let why = self.store_failure().unwrap_or_default();
            return Err(AmqpError::internal(format!(
                "persistent message refused: the message store cannot write: {why}"
            )));
        }
        Ok(accepted)
    }

    /// The counters for publishes to `exchange` (kept at hand for the next publish).
    fn publish_stats(&mut self, exchange: &str) -> Arc<PublishStats> {
        if let Some(s) = &self.pub_stats
            && s.exchange == exchange
        {
            return s.clone();
        }
        let vhost = &self.shared.conn.vhost;
        let s = self
            .shared
            .stats
            .publish(exchange, |e| vhost.exchange(e).is_some());
        self.pub_stats = Some(s.clone());
        s
    }

    /// This channel's delivery counters for a queue.
    fn delivery_stats(&self, queue: &str) -> Arc<DeliveryStats> {
        let vhost = &self.shared.conn.vhost;
        self.shared
            .stats
            .delivery(queue, |q| vhost.queue(q).is_some())
    }

    fn send_return(&self, msg: &Message) {
        let mut out = self.ctx().outbox.writer();
        codec::encode_return(
            &mut out,
            self.id(),
            312,
            "NO_ROUTE",
            &msg.exchange,
            &msg.routing_key,
        );
        codec::encode_content(
            &mut out,
            self.id(),
            &msg.header_payload,
            &msg.body,
            self.ctx().frame_max,
        );
    }
}

/// The `expiration` property must be a non-negative integer (milliseconds).
fn tx_too_large(ops: usize) -> AmqpError {
    AmqpError::precondition(format!(
        "transaction too large: {ops} uncommitted publishes and acknowledgements is the most one transaction may hold; commit or roll back sooner"
    ))
}

fn validate_expiration(e: &str) -> Result<()> {
    if e.parse::<u64>().is_ok() {
        return Ok(());
    }
    let why = match e.parse::<i64>() {
        Ok(n) => format!("{{value_negative,{n}}}"),
        Err(_) => "no_integer".to_owned(),
    };
    Err(AmqpError::precondition(format!(
        "invalid expiration '{e}': {why}"
    )))
}

/// Settles unacked deliveries, one call per queue.
fn settle_grouped(taken: impl Iterator<Item = Unacked>, how: Settlement) {
    let mut by_queue: Vec<(Source, Vec<MsgId>)> = Vec::new();
    for u in taken {
        match by_queue.iter_mut().find(|(q, _)| q.same(&u.source)) {
            Some((_, ids)) => ids.push(u.id),
            None => by_queue.push((u.source, vec![u.id])),
        }
    }
    for (q, ids) in by_queue {
        q.settle(ids, how);
    }
}

/// A random token of URL-safe base64 characters (server-named queues, consumer tags).
pub fn random_token(len: usize) -> String {
    use rand::Rng;
    const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut rng = rand::rng();
    (0..len)
        .map(|_| CHARS[rng.random_range(0..CHARS.len())] as char)
        .collect()
}
