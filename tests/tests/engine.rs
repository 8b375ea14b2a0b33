//! The durable workflow engine against a real PostgreSQL, with real worker
//! processes (`engine-test-worker`) killed with real signals.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use harness::workflows::{
    self, COUNTER, FLAKY, FLUSH_PROBE, FlakyInput, FlushProbe, INSERT_ONCE, InsertOnce, MESSENGER,
    MessengerInput, NoOp, PARENT, Parent, TICKER, Ticker, TickerInput, counter,
};
use harness::{
    Proc, TestDb, live_workers, wait_step_elsewhere, wait_until, wait_workers, worker_env,
};
use rand::Rng;
use serde_json::{Value, json};
use shared::db::DatabaseArgs;
use shared::engine::{
    Engine, EngineError, EventListener, ExecutionOutcome, Message, QueueConfig, Runtime,
    RuntimeConfig, SendOutcome, WorkflowStatus,
};
use sqlx::PgPool;

async fn engine_db() -> anyhow::Result<TestDb> {
    let db = TestDb::create().await?;
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

/// The worker process that owns a running workflow, as (worker id, pid).
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
            "SELECT count(*) FROM workflow_steps WHERE workflow_id = 'parent-2'"
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
    wait_status(&db.pool, "child", "succeeded", Duration::from_secs(10)).await?;
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
    let took = wait_status(&db.pool, "lost", "succeeded", Duration::from_secs(40)).await?;
    println!("a lost running workflow succeeded {took:?} after it was left");
    assert_eq!(counter(&db.pool, "ticks:lost").await?, 1);
    Ok(())
}

