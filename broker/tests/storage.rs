#![allow(clippy::unwrap_used)]
//! The message store seen from a client, in-process (a broker with storage on a temporary
//! data directory): what a client is told about durability must already be on disk.
mod common;

use std::path::PathBuf;

use common::TestBroker;
use lapin::BasicProperties;
use lapin::options::*;
use lapin::types::FieldTable;
use warren_broker::Config;

fn data_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("warren-storage-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A broker with storage, as the binary runs it (recovered from `dir`).
async fn broker_with_storage(dir: PathBuf) -> TestBroker {
    let b = TestBroker::start_with(Config {
        data_dir: dir,
        disk_free_limit: 0,
        ..Config::default()
    })
    .await;
    b.broker.recover().unwrap();
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_commit_ok_comes_after_the_messages_are_on_disk() {
    let b = broker_with_storage(data_dir("tx")).await;
    let (_c, ch) = b.channel().await;
    ch.queue_declare(
        "txq".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.tx_select().await.unwrap();
    let store = b.broker.store().unwrap().clone();
    for i in 0..200u32 {
        for j in 0..(1 + i % 3) {
            ch.basic_publish(
                "".into(),
                "txq".into(),
                BasicPublishOptions::default(),
                format!("{i}.{j}").as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap();
        }
        ch.tx_commit().await.unwrap();
        // Nothing else writes to this log: everything appended so far is this transaction's
        // (and earlier ones'), and commit-ok means all of it is synced.
        let appended = store.appended_seq();
        let synced = store.synced_now();
        assert!(
            synced >= appended,
            "commit {i}: commit-ok before the log synced ({synced} < {appended})"
        );
    }
    // Pipelined: a publish sent right behind a commit, and a second commit, are handled in
    // order once the first commit is answered.
    ch.basic_publish(
        "".into(),
        "txq".into(),
        BasicPublishOptions::default(),
        b"last",
        BasicProperties::default().with_delivery_mode(2),
    )
    .await
    .unwrap();
    let (a, c2) = tokio::join!(ch.tx_commit(), async {
        let ch2 = b.connect().await.create_channel().await.unwrap();
        ch2.queue_declare(
            "txq".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap()
        .message_count()
    });
    a.unwrap();
    assert!(c2 >= 400, "{c2}");
    // A transaction of transient messages does not wait for anything.
    ch.basic_publish(
        "".into(),
        "txq".into(),
        BasicPublishOptions::default(),
        b"transient",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    ch.tx_commit().await.unwrap();
    ch.tx_rollback().await.unwrap();
}
