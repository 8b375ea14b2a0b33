//! Workflows used only by the engine's tests (queue `engine`). Their effects
//! are counters in `engine_test_counters`, which tests create and read.

use std::time::Duration;

use engine::step::ForEach;
use engine::{
    Effect, Ending, RetryPolicy, Statement, StepError, Transaction, Workflow, WorkflowContext,
    WorkflowError, WorkflowKind,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool};

/// The queue of every test workflow.
pub const QUEUE: &str = "engine";

/// Creates the tables the test workflows use in a test database: the
/// counters, the gates of [`Gated`] (with `engine_test_gate()`, which waits
/// for one) and the attempt log of [`Flaky`].
pub async fn create_tables(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::query("CREATE TABLE IF NOT EXISTS engine_test_counters (name text PRIMARY KEY, value bigint NOT NULL)")
        .execute(pool)
        .await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS engine_test_gates (name text PRIMARY KEY)")
        .execute(pool)
        .await?;
    // Each statement of a volatile function sees what committed before it
    // began: the loop sees the gate's row as soon as the test commits it.
    sqlx::query(
        "CREATE OR REPLACE FUNCTION engine_test_gate(gate text) RETURNS boolean
         LANGUAGE plpgsql VOLATILE AS $$
         DECLARE
             deadline timestamptz := clock_timestamp() + interval '300 seconds';
         BEGIN
             WHILE NOT EXISTS (SELECT 1 FROM engine_test_gates WHERE name = gate) LOOP
                 IF clock_timestamp() > deadline THEN
                     RAISE EXCEPTION 'gate % was never opened', gate;
                 END IF;
                 PERFORM pg_sleep(0.01);
             END LOOP;
             RETURN true;
         END $$",
    )
    .execute(pool)
    .await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS engine_test_attempts (
             workflow_id text NOT NULL, attempt bigint NOT NULL,
             at timestamptz NOT NULL DEFAULT clock_timestamp(),
             PRIMARY KEY (workflow_id, attempt))",
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Opens gate `name` of a [`Gated`] workflow (its id): the step waiting at
/// it goes on, and any later execution passes it.
pub async fn open_gate(pool: &PgPool, name: &str) -> anyhow::Result<()> {
    sqlx::query("INSERT INTO engine_test_gates (name) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(name)
        .execute(pool)
        .await?;
    Ok(())
}

/// How many steps wait at a gate now (backends running
/// `engine_test_gate()`), the caller's own query aside.
pub async fn at_gate(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid() AND state = 'active'
           AND query LIKE '%engine_test_gate(%'",
    )
    .fetch_one(pool)
    .await?)
}

/// Adds one to counter `$1`, returning its value as `output`.
const BUMP: &str = "INSERT INTO engine_test_counters (name, value) VALUES ($1, 1)
     ON CONFLICT (name) DO UPDATE SET value = engine_test_counters.value + 1
     RETURNING value AS output";

/// Adds one to a counter.
pub async fn bump(tx: &mut PgConnection, name: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(BUMP)
        .bind(name)
        .fetch_one(&mut *tx)
        .await
}

/// [`bump`] as a statement step.
pub fn bump_statement(name: &str) -> Statement {
    Statement::new(BUMP).bind(name.to_owned())
}

/// Bumps the counter `ticks:<workflow id>` of each `input` row: a
/// [`Statement::for_each`] step.
pub fn bump_each() -> ForEach {
    Statement::for_each(
        "INSERT INTO engine_test_counters (name, value) SELECT 'ticks:' || workflow_id, 1 FROM input
         ON CONFLICT (name) DO UPDATE SET value = engine_test_counters.value + 1
         RETURNING substr(name, length('ticks:') + 1) AS workflow_id, value AS output",
        (),
    )
}

/// Reads a counter (0 when absent).
pub async fn counter(pool: &PgPool, name: &str) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT value FROM engine_test_counters WHERE name = $1")
            .bind(name)
            .fetch_optional(pool)
            .await?
            .unwrap_or(0),
    )
}

/// Three database steps, each bumping its own counter (a, b, c), each
/// holding its transaction a few milliseconds so kills land inside them.
pub struct Counter;

