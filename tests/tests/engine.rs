//! The durable workflow engine against a real PostgreSQL, with real worker
//! processes (`engine-test-worker`) killed with real signals.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use engine::{
    CancelOutcome, ENDING_STEP, Engine, EngineError, EventListener, ExecutionOutcome, Message,
    QueueConfig, Runtime, RuntimeConfig, SendOutcome, Workflow, WorkflowStatus,
};
use harness::workflows::{
    self, COUNTER, FLAKY, FLUSH_PROBE, FlakyInput, FlushProbe, GATED, Gated, GatedInput,
    INSERT_ONCE, InsertOnce, MESSENGER, MessengerInput, NoOp, PARENT, Parent, TICKER, Ticker,
    TickerInput, counter, open_gate,
};
use harness::{
    Proc, TestDb, live_workers, wait_step_elsewhere, wait_until, wait_workers, worker_env,
};
use rand::Rng;
use serde_json::{Value, json};
use sqlx::PgPool;
use store::db::DatabaseArgs;

/// The deadline of a wait for what happens within moments when all is
/// well: generous, so that a loaded 2-core machine does not fail a test by
/// being slow. Tests print how long such things took instead of bounding it.
const PATIENCE: Duration = Duration::from_secs(60);

async fn engine_db() -> anyhow::Result<TestDb> {
    let db = TestDb::create_for_engine().await?;
    workflows::create_tables(&db.pool).await?;
    Ok(db)
}

fn spawn_worker(db: &TestDb, label: &str, extra: &[(&str, &str)]) -> anyhow::Result<Proc> {
    let mut env = vec![("WORKER_QUEUES", "engine")];
    env.extend_from_slice(extra);
    Proc::spawn(
        label,
        Path::new(env!("CARGO_BIN_EXE_engine-test-worker")),
        &[],
        &worker_env(db, &env),
    )
}

async fn status(pool: &PgPool, id: &str) -> anyhow::Result<String> {
    Ok(
        sqlx::query_scalar("SELECT status FROM workflows WHERE id = $1")
            .bind(id)
            .fetch_one(pool)
            .await?,
    )
}

async fn wait_status(
    pool: &PgPool,
    id: &str,
    expected: &str,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    wait_until(&format!("workflow {id} {expected}"), timeout, || async {
        Ok(status(pool, id).await? == expected)
    })
    .await
}

async fn count(pool: &PgPool, sql: &'static str) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(sql).fetch_one(pool).await?)
}

/// Waits until a step of a [`Gated`] workflow (`what`, for the message)
/// waits at its gate; how long that took.
async fn wait_at_gate(pool: &PgPool, what: &str) -> anyhow::Result<Duration> {
    wait_until(&format!("{what} waiting at its gate"), PATIENCE, || async {
        Ok(workflows::at_gate(pool).await? == 1)
    })
    .await
}

/// The checkpoint of one tick.
#[derive(Debug, PartialEq, sqlx::FromRow)]
struct TickCheckpoint {
    step_seq: i32,
    output: Value,
    worker_id: String,
    finished_at: chrono::DateTime<chrono::Utc>,
}

/// The ticks' checkpoints of workflow `id`, in step order.
async fn tick_checkpoints(pool: &PgPool, id: &str) -> anyhow::Result<Vec<TickCheckpoint>> {
    Ok(sqlx::query_as(
        "SELECT step_seq, output, worker_id, finished_at FROM workflow_steps
         WHERE workflow_id = $1 AND name = 'tick' ORDER BY step_seq",
    )
    .bind(id)
    .fetch_all(pool)
    .await?)
}

/// The value of a ticker's `tick` event, if set.
async fn last_tick(pool: &PgPool, id: &str) -> anyhow::Result<Option<i64>> {
    let value: Option<Value> =
        sqlx::query_scalar("SELECT value FROM workflow_events WHERE workflow_id = $1 AND key = $2")
            .bind(id)
            .bind(workflows::TICK_EVENT)
            .fetch_optional(pool)
            .await?;
    Ok(value.and_then(|v| v.as_i64()))
}

/// The worker process that owns a running workflow, as (worker id, pid).
async fn owner_of(pool: &PgPool, id: &str) -> anyhow::Result<(String, i32)> {
    Ok(sqlx::query_as(
        "SELECT k.id, k.pid FROM workflows w JOIN workers k ON k.id = w.owner WHERE w.id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await?)
}

/// SIGKILLs the worker process (one of `workers`) that owns the running
/// workflow `id`: its worker id, and the database's clock at the kill.
async fn kill_owner(
    pool: &PgPool,
    workers: &mut Vec<Proc>,
    id: &str,
) -> anyhow::Result<(String, chrono::DateTime<chrono::Utc>)> {
    let (victim_id, victim_pid) = owner_of(pool, id).await?;
    let index = workers
        .iter()
        .position(|w| w.pid() as i32 == victim_pid)
        .context("owner is ours")?;
    let victim = workers.remove(index);
    victim.signal("KILL")?;
    let killed_at = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(pool)
        .await?;
    Ok((victim_id, killed_at))
}

fn runtime(db: &TestDb) -> anyhow::Result<Runtime> {
    let args = DatabaseArgs::from_url(&db.url);
    Ok(Runtime::new(
        db.pool.clone(),
        args.connect_options("in-process")?,
        RuntimeConfig::default(),
    )
    .register(Ticker)
    .register(Gated)
    .register(Parent)
    .register(FlushProbe)
    .register(InsertOnce))
}

#[tokio::test]
async fn start_is_idempotent_under_50_concurrent_callers() -> anyhow::Result<()> {
    let db = engine_db().await?;
    let engine = Engine::new(db.pool.clone());
    let calls = (0..50).map(|_| {
        let engine = engine.clone();
        tokio::spawn(async move { engine.start(COUNTER, "one-id", &json!({})).await })
    });
    let handles: Vec<_> = futures::future::try_join_all(calls)
        .await?
        .into_iter()
        .collect::<Result<_, _>>()?;
    assert!(
        handles
            .iter()
            .all(|h| h.id == "one-id" && h.kind == "counter")
    );
    assert_eq!(
        handles.iter().filter(|h| h.created).count(),
        1,
        "exactly one caller created it"
    );
    assert_eq!(count(&db.pool, "SELECT count(*) FROM workflows").await?, 1);
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM apalis.jobs WHERE job_type = 'engine'"
        )
        .await?,
        1
    );
    match engine.start(TICKER, "one-id", &json!({})).await {
        Err(EngineError::KindConflict {
            existing,
            requested,
            ..
        }) => {
            assert_eq!(
                (existing.as_str(), requested.as_str()),
                ("counter", "ticker")
            );
        }
        other => panic!("expected a kind conflict, got {other:?}"),
    }
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM apalis.jobs").await?,
        1,
        "the conflict enqueued nothing"
    );
    Ok(())
}

#[tokio::test]
async fn a_step_statement_starts_its_child_once_and_fails_on_a_kind_conflict() -> anyhow::Result<()>
{
    let db = engine_db().await?;
    let engine = Engine::new(db.pool.clone());
    let rt = runtime(&db)?;
    engine
        .start(PARENT, "parent", &json!({ "child": "child" }))
        .await?;
    assert_eq!(rt.execute("parent").await, ExecutionOutcome::Succeeded);
    let parent = engine.info("parent").await?.context("parent")?;
    assert_eq!(parent.output, Some(json!("child")));
    let ended_with_its_step: bool = sqlx::query_scalar(
        "SELECT w.xmin = s.xmin FROM workflows w JOIN workflow_steps s ON s.workflow_id = w.id
         WHERE w.id = 'parent' AND s.name = 'start_child'",
    )
    .fetch_one(&db.pool)
    .await?;
    assert!(
        ended_with_its_step,
        "the parent ended in its last step's commit, not one of its own"
    );
    // This runtime does not run the child's kind: its job goes to the queue.
    let child = engine.info("child").await?.context("child started")?;
    assert_eq!(
        (child.kind.as_str(), child.status.as_str()),
        ("noop", "enqueued"),
        "started with its parent's step"
    );
    let jobs = "SELECT count(*) FROM apalis.jobs j
                WHERE convert_from(j.job, 'UTF8')::json ->> 'workflow_id' = 'child'";
    assert_eq!(count(&db.pool, jobs).await?, 1, "one job for the child");

    // The child's id is held by another kind: the step fails (a bug in the
    // workflow, not worth retrying) and changes nothing.
    engine
        .start(TICKER, "taken", &json!({ "steps": 1, "interval_ms": 1 }))
        .await?;
    engine
        .start(PARENT, "parent-2", &json!({ "child": "taken" }))
        .await?;
    assert_eq!(rt.execute("parent-2").await, ExecutionOutcome::Failed);
    let failed = engine.info("parent-2").await?.context("parent-2")?;
    let error = failed.error.unwrap_or_default();
    assert_eq!(failed.status, "failed");
    assert!(
        error.contains("a ticker workflow holds"),
        "names the kind holding the id: {error}"
    );
    let taken = engine.info("taken").await?.context("taken")?;
    assert_eq!(taken.kind, "ticker");
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM workflow_steps WHERE workflow_id = 'parent-2' AND name <> '$ending'"
        )
        .await?,
        0,
        "no checkpoint for the failed step"
    );
    Ok(())
}

