//! The broker in a real pod: `e2e/kubelet.sh` runs a real kubelet (containerd, runc, bridge
//! CNI, CoreDNS) registered with the e2e control plane as node `$WARREN_REAL_NODE`, tainted
//! so only these tests' pods land there. The operator reconciles
//! `samples/rabbitcluster-minimal.yaml` (one replica, tolerating the taint) with the broker
//! image imported into that node's containerd; the pod becomes Ready only because the
//! kubelet ran `warren-broker check ready` in the container and it passed.
//!
//! Ignored by a plain `cargo test -p warren-e2e` (the kwok-only control plane has no real
//! node): `bash e2e/real-pods.sh` starts everything and runs them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolume, Pod, Secret};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use warren_e2e::{Operator, client, ensure_crds, namespace, repo_root, wait_for};
use warren_operator::crd::RabbitCluster;

/// A real container starts in seconds, but the first one on a cold node also creates the
/// sandbox and the bridge; the startup probe allows minutes.
const LONG: Duration = Duration::from_secs(180);

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: these tests need the real node of e2e/kubelet.sh. Run them with \
             `bash e2e/real-pods.sh`, or start it with `bash e2e/kubelet.sh start` and \
             `eval \"$(bash e2e/kubelet.sh env)\"`"
        )
    })
}

/// `ctr` against the real node's containerd.
fn ctr(args: &[&str]) -> std::process::Output {
    std::process::Command::new("ctr")
        .args([
            "--address",
            &env("WARREN_REAL_NODE_CONTAINERD"),
            "-n",
            "k8s.io",
        ])
        .args(args)
        .output()
        .expect("run ctr")
}

/// The sample manifest, as a user applies it, made to fit the one real node: `replicas`,
/// the node's taint tolerated and the node selected, modest requests (the node has 2 CPUs).
fn minimal_sample(ns: &str, replicas: i32) -> serde_json::Value {
    let text = std::fs::read_to_string(repo_root().join("samples/rabbitcluster-minimal.yaml"))
        .expect("read sample");
    let mut rc: serde_json::Value = serde_yaml::from_str(&text).expect("parse sample");
    rc["metadata"]["namespace"] = json!(ns);
    rc["spec"]["replicas"] = json!(replicas);
    rc["spec"]["tolerations"] = json!([{
        "key": "warren.dev/real-node", "operator": "Equal", "value": "true", "effect": "NoSchedule",
    }]);
    rc["spec"]["nodeSelector"] = json!({"warren.dev/real-node": "true"});
    rc["spec"]["resources"] = json!({
        "requests": {"cpu": "100m", "memory": "256Mi"},
        "limits": {"memory": "1Gi"},
    });
    rc
}

/// Where the hostPath volumes live (`e2e/real-pods.sh` deletes it after a run).
fn volumes_root() -> std::path::PathBuf {
    std::env::temp_dir().join("warren-real-pods")
}

/// The sample's 10Gi claim, bound to a hostPath volume on the real node. hostPath volumes
/// get no fsGroup ownership change, so the directory is made the broker's (999), as an
/// administrator of such a volume would.
async fn host_volume(client: &Client, ns: &str, cluster: &str, i: usize) -> std::path::PathBuf {
    let dir = volumes_root().join(format!("{ns}-{cluster}-{i}"));
    std::fs::create_dir_all(&dir).expect("volume dir");
    std::os::unix::fs::chown(&dir, Some(999), Some(999)).expect("chown volume dir");
    let pv: PersistentVolume = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": format!("{ns}-{cluster}-{i}")},
        "spec": {
            "capacity": {"storage": "10Gi"},
            "accessModes": ["ReadWriteOnce"],
            "hostPath": {"path": dir.to_str().expect("utf-8 path"), "type": "Directory"},
            "claimRef": {"namespace": ns, "name": format!("persistence-{cluster}-server-{i}")},
        },
    }))
    .expect("pv");
    Api::<PersistentVolume>::all(client.clone())
        .create(&PostParams::default(), &pv)
        .await
        .expect("create pv");
    dir
}

fn ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Waits for pod `name` to be Ready on the real node; returns it.
async fn wait_pod_ready(client: &Client, ns: &str, name: &str, not_uid: Option<&str>) -> Pod {
    let api = Api::<Pod>::namespaced(client.clone(), ns);
    let node = env("WARREN_REAL_NODE");
    wait_for(&format!("pod {name} Ready on {node}"), LONG, || {
        let api = api.clone();
        let node = node.clone();
        async move {
            let pod = api.get(name).await.ok()?;
            let on_node = pod.spec.as_ref()?.node_name.as_deref() == Some(node.as_str());
            let new = not_uid.is_none_or(|u| pod.metadata.uid.as_deref() != Some(u));
            (on_node && new && ready(&pod)).then_some(pod)
        }
    })
    .await
}

