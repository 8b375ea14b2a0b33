//! The widget store's worker: the checkout and dispatch workflows, run by
//! the engine's [`Runtime`] on the `checkout` and `dispatch` queues.

pub mod workflows;

use std::future::Future;
use std::time::Duration;

use anyhow::Context as _;
use shared::db::DatabaseArgs;
use shared::engine::{CrashPoint, QueueConfig, Runtime, RuntimeConfig};
use shared::telemetry::LogArgs;

/// The worker's configuration: every flag also reads an environment variable.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "widget-worker",
    about = "Runs Widget Store's checkout and dispatch workflows"
)]
pub struct Config {
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub log: LogArgs,
    /// Queues to consume, comma separated.
    #[arg(
        long,
        env = "WORKER_QUEUES",
        value_delimiter = ',',
        default_value = "checkout,dispatch"
    )]
    pub queues: Vec<String>,
    /// Workflows of each queue executing at once in this process.
    #[arg(long, env = "WORKER_CONCURRENCY", default_value_t = 32)]
    pub concurrency: usize,
    /// How long a checkout waits for its payment webhook.
    #[arg(long, env = "PAYMENT_TIMEOUT_MS", default_value_t = 120_000)]
    pub payment_timeout_ms: u64,
    /// Pause between two dispatch progress steps.
    #[arg(long, env = "DISPATCH_INTERVAL_MS", default_value_t = 1_000)]
    pub dispatch_interval_ms: u64,
    /// Obey `POST /crash_application` (chaos testing; off by default).
    #[arg(long, env = "CHAOS", default_value_t = false)]
    pub chaos: bool,
    /// Fleet registry heartbeat.
    #[arg(long, env = "WORKER_HEARTBEAT_MS", default_value_t = 1_000)]
    pub heartbeat_ms: u64,
    /// How often live workers look for dead ones (bounds takeover time).
    #[arg(long, env = "WORKER_REAP_INTERVAL_MS", default_value_t = 200)]
    pub reap_interval_ms: u64,
    /// A worker silent this long is presumed hung and its work taken over.
    #[arg(long, env = "WORKER_STALE_AFTER_MS", default_value_t = 30_000)]
    pub stale_after_ms: u64,
    /// Fallback queue poll, for scheduled jobs.
    #[arg(long, env = "WORKER_POLL_INTERVAL_MS", default_value_t = 200)]
    pub poll_interval_ms: u64,
    /// Sleeps up to this long wait in-process; longer ones park.
    #[arg(long, env = "WORKER_HOLD_THRESHOLD_MS", default_value_t = 5_000)]
    pub hold_threshold_ms: u64,
    /// On SIGTERM, how long running steps get to finish.
    #[arg(long, env = "WORKER_DRAIN_TIMEOUT_MS", default_value_t = 10_000)]
    pub drain_timeout_ms: u64,
    /// Finished queue jobs older than this are deleted.
    #[arg(long, env = "WORKER_PRUNE_AFTER_MS", default_value_t = 300_000)]
    pub prune_after_ms: u64,
    /// Tests only: die with SIGKILL right before or after a step commits,
    /// `before:<step>[#n]` or `after:<step>[#n]`. Debug builds only.
    #[arg(long, env = "WORKER_CRASH_AT", hide = true)]
    pub crash_at: Option<CrashPoint>,
}

impl Config {
    /// The engine runtime's settings.
    pub fn runtime(&self) -> RuntimeConfig {
        RuntimeConfig {
            queues: self
                .queues
                .iter()
                .map(|name| QueueConfig {
                    name: name.trim().to_owned(),
                    concurrency: self.concurrency,
                })
                .collect(),
            heartbeat: Duration::from_millis(self.heartbeat_ms),
            reap_interval: Duration::from_millis(self.reap_interval_ms),
            stale_after: Duration::from_millis(self.stale_after_ms),
            poll_interval: Duration::from_millis(self.poll_interval_ms),
            hold_threshold: Duration::from_millis(self.hold_threshold_ms),
            drain_timeout: Duration::from_millis(self.drain_timeout_ms),
            prune_after: Duration::from_millis(self.prune_after_ms),
            allow_remote_crash: self.chaos,
            crash_at: self.crash_at.clone(),
            ..RuntimeConfig::default()
        }
    }
}

/// Migrates, then runs the workflows until `shutdown`, then drains.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    let pool = config
        .database
        .migrated_pool("widget-worker", Duration::from_secs(60))
        .await
        .context("preparing the database")?;
    let runtime = Runtime::new(
        pool,
        config.database.connect_options("widget-worker-registry")?,
        config.runtime(),
    )
    .register(workflows::Checkout {
        payment_timeout: Duration::from_millis(config.payment_timeout_ms),
    })
    .register(workflows::Dispatch {
        interval: Duration::from_millis(config.dispatch_interval_ms),
    });
    runtime.run(shutdown).await
}
