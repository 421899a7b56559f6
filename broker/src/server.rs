//! The AMQP listeners: accept connections on a bound listener until shutdown, over plain TCP
//! ([`run`]) or TLS ([`run_tls`]). Both hand the connection to the same connection code.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tracing::{error, info, warn};

use crate::broker::Broker;
use crate::tls::TlsAcceptor;

/// Accepts plain-TCP AMQP connections until `shutdown` resolves. Tests pass a listener bound
/// to `127.0.0.1:0`; the binary binds `amqp-listen`.
pub async fn run(broker: Arc<Broker>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
    accept_loop(broker, listener, None, shutdown).await
}

/// Accepts AMQP-over-TLS connections (`amqps-listen`) until `shutdown` resolves.
pub async fn run_tls(
    broker: Arc<Broker>,
    listener: TcpListener,
    acceptor: TlsAcceptor,
    shutdown: impl Future<Output = ()>,
) {
    accept_loop(broker, listener, Some(acceptor), shutdown).await
}

async fn accept_loop(
    broker: Arc<Broker>,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
) {
    let protocol = if tls.is_some() { "amqp/ssl" } else { "amqp" };
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "AMQP 0-9-1 listener ({protocol}) started");
        broker.register_listener(protocol, addr);
    }
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(x) => {
                backoff = Duration::from_millis(5);
                x
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                error!("accept failed: {e}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let limit = broker.config.max_connections;
        let open = broker.open_connections.fetch_add(1, Ordering::AcqRel);
        if limit > 0 && open >= limit {
            broker.open_connections.fetch_sub(1, Ordering::AcqRel);
            warn!(%peer, limit, "connection refused: max-connections reached");
            drop(stream);
            continue;
        }
        // One deadline from accept to connection.open, the TLS handshake included.
        let deadline = tokio::time::Instant::now() + broker.config.handshake_timeout;
        let b = broker.clone();
        match &tls {
            None => {
                tokio::spawn(async move {
                    crate::connection::serve(b.clone(), stream, peer, deadline).await;
                    b.open_connections.fetch_sub(1, Ordering::AcqRel);
                });
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    serve_tls(&b, acceptor, stream, peer, deadline).await;
                    b.open_connections.fetch_sub(1, Ordering::AcqRel);
                });
            }
        }
    }
    info!("AMQP listener ({protocol}) stopped");
}

/// The TLS handshake, then the AMQP connection over it; both must be done by `deadline`.
async fn serve_tls(
    broker: &Arc<Broker>,
    acceptor: TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
    deadline: tokio::time::Instant,
) {
    let _ = stream.set_nodelay(true);
    let local = stream.local_addr().unwrap_or(peer);
    match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => {
            let ends = crate::connection::Ends {
                peer,
                local,
                handshake_deadline: deadline,
            };
            crate::connection::serve_tls(broker.clone(), tls, ends).await
        }
        // A TCP probe or port scan connects and closes without a word: not worth a warning.
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            tracing::debug!(%peer, "TLS handshake: the peer closed the connection");
        }
        Ok(Err(e)) => warn!(%peer, "TLS handshake failed: {e}"),
        Err(_) => warn!(%peer, "TLS handshake timed out"),
    }
}
