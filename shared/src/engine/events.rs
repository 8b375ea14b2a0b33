//! One LISTEN connection per process, fanned out to every waiter of
//! [`Engine::get_event`](super::Engine::get_event).

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::broadcast;

/// The channel `set_event` notifies on; the payload is `workflow_id`,
/// the unit separator (0x1f), then the event key.
pub const EVENTS_CHANNEL: &str = "workflow_events";

/// The payload sent to waiters when the listener reconnected: notifications
/// may have been missed, so every waiter re-reads the table.
const RESYNC: &str = "";

/// A process-wide LISTEN on [`EVENTS_CHANNEL`] that reconnects by itself.
#[derive(Clone, Debug)]
pub struct EventListener {
    sender: broadcast::Sender<Arc<str>>,
}

impl EventListener {
    /// Starts the listener task on its own connection from `pool`'s settings.
    pub fn spawn(pool: PgPool) -> Self {
        let (sender, _) = broadcast::channel(4096);
        let task_sender = sender.clone();
        tokio::spawn(async move { listen_forever(pool, task_sender).await });
        Self { sender }
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Arc<str>> {
        self.sender.subscribe()
    }

    /// The payload `set_event` sends for this workflow and key.
    pub(crate) fn payload(workflow_id: &str, key: &str) -> String {
        format!("{workflow_id}\u{1f}{key}")
    }

    /// True when a received payload concerns this workflow and key (or asks
    /// every waiter to re-read).
    pub(crate) fn concerns(payload: &str, expected: &str) -> bool {
        payload == RESYNC || payload == expected
    }
}

async fn listen_forever(pool: PgPool, sender: broadcast::Sender<Arc<str>>) {
    let mut delay = Duration::from_millis(100);
    loop {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(listener) => listener,
            Err(e) => {
                tracing::warn!(error = %e, "event listener cannot connect; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        if let Err(e) = listener.listen(EVENTS_CHANNEL).await {
            tracing::warn!(error = %e, "event listener cannot LISTEN; retrying");
            tokio::time::sleep(delay).await;
            continue;
        }
        delay = Duration::from_millis(100);
        // Anything set while we were not listening must be seen.
        let _ = sender.send(Arc::from(RESYNC));
        loop {
            match listener.try_recv().await {
                Ok(Some(notification)) => {
                    let _ = sender.send(Arc::from(notification.payload()));
                }
                Ok(None) => {
                    // The connection dropped; try_recv reconnects on the next
                    // call. Waiters re-read in case something was missed.
                    tracing::warn!("event listener connection lost; reconnecting");
                    let _ = sender.send(Arc::from(RESYNC));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "event listener failed; reconnecting");
                    let _ = sender.send(Arc::from(RESYNC));
                    tokio::time::sleep(delay).await;
                    break;
                }
            }
        }
    }
}
