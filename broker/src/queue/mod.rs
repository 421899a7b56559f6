//! A queue on this node: the deterministic [`state::QueueState`] plus what only a running node
//! has — consumers, their credit, the connections deliveries are written to, timers, and the
//! dead-lettering of what the state machine hands out.
//!
//! Concurrency: each queue sits behind one mutex, taken by whichever task acts on it (the
//! publishing connection, the acking connection, the queue's timer, a writer that drained).
//! Nothing awaits while holding it. Lock order is queue → channel deliveries → connection
//! outbox; dead letters are routed only after the queue lock is released, so queues
//! dead-lettering into each other cannot deadlock.

pub mod args;
pub mod state;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use amq_protocol::types::FieldTable;
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::channel::ChannelShared;
use crate::message::Message;
use crate::store::log::{MessageLog, Record, StoredMessage};
use crate::vhost::Vhost;
use args::QueueArgs;
use state::{Command, DeadLetterReason, Effect, Millis, MsgId, QueueState, Settlement};

/// Wall-clock milliseconds: the runtime's time source, passed into the state machine.
pub fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A consumer attached to a queue.
#[derive(Debug)]
pub struct Consumer {
    pub tag: String,
    pub channel: Arc<ChannelShared>,
    pub no_ack: bool,
    /// Per-consumer prefetch (`basic.qos` with global=false); 0 is unlimited.
    pub prefetch: u32,
    pub unacked: AtomicU32,
    pub priority: i32,
    pub exclusive: bool,
    /// The channel's delivery counters for this queue (metrics).
    pub stats: Arc<crate::metrics::DeliveryStats>,
}

impl Consumer {
    fn has_credit(&self) -> bool {
        if self.no_ack {
            return true;
        }
        (self.prefetch == 0 || self.unacked.load(Ordering::Relaxed) < self.prefetch)
            && self.channel.has_global_credit()
    }
}

struct Inner {
    state: QueueState,
    /// Highest priority first; round-robin by moving the served consumer behind its peers.
    /// For single-active-consumer queues, registration order (the first is active).
    consumers: Vec<Arc<Consumer>>,
    had_consumer: bool,
    last_used: Millis,
    /// `x-expires` in effect (client argument, policy or operator policy).
    expires: Option<u64>,
    /// Message-log ids of the persistent messages this (durable) queue holds.
    sids: HashMap<MsgId, u64>,
    fx: Vec<Effect>,
}

/// Ready messages above which a queue whose deliveries wait on full connection buffers asks
/// its publishers to pause.
const FLOW_BACKLOG: u64 = 1000;

/// Dead letters collected under the lock, published after it is released.
type Letters = Vec<(Arc<Message>, DeadLetterReason)>;

pub struct Queue {
    pub name: String,
    pub durable: bool,
    pub auto_delete: bool,
    /// The connection that owns an exclusive queue.
    pub exclusive_owner: Option<u64>,
    pub arguments: FieldTable,
    /// The client's arguments, validated (policies are applied on top, in the state).
    pub args: QueueArgs,
    vhost: Weak<Vhost>,
    me: Weak<Queue>,
    inner: Mutex<Inner>,
    timer: Arc<Notify>,
    pub stats: QueueStats,
    /// The node's message log, for durable queues of a node with storage.
    store: Option<Arc<MessageLog>>,
    vhost_name: String,
    deleted: AtomicBool,
    flow_pressure: AtomicBool,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue").field("name", &self.name).finish()
    }
}

/// Message counts of one queue since it was declared, and their rates over the last
/// sampling interval (for the management API's `message_stats`). Counting is a relaxed atomic
/// increment on the message path; rates are computed by a sampler off it.
#[derive(Debug, Default)]
pub struct QueueStats {
    pub publish: AtomicU64,
    pub deliver_get: AtomicU64,
    pub ack: AtomicU64,
    pub redeliver: AtomicU64,
    rates: Mutex<RateSample>,
}

#[derive(Debug, Default, Clone, Copy)]
struct RateSample {
    at: Option<std::time::Instant>,
    counts: [u64; 4],
    rates: [f64; 4],
}

