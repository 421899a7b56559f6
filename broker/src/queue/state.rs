//! The queue as a deterministic state machine: commands in, effects out.
//!
//! Nothing here reads a clock, does I/O or draws random numbers: time arrives as an argument
//! of every command, and the caller decides which consumer a message is checked out to. Given
//! the same commands, two replicas reach the same state, which is what the durability issue
//! (persisting commands) and the clustering issue (replicating them through Raft) build on.
//!
//! Ready messages are kept in order of arrival (one list per priority level); a requeued
//! message goes back to its original position, found by its id, which only ever increases.
//!
//! Paging: a message's content may be out of memory (its entry keeps only id, size, level,
//! deadline and flags). Which messages to page out or read back is asked of the state
//! ([`QueueState::page_out_candidates`], [`QueueState::read_ahead`]) and applied as commands
//! ([`Command::PageOut`], [`Command::PageIn`]); where the content went is the runtime's
//! business. Effects that hand a message out (`Delivery`, `DeadLetter`) carry `None` for a
//! paged one, with its id, for the runtime to read back.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::message::Message;

pub type Millis = u64;
pub type MsgId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overflow {
    #[default]
    DropHead,
    RejectPublish,
    RejectPublishDlx,
}

/// Limits and dead-lettering settings, from queue arguments and policies.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueConfig {
    pub message_ttl: Option<u64>,
    pub max_length: Option<u64>,
    pub max_length_bytes: Option<u64>,
    pub overflow: Overflow,
    pub dead_letter_exchange: Option<String>,
    pub dead_letter_routing_key: Option<String>,
    pub max_priority: Option<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterReason {
    Rejected,
    Expired,
    MaxLen,
    /// Returned more often than a replicated queue's `x-delivery-limit` allows.
    DeliveryLimit,
}

impl DeadLetterReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::Rejected => "rejected",
            DeadLetterReason::Expired => "expired",
            DeadLetterReason::MaxLen => "maxlen",
            DeadLetterReason::DeliveryLimit => "delivery_limit",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    Ack,
    Requeue,
    /// Reject without requeue: dead-letter if configured, else drop.
    Discard,
}

/// Inputs of the state machine.
#[derive(Debug, Clone)]
pub enum Command {
    Enqueue {
        msg: Arc<Message>,
    },
    /// A message recovered from disk: its deadline and redelivered flag are kept, no limits
    /// are applied (it was accepted before the restart). `msg` is `None` when only its
    /// metadata is in memory (its content stays on disk until read back).
    Restore {
        msg: Option<Arc<Message>>,
        size: u64,
        priority: u8,
        expires_at: Option<Millis>,
        redelivered: bool,
    },
    /// Take the next live ready message. With `settled` (no-ack consumers, `basic.get`
    /// no-ack) it leaves the queue at once; otherwise it waits as unacked.
    Checkout {
        settled: bool,
    },
    Settle {
        ids: Vec<MsgId>,
        how: Settlement,
    },
    /// Drop (and dead-letter) messages whose deadline has passed.
    Expire,
    Purge,
    SetConfig(QueueConfig),
    /// Drop the in-memory content of these messages (ready or unacked): the runtime has a
    /// copy on disk. Unknown or already paged ids are ignored.
    PageOut {
        ids: Vec<MsgId>,
    },
    /// Content read back from disk. Ids no longer in the queue, or already in memory, are
    /// ignored.
    PageIn {
        msgs: Vec<(MsgId, Arc<Message>)>,
    },
    /// Remove messages whose content is lost (unreadable from disk): they leave the queue as
    /// `Removed`, without dead-lettering.
    Discard {
        ids: Vec<MsgId>,
    },
}

/// Outputs of the state machine.
#[derive(Debug, Clone)]
pub enum Effect {
    /// The enqueued message was accepted (`Enqueue`) under this id.
    Accepted {
        id: MsgId,
    },
    /// The queue refused the message (reject-publish overflow): the publisher gets a nack.
    Refused,
    /// A checked-out message (`None`: paged out, to be read back by id).
    Delivery {
        id: MsgId,
        msg: Option<Arc<Message>>,
        redelivered: bool,
        /// Ready messages left after this one (for `basic.get-ok`).
        remaining: u32,
    },
    /// `Checkout` found nothing.
    Empty,
    /// A message to dead-letter. `id` is the message's, if it had been accepted (`msg` is
    /// `None` when paged out: the runtime reads it back by id before releasing it).
    DeadLetter {
        id: Option<MsgId>,
        msg: Option<Arc<Message>>,
        reason: DeadLetterReason,
    },
    Purged {
        count: u32,
    },
    /// The message left the queue for good (acked, consumed without ack, discarded, expired,
    /// dropped or purged): what a persistent store must forget.
    Removed {
        id: MsgId,
    },
}

