//! One authenticated connection between two nodes, carrying requests both ways.
//!
//! After the handshake a link is symmetric: either side may send a `Request`, which the other
//! answers with a `Response` of the same id. Calls are multiplexed (many in flight, answered in
//! any order), each bounded by a timeout; when the link closes every pending call fails at
//! once, so a caller never waits on a dead peer longer than its timeout. Writes go through a
//! bounded queue to one writer task, which writes everything queued with one syscall.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, mpsc, oneshot};

use super::wire::{self, Frame, HEADER};

/// Bytes waiting for the writer above which senders wait ([`Link::call`]) or are refused
/// ([`Link::start_call`]): back-pressure, bounded memory.
const BACKLOG_MAX: usize = 64 << 20;

fn invalid(e: wire::WireError) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e)
}

/// Reads one frame; a frame over the limit is refused from its header.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Frame> {
    let mut header = [0u8; HEADER];
    r.read_exact(&mut header).await?;
    let len = wire::payload_len(&header).map_err(invalid)?;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    wire::decode(&header, &payload).map_err(invalid)
}

pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &Frame) -> std::io::Result<()> {
    let mut buf = Vec::new();
    wire::encode(frame, &mut buf).map_err(invalid)?;
    w.write_all(&buf).await?;
    w.flush().await
}

/// The response body a [`Handler`] produces.
pub type Answer = Pin<Box<dyn Future<Output = Vec<u8>> + Send>>;

/// Answers the requests a peer sends on a link: request body in, response body out.
pub trait Handler: Send + Sync + 'static {
    fn handle(self: Arc<Self>, from: String, body: Vec<u8>) -> Answer;
}

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("the link to {0} is closed")]
    Closed(String),
    #[error("{0} did not answer within {1:?}")]
    Timeout(String, Duration),
    #[error("the link to {0} has over 64 MiB waiting to be written")]
    Congested(String),
    #[error("{0}")]
    Wire(#[from] wire::WireError),
}

/// A live link. Dropping the last handle does not close it; [`Link::close`] does, as does
/// any I/O error.
pub struct Link {
    pub peer: String,
    /// Unique among the links this process opened (a link replaced by a new one is another
    /// link: whatever was tied to the old one is gone with it).
    pub id: u64,
    out: mpsc::UnboundedSender<Vec<u8>>,
    /// Bytes queued for the writer and not written yet.
    backlog: std::sync::atomic::AtomicUsize,
    drained: Notify,
    pending: Mutex<HashMap<u64, oneshot::Sender<Vec<u8>>>>,
    next_id: AtomicU64,
    closed: AtomicBool,
    on_close: Notify,
}

