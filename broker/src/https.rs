//! HTTPS for the management API and the Prometheus endpoint (`management-tls-listen`,
//! `prometheus-tls-listen`): a TLS listener axum serves like a TCP one.
//!
//! The listener uses the node's certificate and key (`tls-cert-file`, `tls-key-file`) and never
//! asks clients for a certificate, whatever `tls-ca-file` says: as RabbitMQ's management
//! listener (`verify_none`, `fail_if_no_peer_cert = false`), HTTP basic auth is what
//! authenticates. Each handshake runs in its own task, bounded in time, so a slow or silent
//! client cannot hold up the others; only completed handshakes reach the HTTP server. At most
//! [`MAX_HANDSHAKES`] handshakes run at once: beyond that, new connections wait in the kernel's
//! accept queue, so a flood of silent connections costs a bounded number of tasks.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::server::TlsStream;
use tracing::{debug, error, warn};

use crate::tls::{TlsAcceptor, TlsError, TlsFiles};

/// How long a client has to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How many TLS handshakes may be under way at once.
pub const MAX_HANDSHAKES: usize = 256;

/// The acceptor of the HTTPS listeners: the node's certificate, no client certificates.
pub fn acceptor(files: &TlsFiles) -> Result<TlsAcceptor, TlsError> {
    crate::tls::acceptor(&TlsFiles {
        ca: None,
        ..files.clone()
    })
}

/// A bound TCP listener whose connections come out TLS-established; give it to
/// `axum::serve` (or [`crate::management::run_tls`]).
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Starts accepting on `listener` (inside a Tokio runtime). Accepting stops when the
    /// `TlsListener` is dropped.
    pub fn new(listener: TcpListener, acceptor: TlsAcceptor) -> std::io::Result<Self> {
        Self::with_limit(listener, acceptor, MAX_HANDSHAKES)
    }

    /// [`Self::new`] with at most `handshakes` handshakes under way at once.
    pub fn with_limit(
        listener: TcpListener,
        acceptor: TlsAcceptor,
        handshakes: usize,
    ) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        let limit = std::sync::Arc::new(Semaphore::new(handshakes.max(1)));
        tokio::spawn(accept_loop(listener, acceptor, tx, limit));
        Ok(Self { ready, local })
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    tx: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
    limit: std::sync::Arc<Semaphore>,
) {
    let mut backoff = Duration::from_millis(5);
    loop {
        // A handshake slot first: while every slot is taken, connections wait unaccepted.
        let permit = tokio::select! {
            _ = tx.closed() => return,
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            _ = tx.closed() => return,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(x) => {
                backoff = Duration::from_millis(5);
                x
            }
            Err(e) => {
                error!("HTTPS accept failed: {e}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await;
            // The slot is free once the handshake is over, before the connection is served.
            drop(permit);
            match handshake {
                Ok(Ok(tls)) => {
                    let _ = tx.send((tls, peer)).await;
                }
                // A TCP probe connects and closes without a word: not worth a warning.
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    debug!(%peer, "HTTPS handshake: the peer closed the connection");
                }
                Ok(Err(e)) => warn!(%peer, "HTTPS handshake failed: {e}"),
                Err(_) => warn!(%peer, "HTTPS handshake timed out"),
            }
        });
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accept task ended (it only does when this listener is dropped).
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use axum::serve::Listener;
    use rustls::pki_types::ServerName;
    use std::sync::Arc;
    use tokio::io::AsyncWriteExt;

    /// A self-signed certificate for localhost: the acceptor, and a client that trusts it.
    fn pki() -> (TlsAcceptor, tokio_rustls::TlsConnector) {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let dir = std::env::temp_dir().join(format!("warren-https-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
        let acceptor = acceptor(&TlsFiles {
            cert,
            key,
            ca: Some(dir.join("ignored-ca.crt")),
        })
        .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ck.cert.der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (acceptor, tokio_rustls::TlsConnector::from(Arc::new(config)))
    }

    #[tokio::test]
    async fn silent_connections_take_at_most_the_handshake_slots() {
        let (acceptor, connector) = pki();
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut listener = TlsListener::with_limit(tcp, acceptor, 2).unwrap();
        let addr = listener.local_addr().unwrap();
        let served = tokio::spawn(async move {
            let (mut tls, _) = listener.accept().await;
            tls.write_all(b"hello").await.unwrap();
            tls.shutdown().await.unwrap();
        });
        // Two clients that connect and say nothing hold both slots.
        let silent1 = TcpStream::connect(addr).await.unwrap();
        let _silent2 = TcpStream::connect(addr).await.unwrap();
        let client = tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let name = ServerName::try_from("localhost").unwrap();
            let mut tls = connector.connect(name, tcp).await.unwrap();
            let mut got = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut tls, &mut got)
                .await
                .unwrap();
            got
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !client.is_finished(),
            "a third handshake ran while two were under way"
        );
        // One silent client goes: its slot serves the waiting one.
        drop(silent1);
        let got = tokio::time::timeout(Duration::from_secs(5), client)
            .await
            .expect("the waiting client is served once a slot frees")
            .unwrap();
        assert_eq!(got, b"hello");
        served.await.unwrap();
    }
}
