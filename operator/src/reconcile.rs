//! What every controller of the operator shares: the [`Context`] its reconciles get (the
//! Kubernetes client, the Event recorder, metrics, the operator's settings, per-object
//! failure counts for backoff) and the [`Error`] they return.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use kube::runtime::events::{Recorder, Reporter};
use parking_lot::Mutex;

use crate::metrics::Metrics;
use crate::security::Security;

/// The operator's settings the controllers act on (its command-line flags).
#[derive(Clone, Debug)]
pub struct Settings {
    /// Identity of this replica in Events (its pod name).
    pub instance: Option<String>,
    /// The broker image of clusters without `spec.image` (`--broker-image`).
    pub broker_image: String,
    /// What the operator allows (`--allow-*` flags).
    pub security: Security,
    /// Pods are reached at their IPs, not their DNS names (`--reach-pods-by-ip`).
    pub reach_pods_by_ip: bool,
    /// Periodic re-check of each topology resource against its broker (drift correction).
    pub topology_resync: Duration,
}

/// Shared state of the controllers.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Metrics,
    /// The broker image of clusters without `spec.image` (`--broker-image`).
    pub broker_image: String,
    /// What the operator allows a cluster's spec and annotations (`--allow-*` flags).
    pub security: Security,
    /// Pods are reached at their IPs, not their DNS names (`--reach-pods-by-ip`).
    pub reach_pods_by_ip: bool,
    /// Periodic re-apply interval of topology resources (drift correction).
    pub resync: Duration,
    /// Consecutive failures per object (`<controller>/<namespace>/<name>`), for backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    pub fn new(client: Client, metrics: Metrics, settings: Settings) -> Arc<Self> {
        let reporter = Reporter {
            controller: "warren-operator".into(),
            instance: settings.instance,
        };
        Arc::new(Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            broker_image: settings.broker_image,
            security: settings.security,
            reach_pods_by_ip: settings.reach_pods_by_ip,
            resync: settings.topology_resync,
            failures: Mutex::new(HashMap::new()),
        })
    }

    /// Records a failed reconcile of `key` and returns (attempt, delay before the next):
    /// `first`, doubling with each consecutive failure, at most `cap`. An unreachable broker
    /// or API server is retried, not hammered.
    pub fn failed(&self, key: &str, first: Duration, cap: Duration) -> (u32, Duration) {
        let attempt = {
            let mut f = self.failures.lock();
            let n = f.entry(key.to_string()).or_insert(0);
            *n = n.saturating_add(1);
            *n
        };
        (attempt, backoff(attempt, first, cap))
    }

    /// A successful reconcile of `key`: the next failure starts the backoff again.
    pub fn succeeded(&self, key: &str) {
        self.failures.lock().remove(key);
    }
}

/// `first` × 2^(attempt-1), at most `cap`.
fn backoff(attempt: u32, first: Duration, cap: Duration) -> Duration {
    first
        .saturating_mul(1u32 << attempt.clamp(1, 16).saturating_sub(1))
        .min(cap)
}

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The spec cannot be applied as it is (a RabbitCluster).
    #[error("{0}")]
    Spec(String),
    /// Draining a node before a scale-down failed.
    #[error("{0}")]
    Drain(String),
    /// The broker (or finding it) failed; the message is for the Ready condition.
    #[error("{message}")]
    NotReady {
        reason: &'static str,
        message: String,
    },
    #[error("finalizer: {0}")]
    Finalizer(String),
}

impl Error {
    /// The `error` label of `warren_operator_reconcile_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Spec(_) => "spec",
            Error::Drain(_) => "drain",
            Error::NotReady { reason, .. } => reason,
            Error::Finalizer(_) => "finalizer",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let (s, cap) = (Duration::from_secs(2), Duration::from_secs(300));
        let delays: Vec<u64> = (1..=10).map(|n| backoff(n, s, cap).as_secs()).collect();
        assert_eq!(delays, [2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(backoff(u32::MAX, s, cap), cap);
    }
}
