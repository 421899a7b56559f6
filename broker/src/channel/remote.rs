//! Consuming from and getting messages of a queue that lives on another node
//! ([`crate::remote`]). The home node holds the consumer (through a proxy of this channel)
//! and each delivery unacknowledged; this channel gives deliveries its own tags, keeps them
//! as unacked with the home node as their [`Source`], and sends settlements back.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use amq_protocol::protocol::{AMQPClass, basic};
use tokio::sync::watch;

use super::{Channel, ChannelShared, Deliveries, Source, Unacked};
use crate::codec;
use crate::message::Message;
use crate::queue::DeliveryTarget;
use crate::queue::state::MsgId;
use crate::remote::{Call, ChanKey, Got, RemoteConsumer, RemoteSource, Reply};
use crate::vhost::RemoteQueue;

/// What became of a delivery from a home node.
pub enum RemoteDelivery {
    /// No such consumer (cancelled, or the channel closed): the home node requeues it.
    Gone,
    /// Written to the client.
    Written,
    /// Held until `basic.consume-ok` has gone out; the receiver turns true then.
    Waiting(watch::Receiver<bool>),
}

impl ChannelShared {
    fn key(&self) -> ChanKey {
        ChanKey {
            conn: self.conn.id,
            channel: self.id,
        }
    }

    /// This channel's next delivery tag for message `id` of `source`, recorded as unacked
    /// unless the client does not acknowledge.
    fn remote_tag(
        &self,
        d: &mut Deliveries,
        source: &Arc<RemoteSource>,
        no_ack: bool,
        id: MsgId,
    ) -> u64 {
        d.next_tag += 1;
        let tag = d.next_tag;
        if !no_ack {
            d.unacked.insert(
                tag,
                Unacked {
                    source: Source::Remote(source.clone()),
                    id,
                    consumer: None,
                },
            );
            self.unacked_count.fetch_add(1, Ordering::Relaxed);
        }
        tag
    }

    /// Writes a delivery from `source` with this channel's next tag.
    #[allow(clippy::too_many_arguments)]
    fn write_remote(
        &self,
        d: &mut Deliveries,
        consumer_tag: &str,
        source: &Arc<RemoteSource>,
        no_ack: bool,
        id: MsgId,
        redelivered: bool,
        msg: &Message,
    ) {
        let tag = self.remote_tag(d, source, no_ack, id);
        self.write_deliver(consumer_tag, tag, redelivered, msg);
    }

    /// A delivery for consumer `tag` from its home node.
    pub fn deliver_remote(
        &self,
        tag: &str,
        id: MsgId,
        redelivered: bool,
        msg: Arc<Message>,
    ) -> RemoteDelivery {
        let mut r = self.remote.lock();
        let Some(c) = r.consumers.get_mut(tag) else {
            return RemoteDelivery::Gone;
        };
        if !*c.ready.borrow() {
            c.pending.push((id, redelivered, msg));
            return RemoteDelivery::Waiting(c.ready.subscribe());
        }
        let (no_ack, source) = (c.no_ack, c.source.clone());
        let mut d = self.deliveries.lock();
        if !self.is_open() {
            return RemoteDelivery::Gone;
        }
        self.write_remote(&mut d, tag, &source, no_ack, id, redelivered, &msg);
        RemoteDelivery::Written
    }

    /// The home node attached consumer `tag`: `consume-ok` (unless `nowait`), then what
    /// arrived for it meanwhile.
    fn remote_consumer_ready(&self, tag: &str, send_ok: bool) {
        let mut r = self.remote.lock();
        let Some(c) = r.consumers.get_mut(tag) else {
            return;
        };
        let mut d = self.deliveries.lock();
        if !self.is_open() {
            return;
        }
        if send_ok {
            let m = AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                consumer_tag: tag.into(),
            }));
            codec::encode_method(&mut self.conn.outbox.writer(), self.id, &m);
        }
        for (id, redelivered, msg) in std::mem::take(&mut c.pending) {
            self.write_remote(&mut d, tag, &c.source, c.no_ack, id, redelivered, &msg);
        }
        c.ready.send_replace(true);
    }

    /// The home node's queue of consumer `tag` went.
    pub fn remote_cancelled(&self, tag: &str) {
        if self.remote.lock().consumers.remove(tag).is_some() {
            self.cancelled_by_server(tag);
        }
    }

    /// Cancels the consumers whose home node's link is `lost(node, link)`.
    pub fn drop_lost_consumers(&self, lost: impl Fn(&str, Option<u64>) -> bool) {
        let tags: Vec<String> = {
            let mut r = self.remote.lock();
            let tags: Vec<String> = r
                .consumers
                .iter()
                .filter(|(_, c)| lost(&c.source.node, c.link))
                .map(|(t, _)| t.clone())
                .collect();
            for t in &tags {
                r.consumers.remove(t);
            }
            tags
        };
        for t in tags {
            tracing::info!(
                consumer = %t,
                "consumer cancelled: the node of its queue cannot be reached"
            );
            self.cancelled_by_server(&t);
        }
    }

    /// Writes a message got from a home node (`basic.get-ok`).
    fn write_remote_get(&self, source: &Arc<RemoteSource>, no_ack: bool, g: Got) {
        let mut d = self.deliveries.lock();
        let tag = self.remote_tag(&mut d, source, no_ack, g.id);
        let mut out = self.conn.outbox.writer();
        codec::encode_get_ok(
            &mut out,
            self.id,
            tag,
            g.redelivered,
            &g.exchange,
            &g.routing_key,
            g.remaining,
        );
        codec::encode_content(&mut out, self.id, &g.header, &g.body, self.conn.frame_max);
    }
}

