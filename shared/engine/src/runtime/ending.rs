//! A workflow's own end when it will not finish: cancelled, or failed for
//! good. The runtime marks where its steps stopped (a `$ending` step), runs
//! the workflow's [compensation](Workflow::compensate) after it, and only
//! then gives the workflow that status. A crash during the compensation
//! replays it, not the workflow: a claim that finds `ending` set goes
//! straight to it.

use super::execution::Claim;
use super::*;
use crate::context::refusal;

/// Why a workflow ends without finishing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndReason {
    /// A cancel reached it.
    Cancelled,
    /// It failed for good.
    Failed {
        /// What failed, as the workflow row keeps it.
        error: String,
        /// Attempts spent on the failing step.
        attempts: i32,
    },
}

impl EndReason {
    /// The status the workflow takes once its compensation is done.
    pub fn status(&self) -> &'static str {
        match self {
            EndReason::Cancelled => "cancelled",
            EndReason::Failed { .. } => "failed",
        }
    }

    /// The reason an execution's result gives, if it is one: a cancel, or
    /// a failure for good.
    pub(super) fn of(
        result: &Result<Result<Value, WorkflowError>, Box<dyn std::any::Any + Send>>,
    ) -> Option<Self> {
        match result {
            Ok(Err(WorkflowError::Cancelled)) => Some(EndReason::Cancelled),
            Ok(Err(WorkflowError::Failed { error, attempts })) => Some(EndReason::Failed {
                error: error.clone(),
                attempts: *attempts,
            }),
            Ok(Err(e @ WorkflowError::Nondeterministic { .. })) => Some(EndReason::Failed {
                error: e.to_string(),
                attempts: 0,
            }),
            Err(panic) => Some(EndReason::Failed {
                error: format!(
                    "workflow panicked outside a step: {}",
                    panic_message(&**panic)
                ),
                attempts: 1,
            }),
            Ok(_) => None,
        }
    }

    /// The reason a claim of a workflow whose compensation has begun holds.
    pub(super) fn of_claim(claim: &Claim) -> Option<Self> {
        match claim.ending.as_deref()? {
            "cancelled" => Some(EndReason::Cancelled),
            _ => Some(EndReason::Failed {
                error: claim.error.clone().unwrap_or_default(),
                attempts: claim.attempts,
            }),
        }
    }

    fn error(&self) -> Option<&str> {
        match self {
            EndReason::Cancelled => None,
            EndReason::Failed { error, .. } => Some(error),
        }
    }

    fn attempts(&self) -> i32 {
        match self {
            EndReason::Cancelled => 0,
            EndReason::Failed { attempts, .. } => *attempts,
        }
    }
}

/// What a workflow's [compensation](Workflow::compensate) is told: why the
/// workflow ends, and what its steps did.
#[derive(Debug)]
pub struct Ending {
    reason: EndReason,
    /// The workflow's own checkpoints, before the `$ending` step.
    steps: Vec<Checkpoint>,
}

impl Ending {
    /// Why the workflow ends.
    pub fn reason(&self) -> &EndReason {
        &self.reason
    }

    /// Whether a cancel ends it (else a failure).
    pub fn is_cancelled(&self) -> bool {
        self.reason == EndReason::Cancelled
    }

    /// The output of the workflow's last completed step named `name`, or
    /// `None` when no such step completed.
    pub fn output<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, WorkflowError> {
        let Some(step) = self.steps.iter().rev().find(|s| s.name == name) else {
            return Ok(None);
        };
        serde_json::from_value(step.output.clone())
            .map(Some)
            .map_err(|e| {
                WorkflowError::fatal(format!(
                    "step {} ({name}): checkpoint does not decode: {e}",
                    step.step_seq
                ))
            })
    }
}

/// The name of the step that marks where a workflow's own steps stopped
/// and its compensation's began.
pub const ENDING_STEP: &str = "$ending";

/// What an execution of a workflow or its compensation came to.
pub(super) type ExecutionResult =
    Result<Result<Value, WorkflowError>, Box<dyn std::any::Any + Send>>;

impl Runtime {
    /// Begins the workflow's end (a second time finds the marker there: a
    /// resumed compensation) and runs its compensation after the marker.
    /// The workflow finished meanwhile, or its row is gone: the refusal a
    /// checkpoint would give.
    pub(super) async fn compensate(
        &self,
        ctx: &mut WorkflowContext,
        definition: &dyn ErasedWorkflow,
        input: &Value,
        reason: &EndReason,
    ) -> Result<ExecutionResult, sqlx::Error> {
        let marker: Result<i32, sqlx::Error> = sqlx::query_scalar(sql::BEGIN_ENDING)
            .bind(&ctx.workflow_id)
            .bind(reason.status())
            .bind(reason.error())
            .bind(reason.attempts())
            .bind(&*self.inner.worker_id)
            .fetch_one(&self.inner.pool)
            .await;
        let marker = match marker {
            Ok(seq) => seq,
            Err(e) => {
                return match refusal(&e, 0, ENDING_STEP) {
                    Some(stop) => Ok(Ok(Err(stop))),
                    None => Err(e),
                };
            }
        };
        let history: Vec<Checkpoint> = sqlx::query_as(sql::WORKFLOW_CHECKPOINTS)
            .bind(&ctx.workflow_id)
            .fetch_all(&self.inner.pool)
            .await?;
        let (steps, rest): (Vec<_>, Vec<_>) =
            history.into_iter().partition(|c| c.step_seq < marker);
        let marked_at = rest
            .iter()
            .find(|c| c.step_seq == marker)
            .map_or_else(Utc::now, |c| c.finished_at);
        let after = rest.into_iter().filter(|c| c.step_seq > marker).collect();
        ctx.cursor = ReplayCursor::after(marker, after, marked_at);
        ctx.cancel_requested = false;
        tracing::info!(
            ending = reason.status(),
            error = reason.error(),
            "workflow ending: running its compensation"
        );
        let ending = Ending {
            reason: reason.clone(),
            steps,
        };
        Ok(
            AssertUnwindSafe(definition.compensate_json(ctx, input, &ending))
                .catch_unwind()
                .await,
        )
    }
}
