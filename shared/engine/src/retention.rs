//! Retention: finished workflows are deleted once they are old enough, with
//! their checkpoints, events and messages (the foreign keys cascade), in
//! small batches, so the engine's tables stay bounded under constant load.
//! A finished workflow a still unfinished one was started by is kept until
//! that one finishes. Queue jobs go by the queue janitor
//! (`queue::prune_jobs`).

use std::time::Duration;

use sqlx::PgPool;

use crate::sql;

/// Rows one statement deletes at most: each batch is a short transaction,
/// so the hot path never waits long on it.
const BATCH: i64 = 500;

/// Advisory lock key of the retention pass's VACUUM (one worker at a time).
const VACUUM_LOCK_KEY: i64 = 0x454E_4749_4E45_5245; // "ENGINERE"

/// How long finished workflows are kept; `None`: for ever.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Retention {
    /// Succeeded and cancelled ones.
    pub(crate) finished: Option<Duration>,
    /// Failed ones.
    pub(crate) failed: Option<Duration>,
}

/// Deletes the finished workflows older than their retention, a batch at a
/// time, then vacuums the engine's tables when it deleted any. Returns how
/// many it deleted.
pub(crate) async fn delete_expired(
    pool: &PgPool,
    retention: Retention,
) -> Result<u64, sqlx::Error> {
    let seconds = |d: Option<Duration>| d.map(|d| d.as_secs_f64());
    let deleted = in_batches(BATCH, || async {
        Ok(sqlx::query(sql::DELETE_EXPIRED)
            .bind(seconds(retention.finished))
            .bind(seconds(retention.failed))
            .bind(BATCH)
            .execute(pool)
            .await?
            .rows_affected())
    })
    .await?;
    if deleted > 0 {
        vacuum(pool, VACUUM_LOCK_KEY, sql::VACUUM_WORKFLOWS).await?;
    }
    Ok(deleted)
}

/// Runs `delete` (a statement deleting at most `size` rows, returning how
/// many it deleted) until it deletes fewer, letting the hot path in between
/// batches: each is a short transaction. Returns the rows deleted in all.
pub(crate) async fn in_batches<F, Fut>(size: i64, mut delete: F) -> Result<u64, sqlx::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<u64, sqlx::Error>>,
{
    let mut deleted = 0;
    loop {
        let batch = delete().await?;
        deleted += batch;
        if batch < size as u64 {
            return Ok(deleted);
        }
        tokio::task::yield_now().await;
    }
}

/// Runs `vacuum` (a VACUUM statement) unless another worker is running the
/// one under `lock_key`, without the session's statement and lock timeouts
/// (a VACUUM may take long, and it cannot run in a transaction, so they are
/// lifted for the session and reset after). A server may run with
/// autovacuum off, and deleted rows then never leave.
pub(crate) async fn vacuum(
    pool: &PgPool,
    lock_key: i64,
    vacuum: &'static str,
) -> Result<(), sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(lock_key)
        .fetch_one(&mut *conn)
        .await?;
    if !locked {
        return Ok(());
    }
    let vacuumed = async {
        // One statement per query: a prepared statement holds one command.
        for statement in [
            "SET statement_timeout = 0",
            "SET lock_timeout = 0",
            vacuum,
            "RESET statement_timeout",
            "RESET lock_timeout",
        ] {
            sqlx::query(statement).execute(&mut *conn).await?;
        }
        sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(lock_key)
            .execute(&mut *conn)
            .await?;
        Ok(())
    }
    .await;
    if vacuumed.is_err() {
        // The session may still hold the lock or lack its timeouts: end it
        // rather than give it back to the pool.
        let _ = conn.close().await;
    }
    vacuumed
}