/// Kind of [`Counter`].
pub const COUNTER: WorkflowKind = WorkflowKind {
    name: "counter",
    queue: QUEUE,
};

impl Workflow for Counter {
    type Input = Value;
    type Output = Value;
    fn kind(&self) -> WorkflowKind {
        COUNTER
    }
    async fn run(&self, ctx: &mut WorkflowContext, _input: Value) -> Result<Value, WorkflowError> {
        for name in ["a", "b", "c"] {
            let counter = name.to_owned();
            let step = Transaction::new(async move |tx| {
                tokio::time::sleep(Duration::from_millis(3)).await;
                Ok(bump(tx, &counter).await?)
            });
            ctx.db_step(&format!("bump_{name}"), step).await?;
        }
        Ok(json!("done"))
    }
}

/// Three database steps that do nothing but checkpoint: the engine's own
/// cost per step, for the benchmark.
pub struct NoOp;

/// Kind of [`NoOp`].
pub const NOOP: WorkflowKind = WorkflowKind {
    name: "noop",
    queue: QUEUE,
};

impl Workflow for NoOp {
    type Input = Value;
    type Output = Value;
    fn kind(&self) -> WorkflowKind {
        NOOP
    }
    async fn run(&self, ctx: &mut WorkflowContext, _input: Value) -> Result<Value, WorkflowError> {
        for name in ["one", "two", "three"] {
            ctx.db_step(name, Transaction::new(async |_tx| Ok(())))
                .await?;
        }
        Ok(Value::Null)
    }
}

/// One one-statement step that starts a [`NoOp`] workflow (the input's
/// `child`, its id) in its statement and ends the parent
/// ([`Statement::ends_workflow`]) with the child's id as output.
pub struct Parent;

/// Kind of [`Parent`].
pub const PARENT: WorkflowKind = WorkflowKind {
    name: "parent",
    queue: QUEUE,
};

impl Workflow for Parent {
    type Input = Value;
    type Output = Value;
    fn kind(&self) -> WorkflowKind {
        PARENT
    }
    async fn run(&self, ctx: &mut WorkflowContext, input: Value) -> Result<Value, WorkflowError> {
        let child = input["child"].as_str().unwrap_or_default();
        let step = Statement::new("SELECT true AS output")
            .start(NOOP, child, json!({}))
            .ends_workflow(json!(child));
        ctx.db_step("start_child", step).await
    }
}

/// A transaction step (left open for the next step to join) that publishes
/// an event, then an unflushed statement step, then a step that reads its
/// transaction's `synchronous_commit`. Each returns its transaction's id;
/// the output is `{"first": id, "unflushed": id, "setting": ...}`. The
/// unflushed step must commit the first on its own, flushed (it sets an
/// event), and its own setting must not leak into the next transaction.
pub struct FlushProbe;

/// Kind of [`FlushProbe`].
pub const FLUSH_PROBE: WorkflowKind = WorkflowKind {
    name: "flush_probe",
    queue: QUEUE,
};

impl Workflow for FlushProbe {
    type Input = Value;
    type Output = Value;
    fn kind(&self) -> WorkflowKind {
        FLUSH_PROBE
    }
    async fn run(&self, ctx: &mut WorkflowContext, _: Value) -> Result<Value, WorkflowError> {
        let txid = Transaction::new(async |tx| {
            Ok(sqlx::query_scalar::<_, i64>("SELECT txid_current()")
                .fetch_one(tx)
                .await?)
        });
        let first: i64 = ctx.db_step("first", txid.event("opened", true)).await?;
        let step = Statement::new("SELECT txid_current() AS output").unflushed();
        let unflushed: i64 = ctx.db_step("unflushed", step).await?;
        let read = Transaction::new(async |tx| {
            Ok(
                sqlx::query_scalar("SELECT current_setting('synchronous_commit')")
                    .fetch_one(tx)
                    .await?,
            )
        });
        let setting: String = ctx.db_step("read_setting", read).await?;
        Ok(json!({ "first": first, "unflushed": unflushed, "setting": setting }))
    }
}

