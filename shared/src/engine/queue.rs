//! The engine's use of apalis: one job type, enqueued inside the caller's
//! transaction.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use apalis::prelude::{PollSnapshot, PollStrategy, TaskBuilder, TaskId};
use apalis_postgres::Pubsub;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};
use tokio::time::Sleep;
use ulid::Ulid;

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
/// the caller's transaction. Returns the job's id.
pub async fn enqueue(
    conn: &mut PgConnection,
    queue: &str,
    workflow_id: &str,
    run_at: Option<DateTime<Utc>>,
) -> Result<String, apalis_postgres::Error> {
    let id = Ulid::generate();
    let mut task = job(workflow_id).task_id(TaskId::from_ulid(id));
    if let Some(at) = run_at {
        // apalis stores run_at in whole seconds and runs a job once
        // run_at < now(): round up so the job never runs before `at`.
        let seconds = at.timestamp() + i64::from(at.timestamp_subsec_nanos() > 0);
        task = task.run_at_timestamp(seconds.max(0) as u64);
    }
    apalis_postgres::queries::push_tasks(conn, queue, vec![task.build()]).await?;
    Ok(id.to_string())
}

/// Enqueues a run, due now and ahead of other due jobs, of each of
/// `workflow_ids` on `queue`, in one statement: a takeover's workflows,
/// which were running when their worker died.
pub(crate) async fn enqueue_takeovers(
    conn: &mut PgConnection,
    queue: &str,
    workflow_ids: &[&str],
) -> Result<(), apalis_postgres::Error> {
    let tasks = workflow_ids
        .iter()
        .map(|id| job(id).priority(TAKEOVER_PRIORITY).build())
        .collect();
    apalis_postgres::queries::push_tasks(conn, queue, tasks).await
}

/// apalis fetches higher priorities first; new work has 0.
const TAKEOVER_PRIORITY: usize = 1;

/// The job of a run of `workflow_id`.
fn job(workflow_id: &str) -> TaskBuilder<Vec<u8>> {
    let job = WorkflowJob {
        workflow_id: workflow_id.to_owned(),
    };
    let bytes = serde_json::to_vec(&job).expect("a struct of one string always serialises");
    TaskBuilder::new(bytes).max_attempts(JOB_MAX_ATTEMPTS)
}

/// Makes a parked workflow's scheduled job (`workflows.wait_job`) due now
/// and wakes the queue's workers, in the caller's transaction: a message
/// resumes the workflow with the job it already has instead of a new one
/// (which left the scheduled job to run, for nothing, at the deadline).
/// False when that job is no longer waiting: enqueue a new one then.
pub(crate) async fn make_due(conn: &mut PgConnection, job_id: &str) -> Result<bool, sqlx::Error> {
    let woken: Option<String> = sqlx::query_scalar(
        "WITH due AS (
             UPDATE apalis.jobs SET run_at = now() WHERE id = $1 AND status = 'Pending'
             RETURNING id, job_type)
         SELECT pg_notify($2, json_build_object('job_type', job_type, 'id', id)::text)::text
         FROM due",
    )
    .bind(job_id)
    .bind(JOB_INSERT_CHANNEL)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(woken.is_some())
}

/// A queue error as the database error it is (or a protocol error).
pub(crate) fn queue_error(error: apalis_postgres::Error) -> sqlx::Error {
    match error {
        apalis_postgres::Error::Database(e) => e,
        other => sqlx::Error::Protocol(format!("queue: {other}")),
    }
}

/// When a queue's apalis worker looks for jobs: on each insert
/// notification, again [`RECHECK_AFTER`] later, and every poll interval.
///
/// apalis forgets a notification that arrives while one of its fetches is
/// in flight: that fetch read the queue before the job committed and comes
/// back empty, and the job then waited for the next interval (up to 200 ms;
/// 6 % of sequential checkouts did). The recheck catches it in
/// milliseconds.
pub(crate) struct JobWakeups {
    inserts: Pubsub,
    interval: Duration,
    next_poll: Pin<Box<Sleep>>,
    recheck: Option<Pin<Box<Sleep>>>,
}

/// How long after a notification the queue is read once more.
const RECHECK_AFTER: Duration = Duration::from_millis(5);

impl JobWakeups {
    /// Wake-ups for `queue`'s worker: its insert notifications (on a
    /// listener connection of its own) and a poll every `interval`.
    pub(crate) fn new(pool: &PgPool, queue: &str, interval: Duration) -> Self {
        Self::with(Pubsub::new(pool.clone(), queue.to_owned()), interval)
    }

    fn with(inserts: Pubsub, interval: Duration) -> Self {
        Self {
            inserts,
            interval,
            next_poll: Box::pin(tokio::time::sleep(interval)),
            recheck: None,
        }
    }
}

impl Clone for JobWakeups {
    fn clone(&self) -> Self {
        Self::with(self.inserts.clone(), self.interval)
    }
}

impl PollStrategy for JobWakeups {
    // Each timer or stream polled here holds the worker's waker: when one
    // fires, apalis polls its backend, which fetches unless it already is.
    fn poll_drive(&mut self, cx: &mut Context<'_>, _: &PollSnapshot) -> Poll<Option<()>> {
        let mut woken = false;
        // Ends (Ready(None)) if its listener cannot connect: the interval
        // then serves alone until the worker restarts.
        while let Poll::Ready(Some(_)) = self.inserts.poll_next_unpin(cx) {
            woken = true;
            self.recheck = Some(Box::pin(tokio::time::sleep(RECHECK_AFTER)));
        }
        if let Some(recheck) = self.recheck.as_mut()
            && recheck.as_mut().poll(cx).is_ready()
        {
            self.recheck = None;
            woken = true;
        }
        if self.next_poll.as_mut().poll(cx).is_ready() {
            self.next_poll
                .as_mut()
                .reset(tokio::time::Instant::now() + self.interval);
            let _ = self.next_poll.as_mut().poll(cx);
            woken = true;
        }
        if woken {
            Poll::Ready(Some(()))
        } else {
            Poll::Pending
        }
    }
}
