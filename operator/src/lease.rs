//! Leader election through a `coordination.k8s.io/v1` Lease, so two operator replicas can
//! run and only one reconciles. The leader renews the Lease every `renew` interval; a
//! standby takes it over once it has not been renewed for `duration`. A leader that cannot
//! renew before its Lease would expire stops (the process exits and Kubernetes restarts
//! it as a standby), so two replicas never reconcile at once.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub name: String,
    pub namespace: String,
    pub identity: String,
    pub duration: Duration,
    pub renew: Duration,
}

pub struct Elector {
    api: Api<Lease>,
    config: LeaseConfig,
}

enum Attempt {
    Acquired,
    HeldBy(String),
}

impl Elector {
    pub fn new(client: Client, config: LeaseConfig) -> Self {
        Elector {
            api: Api::namespaced(client, &config.namespace),
            config,
        }
    }

    /// Waits until this replica holds the Lease.
    pub async fn acquire(&self) -> Result<(), kube::Error> {
        let mut announced = None;
        loop {
            match self.try_acquire().await? {
                Attempt::Acquired => {
                    tracing::info!(lease = %self.config.name, identity = %self.config.identity, "became leader");
                    return Ok(());
                }
                Attempt::HeldBy(holder) => {
                    if announced.as_ref() != Some(&holder) {
                        tracing::info!(lease = %self.config.name, %holder, "standing by: another replica leads");
                        announced = Some(holder);
                    }
                }
            }
            tokio::time::sleep(self.config.renew).await;
        }
    }

    /// Renews the Lease forever; returns an error when leadership is lost.
    pub async fn hold(&self) -> String {
        let mut last_renewal = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.config.renew).await;
            match self.try_acquire().await {
                Ok(Attempt::Acquired) => last_renewal = tokio::time::Instant::now(),
                Ok(Attempt::HeldBy(holder)) => {
                    return format!("leadership lost to {holder}");
                }
                Err(e) => {
                    tracing::warn!("cannot renew the leader Lease: {e}");
                    if last_renewal.elapsed() + self.config.renew >= self.config.duration {
                        return format!("could not renew the leader Lease in time: {e}");
                    }
                }
            }
        }
    }

    async fn try_acquire(&self) -> Result<Attempt, kube::Error> {
        let now = Timestamp::now();
        let duration_secs = i32::try_from(self.config.duration.as_secs()).unwrap_or(i32::MAX);
        let existing = self.api.get_opt(&self.config.name).await?;
        let Some(mut lease) = existing else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.config.identity.clone()),
                    lease_duration_seconds: Some(duration_secs),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Acquired),
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    Ok(Attempt::HeldBy("a replica that created it first".into()))
                }
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let ours = holder == self.config.identity;
        let expired = match (&spec.renew_time, spec.lease_duration_seconds) {
            (Some(MicroTime(renewed)), Some(secs)) => {
                now.duration_since(*renewed) > SignedDuration::from_secs(i64::from(secs))
            }
            _ => true,
        };
        if !ours && !expired && !holder.is_empty() {
            return Ok(Attempt::HeldBy(holder));
        }
        if !ours {
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            spec.holder_identity = Some(self.config.identity.clone());
        }
        spec.renew_time = Some(MicroTime(now));
        spec.lease_duration_seconds = Some(duration_secs);
        // `replace` carries the resourceVersion we read: if another replica wrote the
        // Lease in between, this fails with a conflict instead of both becoming leader.
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(Attempt::Acquired),
            Err(kube::Error::Api(e)) if e.code == 409 => {
                Ok(Attempt::HeldBy("a replica that wrote it first".into()))
            }
            Err(e) => Err(e),
        }
    }
}
