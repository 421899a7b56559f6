#![allow(clippy::unwrap_used)]
//! `warren-broker check ready` and `warren-broker drain` as a container runs them: the real
//! binary against a real node process, configured the way the operator configures it (a TOML
//! file and the default user's credentials in the environment).
mod common;

#[path = "common/node.rs"]
mod node;
use node::free_port;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::{Connection, ConnectionProperties};

const BIN: &str = env!("CARGO_BIN_EXE_warren-broker");
const USER: &str = "operator-admin";
const PASS: &str = "s3cret-from-a-Secret";

struct Node {
    child: Child,
    amqp: u16,
    mgmt: u16,
    dir: PathBuf,
    config: PathBuf,
}

impl Node {
    /// A node from a config file, with the default user from the environment.
    async fn start(name: &str, extra_toml: &str) -> Node {
        let dir = std::env::temp_dir().join(format!("warren-probe-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (amqp, mgmt) = (free_port(), free_port());
        let config = dir.join("warren.toml");
        std::fs::write(
            &config,
            format!(
                "data-dir = \"{}\"\n\
                 amqp-listen = \"127.0.0.1:{amqp}\"\n\
                 management-listen = \"127.0.0.1:{mgmt}\"\n\
                 prometheus-listen = \"127.0.0.1:{}\"\n\
                 node-name = \"warren@probe-{name}\"\n{extra_toml}",
                dir.join("data").display(),
                free_port(),
            ),
        )
        .unwrap();
        let child = std::process::Command::new(BIN)
            .env("WARREN_CONFIG", &config)
            .env("WARREN_DEFAULT_USER", USER)
            .env("WARREN_DEFAULT_PASS", PASS)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("node.log")).unwrap())
            .spawn()
            .unwrap();
        let node = Node {
            child,
            amqp,
            mgmt,
            dir,
            config,
        };
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(("127.0.0.1", mgmt))
                .await
                .is_ok()
            {
                return node;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!(
            "node did not start: {}",
            std::fs::read_to_string(node.dir.join("node.log")).unwrap_or_default()
        );
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.mgmt)
    }

    fn amqp_url(&self) -> String {
        format!("amqp://{USER}:{PASS}@127.0.0.1:{}/%2f", self.amqp)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `warren-broker ARGS` with this environment (and nothing else of ours).
async fn run(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(args).stdin(Stdio::null());
    for var in [
        "WARREN_CONFIG",
        "WARREN_DEFAULT_USER",
        "WARREN_DEFAULT_PASS",
        "WARREN_MANAGEMENT_URL",
        "WARREN_MANAGEMENT_LISTEN",
    ] {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(20), cmd.output())
        .await
        .expect("the subcommand hung")
        .unwrap();
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    }
}

/// The environment a probe in the node's container has.
fn pod_env(node: &Node) -> Vec<(&'static str, String)> {
    vec![
        ("WARREN_CONFIG", node.config.to_str().unwrap().to_owned()),
        ("WARREN_DEFAULT_USER", USER.to_owned()),
        ("WARREN_DEFAULT_PASS", PASS.to_owned()),
    ]
}

fn refs<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_ready_passes_on_a_serving_node_and_says_why_it_fails() {
    // A watermark this small puts the node in a memory alarm at once: alarms must not make it
    // unready.
    let node = Node::start("ready", "vm-memory-high-watermark = 0.000001\n").await;
    let env = pod_env(&node);

    // In the pod: everything from WARREN_CONFIG and the credentials' environment.
    let r = run(&["check", "ready"], &refs(&env)).await;
    assert_eq!(r.code, Some(0), "{}{}", r.stdout, r.stderr);
    assert_eq!(r.stdout, "ready: node warren@probe-ready\n");
    assert!(r.stderr.is_empty(), "{}", r.stderr);
    let alarms = reqwest::Client::new()
        .get(format!("{}/api/health/checks/alarms", node.url()))
        .basic_auth(USER, Some(PASS))
        .send()
        .await
        .unwrap();
    assert_eq!(alarms.status(), 503, "the test needs a node in alarm");

    // Explicit URL and credentials from the environment only.
    let url = node.url();
    let r = run(
        &["check", "ready", "--management-url", &url],
        &[("WARREN_DEFAULT_USER", USER), ("WARREN_DEFAULT_PASS", PASS)],
    )
    .await;
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    // Flags beat the environment.
    let r = run(
        &[
            "check",
            "ready",
            "--management-url",
            &url,
            "--password",
            "wrong",
        ],
        &[("WARREN_DEFAULT_USER", USER), ("WARREN_DEFAULT_PASS", PASS)],
    )
    .await;
    assert_eq!(r.code, Some(1));
    assert_eq!(
        r.stderr,
        format!(
            "warren-broker: not ready: the management API at {url} refused user \
             '{USER}': Login failed\n"
        )
    );
    // Default credentials (guest) do not exist on this node.
    let r = run(&["check", "ready", "--management-url", &url], &[]).await;
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("refused user 'guest'"), "{}", r.stderr);

