//! A failed step attempt: stop (fenced, cancelled), retry after a
//! backoff, or fail the workflow; and what a refused checkpoint means.

use super::*;

/// What a checkpoint refused by `workflow_checkpoint()` means for the
/// execution (the SQLSTATEs are in its migration); `None` for any other
/// error.
pub(crate) fn refusal(error: &sqlx::Error, seq: i32, name: &str) -> Option<WorkflowError> {
    let sqlx::Error::Database(db) = error else {
        return None;
    };
    Some(match db.code()?.as_ref() {
        "WF001" => WorkflowError::Fenced {
            step: seq,
            name: name.to_owned(),
        },
        "WF002" => WorkflowError::Cancelled,
        "WF003" => WorkflowError::Fenced {
            step: seq,
            name: format!("(workflow already {})", db.message()),
        },
        "WF004" => WorkflowError::fatal("workflow row disappeared"),
        "WF005" => WorkflowError::fatal(format!(
            "step {seq} ({name}) starts a workflow whose id a {} workflow holds",
            db.message()
        )),
        _ => return None,
    })
}

pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_owned()
    }
}

impl WorkflowContext {
    /// After a failed attempt of step `seq`: stops the execution when
    /// another execution has written the step's checkpoint, or the workflow
    /// was cancelled or has finished, since the failure may be that other
    /// execution's doing (its effect came first: a unique key the step's
    /// own statement then violates, say); otherwise retries after a
    /// backoff, or fails the workflow.
    pub(super) async fn after_failure(
        &self,
        seq: i32,
        name: &str,
        attempt: u32,
        failure: Result<StepError, Box<dyn std::any::Any + Send>>,
        retry: &RetryPolicy,
    ) -> Result<(), WorkflowError> {
        let verdict = self.retryable(seq, name, attempt, failure);
        if matches!(verdict, Ok(_) | Err(WorkflowError::Failed { .. }))
            && let Some(stop) = self.fenced_off(seq, name).await
        {
            return Err(stop);
        }
        self.retry_or_fail(seq, name, verdict?, attempt, retry)
            .await
    }

    /// Why this execution must stop at step `seq`, as a refused checkpoint
    /// would say, or `None` (also when the database cannot tell now).
    pub(super) async fn fenced_off(&self, seq: i32, name: &str) -> Option<WorkflowError> {
        let row: Option<(bool, bool, String)> = sqlx::query_as(sql::STEP_FENCED_OFF)
            .bind(&self.workflow_id)
            .bind(seq)
            .fetch_optional(&self.pool)
            .await
            .ok()?;
        let Some((written, cancel_requested, status)) = row else {
            return Some(WorkflowError::fatal("workflow row disappeared"));
        };
        if written {
            Some(WorkflowError::Fenced {
                step: seq,
                name: name.to_owned(),
            })
        } else if cancel_requested {
            Some(WorkflowError::Cancelled)
        } else if matches!(status.as_str(), "succeeded" | "failed" | "cancelled") {
            Some(WorkflowError::Fenced {
                step: seq,
                name: format!("(workflow already {status})"),
            })
        } else {
            None
        }
    }

    pub(super) async fn retry_or_fail(
        &self,
        seq: i32,
        name: &str,
        error: String,
        attempt: u32,
        retry: &RetryPolicy,
    ) -> Result<(), WorkflowError> {
        if attempt >= retry.max_attempts {
            return Err(self.step_failed(seq, name, error, attempt));
        }
        let backoff = retry.backoff(attempt);
        tracing::warn!(
            workflow_id = %self.workflow_id, step = seq, step_name = name, attempt,
            backoff_ms = backoff.as_millis() as u64, %error, "step failed; retrying"
        );
        let mut draining = self.draining.clone();
        tokio::select! {
            _ = tokio::time::sleep(backoff) => Ok(()),
            _ = crate::until_true(&mut draining) => Err(WorkflowError::Draining),
        }
    }

    /// A failed attempt: the error text when another attempt may follow,
    /// or the error that stops the workflow (fatal, or database down).
    pub(super) fn retryable(
        &self,
        seq: i32,
        name: &str,
        attempt: u32,
        failure: Result<StepError, Box<dyn std::any::Any + Send>>,
    ) -> Result<String, WorkflowError> {
        match failure {
            Ok(StepError::Unavailable(e)) => Err(WorkflowError::Unavailable(e)),
            Ok(StepError::Fatal(e)) => Err(self.step_failed(seq, name, format!("{e:#}"), attempt)),
            Ok(StepError::Retryable(e)) => Ok(format!("{e:#}")),
            Err(panic) => Ok(format!("panicked: {}", panic_message(&*panic))),
        }
    }

    pub(super) fn step_failed(
        &self,
        seq: i32,
        name: &str,
        error: String,
        attempts: u32,
    ) -> WorkflowError {
        WorkflowError::Failed {
            error: format!("step {seq} ({name}) failed after {attempts} attempt(s): {error}"),
            attempts: attempts as i32,
        }
    }
}
