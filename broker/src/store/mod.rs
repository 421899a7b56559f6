//! Durable storage: the one place that knows about files.
//!
//! [`log`] holds persistent messages of durable queues; [`metadata`] the definitions.

pub mod log;
pub mod metadata;
