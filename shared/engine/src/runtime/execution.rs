//! One execution of a workflow: claim it, replay it from its checkpoints
//! and run it to its next park or its end, then settle how it ended.

use super::*;

/// How long a job waits for an execution of its workflow already running
/// in this process to end.
const IN_FLIGHT_WAIT: Duration = Duration::from_secs(2);

/// How one execution of a workflow ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecutionOutcome {
    /// Finished with its output.
    Succeeded,
    /// Waiting for a message or a wake-up time.
    Parked,
    /// Failed for good (dead letter).
    Failed,
    /// Cancelled at a step boundary.
    Cancelled,
    /// Another execution checkpointed a step first; this one stopped.
    Fenced,
    /// The worker is draining; the workflow was handed back to the queue.
    HandedBack,
    /// Nothing to do: finished already, or running elsewhere.
    Skipped,
    /// The worker is shutting down while the database is unreachable; the
    /// job will be released when this process leaves or is reaped.
    Abandoned,
}

impl ExecutionOutcome {
    /// Its name, for a metric's label.
    pub fn as_str(self) -> &'static str {
        match self {
            ExecutionOutcome::Succeeded => "succeeded",
            ExecutionOutcome::Parked => "parked",
            ExecutionOutcome::Failed => "failed",
            ExecutionOutcome::Cancelled => "cancelled",
            ExecutionOutcome::Fenced => "fenced",
            ExecutionOutcome::HandedBack => "handed_back",
            ExecutionOutcome::Skipped => "skipped",
            ExecutionOutcome::Abandoned => "abandoned",
        }
    }

    /// Whether the workflow ended with it (succeeded, failed, cancelled).
    pub fn is_end(self) -> bool {
        matches!(
            self,
            ExecutionOutcome::Succeeded | ExecutionOutcome::Failed | ExecutionOutcome::Cancelled
        )
    }
}

/// A claimed workflow: what its execution needs.
#[derive(sqlx::FromRow)]
pub(super) struct Claim {
    workflow_id: String,
    kind: String,
    queue: String,
    input: Value,
    previous_status: String,
    previous_owner: Option<String>,
    cancel_requested: bool,
    executions: i32,
    /// Set while its compensation runs: the end it leads to.
    pub(super) ending: Option<String>,
    /// A failure's error, kept while its compensation runs.
    pub(super) error: Option<String>,
    /// A failure's attempts, kept while its compensation runs.
    pub(super) attempts: i32,
    /// Taken over from a dead worker last seen then.
    orphaned_at: Option<DateTime<Utc>>,
    checkpoints: Value,
    /// When the workflow was started: a sleep before its first step counts
    /// from then.
    created_at: DateTime<Utc>,
}

/// Lets a statement step that starts a workflow
/// ([`Statement::start`](crate::Statement::start)) run it in this
/// process, claimed by the start itself: no job, no notification, no claim
/// of its own. Only for a kind registered here, on a queue this process
/// consumes with a free slot, while it is not draining; otherwise the start
/// enqueues a job as usual.
#[derive(Clone)]
pub(crate) struct StartHere {
    runtime: Runtime,
}

impl RunsHere for StartHere {
    fn reserve(&self, kind: WorkflowKind) -> Option<OwnedSemaphorePermit> {
        let inner = &self.runtime.inner;
        if *inner.drain.borrow() || !inner.workflows.contains_key(kind.name) {
            return None;
        }
        inner
            .queues
            .get(kind.queue)?
            .slots
            .clone()
            .try_acquire_owned()
            .ok()
    }

