#![allow(clippy::unwrap_used)]
//! Disk faults under a real `warren-broker` process, on real file systems that fail:
//!
//! - a tmpfs of 8 MiB filled by persistent publishes until writes fail with ENOSPC;
//! - ext4 on a loop device whose backing file lives on a tmpfs too small for it (a thin
//!   provisioned disk running out): the block layer fails writes and `fdatasync` reports EIO,
//!   the way a dying disk does.
//!
//! Either way a confirm-mode publisher hears `basic.nack` within 5 s, `tx.commit` fails, a
//! durable declare is refused (AMQP and HTTP), readiness fails and the alarms health check
//! shows `disk_io`, memory stays flat while publishers keep trying, and transient traffic
//! goes on. These tests mount file systems, so they need root (the test machine and CI run
//! as root); where mounting is not permitted they say so and stop.
mod common;
#[path = "common/node.rs"]
mod node;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ExchangeKind};
use node::Node;

const BIN: &str = env!("CARGO_BIN_EXE_warren-broker");

fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

fn run(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(format!(
            "{cmd} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Mount failures that mean "not allowed here" rather than a broken test.
fn not_permitted(err: &str) -> bool {
    let e = err.to_lowercase();
    e.contains("permission denied") || e.contains("not permitted") || e.contains("superuser")
}

/// A small file system mounted for one test, unmounted (and its loop device detached) when
/// dropped.
struct Disk {
    root: PathBuf,
    /// Where the broker's data directory lives.
    data: PathBuf,
    mounts: Vec<PathBuf>,
    loop_dev: Option<String>,
}

impl Disk {
    fn new(name: &str) -> Disk {
        let root = std::env::temp_dir().join(format!("warren-disk-{name}-{}", std::process::id()));
        // What a previous run may have left mounted.
        for m in ["mnt", "back"] {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(root.join(m))
                .stderr(std::process::Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("mnt")).unwrap();
        Disk {
            data: root.join("mnt"),
            root,
            mounts: Vec::new(),
            loop_dev: None,
        }
    }

    fn mount_tmpfs(&mut self, at: &Path, size: &str) -> Result<(), String> {
        std::fs::create_dir_all(at).unwrap();
        run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
                at.to_str().unwrap(),
            ],
        )?;
        self.mounts.push(at.to_owned());
        Ok(())
    }

    /// A tmpfs of `size`: writes fail with ENOSPC once it is full.
    fn tmpfs(name: &str, size: &str) -> Option<Disk> {
        let mut d = Disk::new(name);
        let mnt = d.root.join("mnt");
        match d.mount_tmpfs(&mnt, size) {
            Ok(()) => Some(d),
            Err(e) if not_permitted(&e) => {
                eprintln!("SKIPPED: this test mounts a tmpfs and mounting is not permitted: {e}");
                None
            }
            Err(e) => panic!("cannot mount a tmpfs: {e}"),
        }
    }

    /// ext4 of 64 MiB on a loop device backed by a sparse file on a tmpfs of `backing`: once
    /// the tmpfs is full the loop device fails writes, and the file system reports EIO.
    fn failing_block_device(name: &str, backing: &str) -> Option<Disk> {
        let mut d = Disk::new(name);
        let back = d.root.join("back");
        match d.mount_tmpfs(&back, backing) {
            Ok(()) => {}
            Err(e) if not_permitted(&e) => {
                eprintln!("SKIPPED: this test mounts file systems and that is not permitted: {e}");
                return None;
            }
            Err(e) => panic!("cannot mount a tmpfs: {e}"),
        }
        let img = back.join("disk.img");
        let img_s = img.to_str().unwrap();
        run("truncate", &["-s", "64M", img_s]).unwrap();
        run("mkfs.ext4", &["-q", "-F", img_s]).expect("mkfs.ext4 (Debian e2fsprogs)");
        let dev = run("losetup", &["-f", "--show", img_s]).expect("a loop device");
        d.loop_dev = Some(dev.clone());
        let mnt = d.root.join("mnt");
        run("mount", &[&dev, mnt.to_str().unwrap()]).expect("mount the loop device");
        d.mounts.push(mnt);
        Some(d)
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        for m in self.mounts.iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(m).status();
            if let Some(dev) = self.loop_dev.take() {
                let _ = Command::new("losetup").args(["-d", &dev]).status();
            }
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// A node on `dir` whose free-space alarm stays out of the way: these disks are far below
/// the default 50 MB limit, and the point is what happens when writes fail anyway (the
/// alarm only blocks publishers while free space is low; a disk can fail with space left,
/// or fill faster than the alarm is checked).
async fn start(dir: &Path) -> Running {
    Running(Node::start_with(dir, &["--disk-free-limit", "0"]).await)
}

/// The node, killed when the test ends however it ends (before its disk is unmounted).
struct Running(Node);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.child.kill();
        let _ = self.0.child.wait();
    }
}

async fn connect(node: &Node) -> (Connection, Channel) {
    let c = node.connect().await;
    let ch = c.create_channel().await.unwrap();
    (c, ch)
}

fn mgmt(node: &Node, path: &str) -> String {
    format!("http://127.0.0.1:{}{path}", node.mgmt)
}

async fn get(node: &Node, path: &str) -> (u16, serde_json::Value) {
    let r = reqwest::Client::new()
        .get(mgmt(node, path))
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or_default())
}

/// Publishes persistent messages of 64 KiB to `queue` in confirm mode, one at a time, until
/// one is not acked; each confirm must come within 5 s. Returns how many were acked.
async fn fill_until_refused(node: &Node, queue: &str) -> usize {
    let (_c, ch) = connect(node).await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let body = vec![b'x'; 64 * 1024];
    // 64 MiB at most: every disk here is far smaller.
    for i in 0..1024 {
        let sent = Instant::now();
        let publish = ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &body,
                persistent(),
            )
            .await;
        let confirm = match publish {
            Ok(c) => tokio::time::timeout(Duration::from_secs(5), c).await,
            Err(e) => {
                eprintln!("publish {i}: connection error {e}");
                return i;
            }
        };
        match confirm {
            Ok(Ok(c)) if c.is_ack() => {}
            Ok(Ok(c)) => {
                assert!(c.is_nack(), "publish {i}: {c:?}");
                eprintln!(
                    "publish {i}: nacked {} ms after it was sent",
                    sent.elapsed().as_millis()
                );
                return i;
            }
            Ok(Err(e)) => {
                eprintln!("publish {i}: connection error {e}");
                return i;
            }
            Err(_) => panic!("publish {i}: neither confirm nor error within 5 s"),
        }
    }
    panic!("64 MiB of persistent messages were confirmed on a disk far smaller");
}

