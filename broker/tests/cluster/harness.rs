//! Several `warren-broker` hosts on one machine: each node is a separate process in its own
//! network namespace, with its own address on a bridge, so nodes reach each other as they do
//! on a network and can be cut apart with iptables. The test process, in the root namespace,
//! reaches every node through the bridge.
//!
//! Needs root (network namespaces, veth pairs, iptables) and fails — never skips — without it.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const USER: &str = "admin";
pub const PASS: &str = "s3cret-admin";

/// Cluster tests run one at a time: each starts several nodes, and a 2-core machine running
/// them side by side would starve the heartbeats the tests are about.
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

static NEXT_NET: AtomicU32 = AtomicU32::new(0);

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn must(cmd: &mut Command) {
    if let Err(e) = run(cmd) {
        panic!("{e}");
    }
}

fn ip(args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(args);
    c
}

/// Checks the test can build its network: root, `ip` and `iptables`.
fn preflight() {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        })
        .unwrap_or_default();
    assert_eq!(
        uid, "0",
        "the cluster tests need root (network namespaces, veth pairs, iptables); run them as \
         root, as scripts/test.sh does in CI"
    );
    for (tool, flag) in [("ip", "-V"), ("iptables", "--version")] {
        assert!(
            Command::new(tool)
                .arg(flag)
                .output()
                .is_ok_and(|o| o.status.success()),
            "the cluster tests need `{tool}` (Debian iproute2 / iptables; scripts/deps.sh \
             installs them)"
        );
    }
}

pub struct Node {
    pub ns: String,
    pub ip: String,
    pub name: String,
    pub data_dir: PathBuf,
    child: Option<Child>,
    starts: u32,
    /// Another secret than the cluster's.
    pub secret: Option<PathBuf>,
    /// Peers this node is told about (default: every node of the net).
    pub peers: Option<Vec<String>>,
    /// More command-line arguments for this node (e.g. TLS).
    pub extra_args: Vec<String>,
}

impl Node {
    pub fn log_path(&self) -> PathBuf {
        self.data_dir.with_extension(format!("{}.log", self.starts))
    }

    /// Everything the node logged in its current (or last) run.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn mgmt(&self) -> String {
        format!("http://{}:15672", self.ip)
    }
}

pub struct Net {
    bridge: String,
    pub nodes: Vec<Node>,
    dir: PathBuf,
    pub secret_file: PathBuf,
    http: reqwest::Client,
}

