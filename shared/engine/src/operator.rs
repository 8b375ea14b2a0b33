//! What an operator calls: list and inspect workflows, cancel, resume and
//! restart them. The admin API is a thin layer over these.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgConnection;

use crate::client::{Flush, start_on};
use crate::queue::{JOB_MAX_ATTEMPTS, new_job_id};
use crate::runtime::ENDING_STEP;
use crate::{Engine, EngineError, WorkflowHandle, WorkflowStatus, sql};

/// What [`Engine::cancel`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// Delivered: a queued or parked workflow is woken, a running one sees
    /// it at its next step; it runs its compensation and ends cancelled.
    Requested,
    /// Its compensation is running already (it is being cancelled, or
    /// fails for good): it ends when that is done.
    Ending,
    /// It had finished with this status; nothing changed.
    Finished(WorkflowStatus),
}

/// What [`Engine::delete`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteOutcome {
    /// Deleted, with its steps, events and messages.
    Deleted,
    /// Not finished: nothing changed.
    Unfinished(WorkflowStatus),
    /// A workflow it started is unfinished: nothing changed.
    ChildUnfinished,
}

/// Which workflows [`Engine::list`] returns, newest first.
#[derive(Debug, Clone, Default)]
pub struct WorkflowFilter {
    /// Only this status.
    pub status: Option<WorkflowStatus>,
    /// Only this kind.
    pub kind: Option<String>,
    /// Only those unchanged for at least this long (stuck, long waiting).
    pub older_than: Option<Duration>,
    /// Only those pinned to this code version.
    pub version: Option<String>,
    /// Only those after this position of an earlier page.
    pub after: Option<Cursor>,
    /// At most this many.
    pub limit: i64,
}

/// A position in the newest-first list: the last workflow of a page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    created_at: DateTime<Utc>,
    id: String,
}

impl Cursor {
    /// The cursor as a client passes it back: opaque text.
    pub fn encode(&self) -> String {
        format!("{}.{}", self.created_at.timestamp_micros(), self.id)
    }

    /// A cursor [`Cursor::encode`] made, or `None`.
    pub fn decode(text: &str) -> Option<Self> {
        let (micros, id) = text.split_once('.')?;
        Some(Cursor {
            created_at: DateTime::from_timestamp_micros(micros.parse().ok()?)?,
            id: id.to_owned(),
        })
    }
}

/// A workflow as the operator's list shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WorkflowSummary {
    /// The id.
    pub id: String,
    /// The kind.
    pub kind: String,
    /// The status.
    pub status: String,
    /// While its compensation runs, the status it leads to.
    pub ending: Option<String>,
    /// A cancel was requested and has not reached it yet.
    pub cancel_requested: bool,
    /// The worker running it now.
    pub owner: Option<String>,
    /// The code version it is pinned to (that of the worker that first
    /// executed it); none before its first execution.
    pub version: Option<String>,
    /// Attempts spent on the failing step.
    pub attempts: i32,
    /// Executions started.
    pub executions: i32,
    /// The last error.
    pub error: Option<String>,
    /// What a parked workflow waits for (a message topic), if anything.
    pub wait_topic: Option<String>,
    /// Until when a parked workflow waits.
    pub wait_until: Option<DateTime<Utc>>,
    /// Created at.
    pub created_at: DateTime<Utc>,
    /// Last changed at.
    pub updated_at: DateTime<Utc>,
}

impl WorkflowSummary {
    /// Where the next page starts after this workflow.
    pub fn cursor(&self) -> Cursor {
        Cursor {
            created_at: self.created_at,
            id: self.id.clone(),
        }
    }
}

/// A workflow with its input and output.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WorkflowRecord {
    /// What the list shows.
    #[sqlx(flatten)]
    #[serde(flatten)]
    pub summary: WorkflowSummary,
    /// Its input.
    pub input: Value,
    /// Its output once succeeded.
    pub output: Option<Value>,
}

/// The unfinished workflows of one code version and kind.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct VersionInFlight {
    /// The version they are pinned to; none: not executed yet (any
    /// worker takes them).
    pub version: Option<String>,
    /// Their kind.
    pub kind: String,
    /// How many are enqueued, running or waiting.
    pub unfinished: i64,
    /// Live workers (not draining) of that version; for workflows not
    /// pinned yet, all live workers.
    pub workers: i64,
    /// Live workers of other versions whose code adopts this kind.
    pub adopters: i64,
}

