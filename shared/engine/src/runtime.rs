//! The worker side: runs workflows from apalis queues, keeps the process in
//! the fleet registry, reaps dead workers and drains on shutdown.

use crate::sql;
use std::collections::HashMap;
use std::future::Future;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apalis::prelude::{
    BackendExt, BoxDynError, Data, WorkerBuilder, WorkerBuilderExt, WorkerError,
};
use apalis_postgres::PostgresStorage;
use chrono::{DateTime, Utc};
use futures::FutureExt;
use futures::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use sqlx::postgres::PgConnectOptions;
use sqlx::{PgPool, Postgres, Transaction};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot, watch};
use tracing::Instrument;

use super::batch::StepBatches;
use super::config::{QueueConfig, RuntimeConfig};
use super::context::{Checkpoint, WorkflowContext, panic_message};
use super::crash_point::CrashCounter;
use super::fleet::{self, Registration};
use super::queue::{self, FetchWake, JOB_MAX_ATTEMPTS, JobWakeups, WorkflowJob, new_job_id};
use super::{RetryPolicy, WorkflowError, WorkflowKind};

/// A workflow definition: typed input, output and retry policy.
pub trait Workflow: Send + Sync + 'static {
    /// The input given to [`Engine::start`](super::Engine::start).
    type Input: DeserializeOwned + Send;
    /// Stored in `workflows.output` on success.
    type Output: Serialize + Send;

    /// Its kind and queue.
    fn kind(&self) -> WorkflowKind;

    /// The retry policy of its steps (each step may override it).
    fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy::default()
    }

    /// The workflow function. It must be deterministic apart from its steps:
    /// every execution replays it from the top.
    fn run<'a>(
        &'a self,
        ctx: &'a mut WorkflowContext,
        input: Self::Input,
    ) -> impl Future<Output = Result<Self::Output, WorkflowError>> + Send + 'a;
}

trait ErasedWorkflow: Send + Sync {
    fn kind(&self) -> WorkflowKind;
    fn retry_policy(&self) -> RetryPolicy;
    fn run_json<'a>(
        &'a self,
        ctx: &'a mut WorkflowContext,
        input: Value,
    ) -> BoxFuture<'a, Result<Value, WorkflowError>>;
}

impl<W: Workflow> ErasedWorkflow for W {
    fn kind(&self) -> WorkflowKind {
        Workflow::kind(self)
    }
    fn retry_policy(&self) -> RetryPolicy {
        Workflow::retry_policy(self)
    }
    fn run_json<'a>(
        &'a self,
        ctx: &'a mut WorkflowContext,
        input: Value,
    ) -> BoxFuture<'a, Result<Value, WorkflowError>> {
        async move {
            let input = serde_json::from_value(input)
                .map_err(|e| WorkflowError::fatal(format!("input does not decode: {e}")))?;
            let output = self.run(ctx, input).await?;
            Ok(serde_json::to_value(output)?)
        }
        .boxed()
    }
}

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

/// A claimed workflow: what its execution needs.
#[derive(sqlx::FromRow)]
struct Claim {
    workflow_id: String,
    kind: String,
    queue: String,
    input: Value,
    previous_status: String,
    previous_owner: Option<String>,
    cancel_requested: bool,
    executions: i32,
    checkpoints: Value,
    /// When the workflow was started: a sleep before its first step counts
    /// from then.
    created_at: DateTime<Utc>,
}

/// Lets a step statement that starts a workflow
/// ([`StepStatement::start`](super::StepStatement::start)) run it in this
/// process, claimed by the start itself: no job, no notification, no claim
/// of its own. Only for a kind registered here, on a queue this process
/// consumes with a free slot, while it is not draining; otherwise the start
/// enqueues a job as usual.
#[derive(Clone)]
pub(crate) struct StartHere {
    runtime: Runtime,
}

