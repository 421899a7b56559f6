//! The home node's side of a channel on another node: a [`Proxy`] stands in for that
//! channel as the [`DeliveryTarget`] of its consumers here, sends their deliveries over the
//! link and holds each one unacknowledged until the channel's node settles it.
//!
//! Flow control: at most [`WINDOW`] deliveries of one proxy are unanswered (the client's node
//! answers once it wrote the delivery to its client and its outbox is below the high-water
//! mark), so a slow client or link holds back the queue, not memory. A client that does not
//! acknowledge is a consumer with acknowledgements here: the proxy acknowledges each delivery
//! once the client's node answered it, so a delivery lost with the link is requeued.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use super::{Call, ChanKey, Reply, decode_reply, encode};
use crate::broker::Broker;
use crate::message::Message;
use crate::queue::state::{MsgId, Settlement};
use crate::queue::{Consumer, DeliveryTarget, Queue, TargetId, TargetOwner};
use crate::vhost::Vhost;

/// Deliveries of one proxy the client's node has not answered yet.
pub const WINDOW: u32 = 256;

/// A delivery awaiting settlement by the client's node.
struct Held {
    queue: Arc<Queue>,
    consumer: Option<Arc<Consumer>>,
}

#[derive(Default)]
struct State {
    /// Consumer tag → (queue, the client acknowledges nothing).
    consumers: HashMap<String, (Arc<Queue>, bool)>,
    /// (queue, message) → the delivery.
    held: HashMap<(String, MsgId), Held>,
}

pub struct Proxy {
    broker: Weak<Broker>,
    /// The channel's node.
    pub node: String,
    pub key: ChanKey,
    /// The link to `node` this proxy belongs to.
    pub link: Option<u64>,
    pub vhost: Arc<Vhost>,
    user: String,
    /// `node/connection`, as the management API shows the consumer's channel.
    connection: String,
    state: Mutex<State>,
    in_flight: AtomicU32,
    closed: AtomicBool,
    /// A delivery could not be sent: deliver nothing more (closing follows).
    broken: AtomicBool,
    me: Weak<Proxy>,
    /// Where answers are awaited (queues deliver from whatever thread kicked them).
    rt: tokio::runtime::Handle,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("node", &self.node)
            .field("key", &self.key)
            .finish()
    }
}

impl Proxy {
    pub fn new(
        broker: &Arc<Broker>,
        node: &str,
        key: ChanKey,
        vhost: Arc<Vhost>,
        user: String,
        connection: &str,
    ) -> Arc<Self> {
        let link = broker.cluster().and_then(|c| c.link_id(node));
        Arc::new_cyclic(|me| Proxy {
            broker: Arc::downgrade(broker),
            node: node.to_owned(),
            key,
            link,
            vhost,
            user,
            connection: format!("{node}/{connection}"),
            state: Mutex::new(State::default()),
            in_flight: AtomicU32::new(0),
            closed: AtomicBool::new(false),
            broken: AtomicBool::new(false),
            me: me.clone(),
            rt: tokio::runtime::Handle::current(),
        })
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Attaches a consumer of the channel to `queue`.
    pub fn consume(
        self: &Arc<Self>,
        queue: Arc<Queue>,
        tag: String,
        no_ack: bool,
        prefetch: u32,
        exclusive: bool,
        priority: i32,
    ) -> crate::error::Result<()> {
        let stats = Arc::new(crate::metrics::DeliveryStats {
            queue: queue.name.clone(),
            ..Default::default()
        });
        let consumer = Arc::new(Consumer {
            tag: tag.clone(),
            target: self.clone(),
            no_ack: false,
            prefetch: if no_ack { 0 } else { prefetch },
            unacked: AtomicU32::new(0),
            priority,
            exclusive,
            stats,
        });
        {
            let mut s = self.state.lock();
            if s.consumers.contains_key(&tag) {
                return Err(crate::error::AmqpError::not_allowed(format!(
                    "attempt to reuse consumer tag '{tag}'"
                )));
            }
            s.consumers.insert(tag.clone(), (queue.clone(), no_ack));
        }
        if let Err(e) = queue.add_consumer(consumer) {
            self.state.lock().consumers.remove(&tag);
            return Err(e);
        }
        queue.kick();
        Ok(())
    }

    /// Detaches consumer `tag`; what it was delivered stays held until settled.
    pub fn cancel(&self, tag: &str) {
        let entry = self.state.lock().consumers.remove(tag);
        if let Some((q, _)) = entry
            && q.remove_consumer(tag, self.target_id())
        {
            self.vhost.remove_queue(&q.name);
        }
    }

    /// Holds message `id` of `queue`, taken by `basic.get` in acknowledgement mode.
    pub fn hold(&self, queue: &Arc<Queue>, id: MsgId) {
        self.state.lock().held.insert(
            (queue.name.clone(), id),
            Held {
                queue: queue.clone(),
                consumer: None,
            },
        );
    }

    /// Settles deliveries of `queue` (those this proxy no longer holds are skipped).
    pub fn settle(&self, queue: &str, ids: &[MsgId], how: Settlement) {
        let taken: Vec<(MsgId, Held)> = {
            let mut s = self.state.lock();
            ids.iter()
                .filter_map(|id| Some((*id, s.held.remove(&(queue.to_owned(), *id))?)))
                .collect()
        };
        settle_held(taken, how);
    }

    /// The channel closed or its node went: detach every consumer, requeue what is held.
    pub fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let (consumers, held) = {
            let mut s = self.state.lock();
            (
                std::mem::take(&mut s.consumers),
                std::mem::take(&mut s.held),
            )
        };
        for (tag, (q, _)) in consumers {
            if q.remove_consumer(&tag, self.target_id()) {
                self.vhost.remove_queue(&q.name);
            }
        }
        settle_held(
            held.into_iter().map(|((_, id), h)| (id, h)),
            Settlement::Requeue,
        );
    }