impl VersionInFlight {
    /// Whether no live worker can run them: they wait for a worker of
    /// their version.
    pub fn stranded(&self) -> bool {
        self.workers + self.adopters == 0
    }
}

/// An event a workflow set.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EventRecord {
    /// Its key.
    pub key: String,
    /// Its value.
    pub value: Value,
    /// When it was (last) set.
    pub created_at: DateTime<Utc>,
}

/// A message sent to a workflow.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MessageRecord {
    /// The topic.
    pub topic: String,
    /// The payload.
    pub payload: Value,
    /// Its deduplication key.
    pub message_key: Option<String>,
    /// When it was sent.
    pub created_at: DateTime<Utc>,
    /// When the workflow took it (`None`: not yet).
    pub consumed_at: Option<DateTime<Utc>>,
}

impl Engine {
    /// Workflows newest first, filtered, one page.
    pub async fn list(&self, filter: &WorkflowFilter) -> Result<Vec<WorkflowSummary>, EngineError> {
        let (after_at, after_id) = match &filter.after {
            Some(c) => (Some(c.created_at), Some(c.id.as_str())),
            None => (None, None),
        };
        Ok(sqlx::query_as(sql::LIST_WORKFLOWS)
            .bind(filter.status.map(WorkflowStatus::as_str))
            .bind(filter.kind.as_deref())
            .bind(filter.older_than.map(|d| d.as_secs_f64()))
            .bind(after_at)
            .bind(after_id)
            .bind(filter.limit)
            .bind(filter.version.as_deref())
            .fetch_all(&self.pool)
            .await?)
    }

    /// Deletes a finished workflow now, with its steps, events and messages
    /// (what retention does once it is old enough), unless a workflow it
    /// started is unfinished.
    pub async fn delete(&self, workflow_id: &str) -> Result<DeleteOutcome, EngineError> {
        let deleted: Option<String> = sqlx::query_scalar(sql::DELETE_FINISHED)
            .bind(workflow_id)
            .fetch_optional(&self.pool)
            .await?;
        if deleted.is_some() {
            return Ok(DeleteOutcome::Deleted);
        }
        let row: Option<(String, bool)> = sqlx::query_as(sql::STATUS_AND_CHILDREN)
            .bind(workflow_id)
            .fetch_optional(&self.pool)
            .await?;
        let (status, child_unfinished) =
            row.ok_or_else(|| EngineError::UnknownWorkflow(workflow_id.to_owned()))?;
        let status = WorkflowStatus::parse(&status)
            .ok_or_else(|| EngineError::UnknownWorkflow(workflow_id.to_owned()))?;
        Ok(if !status.is_terminal() {
            DeleteOutcome::Unfinished(status)
        } else if child_unfinished {
            DeleteOutcome::ChildUnfinished
        } else {
            // Deleted meanwhile by retention or another operator.
            DeleteOutcome::Deleted
        })
    }

    /// Unfinished workflows by code version and kind, each with the live
    /// workers that can run them: an operator scales a version to zero
    /// once none of its workflows is left, and sees those that wait for a
    /// worker of theirs.
    pub async fn versions(&self) -> Result<Vec<VersionInFlight>, EngineError> {
        Ok(sqlx::query_as(sql::VERSIONS_IN_FLIGHT)
            .fetch_all(&self.pool)
            .await?)
    }