impl Channel {
    /// The source for `queue` on `node`, registering the channel for deliveries from there.
    fn remote_source(&self, r: &RemoteQueue) -> Arc<RemoteSource> {
        let broker = &self.ctx().broker;
        let key = self.shared.key();
        broker.register_remote_channel(key, &self.shared);
        self.shared
            .remote
            .lock()
            .source(broker, &r.node, &r.name, key)
    }

    /// `basic.consume` of a queue on another node: answered once its node attached the
    /// consumer.
    pub(super) fn consume_remote(
        &mut self,
        c: &basic::Consume,
        tag: String,
        r: RemoteQueue,
        priority: i32,
    ) {
        let source = self.remote_source(&r);
        let broker = self.ctx().broker.clone();
        let link = broker.cluster().and_then(|cl| cl.link_id(&r.node));
        self.shared.remote.lock().consumers.insert(
            tag.clone(),
            RemoteConsumer {
                source,
                no_ack: c.no_ack,
                link,
                ready: watch::Sender::new(c.nowait),
                pending: Vec::new(),
            },
        );
        let call = Call::Consume {
            chan: self.shared.key(),
            vhost: self.ctx().vhost.name.clone(),
            queue: r.name.clone(),
            tag: tag.clone(),
            no_ack: c.no_ack,
            prefetch: self.prefetch,
            exclusive: c.exclusive,
            priority,
            user: self.ctx().user.clone(),
            connection: self.ctx().info.name.clone(),
        };
        let shared = self.shared.clone();
        let send_ok = !c.nowait;
        self.defer((60, 20), async move {
            match broker.queue_call(&r.node, call).await {
                Ok(_) => {
                    shared.remote_consumer_ready(&tag, send_ok);
                    Ok(None)
                }
                Err(e) => {
                    shared.remote.lock().consumers.remove(&tag);
                    Err(e)
                }
            }
        });
    }

    /// `basic.get` of a queue on another node.
    pub(super) fn get_remote(&mut self, g: &basic::Get, r: RemoteQueue) {
        let source = self.remote_source(&r);
        let call = Call::Get {
            chan: self.shared.key(),
            vhost: self.ctx().vhost.name.clone(),
            queue: r.name.clone(),
            no_ack: g.no_ack,
            user: self.ctx().user.clone(),
            connection: self.ctx().info.name.clone(),
        };
        let (broker, shared, no_ack) = (self.ctx().broker.clone(), self.shared.clone(), g.no_ack);
        self.defer((60, 70), async move {
            match broker.queue_call(&r.node, call).await? {
                Reply::Got(Some(got)) => {
                    shared.write_remote_get(&source, no_ack, got);
                    Ok(None)
                }
                _ => Ok(Some(AMQPClass::Basic(basic::AMQPMethod::GetEmpty(
                    basic::GetEmpty {},
                )))),
            }
        });
    }

    /// `basic.cancel` of a consumer on another node (its deliveries in flight are requeued
    /// by the home node when this channel no longer takes them).
    pub(super) fn cancel_remote(&mut self, tag: &str) {
        let Some(c) = self.shared.remote.lock().consumers.remove(tag) else {
            return;
        };
        let call = Call::Cancel {
            chan: self.shared.key(),
            tag: tag.to_owned(),
        };
        self.ctx().broker.send_and_forget(&c.source.node, &call);
    }

    /// The channel closed: the home nodes it used drop its consumers and requeue its
    /// unacknowledged messages.
    pub(super) fn close_remote(&mut self) {
        let nodes = {
            let mut r = self.shared.remote.lock();
            r.consumers.clear();
            r.nodes()
        };
        if !nodes.is_empty() {
            self.ctx()
                .broker
                .close_remote_channel(self.shared.key(), nodes);
        }
    }
}
