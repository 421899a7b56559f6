//! Consuming from, getting from and publishing to replicated queues
//! ([`crate::replicated`]). Deliveries are decided by the queue's committed commands and
//! handed to this channel on this node; this channel gives them its own tags, keeps them as
//! unacked with the queue as their [`Source`], and settles them by proposing commands.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use amq_protocol::protocol::{AMQPClass, basic, queue};

use super::{Channel, ChannelShared, Deliveries, Source, Unacked};
use crate::codec;
use crate::error::AmqpError;
use crate::message::Message;
use crate::queue::DeliveryTarget;
use crate::queue::state::{MsgId, Settlement};
use crate::replicated::state::{ConsumerKey, GET_TAG};
use crate::replicated::{LocalConsumer, ReplicatedQueue};

/// A replicated queue as a source of this channel's deliveries (one per consumer, and one
/// for the channel's `basic.get`s of a queue).
#[derive(Debug)]
pub struct ReplicatedSource {
    pub queue: Arc<ReplicatedQueue>,
    pub key: ConsumerKey,
}

impl ReplicatedSource {
    pub fn settle(&self, ids: Vec<MsgId>, how: Settlement) {
        self.queue.settle(&self.key, ids, how);
    }
}

/// A consumer of a replicated queue on this channel.
#[derive(Debug)]
pub struct ReplicatedConsumer {
    source: Arc<ReplicatedSource>,
    no_ack: bool,
    /// False until `basic.consume-ok` went out; deliveries arriving before wait in `pending`.
    ready: bool,
    pending: Vec<(MsgId, bool, Arc<Message>)>,
}

/// This channel's consumers (by tag) and get sources (by queue) of replicated queues.
#[derive(Debug, Default)]
pub struct ReplicatedSide {
    consumers: HashMap<String, ReplicatedConsumer>,
    gets: HashMap<String, Arc<ReplicatedSource>>,
}

impl ReplicatedSide {
    pub fn has_consumer(&self, tag: &str) -> bool {
        self.consumers.contains_key(tag)
    }
}

impl ChannelShared {
    /// Writes a delivery of `source` with this channel's next tag (recorded as unacked, or
    /// settled at once for a client that does not acknowledge).
    fn write_replicated(
        &self,
        consumer_tag: &str,
        source: &Arc<ReplicatedSource>,
        no_ack: bool,
        id: MsgId,
        redelivered: bool,
        msg: &Message,
    ) {
        let mut d = self.deliveries.lock();
        if !self.is_open() {
            return;
        }
        let tag = self.replicated_tag(&mut d, source, no_ack, id);
        if no_ack {
            source.settle(vec![id], Settlement::Ack);
        }
        self.write_deliver(consumer_tag, tag, redelivered, msg);
    }

    /// This channel's next delivery tag for message `id` of `source`, recorded as unacked
    /// unless the client does not acknowledge.
    fn replicated_tag(
        &self,
        d: &mut Deliveries,
        source: &Arc<ReplicatedSource>,
        no_ack: bool,
        id: MsgId,
    ) -> u64 {
        d.next_tag += 1;
        if !no_ack {
            d.unacked.insert(
                d.next_tag,
                Unacked {
                    source: Source::Replicated(source.clone()),
                    id,
                    consumer: None,
                },
            );
            self.unacked_count.fetch_add(1, Ordering::Relaxed);
        }
        d.next_tag
    }

    /// The consumer was attached: `consume-ok` (unless `nowait`), then what arrived meanwhile.
    fn replicated_consumer_ready(&self, tag: &str, send_ok: bool) {
        let mut r = self.replicated.lock();
        let Some(c) = r.consumers.get_mut(tag) else {
            return;
        };
        if send_ok && self.is_open() {
            let _d = self.deliveries.lock();
            let m = AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                consumer_tag: tag.into(),
            }));
            codec::encode_method(&mut self.conn.outbox.writer(), self.id, &m);
        }
        c.ready = true;
        let (source, no_ack) = (c.source.clone(), c.no_ack);
        for (id, redelivered, msg) in std::mem::take(&mut c.pending) {
            self.write_replicated(tag, &source, no_ack, id, redelivered, &msg);
        }
    }
}

impl LocalConsumer for ChannelShared {
    fn deliver_replicated(
        &self,
        _queue: &Arc<ReplicatedQueue>,
        key: &ConsumerKey,
        id: MsgId,
        redelivered: bool,
        msg: Arc<Message>,
    ) -> bool {
        if !self.is_open() {
            return false;
        }
        let mut r = self.replicated.lock();
        let Some(c) = r.consumers.get_mut(&key.tag) else {
            return false;
        };
        if c.source.key != *key {
            return false;
        }
        if !c.ready {
            c.pending.push((id, redelivered, msg));
            return true;
        }
        let (source, no_ack) = (c.source.clone(), c.no_ack);
        drop(r);
        self.write_replicated(&key.tag, &source, no_ack, id, redelivered, &msg);
        true
    }

