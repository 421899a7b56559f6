//! Paging: the node-wide budget for message bodies held in memory, and the way queues move
//! bodies to disk and back.
//!
//! Every queue reports the bytes of the bodies it holds in memory ([`Paging::account`]); the
//! sum is held against the budget (`message-memory-budget`). A queue that finds the node over
//! budget pages out its own least-soon-needed messages (the back of the queue, unacked ones
//! first) down to a window at its head; if the node is still over, the pager task asks the
//! queues holding the most to do the same. A paged message keeps its place in the queue (the
//! state machine holds its size and flags), only its content goes: a persistent message of a
//! durable queue is already in the message log and is simply dropped from memory; anything
//! else is first written to a page file. Queues read bodies back in batches ahead of their
//! consumers ([`Paging::read`]).
//!
//! The budget covers message bodies only: per-message bookkeeping (a few dozen bytes), the
//! properties of messages still in memory, connection buffers and the allocator's own overhead
//! come on top, which is why the default budget is half the memory high watermark.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;

use crate::broker::Broker;
use crate::message::Message;
use crate::store::Content;
use crate::store::log::MessageLog;
use crate::store::pages::{PageLoc, PageStore};

/// Where a paged-out message's content is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageRef {
    /// In the message log (a persistent message of a durable queue), by its log id.
    Log(u64),
    /// In a page file.
    Page(PageLoc),
}

pub struct Paging {
    budget: u64,
    /// Bytes of bodies queues hold in memory now.
    resident: AtomicU64,
    pages: PageStore,
    log: Option<Arc<MessageLog>>,
    /// Wakes the pager task.
    wake: Notify,
    /// Bytes written to page files and read back from disk, for operators and tests.
    pub paged_out_bytes: AtomicU64,
    pub paged_in_bytes: AtomicU64,
}

impl std::fmt::Debug for Paging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Paging")
            .field("budget", &self.budget)
            .field("resident", &self.resident())
            .finish()
    }
}

