//! The query KEDA scales the workers on (`deploy/k8s/base/keda-backlog.sql`)
//! against a real database: 0 when idle, rising with the backlog of
//! checkouts no worker has taken yet, and back to 0 once a worker has run
//! them all (parked for payment, they hold no slot).

use std::time::Duration;

use engine::Engine;
use harness::{TestDb, spawn_store_worker, wait_until, wait_workers};
use sqlx::PgPool;
use store::{CHECKOUT, CheckoutInput};

async fn workers_needed(pool: &PgPool) -> anyhow::Result<i32> {
    let query = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/k8s/base/keda-backlog.sql"
    ))?;
    Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(query))
        .fetch_one(pool)
        .await?)
}

async fn start_checkouts(engine: &Engine, ids: std::ops::Range<usize>) -> anyhow::Result<()> {
    let input = CheckoutInput {
        product_id: 1,
        request_id: None,
        client: None,
    };
    for i in ids {
        engine.start(CHECKOUT, &format!("keda-{i}"), &input).await?;
    }
    Ok(())
}

#[tokio::test]
async fn the_keda_query_rises_with_the_backlog_and_falls_to_zero_when_idle() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let engine = Engine::new(db.pool.clone());
    assert_eq!(workers_needed(&db.pool).await?, 0, "idle");
    // No worker yet: every checkout's job waits. 32 slots per worker.
    start_checkouts(&engine, 0..40).await?;
    assert_eq!(workers_needed(&db.pool).await?, 2, "40 ready jobs");
    start_checkouts(&engine, 40..100).await?;
    assert_eq!(workers_needed(&db.pool).await?, 4, "100 ready jobs");

    let _worker = spawn_store_worker(&db, "keda-worker", &[("PAYMENT_TIMEOUT", "10m")])?;
    wait_workers(&db.pool, 1).await?;
    wait_until(
        "every checkout run and parked",
        Duration::from_secs(60),
        || async {
            let parked: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM engine.workflows WHERE kind = 'checkout' AND status = 'waiting'",
        )
        .fetch_one(&db.pool)
        .await?;
            Ok(parked == 100)
        },
    )
    .await?;
    assert_eq!(
        workers_needed(&db.pool).await?,
        0,
        "idle again: parked checkouts hold no slot"
    );
    db.drop_database().await
}
