//! The engine's use of apalis: one job type, written by the engine's own
//! statements, fetched and run by apalis' workers.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use apalis::prelude::{PollSnapshot, PollStrategy};
use apalis_postgres::Pubsub;
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
pub const JOB_MAX_ATTEMPTS: i32 = 1000;

/// Channel apalis' insert trigger notifies on; the reaper notifies it too
/// when it re-enqueues a dead worker's jobs, so idle workers wake at once.
pub const JOB_INSERT_CHANNEL: &str = "apalis::job::insert";

// Jobs are written by the SQL function `workflow_enqueue(queue, workflow_id,
// job_id, run_at, priority, max_attempts)` (migration 20261125000003), called
// inside the statement that needs the job: a workflow's start and its park
// each write their job in one statement with the rest, a round trip fewer.

/// Enqueues a run, due now and ahead of other due jobs, of each of
/// `workflow_ids` on `queue`, in one statement: a takeover's workflows,
/// which were running when their worker died.
pub(crate) async fn enqueue_takeovers(
    conn: &mut PgConnection,
    queue: &str,
    workflow_ids: &[&str],
) -> Result<(), sqlx::Error> {
    let job_ids: Vec<String> = workflow_ids.iter().map(|_| new_job_id()).collect();
    sqlx::query(
        "SELECT workflow_enqueue($1, w.id, w.job_id, NULL, $4, $5)
         FROM unnest($2::text[], $3::text[]) AS w(id, job_id)",
    )
    .bind(queue)
    .bind(workflow_ids)
    .bind(&job_ids)
    .bind(TAKEOVER_PRIORITY)
    .bind(JOB_MAX_ATTEMPTS)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// apalis fetches higher priorities first; new work has 0.
const TAKEOVER_PRIORITY: i32 = 1;

/// A new job's id: a ULID, as apalis makes them.
pub(crate) fn new_job_id() -> String {
    Ulid::generate().to_string()
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
