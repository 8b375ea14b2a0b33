//! The fleet registry: each worker process is a row in `workers` while it
//! lives, and holds the session advisory lock `lock_key` on a connection of
//! its own. PostgreSQL releases that lock the instant the process's
//! connection dies (kill -9, power cut), so live workers see a dead one at
//! their next reap, without waiting for a heartbeat to go stale. Staleness
//! of `last_seen` remains the fallback for a hung or cut-off process.

use crate::sql;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::{oneshot, watch};

use super::queue::{self, enqueue_takeovers};

/// A live worker process as the registry shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WorkerInfo {
    /// Unique per process start: `w-` and 12 random hex digits.
    pub id: String,
    /// Host name.
    pub host: String,
    /// Process id.
    pub pid: i32,
    /// Queues it consumes.
    pub queues: Vec<String>,
    /// The code version it runs.
    pub version: Option<String>,
    /// The kinds whose workflows of other versions it runs (its code
    /// declares patches for them).
    pub adopts: Vec<String>,
    /// Process start.
    pub started_at: DateTime<Utc>,
    /// Last heartbeat.
    pub last_seen: DateTime<Utc>,
    /// Workflows it is executing now.
    pub in_flight: i32,
    /// True once it received SIGTERM.
    pub draining: bool,
}

/// The live workers, oldest first.
pub async fn list_workers(pool: &PgPool) -> Result<Vec<WorkerInfo>, sqlx::Error> {
    sqlx::query_as(sql::LIST_WORKERS).fetch_all(pool).await
}

/// What a worker registers.
#[derive(Debug, Clone)]
pub(crate) struct Registration {
    pub(crate) worker_id: Arc<str>,
    pub(crate) lock_key: i64,
    pub(crate) host: String,
    pub(crate) queues: Vec<String>,
    pub(crate) version: String,
    pub(crate) adopts: Vec<String>,
    /// When the process started: a re-registration after a reap keeps it,
    /// so the fleet's current version does not move back to this one.
    pub(crate) started_at: DateTime<Utc>,
    pub(crate) heartbeat: Duration,
    /// Bumped when this worker finds it was silent longer than
    /// `stale_after`: peers may have taken its workflows over, so its
    /// executions in flight stop at their next step.
    pub(crate) lost: Arc<AtomicU64>,
    pub(crate) stale_after: Duration,
}

/// Holds the worker's advisory lock and registry row until `stop` turns
/// true, reconnecting whenever the connection drops. `registered` fires the
/// first time both are in place.
pub(crate) async fn hold_membership(
    options: PgConnectOptions,
    me: Registration,
    in_flight: Arc<AtomicUsize>,
    draining: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
    registered: oneshot::Sender<()>,
) {
    let mut registered = Some(registered);
    let mut delay = Duration::from_millis(100);
    // When a heartbeat last went through: a longer silence than
    // `stale_after` (the process stopped, the network cut) means peers may
    // have reaped this worker.
    let mut last_beat = std::time::Instant::now();
    let silent_too_long = |last_beat: std::time::Instant| {
        let silent = last_beat.elapsed();
        if silent > me.stale_after {
            me.lost.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                silent = ?silent,
                "this worker was silent past WORKER_STALE_AFTER (stopped or cut off): its workflows may run elsewhere; its executions in flight stop"
            );
        }
    };
    loop {
        if *stop.borrow() {
            return;
        }
        let mut conn = match join(&options, &me).await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "cannot register in the fleet; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = super::until_true(&mut stop) => return,
                }
                delay = (delay * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        delay = Duration::from_millis(100);
        if let Some(tx) = registered.take() {
            let _ = tx.send(());
        }
        loop {
            tokio::select! {
                _ = tokio::time::sleep(me.heartbeat) => {}
                _ = super::until_true(&mut stop) => {
                    let _ = conn.close().await;
                    return;
                }
            }
            let is_draining = *draining.borrow();
            let beat = sqlx::query(sql::HEARTBEAT)
                .bind(&*me.worker_id)
                .bind(in_flight.load(Ordering::Relaxed) as i32)
                .bind(is_draining)
                .execute(&mut conn)
                .await;
            if beat.is_ok() {
                silent_too_long(last_beat);
                last_beat = std::time::Instant::now();
            }
            match beat {
                Ok(done) if done.rows_affected() == 1 => {}
                Ok(_) => {
                    // Reaped while alive (our lock connection dropped for a
                    // moment): register again. Fencing kept the duplicate
                    // executions of our workflows harmless.
                    tracing::warn!(worker_id = %me.worker_id, "registry row gone (reaped): executions in flight stop; registering again");
                    me.lost.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = upsert(&mut conn, &me).await {
                        tracing::warn!(error = %e, "re-registration failed");
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "fleet heartbeat failed; reconnecting");
                    break;
                }
            }
        }
    }
}

