//! Links between nodes over TLS (`cluster-tls`): mutual, against the cluster's CA; a node
//! without TLS, or with a certificate of another CA, does not join.

use std::path::{Path, PathBuf};
use std::time::Duration;

use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use crate::harness::{Net, PASS, SERIAL, USER};

const AGREE: Duration = Duration::from_secs(30);

fn new_ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("test PKI");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(p, KeyPair::generate().expect("test PKI")).expect("test PKI")
}

/// `tls.crt`, `tls.key` and `ca.crt` in `dir`: a node certificate of `ca` for both ends of a
/// link, naming none of the nodes' addresses (host names are not what is checked).
fn node_files(dir: &Path, ca: &CertifiedIssuer<'static, KeyPair>) -> Vec<String> {
    std::fs::create_dir_all(dir).expect("test PKI");
    let key = KeyPair::generate().expect("test PKI");
    let mut p = CertificateParams::new(vec!["warren-node".to_owned()]).expect("test PKI");
    p.distinguished_name.push(DnType::CommonName, "warren-node");
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = p.signed_by(&key, ca).expect("test PKI");
    let write = |name: &str, text: &str| -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("test PKI");
        path
    };
    let (crt, k, c) = (
        write("tls.crt", &cert.pem()),
        write("tls.key", &key.serialize_pem()),
        write("ca.crt", &ca.pem()),
    );
    [
        ("--tls-cert-file", crt),
        ("--tls-key-file", k),
        ("--tls-ca-file", c),
    ]
    .into_iter()
    .flat_map(|(flag, path)| [flag.to_owned(), path.to_string_lossy().into_owned()])
    .chain(["--cluster-tls".to_owned(), "true".to_owned()])
    .collect()
}

#[tokio::test]
async fn nodes_with_tls_links_form_a_cluster_and_refuse_plain_or_foreign_nodes() {
    let _serial = SERIAL.lock().await;
    let mut net = Net::new(4);
    let dir = std::env::temp_dir().join(format!("warren-cluster-tls-{}", std::process::id()));
    let ca = new_ca("Warren cluster CA");
    for i in 0..3 {
        net.nodes[i].extra_args = node_files(&dir.join(format!("node{i}")), &ca);
        net.nodes[i].peers = Some((0..3).map(|j| net.nodes[j].ip.clone()).collect());
    }
    for i in 0..3 {
        net.start(i).await;
    }
    for i in 0..3 {
        net.wait_ready(i, AGREE).await;
    }
    let all: Vec<(usize, bool)> = (0..3).map(|i| (i, true)).collect();
    for i in 0..3 {
        net.wait_nodes(i, &all, AGREE).await;
    }

    // A message crosses the TLS links: queue on node 0, published through node 1, read
    // through node 2.
    let url = |i: usize| format!("amqp://{USER}:{PASS}@{}:5672/%2f", net.nodes[i].ip);
    let c0 = Connection::connect(&url(0), ConnectionProperties::default())
        .await
        .expect("connect to node 0");
    let ch0 = c0.create_channel().await.expect("channel");
    ch0.queue_declare(
        "over-tls".into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare");
    let c1 = Connection::connect(&url(1), ConnectionProperties::default())
        .await
        .expect("connect to node 1");
    let ch1 = c1.create_channel().await.expect("channel");
    ch1.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let confirm = ch1
        .basic_publish(
            "".into(),
            "over-tls".into(),
            BasicPublishOptions::default(),
            b"sealed",
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(confirm.is_ack(), "{confirm:?}");
    let c2 = Connection::connect(&url(2), ConnectionProperties::default())
        .await
        .expect("connect to node 2");
    let ch2 = c2.create_channel().await.expect("channel");
    let got = ch2
        .basic_get("over-tls".into(), BasicGetOptions { no_ack: true })
        .await
        .expect("get")
        .expect("the message");
    assert_eq!(got.delivery.data, b"sealed");

    // Node 3 without TLS (the right secret) is not let in; with a certificate of another
    // CA neither. Every TLS node keeps listing three members.
    net.nodes[3].peers = Some(vec![net.nodes[0].ip.clone()]);
    net.start(3).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let log = net.nodes[3].log();
    assert!(
        log.contains("cannot reach peer") || log.contains("handshake"),
        "the plain node says why it cannot join:\n{log}"
    );
    let nodes = net.nodes_seen_by(0).await.expect("nodes");
    assert_eq!(nodes.len(), 3, "{nodes:?}");
    net.stop(3);
    let rogue = new_ca("Some other CA");
    net.nodes[3].extra_args = node_files(&dir.join("node3"), &rogue);
    net.start(3).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let log = net.nodes[3].log();
    assert!(
        log.contains("TLS") || log.contains("certificate"),
        "the foreign node says its TLS failed:\n{log}"
    );
    let nodes = net.nodes_seen_by(0).await.expect("nodes");
    assert_eq!(nodes.len(), 3, "{nodes:?}");
    for c in [c0, c1, c2] {
        let _ = c.close(200, "bye".into()).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}
