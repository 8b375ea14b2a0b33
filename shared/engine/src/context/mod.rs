//! What a workflow function sees: the replaying, checkpointing context.

mod failure;
mod patches;
mod replay;
mod statement;
mod unit_of_work;
mod waits;

pub(crate) use failure::{panic_message, refusal};
use replay::Replay;
pub(crate) use replay::{Checkpoint, ReplayCursor};
use statement::CheckpointRows;
use statement::set_events_in;

use crate::sql;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::FutureExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use sqlx::postgres::PgArguments;
use sqlx::{Arguments, AssertSqlSafe, PgConnection, PgPool, Postgres, Row, Transaction};
use tokio::sync::{OwnedSemaphorePermit, oneshot, watch};

use super::batch::{Batched, BatchedStep, StepBatches};
use super::crash_point::{CrashCounter, CrashWhen, crash_now, freeze_now};
use super::events::{EVENTS_CHANNEL, EventListener};
use super::queue::{JOB_MAX_ATTEMPTS, new_job_id};
use super::step::Transaction as TransactionStep;
use super::step::{Commit, DatabaseStep, Effect, Statement, StatementSpec};
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
    /// the execution waits, calls out or ends, so several steps cost one
    /// commit. Off for a replay after a step failed inside a shared one.
    pub(crate) batch: bool,
    /// The claim saw a cancel request: the next step sees it.
    pub(crate) cancel_requested: bool,
    /// Runs a workflow a statement step starts in this process when it can.
    pub(crate) here: Arc<dyn RunsHere>,
    /// Batches this process's [`Statement::for_each`] steps.
    pub(crate) batches: StepBatches,
    /// The test-only crash point, counting the calls of its step.
    pub(crate) crash: CrashCounter,
    /// Told of each completed step (metrics).
    pub(crate) observer: Arc<dyn crate::Observer>,
    /// Taken over from a dead worker last seen then: the next step to
    /// complete ends the takeover.
    pub(crate) orphaned_at: Option<DateTime<Utc>>,
    /// Bumped each time this worker finds it was silent past the stale
    /// bound (its workflows may have been taken over).
    pub(crate) lost: Arc<std::sync::atomic::AtomicU64>,
    /// Its value at this execution's claim: once it moves, the execution
    /// stops at its next step.
    pub(crate) lost_at_claim: u64,
    /// The patches its kind declares ([`WorkflowContext::patched`]).
    pub(crate) patches: Vec<&'static str>,
    /// A test revision of its kind's code, until its step is inserted.
    pub(crate) revision: Option<crate::TestRevision>,
}

/// What the runtime lets a statement step do with a workflow it starts
/// ([`Statement::start`](crate::step::Statement::start)): run it in this process, claimed by the start
/// itself, without a job, a notification or a claim of its own. The
/// runtime implements it; the context knows nothing else of the runtime.
pub(crate) trait RunsHere: Send + Sync {
    /// A slot of `kind`'s queue for a workflow to be started here, or
    /// `None` when it must go through the queue (a kind not registered
    /// here, no free slot, the process draining).
    fn reserve(&self, kind: WorkflowKind) -> Option<OwnedSemaphorePermit>;

    /// Executes a workflow a statement step has just started (committed)
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

    /// A database step: its effect and its checkpoint commit together, so
    /// it happens exactly once, whatever dies when. `step` is a
    /// [`Statement`](crate::Statement), a [`Statement::for_each`](crate::Statement::for_each)
    /// batch, a step that [ends the workflow](crate::Statement::ends_workflow)
    /// or a [`Transaction`](crate::Transaction); see [`crate::step`].
    ///
    /// ```ignore
    /// let reserved: Option<bool> = ctx.db_step("reserve_inventory", Statement::new(
    ///     "UPDATE products SET inventory = inventory - 1 WHERE id = $1 AND inventory > 0
    ///      RETURNING true AS output").bind(product_id)).await?;
    /// ```
    pub async fn db_step<T, S>(&mut self, name: &str, step: S) -> Result<T, WorkflowError>
    where
        S: DatabaseStep<T>,
    {
        if self.revision.is_some() {
            Box::pin(self.revise_before(name)).await?;
        }
        // Boxed: a workflow's future then stays small while it waits
        // (thousands of sleeping dispatches live in one worker).
        Box::pin(step.run(self, name)).await
    }

    /// An external effect (a payment API call): at least once,
    /// checkpointed after it succeeds; its closure gets a stable
    /// idempotency key. See [`Effect`].
    pub async fn effect<T, F>(&mut self, name: &str, effect: Effect<F>) -> Result<T, WorkflowError>
    where
        T: Serialize + DeserializeOwned + Send,
        F: AsyncFnMut(&str) -> Result<T, StepError> + Send,
    {
        Box::pin(self.run_effect(name, effect)).await
    }

