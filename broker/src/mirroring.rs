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
//!
//! A replicated queue that such a policy placed follows it afterwards, as RabbitMQ's mirrors
//! do: its leader adds and removes members when the policy's `ha-mode`/`ha-params` change,
//! and keeps itself alone when the policy goes (an unmirrored queue). Every node also looks
//! again every 10 s ([`keep_following`]), so `ha-mode: all` reaches a node that joined later.

use std::collections::HashSet;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::broker::Broker;
use crate::definitions::{Change, ChangeError, QueueRecord};
use crate::queue::Queue;
use crate::queue::state::Settlement;
use crate::remote::{Answers, HaMode};
use crate::replicated::ReplicatedQueue;
use crate::store::metadata;
use crate::vhost::Vhost;

/// Messages moved per batch (one wait for the replicated queue's commit each).
const BATCH: usize = 256;

/// The queues a task runs for (`vhost`, `name`; `name` NUL `members` for a member change),
/// so that policy changes in a row start one each.
static CONVERTING: LazyLock<Mutex<HashSet<(String, String)>>> = LazyLock::new(Default::default);

/// A policy of `vhost` changed (applied on every node): this node proposes making each of
/// its classic queues that a policy's `ha-mode` now matches replicated, and makes the members
/// of each replicated queue it leads that such a policy placed what the policy now asks.
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
        if !eligible(&q) || HaMode::of(&v, &q.name).is_none() {
            continue;
        }
        let Some(key) = start((vhost.to_owned(), q.name.clone())) else {
            continue;
        };
        let me = me.clone();
        rt.spawn(async move {
            convert(&me, &key.0, &key.1).await;
            done(&key);
        });
    }
    let node = broker.node_name();
    for q in v.replicated_queues() {
        if !placed_by_policy(broker, &v, &q) || q.leader().as_deref() != Some(&node) {
            continue;
        }
        let Some(key) = start((vhost.to_owned(), format!("{}\0members", q.name))) else {
            continue;
        };
        let me = me.clone();
        rt.spawn(async move {
            follow_policy(&me, &q).await;
            done(&key);
        });
    }
}

/// How often each node looks again at the queues `ha-mode` policies match: a node that joined
/// (`all`) or came back since, a conversion that gave up while the cluster had no majority.
const FOLLOW_EVERY: Duration = Duration::from_secs(10);

/// Runs [`policy_changed`] every [`FOLLOW_EVERY`] for each vhost with an `ha-mode` policy, as
/// long as the node runs.
pub async fn keep_following(broker: std::sync::Weak<Broker>) {
    let mut tick = tokio::time::interval(FOLLOW_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(b) = broker.upgrade() else { return };
        for name in b.vhost_names() {
            let mirrored = b.vhost(&name).is_some_and(|v| {
                (v.policies(false).iter()).any(|p| p.definition.contains_key("ha-mode"))
            });
            if mirrored {
                policy_changed(&b, &name);
            }
        }
    }
}

/// Marks a task for `key` as running; None if one runs already.
fn start(key: (String, String)) -> Option<(String, String)> {
    CONVERTING.lock().insert(key.clone()).then_some(key)
}

fn done(key: &(String, String)) {
    CONVERTING.lock().remove(key);
}

/// A replicated queue whose members a policy's `ha-mode` decides: one declared
/// `x-queue-type: classic`, or without `x-queue-type` in a vhost whose default queue type is
/// not quorum (only such a policy makes it replicated). RabbitMQ's quorum queues ignore
/// `ha-*` keys; so do those here.
fn placed_by_policy(broker: &Broker, v: &Vhost, q: &ReplicatedQueue) -> bool {
    let declared_type = crate::queue::args::parse(&q.arguments, &q.name, &v.name)
        .ok()
        .and_then(|a| a.queue_type);
    match declared_type.as_deref() {
        Some("classic") => true,
        Some(_) => false,
        None => broker.vhost_metadata(&v.name).default_queue_type.as_deref() != Some("quorum"),
    }
}

