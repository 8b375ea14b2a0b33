//! The engine's benchmark: no-op three-step workflows through real queues
//! and real worker processes, then takeover time after SIGKILL.
//!
//!   cargo run --release -p widget-tests --bin engine-bench -- --workflows 5000
//!
//! Needs `cargo build --release --bins` first (it runs the release
//! `engine-test-worker`) and a PostgreSQL reachable at WIDGET_TEST_ADMIN_URL
//! (default postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use engine::Engine;
use harness::workflows::{self, NOOP, TICKER, TickerInput};
use harness::{Proc, TestDb, wait_step_elsewhere, wait_until, worker_env};
use rand::Rng;
use serde_json::json;
use sqlx::PgPool;

#[derive(Parser)]
struct Args {
    /// No-op three-step workflows to run.
    #[arg(long, default_value_t = 5000)]
    workflows: usize,
    /// Worker processes for the throughput run.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Concurrency of each worker.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// SIGKILLs for the takeover measurement.
    #[arg(long, default_value_t = 20)]
    kills: usize,
}

fn worker_bin() -> PathBuf {
    harness::target_dir().join("release/engine-test-worker")
}

fn spawn(db: &TestDb, concurrency: &str) -> anyhow::Result<Proc> {
    let env = worker_env(
        db,
        &[
            ("WORKER_QUEUES", "engine"),
            ("WORKER_CONCURRENCY", concurrency),
            ("WORKER_PRUNE_AFTER", "10000ms"),
            ("RUST_LOG", "warn"),
        ],
    );
    Proc::spawn("bench-worker", &worker_bin(), &[], &env)
}

async fn scalar(pool: &PgPool, sql: &'static str) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(sql).fetch_one(pool).await?)
}

