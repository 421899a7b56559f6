//! A replicated queue's state machine: what every replica of the queue holds, changed only by
//! committed [`Command`]s, applied in log order, deterministically (no clock, no randomness,
//! nothing node-local). The messages, the consumers and each consumer's unacknowledged
//! messages are all here, so a new leader knows what a dead node's consumers held and
//! returns it.
//!
//! Commands are requests ("consumer C may hold 10", "C settles 4 and 5"), not outcomes: which
//! message goes to which consumer is decided by applying them, the same way on every replica.
//! Applying returns the deliveries it decided; each node hands the ones for its own consumers
//! to their channels.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub type MsgId = u64;

/// A consumer (or a channel's `basic.get`s, under the tag [`GET_TAG`]) as the replicated state
/// names it: the node, that node's boot (a restarted node's consumers are gone), connection,
/// channel and consumer tag.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ConsumerKey {
    pub node: String,
    pub boot: u64,
    pub conn: u64,
    pub channel: u16,
    pub tag: String,
}

/// The tag under which a channel's unacknowledged `basic.get`s are held.
pub const GET_TAG: &str = "";

/// Unlimited prefetch (0) still delivers at most this many unacknowledged messages to one
/// consumer, so a consumer's channel buffers a bounded amount.
pub const MAX_IN_FLIGHT: u32 = 2000;

/// A message as the replicas keep it: its content header as the publisher sent it, its body,
/// and how often it was delivered and returned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Msg {
    pub exchange: String,
    pub routing_key: String,
    #[serde(with = "b64")]
    pub header: Vec<u8>,
    #[serde(with = "b64")]
    pub body: Vec<u8>,
    /// Times it was returned to the queue after a delivery (requeue, a consumer gone).
    #[serde(default)]
    pub returned: u32,
}

/// Bytes in a human-readable encoding (JSON: snapshots, older log entries) as base64; in a
/// binary one (postcard: queue commands in the log) as bytes.
mod b64 {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&STANDARD.encode(v))
        } else {
            crate::cluster::wire::as_bytes::serialize(v, s)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        if d.is_human_readable() {
            let text = String::deserialize(d)?;
            STANDARD.decode(text).map_err(serde::de::Error::custom)
        } else {
            crate::cluster::wire::as_bytes::deserialize(d)
        }
    }
}

/// A map with structured keys as a list of `(key, value)` pairs.
mod pairs {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<K: Serialize, V: Serialize, S: Serializer>(
        map: &BTreeMap<K, V>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(map.iter())
    }

    pub fn deserialize<'de, K, V, D>(d: D) -> Result<BTreeMap<K, V>, D::Error>
    where
        K: Deserialize<'de> + Ord,
        V: Deserialize<'de>,
        D: Deserializer<'de>,
    {
        Ok(Vec::<(K, V)>::deserialize(d)?.into_iter().collect())
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConsumerState {
    /// Most unacknowledged messages it may hold (0: [`MAX_IN_FLIGHT`]).
    pub prefetch: u32,
    /// Delivered and not yet settled.
    pub checked: BTreeMap<MsgId, Msg>,
    /// False for a channel's `basic.get` holder: nothing is pushed to it.
    pub dispatch: bool,
}

impl ConsumerState {
    fn has_room(&self) -> bool {
        let limit = if self.prefetch == 0 {
            MAX_IN_FLIGHT
        } else {
            self.prefetch.min(MAX_IN_FLIGHT)
        };
        self.dispatch && (self.checked.len() as u32) < limit
    }
}

/// How a replicated queue was configured when declared (replicated with it).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// `x-delivery-limit`: a message returned more often than this is dropped.
    pub delivery_limit: Option<u32>,
}

/// One change to the queue, as proposed and committed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    Enqueue(Msg),
    /// Attach (or re-attach) a consumer that may hold `prefetch` messages.
    Checkout {
        consumer: ConsumerKey,
        prefetch: u32,
    },
    /// Detach a consumer; what it held returns to the queue.
    Cancel {
        consumer: ConsumerKey,
    },
    /// Acknowledged: gone.
    Settle {
        consumer: ConsumerKey,
        ids: Vec<MsgId>,
    },
    /// Requeued: back to the queue, before newer messages, marked redelivered.
    Return {
        consumer: ConsumerKey,
        ids: Vec<MsgId>,
    },
    /// Rejected without requeue: dropped.
    Discard {
        consumer: ConsumerKey,
        ids: Vec<MsgId>,
    },
    /// `basic.get`: the oldest message, held by `consumer` (its channel's [`GET_TAG`]) unless
    /// `no_ack`.
    Get {
        consumer: ConsumerKey,
        no_ack: bool,
    },
    Purge,
    /// The consumers of `node` (all of them, or those of boots other than `keep_boot`) are
    /// gone: what they held returns to the queue.
    Release {
        node: String,
        keep_boot: Option<u64>,
    },
}