/// What every disk fault must look like to clients and operators, once the node has hit it.
async fn assert_fault_handled(node: &Node, queue: &str, os_error: &str) {
    // Operators: the alarm, with the error, and readiness fails.
    let (status, body) = get(node, "/api/health/checks/alarms").await;
    assert_eq!(status, 503, "{body}");
    let alarms = body["alarms"].as_array().unwrap();
    assert!(alarms.iter().any(|a| a["resource"] == "disk_io"), "{body}");
    let why = body["disk_io_error"].as_str().unwrap();
    assert!(why.contains(os_error), "{why}");
    let (status, body) = get(node, "/api/health/checks/virtual-hosts").await;
    assert_eq!(status, 503, "{body}");
    let (_, nodes) = get(node, "/api/nodes").await;
    assert_eq!(nodes[0]["disk_io_alarm"], true, "{nodes}");
    let ready = Command::new(BIN)
        .args(["check", "ready", "--management-url", &mgmt(node, "")])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&ready.stderr);
    assert_eq!(ready.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("storage failed"), "{stderr}");

    // A confirm-mode publisher: every further persistent message is nacked, promptly.
    let (_c, ch) = connect(node).await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let t = Instant::now();
    let c = ch
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            b"after",
            persistent(),
        )
        .await
        .unwrap();
    let c = tokio::time::timeout(Duration::from_secs(5), c)
        .await
        .expect("a confirm within 5 s")
        .unwrap();
    assert!(c.is_nack(), "{c:?}");
    assert!(t.elapsed() < Duration::from_secs(5));

    // A transaction with a persistent message cannot commit.
    let (c, ch) = connect(node).await;
    ch.tx_select().await.unwrap();
    ch.basic_publish(
        "".into(),
        queue.into(),
        BasicPublishOptions::default(),
        b"in a tx",
        persistent(),
    )
    .await
    .unwrap();
    let commit = tokio::time::timeout(Duration::from_secs(5), ch.tx_commit())
        .await
        .expect("tx.commit answered within 5 s");
    let e = commit.expect_err("tx.commit must fail");
    eprintln!("tx.commit: {e}");
    assert_eq!(common::code(&e), Some(541), "{e}");
    assert!(!c.status().connected());

    // A publisher without confirms cannot be nacked: its connection is closed instead.
    let (c, ch) = connect(node).await;
    ch.basic_publish(
        "".into(),
        queue.into(),
        BasicPublishOptions::default(),
        b"no confirms",
        persistent(),
    )
    .await
    .unwrap();
    assert!(common::eventually(|| !c.status().connected()).await);

    // Durable declares are refused (and not kept), over AMQP and HTTP.
    let (_c, ch) = connect(node).await;
    let e = ch
        .queue_declare(
            "refused-durable".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect_err("a durable queue.declare must be refused");
    assert_eq!(common::code(&e), Some(541), "{e}");
    assert!(e.to_string().contains("cannot save durable queue"), "{e}");
    let (_c, ch) = connect(node).await;
    let e = ch
        .exchange_declare(
            "refused-durable-x".into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect_err("a durable exchange.declare must be refused");
    assert_eq!(common::code(&e), Some(541), "{e}");
    let (_c, ch) = connect(node).await;
    let e = ch
        .queue_bind(
            queue.into(),
            "amq.topic".into(),
            "refused.binding".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect_err("a binding between durable objects must be refused");
    assert_eq!(common::code(&e), Some(541), "{e}");
    let r = reqwest::Client::new()
        .put(mgmt(node, "/api/queues/%2F/refused-over-http"))
        .basic_auth("guest", Some("guest"))
        .json(&serde_json::json!({"durable": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["reason"]
            .as_str()
            .unwrap()
            .contains("cannot save durable queue"),
        "{body}"
    );
    for (path, what) in [
        ("/api/queues/%2F/refused-durable", "queue"),
        ("/api/queues/%2F/refused-over-http", "queue"),
        ("/api/exchanges/%2F/refused-durable-x", "exchange"),
    ] {
        let (status, _) = get(node, path).await;
        assert_eq!(status, 404, "the refused {what} must not exist: {path}");
    }

    // Transient traffic goes on: another client declares, publishes (confirmed) and gets.
    let (_c, ch) = connect(node).await;
    ch.queue_declare(
        "transient-still-works".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for (q, props) in [
        ("transient-still-works", BasicProperties::default()),
        // Persistent into a transient queue: nothing to write.
        ("transient-still-works", persistent()),
        // Transient into the durable queue: nothing to write either.
        (queue, BasicProperties::default()),
    ] {
        let c = common::publish_confirmed(&ch, "", q, b"hello", props).await;
        assert!(c.is_ack(), "{q}: {c:?}");
    }
    let got = ch
        .basic_get(
            "transient-still-works".into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
        .expect("a message");
    assert_eq!(got.delivery.data, b"hello");
}

/// RSS before and after `mib` MiB of persistent publishes the node refuses.
async fn rss_while_refusing(node: &Node, queue: &str, mib: usize) -> (u64, u64) {
    let before = node.rss();
    let (_c, ch) = connect(node).await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let body = vec![b'y'; 1 << 20];
    let mut pending = Vec::new();
    let mut nacks = 0;
    for _ in 0..mib {
        pending.push(
            ch.basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &body,
                persistent(),
            )
            .await
            .unwrap(),
        );
        // Keep at most 16 in flight, as a well-behaved publisher does.
        if pending.len() >= 16 {
            for c in pending.drain(..) {
                nacks += usize::from(c.await.unwrap().is_nack());
            }
        }
    }
    for c in pending.drain(..) {
        nacks += usize::from(c.await.unwrap().is_nack());
    }
    assert_eq!(nacks, mib, "every persistent message is refused");
    (before, node.rss())
}

#[tokio::test]
async fn a_full_tmpfs_nacks_publishers_fails_commits_refuses_declares_and_unreadies() {
    let Some(disk) = Disk::tmpfs("enospc", "8m") else {
        return;
    };
    let running = start(&disk.data).await;
    let node = &running.0;
    let (_c, ch) = connect(node).await;
    common::declare_durable(&ch, "durable-q").await;
    let acked = fill_until_refused(node, "durable-q").await;
    assert!(
        acked > 16,
        "only {acked} messages fit before the disk was full"
    );
    eprintln!("{acked} persistent messages of 64 KiB confirmed before ENOSPC");
    assert_fault_handled(node, "durable-q", "No space left on device").await;

    // Memory stays flat while a publisher keeps sending persistent messages.
    let (before, after) = rss_while_refusing(node, "durable-q", 100).await;
    let growth = after.saturating_sub(before);
    eprintln!(
        "RSS before {} KiB, after 100 MiB of refused persistent publishes {} KiB: +{} KiB",
        before / 1024,
        after / 1024,
        growth / 1024
    );
    assert!(growth < 32 << 20, "RSS grew by {growth} bytes");

    // Everything acked is still in the queue.
    let (status, q) = get(node, "/api/queues/%2F/durable-q").await;
    assert_eq!(status, 200);
    assert!(q["messages"].as_u64().unwrap() >= acked as u64, "{q}");
    let log = node.log_text();
    assert!(log.contains("message store failed"), "{log}");

    // Recovery is a restart once there is room again: the node is ready, and what was
    // confirmed is exactly what it kept (the record cut off by ENOSPC is a torn tail, dropped
    // quietly, not reported as damage).
    drop(running);
    let mnt = disk.data.to_str().unwrap();
    run("mount", &["-o", "remount,size=16m", mnt]).unwrap();
    let running = start(&disk.data).await;
    let node = &running.0;
    let (status, body) = get(node, "/api/health/checks/virtual-hosts").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = get(node, "/api/health/checks/alarms").await;
    assert_eq!(status, 200, "{body}");
    let (_c, ch) = connect(node).await;
    assert_eq!(
        common::message_count(&ch, "durable-q").await as usize,
        acked,
        "exactly the confirmed messages come back"
    );
    let log = node.log_text();
    assert!(!log.contains("DAMAGED"), "{log}");
    assert!(log.contains("torn tail"), "{log}");
}

#[tokio::test]
async fn an_eio_from_the_block_device_is_handled_the_same_way() {
    let Some(disk) = Disk::failing_block_device("eio", "12m") else {
        return;
    };
    let node = start(&disk.data).await;
    let node = &node.0;
    let (_c, ch) = connect(node).await;
    common::declare_durable(&ch, "durable-q").await;
    let acked = fill_until_refused(node, "durable-q").await;
    eprintln!("{acked} persistent messages of 64 KiB confirmed before the device failed");
    let (_, body) = get(node, "/api/health/checks/alarms").await;
    eprintln!("alarms: {body}");
    // EIO from fdatasync, or the file system gone read-only after its journal aborted.
    let why = body["disk_io_error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let os_error = if why.contains("Read-only file system") {
        "Read-only file system"
    } else {
        "Input/output error"
    };
    assert_fault_handled(node, "durable-q", os_error).await;
    let (before, after) = rss_while_refusing(node, "durable-q", 100).await;
    eprintln!(
        "RSS before {} KiB, after 100 MiB of refused persistent publishes {} KiB",
        before / 1024,
        after / 1024
    );
    assert!(after.saturating_sub(before) < 32 << 20);
}

#[tokio::test]
async fn a_metadata_write_error_refuses_the_durable_declare() {
    let Some(disk) = Disk::tmpfs("meta", "8m") else {
        return;
    };
    let node = start(&disk.data).await;
    let node = &node.0;
    // Fill the file system from outside: the message log has written nothing, so what fails
    // is the metadata journal (and the snapshot written when an append fails).
    {
        use std::io::Write;
        let mut f = std::fs::File::create(disk.data.join("filler")).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
    }
    let mut refused = None;
    for i in 0..200 {
        let (_c, ch) = connect(node).await;
        let r = ch
            .queue_declare(
                format!("durable-{i}").as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        if let Err(e) = r {
            refused = Some((i, e));
            break;
        }
    }
    let (i, e) = refused.expect("a durable declare on a full disk is refused");
    eprintln!("declare {i} refused: {e}");
    assert_eq!(common::code(&e), Some(541), "{e}");
    assert!(e.to_string().contains("No space left on device"), "{e}");
    let (status, _) = get(node, &format!("/api/queues/%2F/durable-{i}")).await;
    assert_eq!(status, 404, "the refused queue must not exist");
    let (status, body) = get(node, "/api/health/checks/alarms").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["disk_io_error"]
            .as_str()
            .unwrap()
            .starts_with("metadata store"),
        "{body}"
    );
    let (status, _) = get(node, "/api/health/checks/virtual-hosts").await;
    assert_eq!(status, 503);
    // A change saved by rewriting the snapshot (users, vhosts …) is not answered as saved.
    let r = reqwest::Client::new()
        .put(mgmt(node, "/api/users/not-saved"))
        .basic_auth("guest", Some("guest"))
        .json(&serde_json::json!({"password": "pw", "tags": ""}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["reason"]
            .as_str()
            .unwrap()
            .contains("could not be saved"),
        "{body}"
    );
    // Transient queues need no disk.
    let (_c, ch) = connect(node).await;
    ch.queue_declare(
        "transient".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
}

/// A broker in this process with storage in `dir`, for faults injected into its message log.
async fn broker_with_storage(name: &str) -> common::TestBroker {
    let dir = std::env::temp_dir().join(format!("warren-fault-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let b = common::TestBroker::start_with(warren_broker::Config {
        data_dir: dir,
        disk_free_limit: 0,
        ..Default::default()
    })
    .await;
    b.broker.recover().unwrap();
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_injected_write_fault_nacks_waiting_confirms_and_fails_a_waiting_commit() {
    // Confirms already waiting for the flusher when its write fails are nacked.
    let b = broker_with_storage("confirms").await;
    let (_c, ch) = b.channel().await;
    common::declare_durable(&ch, "q").await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let c = common::publish_confirmed(&ch, "", "q", b"before", persistent()).await;
    assert!(c.is_ack());
    b.broker
        .store()
        .unwrap()
        .inject_fault(std::io::ErrorKind::Other);
    let mut pending = Vec::new();
    for _ in 0..10 {
        pending.push(
            ch.basic_publish(
                "".into(),
                "q".into(),
                BasicPublishOptions::default(),
                b"lost",
                persistent(),
            )
            .await
            .unwrap(),
        );
    }
    for c in pending {
        let c = tokio::time::timeout(Duration::from_secs(5), c)
            .await
            .expect("a confirm within 5 s")
            .unwrap();
        assert!(c.is_nack(), "{c:?}");
    }
    assert!(b.broker.active_alarms().iter().any(|a| a == "disk_io"));

    // A tx.commit waiting for the flusher when its write fails gets 541.
    let b = broker_with_storage("commit").await;
    let (c, ch) = b.channel().await;
    common::declare_durable(&ch, "q").await;
    ch.tx_select().await.unwrap();
    ch.basic_publish(
        "".into(),
        "q".into(),
        BasicPublishOptions::default(),
        b"in a tx",
        persistent(),
    )
    .await
    .unwrap();
    b.broker
        .store()
        .unwrap()
        .inject_fault(std::io::ErrorKind::Other);
    let e = tokio::time::timeout(Duration::from_secs(5), ch.tx_commit())
        .await
        .expect("tx.commit answered within 5 s")
        .expect_err("tx.commit must fail");
    assert_eq!(common::code(&e), Some(541), "{e}");
    assert!(e.to_string().contains("tx.commit failed"), "{e}");
    assert!(!c.status().connected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_message_an_autoack_consumer_took_is_confirmed_without_waiting_for_the_disk() {
    // The message log's fsyncs are held back until `hold` is cleared.
    let b = broker_with_storage("autoack-confirm").await;
    let hold = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gate = hold.clone();
    b.broker.store().unwrap().set_before_sync(Box::new(move || {
        while gate.load(std::sync::atomic::Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }));
    let (_c, ch) = b.channel().await;
    common::declare_durable(&ch, "taken").await;
    common::declare_durable(&ch, "kept").await;
    let (_cc, consumer_ch) = b.channel().await;
    let mut deliveries = consumer_ch
        .basic_consume(
            "taken".into(),
            "autoack".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    hold.store(true, std::sync::atomic::Ordering::Release);
    // Taken by the autoack consumer as it was published: confirmed while the disk is held
    // (as RabbitMQ confirms what a consumer took before it was written).
    let taken = ch
        .basic_publish(
            "".into(),
            "taken".into(),
            BasicPublishOptions::default(),
            b"taken",
            persistent(),
        )
        .await
        .unwrap();
    let c = tokio::time::timeout(Duration::from_secs(5), taken)
        .await
        .expect("confirmed while the disk is held")
        .unwrap();
    assert!(c.is_ack(), "{c:?}");
    let d = tokio::time::timeout(
        Duration::from_secs(5),
        futures_lite::StreamExt::next(&mut deliveries),
    )
    .await
    .expect("delivered")
    .expect("a delivery")
    .unwrap();
    assert_eq!(d.data, b"taken");
    // Kept by the queue: its confirm waits for the fsync.
    let kept = ch
        .basic_publish(
            "".into(),
            "kept".into(),
            BasicPublishOptions::default(),
            b"kept",
            persistent(),
        )
        .await
        .unwrap();
    let mut kept = Box::pin(kept);
    assert!(
        tokio::time::timeout(Duration::from_millis(700), &mut kept)
            .await
            .is_err(),
        "a message the queue keeps was confirmed before it was on disk"
    );
    hold.store(false, std::sync::atomic::Ordering::Release);
    let c = tokio::time::timeout(Duration::from_secs(5), kept)
        .await
        .expect("confirmed once on disk")
        .unwrap();
    assert!(c.is_ack(), "{c:?}");
}
