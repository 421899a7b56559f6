//! Moving messages from a source channel to a destination channel, settling each with the
//! source according to the ack mode. Shovels and federation links share it.
//!
//! Publishes are pipelined: each publish is handed to lapin at once (its frames are queued on
//! the destination connection in delivery order) and kept in an in-flight queue whose head is
//! awaited; acknowledgements to the source go out in batches (`multiple`). Memory is bounded:
//! at most `window` messages (the source prefetch) are in flight, and the source never delivers
//! more than its prefetch unacknowledged.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use lapin::options::{BasicAckOptions, BasicNackOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, FieldArray, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation};

use super::status::LinkStatus;

/// When the source message is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckMode {
    /// After the destination confirms it (publisher confirms on the destination channel).
    OnConfirm,
    /// After it is written to the destination connection.
    OnPublish,
    /// As soon as it is received. Warren consumes with manual acks and a prefetch and acks at
    /// once, rather than consuming in no-ack mode, so the source cannot push more than the
    /// prefetch into memory when the destination is slower.
    NoAck,
}

impl AckMode {
    pub fn parse(s: Option<&str>) -> Self {
        match s {
            Some("on-publish") => AckMode::OnPublish,
            Some("no-ack") => AckMode::NoAck,
            _ => AckMode::OnConfirm,
        }
    }
}

type PublishFuture = Pin<Box<dyn Future<Output = lapin::Result<Confirmation>> + Send>>;
type AckFuture = Pin<Box<dyn Future<Output = lapin::Result<()>> + Send>>;

/// Acks handed to lapin and not yet written, at most this many before the link waits for them.
const MAX_ACKS_IN_FLIGHT: usize = 256;

struct InFlight {
    /// The source delivery tag.
    tag: u64,
    publish: PublishFuture,
    /// Not published: acknowledged in its turn, not counted as forwarded.
    dropped: bool,
}

/// What settling the oldest in-flight message did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    /// Messages the destination took (acked to the source, or already acked in no-ack mode).
    pub forwarded: u64,
    /// Messages the destination refused (nacked back to the source, requeued).
    pub refused: u64,
}

/// Polls a future once: its first poll is what hands a publish's frames to lapin.
async fn poll_once<F: Future + Unpin>(f: &mut F) -> Option<F::Output> {
    std::future::poll_fn(|cx| {
        std::task::Poll::Ready(match Pin::new(&mut *f).poll(cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        })
    })
    .await
}

pub struct Forwarder {
    pub src: Channel,
    pub dest: Channel,
    pub mode: AckMode,
    status: Arc<LinkStatus>,
    in_flight: VecDeque<InFlight>,
    /// Source tags settled but not yet acknowledged (sent as one `multiple` ack).
    ack_upto: Option<u64>,
    /// Acks and nacks handed to lapin, awaited later so a link never waits for each write.
    acks: VecDeque<AckFuture>,
}

