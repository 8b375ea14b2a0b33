//! A hung worker under load: one of three workers frozen with SIGSTOP for
//! 40 s while shoppers buy (checkout, payment, a dispatch of ten steps).
//! Its advisory lock stays held, but its heartbeat stops: the others take
//! its workflows over after `WORKER_STALE_AFTER` (3 s), so no flow takes
//! more than 5 s beyond its normal time; woken, it learns it was silent too
//! long and its executions in flight stop; every dispatch step applied once.

use std::sync::Arc;
use std::time::Duration;

use harness::{
    Api, TestDb, assert_flows_taken_over, assert_progress_applied_once, normal_flow_latency,
    restock, shoppers_until, spawn_store_worker, wait_for_log, wait_workers,
};
use tokio::time::Instant;

const FROZEN_FOR: Duration = Duration::from_secs(40);
const CLIENTS: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_worker_is_taken_over_within_seconds_and_stops_what_it_lost() -> anyhow::Result<()>
{
    let db = TestDb::create().await?;
    let api = Arc::new(Api::start(&db, &[]).await?);
    restock(&api, 100_000).await?;
    let env = [("DISPATCH_INTERVAL", "100ms")];
    let frozen = spawn_store_worker(&db, "hung", &env)?;
    let _others = [
        spawn_store_worker(&db, "hung-peer-a", &env)?,
        spawn_store_worker(&db, "hung-peer-b", &env)?,
    ];
    wait_workers(&db.pool, 3).await?;

    // Normal latency first, with nothing frozen.
    let normal = normal_flow_latency(&api).await?;
    let load = shoppers_until(
        api.clone(),
        CLIENTS,
        Instant::now() + FROZEN_FOR + Duration::from_secs(4),
    );
    let frozen_id: String = sqlx::query_scalar("SELECT id FROM engine.workers WHERE pid = $1")
        .bind(frozen.pid() as i32)
        .fetch_one(&db.pool)
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await; // mid-load
    frozen.signal("STOP")?;
    tokio::time::sleep(FROZEN_FOR).await; // the freeze itself
    let woken_at: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&db.pool)
        .await?;
    frozen.signal("CONT")?;

    let flows = load.await??;
    assert_flows_taken_over(
        &db.pool,
        &flows,
        normal,
        &format!("a {FROZEN_FOR:?} freeze"),
    )
    .await?;
    // Woken, it found itself silent too long; none of its old executions
    // wrote a step after another worker had taken their workflow over.
    wait_for_log(
        &frozen,
        "silent past WORKER_STALE_AFTER",
        Duration::from_secs(10),
    )
    .await?;
    let late: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM engine.workflow_steps a
         WHERE a.worker_id = $1 AND a.finished_at > $2 AND a.finished_at < $2 + interval '2 seconds'
           AND EXISTS (SELECT FROM engine.workflow_steps b
                       WHERE b.workflow_id = a.workflow_id AND b.worker_id <> $1
                         AND b.finished_at < $2 AND b.step_seq < a.step_seq)",
    )
    .bind(&frozen_id)
    .bind(woken_at)
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(
        late, 0,
        "the woken worker went on with workflows taken from it"
    );
    db.drop_database().await
}

/// A live but slow fleet: both cores saturated by a CPU hog for a minute
/// under load. A worker starved past `WORKER_STALE_AFTER` would be taken
/// over while alive; the test counts such takeovers (reported, not
/// forbidden) and requires them harmless: every order dispatched, each
/// progress step applied once, no workflow failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_machine_takes_over_no_live_worker_harmfully() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let api = Arc::new(Api::start(&db, &[]).await?);
    restock(&api, 100_000).await?;
    let env = [("DISPATCH_INTERVAL", "100ms")];
    let workers = [
        spawn_store_worker(&db, "hog-a", &env)?,
        spawn_store_worker(&db, "hog-b", &env)?,
        spawn_store_worker(&db, "hog-c", &env)?,
    ];
    wait_workers(&db.pool, 3).await?;
    // One busy process per core, at the workers' own priority.
    let hogs: Vec<_> = (0..2)
        .map(|_| {
            std::process::Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .spawn()
        })
        .collect::<Result<_, _>>()?;
    let load = shoppers_until(
        api.clone(),
        CLIENTS,
        Instant::now() + Duration::from_secs(60),
    );
    let flows = load.await?;
    for mut hog in hogs {
        let _ = hog.kill();
        let _ = hog.wait();
    }
    let flows = flows?;
    let mut live_takeovers = 0;
    for worker in &workers {
        live_takeovers += std::fs::read_to_string(&worker.log)?
            .matches("silent past WORKER_STALE_AFTER")
            .count();
    }
    let slowest = flows
        .iter()
        .map(|(_, took)| *took)
        .max()
        .unwrap_or_default();
    eprintln!(
        "{} flows in 60 s on saturated cores; slowest {slowest:?}; live workers taken over: {live_takeovers}",
        flows.len()
    );
    for (order_id, _) in &flows {
        assert_progress_applied_once(&db.pool, *order_id).await?;
    }
    let failed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM engine.workflows WHERE status = 'failed'")
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(failed, 0, "no workflow failed");
    db.drop_database().await
}
