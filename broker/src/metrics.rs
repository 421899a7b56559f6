//! Prometheus metrics, named and labelled as RabbitMQ's `rabbitmq_prometheus` plugin (3.10)
//! names them, so its Grafana dashboards ("RabbitMQ-Overview") work unchanged.
//!
//! Collection stays off the message path: publishing, delivering and acking only bump relaxed
//! atomic counters that live next to the data they count — per channel and exchange
//! ([`PublishStats`]), per channel and queue ([`DeliveryStats`]) — and node-wide counters for
//! connections, channels and queues. Everything is read and turned into metric families when a
//! scraper asks ([`BrokerCollector`]); queue depths are read from the queues at that moment.
//!
//! Aggregated counters never go down: when a channel closes, its counts are folded into the
//! node's totals under the same lock a scrape reads them with. (RabbitMQ's aggregated channel
//! counters drop when channels close; Prometheus would read that as a counter reset.)

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use prometheus::core::{Collector, Desc};
use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};

use crate::broker::Broker;
use crate::channel::ChannelShared;

/// Per-channel lists longer than this are pruned of exchanges and queues that no longer exist
/// when a new entry is added, so a long-lived channel that touches many short-lived queues
/// does not grow without bound.
const PRUNE_AT: usize = 32;

/// Publishing counters of one channel for one exchange.
#[derive(Debug, Default)]
pub struct PublishStats {
    pub exchange: String,
    pub published: AtomicU64,
    pub confirmed: AtomicU64,
    pub returned: AtomicU64,
    pub dropped: AtomicU64,
    /// Messages × queues they were routed to (`rabbitmq_queue_messages_published_total`).
    pub routed: AtomicU64,
}

/// Delivery counters of one channel for one queue.
#[derive(Debug, Default)]
pub struct DeliveryStats {
    pub queue: String,
    /// Delivered to a consumer in automatic acknowledgement mode.
    pub delivered: AtomicU64,
    /// Delivered to a consumer in manual acknowledgement mode.
    pub delivered_ack: AtomicU64,
    pub redelivered: AtomicU64,
    pub acked: AtomicU64,
    /// `basic.get` in automatic acknowledgement mode.
    pub get: AtomicU64,
    pub get_ack: AtomicU64,
    pub get_empty: AtomicU64,
}

/// Counts by which every channel counter is summed.
#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    published: u64,
    confirmed: u64,
    returned: u64,
    dropped: u64,
    routed: u64,
    delivered: u64,
    delivered_ack: u64,
    redelivered: u64,
    acked: u64,
    get: u64,
    get_ack: u64,
    get_empty: u64,
}

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

impl Totals {
    fn add_publish(&mut self, p: &PublishStats) {
        self.published += load(&p.published);
        self.confirmed += load(&p.confirmed);
        self.returned += load(&p.returned);
        self.dropped += load(&p.dropped);
        self.routed += load(&p.routed);
    }

    fn add_delivery(&mut self, d: &DeliveryStats) {
        self.delivered += load(&d.delivered);
        self.delivered_ack += load(&d.delivered_ack);
        self.redelivered += load(&d.redelivered);
        self.acked += load(&d.acked);
        self.get += load(&d.get);
        self.get_ack += load(&d.get_ack);
        self.get_empty += load(&d.get_empty);
    }

    fn add(&mut self, o: &Totals) {
        self.published += o.published;
        self.confirmed += o.confirmed;
        self.returned += o.returned;
        self.dropped += o.dropped;
        self.routed += o.routed;
        self.delivered += o.delivered;
        self.delivered_ack += o.delivered_ack;
        self.redelivered += o.redelivered;
        self.acked += o.acked;
        self.get += o.get;
        self.get_ack += o.get_ack;
        self.get_empty += o.get_empty;
    }
}

#[derive(Debug, Default)]
struct ChannelLists {
    publishes: Vec<Arc<PublishStats>>,
    deliveries: Vec<Arc<DeliveryStats>>,
    /// Counts of entries pruned because their exchange or queue was deleted.
    pruned: Totals,
}

/// The counters of one channel. The channel keeps the entry it is using at hand, so the
/// message path only increments; this lock is taken when a channel first uses an exchange
/// or queue, for `basic.get` and its acks, and by scrapes.
#[derive(Debug, Default)]
pub struct ChannelStats {
    lists: Mutex<ChannelLists>,
}

impl ChannelStats {
    /// The counters for publishes to `exchange`; `exists` says whether an exchange still
    /// exists (used to prune).
    pub fn publish(&self, exchange: &str, exists: impl Fn(&str) -> bool) -> Arc<PublishStats> {
        let mut l = self.lists.lock();
        if let Some(p) = l.publishes.iter().find(|p| p.exchange == exchange) {
            return p.clone();
        }
        if l.publishes.len() >= PRUNE_AT {
            let ChannelLists {
                publishes, pruned, ..
            } = &mut *l;
            publishes.retain(|p| {
                let keep = exists(&p.exchange);
                if !keep {
                    pruned.add_publish(p);
                }
                keep
            });
        }
        let p = Arc::new(PublishStats {
            exchange: exchange.to_owned(),
            ..Default::default()
        });
        l.publishes.push(p.clone());
        p
    }

