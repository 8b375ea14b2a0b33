//! The demo's crash button: the API asks a worker to abort on the spot
//! (`POST /crash_application`, `POST /workers/{id}/crash`), and a worker
//! started with chaos allowed obeys. A notification on a channel of the
//! store's carries the request; the engine knows nothing of it.

use std::time::Duration;

use rand::seq::IndexedRandom;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::watch;

/// Channel on which a worker is asked to crash.
const CRASH_CHANNEL: &str = "widget_worker_crash";

/// Asks a worker (a random live one when `worker_id` is `None`) to abort on
/// the spot. Returns the worker asked, or `None` when no such worker is live
/// (draining ones are not asked). Workers obey only when started with chaos
/// allowed.
pub async fn request_crash(
    pool: &PgPool,
    worker_id: Option<&str>,
) -> Result<Option<String>, sqlx::Error> {
    let live: Vec<String> = engine::fleet::list_workers(pool)
        .await?
        .into_iter()
        .filter(|worker| !worker.draining)
        .map(|worker| worker.id)
        .collect();
    let target = match worker_id {
        Some(id) => live.into_iter().find(|live| live == id),
        None => live.choose(&mut rand::rng()).cloned(),
    };
    if let Some(id) = &target {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CRASH_CHANNEL)
            .bind(id)
            .execute(pool)
            .await?;
    }
    Ok(target)
}

/// Obeys crash requests addressed to worker `worker_id` until `stop` turns
/// true: aborts the process on the spot, as a crash would.
pub async fn obey_crash_requests(pool: PgPool, worker_id: String, mut stop: watch::Receiver<bool>) {
    loop {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(listener) => listener,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        if listener.listen(CRASH_CHANNEL).await.is_err() {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        loop {
            tokio::select! {
                received = listener.try_recv() => match received {
                    Ok(Some(note)) if note.payload() == worker_id => {
                        tracing::error!(%worker_id, "crash requested: aborting now");
                        std::process::abort();
                    }
                    Ok(_) => {}
                    Err(_) => break,
                },
                _ = stop.wait_for(|stopped| *stopped) => return,
            }
        }
    }
}
