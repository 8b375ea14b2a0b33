//! What a workflow function sees: the replaying, checkpointing context.

use std::collections::VecDeque;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::FutureExt;
use futures::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use tokio::sync::{oneshot, watch};

use super::events::{EVENTS_CHANNEL, EventListener};
use super::queue::{JOB_MAX_ATTEMPTS, new_job_id};
use super::{RetryPolicy, StepError, WorkflowError, WorkflowKind};

/// A checkpoint loaded at the start of an execution.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct Checkpoint {
    pub(crate) step_seq: i32,
    pub(crate) name: String,
    pub(crate) output: Value,
    pub(crate) finished_at: DateTime<Utc>,
}

/// The context a workflow function runs in. Steps are numbered in the order
/// the code calls them; on replay, completed steps return their checkpoint.
pub struct WorkflowContext {
    pub(crate) pool: PgPool,
    pub(crate) workflow_id: String,
    pub(crate) kind: WorkflowKind,
    pub(crate) worker_id: Arc<str>,
    pub(crate) checkpoints: VecDeque<Checkpoint>,
    pub(crate) next_seq: i32,
    pub(crate) retry: RetryPolicy,
    pub(crate) hold_threshold: Duration,
    pub(crate) draining: watch::Receiver<bool>,
    pub(crate) execution: i32,
    /// Fired (once) to hand the apalis queue slot back while the execution
    /// goes on holding none: see [`WorkflowContext::sleep`].
    pub(crate) slot: Option<oneshot::Sender<()>>,
    /// Checkpoints of in-process sleeps, written with the next checkpoint.
    pub(crate) pending: Vec<PendingCheckpoint>,
    /// When the last replayed checkpoint was written.
    pub(crate) replayed_until: Option<DateTime<Utc>>,
    /// Set once the execution is past its replayed checkpoints.
    pub(crate) running: bool,
    /// `replayed_until`, for the operation that ran first after replay.
    pub(crate) resumed_after: Option<DateTime<Utc>>,
    /// The transaction holding the steps since the last commit, not yet
    /// committed: the next database operation joins it (see `batch`).
    pub(crate) open: Option<Transaction<'static, Postgres>>,
    /// Consecutive database operations share one transaction, committed when
    /// the execution waits, calls out or ends: one commit where there were
    /// several. Off for a replay after a step failed inside a shared one.
    pub(crate) batch: bool,
    /// The claim saw a cancel request: the next step sees it.
    pub(crate) cancel_requested: bool,
    /// `open` holds the workflow row's lock (a recv took it).
    pub(crate) locked: bool,
}

/// A checkpoint waiting for the next step's transaction.
pub(crate) struct PendingCheckpoint {
    seq: i32,
    output: Value,
    started: DateTime<Utc>,
}

/// Where a step's value comes from.
enum Replay<T> {
    Done(T),
    Run,
}

impl WorkflowContext {
    /// The workflow's id.
    pub fn workflow_id(&self) -> &str {
        &self.workflow_id
    }

    /// The worker process running this execution.
    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// Which execution this is (1 for the first).
    pub fn execution(&self) -> i32 {
        self.execution
    }

