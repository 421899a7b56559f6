//! A connection's outgoing byte buffer, shared by every task that writes to the connection.
//!
//! Queues append whole deliveries (method, header and body frames) under one lock, so frames
//! of one message are never interleaved with other frames of its channel. The writer task
//! takes everything buffered and writes it with one syscall. The buffer is bounded: queues stop
//! delivering to a connection whose buffer is above the high-water mark and register a
//! [`Wake`] to be called when it drains ([`Outbox::writable_or_wait`]); the reader stops
//! reading requests until replies drain ([`Outbox::wait_for_drain`]).
//!
//! The outbox knows nothing of queues: whoever waits registers a waker (a queue implements
//! [`Wake`] by trying to deliver again), so this module stays below the queue in the import
//! graph.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use bytes::BytesMut;
use parking_lot::{Mutex, MutexGuard};
use tokio::sync::Notify;

/// Something waiting for an outbox to drain below [`HIGH_WATER`]: a queue that stopped
/// delivering to this connection. Called from the writer task, with no lock held.
pub trait Wake: Send + Sync {
    fn wake(&self);
}

/// Above this many buffered bytes, queues stop delivering to the connection.
pub const HIGH_WATER: usize = 256 * 1024;

pub struct OutboxInner {
    pub buf: BytesMut,
    /// Registered by [`Outbox::writable_or_wait`], each once; woken and cleared on drain.
    waiting: Vec<Weak<dyn Wake>>,
}

pub struct Outbox {
    inner: Mutex<OutboxInner>,
    len: AtomicUsize,
    closed: AtomicBool,
    /// Wakes the writer.
    pub data: Notify,
    /// Wakes the reader when the buffer drained below the high-water mark.
    pub drained: Notify,
    /// Wakes whoever waits in [`Outbox::closed`].
    closed_notify: Notify,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox").field("len", &self.len()).finish()
    }
}

impl Default for Outbox {
    fn default() -> Self {
        Self {
            inner: Mutex::new(OutboxInner {
                buf: BytesMut::with_capacity(64 * 1024),
                waiting: Vec::new(),
            }),
            len: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            data: Notify::new(),
            drained: Notify::new(),
            closed_notify: Notify::new(),
        }
    }
}

/// Appending through this guard updates the length and wakes the writer on drop.
pub struct OutboxWriter<'a> {
    outbox: &'a Outbox,
    guard: MutexGuard<'a, OutboxInner>,
}

impl std::ops::Deref for OutboxWriter<'_> {
    type Target = BytesMut;
    fn deref(&self) -> &BytesMut {
        &self.guard.buf
    }
}

impl std::ops::DerefMut for OutboxWriter<'_> {
    fn deref_mut(&mut self) -> &mut BytesMut {
        &mut self.guard.buf
    }
}

impl Drop for OutboxWriter<'_> {
    fn drop(&mut self) {
        self.outbox
            .len
            .store(self.guard.buf.len(), Ordering::Release);
        self.outbox.data.notify_one();
    }
}

impl Outbox {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn writer(&self) -> OutboxWriter<'_> {
        OutboxWriter {
            outbox: self,
            guard: self.inner.lock(),
        }
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Marks the connection's output as finished: the writer flushes what is left and stops;
    /// if the writer closes it (the socket failed or accepted nothing for too long), the reader
    /// wakes through [`Outbox::closed`].
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.data.notify_one();
        self.closed_notify.notify_waiters();
    }

    /// Resolves once the outbox is closed.
    pub async fn closed(&self) {
        loop {
            let notified = self.closed_notify.notified();
            tokio::pin!(notified);
            // Registered before the check, so a close in between is not missed.
            notified.as_mut().enable();
            if self.is_closed() {
                return;
            }
            notified.await;
        }
    }

    /// True if a queue may deliver now; otherwise registers `waker` to be woken on drain.
    pub fn writable_or_wait(&self, waker: &Weak<dyn Wake>) -> bool {
        if self.len() < HIGH_WATER {
            return true;
        }
        let mut g = self.inner.lock();
        if g.buf.len() < HIGH_WATER {
            return true;
        }
        if !g.waiting.iter().any(|w| Weak::ptr_eq(w, waker)) {
            g.waiting.push(waker.clone());
        }
        false
    }

    /// Takes everything buffered (for the writer).
    pub fn take(&self) -> BytesMut {
        let mut g = self.inner.lock();
        let out = g.buf.split();
        self.len.store(0, Ordering::Release);
        out
    }

    /// Called by the writer after a write: wakes the reader and the queues that waited.
    pub fn after_write(&self) {
        if self.len() >= HIGH_WATER {
            return;
        }
        self.drained.notify_waiters();
        let waiting = std::mem::take(&mut self.inner.lock().waiting);
        for w in waiting {
            if let Some(w) = w.upgrade() {
                w.wake();
            }
        }
    }

    pub fn wait_for_drain(&self) -> impl std::future::Future<Output = ()> + '_ {
        self.drained.notified()
    }
}
