//! Rolling deploys: a fleet of version A replaced worker by worker with
//! version B under checkout load, with checkouts parked for payment on A.
//! B's checkout has one more step before `create_order` (the engine's test
//! revision): guarded by a patch marker, B adopts A's parked checkouts and
//! keeps their old path; unguarded, they wait for an A worker, visibly, and
//! finish when one starts again. Either way no workflow fails, none is
//! stuck, and stock is conserved.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use harness::{
    Api, Proc, TestDb, checkout, inventory, pay, spawn_store_worker, wait_until, wait_workers,
};
use serde_json::Value;
use sqlx::PgPool;

const TOKEN: &str = "ops-token-0123456789abcdefghij";
const PATIENCE: Duration = Duration::from_secs(60);
const PATCHED: &str = "patched:checkout/create_order";
const UNGUARDED: &str = "unguarded:checkout/create_order";
/// Checkouts parked for payment on version A before the deploy.
const PARKED: usize = 8;
/// Checkouts (each paid at once) the load makes at most: the stock (100)
/// never runs out.
const LOAD_MAX: usize = 40;

async fn api(db: &TestDb) -> anyhow::Result<Api> {
    let token = format!("ops={TOKEN}");
    Api::start(db, &[("ADMIN_TOKEN", token.as_str())]).await
}

/// A worker of `version`, running `revision` of the checkout if any.
fn worker(db: &TestDb, label: &str, version: &str, revision: Option<&str>) -> anyhow::Result<Proc> {
    let mut env = vec![
        ("APP_VERSION", version),
        ("DISPATCH_INTERVAL", "50ms"),
        // Parked checkouts stay parked for the whole test.
        ("PAYMENT_TIMEOUT", "10m"),
    ];
    if let Some(revision) = revision {
        env.push(("WORKER_TEST_REVISION", revision));
    }
    spawn_store_worker(db, label, &env)
}

/// SIGTERM, then waits for the drain to end with exit 0.
async fn stop(mut worker: Proc) -> anyhow::Result<()> {
    worker.signal("TERM")?;
    let code = worker.wait_exit(Duration::from_secs(30)).await?;
    anyhow::ensure!(code == Some(0), "a drained worker exits 0, got {code:?}");
    Ok(())
}

/// Checkouts, each paid at once, until `stop` or [`LOAD_MAX`].
fn start_load(
    api: Arc<Api>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<anyhow::Result<usize>> {
    tokio::spawn(async move {
        let mut made = 0;
        while !stop.load(Ordering::Relaxed) && made < LOAD_MAX {
            let payment_id = checkout(&api).await?;
            pay(&api, &payment_id, "paid").await?;
            made += 1;
        }
        Ok(made)
    })
}

/// `GET /admin/versions`: (version, kind) -> (unfinished, stranded).
async fn versions(api: &Api) -> anyhow::Result<Vec<(String, String, i64, bool)>> {
    let bearer = format!("Bearer {TOKEN}");
    let (status, text) = api
        .call_with(
            "GET",
            "/admin/versions",
            None,
            &[("authorization", &bearer)],
        )
        .await?;
    anyhow::ensure!(status == 200, "versions: {status} {text}");
    let rows: Vec<Value> = serde_json::from_str(&text)?;
    Ok(rows
        .iter()
        .map(|row| {
            (
                row["version"].as_str().unwrap_or("none").to_owned(),
                row["kind"].as_str().unwrap_or_default().to_owned(),
                row["unfinished"].as_i64().unwrap_or_default(),
                row["stranded"].as_bool().unwrap_or_default(),
            )
        })
        .collect())
}

/// Unfinished workflows of `version` and `kind`.
async fn unfinished(api: &Api, version: &str, kind: &str) -> anyhow::Result<i64> {
    Ok(versions(api)
        .await?
        .iter()
        .filter(|(v, k, _, _)| v == version && k == kind)
        .map(|(_, _, n, _)| n)
        .sum())
}

async fn version_of(pool: &PgPool, workflow_id: &str) -> anyhow::Result<Option<String>> {
    Ok(
        sqlx::query_scalar("SELECT version FROM engine.workflows WHERE id = $1")
            .bind(workflow_id)
            .fetch_one(pool)
            .await?,
    )
}

async fn step_names(pool: &PgPool, workflow_id: &str) -> anyhow::Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT name FROM engine.workflow_steps WHERE workflow_id = $1 ORDER BY step_seq",
    )
    .bind(workflow_id)
    .fetch_all(pool)
    .await?)
}