impl QueueStats {
    fn counts(&self) -> [u64; 4] {
        [
            self.publish.load(Ordering::Relaxed),
            self.deliver_get.load(Ordering::Relaxed),
            self.ack.load(Ordering::Relaxed),
            self.redeliver.load(Ordering::Relaxed),
        ]
    }

    /// Takes a sample; rates are per second since the previous one.
    pub fn sample(&self, now: std::time::Instant) {
        let counts = self.counts();
        let mut s = self.rates.lock();
        if let Some(at) = s.at {
            let secs = now.duration_since(at).as_secs_f64();
            if secs > 0.0 {
                let previous = s.counts;
                for ((rate, now_count), before) in s.rates.iter_mut().zip(counts).zip(previous) {
                    *rate = now_count.saturating_sub(before) as f64 / secs;
                }
            }
        }
        s.at = Some(now);
        s.counts = counts;
    }

    /// (name, count, rate) for publish, deliver_get, ack, redeliver.
    pub fn snapshot(&self) -> [(&'static str, u64, f64); 4] {
        let counts = self.counts();
        let rates = self.rates.lock().rates;
        [
            ("publish", counts[0], rates[0]),
            ("deliver_get", counts[1], rates[1]),
            ("ack", counts[2], rates[2]),
            ("redeliver", counts[3], rates[3]),
        ]
    }
}

/// The outcome of enqueueing one message.
#[derive(Debug, Clone, Copy)]
pub struct Published {
    pub accepted: bool,
    pub wait_for: u64,
}

/// What `basic.get` returns.
pub struct GetResult {
    pub id: MsgId,
    pub msg: Arc<Message>,
    pub redelivered: bool,
    pub remaining: u32,
}

impl Queue {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: String,
        durable: bool,
        auto_delete: bool,
        exclusive_owner: Option<u64>,
        arguments: FieldTable,
        args: QueueArgs,
        vhost: Weak<Vhost>,
        effective: (state::QueueConfig, Option<u64>),
        store: Option<Arc<MessageLog>>,
    ) -> Arc<Self> {
        let vhost_name = vhost.upgrade().map(|v| v.name.clone()).unwrap_or_default();
        let (config, expires) = effective;
        let q = Arc::new_cyclic(|me| Queue {
            name,
            durable,
            auto_delete,
            exclusive_owner,
            inner: Mutex::new(Inner {
                state: QueueState::new(config),
                consumers: Vec::new(),
                had_consumer: false,
                last_used: now_ms(),
                expires,
                sids: HashMap::new(),
                fx: Vec::new(),
            }),
            arguments,
            args,
            vhost,
            me: me.clone(),
            timer: Arc::new(Notify::new()),
            stats: QueueStats::default(),
            store: if durable { store } else { None },
            vhost_name,
            deleted: AtomicBool::new(false),
            flow_pressure: AtomicBool::new(false),
        });
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(run_timer(Arc::downgrade(&q)));
        }
        q
    }

    pub fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::Acquire)
    }

    pub fn message_count(&self) -> u32 {
        self.inner.lock().state.ready_count() as u32
    }

    pub fn consumer_count(&self) -> u32 {
        self.inner.lock().consumers.len() as u32
    }

    /// (ready, unacked, consumers)
    pub fn counts(&self) -> (u64, u64, usize) {
        let g = self.inner.lock();
        (
            g.state.ready_count(),
            g.state.unacked_count(),
            g.consumers.len(),
        )
    }

    /// Depths and consumers for a metrics scrape, with the (connection, channel) of each
    /// consumer.
    pub fn metrics_sample(&self) -> (crate::metrics::QueueSample, Vec<(u64, u16)>) {
        let g = self.inner.lock();
        let sample = crate::metrics::QueueSample {
            ready: g.state.ready_count(),
            unacked: g.state.unacked_count(),
            ready_bytes: g.state.ready_bytes(),
            unacked_bytes: g.state.unacked_bytes(),
            consumers: g.consumers.len() as u64,
        };
        let channels = g
            .consumers
            .iter()
            .map(|c| (c.channel.conn.id, c.channel.id))
            .collect();
        (sample, channels)
    }

    pub fn touch(&self) {
        self.inner.lock().last_used = now_ms();
        self.timer.notify_one();
    }

    /// Enqueues a routed message. `accepted` is false if the queue refused it (reject-publish
    /// overflow); `wait_for` is the message-log sequence number that must be on disk before
    /// the publish may be confirmed (0: nothing to wait for).
    pub fn publish(&self, msg: Arc<Message>, now: Millis) -> Published {
        if self.is_deleted() {
            return Published {
                accepted: true,
                wait_for: 0,
            };
        }
        let mut letters = Letters::new();
        let accepted;
        let mut wait_for = 0;
        let wake_timer;
        {
            let mut g = self.inner.lock();
            let had_expiry = g.state.next_expiry();
            let mut fx = std::mem::take(&mut g.fx);
            let persist = self.store.is_some() && msg.persistent();
            g.state
                .apply(Command::Enqueue { msg: msg.clone() }, now, &mut fx);
            accepted = !fx.iter().any(|e| matches!(e, Effect::Refused));
            if accepted {
                self.stats.publish.fetch_add(1, Ordering::Relaxed);
            }
            for e in fx.drain(..) {
                if let Effect::Accepted { id } = e {
                    if persist && let Some(store) = &self.store {
                        let sid = store.next_sid();
                        let expires_at = g.state.expires_at(id);
                        wait_for = store.append(&Record::Enqueue(StoredMessage {
                            sid,
                            vhost: self.vhost_name.clone(),
                            queue: self.name.clone(),
                            expires_at,
                            exchange: msg.exchange.clone(),
                            routing_key: msg.routing_key.clone(),
                            header_payload: msg.header_payload.to_vec(),
                            body: msg.body.to_vec(),
                        }));
                        g.sids.insert(id, sid);
                    }
                } else {
                    self.absorb(&mut g.sids, e, &mut letters);
                }
            }
            g.fx = fx;
            self.deliver_ready(&mut g, now, &mut letters);
            wake_timer = g.state.next_expiry().is_some() && g.state.next_expiry() != had_expiry;
        }
        if wake_timer {
            self.timer.notify_one();
        }
        self.dead_letter(letters, now);
        Published { accepted, wait_for }
    }

    /// Puts recovered messages back, in their original order, marked redelivered: they may
    /// have been delivered before the restart (at-least-once).
    pub fn restore(&self, messages: Vec<StoredMessage>) {
        let mut g = self.inner.lock();
        let mut fx = std::mem::take(&mut g.fx);
        for m in messages {
            let Ok(header) = crate::codec::decode_header(&m.header_payload) else {
                tracing::error!(queue = %self.name, sid = m.sid, "unreadable stored message properties; dropped");
                continue;
            };
            let msg = Arc::new(Message::with_header_payload(
                m.exchange,
                m.routing_key,
                header.properties,
                bytes::Bytes::from(m.header_payload),
                bytes::Bytes::from(m.body),
            ));
            g.state.apply(
                Command::Restore {
                    msg,
                    expires_at: m.expires_at,
                    redelivered: true,
                },
                now_ms(),
                &mut fx,
            );
            for e in fx.drain(..) {
                if let Effect::Accepted { id } = e {
                    g.sids.insert(id, m.sid);
                }
            }
        }
        g.fx = fx;
        drop(g);
        self.timer.notify_one();
    }

    /// Handles what any command may produce besides its own result: dead letters (routed
    /// after the lock is released) and removals (recorded in the message log). Returns the
    /// effects it does not handle.
    fn absorb(
        &self,
        sids: &mut HashMap<MsgId, u64>,
        e: Effect,
        letters: &mut Letters,
    ) -> Option<Effect> {
        match e {
            Effect::DeadLetter { msg, reason } => {
                letters.push((msg, reason));
                None
            }
            Effect::Removed { id } => {
                if let Some(sid) = sids.remove(&id)
                    && let Some(store) = &self.store
                {
                    store.append(&Record::Remove {
                        vhost: self.vhost_name.clone(),
                        queue: self.name.clone(),
                        sid,
                    });
                }
                None
            }
            other => Some(other),
        }
    }

    fn absorb_all(
        &self,
        sids: &mut HashMap<MsgId, u64>,
        fx: &mut Vec<Effect>,
        letters: &mut Letters,
    ) {
        for e in fx.drain(..) {
            self.absorb(sids, e, letters);
        }
    }

    /// Delivers ready messages to consumers with credit, until either runs out.
    fn deliver_ready(&self, g: &mut Inner, now: Millis, letters: &mut Letters) {
        let output_blocked = self.deliver_until_stuck(g, now, letters);
        let pressure = output_blocked && g.state.ready_count() > FLOW_BACKLOG;
        self.flow_pressure.store(pressure, Ordering::Relaxed);
    }

    /// Returns true if it stopped because every consumer with credit had a full outbox.
    fn deliver_until_stuck(&self, g: &mut Inner, now: Millis, letters: &mut Letters) -> bool {
        let Some(me) = self.me.upgrade() else {
            return false;
        };
        let sac = self.args.single_active_consumer;
        while g.state.ready_count() > 0 && !g.consumers.is_empty() {
            let candidates = if sac { 1 } else { g.consumers.len() };
            let mut credit_but_full = false;
            let Some(i) = (0..candidates).find(|&i| {
                let c = &g.consumers[i];
                if !c.has_credit() {
                    return false;
                }
                let writable = c.channel.writable(&me);
                credit_but_full |= !writable;
                writable
            }) else {
                return credit_but_full;
            };
            let c = g.consumers[i].clone();
            let mut fx = std::mem::take(&mut g.fx);
            g.state
                .apply(Command::Checkout { settled: c.no_ack }, now, &mut fx);
            let mut delivered = None;
            for e in fx.drain(..) {
                if let Some(Effect::Delivery {
                    id,
                    msg,
                    redelivered,
                    ..
                }) = self.absorb(&mut g.sids, e, letters)
                {
                    delivered = Some((id, msg, redelivered));
                    self.stats.deliver_get.fetch_add(1, Ordering::Relaxed);
                    if redelivered {
                        self.stats.redeliver.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            g.fx = fx;
            let Some((id, msg, redelivered)) = delivered else {
                return false;
            };
            if !c.channel.deliver(&c, &me, id, &msg, redelivered) && !c.no_ack {
                // The channel closed under us: put the message back.
                let mut fx = std::mem::take(&mut g.fx);
                g.state.apply(
                    Command::Settle {
                        ids: vec![id],
                        how: Settlement::Requeue,
                    },
                    now,
                    &mut fx,
                );
                fx.clear();
                g.fx = fx;
            }
            if !sac {
                // Round-robin within the priority level.
                let c = g.consumers.remove(i);
                let pos = g.consumers.partition_point(|x| x.priority >= c.priority);
                g.consumers.insert(pos, c);
            }
        }
        false
    }

    /// Publishers to this queue should pause: it has a backlog that only waits for its
    /// consumers' connections to drain (credit-based flow control, as RabbitMQ's). A queue
    /// whose consumers are out of prefetch credit never applies pressure, so a consumer that
    /// does not ack cannot stall publishers.
    pub fn flow_pressure(&self) -> bool {
        self.flow_pressure.load(Ordering::Relaxed)
    }

    /// Applies new effective settings (a policy changed). Limits take effect at once.
    pub fn apply_config(&self, config: state::QueueConfig, expires: Option<u64>) {
        let now = now_ms();
        let mut letters = Letters::new();
        {
            let mut g = self.inner.lock();
            if *g.state.config() == config && g.expires == expires {
                return;
            }
            g.expires = expires;
            let mut fx = std::mem::take(&mut g.fx);
            g.state.apply(Command::SetConfig(config), now, &mut fx);
            self.absorb_all(&mut g.sids, &mut fx, &mut letters);
            g.fx = fx;
            self.deliver_ready(&mut g, now, &mut letters);
        }
        self.timer.notify_one();
        self.dead_letter(letters, now);
    }

    /// Tries to deliver again (after credit was granted or a connection drained).
    pub fn kick(&self) {
        let now = now_ms();
        let mut letters = Letters::new();
        {
            let mut g = self.inner.lock();
            self.deliver_ready(&mut g, now, &mut letters);
        }
        self.dead_letter(letters, now);
    }

    pub fn settle(&self, ids: Vec<MsgId>, how: Settlement) {
        if how == Settlement::Ack {
            self.stats
                .ack
                .fetch_add(ids.len() as u64, Ordering::Relaxed);
        }
        if self.is_deleted() {
            return;
        }
        let now = now_ms();
        let mut letters = Letters::new();
        {
            let mut g = self.inner.lock();
            let mut fx = std::mem::take(&mut g.fx);
            g.state.apply(Command::Settle { ids, how }, now, &mut fx);
            self.absorb_all(&mut g.sids, &mut fx, &mut letters);
            g.fx = fx;
            self.deliver_ready(&mut g, now, &mut letters);
        }
        if how == Settlement::Requeue {
            self.timer.notify_one();
        }
        self.dead_letter(letters, now);
    }

    /// `basic.get`.
    pub fn get(&self, no_ack: bool) -> Option<GetResult> {
        let now = now_ms();
        let mut letters = Letters::new();
        let mut result = None;
        {
            let mut g = self.inner.lock();
            g.last_used = now;
            let mut fx = std::mem::take(&mut g.fx);
            g.state
                .apply(Command::Checkout { settled: no_ack }, now, &mut fx);
            for e in fx.drain(..) {
                if let Some(Effect::Delivery {
                    id,
                    msg,
                    redelivered,
                    remaining,
                }) = self.absorb(&mut g.sids, e, &mut letters)
                {
                    self.stats.deliver_get.fetch_add(1, Ordering::Relaxed);
                    if redelivered {
                        self.stats.redeliver.fetch_add(1, Ordering::Relaxed);
                    }
                    result = Some(GetResult {
                        id,
                        msg,
                        redelivered,
                        remaining,
                    });
                }
            }
            g.fx = fx;
        }
        self.timer.notify_one();
        self.dead_letter(letters, now);
        result
    }

    pub fn purge(&self) -> u32 {
        let mut g = self.inner.lock();
        let mut fx = Vec::new();
        g.state.apply(Command::Purge, now_ms(), &mut fx);
        let mut letters = Letters::new();
        let mut count = 0;
        for e in fx {
            if let Some(Effect::Purged { count: n }) = self.absorb(&mut g.sids, e, &mut letters) {
                count = n;
            }
        }
        count
    }

    /// The queue's consumers; for a single-active-consumer queue the first is the active one.
    pub fn consumers(&self) -> Vec<Arc<Consumer>> {
        self.inner.lock().consumers.clone()
    }

    pub fn has_exclusive_consumer(&self) -> bool {
        self.inner.lock().consumers.iter().any(|c| c.exclusive)
    }

    /// Attaches a consumer. 403 if exclusivity forbids it.
    pub fn add_consumer(&self, c: Arc<Consumer>) -> crate::error::Result<()> {
        let mut g = self.inner.lock();
        if c.exclusive && !g.consumers.is_empty() || g.consumers.iter().any(|x| x.exclusive) {
            return Err(crate::error::AmqpError::access_refused(format!(
                "queue '{}' in vhost '{}' in exclusive use",
                self.name,
                self.vhost_name()
            )));
        }
        g.had_consumer = true;
        if self.args.single_active_consumer {
            g.consumers.push(c);
        } else {
            let pos = g.consumers.partition_point(|x| x.priority >= c.priority);
            g.consumers.insert(pos, c);
        }
        Ok(())
    }

    /// Detaches a consumer; true if it was the last one of an auto-delete queue (which the
    /// caller then deletes).
    pub fn remove_consumer(&self, tag: &str, channel: &Arc<ChannelShared>) -> bool {
        let mut g = self.inner.lock();
        g.consumers
            .retain(|c| !(c.tag == tag && Arc::ptr_eq(&c.channel, channel)));
        g.last_used = now_ms();
        let last = g.consumers.is_empty();
        drop(g);
        self.timer.notify_one();
        if !last {
            // A single-active-consumer queue promotes the next consumer.
            self.kick();
        }
        last && self.auto_delete && !self.is_deleted()
    }

    /// Marks the queue deleted and tells its consumers (server-sent `basic.cancel`).
    /// Returns the number of ready messages dropped.
    pub fn mark_deleted(&self) -> u32 {
        self.deleted.store(true, Ordering::Release);
        let (count, consumers) = {
            let mut g = self.inner.lock();
            let count = g.state.ready_count() as u32;
            let mut fx = Vec::new();
            g.state.apply(Command::Purge, now_ms(), &mut fx);
            if let Some(store) = &self.store
                && !g.sids.is_empty()
            {
                // One record drops everything the queue had, unacked included.
                let sids: Vec<u64> = g.sids.drain().map(|(_, s)| s).collect();
                store.append(&Record::Purge {
                    vhost: self.vhost_name.clone(),
                    queue: self.name.clone(),
                });
                store.forget(&sids);
            }
            (count, std::mem::take(&mut g.consumers))
        };
        for c in consumers {
            c.channel.consumer_cancelled_by_server(&c.tag);
        }
        self.timer.notify_one();
        count
    }

    fn vhost_name(&self) -> String {
        self.vhost
            .upgrade()
            .map(|v| v.name.clone())
            .unwrap_or_default()
    }

    /// Routes dead letters through the queue's dead-letter exchange.
    fn dead_letter(&self, letters: Letters, now: Millis) {
        if letters.is_empty() {
            return;
        }
        let Some(vhost) = self.vhost.upgrade() else {
            return;
        };
        let (dlx, dlrk) = {
            let g = self.inner.lock();
            let c = g.state.config();
            (
                c.dead_letter_exchange.clone(),
                c.dead_letter_routing_key.clone(),
            )
        };
        let Some(dlx) = dlx else { return };
        for (msg, reason) in letters {
            let (dead, keys) = crate::dead_letter::dead_letter(
                &msg,
                &self.name,
                reason,
                now / 1000,
                &dlx,
                dlrk.as_deref(),
            );
            let dead = Arc::new(dead);
            let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            let Ok(targets) = vhost.route(&dlx, &keys, dead.headers()) else {
                tracing::debug!(queue = %self.name, dlx = %dlx, "dead-letter exchange missing; message dropped");
                continue;
            };
            for t in targets {
                if crate::dead_letter::is_cycle(&dead, &t.name) {
                    continue;
                }
                t.publish(dead.clone(), now);
            }
        }
    }

    /// Expires messages and the queue itself; returns when the timer should next fire.
    fn on_timer(&self) -> Option<Millis> {
        let now = now_ms();
        let mut letters = Letters::new();
        let (next, expire_queue) = {
            let mut g = self.inner.lock();
            let mut fx = std::mem::take(&mut g.fx);
            g.state.apply(Command::Expire, now, &mut fx);
            self.absorb_all(&mut g.sids, &mut fx, &mut letters);
            g.fx = fx;
            let queue_deadline = match g.expires {
                Some(e) if g.consumers.is_empty() => Some(g.last_used + e),
                _ => None,
            };
            let expire_queue = queue_deadline.is_some_and(|d| now >= d);
            let next = match (g.state.next_expiry().map(|t| t + 1), queue_deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            (next, expire_queue)
        };
        self.dead_letter(letters, now);
        if expire_queue && let Some(v) = self.vhost.upgrade() {
            tracing::debug!(queue = %self.name, "queue expired (x-expires)");
            v.remove_queue(&self.name);
            return None;
        }
        next
    }
}

/// One timer task per queue: message TTL and queue expiry. Holds only a weak reference, so a
/// deleted queue's task ends.
async fn run_timer(q: Weak<Queue>) {
    loop {
        let (next, timer) = {
            let Some(q) = q.upgrade() else { return };
            if q.is_deleted() {
                return;
            }
            (q.on_timer(), q.timer.clone())
        };
        // Re-check at least every few seconds, so a queue dropped without being marked
        // deleted still ends its task.
        let wait = match next {
            Some(at) => at.saturating_sub(now_ms()).clamp(1, 5_000),
            None => 5_000,
        };
        let _ = tokio::time::timeout(Duration::from_millis(wait), timer.notified()).await;
    }
}
