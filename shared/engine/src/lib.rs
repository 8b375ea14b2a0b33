//! The durable workflow engine: checkpointed steps on apalis-postgres queues.
//!
//! It knows nothing of products or orders. A workflow is an async function
//! of a [`WorkflowContext`]; its identity is a string chosen by the caller
//! (for a checkout, the client's idempotency key). See `docs/engine.md` for
//! a guide with an example; in short:
//!
//! - [`Engine::start`] inserts the workflow row and enqueues its job in one
//!   statement. The same id again starts nothing new; the same id with
//!   another kind is [`EngineError::KindConflict`].
//! - A step is one of two kinds ([`step`]). [`WorkflowContext::db_step`]
//!   changes the database exactly once: its effect and its checkpoint
//!   commit together, whatever dies when; its body is one [`Statement`]
//!   (sent with its checkpoint as one statement, alone or batched with
//!   other workflows'), or a [`Transaction`] closure. [`WorkflowContext::effect`]
//!   is for effects outside the database: at least once, checkpointed after
//!   it succeeds, with a stable idempotency key ([`Effect`]).
//! - Every execution replays from the top; completed steps return their
//!   checkpoint. A checkpoint whose name differs from the code fails the
//!   workflow ([`WorkflowError::Nondeterministic`]).
//! - [`WorkflowContext::recv`] checkpoints its deadline and, with no
//!   message yet, parks: the job ends, no slot or connection is held;
//!   [`Engine::send`] (message and resume job in one statement) or a job
//!   scheduled at the deadline resumes it. [`WorkflowContext::sleep`] waits
//!   in-process up to a threshold, and beyond it checkpoints and parks.
//! - Fencing: the checkpoint's primary key `(workflow_id, step_seq)` lets only
//!   one execution commit a step; the other stops ([`WorkflowError::Fenced`]).
//! - Takeover: each worker process holds a session advisory lock for its whole
//!   life ([`Runtime`]); live workers reap a dead one's jobs the moment its
//!   lock is free.

mod batch;
mod client;
mod config;
mod context;
mod crash_point;
mod error;
mod events;
pub mod fleet;
mod observer;
mod operator;
mod queue;
mod retention;
mod runtime;
mod schema;
mod sql;
pub mod step;
mod test_revision;

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

pub use client::{Engine, EventSubscription, Message, SendOutcome};
pub use config::{QueueConfig, RuntimeConfig};
pub use context::WorkflowContext;
pub use crash_point::{CrashPoint, CrashWhen};
pub use error::{EngineError, StepError, WorkflowError, is_unavailable};
pub use events::EventListener;
pub use observer::Observer;
pub use operator::{
    CancelOutcome, Cursor, DeleteOutcome, EventRecord, MessageRecord, VersionInFlight,
    WorkflowFilter, WorkflowRecord, WorkflowSummary,
};
pub use queue::{JOB_INSERT_CHANNEL, WorkflowJob, ready_jobs};
pub use runtime::{
    ENDING_STEP, EndReason, Ending, ExecutionOutcome, Runtime, UNVERSIONED, Workflow,
};
pub use schema::{MigrateError, migrations_applied, migrator_applied, run_migrations};
pub use step::{Effect, Final, ForEach, Statement, Transaction};
pub use test_revision::{TEST_PATCH, TEST_REVISION_STEP, TestRevision};

/// A kind of workflow and the queue its jobs go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkflowKind {
    /// Stored in `workflows.kind`; the worker looks the code up by it.
    pub name: &'static str,
    /// The apalis queue (job_type) its jobs are enqueued on.
    pub queue: &'static str,
}

/// A workflow's lifecycle status (`workflows.status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkflowStatus {
    /// A job to run it is queued.
    Enqueued,
    /// A worker is executing it.
    Running,
    /// Parked in recv or sleep.
    Waiting,
    /// Finished with an output.
    Succeeded,
    /// Finished with an error (dead letter).
    Failed,
    /// Cancelled.
    Cancelled,
}

impl WorkflowStatus {
    /// The status as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkflowStatus::Enqueued => "enqueued",
            WorkflowStatus::Running => "running",
            WorkflowStatus::Waiting => "waiting",
            WorkflowStatus::Succeeded => "succeeded",
            WorkflowStatus::Failed => "failed",
            WorkflowStatus::Cancelled => "cancelled",
        }
    }

    /// Parses a stored status.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "enqueued" => WorkflowStatus::Enqueued,
            "running" => WorkflowStatus::Running,
            "waiting" => WorkflowStatus::Waiting,
            "succeeded" => WorkflowStatus::Succeeded,
            "failed" => WorkflowStatus::Failed,
            "cancelled" => WorkflowStatus::Cancelled,
            _ => return None,
        })
    }

    /// Terminal workflows are never resumed by the engine itself.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            WorkflowStatus::Succeeded | WorkflowStatus::Failed | WorkflowStatus::Cancelled
        )
    }
}

/// What [`Engine::start`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkflowHandle {
    /// The workflow id.
    pub id: String,
    /// Its kind.
    pub kind: String,
    /// True for the call that created it; false when it already existed.
    pub created: bool,
}

/// A workflow's row as an operator sees it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct WorkflowInfo {
    /// The id.
    pub id: String,
    /// The kind.
    pub kind: String,
    /// The status, as stored.
    pub status: String,
    /// The output once succeeded.
    pub output: Option<serde_json::Value>,
    /// The last error once failed.
    pub error: Option<String>,
    /// Attempts spent on the failing step.
    pub attempts: i32,
    /// Executions started.
    pub executions: i32,
    /// The worker running it now.
    pub owner: Option<String>,
    /// Created at.
    pub created_at: DateTime<Utc>,
    /// Last changed at.
    pub updated_at: DateTime<Utc>,
}

/// A completed step as recorded (for timelines).
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StepRecord {
    /// Position in the workflow, from 0.
    pub step_seq: i32,
    /// The step's name.
    pub name: String,
    /// What the step returned, as checkpointed.
    pub output: serde_json::Value,
    /// The worker that ran it.
    pub worker_id: Option<String>,
    /// When its execution began.
    pub started_at: DateTime<Utc>,
    /// When its checkpoint committed.
    pub finished_at: DateTime<Utc>,
}

/// Retry policy of a step: exponential backoff between attempts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included. 1 means no retry.
    pub max_attempts: u32,
    /// Wait before the second attempt.
    pub initial_backoff: Duration,
    /// Upper bound of the wait.
    pub max_backoff: Duration,
    /// Growth factor of the wait per attempt.
    pub multiplier: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            multiplier: 2.0,
        }
    }
}

impl RetryPolicy {
    /// The wait after failed attempt number `attempt` (1-based).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = self.multiplier.powi(attempt.saturating_sub(1) as i32);
        self.initial_backoff.mul_f64(factor).min(self.max_backoff)
    }
}

/// Resolves once the watched flag is true (or its sender is gone). Unlike
/// `wait_for`, holds no borrow across an await.
pub(crate) async fn until_true(flag: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = flag.wait_for(|value| *value).await;
}
