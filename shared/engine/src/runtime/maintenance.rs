//! What live workers do for the fleet: reap dead workers, hand back
//! workflows lost by a live one, prune finished jobs, delete finished
//! workflows past their retention.

use super::*;

/// How often a worker looks for running workflows it owns but lost (see
/// [`fleet::release_lost`]), and how old their claim must be.
const LOST_CHECK: Duration = Duration::from_secs(10);

pub(super) async fn reap_loop(inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    let mut next_lost_check = tokio::time::Instant::now() + LOST_CHECK;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(inner.config.reap_interval) => {}
            _ = crate::until_true(&mut stop) => return,
        }
        if *inner.drain.borrow() {
            continue;
        }
        match fleet::reap(&inner.pool, &inner.worker_id, inner.config.stale_after).await {
            Ok(reaped) => {
                if !reaped.dead.is_empty() {
                    inner
                        .observer
                        .workers_reaped(&reaped.silent_for, reaped.workflows);
                }
                *inner.peers.lock().expect("peers") = reaped.live;
            }
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

pub(super) async fn prune_loop(inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    let period =
        (inner.config.prune_after / 4).clamp(Duration::from_secs(1), Duration::from_secs(30));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = crate::until_true(&mut stop) => return,
        }
        match queue::prune_jobs(&inner.pool, inner.config.prune_after).await {
            Ok(0) => {}
            Ok(pruned) => tracing::debug!(pruned, "pruned finished jobs"),
            Err(e) => tracing::warn!(error = %e, "pruning finished queue jobs failed"),
        }
    }
}

/// Deletes finished workflows past their retention, every quarter of the
/// shortest retention (1 s to 1 min).
pub(super) async fn retention_loop(inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    let retention = inner.config.retention();
    let Some(shortest) = [retention.finished, retention.failed]
        .into_iter()
        .flatten()
        .min()
    else {
        return;
    };
    let period = (shortest / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = crate::until_true(&mut stop) => return,
        }
        match crate::retention::delete_expired(&inner.pool, retention).await {
            Ok(0) => {}
            Ok(deleted) => {
                tracing::debug!(deleted, "deleted finished workflows past their retention")
            }
            Err(e) => tracing::warn!(error = %e, "retention pass failed"),
        }
    }
}
