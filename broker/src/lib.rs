//! Warren broker node: a RabbitMQ-compatible AMQP 0-9-1 broker.
//!
//! Map (see ARCHITECTURE.md): [`codec`] frames bytes; [`connection`] runs the handshake and a
//! connection's reader/writer; [`channel`] handles methods; [`vhost`] holds exchanges, queues
//! and bindings and routes; [`exchange`] matches bindings; [`queue::state`] is the queue state
//! machine and [`queue`] its runtime; [`auth`] users and permissions; [`broker`] the node;
//! [`links`] runs federation links and shovels.

pub mod auth;
pub mod broker;
pub mod channel;
pub mod cluster;
pub mod codec;
pub mod config;
pub mod connection;
pub mod dead_letter;
pub mod definitions;
pub mod error;
pub mod exchange;
#[doc(hidden)]
pub mod fuzzing;
pub mod https;
pub mod limits;
pub mod links;
pub mod management;
pub mod message;
pub mod metrics;
pub mod mirroring;
pub mod outbox;
pub mod paging;
pub mod parameters;
pub mod persistence;
pub mod policy;
pub mod probe;
pub mod queue;
pub mod registry;
pub mod remote;
pub mod replicated;
pub mod resources;
pub mod server;
pub mod store;
pub mod tls;
pub mod vhost;

pub use broker::Broker;
pub use config::Config;