    pub(crate) async fn run_transaction_step<T, F>(
        &mut self,
        name: &str,
        step: TransactionStep<F>,
    ) -> Result<T, WorkflowError>
    where
        T: Serialize + DeserializeOwned + Send,
        F: AsyncFnMut(&mut PgConnection) -> Result<T, StepError> + Send,
    {
        let TransactionStep {
            mut body,
            events,
            retry,
            unencodable,
        } = step;
        let retry = retry.unwrap_or(self.retry);
        let (seq, crash) = match self.begin(name)? {
            Begin::Replayed(value) => return Ok(value),
            Begin::Run { seq, crash } => (seq, crash),
        };
        if let Some(error) = unencodable {
            return Err(self.step_failed(seq, name, error, 1));
        }
        let started = Utc::now();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let shared = self.open.is_some();
            let mut tx = self.transaction().await?;
            let outcome = AssertUnwindSafe(body(&mut tx)).catch_unwind().await;
            let outcome = match outcome {
                Ok(Ok(value)) if !events.is_empty() => {
                    let events: Vec<(&str, &Value)> =
                        events.iter().map(|(k, v)| (k.as_str(), v)).collect();
                    match set_events_in(&mut tx, &self.workflow_id, &events).await {
                        Ok(()) => Ok(Ok(value)),
                        Err(e) => Ok(Err(StepError::from(e))),
                    }
                }
                outcome => outcome,
            };
            let failure = match outcome {
                Ok(Ok(value)) => {
                    let output = serde_json::to_value(&value)?;
                    self.complete(tx, seq, name, &output, started, crash)
                        .await?;
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

    async fn run_effect<T, F>(&mut self, name: &str, effect: Effect<F>) -> Result<T, WorkflowError>
    where
        T: Serialize + DeserializeOwned + Send,
        F: AsyncFnMut(&str) -> Result<T, StepError> + Send,
    {
        let Effect { mut body, retry } = effect;
        let retry = retry.unwrap_or(self.retry);
        let (seq, crash) = match self.begin(name)? {
            Begin::Replayed(value) => return Ok(value),
            Begin::Run { seq, crash } => (seq, crash),
        };
        // An effect outside the database comes after what precedes it is
        // committed, and no transaction stays open while it runs.
        self.commit_open().await?;
        let key = format!("{}/{}", self.workflow_id, seq);
        let started = Utc::now();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let outcome = AssertUnwindSafe(body(&key)).catch_unwind().await;
            let failure = match outcome {
                Ok(Ok(value)) => {
                    let output = serde_json::to_value(&value)?;
                    let tx = self.transaction().await?;
                    self.complete(tx, seq, name, &output, started, crash)
                        .await?;
                    return Ok(value);
                }
                Ok(Err(error)) => Ok(error),
                Err(panic) => Err(panic),
            };
            self.after_failure(seq, name, attempt, failure, &retry)
                .await?;
        }
    }

    /// Commits the steps so far now instead of with the next wait or the
    /// end, releasing their row locks: call it after a step that locks a
    /// row many workflows contend for, so the next steps do not hold that
    /// lock too, or before a [`Statement`] step on such a row (a product's
    /// stock), so it commits on its own and holds the row only while it
    /// runs. With
    /// nothing open (the claim commits on its own; steps that replay from
    /// their checkpoints open nothing) it does nothing.
    pub async fn commit(&mut self) -> Result<(), WorkflowError> {
        Box::pin(self.commit_open()).await
    }

    /// Publishes an event (a row; waiters are notified) as a step of its
    /// own, named `set_event:<key>`, so it happens once. To publish together
    /// with a database step, use that step's `event` option instead.
    pub async fn set_event(
        &mut self,
        key: &str,
        value: impl Serialize,
    ) -> Result<(), WorkflowError> {
        let step = Statement::new("SELECT NULL::jsonb AS output").event(key, value);
        self.db_step(&format!("set_event:{key}"), step).await
    }
}

/// How a step begins: answered from its checkpoint, or run now.
enum Begin<T> {
    Replayed(T),
    Run {
        seq: i32,
        /// The test-only crash point, if it is this call of the step.
        crash: Option<CrashWhen>,
    },
}

impl WorkflowContext {
    /// Begins step `name`: counts the call for the crash point, takes its
    /// number, answers it from its checkpoint, or (not while draining) lets
    /// it run.
    fn begin<T: DeserializeOwned>(&mut self, name: &str) -> Result<Begin<T>, WorkflowError> {
        let crash = self.crash.call(name);
        let seq = self.take_seq();
        if let Replay::Done(value) = self.replay(seq, name)? {
            return Ok(Begin::Replayed(value));
        }
        self.check_draining()?;
        self.check_not_lost()?;
        Ok(Begin::Run { seq, crash })
    }

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

    /// Reports a completed step begun at `started`.
    fn step_done(&mut self, name: &str, seq: i32, started: DateTime<Utc>) {
        let now = Utc::now();
        let took = (now - started).to_std().unwrap_or_default();
        self.observer.step_completed(self.kind.name, name, took);
        if let Some(last_seen) = self.orphaned_at.take() {
            let since = (now - last_seen).to_std().unwrap_or_default();
            self.observer.taken_over(self.kind.name, since);
        }
        tracing::debug!(step = name, seq, "step done");
    }

    fn check_not_lost(&self) -> Result<(), WorkflowError> {
        if self.lost.load(std::sync::atomic::Ordering::Relaxed) != self.lost_at_claim {
            Err(WorkflowError::Lost)
        } else {
            Ok(())
        }
    }

    fn check_draining(&self) -> Result<(), WorkflowError> {
        if *self.draining.borrow() {
            Err(WorkflowError::Draining)
        } else {
            Ok(())
        }
    }
}
