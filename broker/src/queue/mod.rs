//! A queue on this node: the deterministic [`state::QueueState`] plus what only a running node
//! has — consumers, their credit, the targets deliveries are written to, timers, and the
//! dead letters of what the state machine hands out.
//!
//! The queue imports nothing above it. It delivers to a [`DeliveryTarget`] (a channel
//! implements it; see [`delivery`]), hands dead letters and its own expiry to the
//! [`DeadLetterSink`] its vhost installed (see [`sink`]), and is woken by a drained connection
//! outbox through [`crate::outbox::Wake`]. A replicated or remote queue keeps the same seams.
//!
//! Concurrency: each queue sits behind one mutex, taken by whichever task acts on it (the
//! publishing connection, the acking connection, the queue's timer, a writer that drained).
//! Nothing awaits while holding it.
//!
//! Paging (see [`crate::paging`]): after each operation the queue reports the bytes of bodies
//! it holds to the node's budget and, over it, pages out its least-soon-needed messages.
//! Consumers never wait on a disk read under the lock: paged messages ahead of delivery are
//! read back in batches on a blocking thread, and delivery resumes when they arrive. Only
//! `basic.get`, and a dead letter whose content is paged out, read under the lock.
//!
//! Lock order is queue → delivery target (a channel's deliveries) → connection outbox; dead
//! letters go to the sink only after the queue lock is released, so queues dead-lettering
//! into each other cannot deadlock.

pub mod args;
pub mod delivery;
pub mod sink;
pub mod state;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use amq_protocol::types::FieldTable;
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::message::Message;
use crate::outbox::Wake;
use crate::paging::{PageRef, Paging};
use crate::store::log::{EnqueueRef, MessageLog, Record, RecoveredMessage};
use args::QueueArgs;
pub use delivery::{DeliveryTarget, TargetId, TargetOwner};
pub use sink::{DeadLetter, DeadLetterSink};
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
    /// Where its deliveries go (a channel on this node).
    pub target: Arc<dyn DeliveryTarget>,
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
            && self.target.has_credit()
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
    /// Where each message with a copy on disk has it: in the message log (persistent messages
    /// of a durable queue, from the start) or in a page file (once paged out).
    pages: HashMap<MsgId, PageRef>,
    fx: Vec<Effect>,
    /// Resident body bytes last reported to the node's budget.
    accounted: u64,
    /// A batch of paged messages is being read back.
    reading: bool,
    /// Checkouts since the queue last looked whether to read ahead.
    checkouts: u32,
}

/// Ready messages above which a queue whose deliveries wait on full connection buffers asks
/// its publishers to pause.
const FLOW_BACKLOG: u64 = 1000;

/// Dead letters collected under the lock, published after it is released, and the message
/// log's removals of those messages. The removals are appended when this is dropped — after
/// the letters were republished, so the target queues' enqueue records come first in the log:
/// a crash in between leaves a dead-lettered persistent message in both queues (at least
/// once), never in neither.
#[derive(Default)]
struct Letters {
    list: Vec<(Arc<Message>, DeadLetterReason)>,
    removes: Vec<Record>,
    store: Option<Arc<MessageLog>>,
}

impl Letters {
    fn new() -> Self {
        Self::default()
    }

    fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
}

impl Drop for Letters {
    fn drop(&mut self) {
        if let Some(store) = &self.store {
            for r in self.removes.drain(..) {
                store.append(&r);
            }
        }
    }
}

/// Most messages read back in one batch (besides the byte bound, the budget's 1/16).
const READ_AHEAD_COUNT: usize = 1024;
/// A queue looks whether to read ahead every this many checkouts (and whenever the next
/// message is paged out).
const READ_AHEAD_EVERY: u32 = 32;

