//! The requests nodes send each other over a [`super::link::Link`], and their answers.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    /// Heartbeat; answered with the node's status.
    Ping,
    /// `name` (in the given incarnation) has been removed from the cluster.
    Forget { name: String, incarnation: u64 },
    /// A call of the metadata group (the JSON of a [`super::raft::RaftCall`]).
    Raft(String),
    /// A call of the broker on the other node (a queue living there: publish, counts, purge),
    /// opaque to the cluster module; served in the order the link carried it.
    Broker(#[serde(with = "super::wire::as_bytes")] Vec<u8>),
    /// A call of a Raft group (the metadata group or a replicated queue's), postcard-encoded
    /// [`super::raft::Envelope`]: entries and snapshots travel as bytes, not escaped JSON.
    RaftBin(#[serde(with = "super::wire::as_bytes")] Vec<u8>),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Response {
    /// The node's status and the members it knows (`(name, address)`), so members learn of
    /// each other through any one of them.
    Pong {
        status: NodeStatus,
        members: Vec<(String, String)>,
        /// Nodes removed from the cluster, `(name, incarnation)`.
        forgotten: Vec<(String, u64)>,
    },
    Done,
    /// The answer to a [`Request::Raft`] (JSON).
    Raft(String),
    /// The answer to a [`Request::Broker`].
    Broker(#[serde(with = "super::wire::as_bytes")] Vec<u8>),
    /// The request could not be served, and why (shown to whoever asked).
    Error(String),
}

/// What `/api/nodes` shows of a node, as that node last reported it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub uptime_ms: u64,
    pub os_pid: u32,
    pub processors: u32,
    pub mem_used: Option<u64>,
    pub mem_limit: u64,
    pub disk_free: Option<u64>,
    pub disk_free_limit: u64,
    pub alarms: Vec<String>,
    pub being_drained: bool,
    /// `(protocol, ip, port)` of each listener.
    pub listeners: Vec<(String, String, u16)>,
}