/// The members to add and to remove for `ha`, given the current ones (the leader first) and
/// the running voters of the cluster (sorted): `all` adds every running voter; `exactly`
/// adds running voters by name up to `n`, or removes members beyond `n` (stopped ones first,
/// never the leader); `nodes` adds the running listed nodes and removes the members not
/// listed (unless none listed would be left); without a policy every member but the leader
/// goes (RabbitMQ's unmirrored queue). A member is never removed only because its node is
/// down: it catches up when it returns.
fn member_changes(
    ha: Option<&HaMode>,
    current: &[String],
    running: &[String],
) -> (Vec<String>, Vec<String>) {
    let joinable = || running.iter().filter(|m| !current.contains(m)).cloned();
    match ha {
        Some(HaMode::All) => (joinable().collect(), Vec::new()),
        Some(HaMode::Exactly(n)) => {
            let n = (*n).max(1);
            if current.len() <= n {
                return (joinable().take(n - current.len()).collect(), Vec::new());
            }
            let mut extra: Vec<String> = current.iter().skip(1).cloned().collect();
            extra.sort_by(|a, b| (running.contains(a), b).cmp(&(running.contains(b), a)));
            extra.truncate(current.len() - n);
            (Vec::new(), extra)
        }
        Some(HaMode::Nodes(names)) => {
            let add: Vec<String> = joinable().filter(|m| names.contains(m)).collect();
            let listed_left = !add.is_empty() || current.iter().any(|m| names.contains(m));
            let mut remove: Vec<String> = (current.iter())
                .filter(|m| listed_left && !names.contains(m))
                .cloned()
                .collect();
            // The leader last: it hands its leadership over before it goes.
            let leader_goes = remove.first() == current.first();
            remove.rotate_left(usize::from(leader_goes));
            (add, remove)
        }
        None => (Vec::new(), current.iter().skip(1).cloned().collect()),
    }
}

/// Adds and removes members of `q` (which this node leads) until they are what the policy
/// now asks (see [`member_changes`]); members are added before any is removed.
async fn follow_policy(broker: &Arc<Broker>, q: &Arc<ReplicatedQueue>) {
    let (Some(cluster), Some(v)) = (broker.cluster(), broker.vhost(&q.vhost)) else {
        return;
    };
    let me = broker.node_name();
    let mut running: Vec<String> = (cluster.metadata_voters().into_iter())
        .map(|(_, m)| m.name)
        .filter(|n| *n == me || cluster.is_running(n))
        .collect();
    running.sort();
    running.dedup();
    let mut current = q.members();
    // The leader first: it is the one kept without a policy.
    current.sort_by_key(|m| *m != me);
    let (add, remove) = member_changes(HaMode::of(&v, &q.name).as_ref(), &current, &running);
    for (node, member) in (add.iter().map(|m| (m, true))).chain(remove.iter().map(|m| (m, false))) {
        match q.set_member(node, member).await {
            Ok(()) => {
                tracing::info!(vhost = %q.vhost, queue = %q.name, %node, member, "members follow the policy's ha-mode")
            }
            Err(e) => {
                tracing::warn!(vhost = %q.vhost, queue = %q.name, %node, member, "members do not follow the policy's ha-mode: {e}")
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn members_follow_the_ha_mode_without_dropping_a_stopped_member() {
        let running = names(&["a", "b", "c"]);
        let all = HaMode::All;
        assert_eq!(
            member_changes(Some(&all), &names(&["b"]), &running),
            (names(&["a", "c"]), vec![])
        );
        // d is a member whose node is down: kept.
        assert_eq!(
            member_changes(Some(&all), &names(&["a", "d"]), &running),
            (names(&["b", "c"]), vec![])
        );
        let two = HaMode::Exactly(2);
        assert_eq!(
            member_changes(Some(&two), &names(&["a"]), &running),
            (names(&["b"]), vec![])
        );
        // Beyond 2: the stopped member goes first, the leader (first) never.
        assert_eq!(
            member_changes(Some(&two), &names(&["c", "a", "d", "b"]), &running),
            (vec![], names(&["d", "b"]))
        );
        assert_eq!(
            member_changes(Some(&HaMode::Exactly(0)), &names(&["a", "b"]), &running),
            (vec![], names(&["b"]))
        );
        let nodes = HaMode::Nodes(names(&["b", "c"]));
        assert_eq!(
            member_changes(Some(&nodes), &names(&["a", "b"]), &running),
            (names(&["c"]), names(&["a"]))
        );
        // None of the listed nodes runs nor is a member: unchanged.
        let elsewhere = HaMode::Nodes(names(&["x"]));
        assert_eq!(
            member_changes(Some(&elsewhere), &names(&["a", "b"]), &running),
            (vec![], vec![])
        );
        // No policy: the leader alone.
        assert_eq!(
            member_changes(None, &names(&["a", "b", "c"]), &running),
            (vec![], names(&["b", "c"]))
        );
    }
}
