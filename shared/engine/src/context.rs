//! What a workflow function sees: the replaying, checkpointing context.

use crate::sql;
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
use sqlx::postgres::PgArguments;
use sqlx::{
    Arguments, AssertSqlSafe, Encode, PgConnection, PgPool, Postgres, Row, Transaction, Type,
};
use tokio::sync::{oneshot, watch};

use super::batch::{Batched, BatchedStep, StepBatches};
use super::crash_point::{CrashCounter, CrashWhen, crash_now};
use super::events::{EVENTS_CHANNEL, EventListener};
use super::queue::{JOB_MAX_ATTEMPTS, new_job_id};
use super::runtime::StartHere;
use super::{RetryPolicy, StepError, WorkflowError, WorkflowKind};
use crate::error::is_unavailable;

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
    /// When the last replayed checkpoint was written, or the workflow was
    /// started when there is none.
    pub(crate) replayed_until: DateTime<Utc>,
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
    /// This execution's last step ended the workflow
    /// ([`WorkflowContext::final_sql_step`]), committed or in `open`.
    pub(crate) finished: bool,
    /// Runs a workflow a step statement starts in this process when it can.
    pub(crate) here: StartHere,
    /// Batches this process's [`StepStatement::for_each`] steps.
    pub(crate) batches: StepBatches,
    /// The test-only crash point, counting the calls of its step.
    pub(crate) crash: CrashCounter,
}

/// The checkpoint rows one `workflow_checkpoint()` call writes, as the
/// arrays it takes: a step's, or none (a recv whose deadline is written
/// already). `outputs` is left to the caller (or the statement computes it:
/// see [`WorkflowContext::sql_step`]).
#[derive(Default)]
struct CheckpointRows {
    seqs: Vec<i32>,
    names: Vec<String>,
    outputs: Vec<Value>,
    starts: Vec<DateTime<Utc>>,
}

impl CheckpointRows {
    /// The row of step `seq`, but its output.
    fn step(seq: i32, name: &str, started: DateTime<Utc>) -> Self {
        CheckpointRows {
            seqs: vec![seq],
            names: vec![name.to_owned()],
            outputs: Vec::new(),
            starts: vec![started],
        }
    }

    /// Appends `workflow_checkpoint()`'s arguments but the last (the lock)
    /// to a statement's own, in its order.
    fn bind(
        &self,
        arguments: &mut PgArguments,
        workflow_id: &str,
        worker_id: &str,
    ) -> Result<(), sqlx::error::BoxDynError> {
        arguments.add(workflow_id)?;
        arguments.add(&self.seqs)?;
        arguments.add(&self.names)?;
        arguments.add(&self.outputs)?;
        arguments.add(worker_id)?;
        arguments.add(&self.starts)
    }
}

/// One SQL statement that is the whole effect of a database step: see
/// [`WorkflowContext::sql_step`].
///
/// ```ignore
/// StepStatement::new("UPDATE orders SET ... WHERE id = $1 RETURNING progress_remaining AS output")
///     .bind(order_id)
/// ```
pub struct StepStatement {
    sql: &'static str,
    arguments: PgArguments,
    /// Events published with the step: see [`StepStatement::event`].
    events: Vec<(String, Value)>,
    /// A workflow started with the step: see [`StepStatement::start`].
    start: Option<(WorkflowKind, String, Value)>,
    /// See [`StepStatement::unflushed`].
    unflushed: bool,
    /// Written over `input`: see [`StepStatement::for_each`].
    for_each: bool,
    /// The value of `input.arg`: see [`StepStatement::arg`].
    arg: Value,
    /// A value that could not be encoded: the step fails with it.
    unencodable: Option<String>,
}

impl StepStatement {
    /// A statement returning at most one row, whose column `output` is the
    /// step's value (no row, or a SQL null, is JSON null). It must not begin
    /// with `WITH`: the engine puts it in a `WITH` of its own.
    pub fn new(sql: &'static str) -> Self {
        StepStatement {
            sql,
            arguments: PgArguments::default(),
            events: Vec::new(),
            start: None,
            unflushed: false,
            for_each: false,
            arg: Value::Null,
            unencodable: None,
        }
    }