    fn execute(
        &self,
        slot: OwnedSemaphorePermit,
        kind: WorkflowKind,
        workflow_id: &str,
        input: Value,
        created_at: DateTime<Utc>,
    ) {
        let runtime = self.runtime.clone();
        // As `workflow_start()` left the row.
        let claim = Claim {
            workflow_id: workflow_id.to_owned(),
            kind: kind.name.to_owned(),
            queue: kind.queue.to_owned(),
            input,
            previous_status: "enqueued".to_owned(),
            previous_owner: None,
            cancel_requested: false,
            executions: 1,
            ending: None,
            error: None,
            attempts: 0,
            orphaned_at: None,
            checkpoints: Value::Array(Vec::new()),
            created_at,
        };
        // Entered now, not when the spawned task first runs: the drain and
        // the lost-workflow check must see the child from the moment the
        // step that started it returns.
        let entered = runtime.mark_entered(workflow_id).is_ok();
        spawn_in_slot(slot, move |released| async move {
            let slot = Some(released);
            if !entered {
                return runtime.execute_claimed(claim, None, slot).await;
            }
            let workflow_id = claim.workflow_id.clone();
            let guard = InFlightGuard {
                inner: &runtime.inner,
                workflow_id: &workflow_id,
            };
            runtime
                .execute_entered(guard, None, Some(claim), slot)
                .await
        });
    }
}

/// Spawns an execution that holds `permit`, a slot of its queue, until it
/// fires the sender it is given (an in-process sleep gives the slot back)
/// or ends.
pub(super) fn spawn_in_slot<F>(
    permit: OwnedSemaphorePermit,
    execution: impl FnOnce(oneshot::Sender<()>) -> F,
) where
    F: Future<Output = ExecutionOutcome> + Send + 'static,
{
    let (released_tx, released) = oneshot::channel();
    tokio::spawn(execution(released_tx));
    tokio::spawn(async move {
        // Fired, or dropped when the execution ended: either way, done.
        let _ = released.await;
        drop(permit);
    });
}

impl Runtime {
    /// Executes (or resumes) one workflow to its next park or its end.
    /// The queue handler calls this; tests call it to force races.
    pub async fn execute(&self, workflow_id: &str) -> ExecutionOutcome {
        self.execute_in_slot(workflow_id, None, None).await
    }

    /// [`Runtime::execute`] for a queue job: `slot` fires when the execution
    /// gives its queue slot back (an in-process sleep); dropping it unfired
    /// means the execution is over. With `job_id`, the claim also takes that
    /// job if it is still waiting in the queue.
    pub(super) async fn execute_in_slot(
        &self,
        workflow_id: &str,
        job_id: Option<&str>,
        slot: Option<oneshot::Sender<()>>,
    ) -> ExecutionOutcome {
        // Another execution of this workflow in this process: usually one
        // that has just parked and is still returning while the job that
        // resumes it arrives. Dropping that job would lose the resume, so
        // wait for the other execution to end. One still running after
        // the wait carries the workflow on itself (a message reaches a
        // running workflow through its own recv).
        let deadline = tokio::time::Instant::now() + IN_FLIGHT_WAIT;
        let guard = loop {
            let mut ended = match self.enter(workflow_id) {
                Ok(guard) => break guard,
                Err(ended) => ended,
            };
            // Err once the other execution drops its sender: it ended.
            if tokio::time::timeout_at(deadline, ended.changed())
                .await
                .is_err()
            {
                return ExecutionOutcome::Skipped;
            }
        };
        self.execute_entered(guard, job_id, None, slot).await
    }

    /// Runs the job `job_id` of `queue`, named in a notification, without
    /// waiting for apalis to fetch it: one statement takes the job (unless
    /// another worker already has) and claims its workflow. `Skipped` when
    /// the job was taken elsewhere or its workflow has finished.
    pub(super) async fn execute_job(
        &self,
        job_id: &str,
        slot: Option<oneshot::Sender<()>>,
    ) -> ExecutionOutcome {
        let claim = match Box::pin(self.claim(None, Some(job_id))).await {
            Ok(Some(claim)) => claim,
            // The job, if this took it, belonged to a finished workflow.
            Ok(None) => return ExecutionOutcome::Skipped,
            Err(e) => {
                // Nothing taken: the job waits in the queue for a fetch.
                tracing::debug!(job_id, error = %e, "could not take a notified job");
                return ExecutionOutcome::Skipped;
            }
        };
        self.execute_claimed(claim, Some(job_id), slot).await
    }