#[tokio::test]
async fn an_unflushed_step_inside_a_shared_transaction_leaves_its_commit_flushed()
-> anyhow::Result<()> {
    let db = engine_db().await?;
    let engine = Engine::new(db.pool.clone());
    let rt = runtime(&db)?;
    engine.start(FLUSH_PROBE, "probe", &json!({})).await?;
    assert_eq!(rt.execute("probe").await, ExecutionOutcome::Succeeded);
    let probe = engine.info("probe").await?.context("probe")?;
    assert_eq!(
        probe.output,
        Some(json!("on")),
        "the transaction sets an event: Engine::start_unflushed's callers rely on its flush"
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
    wait_status(&db.pool, "renamed", "waiting", Duration::from_secs(20)).await?;
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
    wait_status(&db.pool, "renamed", "failed", Duration::from_secs(20)).await?;
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
    let input = TickerInput {
        steps: 6,
        interval_ms: 1,
        one_statement: false,
        for_each: false,
    };
    engine.start(TICKER, "replayed", &input).await?;
    let rt = runtime(&db)?;
    // Cancel after the first execution has checkpointed some ticks, then
    // resume: the new execution replays those and runs only the rest.
    let first = tokio::spawn({
        let rt = rt.clone();
        async move { rt.execute("replayed").await }
    });
    wait_until("some ticks", Duration::from_secs(10), || async {
        Ok(counter(&db.pool, "ticks:replayed").await? >= 2)
    })
    .await?;
    engine.cancel("replayed").await?;
    let outcome = first.await?;
    assert!(
        matches!(
            outcome,
            ExecutionOutcome::Cancelled | ExecutionOutcome::Succeeded
        ),
        "{outcome:?}"
    );
    if outcome == ExecutionOutcome::Cancelled {
        engine.resume("replayed").await?;
        assert_eq!(rt.execute("replayed").await, ExecutionOutcome::Succeeded);
    }
    assert_eq!(
        counter(&db.pool, "ticks:replayed").await?,
        6,
        "every tick exactly once across executions"
    );
    let distinct: i64 = count(
        &db.pool,
        "SELECT count(DISTINCT step_seq) FROM workflow_steps WHERE workflow_id = 'replayed'",
    )
    .await?;
    // In-process sleeps leave no checkpoint (the first counts from the
    // workflow's start).
    assert_eq!(distinct, 6, "6 ticks, each checkpointed once");
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
/// workflow has until its deadline (a dropped one left a paid checkout
/// waiting, and its webhook answered 504, once in a benchmark run).
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
    wait_status(&db.pool, "m1", "waiting", Duration::from_secs(20)).await?;
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
    wait_status(&db.pool, "m1", "succeeded", Duration::from_secs(20)).await?;
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
    wait_status(&db.pool, "early", "succeeded", Duration::from_secs(20)).await?;

    // The recv deadline is checkpointed: it holds across a SIGKILL and a new worker.
    let short = MessengerInput {
        topic: "greet".into(),
        timeout_ms: 2_500,
    };
    engine.start(MESSENGER, "deadline", &short).await?;
    wait_status(&db.pool, "deadline", "waiting", Duration::from_secs(20)).await?;
    worker.signal("KILL")?;
    worker.wait_exit(Duration::from_secs(10)).await?;
    let _replacement = spawn_worker(&db, "messages", &[])?;
    wait_status(&db.pool, "deadline", "succeeded", Duration::from_secs(30)).await?;
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
    let _worker = spawn_worker(
        &db,
        "parked",
        &[("WORKER_CONCURRENCY", "8"), ("DB_MAX_CONNECTIONS", "10")],
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
    let connections = count(
        &db.pool,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
         AND application_name LIKE 'engine-test-worker%'",
    )
    .await?;
    assert!(
        connections <= 12,
        "{total} parked workflows hold no connection: worker has {connections}"
    );
    // The registry's in_flight is refreshed every heartbeat (1 s).
    wait_until("no worker slot held", Duration::from_secs(5), || async {
        Ok(count(
            &db.pool,
            "SELECT coalesce(sum(in_flight), 0)::bigint FROM workers",
        )
        .await?
            == 0)
    })
    .await?;
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
        "{total} workflows: all parked after {:.1?} (worker connections {connections}); all finished {:.1?} after the sends began",
        parked_after,
        sent.elapsed()
    );
    Ok(())
}

#[tokio::test]
async fn events_wake_waiters_fast_and_survive_the_listener_dropping() -> anyhow::Result<()> {
    let db = engine_db().await?;
    // A slow fallback poll: a fast wake-up can only come from NOTIFY.
    let engine = Engine::new(db.pool.clone()).with_events(
        EventListener::spawn(db.pool.clone()),
        Duration::from_secs(5),
    );
    let _worker = spawn_worker(&db, "events", &[])?;
    let input = MessengerInput {
        topic: "t".into(),
        timeout_ms: 60_000,
    };
    engine.start(MESSENGER, "e1", &input).await?;
    wait_status(&db.pool, "e1", "waiting", Duration::from_secs(20)).await?;
    // Subscribed before the send, so no read is needed: both events of the
    // step that publishes them arrive as notifications.
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
    let published = subscription
        .next_all("e1", ["received", "receipt"], Duration::from_secs(20))
        .await?;
    let latency = sent.elapsed();
    assert_eq!(published, Some([json!("ping"), json!(1)]));
    println!("send -> workflow resumes -> two events -> waiter woke: {latency:?}");
    assert!(
        latency < Duration::from_secs(2),
        "woken by NOTIFY, not the 5 s poll: {latency:?}"
    );

    let asked = Instant::now();
    assert_eq!(
        engine
            .get_event("e1", "never", Duration::from_millis(300))
            .await?,
        None,
        "not yet"
    );
    let waited = asked.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(2),
        "{waited:?}"
    );

    engine.start(MESSENGER, "e2", &input).await?;
    wait_status(&db.pool, "e2", "waiting", Duration::from_secs(20)).await?;
    let waiter = tokio::spawn({
        let engine = engine.clone();
        async move {
            engine
                .get_event("e2", "received", Duration::from_secs(30))
                .await
        }
    });
    let admin = PgPool::connect(&harness::admin_url()).await?;
    let terminated: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = $1 AND query ILIKE 'LISTEN%' AND application_name NOT LIKE 'engine-test-worker%') t",
    )
    .bind(&db.name)
    .fetch_one(&admin)
    .await?;
    assert!(
        terminated >= 1,
        "the listener connection was found and dropped"
    );
    engine
        .send(Message {
            workflow_id: "e2",
            topic: "t",
            payload: json!("after"),
            key: None,
        })
        .await?;
    let value = tokio::time::timeout(Duration::from_secs(15), waiter).await??;
    assert_eq!(
        value?,
        Some(json!("after")),
        "waiter still served after the listener reconnected"
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
    engine
        .start(
            TICKER,
            "long",
            // One-statement steps, as the store's dispatch runs them.
            &TickerInput {
                steps: 40,
                interval_ms: 50,
                one_statement: true,
                for_each: false,
            },
        )
        .await?;
    wait_until("a few ticks", Duration::from_secs(20), || async {
        Ok(counter(&db.pool, "ticks:long").await? >= 3)
    })
    .await?;
    let (victim_id, killed_at) = kill_owner(&db.pool, &mut workers, "long").await?;
    let takeover = wait_step_elsewhere(
        &db.pool,
        "long",
        &victim_id,
        killed_at,
        Duration::from_secs(15),
    )
    .await?;
    println!("takeover after SIGKILL: next step on another worker {takeover:?} after the kill");
    assert!(takeover < Duration::from_secs(15));
    wait_status(&db.pool, "long", "succeeded", Duration::from_secs(30)).await?;
    assert_eq!(
        counter(&db.pool, "ticks:long").await?,
        40,
        "every tick exactly once"
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
    let mut workers = vec![
        spawn_worker(&db, "first-sleep", &[])?,
        spawn_worker(&db, "first-sleep", &[])?,
    ];
    wait_workers(&db.pool, 2).await?;
    let sleep = Duration::from_secs(4);
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
    wait_status(&db.pool, "sleepy", "running", Duration::from_secs(20)).await?;
    // The scenario: the kill lands 1.5 s into the 4 s sleep.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let (victim_id, _) = kill_owner(&db.pool, &mut workers, "sleepy").await?;
    wait_status(&db.pool, "sleepy", "succeeded", Duration::from_secs(30)).await?;
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
    assert_ne!(ticked_by, victim_id, "the tick ran on the other worker");
    let after = (ticked - started).to_std()?;
    println!("4 s sleep, killed 1.5 s in: ticked {after:?} after the start");
    assert!(after >= sleep, "slept at least its 4 s: {after:?}");
    assert!(
        after < Duration::from_secs(5),
        "woke at its own time, not 4 s after the takeover (>= 5.5 s): {after:?}"
    );
    assert_eq!(counter(&db.pool, "ticks:sleepy").await?, 1);
    Ok(())
}

/// An in-process sleep gives the queue slot back: one worker with one slot
/// has every one of 20 sleeping workflows ticking at once. Were the slot
/// held through the sleeps, they would run one after another (5 s each).
#[tokio::test]
async fn sleeping_workflows_hold_no_worker_slot() -> anyhow::Result<()> {
    let db = engine_db().await?;
    let engine = Engine::new(db.pool.clone());
    let _worker = spawn_worker(&db, "sleepers", &[("WORKER_CONCURRENCY", "1")])?;
    wait_workers(&db.pool, 1).await?;
    let input = TickerInput {
        steps: 5,
        interval_ms: 1_000,
        one_statement: false,
        for_each: false,
    };
    for i in 0..20 {
        engine.start(TICKER, &format!("sleeper{i}"), &input).await?;
    }
    wait_until("all 20 ticking", Duration::from_secs(30), || async {
        Ok(count(
            &db.pool,
            "SELECT count(*) FROM engine_test_counters WHERE name LIKE 'ticks:sleeper%' AND value >= 1",
        )
        .await?
            == 20)
    })
    .await?;
    let finished = count(
        &db.pool,
        "SELECT count(*) FROM workflows WHERE status = 'succeeded'",
    )
    .await?;
    assert!(
        finished < 20,
        "20 workflows ticked with one slot before all of them finished"
    );
    wait_until("all 20 finished", Duration::from_secs(60), || async {
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
        100,
        "every tick exactly once"
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
        ("WORKER_POLL_INTERVAL_MS", "600000"),
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
        wait_status(&db.pool, &id, "succeeded", Duration::from_secs(10)).await?;
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
        Duration::from_secs(30),
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
    wait_until("every job done", Duration::from_secs(10), || async {
        Ok(count(
            &db.pool,
            "SELECT count(*) FROM apalis.jobs WHERE status <> 'Done'",
        )
        .await?
            == 0)
    })
    .await?;
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
    wait_status(&db.pool, "recovers", "succeeded", Duration::from_secs(20)).await?;
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
        wait_status(&db.pool, id, "failed", Duration::from_secs(20)).await?;
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
    wait_status(&db.pool, "recovers", "succeeded", Duration::from_secs(20)).await?;
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
        wait_status(&db.pool, id, "failed", Duration::from_secs(20)).await?;
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
        engine
            .start(
                TICKER,
                id,
                &TickerInput {
                    steps: 30,
                    interval_ms: 50,
                    one_statement,
                    for_each: false,
                },
            )
            .await?;
        let ticks = format!("ticks:{id}");
        wait_until("ticks", Duration::from_secs(20), || async {
            Ok(counter(&db.pool, &ticks).await? >= 2)
        })
        .await?;
        engine.cancel(id).await?;
        wait_status(&db.pool, id, "cancelled", Duration::from_secs(10)).await?;
        let at_cancel = counter(&db.pool, &ticks).await?;
        assert!(at_cancel < 30, "{id}: stopped early ({at_cancel} ticks)");
        // The tick refused by the cancel published nothing either.
        assert_eq!(
            last_tick(&db.pool, id).await?,
            Some(at_cancel),
            "{id}: the tick event matches the ticks counted"
        );
        engine.resume(id).await?;
        wait_status(&db.pool, id, "succeeded", Duration::from_secs(30)).await?;
        assert_eq!(
            counter(&db.pool, &ticks).await?,
            30,
            "{id}: resumed from the checkpoint: no tick twice, none lost"
        );
        assert_eq!(
            last_tick(&db.pool, id).await?,
            Some(30),
            "{id}: last tick event"
        );
    }

    // A parked workflow is cancelled at once and its wait ends.
    let input = MessengerInput {
        topic: "t".into(),
        timeout_ms: 60_000,
    };
    engine.start(MESSENGER, "c2", &input).await?;
    wait_status(&db.pool, "c2", "waiting", Duration::from_secs(20)).await?;
    assert_eq!(engine.cancel("c2").await?, WorkflowStatus::Cancelled);
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

#[tokio::test]
async fn sigterm_drains_and_hands_work_to_another_worker_at_once() -> anyhow::Result<()> {
    let db = engine_db().await?;
    let engine = Engine::new(db.pool.clone());
    let mut workers = vec![
        spawn_worker(&db, "drain", &[])?,
        spawn_worker(&db, "drain", &[])?,
    ];
    wait_workers(&db.pool, 2).await?;
    engine
        .start(
            TICKER,
            "d1",
            &TickerInput {
                steps: 40,
                interval_ms: 50,
                one_statement: false,
                for_each: false,
            },
        )
        .await?;
    wait_until("ticks", Duration::from_secs(20), || async {
        Ok(counter(&db.pool, "ticks:d1").await? >= 3)
    })
    .await?;
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
    assert_eq!(
        victim.wait_exit(Duration::from_secs(15)).await?,
        Some(0),
        "drained worker exits 0"
    );
    let handover = wait_step_elsewhere(
        &db.pool,
        "d1",
        &victim_id,
        signalled,
        Duration::from_secs(10),
    )
    .await?;
    println!("SIGTERM -> next step on the other worker: {handover:?}");
    assert!(
        handover < Duration::from_secs(5),
        "handed over at once, not after a heartbeat timeout: {handover:?}"
    );
    assert_eq!(
        live_workers(&db.pool).await?,
        1,
        "the drained worker left the registry"
    );
    wait_status(&db.pool, "d1", "succeeded", Duration::from_secs(30)).await?;
    assert_eq!(counter(&db.pool, "ticks:d1").await?, 40);
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
    assert!(!host.is_empty() && id.contains(&pid.to_string()));
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
    wait_until("in_flight shown", Duration::from_secs(10), || async {
        Ok(count(
            &db.pool,
            "SELECT coalesce(sum(in_flight), 0)::bigint FROM workers",
        )
        .await?
            >= 1)
    })
    .await?;
    let seen_recently = count(
        &db.pool,
        "SELECT count(*) FROM workers WHERE last_seen > now() - interval '5 seconds'",
    )
    .await?;
    assert_eq!(seen_recently, 1);
    // A restarted process gets a new id; the dead one disappears when a live
    // worker reaps it.
    first.signal("KILL")?;
    drop(first);
    let _second = spawn_worker(&db, "registry", &[])?;
    wait_until(
        "dead worker replaced in the registry",
        Duration::from_secs(20),
        || async {
            let ids: Vec<String> = sqlx::query_scalar("SELECT id FROM workers")
                .fetch_all(&db.pool)
                .await?;
            Ok(ids.len() == 1 && ids[0] != id)
        },
    )
    .await?;
    wait_status(&db.pool, "busy", "succeeded", Duration::from_secs(30)).await?;
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
    let _worker = spawn_worker(&db, "prune", &[("WORKER_PRUNE_AFTER_MS", "1000")])?;
    wait_until("all done", Duration::from_secs(60), || async {
        Ok(count(
            &db.pool,
            "SELECT count(*) FROM workflows WHERE status = 'succeeded'",
        )
        .await?
            == 200)
    })
    .await?;
    wait_until("done jobs pruned", Duration::from_secs(30), || async {
        Ok(count(&db.pool, "SELECT count(*) FROM apalis.jobs").await? == 0)
    })
    .await?;
    Ok(())
}