    /// A statement written over the relation `input (workflow_id text, arg
    /// jsonb)`, one row per step, which returns at most one row per
    /// `input` row with the columns `workflow_id` and `output` (the step's
    /// value), and touches only rows of the workflow of its `input` row
    /// (PostgreSQL applies one update to a row per statement: two `input`
    /// rows reaching one row would leave one step without its effect,
    /// silently):
    /// the steps of this statement that several workflows of a process
    /// reach within a few milliseconds then run as one statement and one
    /// commit (an all or nothing batch; a step whose checkpoint is refused
    /// sends the others to run alone). A step with events, a start, or
    /// inside an open transaction runs alone, with `input` its one row. Its
    /// value comes through [`StepStatement::arg`], not `bind`. The
    /// dispatch's progress steps use it.
    ///
    /// ```ignore
    /// StepStatement::for_each(
    ///     "UPDATE orders SET progress_remaining = progress_remaining - 1 FROM input
    ///      WHERE orders.id = (input.arg)::bigint
    ///      RETURNING input.workflow_id, progress_remaining AS output",
    /// )
    /// .arg(order_id)
    /// ```
    pub fn for_each(sql: &'static str) -> Self {
        StepStatement {
            for_each: true,
            ..StepStatement::new(sql)
        }
    }

    /// Sets `input.arg` of a [`StepStatement::for_each`] statement.
    pub fn arg(mut self, value: impl Serialize) -> Self {
        match serde_json::to_value(value) {
            Ok(value) => self.arg = value,
            Err(e) => {
                self.unencodable
                    .get_or_insert(format!("the argument does not encode: {e}"));
            }
        }
        self
    }

    /// Lets the step's commit return before its WAL flush when the step
    /// commits alone (no transaction open): for a step that nobody outside
    /// the workflow acts on before the workflow's next flushed commit,
    /// which carries it (the WAL is one sequence). A database crash before
    /// that drops the step together with its checkpoint, and the workflow
    /// replays it. Without effect on a statement that publishes events or
    /// starts a workflow, and inside a shared transaction: events are
    /// always set by flushed commits, which callers of
    /// [`Engine::start_unflushed`](super::Engine::start_unflushed) rely on.
    /// The store's reservation and cancellation use it, so the product
    /// row is not held through a flush.
    pub fn unflushed(mut self) -> Self {
        self.unflushed = true;
        self
    }

    /// Starts a workflow with the step, in its statement (as
    /// [`Engine::start_in`](super::Engine::start_in) does in a transaction):
    /// started exactly when the step's checkpoint is written, whatever the
    /// statement returned; nothing new when `id` exists already. An `id`
    /// held by a workflow of another kind fails the step. One per step.
    ///
    /// When this process runs that kind, has a free slot on its queue, is
    /// not draining and the step commits alone, the new workflow is
    /// started claimed by this process and runs here, without a job, a
    /// notification or a claim of its own; should the process die, the
    /// reaper hands it to the queue like any running workflow of a dead
    /// worker. Otherwise its job goes to the queue.
    pub fn start(mut self, kind: WorkflowKind, id: &str, input: impl Serialize) -> Self {
        let problem = if let Err(e) = super::client::check_id(id) {
            Some(format!("cannot start {id:?}: {e}"))
        } else if self.start.is_some() {
            Some("a step statement starts one workflow at most".to_owned())
        } else {
            match serde_json::to_value(input) {
                Ok(input) => {
                    self.start = Some((kind, id.to_owned(), input));
                    None
                }
                Err(e) => Some(format!("the input of {id} does not encode: {e}")),
            }
        };
        if let Some(problem) = problem {
            self.unencodable.get_or_insert(problem);
        }
        self
    }

    /// Publishes an event with the step, in its statement (as
    /// [`set_events_in`] does in a transaction): set, and its waiters
    /// notified at the commit, exactly when the step's checkpoint is
    /// written, whatever the statement returned. Keys must differ.
    pub fn event(mut self, key: &str, value: impl Serialize) -> Self {
        match serde_json::to_value(value) {
            Ok(value) => self.events.push((key.to_owned(), value)),
            Err(e) => {
                self.unencodable
                    .get_or_insert(format!("event {key} does not encode: {e}"));
            }
        }
        self
    }

    /// Binds the next parameter (`$1`, then `$2`, ...); not for a
    /// [`StepStatement::for_each`] statement.
    pub fn bind<'t, T: Encode<'t, Postgres> + Type<Postgres>>(mut self, value: T) -> Self {
        if self.for_each {
            self.unencodable
                .get_or_insert("a for_each statement takes its value through arg".to_owned());
        } else if let Err(e) = self.arguments.add(value) {
            self.unencodable.get_or_insert(format!(
                "parameter ${} does not encode: {e}",
                self.arguments.len() + 1
            ));
        }
        self
    }
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
                let seq = self.next_seq;
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

