//! One LISTEN connection per process, fanned out to every waiter of
//! [`Engine::get_event`](super::Engine::get_event).

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::broadcast;

/// The channel `set_event` notifies on; the payload is `workflow_id`, the
/// unit separator (0x1f), the event key, and, when the value is small, the
/// separator again and the value's JSON (a waiter then needs no read).
pub const EVENTS_CHANNEL: &str = "workflow_events";

/// Largest value JSON carried in a notification (PostgreSQL's limit for a
/// whole payload is 8000 bytes).
const VALUE_IN_PAYLOAD_MAX: usize = 4000;

/// What a notification means to one waiter.
pub(crate) enum Notice {
    /// Someone else's event.
    Other,
    /// Ours, or possibly missed: read the table.
    Reread,
    /// Ours, with its value.
    Value(serde_json::Value),
}

/// The payload sent to waiters when the listener reconnected: notifications
/// may have been missed, so every waiter re-reads the table.
const RESYNC: &str = "";

/// A process-wide LISTEN on the events channel that reconnects by itself.
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

    /// The payload `set_event` sends for this workflow, key and value.
    pub(crate) fn payload(workflow_id: &str, key: &str, value: &serde_json::Value) -> String {
        let json = value.to_string();
        if json.len() <= VALUE_IN_PAYLOAD_MAX {
            format!("{workflow_id}\u{1f}{key}\u{1f}{json}")
        } else {
            format!("{workflow_id}\u{1f}{key}")
        }
    }

    /// The prefix of the payloads about this workflow and key.
    pub(crate) fn topic(workflow_id: &str, key: &str) -> String {
        format!("{workflow_id}\u{1f}{key}")
    }

    /// What a received payload means to the waiter of `topic`.
    pub(crate) fn notice(payload: &str, topic: &str) -> Notice {
        if payload == RESYNC || payload == topic {
            return Notice::Reread;
        }
        match payload
            .strip_prefix(topic)
            .and_then(|rest| rest.strip_prefix('\u{1f}'))
        {
            Some(json) => serde_json::from_str(json).map_or(Notice::Reread, Notice::Value),
            None => Notice::Other,
        }
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
        // A lost connection is re-established, LISTEN included, before
        // `try_recv` reports it: the waiters' re-read that follows then
        // sees every event set since, and none is missed in between.
        listener.eager_reconnect(true);
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_waiter_gets_its_value_from_the_notification() {
        let topic = EventListener::topic("w1", "payment_id");
        let payload = EventListener::payload("w1", "payment_id", &json!("w1"));
        assert!(
            matches!(EventListener::notice(&payload, &topic), Notice::Value(v) if v == json!("w1"))
        );
    }

    #[test]
    fn other_events_and_longer_keys_are_not_ours() {
        let topic = EventListener::topic("w1", "order");
        for payload in [
            EventListener::payload("w2", "order", &json!(1)),
            EventListener::payload("w1", "order_id", &json!(1)),
            EventListener::payload("w10", "order", &json!(1)),
        ] {
            assert!(
                matches!(EventListener::notice(&payload, &topic), Notice::Other),
                "{payload:?}"
            );
        }
    }

    #[test]
    fn a_large_value_or_a_resync_means_read_the_table() {
        let topic = EventListener::topic("w1", "big");
        let big = json!("x".repeat(VALUE_IN_PAYLOAD_MAX + 1));
        let payload = EventListener::payload("w1", "big", &big);
        assert!(matches!(
            EventListener::notice(&payload, &topic),
            Notice::Reread
        ));
        assert!(matches!(
            EventListener::notice(RESYNC, &topic),
            Notice::Reread
        ));
    }
}
