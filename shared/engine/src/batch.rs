//! Steps of several workflows committed together: the step statements of one
//! process written with [`Statement::for_each`](crate::Statement::for_each)
//! that come due within a few milliseconds of each other run as one
//! statement, their checkpoints with them, in one transaction.
//!
//! A batch is only ever all or nothing. It commits when every step in it
//! got its checkpoint; should one be refused (another execution wrote it,
//! the workflow was cancelled or has finished) or the statement fail, the
//! batch is rolled back and each step runs alone, as if it had never been
//! batched, where a refusal raises for that step only.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{AssertSqlSafe, PgPool, Row};
use tokio::sync::{mpsc, oneshot};

use crate::error::is_unavailable;
use crate::sql;

/// How long a lane waits for more steps after the first of a batch: about
/// a dozen dispatch steps a batch at a few hundred flows a second, for
/// 10 ms more per step (a dispatch step follows a sleep of a second).
const GATHER: Duration = Duration::from_millis(10);

/// The most steps one statement takes.
const MAX_BATCH: usize = 64;

/// One step waiting for its batch.
pub(crate) struct BatchedStep {
    pub(crate) workflow_id: String,
    pub(crate) seq: i32,
    pub(crate) name: String,
    pub(crate) started: DateTime<Utc>,
    pub(crate) arg: Value,
    /// The workflow's output when the step ends it.
    pub(crate) finish: Option<Value>,
}

/// What became of a step sent to its lane.
pub(crate) enum Batched {
    /// Its batch committed: the step's output.
    Done(Value),
    /// Run it alone: its batch held no other step, or was rolled back.
    Alone,
    /// The batch lost the database, perhaps after its commit: replay from
    /// the checkpoints, as after any step that lost it.
    Unavailable(String),
}

/// A step in its lane, with where its outcome goes.
type Waiting = (BatchedStep, oneshot::Sender<Batched>);

/// The batching lanes of one process, one per statement.
#[derive(Clone)]
pub(crate) struct StepBatches {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    worker_id: Arc<str>,
    lanes: Mutex<HashMap<&'static str, mpsc::UnboundedSender<Waiting>>>,
}

impl StepBatches {
    pub(crate) fn new(pool: PgPool, worker_id: Arc<str>) -> Self {
        StepBatches {
            inner: Arc::new(Inner {
                pool,
                worker_id,
                lanes: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Runs `step` of statement `sql` in a batch. A lane lives as long as
    /// the process (one per `for_each` statement).
    pub(crate) async fn run(&self, sql: &'static str, step: BatchedStep) -> Batched {
        let (done, answer) = oneshot::channel();
        let lane = {
            let mut lanes = self.inner.lanes.lock().unwrap_or_else(|e| e.into_inner());
            lanes
                .entry(sql)
                .or_insert_with(|| {
                    let (lane, steps) = mpsc::unbounded_channel();
                    tokio::spawn(gather(self.inner.clone(), sql, steps));
                    lane
                })
                .clone()
        };
        if lane.send((step, done)).is_err() {
            return Batched::Alone;
        }
        answer.await.unwrap_or(Batched::Alone)
    }
}

/// A lane: takes the first step that comes, then whatever comes within
/// [`GATHER`], and runs them as one batch while it gathers the next.
async fn gather(inner: Arc<Inner>, sql: &'static str, mut steps: mpsc::UnboundedReceiver<Waiting>) {
    let statement = Arc::new(sql::batch_statement(sql));
    while let Some(first) = steps.recv().await {
        let mut batch = vec![first];
        let until = tokio::time::Instant::now() + GATHER;
        while batch.len() < MAX_BATCH {
            match tokio::time::timeout_at(until, steps.recv()).await {
                Ok(Some(step)) => batch.push(step),
                _ => break,
            }
        }
        tokio::spawn(run_batch(inner.clone(), statement.clone(), batch));
    }
}

async fn run_batch(inner: Arc<Inner>, statement: Arc<String>, steps: Vec<Waiting>) {
    // One step a workflow (a second, were there ever two executions of one
    // workflow here, runs alone). Two batches that share workflows (two
    // executions of each, in two processes) may lock their rows in
    // different orders: PostgreSQL breaks such a deadlock, and the batch
    // it fails runs its steps alone.
    let mut seen = HashSet::new();
    let (batch, alone): (Vec<_>, Vec<_>) = steps
        .into_iter()
        .partition(|(step, _)| seen.insert(step.workflow_id.clone()));
    let outcome = if batch.len() < 2 {
        Ok(HashMap::new())
    } else {
        commit_batch(&inner, &statement, &batch).await
    };
    match outcome {
        Ok(mut outputs) => {
            for (step, done) in batch {
                let _ = done.send(match outputs.remove(&step.workflow_id) {
                    Some(output) => Batched::Done(output),
                    None => Batched::Alone,
                });
            }
        }
        Err(error) if is_unavailable(&error) => {
            tracing::debug!(%error, steps = batch.len(), "a batch lost the database");
            for (_, done) in batch {
                let _ = done.send(Batched::Unavailable(error.to_string()));
            }
        }
        Err(error) => {
            tracing::debug!(%error, steps = batch.len(), "a batch failed: its steps run alone");
            for (_, done) in batch {
                let _ = done.send(Batched::Alone);
            }
        }
    }
    for (_, done) in alone {
        let _ = done.send(Batched::Alone);
    }
}

/// Runs a batch in a transaction: its checkpoints' outputs by workflow if
/// it committed, none when a checkpoint was refused (rolled back).
async fn commit_batch(
    inner: &Inner,
    statement: &str,
    batch: &[Waiting],
) -> Result<HashMap<String, Value>, sqlx::Error> {
    let ids: Vec<&str> = batch.iter().map(|(s, _)| s.workflow_id.as_str()).collect();
    let args: Vec<&Value> = batch.iter().map(|(s, _)| &s.arg).collect();
    let seqs: Vec<i32> = batch.iter().map(|(s, _)| s.seq).collect();
    let names: Vec<&str> = batch.iter().map(|(s, _)| s.name.as_str()).collect();
    let starts: Vec<DateTime<Utc>> = batch.iter().map(|(s, _)| s.started).collect();
    let finishes: Vec<Option<&Value>> = batch.iter().map(|(s, _)| s.finish.as_ref()).collect();
    // Planned for these arguments every time: a plan cached for the
    // connection is made for ten rows of `input` against the tables as
    // they were, and with no ANALYZE since (autovacuum off) it stays a hash
    // join over a whole table as that table grows (several times slower:
    // docs/benchmarks/profile.md). A row lock
    // held elsewhere (a duplicate execution's, a frozen worker's) would
    // hold up every step of the batch: after a while, they run alone.
    let mut tx = inner
        .pool
        .begin_with(
            "BEGIN; SET LOCAL plan_cache_mode = force_custom_plan; SET LOCAL lock_timeout = '500ms'",
        )
        .await?;
    let rows = sqlx::query(AssertSqlSafe(statement.to_owned()))
        .bind(&ids)
        .bind(&args)
        .bind(&seqs)
        .bind(&names)
        .bind(&starts)
        .bind(&*inner.worker_id)
        .bind(&finishes)
        .fetch_all(&mut *tx)
        .await?;
    if rows.len() < batch.len() {
        tx.rollback().await?;
        return Ok(HashMap::new());
    }
    let outputs = rows
        .iter()
        .map(|row| Ok((row.try_get("workflow_id")?, row.try_get("output")?)))
        .collect::<Result<_, sqlx::Error>>()?;
    tx.commit().await?;
    Ok(outputs)
}
