//! The Prometheus endpoint: a known workload, then exact values of the rabbitmq_prometheus
//! families on `/metrics` (aggregated) and `/metrics/per-object`, scraped over HTTP.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{TestBroker, unique};
use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation};

/// One sample of the text exposition.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

struct Scrape {
    text: String,
    samples: Vec<Sample>,
}

impl Scrape {
    /// The value of the series with exactly these labels.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == want)
            .map(|s| s.value)
    }

    #[track_caller]
    fn assert(&self, name: &str, labels: &[(&str, &str)], expected: f64) {
        let got = self.get(name, labels);
        assert_eq!(
            got,
            Some(expected),
            "{name}{labels:?}: expected {expected}, got {got:?}\n{}",
            self.text
        );
    }

    /// Every series of a family, whatever its labels.
    fn series(&self, name: &str) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.name == name).collect()
    }
}

fn parse(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample line");
        let value: f64 = value.parse().expect("sample value");
        let (name, labels) = match series.split_once('{') {
            None => (series.to_owned(), BTreeMap::new()),
            Some((name, rest)) => {
                let rest = rest.strip_suffix('}').expect("closing brace");
                let mut labels = BTreeMap::new();
                // Label values in these tests contain no escaped quotes or commas.
                for pair in rest.split("\",") {
                    let (k, v) = pair.split_once("=\"").expect("label pair");
                    labels.insert(k.to_owned(), v.trim_end_matches('"').to_owned());
                }
                (name.to_owned(), labels)
            }
        };
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    out
}

async fn scrape(base: &str, path: &str) -> Scrape {
    let resp = reqwest::get(format!("{base}{path}"))
        .await
        .expect("scrape request");
    assert_eq!(resp.status(), 200);
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    let text = resp.text().await.expect("scrape body");
    Scrape {
        samples: parse(&text),
        text,
    }
}

async fn declare(ch: &Channel, name: &str) {
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("queue.declare");
}

