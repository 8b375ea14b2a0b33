//! Database access: the connection pool, the migrations and how to tell a
//! database that is down from a query that is wrong.

use std::time::Duration;

use sqlx::Connection as _;
use sqlx::PgPool;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// The store's and the engine's migrations (`migrations/` at the workspace root).
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// Default pool size of each process. Small on purpose: on a 2-core
/// machine PostgreSQL did more work with fewer busy backends (widget-bench
/// at 32 clients, API and two workers: 216 flows/s with 8 each against 197
/// with 16 and 196 with 4, docs/benchmarks/profile.md). Raise it with the
/// database's cores, not with the number of workers.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 8;

/// Connection settings shared by every binary (flatten it into a clap struct).
#[derive(Debug, Clone, clap::Args)]
pub struct DatabaseArgs {
    /// PostgreSQL URL.
    #[arg(
        long = "database-url",
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/widget_store?sslmode=disable",
        hide_env_values = true
    )]
    pub url: String,
    /// Largest number of pooled connections this process opens.
    #[arg(
        long = "db-max-connections",
        env = "DB_MAX_CONNECTIONS",
        default_value_t = DEFAULT_MAX_CONNECTIONS
    )]
    pub max_connections: u32,
    /// How long a request waits for a pooled connection before failing with
    /// "database unavailable".
    #[arg(
        long = "db-acquire-timeout-ms",
        env = "DB_ACQUIRE_TIMEOUT_MS",
        default_value_t = 3000
    )]
    pub acquire_timeout_ms: u64,
}

impl DatabaseArgs {
    /// Settings for a URL with the defaults above.
    pub fn from_url(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            acquire_timeout_ms: 3000,
        }
    }

    /// Parsed connect options, tagged with `application_name`.
    pub fn connect_options(&self, application_name: &str) -> Result<PgConnectOptions, sqlx::Error> {
        let options: PgConnectOptions = self.url.parse()?;
        Ok(options.application_name(application_name))
    }

    /// The pool of a process at start-up: created, then the migrations
    /// applied, waiting up to `wait` for the database to come up.
    pub async fn migrated_pool(
        &self,
        application_name: &str,
        wait: Duration,
    ) -> Result<PgPool, MigrateError> {
        let pool = self
            .pool(application_name)
            .map_err(MigrateError::Settings)?;
        migrate_with_retry(&pool, wait).await?;
        Ok(pool)
    }

    /// A lazily connecting pool: the process starts even while the database
    /// is down and recovers by itself when it returns.
    pub fn pool(&self, application_name: &str) -> Result<PgPool, sqlx::Error> {
        Ok(PgPoolOptions::new()
            .max_connections(self.max_connections)
            .min_connections(0)
            .acquire_timeout(Duration::from_millis(self.acquire_timeout_ms))
            .idle_timeout(Duration::from_secs(60))
            // sqlx pings every idle connection it hands out: a round trip
            // per acquire, about 30 per paid order under load. Ping only one
            // idle long enough to have outlived a database restart.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= PING_IF_IDLE_FOR {
                        conn.ping().await?;
                    }
                    Ok(true)
                })
            })
            .connect_lazy_with(self.connect_options(application_name)?))
    }
}

/// A pooled connection idle this long is checked before use.
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

/// Errors of [`migrate`].
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The connection settings do not parse.
    #[error("bad database settings")]
    Settings(#[source] sqlx::Error),
    /// apalis-postgres' own migrations failed.
    #[error("queue schema migration failed")]
    Queue(#[source] apalis_postgres::Error),
    /// The store's migrations failed.
    #[error("schema migration failed")]
    Store(#[source] sqlx::migrate::MigrateError),
}

/// Applies apalis' queue schema, then ours (ours tunes `apalis.jobs`, so the
/// order matters). Safe to run from many processes at once: both take
/// sqlx's migration lock.
pub async fn migrate(pool: &PgPool) -> Result<(), MigrateError> {
    apalis_postgres::PostgresStorage::setup(pool)
        .await
        .map_err(MigrateError::Queue)?;
    MIGRATOR.run(pool).await.map_err(MigrateError::Store)
}

/// Runs [`migrate`] until it succeeds, so a process started before its
/// database comes up waits for it instead of exiting.
async fn migrate_with_retry(pool: &PgPool, give_up_after: Duration) -> Result<(), MigrateError> {
    let deadline = tokio::time::Instant::now() + give_up_after;
    let mut delay = Duration::from_millis(200);
    loop {
        match migrate(pool).await {
            Ok(()) => return Ok(()),
            Err(e) if tokio::time::Instant::now() + delay < deadline => {
                tracing::warn!(error = %error_chain(&e), "database not ready for migrations; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(e),
        }
    }
}

/// True when the error says the database could not be reached (as opposed to
/// a query the database refused): callers answer 503 or retry later.
pub fn is_unavailable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // 08xxx connection exceptions; 57P0x shutdown or not yet
            // accepting; 53300 too many connections; 55000 database not
            // accepting connections; 3D000 database missing; 28xxx login
            // refused. None of them is the client's fault.
            code.starts_with("08")
                || code.starts_with("57P0")
                || code.starts_with("28")
                || matches!(code.as_ref(), "53300" | "55000" | "3D000")
        }),
        _ => false,
    }
}

/// An error and its sources on one line, for logs.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