/// The host pid of the pod's `warren` container, from containerd.
fn container_pid(pod: &Pod) -> u32 {
    let id = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.iter().find(|c| c.name == "warren"))
        .and_then(|c| c.container_id.clone())
        .expect("container id");
    let id = id.strip_prefix("containerd://").expect("containerd id");
    let out = ctr(&["tasks", "ls"]);
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            (f.next() == Some(id)).then(|| f.next().and_then(|p| p.parse().ok()))?
        })
        .unwrap_or_else(|| panic!("task {id} not in `ctr tasks ls`:\n{text}"))
}

/// Runs a command in the pod's `warren` container (as `kubectl exec` would).
fn exec(pod: &Pod, args: &[&str]) -> (bool, String) {
    let id = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.iter().find(|c| c.name == "warren"))
        .and_then(|c| c.container_id.clone())
        .expect("container id");
    let id = id.strip_prefix("containerd://").expect("containerd id");
    let exec_id = format!("e2e-{:08x}", rand::random::<u32>());
    let mut a = vec!["tasks", "exec", "--exec-id", &exec_id, id];
    a.extend_from_slice(args);
    let out = ctr(&a);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

async fn default_user(client: &Client, ns: &str, cluster: &str) -> (String, String) {
    let s = Api::<Secret>::namespaced(client.clone(), ns)
        .get(&format!("{cluster}-default-user"))
        .await
        .expect("default user secret");
    let data = s.data.expect("data");
    let get = |k: &str| String::from_utf8(data[k].0.clone()).expect("utf-8");
    (get("username"), get("password"))
}

async fn publish_and_consume(ip: &str, user: &str, pass: &str, queue: &str, body: &[u8]) {
    publish(ip, user, pass, queue, body).await;
    get(ip, user, pass, queue, body).await;
}

async fn connect(ip: &str, user: &str, pass: &str) -> lapin::Connection {
    lapin::Connection::connect(
        &format!("amqp://{user}:{pass}@{ip}:5672/%2F"),
        lapin::ConnectionProperties::default(),
    )
    .await
    .unwrap_or_else(|e| panic!("AMQP connect to the pod at {ip}:5672: {e}"))
}