/// A worker that runs the child's kind, with a free slot on its queue, runs
/// a child its step starts itself, claimed by the start: no job, no claim,
/// one execution.
#[tokio::test]
async fn a_child_started_by_a_step_runs_on_that_worker_without_a_job() -> anyhow::Result<()> {
    let db = engine_db().await?;
    let engine = Engine::new(db.pool.clone());
    let args = DatabaseArgs::from_url(&db.url);
    let config = RuntimeConfig {
        queues: vec![QueueConfig {
            name: workflows::QUEUE.into(),
            concurrency: 4,
        }],
        ..RuntimeConfig::default()
    };
    let rt = Runtime::new(db.pool.clone(), args.connect_options("in-process")?, config)
        .register(Parent)
        .register(NoOp);
    engine
        .start(PARENT, "parent", &json!({ "child": "child" }))
        .await?;
    assert_eq!(rt.execute("parent").await, ExecutionOutcome::Succeeded);
    wait_status(&db.pool, "child", "succeeded", PATIENCE).await?;
    let child = engine.info("child").await?.context("child")?;
    assert_eq!(child.executions, 1, "one execution, claimed by its start");
    let jobs = "SELECT count(*) FROM apalis.jobs j
                WHERE convert_from(j.job, 'UTF8')::json ->> 'workflow_id' = 'child'";
    assert_eq!(count(&db.pool, jobs).await?, 0, "no job for the child");
    let ran_by: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT worker_id FROM workflow_steps WHERE workflow_id = 'child'",
    )
    .fetch_all(&db.pool)
    .await?;
    assert_eq!(
        ran_by,
        vec![rt.worker_id().to_owned()],
        "ran on the parent's worker"
    );
    Ok(())
}

/// A workflow left `running` under a live worker that does not execute it
/// (a claim, or a step's start of a child, whose commit went through while
/// its answer was lost) goes back to the queue at that worker's next
/// lost-workflow check, and runs. The reaper alone would never take it
/// over: its owner is alive.
#[tokio::test]
async fn a_running_workflow_its_live_owner_lost_goes_back_to_the_queue() -> anyhow::Result<()> {
    let db = engine_db().await?;
    let _worker = spawn_worker(&db, "owner", &[])?;
    wait_workers(&db.pool, 1).await?;
    let owner: String = sqlx::query_scalar("SELECT id FROM workers")
        .fetch_one(&db.pool)
        .await?;
    let input = TickerInput {
        steps: 1,
        interval_ms: 1,
        one_statement: true,
        for_each: false,
    };
    // As such a commit leaves it: running, owned by the live worker, no job.
    sqlx::query(
        "INSERT INTO workflows (id, kind, queue, input, status, owner, executions, updated_at)
         VALUES ('lost', $1, $2, $3, 'running', $4, 1, now() - interval '1 minute')",
    )
    .bind(TICKER.name)
    .bind(TICKER.queue)
    .bind(serde_json::to_value(&input)?)
    .bind(&owner)
    .execute(&db.pool)
    .await?;
    let took = wait_status(&db.pool, "lost", "succeeded", Duration::from_secs(120)).await?;
    println!("a lost running workflow succeeded {took:?} after it was left");
    assert_eq!(counter(&db.pool, "ticks:lost").await?, 1);
    Ok(())
}

#[tokio::test]
async fn an_unflushed_step_commits_the_open_transaction_first_and_flushed() -> anyhow::Result<()> {
    let db = engine_db().await?;
    let engine = Engine::new(db.pool.clone());
    let rt = runtime(&db)?;
    engine.start(FLUSH_PROBE, "probe", &json!({})).await?;
    assert_eq!(rt.execute("probe").await, ExecutionOutcome::Succeeded);
    let probe = engine.info("probe").await?.context("probe")?;
    let output = probe.output.context("the probe's output")?;
    assert_ne!(
        output["first"], output["unflushed"],
        "the unflushed step joined the transaction before it, which sets an event: \
         Engine::start_unflushed's callers rely on that commit's flush"
    );
    assert_eq!(
        output["setting"],
        json!("on"),
        "the unflushed step's setting leaked into the next transaction"
    );
    Ok(())
}