    async fn run_sql_step<T>(
        &mut self,
        name: &str,
        retry: RetryPolicy,
        statement: StepStatement,
        finish: Option<&Value>,
    ) -> Result<T, WorkflowError>
    where
        T: DeserializeOwned + Send,
    {
        let crash = self.crash.call(name);
        let seq = self.take_seq();
        if let Replay::Done(value) = self.replay(seq, name)? {
            return Ok(value);
        }
        self.check_draining()?;
        if let Some(error) = statement.unencodable {
            return Err(self.step_failed(seq, name, error, 1));
        }
        if crash.is_some() {
            // A commit of its own to die before or after (not a batch's).
            self.open_transaction().await?;
        }
        let started = Utc::now();
        let batchable = statement.for_each
            && self.open.is_none()
            && statement.events.is_empty()
            && statement.start.is_none()
            && finish.is_none()
            && !statement.unflushed;
        if batchable && !self.cancel_requested {
            let step = BatchedStep {
                workflow_id: self.workflow_id.clone(),
                seq,
                name: name.to_owned(),
                started,
                arg: statement.arg.clone(),
            };
            match self.batches.run(statement.sql, step).await {
                Batched::Done(output) => return decode_output(seq, name, output),
                Batched::Unavailable(error) => {
                    return Err(WorkflowError::Unavailable(sqlx::Error::Io(
                        std::io::Error::other(error),
                    )));
                }
                Batched::Alone => {}
            }
        }
        let rows = CheckpointRows::step(seq, name, started);
        // The engine's parameters follow the statement's own.
        let first = statement.arguments.len() + 1;
        let [id, seqs, names, outputs, worker, starts] =
            std::array::from_fn(|i| format!("${}", first + i));
        let mut next = first + 6;
        let mut placeholders = |n: usize| {
            let list: Vec<String> = (next..next + n).map(|i| format!("${i}")).collect();
            next += n;
            list.join(", ")
        };
        let events = EventArguments::new(
            &self.workflow_id,
            statement
                .events
                .iter()
                .map(|(key, value)| (key.as_str(), value)),
        );
        // Events and a start ride in the same statement, as more columns.
        let mut also = String::new();
        if !events.is_empty() {
            also += &sql::step_events(&id, &placeholders(4));
        }
        if statement.start.is_some() {
            also += &sql::step_start(&placeholders(7));
        }
        // After the checkpoint, which refuses a finished workflow.
        if finish.is_some() {
            also += &sql::step_finish(&id, &placeholders(1));
        }
        let may_skip_flush = statement.unflushed
            && events.is_empty()
            && statement.start.is_none()
            && finish.is_none();
        if may_skip_flush {
            also += &sql::skip_flush_if(&placeholders(1));
        }
        let start_job = new_job_id();
        // A workflow the step starts runs here, claimed by its start, when
        // this process has a slot for it and the statement commits alone
        // (its row must be there for the first step of its execution).
        let mut start_here = match &statement.start {
            Some((kind, ..)) if self.open.is_none() => self.here.reserve(*kind),
            _ => None,
        };
        // A for_each statement's `input`: this step's row.
        let input = if statement.for_each {
            sql::one_step_input(&id, &placeholders(1))
        } else {
            String::new()
        };
        let sql = sql::step_with_checkpoint(
            &input,
            statement.sql,
            [&id, &seqs, &names, &outputs, &worker, &starts],
            &also,
        );
        let mut attempt = 0;
        loop {
            attempt += 1;
            if self.cancel_requested {
                return Err(WorkflowError::Cancelled);
            }
            let mut arguments = statement.arguments.clone();
            let mut bound = rows.bind(&mut arguments, &self.workflow_id, &self.worker_id);
            if bound.is_ok() && !events.is_empty() {
                bound = events.bind(&mut arguments);
            }
            if let (true, Some((kind, id, input))) = (bound.is_ok(), &statement.start) {
                let owner = start_here.is_some().then_some(&*self.worker_id);
                bound = bind_start(&mut arguments, *kind, id, input, &start_job, owner);
            }
            if let (true, Some(output)) = (bound.is_ok(), finish) {
                bound = arguments.add(output);
            }
            let shared = self.open.is_some();
            if bound.is_ok() && may_skip_flush {
                // Only a commit of its own may skip the flush.
                bound = arguments.add(!shared);
            }
            if bound.is_ok() && statement.for_each {
                bound = arguments.add(&statement.arg);
            }
            if let Err(e) = bound {
                return Err(self.step_failed(seq, name, format!("checkpoint encoding: {e}"), 1));
            }
            let query = sqlx::query_with(AssertSqlSafe(sql.clone()), arguments);
            let result = match self.open.as_mut() {
                Some(tx) => query.fetch_one(&mut **tx).await,
                None => query.fetch_one(&self.pool).await,
            };
            // A new child's row was inserted at `started_at` (the
            // database's clock, as a takeover's claim reads it).
            let row = result.and_then(|row| {
                let started = match statement.start {
                    Some(_) => Some((
                        row.try_get::<bool, _>("started")?,
                        row.try_get::<DateTime<Utc>, _>("started_at")?,
                    )),
                    None => None,
                };
                Ok((row.try_get::<Option<Value>, _>(0)?, started))
            });
            let error = match row {
                Ok((output, started)) => {
                    self.crash_before_commit(crash, name);
                    self.crash_after_commit(crash, name).await?;
                    self.finished |= finish.is_some();
                    if let (Some(slot), Some((kind, id, input)), Some((true, started_at))) =
                        (start_here.take(), &statement.start, started)
                    {
                        self.here
                            .execute(slot, *kind, id, input.clone(), started_at);
                    }
                    return decode_output(seq, name, output.unwrap_or(Value::Null));
                }
                Err(error) => error,
            };
            if shared {
                // The failed statement aborted the shared transaction: the
                // steps before it are undone too.
                self.open = None;
            }
            if let Some(refused) = refusal(&error, seq, name) {
                return Err(refused);
            }
            if shared && !is_unavailable(&error) {
                return Err(WorkflowError::RetryUnbatched);
            }
            self.after_failure(seq, name, attempt, Ok(StepError::from(error)), &retry)
                .await?;
        }
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
        let crash = self.crash.call(&name);
        let seq = self.take_seq();
        if let Replay::Done(outcome) = self.replay::<Value>(seq, &name)? {
            return Ok(outcome.get("message").cloned().filter(|m| !m.is_null()));
        }
        self.check_draining()?;
        if crash.is_some() {
            // A commit of its own to die before or after.
            self.open_transaction().await?;
        }
        let started = Utc::now();
        // The checkpoint written first: the deadline's, on the first run.
        let (deadline, rows, refused_seq, refused_name) = match known_deadline {
            Some(at) => (at, CheckpointRows::default(), seq, &name),
            None => {
                let at =
                    started + chrono::Duration::from_std(timeout).unwrap_or(chrono::Duration::MAX);
                let mut rows = CheckpointRows::step(deadline_seq, &deadline_name, started);
                rows.outputs.push(json!(at));
                (at, rows, deadline_seq, &deadline_name)
            }
        };
        if self.cancel_requested {
            return Err(WorkflowError::Cancelled);
        }
        // One statement (`workflow_recv()`): those checkpoints, the row lock
        // a park needs, the look for the message (consumed if there), then
        // the outcome's checkpoint or the park. It joins the transaction
        // still open, or is its own commit.
        //
        // Its own commit of a message consumed ($15) waits for no WAL
        // flush: nothing outside acts on it but through this execution's
        // next commit (flushed, which carries this one: the WAL is one
        // sequence) or a `ctx.step` (at least once, with its stable key).
        // A database crash before that drops the consumption with its
        // checkpoint, and the replay consumes the same message again. A
        // park's commit is flushed: it ends the execution.
        let query = sqlx::query_as::<_, (bool, Option<Value>, Option<String>)>(sql::RECV)
            .bind(&self.workflow_id)
            .bind(topic)
            .bind(deadline)
            .bind(&rows.seqs)
            .bind(&rows.names)
            .bind(&rows.outputs)
            .bind(&rows.starts)
            .bind(seq)
            .bind(&name)
            .bind(started)
            .bind(&*self.worker_id)
            .bind(self.kind.queue)
            .bind(new_job_id())
            .bind(JOB_MAX_ATTEMPTS)
            .bind(self.open.is_none());
        let received = match self.open.as_mut() {
            Some(tx) => query.fetch_one(&mut **tx).await,
            None => query.fetch_one(&self.pool).await,
        };
        let (done, message, _) = match received {
            Ok(received) => received,
            Err(error) => {
                // A failed statement aborts the transaction it was in.
                self.open = None;
                return Err(
                    refusal(&error, refused_seq, refused_name).unwrap_or_else(|| error.into())
                );
            }
        };
        if done {
            self.crash_before_commit(crash, &name);
            self.crash_after_commit(crash, &name).await?;
            return Ok(message);
        }
        self.commit_open().await?;
        Err(WorkflowError::Parked)
    }

