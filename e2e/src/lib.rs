//! Helpers for the end-to-end tests: the real Kubernetes control plane started by
//! `e2e/control-plane.sh`, the operator and broker binaries built by cargo, namespaces,
//! and waiting for conditions without fixed sleeps.
//!
//! Every test here needs `KUBECONFIG` pointing at that control plane; without it the test
//! fails and says how to start one (`bash e2e/run.sh` does everything).

pub mod topology;

use std::future::Future;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};

/// A client for the test control plane; fails loudly when there is none.
pub async fn client() -> Client {
    warren_operator::install_crypto_provider();
    if std::env::var_os("KUBECONFIG").is_none() {
        panic!(
            "KUBECONFIG is not set: these tests need the real control plane. Start it with \
             `bash e2e/control-plane.sh start` and `eval \"$(bash e2e/control-plane.sh env)\"`, \
             or run everything with `bash e2e/run.sh`"
        );
    }
    let client = Client::try_default()
        .await
        .unwrap_or_else(|e| panic!("cannot build a client from KUBECONFIG: {e}"));
    if let Err(e) = client.apiserver_version().await {
        panic!("the API server in KUBECONFIG does not answer ({e}); is the control plane running?");
    }
    client
}

/// The directory holding the workspace's built binaries (`target/debug`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/debug/deps/<test> → target/debug; target/release/<bin> → target/release
    let dir = exe.parent().expect("exe dir");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().map(PathBuf::from).expect("target dir")
    } else {
        dir.to_path_buf()
    }
}

/// Path of a workspace binary; it must have been built (`cargo build --workspace --bins`).
pub fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: build it first with `cargo build -p warren-operator -p warren-broker --bins`",
        path.display()
    );
    path
}

/// A process's resident memory and its peak (VmRSS, VmHWM), in KiB (0 when unknown).
pub fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .expect("repo root")
}

/// Applies the committed CRDs from `crds/` and waits until the API server serves them.
pub async fn ensure_crds(client: &Client) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let dir = repo_root().join("crds");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("crds dir") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read crd");
        let crd: CustomResourceDefinition = serde_yaml::from_str(&text).expect("parse crd");
        let name = crd.metadata.name.clone().expect("crd name");
        api.patch(
            &name,
            &PatchParams::apply("warren-e2e").force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap_or_else(|e| panic!("applying {}: {e}", path.display()));
        names.push(name);
    }
    for name in names {
        wait_for(
            &format!("CRD {name} established"),
            Duration::from_secs(60),
            || {
                let api = api.clone();
                let name = name.clone();
                async move {
                    let crd = api.get(&name).await.ok()?;
                    crd.status?
                        .conditions?
                        .iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                        .then_some(())
                }
            },
        )
        .await;
    }
}

/// Creates a namespace with a unique name.
pub async fn namespace(client: &Client, prefix: &str) -> String {
    let name = format!("{prefix}-{:06x}", rand::random::<u32>() & 0xff_ffff);
    let ns: Namespace = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name},
    }))
    .expect("namespace");
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("create namespace");
    name
}

/// Polls `check` until it returns `Some`, or panics after `timeout` saying what it waited for.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[path = "../../broker/tests/common/ports.rs"]
mod ports;
pub use ports::free_port;

/// The operator binary running against the test control plane; killed on drop.
pub struct Operator {
    child: Child,
    pub metrics_url: String,
    /// Where its stderr (text logs) goes.
    pub log: std::path::PathBuf,
}

impl Operator {
    /// Starts `warren-operator` watching `namespace` only, with its Lease there too, so
    /// tests running in parallel do not see each other's resources.
    pub fn start(namespace: &str) -> Self {
        Self::start_with(namespace, &[])
    }

    /// Starts it with `extra` flags. The brokers of these tests are local processes reached
    /// through a `warren.dev/management-uri` annotation on 127.0.0.1, a host the operator
    /// refuses to send credentials to unless allowed: `--allow-any-management-uri=true` is
    /// passed unless `extra` sets it.
    pub fn start_with(namespace: &str, extra: &[&str]) -> Self {
        Self::start_with_env(namespace, extra, &[])
    }