async fn commits(pool: &PgPool) -> anyhow::Result<i64> {
    scalar(
        pool,
        "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
    )
    .await
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        worker_bin().exists(),
        "build first: cargo build --release --bins"
    );
    println!(
        "engine benchmark: {} no-op 3-step workflows, {} worker(s) x concurrency {}",
        args.workflows, args.workers, args.concurrency
    );

    // Throughput.
    let db = TestDb::create().await?;
    workflows::create_tables(&db.pool).await?;
    let concurrency = args.concurrency.to_string();
    let workers: Vec<Proc> = (0..args.workers)
        .map(|_| spawn(&db, &concurrency))
        .collect::<Result<_, _>>()?;
    wait_until("workers registered", Duration::from_secs(30), || async {
        Ok(scalar(&db.pool, "SELECT count(*) FROM workers").await? == args.workers as i64)
    })
    .await?;
    let engine = Engine::new(db.pool.clone());
    let commits_before = commits(&db.pool).await?;
    let started = Instant::now();
    let lanes = 8;
    // Start from 8 client tasks while the progress is sampled, so the rate
    // per tenth of the run is measured from the first workflow on.
    let starting = tokio::spawn({
        let engine = engine.clone();
        let total = args.workflows;
        async move {
            futures::future::try_join_all((0..lanes).map(|lane| {
                let engine = engine.clone();
                async move {
                    for i in (lane..total).step_by(lanes) {
                        engine
                            .start(NOOP, &format!("noop-{i}"), &json!(null))
                            .await?;
                    }
                    anyhow::Ok(())
                }
            }))
            .await
            .map(|_| ())
        }
    });
    let mut polls = 0;
    let tenth = (args.workflows / 10).max(1) as i64;
    let mut next_mark = tenth;
    // The count is sampled every 250 ms; the moment a tenth was reached is
    // interpolated between the two samples around it, so a sample that
    // crosses two marks does not give the second a duration of nothing.
    let mut last_sample = (Instant::now(), 0_i64);
    let mut last_mark = last_sample.0;
    let mut tenths = Vec::new();
    loop {
        polls += 1;
        let done = scalar(
            &db.pool,
            "SELECT count(*) FROM workflows WHERE status = 'succeeded'",
        )
        .await?;
        let now = Instant::now();
        while done >= next_mark && next_mark <= args.workflows as i64 {
            let (then, done_then) = last_sample;
            let share = (next_mark - done_then) as f64 / (done - done_then) as f64;
            let reached = then + now.duration_since(then).mul_f64(share);
            tenths.push(tenth as f64 / reached.duration_since(last_mark).as_secs_f64());
            last_mark = reached;
            next_mark += tenth;
        }
        last_sample = (now, done);
        if done == args.workflows as i64 {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(1800),
            "stalled at {done}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let elapsed = started.elapsed();
    starting.await??;
    let jobs_left = scalar(&db.pool, "SELECT count(*) FROM apalis.jobs").await?;
    println!(
        "throughput per tenth of the run (workflows/s; flat means no decay as jobs pile up): {}",
        tenths
            .iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "apalis.jobs rows at the end: {jobs_left} (finished jobs are pruned after WORKER_PRUNE_AFTER)"
    );
    // Let apalis' batched acknowledgements land before counting commits.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let commit_delta = commits(&db.pool).await? - commits_before - polls - 1;
    let rate = args.workflows as f64 / elapsed.as_secs_f64();
    println!(
        "throughput: {rate:.0} workflows/s ({} in {:.2?})",
        args.workflows, elapsed
    );
    println!(
        "commits per workflow: {:.2} (start 1 + the claim, which takes the notified job, 1 + 3 steps and finish together 1 = 3; a job apalis fetches adds its fetch and ack)",
        commit_delta as f64 / args.workflows as f64
    );
    drop(workers);
    db.drop_database().await?;

    // Takeover after SIGKILL.
    let db = TestDb::create().await?;
    workflows::create_tables(&db.pool).await?;
    let engine = Engine::new(db.pool.clone());
    let mut fleet = vec![spawn(&db, "16")?, spawn(&db, "16")?];
    wait_until("two workers", Duration::from_secs(30), || async {
        Ok(scalar(&db.pool, "SELECT count(*) FROM workers").await? == 2)
    })
    .await?;
    for i in 0..8 {
        engine
            .start(
                TICKER,
                &format!("tick-{i}"),
                &TickerInput {
                    steps: 100_000,
                    interval_ms: 20,
                    one_statement: false,
                    for_each: false,
                },
            )
            .await?;
    }
    let mut takeovers = Vec::new();
    for kill in 0..args.kills {
        tokio::time::sleep(Duration::from_millis(rand::rng().random_range(300..1200))).await;
        let owners: Vec<(String, i32, i64)> = sqlx::query_as(
            "SELECT k.id, k.pid, count(*) FROM workflows w JOIN workers k ON k.id = w.owner
             WHERE w.status = 'running' GROUP BY k.id, k.pid ORDER BY random() LIMIT 1",
        )
        .fetch_all(&db.pool)
        .await?;
        let Some((victim_id, victim_pid, owned)) = owners.into_iter().next() else {
            continue;
        };
        let index = fleet
            .iter()
            .position(|w| w.pid() as i32 == victim_pid)
            .context("victim is ours")?;
        let victim = fleet.remove(index);
        let owned_ids: Vec<String> =
            sqlx::query_scalar("SELECT id FROM workflows WHERE owner = $1")
                .bind(&victim_id)
                .fetch_all(&db.pool)
                .await?;
        victim.signal("KILL")?;
        let killed_at: chrono::DateTime<chrono::Utc> =
            sqlx::query_scalar("SELECT clock_timestamp()")
                .fetch_one(&db.pool)
                .await?;
        drop(victim);
        fleet.push(spawn(&db, "16")?);
        for id in &owned_ids {
            let took =
                wait_step_elsewhere(&db.pool, id, &victim_id, killed_at, Duration::from_secs(60))
                    .await?;
            takeovers.push(took);
        }
        eprintln!("kill {}: {owned} workflow(s) taken over", kill + 1);
        wait_until(
            "replacement registered",
            Duration::from_secs(30),
            || async { Ok(scalar(&db.pool, "SELECT count(*) FROM workers").await? == 2) },
        )
        .await?;
    }
    takeovers.sort();
    println!(
        "takeover after SIGKILL (kill -> next step on another worker, {} workflows over {} kills): p50 {:.0?} p99 {:.0?} max {:.0?}",
        takeovers.len(),
        args.kills,
        percentile(&takeovers, 50.0),
        percentile(&takeovers, 99.0),
        takeovers.last().copied().unwrap_or_default()
    );
    let duplicates = scalar(
        &db.pool,
        "SELECT count(*) FROM (SELECT name FROM engine_test_counters c JOIN workflows w ON c.name = 'ticks:' || w.id
         WHERE c.value <> (SELECT count(*) FROM workflow_steps s WHERE s.workflow_id = w.id AND s.name = 'tick')) t",
    )
    .await?;
    println!(
        "ticks applied exactly once per checkpointed step: {}",
        if duplicates == 0 { "yes" } else { "NO" }
    );
    drop(fleet);
    db.drop_database().await
}
