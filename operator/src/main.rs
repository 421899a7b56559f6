//! `warren-operator`: runs the controllers of the `warren.dev` custom resources.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use futures::FutureExt;
use futures::future::BoxFuture;
use tracing_subscriber::EnvFilter;
use warren_operator::cluster::controller;
use warren_operator::crd::{
    Binding, Exchange, Federation, OperatorPolicy, Permission, Policy, Queue, Shovel,
    TopicPermission, User, Vhost,
};
use warren_operator::lease::{Elector, LeaseConfig};
use warren_operator::metrics::{self, Health, Metrics};
use warren_operator::reconcile::{Context, Settings};
use warren_operator::security::Security;
use warren_operator::topology;
use warren_operator::watch::Shared;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Json,
    Text,
}

/// The Warren operator: reconciles RabbitCluster, Policy, Federation, Shovel, Vhost, User,
/// Permission, TopicPermission, Queue, Exchange, Binding and OperatorPolicy resources.
#[derive(Debug, Parser)]
#[command(name = "warren-operator", version)]
struct Cli {
    /// Watch only these namespaces (comma-separated: namespace-scoped mode, one set of
    /// controllers per namespace); every namespace when unset.
    #[arg(long, env = "WARREN_OPERATOR_NAMESPACE")]
    namespace: Option<String>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(
        long,
        env = "WARREN_OPERATOR_METRICS_ADDR",
        default_value = "0.0.0.0:8080"
    )]
    metrics_addr: SocketAddr,
    /// Elect a leader through a Lease so several replicas can run; only the leader reconciles.
    #[arg(long, env = "WARREN_OPERATOR_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// Name of the leader Lease.
    #[arg(
        long,
        env = "WARREN_OPERATOR_LEASE_NAME",
        default_value = "warren-operator"
    )]
    lease_name: String,
    /// Namespace of the leader Lease (the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// This replica's identity in the Lease and in Events (its pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Seconds a leader's Lease lasts without renewal.
    #[arg(long, default_value_t = 15)]
    lease_duration: u64,
    /// Seconds between re-applies of each topology resource (Policy, Vhost, User, …) (drift correction:
    /// a change made directly on the broker is undone within this time).
    #[arg(long, env = "WARREN_OPERATOR_TOPOLOGY_RESYNC", default_value_t = 60)]
    topology_resync_seconds: u64,
    /// Broker image of RabbitClusters that do not set `spec.image` (e.g. your registry's copy
    /// of the image scripts/image.sh builds).
    #[arg(
        long,
        env = "WARREN_OPERATOR_BROKER_IMAGE",
        default_value = warren_operator::crd::cluster::DEFAULT_IMAGE
    )]
    broker_image: String,
    /// Allow RabbitClusters whose `spec.override` gives broker pods access to their node:
    /// privileged containers, hostNetwork, hostPID, hostIPC, hostPath volumes, host ports,
    /// capabilities beyond the Pod Security Standards' baseline, another ServiceAccount than
    /// the cluster's own. Refused by default (ReconcileSuccess=False,
    /// InvalidSpec naming the field).
    #[arg(long, env = "WARREN_OPERATOR_ALLOW_PRIVILEGED_PODS", default_value_t = false,
          action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    allow_privileged_pods: bool,
    /// Send the cluster's default user to whatever host a RabbitCluster's
    /// `warren.dev/management-uri` annotation names. By default only the cluster's own
    /// Services and pods (`<name>.<ns>.svc`, `<name>-nodes.<ns>.svc`,
    /// `<name>-server-N.<name>-nodes.<ns>.svc`, optionally with the cluster domain) are used.
    #[arg(long, env = "WARREN_OPERATOR_ALLOW_ANY_MANAGEMENT_URI", default_value_t = false,
          action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    allow_any_management_uri: bool,
    /// Reach broker pods at their pod IPs instead of their DNS names (drain, forget): for an
    /// operator running outside the cluster's DNS but on its pod network (a developer's
    /// machine on the node, the e2e on a real kubelet). Not for management over TLS: the
    /// brokers' certificates name hosts, not pod IPs.
    #[arg(long, env = "WARREN_OPERATOR_REACH_PODS_BY_IP", default_value_t = false,
          action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    reach_pods_by_ip: bool,
    /// The cluster's DNS domain (Service names `<svc>.<ns>.svc.<domain>`).
    #[arg(
        long,
        env = "WARREN_OPERATOR_CLUSTER_DOMAIN",
        default_value = warren_operator::security::DEFAULT_CLUSTER_DOMAIN
    )]
    cluster_domain: String,
    /// Log format: json (structured, one object per line) or text.
    #[arg(
        long,
        env = "WARREN_OPERATOR_LOG_FORMAT",
        value_enum,
        default_value = "json"
    )]
    log_format: LogFormat,
}

