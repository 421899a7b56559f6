//! The node's metadata on disk: vhosts, users, permissions, policies, durable exchanges,
//! durable queues and the bindings between durable objects. Rewritten atomically (temporary
//! file, fsync, rename, fsync of the directory) after every change, before the client hears
//! that the change succeeded. Arguments are kept AMQP-encoded, so types survive exactly.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use amq_protocol::types::FieldTable;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

pub const FILE_NAME: &str = "metadata.json";

#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Snapshot {
    pub vhosts: Vec<String>,
    pub users: Vec<UserDef>,
    pub permissions: Vec<PermissionDef>,
    pub topic_permissions: Vec<TopicPermissionDef>,
    pub policies: Vec<PolicyDef>,
    pub exchanges: Vec<ExchangeDef>,
    pub queues: Vec<QueueDef>,
    pub bindings: Vec<BindingDef>,
    /// Runtime parameters (federation upstreams, shovels), as the management API takes them.
    #[serde(default)]
    pub parameters: Vec<ParameterDef>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct ParameterDef {
    pub component: String,
    pub vhost: String,
    pub name: String,
    pub value: serde_json::Value,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct UserDef {
    pub name: String,
    pub password_hash: String,
    pub tags: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct PermissionDef {
    pub user: String,
    pub vhost: String,
    pub configure: String,
    pub write: String,
    pub read: String,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct TopicPermissionDef {
    pub user: String,
    pub vhost: String,
    pub exchange: String,
    pub write: String,
    pub read: String,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct PolicyDef {
    pub vhost: String,
    pub name: String,
    pub operator: bool,
    /// The management API's body: pattern, definition, priority, apply-to.
    pub body: serde_json::Value,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct ExchangeDef {
    pub vhost: String,
    pub name: String,
    pub kind: String,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: String,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct QueueDef {
    pub vhost: String,
    pub name: String,
    pub auto_delete: bool,
    pub arguments: String,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct BindingDef {
    pub vhost: String,
    pub source: String,
    pub destination: String,
    pub destination_is_queue: bool,
    pub routing_key: String,
    pub arguments: String,
}

/// A field table as base64 of its AMQP encoding.
pub fn encode_table(t: &FieldTable) -> String {
    use amq_protocol::frame::WriteContext;
    match amq_protocol::types::generation::gen_field_table(t)(WriteContext::from(Vec::new())) {
        Ok(ctx) => B64.encode(ctx.into_inner().0),
        Err(_) => String::new(),
    }
}

pub fn decode_table(s: &str) -> Option<FieldTable> {
    let raw = B64.decode(s).ok()?;
    amq_protocol::types::parsing::parse_field_table(&raw[..])
        .ok()
        .map(|(_, t)| t)
}

pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE_NAME)
}

/// Writes the snapshot so that a crash leaves either the old or the new file, never a mix.
pub fn save(data_dir: &Path, snap: &Snapshot) -> std::io::Result<()> {
    fs::create_dir_all(data_dir)?;
    let tmp = data_dir.join(format!("{FILE_NAME}.tmp"));
    {
        let mut f = File::create(&tmp)?;
        let bytes = serde_json::to_vec_pretty(snap).map_err(std::io::Error::other)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path(data_dir))?;
    File::open(data_dir)?.sync_all()
}

/// Reads the saved snapshot; `None` on a fresh node.
pub fn load(data_dir: &Path) -> std::io::Result<Option<Snapshot>> {
    match fs::read(path(data_dir)) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::types::AMQPValue;

    #[test]
    fn round_trip_fresh_node_and_bad_file() {
        let dir = std::env::temp_dir().join(format!("warren-meta-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        assert!(load(&dir).unwrap().is_none());
        let mut t = FieldTable::default();
        t.insert("x-max-length".into(), AMQPValue::LongInt(5));
        let snap = Snapshot {
            vhosts: vec!["/".into()],
            queues: vec![QueueDef {
                vhost: "/".into(),
                name: "q".into(),
                auto_delete: false,
                arguments: encode_table(&t),
            }],
            ..Default::default()
        };
        save(&dir, &snap).unwrap();
        let back = load(&dir).unwrap().unwrap();
        assert_eq!(back, snap);
        assert_eq!(decode_table(&back.queues[0].arguments), Some(t));
        fs::write(path(&dir), b"{not json").unwrap();
        assert!(load(&dir).is_err());
    }
}