impl Forwarder {
    pub fn new(src: Channel, dest: Channel, mode: AckMode, status: Arc<LinkStatus>) -> Self {
        Self {
            src,
            dest,
            mode,
            status,
            in_flight: VecDeque::new(),
            ack_upto: None,
            acks: VecDeque::new(),
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// A message arrived from the source.
    pub fn received(&mut self) {
        self.status.pending.fetch_add(1, Ordering::Relaxed);
    }

    /// Publishes a received message; returns once lapin has it queued (not written).
    pub async fn forward(
        &mut self,
        tag: u64,
        exchange: ShortString,
        routing_key: ShortString,
        body: Vec<u8>,
        properties: BasicProperties,
    ) -> lapin::Result<()> {
        if self.mode == AckMode::NoAck {
            // Acknowledged on receipt (before publishing): a failure now loses it, as in
            // RabbitMQ's no-ack mode.
            self.ack_upto = Some(tag);
            self.flush_acks().await?;
            self.status.pending.fetch_sub(1, Ordering::Relaxed);
        }
        let dest = self.dest.clone();
        let mut publish: PublishFuture = Box::pin(async move {
            dest.basic_publish(
                exchange,
                routing_key,
                BasicPublishOptions::default(),
                &body,
                properties,
            )
            .await?
            .await
        });
        if let Some(done) = poll_once(&mut publish).await {
            let ready: PublishFuture = Box::pin(std::future::ready(done));
            publish = ready;
        }
        self.in_flight.push_back(InFlight {
            tag,
            publish,
            dropped: false,
        });
        Ok(())
    }

    /// Acknowledges a received message without forwarding it (filtered out by federation's
    /// loop prevention). It counts as settled, not as forwarded.
    pub async fn drop_message(&mut self, tag: u64) -> lapin::Result<()> {
        if self.in_flight.is_empty() || self.mode == AckMode::NoAck {
            self.ack_upto = Some(tag);
            self.status.pending.fetch_sub(1, Ordering::Relaxed);
            self.flush_acks().await
        } else {
            // Keep acks in order: settle it behind what is in flight.
            self.in_flight.push_back(InFlight {
                tag,
                publish: Box::pin(std::future::ready(Ok(Confirmation::NotRequested))),
                dropped: true,
            });
            Ok(())
        }
    }

    /// Waits for the oldest in-flight publish to complete and settles it with the source, then
    /// settles every following one that is already complete. Pending forever when nothing is
    /// in flight.
    pub async fn settle_next(&mut self) -> lapin::Result<Settled> {
        let Some(head) = self.in_flight.front_mut() else {
            return std::future::pending().await;
        };
        let first = (&mut head.publish).await;
        let mut settled = Settled::default();
        let mut r = self.settle_head(first, &mut settled).await;
        while r.is_ok()
            && let Some(head) = self.in_flight.front_mut()
        {
            match poll_once(&mut head.publish).await {
                Some(x) => r = self.settle_head(x, &mut settled).await,
                None => break,
            }
        }
        // Acknowledge what the destination took even when the rest failed: the source must
        // not send those again.
        let flushed = self.flush_acks().await;
        self.status
            .forwarded
            .fetch_add(settled.forwarded, Ordering::Relaxed);
        r?;
        flushed?;
        Ok(settled)
    }

    /// After a failure: settles every in-flight message the destination already confirmed (its
    /// confirm arrived before the failure) and waits briefly for the acknowledgements to be
    /// written, so a session that ends does not leave the source to redeliver what the
    /// destination kept.
    pub async fn salvage(&mut self) {
        let mut settled = Settled::default();
        while let Some(head) = self.in_flight.front_mut() {
            match poll_once(&mut head.publish).await {
                Some(Ok(c)) if !c.is_nack() || self.mode == AckMode::NoAck => {
                    if self.settle_head(Ok(c), &mut settled).await.is_err() {
                        break;
                    }
                }
                _ => break,
            }
        }
        self.status
            .forwarded
            .fetch_add(settled.forwarded, Ordering::Relaxed);
        let _ = self.flush_acks().await;
        let acks = std::mem::take(&mut self.acks);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async move {
            for a in acks {
                let _ = a.await;
            }
        })
        .await;
    }

    async fn settle_head(
        &mut self,
        r: lapin::Result<Confirmation>,
        settled: &mut Settled,
    ) -> lapin::Result<()> {
        let Some(head) = self.in_flight.pop_front() else {
            return Ok(());
        };
        let confirmation = r?;
        if head.dropped {
            self.status.pending.fetch_sub(1, Ordering::Relaxed);
            self.ack_upto = Some(head.tag);
            return Ok(());
        }
        if self.mode == AckMode::NoAck {
            settled.forwarded += 1;
            return Ok(());
        }
        self.status.pending.fetch_sub(1, Ordering::Relaxed);
        if confirmation.is_nack() {
            self.flush_acks().await?;
            let src = self.src.clone();
            let tag = head.tag;
            self.send(Box::pin(async move {
                src.basic_nack(
                    tag,
                    BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    },
                )
                .await
            }))
            .await?;
            settled.refused += 1;
        } else {
            self.ack_upto = Some(head.tag);
            settled.forwarded += 1;
        }
        Ok(())
    }

    async fn flush_acks(&mut self) -> lapin::Result<()> {
        if let Some(tag) = self.ack_upto.take() {
            let src = self.src.clone();
            self.send(Box::pin(async move {
                src.basic_ack(tag, BasicAckOptions { multiple: true }).await
            }))
            .await?;
        }
        Ok(())
    }

    /// Hands an ack or nack to lapin; reaps the ones already written (reporting their errors)
    /// and waits for the oldest when too many are outstanding.
    async fn send(&mut self, mut ack: AckFuture) -> lapin::Result<()> {
        if poll_once(&mut ack).await.transpose()?.is_none() {
            self.acks.push_back(ack);
        }
        loop {
            let too_many = self.acks.len() > MAX_ACKS_IN_FLIGHT;
            let Some(head) = self.acks.front_mut() else {
                break;
            };
            let done = if too_many {
                Some(head.await)
            } else {
                poll_once(head).await
            };
            match done {
                Some(r) => {
                    self.acks.pop_front();
                    r?;
                }
                None => break,
            }
        }
        Ok(())
    }

    /// Settles everything in flight and waits for every ack to be written (before a clean
    /// stop).
    pub async fn drain(&mut self) -> lapin::Result<u64> {
        let mut n = 0;
        while !self.in_flight.is_empty() {
            n += self.settle_next().await?.forwarded;
        }
        self.flush_acks().await?;
        while let Some(ack) = self.acks.pop_front() {
            ack.await?;
        }
        Ok(n)
    }
}

/// Puts `entry` first in the array header `name` (RabbitMQ's `prepend_table_header`). A header
/// of that name that is not an array is replaced.
pub fn prepend_table_header(headers: &mut FieldTable, name: &str, entry: FieldTable) {
    let mut list = vec![AMQPValue::FieldTable(entry)];
    if let Some(AMQPValue::FieldArray(old)) = headers.inner().get(name) {
        list.extend(old.as_slice().iter().cloned());
    }
    headers.insert(name.into(), AMQPValue::FieldArray(FieldArray::from(list)));
}

/// A long string table value.
pub fn longstr(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.into())
}