pub struct Queue {
    pub name: String,
    pub durable: bool,
    pub auto_delete: bool,
    /// The connection that owns an exclusive queue.
    pub exclusive_owner: Option<u64>,
    pub arguments: FieldTable,
    /// The client's arguments, validated (policies are applied on top, in the state).
    pub args: QueueArgs,
    /// The vhost's routing of dead letters and removal on expiry.
    sink: Weak<dyn DeadLetterSink>,
    me: Weak<Queue>,
    /// `me`, as what a full connection outbox wakes when it drains.
    waker: Weak<dyn Wake>,
    inner: Mutex<Inner>,
    timer: Arc<Notify>,
    pub stats: QueueStats,
    /// The node's message log, for durable queues of a node with storage.
    store: Option<Arc<MessageLog>>,
    /// The node's memory budget for bodies and its page files, on a node with storage.
    paging: Option<Arc<Paging>>,
    /// Resident body bytes (as last accounted), read without the lock by the pager.
    resident: AtomicU64,
    vhost_name: String,
    deleted: AtomicBool,
    /// Replaced by a replicated queue of the same name: its consumers were cancelled and
    /// its messages are being moved out.
    moved: AtomicBool,
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
    /// Refused because the node's message log failed (see [`MessageLog::failure`]): a
    /// persistent message for a durable queue cannot be kept, and holding it in memory only
    /// would grow without bound and lose it at the next restart.
    pub store_failed: bool,
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
        vhost_name: String,
        sink: Weak<dyn DeadLetterSink>,
        effective: (state::QueueConfig, Option<u64>),
        store: Option<Arc<MessageLog>>,
        paging: Option<Arc<Paging>>,
    ) -> Arc<Self> {
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
                pages: HashMap::new(),
                fx: Vec::new(),
                accounted: 0,
                reading: false,
                checkouts: 0,
            }),
            arguments,
            args,
            sink,
            me: me.clone(),
            waker: me.clone(),
            timer: Arc::new(Notify::new()),
            stats: QueueStats::default(),
            store: if durable { store } else { None },
            paging,
            resident: AtomicU64::new(0),
            vhost_name,
            deleted: AtomicBool::new(false),
            moved: AtomicBool::new(false),
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

    /// Deleted, or replaced by a replicated queue: its consumers are cancelled and their tags
    /// free again on their channels.
    pub fn is_retired(&self) -> bool {
        self.is_deleted() || self.moved.load(Ordering::Acquire)
    }

    /// Marks the queue replaced by a replicated queue of the same name and cancels its
    /// consumers (server-sent `basic.cancel`); what they hold unacknowledged stays theirs
    /// to ack, reject or return here.
    pub fn cancel_consumers_for_move(&self) {
        self.moved.store(true, Ordering::Release);
        let consumers = std::mem::take(&mut self.inner.lock().consumers);
        for c in consumers {
            c.target.cancelled_by_server(&c.tag);
        }
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
            .map(|c| {
                let o = c.target.owner();
                (o.connection, o.channel)
            })
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
                store_failed: false,
            };
        }
        if msg.persistent()
            && let Some(store) = &self.store
            && store.failure().is_some()
        {
            return Published {
                accepted: false,
                wait_for: 0,
                store_failed: true,
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
            // The enqueue record goes first: drop-head may remove the new message at once.
            let mut logged = None;
            for e in &fx {
                if let Effect::Accepted { id } = *e
                    && persist
                    && let Some(store) = &self.store
                {
                    let sid = store.next_sid();
                    let expires_at = g.state.expires_at(id);
                    wait_for = store.append_enqueue(
                        &EnqueueRef {
                            sid,
                            vhost: &self.vhost_name,
                            queue: &self.name,
                            expires_at,
                            exchange: &msg.exchange,
                            routing_key: &msg.routing_key,
                            header_payload: &msg.header_payload,
                            body: &msg.body,
                        },
                        &msg.body,
                    );
                    g.pages.insert(id, PageRef::Log(sid));
                    logged = Some(id);
                }
            }
            self.absorb(&mut g, &mut fx, &mut letters);
            fx.clear();
            g.fx = fx;
            self.deliver_ready(&mut g, now, &mut letters);
            if logged.is_some_and(|id| !g.pages.contains_key(&id)) {
                // Gone already (taken by an autoack consumer, or dropped by an overflow
                // policy): the queue no longer keeps it, so the confirm need not wait for the
                // disk — as RabbitMQ confirms a message its consumer took before it was
                // written.
                wait_for = 0;
            }
            self.account(&mut g);
            wake_timer = g.state.next_expiry().is_some() && g.state.next_expiry() != had_expiry;
        }
        if wake_timer {
            self.timer.notify_one();
        }
        self.dead_letter(letters, now);
        Published {
            accepted,
            wait_for,
            store_failed: false,
        }
    }

    /// Puts recovered messages back, in their original order, marked redelivered if they may
    /// have been delivered before the restart (see [`MessageLog::mark_delivered`]). Their
    /// content stays in the log until the queue reads it back ahead of its consumers.
    pub fn restore(&self, messages: Vec<RecoveredMessage>) {
        let mut g = self.inner.lock();
        let mut fx = std::mem::take(&mut g.fx);
        let now = now_ms();
        for m in messages {
            g.state.apply(
                Command::Restore {
                    msg: None,
                    size: m.size,
                    priority: m.priority,
                    expires_at: m.expires_at,
                    redelivered: m.redelivered,
                },
                now,
                &mut fx,
            );
            // Redelivered after a crash without a marker: the next clean restart must still
            // say so.
            if m.redelivered
                && let Some(store) = &self.store
            {
                store.mark_delivered(m.sid);
            }
            for e in fx.drain(..) {
                if let Effect::Accepted { id } = e {
                    g.pages.insert(id, PageRef::Log(m.sid));
                }
            }
        }
        g.fx = fx;
        self.start_read_ahead(&mut g);
        self.account(&mut g);
        drop(g);
        self.timer.notify_one();
    }

    /// Handles what any command may produce besides its own result: dead letters (routed
    /// after the lock is released; paged ones are read back first, while their copy on disk
    /// still exists) and removals (recorded in the message log, or a page file's space
    /// released). Leaves in `fx` the effects it does not handle.
    fn absorb(&self, g: &mut Inner, fx: &mut Vec<Effect>, letters: &mut Letters) {
        let paged: Vec<MsgId> = fx
            .iter()
            .filter_map(|e| match e {
                Effect::DeadLetter {
                    id: Some(id),
                    msg: None,
                    ..
                } => Some(*id),
                _ => None,
            })
            .collect();
        let mut read = if paged.is_empty() {
            HashMap::new()
        } else {
            self.read_now(g, &paged)
        };
        let dead: std::collections::HashSet<MsgId> = fx
            .iter()
            .filter_map(|e| match e {
                Effect::DeadLetter { id: Some(id), .. } => Some(*id),
                _ => None,
            })
            .collect();
        fx.retain_mut(|e| match e {
            Effect::DeadLetter { id, msg, reason } => {
                match msg.take().or_else(|| id.and_then(|id| read.remove(&id))) {
                    Some(m) => letters.list.push((m, *reason)),
                    None => tracing::error!(
                        queue = %self.name,
                        "a paged-out message could not be read back to be dead-lettered; dropped"
                    ),
                }
                false
            }
            Effect::Removed { id } => {
                match (&self.store, g.pages.get(id)) {
                    // Dead-lettered: its removal waits until the letter is republished.
                    (Some(store), Some(PageRef::Log(sid))) if dead.contains(id) => {
                        letters.removes.push(Record::Remove {
                            vhost: self.vhost_name.clone(),
                            queue: self.name.clone(),
                            sid: *sid,
                        });
                        letters.store.get_or_insert_with(|| store.clone());
                        g.pages.remove(id);
                    }
                    _ => self.forget(&mut g.pages, *id),
                }
                false
            }
            _ => true,
        });
    }

    /// A message is delivered for the first time: the log notes it (lazily), so a clean
    /// restart knows which recovered messages were never delivered.
    fn note_delivered(&self, g: &Inner, id: MsgId) {
        if let (Some(store), Some(PageRef::Log(sid))) = (&self.store, g.pages.get(&id)) {
            store.mark_delivered(*sid);
        }
    }

    /// A message left the queue for good: what it had on disk goes too.
    fn forget(&self, pages: &mut HashMap<MsgId, PageRef>, id: MsgId) {
        match pages.remove(&id) {
            Some(PageRef::Log(sid)) => {
                if let Some(store) = &self.store {
                    store.append(&Record::Remove {
                        vhost: self.vhost_name.clone(),
                        queue: self.name.clone(),
                        sid,
                    });
                }
            }
            Some(r @ PageRef::Page(_)) => {
                if let Some(p) = &self.paging {
                    p.release(r);
                }
            }
            None => {}
        }
    }

    /// Reads paged messages back under the lock (for `basic.get` and dead letters; consumers
    /// use [`Self::start_read_ahead`]). Messages that cannot be read are reported and left to
    /// the caller.
    fn read_now(&self, g: &Inner, ids: &[MsgId]) -> HashMap<MsgId, Arc<Message>> {
        let Some(paging) = &self.paging else {
            return HashMap::new();
        };
        let refs: Vec<(MsgId, PageRef)> = ids
            .iter()
            .filter_map(|id| g.pages.get(id).map(|r| (*id, *r)))
            .collect();
        let read = paging.read(&refs.iter().map(|(_, r)| *r).collect::<Vec<_>>());
        let mut out = HashMap::new();
        for ((id, _), m) in refs.into_iter().zip(read) {
            match m {
                Ok(m) => {
                    out.insert(id, m);
                }
                Err(e) => {
                    tracing::error!(queue = %self.name, "cannot read a paged-out message back: {e}")
                }
            }
        }
        out
    }

    /// Makes sure the next message to deliver is in memory, reading a batch back now.
    /// Messages that are lost (unreadable) are discarded.
    fn page_in_now(&self, g: &mut Inner, letters: &mut Letters) {
        if !g.state.next_is_paged() {
            return;
        }
        let Some(paging) = &self.paging else { return };
        let b = paging.batch_bytes();
        let mut ids = g.state.read_ahead(b / 2, b, READ_AHEAD_COUNT);
        if ids.is_empty() {
            return;
        }
        let mut read = self.read_now(g, &ids);
        ids.retain(|id| !read.contains_key(id));
        let msgs: Vec<(MsgId, Arc<Message>)> = read.drain().collect();
        self.apply(g, Command::PageIn { msgs }, letters);
        if !ids.is_empty() {
            tracing::error!(queue = %self.name, lost = ids.len(), "paged-out messages could not be read back; dropped");
            self.apply(g, Command::Discard { ids }, letters);
        }
    }

    /// Applies a command whose only effects are removals and dead letters.
    fn apply(&self, g: &mut Inner, cmd: Command, letters: &mut Letters) {
        let mut fx = std::mem::take(&mut g.fx);
        g.state.apply(cmd, now_ms(), &mut fx);
        self.absorb(g, &mut fx, letters);
        fx.clear();
        g.fx = fx;
    }

    /// Starts reading the next paged messages back on a blocking thread if the queue's head
    /// in memory runs short; delivery resumes when they arrive ([`Self::paged_in`]).
    fn start_read_ahead(&self, g: &mut Inner) {
        let Some(paging) = &self.paging else { return };
        if g.reading || g.state.paged_ready() == 0 {
            return;
        }
        let b = paging.batch_bytes();
        let ids = g.state.read_ahead(b / 2, b, READ_AHEAD_COUNT);
        if ids.is_empty() {
            return;
        }
        let refs: Vec<(MsgId, PageRef)> = ids
            .iter()
            .filter_map(|id| g.pages.get(id).map(|r| (*id, *r)))
            .collect();
        if tokio::runtime::Handle::try_current().is_err() {
            let mut letters = Letters::new();
            self.page_in_now(g, &mut letters);
            return;
        }
        g.reading = true;
        let me = self.me.clone();
        let paging = paging.clone();
        tokio::task::spawn_blocking(move || {
            let read = paging.read(&refs.iter().map(|(_, r)| *r).collect::<Vec<_>>());
            if let Some(q) = me.upgrade() {
                q.paged_in(ids, refs.into_iter().map(|(id, _)| id).zip(read).collect());
            }
        });
    }

    /// A batch read back by [`Self::start_read_ahead`] arrived: `wanted` were asked for,
    /// `read` holds what was found for them.
    fn paged_in(&self, wanted: Vec<MsgId>, read: Vec<(MsgId, std::io::Result<Arc<Message>>)>) {
        let now = now_ms();
        let mut letters = Letters::new();
        {
            let mut g = self.inner.lock();
            g.reading = false;
            if self.is_deleted() {
                return;
            }
            let mut msgs = Vec::with_capacity(read.len());
            let mut lost: Vec<MsgId> = wanted
                .iter()
                .filter(|id| !g.pages.contains_key(id))
                .copied()
                .collect();
            for (id, m) in read {
                match m {
                    Ok(m) => msgs.push((id, m)),
                    // Written moments ago and not yet on disk: try again later.
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                        tracing::warn!(queue = %self.name, "paging in: {e}");
                    }
                    Err(e) => {
                        // The message may have left the queue meanwhile (then this is moot).
                        if g.pages.contains_key(&id) {
                            tracing::error!(queue = %self.name, "cannot read a paged-out message back: {e}; dropped");
                            lost.push(id);
                        }
                    }
                }
            }
            self.apply(&mut g, Command::PageIn { msgs }, &mut letters);
            if !lost.is_empty() {
                self.apply(&mut g, Command::Discard { ids: lost }, &mut letters);
            }
            self.deliver_ready(&mut g, now, &mut letters);
            self.account(&mut g);
        }
        self.dead_letter(letters, now);
    }

    /// Reports this queue's resident bytes to the node's budget; over budget, pages out.
    fn account(&self, g: &mut Inner) {
        let Some(paging) = &self.paging else { return };
        let deleted = self.is_deleted();
        let now = if deleted { 0 } else { g.state.resident_bytes() };
        paging.account(g.accounted, now);
        g.accounted = now;
        if !deleted && paging.over_budget() {
            let want = paging.resident().saturating_sub(paging.target());
            self.page_out(g, paging, want);
            if paging.over_budget() {
                paging.wake_pager();
            }
        }
        self.resident.store(g.accounted, Ordering::Relaxed);
    }

    /// Pages out up to `want` bytes of bodies, keeping the head of the queue in memory.
    fn page_out(&self, g: &mut Inner, paging: &Arc<Paging>, want: u64) {
        let keep = 2 * paging.batch_bytes();
        let pages = &g.pages;
        let candidates = g
            .state
            .page_out_candidates(keep, 2 * READ_AHEAD_COUNT, want, |id| {
                pages.contains_key(&id)
            });
        if candidates.is_empty() {
            return;
        }
        let mut ids = Vec::with_capacity(candidates.len());
        let mut to_write = Vec::new();
        for (id, m) in &candidates {
            if g.pages.contains_key(id) {
                ids.push(*id);
            } else {
                to_write.push((*id, m));
            }
        }
        if !to_write.is_empty() {
            let msgs: Vec<&Message> = to_write.iter().map(|(_, m)| m.as_ref()).collect();
            match paging.write(&msgs) {
                Ok(refs) => {
                    for ((id, _), r) in to_write.iter().zip(refs) {
                        g.pages.insert(*id, r);
                        ids.push(*id);
                    }
                }
                // Those stay in memory; the memory alarm is the backstop.
                Err(e) => tracing::error!(queue = %self.name, "cannot write to a page file: {e}"),
            }
        }
        let mut fx = std::mem::take(&mut g.fx);
        g.state.apply(Command::PageOut { ids }, now_ms(), &mut fx);
        fx.clear();
        g.fx = fx;
        let now = g.state.resident_bytes();
        paging.account(g.accounted, now);
        g.accounted = now;
    }

    /// Called by the pager when the node is over its budget.
    pub fn page_out_for_node(&self) {
        let Some(paging) = &self.paging else { return };
        let mut g = self.inner.lock();
        if self.is_deleted() {
            return;
        }
        let want = paging.resident().saturating_sub(paging.target());
        self.page_out(&mut g, paging, want);
        self.resident.store(g.accounted, Ordering::Relaxed);
    }

    /// Body bytes this queue holds in memory (as last accounted).
    pub fn resident_bytes(&self) -> u64 {
        self.resident.load(Ordering::Relaxed)
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
                let writable = c.target.writable(&self.waker);
                credit_but_full |= !writable;
                writable
            }) else {
                return credit_but_full;
            };
            if g.state.paged_ready() > 0 {
                g.checkouts = g.checkouts.wrapping_add(1);
                if g.state.next_is_paged() {
                    // Wait for the batch being read (or start one): its arrival delivers.
                    self.start_read_ahead(g);
                    if g.state.next_is_paged() {
                        return false;
                    }
                } else if g.checkouts.is_multiple_of(READ_AHEAD_EVERY) {
                    self.start_read_ahead(g);
                }
            }
            let c = g.consumers[i].clone();
            let mut fx = std::mem::take(&mut g.fx);
            g.state
                .apply(Command::Checkout { settled: c.no_ack }, now, &mut fx);
            self.absorb(g, &mut fx, letters);
            let mut delivered = None;
            for e in fx.drain(..) {
                if let Effect::Delivery {
                    id,
                    msg,
                    redelivered,
                    ..
                } = e
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
            let Some(msg) = msg.or_else(|| self.read_now(g, &[id]).remove(&id)) else {
                // Lost on disk: nothing to deliver.
                self.apply(g, Command::Discard { ids: vec![id] }, letters);
                continue;
            };
            if !redelivered {
                self.note_delivered(g, id);
            }
            if !c.target.deliver(&c, &me, id, &msg, redelivered) && !c.no_ack {
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
            self.apply(&mut g, Command::SetConfig(config), &mut letters);
            self.deliver_ready(&mut g, now, &mut letters);
            self.account(&mut g);
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
            self.account(&mut g);
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
            self.apply(&mut g, Command::Settle { ids, how }, &mut letters);
            self.deliver_ready(&mut g, now, &mut letters);
            self.account(&mut g);
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
            loop {
                self.page_in_now(&mut g, &mut letters);
                let mut fx = std::mem::take(&mut g.fx);
                g.state
                    .apply(Command::Checkout { settled: no_ack }, now, &mut fx);
                self.absorb(&mut g, &mut fx, &mut letters);
                let mut delivered = None;
                for e in fx.drain(..) {
                    if let Effect::Delivery {
                        id,
                        msg,
                        redelivered,
                        remaining,
                    } = e
                    {
                        delivered = Some((id, msg, redelivered, remaining));
                    }
                }
                g.fx = fx;
                let Some((id, msg, redelivered, remaining)) = delivered else {
                    break;
                };
                let Some(msg) = msg.or_else(|| self.read_now(&g, &[id]).remove(&id)) else {
                    self.apply(&mut g, Command::Discard { ids: vec![id] }, &mut letters);
                    continue;
                };
                if !redelivered {
                    self.note_delivered(&g, id);
                }
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
                break;
            }
            self.account(&mut g);
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
        self.absorb(&mut g, &mut fx, &mut letters);
        let count = fx
            .iter()
            .find_map(|e| match e {
                Effect::Purged { count } => Some(*count),
                _ => None,
            })
            .unwrap_or(0);
        self.account(&mut g);
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
        // Checked under the lock that `cancel_consumers_for_move` takes after setting it: a
        // consumer is either cancelled with the others or refused here.
        if self.moved.load(Ordering::Acquire) {
            return Err(crate::error::AmqpError::not_found(format!(
                "queue '{}' in vhost '{}' was just replaced by a replicated queue (a policy's \
                 ha-mode); consume again",
                self.name, self.vhost_name
            )));
        }
        if c.exclusive && !g.consumers.is_empty() || g.consumers.iter().any(|x| x.exclusive) {
            return Err(crate::error::AmqpError::access_refused(format!(
                "queue '{}' in vhost '{}' in exclusive use",
                self.name, self.vhost_name
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
    pub fn remove_consumer(&self, tag: &str, target: TargetId) -> bool {
        let mut g = self.inner.lock();
        g.consumers
            .retain(|c| !(c.tag == tag && c.target.target_id() == target));
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
            let mut sids = Vec::new();
            for (_, r) in g.pages.drain() {
                match r {
                    PageRef::Log(sid) => sids.push(sid),
                    PageRef::Page(_) => {
                        if let Some(p) = &self.paging {
                            p.release(r);
                        }
                    }
                }
            }
            if let Some(store) = &self.store
                && !sids.is_empty()
            {
                // One record drops everything the queue had, unacked included.
                store.purge(&self.vhost_name, &self.name, &sids);
            }
            self.account(&mut g);
            (count, std::mem::take(&mut g.consumers))
        };
        for c in consumers {
            c.target.cancelled_by_server(&c.tag);
        }
        self.timer.notify_one();
        count
    }

    /// Builds the dead letters and hands them to the vhost, which routes them through the
    /// queue's dead-letter exchange. Called without the queue's lock; `letters`' held-back
    /// remove records are appended when it drops, after the sink has republished.
    fn dead_letter(&self, mut letters: Letters, now: Millis) {
        if letters.is_empty() {
            return;
        }
        let Some(sink) = self.sink.upgrade() else {
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
        for (msg, reason) in std::mem::take(&mut letters.list) {
            let (dead, keys) = crate::dead_letter::dead_letter(
                &msg,
                &self.name,
                reason,
                now / 1000,
                &dlx,
                dlrk.as_deref(),
            );
            let letter = DeadLetter {
                msg: Arc::new(dead),
                routing_keys: keys,
            };
            if !sink.dead_letter(&dlx, letter, now) {
                tracing::debug!(queue = %self.name, dlx = %dlx, "dead-letter exchange missing; message dropped");
            }
        }
    }

    /// Expires messages and the queue itself; returns when the timer should next fire.
    fn on_timer(&self) -> Option<Millis> {
        let now = now_ms();
        let mut letters = Letters::new();
        let (next, expire_queue) = {
            let mut g = self.inner.lock();
            self.apply(&mut g, Command::Expire, &mut letters);
            self.account(&mut g);
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
        if expire_queue && let Some(sink) = self.sink.upgrade() {
            tracing::debug!(queue = %self.name, "queue expired (x-expires)");
            sink.queue_expired(&self.name);
            return None;
        }
        next
    }
}

impl Wake for Queue {
    /// A connection this queue stopped delivering to drained: deliver again.
    fn wake(&self) {
        self.kick();
    }
}

impl Drop for Queue {
    /// A queue dropped without being deleted (its vhost went) still gives back its share of
    /// the node's memory budget.
    fn drop(&mut self) {
        if let Some(p) = &self.paging {
            let g = self.inner.get_mut();
            p.account(g.accounted, 0);
            for (_, r) in g.pages.drain() {
                p.release(r);
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::delivery::{TargetId, TargetOwner};

    /// A consumer's channel that only records server-sent cancels (no real channel exists in
    /// a unit test of the queue alone).
    #[derive(Debug, Default)]
    struct Recorder {
        cancelled: parking_lot::Mutex<Vec<String>>,
    }

    impl DeliveryTarget for Recorder {
        fn target_id(&self) -> TargetId {
            TargetId::of(self)
        }
        fn has_credit(&self) -> bool {
            false
        }
        fn writable(&self, _: &Weak<dyn Wake>) -> bool {
            false
        }
        fn deliver(
            &self,
            _: &Arc<Consumer>,
            _: &Arc<Queue>,
            _: MsgId,
            _: &Message,
            _: bool,
        ) -> bool {
            false
        }
        fn cancelled_by_server(&self, consumer_tag: &str) {
            self.cancelled.lock().push(consumer_tag.to_owned());
        }
        fn owner(&self) -> TargetOwner<'_> {
            TargetOwner {
                connection: 1,
                channel: 1,
                connection_name: "test",
                peer: ([127, 0, 0, 1], 1).into(),
                user: "guest",
            }
        }
    }

    fn consumer(tag: &str, target: &Arc<Recorder>) -> Arc<Consumer> {
        Arc::new(Consumer {
            tag: tag.into(),
            target: target.clone(),
            no_ack: false,
            prefetch: 0,
            unacked: AtomicU32::new(0),
            priority: 0,
            exclusive: false,
            stats: Default::default(),
        })
    }

    #[test]
    fn a_queue_replaced_for_a_move_cancels_its_consumers_and_refuses_new_ones() {
        let no_sink: Weak<dyn DeadLetterSink> = Weak::<crate::vhost::Vhost>::new();
        let q = Queue::new(
            "q".into(),
            true,
            false,
            None,
            FieldTable::default(),
            args::parse(&FieldTable::default(), "q", "/").expect("no arguments"),
            "/".into(),
            no_sink,
            (state::QueueConfig::default(), None),
            None,
            None,
        );
        let target = Arc::new(Recorder::default());
        q.add_consumer(consumer("before", &target))
            .expect("a consumer");
        assert!(!q.is_retired());
        q.cancel_consumers_for_move();
        assert!(q.is_retired());
        assert_eq!(*target.cancelled.lock(), vec!["before".to_owned()]);
        assert_eq!(q.consumer_count(), 0);
        let e = q
            .add_consumer(consumer("after", &target))
            .expect_err("a retired queue takes no consumer");
        assert_eq!(e.code, 404, "{}", e.text);
        assert!(e.text.contains("consume again"), "{}", e.text);
    }
}
