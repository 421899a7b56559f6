#![allow(clippy::unwrap_used)]
//! Queues much larger than memory, against a real `warren-broker` process with an 8 MiB
//! message memory budget: 128 MiB go through one queue while the node's resident memory
//! (`VmRSS` of the process) is sampled; every message comes back in order and intact, for
//! transient messages (page files) and persistent ones (the message log), and the persistent
//! ones again after a `kill -9`. Drain throughput is printed, not asserted.
//!
//! `WARREN_PAGING_BODY` sets the body size (default 65536 bytes; the count follows, for
//! 128 MiB). For throughput figures run it with `--release -- --nocapture`.
mod common;
#[path = "common/node.rs"]
mod node;

use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use lapin::BasicProperties;
use lapin::options::*;
use lapin::types::FieldTable;
use node::{Node, data_dir};

const BUDGET: &str = "8MiB";
/// 128 MiB go through the queue: 16 times the budget.
const TOTAL: usize = 128 << 20;
fn body_size() -> usize {
    std::env::var("WARREN_PAGING_BODY")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|b| *b >= 64)
        .unwrap_or(64 * 1024)
}

fn count() -> u64 {
    (TOTAL / body_size()) as u64
}

/// Resident memory allowed above what the idle node uses, while 128 MiB sit in its queue:
/// the budget, one read-ahead batch, connection buffers and the allocator's slack.
const HEADROOM: u64 = 40 << 20;

/// Message `i`'s body: its number, then bytes derived from it (so a body from another
/// message, or a damaged one, is caught).
fn body(i: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(body_size());
    b.extend_from_slice(&i.to_be_bytes());
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while b.len() < body_size() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.extend_from_slice(&x.to_le_bytes());
    }
    b.truncate(body_size());
    b
}

/// Publishes `count()` messages with confirms (a window of 64), sampling the node's memory.
/// Returns the peak resident memory seen.
async fn fill(node: &Node, queue: &str, durable: bool, persistent: bool) -> u64 {
    let c = node.connect().await;
    let ch = c.create_channel().await.unwrap();
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let props = if persistent {
        BasicProperties::default().with_delivery_mode(2)
    } else {
        BasicProperties::default()
    };
    let mut peak = 0;
    let mut inflight = std::collections::VecDeque::new();
    for i in 0..count() {
        let p = ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &body(i),
                props.clone(),
            )
            .await
            .unwrap();
        inflight.push_back(p);
        if inflight.len() >= 64 {
            assert!(inflight.pop_front().unwrap().await.unwrap().is_ack());
        }
        if i % 32 == 0 {
            peak = peak.max(node.rss());
        }
    }
    for p in inflight {
        assert!(p.await.unwrap().is_ack());
    }
    peak = peak.max(node.rss());
    c.close(200, "done".into()).await.unwrap();
    peak
}

/// The next delivery, message `i` (30 s at most; the node's log on a timeout).
async fn next_delivery(
    consumer: &mut lapin::Consumer,
    node: &Node,
    i: u64,
) -> lapin::message::Delivery {
    tokio::time::timeout(Duration::from_secs(30), consumer.next())
        .await
        .unwrap_or_else(|_| panic!("message {i} did not come; log:\n{}", node.log_text()))
        .unwrap()
        .unwrap()
}

/// Consumes everything (manual acks, prefetch 256), checking order and content and sampling
/// memory. Returns the peak resident memory and the time it took.
async fn drain(node: &Node, queue: &str) -> (u64, Duration) {
    let c = node.connect().await;
    let ch = c.create_channel().await.unwrap();
    ch.basic_qos(256, BasicQosOptions::default()).await.unwrap();
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "drain".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let started = Instant::now();
    let mut peak = 0;
    for i in 0..count() {
        let d = next_delivery(&mut consumer, node, i).await;
        let n = u64::from_be_bytes(d.data[..8].try_into().unwrap());
        assert_eq!(n, i, "out of order");
        assert!(d.data == body(i), "message {i} damaged");
        if i % 64 == 63 {
            d.acker
                .ack(BasicAckOptions { multiple: true })
                .await
                .unwrap();
        }
        if i % 32 == 0 {
            peak = peak.max(node.rss());
        }
    }
    let took = started.elapsed();
    ch.basic_cancel("drain".into(), BasicCancelOptions::default())
        .await
        .unwrap();
    ch.basic_ack(0, BasicAckOptions { multiple: true })
        .await
        .unwrap();
    let left = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap()
        .message_count();
    assert_eq!(left, 0);
    c.close(200, "done".into()).await.unwrap();
    (peak.max(node.rss()), took)
}

