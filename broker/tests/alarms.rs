#![allow(clippy::unwrap_used)]
//! Memory and disk alarms from real measurements: a publishing client that advertises
//! `connection.blocked` is blocked while an alarm is on and unblocked when it clears.
mod common;

use amq_protocol::protocol::{AMQPClass, basic, connection};
use common::TestBroker;
use common::raw::{self, send_method};
use tokio::io::AsyncWriteExt;
use warren_broker::Config;

fn publish_frames(q: &str) -> Vec<u8> {
    let mut m = bytes::BytesMut::new();
    warren_broker::codec::encode_method(
        &mut m,
        1,
        &AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: "".into(),
            routing_key: q.into(),
            mandatory: false,
            immediate: false,
        })),
    );
    let hp = warren_broker::codec::encode_header_payload(1, &Default::default());
    warren_broker::codec::encode_content(&mut m, 1, &hp, b"x", 131072);
    m.to_vec()
}

async fn expect(s: &mut tokio::net::TcpStream, buf: &mut bytes::BytesMut, blocked: bool) {
    loop {
        match raw::read_method(s, buf).await {
            AMQPClass::Connection(connection::AMQPMethod::Blocked(b)) if blocked => {
                assert!(b.reason.as_str().contains("low on"), "{}", b.reason);
                return;
            }
            AMQPClass::Connection(connection::AMQPMethod::Unblocked(_)) if !blocked => return,
            _ => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_watermark_blocks_and_unblocks_publishers() {
    // No disk limit, so only the memory alarm is in play whatever this machine's disk holds.
    let config = Config {
        disk_free_limit: 0,
        ..Config::default()
    };
    let b = TestBroker::start_with(config).await;
    let mut s = tokio::net::TcpStream::connect(b.addr).await.unwrap();
    let mut buf = raw::handshake(&mut s).await;
    send_method(&mut s, 1, raw::channel_open()).await;
    let _ = raw::read_method(&mut s, &mut buf).await;
    s.write_all(&publish_frames("nowhere")).await.unwrap();

    // A watermark below what the process really uses raises the alarm on the next check.
    b.broker.set_memory_limit_bytes(1);
    warren_broker::resources::check(&b.broker);
    assert!(b.broker.active_alarms().iter().any(|a| a == "memory"));
    expect(&mut s, &mut buf, true).await;

    b.broker.set_memory_limit_bytes(u64::MAX);
    warren_broker::resources::check(&b.broker);
    assert!(!b.broker.active_alarms().iter().any(|a| a == "memory"));
    expect(&mut s, &mut buf, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_free_limit_raises_the_disk_alarm() {
    let config = Config {
        disk_free_limit: u64::MAX,
        data_dir: std::env::temp_dir(),
        ..Config::default()
    };
    let b = TestBroker::start_with(config).await;
    warren_broker::resources::check(&b.broker);
    assert!(b.broker.active_alarms().iter().any(|a| a == "disk"));
    // The monitor task runs the same check on its own.
    let b2 = TestBroker::start().await;
    tokio::spawn(warren_broker::resources::monitor(
        std::sync::Arc::downgrade(&b2.broker),
    ));
    b2.broker.set_memory_limit_bytes(1);
    assert!(common::eventually(|| b2.broker.active_alarms().iter().any(|a| a == "memory")).await);
}

#[test]
fn watermark_must_be_a_fraction() {
    let c = Config {
        vm_memory_high_watermark: 1.5,
        ..Config::default()
    };
    assert!(
        c.validate()
            .unwrap_err()
            .to_string()
            .contains("vm-memory-high-watermark")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_report_the_watermark_of_the_memory_the_node_may_use() {
    let b = TestBroker::start().await;
    let url = b.start_management().await;
    let nodes: serde_json::Value = reqwest::Client::new()
        .get(format!("{url}/api/nodes"))
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // The lower of physical memory and this process's cgroup limit, times the watermark.
    let total = warren_broker::resources::total_memory_bytes().unwrap();
    assert!(total <= warren_broker::resources::physical_memory_bytes().unwrap());
    if let Some(limit) = warren_broker::resources::cgroup_memory_limit(std::path::Path::new("/")) {
        assert!(total <= limit);
    }
    assert_eq!(nodes[0]["mem_limit"], (total as f64 * 0.4) as u64);
}