impl Paging {
    /// Paging with `budget` bytes of bodies in memory, page files under `pages_dir` (emptied
    /// now) and persistent messages read back from `log`.
    pub fn open(
        budget: u64,
        pages_dir: &std::path::Path,
        log: Option<Arc<MessageLog>>,
    ) -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            budget,
            resident: AtomicU64::new(0),
            pages: PageStore::open(pages_dir)?,
            log,
            wake: Notify::new(),
            paged_out_bytes: AtomicU64::new(0),
            paged_in_bytes: AtomicU64::new(0),
        }))
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Bytes of message bodies held in memory by every queue of the node.
    pub fn resident(&self) -> u64 {
        self.resident.load(Ordering::Relaxed)
    }

    pub fn over_budget(&self) -> bool {
        self.resident() > self.budget
    }

    /// Paging out stops once resident bytes are back under this (a margin below the budget,
    /// so a queue pages out a batch at a time rather than one message per publish).
    pub fn target(&self) -> u64 {
        self.budget - self.budget / 8
    }

    /// How many bytes a queue reads back at once, and keeps in memory at its head: 1/16 of the
    /// budget, between 64 KiB and 4 MiB.
    pub fn batch_bytes(&self) -> u64 {
        (self.budget / 16).clamp(64 * 1024, 4 * 1024 * 1024)
    }

    /// A queue's resident bytes went from `before` to `after`.
    pub fn account(&self, before: u64, after: u64) {
        if after > before {
            self.resident.fetch_add(after - before, Ordering::Relaxed);
        } else if before > after {
            let d = before - after;
            let _ = self
                .resident
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| {
                    Some(r.saturating_sub(d))
                });
        }
    }

    /// Asks the pager task to look at every queue.
    pub fn wake_pager(&self) {
        self.wake.notify_one();
    }

    /// Writes messages without a copy in the log to a page file.
    pub fn write(&self, msgs: &[&Message]) -> std::io::Result<Vec<PageRef>> {
        let items: Vec<(&str, &str, &[u8], &[u8])> = msgs
            .iter()
            .map(|m| {
                (
                    m.exchange.as_str(),
                    m.routing_key.as_str(),
                    &m.header_payload[..],
                    &m.body[..],
                )
            })
            .collect();
        let locs = self.pages.write(&items)?;
        self.paged_out_bytes.fetch_add(
            msgs.iter().map(|m| m.body.len() as u64).sum(),
            Ordering::Relaxed,
        );
        Ok(locs.into_iter().map(PageRef::Page).collect())
    }

    /// Reads paged messages back, in the order given (blocking file I/O: call it off the async
    /// runtime's threads, or in small amounts).
    pub fn read(&self, refs: &[PageRef]) -> Vec<std::io::Result<Arc<Message>>> {
        let mut out: Vec<Option<std::io::Result<Arc<Message>>>> =
            refs.iter().map(|_| None).collect();
        let (mut sids, mut sid_at) = (Vec::new(), Vec::new());
        let (mut locs, mut loc_at) = (Vec::new(), Vec::new());
        for (i, r) in refs.iter().enumerate() {
            match r {
                PageRef::Log(sid) => {
                    sids.push(*sid);
                    sid_at.push(i);
                }
                PageRef::Page(l) => {
                    locs.push(*l);
                    loc_at.push(i);
                }
            }
        }
        if !sids.is_empty() {
            match &self.log {
                Some(log) => {
                    for (i, c) in sid_at.into_iter().zip(log.read(&sids)) {
                        out[i] = Some(c.and_then(|c| self.message(c)));
                    }
                }
                None => {
                    for i in sid_at {
                        out[i] = Some(Err(std::io::Error::other("no message log")));
                    }
                }
            }
        }
        for (i, c) in loc_at.into_iter().zip(self.pages.read(&locs)) {
            out[i] = Some(c.and_then(|c| self.message(c)));
        }
        out.into_iter()
            .map(|o| o.unwrap_or_else(|| Err(std::io::ErrorKind::NotFound.into())))
            .collect()
    }

    fn message(&self, c: Content) -> std::io::Result<Arc<Message>> {
        let header = crate::codec::decode_header(&c.header_payload).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("unreadable message properties: {}", e.text),
            )
        })?;
        self.paged_in_bytes
            .fetch_add(c.body.len() as u64, Ordering::Relaxed);
        Ok(Arc::new(Message::with_header_payload(
            c.exchange,
            c.routing_key,
            header.properties,
            Bytes::from(c.header_payload),
            Bytes::from(c.body),
        )))
    }

    /// The message behind `r` has left its queue for good: its page file space may go. (A
    /// log message's removal is the queue's remove record.)
    pub fn release(&self, r: PageRef) {
        if let PageRef::Page(l) = r {
            self.pages.release(l);
        }
    }

    /// Page files on disk now.
    pub fn page_files(&self) -> usize {
        self.pages.files()
    }
}

/// The pager: whenever the node is over its budget after a queue paged out what it could of
/// its own, the queues holding the most bodies in memory page out theirs. Also checks once a
/// second, for memory that grew without a publish (messages requeued, read back).
pub async fn run_pager(broker: Weak<Broker>, paging: Arc<Paging>) {
    loop {
        let _ = tokio::time::timeout(Duration::from_secs(1), paging.wake.notified()).await;
        if !paging.over_budget() {
            continue;
        }
        let Some(b) = broker.upgrade() else { return };
        let mut queues: Vec<_> = b
            .vhost_names()
            .iter()
            .filter_map(|n| b.vhost(n))
            .flat_map(|v| v.queues())
            .map(|q| (q.resident_bytes(), q))
            .filter(|(r, _)| *r > 0)
            .collect();
        drop(b);
        queues.sort_by_key(|(r, _)| std::cmp::Reverse(*r));
        let paging = paging.clone();
        // Page file writes: off the async threads.
        let _ = tokio::task::spawn_blocking(move || {
            for (_, q) in queues {
                if paging.resident() <= paging.target() {
                    break;
                }
                q.page_out_for_node();
            }
        })
        .await;
    }
}
