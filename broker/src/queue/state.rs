//! The queue as a deterministic state machine: commands in, effects out.
//!
//! Nothing here reads a clock, does I/O or draws random numbers: time arrives as an argument
//! of every command, and the caller decides which consumer a message is checked out to. Given
//! the same commands, two replicas reach the same state, which is what the durability issue
//! (persisting commands) and the clustering issue (replicating them through Raft) build on.
//!
//! Ready messages are kept in order of arrival (one list per priority level); a requeued
//! message goes back to its original position, found by its id, which only ever increases.

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
}

impl DeadLetterReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::Rejected => "rejected",
            DeadLetterReason::Expired => "expired",
            DeadLetterReason::MaxLen => "maxlen",
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
    /// are applied (it was accepted before the restart).
    Restore {
        msg: Arc<Message>,
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
    /// A checked-out message.
    Delivery {
        id: MsgId,
        msg: Arc<Message>,
        redelivered: bool,
        /// Ready messages left after this one (for `basic.get-ok`).
        remaining: u32,
    },
    /// `Checkout` found nothing.
    Empty,
    DeadLetter {
        msg: Arc<Message>,
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
    msg: Arc<Message>,
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
                expires_at,
                redelivered,
            } => {
                let id = self.push(msg, expires_at, redelivered);
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
                self.ready_count = 0;
                self.ready_bytes = 0;
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
                    msg,
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
        let id = self.push(msg, ttl.map(|t| now.saturating_add(t)), false);
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

    fn push(&mut self, msg: Arc<Message>, expires_at: Option<Millis>, redelivered: bool) -> MsgId {
        let level = (msg.priority() as usize).min(self.ready.len() - 1);
        let id = self.next_id;
        self.next_id += 1;
        self.ready_count += 1;
        self.ready_bytes += msg.size();
        self.ready[level].push_back(Entry {
            id,
            msg,
            expires_at,
            redelivered,
            level,
        });
        id
    }

    /// drop-head: drop the oldest messages until within limits.
    fn enforce_limits(&mut self, out: &mut Vec<Effect>) {
        if self.config.overflow != Overflow::DropHead {
            return;
        }
        while self.over_limit(0, 0) {
            let Some(e) = self.pop_head() else { break };
            out.push(Effect::Removed { id: e.id });
            if self.dead_lettering() {
                out.push(Effect::DeadLetter {
                    msg: e.msg,
                    reason: DeadLetterReason::MaxLen,
                });
            }
        }
    }

    /// The oldest message of the lowest non-empty level (what drop-head drops).
    fn pop_head(&mut self) -> Option<Entry> {
        let e = self.ready.iter_mut().find(|l| !l.is_empty())?.pop_front()?;
        self.ready_count -= 1;
        self.ready_bytes -= e.msg.size();
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
        self.ready_count -= 1;
        self.ready_bytes -= e.msg.size();
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
                out.push(Effect::Removed { id: e.id });
            } else {
                self.unacked_bytes += e.msg.size();
                self.unacked.insert(e.id, e);
            }
            return;
        }
    }

    fn expired(&mut self, e: Entry, out: &mut Vec<Effect>) {
        out.push(Effect::Removed { id: e.id });
        if self.dead_lettering() {
            out.push(Effect::DeadLetter {
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
                self.ready_count -= 1;
                self.ready_bytes -= e.msg.size();
                self.expired(e, out);
            }
        }
    }

    fn settle(&mut self, id: MsgId, how: Settlement, out: &mut Vec<Effect>) {
        let Some(mut e) = self.unacked.remove(&id) else {
            return;
        };
        self.unacked_bytes -= e.msg.size();
        if how != Settlement::Requeue {
            out.push(Effect::Removed { id: e.id });
        }
        match how {
            Settlement::Ack => {}
            Settlement::Discard => {
                if self.dead_lettering() {
                    out.push(Effect::DeadLetter {
                        msg: e.msg,
                        reason: DeadLetterReason::Rejected,
                    });
                }
            }
            Settlement::Requeue => {
                e.redelivered = true;
                self.ready_count += 1;
                self.ready_bytes += e.msg.size();
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
                    String::from_utf8_lossy(&msg.body).into_owned(),
                    redelivered,
                )),
                _ => None,
            })
    }

    fn bodies(effects: &[Effect]) -> Vec<(String, DeadLetterReason)> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::DeadLetter { msg, reason } => {
                    Some((String::from_utf8_lossy(&msg.body).into_owned(), *reason))
                }
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
}
