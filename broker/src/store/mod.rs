//! Durable storage: the one place that knows about files.
//!
//! [`log`] holds persistent messages of durable queues; [`pages`] the bodies of other messages
//! paged out of memory (never synced, emptied at start-up); [`metadata`] the definitions;
//! [`frame`] the checksummed record framing the first two share.

pub mod frame;
pub mod log;
pub mod metadata;
pub mod pages;

/// What is needed to rebuild a message read back from disk: the content header payload as the
/// publisher sent it (properties), the body, and where it was published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Content {
    pub exchange: String,
    pub routing_key: String,
    pub header_payload: Vec<u8>,
    pub body: Vec<u8>,
}