#[tokio::test]
async fn database_steps_happen_exactly_once_while_workers_are_killed() -> anyhow::Result<()> {
    let db = engine_db().await?;
    let engine = Engine::new(db.pool.clone());
    let total: i64 = std::env::var("ENGINE_KILL_WORKFLOWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
    for i in 0..total {
        engine
            .start(COUNTER, &format!("counter-{i}"), &json!({}))
            .await?;
    }
    let slow = [("WORKER_CONCURRENCY", "4")];
    let mut workers = vec![
        spawn_worker(&db, "killed", &slow)?,
        spawn_worker(&db, "killed", &slow)?,
    ];
    let started = Instant::now();
    let mut kills = 0;
    loop {
        let done = count(
            &db.pool,
            "SELECT count(*) FROM workflows WHERE status = 'succeeded'",
        )
        .await?;
        if done == total {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(240),
            "only {done}/{total} finished"
        );
        let pause = rand::rng().random_range(150..500);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        if kills < 12 {
            let victim = workers.remove(rand::rng().random_range(0..workers.len()));
            victim.signal("KILL")?;
            drop(victim);
            kills += 1;
            workers.push(spawn_worker(&db, "killed", &slow)?);
        }
    }
    println!(
        "{total} workflows finished in {:?} with {kills} SIGKILLs",
        started.elapsed()
    );
    assert!(
        kills >= 3,
        "the run was too quick to kill anything ({kills} kills)"
    );
    for name in ["a", "b", "c"] {
        assert_eq!(
            counter(&db.pool, name).await?,
            total,
            "counter {name}: each step applied exactly once"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_checkpoint_that_does_not_match_the_code_fails_loudly() -> anyhow::Result<()> {
    let db = engine_db().await?;
    let engine = Engine::new(db.pool.clone());
    let _worker = spawn_worker(&db, "replay", &[])?;
    let input = MessengerInput {
        topic: "t".into(),
        timeout_ms: 60_000,
    };
    engine.start(MESSENGER, "renamed", &input).await?;
    wait_status(&db.pool, "renamed", "waiting", PATIENCE).await?;
    sqlx::query("UPDATE workflow_steps SET name = 'some_other_step' WHERE workflow_id = 'renamed' AND step_seq = 0")
        .execute(&db.pool)
        .await?;
    let message = Message {
        workflow_id: "renamed",
        topic: "t",
        payload: json!("hi"),
        key: None,
    };
    engine.send(message).await?;
    wait_status(&db.pool, "renamed", "failed", PATIENCE).await?;
    let info = engine.info("renamed").await?.context("workflow row")?;
    let error = info.error.context("error kept")?;
    assert!(
        error.contains("step 0")
            && error.contains("some_other_step")
            && error.contains("recv:t:deadline"),
        "the error names the step and both names: {error}"
    );
    assert_eq!(
        counter(&db.pool, "received:renamed").await?,
        0,
        "nothing after the mismatch ran"
    );
    Ok(())
}

#[tokio::test]
async fn completed_steps_replay_without_running_again() -> anyhow::Result<()> {
    let db = engine_db().await?;
    let engine = Engine::new(db.pool.clone());
    let input = GatedInput {
        steps: 6,
        gate_at: 4,
        one_statement: false,
        interval_ms: 0,
        ..GatedInput::default()
    };
    engine.start(GATED, "replayed", &input).await?;
    // Two runtimes: each checkpoint names the execution that wrote it.
    let (one, two) = (runtime(&db)?, runtime(&db)?);
    let first = tokio::spawn({
        let one = one.clone();
        async move { one.execute("replayed").await }
    });
    // Ticks 1-3 committed, tick 4 waiting at the gate inside its step: the
    // first execution is surely mid-run when the cancel comes.
    let reached = wait_at_gate(&db.pool, "replayed").await?;
    assert_eq!(counter(&db.pool, "ticks:replayed").await?, 3);
    assert_eq!(
        engine.cancel("replayed").await?,
        CancelOutcome::Requested,
        "cancelled while running"
    );
    open_gate(&db.pool, "replayed").await?;
    let outcome = tokio::time::timeout(PATIENCE, first).await??;
    assert_eq!(
        outcome,
        ExecutionOutcome::Cancelled,
        "the first execution ended at the cancel"
    );
    let cancelled = tick_checkpoints(&db.pool, "replayed").await?;
    println!(
        "first execution: at the gate after {reached:?}, cancelled with {} ticks checkpointed",
        cancelled.len()
    );

    engine.resume("replayed").await?;
    assert_eq!(
        two.execute("replayed").await,
        ExecutionOutcome::Succeeded,
        "the second execution"
    );
    assert_eq!(
        counter(&db.pool, "ticks:replayed").await?,
        6,
        "every tick exactly once across the two executions"
    );
    let ticks = tick_checkpoints(&db.pool, "replayed").await?;
    let outputs: Vec<Value> = ticks.iter().map(|t| t.output.clone()).collect();
    let expected: Vec<Value> = (1..=6).map(|n| json!(n)).collect();
    assert_eq!(outputs, expected, "each tick's checkpoint is its own tick");
    assert_eq!(
        ticks[..3],
        cancelled[..],
        "ticks 1-3 replayed from the first execution's checkpoints, not run again"
    );
    assert!(
        ticks[..3].iter().all(|t| t.worker_id == one.worker_id()),
        "ticks 1-3 ran in the first execution: {ticks:?}"
    );
    assert!(
        ticks[3..].iter().all(|t| t.worker_id == two.worker_id()),
        "ticks 4-6 (the refused one again, then the rest) ran in the second: {ticks:?}"
    );
    let info = engine.info("replayed").await?.context("row")?;
    println!(
        "second execution replayed 3 ticks and ran 3; executions on the row: {} (resume resets it)",
        info.executions
    );
    Ok(())
}

/// Of two executions of workflow `id` at once, one ended as `winner` and
/// the other was fenced off.
fn assert_one_fenced(id: &str, a: ExecutionOutcome, b: ExecutionOutcome, winner: ExecutionOutcome) {
    let mut outcomes = [a, b];
    outcomes.sort_by_key(|o| format!("{o:?}"));
    let mut expected = [ExecutionOutcome::Fenced, winner];
    expected.sort_by_key(|o| format!("{o:?}"));
    assert_eq!(
        outcomes, expected,
        "{id}: one wins, the other is fenced off"
    );
}

#[tokio::test]
async fn two_executions_at_once_apply_no_step_twice() -> anyhow::Result<()> {
    let db = engine_db().await?;
    let engine = Engine::new(db.pool.clone());
    // Each kind of database step: a transaction, and one statement (whose
    // refused checkpoint must undo the statement's own effect).
    for (id, one_statement) in [("raced", false), ("raced-statement", true)] {
        engine
            .start(
                TICKER,
                id,
                &TickerInput {
                    steps: 8,
                    interval_ms: 20,
                    one_statement,
                    for_each: false,
                },
            )
            .await?;
        // Two runtimes execute the same workflow at the same time (as after
        // a duplicate job, or a worker presumed dead that was only slow).
        let (one, two) = (runtime(&db)?, runtime(&db)?);
        let (a, b) = tokio::join!(one.execute(id), two.execute(id));
        assert_one_fenced(id, a, b, ExecutionOutcome::Succeeded);
        assert_eq!(
            counter(&db.pool, &format!("ticks:{id}")).await?,
            8,
            "{id}: no tick applied twice"
        );
    }
    Ok(())
}

/// A duplicate execution can fail in a step's own statement because the
/// winner's effect is there (a unique key, here), not on its checkpoint.
/// It must stop as fenced off, not retry and then fail the workflow the
/// winner is running (a chaos run once lost a checkout so: another worker
/// took it over after a database restart, and the first one's replay
/// failed it on `orders_checkout_id_unique`).
#[tokio::test]
async fn a_duplicate_execution_failing_on_the_winners_effect_is_fenced_off() -> anyhow::Result<()> {
    let db = engine_db().await?;
    let engine = Engine::new(db.pool.clone());
    engine.start(INSERT_ONCE, "inserted", &json!({})).await?;
    let (one, two) = (runtime(&db)?, runtime(&db)?);
    let (a, b) = tokio::join!(one.execute("inserted"), two.execute("inserted"));
    // The winner parks at its recv.
    assert_one_fenced("inserted", a, b, ExecutionOutcome::Parked);
    assert_eq!(status(&db.pool, "inserted").await?, "waiting");
    let message = Message {
        workflow_id: "inserted",
        topic: "go",
        payload: json!(true),
        key: None,
    };
    engine.send(message).await?;
    assert_eq!(one.execute("inserted").await, ExecutionOutcome::Succeeded);
    assert_eq!(workflows::counter(&db.pool, "once:inserted").await?, 1);
    Ok(())
}

/// Starts `count` tickers whose ticks are `for_each` statements, each
/// counter seeded with a distinct hundred (`ticks:<id>` = 100 × i), so a
/// tick's output (the counter after it) names the workflow it belongs to.
async fn start_for_each_tickers(
    db: &TestDb,
    prefix: &str,
    count: i64,
    steps: u32,
) -> anyhow::Result<Vec<String>> {
    let engine = Engine::new(db.pool.clone());
    let mut ids = Vec::new();
    for i in 1..=count {
        let id = format!("{prefix}-{i}");
        sqlx::query("INSERT INTO engine_test_counters (name, value) VALUES ($1, $2)")
            .bind(format!("ticks:{id}"))
            .bind(100 * i)
            .execute(&db.pool)
            .await?;
        let input = TickerInput {
            steps,
            interval_ms: 30,
            one_statement: false,
            for_each: true,
        };
        engine.start(TICKER, &id, &input).await?;
        ids.push(id);
    }
    Ok(ids)
}

/// Each ticker's counter moved by exactly its steps, and its ticks'
/// checkpoints hold its own counter's values in order.
async fn assert_each_tick_once(db: &TestDb, ids: &[String], steps: i64) -> anyhow::Result<()> {
    for (i, id) in (1..).zip(ids) {
        assert_eq!(
            counter(&db.pool, &format!("ticks:{id}")).await?,
            100 * i + steps,
            "{id}: each tick applied once"
        );
        let outputs: Vec<Value> = sqlx::query_scalar(
            "SELECT output FROM workflow_steps WHERE workflow_id = $1 AND name = 'tick' ORDER BY step_seq",
        )
        .bind(id)
        .fetch_all(&db.pool)
        .await?;
        let expected: Vec<Value> = (1..=steps).map(|k| json!(100 * i + k)).collect();
        assert_eq!(outputs, expected, "{id}: each tick's output is its own");
    }
    Ok(())
}

#[tokio::test]
async fn for_each_steps_of_many_workflows_commit_together_each_once() -> anyhow::Result<()> {
    let db = engine_db().await?;
    let ids = start_for_each_tickers(&db, "batched", 40, 5).await?;
    let runtime = runtime(&db)?;
    let outcomes = futures::future::join_all(ids.iter().map(|id| runtime.execute(id))).await;
    assert!(
        outcomes.iter().all(|o| *o == ExecutionOutcome::Succeeded),
        "{outcomes:?}"
    );
    assert_each_tick_once(&db, &ids, 5).await?;
    // Rows one transaction wrote share its xmin.
    let (ticks, commits): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT xmin::text) FROM workflow_steps WHERE name = 'tick'",
    )
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(ticks, 200);
    assert!(
        commits <= ticks / 2,
        "200 ticks of 40 workflows due together took {commits} commits"
    );
    // The last tick ends its workflow in the batch's commit.
    let (outputs, ends): (Vec<Option<Value>>, i64) = sqlx::query_as(
        "SELECT array_agg(output), count(DISTINCT xmin::text) FROM workflows WHERE id = ANY($1)",
    )
    .bind(&ids)
    .fetch_one(&db.pool)
    .await?;
    assert!(outputs.iter().all(|o| *o == Some(json!(5))), "{outputs:?}");
    assert!(
        ends <= 20,
        "40 last ticks due together ended their workflows in {ends} commits"
    );
    Ok(())
}

#[tokio::test]
async fn two_executions_of_batched_steps_apply_none_twice() -> anyhow::Result<()> {
    let db = engine_db().await?;
    let ids = start_for_each_tickers(&db, "raced-batch", 10, 6).await?;
    // Two runtimes execute the same ten workflows at once: each batches its
    // own executions' ticks, and a batch in which one checkpoint is
    // refused rolls back, its other steps running alone.
    let (one, two) = (runtime(&db)?, runtime(&db)?);
    let (a, b) = tokio::join!(
        futures::future::join_all(ids.iter().map(|id| one.execute(id))),
        futures::future::join_all(ids.iter().map(|id| two.execute(id))),
    );
    for ((id, a), b) in ids.iter().zip(a).zip(b) {
        assert_one_fenced(id, a, b, ExecutionOutcome::Succeeded);
    }
    assert_each_tick_once(&db, &ids, 6).await
}

/// The job that resumes a parked workflow can reach the worker while the
/// execution that parked it is still returning. It must wait for that
/// execution, not be dropped as "already running": it is the only job the
/// workflow has until its deadline (dropped, it would leave a paid checkout
/// waiting and its webhook answering 504).
#[tokio::test]
async fn a_job_for_a_workflow_still_executing_here_waits_for_it() -> anyhow::Result<()> {
    let db = engine_db().await?;
    let engine = Engine::new(db.pool.clone());
    let input = MessengerInput {
        topic: "reply".into(),
        timeout_ms: 60_000,
    };
    engine.start(MESSENGER, "resumed", &input).await?;
    let runtime = runtime(&db)?.register(workflows::Messenger);
    // The second call arrives while the first is executing (join! polls the
    // first until it awaits, then the second).
    let (first, second) = tokio::join!(runtime.execute("resumed"), runtime.execute("resumed"));
    assert_eq!(
        (first, second),
        (ExecutionOutcome::Parked, ExecutionOutcome::Parked),
        "the second execution ran after the first parked"
    );
    let executions: i32 =
        sqlx::query_scalar("SELECT executions FROM workflows WHERE id = 'resumed'")
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(executions, 2);
    Ok(())
}

#[tokio::test]
async fn messages_are_consumed_once_and_deadlines_survive_restarts() -> anyhow::Result<()> {
    let db = engine_db().await?;
    let engine = Engine::new(db.pool.clone());
    let mut worker = spawn_worker(&db, "messages", &[])?;
    let input = MessengerInput {
        topic: "greet".into(),
        timeout_ms: 30_000,
    };
    engine.start(MESSENGER, "m1", &input).await?;
    wait_status(&db.pool, "m1", "waiting", PATIENCE).await?;
    let send = |payload: &str, key: &'static str| Message {
        workflow_id: "m1",
        topic: "greet",
        payload: json!(payload),
        key: Some(key),
    };
    assert_eq!(
        engine.send(send("hello", "k1")).await?,
        SendOutcome::Delivered
    );
    assert_eq!(
        engine.send(send("again", "k1")).await?,
        SendOutcome::Duplicate {
            payload: json!("hello")
        }
    );
    wait_status(&db.pool, "m1", "succeeded", PATIENCE).await?;
    let output = engine
        .info("m1")
        .await?
        .context("m1")?
        .output
        .context("output")?;
    assert_eq!(output["message"], "hello");
    assert_eq!(counter(&db.pool, "received:m1").await?, 1);
    let consumed = count(
        &db.pool,
        "SELECT count(*) FROM workflow_messages WHERE consumed_at IS NOT NULL",
    )
    .await?;
    assert_eq!(consumed, 1);
    assert!(matches!(
        engine.send(send("late", "k2")).await,
        Err(EngineError::Finished { .. })
    ));
    let unknown = Message {
        workflow_id: "nobody",
        topic: "greet",
        payload: json!(1),
        key: None,
    };
    assert!(matches!(
        engine.send(unknown).await,
        Err(EngineError::UnknownWorkflow(_))
    ));

    // A message sent before the workflow reaches recv waits for it.
    engine.start(MESSENGER, "early", &input).await?;
    engine
        .send(Message {
            workflow_id: "early",
            topic: "greet",
            payload: json!("first"),
            key: None,
        })
        .await?;
    wait_status(&db.pool, "early", "succeeded", PATIENCE).await?;

    // The recv deadline is checkpointed: it holds across a SIGKILL and a new worker.
    let short = MessengerInput {
        topic: "greet".into(),
        timeout_ms: 2_500,
    };
    engine.start(MESSENGER, "deadline", &short).await?;
    wait_status(&db.pool, "deadline", "waiting", PATIENCE).await?;
    worker.signal("KILL")?;
    worker.wait_exit(PATIENCE).await?;
    let _replacement = spawn_worker(&db, "messages", &[])?;
    wait_status(&db.pool, "deadline", "succeeded", PATIENCE).await?;
    let (output, lived): (Value, f64) = sqlx::query_as(
        "SELECT output, extract(epoch FROM updated_at - created_at)::float8 FROM workflows WHERE id = 'deadline'",
    )
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(output["message"], Value::Null, "timed out");
    assert!(
        lived >= 2.5,
        "not before its deadline: finished after {lived:.2}s"
    );
    println!("recv deadline 2.5 s across a worker restart: timed out after {lived:.2} s");
    Ok(())
}

#[tokio::test]
async fn parked_workflows_hold_no_worker_slot() -> anyhow::Result<()> {
    let db = engine_db().await?;
    let total: usize = std::env::var("ENGINE_PARKED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let engine = Engine::new(db.pool.clone());
    let started = Instant::now();
    let input = MessengerInput {
        topic: "go".into(),
        timeout_ms: 3_600_000,
    };
    let input = serde_json::to_value(&input)?;
    futures::future::try_join_all((0..8).map(|lane| {
        let (engine, input) = (engine.clone(), input.clone());
        async move {
            for i in (lane..total).step_by(8) {
                engine.start(MESSENGER, &format!("p{i}"), &input).await?;
            }
            anyhow::Ok(())
        }
    }))
    .await?;
    // A pool far larger than the worker needs: what it holds shows, not
    // the pool's cap.
    let pool_size = 100;
    let _worker = spawn_worker(
        &db,
        "parked",
        &[
            ("WORKER_CONCURRENCY", "8"),
            ("DB_MAX_CONNECTIONS", &pool_size.to_string()),
        ],
    )?;
    wait_until(
        &format!("{total} workflows parked"),
        Duration::from_secs(600),
        || async {
            Ok(count(
                &db.pool,
                "SELECT count(*) FROM workflows WHERE status = 'waiting'",
            )
            .await?
                == total as i64)
        },
    )
    .await?;
    let parked_after = started.elapsed();
    // The registry's in_flight is refreshed every heartbeat (1 s).
    wait_until("no worker slot held", PATIENCE, || async {
        Ok(count(
            &db.pool,
            "SELECT coalesce(sum(in_flight), 0)::bigint FROM workers",
        )
        .await?
            == 0)
    })
    .await?;
    let by_state: Vec<(String, i64)> = sqlx::query_as(
        "SELECT coalesce(state, '?') || CASE WHEN query LIKE 'LISTEN%' THEN ' (LISTEN)' ELSE '' END,
             count(*)
         FROM pg_stat_activity WHERE datname = current_database()
           AND application_name LIKE 'engine-test-worker%'
         GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await?;
    let connections: i64 = by_state.iter().map(|(_, n)| n).sum();
    println!(
        "{total} parked: the worker has {connections} connections of its pool of {pool_size} \
         (by state: {by_state:?})"
    );
    // A parked workflow holding a connection would hold it in a statement
    // or a transaction for as long as it is parked: the wait ends once no
    // connection but a LISTEN is busy (a heartbeat or a reap may be caught
    // busy for a moment), which it never would with one held.
    let busy = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
                AND application_name LIKE 'engine-test-worker%' AND state <> 'idle'
                AND query NOT LIKE 'LISTEN%'";
    wait_until(
        "no worker connection busy but its LISTEN",
        PATIENCE,
        || async { Ok(count(&db.pool, busy).await? == 0) },
    )
    .await?;
    assert!(
        connections < pool_size as i64 / 2,
        "{total} parked workflows hold no connection: the worker has {connections}"
    );
    let sent = Instant::now();
    futures::future::try_join_all((0..8).map(|lane| {
        let engine = engine.clone();
        async move {
            for i in (lane..total).step_by(8) {
                let id = format!("p{i}");
                engine
                    .send(Message {
                        workflow_id: &id,
                        topic: "go",
                        payload: json!(i),
                        key: None,
                    })
                    .await?;
            }
            anyhow::Ok(())
        }
    }))
    .await?;
    wait_until(
        &format!("{total} workflows finished"),
        Duration::from_secs(900),
        || async {
            Ok(count(
                &db.pool,
                "SELECT count(*) FROM workflows WHERE status = 'succeeded'",
            )
            .await?
                == total as i64)
        },
    )
    .await?;
    println!(
        "{total} workflows: all parked after {:.1?}; all finished {:.1?} after the sends began",
        parked_after,
        sent.elapsed()
    );
    Ok(())
}

/// `application_name` of the event listener's connection in
/// `events_wake_waiters_fast_and_survive_the_listener_dropping`.
const LISTENER_APP: &str = "engine-test-event-listener";

/// Waits until the event listener's connection (not the backend `not`)
/// listens; its backend pid, and how long that took.
async fn wait_listening(pool: &PgPool, not: Option<i32>) -> anyhow::Result<(i32, Duration)> {
    let find = || async {
        let pid: Option<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()
             AND application_name = $1 AND query LIKE 'LISTEN%' AND pid <> coalesce($2, 0)",
        )
        .bind(LISTENER_APP)
        .bind(not)
        .fetch_optional(pool)
        .await?;
        anyhow::Ok(pid)
    };
    let took = wait_until("the event listener listening", PATIENCE, || async {
        Ok(find().await?.is_some())
    })
    .await?;
    Ok((find().await?.context("listening")?, took))
}

#[tokio::test]
async fn events_wake_waiters_fast_and_survive_the_listener_dropping() -> anyhow::Result<()> {
    let db = engine_db().await?;
    // The listener on a pool of its own, named so the test can find its
    // connection, and drop it.
    let listener_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_with(DatabaseArgs::from_url(&db.url).connect_options(LISTENER_APP)?)
        .await?;
    // No fallback poll (a day), and waits of an hour cut short at PATIENCE:
    // a waiter re-reads the table only at the poll, at its deadline, when
    // its channel lagged, or when the listener (re)connected, so a waiter
    // woken at all was woken through the listener: by a notification, or
    // by the re-read a reconnect asks for.
    let no_poll = Duration::from_secs(86_400);
    let never = Duration::from_secs(3_600);
    let engine =
        Engine::new(db.pool.clone()).with_events(EventListener::spawn(listener_pool), no_poll);
    let (listener, _) = wait_listening(&db.pool, None).await?;
    let _worker = spawn_worker(&db, "events", &[])?;
    let input = MessengerInput {
        topic: "t".into(),
        timeout_ms: 60_000,
    };
    engine.start(MESSENGER, "e1", &input).await?;
    wait_status(&db.pool, "e1", "waiting", PATIENCE).await?;
    // Subscribed before the send, so no read is needed: both events of the
    // step that publishes them arrive as notifications, and the listener
    // does not reconnect here: only a notification can carry them.
    let subscription = engine.subscribe();
    let sent = Instant::now();
    engine
        .send(Message {
            workflow_id: "e1",
            topic: "t",
            payload: json!("ping"),
            key: None,
        })
        .await?;
    let published = tokio::time::timeout(
        PATIENCE,
        subscription.next_all("e1", ["received", "receipt"], never),
    )
    .await
    .context("no notification woke the waiter (the fallback poll is off)")??;
    let latency = sent.elapsed();
    assert_eq!(published, Some([json!("ping"), json!(1)]));
    println!("send -> workflow resumes -> two events -> waiter woken by NOTIFY: {latency:?}");

    // An event not set: the wait ends at its own deadline, not the poll's.
    let asked = Instant::now();
    let not_yet = tokio::time::timeout(
        PATIENCE,
        engine.get_event("e1", "never", Duration::from_millis(300)),
    )
    .await
    .context("a 300 ms wait outlived its deadline")??;
    let waited = asked.elapsed();
    assert_eq!(not_yet, None, "not yet");
    assert!(
        waited >= Duration::from_millis(300),
        "waited its 300 ms: {waited:?}"
    );
    println!("a 300 ms wait for an event never set: None after {waited:?}");

    // The listener's connection is terminated; an event set while it is
    // down or reconnecting still reaches the waiter: the listener
    // re-LISTENs, then asks every waiter to re-read (a notification sent
    // before it listens again is lost, the event's row is not).
    engine.start(MESSENGER, "e2", &input).await?;
    wait_status(&db.pool, "e2", "waiting", PATIENCE).await?;
    let subscription = engine.subscribe();
    let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(listener)
        .fetch_one(&db.pool)
        .await?;
    assert!(terminated, "the listener's connection was dropped");
    let sent = Instant::now();
    engine
        .send(Message {
            workflow_id: "e2",
            topic: "t",
            payload: json!("after"),
            key: None,
        })
        .await?;
    let value = tokio::time::timeout(PATIENCE, subscription.next("e2", "received", never))
        .await
        .context("the waiter was not woken after the listener's connection dropped")??;
    assert_eq!(value, Some(json!("after")), "served across the reconnect");
    println!(
        "listener dropped, then a send: waiter woken after {:?}",
        sent.elapsed()
    );

    // Listening again on a new connection, the listener's notifications
    // wake waiters as before (its re-read came before this subscription).
    let (reconnected, _) = wait_listening(&db.pool, Some(listener)).await?;
    engine.start(MESSENGER, "e3", &input).await?;
    wait_status(&db.pool, "e3", "waiting", PATIENCE).await?;
    let subscription = engine.subscribe();
    let sent = Instant::now();
    engine
        .send(Message {
            workflow_id: "e3",
            topic: "t",
            payload: json!("again"),
            key: None,
        })
        .await?;
    let value = tokio::time::timeout(PATIENCE, subscription.next("e3", "received", never))
        .await
        .context("no notification after the listener reconnected (the fallback poll is off)")??;
    assert_eq!(value, Some(json!("again")));
    println!(
        "listener back on backend {reconnected} (was {listener}): waiter woken by NOTIFY after {:?}",
        sent.elapsed()
    );
    Ok(())
}

#[tokio::test]
async fn a_killed_workers_workflow_continues_on_another_worker() -> anyhow::Result<()> {
    let db = engine_db().await?;
    let engine = Engine::new(db.pool.clone());
    let mut workers = vec![
        spawn_worker(&db, "takeover", &[])?,
        spawn_worker(&db, "takeover", &[])?,
    ];
    wait_workers(&db.pool, 2).await?;
    // One-statement steps after in-process sleeps, as the store's dispatch
    // runs them; the last tick waits at a gate, so the workflow is surely
    // still running whenever the kill comes.
    let input = GatedInput {
        steps: 40,
        gate_at: 40,
        one_statement: true,
        interval_ms: 50,
        ..GatedInput::default()
    };
    engine.start(GATED, "long", &input).await?;
    wait_until("a few ticks", PATIENCE, || async {
        Ok(counter(&db.pool, "ticks:long").await? >= 3)
    })
    .await?;
    let (victim_id, killed_at) = kill_owner(&db.pool, &mut workers, "long").await?;
    let takeover = wait_step_elsewhere(&db.pool, "long", &victim_id, killed_at, PATIENCE).await?;
    println!("takeover after SIGKILL: next step on another worker {takeover:?} after the kill");
    open_gate(&db.pool, "long").await?;
    wait_status(&db.pool, "long", "succeeded", PATIENCE).await?;
    assert_eq!(
        counter(&db.pool, "ticks:long").await?,
        40,
        "every tick exactly once"
    );
    let ticks = tick_checkpoints(&db.pool, "long").await?;
    let outputs: Vec<Value> = ticks.iter().map(|t| t.output.clone()).collect();
    let expected: Vec<Value> = (1..=40).map(|n| json!(n)).collect();
    assert_eq!(
        outputs, expected,
        "each tick's checkpoint its own, in order"
    );
    Ok(())
}

/// A workflow killed during its first sleep, which has no step before it to
/// count the sleep from, wakes on another worker when it would have woken
/// anyway, not a whole sleep after the takeover (the store's dispatch
/// begins with a 1 s sleep, and a takeover in it took the p99).
#[tokio::test]
async fn a_first_sleep_keeps_its_wake_up_time_through_a_takeover() -> anyhow::Result<()> {
    let db = engine_db().await?;
    let engine = Engine::new(db.pool.clone());
    // An 8 s sleep, killed half-way: a takeover that slept again from its
    // claim (after the kill) would tick at least 8 s after the kill, 4 s
    // later than the sleep ends; that 4 s is the margin for a slow machine
    // on either side. Held in-process (under the hold threshold), as the
    // dispatch's sleep is.
    let sleep = Duration::from_secs(8);
    let hold = [("WORKER_HOLD_THRESHOLD", "20000ms")];
    let mut workers = vec![
        spawn_worker(&db, "first-sleep", &hold)?,
        spawn_worker(&db, "first-sleep", &hold)?,
    ];
    wait_workers(&db.pool, 2).await?;
    engine
        .start(
            TICKER,
            "sleepy",
            &TickerInput {
                steps: 1,
                interval_ms: sleep.as_millis() as u64,
                one_statement: true,
                for_each: false,
            },
        )
        .await?;
    wait_status(&db.pool, "sleepy", "running", PATIENCE).await?;
    // The scenario: the kill lands half-way through the sleep (by the
    // database's clock, which the sleep counts from).
    let until_half: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM created_at + $1 * interval '1 second' - clock_timestamp())::float8
         FROM workflows WHERE id = 'sleepy'",
    )
    .bind(sleep.as_secs_f64() / 2.0)
    .fetch_one(&db.pool)
    .await?;
    tokio::time::sleep(Duration::from_secs_f64(until_half.max(0.0))).await;
    let (victim_id, killed_at) = kill_owner(&db.pool, &mut workers, "sleepy").await?;
    wait_status(&db.pool, "sleepy", "succeeded", PATIENCE).await?;
    let (started, ticked, ticked_by): (
        chrono::DateTime<chrono::Utc>,
        chrono::DateTime<chrono::Utc>,
        String,
    ) = sqlx::query_as(
        "SELECT w.created_at, s.finished_at, s.worker_id
         FROM workflows w JOIN workflow_steps s ON s.workflow_id = w.id
         WHERE w.id = 'sleepy' AND s.name = 'tick'",
    )
    .fetch_one(&db.pool)
    .await?;
    let killed = (killed_at - started).to_std()?;
    let after = (ticked - started).to_std()?;
    println!(
        "{sleep:?} sleep, killed {killed:?} in: ticked {after:?} after the start \
         (a sleep restarted by the takeover would tick after {:?})",
        killed + sleep
    );
    assert!(
        killed < sleep,
        "the kill landed during the sleep (at {killed:?})"
    );
    assert_ne!(ticked_by, victim_id, "the tick ran on the other worker");
    assert!(after >= sleep, "slept at least its {sleep:?}: {after:?}");
    assert!(
        after < killed + sleep,
        "woke at its own time, not a whole sleep after the takeover (>= {:?}): {after:?}",
        killed + sleep
    );
    assert_eq!(counter(&db.pool, "ticks:sleepy").await?, 1);
    Ok(())
}

