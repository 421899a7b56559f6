//! Nodes find each other, notice when one dies, stops or is cut off, and come back together
//! without a manual step; a node without the cluster secret is refused and says why.

use std::time::Duration;

use crate::harness::{Net, SERIAL};

/// Long enough for the failure detector (4 s without a heartbeat answer) plus a redial on a
/// loaded 2-core machine; the tests print how long each agreement took.
const AGREE: Duration = Duration::from_secs(30);

fn all_up(n: usize) -> Vec<(usize, bool)> {
    (0..n).map(|i| (i, true)).collect()
}

#[tokio::test]
async fn three_nodes_form_one_cluster_and_notice_kill_9_and_restart() {
    let _serial = SERIAL.lock().await;
    let mut net = Net::new(3);
    net.start_all().await;
    for i in 0..3 {
        net.wait_nodes(i, &all_up(3), AGREE).await;
        net.wait_ready(i, AGREE).await;
    }
    // Every node lists the inter-node listener in its overview.
    let overview = net.get(0, "/api/overview").await.expect("overview");
    assert!(
        overview["listeners"]
            .as_array()
            .expect("listeners")
            .iter()
            .any(|l| l["protocol"] == "clustering" && l["port"] == 25672),
        "{overview}"
    );

    net.kill(2);
    for i in 0..2 {
        net.wait_nodes(i, &[(0, true), (1, true), (2, false)], AGREE)
            .await;
    }
    // Each node's metrics carry every member as it sees it.
    let metrics = net.metrics(0).await;
    for (j, up) in [(0, 1), (1, 1), (2, 0)] {
        let series = format!("peer=\"{}\"", net.nodes[j].name);
        let line = metrics
            .lines()
            .find(|l| l.starts_with("warren_cluster_node_running{") && l.contains(&series))
            .unwrap_or_else(|| panic!("no warren_cluster_node_running for node {j}:\n{metrics}"));
        assert!(line.ends_with(&format!(" {up}")), "{line}");
    }
    // With one of three down, node 0 is critical: the metadata group would lose its majority.
    let (status, critical) = net
        .send(
            0,
            reqwest::Method::GET,
            "/api/health/checks/node-is-quorum-critical",
            None,
        )
        .await
        .expect("quorum-critical check");
    assert_eq!(status, 503, "{critical}");
    assert!(
        critical["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("metadata group"),
        "{critical}"
    );
    // A node that is down is still a member: it shows, not running, with its name only.
    let down = net
        .get(0, &format!("/api/nodes/{}", net.nodes[2].name))
        .await
        .expect("GET /api/nodes/{down node}");
    assert_eq!(down["running"], false, "{down}");

    net.start(2).await;
    for i in 0..3 {
        net.wait_nodes(i, &all_up(3), AGREE).await;
    }
    let up = net
        .get(1, &format!("/api/nodes/{}", net.nodes[2].name))
        .await
        .expect("GET /api/nodes/{node}");
    assert_eq!(up["running"], true, "{up}");
    assert!(
        up["uptime"].as_u64().is_some(),
        "a running peer reports its uptime: {up}"
    );
    assert!(up["mem_limit"].as_u64().is_some_and(|m| m > 0), "{up}");
}

#[tokio::test]
async fn a_paused_node_and_a_partitioned_node_are_down_until_they_return() {
    let _serial = SERIAL.lock().await;
    let mut net = Net::new(3);
    net.start_all().await;
    for i in 0..3 {
        net.wait_nodes(i, &all_up(3), AGREE).await;
    }

    // SIGSTOP: the process holds its sockets but answers nothing.
    net.pause(1);
    for i in [0, 2] {
        net.wait_nodes(i, &[(0, true), (1, false), (2, true)], AGREE)
            .await;
    }
    net.resume(1);
    for i in 0..3 {
        net.wait_nodes(i, &all_up(3), AGREE).await;
    }

    // Node 0 cut off from 1 and 2: each side sees the other down, and itself and its side up.
    net.partition(&[&[0], &[1, 2]]);
    net.wait_nodes(0, &[(0, true), (1, false), (2, false)], AGREE)
        .await;
    for i in [1, 2] {
        net.wait_nodes(i, &[(0, false), (1, true), (2, true)], AGREE)
            .await;
    }
    net.heal();
    for i in 0..3 {
        net.wait_nodes(i, &all_up(3), AGREE).await;
    }
}

#[tokio::test]
async fn a_node_with_the_wrong_secret_is_refused_and_says_so() {
    let _serial = SERIAL.lock().await;
    let mut net = Net::new(3);
    let wrong = net.secret_file.with_file_name("wrong-secret");
    std::fs::write(&wrong, "not-the-cluster-secret").expect("write");
    net.nodes[2].secret = Some(wrong);
    net.start_all().await;
    for i in 0..2 {
        net.wait_nodes(i, &[(0, true), (1, true)], AGREE).await;
    }
    net.wait_nodes(2, &[(2, true)], AGREE).await;
    // Still apart a few heartbeats later, and both sides logged why.
    tokio::time::sleep(Duration::from_secs(3)).await;
    net.wait_nodes(0, &[(0, true), (1, true)], Duration::from_secs(1))
        .await;
    let outsider = net.nodes[2].log();
    assert!(
        outsider.contains("cluster secrets differ") || outsider.contains("wrong cluster secret"),
        "the refused node says why:\n{outsider}"
    );
    let member = net.nodes[0].log();
    assert!(
        member.contains(&format!(
            "node {} does not know this cluster's secret",
            net.nodes[2].name
        )),
        "the member names the refused node:\n{member}"
    );
}

#[tokio::test]
async fn a_node_joins_through_one_peer_and_the_whole_cluster_restarts_in_any_order() {
    let _serial = SERIAL.lock().await;
    let mut net = Net::new(3);
    // Node 2 knows only node 0; it is introduced to node 1 through node 0.
    net.nodes[2].peers = Some(vec![net.nodes[0].ip.clone()]);
    net.nodes[1].peers = Some(vec![net.nodes[0].ip.clone()]);
    net.start(0).await;
    net.start(1).await;
    net.start(2).await;
    for i in 0..3 {
        net.wait_nodes(i, &all_up(3), AGREE).await;
    }

    // All down, then up in the reverse order, each told only of node 0 (the first one up
    // is node 2, whose only configured peer is still down): members are remembered.
    for i in 0..3 {
        net.stop(i);
    }
    for i in (0..3).rev() {
        net.start(i).await;
    }
    for i in 0..3 {
        net.wait_nodes(i, &all_up(3), AGREE).await;
    }
}

#[tokio::test]
async fn five_nodes_agree_and_a_minority_partition_sees_the_majority_down() {
    let _serial = SERIAL.lock().await;
    let mut net = Net::new(5);
    net.start_all().await;
    for i in 0..5 {
        net.wait_nodes(i, &all_up(5), AGREE).await;
    }
    net.partition(&[&[0, 1], &[2, 3, 4]]);
    for i in [0, 1] {
        net.wait_nodes(
            i,
            &[(0, true), (1, true), (2, false), (3, false), (4, false)],
            AGREE,
        )
        .await;
    }
    net.wait_nodes(
        4,
        &[(0, false), (1, false), (2, true), (3, true), (4, true)],
        AGREE,
    )
    .await;
    net.heal();
    for i in 0..5 {
        net.wait_nodes(i, &all_up(5), AGREE).await;
    }
}

#[tokio::test]
async fn a_stopped_node_is_forgotten_everywhere_and_rejoins_as_a_new_member() {
    let _serial = SERIAL.lock().await;
    let mut net = Net::new(3);
    net.start_all().await;
    for i in 0..3 {
        net.wait_nodes(i, &all_up(3), AGREE).await;
        net.wait_ready(i, AGREE).await;
    }
    let gone = net.nodes[2].name.clone();
    // A running node cannot be forgotten; nor can a name that is no member.
    let out = net.forget_cli(0, &gone);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is running: stop it"), "{err}");
    let out = net.forget_cli(0, "warren@nowhere");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a member"),
        "{out:?}"
    );

    // A queue living on the node that goes.
    let (status, body) = net
        .send(
            2,
            reqwest::Method::PUT,
            "/api/queues/%2f/on-two",
            Some(serde_json::json!({"durable": true})),
        )
        .await
        .expect("PUT queue on node 2");
    assert_eq!(status, 201, "{body}");
    net.kill(2);
    net.wait_nodes(0, &[(0, true), (1, true), (2, false)], AGREE)
        .await;
    let out = net.forget_cli(0, &gone);
    assert!(out.status.success(), "{out:?}");
    // Its classic queues are deleted with it, and the command says which.
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("queue 'on-two' in vhost '/' lived on it and was deleted"),
        "{said}"
    );
    for i in 0..2 {
        net.wait_status(i, "/api/queues/%2f/on-two", 404, Duration::from_secs(5))
            .await;
    }
    for i in 0..2 {
        net.wait_nodes(i, &[(0, true), (1, true)], AGREE).await;
    }

    // Back with its old data: it learns at startup that it was removed, says so, resets its
    // cluster state (keeping its queues) and joins as a new member.
    net.start(2).await;
    for i in 0..3 {
        net.wait_nodes(i, &all_up(3), AGREE).await;
    }
    net.wait_ready(2, AGREE).await;
    let log = net.nodes[2].log();
    assert!(
        log.contains("was removed from this cluster (forget)")
            && log.contains("resetting its cluster state"),
        "the forgotten node says why it resets:\n{log}"
    );

    // Wiped: a new incarnation joins again.
    net.stop(2);
    std::fs::remove_dir_all(&net.nodes[2].data_dir).expect("wipe");
    net.start(2).await;
    for i in 0..3 {
        net.wait_nodes(i, &all_up(3), AGREE).await;
    }
}