/// What applying one command answers its proposer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Outcome {
    Done,
    /// Messages purged.
    Count(u32),
    /// `basic.get`: the message, whether it was delivered before, and how many remain.
    Got(Option<(MsgId, Msg, bool, u32)>),
}

/// Why a message left the queue dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dead {
    Rejected,
    DeliveryLimit,
}

/// A delivery decided by applying a command.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub consumer: ConsumerKey,
    pub id: MsgId,
    pub msg: Msg,
    pub redelivered: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct QueueState {
    pub config: Config,
    next: MsgId,
    /// Waiting for a consumer, oldest (or returned) first.
    pub ready: BTreeMap<MsgId, Msg>,
    /// JSON maps need string keys: kept as a list of pairs in snapshots.
    #[serde(with = "pairs")]
    pub consumers: BTreeMap<ConsumerKey, ConsumerState>,
    /// The consumer served last (round robin).
    last: Option<ConsumerKey>,
    /// Messages that left the queue dead (rejected without requeue, over the delivery limit)
    /// while applying the last command: the host dead-letters them (not replicated).
    #[serde(skip)]
    pub dead: Vec<(Msg, Dead)>,
    /// Counters since the queue was declared.
    pub enqueued: u64,
    pub delivered: u64,
    pub acked: u64,
}

impl QueueState {
    pub fn new(config: Config) -> Self {
        QueueState {
            config,
            ..Default::default()
        }
    }

    /// Ready messages.
    pub fn ready_len(&self) -> u32 {
        self.ready.len() as u32
    }

    /// Delivered and not yet settled.
    pub fn unacked_len(&self) -> u32 {
        self.consumers
            .values()
            .map(|c| c.checked.len() as u32)
            .sum()
    }

    /// Consumers (not counting `basic.get` holders).
    pub fn consumer_count(&self) -> u32 {
        self.consumers.values().filter(|c| c.dispatch).count() as u32
    }

    /// Applies one committed command; deliveries it decides are pushed to `out`.
    pub fn apply(&mut self, command: Command, out: &mut Vec<Delivery>) -> Outcome {
        let outcome = match command {
            Command::Enqueue(msg) => {
                self.next += 1;
                self.ready.insert(self.next, msg);
                self.enqueued += 1;
                Outcome::Done
            }
            Command::Checkout { consumer, prefetch } => {
                let c = self.consumers.entry(consumer).or_default();
                c.prefetch = prefetch;
                c.dispatch = true;
                Outcome::Done
            }
            Command::Cancel { consumer } => {
                if let Some(c) = self.consumers.remove(&consumer) {
                    self.give_back(c.checked);
                }
                Outcome::Done
            }
            Command::Settle { consumer, ids } => {
                self.take(&consumer, &ids);
                Outcome::Done
            }
            Command::Return { consumer, ids } => {
                let back = self.take(&consumer, &ids);
                self.give_back(back);
                Outcome::Done
            }
            Command::Discard { consumer, ids } => {
                let gone = self.take(&consumer, &ids);
                self.dead
                    .extend(gone.into_values().map(|m| (m, Dead::Rejected)));
                Outcome::Done
            }
            Command::Get { consumer, no_ack } => {
                let Some((id, msg)) = self.ready.pop_first() else {
                    return Outcome::Got(None);
                };
                self.delivered += 1;
                let redelivered = msg.returned > 0;
                if no_ack {
                    self.acked += 1;
                } else {
                    self.consumers
                        .entry(consumer)
                        .or_default()
                        .checked
                        .insert(id, msg.clone());
                }
                Outcome::Got(Some((id, msg, redelivered, self.ready_len())))
            }
            Command::Purge => {
                let n = self.ready.len() as u32;
                self.ready.clear();
                Outcome::Count(n)
            }
            Command::Release { node, keep_boot } => {
                let gone: Vec<ConsumerKey> = self
                    .consumers
                    .keys()
                    .filter(|k| k.node == node && Some(k.boot) != keep_boot)
                    .cloned()
                    .collect();
                for k in gone {
                    if let Some(c) = self.consumers.remove(&k) {
                        self.give_back(c.checked);
                    }
                }
                Outcome::Done
            }
        };
        self.dispatch(out);
        outcome
    }