    /// Executes a workflow claimed already: by [`Runtime::execute_job`]'s
    /// statement, or by the statement step that started it here
    /// ([`StartHere`]).
    async fn execute_claimed(
        &self,
        claim: Claim,
        job_id: Option<&str>,
        slot: Option<oneshot::Sender<()>>,
    ) -> ExecutionOutcome {
        let workflow_id = claim.workflow_id.clone();
        match self.enter(&workflow_id) {
            Ok(guard) => self.execute_entered(guard, job_id, Some(claim), slot).await,
            // Another execution here still holds it: wait for that one,
            // then claim the workflow again, as for a fetched job.
            Err(_) => self.execute_in_slot(&workflow_id, job_id, slot).await,
        }
    }

    /// Marks `workflow_id` as executing in this process, or returns a
    /// receiver that ends when the execution already here does.
    fn enter<'a>(&'a self, workflow_id: &'a str) -> Result<InFlightGuard<'a>, watch::Receiver<()>> {
        self.mark_entered(workflow_id)?;
        Ok(InFlightGuard {
            inner: &self.inner,
            workflow_id,
        })
    }

    /// What [`Runtime::enter`] records, for a guard made later.
    fn mark_entered(&self, workflow_id: &str) -> Result<(), watch::Receiver<()>> {
        let inner = &*self.inner;
        let mut executions = inner.in_flight.lock().expect("in-flight set");
        if let Some(ended) = executions.get(workflow_id) {
            return Err(ended.subscribe());
        }
        executions.insert(workflow_id.to_owned(), watch::channel(()).0);
        inner.in_flight_count.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Executes an entered workflow to its next park or its end, replaying
    /// while the database is away. `claimed`: the first execution's claim,
    /// already made.
    async fn execute_entered(
        &self,
        guard: InFlightGuard<'_>,
        job_id: Option<&str>,
        mut claimed: Option<Claim>,
        mut slot: Option<oneshot::Sender<()>>,
    ) -> ExecutionOutcome {
        let workflow_id = guard.workflow_id;
        let mut delay = Duration::from_millis(100);
        let mut batch = true;
        loop {
            let executed = match claimed.take() {
                Some(claim) => Box::pin(self.run_claimed(claim, &mut slot, batch)).await,
                None => {
                    self.execute_once(workflow_id, job_id, &mut slot, batch)
                        .await
                }
            };
            match executed {
                Ok(Some(outcome)) => return outcome,
                Ok(None) => {
                    tracing::info!(
                        workflow_id,
                        "a step failed inside a shared transaction; replaying step by step"
                    );
                    batch = false;
                }
                Err(e) => {
                    if *self.inner.drain.borrow() {
                        return ExecutionOutcome::Abandoned;
                    }
                    tracing::warn!(workflow_id, error = %e, "database unavailable; will replay when it returns");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Claims a workflow in one statement, its own transaction: locks its
    /// row, marks it running unless it has finished, and returns what the
    /// execution needs, its checkpoints included. The workflow is
    /// `workflow_id`, or the one of the job `job_id`; with `job_id`, the
    /// statement also takes that job (marks it done) if it is due and no
    /// other worker holds it.
    ///
    /// A claim commits without waiting for its WAL flush (`synchronous_commit`
    /// off for its transaction, set in the statement): one round trip and no
    /// flush on the path of every execution. Nothing is lost by it: nothing
    /// outside the engine acts on a claim, and the WAL is one sequence, so
    /// the next synchronous commit (a step's, a park's) flushes the claim
    /// with it; a database crash before that drops the claim together with
    /// everything after it, and the job or the reaper runs the workflow
    /// again.
    async fn claim(
        &self,
        workflow_id: Option<&str>,
        job_id: Option<&str>,
    ) -> Result<Option<Claim>, sqlx::Error> {
        sqlx::query_as(queue::CLAIM)
            .bind(workflow_id)
            .bind(&*self.inner.worker_id)
            .bind(job_id)
            .bind(&*self.inner.version)
            .bind(self.inner.adopted_kinds())
            .fetch_optional(&self.inner.pool)
            .await
    }

    /// One execution: claim, run, settle. `None` asks for a replay without
    /// batching (a step failed inside a shared transaction).
    async fn execute_once(
        &self,
        workflow_id: &str,
        job_id: Option<&str>,
        slot: &mut Option<oneshot::Sender<()>>,
        batch: bool,
    ) -> Result<Option<ExecutionOutcome>, sqlx::Error> {
        // Boxed, like every call below but the workflow's own future: the
        // execution's future then stays small through a long sleep.
        let Some(claim) = Box::pin(self.claim(Some(workflow_id), job_id)).await? else {
            // Finished already (a late or duplicate job), no such workflow,
            // or one this worker may not run (another version's). A job
            // this took is done; the job apalis fetched for it is acked
            // when this returns, so an unfinished workflow gets another.
            if job_id.is_none() {
                Box::pin(
                    sqlx::query(sql::HAND_ON_REFUSED)
                        .bind(workflow_id)
                        .bind(new_job_id())
                        .bind(JOB_MAX_ATTEMPTS)
                        .execute(&self.inner.pool),
                )
                .await?;
            }
            return Ok(Some(ExecutionOutcome::Skipped));
        };
        Box::pin(self.run_claimed(claim, slot, batch)).await
    }

    /// Runs a claimed workflow (or, when it ends without finishing, its
    /// compensation) and settles how the execution ended.
    async fn run_claimed(
        &self,
        claim: Claim,
        slot: &mut Option<oneshot::Sender<()>>,
        batch: bool,
    ) -> Result<Option<ExecutionOutcome>, sqlx::Error> {
        let inner = &self.inner;
        let resumed_ending = EndReason::of_claim(&claim);
        let Claim {
            workflow_id,
            kind,
            queue,
            input,
            previous_status,
            previous_owner,
            cancel_requested,
            executions: execution,
            checkpoints,
            created_at,
            orphaned_at,
            ..
        } = claim;
        let workflow_id = workflow_id.as_str();
        // A workflow marked running elsewhere is executed anyway: its owner's
        // execution may be gone while the owner process lives on (its queue
        // consumer died with the database, say), and nothing outside that
        // process can tell. Fencing makes the duplicate harmless.
        if previous_status == "running"
            && previous_owner
                .as_deref()
                .is_some_and(|o| o != &*inner.worker_id)
        {
            tracing::info!(workflow_id, owner = ?previous_owner, "running elsewhere per its row; executing it too (fenced)");
        }
        let Some(definition) = inner.workflows.get(kind.as_str()).cloned() else {
            let error = format!(
                "no workflow of kind `{kind}` is registered on worker {}",
                inner.worker_id
            );
            Box::pin(self.finish(None, workflow_id, "failed", None, Some(&error), 0)).await?;
            tracing::error!(workflow_id, %error, "workflow failed");
            return Ok(Some(ExecutionOutcome::Failed));
        };
        let crash_loop = (execution > inner.config.max_executions).then(|| {
            format!(
                "started {} times without finishing (crash loop?)",
                execution - 1
            )
        });
        if let (Some(error), Some(_)) = (&crash_loop, &resumed_ending) {
            let error = format!("its compensation {error}");
            Box::pin(self.finish(None, workflow_id, "failed", None, Some(&error), 0)).await?;
            tracing::error!(workflow_id, %error, "workflow failed");
            return Ok(Some(ExecutionOutcome::Failed));
        }
        let checkpoints: Vec<Checkpoint> =
            serde_json::from_value(checkpoints).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
        let mut ctx = WorkflowContext {
            pool: inner.pool.clone(),
            workflow_id: workflow_id.to_owned(),
            kind: definition.kind(),
            worker_id: inner.worker_id.clone(),
            cursor: ReplayCursor::new(checkpoints, created_at),
            retry: definition.retry_policy(),
            hold_threshold: inner.config.hold_threshold,
            draining: inner.drain.subscribe(),
            execution,
            slot: slot.take(),
            open: None,
            batch,
            cancel_requested,
            here: Arc::new(StartHere {
                runtime: self.clone(),
            }),
            batches: inner.batches.clone(),
            crash: CrashCounter::new(inner.config.crash_at.clone()),
            observer: inner.observer.clone(),
            orphaned_at,
            lost: inner.lost.clone(),
            lost_at_claim: inner.lost.load(Ordering::Relaxed),
            patches: inner.patches(&kind),
            revision: inner
                .config
                .test_revision
                .clone()
                .filter(|revision| revision.kind == kind),
        };
        inner.observer.execution_started(&kind, execution == 1);
        let span = tracing::info_span!(
            "workflow",
            workflow_id,
            kind = %kind,
            execution,
            worker_id = %inner.worker_id,
            request_id = tracing::field::Empty,
        );
        // The workflow's own steps, unless its end has begun already.
        let mut ending = resumed_ending;
        let mut result = Ok(Ok(Value::Null));
        if ending.is_none() {
            ending = crash_loop.map(|error| EndReason::Failed { error, attempts: 0 });
        }
        if ending.is_none() {
            result = AssertUnwindSafe(definition.run_json(&mut ctx, &input))
                .catch_unwind()
                .instrument(span.clone())
                .await;
            // A failure with steps still uncommitted replays them one by
            // one first (settle): whatever failed may have aborted them.
            if ctx.open.is_none() {
                ending = EndReason::of(&result);
            }
        }
        if let Some(reason) = &ending {
            result = Box::pin(
                self.compensate(&mut ctx, &*definition, &input, reason)
                    .instrument(span.clone()),
            )
            .await?;
        }
        // Still held (no in-process sleep happened): keep it until settled.
        *slot = ctx.slot.take();
        let open = ctx.open.take();
        let finished = ctx.cursor.is_finished();
        // Never hold `span.enter()` across an await: the task may resume on
        // another thread, which corrupts the span registry (it panicked here).
        let settled = Box::pin(
            self.settle(workflow_id, &queue, result, open, finished, ending)
                .instrument(span),
        )
        .await;
        if let Ok(Some(outcome)) = settled {
            inner.observer.execution_ended(&kind, outcome);
        }
        settled
    }

    /// Records how an execution ended, in the transaction still open from
    /// its last steps when there is one. `None`: replay without batching.
    /// `finished`: the last step ended the workflow already. `ending`: the
    /// result is the compensation's, run for that reason.
    async fn settle(
        &self,
        workflow_id: &str,
        queue: &str,
        result: ExecutionResult,
        open: Option<Transaction<'static, Postgres>>,
        finished: bool,
        ending: Option<EndReason>,
    ) -> Result<Option<ExecutionOutcome>, sqlx::Error> {
        if let Some(reason) = ending {
            return self
                .settle_ending(workflow_id, queue, result, open, reason)
                .await;
        }
        let outcome = match result {
            Ok(Ok(_)) if finished => {
                if let Some(tx) = open {
                    tx.commit().await?;
                }
                tracing::debug!("workflow succeeded with its last step");
                ExecutionOutcome::Succeeded
            }
            Ok(Ok(output)) => {
                self.finish(open, workflow_id, "succeeded", Some(&output), None, 0)
                    .await?;
                tracing::debug!("workflow succeeded");
                ExecutionOutcome::Succeeded
            }
            Ok(Err(e)) => return self.settle_stop(workflow_id, queue, e, open).await,
            // A failure with steps still uncommitted: whatever failed may
            // have aborted their transaction, so replay them one by one and
            // end (or not) with them committed.
            Err(_) => return Ok(None),
        };
        Ok(Some(outcome))
    }

    /// Settles a compensation's execution: done, the workflow takes the
    /// status it leads to; failed, the workflow fails saying so.
    async fn settle_ending(
        &self,
        workflow_id: &str,
        queue: &str,
        result: ExecutionResult,
        open: Option<Transaction<'static, Postgres>>,
        reason: EndReason,
    ) -> Result<Option<ExecutionOutcome>, sqlx::Error> {
        let failure = match result {
            Ok(Ok(_)) => {
                self.finish(open, workflow_id, None, None, None, 0).await?;
                tracing::info!(
                    ending = reason.status(),
                    "workflow ended after its compensation"
                );
                return Ok(Some(match reason {
                    EndReason::Cancelled => ExecutionOutcome::Cancelled,
                    EndReason::Failed { .. } => ExecutionOutcome::Failed,
                }));
            }
            Ok(Err(
                e @ (WorkflowError::Parked
                | WorkflowError::Fenced { .. }
                | WorkflowError::Lost
                | WorkflowError::Draining
                | WorkflowError::Unavailable(_)
                | WorkflowError::RetryUnbatched),
            )) => return self.settle_stop(workflow_id, queue, e, open).await,
            _ if open.is_some() => return Ok(None),
            Ok(Err(e)) => e.to_string(),
            Err(panic) => format!("panicked: {}", panic_message(&*panic)),
        };
        let why = match &reason {
            EndReason::Cancelled => "cancelled".to_owned(),
            EndReason::Failed { error, .. } => error.clone(),
        };
        let error = format!("{why}; its compensation failed: {failure}");
        self.finish(None, workflow_id, "failed", None, Some(&error), 0)
            .await?;
        tracing::error!(%error, "workflow failed");
        Ok(Some(ExecutionOutcome::Failed))
    }

    /// Settles an execution that stopped without an end of its own: parked,
    /// fenced, handed back, or to be replayed (database away, a step failed
    /// in a shared transaction). A cancel or failure that reaches here has
    /// steps still uncommitted: replayed one by one, it ends with them
    /// committed.
    async fn settle_stop(
        &self,
        workflow_id: &str,
        queue: &str,
        stop: WorkflowError,
        open: Option<Transaction<'static, Postgres>>,
    ) -> Result<Option<ExecutionOutcome>, sqlx::Error> {
        let outcome = match stop {
            WorkflowError::Parked => ExecutionOutcome::Parked,
            WorkflowError::Fenced { step, name } => {
                tracing::info!(
                    step, step_name = %name,
                    "fenced: another execution checkpointed this step first; this execution stops"
                );
                ExecutionOutcome::Fenced
            }
            WorkflowError::Lost => {
                tracing::warn!(
                    "this worker was silent past WORKER_STALE_AFTER: its workflow may run elsewhere now; this execution stops"
                );
                ExecutionOutcome::Fenced
            }
            WorkflowError::Draining => {
                let mut tx = match open {
                    Some(tx) => tx,
                    None => self.inner.pool.begin().await?,
                };
                // The hand-back and its job: one statement.
                sqlx::query(sql::HAND_BACK)
                    .bind(queue)
                    .bind(workflow_id)
                    .bind(new_job_id())
                    .bind(JOB_MAX_ATTEMPTS)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                tracing::info!("handed back to the queue (worker draining)");
                ExecutionOutcome::HandedBack
            }
            WorkflowError::Unavailable(e) => return Err(e),
            _ => return Ok(None),
        };
        Ok(Some(outcome))
    }

    /// Records a terminal status, in `open` (then committed) or on its own;
    /// `None`: the one the workflow's compensation led to.
    async fn finish(
        &self,
        open: Option<Transaction<'static, Postgres>>,
        workflow_id: &str,
        status: impl Into<Option<&str>>,
        output: Option<&Value>,
        error: Option<&str>,
        attempts: i32,
    ) -> Result<(), sqlx::Error> {
        let finish = sqlx::query(sql::FINISH)
            .bind(workflow_id)
            .bind(status.into())
            .bind(output)
            .bind(error)
            .bind(attempts);
        match open {
            Some(mut tx) => {
                finish.execute(&mut *tx).await?;
                tx.commit().await?;
            }
            None => {
                finish.execute(&self.inner.pool).await?;
            }
        }
        Ok(())
    }
}

struct InFlightGuard<'a> {
    inner: &'a Inner,
    workflow_id: &'a str,
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut set) = self.inner.in_flight.lock() {
            set.remove(self.workflow_id);
        }
        self.inner.in_flight_count.fetch_sub(1, Ordering::Relaxed);
    }
}
