//! Widget Store's HTTP API: stateless, never runs a workflow step. It starts
//! workflows and delivers messages through the engine, and waits for their
//! events.

pub mod admin;
pub mod error;
pub mod limits;
mod metrics;
pub mod openapi;
mod payments;
mod routes;
pub mod secrets;
pub mod signature;
pub mod views;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::{MatchedPath, Request};
use axum::middleware::{self, Next};
use axum::response::Response;
use engine::{Engine, EventListener};
use sqlx::PgPool;
use store::db::DatabaseArgs;
use store::telemetry::LogArgs;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;

use crate::error::{ErrorCause, json_error_shape};

/// The API's configuration: every flag also reads an environment variable.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "widget-api", about = "Widget Store's HTTP API")]
pub struct Config {
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub log: LogArgs,
    #[command(flatten)]
    pub limits: limits::LimitArgs,
    /// Apply the database migrations and exit (a release's migration job;
    /// the other processes then run with MIGRATIONS=wait).
    #[arg(long)]
    pub migrate_only: bool,
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "API_ADDR", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// How long checkout and webhook requests wait for the workflow's answer.
    #[arg(long, env = "EVENT_WAIT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub event_wait: Duration,
    /// Fallback re-read of an awaited event, should a notification be lost.
    #[arg(long, env = "EVENT_POLL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub event_poll: Duration,
    /// Whole-request time limit (must exceed the event wait).
    #[arg(long, env = "REQUEST_TIMEOUT", default_value = "75s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,
    /// Allow `POST /crash_application` (chaos testing; off by default).
    #[arg(long, env = "CHAOS", default_value_t = false)]
    pub chaos: bool,
    /// Serve the demo's unsigned `POST /payment_webhook/{id}/{status}`
    /// (the storefront page plays the payment provider); off, it is 404.
    #[arg(long, env = "DEMO_PAYMENTS", default_value_t = false)]
    pub demo_payments: bool,
    /// Secrets of `POST /webhooks/payments`, `whsec_<base64>`, comma-separated
    /// (any one may match: rotate by adding the new one first); none: 503.
    #[arg(long, env = "PAYMENT_WEBHOOK_SECRETS", default_value = "", hide_env_values = true,
          hide_default_value = true, value_parser = secrets::SecretParser::<signature::WebhookSecrets>::new())]
    pub payment_webhook_secrets: signature::WebhookSecrets,
    /// Tokens of the admin API and page (`/admin/`), `[label=]token`,
    /// comma-separated, each at least 24 characters; the log names the
    /// label. None: admin is off (404).
    #[arg(long, env = "ADMIN_TOKEN", default_value = "", hide_env_values = true,
          hide_default_value = true, value_parser = secrets::SecretParser::<admin::AdminTokens>::new())]
    pub admin_token: admin::AdminTokens,
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub engine: Engine,
    pub event_wait: Duration,
    pub chaos: bool,
    pub demo_payments: bool,
    pub webhook_secrets: signature::WebhookSecrets,
    pub metrics: std::sync::Arc<metrics::Metrics>,
    pub limits: limits::LimitArgs,
    pub openapi: openapi::Document,
}

/// Largest request body accepted (the API takes tiny JSON bodies at most).
pub const BODY_LIMIT: usize = 16 * 1024;

/// The router with its middleware.
pub fn router(state: AppState, admin: &admin::AdminTokens, request_timeout: Duration) -> Router {
    let tracked = state.metrics.clone();
    let (routes, document) = routes::routes(state.demo_payments, &state.limits)
        .merge(admin::routes(admin))
        .merge(openapi::routes())
        .split_for_parts();
    openapi::publish(document, &state.openapi);
    routes
        .with_state(state)
        .layer(RequestBodyLimitLayer::new(BODY_LIMIT))
        .layer(TimeoutLayer::with_status_code(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            request_timeout,
        ))
        // Outside the limit and timeout layers, so their answers get the
        // JSON error shape too; logging sees the final status.
        .layer(middleware::map_response(json_error_shape))
        .layer(middleware::from_fn_with_state(tracked, metrics::track))
        // Every response carries `x-request-id`: the request's own, or one
        // made here (set before the log line reads it).
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(middleware::from_fn(log_request))
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
}

/// One log line per request: method, matched path, status, duration, its
/// `x-request-id`, and the internal cause of an error response.
async fn log_request(request: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    let method = request.method().clone();
    let request_id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let path = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| request.uri().path().to_owned());
    let response = next.run(request).await;
    let status = response.status().as_u16();
    let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
    match response.extensions().get::<ErrorCause>() {
        Some(ErrorCause(cause)) => {
            tracing::warn!(%method, path, status, elapsed_ms, request_id, cause, "request failed")
        }
        None if status >= 500 => {
            tracing::warn!(%method, path, status, elapsed_ms, request_id, "request failed")
        }
        None => tracing::debug!(%method, path, status, elapsed_ms, request_id, "request"),
    }
    response
}

/// Migrates, binds, prints the address on stdout, serves until `shutdown`.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    if config.migrate_only {
        let database = DatabaseArgs {
            migrations: store::db::Migrations::Apply,
            ..config.database.clone()
        };
        database
            .migrated_pool("widget-migrate", Duration::from_secs(60))
            .await
            .context("applying the migrations")?;
        tracing::info!("migrations applied");
        return Ok(());
    }
    let pool = config
        .database
        .migrated_pool("widget-api", Duration::from_secs(60))
        .await
        .context("preparing the database")?;
    let events = EventListener::spawn(pool.clone());
    let state = AppState {
        engine: Engine::new(pool.clone()).with_events(events, config.event_poll),
        pool,
        event_wait: config.event_wait,
        chaos: config.chaos,
        demo_payments: config.demo_payments,
        webhook_secrets: config.payment_webhook_secrets.clone(),
        metrics: metrics::Metrics::new(),
        limits: config.limits.clone(),
        openapi: openapi::Document::default(),
    };
    let app = router(state, &config.admin_token, config.request_timeout);
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let address = listener.local_addr()?;
    println!("widget-api listening on http://{address}");
    tracing::info!(
        %address,
        chaos = config.chaos,
        demo_payments = config.demo_payments,
        webhook_secrets = ?config.payment_webhook_secrets,
        admin_tokens = ?config.admin_token,
        limits = ?config.limits,
        "widget-api listening"
    );
    // The peer address: the client of the per-client limits.
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
    .context("serving HTTP")
}