/// An in-process sleep gives the queue slot back: one worker with one slot
/// has every one of 20 sleeping workflows ticking at once. Were the slot
/// held through the sleeps, they would run one after another (8 s each),
/// each one's first tick after the one before it had finished.
#[tokio::test]
async fn sleeping_workflows_hold_no_worker_slot() -> anyhow::Result<()> {
    let db = engine_db().await?;
    let engine = Engine::new(db.pool.clone());
    let _worker = spawn_worker(&db, "sleepers", &[("WORKER_CONCURRENCY", "1")])?;
    wait_workers(&db.pool, 1).await?;
    let input = TickerInput {
        steps: 4,
        interval_ms: 2_000,
        one_statement: false,
        for_each: false,
    };
    for i in 0..20 {
        engine.start(TICKER, &format!("sleeper{i}"), &input).await?;
    }
    // Generous: 20 workflows one after another would take 160 s.
    let took = wait_until("all 20 finished", Duration::from_secs(300), || async {
        Ok(count(
            &db.pool,
            "SELECT count(*) FROM workflows WHERE status = 'succeeded'",
        )
        .await?
            == 20)
    })
    .await?;
    assert_eq!(
        count(
            &db.pool,
            "SELECT sum(value)::bigint FROM engine_test_counters WHERE name LIKE 'ticks:sleeper%'"
        )
        .await?,
        80,
        "every tick exactly once"
    );
    // All 20 at once: the last of them to tick first did so before the
    // first of them to finish ticked last.
    let (last_first_tick, first_last_tick): (
        chrono::DateTime<chrono::Utc>,
        chrono::DateTime<chrono::Utc>,
    ) = sqlx::query_as(
        "SELECT max(first_tick), min(last_tick) FROM (
             SELECT min(finished_at) AS first_tick, max(finished_at) AS last_tick
             FROM workflow_steps WHERE name = 'tick' GROUP BY workflow_id) t",
    )
    .fetch_one(&db.pool)
    .await?;
    let overlap = first_last_tick - last_first_tick;
    println!(
        "20 sleeping workflows on one slot: all finished after {took:?}; all 20 were mid-run at once for {} ms",
        overlap.num_milliseconds()
    );
    assert!(
        last_first_tick < first_last_tick,
        "every workflow ticked before any finished: the last first tick at {last_first_tick}, \
         the first last tick at {first_last_tick}"
    );
    Ok(())
}