    /// A durable sleep. Long sleeps (over the runtime's hold threshold)
    /// checkpoint their wake-up time and park until a job scheduled then.
    /// Short ones wait in-process and write no checkpoint: a replay that
    /// finds a checkpoint after such a sleep knows it is over, and one that
    /// stops at it counts it from when the step before it was written, so a
    /// takeover keeps the wake-up time. A sleep with no step before it (the
    /// first thing a workflow does) counts from when the workflow was
    /// started: a workflow that waited longer than that in the queue does
    /// not sleep at all.
    ///
    /// An in-process sleep gives the execution's queue slot back first, so a
    /// worker's concurrency bounds the steps it runs at once, not the
    /// workflows it has sleeping. From then on the workflow row's `owner` is
    /// what recovers it: the reaper re-enqueues the running workflows of a
    /// dead worker.
    pub async fn sleep(&mut self, duration: Duration) -> Result<(), WorkflowError> {
        let crash = self.crash.call("sleep");
        let seq = self.take_seq();
        // An in-process sleep leaves no checkpoint (but a first one): a
        // checkpoint after it shows that it is over.
        if self
            .checkpoints
            .front()
            .is_some_and(|front| front.step_seq > seq)
        {
            return Ok(());
        }
        self.crash_before_commit(crash, "sleep");
        let slept = self.run_sleep(seq, duration).await;
        if matches!(slept, Ok(()) | Err(WorkflowError::Parked)) {
            self.crash_after_commit(crash, "sleep").await?;
        }
        slept
    }