    /// A database step with the workflow's retry policy: `f` runs in a
    /// transaction that also inserts the checkpoint; both commit or neither.
    ///
    /// ```ignore
    /// let left: i32 = ctx.tx_step("reserve_inventory", |tx| Box::pin(async move {
    ///     Ok(sqlx::query_scalar("UPDATE ... RETURNING inventory").fetch_one(&mut *tx).await?)
    /// })).await?;
    /// ```
    pub async fn tx_step<T, F>(&mut self, name: &str, f: F) -> Result<T, WorkflowError>
    where
        T: Serialize + DeserializeOwned + Send,
        F: for<'c> FnMut(&'c mut PgConnection) -> BoxFuture<'c, Result<T, StepError>> + Send,
    {
        let retry = self.retry;
        self.tx_step_with(name, retry, f).await
    }

    /// [`WorkflowContext::tx_step`] with its own retry policy.
    pub async fn tx_step_with<T, F>(
        &mut self,
        name: &str,
        retry: RetryPolicy,
        f: F,
    ) -> Result<T, WorkflowError>
    where
        T: Serialize + DeserializeOwned + Send,
        F: for<'c> FnMut(&'c mut PgConnection) -> BoxFuture<'c, Result<T, StepError>> + Send,
    {
        // Boxed: a workflow's future then stays small while it waits
        // (thousands of sleeping dispatches live in one worker).
        Box::pin(self.run_tx_step(name, retry, f)).await
    }

    async fn run_tx_step<T, F>(
        &mut self,
        name: &str,
        retry: RetryPolicy,
        mut f: F,
    ) -> Result<T, WorkflowError>
    where
        T: Serialize + DeserializeOwned + Send,
        F: for<'c> FnMut(&'c mut PgConnection) -> BoxFuture<'c, Result<T, StepError>> + Send,
    {
        let seq = self.take_seq();
        if let Replay::Done(value) = self.replay(seq, name)? {
            return Ok(value);
        }
        self.check_draining()?;
        let started = Utc::now();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let shared = self.open.is_some();
            let mut tx = self.transaction().await?;
            let outcome = AssertUnwindSafe(f(&mut tx)).catch_unwind().await;
            let failure = match outcome {
                Ok(Ok(value)) => {
                    let output = serde_json::to_value(&value)?;
                    self.checkpoint(&mut tx, seq, name, &output, started)
                        .await?;
                    self.keep(tx).await?;
                    return Ok(value);
                }
                Ok(Err(error)) => Ok(error),
                Err(panic) => Err(panic),
            };
            drop(tx);
            if shared && !matches!(failure, Ok(StepError::Unavailable(_))) {
                // The rollback undid the steps before it too: replay them.
                return Err(WorkflowError::RetryUnbatched);
            }
            let error = self.retryable(seq, name, attempt, failure)?;
            self.retry_or_fail(seq, name, error, attempt, &retry)
                .await?;
        }
    }

    /// A step with an effect outside the database (a payment API call):
    /// at least once, checkpointed after it succeeds. `f` gets a stable
    /// idempotency key for the effect, `"<workflow_id>/<step_seq>"`.
    pub async fn step<T, F, Fut>(&mut self, name: &str, f: F) -> Result<T, WorkflowError>
    where
        T: Serialize + DeserializeOwned + Send,
        F: FnMut(String) -> Fut + Send,
        Fut: Future<Output = Result<T, StepError>> + Send,
    {
        let retry = self.retry;
        self.step_with(name, retry, f).await
    }

    /// [`WorkflowContext::step`] with its own retry policy.
    pub async fn step_with<T, F, Fut>(
        &mut self,
        name: &str,
        retry: RetryPolicy,
        f: F,
    ) -> Result<T, WorkflowError>
    where
        T: Serialize + DeserializeOwned + Send,
        F: FnMut(String) -> Fut + Send,
        Fut: Future<Output = Result<T, StepError>> + Send,
    {
        // Boxed: a workflow's future then stays small while it waits
        // (thousands of sleeping dispatches live in one worker).
        Box::pin(self.run_step(name, retry, f)).await
    }

    async fn run_step<T, F, Fut>(
        &mut self,
        name: &str,
        retry: RetryPolicy,
        mut f: F,
    ) -> Result<T, WorkflowError>
    where
        T: Serialize + DeserializeOwned + Send,
        F: FnMut(String) -> Fut + Send,
        Fut: Future<Output = Result<T, StepError>> + Send,
    {
        let seq = self.take_seq();
        if let Replay::Done(value) = self.replay(seq, name)? {
            return Ok(value);
        }
        self.check_draining()?;
        // An effect outside the database comes after what precedes it is
        // committed, and no transaction stays open while it runs.
        self.commit_open().await?;
        let key = format!("{}/{}", self.workflow_id, seq);
        let started = Utc::now();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let outcome = AssertUnwindSafe(f(key.clone())).catch_unwind().await;
            let error = match outcome {
                Ok(Ok(value)) => {
                    let output = serde_json::to_value(&value)?;
                    let mut tx = self.transaction().await?;
                    self.checkpoint(&mut tx, seq, name, &output, started)
                        .await?;
                    self.keep(tx).await?;
                    return Ok(value);
                }
                Ok(Err(error)) => self.retryable(seq, name, attempt, Ok(error))?,
                Err(panic) => self.retryable(seq, name, attempt, Err(panic))?,
            };
            self.retry_or_fail(seq, name, error, attempt, &retry)
                .await?;
        }
    }

    /// Commits the steps so far now instead of with the next wait or the
    /// end, releasing their row locks: call it after a step that locks a
    /// row many workflows contend for (a product's stock), so the next
    /// steps do not hold that lock too.
    pub async fn commit(&mut self) -> Result<(), WorkflowError> {
        Box::pin(self.commit_open()).await
    }

    /// Publishes an event (a row; waiters are notified). Checkpointed like
    /// any step, so it happens once.
    pub async fn set_event(
        &mut self,
        key: &str,
        value: impl Serialize,
    ) -> Result<(), WorkflowError> {
        let value = serde_json::to_value(value)?;
        let workflow_id = self.workflow_id.clone();
        let key_owned = key.to_owned();
        let name = format!("set_event:{key}");
        self.tx_step(&name, move |tx| {
            let (workflow_id, key, value) = (workflow_id.clone(), key_owned.clone(), value.clone());
            Box::pin(async move {
                set_events_in(tx, &workflow_id, &[(&key, &value)]).await?;
                Ok(())
            })
        })
        .await
    }

    /// Waits for a message on `topic`, at most `timeout` from the first time
    /// this recv ran (the deadline is checkpointed). `None` means timed out.
    /// Consuming the message and checkpointing it are one transaction. While
    /// nothing is there the workflow parks (returns [`WorkflowError::Parked`]
    /// through `?`) and holds no worker slot.
    pub async fn recv(
        &mut self,
        topic: &str,
        timeout: Duration,
    ) -> Result<Option<Value>, WorkflowError> {
        // Boxed: a workflow's future then stays small while it waits
        // (thousands of sleeping dispatches live in one worker).
        Box::pin(self.run_recv(topic, timeout)).await
    }

    async fn run_recv(
        &mut self,
        topic: &str,
        timeout: Duration,
    ) -> Result<Option<Value>, WorkflowError> {
        let deadline_name = format!("recv:{topic}:deadline");
        let deadline_seq = self.take_seq();
        let known_deadline: Option<DateTime<Utc>> =
            match self.replay::<DateTime<Utc>>(deadline_seq, &deadline_name)? {
                Replay::Done(at) => Some(at),
                Replay::Run => None,
            };
        let name = format!("recv:{topic}");
        let seq = self.take_seq();
        if let Replay::Done(outcome) = self.replay::<Value>(seq, &name)? {
            return Ok(outcome.get("message").cloned().filter(|m| !m.is_null()));
        }
        self.check_draining()?;
        let started = Utc::now();
        let mut tx = self.transaction().await?;
        let deadline = match known_deadline {
            Some(at) => at,
            None => {
                let at =
                    started + chrono::Duration::from_std(timeout).unwrap_or(chrono::Duration::MAX);
                // The guard's lock rides in this checkpoint.
                let lock = !self.locked;
                self.insert_checkpoints(
                    &mut tx,
                    deadline_seq,
                    &deadline_name,
                    &json!(at),
                    started,
                    lock,
                )
                .await?;
                at
            }
        };
        loop {
            // Find and consume the oldest message in one statement.
            let message: Option<Value> = sqlx::query_scalar(
                "UPDATE workflow_messages SET consumed_at = now()
                 WHERE id = (SELECT id FROM workflow_messages
                             WHERE workflow_id = $1 AND topic = $2 AND consumed_at IS NULL
                             ORDER BY id LIMIT 1 FOR UPDATE)
                 RETURNING payload",
            )
            .bind(&self.workflow_id)
            .bind(topic)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(payload) = message {
                self.checkpoint(&mut tx, seq, &name, &json!({ "message": payload }), started)
                    .await?;
                self.keep(tx).await?;
                return Ok(Some(payload));
            }
            if Utc::now() >= deadline {
                self.checkpoint(&mut tx, seq, &name, &json!({ "message": null }), started)
                    .await?;
                self.keep(tx).await?;
                return Ok(None);
            }
            if self.locked {
                break;
            }
            // Nothing yet, and parking needs the row lock: take it and look
            // again (a resumed recv usually finds its message at once and
            // skips this).
            self.guard(&mut tx).await?;
        }
        self.park(&mut tx, Some(topic), deadline).await?;
        tx.commit().await?;
        Err(WorkflowError::Parked)
    }

    /// A durable sleep. Long sleeps (over the runtime's hold threshold)
    /// checkpoint their wake-up time and park until a job scheduled then.
    /// Short ones wait in-process; their checkpoint rides in the next step's
    /// transaction, so the sleep costs no commit of its own. An execution
    /// that replays up to such an unrecorded sleep counts it from when the
    /// step before it was written, so a takeover keeps the wake-up time.
    ///
    /// An in-process sleep gives the execution's queue slot back first, so a
    /// worker's concurrency bounds the steps it runs at once, not the
    /// workflows it has sleeping. From then on the workflow row's `owner` is
    /// what recovers it: the reaper re-enqueues the running workflows of a
    /// dead worker.
    pub async fn sleep(&mut self, duration: Duration) -> Result<(), WorkflowError> {
        let seq = self.take_seq();
        let wake_at = match self.replay::<DateTime<Utc>>(seq, "sleep")? {
            Replay::Done(at) => at,
            Replay::Run => {
                self.check_draining()?;
                let now = Utc::now();
                // Right after replay, this sleep began when the last replayed
                // step was written (its own checkpoint was lost with the
                // execution that slept): keep that wake-up time.
                let began = self.resumed_after.take().unwrap_or(now).min(now);
                let at =
                    began + chrono::Duration::from_std(duration).unwrap_or(chrono::Duration::MAX);
                if at - now
                    <= chrono::Duration::from_std(self.hold_threshold)
                        .unwrap_or(chrono::Duration::MAX)
                {
                    // Written by the next step's transaction: one commit
                    // fewer. Should this execution die first, the replay
                    // finds no checkpoint and begins the sleep at `began`.
                    self.pending.push(PendingCheckpoint {
                        seq,
                        output: json!(at),
                        started: began,
                    });
                } else {
                    Box::pin(self.park_sleep(Some((seq, now)), at)).await?;
                    return Err(WorkflowError::Parked);
                }
                at
            }
        };
        let remaining = (wake_at - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        if remaining.is_zero() {
            return Ok(());
        }
        if remaining > self.hold_threshold {
            Box::pin(self.park_sleep(None, wake_at)).await?;
            return Err(WorkflowError::Parked);
        }
        // Nothing stays uncommitted (or locked) through the sleep.
        self.commit_open().await?;
        self.release_slot();
        let mut draining = self.draining.clone();
        tokio::select! {
            _ = tokio::time::sleep(remaining) => Ok(()),
            _ = super::until_true(&mut draining) => Err(WorkflowError::Draining),
        }
    }

    /// Parks a sleep until `at`, first checkpointing it (`(seq, started)`)
    /// when it is new.
    async fn park_sleep(
        &mut self,
        checkpoint: Option<(i32, DateTime<Utc>)>,
        at: DateTime<Utc>,
    ) -> Result<(), WorkflowError> {
        let mut tx = self.transaction().await?;
        if let Some((seq, started)) = checkpoint {
            self.checkpoint(&mut tx, seq, "sleep", &json!(at), started)
                .await?;
        }
        self.park(&mut tx, None, at).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Hands the queue slot back (once); the execution continues.
    fn release_slot(&mut self) {
        if let Some(slot) = self.slot.take() {
            let _ = slot.send(());
        }
    }

    /// The transaction of the next database operation: the one still open
    /// from the steps before it, or a new one. The operation hands it back
    /// to [`WorkflowContext::keep`] when it succeeds, and drops it otherwise.
    ///
    /// A step takes no lock on the workflow row first: its checkpoint
    /// insert is the fence (a second execution of the step finds the
    /// checkpoint there, or waits on its uncommitted row and then finds it,
    /// and rolls back), and that same statement sees a cancellation or a
    /// finished workflow. Only a recv locks the row (see
    /// [`WorkflowContext::guard`]).
    async fn transaction(&mut self) -> Result<Transaction<'static, Postgres>, WorkflowError> {
        if self.cancel_requested {
            // The claim saw it; the steps still open are committed with it.
            return Err(WorkflowError::Cancelled);
        }
        if let Some(tx) = self.open.take() {
            return Ok(tx);
        }
        self.locked = false;
        Ok(self.pool.begin().await?)
    }

    /// After an operation succeeded: keep its transaction open for the next
    /// one, or commit it now when not batching.
    async fn keep(&mut self, tx: Transaction<'static, Postgres>) -> Result<(), WorkflowError> {
        if self.batch {
            self.open = Some(tx);
        } else {
            self.locked = false;
            tx.commit().await?;
        }
        Ok(())
    }

    /// Commits the operations still open.
    async fn commit_open(&mut self) -> Result<(), WorkflowError> {
        self.locked = false;
        if let Some(tx) = self.open.take() {
            tx.commit().await?;
        }
        Ok(())
    }

    fn take_seq(&mut self) -> i32 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    /// The checkpoint of step `seq`, if it completed before.
    fn replay<T: DeserializeOwned>(
        &mut self,
        seq: i32,
        name: &str,
    ) -> Result<Replay<T>, WorkflowError> {
        if self
            .checkpoints
            .front()
            .is_none_or(|front| front.step_seq != seq)
        {
            self.resumed_after = if self.running {
                None
            } else {
                self.replayed_until
            };
            self.running = true;
            return Ok(Replay::Run);
        }
        let checkpoint = self.checkpoints.pop_front().expect("front exists");
        self.replayed_until = Some(checkpoint.finished_at);
        if checkpoint.name != name {
            return Err(WorkflowError::Nondeterministic {
                step: seq,
                found: checkpoint.name,
                expected: name.to_owned(),
            });
        }
        serde_json::from_value(checkpoint.output)
            .map(Replay::Done)
            .map_err(|e| {
                WorkflowError::fatal(format!(
                    "step {seq} ({name}): checkpoint does not decode: {e}"
                ))
            })
    }

    fn check_draining(&self) -> Result<(), WorkflowError> {
        if *self.draining.borrow() {
            Err(WorkflowError::Draining)
        } else {
            Ok(())
        }
    }

    /// Locks the workflow row, unless `tx` holds its lock already, and sees
    /// cancellation. A recv holds it before it parks, and looks for its
    /// message after taking it: a send locks the row too, so either the
    /// recv's next statement sees the message or the send sees the workflow
    /// parked.
    async fn guard(&mut self, tx: &mut PgConnection) -> Result<(), WorkflowError> {
        if self.locked {
            return Ok(());
        }
        let row: Option<(String, bool)> = sqlx::query_as(
            "SELECT status, cancel_requested FROM workflows WHERE id = $1 FOR UPDATE",
        )
        .bind(&self.workflow_id)
        .fetch_optional(&mut *tx)
        .await?;
        self.stopped(row)?;
        self.locked = true;
        Ok(())
    }

    /// Whether the workflow, as `row` (status, cancel requested) shows it,
    /// must stop here: cancelled, or finished by another execution.
    fn stopped(&self, row: Option<(String, bool)>) -> Result<(), WorkflowError> {
        match row {
            None => Err(WorkflowError::fatal("workflow row disappeared")),
            Some((_, true)) => Err(WorkflowError::Cancelled),
            Some((status, false))
                if matches!(status.as_str(), "succeeded" | "failed" | "cancelled") =>
            {
                Err(WorkflowError::Fenced {
                    step: self.next_seq - 1,
                    name: format!("(workflow already {status})"),
                })
            }
            Some(_) => Ok(()),
        }
    }

    /// Inserts a checkpoint, after those of the in-process sleeps before it;
    /// a checkpoint already there means another execution won this step:
    /// this one is fenced off.
    async fn checkpoint(
        &mut self,
        tx: &mut PgConnection,
        seq: i32,
        name: &str,
        output: &Value,
        started: DateTime<Utc>,
    ) -> Result<(), WorkflowError> {
        self.insert_checkpoints(tx, seq, name, output, started, false)
            .await
    }

    /// [`WorkflowContext::checkpoint`]; with `lock`, the same statement
    /// also locks the workflow row as [`WorkflowContext::guard`] does.
    async fn insert_checkpoints(
        &mut self,
        tx: &mut PgConnection,
        seq: i32,
        name: &str,
        output: &Value,
        started: DateTime<Utc>,
        lock: bool,
    ) -> Result<(), WorkflowError> {
        // Taken once: every caller commits this transaction next, or ends
        // the execution (which then replays from the last commit).
        let pending = std::mem::take(&mut self.pending);
        let mut seqs = Vec::with_capacity(pending.len() + 1);
        let mut names = Vec::with_capacity(pending.len() + 1);
        let mut outputs = Vec::with_capacity(pending.len() + 1);
        let mut starts = Vec::with_capacity(pending.len() + 1);
        for p in pending {
            seqs.push(p.seq);
            names.push("sleep".to_owned());
            outputs.push(p.output);
            starts.push(p.started);
        }
        seqs.push(seq);
        names.push(name.to_owned());
        outputs.push(output.clone());
        starts.push(started);
        // One statement for all of them, which also reads the workflow's
        // status: a cancelled or finished workflow gets no checkpoint.
        // clock_timestamp(), not the default now(): the transaction may have
        // begun steps earlier.
        macro_rules! checkpoint_sql {
            ($lock:literal) => {
                concat!(
                    "WITH w AS (SELECT status, cancel_requested FROM workflows WHERE id = $1",
                    $lock,
                    "),
                     inserted AS (
                         INSERT INTO workflow_steps
                             (workflow_id, step_seq, name, output, worker_id, started_at, finished_at)
                         SELECT $1, c.step_seq, c.name, c.output, $5, c.started_at, clock_timestamp()
                         FROM unnest($2::int[], $3::text[], $4::jsonb[], $6::timestamptz[])
                             AS c(step_seq, name, output, started_at)
                         WHERE EXISTS (SELECT 1 FROM w WHERE NOT cancel_requested
                                       AND status NOT IN ('succeeded', 'failed', 'cancelled'))
                         ON CONFLICT DO NOTHING
                         RETURNING 1)
                     SELECT (SELECT count(*) FROM inserted), w.status, w.cancel_requested FROM w"
                )
            };
        }
        let sql = if lock {
            checkpoint_sql!(" FOR UPDATE")
        } else {
            checkpoint_sql!("")
        };
        let row: Option<(i64, String, bool)> = sqlx::query_as(sql)
            .bind(&self.workflow_id)
            .bind(&seqs)
            .bind(&names)
            .bind(&outputs)
            .bind(&*self.worker_id)
            .bind(&starts)
            .fetch_optional(&mut *tx)
            .await?;
        let Some((inserted, status, cancel_requested)) = row else {
            return self.stopped(None);
        };
        if inserted == seqs.len() as i64 {
            self.locked |= lock;
            return Ok(());
        }
        self.stopped(Some((status, cancel_requested)))?;
        Err(WorkflowError::Fenced {
            step: seq,
            name: name.to_owned(),
        })
    }

    /// Parks the workflow until a message on `topic` or `until`, with the
    /// job that wakes it then: one statement.
    async fn park(
        &self,
        tx: &mut PgConnection,
        topic: Option<&str>,
        until: DateTime<Utc>,
    ) -> Result<(), WorkflowError> {
        sqlx::query(
            "UPDATE workflows SET status = 'waiting', owner = NULL, wait_topic = $6, wait_until = $3,
             wait_job = workflow_enqueue($1, $2, $4, $3, 0, $5), updated_at = now()
             WHERE id = $2",
        )
        .bind(self.kind.queue)
        .bind(&self.workflow_id)
        .bind(until)
        .bind(new_job_id())
        .bind(JOB_MAX_ATTEMPTS)
        .bind(topic)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }

    async fn retry_or_fail(
        &self,
        seq: i32,
        name: &str,
        error: String,
        attempt: u32,
        retry: &RetryPolicy,
    ) -> Result<(), WorkflowError> {
        if attempt >= retry.max_attempts {
            return Err(self.step_failed(seq, name, error, attempt));
        }
        let backoff = retry.backoff(attempt);
        tracing::warn!(
            workflow_id = %self.workflow_id, step = seq, step_name = name, attempt,
            backoff_ms = backoff.as_millis() as u64, %error, "step failed; retrying"
        );
        let mut draining = self.draining.clone();
        tokio::select! {
            _ = tokio::time::sleep(backoff) => Ok(()),
            _ = super::until_true(&mut draining) => Err(WorkflowError::Draining),
        }
    }

    /// A failed attempt: the error text when another attempt may follow,
    /// or the error that stops the workflow (fatal, or database down).
    fn retryable(
        &self,
        seq: i32,
        name: &str,
        attempt: u32,
        failure: Result<StepError, Box<dyn std::any::Any + Send>>,
    ) -> Result<String, WorkflowError> {
        match failure {
            Ok(StepError::Unavailable(e)) => Err(WorkflowError::Unavailable(e)),
            Ok(StepError::Fatal(e)) => Err(self.step_failed(seq, name, format!("{e:#}"), attempt)),
            Ok(StepError::Retryable(e)) => Ok(format!("{e:#}")),
            Err(panic) => Ok(format!("panicked: {}", panic_message(&*panic))),
        }
    }

    fn step_failed(&self, seq: i32, name: &str, error: String, attempts: u32) -> WorkflowError {
        WorkflowError::Failed {
            error: format!("step {seq} ({name}) failed after {attempts} attempt(s): {error}"),
            attempts: attempts as i32,
        }
    }
}

