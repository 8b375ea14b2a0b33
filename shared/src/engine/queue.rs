//! The engine's use of apalis: one job type, written by the engine's own
//! statements, fetched and run by apalis' workers.

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
/// notification chose (migration 20261125000004 has the same figure).
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