    async fn run_sleep(&mut self, seq: i32, duration: Duration) -> Result<(), WorkflowError> {
        let wake_at = match self.replay::<DateTime<Utc>>(seq, "sleep")? {
            Replay::Done(at) => at,
            Replay::Run => {
                self.check_draining()?;
                let now = Utc::now();
                // Right after replay, this sleep began when the last replayed
                // step was written, or the workflow was started when no step
                // was (an in-process sleep writes no checkpoint): every
                // execution, a takeover's too, computes the same wake-up
                // time.
                let began = self.resumed_after.take().unwrap_or(now).min(now);
                let at =
                    began + chrono::Duration::from_std(duration).unwrap_or(chrono::Duration::MAX);
                if at - now
                    > chrono::Duration::from_std(self.hold_threshold)
                        .unwrap_or(chrono::Duration::MAX)
                {
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
        self.park(&mut tx, at).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Opens the transaction the next database operation joins, if none is.
    async fn open_transaction(&mut self) -> Result<(), WorkflowError> {
        if self.open.is_none() {
            self.open = Some(self.pool.begin().await?);
        }
        Ok(())
    }

    /// The test-only crash point, before the step's commit: the step has
    /// run in a transaction not yet committed.
    fn crash_before_commit(&self, crash: Option<CrashWhen>, name: &str) {
        if crash == Some(CrashWhen::Before) {
            crash_now(&format!("before:{name} of {}", self.workflow_id));
        }
    }

    /// The test-only crash point, after the step's commit: commits what is
    /// open (the step with the steps before it), then dies.
    async fn crash_after_commit(
        &mut self,
        crash: Option<CrashWhen>,
        name: &str,
    ) -> Result<(), WorkflowError> {
        if crash == Some(CrashWhen::After) {
            self.commit_open().await?;
            crash_now(&format!("after:{name} of {}", self.workflow_id));
        }
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
    /// finished workflow. Only a recv locks the row (in `workflow_recv()`).
    async fn transaction(&mut self) -> Result<Transaction<'static, Postgres>, WorkflowError> {
        if self.cancel_requested {
            // The claim saw it.
            return Err(WorkflowError::Cancelled);
        }
        if let Some(tx) = self.open.take() {
            return Ok(tx);
        }
        Ok(self.pool.begin().await?)
    }

    /// After an operation succeeded: keep its transaction open for the next
    /// one, or commit it now when not batching.
    async fn keep(&mut self, tx: Transaction<'static, Postgres>) -> Result<(), WorkflowError> {
        if self.batch {
            self.open = Some(tx);
        } else {
            tx.commit().await?;
        }
        Ok(())
    }

    /// Commits the operations still open.
    async fn commit_open(&mut self) -> Result<(), WorkflowError> {
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
        if self.finished {
            // The workflow has ended: its row would refuse the step, and a
            // refusal inside the transaction of the final step would undo
            // that step and its end with it.
            return Err(WorkflowError::fatal(format!(
                "step {seq} ({name}) comes after the workflow's final step"
            )));
        }
        if self
            .checkpoints
            .front()
            .is_none_or(|front| front.step_seq != seq)
        {
            self.resumed_after = if self.running {
                None
            } else {
                Some(self.replayed_until)
            };
            self.running = true;
            return Ok(Replay::Run);
        }
        let checkpoint = self.checkpoints.pop_front().expect("front exists");
        self.replayed_until = checkpoint.finished_at;
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

    /// Inserts a checkpoint, after those of the in-process sleeps before it,
    /// through `workflow_checkpoint()`, which refuses it (an error, mapped by
    /// [`refusal`]) when another execution won this step (this one is fenced
    /// off) or the workflow was cancelled or has finished.
    async fn checkpoint(
        &mut self,
        tx: &mut PgConnection,
        seq: i32,
        name: &str,
        output: &Value,
        started: DateTime<Utc>,
    ) -> Result<(), WorkflowError> {
        let mut rows = CheckpointRows::step(seq, name, started);
        rows.outputs.push(output.clone());
        let written = sqlx::query(sql::CHECKPOINT)
            .bind(&self.workflow_id)
            .bind(&rows.seqs)
            .bind(&rows.names)
            .bind(&rows.outputs)
            .bind(&*self.worker_id)
            .bind(&rows.starts)
            .execute(&mut *tx)
            .await;
        match written {
            Ok(_) => {
                // Written: every caller commits this transaction next, or
                // ends the execution (which then replays from the last
                // commit).
                Ok(())
            }
            Err(error) => Err(refusal(&error, seq, name).unwrap_or_else(|| error.into())),
        }
    }

    /// Parks a sleeping workflow until `until`, with the job that wakes it
    /// then: one statement. (A recv parks inside `workflow_recv()`.)
    async fn park(&self, tx: &mut PgConnection, until: DateTime<Utc>) -> Result<(), WorkflowError> {
        sqlx::query(sql::PARK_SLEEP)
            .bind(self.kind.queue)
            .bind(&self.workflow_id)
            .bind(until)
            .bind(new_job_id())
            .bind(JOB_MAX_ATTEMPTS)
            .execute(&mut *tx)
            .await?;
        Ok(())
    }

    /// After a failed attempt of step `seq`: stops the execution when
    /// another execution has written the step's checkpoint, or the workflow
    /// was cancelled or has finished, since the failure may be that other
    /// execution's doing (its effect came first: a unique key the step's
    /// own statement then violates, say); otherwise retries after a
    /// backoff, or fails the workflow.
    async fn after_failure(
        &self,
        seq: i32,
        name: &str,
        attempt: u32,
        failure: Result<StepError, Box<dyn std::any::Any + Send>>,
        retry: &RetryPolicy,
    ) -> Result<(), WorkflowError> {
        let verdict = self.retryable(seq, name, attempt, failure);
        if matches!(verdict, Ok(_) | Err(WorkflowError::Failed { .. }))
            && let Some(stop) = self.fenced_off(seq, name).await
        {
            return Err(stop);
        }
        self.retry_or_fail(seq, name, verdict?, attempt, retry)
            .await
    }

    /// Why this execution must stop at step `seq`, as a refused checkpoint
    /// would say, or `None` (also when the database cannot tell now).
    async fn fenced_off(&self, seq: i32, name: &str) -> Option<WorkflowError> {
        let row: Option<(bool, bool, String)> = sqlx::query_as(sql::STEP_FENCED_OFF)
            .bind(&self.workflow_id)
            .bind(seq)
            .fetch_optional(&self.pool)
            .await
            .ok()?;
        let Some((written, cancel_requested, status)) = row else {
            return Some(WorkflowError::fatal("workflow row disappeared"));
        };
        if written {
            Some(WorkflowError::Fenced {
                step: seq,
                name: name.to_owned(),
            })
        } else if cancel_requested {
            Some(WorkflowError::Cancelled)
        } else if matches!(status.as_str(), "succeeded" | "failed" | "cancelled") {
            Some(WorkflowError::Fenced {
                step: seq,
                name: format!("(workflow already {status})"),
            })
        } else {
            None
        }
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

/// `workflow_start()`'s arguments, appended to a step statement's: with
/// `owner`, the workflow starts claimed by that worker, without a job.
fn bind_start(
    arguments: &mut PgArguments,
    kind: WorkflowKind,
    id: &str,
    input: &Value,
    job_id: &str,
    owner: Option<&str>,
) -> Result<(), sqlx::error::BoxDynError> {
    arguments.add(id)?;
    arguments.add(kind.name)?;
    arguments.add(kind.queue)?;
    arguments.add(input)?;
    arguments.add(job_id)?;
    arguments.add(JOB_MAX_ATTEMPTS)?;
    arguments.add(owner)
}

/// A step statement's output as the type its caller asked for.
fn decode_output<T: DeserializeOwned>(
    seq: i32,
    name: &str,
    output: Value,
) -> Result<T, WorkflowError> {
    serde_json::from_value(output).map_err(|e| {
        WorkflowError::fatal(format!(
            "step {seq} ({name}): its output does not decode: {e}"
        ))
    })
}

/// What a checkpoint refused by `workflow_checkpoint()` means for the
/// execution (the SQLSTATEs are in its migration); `None` for any other
/// error.
fn refusal(error: &sqlx::Error, seq: i32, name: &str) -> Option<WorkflowError> {
    let sqlx::Error::Database(db) = error else {
        return None;
    };
    Some(match db.code()?.as_ref() {
        "WF001" => WorkflowError::Fenced {
            step: seq,
            name: name.to_owned(),
        },
        "WF002" => WorkflowError::Cancelled,
        "WF003" => WorkflowError::Fenced {
            step: seq,
            name: format!("(workflow already {})", db.message()),
        },
        "WF004" => WorkflowError::fatal("workflow row disappeared"),
        "WF005" => WorkflowError::fatal(format!(
            "step {seq} ({name}) starts a workflow whose id a {} workflow holds",
            db.message()
        )),
        _ => return None,
    })
}

/// Sets events (upserts) and notifies their waiters, in the caller's
/// transaction, in one statement however many there are (their keys must
/// differ: PostgreSQL refuses to upsert one row twice in a statement).
/// Inside a [`WorkflowContext::tx_step`] they happen exactly once with the
/// step. (A [`StepStatement`] publishes its own with
/// [`StepStatement::event`].)
pub async fn set_events_in(
    tx: &mut PgConnection,
    workflow_id: &str,
    events: &[(&str, &Value)],
) -> Result<(), sqlx::Error> {
    let mut arguments = PgArguments::default();
    arguments.add(workflow_id).map_err(sqlx::Error::Encode)?;
    EventArguments::new(workflow_id, events.iter().copied())
        .bind(&mut arguments)
        .map_err(sqlx::Error::Encode)?;
    // The notifications go out with the rows' commit.
    sqlx::query_with(sql::SET_EVENTS, arguments)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// `workflow_set_events()`'s arguments after the workflow id: the events'
/// keys, values, the channel and each event's notification payload.
struct EventArguments<'a> {
    keys: Vec<&'a str>,
    values: Vec<&'a Value>,
    payloads: Vec<String>,
}

impl<'a> EventArguments<'a> {
    fn new(workflow_id: &str, events: impl Iterator<Item = (&'a str, &'a Value)>) -> Self {
        let mut arguments = EventArguments {
            keys: Vec::new(),
            values: Vec::new(),
            payloads: Vec::new(),
        };
        for (key, value) in events {
            arguments.keys.push(key);
            arguments.values.push(value);
            arguments
                .payloads
                .push(EventListener::payload(workflow_id, key, value));
        }
        arguments
    }

    fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    fn bind(&self, arguments: &mut PgArguments) -> Result<(), sqlx::error::BoxDynError> {
        arguments.add(&self.keys)?;
        arguments.add(&self.values)?;
        arguments.add(EVENTS_CHANNEL)?;
        arguments.add(&self.payloads)
    }
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