#[tokio::test]
async fn notified_jobs_run_at_once_and_a_full_queue_falls_back_to_apalis() -> anyhow::Result<()> {
    let db = engine_db().await?;
    let engine = Engine::new(db.pool.clone());
    // No timed poll within the test: every pickup below comes from a
    // notification, taken directly or through apalis' fetch.
    let poll_off = [
        ("WORKER_CONCURRENCY", "2"),
        ("WORKER_POLL_INTERVAL", "600000ms"),
    ];
    let _a = spawn_worker(&db, "notified-a", &poll_off)?;
    let _b = spawn_worker(&db, "notified-b", &poll_off)?;
    wait_workers(&db.pool, 2).await?;

    // One at a time, free slots: each job is taken from its notification
    // by one of the two workers, never fetched by apalis (whose
    // acknowledgement writes the handler's result into last_result).
    for i in 0..10 {
        let id = format!("one-by-one{i}");
        engine.start(workflows::NOOP, &id, &json!(null)).await?;
        wait_status(&db.pool, &id, "succeeded", PATIENCE).await?;
    }
    let fetched: Vec<String> = sqlx::query_scalar(
        "SELECT id || ' ' || status || ' ' || coalesce(last_result::text, '-') FROM apalis.jobs
         WHERE status <> 'Done' OR last_result IS NOT NULL",
    )
    .fetch_all(&db.pool)
    .await?;
    assert!(
        fetched.is_empty(),
        "jobs not taken from their notification: {fetched:?}"
    );
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM apalis.jobs").await?,
        10,
        "one job per workflow"
    );

    // A burst of 40 against 2 slots per worker: the notifications that
    // find no free slot wake apalis' fetch instead, and every workflow
    // finishes, each step once.
    let starts = (0..40).map(|i| {
        let engine = engine.clone();
        tokio::spawn(async move {
            engine
                .start(workflows::NOOP, &format!("burst{i}"), &json!(null))
                .await
        })
    });
    for started in futures::future::try_join_all(starts).await? {
        started?;
    }
    wait_until(
        "all 40 of the burst finished",
        Duration::from_secs(120),
        || async {
            Ok(count(
                &db.pool,
                "SELECT count(*) FROM workflows WHERE id LIKE 'burst%' AND status = 'succeeded'",
            )
            .await?
                == 40)
        },
    )
    .await?;
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM workflow_steps WHERE workflow_id LIKE 'burst%'"
        )
        .await?,
        120,
        "three checkpoints per workflow"
    );
    // apalis acknowledges the jobs it fetched a moment after their
    // handler returns.
    wait_until("every job done", PATIENCE, || async {
        Ok(count(
            &db.pool,
            "SELECT count(*) FROM apalis.jobs WHERE status <> 'Done'",
        )
        .await?
            == 0)
    })
    .await?;
    let fetched = count(
        &db.pool,
        "SELECT count(*) FROM apalis.jobs WHERE last_result IS NOT NULL",
    )
    .await?;
    println!(
        "burst of 40 on 2 x 2 slots: {fetched} jobs fetched by apalis, the rest taken from their notification"
    );
    assert!(
        fetched > 0,
        "the burst overflowed the slots: some jobs went to apalis' fetch"
    );
    Ok(())
}

