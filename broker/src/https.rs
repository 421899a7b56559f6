//! HTTPS for the management API and the Prometheus endpoint (`management-tls-listen`,
//! `prometheus-tls-listen`): a TLS listener axum serves like a TCP one.
//!
//! The listener uses the node's certificate and key (`tls-cert-file`, `tls-key-file`) and never
//! asks clients for a certificate, whatever `tls-ca-file` says: as RabbitMQ's management
//! listener (`verify_none`, `fail_if_no_peer_cert = false`), HTTP basic auth is what
//! authenticates. Each handshake runs in its own task, bounded in time, so a slow or silent
//! client cannot hold up the others; only completed handshakes reach the HTTP server.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tracing::{debug, error, warn};

use crate::tls::{TlsAcceptor, TlsError, TlsFiles};

/// How long a client has to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        tokio::spawn(accept_loop(listener, acceptor, tx));
        Ok(Self { ready, local })
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    tx: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let mut backoff = Duration::from_millis(5);
    loop {
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
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
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
