//! What a workflow function sees: the replaying, checkpointing context.

mod failure;
mod replay;
mod statement;
mod unit_of_work;
mod waits;

pub(crate) use failure::panic_message;
use failure::refusal;
use replay::Replay;
pub(crate) use replay::{Checkpoint, ReplayCursor};
use statement::CheckpointRows;
pub use statement::{StepStatement, set_events_in};

use crate::sql;
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
use sqlx::postgres::PgArguments;
use sqlx::{
    Arguments, AssertSqlSafe, Encode, PgConnection, PgPool, Postgres, Row, Transaction, Type,
};
use tokio::sync::{OwnedSemaphorePermit, oneshot, watch};

use super::batch::{Batched, BatchedStep, StepBatches};
use super::crash_point::{CrashCounter, CrashWhen, crash_now};
use super::events::{EVENTS_CHANNEL, EventListener};
use super::queue::{JOB_MAX_ATTEMPTS, new_job_id};
use super::{RetryPolicy, StepError, WorkflowError, WorkflowKind};
use crate::error::is_unavailable;

/// The context a workflow function runs in. Steps are numbered in the order
/// the code calls them; on replay, completed steps return their checkpoint.
pub struct WorkflowContext {
    pub(crate) pool: PgPool,
    pub(crate) workflow_id: String,
    pub(crate) kind: WorkflowKind,
    pub(crate) worker_id: Arc<str>,
    /// Where this execution is in the workflow's history.
    pub(crate) cursor: ReplayCursor,
    pub(crate) retry: RetryPolicy,
    pub(crate) hold_threshold: Duration,
    pub(crate) draining: watch::Receiver<bool>,
    pub(crate) execution: i32,
    /// Fired (once) to hand the apalis queue slot back while the execution
    /// goes on holding none: see [`WorkflowContext::sleep`].
    pub(crate) slot: Option<oneshot::Sender<()>>,
    /// The transaction holding the steps since the last commit, not yet
    /// committed: the next database operation joins it (see `batch`).
    pub(crate) open: Option<Transaction<'static, Postgres>>,
    /// Consecutive database operations share one transaction, committed when
    /// the execution waits, calls out or ends: one commit where there were
    /// several. Off for a replay after a step failed inside a shared one.
    pub(crate) batch: bool,
    /// The claim saw a cancel request: the next step sees it.
    pub(crate) cancel_requested: bool,
    /// Runs a workflow a step statement starts in this process when it can.
    pub(crate) here: Arc<dyn RunsHere>,
    /// Batches this process's [`StepStatement::for_each`] steps.
    pub(crate) batches: StepBatches,
    /// The test-only crash point, counting the calls of its step.
    pub(crate) crash: CrashCounter,
}

/// What the runtime lets a step statement do with a workflow it starts
/// ([`StepStatement::start`]): run it in this process, claimed by the start
/// itself, without a job, a notification or a claim of its own. The
/// runtime implements it; the context knows nothing else of the runtime.
pub(crate) trait RunsHere: Send + Sync {
    /// A slot of `kind`'s queue for a workflow to be started here, or
    /// `None` when it must go through the queue (a kind not registered
    /// here, no free slot, the process draining).
    fn reserve(&self, kind: WorkflowKind) -> Option<OwnedSemaphorePermit>;