    /// Removes `ids` from what `consumer` holds; returns them.
    fn take(&mut self, consumer: &ConsumerKey, ids: &[MsgId]) -> BTreeMap<MsgId, Msg> {
        let mut taken = BTreeMap::new();
        if let Some(c) = self.consumers.get_mut(consumer) {
            for id in ids {
                if let Some(m) = c.checked.remove(id) {
                    taken.insert(*id, m);
                }
            }
        }
        self.acked += taken.len() as u64;
        taken
    }

    /// Messages back to the queue (redelivered), unless returned more often than the
    /// delivery limit allows.
    fn give_back(&mut self, msgs: BTreeMap<MsgId, Msg>) {
        for (id, mut m) in msgs {
            m.returned = m.returned.saturating_add(1);
            if self.config.delivery_limit.is_some_and(|l| m.returned > l) {
                self.dead.push((m, Dead::DeliveryLimit));
                continue;
            }
            self.ready.insert(id, m);
        }
    }

    /// Hands ready messages to consumers with room, round robin.
    fn dispatch(&mut self, out: &mut Vec<Delivery>) {
        while !self.ready.is_empty() {
            let Some(key) = self.next_consumer() else {
                return;
            };
            let Some((id, msg)) = self.ready.pop_first() else {
                return;
            };
            let redelivered = msg.returned > 0;
            if let Some(c) = self.consumers.get_mut(&key) {
                c.checked.insert(id, msg.clone());
            }
            self.delivered += 1;
            out.push(Delivery {
                consumer: key.clone(),
                id,
                msg,
                redelivered,
            });
            self.last = Some(key);
        }
    }

