//! Clusters of real `warren-broker` processes, each in its own network namespace (see
//! `harness.rs`): membership, failure detection, partitions, restarts, the cluster secret,
//! and the definitions replicated through the metadata group.

mod harness;
mod jepsen;
mod membership;
mod metadata;
mod queues;
mod replicated;
mod tls;
