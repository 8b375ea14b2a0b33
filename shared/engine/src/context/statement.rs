//! One-statement steps: a step's SQL and its checkpoint sent as one statement
//! ([`StepStatement`], `WorkflowContext::sql_step`), and events published
//! with a step.

use super::*;

/// The checkpoint rows one `workflow_checkpoint()` call writes, as the
/// arrays it takes: a step's, or none (a recv whose deadline is written
/// already). `outputs` is left to the caller (or the statement computes it:
/// see [`WorkflowContext::sql_step`]).
#[derive(Default)]
pub(super) struct CheckpointRows {
    pub(super) seqs: Vec<i32>,
    pub(super) names: Vec<String>,
    pub(super) outputs: Vec<Value>,
    pub(super) starts: Vec<DateTime<Utc>>,
}

impl CheckpointRows {
    /// The row of step `seq`, but its output.
    pub(super) fn step(seq: i32, name: &str, started: DateTime<Utc>) -> Self {
        CheckpointRows {
            seqs: vec![seq],
            names: vec![name.to_owned()],
            outputs: Vec::new(),
            starts: vec![started],
        }
    }

    /// Appends `workflow_checkpoint()`'s arguments but the last (the lock)
    /// to a statement's own, in its order.
    pub(super) fn bind(
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
        let problem = if let Err(e) = crate::client::check_id(id) {
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

/// `workflow_start()`'s arguments, appended to a step statement's: with
/// `owner`, the workflow starts claimed by that worker, without a job.
pub(super) fn bind_start(
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
pub(super) fn decode_output<T: DeserializeOwned>(
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
pub(super) struct EventArguments<'a> {
    keys: Vec<&'a str>,
    values: Vec<&'a Value>,
    payloads: Vec<String>,
}

impl<'a> EventArguments<'a> {
    pub(super) fn new(
        workflow_id: &str,
        events: impl Iterator<Item = (&'a str, &'a Value)>,
    ) -> Self {
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

    pub(super) fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub(super) fn bind(&self, arguments: &mut PgArguments) -> Result<(), sqlx::error::BoxDynError> {
        arguments.add(&self.keys)?;
        arguments.add(&self.values)?;
        arguments.add(EVENTS_CHANNEL)?;
        arguments.add(&self.payloads)
    }
}

impl WorkflowContext {
    pub(super) async fn run_sql_step<T>(
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
                    if finish.is_some() {
                        self.cursor.finish();
                    }
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
}
