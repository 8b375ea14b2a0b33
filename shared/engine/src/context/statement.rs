//! Statement steps ([`Statement`](crate::Statement), run by
//! `WorkflowContext::db_step`): a step's SQL and its checkpoint sent as one
//! statement, with its events, the workflow it starts and the workflow's
//! end; and events published in a transaction step.

use super::*;

/// The checkpoint rows one `workflow_checkpoint()` call writes, as the
/// arrays it takes: a step's, or none (a recv whose deadline is written
/// already). `outputs` is left to the caller (or the statement computes it:
/// see [`Statement`](crate::Statement)).
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

/// `workflow_start()`'s arguments, appended to a statement step's: with
/// `owner`, the workflow starts claimed by that worker, without a job;
/// `parent` is the workflow whose step starts it.
pub(super) fn bind_start(
    arguments: &mut PgArguments,
    (kind, id, input): (WorkflowKind, &str, &Value),
    job_id: &str,
    owner: Option<&str>,
    parent: &str,
) -> Result<(), sqlx::error::BoxDynError> {
    arguments.add(id)?;
    arguments.add(kind.name)?;
    arguments.add(kind.queue)?;
    arguments.add(input)?;
    arguments.add(job_id)?;
    arguments.add(JOB_MAX_ATTEMPTS)?;
    arguments.add(owner)?;
    arguments.add(parent)
}

/// A statement step's output as the type its caller asked for.
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

/// Sets events (upserts) and notifies their waiters, in a transaction
/// step's transaction, in one statement however many there are (their keys
/// differ: PostgreSQL refuses to upsert one row twice in a statement).
pub(super) async fn set_events_in(
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
    pub(crate) async fn run_statement_step<T>(
        &mut self,
        name: &str,
        statement: StatementSpec,
    ) -> Result<T, WorkflowError>
    where
        T: DeserializeOwned + Send,
    {
        let retry = statement.retry.unwrap_or(self.retry);
        let finish = statement.finish.as_ref();
        let (seq, crash) = match self.begin(name)? {
            Begin::Replayed(value) => return Ok(value),
            Begin::Run { seq, crash } => (seq, crash),
        };
        if let Some(error) = statement.unencodable {
            return Err(self.step_failed(seq, name, error, 1));
        }
        // An unflushed or batched step commits apart from the steps before
        // it: they commit now (flushed).
        if !matches!(statement.commit, Commit::Flushed) {
            self.commit_open().await?;
        }
        if crash.is_some() {
            // A commit of its own to die before or after (not a batch's).
            self.open_transaction().await?;
        }
        let started = Utc::now();
        if let Commit::Batched(arg) = &statement.commit
            && self.open.is_none()
            && !self.cancel_requested
        {
            let step = BatchedStep {
                workflow_id: self.workflow_id.clone(),
                seq,
                name: name.to_owned(),
                started,
                arg: arg.clone(),
                finish: finish.cloned(),
            };
            match self.batches.run(statement.sql, step).await {
                Batched::Done(output) => {
                    if finish.is_some() {
                        self.cursor.finish();
                    }
                    self.step_done(name, seq, started);
                    return decode_output(seq, name, output);
                }
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
            also += &sql::step_start(&placeholders(8));
        }
        // After the checkpoint, which refuses a finished workflow.
        if finish.is_some() {
            also += &sql::step_finish(&id, &placeholders(1));
        }
        let may_skip_flush = matches!(statement.commit, Commit::Unflushed);
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
        let arg = match &statement.commit {
            Commit::Batched(arg) => Some(arg),
            _ => None,
        };
        let input = match arg {
            Some(_) => sql::one_step_input(&id, &placeholders(1)),
            None => String::new(),
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
                bound = bind_start(
                    &mut arguments,
                    (*kind, id, input),
                    &start_job,
                    owner,
                    &self.workflow_id,
                );
            }
            if let (true, Some(output)) = (bound.is_ok(), finish) {
                bound = arguments.add(output);
            }
            let shared = self.open.is_some();
            if bound.is_ok() && may_skip_flush {
                // Only a commit of its own may skip the flush.
                bound = arguments.add(!shared);
            }
            if let (true, Some(arg)) = (bound.is_ok(), arg) {
                bound = arguments.add(arg);
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
                let child = match &statement.start {
                    Some(_) => Some((
                        row.try_get::<bool, _>("started")?,
                        row.try_get::<DateTime<Utc>, _>("started_at")?,
                    )),
                    None => None,
                };
                Ok((row.try_get::<Option<Value>, _>(0)?, child))
            });
            let error = match row {
                Ok((output, child)) => {
                    self.crash_before_commit(crash, name);
                    self.crash_after_commit(crash, name).await?;
                    self.step_done(name, seq, started);
                    if finish.is_some() {
                        self.cursor.finish();
                    }
                    if let (Some(slot), Some((kind, id, input)), Some((true, started_at))) =
                        (start_here.take(), &statement.start, child)
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