impl StartHere {
    /// A slot of `kind`'s queue for a workflow to be started here, or
    /// `None` when it must go through the queue.
    pub(crate) fn reserve(&self, kind: WorkflowKind) -> Option<OwnedSemaphorePermit> {
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

    /// Executes a workflow a step statement has just started (committed)
    /// here, in the slot [`StartHere::reserve`] gave.
    pub(crate) fn execute(
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
fn spawn_in_slot<F>(permit: OwnedSemaphorePermit, execution: impl FnOnce(oneshot::Sender<()>) -> F)
where
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

/// The worker-side engine of one process.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    connect: PgConnectOptions,
    worker_id: Arc<str>,
    lock_key: i64,
    workflows: HashMap<&'static str, Arc<dyn ErasedWorkflow>>,
    /// Executions running in this process, each with a sender dropped when
    /// it ends.
    in_flight: Mutex<HashMap<String, watch::Sender<()>>>,
    in_flight_count: Arc<AtomicUsize>,
    /// The queues this process consumes, by name.
    queues: HashMap<String, QueueSlots>,
    /// The other live workers, with their queues, as the last reap saw
    /// them: a notified job is taken by one worker of its queue, chosen by
    /// [`Inner::takes_notified`].
    peers: Mutex<Vec<(String, Vec<String>)>>,
    drain: watch::Sender<bool>,
    config: RuntimeConfig,
    /// Batches the executions' `for_each` step statements.
    batches: StepBatches,
}

/// One queue's executions in this process: at most its concurrency hold a
/// slot at once, whether apalis fetched their job or a notification named it.
#[derive(Clone)]
struct QueueSlots {
    slots: Arc<Semaphore>,
    /// Asks the queue's apalis worker to fetch.
    fetch: FetchWake,
}

impl Runtime {
    /// A runtime on `pool`; `connect` opens its registry connection.
    pub fn new(pool: PgPool, connect: PgConnectOptions, mut config: RuntimeConfig) -> Self {
        if let Some(point) = &config.crash_at {
            if cfg!(debug_assertions) {
                tracing::warn!(crash_point = %point, "test crash point armed: this worker dies there");
            } else {
                tracing::warn!(crash_point = %point, "crash points are for test builds: ignored");
                config.crash_at = None;
            }
        }
        let host = hostname();
        let suffix: u32 = rand::random();
        let worker_id = format!("{host}-{}-{suffix:08x}", std::process::id());
        let (drain, _) = watch::channel(false);
        let worker_id: Arc<str> = Arc::from(worker_id);
        Self {
            inner: Arc::new(Inner {
                batches: StepBatches::new(pool.clone(), worker_id.clone()),
                pool,
                connect,
                worker_id,
                lock_key: rand::random::<i64>(),
                workflows: HashMap::new(),
                in_flight: Mutex::new(HashMap::new()),
                in_flight_count: Arc::new(AtomicUsize::new(0)),
                queues: config
                    .queues
                    .iter()
                    .map(|q| {
                        let slots = QueueSlots {
                            slots: Arc::new(Semaphore::new(q.concurrency.max(1))),
                            fetch: FetchWake::default(),
                        };
                        (q.name.clone(), slots)
                    })
                    .collect(),
                peers: Mutex::new(Vec::new()),
                drain,
                config,
            }),
        }
    }

    /// Adds a workflow definition. Call before [`Runtime::run`].
    pub fn register<W: Workflow>(mut self, workflow: W) -> Self {
        let inner = Arc::get_mut(&mut self.inner).expect("register workflows before running");
        inner
            .workflows
            .insert(workflow.kind().name, Arc::new(workflow));
        self
    }

    /// This process's worker id (unique per process start).
    pub fn worker_id(&self) -> &str {
        &self.inner.worker_id
    }

    /// Runs until `shutdown` completes, then drains: stops claiming, lets
    /// running steps finish (up to the drain timeout), hands unfinished
    /// workflows back to the queue and leaves the registry.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
        let inner = self.inner.clone();
        let (stop_membership, stop_rx) = watch::channel(false);
        let (registered_tx, registered_rx) = oneshot::channel();
        let registration = Registration {
            worker_id: inner.worker_id.clone(),
            lock_key: inner.lock_key,
            host: hostname(),
            queues: inner.config.queues.iter().map(|q| q.name.clone()).collect(),
            heartbeat: inner.config.heartbeat,
        };
        let membership = tokio::spawn(fleet::hold_membership(
            inner.connect.clone(),
            registration,
            inner.in_flight_count.clone(),
            inner.drain.subscribe(),
            stop_rx.clone(),
            registered_tx,
        ));
        tokio::pin!(shutdown);
        tokio::select! {
            _ = registered_rx => {}
            _ = &mut shutdown => {
                let _ = stop_membership.send(true);
                return Ok(());
            }
        }
        let background = [
            tokio::spawn(reap_loop(inner.clone(), stop_rx.clone())),
            tokio::spawn(prune_loop(inner.clone(), stop_rx.clone())),
            tokio::spawn(job_notice_loop(inner.clone())),
        ];
        let queues: Vec<_> = inner
            .config
            .queues
            .iter()
            .map(|queue| tokio::spawn(run_queue(inner.clone(), queue.clone())))
            .collect();
        tracing::info!(
            worker_id = %inner.worker_id,
            queues = ?inner.config.queues.iter().map(|q| (&q.name, q.concurrency)).collect::<Vec<_>>(),
            "worker started"
        );

        shutdown.await;
        tracing::info!(worker_id = %inner.worker_id, "draining: no new claims; running steps finish");
        let _ = inner.drain.send(true);
        let drained = tokio::time::timeout(inner.config.drain_timeout, async {
            for queue in queues {
                let _ = queue.await;
            }
            while inner.in_flight_count.load(Ordering::Relaxed) > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                in_flight = inner.in_flight_count.load(Ordering::Relaxed),
                "drain timeout: leaving with steps still running; their workflows replay elsewhere"
            );
        }
        // Stop the heartbeat first: it would otherwise re-register us.
        let _ = stop_membership.send(true);
        let _ = membership.await;
        match fleet::leave(&inner.pool, &inner.worker_id).await {
            Ok(released) => tracing::info!(released, "left the fleet; unfinished jobs handed back"),
            Err(e) => {
                tracing::warn!(error = %e, "could not leave cleanly; the reaper will hand our jobs back")
            }
        }
        for task in background {
            task.abort();
        }
        Ok(())
    }

    /// Executes (or resumes) one workflow to its next park or its end.
    /// The queue handler calls this; tests call it to force races.
    pub async fn execute(&self, workflow_id: &str) -> ExecutionOutcome {
        self.execute_in_slot(workflow_id, None, None).await
    }

    /// [`Runtime::execute`] for a queue job: `slot` fires when the execution
    /// gives its queue slot back (an in-process sleep); dropping it unfired
    /// means the execution is over. With `job_id`, the claim also takes that
    /// job if it is still waiting in the queue.
    async fn execute_in_slot(
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
    async fn execute_job(
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
    /// statement, or by the step statement that started it here
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
            // Finished already (a late or duplicate job), or no such
            // workflow. A job this took is done.
            return Ok(Some(ExecutionOutcome::Skipped));
        };
        Box::pin(self.run_claimed(claim, slot, batch)).await
    }

    /// Runs a claimed workflow and settles how the execution ended.
    async fn run_claimed(
        &self,
        claim: Claim,
        slot: &mut Option<oneshot::Sender<()>>,
        batch: bool,
    ) -> Result<Option<ExecutionOutcome>, sqlx::Error> {
        let inner = &self.inner;
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
        if execution > inner.config.max_executions {
            let error = format!(
                "started {} times without finishing (crash loop?)",
                execution - 1
            );
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
            checkpoints: checkpoints.into(),
            next_seq: 0,
            retry: definition.retry_policy(),
            hold_threshold: inner.config.hold_threshold,
            draining: inner.drain.subscribe(),
            execution,
            slot: slot.take(),
            replayed_until: created_at,
            running: false,
            resumed_after: None,
            open: None,
            batch,
            cancel_requested,
            finished: false,
            here: StartHere {
                runtime: self.clone(),
            },
            batches: inner.batches.clone(),
            crash: CrashCounter::new(inner.config.crash_at.clone()),
        };
        let span = tracing::info_span!("workflow", workflow_id, kind = %kind, execution, worker_id = %inner.worker_id);
        let result = AssertUnwindSafe(definition.run_json(&mut ctx, input))
            .catch_unwind()
            .instrument(span.clone())
            .await;
        // Still held (no in-process sleep happened): keep it until settled.
        *slot = ctx.slot.take();
        let open = ctx.open.take();
        let finished = ctx.finished;
        // Never hold `span.enter()` across an await: the task may resume on
        // another thread, which corrupts the span registry (it panicked here).
        Box::pin(
            self.settle(workflow_id, &queue, result, open, finished)
                .instrument(span),
        )
        .await
    }

    /// Records how an execution ended, in the transaction still open from
    /// its last steps when there is one. `None`: replay without batching.
    /// `finished`: the last step ended the workflow already.
    async fn settle(
        &self,
        workflow_id: &str,
        queue: &str,
        result: Result<Result<Value, WorkflowError>, Box<dyn std::any::Any + Send>>,
        open: Option<Transaction<'static, Postgres>>,
        finished: bool,
    ) -> Result<Option<ExecutionOutcome>, sqlx::Error> {
        let inner = &self.inner;
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
            Ok(Err(WorkflowError::Parked)) => ExecutionOutcome::Parked,
            Ok(Err(WorkflowError::Fenced { step, name })) => {
                tracing::info!(
                    step, step_name = %name,
                    "fenced: another execution checkpointed this step first; this execution stops"
                );
                ExecutionOutcome::Fenced
            }
            Ok(Err(WorkflowError::Cancelled)) => {
                self.finish(open, workflow_id, "cancelled", None, None, 0)
                    .await?;
                tracing::info!("workflow cancelled at a step boundary");
                ExecutionOutcome::Cancelled
            }
            Ok(Err(WorkflowError::Draining)) => {
                let mut tx = match open {
                    Some(tx) => tx,
                    None => inner.pool.begin().await?,
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
            Ok(Err(WorkflowError::Unavailable(e))) => return Err(e),
            Ok(Err(WorkflowError::RetryUnbatched)) => return Ok(None),
            // A failure with steps still uncommitted: whatever failed may
            // have aborted their transaction, so replay them one by one and
            // fail (or not) with them committed.
            Ok(Err(_)) | Err(_) if open.is_some() => return Ok(None),
            Ok(Err(WorkflowError::Failed { error, attempts })) => {
                self.finish(None, workflow_id, "failed", None, Some(&error), attempts)
                    .await?;
                tracing::error!(%error, "workflow failed");
                ExecutionOutcome::Failed
            }
            Ok(Err(e @ WorkflowError::Nondeterministic { .. })) => {
                let error = e.to_string();
                self.finish(None, workflow_id, "failed", None, Some(&error), 0)
                    .await?;
                tracing::error!(%error, "workflow failed: code and checkpoints disagree");
                ExecutionOutcome::Failed
            }
            Err(panic) => {
                let error = format!(
                    "workflow panicked outside a step: {}",
                    panic_message(&*panic)
                );
                self.finish(None, workflow_id, "failed", None, Some(&error), 1)
                    .await?;
                tracing::error!(%error, "workflow failed");
                ExecutionOutcome::Failed
            }
        };
        Ok(Some(outcome))
    }

    /// Records a terminal status, in `open` (then committed) or on its own.
    async fn finish(
        &self,
        open: Option<Transaction<'static, Postgres>>,
        workflow_id: &str,
        status: &str,
        output: Option<&Value>,
        error: Option<&str>,
        attempts: i32,
    ) -> Result<(), sqlx::Error> {
        let finish = sqlx::query(sql::FINISH)
            .bind(workflow_id)
            .bind(status)
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

/// Runs the job's workflow on a task of its own once the queue has a free
/// slot, and returns (acking the job) when the execution ends or gives the
/// slot back for an in-process sleep. An execution that outlives its job is
/// recovered through `workflows.owner` should this process die.
async fn handle_job(job: WorkflowJob, queue: Data<FetchedJobs>) -> Result<(), BoxDynError> {
    let permit = queue.slots.slots.clone().acquire_owned().await?;
    let runtime = Runtime {
        inner: queue.inner.clone(),
    };
    let (slot, released) = oneshot::channel();
    tokio::spawn(async move {
        runtime
            .execute_in_slot(&job.workflow_id, None, Some(slot))
            .await
    });
    // Fired, or dropped when the execution ended: either way, done here.
    let _ = released.await;
    drop(permit);
    Ok(())
}

/// What a queue's apalis handler needs.
#[derive(Clone)]
struct FetchedJobs {
    inner: Arc<Inner>,
    slots: QueueSlots,
}

/// Runs each job notified due on a queue of this process at once, when
/// this worker is the one chosen for it and the queue has a free slot: the
/// notification names the job, so one statement takes it and claims its
/// workflow, without apalis' fetch (its own transaction, and the dispatch
/// to a handler, a large part of a 1-client checkout). A queue without a
/// free slot asks apalis to fetch instead, and its handler waits for a
/// slot. Jobs nobody takes from their notification (the chosen worker has
/// just died) are fetched at the next poll.
async fn job_notice_loop(inner: Arc<Inner>) {
    let stop = inner.drain.subscribe();
    let notices = inner.clone();
    queue::listen_for_jobs(inner.pool.clone(), stop, move |notice| {
        let inner = &notices;
        let Some(job) = notice else {
            // Notices may have been missed: every queue looks for work.
            for queue in inner.queues.values() {
                queue.fetch.wake();
            }
            return;
        };
        let Some(queue) = inner.queues.get(&job.job_type) else {
            return;
        };
        if *inner.drain.borrow() || !inner.takes_notified(&job.job_type, &job.id) {
            return;
        }
        let Ok(permit) = queue.slots.clone().try_acquire_owned() else {
            queue.fetch.wake();
            return;
        };
        let runtime = Runtime {
            inner: inner.clone(),
        };
        spawn_in_slot(permit, move |slot| async move {
            runtime.execute_job(&job.id, Some(slot)).await
        });
    })
    .await;
}

/// Runs the apalis worker of one queue, restarting it (under a new name, so
/// its registration never collides with the old one) if it dies, for
/// example when the database restarts.
async fn run_queue(inner: Arc<Inner>, queue: QueueConfig) {
    let slots = inner.queues[&queue.name].clone();
    let mut drain = inner.drain.subscribe();
    let mut generation = 0u32;
    loop {
        if *drain.borrow() {
            return;
        }
        generation += 1;
        let name = format!("{}/{}/{}", inner.worker_id, queue.name, generation);
        if generation > 1 {
            // Jobs claimed by our earlier incarnation but never acked.
            let released = async {
                let mut conn = inner.pool.acquire().await?;
                queue::release_jobs(
                    &mut conn,
                    &[inner.worker_id.to_string()],
                    Some((&queue.name, &name)),
                )
                .await
            }
            .await;
            if let Err(e) = released {
                tracing::warn!(error = %e, queue = %queue.name, "cannot release earlier jobs yet");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        }
        let config = apalis_postgres::Config::default()
            .queue(&queue.name)
            .batch_size(queue.concurrency.max(1))
            .heartbeat_interval(Duration::from_secs(5))
            .missed_heartbeats(6)
            // No separate 'Running' update per job: a fetched job stays
            // 'Queued' under our lock_by until acked, which the reaper and
            // apalis' orphan recovery both hand back. One transaction fewer.
            .lock_tasks(false);
        let backend = PostgresStorage::<WorkflowJob>::new(&inner.pool)
            .with_config(config)
            .poll_with_strategy(JobWakeups::new(
                slots.fetch.clone(),
                inner.config.poll_interval,
            ));
        let worker = WorkerBuilder::new(name.as_str())
            .backend(backend)
            .data(FetchedJobs {
                inner: inner.clone(),
                slots: slots.clone(),
            })
            .concurrency(queue.concurrency.max(1))
            .build(handle_job);
        let mut stop = drain.clone();
        let signal = async move {
            let _ = super::until_true(&mut stop).await;
            Ok::<(), WorkerError>(())
        };
        // A panic anywhere in the apalis worker must not silently end this
        // queue's consumption while the process still looks alive: catch it
        // and start a new generation.
        let ran = AssertUnwindSafe(worker.run_until(signal))
            .catch_unwind()
            .await;
        match ran {
            Ok(Ok(())) if *drain.borrow() => return,
            Ok(Ok(())) => tracing::warn!(queue = %queue.name, "queue worker stopped; restarting"),
            Err(panic) => tracing::error!(
                queue = %queue.name,
                panic = %panic_message(&*panic),
                "queue worker panicked; restarting"
            ),
            Ok(Err(e)) => {
                tracing::warn!(queue = %queue.name, error = %e, "queue worker failed; restarting")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = super::until_true(&mut drain) => return,
        }
    }
}

/// How often a worker looks for running workflows it owns but lost (see
/// [`fleet::release_lost`]), and how old their claim must be.
const LOST_CHECK: Duration = Duration::from_secs(10);

async fn reap_loop(inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    let mut next_lost_check = tokio::time::Instant::now() + LOST_CHECK;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(inner.config.reap_interval) => {}
            _ = super::until_true(&mut stop) => return,
        }
        if *inner.drain.borrow() {
            continue;
        }
        match fleet::reap(&inner.pool, &inner.worker_id, inner.config.stale_after).await {
            Ok(reaped) => *inner.peers.lock().expect("peers") = reaped.live,
            Err(e) => tracing::debug!(error = %e, "reap failed"),
        }
        if tokio::time::Instant::now() < next_lost_check {
            continue;
        }
        next_lost_check = tokio::time::Instant::now() + LOST_CHECK;
        let executing = |id: &str| {
            inner
                .in_flight
                .lock()
                .expect("in-flight set")
                .contains_key(id)
        };
        match fleet::release_lost(&inner.pool, &inner.worker_id, executing, LOST_CHECK).await {
            Ok(lost) if lost.is_empty() => {}
            Ok(lost) => tracing::warn!(
                ?lost,
                "running workflows owned here but not executing (a commit whose answer was lost): handed back to the queue"
            ),
            Err(e) => tracing::debug!(error = %e, "lost-workflow check failed"),
        }
    }
}

impl Inner {
    /// Whether this worker is the one to take the notified job `job_id` of
    /// `queue`: of the live workers consuming the queue, the one whose id
    /// hashed with the job's id scores highest (rendezvous hashing). Each
    /// job then costs one attempt instead of one per worker; when every
    /// worker tried, the losers' attempts cost more than they saved at 32
    /// clients. A worker that died since the last reap may still be
    /// chosen: its jobs then wait for a fetch (the poll interval).
    fn takes_notified(&self, queue: &str, job_id: &str) -> bool {
        let score = |worker_id: &str| {
            let mut hasher = DefaultHasher::new();
            (worker_id, job_id).hash(&mut hasher);
            hasher.finish()
        };
        let mine = score(&self.worker_id);
        let peers = self.peers.lock().expect("peers");
        !peers
            .iter()
            .any(|(id, queues)| queues.iter().any(|q| q == queue) && score(id) > mine)
    }
}

async fn prune_loop(inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    let period =
        (inner.config.prune_after / 4).clamp(Duration::from_secs(1), Duration::from_secs(30));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = super::until_true(&mut stop) => return,
        }
        match queue::prune_jobs(&inner.pool, inner.config.prune_after).await {
            Ok(0) => {}
            Ok(pruned) => tracing::debug!(pruned, "pruned finished jobs"),
            Err(e) => tracing::debug!(error = %e, "prune failed"),
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".to_owned())
}