#[derive(Debug, Clone)]
struct Entry {
    id: MsgId,
    /// `None` while paged out.
    msg: Option<Arc<Message>>,
    /// Body size (what `x-max-length-bytes` and the memory budget count).
    size: u64,
    expires_at: Option<Millis>,
    redelivered: bool,
    level: usize,
}

#[derive(Debug, Default)]
pub struct QueueState {
    config: QueueConfig,
    /// Ready messages by priority level (index 0 = lowest).
    ready: Vec<VecDeque<Entry>>,
    unacked: HashMap<MsgId, Entry>,
    next_id: MsgId,
    ready_count: u64,
    ready_bytes: u64,
    unacked_bytes: u64,
    /// Body bytes in memory, ready and unacked, and of those the ready ones.
    resident_bytes: u64,
    ready_resident_bytes: u64,
    /// Ready messages whose content is paged out.
    paged_ready: u64,
}

impl QueueState {
    pub fn new(config: QueueConfig) -> Self {
        let levels = config.max_priority.map_or(1, |p| p as usize + 1);
        Self {
            config,
            ready: (0..levels).map(|_| VecDeque::new()).collect(),
            next_id: 1,
            ..Default::default()
        }
    }

    pub fn config(&self) -> &QueueConfig {
        &self.config
    }
    pub fn ready_count(&self) -> u64 {
        self.ready_count
    }
    pub fn unacked_count(&self) -> u64 {
        self.unacked.len() as u64
    }
    pub fn ready_bytes(&self) -> u64 {
        self.ready_bytes
    }
    pub fn unacked_bytes(&self) -> u64 {
        self.unacked_bytes
    }
    /// Body bytes held in memory (ready and unacked messages).
    pub fn resident_bytes(&self) -> u64 {
        self.resident_bytes
    }
    /// Ready messages whose content is paged out.
    pub fn paged_ready(&self) -> u64 {
        self.paged_ready
    }

    /// The earliest deadline among messages at the head of each level, if any.
    pub fn next_expiry(&self) -> Option<Millis> {
        self.ready
            .iter()
            .filter_map(|l| l.front().and_then(|e| e.expires_at))
            .min()
    }

    pub fn apply(&mut self, cmd: Command, now: Millis, out: &mut Vec<Effect>) {
        match cmd {
            Command::Enqueue { msg } => self.enqueue(msg, now, out),
            Command::Restore {
                msg,
                size,
                priority,
                expires_at,
                redelivered,
            } => {
                let id = self.push(msg, size, priority, expires_at, redelivered);
                out.push(Effect::Accepted { id });
            }
            Command::Checkout { settled } => self.checkout(settled, now, out),
            Command::Settle { ids, how } => {
                for id in ids {
                    self.settle(id, how, out);
                }
            }
            Command::Expire => self.expire(now, out),
            Command::Purge => {
                let count = self.ready_count as u32;
                for l in &mut self.ready {
                    out.extend(l.drain(..).map(|e| Effect::Removed { id: e.id }));
                }
                self.resident_bytes -= self.ready_resident_bytes;
                self.ready_count = 0;
                self.ready_bytes = 0;
                self.ready_resident_bytes = 0;
                self.paged_ready = 0;
                out.push(Effect::Purged { count });
            }
            Command::SetConfig(config) => {
                // Priority levels are fixed at declaration (as in RabbitMQ).
                let max_priority = self.config.max_priority;
                self.config = QueueConfig {
                    max_priority,
                    ..config
                };
                self.enforce_limits(out);
            }
            Command::PageOut { ids } => {
                for id in ids {
                    self.page_out(id);
                }
            }
            Command::PageIn { msgs } => {
                for (id, msg) in msgs {
                    self.page_in(id, msg);
                }
            }
            Command::Discard { ids } => {
                for id in ids {
                    let e = match self.unacked.remove(&id) {
                        Some(e) => {
                            self.unacked_bytes -= e.size;
                            Some(e)
                        }
                        None => self.take_ready(id),
                    };
                    if let Some(e) = e {
                        self.dropped(&e);
                        out.push(Effect::Removed { id });
                    }
                }
            }
        }
    }

    fn dead_lettering(&self) -> bool {
        self.config.dead_letter_exchange.is_some()
    }

    fn over_limit(&self, extra_count: u64, extra_bytes: u64) -> bool {
        self.config
            .max_length
            .is_some_and(|m| self.ready_count + extra_count > m)
            || self
                .config
                .max_length_bytes
                .is_some_and(|m| self.ready_bytes + extra_bytes > m)
    }