    /// The client's node answered a delivery.
    fn answered(&self, queue: &str, id: MsgId, tag: &str, delivered: bool, link_ok: bool) {
        let before = self.in_flight.fetch_sub(1, Ordering::AcqRel);
        if !link_ok {
            self.close();
        } else if !delivered {
            self.settle(queue, &[id], Settlement::Requeue);
        } else {
            let auto_ack = self
                .state
                .lock()
                .consumers
                .get(tag)
                .is_some_and(|(_, no_ack)| *no_ack);
            if auto_ack {
                self.settle(queue, &[id], Settlement::Ack);
            }
        }
        if before >= WINDOW {
            let queues: Vec<Arc<Queue>> = self
                .state
                .lock()
                .consumers
                .values()
                .map(|(q, _)| q.clone())
                .collect();
            for q in queues {
                q.kick();
            }
        }
    }
}

/// Settles held deliveries, one call per queue (ids in order), releasing their consumers'
/// prefetch.
fn settle_held(taken: impl IntoIterator<Item = (MsgId, Held)>, how: Settlement) {
    let mut by_queue: Vec<(Arc<Queue>, Vec<MsgId>)> = Vec::new();
    for (id, h) in taken {
        if let Some(c) = &h.consumer {
            c.unacked.fetch_sub(1, Ordering::Relaxed);
        }
        match by_queue.iter_mut().find(|(q, _)| Arc::ptr_eq(q, &h.queue)) {
            Some((_, v)) => v.push(id),
            None => by_queue.push((h.queue, vec![id])),
        }
    }
    for (q, mut ids) in by_queue {
        ids.sort_unstable();
        q.settle(ids, how);
    }
}

impl DeliveryTarget for Proxy {
    fn target_id(&self) -> TargetId {
        TargetId::of(self)
    }

    fn has_credit(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) < WINDOW
    }

    fn writable(&self, _waker: &Weak<dyn crate::outbox::Wake>) -> bool {
        !self.is_closed() && !self.broken.load(Ordering::Acquire)
    }

    fn deliver(
        &self,
        consumer: &Arc<Consumer>,
        queue: &Arc<Queue>,
        id: MsgId,
        msg: &Message,
        redelivered: bool,
    ) -> bool {
        if self.is_closed() || self.broken.load(Ordering::Acquire) {
            return false;
        }
        let (Some(broker), Some(me)) = (self.broker.upgrade(), self.me.upgrade()) else {
            return false;
        };
        let call = Call::Deliver {
            chan: self.key,
            tag: consumer.tag.clone(),
            queue: queue.name.clone(),
            id,
            redelivered,
            exchange: msg.exchange.clone(),
            routing_key: msg.routing_key.clone(),
            header: msg.header_payload.to_vec(),
            body: msg.body.to_vec(),
        };
        let started = match (broker.cluster(), encode(&call)) {
            (Some(c), Ok(body)) => c.start_broker_call(&self.node, body),
            (None, _) => Err("not clustered".to_owned()),
            (_, Err(e)) => Err(e),
        };
        let answer = match started {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(node = %self.node, "delivery not sent: {e}");
                self.broken.store(true, Ordering::Release);
                // Not under the queue's lock: the queue calls this with it held.
                self.rt.spawn(async move { me.close() });
                return false;
            }
        };
        self.state.lock().held.insert(
            (queue.name.clone(), id),
            Held {
                queue: queue.clone(),
                consumer: Some(consumer.clone()),
            },
        );
        consumer.unacked.fetch_add(1, Ordering::Relaxed);
        consumer.stats.delivered_ack.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        let (queue, tag) = (queue.name.clone(), consumer.tag.clone());
        self.rt.spawn(async move {
            let (delivered, link_ok) = match answer.await.map(|b| decode_reply(&b)) {
                Ok(Ok(Reply::Delivered(d))) => (d, true),
                Ok(_) => (false, true),
                Err(e) => {
                    tracing::debug!(node = %me.node, "delivery lost with the link: {e}");
                    (false, false)
                }
            };
            me.answered(&queue, id, &tag, delivered, link_ok);
        });
        true
    }

    fn cancelled_by_server(&self, consumer_tag: &str) {
        self.state.lock().consumers.remove(consumer_tag);
        let Some(broker) = self.broker.upgrade() else {
            return;
        };
        let call = Call::Cancelled {
            chan: self.key,
            tag: consumer_tag.to_owned(),
        };
        if let (Some(c), Ok(body)) = (broker.cluster(), encode(&call))
            && let Ok(answer) = c.start_broker_call(&self.node, body)
        {
            self.rt.spawn(answer);
        }
    }

    fn owner(&self) -> TargetOwner<'_> {
        TargetOwner {
            connection: self.key.conn,
            channel: self.key.channel,
            connection_name: &self.connection,
            peer: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
            user: &self.user,
        }
    }
}