    /// The counters for deliveries from `queue`; `exists` says whether a queue still exists.
    pub fn delivery(&self, queue: &str, exists: impl Fn(&str) -> bool) -> Arc<DeliveryStats> {
        let mut l = self.lists.lock();
        if let Some(d) = l.deliveries.iter().find(|d| d.queue == queue) {
            return d.clone();
        }
        if l.deliveries.len() >= PRUNE_AT {
            let ChannelLists {
                deliveries, pruned, ..
            } = &mut *l;
            deliveries.retain(|d| {
                let keep = exists(&d.queue);
                if !keep {
                    pruned.add_delivery(d);
                }
                keep
            });
        }
        let d = Arc::new(DeliveryStats {
            queue: queue.to_owned(),
            ..Default::default()
        });
        l.deliveries.push(d.clone());
        d
    }

    fn totals(&self) -> Totals {
        let l = self.lists.lock();
        let mut t = l.pruned;
        for p in &l.publishes {
            t.add_publish(p);
        }
        for d in &l.deliveries {
            t.add_delivery(d);
        }
        t
    }
}

#[derive(Default)]
struct Channels {
    live: HashMap<(u64, u16), Arc<ChannelShared>>,
    opened: u64,
    closed: u64,
    /// Counts of closed channels.
    retired: Totals,
}

/// Node-wide counters and the channels whose counters a scrape reads.
#[derive(Default)]
pub struct Metrics {
    /// Shared with every vhost.
    pub queues: Arc<QueueCounters>,
    pub connections_opened: AtomicU64,
    pub connections_closed: AtomicU64,
    channels: Mutex<Channels>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// Queue declarations, creations and deletions of one vhost.
#[derive(Debug, Default)]
pub struct QueueCounters {
    pub declared: AtomicU64,
    pub created: AtomicU64,
    pub deleted: AtomicU64,
}

impl QueueCounters {
    pub fn declared(&self) {
        self.declared.fetch_add(1, Ordering::Relaxed);
    }

    pub fn created(&self) {
        self.created.fetch_add(1, Ordering::Relaxed);
    }

    pub fn deleted(&self) {
        self.deleted.fetch_add(1, Ordering::Relaxed);
    }
}

fn channel_key(ch: &ChannelShared) -> (u64, u16) {
    (ch.conn.id, ch.id)
}

/// How a channel is named in labels: its connection's id and its number, e.g. `<3.1>`
/// (RabbitMQ puts the channel's Erlang pid there, `<0.21491.7>`).
fn channel_label(key: (u64, u16)) -> String {
    format!("<{}.{}>", key.0, key.1)
}

impl Metrics {
    pub fn connection_opened(&self) {
        self.connections_opened.fetch_add(1, Ordering::Relaxed);
    }

    pub fn connection_closed(&self) {
        self.connections_closed.fetch_add(1, Ordering::Relaxed);
    }

    pub fn channel_opened(&self, ch: &Arc<ChannelShared>) {
        let mut c = self.channels.lock();
        c.opened += 1;
        c.live.insert(channel_key(ch), ch.clone());
    }

