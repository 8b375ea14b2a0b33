//! Database access: the connection pool, the migrations and how to tell a
//! database that is down from a query that is wrong.

use std::time::Duration;

use sqlx::Connection as _;
use sqlx::PgPool;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// The store's migrations (`migrations/` at the workspace root); the
/// engine's come with the engine ([`engine::run_migrations`]).
pub static MIGRATOR: Migrator = sqlx::migrate!("../../migrations");

/// Default pool size of each process. Small on purpose: on a 2-core
/// machine PostgreSQL did more work with fewer busy backends
/// (docs/benchmarks/profile.md). Raise it with the database's cores, not
/// with the number of workers.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 8;

/// How long a request waits for a pooled connection by default.
const DEFAULT_ACQUIRE_TIMEOUT: &str = "3s";

/// The server-side limits every session gets by default: no statement
/// runs, waits for a lock, or sits idle inside a transaction (a stopped or
/// cut-off process holding row locks) longer than these.
const DEFAULT_STATEMENT_TIMEOUT: &str = "30s";
const DEFAULT_LOCK_TIMEOUT: &str = "2s";
const DEFAULT_IDLE_IN_TRANSACTION_TIMEOUT: &str = "3s";

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
        long = "db-acquire-timeout",
        env = "DB_ACQUIRE_TIMEOUT",
        default_value = DEFAULT_ACQUIRE_TIMEOUT,
        value_parser = humantime::parse_duration
    )]
    pub acquire_timeout: Duration,
    /// Longest a statement may run; the server cancels it then (0: no limit).
    #[arg(
        long = "db-statement-timeout",
        env = "DB_STATEMENT_TIMEOUT",
        default_value = DEFAULT_STATEMENT_TIMEOUT,
        value_parser = humantime::parse_duration
    )]
    pub statement_timeout: Duration,
    /// Longest a statement waits for a row or table lock (0: no limit).
    #[arg(
        long = "db-lock-timeout",
        env = "DB_LOCK_TIMEOUT",
        default_value = DEFAULT_LOCK_TIMEOUT,
        value_parser = humantime::parse_duration
    )]
    pub lock_timeout: Duration,
    /// A session idle inside an open transaction this long is ended by the
    /// server, and its locks with it: a stopped or cut-off process holds
    /// none longer (0: no limit).
    #[arg(
        long = "db-idle-in-transaction-timeout",
        env = "DB_IDLE_IN_TRANSACTION_TIMEOUT",
        default_value = DEFAULT_IDLE_IN_TRANSACTION_TIMEOUT,
        value_parser = humantime::parse_duration
    )]
    pub idle_in_transaction_timeout: Duration,
    /// At start-up, `apply` the migrations (safe from many processes at
    /// once: each takes sqlx's migration lock), or `wait` until they are
    /// applied by someone else (a release's migration job).
    #[arg(long, env = "MIGRATIONS", value_enum, default_value_t = Migrations::Apply)]
    pub migrations: Migrations,
}

/// What a process does with the migrations at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Migrations {
    /// Applies those not applied yet.
    Apply,
    /// Waits until they are all applied, applying none.
    Wait,
}

impl DatabaseArgs {
    /// Settings for a URL with the defaults above.
    pub fn from_url(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            acquire_timeout: duration(DEFAULT_ACQUIRE_TIMEOUT),
            statement_timeout: duration(DEFAULT_STATEMENT_TIMEOUT),
            lock_timeout: duration(DEFAULT_LOCK_TIMEOUT),
            idle_in_transaction_timeout: duration(DEFAULT_IDLE_IN_TRANSACTION_TIMEOUT),
            migrations: Migrations::Apply,
        }
    }

    /// Parsed connect options, tagged with `application_name`, with the
    /// session's timeouts.
    pub fn connect_options(&self, application_name: &str) -> Result<PgConnectOptions, sqlx::Error> {
        let options: PgConnectOptions = self.url.parse()?;
        let millis = |d: Duration| d.as_millis().to_string();
        Ok(options.application_name(application_name).options([
            ("statement_timeout", millis(self.statement_timeout)),
            ("lock_timeout", millis(self.lock_timeout)),
            (
                "idle_in_transaction_session_timeout",
                millis(self.idle_in_transaction_timeout),
            ),
        ]))
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
        match self.migrations {
            Migrations::Apply => {
                // Without the sessions' timeouts: a migration may run long
                // or wait for another process's migration lock.
                let unlimited = DatabaseArgs {
                    statement_timeout: Duration::ZERO,
                    lock_timeout: Duration::ZERO,
                    idle_in_transaction_timeout: Duration::ZERO,
                    max_connections: 1,
                    ..self.clone()
                };
                let migrating = unlimited
                    .pool(application_name)
                    .map_err(MigrateError::Settings)?;
                migrate_with_retry(&migrating, wait).await?;
                migrating.close().await;
            }
            Migrations::Wait => wait_for_migrations(&pool).await,
        }
        Ok(pool)
    }

    /// A lazily connecting pool: the process starts even while the database
    /// is down and recovers by itself when it returns.
    pub fn pool(&self, application_name: &str) -> Result<PgPool, sqlx::Error> {
        Ok(PgPoolOptions::new()
            .max_connections(self.max_connections)
            .min_connections(0)
            .acquire_timeout(self.acquire_timeout)
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

fn duration(text: &str) -> Duration {
    humantime::parse_duration(text).expect("a valid default")
}

/// A pooled connection idle this long is checked before use.
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

/// Errors of [`migrate`].
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The connection settings do not parse.
    #[error("bad database settings")]
    Settings(#[source] sqlx::Error),
    /// The engine's migrations (apalis' queue included) failed.
    #[error(transparent)]
    Engine(#[from] engine::MigrateError),
    /// The store's migrations failed.
    #[error("store schema migration failed")]
    Store(#[source] sqlx::migrate::MigrateError),
}

/// Applies the engine's schema, then the store's. Safe to run from many
/// processes at once: each takes sqlx's migration lock.
pub async fn migrate(pool: &PgPool) -> Result<(), MigrateError> {
    engine::run_migrations(pool).await?;
    MIGRATOR.run(pool).await.map_err(MigrateError::Store)
}

/// Whether the engine's and the store's migrations are all applied (the
/// API's readiness).
pub async fn migrations_applied(pool: &PgPool) -> Result<bool, sqlx::Error> {
    Ok(engine::migrations_applied(pool).await?
        && engine::migrator_applied(pool, &MIGRATOR, "_sqlx_migrations").await?)
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

/// Waits, however long it takes, until the migrations are all applied
/// (by a release's migration job), saying so every 10 s.
async fn wait_for_migrations(pool: &PgPool) {
    let mut waited = Duration::ZERO;
    let step = Duration::from_millis(500);
    loop {
        match migrations_applied(pool).await {
            Ok(true) => return,
            Ok(false) if waited.as_millis().is_multiple_of(10_000) => {
                tracing::info!(waited = ?waited, "waiting for the migrations to be applied (MIGRATIONS=wait)")
            }
            Err(e) if waited.as_millis().is_multiple_of(10_000) => {
                tracing::warn!(error = %error_chain(&e), "database not ready; waiting for the migrations")
            }
            _ => {}
        }
        tokio::time::sleep(step).await;
        waited += step;
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