    fn replicated_cancelled(&self, tag: &str) {
        if self.replicated.lock().consumers.remove(tag).is_some() {
            self.cancelled_by_server(tag);
        }
    }
}

fn failed(queue: &ReplicatedQueue, e: String) -> AmqpError {
    if e.contains("quorum lost") || e.contains("not committed") || e.contains("no leader") {
        AmqpError::new(541, format!("queue '{}': {e}", queue.name))
    } else {
        AmqpError::not_found(format!("queue '{}': {e}", queue.name))
    }
}

impl Channel {
    /// `basic.consume` of a replicated queue: answered once the checkout is committed.
    pub(super) fn consume_replicated(
        &mut self,
        c: &basic::Consume,
        tag: String,
        q: Arc<ReplicatedQueue>,
    ) {
        let key = q.key(self.ctx().id, self.id(), &tag);
        let source = Arc::new(ReplicatedSource {
            queue: q.clone(),
            key: key.clone(),
        });
        self.shared.replicated.lock().consumers.insert(
            tag.clone(),
            ReplicatedConsumer {
                source,
                no_ack: c.no_ack,
                ready: c.nowait,
                pending: Vec::new(),
            },
        );
        let shared = self.shared.clone();
        let target: std::sync::Weak<dyn LocalConsumer> = Arc::downgrade(&self.shared) as _;
        let prefetch = self.prefetch;
        let send_ok = !c.nowait;
        self.defer((60, 20), async move {
            match q.consume(key, prefetch, target).await {
                Ok(()) => {
                    shared.replicated_consumer_ready(&tag, send_ok);
                    Ok(None)
                }
                Err(e) => {
                    shared.replicated.lock().consumers.remove(&tag);
                    Err(failed(&q, e))
                }
            }
        });
    }

    /// `basic.get` of a replicated queue.
    pub(super) fn get_replicated(&mut self, g: &basic::Get, q: Arc<ReplicatedQueue>) {
        let source = self
            .shared
            .replicated
            .lock()
            .gets
            .entry(q.name.clone())
            .or_insert_with(|| {
                Arc::new(ReplicatedSource {
                    queue: q.clone(),
                    key: q.key(self.shared.conn.id, self.shared.id, GET_TAG),
                })
            })
            .clone();
        let shared = self.shared.clone();
        let target: std::sync::Weak<dyn LocalConsumer> = Arc::downgrade(&self.shared) as _;
        let no_ack = g.no_ack;
        self.defer((60, 70), async move {
            let got = q
                .get(source.key.clone(), no_ack, target)
                .await
                .map_err(|e| failed(&q, e))?;
            let Some((id, msg, redelivered, remaining)) = got else {
                return Ok(Some(AMQPClass::Basic(basic::AMQPMethod::GetEmpty(
                    basic::GetEmpty {},
                ))));
            };
            let mut d = shared.deliveries.lock();
            let tag = shared.replicated_tag(&mut d, &source, no_ack, id);
            let mut out = shared.conn.outbox.writer();
            codec::encode_get_ok(
                &mut out,
                shared.id,
                tag,
                redelivered,
                &msg.exchange,
                &msg.routing_key,
                remaining,
            );
            codec::encode_content(
                &mut out,
                shared.id,
                &msg.header_payload,
                &msg.body,
                shared.conn.frame_max,
            );
            Ok(None)
        });
    }

    /// `basic.cancel` of a consumer of a replicated queue (what it holds returns).
    pub(super) fn cancel_replicated(&mut self, tag: &str) {
        if let Some(c) = self.shared.replicated.lock().consumers.remove(tag) {
            c.source.queue.cancel(c.source.key.clone());
        }
    }

    /// The channel closed: its consumers and gets of replicated queues are cancelled.
    pub(super) fn close_replicated(&mut self) {
        let (consumers, gets) = {
            let mut r = self.shared.replicated.lock();
            (
                std::mem::take(&mut r.consumers),
                std::mem::take(&mut r.gets),
            )
        };
        for c in consumers.into_values() {
            c.source.queue.cancel(c.source.key.clone());
        }
        for s in gets.into_values() {
            s.queue.cancel(s.key.clone());
        }
    }

    /// `queue.purge` of a replicated queue.
    pub(super) fn purge_replicated(&mut self, q: Arc<ReplicatedQueue>, nowait: bool) {
        self.defer((50, 30), async move {
            let n = q.purge().await.map_err(|e| failed(&q, e))?;
            Ok(
                (!nowait).then_some(AMQPClass::Queue(queue::AMQPMethod::PurgeOk(
                    queue::PurgeOk { message_count: n },
                ))),
            )
        });
    }
}
