//! The worker side: runs workflows from apalis queues, keeps the process in
//! the fleet registry, reaps dead workers and drains on shutdown.

mod consumer;
mod ending;
mod execution;
mod maintenance;

use crate::sql;
use consumer::{job_notice_loop, run_queue};
use ending::ExecutionResult;
pub use ending::{ENDING_STEP, EndReason, Ending};
pub use execution::ExecutionOutcome;
use execution::spawn_in_slot;
use maintenance::{prune_loop, reap_loop, retention_loop};

use std::collections::HashMap;
use std::future::Future;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use apalis::prelude::{
    BackendExt, BoxDynError, Data, WorkerBuilder, WorkerBuilderExt, WorkerError,
};
use apalis_postgres::PostgresStorage;
use chrono::{DateTime, Utc};
use futures::FutureExt;
use futures::future::BoxFuture;
use serde::Deserialize;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use sqlx::postgres::PgConnectOptions;
use sqlx::{PgPool, Postgres, Transaction};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot, watch};
use tracing::Instrument;

use super::batch::StepBatches;
use super::config::{QueueConfig, RuntimeConfig};
use super::context::{Checkpoint, ReplayCursor, RunsHere, WorkflowContext, panic_message};
use super::crash_point::CrashCounter;
use super::fleet::{self, Registration};
use super::observer::{Observer, Unobserved};
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

    /// The id of the request that started this workflow, if its input
    /// carries one: every log line of its executions (each step's included)
    /// names it as `request_id`.
    fn request_id<'i>(&self, _input: &'i Self::Input) -> Option<&'i str> {
        None
    }

    /// The patches this code guards its changes with
    /// ([`WorkflowContext::patched`] refuses any other name). A kind with
    /// patches declares that this code replays histories of any version
    /// (those from before a patch take its old path), so its workers adopt
    /// workflows of other versions; a kind without runs only the workflows
    /// its own version started. The default: none.
    fn patches(&self) -> &'static [&'static str] {
        &[]
    }

    /// The workflow function. It must be deterministic apart from its steps:
    /// every execution replays it from the top.
    fn run<'a>(
        &'a self,
        ctx: &'a mut WorkflowContext,
        input: Self::Input,
    ) -> impl Future<Output = Result<Self::Output, WorkflowError>> + Send + 'a;

    /// The workflow's own end when it will not finish: cancelled (the
    /// cancel reaches it at its next step, or wakes it when parked), or
    /// failed for good (a step's retries spent, a panic, code that no
    /// longer matches its history). It runs after the workflow's last
    /// completed step, on any worker, with steps of its own, checkpointed
    /// and replayed after a crash like any others; `ending` says why and
    /// gives the outputs of the steps that completed, so it undoes what
    /// they did (the checkout cancels its order and returns its unit). The
    /// workflow then takes that status. Its steps must not end the workflow.
    /// The default does nothing.
    fn compensate<'a>(
        &'a self,
        ctx: &'a mut WorkflowContext,
        input: Self::Input,
        ending: &'a Ending,
    ) -> impl Future<Output = Result<(), WorkflowError>> + Send + 'a {
        let _ = (ctx, input, ending);
        async { Ok(()) }
    }
}

trait ErasedWorkflow: Send + Sync {
    fn kind(&self) -> WorkflowKind;
    fn retry_policy(&self) -> RetryPolicy;
    fn patches(&self) -> &'static [&'static str];
    fn run_json<'a>(
        &'a self,
        ctx: &'a mut WorkflowContext,
        input: &'a Value,
    ) -> BoxFuture<'a, Result<Value, WorkflowError>>;
    fn compensate_json<'a>(
        &'a self,
        ctx: &'a mut WorkflowContext,
        input: &'a Value,
        ending: &'a Ending,
    ) -> BoxFuture<'a, Result<Value, WorkflowError>>;
}

/// A workflow's input, decoded.
fn decode_input<W: Workflow>(input: &Value) -> Result<W::Input, WorkflowError> {
    W::Input::deserialize(input)
        .map_err(|e| WorkflowError::fatal(format!("input does not decode: {e}")))
}

