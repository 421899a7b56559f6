#![allow(clippy::unwrap_used)]
//! Federation links and shovels between real brokers: several Warren nodes in this process,
//! each on its own port with its own cluster name.
#[path = "../common/mod.rs"]
mod common;
#[path = "../common/node.rs"]
mod node;

mod federation;
mod harness;
mod process;
mod shovel;
mod tls;