    /// As [`Operator::start_with`], with extra environment variables (e.g. a `KUBECONFIG`
    /// through an [`ApiRecorder`]).
    pub fn start_with_env(namespace: &str, extra: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_watching(&[namespace], extra, env)
    }

    /// As [`Operator::start_with_env`], watching `namespaces` (`--namespace a,b`), its
    /// Lease in the first.
    pub fn start_watching(namespaces: &[&str], extra: &[&str], env: &[(&str, &str)]) -> Self {
        let namespace = namespaces[0];
        let watched = namespaces.join(",");
        let mut extra = extra.to_vec();
        if !extra
            .iter()
            .any(|a| a.starts_with("--allow-any-management-uri"))
        {
            extra.push("--allow-any-management-uri=true");
        }
        let port = free_port();
        let log = std::env::temp_dir().join(format!("warren-operator-{namespace}.log"));
        let log_file = std::fs::File::create(&log).expect("operator log");
        let child = Command::new(binary("warren-operator"))
            .args(["--namespace", &watched, "--lease-namespace", namespace])
            .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
            .args(["--log-format", "text"])
            .args(&extra)
            .env("RUST_LOG", "info,warren_operator=debug")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn warren-operator");
        eprintln!("operator for {namespace} logs to {}", log.display());
        Operator {
            child,
            metrics_url: format!("http://127.0.0.1:{port}"),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What it has logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `warren-broker` process on loopback ports; killed on drop.
pub struct Broker {
    child: Option<Child>,
    pub amqp_port: u16,
    pub management_port: u16,
    prometheus_port: u16,
    pub management_url: String,
    /// A client for `management_url` (trusting the test CA when it is HTTPS).
    pub http: reqwest::Client,
    /// Serves the management API over HTTPS only, with this certificate.
    tls: Option<TestPki>,
    data: PathBuf,
    /// A member of a cluster of brokers ([`Broker::start_cluster`]).
    cluster: Option<ClusterMember>,
}

/// How one broker of a [`Broker::start_cluster`] cluster is started.
#[derive(Clone, Debug)]
struct ClusterMember {
    node_name: String,
    port: u16,
    peers: String,
    secret_file: PathBuf,
}

/// A CA and a server certificate for 127.0.0.1 and localhost, made with `openssl`.
#[derive(Clone, Debug)]
pub struct TestPki {
    pub dir: PathBuf,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestPki {
    pub fn new(name: &str) -> TestPki {
        let dir = std::env::temp_dir().join(format!("warren-e2e-pki-{name}-{}", free_port()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("pki dir");
        std::fs::write(
            dir.join("ext.cnf"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
             extendedKeyUsage=serverAuth\n",
        )
        .expect("ext.cnf");
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        for args in [
            &[
                &["req", "-x509"][..],
                &ec[..],
                &[
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.crt",
                    "-days",
                    "2",
                    "-subj",
                    "/CN=Warren e2e CA",
                ],
            ]
            .concat(),
            &[
                &["req"][..],
                &ec[..],
                &[
                    "-keyout",
                    "tls.key",
                    "-out",
                    "tls.csr",
                    "-subj",
                    "/CN=localhost",
                ],
            ]
            .concat(),
            &[
                "x509",
                "-req",
                "-in",
                "tls.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "tls.crt",
                "-days",
                "2",
                "-extfile",
                "ext.cnf",
            ][..]
                .to_vec(),
        ] {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .expect("openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).expect(f);
        TestPki {
            ca_pem: read("ca.crt"),
            cert_pem: read("tls.crt"),
            key_pem: read("tls.key"),
            dir,
        }
    }
}

impl Broker {
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// A broker whose management API is served over HTTPS only (`management-listen = none`,
    /// `management-tls-listen`) with `pki`'s certificate.
    pub async fn start_https_only(pki: &TestPki) -> Self {
        Self::start_with(Some(pki.clone())).await
    }

    async fn start_with(tls: Option<TestPki>) -> Self {
        let amqp_port = free_port();
        let management_port = free_port();
        let prometheus_port = free_port();
        let data = std::env::temp_dir().join(format!("warren-e2e-broker-{amqp_port}"));
        let _ = std::fs::remove_dir_all(&data);
        let (scheme, http) = match &tls {
            None => ("http", reqwest::Client::new()),
            Some(pki) => (
                "https",
                reqwest::Client::builder()
                    .add_root_certificate(
                        reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).expect("CA"),
                    )
                    .build()
                    .expect("client"),
            ),
        };
        let mut broker = Broker {
            child: None,
            amqp_port,
            management_port,
            prometheus_port,
            management_url: format!("{scheme}://127.0.0.1:{management_port}"),
            http,
            tls,
            data,
            cluster: None,
        };
        broker.run().await;
        broker
    }

    /// A cluster of brokers on loopback, one per node name (the first is the seed that
    /// creates the cluster's metadata group); returns once each answers on its management
    /// API and the first has every node as a voter.
    pub async fn start_cluster(node_names: &[&str]) -> Vec<Broker> {
        let ports: Vec<u16> = node_names.iter().map(|_| free_port()).collect();
        let peers = ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let secret_file =
            std::env::temp_dir().join(format!("warren-e2e-cluster-secret-{}", ports[0]));
        std::fs::write(&secret_file, "e2e-cluster-secret\n").expect("secret");
        let mut brokers = Vec::new();
        for (name, port) in node_names.iter().zip(&ports) {
            let amqp_port = free_port();
            let management_port = free_port();
            let data = std::env::temp_dir().join(format!("warren-e2e-broker-{amqp_port}"));
            let _ = std::fs::remove_dir_all(&data);
            let mut b = Broker {
                child: None,
                amqp_port,
                management_port,
                prometheus_port: free_port(),
                management_url: format!("http://127.0.0.1:{management_port}"),
                http: reqwest::Client::new(),
                tls: None,
                data,
                cluster: Some(ClusterMember {
                    node_name: name.to_string(),
                    port: *port,
                    peers: peers.clone(),
                    secret_file: secret_file.clone(),
                }),
            };
            b.run().await;
            brokers.push(b);
        }
        let want = node_names.len();
        let first = &brokers[0];
        wait_for(
            "every node a voter of the cluster's metadata group",
            Duration::from_secs(60),
            || async move {
                let m = first.get("/api/warren/metadata").await?;
                (m["voters"].as_array()?.len() == want).then_some(())
            },
        )
        .await;
        brokers
    }

    async fn run(&mut self) {
        let management = format!("127.0.0.1:{}", self.management_port);
        let mut cmd = Command::new(binary("warren-broker"));
        cmd.args(["--data-dir", &self.data.to_string_lossy()])
            .args(["--amqp-listen", &format!("127.0.0.1:{}", self.amqp_port)])
            .args([
                "--prometheus-listen",
                &format!("127.0.0.1:{}", self.prometheus_port),
            ]);
        match &self.tls {
            None => cmd.args(["--management-listen", &management]),
            Some(pki) => cmd
                .args(["--management-listen", "none"])
                .args(["--management-tls-listen", &management])
                .arg("--tls-cert-file")
                .arg(pki.dir.join("tls.crt"))
                .arg("--tls-key-file")
                .arg(pki.dir.join("tls.key")),
        };
        if let Some(c) = &self.cluster {
            cmd.args(["--node-name", &c.node_name])
                .args(["--cluster-listen", &format!("127.0.0.1:{}", c.port)])
                .args(["--cluster-advertise", &format!("127.0.0.1:{}", c.port)])
                .args(["--cluster-peers", &c.peers])
                .arg("--cluster-secret-file")
                .arg(&c.secret_file);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn warren-broker");
        self.child = Some(child);
        let http = self.http.clone();
        let url = format!("{}/api/overview", self.management_url);
        wait_for(
            "the broker's management API",
            Duration::from_secs(30),
            || {
                let http = http.clone();
                let url = url.clone();
                async move {
                    let r = http
                        .get(&url)
                        .basic_auth("guest", Some("guest"))
                        .send()
                        .await
                        .ok()?;
                    r.status().is_success().then_some(())
                }
            },
        )
        .await;
    }

    /// Kills the process (its data stays).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the process again on the same ports and data.
    pub async fn restart(&mut self) {
        self.kill();
        self.run().await;
    }

    /// GET on the management API as guest; `None` on 404.
    pub async fn get(&self, path: &str) -> Option<serde_json::Value> {
        let r = self
            .http
            .get(format!("{}{path}", self.management_url))
            .basic_auth("guest", Some("guest"))
            .send()
            .await
            .expect("management API");
        if r.status() == 404 {
            return None;
        }
        assert!(r.status().is_success(), "GET {path}: {}", r.status());
        Some(r.json().await.expect("json"))
    }

    /// DELETE on the management API as guest.
    pub async fn delete(&self, path: &str) {
        let r = self
            .http
            .delete(format!("{}{path}", self.management_url))
            .basic_auth("guest", Some("guest"))
            .send()
            .await
            .expect("management API");
        assert!(r.status().is_success(), "DELETE {path}: {}", r.status());
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

/// What one request through an [`ApiRecorder`] was, and what came back.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: String,
    /// Path and query.
    pub uri: String,
    pub accept: String,
    pub status: u16,
    /// Bytes of the response body passed on so far.
    pub bytes: usize,
}

#[derive(Default)]
struct Recording {
    requests: Vec<RecordedRequest>,
    /// Responses (by index in `requests`) in which the watched-for bytes appeared.
    seen: Vec<usize>,
}

/// A plain-HTTP proxy in front of the test API server that records every request a process
/// makes and whether any response carried `needle` (e.g. a Secret's base64 data): what the
/// operator actually receives from the API server, not what it says it asked for. The
/// upstream connection uses the admin identity of `KUBECONFIG`; the proxied process gets a
/// kubeconfig without credentials ([`ApiRecorder::kubeconfig`]).
pub struct ApiRecorder {
    // A std Mutex: never held across an await.
    recording: std::sync::Arc<std::sync::Mutex<Recording>>,
    /// A kubeconfig pointing at the proxy.
    pub kubeconfig: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl ApiRecorder {
    pub async fn start(needle: &str) -> ApiRecorder {
        use axum::body::Body;
        use axum::extract::{Request, State};
        use axum::response::Response;

        let path = std::env::var("KUBECONFIG").expect("KUBECONFIG");
        let text = std::fs::read_to_string(&path).expect("read KUBECONFIG");
        let config: serde_yaml::Value = serde_yaml::from_str(&text).expect("parse KUBECONFIG");
        let field = |section: &str, inner: &str, key: &str| -> String {
            config[section][0][inner][key]
                .as_str()
                .unwrap_or_else(|| panic!("KUBECONFIG has no {section}[0].{inner}.{key}"))
                .to_string()
        };
        let decode = |b64: String| -> Vec<u8> {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .expect("base64 in KUBECONFIG")
        };
        let server = field("clusters", "cluster", "server");
        let ca = decode(field("clusters", "cluster", "certificate-authority-data"));
        let mut identity = decode(field("users", "user", "client-certificate-data"));
        identity.extend(decode(field("users", "user", "client-key-data")));
        let upstream = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).expect("CA"))
            .identity(reqwest::Identity::from_pem(&identity).expect("client identity"))
            .build()
            .expect("upstream client");

        let recording = std::sync::Arc::new(std::sync::Mutex::new(Recording::default()));
        type Shared = (
            reqwest::Client,
            String,
            std::sync::Arc<std::sync::Mutex<Recording>>,
            Vec<u8>,
        );
        async fn forward(State(shared): State<std::sync::Arc<Shared>>, req: Request) -> Response {
            let (upstream, server, recording, needle) = &*shared;
            let method = req.method().clone();
            let uri = req
                .uri()
                .path_and_query()
                .map(|p| p.to_string())
                .unwrap_or_default();
            let accept = req
                .headers()
                .get("accept")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let mut out = upstream.request(method.clone(), format!("{server}{uri}"));
            for (name, value) in req.headers() {
                if !matches!(name.as_str(), "host" | "connection" | "content-length") {
                    out = out.header(name, value);
                }
            }
            let body = axum::body::to_bytes(req.into_body(), 64 << 20)
                .await
                .unwrap_or_default();
            let answer = match out.body(body).send().await {
                Ok(a) => a,
                Err(e) => {
                    return Response::builder()
                        .status(502)
                        .body(Body::from(e.to_string()))
                        .expect("response");
                }
            };
            let index = {
                let mut r = recording.lock().expect("recording");
                r.requests.push(RecordedRequest {
                    method: method.to_string(),
                    uri,
                    accept,
                    status: answer.status().as_u16(),
                    bytes: 0,
                });
                r.requests.len() - 1
            };
            let mut response = Response::builder().status(answer.status().as_u16());
            for (name, value) in answer.headers() {
                if !matches!(
                    name.as_str(),
                    "connection" | "content-length" | "transfer-encoding"
                ) {
                    response = response.header(name, value);
                }
            }
            // Pass the body on chunk by chunk (watches stream for ever), looking for the
            // needle across chunk boundaries.
            let state = (answer, Vec::<u8>::new(), recording.clone(), needle.clone());
            let stream = futures::stream::unfold(Some(state), move |state| async move {
                let (mut answer, mut tail, recording, needle) = state?;
                match answer.chunk().await {
                    Ok(Some(chunk)) => {
                        tail.extend_from_slice(&chunk);
                        let found = tail.windows(needle.len()).any(|w| w == needle.as_slice());
                        {
                            let mut r = recording.lock().expect("recording");
                            r.requests[index].bytes += chunk.len();
                            if found && !r.seen.contains(&index) {
                                r.seen.push(index);
                            }
                        }
                        let keep = tail.len().saturating_sub(needle.len());
                        tail.drain(..keep);
                        Some((
                            Ok::<_, std::io::Error>(chunk),
                            Some((answer, tail, recording, needle)),
                        ))
                    }
                    Ok(None) => None,
                    Err(e) => Some((Err(std::io::Error::other(e)), None)),
                }
            });
            response.body(Body::from_stream(stream)).expect("response")
        }

        let shared = std::sync::Arc::new((
            upstream,
            server,
            recording.clone(),
            needle.as_bytes().to_vec(),
        ));
        let app = axum::Router::new().fallback(forward).with_state(shared);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the recorder");
        let port = listener.local_addr().expect("addr").port();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let kubeconfig = std::env::temp_dir().join(format!("warren-e2e-recorder-{port}.yaml"));
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: recorder\n  cluster:\n    \
                 server: http://127.0.0.1:{port}\nusers:\n- name: anonymous\n  user: {{}}\n\
                 contexts:\n- name: recorder\n  context:\n    cluster: recorder\n    user: anonymous\n\
                 current-context: recorder\n"
            ),
        )
        .expect("write the recorder's kubeconfig");
        ApiRecorder {
            recording,
            kubeconfig,
            task,
        }
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.recording.lock().expect("recording").requests.clone()
    }

    /// The requests whose responses carried the needle.
    pub fn saw_needle(&self) -> Vec<RecordedRequest> {
        let r = self.recording.lock().expect("recording");
        r.seen.iter().map(|&i| r.requests[i].clone()).collect()
    }
}

impl Drop for ApiRecorder {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}