/// One step statement that inserts the counter `once:<workflow id>` (a
/// plain insert, so a second insert violates its key) after 200 ms, then
/// a recv of topic `go` that parks: two executions at once both reach the
/// insert, and the loser's fails on the winner's row.
pub struct InsertOnce;

/// Kind of [`InsertOnce`].
pub const INSERT_ONCE: WorkflowKind = WorkflowKind {
    name: "insert_once",
    queue: QUEUE,
};

impl Workflow for InsertOnce {
    type Input = Value;
    type Output = Value;
    fn kind(&self) -> WorkflowKind {
        INSERT_ONCE
    }
    async fn run(&self, ctx: &mut WorkflowContext, _: Value) -> Result<Value, WorkflowError> {
        let name = format!("once:{}", ctx.workflow_id());
        let step = Statement::new(
            "INSERT INTO engine_test_counters (name, value) SELECT $1, 1 FROM pg_sleep(0.2)
             RETURNING value AS output",
        )
        .bind(name);
        let _: i64 = ctx.db_step("insert", step).await?;
        let go = ctx.recv("go", Duration::from_secs(60)).await?;
        Ok(json!({ "go": go }))
    }
}

/// Input of [`Ticker`].
#[derive(Debug, Serialize, Deserialize)]
pub struct TickerInput {
    /// Steps to run.
    pub steps: u32,
    /// Durable sleep before each step.
    pub interval_ms: u64,
    /// Each tick is a [`Statement`] step, not a [`Transaction`].
    #[serde(default)]
    pub one_statement: bool,
    /// Each tick is a [`Statement::for_each`] step without an event, which
    /// the engine batches with other tickers' ticks; the last one ends the
    /// workflow.
    #[serde(default)]
    pub for_each: bool,
}

/// `steps` times { sleep; bump `ticks:<workflow id>` and set the event
/// `tick` to the tick's number, in the same step }: a long-running workflow
/// for takeover, drain and cancel tests.
pub struct Ticker;

/// The event a [`Ticker`] sets to the number of its last tick.
pub const TICK_EVENT: &str = "tick";

/// Kind of [`Ticker`].
pub const TICKER: WorkflowKind = WorkflowKind {
    name: "ticker",
    queue: QUEUE,
};

impl Workflow for Ticker {
    type Input = TickerInput;
    type Output = Value;
    fn kind(&self) -> WorkflowKind {
        TICKER
    }
    async fn run(
        &self,
        ctx: &mut WorkflowContext,
        input: TickerInput,
    ) -> Result<Value, WorkflowError> {
        let name = format!("ticks:{}", ctx.workflow_id());
        for tick in 1..=input.steps {
            ctx.sleep(Duration::from_millis(input.interval_ms)).await?;
            let _: i64 = if input.for_each && tick == input.steps {
                let last = bump_each().ends_workflow(json!(input.steps));
                return ctx.db_step("tick", last).await;
            } else if input.for_each {
                ctx.db_step("tick", bump_each()).await?
            } else if input.one_statement {
                let step = bump_statement(&name).event(TICK_EVENT, tick);
                ctx.db_step("tick", step).await?
            } else {
                let name = name.clone();
                let step = Transaction::new(async move |tx| Ok(bump(tx, &name).await?));
                ctx.db_step("tick", step.event(TICK_EVENT, tick)).await?
            };
        }
        Ok(json!(input.steps))
    }
}

/// Input of [`Gated`].
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct GatedInput {
    /// Ticks to run.
    pub steps: u32,
    /// The tick (1-based) that waits at the gate named after the workflow
    /// ([`open_gate`]) inside its step, after the ticks before it are
    /// committed. 0: none.
    pub gate_at: u32,
    /// Each tick is a [`Statement`] step, not a [`Transaction`].
    pub one_statement: bool,
    /// In-process sleep before each tick (none when 0).
    pub interval_ms: u64,
    /// Tick (1-based) that fails for good (a fatal step error). 0: none.
    #[serde(default)]
    pub fail_at: u32,
    /// Ending without finishing, undo the ticks: the compensation's step
    /// `undo` sets `undone:<workflow id>` to the last tick's counter, and
    /// the event `ending` to the status it leads to.
    #[serde(default)]
    pub compensate: bool,
}