    /// The consumer after the last one served that has room.
    fn next_consumer(&self) -> Option<ConsumerKey> {
        use std::ops::Bound::{Excluded, Unbounded};
        let after: Box<dyn Iterator<Item = (&ConsumerKey, &ConsumerState)>> = match &self.last {
            Some(k) => Box::new(
                self.consumers
                    .range::<ConsumerKey, _>((Excluded(k), Unbounded)),
            ),
            None => Box::new(std::iter::empty()),
        };
        after
            .chain(self.consumers.iter())
            .find(|(_, c)| c.has_room())
            .map(|(k, _)| k.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(node: &str, tag: &str) -> ConsumerKey {
        ConsumerKey {
            node: node.into(),
            boot: 1,
            conn: 1,
            channel: 1,
            tag: tag.into(),
        }
    }

    fn msg(n: u8) -> Msg {
        Msg {
            exchange: String::new(),
            routing_key: "q".into(),
            header: vec![],
            body: vec![n],
            returned: 0,
        }
    }

    fn run(s: &mut QueueState, c: Command) -> Vec<Delivery> {
        let mut out = Vec::new();
        s.apply(c, &mut out);
        out
    }

    #[test]
    fn prefetch_bounds_deliveries_and_settles_free_room() {
        let mut s = QueueState::default();
        for i in 0..5 {
            assert!(run(&mut s, Command::Enqueue(msg(i))).is_empty());
        }
        let a = key("a", "c1");
        let d = run(
            &mut s,
            Command::Checkout {
                consumer: a.clone(),
                prefetch: 2,
            },
        );
        assert_eq!(d.iter().map(|d| d.id).collect::<Vec<_>>(), vec![1, 2]);
        let d = run(
            &mut s,
            Command::Settle {
                consumer: a.clone(),
                ids: vec![1],
            },
        );
        assert_eq!(d.iter().map(|d| d.id).collect::<Vec<_>>(), vec![3]);
        assert_eq!((s.ready_len(), s.unacked_len()), (2, 2));
    }

    #[test]
    fn returns_come_first_and_redelivered_and_a_released_node_gives_back() {
        let mut s = QueueState::default();
        let (a, b) = (key("a", "c"), key("b", "c"));
        run(
            &mut s,
            Command::Checkout {
                consumer: a.clone(),
                prefetch: 1,
            },
        );
        for i in 0..3 {
            run(&mut s, Command::Enqueue(msg(i)));
        }
        // a holds 1; it is released with its node; b attaches and gets 1 again, redelivered.
        run(
            &mut s,
            Command::Release {
                node: "a".into(),
                keep_boot: None,
            },
        );
        let d = run(
            &mut s,
            Command::Checkout {
                consumer: b.clone(),
                prefetch: 10,
            },
        );
        assert_eq!(d.len(), 3);
        assert_eq!((d[0].id, d[0].redelivered), (1, true));
        assert!(!d[1].redelivered);
        // Requeue puts it back before newer messages.
        run(&mut s, Command::Cancel { consumer: b });
        assert_eq!(s.ready.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3]);
    }

    #[test]
    fn delivery_limit_drops_after_too_many_returns_and_get_holds_until_settled() {
        let mut s = QueueState::new(Config {
            delivery_limit: Some(1),
        });
        run(&mut s, Command::Enqueue(msg(0)));
        let g = key("a", GET_TAG);
        for round in 0..2 {
            let mut out = Vec::new();
            let got = s.apply(
                Command::Get {
                    consumer: g.clone(),
                    no_ack: false,
                },
                &mut out,
            );
            let Outcome::Got(Some((id, _, redelivered, 0))) = got else {
                panic!("{got:?}");
            };
            assert_eq!(redelivered, round == 1);
            run(
                &mut s,
                Command::Return {
                    consumer: g.clone(),
                    ids: vec![id],
                },
            );
        }
        assert_eq!(s.ready_len(), 0, "dropped after its second return");
        assert_eq!(s.dead.len(), 1);
        assert_eq!(s.dead[0].1, Dead::DeliveryLimit);
    }

    #[test]
    fn a_snapshot_round_trips_through_json() {
        let mut s = QueueState::default();
        run(
            &mut s,
            Command::Checkout {
                consumer: key("a", "c"),
                prefetch: 1,
            },
        );
        run(&mut s, Command::Enqueue(msg(1)));
        run(&mut s, Command::Enqueue(msg(2)));
        let text = serde_json::to_string(&s).expect("a snapshot serialises");
        let back: QueueState = serde_json::from_str(&text).expect("and reads back");
        assert_eq!((back.ready_len(), back.unacked_len()), (1, 1));
        assert_eq!(serde_json::to_string(&back).expect("again"), text);
    }

    #[test]
    fn round_robin_between_consumers() {
        let mut s = QueueState::default();
        for tag in ["x", "y"] {
            run(
                &mut s,
                Command::Checkout {
                    consumer: key("a", tag),
                    prefetch: 0,
                },
            );
        }
        let mut tags = Vec::new();
        for i in 0..4 {
            for d in run(&mut s, Command::Enqueue(msg(i))) {
                tags.push(d.consumer.tag);
            }
        }
        assert_eq!(tags, vec!["x", "y", "x", "y"]);
    }
}
