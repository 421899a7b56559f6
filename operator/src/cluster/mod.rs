//! The `RabbitCluster` controller: desired objects (pure builders) and the reconcile loop.

pub mod build;
pub mod config;
pub mod controller;
pub mod merge;
