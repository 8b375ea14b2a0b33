//! The engine's schema: apalis-postgres' queue (its own migrations, in the
//! `apalis` schema), then the engine's (shipped in this crate's
//! `migrations/`, applied to the schema `engine` and recorded in
//! `engine._sqlx_migrations`, apart from the application's own).

use sqlx::PgPool;
use sqlx::migrate::Migrator;

/// Errors of [`run_migrations`].
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// apalis-postgres' own migrations failed.
    #[error("queue schema migration failed")]
    Queue(#[source] apalis_postgres::Error),
    /// The engine's migrations failed.
    #[error("engine schema migration failed")]
    Engine(#[source] sqlx::migrate::MigrateError),
}

/// The engine's migrations, kept in their own table.
fn migrator() -> Migrator {
    let mut migrator = sqlx::migrate!("./migrations");
    migrator.create_schema("engine");
    migrator.dangerous_set_table_name("engine._sqlx_migrations");
    migrator
}

/// Creates or updates everything the engine needs in the database: apalis'
/// queue schema first (the engine's migrations tune `apalis.jobs`), then the
/// engine's own. Safe to run from many processes at once: both take sqlx's
/// migration lock.
pub async fn run_migrations(pool: &PgPool) -> Result<(), MigrateError> {
    apalis_postgres::PostgresStorage::setup(pool)
        .await
        .map_err(MigrateError::Queue)?;
    migrator().run(pool).await.map_err(MigrateError::Engine)
}

/// Whether every migration of the engine's is applied (for a readiness
/// probe); false while its schema is missing.
pub async fn migrations_applied(pool: &PgPool) -> Result<bool, sqlx::Error> {
    migrator_applied(pool, &migrator(), "engine._sqlx_migrations").await
}

/// Whether the newest migration of `migrator` is recorded as applied in
/// `table`; false while that table is missing.
pub async fn migrator_applied(
    pool: &PgPool,
    migrator: &Migrator,
    table: &str,
) -> Result<bool, sqlx::Error> {
    let latest = migrator.iter().map(|m| m.version).max();
    let sql = format!("SELECT max(version) FROM {table} WHERE success");
    match sqlx::query_scalar::<_, Option<i64>>(sqlx::AssertSqlSafe(sql))
        .fetch_one(pool)
        .await
    {
        Ok(applied) => Ok(applied >= latest),
        // 42P01: the table does not exist yet.
        Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42P01") => Ok(false),
        Err(e) => Err(e),
    }
}