    // No node there.
    let nobody = format!("http://127.0.0.1:{}", free_port());
    let r = run(&["check", "ready", "--management-url", &nobody], &[]).await;
    assert_eq!(r.code, Some(1));
    assert!(
        r.stderr.starts_with(&format!(
            "warren-broker: not ready: cannot reach the management API at {nobody}: "
        )) && r.stderr.lines().count() == 1,
        "{}",
        r.stderr
    );
    // Something that accepts and never answers: the timeout.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let started = std::time::Instant::now();
    let r = run(
        &[
            "check",
            "ready",
            "--management-url",
            &silent_url,
            "--timeout",
            "1",
        ],
        &[],
    )
    .await;
    assert_eq!(r.code, Some(1));
    assert_eq!(
        r.stderr,
        format!(
            "warren-broker: not ready: no answer from the management API at {silent_url} \
             within 1 s\n"
        )
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    // The default timeout is 5 s.
    let started = std::time::Instant::now();
    let r = run(&["check", "ready", "--management-url", &silent_url], &[]).await;
    assert!(r.stderr.contains("within 5 s"), "{}", r.stderr);
    assert!(started.elapsed() >= Duration::from_secs(5));
    hold.abort();

    // Usage errors.
    let r = run(
        &["check", "ready", "--management-url", "localhost:15672"],
        &[],
    )
    .await;
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("http://"), "{}", r.stderr);
    let r = run(&["check"], &[]).await;
    assert_eq!(r.code, Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_closes_connections_refuses_new_ones_and_end_restores_service() {
    let node = Node::start("drain", "").await;
    let env = pod_env(&node);

    // A client with a durable queue holding two messages, and a consumer elsewhere.
    let conn = Connection::connect(&node.amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let mut events = conn.events_listener();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    ch.queue_declare(
        "orders".into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        Default::default(),
    )
    .await
    .unwrap();
    for _ in 0..2 {
        common::publish_confirmed(&ch, "", "orders", b"o", lapin::BasicProperties::default()).await;
    }

    let r = run(&["check", "ready"], &refs(&env)).await;
    assert_eq!(r.code, Some(0), "{}", r.stderr);

    // The preStop hook.
    let r = run(&["drain"], &refs(&env)).await;
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(
        r.stdout,
        "node warren@probe-drain is being drained: 1 client connection(s) closed, 0 still open\n\
         1 queue(s) on the node, 2 message(s):\n\
         vhost\tname\tdurable\tmessages\tconsumers\n\
         /\torders\ttrue\t2\t0\n"
    );

    // The client was told why.
    let error = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match events.next().await {
                Some(lapin::Event::Error(e)) => return e,
                Some(_) => continue,
                None => panic!("no error event"),
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(common::code(&error), Some(320), "{error}");
    assert!(
        error
            .to_string()
            .contains("CONNECTION_FORCED - node is being drained"),
        "{error}"
    );

    // New connections are refused, and the node is not ready.
    let refused = Connection::connect(&node.amqp_url(), ConnectionProperties::default())
        .await
        .expect_err("a drained node accepted a connection");
    assert_eq!(common::code(&refused), Some(320), "{refused}");
    let r = run(&["check", "ready"], &refs(&env)).await;
    assert_eq!(r.code, Some(1));
    assert_eq!(
        r.stderr,
        "warren-broker: not ready: node warren@probe-drain is being drained\n"
    );
    // Draining twice is fine (a retried hook); the report as JSON.
    let r = run(&["drain", "--json"], &refs(&env)).await;
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let report: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(report["being_drained"], true);
    assert_eq!(report["queues"][0]["name"], "orders");

    // DELETE /api/warren/drain restores service.
    let resp = reqwest::Client::new()
        .delete(format!("{}/api/warren/drain", node.url()))
        .basic_auth(USER, Some(PASS))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let r = run(&["check", "ready"], &refs(&env)).await;
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let back = Connection::connect(&node.amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    back.close(200, "bye".into()).await.unwrap();

    // And so does `drain --end`.
    assert_eq!(run(&["drain"], &refs(&env)).await.code, Some(0));
    let r = run(&["drain", "--end"], &refs(&env)).await;
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(
        r.stdout
            .starts_with("node warren@probe-drain is not being drained"),
        "{}",
        r.stdout
    );
    let r = run(&["check", "ready"], &refs(&env)).await;
    assert_eq!(r.code, Some(0), "{}", r.stderr);

    // A user that may not drain.
    let r = run(
        &[
            "drain",
            "--management-url",
            &node.url(),
            "--user",
            "guest",
            "--password",
            "guest",
        ],
        &[],
    )
    .await;
    assert_eq!(r.code, Some(1));
    assert!(
        r.stderr.starts_with("warren-broker: drain failed: "),
        "{}",
        r.stderr
    );
}