async fn publish(ch: &Channel, rk: &str, body: &[u8], mandatory: bool) -> Confirmation {
    ch.basic_publish(
        "".into(),
        rk.into(),
        BasicPublishOptions {
            mandatory,
            ..Default::default()
        },
        body,
        BasicProperties::default(),
    )
    .await
    .expect("publish")
    .await
    .expect("confirm")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_match_a_known_workload() {
    let b = TestBroker::start().await;
    let base = b.start_metrics().await;

    // Before any client: the node-wide families are there, at zero.
    let m = scrape(&base, "/metrics").await;
    for name in [
        "rabbitmq_connections",
        "rabbitmq_channels",
        "rabbitmq_consumers",
        "rabbitmq_queues",
        "rabbitmq_queue_messages_ready",
        "rabbitmq_channel_messages_published_total",
        "rabbitmq_alarms_memory_used_watermark",
    ] {
        m.assert(name, &[], 0.0);
    }
    assert!(m.text.contains(
        "# TYPE rabbitmq_channel_messages_published_total counter\n\
         # HELP rabbitmq_channel_messages_published_total Total number of messages published into an exchange on a channel\n"
    ));
    assert!(m.text.contains("# TYPE rabbitmq_identity_info untyped\n"));
    let identity = m.series("rabbitmq_identity_info");
    assert_eq!(identity.len(), 1);
    let id = &identity[0].labels;
    assert!(id.contains_key("rabbitmq_node") && id.contains_key("rabbitmq_cluster"));
    assert!(id["rabbitmq_cluster_permanent_id"].starts_with("rabbitmq-cluster-id-"));
    assert_eq!(m.series("rabbitmq_build_info")[0].value, 1.0);
    assert!(
        m.get("rabbitmq_process_resident_memory_bytes", &[])
            .unwrap()
            > 0.0
    );
    assert!(m.get("rabbitmq_disk_space_available_bytes", &[]).unwrap() > 0.0);
    assert!(m.get("rabbitmq_process_open_fds", &[]).unwrap() > 0.0);
    assert!(m.get("rabbitmq_process_max_fds", &[]).unwrap() > 0.0);

    // The workload: one connection, a publishing channel in confirm mode and a consuming one.
    let conn = b.connect().await;
    let pub_ch = conn.create_channel().await.unwrap();
    pub_ch
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let (q1, q2, q3) = (unique("m1"), unique("m2"), unique("m-empty"));
    declare(&pub_ch, &q1).await;
    declare(&pub_ch, &q2).await;
    declare(&pub_ch, &q3).await;
    declare(&pub_ch, &q1).await; // a redeclare: declared, not created
    for _ in 0..10 {
        assert!(matches!(
            publish(&pub_ch, &q1, b"0123456789", false).await,
            Confirmation::Ack(None)
        ));
    }
    for _ in 0..4 {
        publish(&pub_ch, &q2, &[b'x'; 100], false).await;
    }
    assert!(matches!(
        publish(&pub_ch, "no-such-queue", b"u", true).await,
        Confirmation::Ack(Some(_))
    ));
    publish(&pub_ch, "no-such-queue", b"u", false).await;

    let ch = conn.create_channel().await.unwrap();
    for _ in 0..3 {
        let m = ch
            .basic_get(q1.as_str().into(), BasicGetOptions { no_ack: false })
            .await
            .unwrap()
            .expect("a message");
        ch.basic_ack(m.delivery.delivery_tag, BasicAckOptions::default())
            .await
            .unwrap();
    }
    ch.basic_get(q1.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("a message");
    assert!(
        ch.basic_get(q3.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .is_none()
    );
    ch.basic_qos(10, BasicQosOptions::default()).await.unwrap();
    let mut consumer = ch
        .basic_consume(
            q2.as_str().into(),
            "metrics-consumer".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut tags = Vec::new();
    for _ in 0..4 {
        let d = tokio::time::timeout(Duration::from_secs(5), consumer.next())
            .await
            .expect("a delivery")
            .unwrap()
            .unwrap();
        tags.push(d.delivery_tag);
    }
    // Acks the first two (delivery tags continue after the four basic.get ones).
    ch.basic_ack(tags[1], BasicAckOptions { multiple: true })
        .await
        .unwrap();
    // basic.ack has no reply: a round trip makes sure the broker has processed it.
    ch.basic_qos(10, BasicQosOptions::default()).await.unwrap();

    let m = scrape(&base, "/metrics").await;
    let expected: &[(&str, f64)] = &[
        ("rabbitmq_connections", 1.0),
        ("rabbitmq_channels", 2.0),
        ("rabbitmq_consumers", 1.0),
        ("rabbitmq_queues", 3.0),
        ("rabbitmq_connections_opened_total", 1.0),
        ("rabbitmq_connections_closed_total", 0.0),
        ("rabbitmq_channels_opened_total", 2.0),
        ("rabbitmq_channels_closed_total", 0.0),
        ("rabbitmq_queues_declared_total", 4.0),
        ("rabbitmq_queues_created_total", 3.0),
        ("rabbitmq_queues_deleted_total", 0.0),
        ("rabbitmq_queue_messages_ready", 6.0),
        ("rabbitmq_queue_messages_unacked", 2.0),
        ("rabbitmq_queue_messages", 8.0),
        ("rabbitmq_queue_messages_ready_bytes", 60.0),
        ("rabbitmq_queue_messages_unacked_bytes", 200.0),
        ("rabbitmq_queue_messages_bytes", 260.0),
        ("rabbitmq_queue_consumers", 1.0),
        ("rabbitmq_channel_consumers", 1.0),
        ("rabbitmq_channel_messages_unacked", 2.0),
        ("rabbitmq_channel_messages_unconfirmed", 0.0),
        ("rabbitmq_channel_messages_published_total", 16.0),
        ("rabbitmq_channel_messages_confirmed_total", 16.0),
        ("rabbitmq_channel_messages_unroutable_returned_total", 1.0),
        ("rabbitmq_channel_messages_unroutable_dropped_total", 1.0),
        ("rabbitmq_queue_messages_published_total", 14.0),
        ("rabbitmq_channel_get_ack_total", 3.0),
        ("rabbitmq_channel_get_total", 1.0),
        ("rabbitmq_channel_get_empty_total", 1.0),
        ("rabbitmq_channel_messages_delivered_ack_total", 4.0),
        ("rabbitmq_channel_messages_delivered_total", 0.0),
        ("rabbitmq_channel_messages_redelivered_total", 0.0),
        ("rabbitmq_channel_messages_acked_total", 5.0),
        ("rabbitmq_alarms_memory_used_watermark", 0.0),
        ("rabbitmq_alarms_free_disk_space_watermark", 0.0),
        ("rabbitmq_alarms_file_descriptor_limit", 0.0),
    ];
    for (name, v) in expected {
        m.assert(name, &[], *v);
    }

    // Per object: queues by vhost and name; channels by channel, vhost and exchange/queue.
    let p = scrape(&base, "/metrics/per-object").await;
    for (q, ready, unacked, bytes, consumers) in [
        (&q1, 6.0, 0.0, 60.0, 0.0),
        (&q2, 0.0, 2.0, 200.0, 1.0),
        (&q3, 0.0, 0.0, 0.0, 0.0),
    ] {
        let l = [("vhost", "/"), ("queue", q.as_str())];
        p.assert("rabbitmq_queue_messages_ready", &l, ready);
        p.assert("rabbitmq_queue_messages_unacked", &l, unacked);
        p.assert("rabbitmq_queue_messages", &l, ready + unacked);
        p.assert("rabbitmq_queue_messages_bytes", &l, bytes);
        p.assert("rabbitmq_queue_consumers", &l, consumers);
    }
    assert!(p.get("rabbitmq_queue_messages_ready", &[]).is_none());
    let published = p.series("rabbitmq_channel_messages_published_total");
    assert_eq!(published.len(), 1, "{}", p.text);
    let pub_label = published[0].labels["channel"].clone();
    let pl = [
        ("channel", pub_label.as_str()),
        ("vhost", "/"),
        ("exchange", ""),
    ];
    p.assert("rabbitmq_channel_messages_published_total", &pl, 16.0);
    p.assert("rabbitmq_channel_messages_confirmed_total", &pl, 16.0);
    p.assert(
        "rabbitmq_channel_messages_unroutable_returned_total",
        &pl,
        1.0,
    );
    p.assert(
        "rabbitmq_channel_messages_unroutable_dropped_total",
        &pl,
        1.0,
    );
    let acked = p.series("rabbitmq_channel_messages_acked_total");
    let ch_label = acked[0].labels["channel"].clone();
    assert_ne!(ch_label, pub_label);
    let on = |q: &str| {
        [
            ("channel", ch_label.clone()),
            ("vhost", "/".to_owned()),
            ("queue", q.to_owned()),
        ]
    };
    let check = |name: &str, q: &str, v: f64| {
        let l = on(q);
        let l: Vec<(&str, &str)> = l.iter().map(|(k, v)| (*k, v.as_str())).collect();
        p.assert(name, &l, v);
    };
    check("rabbitmq_channel_get_ack_total", &q1, 3.0);
    check("rabbitmq_channel_get_total", &q1, 1.0);
    check("rabbitmq_channel_messages_acked_total", &q1, 3.0);
    check("rabbitmq_channel_get_empty_total", &q3, 1.0);
    check("rabbitmq_channel_messages_delivered_ack_total", &q2, 4.0);
    check("rabbitmq_channel_messages_acked_total", &q2, 2.0);
    p.assert(
        "rabbitmq_channel_consumers",
        &[("channel", ch_label.as_str())],
        1.0,
    );
    p.assert(
        "rabbitmq_channel_messages_unacked",
        &[("channel", ch_label.as_str())],
        2.0,
    );
    p.assert(
        "rabbitmq_channel_consumers",
        &[("channel", pub_label.as_str())],
        0.0,
    );

    // Closing the connection requeues the two unacked messages; a new consumer gets them
    // redelivered. Closed channels' counts stay in the aggregated counters.
    conn.close(200, "bye".into()).await.unwrap();
    let (_c2, ch2) = b.channel().await;
    let mut consumer = ch2
        .basic_consume(
            q2.as_str().into(),
            "again".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    for _ in 0..2 {
        let d = tokio::time::timeout(Duration::from_secs(5), consumer.next())
            .await
            .expect("a redelivery")
            .unwrap()
            .unwrap();
        assert!(d.redelivered);
    }
    ch2.queue_delete(q3.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    // The server counts the closed connection just after releasing its channels.
    let mut m = scrape(&base, "/metrics").await;
    for _ in 0..100 {
        if m.get("rabbitmq_connections_closed_total", &[]) == Some(1.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        m = scrape(&base, "/metrics").await;
    }
    let expected: &[(&str, f64)] = &[
        ("rabbitmq_connections", 1.0),
        ("rabbitmq_channels", 1.0),
        ("rabbitmq_connections_opened_total", 2.0),
        ("rabbitmq_connections_closed_total", 1.0),
        ("rabbitmq_channels_opened_total", 3.0),
        ("rabbitmq_channels_closed_total", 2.0),
        ("rabbitmq_queues", 2.0),
        ("rabbitmq_queues_deleted_total", 1.0),
        ("rabbitmq_queue_messages_ready", 6.0),
        ("rabbitmq_queue_messages_unacked", 0.0),
        ("rabbitmq_channel_messages_published_total", 16.0),
        ("rabbitmq_channel_messages_confirmed_total", 16.0),
        ("rabbitmq_channel_messages_acked_total", 5.0),
        ("rabbitmq_channel_messages_delivered_ack_total", 4.0),
        ("rabbitmq_channel_messages_delivered_total", 2.0),
        ("rabbitmq_channel_messages_redelivered_total", 2.0),
        ("rabbitmq_channel_get_ack_total", 3.0),
    ];
    for (name, v) in expected {
        m.assert(name, &[], *v);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alarms_are_reported() {
    let b = TestBroker::start().await;
    let base = b.start_metrics().await;
    b.broker.set_alarm("memory");
    let m = scrape(&base, "/metrics").await;
    m.assert("rabbitmq_alarms_memory_used_watermark", &[], 1.0);
    m.assert("rabbitmq_alarms_free_disk_space_watermark", &[], 0.0);
    b.broker.clear_alarm("memory");
    let m = scrape(&base, "/metrics").await;
    m.assert("rabbitmq_alarms_memory_used_watermark", &[], 0.0);
}
