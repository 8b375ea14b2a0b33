//! The sessions' timeouts against a real stopped process: a worker frozen
//! (SIGSTOP) inside the open transaction of a checkout's reservation holds
//! the product row; the server ends its session after
//! `DB_IDLE_IN_TRANSACTION_TIMEOUT` (3 s), so another worker's checkouts
//! wait for that lock no longer (a lock wait that times out is retried, not
//! failed), and the frozen worker, woken, replays its checkout: one order
//! each, stock conserved.

use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::{Api, TestDb, checkout, inventory, spawn_store_worker, wait_until, wait_workers};

const PATIENCE: Duration = Duration::from_secs(30);

/// Whether process `pid` is stopped (state `T` in /proc).
fn stopped(pid: u32) -> anyhow::Result<bool> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    Ok(state == Some("T"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_holding_the_product_row_holds_it_no_longer_than_the_timeout()
-> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let api = Arc::new(Api::start(&db, &[]).await?);
    let parked = [("PAYMENT_TIMEOUT", "10m")];
    let frozen = spawn_store_worker(
        &db,
        "frozen",
        &[
            ("WORKER_CRASH_AT", "freeze:reserve_inventory"),
            ("PAYMENT_TIMEOUT", "10m"),
        ],
    )?;
    wait_workers(&db.pool, 1).await?;
    // The only worker takes the first checkout and stops inside its
    // reservation, the product row locked.
    let first = {
        let api = api.clone();
        tokio::spawn(async move { checkout(&api).await })
    };
    wait_until(
        "the worker stopped in its transaction",
        PATIENCE,
        || async { stopped(frozen.pid()) },
    )
    .await?;
    let frozen_at = Instant::now();
    let _other = spawn_store_worker(&db, "other", &parked)?;
    wait_workers(&db.pool, 2).await?;

    let second = checkout(&api).await?;
    let waited = frozen_at.elapsed();
    eprintln!("a checkout behind the stopped worker's lock answered {waited:?} after the freeze");
    anyhow::ensure!(
        waited < Duration::from_secs(6),
        "the row lock outlived the idle-in-transaction timeout: {waited:?}"
    );
    let mut others = vec![second];
    for _ in 0..5 {
        others.push(checkout(&api).await?);
    }

    // Woken, the frozen worker finds its session ended and replays.
    frozen.signal("CONT")?;
    let first = first.await??;
    wait_until("every checkout parked for payment", PATIENCE, || async {
        let busy: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM engine.workflows WHERE status IN ('enqueued', 'running')",
        )
        .fetch_one(&db.pool)
        .await?;
        Ok(busy == 0)
    })
    .await?;
    others.push(first);
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE checkout_id = ANY($1)")
        .bind(&others)
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(orders, others.len() as i64, "one order per checkout");
    let failed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM engine.workflows WHERE status = 'failed'")
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(failed, 0, "a lock timeout is retried, never a failure");
    assert_eq!(
        inventory(&db.pool).await? + orders,
        i64::from(store::DEFAULT_STOCK),
        "stock conserved"
    );
    db.drop_database().await
}
