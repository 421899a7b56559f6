//! `amqps://` links: a shovel to a node that serves AMQP over TLS only, with the CA given by
//! `cacertfile`, with `verify=verify_none`, with a client certificate for mutual TLS, and
//! refused (with the reason in its status) when the certificate cannot be checked.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use reqwest::StatusCode;
use serde_json::json;
use tokio::net::TcpListener;
use warren_broker::tls::TlsFiles;
use warren_broker::{Broker, Config};

use crate::common::TestBroker;
use crate::harness::*;

fn ca() -> CertifiedIssuer<'static, KeyPair> {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(DnType::CommonName, "links test CA");
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
}

fn leaf(
    ca: &CertifiedIssuer<'static, KeyPair>,
    sans: &[&str],
    usage: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut p =
        CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    p.distinguished_name.push(DnType::CommonName, "links");
    p.extended_key_usages = vec![usage];
    (p.signed_by(&key, ca).unwrap().pem(), key.serialize_pem())
}

struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let dir = std::env::temp_dir().join(format!("warren-links-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ca = ca();
        let (cert, key) = leaf(
            &ca,
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (ccert, ckey) = leaf(&ca, &[], ExtendedKeyUsagePurpose::ClientAuth);
        for (f, text) in [
            ("ca.crt", ca.pem()),
            ("tls.crt", cert),
            ("tls.key", key),
            ("client.crt", ccert),
            ("client.key", ckey),
        ] {
            std::fs::write(dir.join(f), text).unwrap();
        }
        Pki { dir }
    }

    fn path(&self, f: &str) -> String {
        self.dir.join(f).to_str().unwrap().to_owned()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A node serving AMQPS only (with mutual TLS when `client_ca` is given); its TLS port.
async fn tls_node(dir: &Path, client_ca: bool) -> (std::sync::Arc<Broker>, u16) {
    let broker = Broker::new(Config::default());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let acceptor = warren_broker::tls::acceptor(&TlsFiles {
        cert: dir.join("tls.crt"),
        key: dir.join("tls.key"),
        ca: client_ca.then(|| dir.join("ca.crt")),
    })
    .unwrap();
    tokio::spawn(warren_broker::server::run_tls(
        broker.clone(),
        listener,
        acceptor,
        std::future::pending(),
    ));
    (broker, port)
}

fn messages(b: &Broker, queue: &str) -> u64 {
    b.vhost("/").and_then(|v| v.queue(queue)).map_or(0, |q| {
        let (ready, unacked, _) = q.counts();
        ready + unacked
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shovels_over_tls_with_rabbitmqs_uri_parameters() {
    let pki = Pki::new();
    let a = TestBroker::start().await;
    let api = Api::start(&a).await;
    let (b, port) = tls_node(&pki.dir, false).await;
    let (m, mport) = tls_node(&pki.dir, true).await;
    let (_ca, cha) = a.channel().await;
    let base = |p: u16| format!("amqps://guest:guest@localhost:{p}/%2f");
    for (name, uri, dest) in [
        (
            "ca",
            format!("{}?cacertfile={}", base(port), pki.path("ca.crt")),
            "ca-dst",
        ),
        (
            "none",
            format!("{}?verify=verify_none", base(port)),
            "none-dst",
        ),
        (
            "mutual",
            format!(
                "{}?cacertfile={}&certfile={}&keyfile={}",
                base(mport),
                pki.path("ca.crt"),
                pki.path("client.crt"),
                pki.path("client.key")
            ),
            "mutual-dst",
        ),
    ] {
        let src = format!("{name}-src");
        declare(&cha, &src, true).await;
        publish_n(&cha, &src, name, 20).await;
        let (s, v) = api
            .put_param(
                "shovel",
                "/",
                name,
                json!({"src-uri": "amqp://", "src-queue": src, "dest-uri": uri, "dest-queue": dest}),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        let target = if name == "mutual" { &m } else { &b };
        assert!(
            wait_for(15, || async { messages(target, dest) == 20 }).await,
            "{name}: {:?}",
            api.shovel(name).await
        );
        let st = api.shovel(name).await.unwrap();
        assert_eq!(st["state"], "running");
        assert!(
            st["dest_uri"]
                .as_str()
                .unwrap()
                .starts_with("amqps://localhost:"),
            "{st}"
        );
    }
    // Without our CA the certificate cannot be checked; without a client certificate the
    // mutual-TLS node refuses.
    for (name, uri) in [
        ("unknown-ca", base(port)),
        (
            "no-client-cert",
            format!("{}?cacertfile={}", base(mport), pki.path("ca.crt")),
        ),
    ] {
        let (s, _) = api
            .put_param(
                "shovel",
                "/",
                name,
                json!({"src-uri": "amqp://", "src-queue": "q-never", "dest-uri": uri, "dest-queue": "d", "reconnect-delay": 0.3}),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED);
        assert!(
            wait_for(15, || async {
                api.shovel(name)
                    .await
                    .is_some_and(|s| s["state"] == "terminated")
            })
            .await,
            "{name}"
        );
        let reason = api.shovel(name).await.unwrap()["reason"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(reason.contains("destination"), "{name}: {reason}");
        eprintln!("{name}: {reason}");
    }
}
