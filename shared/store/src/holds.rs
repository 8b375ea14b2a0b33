//! What one client holds: its checkouts not finished yet (reserving, or
//! waiting for payment with a unit reserved), capped so that one client
//! cannot reserve the whole stock for a payment window.

use engine::{Engine, EngineError, WorkflowHandle};
use sqlx::PgPool;

use crate::{CHECKOUT, CheckoutInput};

/// Starts checkout `key` unless its client (`input.client`) holds `cap`
/// unfinished checkouts already: `None` then, and nothing is started or
/// reserved. A key that exists is answered as [`Engine::start`] answers it,
/// whatever the client holds. The count and the start are serialized per
/// client (a transaction-scoped advisory lock), so concurrent requests of
/// one client never pass the cap together.
pub async fn start_checkout(
    pool: &PgPool,
    key: &str,
    input: &CheckoutInput,
    cap: u32,
) -> Result<Option<WorkflowHandle>, EngineError> {
    let Some(client) = input.client.as_deref() else {
        return Ok(None);
    };
    let mut tx = pool.begin().await?;
    // Its own statement: the count's snapshot must come after the lock,
    // to see the start of the request that held it.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('checkout-client:' || $1, 0))")
        .bind(client)
        .execute(&mut *tx)
        .await?;
    let (held, exists): (i64, bool) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM engine.workflows
                 WHERE kind = $3 AND status IN ('enqueued', 'running', 'waiting')
                   AND input->>'client' = $1),
                EXISTS (SELECT 1 FROM engine.workflows WHERE id = $2)",
    )
    .bind(client)
    .bind(key)
    .bind(CHECKOUT.name)
    .fetch_one(&mut *tx)
    .await?;
    if held >= i64::from(cap) && !exists {
        return Ok(None);
    }
    let started = Engine::start_unflushed_in(&mut tx, CHECKOUT, key, input).await?;
    tx.commit().await?;
    Ok(Some(started))
}
