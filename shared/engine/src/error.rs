//! The engine's errors: what clients of the engine see ([`EngineError`]),
//! what a step reports ([`StepError`]) and what stops a workflow function
//! ([`WorkflowError`]).

/// Errors of the engine's client calls (start, send, cancel, resume, events).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The workflow id exists with another kind.
    #[error("workflow {id} already exists as a {existing} workflow, not {requested}")]
    KindConflict {
        /// The id asked for.
        id: String,
        /// The kind it already has.
        existing: String,
        /// The kind asked for.
        requested: String,
    },
    /// No workflow has this id.
    #[error("no workflow with id {0}")]
    UnknownWorkflow(String),
    /// The workflow already finished: it takes no more messages.
    #[error("workflow {id} already finished ({status})")]
    Finished {
        /// The workflow.
        id: String,
        /// Its terminal status.
        status: String,
    },
    /// Resume asked for a workflow that is neither failed nor cancelled.
    #[error("workflow {id} is {status}; only failed or cancelled workflows can be resumed")]
    NotResumable {
        /// The workflow.
        id: String,
        /// Its current status.
        status: String,
    },
    /// Resume asked for a workflow whose compensation changed something.
    #[error("workflow {0} ran its compensation; restart it instead of resuming it")]
    Compensated(String),
    /// Restart asked to start from a step the workflow does not have.
    #[error(
        "workflow {id} has {steps} step(s) of its own; a restart starts from 0 to {steps}, not {step}"
    )]
    NoSuchStep {
        /// The workflow.
        id: String,
        /// The step asked for.
        step: i32,
        /// Its own steps.
        steps: i32,
    },
    /// A new workflow's id is taken.
    #[error("a workflow with id {0} exists already")]
    IdTaken(String),
    /// A workflow id that is empty or too long.
    #[error("workflow id must be 1 to 256 characters")]
    InvalidId,
    /// The database could not be reached.
    #[error("database unavailable")]
    Unavailable(#[source] sqlx::Error),
    /// Any other database error.
    #[error("database error")]
    Database(#[source] sqlx::Error),
    /// A value could not be (de)serialised.
    #[error("payload encoding")]
    Encoding(#[from] serde_json::Error),
}

impl From<sqlx::Error> for EngineError {
    fn from(error: sqlx::Error) -> Self {
        if is_unavailable(&error) {
            EngineError::Unavailable(error)
        } else {
            EngineError::Database(error)
        }
    }
}

/// What a step body returns on failure.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// Worth another attempt (the step's retry policy decides how many).
    #[error("{0:#}")]
    Retryable(anyhow::Error),
    /// Never worth retrying: the workflow fails at once with this error.
    #[error("{0:#}")]
    Fatal(anyhow::Error),
    /// The database is unreachable: the execution pauses and replays when it
    /// returns, without spending an attempt.
    #[error("database unavailable: {0}")]
    Unavailable(sqlx::Error),
}

impl StepError {
    /// A fatal error with this message.
    pub fn fatal(message: impl std::fmt::Display) -> Self {
        StepError::Fatal(anyhow::anyhow!("{message}"))
    }
    /// A retryable error with this message.
    pub fn retryable(message: impl std::fmt::Display) -> Self {
        StepError::Retryable(anyhow::anyhow!("{message}"))
    }
}

impl From<sqlx::Error> for StepError {
    fn from(error: sqlx::Error) -> Self {
        if is_unavailable(&error) {
            StepError::Unavailable(error)
        } else {
            StepError::Retryable(error.into())
        }
    }
}

impl From<anyhow::Error> for StepError {
    fn from(error: anyhow::Error) -> Self {
        StepError::Retryable(error)
    }
}

impl From<serde_json::Error> for StepError {
    fn from(error: serde_json::Error) -> Self {
        StepError::Fatal(error.into())
    }
}

/// Why a workflow function stopped before returning its output. Workflow
/// code propagates it with `?`; only [`WorkflowError::fatal`] is made by hand.
#[derive(Debug, thiserror::Error)]
pub enum WorkflowError {
    /// The workflow waits (recv or sleep): its job is done, a message or a
    /// scheduled job resumes it.
    #[error("parked")]
    Parked,
    /// Another execution of this workflow checkpointed this step first.
    #[error("step {step} ({name}) was checkpointed by another execution")]
    Fenced {
        /// The step's sequence number.
        step: i32,
        /// The step's name.
        name: String,
    },
    /// Cancel was requested; seen at a step boundary.
    #[error("cancelled")]
    Cancelled,
    /// The worker is draining: the workflow is handed to another worker.
    #[error("worker draining")]
    Draining,
    /// This worker was silent longer than `WORKER_STALE_AFTER` (stopped,
    /// cut off): its workflows may be running elsewhere now, so this
    /// execution stops at its next step.
    #[error("this worker was presumed dead; its execution stops")]
    Lost,
    /// The workflow failed for good: its status becomes `failed`.
    #[error("{error}")]
    Failed {
        /// The last error, kept on the workflow row.
        error: String,
        /// Attempts spent on the failing step.
        attempts: i32,
    },
    /// The code no longer matches the checkpoints: fail loudly.
    #[error("step {step}: checkpoint is `{found}` but the code asks for `{expected}`")]
    Nondeterministic {
        /// The step's sequence number.
        step: i32,
        /// The name in the checkpoint.
        found: String,
        /// The name the code asked for.
        expected: String,
    },
    /// The database is unreachable: the runtime replays when it returns.
    #[error("database unavailable: {0}")]
    Unavailable(sqlx::Error),
    /// A step failed while the transaction it shared with the steps before
    /// it was still open: they are undone with it, so the runtime replays
    /// the workflow at once, committing each step on its own this time.
    /// Workflow code only propagates it.
    #[error("a step failed inside a shared transaction; replaying step by step")]
    RetryUnbatched,
}

impl WorkflowError {
    /// A failure that ends the workflow with this error.
    pub fn fatal(message: impl std::fmt::Display) -> Self {
        WorkflowError::Failed {
            error: message.to_string(),
            attempts: 1,
        }
    }
}

impl From<sqlx::Error> for WorkflowError {
    fn from(error: sqlx::Error) -> Self {
        // A deadlock or serialisation failure of the engine's own statements
        // (two executions of one workflow at once, say) says nothing about
        // the workflow: replay it like an outage rather than fail it.
        if is_unavailable(&error) || is_concurrency_conflict(&error) {
            WorkflowError::Unavailable(error)
        } else {
            WorkflowError::fatal(format!("database error: {error}"))
        }
    }
}

impl From<serde_json::Error> for WorkflowError {
    fn from(error: serde_json::Error) -> Self {
        WorkflowError::fatal(format!("payload encoding: {error}"))
    }
}

/// 40P01 deadlock detected, 40001 serialisation failure: retrying works.
fn is_concurrency_conflict(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db)
        if db.code().is_some_and(|code| matches!(code.as_ref(), "40P01" | "40001")))
}

/// True when the error says the database could not serve the request now
/// (unreachable, or a timeout), as opposed to a query it refused: callers
/// answer 503 or retry later.
pub fn is_unavailable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // 08xxx connection exceptions; 57P0x shutdown or not yet
            // accepting; 53300 too many connections; 55000 database not
            // accepting connections; 3D000 database missing; 28xxx login
            // refused; and the sessions' timeouts: 55P03 a lock not
            // granted in time (its holder may be a stopped process), 57014
            // a statement cancelled, 25P03 a session ended idle in its
            // transaction. None of them is the client's fault; retrying
            // later works.
            code.starts_with("08")
                || code.starts_with("57P0")
                || code.starts_with("28")
                || matches!(
                    code.as_ref(),
                    "53300" | "55000" | "3D000" | "55P03" | "57014" | "25P03"
                )
        }),
        _ => false,
    }
}
