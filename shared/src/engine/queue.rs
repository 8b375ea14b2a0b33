//! The engine's use of apalis: one job type, enqueued inside the caller's
//! transaction.

use apalis::prelude::TaskBuilder;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;

/// The only job the engine enqueues: "run (or resume) this workflow".
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkflowJob {
    /// The workflow to run.
    pub workflow_id: String,
}

/// apalis' own attempt limit for a job. The engine handles step retries
/// itself and its jobs always succeed, so this only bounds a job whose
/// worker keeps dying while holding it.
pub const JOB_MAX_ATTEMPTS: usize = 1000;

/// Channel apalis' insert trigger notifies on; the reaper notifies it too
/// when it re-enqueues a dead worker's jobs, so idle workers wake at once.
pub const JOB_INSERT_CHANNEL: &str = "apalis::job::insert";

/// Enqueues a run of `workflow_id` on `queue`, due now or at `run_at`, in
/// the caller's transaction.
pub async fn enqueue(
    conn: &mut PgConnection,
    queue: &str,
    workflow_id: &str,
    run_at: Option<DateTime<Utc>>,
) -> Result<(), apalis_postgres::Error> {
    let job = WorkflowJob {
        workflow_id: workflow_id.to_owned(),
    };
    let bytes = serde_json::to_vec(&job).expect("a struct of one string always serialises");
    let mut task = TaskBuilder::new(bytes).max_attempts(JOB_MAX_ATTEMPTS);
    if let Some(at) = run_at {
        // apalis stores run_at in whole seconds and runs a job once
        // run_at < now(): round up so the job never runs before `at`.
        let seconds = at.timestamp() + i64::from(at.timestamp_subsec_nanos() > 0);
        task = task.run_at_timestamp(seconds.max(0) as u64);
    }
    apalis_postgres::queries::push_tasks(conn, queue, vec![task.build()]).await
}

/// A queue error as the database error it is (or a protocol error).
pub(crate) fn queue_error(error: apalis_postgres::Error) -> sqlx::Error {
    match error {
        apalis_postgres::Error::Database(e) => e,
        other => sqlx::Error::Protocol(format!("queue: {other}")),
    }
}