/// Inputs of [`FLAKY`] runs, from `(fail_times, fatal, panic)`.
fn flaky_runs(after_database_step: bool) -> impl Fn(i64, bool, bool) -> FlakyInput {
    move |fail_times, fatal, panic| FlakyInput {
        fail_times,
        fatal,
        panic,
        after_database_step,
    }
}

#[tokio::test]
async fn retries_back_off_then_dead_letter_keeps_the_last_error() -> anyhow::Result<()> {
    let db = engine_db().await?;
    let engine = Engine::new(db.pool.clone());
    let _worker = spawn_worker(&db, "retries", &[])?;
    let run = flaky_runs(false);
    engine
        .start(FLAKY, "recovers", &run(2, false, false))
        .await?;
    engine.start(FLAKY, "fatal", &run(0, true, false)).await?;
    engine.start(FLAKY, "panics", &run(0, false, true)).await?;
    engine
        .start(FLAKY, "exhausted", &run(100, false, false))
        .await?;
    wait_status(&db.pool, "recovers", "succeeded", PATIENCE).await?;
    assert_eq!(
        counter(&db.pool, "attempts:recovers").await?,
        3,
        "two failures, then success"
    );
    for (id, attempts, words) in [
        ("fatal", 1, "deliberate fatal error"),
        ("panics", 4, "panicked: deliberate panic"),
        ("exhausted", 4, "deliberate failure 4"),
    ] {
        wait_status(&db.pool, id, "failed", PATIENCE).await?;
        let info = engine.info(id).await?.context("row")?;
        let error = info.error.unwrap_or_default();
        assert!(error.contains(words), "{id}: {error}");
        assert_eq!(
            counter(&db.pool, &format!("attempts:{id}")).await?,
            attempts,
            "{id}"
        );
        assert_eq!(
            info.attempts, attempts as i32,
            "{id}: attempts kept on the row"
        );
    }
    // Backed off: each retry began at least the policy's backoff after the
    // attempt before it (by the database's clock).
    let policy = workflows::Flaky {
        pool: db.pool.clone(),
    }
    .retry_policy();
    for id in ["recovers", "panics", "exhausted"] {
        let gaps: Vec<Option<i64>> = sqlx::query_scalar(
            "SELECT (extract(epoch FROM at - lag(at) OVER (ORDER BY attempt)) * 1e6)::bigint
             FROM engine_test_attempts WHERE workflow_id = $1 ORDER BY attempt",
        )
        .bind(id)
        .fetch_all(&db.pool)
        .await?;
        let gaps: Vec<Duration> = gaps
            .into_iter()
            .flatten()
            .map(|us| Duration::from_micros(us.max(0) as u64))
            .collect();
        println!("{id}: each retry after {gaps:?}");
        assert_eq!(
            gaps.len() as i64 + 1,
            counter(&db.pool, &format!("attempts:{id}")).await?,
            "{id}: every attempt logged"
        );
        for (retry, gap) in (1..).zip(&gaps) {
            assert!(
                *gap >= policy.backoff(retry),
                "{id}: retry {retry} began {gap:?} after the failure before it, within its backoff {:?}",
                policy.backoff(retry)
            );
        }
    }
    Ok(())
}

