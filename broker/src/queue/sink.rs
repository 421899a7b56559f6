//! The seam between a queue and the vhost that holds it: what leaves a queue upwards.
//!
//! A queue does not route. Its dead letters leave it as values ([`DeadLetter`]: the message
//! as it goes to the dead-letter exchange, with its `x-death`, and the routing keys), handed
//! to the [`DeadLetterSink`] its vhost installed when it created the queue; so does the
//! request to remove a queue whose `x-expires` passed. The vhost routes them; `queue/` imports
//! nothing of `vhost`. A replicated queue will hand the same values to the same trait from
//! wherever its leader runs.
//!
//! The queue calls the sink only after releasing its own lock, so queues that dead-letter
//! into each other cannot deadlock; and a persistent dead letter's remove record is held back
//! until the sink has returned (the target queues' enqueue records come first in the log).

use std::sync::Arc;

use super::state::Millis;
use crate::message::Message;

/// A dead-lettered message on its way to the dead-letter exchange.
#[derive(Debug)]
pub struct DeadLetter {
    /// The message to publish: the original with `x-death` and `x-first/last-death-*` added.
    pub msg: Arc<Message>,
    /// The routing keys to publish it with (the dead-letter routing key, or the original
    /// routing key and `CC` keys).
    pub routing_keys: Vec<String>,
}

/// Where a queue's dead letters and its own expiry go: the vhost holding it.
pub trait DeadLetterSink: Send + Sync {
    /// Routes `letter` through `exchange` to its target queues (skipping those that would close
    /// a dead-lettering cycle) and publishes it to them, synchronously. False if `exchange`
    /// does not exist (the letter is dropped).
    fn dead_letter(&self, exchange: &str, letter: DeadLetter, now: Millis) -> bool;

    /// `queue` expired (`x-expires` passed without consumers or use): remove it.
    fn queue_expired(&self, queue: &str);
}
