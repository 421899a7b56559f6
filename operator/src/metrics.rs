//! The operator's own metrics (`/metrics`) and health endpoints (`/healthz`, `/readyz`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

/// Counters and histograms per controller.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub reconciliations: IntCounterVec,
    pub failures: IntCounterVec,
    pub duration: HistogramVec,
    pub leader: IntGauge,
    pub topology_writes: IntCounterVec,
    pub drift_corrections: IntCounterVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let reconciliations = IntCounterVec::new(
            Opts::new(
                "warren_operator_reconciliations_total",
                "Reconciliations started, per controller.",
            ),
            &["controller"],
        )
        .expect("static metric definition");
        let failures = IntCounterVec::new(
            Opts::new(
                "warren_operator_reconcile_errors_total",
                "Reconciliations that failed, per controller and error kind.",
            ),
            &["controller", "error"],
        )
        .expect("static metric definition");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "warren_operator_reconcile_duration_seconds",
                "Time a reconciliation took, per controller.",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &["controller"],
        )
        .expect("static metric definition");
        let leader = IntGauge::new(
            "warren_operator_leader",
            "1 while this replica holds the leader Lease and runs the controllers.",
        )
        .expect("static metric definition");
        let topology_writes = IntCounterVec::new(
            Opts::new(
                "warren_operator_topology_writes_total",
                "Writes (PUT or POST) to a broker's management API, per topology kind: a resync that finds the broker as specified writes nothing.",
            ),
            &["kind"],
        )
        .expect("static metric definition");
        let drift_corrections = IntCounterVec::new(
            Opts::new(
                "warren_operator_topology_drift_corrections_total",
                "Objects found different on the broker from their already applied spec (changed or deleted there, or a rotated credentials Secret) and rewritten, per topology kind.",
            ),
            &["kind"],
        )
        .expect("static metric definition");
        for c in [
            Box::new(reconciliations.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(failures.clone()),
            Box::new(duration.clone()),
            Box::new(leader.clone()),
            Box::new(topology_writes.clone()),
            Box::new(drift_corrections.clone()),
        ] {
            registry.register(c).expect("metrics registered once");
        }
        Metrics {
            registry,
            reconciliations,
            failures,
            duration,
            leader,
            topology_writes,
            drift_corrections,
        }
    }

    /// Starts timing a reconciliation of `controller`.
    pub fn start(&self, controller: &str) -> ReconcileTimer {
        self.reconciliations.with_label_values(&[controller]).inc();
        ReconcileTimer {
            histogram: self.duration.with_label_values(&[controller]),
            started: Instant::now(),
        }
    }

    /// A topology object written to its broker.
    pub fn wrote(&self, kind: &str) {
        self.topology_writes.with_label_values(&[kind]).inc();
    }

    /// A topology object's drift corrected.
    pub fn drift_corrected(&self, kind: &str) {
        self.drift_corrections.with_label_values(&[kind]).inc();
    }

    pub fn failed(&self, controller: &str, error: &str) {
        self.failures.with_label_values(&[controller, error]).inc();
    }
}

/// Observes the duration when dropped.
pub struct ReconcileTimer {
    histogram: prometheus::Histogram,
    started: Instant,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.histogram.observe(self.started.elapsed().as_secs_f64());
    }
}

/// What the health endpoints report.
#[derive(Clone, Default)]
pub struct Health {
    /// Set once this replica runs its controllers (leader) or is a healthy standby.
    pub ready: Arc<AtomicBool>,
}

#[derive(Clone)]
struct AppState {
    metrics: Metrics,
    health: Health,
}

async fn metrics_handler(State(s): State<AppState>) -> impl IntoResponse {
    let mut buf = Vec::new();
    match TextEncoder::new().encode(&s.metrics.registry.gather(), &mut buf) {
        Ok(()) => (
            StatusCode::OK,
            [("content-type", "text/plain; version=0.0.4")],
            buf,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    if s.health.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: waiting for the API server",
        )
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` until the process exits.
pub async fn serve(addr: SocketAddr, metrics: Metrics, health: Health) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(AppState { metrics, health });
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    axum::serve(listener, app).await
}