/// Colours only for a person at a terminal: not in files, pipes or `kubectl logs`, and never
/// with `NO_COLOR` set (<https://no-color.org>).
fn colour_logs() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    warren_operator::install_crypto_provider();
    let filter = EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,kube_runtime::controller=warn"));
    match cli.log_format {
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init(),
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(colour_logs())
            .with_writer(std::io::stderr)
            .init(),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("warren-operator: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), String> {
    let client = kube::Client::try_default().await.map_err(|e| {
        format!("cannot configure a Kubernetes client (KUBECONFIG or in-cluster): {e}")
    })?;
    let metrics = Metrics::new();
    let health = Health::default();
    let server = tokio::spawn(metrics::serve(
        cli.metrics_addr,
        metrics.clone(),
        health.clone(),
    ));
    // Ready once the API server answers.
    loop {
        match client.apiserver_version().await {
            Ok(v) => {
                tracing::info!(version = %v.git_version, "connected to the API server");
                break;
            }
            Err(e) => {
                tracing::warn!("API server not reachable yet: {e}");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
    health.ready.store(true, Ordering::Relaxed);
    let identity = cli.identity.clone().unwrap_or_else(|| {
        format!(
            "{}-{}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "warren-operator".into()),
            std::process::id()
        )
    });
    let security = Security {
        allow_privileged_pods: cli.allow_privileged_pods,
        allow_any_management_uri: cli.allow_any_management_uri,
        cluster_domain: cli.cluster_domain.clone(),
    };
    if security.allow_privileged_pods || security.allow_any_management_uri {
        tracing::warn!(
            allow_privileged_pods = security.allow_privileged_pods,
            allow_any_management_uri = security.allow_any_management_uri,
            "security checks relaxed by flags"
        );
    }
    // One context for every controller: the same client, recorder, metrics and settings.
    let ctx = Context::new(
        client.clone(),
        metrics.clone(),
        Settings {
            instance: Some(identity.clone()),
            broker_image: cli.broker_image.clone(),
            security,
            reach_pods_by_ip: cli.reach_pods_by_ip,
            topology_resync: Duration::from_secs(cli.topology_resync_seconds.max(1)),
        },
    );
    let namespaces = warren_operator::watched_namespaces(cli.namespace.as_deref());
    tracing::info!(?namespaces, "watching");
    let controllers = async move {
        // A watch covers one namespace or all: one set of controllers per namespace, sharing
        // that namespace's watches of Secrets, RabbitClusters and Users.
        futures::future::join_all(namespaces.into_iter().map(|ns| {
            let mut shared = Shared::new(ctx.client.clone(), ns.clone());
            // Every controller subscribes now, before the shared watches start.
            let controllers: Vec<BoxFuture<'static, ()>> = vec![
                controller::run(ctx.clone(), ns.clone(), shared.triggers(false)).boxed(),
                topology::run::<Policy>(ctx.clone(), ns.clone(), shared.triggers(false)).boxed(),
                topology::run::<Federation>(ctx.clone(), ns.clone(), shared.triggers(false))
                    .boxed(),
                topology::run::<Shovel>(ctx.clone(), ns.clone(), shared.triggers(false)).boxed(),
                topology::run::<Vhost>(ctx.clone(), ns.clone(), shared.triggers(false)).boxed(),
                topology::run::<User>(ctx.clone(), ns.clone(), shared.triggers(false)).boxed(),
                topology::run::<Permission>(ctx.clone(), ns.clone(), shared.triggers(true)).boxed(),
                topology::run::<TopicPermission>(ctx.clone(), ns.clone(), shared.triggers(true))
                    .boxed(),
                topology::run::<Queue>(ctx.clone(), ns.clone(), shared.triggers(false)).boxed(),
                topology::run::<Exchange>(ctx.clone(), ns.clone(), shared.triggers(false)).boxed(),
                topology::run::<Binding>(ctx.clone(), ns.clone(), shared.triggers(false)).boxed(),
                topology::run::<OperatorPolicy>(ctx.clone(), ns, shared.triggers(false)).boxed(),
            ];
            async move {
                // The controllers end on a shutdown signal; the watches would not.
                tokio::select! {
                    _ = futures::future::join_all(controllers) => {}
                    () = shared.run() => {}
                }
            }
        }))
        .await;
    };
    if !cli.leader_elect {
        metrics.leader.set(1);
        controllers.await;
        return Ok(());
    }
    let elector = Elector::new(
        client,
        LeaseConfig {
            name: cli.lease_name.clone(),
            namespace: cli.lease_namespace.clone(),
            identity,
            duration: Duration::from_secs(cli.lease_duration.max(2)),
            renew: Duration::from_secs((cli.lease_duration / 3).max(1)),
        },
    );
    tokio::select! {
        acquired = elector.acquire() => acquired.map_err(|e| format!("leader election failed: {e}"))?,
        _ = tokio::signal::ctrl_c() => return Ok(()),
    }
    metrics.leader.set(1);
    tokio::select! {
        () = controllers => Ok(()),
        lost = elector.hold() => Err(format!("stopping: {lost}")),
        r = server => Err(format!("metrics server stopped: {r:?}")),
    }
}
