//! Everything the engine does with apalis-postgres' queue, and the only
//! Rust code that names the `apalis` schema: the job type, notifications
//! of due jobs, the claim that takes a job with its workflow, releasing the
//! jobs of a dead or leaving worker, and the janitor that prunes finished
//! jobs. The engine's SQL functions that insert jobs, and its replacement
//! of `apalis.get_jobs`, are in the engine's migration; a test
//! (`tests/tests/queue_contract.rs`) fails if an apalis-postgres upgrade
//! changes what they rely on.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use apalis::prelude::{PollSnapshot, PollStrategy};
use futures::task::AtomicWaker;
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgListener;
use sqlx::{PgConnection, PgPool};
use tokio::sync::watch;
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
// job_id, run_at, priority, max_attempts)` (the engine's migration), called
// inside the statement that needs the job: a workflow's start and its park
// each write their job in one statement with the rest, in one round trip.

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
        "SELECT engine.workflow_enqueue($1, w.id, w.job_id, NULL, $4, $5)
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

/// A job made due now, as notified on [`JOB_INSERT_CHANNEL`] by apalis'
/// insert trigger and by the engine's own wake-ups.
#[derive(Debug, Deserialize)]
pub(crate) struct JobDue {
    /// The queue.
    pub(crate) job_type: String,
    /// The job's id.
    pub(crate) id: String,
}