async fn join(options: &PgConnectOptions, me: &Registration) -> Result<PgConnection, sqlx::Error> {
    let mut conn = PgConnection::connect_with(options).await?;
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(me.lock_key)
        .execute(&mut conn)
        .await?;
    upsert(&mut conn, me).await?;
    Ok(conn)
}

async fn upsert(conn: &mut PgConnection, me: &Registration) -> Result<(), sqlx::Error> {
    sqlx::query(sql::REGISTER_WORKER)
        .bind(&*me.worker_id)
        .bind(&me.host)
        .bind(std::process::id() as i32)
        .bind(&me.queues)
        .bind(me.lock_key)
        .bind(&me.version)
        .bind(&me.adopts)
        .bind(me.started_at)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// What one reap saw of the other workers.
#[derive(Debug, Default)]
pub(crate) struct Reaped {
    /// The workers it found dead, and reaped.
    pub(crate) dead: Vec<String>,
    /// How long each had been silent (since its last heartbeat).
    pub(crate) silent_for: Vec<Duration>,
    /// Their workflows that went back to the queue.
    pub(crate) workflows: u64,
    /// The live ones not draining, with the queues they consume.
    pub(crate) live: Vec<(String, Vec<String>)>,
}

/// One reap: finds workers whose advisory lock is free (the process is gone)
/// or whose heartbeat is older than `stale_after` (hung), hands their jobs
/// back to the queue with a wake-up notification, and removes them.
pub(crate) async fn reap(
    pool: &PgPool,
    me: &str,
    stale_after: Duration,
) -> Result<Reaped, sqlx::Error> {
    let mut tx = pool.begin().await?;
    // A transaction-level try-lock on a dead worker's key succeeds (and
    // keeps concurrent reapers off it until we commit); on a live one it fails.
    let others: Vec<(String, Vec<String>, bool, bool, f64)> = sqlx::query_as(sql::PEERS)
        .bind(me)
        .bind(stale_after.as_secs_f64())
        .fetch_all(&mut *tx)
        .await?;
    let mut reaped = Reaped::default();
    for (id, queues, draining, dead, silent) in others {
        if dead {
            reaped.dead.push(id);
            reaped
                .silent_for
                .push(Duration::try_from_secs_f64(silent).unwrap_or_default());
        } else if !draining {
            reaped.live.push((id, queues));
        }
    }
    let dead = &reaped.dead;
    if dead.is_empty() {
        return Ok(reaped);
    }
    let moved = release_work(&mut tx, dead, true).await?;
    reaped.workflows = moved;
    queue::forget_apalis_workers(&mut tx, dead).await?;
    sqlx::query(sql::FORGET_WORKERS)
        .bind(dead)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    tracing::info!(reaped = ?dead, jobs_requeued = moved, "reaped dead workers");
    Ok(reaped)
}

/// Hands back to the queue everything the given worker processes (dead, or
/// leaving) hold: the jobs they fetched, and the running workflows they own
/// whose job is already acked (an execution gives its job back while it
/// sleeps in-process). Each such workflow gets one job, with a wake-up.
/// Returns how many workflows go back to the queue.
async fn release_work(
    conn: &mut PgConnection,
    worker_ids: &[String],
    died: bool,
) -> Result<u64, sqlx::Error> {
    let released = queue::release_jobs(conn, worker_ids, None).await?;
    let owned: Vec<(String, String)> = sqlx::query_as(sql::DISOWN_RUNNING)
        .bind(worker_ids)
        .bind(died)
        .fetch_all(&mut *conn)
        .await?;
    let without_job = owned
        .iter()
        .filter(|(workflow_id, _)| !released.contains(workflow_id));
    let moved = released.len() as u64 + requeue(conn, without_job).await?;
    // Not running (parked, finished): nothing to hand back, only the owner.
    sqlx::query(sql::DISOWN)
        .bind(worker_ids)
        .execute(&mut *conn)
        .await?;
    Ok(moved)
}

/// Gives each `(workflow id, queue)` a takeover job, one insert per queue
/// (a dead worker may own hundreds of sleepers). Returns how many.
async fn requeue<'a>(
    conn: &mut PgConnection,
    workflows: impl Iterator<Item = &'a (String, String)>,
) -> Result<u64, sqlx::Error> {
    let mut by_queue: HashMap<&str, Vec<&str>> = HashMap::new();
    for (workflow_id, queue) in workflows {
        by_queue.entry(queue).or_default().push(workflow_id);
    }
    let mut moved = 0;
    for (queue, workflow_ids) in by_queue {
        enqueue_takeovers(conn, queue, &workflow_ids).await?;
        moved += workflow_ids.len() as u64;
    }
    Ok(moved)
}