    /// Folds a closing channel's counts into the node's. Idempotent.
    pub fn channel_closed(&self, ch: &ChannelShared) {
        let mut c = self.channels.lock();
        let key = channel_key(ch);
        if c.live.get(&key).is_some_and(|x| std::ptr::eq(&**x, ch)) {
            c.live.remove(&key);
            c.closed += 1;
            let t = ch.stats.totals();
            c.retired.add(&t);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Families

/// Every family this module exports: name, type, HELP text (RabbitMQ's, verbatim).
const FAMILIES: &[(&str, MetricType, &str)] = &[
    (
        "rabbitmq_alarms_file_descriptor_limit",
        MetricType::UNTYPED,
        "is 1 if file descriptor limit alarm is in effect",
    ),
    (
        "rabbitmq_alarms_free_disk_space_watermark",
        MetricType::UNTYPED,
        "is 1 if free disk space watermark alarm is in effect",
    ),
    (
        "rabbitmq_alarms_memory_used_watermark",
        MetricType::UNTYPED,
        "is 1 if VM memory watermark alarm is in effect",
    ),
    (
        "rabbitmq_connections_opened_total",
        MetricType::COUNTER,
        "Total number of connections opened",
    ),
    (
        "rabbitmq_connections_closed_total",
        MetricType::COUNTER,
        "Total number of connections closed or terminated",
    ),
    (
        "rabbitmq_channels_opened_total",
        MetricType::COUNTER,
        "Total number of channels opened",
    ),
    (
        "rabbitmq_channels_closed_total",
        MetricType::COUNTER,
        "Total number of channels closed",
    ),
    (
        "rabbitmq_queues_declared_total",
        MetricType::COUNTER,
        "Total number of queues declared",
    ),
    (
        "rabbitmq_queues_created_total",
        MetricType::COUNTER,
        "Total number of queues created",
    ),
    (
        "rabbitmq_queues_deleted_total",
        MetricType::COUNTER,
        "Total number of queues deleted",
    ),
    (
        "rabbitmq_process_open_fds",
        MetricType::GAUGE,
        "Open file descriptors",
    ),
    (
        "rabbitmq_process_open_tcp_sockets",
        MetricType::GAUGE,
        "Open TCP sockets",
    ),
    (
        "rabbitmq_process_resident_memory_bytes",
        MetricType::GAUGE,
        "Memory used in bytes",
    ),
    (
        "rabbitmq_resident_memory_limit_bytes",
        MetricType::GAUGE,
        "Memory high watermark in bytes",
    ),
    (
        "rabbitmq_disk_space_available_limit_bytes",
        MetricType::GAUGE,
        "Free disk space low watermark in bytes",
    ),
    (
        "rabbitmq_disk_space_available_bytes",
        MetricType::GAUGE,
        "Disk space available in bytes",
    ),
    (
        "rabbitmq_process_max_fds",
        MetricType::GAUGE,
        "Open file descriptors limit",
    ),
    (
        "rabbitmq_process_max_tcp_sockets",
        MetricType::GAUGE,
        "Open TCP sockets limit",
    ),
    (
        "rabbitmq_queue_messages_ready",
        MetricType::GAUGE,
        "Messages ready to be delivered to consumers",
    ),
    (
        "rabbitmq_queue_messages_unacked",
        MetricType::GAUGE,
        "Messages delivered to consumers but not yet acknowledged",
    ),
    (
        "rabbitmq_queue_messages",
        MetricType::GAUGE,
        "Sum of ready and unacknowledged messages - total queue depth",
    ),
    (
        "rabbitmq_queue_consumers",
        MetricType::GAUGE,
        "Consumers on a queue",
    ),
    (
        "rabbitmq_queue_messages_bytes",
        MetricType::GAUGE,
        "Size in bytes of ready and unacknowledged messages",
    ),
    (
        "rabbitmq_queue_messages_ready_bytes",
        MetricType::GAUGE,
        "Size in bytes of ready messages",
    ),
    (
        "rabbitmq_queue_messages_unacked_bytes",
        MetricType::GAUGE,
        "Size in bytes of all unacknowledged messages",
    ),
    (
        "rabbitmq_channel_consumers",
        MetricType::GAUGE,
        "Consumers on a channel",
    ),
    (
        "rabbitmq_channel_messages_unacked",
        MetricType::GAUGE,
        "Delivered but not yet acknowledged messages",
    ),
    (
        "rabbitmq_channel_messages_unconfirmed",
        MetricType::GAUGE,
        "Published but not yet confirmed messages",
    ),
    (
        "rabbitmq_channel_prefetch",
        MetricType::GAUGE,
        "Total limit of unacknowledged messages for all consumers on a channel",
    ),
    (
        "rabbitmq_channel_messages_published_total",
        MetricType::COUNTER,
        "Total number of messages published into an exchange on a channel",
    ),
    (
        "rabbitmq_channel_messages_confirmed_total",
        MetricType::COUNTER,
        "Total number of messages published into an exchange and confirmed on the channel",
    ),
    (
        "rabbitmq_channel_messages_unroutable_returned_total",
        MetricType::COUNTER,
        "Total number of messages published as mandatory into an exchange and returned to the publisher as unroutable",
    ),
    (
        "rabbitmq_channel_messages_unroutable_dropped_total",
        MetricType::COUNTER,
        "Total number of messages published as non-mandatory into an exchange and dropped as unroutable",
    ),
    (
        "rabbitmq_channel_get_ack_total",
        MetricType::COUNTER,
        "Total number of messages fetched with basic.get in manual acknowledgement mode",
    ),
    (
        "rabbitmq_channel_get_total",
        MetricType::COUNTER,
        "Total number of messages fetched with basic.get in automatic acknowledgement mode",
    ),
    (
        "rabbitmq_channel_messages_delivered_ack_total",
        MetricType::COUNTER,
        "Total number of messages delivered to consumers in manual acknowledgement mode",
    ),
    (
        "rabbitmq_channel_messages_delivered_total",
        MetricType::COUNTER,
        "Total number of messages delivered to consumers in automatic acknowledgement mode",
    ),
    (
        "rabbitmq_channel_messages_redelivered_total",
        MetricType::COUNTER,
        "Total number of messages redelivered to consumers",
    ),
    (
        "rabbitmq_channel_messages_acked_total",
        MetricType::COUNTER,
        "Total number of messages acknowledged by consumers",
    ),
    (
        "rabbitmq_channel_get_empty_total",
        MetricType::COUNTER,
        "Total number of times basic.get operations fetched no message",
    ),
    (
        "rabbitmq_queue_messages_published_total",
        MetricType::COUNTER,
        "Total number of messages published to queues",
    ),
    (
        "rabbitmq_connections",
        MetricType::GAUGE,
        "Connections currently open",
    ),
    (
        "rabbitmq_channels",
        MetricType::GAUGE,
        "Channels currently open",
    ),
    (
        "rabbitmq_consumers",
        MetricType::GAUGE,
        "Consumers currently connected",
    ),
    ("rabbitmq_queues", MetricType::GAUGE, "Queues available"),
    (
        "rabbitmq_build_info",
        MetricType::UNTYPED,
        "RabbitMQ & Erlang/OTP version info",
    ),
    (
        "rabbitmq_identity_info",
        MetricType::UNTYPED,
        "RabbitMQ node & cluster identity info",
    ),
    (
        "warren_cluster_node_running",
        MetricType::GAUGE,
        "1 for each member of the cluster this node sees running (itself included), 0 for a member it sees down",
    ),
    // Warren's own: federation links and shovels (`crate::links`), one series per link in both
    // endpoints (there are few links, and a sum over links means nothing).
    (
        "warren_shovel_state",
        MetricType::GAUGE,
        "1 for the shovel's current state (starting, running, terminated), 0 for the others",
    ),
    (
        "warren_shovel_messages_forwarded_total",
        MetricType::COUNTER,
        "Messages the shovel published to its destination and settled with its source",
    ),
    (
        "warren_shovel_messages_pending",
        MetricType::GAUGE,
        "Messages the shovel received from its source and has not acknowledged to it yet",
    ),
    (
        "warren_federation_link_state",
        MetricType::GAUGE,
        "1 for the federation link's current state (starting, running, error), 0 for the others",
    ),
    (
        "warren_federation_messages_forwarded_total",
        MetricType::COUNTER,
        "Messages the federation link republished locally and settled with its upstream",
    ),
    (
        "warren_federation_link_pending",
        MetricType::GAUGE,
        "Messages the federation link received from its upstream and has not acknowledged to it yet",
    ),
];

/// Families are built in [`FAMILIES`] order; this collects their samples.
struct Families {
    families: Vec<MetricFamily>,
    index: HashMap<&'static str, usize>,
}

impl Families {
    fn new() -> Self {
        let families = FAMILIES
            .iter()
            .map(|(name, kind, help)| {
                let mut f = MetricFamily::default();
                f.set_name((*name).to_owned());
                f.set_help((*help).to_owned());
                f.set_field_type(*kind);
                f
            })
            .collect();
        let index = FAMILIES
            .iter()
            .enumerate()
            .map(|(i, (name, _, _))| (*name, i))
            .collect();
        Self { families, index }
    }

    fn add(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        let Some(f) = self.index.get(name).and_then(|&i| self.families.get_mut(i)) else {
            debug_assert!(false, "unknown family {name}");
            return;
        };
        let mut m = Metric::from_label(
            labels
                .iter()
                .map(|(k, v)| {
                    let mut l = LabelPair::default();
                    l.set_name((*k).to_owned());
                    l.set_value((*v).to_owned());
                    l
                })
                .collect(),
        );
        match f.get_field_type() {
            MetricType::COUNTER => {
                let mut c = Counter::default();
                c.set_value(value);
                m.set_counter(c);
            }
            // Untyped samples are written from the gauge field (see `encode_text`).
            _ => {
                let mut g = Gauge::default();
                g.set_value(value);
                m.set_gauge(g);
            }
        }
        f.mut_metric().push(m);
    }

    fn one(&mut self, name: &str, value: impl Into<f64>) {
        self.add(name, &[], value.into());
    }
}

/// Per-queue numbers read at scrape time.
#[derive(Debug, Default, Clone, Copy)]
pub struct QueueSample {
    pub ready: u64,
    pub unacked: u64,
    pub ready_bytes: u64,
    pub unacked_bytes: u64,
    pub consumers: u64,
}

/// One queue as a scrape reads it.
struct QueueRow {
    vhost: String,
    name: String,
    sample: QueueSample,
    /// (connection, channel) of each consumer.
    consumer_channels: Vec<(u64, u16)>,
}

/// The broker's metrics as a [`prometheus`] collector: `per_object` selects RabbitMQ's
/// `/metrics/per-object` shape (one series per queue and channel) over `/metrics`
/// (every per-object family summed into one unlabelled series).
pub struct BrokerCollector {
    broker: Arc<Broker>,
    per_object: bool,
    descs: Vec<Desc>,
}

impl BrokerCollector {
    pub fn new(broker: Arc<Broker>, per_object: bool) -> Self {
        let descs = FAMILIES
            .iter()
            .filter_map(|(name, _, help)| {
                Desc::new((*name).into(), (*help).into(), vec![], HashMap::new()).ok()
            })
            .collect();
        Self {
            broker,
            per_object,
            descs,
        }
    }

    fn build(&self) -> Vec<MetricFamily> {
        let b = &*self.broker;
        let per_object = self.per_object;
        let mut out = Families::new();

        // Alarms.
        {
            let alarms = b.alarms();
            let on = |names: &[&str]| {
                let a = alarms.borrow();
                u8::from(a.iter().any(|x| names.contains(&x.as_str())))
            };
            out.one(
                "rabbitmq_alarms_file_descriptor_limit",
                on(&["file_descriptor_limit", "fd"]),
            );
            out.one(
                "rabbitmq_alarms_free_disk_space_watermark",
                on(&["disk", "free_disk_space"]),
            );
            out.one("rabbitmq_alarms_memory_used_watermark", on(&["memory"]));
        }

        // Connections.
        let opened = load(&b.metrics.connections_opened);
        let closed = load(&b.metrics.connections_closed);
        out.one("rabbitmq_connections_opened_total", opened as f64);
        out.one("rabbitmq_connections_closed_total", closed as f64);

        // Queues, read from the vhosts.
        let mut queues: Vec<QueueRow> = Vec::new();
        let mut vhosts = b.vhost_names();
        vhosts.sort();
        for vname in &vhosts {
            let Some(v) = b.vhost(vname) else { continue };
            let mut qs = v.queues();
            qs.sort_by(|a, b| a.name.cmp(&b.name));
            for q in qs {
                let (sample, consumer_channels) = q.metrics_sample();
                queues.push(QueueRow {
                    vhost: vname.clone(),
                    name: q.name.clone(),
                    sample,
                    consumer_channels,
                });
            }
        }

        // Channels: counters of live channels plus those of closed ones, read under one lock
        // so a channel closing during the scrape is counted exactly once.
        let mut consumers_by_channel: HashMap<(u64, u16), u64> = HashMap::new();
        for row in &queues {
            for k in &row.consumer_channels {
                *consumers_by_channel.entry(*k).or_default() += 1;
            }
        }
        let channels = b.metrics.channels.lock();
        out.one("rabbitmq_channels_opened_total", channels.opened as f64);
        out.one("rabbitmq_channels_closed_total", channels.closed as f64);
        let qc = &b.metrics.queues;
        out.one("rabbitmq_queues_declared_total", load(&qc.declared) as f64);
        out.one("rabbitmq_queues_created_total", load(&qc.created) as f64);
        out.one("rabbitmq_queues_deleted_total", load(&qc.deleted) as f64);

        // The process.
        let process = process_sample(b);
        out.one("rabbitmq_process_open_fds", process.open_fds as f64);
        out.one(
            "rabbitmq_process_open_tcp_sockets",
            process.open_sockets as f64,
        );
        out.one(
            "rabbitmq_process_resident_memory_bytes",
            process.resident_bytes as f64,
        );
        out.one(
            "rabbitmq_resident_memory_limit_bytes",
            b.memory_limit_bytes() as f64,
        );
        out.one(
            "rabbitmq_disk_space_available_limit_bytes",
            b.config.disk_free_limit as f64,
        );
        if let Some(d) = process.disk_available {
            out.one("rabbitmq_disk_space_available_bytes", d as f64);
        }
        out.one("rabbitmq_process_max_fds", process.max_fds as f64);
        out.one(
            "rabbitmq_process_max_tcp_sockets",
            process.max_sockets as f64,
        );

        // Per-queue gauges.
        const QUEUE_GAUGES: [&str; 7] = [
            "rabbitmq_queue_messages_ready",
            "rabbitmq_queue_messages_unacked",
            "rabbitmq_queue_messages",
            "rabbitmq_queue_consumers",
            "rabbitmq_queue_messages_bytes",
            "rabbitmq_queue_messages_ready_bytes",
            "rabbitmq_queue_messages_unacked_bytes",
        ];
        let queue_values = |s: &QueueSample| {
            [
                s.ready,
                s.unacked,
                s.ready + s.unacked,
                s.consumers,
                s.ready_bytes + s.unacked_bytes,
                s.ready_bytes,
                s.unacked_bytes,
            ]
        };
        if per_object {
            for (i, name) in QUEUE_GAUGES.iter().enumerate() {
                for row in &queues {
                    out.add(
                        name,
                        &[("vhost", &row.vhost), ("queue", &row.name)],
                        queue_values(&row.sample)[i] as f64,
                    );
                }
            }
        } else {
            let mut sum = [0u64; 7];
            for row in &queues {
                for (acc, v) in sum.iter_mut().zip(queue_values(&row.sample)) {
                    *acc += v;
                }
            }
            for (name, v) in QUEUE_GAUGES.iter().zip(sum) {
                out.one(name, v as f64);
            }
        }

        // Per-channel families.
        let mut live: Vec<(&(u64, u16), &Arc<ChannelShared>)> = channels.live.iter().collect();
        live.sort_by_key(|(k, _)| **k);
        if per_object {
            for (key, ch) in &live {
                let label = channel_label(**key);
                let l = [("channel", label.as_str())];
                let consumers = consumers_by_channel.get(key).copied().unwrap_or(0);
                out.add("rabbitmq_channel_consumers", &l, consumers as f64);
                out.add(
                    "rabbitmq_channel_messages_unacked",
                    &l,
                    ch.unacked_count() as f64,
                );
                out.add("rabbitmq_channel_messages_unconfirmed", &l, 0.0);
                out.add("rabbitmq_channel_prefetch", &l, ch.global_prefetch() as f64);
            }
            for (key, ch) in &live {
                let label = channel_label(**key);
                let vhost = ch.conn.vhost.name.as_str();
                let lists = ch.stats.lists.lock();
                for p in &lists.publishes {
                    let l = [
                        ("channel", label.as_str()),
                        ("vhost", vhost),
                        ("exchange", p.exchange.as_str()),
                    ];
                    for (name, v) in [
                        ("rabbitmq_channel_messages_published_total", &p.published),
                        ("rabbitmq_channel_messages_confirmed_total", &p.confirmed),
                        (
                            "rabbitmq_channel_messages_unroutable_returned_total",
                            &p.returned,
                        ),
                        (
                            "rabbitmq_channel_messages_unroutable_dropped_total",
                            &p.dropped,
                        ),
                    ] {
                        out.add(name, &l, load(v) as f64);
                    }
                }
                for d in &lists.deliveries {
                    let l = [
                        ("channel", label.as_str()),
                        ("vhost", vhost),
                        ("queue", d.queue.as_str()),
                    ];
                    for (name, v) in [
                        ("rabbitmq_channel_get_ack_total", &d.get_ack),
                        ("rabbitmq_channel_get_total", &d.get),
                        (
                            "rabbitmq_channel_messages_delivered_ack_total",
                            &d.delivered_ack,
                        ),
                        ("rabbitmq_channel_messages_delivered_total", &d.delivered),
                        (
                            "rabbitmq_channel_messages_redelivered_total",
                            &d.redelivered,
                        ),
                        ("rabbitmq_channel_messages_acked_total", &d.acked),
                        ("rabbitmq_channel_get_empty_total", &d.get_empty),
                    ] {
                        out.add(name, &l, load(v) as f64);
                    }
                }
            }
        } else {
            let mut t = channels.retired;
            let (mut unacked, mut prefetch) = (0u64, 0u64);
            for (_, ch) in &live {
                t.add(&ch.stats.totals());
                unacked += u64::from(ch.unacked_count());
                prefetch += u64::from(ch.global_prefetch());
            }
            let consumers: u64 = consumers_by_channel.values().sum();
            out.one("rabbitmq_channel_consumers", consumers as f64);
            out.one("rabbitmq_channel_messages_unacked", unacked as f64);
            out.one("rabbitmq_channel_messages_unconfirmed", 0.0);
            out.one("rabbitmq_channel_prefetch", prefetch as f64);
            for (name, v) in [
                ("rabbitmq_channel_messages_published_total", t.published),
                ("rabbitmq_channel_messages_confirmed_total", t.confirmed),
                (
                    "rabbitmq_channel_messages_unroutable_returned_total",
                    t.returned,
                ),
                (
                    "rabbitmq_channel_messages_unroutable_dropped_total",
                    t.dropped,
                ),
                ("rabbitmq_channel_get_ack_total", t.get_ack),
                ("rabbitmq_channel_get_total", t.get),
                (
                    "rabbitmq_channel_messages_delivered_ack_total",
                    t.delivered_ack,
                ),
                ("rabbitmq_channel_messages_delivered_total", t.delivered),
                ("rabbitmq_channel_messages_redelivered_total", t.redelivered),
                ("rabbitmq_channel_messages_acked_total", t.acked),
                ("rabbitmq_channel_get_empty_total", t.get_empty),
                // Per object, RabbitMQ labels this by channel, exchange and queue; Warren
                // counts it per channel and exchange only, so it is exported aggregated.
                ("rabbitmq_queue_messages_published_total", t.routed),
            ] {
                out.one(name, v as f64);
            }
        }
        let live_channels = live.len();
        drop(live);
        drop(channels);

        // Node totals.
        out.one("rabbitmq_connections", opened.saturating_sub(closed) as f64);
        out.one("rabbitmq_channels", live_channels as f64);
        let consumers: u64 = queues.iter().map(|row| row.sample.consumers).sum();
        out.one("rabbitmq_consumers", consumers as f64);
        out.one("rabbitmq_queues", queues.len() as f64);

        // Identity.
        // `rabbitmq_version` is the RabbitMQ release Warren follows, as the management API
        // reports it; Warren's own version is in `prometheus_plugin_version`.
        out.add(
            "rabbitmq_build_info",
            &[
                ("rabbitmq_version", crate::management::RABBITMQ_API_VERSION),
                ("prometheus_plugin_version", env!("CARGO_PKG_VERSION")),
                ("prometheus_client_version", PROMETHEUS_CLIENT_VERSION),
                ("erlang_version", "none"),
            ],
            1.0,
        );
        // Links.
        for l in b.links.shovels(None) {
            let labels = [("vhost", l.vhost.as_str()), ("shovel", l.name.as_str())];
            let current = l.state_name();
            for state in crate::links::status::SHOVEL_STATES {
                let with_state = [labels[0], labels[1], ("state", state)];
                out.add(
                    "warren_shovel_state",
                    &with_state,
                    f64::from(u8::from(*state == current)),
                );
            }
            out.add(
                "warren_shovel_messages_forwarded_total",
                &labels,
                l.forwarded() as f64,
            );
            out.add(
                "warren_shovel_messages_pending",
                &labels,
                l.pending() as f64,
            );
        }
        for l in b.links.federation_links(None) {
            let kind = l.kind.federation_type();
            let labels = [
                ("vhost", l.vhost.as_str()),
                ("upstream", l.upstream.as_str()),
                ("type", kind),
                ("name", l.name.as_str()),
            ];
            let current = l.state_name();
            for state in crate::links::status::FEDERATION_STATES {
                let with_state = [labels[0], labels[1], labels[2], labels[3], ("state", state)];
                out.add(
                    "warren_federation_link_state",
                    &with_state,
                    f64::from(u8::from(*state == current)),
                );
            }
            out.add(
                "warren_federation_messages_forwarded_total",
                &labels,
                l.forwarded() as f64,
            );
            out.add(
                "warren_federation_link_pending",
                &labels,
                l.pending() as f64,
            );
        }

        let cluster = b.config.cluster_name.clone();
        let id = cluster_permanent_id(&cluster);
        out.add(
            "rabbitmq_identity_info",
            &[
                ("rabbitmq_node", &b.node_name()),
                ("rabbitmq_cluster", &cluster),
                ("rabbitmq_cluster_permanent_id", &id),
            ],
            1.0,
        );
        // Every node's view of every member: a member some node sees down shows up even when
        // Prometheus cannot scrape that member itself.
        if let Some(c) = b.cluster() {
            let me = b.node_name();
            let members = std::iter::once((me.clone(), true))
                .chain(c.peers().into_iter().map(|n| (n.name, n.running)));
            for (peer, running) in members {
                out.add(
                    "warren_cluster_node_running",
                    &[
                        ("rabbitmq_node", &me),
                        ("rabbitmq_cluster", &cluster),
                        ("peer", &peer),
                    ],
                    f64::from(u8::from(running)),
                );
            }
        }
        out.families
    }
}

/// The `prometheus` crate release this module is written against (reported in
/// `rabbitmq_build_info`, where RabbitMQ reports its Erlang client's version).
const PROMETHEUS_CLIENT_VERSION: &str = "0.14";

/// RabbitMQ generates a random id once per cluster and stores it; Warren derives it from the
/// cluster name, which is as stable and needs no state on disk.
fn cluster_permanent_id(cluster: &str) -> String {
    use base64::Engine;
    use sha2::Digest;
    let digest = sha2::Sha256::digest(cluster.as_bytes());
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&digest[..16]);
    format!("rabbitmq-cluster-id-{b64}")
}

impl Collector for BrokerCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.build()
    }
}

// ---------------------------------------------------------------------------------------------
// The process

struct ProcessSample {
    open_fds: u64,
    max_fds: u64,
    open_sockets: u64,
    max_sockets: u64,
    resident_bytes: u64,
    disk_available: Option<u64>,
}

fn process_sample(b: &Broker) -> ProcessSample {
    let open_fds = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count() as u64)
        .unwrap_or(0);
    let max_fds = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| parse_max_open_files(&s))
        .unwrap_or(0);
    let resident_bytes = crate::resources::resident_memory_bytes().unwrap_or(0);
    let limit = b.config.max_connections as u64;
    ProcessSample {
        open_fds,
        max_fds,
        open_sockets: b.open_connections.load(Ordering::Relaxed) as u64,
        max_sockets: if limit > 0 { limit } else { max_fds },
        resident_bytes,
        disk_available: crate::resources::disk_available(&b.config.data_dir),
    }
}

