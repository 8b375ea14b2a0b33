//! The engine's client side: what the API (or anyone) calls.

use crate::sql;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;

use super::events::{EventListener, Notice};
use super::queue::{JOB_MAX_ATTEMPTS, new_job_id};
use super::{EngineError, StepRecord, WorkflowHandle, WorkflowInfo, WorkflowKind};

/// Entry point of the engine's client calls. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Engine {
    pub(crate) pool: PgPool,
    events: Option<EventListener>,
    event_poll: Duration,
}

/// A message for [`Engine::send`].
#[derive(Debug, Clone)]
pub struct Message<'a> {
    /// The receiving workflow.
    pub workflow_id: &'a str,
    /// The topic its `recv` waits on.
    pub topic: &'a str,
    /// The payload `recv` returns.
    pub payload: Value,
    /// A deduplication key: a second message with the same key for the same
    /// workflow is not stored.
    pub key: Option<&'a str>,
}

/// What [`Engine::send`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum SendOutcome {
    /// Stored (and the workflow woken if it was parked).
    Delivered,
    /// A message with this key was already there; this one was dropped.
    Duplicate {
        /// The payload of the message that was kept.
        payload: Value,
    },
}

impl Engine {
    /// An engine on `pool`. Without an [`EventListener`] `get_event` polls.
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            events: None,
            event_poll: Duration::from_secs(1),
        }
    }

    /// Wakes `get_event` waiters through LISTEN/NOTIFY; `fallback_poll` is
    /// how often a waiter re-reads anyway, in case a notification was lost.
    pub fn with_events(mut self, listener: EventListener, fallback_poll: Duration) -> Self {
        self.events = Some(listener);
        self.event_poll = fallback_poll;
        self
    }

    /// Starts a workflow, or returns the existing one with this id. It is
    /// on disk when this returns.
    pub async fn start(
        &self,
        kind: WorkflowKind,
        id: &str,
        input: &impl Serialize,
    ) -> Result<WorkflowHandle, EngineError> {
        // One statement does it all: no transaction of its own.
        let mut conn = self.pool.acquire().await?;
        start_on(&mut conn, (kind.name, kind.queue), id, input, Flush::Wait).await
    }

    /// [`Engine::start`], returning before the start's commit reaches disk:
    /// the workflow's worker is notified one WAL flush sooner. Only for a
    /// caller that tells nobody of the workflow until it sets an event (the
    /// API's checkout answers with the payment id). Events are set by
    /// commits that wait for their flush, and the WAL is one sequence, so
    /// the event's flush makes the start durable too; a database crash
    /// before it loses the start, of which nobody was told, and the caller's
    /// retry starts it again.
    pub async fn start_unflushed(
        &self,
        kind: WorkflowKind,
        id: &str,
        input: &impl Serialize,
    ) -> Result<WorkflowHandle, EngineError> {
        let mut conn = self.pool.acquire().await?;
        start_on(&mut conn, (kind.name, kind.queue), id, input, Flush::Later).await
    }

    /// [`Engine::start`] inside the caller's transaction (a workflow step
    /// starting a child commits both together; a one-statement step uses
    /// [`Statement::start`](crate::Statement::start)). A
    /// [`EngineError::KindConflict`] is raised by the statement, so it ends
    /// the caller's transaction too.
    pub async fn start_in(
        conn: &mut PgConnection,
        kind: WorkflowKind,
        id: &str,
        input: &impl Serialize,
    ) -> Result<WorkflowHandle, EngineError> {
        start_on(conn, (kind.name, kind.queue), id, input, Flush::Wait).await
    }

    /// [`Engine::start_in`], the caller's transaction committing without
    /// waiting for its WAL flush, for the reason [`Engine::start_unflushed`]
    /// gives (the store starts a checkout under its client's lock).
    pub async fn start_unflushed_in(
        conn: &mut PgConnection,
        kind: WorkflowKind,
        id: &str,
        input: &impl Serialize,
    ) -> Result<WorkflowHandle, EngineError> {
        start_on(conn, (kind.name, kind.queue), id, input, Flush::Later).await
    }

    /// Delivers a message: stored and, if the workflow is parked, its
    /// wake-up job made due now (or a resume job enqueued), atomically: one
    /// statement, the SQL function `engine.workflow_send` (the engine's
    /// migration). It is on disk when this returns.
    pub async fn send(&self, message: Message<'_>) -> Result<SendOutcome, EngineError> {
        self.send_with(message, Flush::Wait).await
    }

    /// [`Engine::send`], returning before the message's commit reaches
    /// disk: the parked workflow is woken one WAL flush sooner. Only for a
    /// caller that answers nobody but from an event the workflow sets after
    /// taking the message (the API's payment webhook waits for the order
    /// id), for the reason given at [`Engine::start_unflushed`]: a database
    /// crash before that event loses the message, and the sender, who has
    /// no answer, sends it again.
    pub async fn send_unflushed(&self, message: Message<'_>) -> Result<SendOutcome, EngineError> {
        self.send_with(message, Flush::Later).await
    }

    /// [`Engine::send`] in the caller's transaction: the message is
    /// delivered exactly when that transaction commits (the store's
    /// payment ledger records a provider's delivery and hands it on in one
    /// transaction).
    pub async fn send_in(
        conn: &mut PgConnection,
        message: Message<'_>,
    ) -> Result<SendOutcome, EngineError> {
        send_on(conn, message, Flush::Wait).await
    }

    async fn send_with(
        &self,
        message: Message<'_>,
        flush: Flush,
    ) -> Result<SendOutcome, EngineError> {
        send_on(&self.pool, message, flush).await
    }

    /// Reads an event now, without waiting.
    pub async fn event(&self, workflow_id: &str, key: &str) -> Result<Option<Value>, EngineError> {
        Ok(sqlx::query_scalar(sql::READ_EVENT)
            .bind(workflow_id)
            .bind(key)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// Waits up to `wait` for the workflow to set event `key`; `None` when
    /// it is not set by then ("not yet").
    pub async fn get_event(
        &self,
        workflow_id: &str,
        key: &str,
        wait: Duration,
    ) -> Result<Option<Value>, EngineError> {
        self.subscribe().get(workflow_id, key, wait).await
    }

    /// Starts taking event notifications now: a wait on the subscription
    /// sees every event set after this call. Subscribe before the start or
    /// send that makes an event possible, then wait with
    /// [`EventSubscription::next`] and save the read.
    pub fn subscribe(&self) -> EventSubscription<'_> {
        EventSubscription {
            engine: self,
            receiver: self.events.as_ref().map(EventListener::subscribe),
        }
    }

    /// The workflow's row, if it exists.
    pub async fn info(&self, workflow_id: &str) -> Result<Option<WorkflowInfo>, EngineError> {
        Ok(sqlx::query_as(sql::WORKFLOW_INFO)
            .bind(workflow_id)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// Unfinished workflows (enqueued, running, waiting) by kind, status
    /// and code version (none: not executed yet).
    pub async fn unfinished(
        &self,
    ) -> Result<Vec<(String, String, Option<String>, i64)>, EngineError> {
        Ok(sqlx::query_as(sql::UNFINISHED_COUNTS)
            .fetch_all(&self.pool)
            .await?)
    }

    /// The workflow's completed steps, in order.
    pub async fn steps(&self, workflow_id: &str) -> Result<Vec<StepRecord>, EngineError> {
        Ok(sqlx::query_as(sql::WORKFLOW_STEPS)
            .bind(workflow_id)
            .fetch_all(&self.pool)
            .await?)
    }
}

/// Whether a start or a send returns after its commit reaches disk.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flush {
    /// After: the caller may tell anyone.
    Wait,
    /// Before: the next flushed commit carries it (`synchronous_commit` off
    /// for its transaction, set in its statement).
    Later,
}

/// One statement: the workflow row and, when it is new, its job
/// (`engine.workflow_start()`).
pub(crate) async fn start_on(
    conn: &mut PgConnection,
    (kind, queue): (&str, &str),
    id: &str,
    input: &impl Serialize,
    flush: Flush,
) -> Result<WorkflowHandle, EngineError> {
    check_id(id)?;
    let input = serde_json::to_value(input)?;
    let created = sqlx::query_scalar(sql::START)
        .bind(id)
        .bind(kind)
        .bind(queue)
        .bind(&input)
        .bind(new_job_id())
        .bind(JOB_MAX_ATTEMPTS)
        .bind(flush == Flush::Later)
        .fetch_one(&mut *conn)
        .await
        .map_err(|error| match kind_conflict(&error) {
            Some(existing) => EngineError::KindConflict {
                id: id.to_owned(),
                existing,
                requested: kind.to_owned(),
            },
            None => error.into(),
        })?;
    Ok(WorkflowHandle {
        id: id.to_owned(),
        kind: kind.to_owned(),
        created,
    })
}

/// Event notifications taken since [`Engine::subscribe`].
pub struct EventSubscription<'a> {
    engine: &'a Engine,
    receiver: Option<broadcast::Receiver<Arc<str>>>,
}

