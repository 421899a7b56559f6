//! Durable storage: the one place that knows about files.
//!
//! [`log`] holds persistent messages of durable queues; [`pages`] the bodies of other messages
//! paged out of memory (never synced, emptied at start-up); [`metadata`] the definitions;
//! [`frame`] the checksummed record framing the first two share.

pub mod frame;
pub mod log;
pub mod metadata;
pub mod pages;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// The mode of every file the node writes under its data directory: they hold password
/// hashes, message bodies and the cluster's definitions, for the node's user alone.
pub const FILE_MODE: u32 = 0o600;

/// Options that create a file with [`FILE_MODE`].
pub fn private_options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(FILE_MODE);
    o
}

/// Creates (or truncates) a file with [`FILE_MODE`]; a file left by an older version with a
/// wider mode is narrowed too.
pub fn create_private(path: &Path) -> std::io::Result<File> {
    let f = private_options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))?;
    Ok(f)
}

/// What is needed to rebuild a message read back from disk: the content header payload as the
/// publisher sent it (properties), the body, and where it was published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Content {
    pub exchange: String,
    pub routing_key: String,
    pub header_payload: Vec<u8>,
    pub body: Vec<u8>,
}
