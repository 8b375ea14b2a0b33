//! The widget store's worker: the checkout and dispatch workflows, run by
//! the engine's [`Runtime`] on the `checkout` and `dispatch` queues.

pub mod metrics;
pub mod workflows;

use std::future::Future;
use std::time::Duration;

use anyhow::Context as _;
use engine::{QueueConfig, Runtime, RuntimeConfig};
use store::db::DatabaseArgs;
use store::telemetry::LogArgs;

/// The code version a worker runs unless `APP_VERSION` says otherwise: the
/// crate's version and the build id (the commit it was built from).
pub const BUILD_VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "+", env!("WIDGET_BUILD_ID"));

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
    #[arg(long, env = "PAYMENT_TIMEOUT", default_value = "2m", value_parser = humantime::parse_duration)]
    pub payment_timeout: Duration,
    /// Pause before each dispatch progress step.
    #[arg(long, env = "DISPATCH_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub dispatch_interval: Duration,
    /// Obey `POST /crash_application` (chaos testing; off by default).
    #[arg(long, env = "CHAOS", default_value_t = false)]
    pub chaos: bool,
    /// Serve `GET /metrics` here (port 0: any free port; unset: off).
    #[arg(long, env = "WORKER_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// The engine runtime's settings (heartbeat, takeover, drain, ...).
    #[command(flatten)]
    pub runtime: RuntimeConfig,
}

impl Config {
    /// The engine runtime's settings, with this worker's queues.
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
            app_version: Some(
                self.runtime
                    .app_version
                    .clone()
                    .unwrap_or_else(|| BUILD_VERSION.to_owned()),
            ),
            ..self.runtime.clone()
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
        pool.clone(),
        config.database.connect_options("widget-worker-registry")?,
        config.runtime(),
    )
    .register(workflows::Checkout {
        payment_timeout: config.payment_timeout,
    })
    .register(workflows::Dispatch {
        interval: config.dispatch_interval,
    });
    let runtime = match config.metrics_addr {
        Some(address) => {
            let metrics = metrics::Metrics::new();
            metrics::serve(metrics.clone(), address).await?;
            runtime.observe(metrics)
        }
        None => runtime,
    };
    // The demo's crash button, obeyed only with chaos allowed.
    let (stop_obeying, stopped) = tokio::sync::watch::channel(false);
    if config.chaos {
        tokio::spawn(store::chaos::obey_crash_requests(
            pool,
            runtime.worker_id().to_owned(),
            stopped,
        ));
    }
    let ran = runtime.run(shutdown).await;
    let _ = stop_obeying.send(true);
    ran
}
