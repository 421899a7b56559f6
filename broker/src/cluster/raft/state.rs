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
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{Member, NodeId, Replicated, TypeConfig};

#[derive(Clone, Serialize, Deserialize)]
struct Stored {
    meta: SnapshotMeta<NodeId, Member>,
    data: String,
}

impl Stored {
    fn snapshot(&self) -> Snapshot<TypeConfig> {
        Snapshot {
            meta: self.meta.clone(),
            snapshot: Box::new(Cursor::new(self.data.clone().into_bytes())),
        }
    }
}

pub struct StateMachine {
    host: Arc<dyn Replicated>,
    applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, Member>,
    current: Arc<Mutex<Option<Stored>>>,
    path: PathBuf,
    /// The index of the last applied entry, for proposers waiting to read their write.
    applied_tx: watch::Sender<u64>,
}

fn save(path: &Path, stored: &Stored) -> std::io::Result<()> {
    let text = serde_json::to_string(stored).map_err(std::io::Error::other)?;
    crate::cluster::save(path, &text)
}

impl StateMachine {
    /// Opens the state machine in `dir`, installing the stored snapshot into the broker.
    pub fn open(
        dir: &Path,
        host: Arc<dyn Replicated>,
        applied_tx: watch::Sender<u64>,
    ) -> std::io::Result<StateMachine> {
        let path = dir.join("snapshot");
        let stored = match std::fs::read_to_string(&path) {
            Ok(text) => Some(serde_json::from_str::<Stored>(&text).map_err(|e| {
                std::io::Error::other(format!(
                    "metadata snapshot {} unreadable: {e}",
                    path.display()
                ))
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let mut sm = StateMachine {
            host,
            applied: None,
            membership: StoredMembership::default(),
            current: Arc::new(Mutex::new(None)),
            path,
            applied_tx,
        };
        if let Some(s) = stored {
            sm.host.install(&s.data).map_err(std::io::Error::other)?;
            sm.applied = s.meta.last_log_id;
            sm.membership = s.meta.last_membership.clone();
            sm.applied_tx
                .send_replace(s.meta.last_log_id.map_or(0, |l| l.index));
            *sm.current.lock() = Some(s);
        }
        Ok(sm)
    }
}

pub struct Builder {
    data: String,
    applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, Member>,
    current: Arc<Mutex<Option<Stored>>>,
    path: PathBuf,
}

impl RaftSnapshotBuilder<TypeConfig> for Builder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let index = self.applied.map_or(0, |l| l.index);
        let stored = Stored {
            meta: SnapshotMeta {
                last_log_id: self.applied,
                last_membership: self.membership.clone(),
                snapshot_id: format!("{index}-{:x}", rand::random::<u32>()),
            },
            data: std::mem::take(&mut self.data),
        };
        let (path, s) = (self.path.clone(), stored.clone());
        let written = tokio::task::spawn_blocking(move || save(&path, &s))
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r);
        if let Err(e) = written {
            return Err(StorageIOError::write_snapshot(Some(stored.meta.signature()), &e).into());
        }
        let snapshot = stored.snapshot();
        *self.current.lock() = Some(stored);
        Ok(snapshot)
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
            data: self.host.snapshot(),
            applied: self.applied,
            membership: self.membership.clone(),
            current: self.current.clone(),
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
        let (path, s) = (self.path.clone(), stored.clone());
        tokio::task::spawn_blocking(move || save(&path, &s))
            .await
            .map_err(|e| bad(e.to_string()))?
            .map_err(|e| bad(e.to_string()))?;
        self.applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        self.applied_tx
            .send_replace(meta.last_log_id.map_or(0, |l| l.index));
        *self.current.lock() = Some(stored);
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        Ok(self.current.lock().as_ref().map(Stored::snapshot))
    }
}