/// The soft limit from `/proc/self/limits`' "Max open files" line.
fn parse_max_open_files(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

// ---------------------------------------------------------------------------------------------
// Text exposition

/// Encodes families in the Prometheus text format 0.0.4. The `prometheus` crate's encoder
/// refuses untyped families, which RabbitMQ uses for alarms and identity.
pub fn encode_text(families: &[MetricFamily]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(8 * 1024);
    for f in families {
        let kind = match f.get_field_type() {
            MetricType::COUNTER => "counter",
            MetricType::GAUGE => "gauge",
            MetricType::SUMMARY => "summary",
            MetricType::HISTOGRAM => "histogram",
            MetricType::UNTYPED => "untyped",
        };
        let _ = writeln!(s, "# TYPE {} {kind}", f.name());
        let _ = writeln!(s, "# HELP {} {}", f.name(), escape_help(f.help()));
        for m in f.get_metric() {
            let v = match f.get_field_type() {
                MetricType::COUNTER => m.get_counter().get_value(),
                _ => m.get_gauge().get_value(),
            };
            s.push_str(f.name());
            let labels = m.get_label();
            if !labels.is_empty() {
                s.push('{');
                for (i, l) in labels.iter().enumerate() {
                    if i > 0 {
                        s.push(',');
                    }
                    let _ = write!(s, "{}=\"{}\"", l.name(), escape_label(l.value()));
                }
                s.push('}');
            }
            s.push(' ');
            push_value(&mut s, v);
            s.push('\n');
        }
    }
    s
}

fn push_value(s: &mut String, v: f64) {
    use std::fmt::Write;
    if v.is_nan() {
        s.push_str("NaN");
    } else if v.is_infinite() {
        s.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        let _ = write!(s, "{}", v as i64);
    } else {
        let _ = write!(s, "{v}");
    }
}

fn escape_help(h: &str) -> String {
    h.replace('\\', "\\\\").replace('\n', "\\n")
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The body of `/metrics` (aggregated) or `/metrics/per-object`.
pub fn render(broker: &Arc<Broker>, per_object: bool) -> String {
    encode_text(&BrokerCollector::new(broker.clone(), per_object).collect())
}

// ---------------------------------------------------------------------------------------------
// HTTP

const CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// Serves `/metrics` and `/metrics/per-object` on a bound listener until `shutdown` resolves.
/// Tests pass a listener bound to `127.0.0.1:0`; the binary binds `--prometheus-listen`.
pub async fn run<L>(
    broker: Arc<Broker>,
    listener: L,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    L: axum::serve::Listener<Addr = std::net::SocketAddr>,
{
    use axum::routing::get;
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "Prometheus listener started");
    }
    let app = axum::Router::new()
        .route("/metrics", get(aggregated))
        .route("/metrics/per-object", get(per_object))
        .with_state(broker);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn aggregated(
    axum::extract::State(broker): axum::extract::State<Arc<Broker>>,
) -> impl axum::response::IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)],
        render(&broker, false),
    )
}

