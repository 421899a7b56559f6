//! The metadata group's state machine: committed commands handed to the broker (through the
//! [`Replicated`] seam, so no openraft type reaches it), in log order, on every node.
//!
//! The broker's definitions are the state; a snapshot is the broker's export of them, kept in
//! `<data-dir>/cluster/raft/snapshot` beside the log. At startup the snapshot (if any) is
//! installed and openraft re-applies the committed entries after it: commands are
//! idempotent ("user U now has hash H"), so applying one twice changes nothing.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::{
    Entry, EntryPayload, LogId, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{Member, NodeId, Replicated, TypeConfig};

#[derive(Clone, Serialize, Deserialize)]
struct Stored {
    meta: SnapshotMeta<NodeId, Member>,
    data: String,
}

impl Stored {
    fn into_snapshot(self) -> Snapshot<TypeConfig> {
        Snapshot {
            meta: self.meta,
            snapshot: Box::new(Cursor::new(self.data.into_bytes())),
        }
    }
}

pub struct StateMachine {
    host: Arc<dyn Replicated>,
    applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, Member>,
    /// The current snapshot is the file: it is read when a follower needs it, not kept in
    /// memory (a replicated queue's holds every message waiting).
    path: PathBuf,
    /// The index of the last applied entry, for proposers waiting to read their write.
    applied_tx: watch::Sender<u64>,
}

/// First line of a snapshot file: then a line of the meta's JSON, then the data as is.
/// (Earlier versions wrote one JSON object with the data as an escaped string in it: a second
/// copy of a large state, escaped, to build and to parse; still read.)
const FORMAT: &str = "warren-snapshot-2\n";

fn save(path: &Path, stored: &Stored) -> std::io::Result<()> {
    let meta = serde_json::to_string(&stored.meta).map_err(std::io::Error::other)?;
    crate::cluster::save_parts(
        path,
        &[
            FORMAT.as_bytes(),
            meta.as_bytes(),
            b"\n",
            stored.data.as_bytes(),
        ],
    )
}

/// The snapshot stored at `path`, if any.
fn load(path: &Path) -> std::io::Result<Option<Stored>> {
    let unreadable =
        |e: String| std::io::Error::other(format!("snapshot {} unreadable: {e}", path.display()));
    let mut text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let Some(rest) = text.strip_prefix(FORMAT) else {
        return serde_json::from_str::<Stored>(&text)
            .map(Some)
            .map_err(|e| unreadable(e.to_string()));
    };
    let Some(eol) = rest.find('\n') else {
        return Err(unreadable("no line after the meta".into()));
    };
    let meta = serde_json::from_str(&rest[..eol]).map_err(|e| unreadable(e.to_string()))?;
    // The data is the rest of the file, kept in the same buffer (no second copy).
    text.drain(..FORMAT.len() + eol + 1);
    Ok(Some(Stored { meta, data: text }))
}

impl StateMachine {
    /// Opens the state machine in `dir`, installing the stored snapshot into the broker.
    pub fn open(
        dir: &Path,
        host: Arc<dyn Replicated>,
        applied_tx: watch::Sender<u64>,
    ) -> std::io::Result<StateMachine> {
        let path = dir.join("snapshot");
        let stored = load(&path)?;
        let mut sm = StateMachine {
            host,
            applied: None,
            membership: StoredMembership::default(),
            path,
            applied_tx,
        };
        if let Some(s) = stored {
            sm.host.install(&s.data).map_err(std::io::Error::other)?;
            sm.applied = s.meta.last_log_id;
            sm.membership = s.meta.last_membership.clone();
            sm.applied_tx
                .send_replace(s.meta.last_log_id.map_or(0, |l| l.index));
        }
        Ok(sm)
    }
}

pub struct Builder {
    /// Encodes the state as it was when the builder was made.
    encode: Option<Box<dyn FnOnce() -> String + Send + Sync>>,
    applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, Member>,
    path: PathBuf,
}

impl RaftSnapshotBuilder<TypeConfig> for Builder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let index = self.applied.map_or(0, |l| l.index);
        let meta = SnapshotMeta {
            last_log_id: self.applied,
            last_membership: self.membership.clone(),
            snapshot_id: format!("{index}-{:x}", rand::random::<u32>()),
        };
        let encode = self.encode.take();
        let (path, m) = (self.path.clone(), meta.clone());
        // Encoding and writing run beside the applies (the state was copied in log order).
        let written = tokio::task::spawn_blocking(move || {
            let stored = Stored {
                meta: m,
                data: encode.map(|f| f()).unwrap_or_default(),
            };
            save(&path, &stored).map(|()| stored)
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r);
        match written {
            Ok(stored) => Ok(stored.into_snapshot()),
            Err(e) => Err(StorageIOError::write_snapshot(Some(meta.signature()), &e).into()),
        }
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Builder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, Member>), StorageError<NodeId>>
    {
        Ok((self.applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<String>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + openraft::OptionalSend,
        I::IntoIter: openraft::OptionalSend,
    {
        let mut out = Vec::new();
        for e in entries {
            self.applied = Some(e.log_id);
            out.push(match e.payload {
                EntryPayload::Blank => String::new(),
                EntryPayload::Normal(command) => self.host.apply(&command.0),
                EntryPayload::Membership(m) => {
                    self.membership = StoredMembership::new(Some(e.log_id), m);
                    String::new()
                }
            });
        }
        if let Some(l) = self.applied {
            self.applied_tx.send_replace(l.index);
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        // Taken here, in log order with `apply`: the builder runs concurrently with it.
        Builder {
            encode: Some(self.host.snapshot()),
            applied: self.applied,
            membership: self.membership.clone(),
            path: self.path.clone(),
        }
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Member>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let bad = |e: String| -> StorageError<NodeId> {
            StorageIOError::read_snapshot(Some(meta.signature()), &std::io::Error::other(e)).into()
        };
        let data = String::from_utf8(snapshot.into_inner()).map_err(|e| bad(e.to_string()))?;
        self.host.install(&data).map_err(bad)?;
        let stored = Stored {
            meta: meta.clone(),
            data,
        };
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || save(&path, &stored))
            .await
            .map_err(|e| bad(e.to_string()))?
            .map_err(|e| bad(e.to_string()))?;
        self.applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        self.applied_tx
            .send_replace(meta.last_log_id.map_or(0, |l| l.index));
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || load(&path))
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r)
            .map(|s| s.map(Stored::into_snapshot))
            .map_err(|e| StorageIOError::read_snapshot(None, &e).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_file_is_read_back_in_either_format() {
        let dir = std::env::temp_dir().join(format!("warren-snap-{}", rand::random::<u64>()));
        let path = dir.join("snapshot");
        assert!(load(&path).expect("no file is no snapshot").is_none());
        let stored = Stored {
            meta: SnapshotMeta {
                last_log_id: Some(LogId::new(openraft::CommittedLeaderId::new(2, 1), 42)),
                last_membership: StoredMembership::default(),
                snapshot_id: "42-x".into(),
            },
            data: "{\"ready\":\"line one\\nline \\\"two\\\"\"}\n".into(),
        };
        save(&path, &stored).expect("save");
        let back = load(&path).expect("load").expect("a snapshot");
        assert_eq!(back.meta, stored.meta);
        assert_eq!(back.data, stored.data);
        // What earlier versions wrote: one JSON object.
        crate::cluster::save(&path, &serde_json::to_string(&stored).expect("json")).expect("save");
        let old = load(&path).expect("load").expect("a snapshot");
        assert_eq!((old.meta, old.data), (stored.meta, stored.data));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