    fn enqueue(&mut self, msg: Arc<Message>, now: Millis, out: &mut Vec<Effect>) {
        if self.config.overflow != Overflow::DropHead && self.over_limit(1, msg.size()) {
            if self.config.overflow == Overflow::RejectPublishDlx && self.dead_lettering() {
                out.push(Effect::DeadLetter {
                    id: None,
                    msg: Some(msg),
                    reason: DeadLetterReason::MaxLen,
                });
            }
            out.push(Effect::Refused);
            return;
        }
        let ttl = match (self.config.message_ttl, msg.expiration_ms()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let (size, priority) = (msg.size(), msg.priority());
        let id = self.push(
            Some(msg),
            size,
            priority,
            ttl.map(|t| now.saturating_add(t)),
            false,
        );
        out.push(Effect::Accepted { id });
        self.enforce_limits(out);
    }

    /// The deadline of the message with this id, if it is ready or unacked and has one.
    pub fn expires_at(&self, id: MsgId) -> Option<Millis> {
        if let Some(e) = self.unacked.get(&id) {
            return e.expires_at;
        }
        self.ready
            .iter()
            .flat_map(|l| l.iter().rev())
            .find(|e| e.id == id)
            .and_then(|e| e.expires_at)
    }

    fn push(
        &mut self,
        msg: Option<Arc<Message>>,
        size: u64,
        priority: u8,
        expires_at: Option<Millis>,
        redelivered: bool,
    ) -> MsgId {
        let level = (priority as usize).min(self.ready.len() - 1);
        let id = self.next_id;
        self.next_id += 1;
        let e = Entry {
            id,
            msg,
            size,
            expires_at,
            redelivered,
            level,
        };
        if e.msg.is_some() {
            self.resident_bytes += size;
        }
        self.count_ready(&e);
        self.ready[level].push_back(e);
        id
    }

    /// Counts an entry entering the ready lists.
    fn count_ready(&mut self, e: &Entry) {
        self.ready_count += 1;
        self.ready_bytes += e.size;
        if e.msg.is_some() {
            self.ready_resident_bytes += e.size;
        } else {
            self.paged_ready += 1;
        }
    }

    /// Counts an entry leaving the ready lists (for unacked, or for good).
    fn uncount_ready(&mut self, e: &Entry) {
        self.ready_count -= 1;
        self.ready_bytes -= e.size;
        if e.msg.is_some() {
            self.ready_resident_bytes -= e.size;
        } else {
            self.paged_ready -= 1;
        }
    }

    /// An entry that left the queue for good.
    fn dropped(&mut self, e: &Entry) {
        if e.msg.is_some() {
            self.resident_bytes -= e.size;
        }
    }

    /// The position of a ready message: (level, index). Each level is sorted by id.
    fn find_ready(&self, id: MsgId) -> Option<(usize, usize)> {
        self.ready.iter().enumerate().find_map(|(l, list)| {
            let i = list.partition_point(|e| e.id < id);
            list.get(i).filter(|e| e.id == id).map(|_| (l, i))
        })
    }

    fn take_ready(&mut self, id: MsgId) -> Option<Entry> {
        let (l, i) = self.find_ready(id)?;
        let e = self.ready[l].remove(i)?;
        self.uncount_ready(&e);
        Some(e)
    }

    fn page_out(&mut self, id: MsgId) {
        if let Some(e) = self.unacked.get_mut(&id) {
            if e.msg.take().is_some() {
                self.resident_bytes -= e.size;
            }
            return;
        }
        let Some((l, i)) = self.find_ready(id) else {
            return;
        };
        let e = &mut self.ready[l][i];
        if e.msg.take().is_some() {
            self.resident_bytes -= e.size;
            self.ready_resident_bytes -= e.size;
            self.paged_ready += 1;
        }
    }

    fn page_in(&mut self, id: MsgId, msg: Arc<Message>) {
        if let Some(e) = self.unacked.get_mut(&id) {
            if e.msg.is_none() {
                e.msg = Some(msg);
                self.resident_bytes += e.size;
            }
            return;
        }
        let Some((l, i)) = self.find_ready(id) else {
            return;
        };
        let e = &mut self.ready[l][i];
        if e.msg.is_none() {
            e.msg = Some(msg);
            self.resident_bytes += e.size;
            self.ready_resident_bytes += e.size;
            self.paged_ready -= 1;
        }
    }

    /// Ready messages in delivery order: highest priority first, then by arrival.
    fn delivery_order(&self) -> impl Iterator<Item = &Entry> {
        self.ready.iter().rev().flat_map(|l| l.iter())
    }

    /// Whether the next message to deliver has its content paged out.
    pub fn next_is_paged(&self) -> bool {
        self.delivery_order()
            .next()
            .is_some_and(|e| e.msg.is_none())
    }

    /// What to page out to free `want` bytes: messages in memory that will be needed last.
    /// First unacked messages that already have a copy on disk (`has_copy`: dropping them
    /// costs nothing, and most are acked without being needed again), newest first; then
    /// ready ones from the back of the delivery order; then the other unacked ones. The first
    /// `keep_bytes` (at most `keep_count` messages) of the delivery order stay: consumers get
    /// those next.
    pub fn page_out_candidates(
        &self,
        keep_bytes: u64,
        keep_count: usize,
        want: u64,
        has_copy: impl Fn(MsgId) -> bool,
    ) -> Vec<(MsgId, Arc<Message>)> {
        let mut out = Vec::new();
        let mut found = 0u64;
        let mut unacked: Vec<(&Entry, bool)> = self
            .unacked
            .values()
            .filter(|e| e.msg.is_some())
            .map(|e| (e, has_copy(e.id)))
            .collect();
        // Copies first, then newest first.
        unacked.sort_unstable_by_key(|(e, copy)| (!*copy, std::cmp::Reverse(e.id)));
        let (free, costly): (Vec<_>, Vec<_>) = unacked.into_iter().partition(|(_, c)| *c);
        let mut take = |e: &Entry, out: &mut Vec<(MsgId, Arc<Message>)>| {
            if let Some(m) = &e.msg {
                found += e.size;
                out.push((e.id, m.clone()));
            }
            found >= want
        };
        for (e, _) in free {
            if take(e, &mut out) {
                return out;
            }
        }
        // The kept window: how many entries of each level (highest first) it covers.
        let (mut kept_bytes, mut kept_count, mut kept_resident) = (0u64, 0usize, 0u64);
        let mut kept = vec![0usize; self.ready.len()];
        'window: for (l, list) in self.ready.iter().enumerate().rev() {
            for e in list {
                if kept_bytes >= keep_bytes || kept_count >= keep_count {
                    break 'window;
                }
                kept[l] += 1;
                kept_count += 1;
                kept_bytes += e.size;
                if e.msg.is_some() {
                    kept_resident += e.size;
                }
            }
        }
        // Resident bytes beyond the window: when they are all found, stop looking.
        let mut beyond = self.ready_resident_bytes - kept_resident;
        'ready: for (l, list) in self.ready.iter().enumerate() {
            for e in list.iter().skip(kept[l]).rev() {
                if beyond == 0 {
                    break 'ready;
                }
                if e.msg.is_some() {
                    beyond -= e.size;
                    if take(e, &mut out) {
                        return out;
                    }
                }
            }
        }
        for (e, _) in costly {
            if take(e, &mut out) {
                return out;
            }
        }
        out
    }

    /// Paged-out messages to read back now, if the messages in memory at the head of the
    /// delivery order are fewer than `low_bytes` (and `batch_count / 2` messages): the next
    /// paged ones in delivery order, up to `batch_bytes` or `batch_count` messages.
    pub fn read_ahead(&self, low_bytes: u64, batch_bytes: u64, batch_count: usize) -> Vec<MsgId> {
        if self.paged_ready == 0 {
            return Vec::new();
        }
        let mut order = self.delivery_order().peekable();
        let (mut ahead_bytes, mut ahead_count) = (0u64, 0usize);
        while let Some(e) = order.next_if(|e| e.msg.is_some()) {
            ahead_bytes += e.size;
            ahead_count += 1;
            if ahead_bytes >= low_bytes || ahead_count >= batch_count / 2 {
                return Vec::new();
            }
        }
        let mut ids = Vec::new();
        let mut bytes = 0u64;
        for e in order {
            if bytes >= batch_bytes || ids.len() >= batch_count {
                break;
            }
            if e.msg.is_none() {
                bytes += e.size;
                ids.push(e.id);
            }
        }
        ids
    }

    /// drop-head: drop the oldest messages until within limits.
    fn enforce_limits(&mut self, out: &mut Vec<Effect>) {
        if self.config.overflow != Overflow::DropHead {
            return;
        }
        while self.over_limit(0, 0) {
            let Some(e) = self.pop_head() else { break };
            self.dropped(&e);
            out.push(Effect::Removed { id: e.id });
            if self.dead_lettering() {
                out.push(Effect::DeadLetter {
                    id: Some(e.id),
                    msg: e.msg,
                    reason: DeadLetterReason::MaxLen,
                });
            }
        }
    }

    /// The oldest message of the lowest non-empty level (what drop-head drops).
    fn pop_head(&mut self) -> Option<Entry> {
        let e = self.ready.iter_mut().find(|l| !l.is_empty())?.pop_front()?;
        self.uncount_ready(&e);
        Some(e)
    }

    /// The next message to deliver: highest priority first.
    fn pop_next(&mut self) -> Option<Entry> {
        let e = self
            .ready
            .iter_mut()
            .rev()
            .find(|l| !l.is_empty())?
            .pop_front()?;
        self.uncount_ready(&e);
        Some(e)
    }

    fn checkout(&mut self, settled: bool, now: Millis, out: &mut Vec<Effect>) {
        loop {
            let Some(e) = self.pop_next() else {
                out.push(Effect::Empty);
                return;
            };
            if e.expires_at.is_some_and(|t| now > t) {
                self.expired(e, out);
                continue;
            }
            // Expired messages now at the head are dropped before counting what remains.
            self.expire(now, out);
            out.push(Effect::Delivery {
                id: e.id,
                msg: e.msg.clone(),
                redelivered: e.redelivered,
                remaining: self.ready_count as u32,
            });
            if settled {
                self.dropped(&e);
                out.push(Effect::Removed { id: e.id });
            } else {
                self.unacked_bytes += e.size;
                self.unacked.insert(e.id, e);
            }
            return;
        }
    }

    fn expired(&mut self, e: Entry, out: &mut Vec<Effect>) {
        self.dropped(&e);
        out.push(Effect::Removed { id: e.id });
        if self.dead_lettering() {
            out.push(Effect::DeadLetter {
                id: Some(e.id),
                msg: e.msg,
                reason: DeadLetterReason::Expired,
            });
        }
    }

    fn expire(&mut self, now: Millis, out: &mut Vec<Effect>) {
        for level in 0..self.ready.len() {
            while let Some(front) = self.ready[level].front() {
                if front.expires_at.is_none_or(|t| now <= t) {
                    break;
                }
                let Some(e) = self.ready[level].pop_front() else {
                    break;
                };
                self.uncount_ready(&e);
                self.expired(e, out);
            }
        }
    }

    fn settle(&mut self, id: MsgId, how: Settlement, out: &mut Vec<Effect>) {
        let Some(mut e) = self.unacked.remove(&id) else {
            return;
        };
        self.unacked_bytes -= e.size;
        if how != Settlement::Requeue {
            self.dropped(&e);
            out.push(Effect::Removed { id: e.id });
        }
        match how {
            Settlement::Ack => {}
            Settlement::Discard => {
                if self.dead_lettering() {
                    out.push(Effect::DeadLetter {
                        id: Some(e.id),
                        msg: e.msg,
                        reason: DeadLetterReason::Rejected,
                    });
                }
            }
            Settlement::Requeue => {
                e.redelivered = true;
                self.count_ready(&e);
                let level = &mut self.ready[e.level];
                let pos = level.partition_point(|x| x.id < e.id);
                level.insert(pos, e);
                self.enforce_limits(out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::protocol::basic::AMQPProperties;

    fn msg(body: &str) -> Arc<Message> {
        msg_with(body, AMQPProperties::default())
    }

    fn msg_with(body: &str, p: AMQPProperties) -> Arc<Message> {
        Arc::new(Message::new(
            String::new(),
            "q".into(),
            p,
            bytes::Bytes::copy_from_slice(body.as_bytes()),
        ))
    }

    fn run(q: &mut QueueState, cmd: Command, now: Millis) -> Vec<Effect> {
        let mut out = Vec::new();
        q.apply(cmd, now, &mut out);
        out
    }

    fn take(q: &mut QueueState, now: Millis) -> Option<(MsgId, String, bool)> {
        run(q, Command::Checkout { settled: false }, now)
            .into_iter()
            .find_map(|e| match e {
                Effect::Delivery {
                    id,
                    msg,
                    redelivered,
                    ..
                } => Some((
                    id,
                    String::from_utf8_lossy(&msg.expect("in memory").body).into_owned(),
                    redelivered,
                )),
                _ => None,
            })
    }

    fn bodies(effects: &[Effect]) -> Vec<(String, DeadLetterReason)> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::DeadLetter { msg, reason, .. } => Some((
                    String::from_utf8_lossy(&msg.as_ref().expect("in memory").body).into_owned(),
                    *reason,
                )),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn fifo_and_requeue_to_original_position() {
        let mut q = QueueState::new(QueueConfig::default());
        for b in ["a", "b", "c"] {
            run(&mut q, Command::Enqueue { msg: msg(b) }, 0);
        }
        let (a, _, _) = take(&mut q, 0).unwrap();
        let (b, _, _) = take(&mut q, 0).unwrap();
        run(
            &mut q,
            Command::Settle {
                ids: vec![b],
                how: Settlement::Requeue,
            },
            0,
        );
        run(
            &mut q,
            Command::Settle {
                ids: vec![a],
                how: Settlement::Requeue,
            },
            0,
        );
        assert_eq!(take(&mut q, 0).unwrap().1, "a");
        let (_, body, redelivered) = take(&mut q, 0).unwrap();
        assert_eq!((body.as_str(), redelivered), ("b", true));
        assert!(!take(&mut q, 0).unwrap().2);
        assert!(take(&mut q, 0).is_none());
        assert_eq!(q.unacked_count(), 3);
    }

    #[test]
    fn ttl_expires_without_consumer_and_is_never_delivered() {
        let cfg = QueueConfig {
            message_ttl: Some(100),
            dead_letter_exchange: Some("dlx".into()),
            ..Default::default()
        };
        let mut q = QueueState::new(cfg);
        run(&mut q, Command::Enqueue { msg: msg("old") }, 0);
        run(&mut q, Command::Enqueue { msg: msg("new") }, 50);
        assert_eq!(q.next_expiry(), Some(100));
        let fx = run(&mut q, Command::Expire, 101);
        assert_eq!(bodies(&fx), vec![("old".into(), DeadLetterReason::Expired)]);
        // Per-message expiration lower than the queue TTL wins; checkout skips expired.
        let p = AMQPProperties::default().with_expiration("10".into());
        let mut q2 = QueueState::new(QueueConfig::default());
        run(
            &mut q2,
            Command::Enqueue {
                msg: msg_with("x", p),
            },
            0,
        );
        assert!(take(&mut q2, 11).is_none());
        assert_eq!(q2.ready_count(), 0);
    }

    #[test]
    fn max_length_drop_head_and_reject_publish() {
        let cfg = QueueConfig {
            max_length: Some(2),
            dead_letter_exchange: Some("dlx".into()),
            ..Default::default()
        };
        let mut q = QueueState::new(cfg.clone());
        run(&mut q, Command::Enqueue { msg: msg("1") }, 0);
        run(&mut q, Command::Enqueue { msg: msg("2") }, 0);
        let fx = run(&mut q, Command::Enqueue { msg: msg("3") }, 0);
        assert_eq!(bodies(&fx), vec![("1".into(), DeadLetterReason::MaxLen)]);
        assert_eq!(q.ready_count(), 2);

        let mut r = QueueState::new(QueueConfig {
            overflow: Overflow::RejectPublish,
            ..cfg.clone()
        });
        run(&mut r, Command::Enqueue { msg: msg("1") }, 0);
        run(&mut r, Command::Enqueue { msg: msg("2") }, 0);
        let fx = run(&mut r, Command::Enqueue { msg: msg("3") }, 0);
        assert!(matches!(fx.as_slice(), [Effect::Refused]));
        assert!(
            !fx.iter().any(|e| matches!(e, Effect::Removed { .. })),
            "never enqueued"
        );

        let mut d = QueueState::new(QueueConfig {
            overflow: Overflow::RejectPublishDlx,
            ..cfg
        });
        run(&mut d, Command::Enqueue { msg: msg("1") }, 0);
        run(&mut d, Command::Enqueue { msg: msg("2") }, 0);
        let fx = run(&mut d, Command::Enqueue { msg: msg("3") }, 0);
        assert_eq!(bodies(&fx), vec![("3".into(), DeadLetterReason::MaxLen)]);
        assert!(fx.iter().any(|e| matches!(e, Effect::Refused)));
    }

    #[test]
    fn max_length_bytes() {
        let mut q = QueueState::new(QueueConfig {
            max_length_bytes: Some(5),
            ..Default::default()
        });
        run(&mut q, Command::Enqueue { msg: msg("abc") }, 0);
        run(&mut q, Command::Enqueue { msg: msg("def") }, 0);
        assert_eq!(q.ready_count(), 1);
        assert_eq!(take(&mut q, 0).unwrap().1, "def");
    }

    #[test]
    fn priorities_deliver_highest_first_fifo_within_level() {
        let mut q = QueueState::new(QueueConfig {
            max_priority: Some(5),
            ..Default::default()
        });
        for (b, p) in [("l1", 1), ("h1", 9), ("l2", 1), ("m", 3), ("none", 0)] {
            let props = AMQPProperties::default().with_priority(p);
            run(
                &mut q,
                Command::Enqueue {
                    msg: msg_with(b, props),
                },
                0,
            );
        }
        let order: Vec<String> = std::iter::from_fn(|| take(&mut q, 0).map(|t| t.1)).collect();
        assert_eq!(order, ["h1", "m", "l1", "l2", "none"]);
    }

    #[test]
    fn reject_dead_letters_only_with_dlx_and_purge_counts_ready() {
        let mut q = QueueState::new(QueueConfig::default());
        run(&mut q, Command::Enqueue { msg: msg("a") }, 0);
        let (id, _, _) = take(&mut q, 0).unwrap();
        let fx = run(
            &mut q,
            Command::Settle {
                ids: vec![id],
                how: Settlement::Discard,
            },
            0,
        );
        assert!(bodies(&fx).is_empty());
        run(&mut q, Command::Enqueue { msg: msg("b") }, 0);
        run(&mut q, Command::Enqueue { msg: msg("c") }, 0);
        let _ = take(&mut q, 0);
        let fx = run(&mut q, Command::Purge, 0);
        assert!(matches!(
            fx.as_slice(),
            [Effect::Removed { .. }, Effect::Purged { count: 1 }]
        ));
        assert_eq!(q.unacked_count(), 1);
    }

    #[test]
    fn same_commands_same_state() {
        let script = |q: &mut QueueState| {
            let mut log = Vec::new();
            for i in 0..20u64 {
                run(
                    q,
                    Command::Enqueue {
                        msg: msg(&i.to_string()),
                    },
                    i,
                );
                if i % 3 == 0
                    && let Some((id, b, _)) = take(q, i)
                {
                    log.push(b);
                    let how = if i % 2 == 0 {
                        Settlement::Requeue
                    } else {
                        Settlement::Ack
                    };
                    run(q, Command::Settle { ids: vec![id], how }, i);
                }
            }
            (log, q.ready_count(), q.unacked_count())
        };
        let mut a = QueueState::new(QueueConfig::default());
        let mut b = QueueState::new(QueueConfig::default());
        assert_eq!(script(&mut a), script(&mut b));
    }

    #[test]
    fn every_accepted_message_is_removed_exactly_once() {
        let mut q = QueueState::new(QueueConfig {
            max_length: Some(3),
            message_ttl: Some(100),
            ..Default::default()
        });
        let mut accepted = Vec::new();
        let mut removed = Vec::new();
        let mut record = |fx: Vec<Effect>| {
            for e in fx {
                match e {
                    Effect::Accepted { id } => accepted.push(id),
                    Effect::Removed { id } => removed.push(id),
                    _ => {}
                }
            }
        };
        for i in 0..5 {
            record(run(
                &mut q,
                Command::Enqueue {
                    msg: msg(&i.to_string()),
                },
                0,
            )); // 2 dropped
        }
        let take_id = |q: &mut QueueState, settled: bool, now| {
            let fx = run(q, Command::Checkout { settled }, now);
            let id = fx.iter().find_map(|e| match e {
                Effect::Delivery { id, .. } => Some(*id),
                _ => None,
            });
            (id, fx)
        };
        let (a, fx) = take_id(&mut q, false, 0);
        record(fx);
        let (_, fx) = take_id(&mut q, true, 0); // consumed without ack
        record(fx);
        record(run(
            &mut q,
            Command::Settle {
                ids: vec![a.unwrap()],
                how: Settlement::Requeue,
            },
            0,
        ));
        record(run(
            &mut q,
            Command::Settle {
                ids: vec![a.unwrap()],
                how: Settlement::Requeue,
            },
            0,
        ));
        let (b, fx) = take_id(&mut q, false, 0);
        record(fx);
        record(run(
            &mut q,
            Command::Settle {
                ids: vec![b.unwrap()],
                how: Settlement::Discard,
            },
            0,
        ));
        record(run(&mut q, Command::Enqueue { msg: msg("late") }, 50));
        record(run(&mut q, Command::Expire, 101)); // the rest but "late" expire
        record(run(&mut q, Command::Purge, 120));
        let mut a2 = accepted.clone();
        let mut r2 = removed.clone();
        a2.sort_unstable();
        r2.sort_unstable();
        assert_eq!(a2, r2, "accepted {accepted:?}, removed {removed:?}");
    }

    fn ids(fx: &[Effect]) -> Vec<MsgId> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::Accepted { id } => Some(*id),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn paging_out_keeps_the_head_and_counts_bytes() {
        let mut q = QueueState::new(QueueConfig::default());
        let mut all = Vec::new();
        for i in 0..10 {
            all.extend(ids(&run(
                &mut q,
                Command::Enqueue {
                    msg: msg(&format!("{i:03}")),
                },
                0,
            )));
        }
        assert_eq!(q.resident_bytes(), 30);
        // Keep the first 4 (12 bytes); free 9 bytes: the last three go, newest first.
        let c = q.page_out_candidates(12, 100, 9, |_| false);
        let picked: Vec<MsgId> = c.iter().map(|(id, _)| *id).collect();
        assert_eq!(picked, vec![all[9], all[8], all[7]]);
        run(&mut q, Command::PageOut { ids: picked }, 0);
        assert_eq!((q.resident_bytes(), q.paged_ready()), (21, 3));
        // Everything beyond the window is asked for: only resident ones come back.
        let c = q.page_out_candidates(12, 100, 1000, |_| false);
        assert_eq!(c.len(), 3);
        run(
            &mut q,
            Command::PageOut {
                ids: c.iter().map(|(id, _)| *id).collect(),
            },
            0,
        );
        assert_eq!((q.resident_bytes(), q.paged_ready()), (12, 6));
        // Nothing to read ahead while 12 bytes are in memory at the head (low water 6).
        assert!(q.read_ahead(6, 9, 100).is_empty());
        // Take three: 3 bytes left ahead, below the low water: the next 9 bytes come back.
        for i in 0..3 {
            assert_eq!(take(&mut q, 0).unwrap().1, format!("{i:03}"));
        }
        let want = q.read_ahead(6, 9, 100);
        assert_eq!(want, vec![all[4], all[5], all[6]]);
        assert!(!q.next_is_paged());
        take(&mut q, 0);
        assert!(q.next_is_paged());
        // A paged message is delivered without content; the runtime reads it back.
        let fx = run(&mut q, Command::Checkout { settled: false }, 0);
        assert!(matches!(fx[0], Effect::Delivery { msg: None, id, .. } if id == all[4]));
        // Read back (the unacked one, and the next), requeue: redelivered, in place.
        run(
            &mut q,
            Command::PageIn {
                msgs: vec![(all[4], msg("004")), (all[5], msg("005"))],
            },
            0,
        );
        run(
            &mut q,
            Command::Settle {
                ids: vec![all[4]],
                how: Settlement::Requeue,
            },
            0,
        );
        let (_, body, redelivered) = take(&mut q, 0).unwrap();
        assert_eq!((body.as_str(), redelivered), ("004", true));
        // Lost content: discarded, counted out.
        let before = q.ready_count();
        let fx = run(
            &mut q,
            Command::Discard {
                ids: vec![all[9], 12345],
            },
            0,
        );
        assert!(matches!(fx.as_slice(), [Effect::Removed { id }] if *id == all[9]));
        assert_eq!(q.ready_count(), before - 1);
        // Purge of what is left, in memory or not: nothing counted any more.
        run(&mut q, Command::Purge, 0);
        assert_eq!((q.paged_ready(), q.ready_count()), (0, 0));
        assert_eq!(q.resident_bytes(), 15, "the five unacked, in memory");
        let unacked: Vec<MsgId> = all[..5].to_vec();
        run(
            &mut q,
            Command::Settle {
                ids: unacked,
                how: Settlement::Ack,
            },
            0,
        );
        assert_eq!(q.resident_bytes(), 0);
    }

    #[test]
    fn paged_messages_expire_and_dead_letter_by_id() {
        let mut q = QueueState::new(QueueConfig {
            message_ttl: Some(10),
            dead_letter_exchange: Some("dlx".into()),
            max_priority: Some(3),
            ..Default::default()
        });
        let a = ids(&run(&mut q, Command::Enqueue { msg: msg("a") }, 0))[0];
        run(
            &mut q,
            Command::Restore {
                msg: None,
                size: 7,
                priority: 2,
                expires_at: Some(5),
                redelivered: false,
            },
            0,
        );
        run(&mut q, Command::PageOut { ids: vec![a] }, 0);
        assert_eq!(
            (q.resident_bytes(), q.paged_ready(), q.ready_bytes()),
            (0, 2, 8)
        );
        let fx = run(&mut q, Command::Expire, 20);
        let dead: Vec<(Option<MsgId>, bool)> = fx
            .iter()
            .filter_map(|e| match e {
                Effect::DeadLetter { id, msg, .. } => Some((*id, msg.is_some())),
                _ => None,
            })
            .collect();
        assert_eq!(dead.len(), 2);
        assert!(dead.iter().all(|(id, inmem)| id.is_some() && !inmem));
        assert_eq!(
            (q.ready_count(), q.paged_ready(), q.ready_bytes()),
            (0, 0, 0)
        );
    }

    #[test]
    fn unacked_with_a_copy_on_disk_page_out_first() {
        let mut q = QueueState::new(QueueConfig::default());
        let mut all = Vec::new();
        for b in ["a", "b", "c", "d"] {
            all.extend(ids(&run(&mut q, Command::Enqueue { msg: msg(b) }, 0)));
        }
        take(&mut q, 0);
        take(&mut q, 0);
        // "a" has a copy, "b" does not: a, then the ready tail (d; c is the kept head), then b.
        let c: Vec<MsgId> = q
            .page_out_candidates(1, 100, 100, |id| id == all[0])
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(c, vec![all[0], all[3], all[1]]);
    }
}