/// Listens on [`JOB_INSERT_CHANNEL`] for the whole process (one connection,
/// whatever the number of queues), reconnecting by itself, until `stop`
/// turns true. `on_notice` gets each job made due, and `None` whenever
/// notices may have been missed (the listener (re)connected): every queue
/// should then look for work.
pub(crate) async fn listen_for_jobs(
    pool: PgPool,
    mut stop: watch::Receiver<bool>,
    mut on_notice: impl FnMut(Option<JobDue>),
) {
    let mut delay = Duration::from_millis(100);
    loop {
        let connected = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(JOB_INSERT_CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener = tokio::select! {
            connected = connected => match connected {
                Ok(listener) => listener,
                Err(e) => {
                    tracing::warn!(error = %e, "job listener cannot connect; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = super::until_true(&mut stop) => return,
                    }
                    delay = (delay * 2).min(Duration::from_secs(2));
                    continue;
                }
            },
            _ = super::until_true(&mut stop) => return,
        };
        delay = Duration::from_millis(100);
        on_notice(None);
        loop {
            let received = tokio::select! {
                received = listener.try_recv() => received,
                _ = super::until_true(&mut stop) => return,
            };
            match received {
                Ok(Some(notification)) => {
                    if let Ok(job) = serde_json::from_str::<JobDue>(notification.payload()) {
                        on_notice(Some(job));
                    }
                }
                // Dropped; the next try_recv reconnects.
                Ok(None) => on_notice(None),
                Err(e) => {
                    tracing::warn!(error = %e, "job listener failed; reconnecting");
                    break;
                }
            }
        }
    }
}

/// Asks one queue's apalis worker to fetch, from outside its poll loop: the
/// job listener does when it cannot run a notified job itself.
#[derive(Clone, Default)]
pub(crate) struct FetchWake(Arc<FetchWakeState>);

#[derive(Default)]
struct FetchWakeState {
    asked: AtomicBool,
    waker: AtomicWaker,
}

impl FetchWake {
    /// Asks for a fetch.
    pub(crate) fn wake(&self) {
        self.0.asked.store(true, Ordering::Release);
        self.0.waker.wake();
    }

    /// Whether a fetch was asked for since the last call; registers `cx`
    /// to be woken by the next ask.
    fn take(&self, cx: &Context<'_>) -> bool {
        self.0.waker.register(cx.waker());
        self.0.asked.swap(false, Ordering::AcqRel)
    }
}

/// When a queue's apalis worker looks for jobs: when asked (a notified job
/// the process could not run at once), again once that job is past
/// [`NOTIFIED_JOB_GRACE`], and every poll interval (jobs scheduled for
/// later send no notification).
pub(crate) struct JobWakeups {
    asked: FetchWake,
    interval: Duration,
    next_poll: Pin<Box<Sleep>>,
    recheck: Option<Pin<Box<Sleep>>>,
}

/// How long apalis' fetch leaves a job due now to the worker its
/// notification chose (the engine's `apalis.get_jobs` has the same figure).
const NOTIFIED_JOB_GRACE: Duration = Duration::from_millis(100);

/// When the queue is read again after an ask: once the job asked for is
/// past its grace.
const RECHECK_AFTER: Duration = NOTIFIED_JOB_GRACE.saturating_add(Duration::from_millis(10));

impl JobWakeups {
    /// Wake-ups of a queue's worker: when `asked`, and every `interval`.
    pub(crate) fn new(asked: FetchWake, interval: Duration) -> Self {
        Self {
            asked,
            interval,
            next_poll: Box::pin(tokio::time::sleep(interval)),
            recheck: None,
        }
    }
}

impl Clone for JobWakeups {
    fn clone(&self) -> Self {
        Self::new(self.asked.clone(), self.interval)
    }
}

impl PollStrategy for JobWakeups {
    // Each timer polled here, and the ask, hold the worker's waker: when one
    // fires, apalis polls its backend, which fetches unless it already is.
    fn poll_drive(&mut self, cx: &mut Context<'_>, _: &PollSnapshot) -> Poll<Option<()>> {
        let mut woken = false;
        if self.asked.take(cx) {
            woken = true;
            // Not pushed back by later asks: under a stream of them the
            // recheck must still come.
            if self.recheck.is_none() {
                self.recheck = Some(Box::pin(tokio::time::sleep(RECHECK_AFTER)));
            }
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

/// Puts jobs held by the given worker processes back to Pending and wakes
/// idle workers (apalis' insert trigger does not fire for an update).
/// With `only_queue`, just that queue's jobs, except those of the apalis
/// worker name `except` (a restarted queue worker releasing its earlier
/// incarnations' jobs). Returns the workflow ids of the released jobs.
pub(crate) async fn release_jobs(
    conn: &mut PgConnection,
    worker_ids: &[String],
    only_queue: Option<(&str, &str)>,
) -> Result<HashSet<String>, sqlx::Error> {
    let (queue, except) = only_queue.unzip();
    // A job's payload is the JSON of a `WorkflowJob`.
    let moved: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "UPDATE apalis.jobs SET status = 'Pending', lock_by = NULL, lock_at = NULL, done_at = NULL
         WHERE status IN ('Queued', 'Running')
           AND split_part(lock_by, '/', 1) = ANY($1)
           AND ($2::text IS NULL OR job_type = $2)
           AND ($3::text IS NULL OR lock_by <> $3)
         RETURNING id, job_type, convert_from(job, 'UTF8')::json ->> 'workflow_id'",
    )
    .bind(worker_ids)
    .bind(queue)
    .bind(except)
    .fetch_all(&mut *conn)
    .await?;
    if !moved.is_empty() {
        let (ids, job_types): (Vec<&str>, Vec<&str>) = moved
            .iter()
            .map(|(id, job_type, _)| (id.as_str(), job_type.as_str()))
            .unzip();
        sqlx::query(
            "SELECT pg_notify($1, json_build_object('job_type', j.job_type, 'id', j.id)::text)
             FROM unnest($2::text[], $3::text[]) AS j(id, job_type)",
        )
        .bind(JOB_INSERT_CHANNEL)
        .bind(&ids)
        .bind(&job_types)
        .execute(&mut *conn)
        .await?;
    }
    Ok(moved
        .into_iter()
        .filter_map(|(_, _, workflow)| workflow)
        .collect())
}

/// Removes the apalis worker rows of these processes. Finished jobs still
/// reference their worker (a foreign key), so rows in use stay until the
/// janitor has pruned those jobs.
pub(crate) async fn forget_apalis_workers(
    conn: &mut PgConnection,
    worker_ids: &[String],
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "DELETE FROM apalis.workers w WHERE split_part(w.id, '/', 1) = ANY($1)
         AND NOT EXISTS (SELECT 1 FROM apalis.jobs j WHERE j.lock_by = w.id)",
    )
    .bind(worker_ids)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Advisory lock key of the queue janitor's VACUUM (one worker at a time).
const VACUUM_LOCK_KEY: i64 = 0x454E_4749_4E45_5641; // "ENGINEVA"

/// Deletes finished jobs older than `older_than` (apalis.jobs stays small,
/// so claiming stays fast however many jobs have run), then the apalis
/// worker rows of processes that left and hold no job any more, then
/// vacuums the queue table when it deleted anything. The explicit VACUUM
/// matters: a server may run with autovacuum off (this machine's does), and
/// each job leaves several dead row versions behind.
pub(crate) async fn prune_jobs(pool: &PgPool, older_than: Duration) -> Result<u64, sqlx::Error> {
    let pruned = prune_finished_jobs(pool, older_than).await?;
    sqlx::query(
        "DELETE FROM apalis.workers w
         WHERE NOT EXISTS (SELECT 1 FROM engine.workers k WHERE k.id = split_part(w.id, '/', 1))
           AND NOT EXISTS (SELECT 1 FROM apalis.jobs j WHERE j.lock_by = w.id)",
    )
    .execute(pool)
    .await?;
    if pruned > 0 {
        crate::retention::vacuum(pool, VACUUM_LOCK_KEY, "VACUUM (ANALYZE) apalis.jobs").await?;
    }
    Ok(pruned)
}

/// Jobs one pruning statement deletes at most: however long the janitor
/// was away (an outage, a fleet scaled to zero), each statement stays
/// short, far from the session's statement timeout.
const PRUNE_BATCH: i64 = 5_000;

async fn prune_finished_jobs(pool: &PgPool, older_than: Duration) -> Result<u64, sqlx::Error> {
    crate::retention::in_batches(PRUNE_BATCH, || async {
        Ok(sqlx::query(
            "DELETE FROM apalis.jobs WHERE id IN (
                 SELECT id FROM apalis.jobs
                 WHERE (status IN ('Done', 'Killed') OR (status = 'Failed' AND attempts >= max_attempts))
                   AND done_at < now() - make_interval(secs => $1)
                 LIMIT $2)",
        )
        .bind(older_than.as_secs_f64())
        .bind(PRUNE_BATCH)
        .execute(pool)
        .await?
        .rows_affected())
    })
    .await
}

/// Claims a workflow in one statement, its own transaction: locks its row,
/// marks it running (owner `$2`) unless it has finished, and returns what
/// the execution needs, its checkpoints included. The workflow is `$1`, or
/// the one of the job `$3`; with `$3`, the statement also takes that job
/// (marks it done) if it is due and no other worker holds it. A workflow
/// pinned to a version other than `$4` is not claimed, and its job is left
/// for a worker of its version, unless its kind is in `$5` (the kinds this
/// worker adopts) and `$4` is the fleet's current version (an older worker
/// never adopts a newer history); a workflow not pinned yet is claimed
/// only when `$4` is the fleet's current version (`engine.current_version()`,
/// the rule apalis' fetch applies too; with no live worker registered, any
/// version is), and pinned to `$4`. It commits
/// without waiting for its WAL flush (see `Runtime::claim`).
pub(crate) const CLAIM: &str = "WITH candidate AS (
                 SELECT id, convert_from(job, 'UTF8')::json ->> 'workflow_id' AS workflow_id
                 FROM apalis.jobs
                 WHERE id = $3 AND status = 'Pending' AND run_at <= now()
                 FOR UPDATE SKIP LOCKED),
             previous AS (
                 SELECT id, status, owner, orphaned_at,
                     status IN ('succeeded', 'failed', 'cancelled') AS finished,
                     CASE WHEN version IS NULL THEN coalesce(engine.current_version(), $4) = $4
                          ELSE version = $4 OR (kind = ANY ($5)
                              AND coalesce(engine.current_version(), $4) = $4) END AS runs_here
                 FROM engine.workflows
                 WHERE id = coalesce($1, (SELECT workflow_id FROM candidate))
                 FOR UPDATE),
             job AS (
                 UPDATE apalis.jobs j SET status = 'Done', attempts = j.attempts + 1,
                     lock_at = now(), done_at = now()
                 FROM candidate
                 WHERE j.id = candidate.id
                   AND coalesce((SELECT finished OR runs_here FROM previous), true))
             UPDATE engine.workflows w SET status = 'running', owner = $2, executions = w.executions + 1,
                 wait_topic = NULL, wait_until = NULL, orphaned_at = NULL, updated_at = now(),
                 version = coalesce(w.version, $4)
             FROM previous
             WHERE w.id = previous.id AND NOT previous.finished AND previous.runs_here
               AND ($1::text IS NOT NULL OR EXISTS (SELECT FROM candidate))
             RETURNING w.id AS workflow_id, w.kind, w.queue, w.input,
                 previous.status AS previous_status, previous.owner AS previous_owner,
                 w.cancel_requested, w.executions, w.ending, w.error, w.attempts,
                 previous.orphaned_at,
                 (SELECT coalesce(json_agg(json_build_object(
                          'step_seq', s.step_seq, 'name', s.name, 'output', s.output,
                          'finished_at', s.finished_at)
                          ORDER BY s.step_seq), '[]')
                  FROM engine.workflow_steps s WHERE s.workflow_id = w.id) AS checkpoints,
                 w.created_at,
                 set_config('synchronous_commit', 'off', true) AS commit_mode";

/// Jobs due now and not taken, per queue, and how long the oldest of them
/// has been due (seconds): what an operator scales workers on.
pub async fn ready_jobs(pool: &PgPool) -> Result<Vec<(String, i64, f64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT job_type, count(*), coalesce(extract(epoch FROM now() - min(run_at))::float8, 0)
         FROM apalis.jobs WHERE status = 'Pending' AND run_at <= now() GROUP BY job_type",
    )
    .fetch_all(pool)
    .await
}
