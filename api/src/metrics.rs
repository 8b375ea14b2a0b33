//! `GET /metrics`: Prometheus (OpenMetrics text) figures of the API's HTTP
//! traffic, the engine's queues and unfinished workflows, and the shop's
//! own health (orders, payments waiting, stock, payments, refunds due),
//! the last two read from the database at each scrape.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::AppState;
use crate::error::ApiError;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: String,
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkflowLabels {
    kind: String,
    status: String,
    /// The code version it is pinned to; `none` before its first execution.
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    kind: String,
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabels {
    queue: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// The API's metrics: kept in memory, encoded at each scrape.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    durations: Family<RouteLabels, Histogram>,
    database_up: Gauge,
    orders: Family<StatusLabels, Gauge>,
    oldest_pending: FloatGauge,
    stock: Gauge,
    payments: Family<OutcomeLabels, Counter>,
    refunds_due: Gauge,
    workflows: Family<WorkflowLabels, Gauge>,
    stranded: Family<VersionLabels, Gauge>,
    ready_jobs: Family<QueueLabels, Gauge>,
    oldest_ready: Family<QueueLabels, FloatGauge>,
    /// One refresh at a time: the payment counters move by differences.
    refreshing: tokio::sync::Mutex<()>,
}

/// Order statuses, each reported even at 0.
const ORDER_STATUSES: [&str; 4] = ["PENDING", "PAID", "DISPATCHED", "CANCELLED"];
/// What the store does with a provider delivery, each reported even at 0.
const PAYMENT_OUTCOMES: [&str; 5] = [
    "applied",
    "refund_due",
    "ignored",
    "mismatch",
    "unknown_payment",
];
/// Unfinished workflow statuses, each reported even at 0.
const UNFINISHED: [&str; 3] = ["enqueued", "running", "waiting"];

/// The version label of workflows not executed yet (pinned to none).
const NOT_PINNED: &str = "none";

impl Metrics {
    /// Every family registered, all at zero.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::default();
        let metrics = Metrics {
            requests: Family::default(),
            durations: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 2.0, 18))
            }),
            database_up: Gauge::default(),
            orders: Family::default(),
            oldest_pending: FloatGauge::default(),
            stock: Gauge::default(),
            payments: Family::default(),
            refunds_due: Gauge::default(),
            workflows: Family::default(),
            stranded: Family::default(),
            ready_jobs: Family::default(),
            oldest_ready: Family::default(),
            refreshing: tokio::sync::Mutex::new(()),
            registry: Registry::default(),
        };
        registry.register(
            "http_requests",
            "HTTP requests answered, by method, route template and status",
            metrics.requests.clone(),
        );
        registry.register_with_unit(
            "http_request_duration",
            "Time to answer an HTTP request, by method and route template",
            Unit::Seconds,
            metrics.durations.clone(),
        );
        registry.register(
            "widget_database_up",
            "1 when the last scrape could read the database",
            metrics.database_up.clone(),
        );
        registry.register("widget_orders", "Orders by status", metrics.orders.clone());
        registry.register_with_unit(
            "widget_oldest_pending_order_age",
            "How long the oldest order waiting for its payment has waited",
            Unit::Seconds,
            metrics.oldest_pending.clone(),
        );
        registry.register(
            "widget_stock_units",
            "Units left in stock",
            metrics.stock.clone(),
        );
        registry.register(
            "widget_payment_deliveries",
            "Verified provider deliveries, by what the store did with them",
            metrics.payments.clone(),
        );
        registry.register(
            "widget_refunds_due",
            "Payments taken for no goods, owed back",
            metrics.refunds_due.clone(),
        );
        registry.register(
            "engine_unfinished_workflows",
            "Workflows enqueued, running or waiting (parked), by kind, status and code version",
            metrics.workflows.clone(),
        );
        registry.register(
            "engine_stranded_workflows",
            "Unfinished workflows no live worker can run (pinned to a version none runs), by kind and version",
            metrics.stranded.clone(),
        );
        registry.register(
            "engine_ready_jobs",
            "Jobs due and not taken, by queue",
            metrics.ready_jobs.clone(),
        );
        registry.register_with_unit(
            "engine_oldest_ready_job_age",
            "How long the oldest job due and not taken has waited, by queue",
            Unit::Seconds,
            metrics.oldest_ready.clone(),
        );
        Arc::new(Metrics {
            registry,
            ..metrics
        })
    }

    /// Reads the database's figures into the gauges.
    async fn refresh(&self, state: &AppState) -> Result<(), ApiError> {
        let _one_at_a_time = self.refreshing.lock().await;
        let health = store::health(&state.pool).await?;
        let workflows = state.engine.unfinished().await?;
        let versions = state.engine.versions().await?;
        let ready = engine::ready_jobs(&state.pool).await?;
        for status in ORDER_STATUSES {
            let n = health
                .orders
                .iter()
                .find(|(s, _)| s == status)
                .map_or(0, |(_, n)| *n);
            self.orders
                .get_or_create(&StatusLabels {
                    status: status.to_owned(),
                })
                .set(n);
        }
        self.oldest_pending.set(health.oldest_pending_secs);
        self.stock.set(health.stock);
        for outcome in PAYMENT_OUTCOMES {
            let labels = OutcomeLabels {
                outcome: outcome.to_owned(),
            };
            self.payments.get_or_create(&labels).inc_by(0);
        }
        for (outcome, n) in health.payments {
            let counter = self.payments.get_or_create(&OutcomeLabels { outcome });
            counter.inc_by((n as u64).saturating_sub(counter.get()));
        }
        self.refunds_due.set(health.refunds_due);
        self.workflows.clear();
        for kind in [store::CHECKOUT.name, store::DISPATCH.name] {
            for status in UNFINISHED {
                self.workflows
                    .get_or_create(&WorkflowLabels {
                        kind: kind.to_owned(),
                        status: status.to_owned(),
                        version: NOT_PINNED.to_owned(),
                    })
                    .set(0);
            }
        }
        for (kind, status, version, n) in workflows {
            let version = version.unwrap_or_else(|| NOT_PINNED.to_owned());
            self.workflows
                .get_or_create(&WorkflowLabels {
                    kind,
                    status,
                    version,
                })
                .set(n);
        }
        self.stranded.clear();
        for v in versions.iter().filter(|v| v.stranded()) {
            self.stranded
                .get_or_create(&VersionLabels {
                    kind: v.kind.clone(),
                    version: v.version.clone().unwrap_or_else(|| NOT_PINNED.to_owned()),
                })
                .set(v.unfinished);
        }
        self.ready_jobs.clear();
        self.oldest_ready.clear();
        for queue in [store::CHECKOUT.queue, store::DISPATCH.queue] {
            let queue = QueueLabels {
                queue: queue.to_owned(),
            };
            self.ready_jobs.get_or_create(&queue).set(0);
            self.oldest_ready.get_or_create(&queue).set(0.0);
        }
        for (queue, n, oldest) in ready {
            self.ready_jobs
                .get_or_create(&QueueLabels {
                    queue: queue.clone(),
                })
                .set(n);
            self.oldest_ready
                .get_or_create(&QueueLabels { queue })
                .set(oldest);
        }
        Ok(())
    }
}

/// Counts and times every request by its route template (`unmatched` for
/// a path no route has, so a scan cannot blow up the label set).
pub async fn track(State(metrics): State<Arc<Metrics>>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().as_str().to_owned();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let response = next.run(request).await;
    let status = response.status().as_u16();
    metrics
        .durations
        .get_or_create(&RouteLabels {
            method: method.clone(),
            route: route.clone(),
        })
        .observe(started.elapsed().as_secs_f64());
    metrics
        .requests
        .get_or_create(&RequestLabels {
            method,
            route,
            status,
        })
        .inc();
    response
}

/// `GET /metrics`. With the database unreachable it still answers, with
/// `widget_database_up 0` and the database's figures as last read.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus (OpenMetrics text)",
        content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8", body = String)))]
pub async fn scrape(State(state): State<AppState>) -> Response {
    let metrics = state.metrics.clone();
    match metrics.refresh(&state).await {
        Ok(()) => {
            metrics.database_up.set(1);
        }
        Err(error) => {
            tracing::warn!(cause = ?error.cause, "metrics: the database's figures are stale");
            metrics.database_up.set(0);
        }
    }
    let mut body = String::new();
    if let Err(e) = encode(&mut body, &metrics.registry) {
        return ApiError::internal(e).into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}
