//! The client's side of consuming from a queue on another node: what a channel here keeps
//! about its consumers and deliveries there, and how this node serves the home node's
//! [`Call::Deliver`] and [`Call::Cancelled`].

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;

use super::{Call, ChanKey, Reply, encode, settlement_code};
use crate::broker::Broker;
use crate::channel::{ChannelShared, RemoteDelivery};
use crate::cluster::link::Answer;
use crate::message::Message;
use crate::queue::state::{MsgId, Settlement};

/// A queue on another node that a channel here consumes from or got messages of: where
/// their settlements go.
#[derive(Debug)]
pub struct RemoteSource {
    pub node: String,
    pub queue: String,
    pub key: ChanKey,
    broker: Weak<Broker>,
}

impl RemoteSource {
    pub fn new(broker: &Arc<Broker>, node: &str, queue: &str, key: ChanKey) -> Arc<Self> {
        Arc::new(Self {
            node: node.to_owned(),
            queue: queue.to_owned(),
            key,
            broker: Arc::downgrade(broker),
        })
    }

    /// Sends the settlement to the home node (in order with everything else this node sends
    /// it). A home node that cannot be reached has requeued them already.
    pub fn settle(&self, ids: Vec<MsgId>, how: Settlement) {
        let Some(broker) = self.broker.upgrade() else {
            return;
        };
        let call = Call::Settle {
            chan: self.key,
            queue: self.queue.clone(),
            ids,
            how: settlement_code(how),
        };
        broker.send_and_forget(&self.node, &call);
    }
}

/// A consumer of a channel here attached to a queue on another node.
#[derive(Debug)]
pub struct RemoteConsumer {
    pub source: Arc<RemoteSource>,
    pub no_ack: bool,
    /// The link to the home node when the consumer was attached.
    pub link: Option<u64>,
    /// False until `basic.consume-ok` went out; deliveries arriving before wait in `pending`.
    pub ready: watch::Sender<bool>,
    pub pending: Vec<(MsgId, bool, Arc<Message>)>,
}

/// A channel's consumers and sources on other nodes.
#[derive(Debug, Default)]
pub struct RemoteSide {
    pub consumers: HashMap<String, RemoteConsumer>,
    /// (node, queue) → source.
    pub sources: HashMap<(String, String), Arc<RemoteSource>>,
}

impl RemoteSide {
    pub fn source(
        &mut self,
        broker: &Arc<Broker>,
        node: &str,
        queue: &str,
        key: ChanKey,
    ) -> Arc<RemoteSource> {
        self.sources
            .entry((node.to_owned(), queue.to_owned()))
            .or_insert_with(|| RemoteSource::new(broker, node, queue, key))
            .clone()
    }

    /// The nodes this channel has consumers or deliveries on.
    pub fn nodes(&self) -> Vec<String> {
        let mut n: Vec<String> = self.sources.keys().map(|(n, _)| n.clone()).collect();
        n.sort();
        n.dedup();
        n
    }
}

fn answer(r: Reply) -> Answer {
    let body = postcard::to_allocvec(&r).unwrap_or_default();
    Box::pin(async move { body })
}

/// Answers once the channel's outbox is below its high-water mark (or closed), so a home
/// node sends no faster than the client reads.
async fn when_drained(ch: Arc<ChannelShared>) -> Vec<u8> {
    let outbox = ch.conn.outbox.clone();
    loop {
        if outbox.len() < crate::outbox::HIGH_WATER || outbox.is_closed() {
            break;
        }
        let _ = tokio::time::timeout(Duration::from_millis(100), outbox.wait_for_drain()).await;
    }
    postcard::to_allocvec(&Reply::Delivered(true)).unwrap_or_default()
}