    /// One workflow as the list shows it, with its input and output.
    pub async fn workflow(&self, workflow_id: &str) -> Result<Option<WorkflowRecord>, EngineError> {
        Ok(sqlx::query_as(sql::WORKFLOW_RECORD)
            .bind(workflow_id)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// The events a workflow set, by key.
    pub async fn events(&self, workflow_id: &str) -> Result<Vec<EventRecord>, EngineError> {
        Ok(sqlx::query_as(sql::WORKFLOW_EVENTS)
            .bind(workflow_id)
            .fetch_all(&self.pool)
            .await?)
    }

    /// The messages sent to a workflow, oldest first.
    pub async fn messages(&self, workflow_id: &str) -> Result<Vec<MessageRecord>, EngineError> {
        Ok(sqlx::query_as(sql::WORKFLOW_MESSAGES)
            .bind(workflow_id)
            .fetch_all(&self.pool)
            .await?)
    }

    /// Delivers a cancel to the workflow: it runs its compensation
    /// ([`Workflow::compensate`](crate::Workflow::compensate)) on a worker,
    /// then ends cancelled. A queued or parked workflow is woken for it;
    /// a running one sees it at its next step.
    pub async fn cancel(&self, workflow_id: &str) -> Result<CancelOutcome, EngineError> {
        let status: Option<String> = sqlx::query_scalar(sql::CANCEL)
            .bind(workflow_id)
            .bind(new_job_id())
            .bind(JOB_MAX_ATTEMPTS)
            .fetch_one(&self.pool)
            .await?;
        let status = status.ok_or_else(|| EngineError::UnknownWorkflow(workflow_id.to_owned()))?;
        Ok(match WorkflowStatus::parse(&status) {
            Some(s) if s.is_terminal() => CancelOutcome::Finished(s),
            _ if status == "ending" => CancelOutcome::Ending,
            _ => CancelOutcome::Requested,
        })
    }

    /// Runs a failed or cancelled workflow again from its last checkpoint.
    /// Refused when its compensation changed anything
    /// ([`EngineError::Compensated`]): restart it instead.
    pub async fn resume(&self, workflow_id: &str) -> Result<(), EngineError> {
        let mut tx = self.pool.begin().await?;
        let status = lock_status(&mut tx, workflow_id).await?;
        if !matches!(status, WorkflowStatus::Failed | WorkflowStatus::Cancelled) {
            return Err(EngineError::NotResumable {
                id: workflow_id.to_owned(),
                status: status.as_str().to_owned(),
            });
        }
        let compensated: bool = sqlx::query_scalar(sql::COMPENSATED)
            .bind(workflow_id)
            .bind(ENDING_STEP)
            .fetch_one(&mut *tx)
            .await?;
        if compensated {
            return Err(EngineError::Compensated(workflow_id.to_owned()));
        }
        sqlx::query(sql::RESUME)
            .bind(workflow_id)
            .bind(new_job_id())
            .bind(JOB_MAX_ATTEMPTS)
            .bind(ENDING_STEP)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Starts workflow `new_id`, of the same kind and input as
    /// `workflow_id`, which is left untouched. With `from_step`, the new
    /// workflow begins with copies of the original's checkpoints before
    /// that step, so it runs from that step on (its events are not copied:
    /// a copied step that set one does not set it again).
    pub async fn restart(
        &self,
        workflow_id: &str,
        new_id: &str,
        from_step: Option<i32>,
    ) -> Result<WorkflowHandle, EngineError> {
        let mut tx = self.pool.begin().await?;
        let original: Option<(String, String, Value, Option<i32>)> =
            sqlx::query_as(sql::RESTART_SOURCE)
                .bind(workflow_id)
                .bind(ENDING_STEP)
                .fetch_optional(&mut *tx)
                .await?;
        let (kind, queue, input, own_steps) =
            original.ok_or_else(|| EngineError::UnknownWorkflow(workflow_id.to_owned()))?;
        let from_step = from_step.unwrap_or(0);
        let own_steps = own_steps.unwrap_or(0);
        if from_step < 0 || from_step > own_steps {
            return Err(EngineError::NoSuchStep {
                id: workflow_id.to_owned(),
                step: from_step,
                steps: own_steps,
            });
        }
        let handle = start_on(&mut tx, (&kind, &queue), new_id, &input, Flush::Wait).await?;
        if !handle.created {
            return Err(EngineError::IdTaken(new_id.to_owned()));
        }
        sqlx::query(sql::COPY_CHECKPOINTS)
            .bind(workflow_id)
            .bind(new_id)
            .bind(from_step)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(handle)
    }
}

async fn lock_status(
    conn: &mut PgConnection,
    workflow_id: &str,
) -> Result<WorkflowStatus, EngineError> {
    let status: Option<String> = sqlx::query_scalar(sql::LOCK_STATUS)
        .bind(workflow_id)
        .fetch_optional(&mut *conn)
        .await?;
    status
        .and_then(|s| WorkflowStatus::parse(&s))
        .ok_or_else(|| EngineError::UnknownWorkflow(workflow_id.to_owned()))
}