impl Net {
    /// A bridge and `n` namespaces, one address each; no node started yet.
    pub fn new(n: usize) -> Net {
        preflight();
        let k = NEXT_NET.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let id = format!("{:x}{k}", pid % 0xfff);
        let octet = (pid + k * 37) % 250 + 1;
        let prefix = format!("10.233.{octet}");
        let dir = std::env::temp_dir().join(format!("warren-cluster-{id}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("test dir");
        let secret_file = dir.join("secret");
        std::fs::write(&secret_file, "cluster-secret-for-tests\n").expect("secret");
        let bridge = format!("wcb{id}");
        let mut net = Net {
            bridge: bridge.clone(),
            nodes: Vec::new(),
            dir: dir.clone(),
            secret_file,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(3))
                .build()
                .expect("http client"),
        };
        must(&mut ip(&["link", "add", &bridge, "type", "bridge"]));
        must(&mut ip(&[
            "addr",
            "add",
            &format!("{prefix}.254/24"),
            "dev",
            &bridge,
        ]));
        must(&mut ip(&["link", "set", &bridge, "up"]));
        for i in 0..n {
            let ns = format!("wc{id}-{i}");
            let (a, b) = (format!("wc{id}{i}a"), format!("wc{id}{i}b"));
            let addr = format!("{prefix}.{}", i + 1);
            must(&mut ip(&["netns", "add", &ns]));
            must(&mut ip(&[
                "link", "add", &a, "type", "veth", "peer", "name", &b,
            ]));
            must(&mut ip(&["link", "set", &a, "netns", &ns]));
            must(&mut ip(&["link", "set", &b, "master", &bridge, "up"]));
            must(&mut ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                &a,
            ]));
            must(&mut ip(&["-n", &ns, "link", "set", &a, "up"]));
            must(&mut ip(&["-n", &ns, "link", "set", "lo", "up"]));
            net.nodes.push(Node {
                ns,
                name: format!("warren@{addr}"),
                ip: addr,
                data_dir: dir.join(format!("node{i}")),
                child: None,
                starts: 0,
                secret: None,
                peers: None,
                extra_args: Vec::new(),
            });
        }
        net
    }

    fn all_ips(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.ip.clone()).collect()
    }

    /// Starts node `i` (its data directory is kept across starts).
    pub fn spawn(&mut self, i: usize) {
        let peers = self.nodes[i]
            .peers
            .clone()
            .unwrap_or_else(|| self.all_ips())
            .join(",");
        let node = &mut self.nodes[i];
        let secret = node
            .secret
            .as_ref()
            .unwrap_or(&self.secret_file)
            .to_string_lossy()
            .into_owned();
        assert!(node.child.is_none(), "{} is already running", node.name);
        node.starts += 1;
        let log = std::fs::File::create(node.log_path()).expect("log file");
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &node.ns,
            env!("CARGO_BIN_EXE_warren-broker"),
        ])
        .args(["--node-name", &node.name])
        .args(["--cluster-name", "test-cluster"])
        .args(["--data-dir", &node.data_dir.to_string_lossy()])
        .args(["--amqp-listen", &format!("{}:5672", node.ip)])
        .args(["--management-listen", &format!("{}:15672", node.ip)])
        .args(["--prometheus-listen", &format!("{}:15692", node.ip)])
        .args(["--cluster-listen", &format!("{}:25672", node.ip)])
        .args(["--cluster-peers", &peers])
        .args(["--cluster-secret-file", &secret])
        .args(["--default-user", USER, "--default-pass", PASS])
        .args(&node.extra_args)
        .env("NO_COLOR", "1")
        .env(
            "WARREN_LOG_LEVEL",
            "info,warren_broker::cluster=debug,openraft=info",
        )
        // Snapshots (and log truncation) after a few changes, so tests exercise them.
        .env("WARREN_RAFT_SNAPSHOT_LOGS", "20")
        .env("WARREN_QUEUE_SNAPSHOT_LOGS", "64")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
        node.child = Some(cmd.spawn().expect("spawn warren-broker"));
    }

    /// Starts node `i` and waits until its management API answers.
    pub async fn start(&mut self, i: usize) {
        self.spawn(i);
        self.wait_started(i).await;
    }

    /// Starts every node at once, then waits for each.
    pub async fn start_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.spawn(i);
        }
        for i in 0..self.nodes.len() {
            self.wait_started(i).await;
        }
    }

    /// Waits until node `i`'s management API answers; panics with its log if it exits or
    /// does not answer within 30 s.
    async fn wait_started(&mut self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.get(i, "/api/overview").await.is_ok() {
                return;
            }
            if let Some(Ok(Some(status))) = self.nodes[i].child.as_mut().map(Child::try_wait) {
                panic!(
                    "{} exited ({status}):\n{}",
                    self.nodes[i].name,
                    self.nodes[i].log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "{} did not start:\n{}",
            self.nodes[i].name,
            self.nodes[i].log()
        );
    }

    fn signal(&self, i: usize, sig: &str) {
        let pid = self.nodes[i].pid().expect("node is running").to_string();
        must(Command::new("kill").args([&format!("-{sig}"), &pid]));
    }

    /// `kill -9`.
    pub fn kill(&mut self, i: usize) {
        self.signal(i, "KILL");
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.wait();
        }
    }

    /// SIGTERM, and waits for a clean exit.
    pub fn stop(&mut self, i: usize) {
        self.signal(i, "TERM");
        if let Some(mut c) = self.nodes[i].child.take() {
            let status = c.wait().expect("wait");
            assert!(
                status.success(),
                "{} exited with {status}",
                self.nodes[i].name
            );
        }
    }

    pub fn pause(&self, i: usize) {
        self.signal(i, "STOP");
    }

    pub fn resume(&self, i: usize) {
        self.signal(i, "CONT");
    }

    /// Cuts every node of one group off from every node of the others (both directions,
    /// dropped silently as a real partition does).
    pub fn partition(&self, groups: &[&[usize]]) {
        for (g, group) in groups.iter().enumerate() {
            for (h, other) in groups.iter().enumerate() {
                if g == h {
                    continue;
                }
                for &i in *group {
                    for &j in *other {
                        let ns = &self.nodes[i].ns;
                        let peer = &self.nodes[j].ip;
                        for (chain, dir) in [("INPUT", "-s"), ("OUTPUT", "-d")] {
                            must(Command::new("ip").args([
                                "netns", "exec", ns, "iptables", "-A", chain, dir, peer, "-j",
                                "DROP",
                            ]));
                        }
                    }
                }
            }
        }
    }

    /// Cuts each pair `(i, j)` off from each other (both directions), leaving every other
    /// path: non-transitive partitions (a ring, a bridge) are made of these.
    pub fn cut(&self, pairs: &[(usize, usize)]) {
        for &(a, b) in pairs {
            for (i, j) in [(a, b), (b, a)] {
                let ns = &self.nodes[i].ns;
                let peer = &self.nodes[j].ip;
                for (chain, dir) in [("INPUT", "-s"), ("OUTPUT", "-d")] {
                    must(Command::new("ip").args([
                        "netns", "exec", ns, "iptables", "-A", chain, dir, peer, "-j", "DROP",
                    ]));
                }
            }
        }
    }

    /// Whether node `i` has a running process (not killed or stopped).
    pub fn is_up(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    pub fn heal(&self) {
        for n in &self.nodes {
            must(Command::new("ip").args(["netns", "exec", &n.ns, "iptables", "-F"]));
        }
    }

    /// Node `i`'s Prometheus `/metrics` text.
    pub async fn metrics(&self, i: usize) -> String {
        self.http
            .get(format!("http://{}:15692/metrics", self.nodes[i].ip))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// `warren-broker cluster forget NODE` against node `i`'s management API.
    pub fn forget_cli(&self, i: usize, node: &str) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_warren-broker"))
            .args(["cluster", "forget", node])
            .args(["--management-url", &self.nodes[i].mgmt()])
            .args(["--user", USER, "--password", PASS])
            .output()
            .expect("run warren-broker cluster forget")
    }

    /// `warren-broker drain --json` against node `i` (a pod's preStop hook): its report.
    pub fn drain_cli(&self, i: usize) -> Value {
        let out = Command::new(env!("CARGO_BIN_EXE_warren-broker"))
            .args(["drain", "--json"])
            .args(["--management-url", &self.nodes[i].mgmt()])
            .args(["--user", USER, "--password", PASS])
            .output()
            .expect("run warren-broker drain");
        assert!(
            out.status.success(),
            "drain of node {i} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("drain --json prints JSON")
    }

    pub async fn get(&self, i: usize, path: &str) -> Result<Value, String> {
        let r = self
            .http
            .get(format!("{}{path}", self.nodes[i].mgmt()))
            .basic_auth(USER, Some(PASS))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = r.status();
        let body: Value = r.json().await.map_err(|e| e.to_string())?;
        if status.is_success() {
            Ok(body)
        } else {
            Err(format!("{status}: {body}"))
        }
    }

    /// Any request to node `i`'s management API: status and JSON body (Null if none).
    pub async fn send(
        &self,
        i: usize,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value), String> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.nodes[i].mgmt()))
            .basic_auth(USER, Some(PASS))
            .timeout(Duration::from_secs(10));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.map_err(|e| e.to_string())?;
        let status = r.status().as_u16();
        let text = r.text().await.map_err(|e| e.to_string())?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }

    /// Waits until node `i` is ready (`/api/health/checks/virtual-hosts`: joined the
    /// metadata group and caught up); panics with its log otherwise.
    pub async fn wait_ready(&self, i: usize, within: Duration) {
        let start = Instant::now();
        let mut last = Err(String::new());
        while start.elapsed() < within {
            last = self.get(i, "/api/health/checks/virtual-hosts").await;
            if last.is_ok() {
                println!(
                    "{} ready after {:.1} s",
                    self.nodes[i].name,
                    start.elapsed().as_secs_f64()
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!(
            "{} not ready within {within:?}: {last:?}\n--- its log ---\n{}",
            self.nodes[i].name,
            self.nodes[i].log()
        );
    }

    /// Waits until `GET path` on node `i` answers `want` (a status code); panics with the
    /// last answer and the node's log otherwise.
    pub async fn wait_status(&self, i: usize, path: &str, want: u16, within: Duration) -> Value {
        let start = Instant::now();
        let mut last = Err(String::new());
        while start.elapsed() < within {
            last = self.send(i, reqwest::Method::GET, path, None).await;
            if let Ok((status, body)) = &last
                && *status == want
            {
                return body.clone();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "GET {path} on {} did not answer {want} within {within:?}: {last:?}\n--- its log \
             ---\n{}",
            self.nodes[i].name,
            self.nodes[i].log()
        );
    }

    /// Deletes node `i`'s data directory (it must be stopped): it comes back as a new node.
    pub fn wipe(&self, i: usize) {
        assert!(self.nodes[i].child.is_none(), "stop the node first");
        let _ = std::fs::remove_dir_all(&self.nodes[i].data_dir);
    }

    /// `(name, running)` of every node `/api/nodes` on node `i` lists, sorted by name.
    pub async fn nodes_seen_by(&self, i: usize) -> Result<Vec<(String, bool)>, String> {
        let v = self.get(i, "/api/nodes").await?;
        let mut out: Vec<(String, bool)> = v
            .as_array()
            .ok_or("not an array")?
            .iter()
            .map(|n| {
                (
                    n["name"].as_str().unwrap_or_default().to_owned(),
                    n["running"].as_bool().unwrap_or(false),
                )
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// What node `i` should list: `(name, running)` for the given nodes, sorted.
    pub fn expect(&self, running: &[(usize, bool)]) -> Vec<(String, bool)> {
        let mut out: Vec<(String, bool)> = running
            .iter()
            .map(|&(j, up)| (self.nodes[j].name.clone(), up))
            .collect();
        out.sort();
        out
    }

    /// Waits until node `i` lists exactly `want`; panics with what it saw and its log.
    pub async fn wait_nodes(&self, i: usize, want: &[(usize, bool)], within: Duration) {
        let want = self.expect(want);
        let start = Instant::now();
        let mut seen = Err(String::new());
        while start.elapsed() < within {
            seen = self.nodes_seen_by(i).await;
            if seen.as_ref() == Ok(&want) {
                println!(
                    "{} agreed after {:.1} s: {want:?}",
                    self.nodes[i].name,
                    start.elapsed().as_secs_f64()
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!(
            "{} did not list {want:?} within {within:?}; last saw {seen:?}\n--- its log ---\n{}",
            self.nodes[i].name,
            self.nodes[i].log()
        );
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                // SIGKILL ends a stopped (SIGSTOP) process too.
                let _ = c.kill();
                let _ = c.wait();
            }
            let _ = run(&mut ip(&["netns", "del", &n.ns]));
        }
        let _ = run(&mut ip(&["link", "del", &self.bridge]));
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("cluster test files kept in {}", self.dir.display());
        }
    }
}
