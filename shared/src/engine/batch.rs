//! Steps of several workflows committed together: the step statements of one
//! process written with [`StepStatement::for_each`](super::StepStatement::for_each)
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
}

/// A step in its lane, with where its output goes once its batch committed
/// (`None`: run it alone).
type Waiting = (BatchedStep, oneshot::Sender<Option<Value>>);

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

    /// Runs `step` of statement `sql` in a batch: its output, or `None` when
    /// it must run alone (the batch held no other step, or was rolled back).
    pub(crate) async fn run(&self, sql: &'static str, step: BatchedStep) -> Option<Value> {
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
        lane.send((step, done)).ok()?;
        answer.await.ok().flatten()
    }
}

/// A lane: takes the first step that comes, then whatever comes within
/// [`GATHER`], and runs them as one batch while it gathers the next.
async fn gather(inner: Arc<Inner>, sql: &'static str, mut steps: mpsc::UnboundedReceiver<Waiting>) {
    let statement = Arc::new(batch_sql(sql));
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

/// The statement of a batch: the step statement over `input`, one row per
/// step, and their checkpoints, written only for a workflow neither
/// cancelled nor finished and a step no other execution wrote. It returns
/// the checkpoints written; fewer than the steps, and the batch is rolled
/// back.
fn batch_sql(sql: &str) -> String {
    format!(
        "WITH input AS (
             SELECT * FROM unnest($1::text[], $2::jsonb[], $3::integer[], $4::text[], $5::timestamptz[])
                 AS i(workflow_id, arg, step_seq, name, started_at)),
         effect AS ({sql}),
         checkpoint AS (
             INSERT INTO workflow_steps
                 (workflow_id, step_seq, name, output, worker_id, started_at, finished_at)
             SELECT i.workflow_id, i.step_seq, i.name,
                 coalesce((SELECT to_jsonb(e.output) FROM effect e WHERE e.workflow_id = i.workflow_id), 'null'::jsonb),
                 $6, i.started_at, clock_timestamp()
             FROM input i JOIN workflows w ON w.id = i.workflow_id
             WHERE NOT w.cancel_requested AND w.status NOT IN ('succeeded', 'failed', 'cancelled')
             ON CONFLICT DO NOTHING
             RETURNING workflow_id, output)
         SELECT workflow_id, output FROM checkpoint"
    )
}

async fn run_batch(inner: Arc<Inner>, statement: Arc<String>, steps: Vec<Waiting>) {
    // One step a workflow (a second, were there ever two executions of one
    // workflow here, runs alone), in a fixed order, so that two batches
    // lock the rows they share in the same order.
    let mut seen = HashSet::new();
    let (mut batch, alone): (Vec<_>, Vec<_>) = steps
        .into_iter()
        .partition(|(step, _)| seen.insert(step.workflow_id.clone()));
    batch.sort_by(|(a, _), (b, _)| a.workflow_id.cmp(&b.workflow_id));
    let mut outputs = if batch.len() < 2 {
        HashMap::new()
    } else {
        match commit_batch(&inner, &statement, &batch).await {
            Ok(outputs) => outputs,
            Err(error) => {
                tracing::debug!(%error, steps = batch.len(), "a batch failed: its steps run alone");
                HashMap::new()
            }
        }
    };
    for (step, done) in batch {
        let _ = done.send(outputs.remove(&step.workflow_id));
    }
    for (_, done) in alone {
        let _ = done.send(None);
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
    // Planned for these arguments every time: a plan cached for the
    // connection is made for ten rows of `input` against the tables as
    // they were, and with no ANALYZE since (autovacuum off) it stays a hash
    // join over a whole table as that table grows (6.6 ms a batch against
    // 1 ms, measured with pg_stat_statements at 32 clients).
    let mut tx = inner
        .pool
        .begin_with("BEGIN; SET LOCAL plan_cache_mode = force_custom_plan")
        .await?;
    let rows = sqlx::query(AssertSqlSafe(statement.to_owned()))
        .bind(&ids)
        .bind(&args)
        .bind(&seqs)
        .bind(&names)
        .bind(&starts)
        .bind(&*inner.worker_id)
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
