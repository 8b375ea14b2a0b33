//! A worker's `GET /metrics` at `--metrics-addr` (Prometheus, OpenMetrics
//! text): its executions and workflows by kind and outcome, each step's
//! duration, and the dead workers it reaped, as the engine reports them
//! ([`engine::Observer`]). The fleet-wide figures (queues, parked
//! workflows, the shop) are the API's.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use engine::{ExecutionOutcome, Observer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    kind: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabels {
    kind: String,
    step: String,
}

/// The worker's metrics, fed by the engine.
pub struct Metrics {
    registry: Registry,
    started: Family<KindLabels, Counter>,
    finished: Family<OutcomeLabels, Counter>,
    executions: Family<OutcomeLabels, Counter>,
    steps: Family<StepLabels, Histogram>,
    reaped: Counter,
    taken_over: Counter,
    silent: Histogram,
    takeovers: Family<KindLabels, Histogram>,
}

impl Metrics {
    /// Every family registered.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::default();
        let metrics = Metrics {
            registry: Registry::default(),
            started: Family::default(),
            finished: Family::default(),
            executions: Family::default(),
            steps: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 2.0, 16))
            }),
            reaped: Counter::default(),
            taken_over: Counter::default(),
            silent: Histogram::new(exponential_buckets(0.05, 2.0, 12)),
            takeovers: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.05, 2.0, 12))
            }),
        };
        registry.register(
            "engine_workflows_started",
            "Workflows whose first execution began here, by kind",
            metrics.started.clone(),
        );
        registry.register(
            "engine_workflows_finished",
            "Workflows that ended here, by kind and outcome (succeeded, failed, cancelled)",
            metrics.finished.clone(),
        );
        registry.register(
            "engine_workflow_executions",
            "Executions ended here, by kind and outcome (parked, fenced, handed_back, ...)",
            metrics.executions.clone(),
        );
        registry.register_with_unit(
            "engine_step_duration",
            "Time from a step's start to its checkpoint, by kind and step",
            Unit::Seconds,
            metrics.steps.clone(),
        );
        registry.register(
            "engine_workers_reaped",
            "Dead or hung workers this worker reaped",
            metrics.reaped.clone(),
        );
        registry.register(
            "engine_workflows_taken_over",
            "Workflows of reaped workers this worker handed back to the queue",
            metrics.taken_over.clone(),
        );
        registry.register_with_unit(
            "engine_takeover_detection",
            "Time from a reaped worker's last heartbeat to its reaping",
            Unit::Seconds,
            metrics.silent.clone(),
        );
        registry.register_with_unit(
            "engine_takeover",
            "Time from a dead worker's last heartbeat to the next step, here, of a workflow it was running, by kind",
            Unit::Seconds,
            metrics.takeovers.clone(),
        );
        Arc::new(Metrics {
            registry,
            ..metrics
        })
    }

    fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut body = String::new();
        encode(&mut body, &self.registry)?;
        Ok(body)
    }
}

impl Observer for Metrics {
    fn execution_started(&self, kind: &str, first: bool) {
        if first {
            self.started
                .get_or_create(&KindLabels {
                    kind: kind.to_owned(),
                })
                .inc();
        }
    }

    fn execution_ended(&self, kind: &str, outcome: ExecutionOutcome) {
        let labels = OutcomeLabels {
            kind: kind.to_owned(),
            outcome: outcome.as_str(),
        };
        if outcome.is_end() {
            self.finished.get_or_create(&labels).inc();
        }
        self.executions.get_or_create(&labels).inc();
    }

    fn step_completed(&self, kind: &str, step: &str, took: Duration) {
        self.steps
            .get_or_create(&StepLabels {
                kind: kind.to_owned(),
                step: step.to_owned(),
            })
            .observe(took.as_secs_f64());
    }

    fn taken_over(&self, kind: &str, since_last_heartbeat: Duration) {
        self.takeovers
            .get_or_create(&KindLabels {
                kind: kind.to_owned(),
            })
            .observe(since_last_heartbeat.as_secs_f64());
    }

    fn workers_reaped(&self, silent_for: &[Duration], workflows: u64) {
        self.reaped.inc_by(silent_for.len() as u64);
        self.taken_over.inc_by(workflows);
        for silent in silent_for {
            self.silent.observe(silent.as_secs_f64());
        }
    }
}

/// Serves `GET /metrics` on `address` (port 0: any free port) in the
/// background; prints the address it bound on stdout.
pub async fn serve(metrics: Arc<Metrics>, address: SocketAddr) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("binding the metrics address {address}"))?;
    let bound = listener.local_addr()?;
    println!("widget-worker metrics on http://{bound}/metrics");
    tracing::info!(address = %bound, "metrics served");
    let app = axum::Router::new().route(
        "/metrics",
        get(move || async move {
            match metrics.encode() {
                Ok(body) => (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    body,
                )
                    .into_response(),
                Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
            }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "the metrics server stopped");
        }
    });
    Ok(())
}
