//! Clusters of real `warren-broker` processes, each in its own network namespace (see
//! `harness.rs`): membership, failure detection, partitions, restarts, the cluster secret.

mod harness;
mod membership;