impl Broker {
    /// Sends `call` to `node` without waiting for the answer (ordered after everything sent
    /// to it before).
    pub(crate) fn send_and_forget(&self, node: &str, call: &Call) {
        let started = match (self.cluster(), encode(call)) {
            (Some(c), Ok(body)) => c.start_broker_call(node, body),
            _ => return,
        };
        match started {
            Ok(answer) => {
                tokio::spawn(answer);
            }
            Err(e) => tracing::debug!(node, "call not sent: {e}"),
        }
    }

    /// Registers channel `ch` as one with consumers or deliveries on other nodes.
    pub(crate) fn register_remote_channel(&self, key: ChanKey, ch: &Arc<ChannelShared>) {
        self.remote.channels.lock().insert(key, Arc::downgrade(ch));
    }

    /// Channel `key` closed: the home nodes it used requeue what they hold for it.
    pub(crate) fn close_remote_channel(&self, key: ChanKey, nodes: Vec<String>) {
        self.remote.channels.lock().remove(&key);
        for node in nodes {
            self.send_and_forget(&node, &Call::Close { chan: key });
        }
    }

    fn remote_channel(&self, key: &ChanKey) -> Option<Arc<ChannelShared>> {
        self.remote
            .channels
            .lock()
            .get(key)
            .and_then(|w| w.upgrade())
    }

    /// A delivery from a home node (served on the link's reader, in order).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn serve_deliver(
        &self,
        chan: ChanKey,
        tag: &str,
        id: MsgId,
        redelivered: bool,
        exchange: String,
        routing_key: String,
        header: Vec<u8>,
        body: Vec<u8>,
    ) -> Answer {
        let Some(ch) = self.remote_channel(&chan) else {
            return answer(Reply::Delivered(false));
        };
        let header = Bytes::from(header);
        let Ok(h) = crate::codec::decode_header(&header) else {
            return answer(Reply::Delivered(false));
        };
        let msg = Arc::new(Message::with_header_payload(
            exchange,
            routing_key,
            h.properties,
            header,
            Bytes::from(body),
        ));
        match ch.deliver_remote(tag, id, redelivered, msg) {
            RemoteDelivery::Gone => answer(Reply::Delivered(false)),
            RemoteDelivery::Written => Box::pin(when_drained(ch)),
            RemoteDelivery::Waiting(mut ready) => Box::pin(async move {
                let ready = ready.wait_for(|r| *r).await.is_ok();
                if ready {
                    when_drained(ch).await
                } else {
                    postcard::to_allocvec(&Reply::Delivered(false)).unwrap_or_default()
                }
            }),
        }
    }

    /// The home node's queue of a consumer went: the client hears `basic.cancel`.
    pub(super) fn serve_cancelled(&self, chan: ChanKey, tag: &str) -> Answer {
        if let Some(ch) = self.remote_channel(&chan) {
            ch.remote_cancelled(tag);
        }
        answer(Reply::Done)
    }

    /// Consumers whose home node's link went (the node died, restarted or was cut off) are
    /// cancelled, as a consumer of a queue whose node goes down is in RabbitMQ; proxies of
    /// channels whose node went requeue what they held.
    pub(crate) fn sweep_remote(&self) {
        let Some(cluster) = self.cluster() else {
            return;
        };
        let lost: Vec<Arc<super::Proxy>> = {
            let mut proxies = self.remote.proxies.lock();
            let mut lost = Vec::new();
            proxies.retain(|_, p| {
                let keep = !p.is_closed() && cluster.link_id(&p.node) == p.link;
                if !keep {
                    lost.push(p.clone());
                }
                keep
            });
            lost
        };
        for p in lost {
            p.close();
        }
        let channels: Vec<Arc<ChannelShared>> = {
            let mut chans = self.remote.channels.lock();
            chans.retain(|_, w| w.strong_count() > 0);
            chans.values().filter_map(|w| w.upgrade()).collect()
        };
        for ch in channels {
            ch.drop_lost_consumers(|node, link| cluster.link_id(node) != link);
        }
    }
}