async fn per_object(
    axum::extract::State(broker): axum::extract::State<Arc<Broker>>,
) -> impl axum::response::IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)],
        render(&broker, true),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(parse_max_open_files(limits), Some(1024));
    }

    #[test]
    fn text_format() {
        let mut f = Families::new();
        f.add(
            "rabbitmq_queue_messages_ready",
            &[("vhost", "/"), ("queue", "a\"b")],
            3.0,
        );
        f.one("rabbitmq_alarms_memory_used_watermark", 1u8);
        let text = encode_text(&f.families);
        assert!(text.contains(
            "# TYPE rabbitmq_queue_messages_ready gauge\n# HELP rabbitmq_queue_messages_ready Messages ready to be delivered to consumers\nrabbitmq_queue_messages_ready{vhost=\"/\",queue=\"a\\\"b\"} 3\n"
        ), "{text}");
        assert!(text.contains(
            "# TYPE rabbitmq_alarms_memory_used_watermark untyped\n# HELP rabbitmq_alarms_memory_used_watermark is 1 if VM memory watermark alarm is in effect\nrabbitmq_alarms_memory_used_watermark 1\n"
        ), "{text}");
    }

    #[test]
    fn pruning_keeps_totals() {
        let s = ChannelStats::default();
        for i in 0..PRUNE_AT {
            s.delivery(&format!("q{i}"), |_| true)
                .acked
                .fetch_add(1, Ordering::Relaxed);
        }
        s.delivery("new", |q| q != "q0");
        assert_eq!(s.lists.lock().deliveries.len(), PRUNE_AT);
        assert_eq!(s.totals().acked, PRUNE_AT as u64);
    }
}