impl Link {
    /// Starts the reader and writer tasks of an authenticated stream.
    pub fn start<S>(stream: S, peer: String, handler: Arc<dyn Handler>) -> Arc<Link>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (r, w) = tokio::io::split(stream);
        let (tx, rx) = mpsc::unbounded_channel();
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let link = Arc::new(Link {
            peer,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            out: tx,
            backlog: std::sync::atomic::AtomicUsize::new(0),
            drained: Notify::new(),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            closed: AtomicBool::new(false),
            on_close: Notify::new(),
        });
        tokio::spawn(write_loop(link.clone(), w, rx));
        tokio::spawn(read_loop(link.clone(), r, handler));
        link
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Closes the link: pending calls fail, both tasks end.
    pub fn close(&self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            self.pending.lock().clear();
            self.on_close.notify_waiters();
        }
    }

    /// Resolves once the link is closed.
    pub async fn closed(&self) {
        let notified = self.on_close.notified();
        if self.is_closed() {
            return;
        }
        notified.await;
    }

    async fn send(&self, frame: &Frame) -> Result<(), CallError> {
        while self.backlog.load(Ordering::Acquire) > BACKLOG_MAX && !self.is_closed() {
            let drained = self.drained.notified();
            if self.backlog.load(Ordering::Acquire) <= BACKLOG_MAX {
                break;
            }
            tokio::select! {
                _ = drained => {}
                _ = self.closed() => {}
            }
        }
        self.queue(frame)
    }

    /// Queues a frame for the writer without waiting.
    fn queue(&self, frame: &Frame) -> Result<(), CallError> {
        let mut buf = Vec::new();
        wire::encode(frame, &mut buf)?;
        let len = buf.len();
        self.backlog.fetch_add(len, Ordering::AcqRel);
        if self.is_closed() || self.out.send(buf).is_err() {
            return Err(CallError::Closed(self.peer.clone()));
        }
        Ok(())
    }

    /// Sends a request now, in order with every other request started on this link (the
    /// peer's handler starts serving requests in the order they were sent), and returns
    /// where its answer will arrive; the receiver fails when the link closes. Refused when
    /// the link is closed or its backlog is over 64 MiB.
    pub fn start_call(&self, body: Vec<u8>) -> Result<oneshot::Receiver<Vec<u8>>, CallError> {
        if self.backlog.load(Ordering::Acquire) > BACKLOG_MAX {
            return Err(CallError::Congested(self.peer.clone()));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().insert(id, tx);
        if let Err(e) = self.queue(&Frame::Request { id, body }) {
            self.pending.lock().remove(&id);
            return Err(e);
        }
        Ok(rx)
    }

    /// Sends a request body and waits for the answer.
    pub async fn call(&self, body: Vec<u8>, timeout: Duration) -> Result<Vec<u8>, CallError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().insert(id, tx);
        let call = async {
            self.send(&Frame::Request { id, body }).await?;
            rx.await.map_err(|_| CallError::Closed(self.peer.clone()))
        };
        let result = match tokio::time::timeout(timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(CallError::Timeout(self.peer.clone(), timeout)),
        };
        self.pending.lock().remove(&id);
        if self.is_closed() && result.is_err() {
            return Err(CallError::Closed(self.peer.clone()));
        }
        result
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    link: Arc<Link>,
    mut w: W,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
) {
    let mut batch = Vec::new();
    loop {
        let first = tokio::select! {
            f = rx.recv() => f,
            _ = link.closed() => None,
        };
        let Some(first) = first else { break };
        batch.clear();
        batch.extend_from_slice(&first);
        while batch.len() < 1 << 20 {
            match rx.try_recv() {
                Ok(more) => batch.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        let write = async {
            w.write_all(&batch).await?;
            w.flush().await
        };
        let done = tokio::select! {
            r = write => r.is_ok(),
            _ = link.closed() => false,
        };
        link.backlog.fetch_sub(batch.len(), Ordering::AcqRel);
        link.drained.notify_waiters();
        if !done {
            break;
        }
    }
    link.close();
    let _ = w.shutdown().await;
}

async fn read_loop<R: AsyncRead + Unpin>(link: Arc<Link>, r: R, handler: Arc<dyn Handler>) {
    // Buffered: a frame's header and body (and often the next frames) in one read, not two
    // reads per frame plus the one that finds the socket empty.
    let mut r = tokio::io::BufReader::with_capacity(64 << 10, r);
    loop {
        let frame = tokio::select! {
            f = read_frame(&mut r) => f,
            _ = link.closed() => break,
        };
        match frame {
            Ok(Frame::Response { id, body }) => {
                if let Some(tx) = link.pending.lock().remove(&id) {
                    let _ = tx.send(body);
                }
            }
            Ok(Frame::Request { id, body }) => {
                let link = link.clone();
                let answer = handler.clone().handle(link.peer.clone(), body);
                tokio::spawn(async move {
                    let body = answer.await;
                    let _ = link.send(&Frame::Response { id, body }).await;
                });
            }
            Ok(other) => {
                tracing::warn!(peer = %link.peer, "unexpected inter-node frame {other:?}; closing the link");
                break;
            }
            Err(e) => {
                if e.kind() != std::io::ErrorKind::UnexpectedEof {
                    tracing::warn!(peer = %link.peer, "inter-node link failed: {e}");
                }
                break;
            }
        }
    }
    link.close();
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;
    impl Handler for Echo {
        fn handle(self: Arc<Self>, _from: String, body: Vec<u8>) -> Answer {
            Box::pin(async move {
                if body == b"slow" {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
                body.into_iter().rev().collect()
            })
        }
    }

    #[tokio::test]
    async fn calls_are_answered_both_ways_and_fail_when_the_link_closes() {
        let (x, y) = tokio::io::duplex(1 << 16);
        let a = Link::start(x, "b".into(), Arc::new(Echo));
        let b = Link::start(y, "a".into(), Arc::new(Echo));
        let t = Duration::from_secs(5);
        assert_eq!(a.call(b"abc".to_vec(), t).await.expect("a->b"), b"cba");
        assert_eq!(b.call(b"xy".to_vec(), t).await.expect("b->a"), b"yx");
        let short = Duration::from_millis(50);
        assert!(matches!(
            a.call(b"slow".to_vec(), short).await,
            Err(CallError::Timeout(..))
        ));
        let pending = tokio::spawn({
            let a = a.clone();
            async move { a.call(b"slow".to_vec(), t).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        b.close();
        assert!(matches!(
            pending.await.expect("join"),
            Err(CallError::Closed(_))
        ));
        a.closed().await;
        assert!(a.is_closed());
    }
}
