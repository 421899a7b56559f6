//! Test harness: a real broker on 127.0.0.1:0 in the test's runtime, and lapin helpers.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use lapin::{Channel, Connection, ConnectionProperties};
use tokio::net::TcpListener;
use warren_broker::{Broker, Config};

pub struct TestBroker {
    pub addr: SocketAddr,
    pub broker: Arc<Broker>,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

impl TestBroker {
    pub async fn start() -> Self {
        Self::start_with(Config::default()).await
    }

    pub async fn start_with(config: Config) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let broker = Broker::new(config);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(warren_broker::server::run(
            broker.clone(),
            listener,
            async {
                let _ = rx.await;
            },
        ));
        Self {
            addr,
            broker,
            _shutdown: tx,
        }
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }

    pub async fn connect(&self) -> Connection {
        Connection::connect(&self.url(), ConnectionProperties::default())
            .await
            .expect("connect")
    }

    pub async fn channel(&self) -> (Connection, Channel) {
        let c = self.connect().await;
        let ch = c.create_channel().await.expect("channel");
        (c, ch)
    }
}

/// The AMQP reply code carried by a lapin error, if any.
pub fn code(e: &lapin::Error) -> Option<u16> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(p) => Some(p.get_id()),
        _ => None,
    }
}

pub async fn eventually<F: FnMut() -> bool>(mut f: F) -> bool {
    for _ in 0..200 {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}