impl EventSubscription<'_> {
    /// Reads event `key` of `workflow_id`, then waits up to `wait` for it
    /// to be set; `None` when it is not set by then.
    pub async fn get(
        self,
        workflow_id: &str,
        key: &str,
        wait: Duration,
    ) -> Result<Option<Value>, EngineError> {
        Ok(self
            .wait(workflow_id, [key], wait, true)
            .await?
            .map(|[value]| value))
    }

    /// Waits up to `wait` for event `key` of `workflow_id`, without reading
    /// it first: for an event that cannot have been set before the
    /// subscription. A lost notification costs a fallback poll, not the
    /// event.
    pub async fn next(
        self,
        workflow_id: &str,
        key: &str,
        wait: Duration,
    ) -> Result<Option<Value>, EngineError> {
        Ok(self
            .wait(workflow_id, [key], wait, false)
            .await?
            .map(|[value]| value))
    }

    /// [`EventSubscription::get`] for several events of one workflow: their
    /// values, in the order of `keys`, once every one is set.
    pub async fn get_all<const N: usize>(
        self,
        workflow_id: &str,
        keys: [&str; N],
        wait: Duration,
    ) -> Result<Option<[Value; N]>, EngineError> {
        self.wait(workflow_id, keys, wait, true).await
    }

    /// [`EventSubscription::next`] for several events of one workflow (set
    /// in one step, say: their notifications come with one commit, and no
    /// read is needed for any of them).
    pub async fn next_all<const N: usize>(
        self,
        workflow_id: &str,
        keys: [&str; N],
        wait: Duration,
    ) -> Result<Option<[Value; N]>, EngineError> {
        self.wait(workflow_id, keys, wait, false).await
    }

    async fn wait<const N: usize>(
        mut self,
        workflow_id: &str,
        keys: [&str; N],
        wait: Duration,
        mut read: bool,
    ) -> Result<Option<[Value; N]>, EngineError> {
        let engine = self.engine;
        let deadline = Instant::now() + wait;
        let topics = keys.map(|key| EventListener::topic(workflow_id, key));
        let mut values: [Option<Value>; N] = std::array::from_fn(|_| None);
        loop {
            if read {
                for (key, value) in keys.iter().zip(values.iter_mut()) {
                    if value.is_none() {
                        *value = engine.event(workflow_id, key).await?;
                    }
                }
            }
            if values.iter().all(Option::is_some) {
                return Ok(Some(values.map(|value| value.expect("every value is set"))));
            }
            read = true;
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let next_poll = (now + engine.event_poll).min(deadline);
            match self.receiver.as_mut() {
                None => tokio::time::sleep_until(next_poll).await,
                Some(receiver) => loop {
                    match tokio::time::timeout_at(next_poll, receiver.recv()).await {
                        Err(_elapsed) => break,
                        Ok(Ok(payload)) => {
                            let mut reread = false;
                            for (topic, value) in topics.iter().zip(values.iter_mut()) {
                                match EventListener::notice(&payload, topic) {
                                    Notice::Value(v) => *value = Some(v),
                                    Notice::Reread => reread = true,
                                    Notice::Other => {}
                                }
                            }
                            if reread || values.iter().all(Option::is_some) {
                                break;
                            }
                        }
                        Ok(Err(RecvError::Lagged(_))) => break,
                        Ok(Err(RecvError::Closed)) => {
                            tokio::time::sleep_until(next_poll).await;
                            break;
                        }
                    }
                },
            }
        }
    }
}

