//! Retention against the real stack: with a short `WORKFLOW_RETENTION` the
//! engine's tables stay bounded under load while orders stay, and nothing
//! still needed is deleted (a checkout parked for payment, a finished
//! checkout whose dispatch has not run yet), and what is deleted is
//! vacuumed; an operator deletes a finished workflow on demand, never an
//! unfinished one.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use harness::{
    Api, Proc, TestDb, checkout, pay, restock, spawn_store_worker, wait_until, wait_workers,
};
use serde_json::Value;
use sqlx::PgPool;

const TOKEN: &str = "ops-token-0123456789abcdefghij";
const PATIENCE: Duration = Duration::from_secs(60);
/// How long 4 clients make flows (checkout, payment, dispatch): several
/// retention periods, so the tables reach their steady size.
const LOAD_FOR: Duration = Duration::from_secs(12);

const RETENTION: [(&str, &str); 5] = [
    ("WORKFLOW_RETENTION", "2s"),
    ("WORKFLOW_RETENTION_FAILED", "2s"),
    ("WORKER_PRUNE_AFTER", "2s"),
    ("DISPATCH_INTERVAL", "20ms"),
    // Parked checkouts stay parked for the whole test.
    ("PAYMENT_TIMEOUT", "10m"),
];

fn worker(db: &TestDb, label: &str, queues: &str) -> anyhow::Result<Proc> {
    let mut env = RETENTION.to_vec();
    env.push(("WORKER_QUEUES", queues));
    spawn_store_worker(db, label, &env)
}

async fn exists(pool: &PgPool, workflow_id: &str) -> anyhow::Result<bool> {
    Ok(
        sqlx::query_scalar("SELECT EXISTS (SELECT FROM engine.workflows WHERE id = $1)")
            .bind(workflow_id)
            .fetch_one(pool)
            .await?,
    )
}

/// Rows of the engine's workflow tables.
async fn engine_rows(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM engine.workflows) + (SELECT count(*) FROM engine.workflow_steps)
              + (SELECT count(*) FROM engine.workflow_events) + (SELECT count(*) FROM engine.workflow_messages)",
    )
    .fetch_one(pool)
    .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_the_tables_bounded_and_deletes_nothing_still_needed() -> anyhow::Result<()>
{
    let db = TestDb::create().await?;
    let api = Arc::new(Api::start(&db, &[]).await?);
    restock(&api, 100_000).await?;
    // Checkouts only, at first: a paid checkout's dispatch waits in its queue.
    let _checkouts = worker(&db, "retention-checkout", "checkout")?;
    wait_workers(&db.pool, 1).await?;
    let parked = checkout(&api).await?;
    let parent = checkout(&api).await?;
    let order = pay(&api, &parent, "paid").await?;
    let failed = checkout(&api).await?;
    pay(&api, &failed, "failed").await?;
    wait_until("a finished checkout deleted", PATIENCE, || async {
        Ok(!exists(&db.pool, &failed).await?)
    })
    .await?;
    assert!(exists(&db.pool, &parked).await?, "a parked checkout stays");
    assert!(
        exists(&db.pool, &parent).await?,
        "a finished checkout whose dispatch has not run stays"
    );

    // Dispatches run; then a steady load while retention deletes.
    let _all = [
        worker(&db, "retention-a", "checkout,dispatch")?,
        worker(&db, "retention-b", "checkout,dispatch")?,
    ];
    wait_workers(&db.pool, 3).await?;
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let pool = db.pool.clone();
        let sampling = sampling.clone();
        tokio::spawn(async move {
            let mut samples = Vec::new();
            while sampling.load(Ordering::Relaxed) {
                samples.push(engine_rows(&pool).await?);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            anyhow::Ok(samples)
        })
    };
    let mut clients = Vec::new();
    let until = tokio::time::Instant::now() + LOAD_FOR;
    for _ in 0..4 {
        let api = api.clone();
        clients.push(tokio::spawn(async move {
            let mut flows = 0;
            while tokio::time::Instant::now() < until {
                let payment_id = checkout(&api).await?;
                pay(&api, &payment_id, "paid").await?;
                flows += 1;
            }
            anyhow::Ok(flows)
        }));
    }
    let mut flows = 0;
    for client in clients {
        flows += client.await??;
    }
    wait_until("the load's dispatches done", PATIENCE, || async {
        let left: i64 =
            sqlx::query_scalar("SELECT count(*) FROM orders WHERE status IN ('PENDING', 'PAID')")
                .fetch_one(&db.pool)
                .await?;
        Ok(left == 1) // the parked checkout's
    })
    .await?;
    wait_until("every finished workflow deleted", PATIENCE, || async {
        let finished: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM engine.workflows WHERE status IN ('succeeded', 'failed', 'cancelled')",
        )
        .fetch_one(&db.pool)
        .await?;
        Ok(finished == 0)
    })
    .await?;
    // What was deleted is vacuumed by the workers themselves (a server may
    // run without autovacuum, and deleted rows then take space for ever).
    wait_until(
        "the workers' VACUUM of the deleted rows",
        PATIENCE,
        || async {
            let unvacuumed: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_user_tables
             WHERE (schemaname, relname) IN (('engine', 'workflows'), ('engine', 'workflow_steps'),
                                             ('apalis', 'jobs'))
               AND vacuum_count = 0",
            )
            .fetch_one(&db.pool)
            .await?;
            Ok(unvacuumed == 0)
        },
    )
    .await?;
    sampling.store(false, Ordering::Relaxed);
    let samples = sampler.await??;

    assert!(
        !exists(&db.pool, &parent).await?,
        "deleted once its dispatch ended"
    );
    assert!(
        exists(&db.pool, &parked).await?,
        "still parked, still there"
    );
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(
        orders as usize,
        flows + 3,
        "orders are business records: all stay"
    );
    let dispatched: String = sqlx::query_scalar("SELECT status FROM orders WHERE id = $1")
        .bind(order)
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(dispatched, "DISPATCHED");
    // Each flow leaves about 20 rows (two workflows, their steps, events
    // and messages), all of which would stay without retention.
    let peak = samples.iter().copied().max().unwrap_or_default();
    let half = samples.len() / 2;
    let first_peak = samples[..half].iter().copied().max().unwrap_or_default();
    let second_peak = samples[half..].iter().copied().max().unwrap_or_default();
    eprintln!(
        "{flows} flows; engine rows: peak {peak} over {} samples (first half {first_peak}, second {second_peak})",
        samples.len(),
    );
    assert!(
        (peak as usize) < flows * 20 / 2,
        "bounded: peak {peak} rows for {flows} flows"
    );
    assert!(
        second_peak * 2 <= first_peak * 3 + 200,
        "no growth under constant load: {first_peak} then {second_peak}"
    );
    let orphans: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM engine.workflow_steps s
         WHERE NOT EXISTS (SELECT FROM engine.workflows w WHERE w.id = s.workflow_id)",
    )
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(orphans, 0, "steps go with their workflow");
    db.drop_database().await
}