/// Hands back to the queue the running workflows this live process owns
/// but does not execute. A claim, or a start claimed by a step's statement
/// ([`Statement::start`](crate::Statement::start)), whose commit
/// went through while its answer was lost (the connection cut at that
/// moment) leaves its workflow `running` under an owner that is alive,
/// which the reaper never takes over. `executing` tells the workflows this
/// process executes now; `older_than` spares claims too recent to be in
/// it yet (a claim commits before its execution enters that set). Returns
/// the workflows handed back.
pub(crate) async fn release_lost(
    pool: &PgPool,
    me: &str,
    executing: impl Fn(&str) -> bool,
    older_than: Duration,
) -> Result<Vec<String>, sqlx::Error> {
    let owned: Vec<String> = sqlx::query_scalar(sql::OWNED_RUNNING)
        .bind(me)
        .bind(older_than.as_secs_f64())
        .fetch_all(pool)
        .await?;
    let lost: Vec<String> = owned.into_iter().filter(|id| !executing(id)).collect();
    if lost.is_empty() {
        return Ok(lost);
    }
    let mut tx = pool.begin().await?;
    // The same conditions again: an execution that began since claimed
    // the row anew (a later updated_at) or ended (no longer running).
    let released: Vec<(String, String)> = sqlx::query_as(sql::HAND_BACK_LOST)
        .bind(&lost)
        .bind(me)
        .bind(older_than.as_secs_f64())
        .fetch_all(&mut *tx)
        .await?;
    requeue(&mut tx, released.iter()).await?;
    tx.commit().await?;
    Ok(released.into_iter().map(|(id, _)| id).collect())
}

/// A clean exit: hands this worker's remaining jobs back and removes it
/// from the registry, so others take over at once.
pub(crate) async fn leave(pool: &PgPool, me: &str) -> Result<u64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let ids = [me.to_owned()];
    let moved = release_work(&mut tx, &ids, false).await?;
    queue::forget_apalis_workers(&mut tx, &ids).await?;
    sqlx::query(sql::DELETE_WORKER)
        .bind(me)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(moved)
}