/// [`Ticker`] with a gate the test controls: `steps` ticks, each bumping
/// `ticks:<workflow id>` (its output: the counter after it, so a tick's
/// checkpoint names which tick it was) and setting the event `tick` to its
/// number, in the same step. Tick `gate_at` waits inside its step until
/// the test opens the gate: the test knows the workflow is mid-run, in that
/// step, and cannot finish before it says so (a cancel, a kill or a
/// SIGTERM lands there, not by timing).
pub struct Gated;

/// Kind of [`Gated`].
pub const GATED: WorkflowKind = WorkflowKind {
    name: "gated",
    queue: QUEUE,
};

/// [`BUMP`] once the gate `$2` is open.
const BUMP_AT_GATE: &str = "INSERT INTO engine_test_counters (name, value)
     SELECT $1, 1 WHERE engine_test_gate($2)
     ON CONFLICT (name) DO UPDATE SET value = engine_test_counters.value + 1
     RETURNING value AS output";

impl Workflow for Gated {
    type Input = GatedInput;
    type Output = Value;
    fn kind(&self) -> WorkflowKind {
        GATED
    }
    async fn run(
        &self,
        ctx: &mut WorkflowContext,
        input: GatedInput,
    ) -> Result<Value, WorkflowError> {
        let name = format!("ticks:{}", ctx.workflow_id());
        let id = ctx.workflow_id().to_owned();
        for tick in 1..=input.steps {
            if input.interval_ms > 0 {
                ctx.sleep(Duration::from_millis(input.interval_ms)).await?;
            }
            if tick == input.fail_at {
                let _: Option<i64> = ctx
                    .db_step(
                        "tick",
                        Transaction::new(async move |_tx| {
                            Err::<Option<i64>, _>(StepError::fatal("this tick fails for good"))
                        }),
                    )
                    .await?;
            }
            let gated = tick == input.gate_at;
            if gated {
                // The ticks before it commit now, not with the gated one.
                ctx.commit().await?;
            }
            let _: i64 = if input.one_statement {
                let step = if gated {
                    Statement::new(BUMP_AT_GATE)
                        .bind(name.clone())
                        .bind(id.clone())
                } else {
                    bump_statement(&name)
                };
                ctx.db_step("tick", step.event(TICK_EVENT, tick)).await?
            } else {
                let (id, name) = (id.clone(), name.clone());
                let step = Transaction::new(async move |tx| {
                    if gated {
                        sqlx::query("SELECT engine_test_gate($1)")
                            .bind(&id)
                            .execute(&mut *tx)
                            .await?;
                    }
                    Ok(bump(tx, &name).await?)
                });
                ctx.db_step("tick", step.event(TICK_EVENT, tick)).await?
            };
        }
        Ok(json!(input.steps))
    }

    async fn compensate(
        &self,
        ctx: &mut WorkflowContext,
        input: GatedInput,
        ending: &Ending,
    ) -> Result<(), WorkflowError> {
        if !input.compensate {
            return Ok(());
        }
        let ticks: i64 = ending.output("tick")?.unwrap_or(0);
        let status = ending.reason().status();
        let undo = Statement::new(
            "INSERT INTO engine_test_counters (name, value) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET value = engine_test_counters.value + $2
             RETURNING value AS output",
        )
        .bind(format!("undone:{}", ctx.workflow_id()))
        .bind(ticks)
        .event("ending", status);
        let _: i64 = ctx.db_step("undo", undo).await?;
        Ok(())
    }
}

/// Input of [`Messenger`].
#[derive(Debug, Serialize, Deserialize)]
pub struct MessengerInput {
    /// Topic to receive on.
    pub topic: String,
    /// recv timeout.
    pub timeout_ms: u64,
}

/// Receives one message, bumps `received:<workflow id>`, publishes it and
/// the count (events `received` and `receipt`), returns it.
pub struct Messenger;

