//! The AMQP listener: accepts connections on a bound listener until shutdown.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::TcpListener;
use tracing::{error, info, warn};

use crate::broker::Broker;

/// Accepts AMQP connections until `shutdown` resolves. Tests pass a listener bound to
/// `127.0.0.1:0`; the binary binds the configured address.
pub async fn run(broker: Arc<Broker>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "AMQP 0-9-1 listener started");
        broker.register_listener("amqp", addr);
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
        let b = broker.clone();
        tokio::spawn(async move {
            crate::connection::serve(b.clone(), stream, peer).await;
            b.open_connections.fetch_sub(1, Ordering::AcqRel);
        });
    }
    info!("AMQP listener stopped");
}