/// Declares the durable `queue` and publishes a persistent `body` with confirms.
async fn publish(ip: &str, user: &str, pass: &str, queue: &str, body: &[u8]) {
    let conn = connect(ip, user, pass).await;
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(Default::default())
        .await
        .expect("confirms");
    ch.queue_declare(
        queue.into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        Default::default(),
    )
    .await
    .expect("declare");
    let confirm = ch
        .basic_publish(
            "".into(),
            queue.into(),
            Default::default(),
            body,
            lapin::BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(
        confirm.is_ack(),
        "the broker nacked the publish: {confirm:?}"
    );
    conn.close(200, "bye".into()).await.expect("close");
}

/// Gets (and acks) one message from `queue`; it must be `body`.
async fn get(ip: &str, user: &str, pass: &str, queue: &str, body: &[u8]) {
    let conn = connect(ip, user, pass).await;
    let ch = conn.create_channel().await.expect("channel");
    let got = ch
        .basic_get(
            queue.into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .expect("basic.get")
        .expect("a message in the queue");
    assert_eq!(got.delivery.data, body);
    conn.close(200, "bye".into()).await.expect("close");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the real node of e2e/kubelet.sh: bash e2e/real-pods.sh"]
async fn the_minimal_sample_runs_in_a_real_pod() {
    let image = env("WARREN_REAL_NODE_BROKER_IMAGE");
    let client = client().await;
    ensure_crds(&client).await;
    let ns = namespace(&client, "realpod").await;
    let op = Operator::start_with(&ns, &["--broker-image", &image]);
    let rc = minimal_sample(&ns, 1);
    let name = rc["metadata"]["name"].as_str().expect("name").to_string();
    let volume = host_volume(&client, &ns, &name, 0).await;
    let rc: RabbitCluster = serde_json::from_value(rc).expect("RabbitCluster");
    let api = Api::<RabbitCluster>::namespaced(client.clone(), &ns);
    api.create(&PostParams::default(), &rc)
        .await
        .expect("create RabbitCluster");
    let t = std::time::Instant::now();

    // Ready: the kubelet's exec readiness probe (`warren-broker check ready`) passed.
    let pod_name = format!("{name}-server-0");
    let pod = wait_pod_ready(&client, &ns, &pod_name, None).await;
    eprintln!("{pod_name} Ready after {:?}", t.elapsed());
    let spec = pod.spec.as_ref().expect("spec");
    assert_eq!(spec.containers[0].image.as_deref(), Some(image.as_str()));
    let probe = spec.containers[0]
        .readiness_probe
        .as_ref()
        .and_then(|p| p.exec.as_ref())
        .and_then(|e| e.command.clone());
    assert_eq!(
        probe.as_deref(),
        Some(&["warren-broker".to_string(), "check".into(), "ready".into()][..])
    );
    let ip = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .expect("pod IP");
    let (ok, out) = exec(&pod, &["warren-broker", "check", "ready"]);
    assert!(ok, "warren-broker check ready in the container: {out}");

    // The operator's view: the cluster settles with its one node ready.
    wait_for(&format!("{name} AllReplicasReady"), LONG, || {
        let api = api.clone();
        let name = name.clone();
        async move {
            let rc = api.get(&name).await.ok()?;
            let st = rc.status?;
            let all = st
                .conditions
                .iter()
                .any(|c| c.type_ == "AllReplicasReady" && c.status == "True");
            (all && st.ready_replicas == 1).then_some(())
        }
    })
    .await;

    // AMQP through the pod IP (the host reaches the bridge), with the generated default
    // user from the Secret the operator wrote.
    let (user, pass) = default_user(&client, &ns, &name).await;
    publish_and_consume(&ip, &user, &pass, "real-pod", b"hello from a real pod").await;

    // Cluster DNS: the pod's own stable name, through CoreDNS and the search path, as its
    // peers will reach it.
    let dns_name = format!("{pod_name}.{name}-nodes.{ns}.svc");
    let url = format!("http://{dns_name}:15672");
    let mut last = String::new();
    let resolved = wait_for(&format!("{dns_name} resolves in the pod"), LONG, || {
        let (ok, out) = exec(
            &pod,
            &["warren-broker", "check", "ready", "--management-url", &url],
        );
        last = out.clone();
        async move { ok.then_some(out) }
    })
    .await;
    eprintln!("check ready through {url}: {resolved} (last: {last})");

    // UID 999 and a read-only root filesystem, seen from the host.
    let pid = container_pid(&pod);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    for key in ["Uid:", "Gid:"] {
        let ids: Vec<&str> = status
            .lines()
            .find(|l| l.starts_with(key))
            .expect("ids")
            .split_whitespace()
            .skip(1)
            .collect();
        assert_eq!(ids, ["999"; 4], "{key} of the broker process");
    }
    let probe = format!("/proc/{pid}/root/warren-e2e-write-probe");
    let err = std::fs::write(&probe, b"x").expect_err("the root filesystem is writable");
    assert_eq!(err.raw_os_error(), Some(30), "EROFS expected, got {err}");
    let etc = format!("/proc/{pid}/root/etc/warren-e2e-write-probe");
    assert!(std::fs::write(&etc, b"x").is_err(), "/etc is writable");
    // The broker wrote its volume, as 999.
    let mut entries = 0;
    for e in walk(&volume) {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::symlink_metadata(&e).expect("metadata");
        assert_eq!((m.uid(), m.gid()), (999, 999), "{} not 999's", e.display());
        entries += 1;
    }
    assert!(entries > 0, "the broker wrote nothing to its volume");

    // A config change rolls the pod; the new one becomes Ready through the real probe and
    // still has the message published before (its volume).
    publish(&ip, &user, &pass, "kept", b"published before the roll").await;
    let old_uid = pod.metadata.uid.clone().expect("uid");
    api.patch(
        &name,
        &PatchParams::default(),
        &Patch::Merge(&json!({"spec": {"config": {"heartbeat": 20}}})),
    )
    .await
    .expect("patch config");
    let t = std::time::Instant::now();
    let pod = wait_pod_ready(&client, &ns, &pod_name, Some(&old_uid)).await;
    eprintln!("rolled: new {pod_name} Ready after {:?}", t.elapsed());
    let ip = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .expect("pod IP");
    get(&ip, &user, &pass, "kept", b"published before the roll").await;
    publish_and_consume(&ip, &user, &pass, "after-roll", b"after the roll").await;

    // Rotating the default user's password in its Secret rolls the pod, and the broker takes
    // the new password at start (the operator sets WARREN_DEFAULT_USER_SYNC): the new one
    // works, the old one is refused, the message on the volume is still there.
    publish(&ip, &user, &pass, "kept", b"published before the rotation").await;
    let rotated = format!("{pass}-rotated");
    let old_uid = pod.metadata.uid.clone().expect("uid");
    Api::<Secret>::namespaced(client.clone(), &ns)
        .patch(
            &format!("{name}-default-user"),
            &PatchParams::default(),
            &Patch::Merge(&json!({"stringData": {"password": rotated}})),
        )
        .await
        .expect("rotate the default user's password");
    let t = std::time::Instant::now();
    let pod = wait_pod_ready(&client, &ns, &pod_name, Some(&old_uid)).await;
    eprintln!("rotated: new {pod_name} Ready after {:?}", t.elapsed());
    let ip = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .expect("pod IP");
    get(
        &ip,
        &user,
        &rotated,
        "kept",
        b"published before the rotation",
    )
    .await;
    let old = lapin::Connection::connect(
        &format!("amqp://{user}:{pass}@{ip}:5672/%2F"),
        lapin::ConnectionProperties::default(),
    )
    .await;
    assert!(
        old.is_err(),
        "the old password still works after the rotation"
    );

    let pods = Api::<Pod>::namespaced(client.clone(), &ns)
        .list(&ListParams::default())
        .await
        .expect("pods");
    eprintln!(
        "{} pod(s) in {ns}; operator log {}",
        pods.items.len(),
        op.log.display()
    );
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let p = e.path();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

/// The sample as it is (three replicas) forms one broker cluster of real pods: each pod
/// finds pod 0 through cluster DNS, and `/api/nodes` on every pod lists three running nodes.
/// A quorum queue declared through `ip` (its declaring node is its first member and
/// creates its Raft group).
async fn declare_quorum(ip: &str, user: &str, pass: &str, queue: &str) {
    let conn = connect(ip, user, pass).await;
    let ch = conn.create_channel().await.expect("channel");
    let mut args = lapin::types::FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        lapin::types::AMQPValue::LongString("quorum".into()),
    );
    ch.queue_declare(
        queue.into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .expect("declare a quorum queue");
    conn.close(200, "bye".into()).await.expect("close");
}

/// Publishes `m<from>..m<to>` to `queue` through `ip`, persistent, with confirms, one
/// message at a time, 20 ms apart (the next after the last's confirm, waiting out a leader
/// change), until `stop` is set;
/// returns the bodies the broker acked. Stops at the first connection or channel error.
async fn publish_confirmed(
    ip: &str,
    user: &str,
    pass: &str,
    queue: &str,
    range: std::ops::Range<u32>,
    stop: Arc<AtomicBool>,
) -> Vec<String> {
    let conn = connect(ip, user, pass).await;
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(Default::default())
        .await
        .expect("confirms");
    let mut acked = Vec::new();
    for i in range {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let body = format!("m{i}");
        let sent = ch
            .basic_publish(
                "".into(),
                queue.into(),
                Default::default(),
                body.as_bytes(),
                lapin::BasicProperties::default().with_delivery_mode(2),
            )
            .await;
        let Ok(confirm) = sent else { break };
        match tokio::time::timeout(Duration::from_secs(30), confirm).await {
            Ok(Ok(c)) if c.is_ack() => acked.push(body),
            Ok(Ok(_)) => {}
            _ => break,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = conn.close(200, "bye".into()).await;
    acked
}

/// Every message of `queue`, read through `ip` (acked as taken).
async fn take_all(ip: &str, user: &str, pass: &str, queue: &str) -> Vec<String> {
    let conn = connect(ip, user, pass).await;
    let ch = conn.create_channel().await.expect("channel");
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(
            queue.into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .expect("basic.get")
    {
        out.push(String::from_utf8_lossy(&m.delivery.data).into_owned());
    }
    conn.close(200, "bye".into()).await.expect("close");
    out
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the real node of e2e/kubelet.sh: bash e2e/real-pods.sh"]
async fn three_real_pods_form_one_cluster() {
    let image = env("WARREN_REAL_NODE_BROKER_IMAGE");
    let client = client().await;
    ensure_crds(&client).await;
    let ns = namespace(&client, "realcluster").await;
    // On the node, not in the cluster's DNS: the operator reaches pods at their IPs.
    let op = Operator::start_with(&ns, &["--broker-image", &image, "--reach-pods-by-ip"]);
    let rc = minimal_sample(&ns, 3);
    let name = rc["metadata"]["name"].as_str().expect("name").to_string();
    for i in 0..3 {
        host_volume(&client, &ns, &name, i).await;
    }
    let rc: RabbitCluster = serde_json::from_value(rc).expect("RabbitCluster");
    Api::<RabbitCluster>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &rc)
        .await
        .expect("create RabbitCluster");
    let t = std::time::Instant::now();
    let mut ips: Vec<String> = Vec::new();
    for i in 0..3 {
        let pod = wait_pod_ready(&client, &ns, &format!("{name}-server-{i}"), None).await;
        ips.push(pod.status.and_then(|s| s.pod_ip).expect("pod IP"));
    }
    eprintln!("3 pods Ready after {:?}: {ips:?}", t.elapsed());
    let (user, pass) = default_user(&client, &ns, &name).await;
    let http = reqwest::Client::new();
    for ip in &ips {
        let nodes = wait_running_nodes(&http, ip, &user, &pass, 3).await;
        let names: Vec<&str> = nodes
            .as_array()
            .expect("nodes")
            .iter()
            .filter_map(|n| n["name"].as_str())
            .collect();
        eprintln!("{ip}: {names:?}");
        for i in 0..3 {
            let want = format!("warren@{name}-server-{i}.{name}-nodes.{ns}");
            assert!(
                names.contains(&want.as_str()),
                "{want} missing on {ip}: {names:?}"
            );
        }
    }
    // A definition made through one pod is seen through another (replicated definitions).
    let vhost = format!("http://{}:15672/api/vhosts/real-pods", ips[1]);
    let r = http
        .put(&vhost)
        .basic_auth(&user, Some(&pass))
        .json(&json!({}))
        .send()
        .await
        .expect("PUT vhost");
    assert!(
        r.status().is_success(),
        "PUT vhost through pod 1: {}",
        r.status()
    );
    for ip in [&ips[0], &ips[2]] {
        let url = format!("http://{ip}:15672/api/vhosts/real-pods");
        wait_for(&format!("vhost real-pods seen on {ip}"), LONG, || {
            let http = http.clone();
            let (user, pass, url) = (user.clone(), pass.clone(), url.clone());
            async move {
                let r = http
                    .get(&url)
                    .basic_auth(user, Some(pass))
                    .send()
                    .await
                    .ok()?;
                r.status().is_success().then_some(())
            }
        })
        .await;
    }
    // One cluster serves every queue from every pod: a message published with a confirm
    // through pod 0 (its queue lives there) is read through pod 2.
    publish(&ips[0], &user, &pass, "across-pods", b"one cluster").await;
    get(&ips[2], &user, &pass, "across-pods", b"one cluster").await;
    // A config change rolls the three pods one at a time, each replaced only once the one
    // before is Ready again through the real probe (which needs the node to have caught up
    // with the cluster's metadata); the cluster never has fewer than two ready nodes, and
    // keeps its definitions.
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let selector = format!("app.kubernetes.io/name={name}");
    let revision = |p: &Pod| {
        p.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("controller-revision-hash").cloned())
            .unwrap_or_default()
    };
    let before = pods
        .list(&ListParams::default().labels(&selector))
        .await
        .expect("pods");
    let old_revision = revision(&before.items[0]);
    Api::<RabbitCluster>::namespaced(client.clone(), &ns)
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"config": {"heartbeat": 20}}})),
        )
        .await
        .expect("patch config");
    let t = std::time::Instant::now();
    let mut fewest_ready = 3;
    loop {
        let p = pods
            .list(&ListParams::default().labels(&selector))
            .await
            .expect("pods")
            .items;
        let n_ready = p
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none() && ready(p))
            .count();
        fewest_ready = fewest_ready.min(n_ready);
        if p.len() == 3 && n_ready == 3 && p.iter().all(|p| revision(p) != old_revision) {
            break;
        }
        assert!(
            t.elapsed() < 2 * LONG,
            "the roll did not finish: {n_ready} ready"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "rolled 3 real pods in {:?}, never fewer than {fewest_ready} ready",
        t.elapsed()
    );
    assert!(
        fewest_ready >= 2,
        "the roll took down more than one node at once"
    );
    ips.clear();
    for i in 0..3 {
        let pod = pods.get(&format!("{name}-server-{i}")).await.expect("pod");
        ips.push(pod.status.and_then(|s| s.pod_ip).expect("pod IP"));
    }
    for ip in &ips {
        wait_running_nodes(&http, ip, &user, &pass, 3).await;
        let url = format!("http://{ip}:15672/api/vhosts/real-pods");
        let r = http
            .get(&url)
            .basic_auth(&user, Some(&pass))
            .send()
            .await
            .expect("GET vhost");
        assert!(
            r.status().is_success(),
            "vhost real-pods lost on {ip} after the roll"
        );
    }

    // A replicated queue created through pod 1 (which then leads it) with 200 confirmed
    // messages; a publisher on pod 0 keeps going while pod 1 is deleted below.
    declare_quorum(&ips[1], &user, &pass, "replicated").await;
    let mut confirmed =
        publish_confirmed(&ips[0], &user, &pass, "replicated", 0..200, Arc::default()).await;
    assert_eq!(
        confirmed.len(),
        200,
        "every publish confirmed with all pods up"
    );
    let publisher = {
        let (ip, user, pass) = (ips[0].clone(), user.clone(), pass.clone());
        tokio::spawn(async move {
            publish_confirmed(&ip, &user, &pass, "replicated", 200..1200, Arc::default()).await
        })
    };

    // Deleting a pod runs its real preStop hook, `warren-broker drain`, before SIGTERM: a
    // client connected to it is closed with the drain's reason ("node is being drained"),
    // not the shutdown's ("broker shutting down"); the drain hands the queue's leadership to
    // another pod first.
    let pod1 = format!("{name}-server-1");
    let old_uid = pods
        .get(&pod1)
        .await
        .expect("pod 1")
        .metadata
        .uid
        .expect("uid");
    let closed = watch_close(&ips[1], &user, &pass).await;
    pods.delete(&pod1, &Default::default())
        .await
        .expect("delete pod 1");
    let why = tokio::time::timeout(LONG, closed)
        .await
        .expect("the connection to pod 1 was not closed")
        .expect("close reason");
    assert!(
        why.contains("node is being drained"),
        "pod 1's client was closed without the preStop drain: {why}"
    );
    eprintln!("pod 1 deleted: its client got {why}");
    let pod = wait_pod_ready(&client, &ns, &pod1, Some(&old_uid)).await;
    ips[1] = pod.status.and_then(|s| s.pod_ip).expect("pod IP");
    wait_running_nodes(&http, &ips[0], &user, &pass, 3).await;
    // No confirmed message of the replicated queue was lost with the pod; every message is
    // there once, read through pod 2.
    let during = publisher.await.expect("publisher");
    eprintln!(
        "{} of 1000 publishes confirmed while pod 1 was deleted and came back",
        during.len()
    );
    assert!(
        !during.is_empty(),
        "no publish confirmed during the pod's deletion"
    );
    confirmed.extend(during);
    let got = take_all(&ips[2], &user, &pass, "replicated").await;
    let unique: std::collections::BTreeSet<&String> = got.iter().collect();
    let missing: Vec<&String> = confirmed.iter().filter(|m| !unique.contains(m)).collect();
    assert!(
        missing.is_empty(),
        "{} confirmed messages lost with pod 1, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    eprintln!(
        "replicated queue after pod 1's deletion: {} confirmed, {} read, {} duplicates",
        confirmed.len(),
        got.len(),
        got.len() - unique.len()
    );

    // Scale 3 -> 5 -> 3 while a publisher on pod 0 keeps publishing to the replicated
    // queue: two nodes join; then the operator drains the last pod (its clients closed with
    // the drain's reason), the StatefulSet deletes it (preStop drain again), the cluster
    // forgets it, and the same for the next; nothing confirmed is lost.
    let rcs = Api::<RabbitCluster>::namespaced(client.clone(), &ns);
    for i in 3..5 {
        host_volume(&client, &ns, &name, i).await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (ip, user, pass, stop) = (ips[0].clone(), user.clone(), pass.clone(), stop.clone());
        tokio::spawn(async move {
            publish_confirmed(&ip, &user, &pass, "replicated", 10_000..1_000_000, stop).await
        })
    };
    let scale = |n: i32| {
        let rcs = rcs.clone();
        let name = name.clone();
        async move {
            rcs.patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(&json!({"spec": {"replicas": n}})),
            )
            .await
            .expect("scale");
        }
    };
    let t = std::time::Instant::now();
    scale(5).await;
    for i in 3..5 {
        let pod = wait_pod_ready(&client, &ns, &format!("{name}-server-{i}"), None).await;
        ips.push(pod.status.and_then(|s| s.pod_ip).expect("pod IP"));
    }
    for ip in &ips {
        wait_running_nodes(&http, ip, &user, &pass, 5).await;
    }
    eprintln!("scaled 3 -> 5 in {:?}: {ips:?}", t.elapsed());
    // The queue grows onto pod 4 (a voter there now), so the scale-down removes a member.
    let node4 = format!("warren@{name}-server-4.{name}-nodes.{ns}");
    let r = http
        .post(format!(
            "http://{}:15672/api/queues/quorum/replicas/on/{node4}/grow",
            ips[0]
        ))
        .basic_auth(&user, Some(&pass))
        .json(&json!({"strategy": "all", "queue_pattern": "^replicated$"}))
        .send()
        .await
        .expect("grow");
    assert_eq!(r.status().as_u16(), 204, "grow onto {node4}");
    let members = |ip: String| {
        let (http, user, pass) = (http.clone(), user.clone(), pass.clone());
        async move {
            let q: serde_json::Value = http
                .get(format!("http://{ip}:15672/api/queues/%2f/replicated"))
                .basic_auth(user, Some(pass))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            let m: Vec<String> = q["members"]
                .as_array()?
                .iter()
                .filter_map(|m| m.as_str().map(str::to_owned))
                .collect();
            Some(m)
        }
    };
    let grown = members(ips[0].clone()).await.unwrap_or_default();
    assert!(grown.contains(&node4), "{node4} not a member: {grown:?}");
    let t = std::time::Instant::now();
    let closed = watch_close(&ips[4], &user, &pass).await;
    scale(3).await;
    let why = tokio::time::timeout(LONG, closed)
        .await
        .expect("the connection to pod 4 was not closed")
        .expect("close reason");
    assert!(
        why.contains("node is being drained"),
        "pod 4 closed without a drain: {why}"
    );
    wait_for(
        &format!("{name} settled at 3, pods 3 and 4 forgotten"),
        2 * LONG,
        || {
            let rcs = rcs.clone();
            let name = name.clone();
            let http = http.clone();
            let (user, pass) = (user.clone(), pass.clone());
            let url = format!("http://{}:15672/api/nodes", ips[0]);
            let pods = pods.clone();
            async move {
                let st = rcs.get(&name).await.ok()?.status?;
                let v: serde_json::Value = http
                    .get(&url)
                    .basic_auth(user, Some(pass))
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
                let left = pods
                    .list(&ListParams::default().labels(&format!("app.kubernetes.io/name={name}")))
                    .await
                    .ok()?
                    .items
                    .len();
                (st.ready_replicas == 3 && v.as_array()?.len() == 3 && left == 3).then_some(())
            }
        },
    )
    .await;
    eprintln!("scaled 5 -> 3 in {:?}", t.elapsed());
    let left = members(ips[0].clone()).await.unwrap_or_default();
    assert!(
        !left.contains(&node4) && left.len() == 3,
        "members after the scale-down: {left:?}"
    );
    stop.store(true, Ordering::Relaxed);
    let during = publisher.await.expect("publisher");
    assert!(
        during.len() > 10,
        "the publisher on pod 0 was confirmed {} times through the scaling",
        during.len()
    );
    let got = take_all(&ips[2], &user, &pass, "replicated").await;
    let unique: std::collections::BTreeSet<&String> = got.iter().collect();
    let missing: Vec<&String> = during.iter().filter(|m| !unique.contains(m)).collect();
    assert!(
        missing.is_empty(),
        "{} confirmed messages lost scaling 3 -> 5 -> 3, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    eprintln!(
        "replicated queue through 3 -> 5 -> 3: {} confirmed, {} read, {} duplicates; operator log {}",
        during.len(),
        got.len(),
        got.len() - unique.len(),
        op.log.display()
    );
}