#[tokio::test]
async fn an_operator_deletes_a_finished_workflow_but_not_an_unfinished_one() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let token = format!("ops={TOKEN}");
    let api = Api::start(&db, &[("ADMIN_TOKEN", token.as_str())]).await?;
    let _worker = spawn_store_worker(&db, "delete-worker", &[("PAYMENT_TIMEOUT", "10m")])?;
    wait_workers(&db.pool, 1).await?;
    let bearer = format!("Bearer {TOKEN}");
    let delete = |id: String| {
        let api = &api;
        let bearer = bearer.clone();
        async move {
            let (status, text) = api
                .call_with(
                    "DELETE",
                    &format!("/admin/workflows/{id}"),
                    None,
                    &[("authorization", &bearer)],
                )
                .await?;
            let body: Value = serde_json::from_str(&text)?;
            anyhow::Ok((status, body))
        }
    };
    let parked = checkout(&api).await?;
    let (status, body) = delete(parked.clone()).await?;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("not_finished"))
    );
    assert!(exists(&db.pool, &parked).await?);

    let failed = checkout(&api).await?;
    let order = pay(&api, &failed, "failed").await?;
    let (status, body) = delete(failed.clone()).await?;
    assert_eq!((status, body["outcome"].as_str()), (200, Some("deleted")));
    assert!(!exists(&db.pool, &failed).await?);
    let steps: i64 =
        sqlx::query_scalar("SELECT count(*) FROM engine.workflow_steps WHERE workflow_id = $1")
            .bind(&failed)
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(steps, 0, "its steps went with it");
    let order_status: String = sqlx::query_scalar("SELECT status FROM orders WHERE id = $1")
        .bind(order)
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(order_status, "CANCELLED", "its order stays");

    let (status, body) = delete(failed).await?;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("unknown_workflow"))
    );
    let (status, _) = api
        .call("DELETE", &format!("/admin/workflows/{parked}"), None)
        .await?;
    assert_eq!(status, 401, "no token");
    db.drop_database().await
}