/// Every order settled, no workflow failed or unfinished, stock conserved.
async fn assert_settled(pool: &PgPool) -> anyhow::Result<()> {
    wait_until("every order dispatched or cancelled", PATIENCE, || async {
        let open: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM orders WHERE status NOT IN ('DISPATCHED', 'CANCELLED')",
        )
        .fetch_one(pool)
        .await?;
        let unfinished: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM engine.workflows WHERE status IN ('enqueued', 'running', 'waiting')",
        )
        .fetch_one(pool)
        .await?;
        Ok(open == 0 && unfinished == 0)
    })
    .await?;
    let failed: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT id, error FROM engine.workflows WHERE status = 'failed'")
            .fetch_all(pool)
            .await?;
    anyhow::ensure!(failed.is_empty(), "workflows failed: {failed:?}");
    let held: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE status <> 'CANCELLED'")
        .fetch_one(pool)
        .await?;
    let stock = inventory(pool).await?;
    anyhow::ensure!(
        stock + held == i64::from(store::DEFAULT_STOCK),
        "stock {stock} + units sold {held} != {}",
        store::DEFAULT_STOCK
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patched_version_takes_over_parked_checkouts_and_keeps_their_old_path()
-> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let api = Arc::new(api(&db).await?);
    let a1 = worker(&db, "a1", "A", None)?;
    let a2 = worker(&db, "a2", "A", None)?;
    wait_workers(&db.pool, 2).await?;
    let mut parked = Vec::new();
    for _ in 0..PARKED {
        parked.push(checkout(&api).await?);
    }
    for id in &parked {
        assert_eq!(version_of(&db.pool, id).await?.as_deref(), Some("A"));
    }

    let stop_load = Arc::new(AtomicBool::new(false));
    let load = start_load(api.clone(), stop_load.clone());
    // Worker by worker: B joins, becomes the current version (new
    // checkouts go to it), A drains.
    let b1 = worker(&db, "b1", "B", Some(PATCHED))?;
    wait_workers(&db.pool, 3).await?;
    let new_on_b = wait_until("a new checkout runs on B", PATIENCE, || async {
        let payment_id = checkout(&api).await?;
        pay(&api, &payment_id, "paid").await?;
        Ok(version_of(&db.pool, &payment_id).await?.as_deref() == Some("B"))
    })
    .await;
    new_on_b?;
    stop(a1).await?;
    let b2 = worker(&db, "b2", "B", Some(PATCHED))?;
    wait_workers(&db.pool, 2).await?;
    // A finishes what only A runs (its dispatches); its parked checkouts
    // wait for their payment.
    wait_until("A's dispatches done", PATIENCE, || async {
        Ok(unfinished(&api, "A", "dispatch").await? == 0)
    })
    .await?;
    stop(a2).await?;
    wait_workers(&db.pool, 2).await?;
    let stranded = versions(&api).await?;
    anyhow::ensure!(
        stranded.iter().all(|(_, _, _, stranded)| !stranded),
        "B adopts A's checkouts: none stranded, got {stranded:?}"
    );

    // A's parked checkouts, paid or failed now, finish on B.
    for (i, payment_id) in parked.iter().enumerate() {
        pay(&api, payment_id, if i % 2 == 0 { "paid" } else { "failed" }).await?;
    }
    stop_load.store(true, Ordering::Relaxed);
    let made = load.await??;
    assert_settled(&db.pool).await?;

    // A's histories kept their old path; B's own took the new one.
    for id in &parked {
        let steps = step_names(&db.pool, id).await?;
        anyhow::ensure!(
            !steps.iter().any(|s| s.contains("test")),
            "an A checkout took no new step: {steps:?}"
        );
    }
    let new_path: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM engine.workflows w WHERE w.kind = 'checkout' AND w.version = 'B'
           AND EXISTS (SELECT FROM engine.workflow_steps s
                       WHERE s.workflow_id = w.id AND s.name = '$patch:test-revision')
           AND EXISTS (SELECT FROM engine.workflow_steps s
                       WHERE s.workflow_id = w.id AND s.name = 'test_revision')",
    )
    .fetch_one(&db.pool)
    .await?;
    anyhow::ensure!(new_path >= 1, "B's checkouts take the new step");
    eprintln!("load: {made} checkouts during the deploy; {new_path} took B's new step");
    drop((b1, b2));
    db.drop_database().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_marker_a_histories_wait_visibly_for_an_a_worker_then_finish()
-> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let api = Arc::new(api(&db).await?);
    let a1 = worker(&db, "a1", "A", None)?;
    wait_workers(&db.pool, 1).await?;
    let mut parked = Vec::new();
    for _ in 0..PARKED {
        parked.push(checkout(&api).await?);
    }
    let b1 = worker(&db, "b1", "B", Some(UNGUARDED))?;
    wait_workers(&db.pool, 2).await?;
    stop(a1).await?;
    wait_workers(&db.pool, 1).await?;

    // Paid now: the payments are recorded, but only an A worker may run
    // these histories (B's code differs and guards nothing).
    let payments: Vec<_> = parked
        .iter()
        .map(|payment_id| {
            let api = api.clone();
            let payment_id = payment_id.clone();
            tokio::spawn(async move { pay(&api, &payment_id, "paid").await })
        })
        .collect();
    // B keeps selling meanwhile.
    let sold_on_b = checkout(&api).await?;
    pay(&api, &sold_on_b, "paid").await?;
    assert_eq!(
        version_of(&db.pool, &sold_on_b).await?.as_deref(),
        Some("B")
    );
    wait_until("the A checkouts shown stranded", PATIENCE, || async {
        Ok(versions(&api).await?.iter().any(|(v, k, n, stranded)| {
            v == "A" && k == "checkout" && *n == PARKED as i64 && *stranded
        }))
    })
    .await?;
    let (status, metrics) = api.call("GET", "/metrics", None).await?;
    anyhow::ensure!(status == 200, "metrics: {status}");
    let line = metrics
        .lines()
        .find(|l| l.starts_with("engine_stranded_workflows{") && l.contains("version=\"A\""))
        .context("engine_stranded_workflows for version A")?;
    anyhow::ensure!(line.ends_with(&format!(" {PARKED}")), "{line}");
    let paid: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM orders WHERE checkout_id = ANY($1) AND status <> 'PENDING'",
    )
    .bind(&parked)
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(paid, 0, "no A checkout ran on B");

    // An A worker again: they finish.
    let a2 = worker(&db, "a2", "A", None)?;
    for payment in payments {
        payment.await??;
    }
    assert_settled(&db.pool).await?;
    drop((b1, a2));
    db.drop_database().await
}
