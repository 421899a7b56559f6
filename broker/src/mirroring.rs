//! A policy's `ha-mode` applied to queues that exist already (RabbitMQ's mirrored classic
//! queues, which a policy mirrors whenever it comes to match them).
//!
//! A queue declared while such a policy matches it is replicated from the start
//! ([`Broker::replicas_for`]). For a durable classic queue that exists when the policy
//! arrives, its node (and only it) proposes [`Change::ReplicateQueue`]: one metadata change
//! after whose commit every node routes the queue's name to a new replicated queue (bindings
//! kept). The classic queue's consumers are cancelled (server-sent `basic.cancel`, as for a
//! deleted queue: they consume again and reach the replicated queue), and its node moves the
//! classic queue's messages over in batches, each committed by the replicated queue's
//! majority before it is removed from the classic queue; messages its consumers still hold
//! are moved once acked back or returned. So nothing is lost when the node dies during the
//! move: the classic queue stays in the node's store until it is empty and a restart resumes
//! the move (a batch whose commit was not confirmed may then arrive twice). Moved messages
//! come after the ones published since the change.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::broker::Broker;
use crate::definitions::{Change, ChangeError, QueueRecord};
use crate::queue::Queue;
use crate::queue::state::Settlement;
use crate::remote::Answers;
use crate::replicated::ReplicatedQueue;
use crate::store::metadata;
use crate::vhost::Vhost;

/// Messages moved per batch (one wait for the replicated queue's commit each).
const BATCH: usize = 256;

/// The queues a conversion task runs for (`vhost`, `name`), so that policy changes in a row
/// start one each.
static CONVERTING: Mutex<Option<HashSet<(String, String)>>> = Mutex::new(None);

/// A policy of `vhost` changed (applied on every node): this node proposes making each of
/// its classic queues that a policy's `ha-mode` now matches replicated.
pub fn policy_changed(broker: &Broker, vhost: &str) {
    let (Some(me), Some(v), Ok(rt)) = (
        broker.me.get().and_then(|w| w.upgrade()),
        broker.vhost(vhost),
        tokio::runtime::Handle::try_current(),
    ) else {
        return;
    };
    if broker.cluster().is_none() {
        return;
    }
    for q in v.queues() {
        if !eligible(&q) || crate::remote::HaMode::of(&v, &q.name).is_none() {
            continue;
        }
        let key = (vhost.to_owned(), q.name.clone());
        if !CONVERTING
            .lock()
            .get_or_insert_default()
            .insert(key.clone())
        {
            continue;
        }
        let me = me.clone();
        rt.spawn(async move {
            convert(&me, &key.0, &key.1).await;
            if let Some(set) = CONVERTING.lock().as_mut() {
                set.remove(&key);
            }
        });
    }
}

/// A classic queue a policy may make replicated (as at declare time: durable, neither
/// exclusive nor auto-delete).
fn eligible(q: &Queue) -> bool {
    q.durable && !q.auto_delete && q.exclusive_owner.is_none() && !q.is_retired()
}

/// Proposes replacing classic queue `vhost`/`name` of this node with a replicated one, as
/// long as a policy's `ha-mode` matches it, retrying while the cluster cannot commit.
async fn convert(broker: &Arc<Broker>, vhost: &str, name: &str) {
    for _ in 0..600 {
        let Some(v) = broker.vhost(vhost) else { return };
        let Some(q) = v.queue(name).filter(|q| eligible(q)) else {
            return;
        };
        let replicas = match broker.replicas_for(&v, name, true, false, false, &q.arguments) {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(%vhost, queue = %name, "not replicated yet: {}", e.text);
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let record = QueueRecord {
            vhost: vhost.to_owned(),
            name: name.to_owned(),
            durable: true,
            auto_delete: false,
            arguments: metadata::encode_table(&q.arguments),
            node: broker.node_name(),
            exclusive: false,
            replicas: Some(replicas),
        };
        match broker.change(Change::ReplicateQueue(record)).await {
            Ok(_) => {
                tracing::info!(%vhost, queue = %name, "a policy's ha-mode matches this classic queue: it is now replicated");
                return;
            }
            Err(ChangeError::Refused(e)) => {
                tracing::warn!(%vhost, queue = %name, "not made replicated: {e}");
                return;
            }
            Err(ChangeError::Unavailable(e)) => {
                tracing::debug!(%vhost, queue = %name, "not replicated yet: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Moves the messages of `classic` (replaced by `target` in `v`) into `target`, in the
/// background, then drops `classic` (see the module's documentation).
pub fn move_messages(v: Arc<Vhost>, classic: Arc<Queue>, target: Arc<ReplicatedQueue>) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    rt.spawn(async move {
        let moved = move_all(&v, &classic, &target).await;
        v.done_moving(&classic);
        tracing::info!(vhost = %v.name, queue = %classic.name, moved, "the classic queue's messages are in its replicated replacement");
    });
}

/// Moves batches until `classic` holds nothing (ready or unacknowledged) or `target` is no
/// longer the queue by that name (deleted). Returns how many messages were moved.
async fn move_all(v: &Vhost, classic: &Queue, target: &Arc<ReplicatedQueue>) -> u64 {
    let wake = Arc::new(Notify::new());
    let mut moved = 0u64;
    loop {
        let current = v
            .replicated_queue(&classic.name)
            .is_some_and(|q| Arc::ptr_eq(&q, target));
        if !current {
            return moved;
        }
        let mut batch = Vec::with_capacity(BATCH);
        while batch.len() < BATCH {
            match classic.get(false) {
                Some(m) => batch.push(m),
                None => break,
            }
        }
        if batch.is_empty() {
            let (ready, unacked, _) = classic.counts();
            if ready == 0 && unacked == 0 {
                return moved;
            }
            // Held by consumers cancelled by the change: moved once acked back or returned.
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        let answers = Answers::new(wake.clone());
        let all_sent = batch.iter().all(|m| target.publish(&m.msg, Some(&answers)));
        while !answers.done() {
            let _ = tokio::time::timeout(Duration::from_secs(1), wake.notified()).await;
        }
        let ids = batch.iter().map(|m| m.id).collect();
        if all_sent && !answers.refused() {
            moved += batch.len() as u64;
            classic.settle(ids, Settlement::Ack);
        } else {
            // Not committed (no majority, a new leader): put back and try again.
            classic.settle(ids, Settlement::Requeue);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}