/// `/api/nodes` on `ip` once it lists `n` running nodes.
async fn wait_running_nodes(
    http: &reqwest::Client,
    ip: &str,
    user: &str,
    pass: &str,
    n: usize,
) -> serde_json::Value {
    wait_for(
        &format!("/api/nodes on {ip} lists {n} running nodes"),
        LONG,
        || {
            let http = http.clone();
            let (user, pass) = (user.to_string(), pass.to_string());
            let url = format!("http://{ip}:15672/api/nodes");
            async move {
                let v: serde_json::Value = http
                    .get(&url)
                    .basic_auth(user, Some(pass))
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
                let running = v
                    .as_array()?
                    .iter()
                    .filter(|n| n["running"] == json!(true))
                    .count();
                (running == n).then_some(v)
            }
        },
    )
    .await
}

/// Opens an AMQP connection to `ip`; the returned task ends with the error that closed it.
async fn watch_close(ip: &str, user: &str, pass: &str) -> tokio::task::JoinHandle<String> {
    use futures::StreamExt;
    let conn = connect(ip, user, pass).await;
    let mut events = conn.events_listener();
    tokio::spawn(async move {
        let _conn = conn;
        while let Some(e) = events.next().await {
            if let lapin::Event::Error(e) = e {
                return e.to_string();
            }
        }
        "the connection's events ended without an error".to_string()
    })
}