fn report(what: &str, took: Duration) {
    let mib = (count() as usize * body_size()) as f64 / (1 << 20) as f64;
    eprintln!(
        "paging: drained {what}: {} x {} B ({mib:.0} MiB) in {:.2} s: {:.0} msg/s, {:.0} MiB/s",
        count(),
        body_size(),
        took.as_secs_f64(),
        count() as f64 / took.as_secs_f64(),
        mib / took.as_secs_f64()
    );
}

fn check_bounded(what: &str, baseline: u64, peak: u64, node_log: &str) {
    eprintln!(
        "paging: {what}: resident memory {} MiB at rest, peak {} MiB, for a 128 MiB queue",
        baseline >> 20,
        peak >> 20
    );
    assert!(
        peak < baseline + HEADROOM,
        "{what}: resident memory reached {} MiB (idle {} MiB) with a {BUDGET} budget; log:\n{node_log}",
        peak >> 20,
        baseline >> 20
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_sixteen_times_the_memory_budget() {
    let dir = data_dir("paging");
    let node = Node::start_with(&dir, &["--message-memory-budget", BUDGET]).await;
    let baseline = node.rss();

    // Transient messages in a transient queue: paged to page files.
    let peak = fill(&node, "transient", false, false).await;
    check_bounded("publishing transient", baseline, peak, &node.log_text());
    let pages: u64 = std::fs::read_dir(dir.join("pages"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(
        pages > 100 << 20,
        "the queue's bodies are in page files ({pages} bytes)"
    );
    let (peak, took) = drain(&node, "transient").await;
    check_bounded("draining transient", baseline, peak, &node.log_text());
    report("transient", took);
    // Page files go with the messages they held.
    let left: u64 = std::fs::read_dir(dir.join("pages"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(left < 64 << 20, "{left} bytes of page files left");

    // Persistent messages in a durable queue: already in the log, dropped from memory.
    let peak = fill(&node, "durable", true, true).await;
    check_bounded("publishing persistent", baseline, peak, &node.log_text());
    let (peak, took) = drain(&node, "durable").await;
    check_bounded("draining persistent", baseline, peak, &node.log_text());
    report("persistent", took);

    // And after a crash: recovery keeps only metadata in memory, bodies come back from the
    // log as consumers get to them.
    fill(&node, "durable", true, true).await;
    node.crash();
    let node = Node::start_with(&dir, &["--message-memory-budget", BUDGET]).await;
    let after_recovery = node.rss();
    let (peak, took) = drain(&node, "durable").await;
    check_bounded(
        "draining persistent after kill -9",
        baseline,
        peak.max(after_recovery),
        &node.log_text(),
    );
    report("persistent after restart", took);
    node.crash();
}

/// Disk the files under `dir` take (allocated blocks: punched holes do not count).
fn allocated(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().blocks() * 512)
        .sum()
}

/// A consumer that keeps a message in every 1 MiB (at least every 256th) unacked while it
/// acks the rest: those few pin both 64 MiB page files, which must still give back the space
/// of everything else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_files_pinned_by_a_few_unacked_messages_keep_little_disk() {
    let dir = data_dir("paging-pinned");
    let node = Node::start_with(&dir, &["--message-memory-budget", BUDGET]).await;
    fill(&node, "pinned", false, false).await;
    let pages = dir.join("pages");
    let full = allocated(&pages);
    assert!(
        full > 100 << 20,
        "the bodies are in page files ({full} bytes)"
    );

    let c = node.connect().await;
    let ch = c.create_channel().await.unwrap();
    ch.basic_qos(64, BasicQosOptions::default()).await.unwrap();
    let mut consumer = ch
        .basic_consume(
            "pinned".into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut held = Vec::new();
    let every = (1u64 << 20).div_ceil(body_size() as u64).max(256);
    for i in 0..count() {
        let d = next_delivery(&mut consumer, &node, i).await;
        assert!(d.data == body(i), "message {i} damaged");
        if i % every == every / 2 {
            held.push(d);
        } else {
            d.acker.ack(BasicAckOptions::default()).await.unwrap();
        }
    }
    // Acks are asynchronous: wait until the queue holds only the unacked ones' space.
    let bound = 16 << 20;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut now = allocated(&pages);
    while now >= bound && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        now = allocated(&pages);
    }
    eprintln!(
        "paging: {} unacked messages of {} KiB keep {} KiB of page files allocated (of {} MiB written)",
        held.len(),
        body_size() >> 10,
        now >> 10,
        full >> 20
    );
    assert!(
        now < bound,
        "{now} bytes of page files still allocated for {} unacked messages",
        held.len()
    );
    // The held ones are still readable: requeued by the channel's close, delivered again.
    c.close(200, "done".into()).await.unwrap();
    let c = node.connect().await;
    let ch = c.create_channel().await.unwrap();
    for d in &held {
        let m = ch
            .basic_get("pinned".into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .expect("a held message was requeued");
        assert!(m.delivery.data == d.data, "a requeued message was damaged");
    }
    node.crash();
}