    /// Executes a workflow a step statement has just started (committed)
    /// here, in the slot `reserve` gave.
    fn execute(
        &self,
        slot: OwnedSemaphorePermit,
        kind: WorkflowKind,
        workflow_id: &str,
        input: Value,
        created_at: DateTime<Utc>,
    );
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
        let crash = self.crash.call(name);
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
                    self.crash_before_commit(crash, name);
                    self.keep(tx).await?;
                    self.crash_after_commit(crash, name).await?;
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
            self.after_failure(seq, name, attempt, failure, &retry)
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
        let crash = self.crash.call(name);
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
            let failure = match outcome {
                Ok(Ok(value)) => {
                    let output = serde_json::to_value(&value)?;
                    let mut tx = self.transaction().await?;
                    self.checkpoint(&mut tx, seq, name, &output, started)
                        .await?;
                    self.crash_before_commit(crash, name);
                    self.keep(tx).await?;
                    self.crash_after_commit(crash, name).await?;
                    return Ok(value);
                }
                Ok(Err(error)) => Ok(error),
                Err(panic) => Err(panic),
            };
            self.after_failure(seq, name, attempt, failure, &retry)
                .await?;
        }
    }

    /// A database step whose effect is one SQL statement: the statement and
    /// its checkpoint run as one statement, so the step is one round trip
    /// and, outside a shared transaction, its own commit (a transaction of
    /// several statements is BEGIN, each statement, and COMMIT). Any row the
    /// statement locks is held only while it runs: the step for a row many
    /// workflows contend for.
    ///
    /// Exactly once like [`WorkflowContext::tx_step`]: should the
    /// checkpoint be refused (another execution wrote it, the workflow was
    /// cancelled or has finished), the statement fails as a whole and its
    /// effect is undone. It joins the transaction still open from the steps
    /// before it, if any, and commits with them.
    ///
    /// ```ignore
    /// let left: Option<i32> = ctx.sql_step("update_progress", StepStatement::new(
    ///     "UPDATE orders SET progress_remaining = progress_remaining - 1
    ///      WHERE id = $1 AND progress_remaining > 0 RETURNING progress_remaining AS output",
    /// ).bind(order_id)).await?;
    /// ```
    pub async fn sql_step<T>(
        &mut self,
        name: &str,
        statement: StepStatement,
    ) -> Result<T, WorkflowError>
    where
        T: DeserializeOwned + Send,
    {
        let retry = self.retry;
        // Boxed: a workflow's future then stays small while it waits
        // (thousands of sleeping dispatches live in one worker).
        Box::pin(self.run_sql_step(name, retry, statement, None)).await
    }

    /// The workflow's last step: a [`WorkflowContext::sql_step`] whose
    /// statement also ends the workflow, succeeded with `output`, exactly
    /// when the step's checkpoint is written. One commit where the step and
    /// the end took two (the end's commit is flushed: a lost end would
    /// leave the workflow running, owned by a live worker that no longer
    /// runs it). Returns `output` for `run` to return at once: the runtime
    /// does not store what `run` returns after it, and a step after it
    /// fails (the workflow has finished). Replayed from an earlier
    /// execution's checkpoint, it ends the workflow as a step and the end
    /// of `run` do.
    ///
    /// ```ignore
    /// let output = json!({ "order_id": order_id });
    /// ctx.final_sql_step("mark_paid", store::mark_paid(order_id), output).await
    /// ```
    pub async fn final_sql_step<O>(
        &mut self,
        name: &str,
        statement: StepStatement,
        output: O,
    ) -> Result<O, WorkflowError>
    where
        O: Serialize + Send,
    {
        let retry = self.retry;
        let value = match serde_json::to_value(&output) {
            Ok(value) => value,
            Err(e) => {
                let seq = self.cursor.next_seq();
                return Err(self.step_failed(
                    seq,
                    name,
                    format!("the output does not encode: {e}"),
                    1,
                ));
            }
        };
        let _: Value = Box::pin(self.run_sql_step(name, retry, statement, Some(&value))).await?;
        Ok(output)
    }

    /// Commits the steps so far now instead of with the next wait or the
    /// end, releasing their row locks: call it after a step that locks a
    /// row many workflows contend for, so the next steps do not hold that
    /// lock too, or before a [`WorkflowContext::sql_step`] on such a row
    /// (a product's stock), so it runs as a statement of its own. With
    /// nothing open (the claim commits on its own; steps that replay from
    /// their checkpoints open nothing) it does nothing.
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
}

impl WorkflowContext {
    /// The next step's number, taken.
    fn take_seq(&mut self) -> i32 {
        self.cursor.take_seq()
    }

    /// Step `seq`'s checkpointed value, or `Run` (see [`ReplayCursor::replay`]).
    fn replay<T: DeserializeOwned>(
        &mut self,
        seq: i32,
        name: &str,
    ) -> Result<Replay<T>, WorkflowError> {
        self.cursor.replay(seq, name)
    }

    fn check_draining(&self) -> Result<(), WorkflowError> {
        if *self.draining.borrow() {
            Err(WorkflowError::Draining)
        } else {
            Ok(())
        }
    }
}