/// Database steps in a row share one transaction; when a later one fails,
/// the rollback takes the earlier ones with it, and the engine replays them
/// committing one by one. Each effect still lands exactly once, and a fatal
/// error still fails the workflow with what came before it committed.
#[tokio::test]
async fn a_step_failing_after_another_in_its_transaction_keeps_each_effect_once()
-> anyhow::Result<()> {
    let db = engine_db().await?;
    let engine = Engine::new(db.pool.clone());
    let _worker = spawn_worker(&db, "shared-tx", &[])?;
    let run = flaky_runs(true);
    engine
        .start(FLAKY, "recovers", &run(2, false, false))
        .await?;
    engine.start(FLAKY, "fatal", &run(0, true, false)).await?;
    engine.start(FLAKY, "panics", &run(0, false, true)).await?;
    wait_status(&db.pool, "recovers", "succeeded", PATIENCE).await?;
    assert_eq!(counter(&db.pool, "attempts:recovers").await?, 3);
    assert_eq!(
        counter(&db.pool, "before:recovers").await?,
        1,
        "the step before the failures applied once"
    );
    assert_eq!(counter(&db.pool, "effect:recovers").await?, 1);
    for (id, words) in [
        ("fatal", "deliberate fatal error"),
        ("panics", "panicked: deliberate panic"),
    ] {
        wait_status(&db.pool, id, "failed", PATIENCE).await?;
        let error = engine
            .info(id)
            .await?
            .context("row")?
            .error
            .unwrap_or_default();
        assert!(error.contains(words), "{id}: {error}");
        assert_eq!(
            counter(&db.pool, &format!("before:{id}")).await?,
            1,
            "{id}: the step before the failure committed once"
        );
        assert_eq!(counter(&db.pool, &format!("effect:{id}")).await?, 0, "{id}");
    }
    Ok(())
}

#[tokio::test]
async fn cancel_at_a_step_boundary_and_resume_from_the_last_checkpoint() -> anyhow::Result<()> {
    let db = engine_db().await?;
    let engine = Engine::new(db.pool.clone());
    let _worker = spawn_worker(&db, "cancel", &[])?;
    // Each kind of database step: a cancel refuses the checkpoint of a
    // one-statement step, which must undo that statement's effect.
    for (id, one_statement) in [("c1", false), ("c1-statement", true)] {
        let input = GatedInput {
            steps: 6,
            gate_at: 3,
            one_statement,
            interval_ms: 0,
            ..GatedInput::default()
        };
        engine.start(GATED, id, &input).await?;
        let ticks = format!("ticks:{id}");
        // Tick 3 waits at the gate inside its step: the cancel surely comes
        // while the workflow runs, and that step is the one to refuse.
        wait_at_gate(&db.pool, id).await?;
        assert_eq!(counter(&db.pool, &ticks).await?, 2, "{id}: before the gate");
        assert_eq!(
            engine.cancel(id).await?,
            CancelOutcome::Requested,
            "{id}: cancelled while running"
        );
        open_gate(&db.pool, id).await?;
        wait_status(&db.pool, id, "cancelled", PATIENCE).await?;
        assert_eq!(
            counter(&db.pool, &ticks).await?,
            2,
            "{id}: the tick running at the cancel was refused at its checkpoint, its effect undone"
        );
        // The tick refused by the cancel published nothing either.
        assert_eq!(
            last_tick(&db.pool, id).await?,
            Some(2),
            "{id}: the tick event matches the ticks counted"
        );
        engine.resume(id).await?;
        wait_status(&db.pool, id, "succeeded", PATIENCE).await?;
        assert_eq!(
            counter(&db.pool, &ticks).await?,
            6,
            "{id}: resumed from the checkpoint: no tick twice, none lost"
        );
        let outputs: Vec<Value> = tick_checkpoints(&db.pool, id)
            .await?
            .into_iter()
            .map(|t| t.output)
            .collect();
        let expected: Vec<Value> = (1..=6).map(|n| json!(n)).collect();
        assert_eq!(outputs, expected, "{id}: each tick's checkpoint its own");
        assert_eq!(
            last_tick(&db.pool, id).await?,
            Some(6),
            "{id}: last tick event"
        );
    }

    // A parked workflow is woken for the cancel and its wait ends.
    let input = MessengerInput {
        topic: "t".into(),
        timeout_ms: 60_000,
    };
    engine.start(MESSENGER, "c2", &input).await?;
    wait_status(&db.pool, "c2", "waiting", PATIENCE).await?;
    assert_eq!(engine.cancel("c2").await?, CancelOutcome::Requested);
    wait_status(&db.pool, "c2", "cancelled", PATIENCE).await?;
    assert_eq!(
        engine.cancel("c2").await?,
        CancelOutcome::Finished(WorkflowStatus::Cancelled),
        "a second cancel changes nothing"
    );
    let late = Message {
        workflow_id: "c2",
        topic: "t",
        payload: json!(1),
        key: None,
    };
    assert!(matches!(
        engine.send(late).await,
        Err(EngineError::Finished { .. })
    ));
    assert!(matches!(
        engine.resume("c1").await,
        Err(EngineError::NotResumable { .. })
    ));
    Ok(())
}

/// The value of event `key` of workflow `id`.
async fn event_of(pool: &PgPool, id: &str, key: &str) -> anyhow::Result<Option<Value>> {
    Ok(Engine::new(pool.clone()).event(id, key).await?)
}

#[tokio::test]
async fn a_cancel_or_a_failure_for_good_runs_the_compensation_once_then_ends_the_workflow()
-> anyhow::Result<()> {
    let db = engine_db().await?;
    let engine = Engine::new(db.pool.clone());
    let _worker = spawn_worker(&db, "compensate", &[])?;

    // Cancelled mid-run: tick 3 waits at its gate when the cancel comes.
    let cancelled = GatedInput {
        steps: 6,
        gate_at: 3,
        compensate: true,
        ..GatedInput::default()
    };
    engine.start(GATED, "undo-cancel", &cancelled).await?;
    wait_at_gate(&db.pool, "undo-cancel").await?;
    assert_eq!(
        engine.cancel("undo-cancel").await?,
        CancelOutcome::Requested
    );
    open_gate(&db.pool, "undo-cancel").await?;
    wait_status(&db.pool, "undo-cancel", "cancelled", PATIENCE).await?;
    assert_eq!(counter(&db.pool, "ticks:undo-cancel").await?, 2);
    assert_eq!(
        counter(&db.pool, "undone:undo-cancel").await?,
        2,
        "the compensation undid the two ticks that completed, once"
    );
    assert_eq!(
        event_of(&db.pool, "undo-cancel", "ending").await?,
        Some(json!("cancelled"))
    );
    assert!(
        matches!(
            engine.resume("undo-cancel").await,
            Err(EngineError::Compensated(_))
        ),
        "a compensated workflow is not resumed over its compensation"
    );

    // Failed for good at tick 4: the three before it are undone.
    let failing = GatedInput {
        steps: 6,
        fail_at: 4,
        compensate: true,
        ..GatedInput::default()
    };
    engine.start(GATED, "undo-failure", &failing).await?;
    wait_status(&db.pool, "undo-failure", "failed", PATIENCE).await?;
    assert_eq!(counter(&db.pool, "undone:undo-failure").await?, 3);
    assert_eq!(
        event_of(&db.pool, "undo-failure", "ending").await?,
        Some(json!("failed"))
    );
    let info = engine.info("undo-failure").await?.expect("exists");
    assert!(
        info.error
            .as_deref()
            .is_some_and(|e| e.contains("this tick fails for good")),
        "the failure's own error is kept: {:?}",
        info.error
    );

    // A workflow with no compensation of its own ends as before, and
    // resumes from its last checkpoint.
    let plain = GatedInput {
        steps: 3,
        fail_at: 2,
        ..GatedInput::default()
    };
    engine.start(GATED, "no-undo", &plain).await?;
    wait_status(&db.pool, "no-undo", "failed", PATIENCE).await?;
    let steps: Vec<String> = engine
        .steps("no-undo")
        .await?
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(
        steps,
        ["tick", ENDING_STEP],
        "the end is marked after the last tick"
    );
    Ok(())
}

#[tokio::test]
async fn a_worker_killed_inside_a_compensation_leaves_it_to_another_which_finishes_it_once()
-> anyhow::Result<()> {
    let db = engine_db().await?;
    let engine = Engine::new(db.pool.clone());
    let mut doomed = spawn_worker(&db, "doomed", &[("WORKER_CRASH_AT", "after:undo")])?;
    let failing = GatedInput {
        steps: 4,
        fail_at: 3,
        compensate: true,
        ..GatedInput::default()
    };
    engine.start(GATED, "undo-crash", &failing).await?;
    let exit = doomed.wait_exit(PATIENCE).await?;
    assert_ne!(exit, Some(0), "the worker died at its crash point");
    assert_eq!(
        status(&db.pool, "undo-crash").await?,
        "running",
        "it died after the compensation's step committed, before the workflow ended"
    );
    let _survivor = spawn_worker(&db, "survivor", &[])?;
    wait_status(&db.pool, "undo-crash", "failed", PATIENCE).await?;
    assert_eq!(
        counter(&db.pool, "undone:undo-crash").await?,
        2,
        "the compensation's step was replayed from its checkpoint, not run again"
    );
    Ok(())
}