/// `samples/rabbitcluster-production.yaml` with one replica on the real node: TLS only, its
/// certificate and CA mounted from Secrets. The pod becomes Ready only if the exec probe
/// reaches the management API over HTTPS (plain HTTP is off); AMQPS on 5671 serves the
/// Secret's certificate; plain AMQP (5672) is closed.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the real node of e2e/kubelet.sh: bash e2e/real-pods.sh"]
async fn the_production_sample_serves_tls_only_from_a_real_pod() {
    let image = env("WARREN_REAL_NODE_BROKER_IMAGE");
    let client = client().await;
    ensure_crds(&client).await;
    let ns = namespace(&client, "realtls").await;
    let _op = Operator::start_with(&ns, &["--broker-image", &image]);
    let text = std::fs::read_to_string(repo_root().join("samples/rabbitcluster-production.yaml"))
        .expect("read sample");
    let mut rc: serde_json::Value = serde_yaml::from_str(&text).expect("parse sample");
    let name = rc["metadata"]["name"].as_str().expect("name").to_string();
    rc["metadata"]["namespace"] = json!(ns);
    rc["spec"]["replicas"] = json!(1);
    // The sample's image is the release name; the node has the locally built one.
    rc["spec"]["image"] = json!(image);
    rc["spec"]["tolerations"] = json!([{
        "key": "warren.dev/real-node", "operator": "Equal", "value": "true", "effect": "NoSchedule",
    }]);
    rc["spec"]["nodeSelector"] = json!({"warren.dev/real-node": "true"});
    rc["spec"]["resources"] = json!({
        "requests": {"cpu": "100m", "memory": "256Mi"},
        "limits": {"memory": "1Gi"},
    });
    // diskFreeLimit 5Gi would raise the disk alarm on a small CI disk; it is not what this
    // test is about.
    rc["spec"]["config"]["diskFreeLimit"] = json!("100Mi");
    // The sample's claim (storage class fast-ssd, 100Gi) bound to a hostPath volume.
    let dir = volumes_root().join(format!("{ns}-{name}-0"));
    std::fs::create_dir_all(&dir).expect("volume dir");
    std::os::unix::fs::chown(&dir, Some(999), Some(999)).expect("chown volume dir");
    let pv: PersistentVolume = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": format!("{ns}-{name}-0")},
        "spec": {
            "capacity": {"storage": "100Gi"},
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": "fast-ssd",
            "hostPath": {"path": dir.to_str().expect("utf-8 path"), "type": "Directory"},
            "claimRef": {"namespace": ns, "name": format!("persistence-{name}-server-0")},
        },
    }))
    .expect("pv");
    Api::<PersistentVolume>::all(client.clone())
        .create(&PostParams::default(), &pv)
        .await
        .expect("create pv");
    // The Secrets the sample names, from a test CA (certificate for localhost/127.0.0.1,
    // which is what the probe inside the pod connects to).
    let pki = warren_e2e::TestPki::new(&ns);
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
    for s in [
        json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
               "metadata": {"name": rc["spec"]["tls"]["secretName"], "namespace": ns},
               "stringData": {"tls.crt": pki.cert_pem, "tls.key": pki.key_pem}}),
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": rc["spec"]["tls"]["caSecretName"], "namespace": ns},
               "stringData": {"ca.crt": pki.ca_pem}}),
    ] {
        let s: Secret = serde_json::from_value(s).expect("secret");
        secrets
            .create(&PostParams::default(), &s)
            .await
            .expect("create secret");
    }
    let rc: RabbitCluster = serde_json::from_value(rc).expect("RabbitCluster");
    Api::<RabbitCluster>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &rc)
        .await
        .expect("create RabbitCluster");

    let t = std::time::Instant::now();
    let pod = wait_pod_ready(&client, &ns, &format!("{name}-server-0"), None).await;
    eprintln!("TLS-only pod Ready after {:?}", t.elapsed());
    let ip = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .expect("pod IP");
    // AMQPS serves the Secret's certificate.
    let out = std::process::Command::new("openssl")
        .args(["s_client", "-connect", &format!("{ip}:5671"), "-showcerts"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl s_client");
    let served = String::from_utf8_lossy(&out.stdout);
    let body: String = pki
        .cert_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let served_body: String = served.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(
        served_body.contains(&body),
        "5671 on {ip} did not serve the Secret's certificate:\n{served}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Plain AMQP and plain HTTP management are off.
    for port in [5672, 15672] {
        let plain = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect((ip.as_str(), port)),
        )
        .await;
        assert!(
            !matches!(plain, Ok(Ok(_))),
            "plain port {port} accepts connections on a TLS-only pod"
        );
    }
    let (ok, out) = exec(&pod, &["warren-broker", "check", "ready"]);
    assert!(
        ok,
        "check ready (over HTTPS, from WARREN_CONFIG) in the pod: {out}"
    );
    eprintln!("TLS-only: {out}");
}
