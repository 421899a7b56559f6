#![allow(clippy::unwrap_used)]
//! The broker's log as an operator reads it: a real `warren-broker` process, many clients.
#[path = "common/node.rs"]
mod node;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use node::{Node, data_dir};

/// Each connection's log lines carry that connection's span only. An entered span held
/// across awaits stayed current on the worker thread, so every connection opened after it
/// on that thread logged inside all the earlier ones (`connection{id=1}:connection{id=2}:…`):
/// lines grew with the number of connections (~200 KB each at 3,000).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connections_log_lines_name_that_connection_only() {
    let node = Node::start(&data_dir("logs-spans")).await;
    let mut held = Vec::new();
    for round in 0..5 {
        let mut opening = Vec::new();
        for i in 0..8 {
            let url = node.url();
            opening.push(tokio::spawn(async move {
                let c = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
                    .await
                    .unwrap();
                let ch = c.create_channel().await.unwrap();
                ch.queue_declare(
                    format!("logs-{round}-{i}").as_str().into(),
                    QueueDeclareOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
                c
            }));
        }
        for o in opening {
            held.push(o.await.unwrap());
        }
    }
    for c in held {
        c.close(200, "bye".into()).await.unwrap();
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let (_, log) = node.terminate();
    let opened: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("connection opened"))
        .collect();
    assert_eq!(opened.len(), 40, "{log}");
    for line in log.lines().filter(|l| l.contains("connection{")) {
        assert_eq!(
            line.matches("connection{").count(),
            1,
            "a line inside another connection's span: {line}"
        );
    }
}