/// The kind of the workflow that holds an id `workflow_start()` was asked
/// to start as another kind (it raised WF005), if that is the error.
pub(crate) fn kind_conflict(error: &sqlx::Error) -> Option<String> {
    match error {
        sqlx::Error::Database(db) if db.code().as_deref() == Some("WF005") => {
            Some(db.message().to_owned())
        }
        _ => None,
    }
}

/// A workflow id is 1 to 256 bytes.
pub(crate) fn check_id(id: &str) -> Result<(), EngineError> {
    if id.is_empty() || id.len() > 256 {
        return Err(EngineError::InvalidId);
    }
    Ok(())
}

/// Delivers a message through `executor` (the pool, or a transaction).
async fn send_on<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    message: Message<'_>,
    flush: Flush,
) -> Result<SendOutcome, EngineError> {
    let (outcome, status, kept): (String, Option<String>, Option<Value>) =
        sqlx::query_as(sql::SEND)
            .bind(message.workflow_id)
            .bind(message.topic)
            .bind(&message.payload)
            .bind(message.key)
            .bind(new_job_id())
            .bind(JOB_MAX_ATTEMPTS)
            .bind(flush == Flush::Later)
            .fetch_one(executor)
            .await?;
    match outcome.as_str() {
        "delivered" => Ok(SendOutcome::Delivered),
        "duplicate" => Ok(SendOutcome::Duplicate {
            payload: kept.unwrap_or(Value::Null),
        }),
        "finished" => Err(EngineError::Finished {
            id: message.workflow_id.to_owned(),
            status: status.unwrap_or_default(),
        }),
        _ => Err(EngineError::UnknownWorkflow(message.workflow_id.to_owned())),
    }
}