/// Sets events (upserts) and notifies their waiters, in the caller's
/// transaction, in one statement however many there are (their keys must
/// differ: PostgreSQL refuses to upsert one row twice in a statement).
/// Inside a [`WorkflowContext::tx_step`] they happen exactly once with the
/// step.
pub async fn set_events_in(
    tx: &mut PgConnection,
    workflow_id: &str,
    events: &[(&str, &Value)],
) -> Result<(), sqlx::Error> {
    let keys: Vec<&str> = events.iter().map(|(key, _)| *key).collect();
    let values: Vec<&Value> = events.iter().map(|(_, value)| *value).collect();
    let payloads: Vec<String> = events
        .iter()
        .map(|(key, value)| EventListener::payload(workflow_id, key, value))
        .collect();
    // The notifications go out with the rows' commit.
    sqlx::query(
        "WITH event AS (
             INSERT INTO workflow_events (workflow_id, key, value)
             SELECT $1, e.key, e.value FROM unnest($2::text[], $3::jsonb[]) AS e(key, value)
             ON CONFLICT (workflow_id, key) DO UPDATE SET value = EXCLUDED.value, created_at = now()
             RETURNING key)
         SELECT pg_notify($4, n.payload)
         FROM event JOIN unnest($2::text[], $5::text[]) AS n(key, payload) USING (key)",
    )
    .bind(workflow_id)
    .bind(&keys)
    .bind(&values)
    .bind(EVENTS_CHANNEL)
    .bind(&payloads)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_owned()
    }
}
