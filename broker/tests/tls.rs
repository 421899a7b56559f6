#![allow(clippy::unwrap_used)]
//! AMQPS: lapin over TLS against a broker with a certificate made at test time, mutual TLS
//! (a client without a certificate, or with one from another CA, is refused), and — against a
//! real `warren-broker` process — TLS only (`amqp-listen = "none"`) and start-up errors that
//! name the bad file. SASL EXTERNAL: the user named by the client certificate (its CN, or its
//! whole DN) logs in without a password.
mod common;

#[path = "common/node.rs"]
mod node;
use node::free_port;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::options::*;
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use warren_broker::tls::{CertLoginFrom, SanType, TlsFiles};
use warren_broker::{Broker, Config};

/// PEM files of one test PKI: a CA, a server certificate for localhost/127.0.0.1, a client
/// certificate, and a client certificate from an unrelated CA.
struct Pki {
    dir: PathBuf,
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: String,
    client_key: String,
    rogue_cert: String,
    rogue_key: String,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

fn new_ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
}

/// A leaf certificate and its key, both PEM.
fn leaf(
    issuer: &CertifiedIssuer<'static, KeyPair>,
    cn: &str,
    sans: &[&str],
    usage: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut p =
        CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.extended_key_usages = vec![usage];
    let cert = p.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

impl Pki {
    fn new(name: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("warren-tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ca = new_ca("Warren test CA");
        let (server_cert, server_key) = leaf(
            &ca,
            "localhost",
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_cert, client_key) = leaf(&ca, "app", &[], ExtendedKeyUsagePurpose::ClientAuth);
        let rogue = new_ca("Some other CA");
        let (rogue_cert, rogue_key) = leaf(&rogue, "app", &[], ExtendedKeyUsagePurpose::ClientAuth);
        let write = |file: &str, text: &str| {
            let p = dir.join(file);
            std::fs::write(&p, text).unwrap();
            p
        };
        Pki {
            ca: write("ca.crt", &ca.pem()),
            server_cert: write("tls.crt", &server_cert),
            server_key: write("tls.key", &server_key),
            client_cert,
            client_key,
            rogue_cert,
            rogue_key,
            issuer: ca,
            dir,
        }
    }

    /// A client certificate of our CA with exactly this subject (first = outermost RDN), and
    /// its key, both PEM.
    fn client_cert(&self, subject: &[(DnType, &str)]) -> (String, String) {
        self.client_cert_with_sans(subject, Vec::new())
    }

    /// The same with subject alternative names.
    fn client_cert_with_sans(
        &self,
        subject: &[(DnType, &str)],
        sans: Vec<rcgen::SanType>,
    ) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.subject_alt_names = sans;
        p.distinguished_name = DistinguishedName::new();
        for (t, v) in subject {
            p.distinguished_name.push(t.clone(), *v);
        }
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn files(&self, mtls: bool) -> TlsFiles {
        TlsFiles {
            cert: self.server_cert.clone(),
            key: self.server_key.clone(),
            ca: mtls.then(|| self.ca.clone()),
        }
    }

    fn ca_pem(&self) -> String {
        std::fs::read_to_string(&self.ca).unwrap()
    }

    /// lapin's TLS settings: trust our CA, present `identity` if any.
    fn client(&self, identity: Option<(&str, &str)>) -> OwnedTLSConfig {
        OwnedTLSConfig {
            identity: identity.map(|(cert, key)| OwnedIdentity::PKCS8 {
                pem: cert.as_bytes().to_vec(),
                key: key.as_bytes().to_vec(),
            }),
            cert_chain: Some(self.ca_pem()),
        }
    }
}

/// A broker in this process with a plain and a TLS listener (and the management API).
struct TlsBroker {
    broker: Arc<Broker>,
    plain: u16,
    tls: u16,
    mgmt: String,
}

async fn start(pki: &Pki, mtls: bool) -> TlsBroker {
    start_with(pki, mtls, Config::default()).await
}

/// As `start`, with this configuration; its TLS settings say what the node was told (the
/// listeners here are made by the test).
async fn start_with(pki: &Pki, mtls: bool, config: Config) -> TlsBroker {
    let tls = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = Config {
        amqps_listen: Some(tls.local_addr().unwrap()),
        tls_cert_file: Some(pki.server_cert.clone()),
        tls_key_file: Some(pki.server_key.clone()),
        tls_ca_file: mtls.then(|| pki.ca.clone()),
        ..config
    };
    let broker = Broker::new(config);
    let plain = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mgmt = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (plain_port, tls_port) = (
        plain.local_addr().unwrap().port(),
        tls.local_addr().unwrap().port(),
    );
    let mgmt_url = format!("http://{}", mgmt.local_addr().unwrap());
    let acceptor = warren_broker::tls::acceptor(&pki.files(mtls)).unwrap();
    tokio::spawn(warren_broker::server::run(
        broker.clone(),
        plain,
        std::future::pending(),
    ));
    tokio::spawn(warren_broker::server::run_tls(
        broker.clone(),
        tls,
        acceptor,
        std::future::pending(),
    ));
    tokio::spawn(warren_broker::management::run(
        broker.clone(),
        mgmt,
        std::future::pending(),
    ));
    TlsBroker {
        broker,
        plain: plain_port,
        tls: tls_port,
        mgmt: mgmt_url,
    }
}

async fn connect_tls(port: u16, tls: OwnedTLSConfig) -> lapin::Result<Connection> {
    connect_tls_url(&format!("amqps://guest:guest@localhost:{port}/%2f"), tls).await
}

async fn connect_tls_url(url: &str, tls: OwnedTLSConfig) -> lapin::Result<Connection> {
    tokio::time::timeout(
        Duration::from_secs(10),
        Connection::connect_with_config(
            url,
            ConnectionProperties::default(),
            tls,
            lapin::runtime::default_runtime().unwrap(),
        ),
    )
    .await
    .expect("TLS connect neither succeeded nor failed within 10 s")
}

async fn get_json(url: &str) -> Value {
    reqwest::Client::new()
        .get(url)
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Publish with a confirm, then consume it back, on one connection.
async fn round_trip(conn: &Connection, queue: &str) {
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let confirm =
        common::publish_confirmed(&ch, "", queue, b"over tls", BasicProperties::default()).await;
    assert!(confirm.is_ack());
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(5), consumer.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(d.data, b"over tls");
    d.ack(BasicAckOptions::default()).await.unwrap();
    // Closed here, not when dropped: a drop closes it in the background, and a connection
    // close racing that fails with InvalidChannelState(Closing) in lapin.
    ch.close(200, "bye".into()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapin_over_mutual_tls_publishes_and_consumes() {
    let pki = Pki::new("mtls");
    let b = start(&pki, true).await;
    let conn = connect_tls(b.tls, pki.client(Some((&pki.client_cert, &pki.client_key))))
        .await
        .unwrap();
    round_trip(&conn, "tls-q").await;

    // The management API: the listener as RabbitMQ lists it, the connection as TLS.
    let o = get_json(&format!("{}/api/overview", b.mgmt)).await;
    let listeners = o["listeners"].as_array().unwrap();
    assert!(
        listeners
            .iter()
            .any(|l| l["protocol"] == "amqp/ssl" && l["port"] == b.tls),
        "{listeners:?}"
    );
    assert!(
        listeners
            .iter()
            .any(|l| l["protocol"] == "amqp" && l["port"] == b.plain)
    );
    let conns = get_json(&format!("{}/api/connections", b.mgmt)).await;
    assert_eq!(conns[0]["ssl"], true, "{conns}");
    assert!(
        conns[0]["ssl_protocol"]
            .as_str()
            .unwrap()
            .starts_with("tlsv1."),
        "{conns}"
    );
    assert!(!conns[0]["ssl_cipher"].as_str().unwrap().is_empty());
    let health = reqwest::Client::new()
        .get(format!(
            "{}/api/health/checks/port-listener/{}",
            b.mgmt, b.tls
        ))
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    conn.close(200, "bye".into()).await.unwrap();

    // The plain listener still serves plain clients, which show as not TLS.
    let plain = Connection::connect(
        &format!("amqp://guest:guest@127.0.0.1:{}/%2f", b.plain),
        ConnectionProperties::default(),
    )
    .await
    .unwrap();
    assert!(common::eventually(|| b.broker.connections.len() == 1).await);
    let conns = get_json(&format!("{}/api/connections", b.mgmt)).await;
    assert_eq!(conns[0]["ssl"], false, "{conns}");
    assert!(conns[0].get("ssl_protocol").is_none());
    plain.close(200, "bye".into()).await.unwrap();
    let _ = std::fs::remove_dir_all(&pki.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_refuses_clients_without_a_trusted_certificate() {
    let pki = Pki::new("refuse");
    let b = start(&pki, true).await;
    let no_cert = connect_tls(b.tls, pki.client(None)).await;
    // The server's alert, as the client reports it.
    let e = format!(
        "{:?}",
        no_cert.expect_err("a client without a certificate got in")
    );
    assert!(e.contains("CertificateRequired"), "{e}");
    let rogue = connect_tls(b.tls, pki.client(Some((&pki.rogue_cert, &pki.rogue_key)))).await;
    let e = format!(
        "{:?}",
        rogue.expect_err("a certificate from another CA got in")
    );
    assert!(e.contains("UnknownCA"), "{e}");
    // A plain AMQP client on the TLS port gets nowhere either.
    let plain_on_tls = tokio::time::timeout(
        Duration::from_secs(10),
        Connection::connect(
            &format!("amqp://guest:guest@127.0.0.1:{}/%2f", b.tls),
            ConnectionProperties::default(),
        ),
    )
    .await
    .unwrap();
    assert!(plain_on_tls.is_err());
    assert!(b.broker.connections.is_empty());
    // The listener is still fine for a client that has one.
    let ok = connect_tls(b.tls, pki.client(Some((&pki.client_cert, &pki.client_key))))
        .await
        .unwrap();
    ok.close(200, "bye".into()).await.unwrap();
    let _ = std::fs::remove_dir_all(&pki.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_ca_no_client_certificate_is_needed() {
    let pki = Pki::new("server-only");
    let b = start(&pki, false).await;
    let conn = connect_tls(b.tls, pki.client(None)).await.unwrap();
    round_trip(&conn, "tls-server-only").await;
    conn.close(200, "bye".into()).await.unwrap();
    // No client certificates, so no SASL EXTERNAL.
    let nodes = get_json(&format!("{}/api/nodes", b.mgmt)).await;
    assert_eq!(external_mechanism(&nodes)["enabled"], false, "{nodes}");
    let mut buf = bytes::BytesMut::new();
    let mut s = raw_tls(b.tls, &pki, None).await;
    assert_eq!(start_mechanisms(&mut s, &mut buf).await, "PLAIN AMQPLAIN");
    let (code, text) = external_refused(&mut s, &mut buf).await;
    assert_eq!(code, 403, "{text}");
    assert!(text.contains("presented none"), "{text}");
    // A client that does not trust our CA refuses the server.
    let untrusting = connect_tls(
        b.tls,
        OwnedTLSConfig {
            identity: None,
            cert_chain: None,
        },
    )
    .await;
    let e = format!(
        "{:?}",
        untrusting.expect_err("an unknown server was trusted")
    );
    assert!(e.contains("UnknownIssuer"), "{e}");
    let _ = std::fs::remove_dir_all(&pki.dir);
}

/// Runs the binary with these arguments to completion (it must fail to start); returns its
/// exit code and stderr.
fn failed_start(args: &[&str]) -> (Option<i32>, String) {
    let data = std::env::temp_dir().join(format!("warren-tls-fail-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_warren-broker"))
        .args(["--data-dir", data.to_str().unwrap()])
        .args(["--management-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--prometheus-listen", &format!("127.0.0.1:{}", free_port())])
        .args(args)
        .env_remove("WARREN_CONFIG")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&data);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_only_node_and_start_up_errors() {
    let pki = Pki::new("process");
    let tls_port = free_port();
    let mgmt_port = free_port();
    let data = pki.dir.join("data");
    let config = pki.dir.join("warren.toml");
    // The configuration as an operator would write it: TOML, TLS only, mutual TLS.
    std::fs::write(
        &config,
        format!(
            "amqp-listen = \"none\"\n\
             amqps-listen = \"127.0.0.1:{tls_port}\"\n\
             tls-cert-file = \"{}\"\n\
             tls-key-file = \"{}\"\n\
             tls-ca-file = \"{}\"\n\
             management-listen = \"127.0.0.1:{mgmt_port}\"\n\
             prometheus-listen = \"127.0.0.1:{}\"\n\
             ssl-cert-login-from = \"distinguished_name\"\n\
             data-dir = \"{}\"\n",
            path(&pki.server_cert),
            path(&pki.server_key),
            path(&pki.ca),
            free_port(),
            path(&data),
        ),
    )
    .unwrap();
    let log = pki.dir.join("node.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_warren-broker"))
        .args(["--config", path(&config)])
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut up = false;
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", tls_port))
            .await
            .is_ok()
        {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        up,
        "TLS-only node did not start: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let conn = connect_tls(
        tls_port,
        pki.client(Some((&pki.client_cert, &pki.client_key))),
    )
    .await
    .unwrap();
    round_trip(&conn, "tls-only").await;
    // Only the TLS listener: no plain AMQP listener is registered or reachable.
    let o = get_json(&format!("http://127.0.0.1:{mgmt_port}/api/overview")).await;
    let protocols: Vec<&str> = o["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["protocol"].as_str().unwrap())
        .collect();
    assert!(protocols.contains(&"amqp/ssl"), "{protocols:?}");
    assert!(!protocols.contains(&"amqp"), "{protocols:?}");
    let plain_client = Connection::connect(
        &format!("amqp://guest:guest@127.0.0.1:{tls_port}/%2f"),
        ConnectionProperties::default(),
    )
    .await;
    assert!(plain_client.is_err(), "a plain AMQP client got in");
    conn.close(200, "bye".into()).await.unwrap();
    child.kill().unwrap();
    child.wait().unwrap();

    // Start-up errors name the file and stop the node.
    let tls_args = |cert: &Path, key: &Path| {
        vec![
            "--amqp-listen".to_owned(),
            "none".to_owned(),
            "--amqps-listen".to_owned(),
            format!("127.0.0.1:{}", free_port()),
            "--tls-cert-file".to_owned(),
            path(cert).to_owned(),
            "--tls-key-file".to_owned(),
            path(key).to_owned(),
        ]
    };
    let run =
        |args: Vec<String>| failed_start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let missing = pki.dir.join("missing.crt");
    let (code, err) = run(tls_args(&missing, &pki.server_key));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("cannot read TLS certificate file") && err.contains(path(&missing)),
        "{err}"
    );
    let garbage = pki.dir.join("garbage.crt");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let (code, err) = run(tls_args(&garbage, &pki.server_key));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(path(&garbage)) && err.contains("no PEM certificate"),
        "{err}"
    );
    // A key that belongs to another certificate.
    let other_key = pki.dir.join("other.key");
    std::fs::write(&other_key, &pki.client_key).unwrap();
    let (code, err) = run(tls_args(&pki.server_cert, &other_key));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(path(&other_key)), "{err}");
    // The certificate file given as the key.
    let (code, err) = run(tls_args(&pki.server_cert, &pki.server_cert));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("no PEM private key") && err.contains(path(&pki.server_cert)),
        "{err}"
    );
    let mut with_bad_ca = tls_args(&pki.server_cert, &pki.server_key);
    with_bad_ca.extend(["--tls-ca-file".to_owned(), path(&garbage).to_owned()]);
    let (code, err) = run(with_bad_ca);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("TLS CA file") && err.contains(path(&garbage)),
        "{err}"
    );
    // Settings that cannot work are configuration errors (exit 2).
    let (code, err) = failed_start(&["--amqp-listen", "none"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("amqp-listen"), "{err}");
    let (code, err) = failed_start(&["--amqps-listen", "127.0.0.1:5671"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("tls-cert-file"), "{err}");
    let (code, err) = failed_start(&["--ssl-cert-login-from", "subject"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("ssl-cert-login-from")
            && err.contains("common_name")
            && err.contains("distinguished_name"),
        "{err}"
    );
    std::fs::write(&config, "ssl-cert-login-from = \"cn\"\n").unwrap();
    let (code, err) = failed_start(&["--config", path(&config)]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("ssl-cert-login-from") && err.contains("distinguished_name"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&pki.dir);
}

/// A `warren-broker` probe subcommand: exit code, stdout, stderr.
fn probe(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_warren-broker"))
        .args(args)
        .env_remove("WARREN_CONFIG")
        .env_remove("WARREN_MANAGEMENT_URL")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_and_prometheus_over_https_only() {
    let pki = Pki::new("https");
    let (amqp, http, https, prom_https) = (free_port(), free_port(), free_port(), free_port());
    let config = pki.dir.join("warren.toml");
    // The file asks for plain HTTP management too; the flag turns it off (flag > file). The
    // CA file is set, yet HTTPS clients need no certificate (RabbitMQ's verify_none).
    std::fs::write(
        &config,
        format!(
            "amqp-listen = \"127.0.0.1:{amqp}\"\n\
             management-listen = \"127.0.0.1:{http}\"\n\
             management-tls-listen = \"127.0.0.1:{https}\"\n\
             prometheus-listen = \"none\"\n\
             prometheus-tls-listen = \"127.0.0.1:{prom_https}\"\n\
             tls-cert-file = \"{}\"\n\
             tls-key-file = \"{}\"\n\
             tls-ca-file = \"{}\"\n\
             data-dir = \"{}\"\n",
            path(&pki.server_cert),
            path(&pki.server_key),
            path(&pki.ca),
            path(&pki.dir.join("data")),
        ),
    )
    .unwrap();
    let log = pki.dir.join("node.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_warren-broker"))
        .args(["--config", path(&config), "--management-listen", "none"])
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut up = false;
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", https))
            .await
            .is_ok()
        {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let node_log = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(up, "HTTPS management did not start: {}", node_log());

    let ca = reqwest::Certificate::from_pem(pki.ca_pem().as_bytes()).unwrap();
    let client = reqwest::Client::builder()
        .add_root_certificate(ca)
        .build()
        .unwrap();
    let base = format!("https://localhost:{https}");
    let put = client
        .put(format!("{base}/api/queues/%2f/over-https"))
        .basic_auth("guest", Some("guest"))
        .json(&serde_json::json!({"durable": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 201);
    let get = |path: String| {
        let client = client.clone();
        async move {
            let r = client
                .get(path)
                .basic_auth("guest", Some("guest"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()
        }
    };
    let queues = get(format!("{base}/api/queues")).await;
    assert!(
        queues
            .as_array()
            .unwrap()
            .iter()
            .any(|q| q["name"] == "over-https"),
        "{queues}"
    );
    // The listeners as RabbitMQ lists them: https, and no plain http.
    let o = get(format!("{base}/api/overview")).await;
    let listeners = o["listeners"].as_array().unwrap();
    assert!(
        listeners
            .iter()
            .any(|l| l["protocol"] == "https" && l["port"] == https),
        "{listeners:?}"
    );
    assert!(
        !listeners.iter().any(|l| l["protocol"] == "http"),
        "{listeners:?}"
    );
    // The plain HTTP port of the file is not served; plain HTTP on the HTTPS port gets no API.
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", http))
            .await
            .is_err(),
        "management-listen = none still listens"
    );
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{https}/api/overview"))
        .basic_auth("guest", Some("guest"))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP on the HTTPS port: {plain:?}");
    // A client that does not trust the CA refuses the server.
    let untrusting = reqwest::Client::new()
        .get(format!("{base}/api/overview"))
        .send()
        .await;
    assert!(untrusting.is_err());
    // Prometheus over HTTPS.
    let metrics = client
        .get(format!("https://localhost:{prom_https}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status(), 200);
    assert!(metrics.text().await.unwrap().contains("rabbitmq_"));

    // The probes find the HTTPS listener in the node's own configuration.
    let config_args = ["--config", path(&config), "--management-listen", "none"];
    let (code, out, err) = probe(&[&config_args[..], &["check", "ready"]].concat());
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.starts_with("ready: node"), "{out}");
    let (code, out, err) = probe(&[&config_args[..], &["drain"]].concat());
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("is being drained"), "{out}");
    let (code, _, err) = probe(&[&config_args[..], &["check", "ready"]].concat());
    assert_eq!(code, Some(1));
    assert!(err.contains("being drained"), "{err}");
    let (code, out, err) = probe(&[&config_args[..], &["drain", "--end"]].concat());
    assert_eq!(code, Some(0), "{out}{err}");
    // An explicit https:// URL to loopback, without the node's configuration.
    let url = format!("https://127.0.0.1:{https}");
    let (code, out, err) = probe(&["check", "ready", "--management-url", &url]);
    assert_eq!(code, Some(0), "{out}{err}");

    // rabbitmqadmin (Debian's) over HTTPS, trusting the test CA.
    if let Ok(out) = Command::new("rabbitmqadmin")
        .args(["-H", "localhost", "-P", &https.to_string(), "--ssl"])
        .args(["--ssl-ca-cert-file", path(&pki.ca)])
        .args([
            "-u", "guest", "-p", "guest", "-f", "tsv", "-q", "list", "queues", "name",
        ])
        .output()
    {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("over-https"),
            "rabbitmqadmin --ssl: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    child.kill().unwrap();
    child.wait().unwrap();

    // Settings that cannot work are configuration errors (exit 2) naming the keys.
    let (code, err) = failed_start(&["--management-tls-listen", "127.0.0.1:15671"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("tls-cert-file") && err.contains("management-tls-listen"),
        "{err}"
    );
    let (code, err) = failed_start(&["--prometheus-tls-listen", "127.0.0.1:15691"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("prometheus-tls-listen"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_warren-broker"))
        .args(["--data-dir", path(&pki.dir.join("none"))])
        .env("WARREN_MANAGEMENT_LISTEN", "none")
        .env_remove("WARREN_CONFIG")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("management-tls-listen"), "{err}");
    let _ = std::fs::remove_dir_all(&pki.dir);
}

/// PUT on the management API as guest; the answer must be a success.
async fn put_api(mgmt: &str, path: &str, body: Value) {
    let r = reqwest::Client::new()
        .put(format!("{mgmt}/api/{path}"))
        .basic_auth("guest", Some("guest"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "PUT {path}: {}", r.status());
}

/// A user without a password (it can only log in with a certificate), with all permissions
/// on `/` unless `permissions` is false.
async fn certificate_user(mgmt: &str, name: &str, permissions: bool) {
    let user = urlencode(name);
    put_api(mgmt, &format!("users/{user}"), json!({"tags": ""})).await;
    if permissions {
        put_api(
            mgmt,
            &format!("permissions/%2F/{user}"),
            json!({"configure": ".*", "write": ".*", "read": ".*"}),
        )
        .await;
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => {
                char::from(b).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
}

/// lapin over TLS with this client certificate, logging in with SASL EXTERNAL.
async fn connect_external(
    port: u16,
    pki: &Pki,
    cert: &(String, String),
) -> lapin::Result<Connection> {
    connect_tls_url(
        &format!("amqps://localhost:{port}/%2f?auth_mechanism=external"),
        pki.client(Some((&cert.0, &cert.1))),
    )
    .await
}

/// A hand-made AMQP client over TLS (rustls, trusting our CA) presenting this certificate, if
/// any.
async fn raw_tls(
    port: u16,
    pki: &Pki,
    cert: Option<&(String, String)>,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pki.ca_pem().as_bytes()).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = match cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
    };
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

/// Sends the protocol header; returns the mechanisms of connection.start.
async fn start_mechanisms(s: &mut impl common::raw::Stream, buf: &mut bytes::BytesMut) -> String {
    use amq_protocol::protocol::{AMQPClass, connection};
    use tokio::io::AsyncWriteExt;
    s.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
    match common::raw::read_method(s, buf).await {
        AMQPClass::Connection(connection::AMQPMethod::Start(start)) => start.mechanisms.to_string(),
        other => panic!("expected connection.start, got {other:?}"),
    }
}

/// Answers connection.start with SASL EXTERNAL (empty response, authentication_failure_close);
/// returns the code and text of the connection.close that must follow.
async fn external_refused(
    s: &mut impl common::raw::Stream,
    buf: &mut bytes::BytesMut,
) -> (u16, String) {
    use amq_protocol::protocol::{AMQPClass, connection};
    let AMQPClass::Connection(connection::AMQPMethod::StartOk(mut start_ok)) =
        common::raw::start_ok("", "", true)
    else {
        unreachable!()
    };
    start_ok.mechanism = "EXTERNAL".into();
    start_ok.response = "".into();
    common::raw::send_method(
        s,
        0,
        AMQPClass::Connection(connection::AMQPMethod::StartOk(start_ok)),
    )
    .await;
    loop {
        match common::raw::try_read_method(s, buf).await {
            Some(AMQPClass::Connection(connection::AMQPMethod::Close(c))) => {
                return (c.reply_code, c.reply_text.to_string());
            }
            Some(_) => continue,
            None => panic!("the socket closed without connection.close"),
        }
    }
}

fn external_mechanism(nodes: &Value) -> Value {
    nodes[0]["auth_mechanisms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "EXTERNAL")
        .cloned()
        .unwrap_or_else(|| panic!("no EXTERNAL in {nodes}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_external_logs_in_as_the_certificate_common_name() {
    let pki = Pki::new("external-cn");
    let b = start(&pki, true).await;
    let nodes = get_json(&format!("{}/api/nodes", b.mgmt)).await;
    assert_eq!(external_mechanism(&nodes)["enabled"], true, "{nodes}");
    certificate_user(&b.mgmt, "alice", true).await;
    let alice = pki.client_cert(&[
        (DnType::CountryName, "GB"),
        (DnType::OrganizationName, "Example"),
        (DnType::CommonName, "alice"),
    ]);

    // Offered on a connection with a verified client certificate, and only there.
    let mut buf = bytes::BytesMut::new();
    let mut s = raw_tls(b.tls, &pki, Some(&alice)).await;
    assert_eq!(
        start_mechanisms(&mut s, &mut buf).await,
        "PLAIN AMQPLAIN EXTERNAL"
    );
    drop(s);
    let mut buf = bytes::BytesMut::new();
    let mut plain = tokio::net::TcpStream::connect(("127.0.0.1", b.plain))
        .await
        .unwrap();
    assert_eq!(
        start_mechanisms(&mut plain, &mut buf).await,
        "PLAIN AMQPLAIN"
    );
    // Asking for it anyway over plain TCP: 403, saying why.
    let (code, text) = external_refused(&mut plain, &mut buf).await;
    assert_eq!(code, 403, "{text}");
    assert!(text.contains("not a TLS connection"), "{text}");

    // lapin logs in as alice, no password, and round-trips a message.
    let conn = connect_external(b.tls, &pki, &alice).await.unwrap();
    round_trip(&conn, "external-q").await;
    let conns = get_json(&format!("{}/api/connections", b.mgmt)).await;
    assert_eq!(conns.as_array().unwrap().len(), 1, "{conns}");
    assert_eq!(conns[0]["user"], "alice", "{conns}");
    assert_eq!(conns[0]["auth_mechanism"], "EXTERNAL", "{conns}");
    assert_eq!(conns[0]["ssl"], true, "{conns}");

    // A certificate naming no user: refused, and the node serves alice on.
    let bob = pki.client_cert(&[(DnType::CommonName, "bob")]);
    let e = connect_external(b.tls, &pki, &bob)
        .await
        .expect_err("a certificate of an unknown user logged in");
    assert_eq!(common::code(&e), Some(403), "{e:?}");
    let mut buf = bytes::BytesMut::new();
    let mut s = raw_tls(b.tls, &pki, Some(&bob)).await;
    start_mechanisms(&mut s, &mut buf).await;
    let (code, text) = external_refused(&mut s, &mut buf).await;
    assert_eq!(code, 403, "{text}");
    assert!(
        text.contains("EXTERNAL") && text.contains("'bob'"),
        "{text}"
    );
    // No CN in the certificate: 403 naming the problem.
    let no_cn = pki.client_cert(&[(DnType::OrganizationName, "Example")]);
    let mut buf = bytes::BytesMut::new();
    let mut s = raw_tls(b.tls, &pki, Some(&no_cn)).await;
    start_mechanisms(&mut s, &mut buf).await;
    let (code, text) = external_refused(&mut s, &mut buf).await;
    assert_eq!(code, 403, "{text}");
    assert!(text.contains("no common name (CN)"), "{text}");
    // EXTERNAL with lapin over plain TCP.
    let e = Connection::connect(
        &format!("amqp://127.0.0.1:{}/%2f?auth_mechanism=external", b.plain),
        ConnectionProperties::default(),
    )
    .await
    .expect_err("EXTERNAL logged in over plain TCP");
    assert_eq!(common::code(&e), Some(403), "{e:?}");
    // Permissions apply as for any login: a user without access to `/` is refused at
    // connection.open.
    certificate_user(&b.mgmt, "dave", false).await;
    let dave = pki.client_cert(&[(DnType::CommonName, "dave")]);
    let e = connect_external(b.tls, &pki, &dave)
        .await
        .expect_err("a user without permissions opened /");
    assert_eq!(common::code(&e), Some(530), "{e:?}");
    // The certificate is not a password: alice, who has none, cannot log in with PLAIN.
    let e = connect_tls_url(
        &format!("amqps://alice:@localhost:{}/%2f", b.tls),
        pki.client(Some((&alice.0, &alice.1))),
    )
    .await
    .expect_err("alice logged in with an empty password");
    assert_eq!(common::code(&e), Some(403), "{e:?}");

    round_trip(&conn, "external-q2").await;
    let again = connect_external(b.tls, &pki, &alice).await.unwrap();
    assert!(common::eventually(|| b.broker.connections.len() == 2).await);
    again.close(200, "bye".into()).await.unwrap();
    conn.close(200, "bye".into()).await.unwrap();
    let _ = std::fs::remove_dir_all(&pki.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_external_with_the_distinguished_name() {
    let pki = Pki::new("external-dn");
    let b = start_with(
        &pki,
        true,
        Config {
            ssl_cert_login_from: CertLoginFrom::DistinguishedName,
            ..Config::default()
        },
    )
    .await;
    let dn = "CN=carol,OU=Team\\, Ops,O=Example,C=GB";
    certificate_user(&b.mgmt, dn, true).await;
    // A user named as the CN is not who the certificate logs in as.
    certificate_user(&b.mgmt, "carol", true).await;
    let carol = pki.client_cert(&[
        (DnType::CountryName, "GB"),
        (DnType::OrganizationName, "Example"),
        (DnType::OrganizationalUnitName, "Team, Ops"),
        (DnType::CommonName, "carol"),
    ]);
    let conn = connect_external(b.tls, &pki, &carol).await.unwrap();
    round_trip(&conn, "external-dn-q").await;
    let conns = get_json(&format!("{}/api/connections", b.mgmt)).await;
    assert_eq!(conns[0]["user"], dn, "{conns}");
    assert_eq!(conns[0]["auth_mechanism"], "EXTERNAL", "{conns}");
    conn.close(200, "bye".into()).await.unwrap();
    // Another subject with the same CN names no user.
    let other = pki.client_cert(&[
        (DnType::OrganizationName, "Elsewhere"),
        (DnType::CommonName, "carol"),
    ]);
    let e = connect_external(b.tls, &pki, &other)
        .await
        .expect_err("a DN with no user logged in");
    assert_eq!(common::code(&e), Some(403), "{e:?}");
    let _ = std::fs::remove_dir_all(&pki.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_external_with_a_subject_alternative_name() {
    let pki = Pki::new("external-san");
    let b = start_with(
        &pki,
        true,
        Config {
            ssl_cert_login_from: CertLoginFrom::SubjectAltName,
            ssl_cert_login_san_type: SanType::Email,
            ssl_cert_login_san_index: 1,
            ..Config::default()
        },
    )
    .await;
    certificate_user(&b.mgmt, "erin@example.com", true).await;
    // Neither the CN nor the first e-mail name is who the certificate logs in as.
    certificate_user(&b.mgmt, "erin", true).await;
    certificate_user(&b.mgmt, "shared@example.com", true).await;
    let sans = |emails: &[&str]| {
        let mut v = vec![rcgen::SanType::DnsName("erin.example".try_into().unwrap())];
        for e in emails {
            v.push(rcgen::SanType::Rfc822Name((*e).try_into().unwrap()));
        }
        v
    };
    let erin = pki.client_cert_with_sans(
        &[(DnType::CommonName, "erin")],
        sans(&["shared@example.com", "erin@example.com"]),
    );
    let conn = connect_external(b.tls, &pki, &erin).await.unwrap();
    round_trip(&conn, "external-san-q").await;
    let conns = get_json(&format!("{}/api/connections", b.mgmt)).await;
    assert_eq!(conns[0]["user"], "erin@example.com", "{conns}");
    conn.close(200, "bye".into()).await.unwrap();
    // Only one e-mail name: none at index 1, refused with a reason.
    let short =
        pki.client_cert_with_sans(&[(DnType::CommonName, "erin")], sans(&["erin@example.com"]));
    let e = connect_external(b.tls, &pki, &short)
        .await
        .expect_err("no name at index 1");
    assert_eq!(common::code(&e), Some(403), "{e:?}");
    let _ = std::fs::remove_dir_all(&pki.dir);
}
