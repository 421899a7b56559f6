//! A slow disk under the metadata journal stalls only the durable declares waiting for it:
//! other clients (here: transient declares on other connections) are served meanwhile, because
//! the journal write runs off the async workers (`persistence::off_the_runtime`).

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use tokio::net::TcpListener;
use warren_broker::{Broker, Config};

/// Each journal fsync takes this long.
const SLOW_FSYNC: Duration = Duration::from_millis(800);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_declares_on_a_slow_disk_do_not_stall_other_clients() {
    let dir = std::env::temp_dir().join(format!("warren-slow-disk-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let config = Config {
        data_dir: dir.clone(),
        ..Config::default()
    };
    let broker = Broker::new(config);
    broker.recover().expect("recover");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!(
        "amqp://guest:guest@{}/%2f",
        listener.local_addr().expect("addr")
    );
    tokio::spawn(warren_broker::server::run(
        Arc::clone(&broker),
        listener,
        std::future::pending(),
    ));
    let connect = || async {
        Connection::connect(&url, ConnectionProperties::default())
            .await
            .expect("connect")
    };
    let probe = connect().await;
    let probe_ch = probe.create_channel().await.expect("channel");

    warren_broker::store::metadata::TEST_SYNC_DELAY_MS
        .store(SLOW_FSYNC.as_millis() as u64, Ordering::Relaxed);
    // Two connections declare durable queues back to back: with the journal write on the
    // async workers, they would hold both of this runtime's workers for the whole test.
    let mut writers = Vec::new();
    for w in 0..2 {
        let conn = connect().await;
        writers.push(tokio::spawn(async move {
            let ch = conn.create_channel().await.expect("channel");
            let started = Instant::now();
            for i in 0..4 {
                ch.queue_declare(
                    format!("durable-{w}-{i}").as_str().into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .expect("durable declare");
            }
            started.elapsed()
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut worst = Duration::ZERO;
    for i in 0..10 {
        let t = Instant::now();
        probe_ch
            .queue_declare(
                format!("transient-{i}").as_str().into(),
                QueueDeclareOptions {
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("transient declare");
        worst = worst.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut slowest_writer = Duration::ZERO;
    for w in writers {
        slowest_writer = slowest_writer.max(w.await.expect("writer"));
    }
    warren_broker::store::metadata::TEST_SYNC_DELAY_MS.store(0, Ordering::Relaxed);
    println!(
        "transient declares while durable ones wait {SLOW_FSYNC:?} per fsync: worst {worst:?}; \
         8 durable declares took {slowest_writer:?}"
    );
    // The durable declares really waited for the slow disk (each one is answered only once
    // it is on disk)...
    assert!(slowest_writer >= SLOW_FSYNC * 4, "{slowest_writer:?}");
    // ...and the other client was not made to wait behind them.
    assert!(
        worst < SLOW_FSYNC / 2,
        "a transient declare waited {worst:?} behind durable declares on a slow disk"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