#[tokio::test]
async fn restart_runs_a_new_workflow_from_a_chosen_step_and_leaves_the_original_alone()
-> anyhow::Result<()> {
    let db = engine_db().await?;
    let engine = Engine::new(db.pool.clone());
    let _worker = spawn_worker(&db, "restart", &[])?;
    let failing = GatedInput {
        steps: 5,
        fail_at: 4,
        ..GatedInput::default()
    };
    engine.start(GATED, "original", &failing).await?;
    wait_status(&db.pool, "original", "failed", PATIENCE).await?;
    let before = engine.steps("original").await?.len();

    // From step 2: ticks 1 and 2 are copied, not run again.
    let handle = engine.restart("original", "copy", Some(2)).await?;
    assert!(handle.created);
    // It fails at tick 4 too (same input): ticks 3 ran under its own name.
    wait_status(&db.pool, "copy", "failed", PATIENCE).await?;
    assert_eq!(counter(&db.pool, "ticks:copy").await?, 1, "only tick 3 ran");
    let copied: Vec<i32> = engine
        .steps("copy")
        .await?
        .iter()
        .map(|s| s.step_seq)
        .collect();
    assert_eq!(
        copied,
        [0, 1, 2, 3],
        "two copied ticks, one run, the end marker"
    );
    assert_eq!(
        engine.steps("original").await?.len(),
        before,
        "original untouched"
    );
    assert_eq!(status(&db.pool, "original").await?, "failed");

    assert!(matches!(
        engine.restart("original", "copy", None).await,
        Err(EngineError::IdTaken(_))
    ));
    assert!(matches!(
        engine.restart("original", "copy-2", Some(9)).await,
        Err(EngineError::NoSuchStep { steps: 3, .. })
    ));
    assert!(matches!(
        engine.restart("nobody", "copy-3", None).await,
        Err(EngineError::UnknownWorkflow(_))
    ));
    Ok(())
}

#[tokio::test]
async fn sigterm_drains_and_hands_work_to_another_worker_at_once() -> anyhow::Result<()> {
    let db = engine_db().await?;
    let engine = Engine::new(db.pool.clone());
    // A drain timeout far beyond the waits below: a worker that exits and
    // hands over within them did not sit out its drain timeout.
    let env = [("WORKER_DRAIN_TIMEOUT", "600000ms")];
    let mut workers = vec![
        spawn_worker(&db, "drain", &env)?,
        spawn_worker(&db, "drain", &env)?,
    ];
    wait_workers(&db.pool, 2).await?;
    let input = GatedInput {
        steps: 6,
        gate_at: 3,
        one_statement: false,
        interval_ms: 0,
        ..GatedInput::default()
    };
    engine.start(GATED, "d1", &input).await?;
    // The SIGTERM lands while tick 3 runs: it waits at the gate inside its
    // step.
    wait_at_gate(&db.pool, "d1").await?;
    let (victim_id, victim_pid) = owner_of(&db.pool, "d1").await?;
    let index = workers
        .iter()
        .position(|w| w.pid() as i32 == victim_pid)
        .context("owner is ours")?;
    let mut victim = workers.remove(index);
    let signalled: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(&db.pool)
        .await?;
    victim.signal("TERM")?;
    // Its heartbeat shows the drain once it has begun: only then may the
    // step at the gate finish, so no step after it can start there. It
    // cannot leave the fleet before: its step is still running.
    let draining = || async {
        let draining: Option<bool> =
            sqlx::query_scalar("SELECT draining FROM workers WHERE id = $1")
                .bind(&victim_id)
                .fetch_optional(&db.pool)
                .await?;
        anyhow::Ok(draining)
    };
    let shown = wait_until("the victim draining", PATIENCE, || async {
        Ok(draining().await? != Some(false))
    })
    .await?;
    assert_eq!(
        draining().await?,
        Some(true),
        "the victim left the fleet with its step still waiting at the gate: it did not drain"
    );
    open_gate(&db.pool, "d1").await?;
    let exit = Instant::now();
    assert_eq!(
        victim.wait_exit(PATIENCE).await?,
        Some(0),
        "drained worker exits 0"
    );
    let exited = exit.elapsed();
    let handover = wait_step_elsewhere(&db.pool, "d1", &victim_id, signalled, PATIENCE).await?;
    println!(
        "SIGTERM -> draining shown {shown:?} later; gate opened -> exit {exited:?}; \
         SIGTERM -> next step on the other worker {handover:?} (drain timeout 600 s)"
    );
    assert_eq!(
        live_workers(&db.pool).await?,
        1,
        "the drained worker left the registry"
    );
    wait_status(&db.pool, "d1", "succeeded", PATIENCE).await?;
    assert_eq!(counter(&db.pool, "ticks:d1").await?, 6, "each tick once");
    let ran_by: Vec<bool> = tick_checkpoints(&db.pool, "d1")
        .await?
        .iter()
        .map(|t| t.worker_id == victim_id)
        .collect();
    assert_eq!(
        ran_by,
        [true, true, true, false, false, false],
        "ticks 1-3 on the drained worker (3: the step running at the SIGTERM finished), 4-6 on the other"
    );
    Ok(())
}

#[tokio::test]
async fn the_fleet_registry_shows_each_live_worker() -> anyhow::Result<()> {
    let db = engine_db().await?;
    let engine = Engine::new(db.pool.clone());
    let first = spawn_worker(&db, "registry", &[])?;
    wait_workers(&db.pool, 1).await?;
    let (id, host, pid, queues): (String, String, i32, Vec<String>) =
        sqlx::query_as("SELECT id, host, pid, queues FROM workers")
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(pid as u32, first.pid());
    assert!(!host.is_empty());
    assert!(
        !id.contains(&host) && !id.contains(&pid.to_string()),
        "the id names neither host nor process (the public fleet view shows it): {id}"
    );
    assert_eq!(queues, vec!["engine".to_owned()]);
    engine
        .start(
            TICKER,
            "busy",
            &TickerInput {
                steps: 20,
                interval_ms: 100,
                one_statement: false,
                for_each: false,
            },
        )
        .await?;
    wait_until("in_flight shown", PATIENCE, || async {
        Ok(count(
            &db.pool,
            "SELECT coalesce(sum(in_flight), 0)::bigint FROM workers",
        )
        .await?
            >= 1)
    })
    .await?;
    // Live: its heartbeat moves last_seen on.
    let seen: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT last_seen FROM workers")
        .fetch_one(&db.pool)
        .await?;
    let beat = wait_until("a heartbeat", PATIENCE, || async {
        let last: chrono::DateTime<chrono::Utc> =
            sqlx::query_scalar("SELECT last_seen FROM workers")
                .fetch_one(&db.pool)
                .await?;
        Ok(last > seen)
    })
    .await?;
    println!("next heartbeat seen {beat:?} after the first look");
    // A restarted process gets a new id; the dead one disappears when a live
    // worker reaps it.
    first.signal("KILL")?;
    drop(first);
    let _second = spawn_worker(&db, "registry", &[])?;
    wait_until("dead worker replaced in the registry", PATIENCE, || async {
        let ids: Vec<String> = sqlx::query_scalar("SELECT id FROM workers")
            .fetch_all(&db.pool)
            .await?;
        Ok(ids.len() == 1 && ids[0] != id)
    })
    .await?;
    wait_status(&db.pool, "busy", "succeeded", PATIENCE).await?;
    Ok(())
}

#[tokio::test]
async fn finished_jobs_are_pruned() -> anyhow::Result<()> {
    let db = engine_db().await?;
    let engine = Engine::new(db.pool.clone());
    for i in 0..200 {
        engine
            .start(COUNTER, &format!("prune-{i}"), &json!({}))
            .await?;
    }
    // And more than two pruning statements' worth of jobs finished long
    // ago, as after a long outage: pruned in batches too.
    sqlx::query(
        "INSERT INTO apalis.jobs (job, id, job_type, status, attempts, done_at)
         SELECT convert_to('{}', 'UTF8'), 'finished-long-ago-' || g, 'old-queue', 'Done', 1,
                now() - interval '1 day'
         FROM generate_series(1, 12000) g",
    )
    .execute(&db.pool)
    .await?;
    let _worker = spawn_worker(&db, "prune", &[("WORKER_PRUNE_AFTER", "1000ms")])?;
    wait_until("all done", Duration::from_secs(120), || async {
        Ok(count(
            &db.pool,
            "SELECT count(*) FROM workflows WHERE status = 'succeeded'",
        )
        .await?
            == 200)
    })
    .await?;
    wait_until("done jobs pruned", PATIENCE, || async {
        Ok(count(&db.pool, "SELECT count(*) FROM apalis.jobs").await? == 0)
    })
    .await?;
    Ok(())
}
