//! The seam between a queue and whoever receives its deliveries.
//!
//! A queue delivers to a [`DeliveryTarget`], never to a channel by name: today the only
//! implementation is a local channel (`channel::ChannelShared`), which writes `basic.deliver`
//! into its connection's outbox and tracks the delivery as unacked. A replicated or remote
//! queue will deliver through the same trait (a proxy forwarding to the consumer's node), and
//! the queue's code does not change. The trait holds exactly what the queue's delivery loop
//! asks of a consumer's channel, so `queue/` imports nothing above it.
//!
//! Lock order: the queue calls these with its own lock held; an implementation may take its
//! own locks (the channel's deliveries, then the connection's outbox) but must never call back
//! into a queue.

use std::net::SocketAddr;
use std::sync::{Arc, Weak};

use super::state::MsgId;
use super::{Consumer, Queue};
use crate::message::Message;
use crate::outbox::Wake;

/// What a queue delivers to: a consumer's channel.
pub trait DeliveryTarget: Send + Sync + std::fmt::Debug {
    /// Identity, for finding a consumer again (`basic.cancel`, channel close) and for counting
    /// a channel's consumers.
    fn target_id(&self) -> TargetId;

    /// Channel-wide credit (`basic.qos` with global=true) allows one more unacked delivery.
    /// The consumer's own prefetch is checked by the queue.
    fn has_credit(&self) -> bool;

    /// May the queue deliver now? False if the target closed, or if its output is full — then
    /// `waker` is registered and woken when it drains.
    fn writable(&self, waker: &Weak<dyn Wake>) -> bool;

    /// Delivers message `id` to `consumer` and, unless the consumer is no-ack, records it as
    /// awaiting acknowledgement (which is settled back through `queue`). False if the target
    /// has closed: the queue then puts the message back.
    fn deliver(
        &self,
        consumer: &Arc<Consumer>,
        queue: &Arc<Queue>,
        id: MsgId,
        msg: &Message,
        redelivered: bool,
    ) -> bool;

    /// The queue was deleted under `consumer_tag`: tell the client (server-sent `basic.cancel`)
    /// if it understands that.
    fn cancelled_by_server(&self, consumer_tag: &str);

    /// Who the target is, for metrics and the management API.
    fn owner(&self) -> TargetOwner<'_>;
}

/// Identity of a [`DeliveryTarget`]: unique among live targets (a local channel uses its
/// address, which its consumers keep alive).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TargetId(usize);

impl TargetId {
    /// The identity of a target that lives in this process.
    pub fn of<T>(target: &T) -> Self {
        TargetId(target as *const T as usize)
    }
}

/// The channel behind a [`DeliveryTarget`], as metrics and the management API show it.
#[derive(Debug, Clone, Copy)]
pub struct TargetOwner<'a> {
    /// Connection id (node-local).
    pub connection: u64,
    /// Channel number on that connection.
    pub channel: u16,
    /// RabbitMQ's connection name (`peer -> local`).
    pub connection_name: &'a str,
    pub peer: SocketAddr,
    pub user: &'a str,
}