impl<W: Workflow> ErasedWorkflow for W {
    fn kind(&self) -> WorkflowKind {
        Workflow::kind(self)
    }
    fn retry_policy(&self) -> RetryPolicy {
        Workflow::retry_policy(self)
    }
    fn patches(&self) -> &'static [&'static str] {
        Workflow::patches(self)
    }
    fn run_json<'a>(
        &'a self,
        ctx: &'a mut WorkflowContext,
        input: &'a Value,
    ) -> BoxFuture<'a, Result<Value, WorkflowError>> {
        async move {
            let input = decode_input::<W>(input)?;
            if let Some(request_id) = self.request_id(&input) {
                tracing::Span::current().record("request_id", request_id);
            }
            let output = self.run(ctx, input).await?;
            Ok(serde_json::to_value(output)?)
        }
        .boxed()
    }
    fn compensate_json<'a>(
        &'a self,
        ctx: &'a mut WorkflowContext,
        input: &'a Value,
        ending: &'a Ending,
    ) -> BoxFuture<'a, Result<Value, WorkflowError>> {
        async move {
            let input = decode_input::<W>(input)?;
            if let Some(request_id) = self.request_id(&input) {
                tracing::Span::current().record("request_id", request_id);
            }
            self.compensate(ctx, input, ending).await?;
            Ok(Value::Null)
        }
        .boxed()
    }
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
    /// The code version it runs ([`RuntimeConfig::app_version`]).
    version: Arc<str>,
    /// [`Inner::adopted_kinds`], once the workflows are registered.
    adopts: OnceLock<Vec<String>>,
    /// Bumped when the heartbeat finds this worker was silent past
    /// `stale_after` (see [`fleet::hold_membership`]): executions claimed
    /// before stop at their next step.
    lost: Arc<std::sync::atomic::AtomicU64>,
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
    /// Told of executions, steps and takeovers (metrics).
    observer: Arc<dyn Observer>,
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
        if let Some(revision) = &config.test_revision {
            if cfg!(debug_assertions) {
                tracing::warn!(test_revision = %revision, "test revision: this worker runs changed code");
            } else {
                tracing::warn!(test_revision = %revision, "test revisions are for test builds: ignored");
                config.test_revision = None;
            }
        }
        if let Some(point) = &config.crash_at {
            if cfg!(debug_assertions) {
                tracing::warn!(crash_point = %point, "test crash point armed: this worker dies there");
            } else {
                tracing::warn!(crash_point = %point, "crash points are for test builds: ignored");
                config.crash_at = None;
            }
        }
        // Random, naming neither host nor process: the public fleet view
        // shows it; the registry row and the start log line have both.
        let worker_id = format!("w-{:012x}", rand::random::<u64>() >> 16);
        let (drain, _) = watch::channel(false);
        let worker_id: Arc<str> = Arc::from(worker_id);
        let version = Arc::from(config.app_version.as_deref().unwrap_or(UNVERSIONED));
        Self {
            inner: Arc::new(Inner {
                batches: StepBatches::new(pool.clone(), worker_id.clone()),
                pool,
                connect,
                worker_id,
                version,
                adopts: OnceLock::new(),
                lost: Arc::new(std::sync::atomic::AtomicU64::new(0)),
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
                observer: Arc::new(Unobserved),
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

    /// Reports executions, steps and takeovers to `observer` (a worker's
    /// metrics). Call before [`Runtime::run`].
    pub fn observe(mut self, observer: Arc<dyn Observer>) -> Self {
        let inner = Arc::get_mut(&mut self.inner).expect("observe before running");
        inner.observer = observer;
        self
    }

    /// This process's worker id (unique per process start).
    pub fn worker_id(&self) -> &str {
        &self.inner.worker_id
    }

    /// The code version this worker runs.
    pub fn version(&self) -> &str {
        &self.inner.version
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
            version: inner.version.to_string(),
            adopts: inner.adopted_kinds().to_vec(),
            started_at: Utc::now(),
            heartbeat: inner.config.heartbeat,
            lost: inner.lost.clone(),
            stale_after: inner.config.stale_after,
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
            tokio::spawn(retention_loop(inner.clone(), stop_rx.clone())),
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
            host = hostname(),
            pid = std::process::id(),
            version = %inner.version,
            adopts = ?inner.adopted_kinds(),
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
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// The version of a worker given none ([`RuntimeConfig::app_version`]).
pub const UNVERSIONED: &str = "unversioned";

impl Inner {
    /// The patches its code declares for `kind`, a test revision's included.
    fn patches(&self, kind: &str) -> Vec<&'static str> {
        let declared = self
            .workflows
            .get(kind)
            .map_or(&[][..], |definition| definition.patches());
        let revised = self
            .config
            .test_revision
            .as_ref()
            .map_or(&[][..], |revision| revision.patches_of(kind));
        declared.iter().chain(revised).copied().collect()
    }

    /// The kinds whose histories of any version this worker runs: those
    /// whose code declares patches.
    fn adopted_kinds(&self) -> &[String] {
        self.adopts.get_or_init(|| {
            let mut kinds: Vec<String> = self
                .workflows
                .keys()
                .filter(|kind| !self.patches(kind).is_empty())
                .map(|kind| (*kind).to_owned())
                .collect();
            kinds.sort();
            kinds
        })
    }
}
