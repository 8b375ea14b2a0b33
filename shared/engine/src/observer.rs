//! What the runtime reports as it works, for a worker's metrics: the
//! engine counts nothing itself, it tells an [`Observer`].

use std::time::Duration;

use crate::ExecutionOutcome;

/// Told of each execution, step and takeover in this process. Every method
/// defaults to nothing; calls are on the execution's task, so keep them
/// cheap (a counter, a histogram).
pub trait Observer: Send + Sync + 'static {
    /// An execution of a workflow of `kind` began; `first`: the workflow's
    /// first execution (it was started, not resumed or taken over).
    fn execution_started(&self, kind: &str, first: bool) {
        let _ = (kind, first);
    }

    /// An execution of a workflow of `kind` ended so.
    fn execution_ended(&self, kind: &str, outcome: ExecutionOutcome) {
        let _ = (kind, outcome);
    }

    /// Step `step` of a workflow of `kind` completed (its checkpoint
    /// committed or joined its transaction) `took` after it began.
    fn step_completed(&self, kind: &str, step: &str, took: Duration) {
        let _ = (kind, step, took);
    }

    /// A workflow of `kind` taken over from a dead worker completed its next
    /// step here, `since_last_heartbeat` after that worker was last seen.
    fn taken_over(&self, kind: &str, since_last_heartbeat: Duration) {
        let _ = (kind, since_last_heartbeat);
    }

    /// This worker reaped dead (or hung) workers, each `silent_for` after
    /// its last heartbeat: `workflows` of theirs went back to the queue.
    fn workers_reaped(&self, silent_for: &[Duration], workflows: u64) {
        let _ = (silent_for, workflows);
    }
}

/// The observer of a runtime given none.
pub(crate) struct Unobserved;

impl Observer for Unobserved {}