/// Kind of [`Messenger`].
pub const MESSENGER: WorkflowKind = WorkflowKind {
    name: "messenger",
    queue: QUEUE,
};

impl Workflow for Messenger {
    type Input = MessengerInput;
    type Output = Value;
    fn kind(&self) -> WorkflowKind {
        MESSENGER
    }
    async fn run(
        &self,
        ctx: &mut WorkflowContext,
        input: MessengerInput,
    ) -> Result<Value, WorkflowError> {
        let message = ctx
            .recv(&input.topic, Duration::from_millis(input.timeout_ms))
            .await?;
        let id = ctx.workflow_id().to_owned();
        let counter = format!("received:{id}");
        let count = Transaction::new(async move |tx| Ok(bump(tx, &counter).await?));
        let count: i64 = ctx.db_step("count_received", count).await?;
        // Two events in one step: "received" (the message) and "receipt"
        // (how many this workflow has received).
        let publish = Transaction::new(async |_tx| Ok(()))
            .event("received", &message)
            .event("receipt", count);
        ctx.db_step("publish_receipt", publish).await?;
        Ok(json!({ "message": message }))
    }
}

/// Input of [`Flaky`].
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct FlakyInput {
    /// Attempts that fail (retryably) before one succeeds.
    pub fail_times: i64,
    /// Fail fatally instead.
    pub fatal: bool,
    /// Panic instead.
    pub panic: bool,
    /// Make the flaky step a database step that follows another one (which
    /// bumps `before:<workflow id>`) and bumps `effect:<workflow id>` when
    /// it succeeds; otherwise it is an external effect.
    #[serde(default)]
    pub after_database_step: bool,
}

/// One step that fails as told; each attempt bumps `attempts:<workflow id>`
/// (in its own transaction, so failed attempts are counted too).
pub struct Flaky {
    /// Pool for the attempt counter.
    pub pool: PgPool,
}

/// Kind of [`Flaky`].
pub const FLAKY: WorkflowKind = WorkflowKind {
    name: "flaky",
    queue: QUEUE,
};

impl Workflow for Flaky {
    type Input = FlakyInput;
    type Output = Value;
    fn kind(&self) -> WorkflowKind {
        FLAKY
    }
    fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(200),
            multiplier: 2.0,
        }
    }
    async fn run(
        &self,
        ctx: &mut WorkflowContext,
        input: FlakyInput,
    ) -> Result<Value, WorkflowError> {
        let id = ctx.workflow_id().to_owned();
        let pool = self.pool.clone();
        let value: i64 = if input.after_database_step {
            let counter = format!("before:{id}");
            let before = Transaction::new(async move |tx| Ok(bump(tx, &counter).await?));
            let _: i64 = ctx.db_step("before", before).await?;
            let step = Transaction::new(async move |tx| {
                let attempt = flaky_attempt(&pool, &id, input).await?;
                bump(tx, &format!("effect:{id}")).await?;
                Ok(attempt)
            });
            ctx.db_step("flaky", step).await?
        } else {
            let effect = Effect::new(async move |_key| flaky_attempt(&pool, &id, input).await);
            ctx.effect("flaky", effect).await?
        };
        Ok(json!(value))
    }
}

/// One attempt of [`Flaky`]'s step: counted on a connection of its own,
/// logged with its time in `engine_test_attempts`, then failing as told.
async fn flaky_attempt(pool: &PgPool, id: &str, input: FlakyInput) -> Result<i64, StepError> {
    let mut conn = pool.acquire().await?;
    let attempt = bump(&mut conn, &format!("attempts:{id}")).await?;
    sqlx::query("INSERT INTO engine_test_attempts (workflow_id, attempt) VALUES ($1, $2)")
        .bind(id)
        .bind(attempt)
        .execute(&mut *conn)
        .await?;
    if input.panic {
        panic!("deliberate panic on attempt {attempt}");
    }
    if input.fatal {
        return Err(StepError::fatal(format!(
            "deliberate fatal error on attempt {attempt}"
        )));
    }
    if attempt <= input.fail_times {
        return Err(StepError::retryable(format!(
            "deliberate failure {attempt}"
        )));
    }
    Ok(attempt)
}
