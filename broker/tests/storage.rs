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
        common::message_count(&ch2, "txq").await
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

/// A persistent message dead-lettered from one durable queue to another is in at least one of
/// them whatever prefix of the log a crash leaves: the target's enqueue record is written
/// before the source's removal. Checked by recovering every record-boundary prefix of the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_lettered_message_survives_a_crash_at_any_point() {
    use lapin::types::{AMQPValue, ShortString};
    use warren_broker::store::{frame, log::MessageLog};
    let dir = data_dir("dlx");
    let b = broker_with_storage(dir.clone()).await;
    let (_c, ch) = b.channel().await;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare("dl-target".into(), durable, FieldTable::default())
        .await
        .unwrap();
    let mut args = FieldTable::default();
    args.insert(
        ShortString::from("x-dead-letter-exchange"),
        AMQPValue::LongString("".into()),
    );
    args.insert(
        ShortString::from("x-dead-letter-routing-key"),
        AMQPValue::LongString("dl-target".into()),
    );
    ch.queue_declare("dl-source".into(), durable, args)
        .await
        .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let persistent = BasicProperties::default().with_delivery_mode(2);
    let publish = |queue: &'static str| {
        let ch = ch.clone();
        let props = persistent.clone();
        async move {
            ch.basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                b"letter",
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap()
        }
    };
    publish("dl-source").await;
    let got = ch
        .basic_get("dl-source".into(), BasicGetOptions::default())
        .await
        .unwrap()
        .expect("the message");
    got.delivery
        .acker
        .reject(BasicRejectOptions { requeue: false })
        .await
        .unwrap();
    // A confirmed publish after the reject: the log has synced everything before it.
    for _ in 0..100 {
        if common::message_count(&ch, "dl-target").await == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    publish("dl-target").await;

    let messages = dir.join("messages");
    let mut segs: Vec<PathBuf> = std::fs::read_dir(&messages)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    segs.sort();
    assert_eq!(segs.len(), 1, "{segs:?}");
    let data = std::fs::read(&segs[0]).unwrap();
    let mut boundaries = vec![0];
    let mut at = 0;
    while let Some(h) = data.get(at..at + frame::HEADER) {
        let (len, _) = frame::header(h.try_into().unwrap());
        at += frame::HEADER + len;
        if at > data.len() {
            break;
        }
        boundaries.push(at);
    }
    let key = |q: &str| ("/".to_string(), q.to_string());
    let mut seen_source = false;
    for cut in boundaries {
        let copy = data_dir(&format!("dlx-cut-{cut}"));
        std::fs::create_dir_all(&copy).unwrap();
        std::fs::write(copy.join(segs[0].file_name().unwrap()), &data[..cut]).unwrap();
        let (log, recovered) = MessageLog::open(&copy).unwrap();
        log.shutdown();
        let count = |q: &str| recovered.messages.get(&key(q)).map_or(0, Vec::len);
        let (source, target) = (count("dl-source"), count("dl-target"));
        seen_source |= source > 0;
        if seen_source {
            assert!(
                source + target >= 1,
                "a crash leaving the first {cut} bytes of the log loses the dead-lettered message"
            );
        }
        let _ = std::fs::remove_dir_all(&copy);
    }
    assert!(seen_source, "the message was enqueued on the source");
    let _ = std::fs::remove_dir_all(&dir);
}
