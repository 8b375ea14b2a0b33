//! Every statement the engine sends that names one of its tables or
//! functions (schema `engine`), in one place: read this file to know what
//! the engine does to the database. The tables and the PL/pgSQL functions
//! themselves are defined in the engine's migration
//! (`migrations/20261204000001_engine.sql`). The three statements that also
//! take, make or prune apalis jobs (the claim, the takeover jobs, the
//! prune) live with the rest of the queue in `queue.rs`.
//!
//! Parameters are `$n`; a statement's doc says what it does, its caller
//! binds them in order.

// ---- Starting, messaging, events, cancel and resume (client.rs)

/// Delivers a message (`engine.workflow_send()`); `$7` lets the commit skip its WAL flush.
pub(crate) const SEND: &str = "SELECT outcome, status, kept,
         CASE WHEN $7 THEN set_config('synchronous_commit', 'off', true) END
     FROM engine.workflow_send($1, $2, $3, $4, $5, $6)";

/// An event's value.
pub(crate) const READ_EVENT: &str =
    "SELECT value FROM engine.workflow_events WHERE workflow_id = $1 AND key = $2";

/// Delivers a cancel (`engine.workflow_cancel()`).
pub(crate) const CANCEL: &str = "SELECT engine.workflow_cancel($1, $2, $3)";

/// Whether a compensation ran steps (any after the last `$ending` step `$2`).
pub(crate) const COMPENSATED: &str = "SELECT coalesce(max(step_seq) > (
         SELECT max(step_seq) FROM engine.workflow_steps WHERE workflow_id = $1 AND name = $2),
     false) FROM engine.workflow_steps WHERE workflow_id = $1";

/// Puts a cancelled or failed workflow back in the queue, with a job,
/// dropping its `$ending` step (`$4`).
pub(crate) const RESUME: &str = "WITH unmarked AS (
         DELETE FROM engine.workflow_steps WHERE workflow_id = $1 AND name = $4)
     UPDATE engine.workflows SET status = 'enqueued', cancel_requested = false, error = NULL,
         attempts = 0, executions = 0, owner = NULL, ending = NULL, updated_at = now()
     WHERE id = $1 RETURNING engine.workflow_enqueue(queue, id, $2, NULL, 0, $3)";

/// What a restart copies: kind, queue, input, and how many steps are the
/// workflow's own (up to its `$ending` step `$2`, if any).
pub(crate) const RESTART_SOURCE: &str = "SELECT w.kind, w.queue, w.input,
         (SELECT coalesce(min(s.step_seq) FILTER (WHERE s.name = $2), max(s.step_seq) + 1)
          FROM engine.workflow_steps s WHERE s.workflow_id = w.id)
     FROM engine.workflows w WHERE w.id = $1";

/// Copies workflow `$1`'s checkpoints before step `$3` to workflow `$2`,
/// which is then pinned to `$1`'s version when any was copied (its history
/// is that code's).
pub(crate) const COPY_CHECKPOINTS: &str = "WITH copied AS (
         INSERT INTO engine.workflow_steps
             (workflow_id, step_seq, name, output, worker_id, started_at, finished_at)
         SELECT $2, step_seq, name, output, worker_id, started_at, finished_at
         FROM engine.workflow_steps WHERE workflow_id = $1 AND step_seq < $3
         RETURNING 1)
     UPDATE engine.workflows SET version = (SELECT version FROM engine.workflows WHERE id = $1)
     WHERE id = $2 AND EXISTS (SELECT FROM copied)";

/// The columns of an operator's workflow summary.
macro_rules! summary_columns {
    () => {
        "id, kind, status, ending, cancel_requested, owner, version, attempts, executions, error,
         wait_topic, wait_until, created_at, updated_at"
    };
}

/// Workflows newest first: status `$1`, kind `$2`, unchanged for `$3`
/// seconds, after the cursor (`$4`, `$5`), at most `$6`, pinned to version
/// `$7` (each filter off when NULL).
pub(crate) const LIST_WORKFLOWS: &str = concat!(
    "SELECT ",
    summary_columns!(),
    " FROM engine.workflows
     WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR kind = $2)
       AND ($3::float8 IS NULL OR updated_at <= now() - make_interval(secs => $3))
       AND ($4::timestamptz IS NULL OR (created_at, id) < ($4, $5::text))
       AND ($7::text IS NULL OR version = $7)
     ORDER BY created_at DESC, id DESC LIMIT $6"
);

/// One workflow's summary, input and output.
pub(crate) const WORKFLOW_RECORD: &str = concat!(
    "SELECT ",
    summary_columns!(),
    ", input, output FROM engine.workflows WHERE id = $1"
);

/// A workflow's events by key.
pub(crate) const WORKFLOW_EVENTS: &str =
    "SELECT key, value, created_at FROM engine.workflow_events WHERE workflow_id = $1 ORDER BY key";

/// The messages sent to a workflow, oldest first.
pub(crate) const WORKFLOW_MESSAGES: &str =
    "SELECT topic, payload, message_key, created_at, consumed_at
     FROM engine.workflow_messages WHERE workflow_id = $1 ORDER BY id";

/// A workflow's row as an operator sees it.
pub(crate) const WORKFLOW_INFO: &str =
    "SELECT id, kind, status, output, error, attempts, executions, owner, created_at, updated_at
     FROM engine.workflows WHERE id = $1";

/// Unfinished workflows by kind, status and version.
pub(crate) const UNFINISHED_COUNTS: &str =
    "SELECT kind, status, version, count(*) FROM engine.workflows
     WHERE status IN ('enqueued', 'running', 'waiting') GROUP BY kind, status, version";

/// Unfinished workflows by version (NULL: not executed yet, any worker's)
/// and kind, with the live workers (not draining) of that version, and of
/// the current version if it adopts that kind.
pub(crate) const VERSIONS_IN_FLIGHT: &str = "SELECT w.version, w.kind, count(*) AS unfinished,
         (SELECT count(*) FROM engine.workers k
          WHERE NOT k.draining AND (w.version IS NULL OR k.version = w.version)) AS workers,
         (SELECT count(*) FROM engine.workers k
          WHERE NOT k.draining AND w.version IS NOT NULL AND k.version IS DISTINCT FROM w.version
            AND w.kind = ANY (k.adopts)
            AND k.version IS NOT DISTINCT FROM engine.current_version()) AS adopters
     FROM engine.workflows w WHERE w.status IN ('enqueued', 'running', 'waiting')
     GROUP BY w.version, w.kind ORDER BY w.version NULLS FIRST, w.kind";

/// A workflow's checkpoints in step order.
pub(crate) const WORKFLOW_STEPS: &str =
    "SELECT step_seq, name, output, worker_id, started_at, finished_at
     FROM engine.workflow_steps WHERE workflow_id = $1 ORDER BY step_seq";

/// A workflow's checkpoints in step order, as a replay reads them.
pub(crate) const WORKFLOW_CHECKPOINTS: &str =
    "SELECT step_seq, name, output, finished_at FROM engine.workflow_steps
     WHERE workflow_id = $1 ORDER BY step_seq";

/// Begins a workflow's end before its compensation (`engine.workflow_begin_ending()`).
pub(crate) const BEGIN_ENDING: &str = "SELECT engine.workflow_begin_ending($1, $2, $3, $4, $5)";

/// Locks a workflow's row and reads its status.
pub(crate) const LOCK_STATUS: &str = "SELECT status FROM engine.workflows WHERE id = $1 FOR UPDATE";

/// Starts a workflow (`engine.workflow_start()`); `$7` lets the commit skip its WAL flush.
pub(crate) const START: &str = "SELECT engine.workflow_start($1, $2, $3, $4, $5, $6),
     CASE WHEN $7 THEN set_config('synchronous_commit', 'off', true) END";

// ---- Steps (context/)

/// Writes step checkpoints (`engine.workflow_checkpoint()`), refusing by raising.
pub(crate) const CHECKPOINT: &str =
    "SELECT engine.workflow_checkpoint($1, $2, $3, $4, $5, $6, false)";

/// Parks a sleeping workflow until `$3`, with the job that wakes it then.
pub(crate) const PARK_SLEEP: &str = "UPDATE engine.workflows SET status = 'waiting', owner = NULL, wait_topic = NULL, wait_until = $3,
     wait_job = engine.workflow_enqueue($1, $2, $4, $3, 0, $5), updated_at = now()
     WHERE id = $2";

/// Whether step `$2` was checkpointed, a cancel requested, and the status: why a failed attempt must stop.
pub(crate) const STEP_FENCED_OFF: &str =
    "SELECT EXISTS (SELECT 1 FROM engine.workflow_steps WHERE workflow_id = $1 AND step_seq = $2),
         cancel_requested, status
     FROM engine.workflows WHERE id = $1";

/// Takes a recv's message (`engine.workflow_recv()`), or parks; `$15` lets
/// the commit of a consumed message skip its WAL flush.
pub(crate) const RECV: &str = "SELECT done, message,
     CASE WHEN done AND $15 THEN set_config('synchronous_commit', 'off', true) END
     FROM engine.workflow_recv($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)";

/// Sets events and notifies their waiters (`engine.workflow_set_events()`).
pub(crate) const SET_EVENTS: &str = "SELECT engine.workflow_set_events($1, $2, $3, $4, $5)";

// ---- Executions (runtime/execution.rs)

/// Hands a draining worker's running workflow back to the queue, with a job.
pub(crate) const HAND_BACK: &str = "WITH handed AS (
         UPDATE engine.workflows SET status = 'enqueued', owner = NULL, updated_at = now()
         WHERE id = $2 AND status = 'running')
     SELECT engine.workflow_enqueue($1, $2, $3, NULL, 0, $4)";

/// A job due now for workflow `$1` when it waits for one (enqueued or
/// parked): after a claim refused it (another version's), the job that
/// brought it here is acked, and a worker that may run it takes this one.
pub(crate) const HAND_ON_REFUSED: &str =
    "SELECT engine.workflow_enqueue(queue, id, $2, NULL, 0, $3) FROM engine.workflows
     WHERE id = $1 AND status IN ('enqueued', 'waiting')";

/// Records a terminal status (`engine.workflow_finish()`).
pub(crate) const FINISH: &str = "SELECT engine.workflow_finish($1, $2, $3, $4, $5)";

// ---- Retention (retention.rs, operator.rs)

/// Deletes at most `$3` finished workflows older than their retention
/// (`$1` seconds for succeeded and cancelled ones, `$2` for failed ones;
/// NULL: kept), none a still unfinished workflow was started by; their
/// steps, events and messages cascade.
pub(crate) const DELETE_EXPIRED: &str = "WITH doomed AS (
         SELECT w.id FROM engine.workflows w
         WHERE w.status IN ('succeeded', 'failed', 'cancelled')
           AND w.updated_at < now() - make_interval(
                   secs => CASE WHEN w.status = 'failed' THEN $2::float8 ELSE $1::float8 END)
           AND NOT EXISTS (SELECT FROM engine.workflows c
                           WHERE c.parent_id = w.id AND c.status IN ('enqueued', 'running', 'waiting'))
         ORDER BY w.updated_at LIMIT $3
         FOR UPDATE SKIP LOCKED)
     DELETE FROM engine.workflows w USING doomed WHERE w.id = doomed.id";

/// The tables retention deletes from, vacuumed.
pub(crate) const VACUUM_WORKFLOWS: &str =
    "VACUUM (ANALYZE) engine.workflows, engine.workflow_steps,
     engine.workflow_events, engine.workflow_messages";

/// Deletes workflow `$1` if it has finished and no workflow it started is
/// unfinished; else returns nothing.
pub(crate) const DELETE_FINISHED: &str = "DELETE FROM engine.workflows w
     WHERE w.id = $1 AND w.status IN ('succeeded', 'failed', 'cancelled')
       AND NOT EXISTS (SELECT FROM engine.workflows c
                       WHERE c.parent_id = w.id AND c.status IN ('enqueued', 'running', 'waiting'))
     RETURNING w.id";

/// A workflow's status and whether a workflow it started is unfinished.
pub(crate) const STATUS_AND_CHILDREN: &str =
    "SELECT w.status, EXISTS (SELECT FROM engine.workflows c
         WHERE c.parent_id = w.id AND c.status IN ('enqueued', 'running', 'waiting'))
     FROM engine.workflows w WHERE w.id = $1";

// ---- The fleet registry (fleet.rs)

/// The live workers, oldest first.
pub(crate) const LIST_WORKERS: &str =
    "SELECT id, host, pid, queues, version, adopts, started_at, last_seen, in_flight, draining
     FROM engine.workers ORDER BY started_at, id";

/// A worker's heartbeat (no row: the worker was reaped).
pub(crate) const HEARTBEAT: &str =
    "UPDATE engine.workers SET last_seen = now(), in_flight = $2, draining = $3 WHERE id = $1";

/// Registers a worker process.
pub(crate) const REGISTER_WORKER: &str =
    "INSERT INTO engine.workers (id, host, pid, queues, lock_key, version, adopts, started_at)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
     ON CONFLICT (id) DO UPDATE SET last_seen = now()";

/// The other workers, each with whether it is dead (its advisory lock free, or its heartbeat stale).
pub(crate) const PEERS: &str = "SELECT id, queues, draining,
         last_seen < now() - make_interval(secs => $2) OR pg_try_advisory_xact_lock(lock_key),
         extract(epoch FROM now() - last_seen)::float8
     FROM engine.workers WHERE id <> $1";

/// Removes workers from the registry.
pub(crate) const FORGET_WORKERS: &str = "DELETE FROM engine.workers WHERE id = ANY($1)";

/// Hands the running workflows of the given workers back to the queue (their
/// jobs follow); with `$2` (the workers died), keeps their last heartbeat as
/// the workflows' `orphaned_at`.
pub(crate) const DISOWN_RUNNING: &str =
    "UPDATE engine.workflows w SET status = 'enqueued', owner = NULL, updated_at = now(),
         orphaned_at = CASE WHEN $2 THEN (SELECT k.last_seen FROM engine.workers k WHERE k.id = w.owner) END
     WHERE w.owner = ANY($1) AND w.status = 'running'
     RETURNING w.id, w.queue";

/// Clears the given workers as owners of anything else.
pub(crate) const DISOWN: &str = "UPDATE engine.workflows SET owner = NULL WHERE owner = ANY($1)";

/// The running workflows a worker has owned since before `$2` seconds ago.
pub(crate) const OWNED_RUNNING: &str = "SELECT id FROM engine.workflows
     WHERE owner = $1 AND status = 'running'
       AND updated_at < now() - make_interval(secs => $2)";

/// Hands back those of them still running and unclaimed since.
pub(crate) const HAND_BACK_LOST: &str =
    "UPDATE engine.workflows SET status = 'enqueued', owner = NULL, updated_at = now()
     WHERE id = ANY($1) AND owner = $2 AND status = 'running'
       AND updated_at < now() - make_interval(secs => $3)
     RETURNING id, queue";

/// Removes a worker from the registry.
pub(crate) const DELETE_WORKER: &str = "DELETE FROM engine.workers WHERE id = $1";

// ---- A statement step (context/statement.rs, `step::Statement`) and
// batches of them (batch.rs, `Statement::for_each`). The step's own statement comes first; the
// engine's parameters follow its own, so placeholders are given.

/// A step's statement and its checkpoint as one statement: `effect` (the
/// step's SQL) in a `WITH`, then `engine.workflow_checkpoint()` with the
/// checkpoint placeholders `[id, seqs, names, outputs, worker, starts]`
/// (the step's output appended to `outputs`), then `also` (more columns).
/// `input` is a `for_each` statement's one-row input, or empty.
///
/// The checkout's `mark_paid` (the statement, `.start`, two `.event`s and
/// `.ends_workflow`) is sent as:
///
/// ```text
/// WITH effect AS (UPDATE orders SET status = 'PAID' ... WHERE id = $1 ... RETURNING true AS output),
///      outcome AS (SELECT (SELECT to_jsonb(output) FROM effect) AS output)
/// SELECT outcome.output,
///     engine.workflow_checkpoint($2, $3, $4, array_append($5::jsonb[], coalesce(outcome.output, 'null'::jsonb)), $6, $7, false),
///     engine.workflow_set_events($2, $8, $9, $10, $11),
///     engine.workflow_start($12, $13, $14, $15, $16, $17, $18, $19) AS started, now() AS started_at,
///     engine.workflow_finish($2, 'succeeded', $20, NULL, 0)
/// FROM outcome
/// ```
pub(crate) fn step_with_checkpoint(
    input: &str,
    effect: &str,
    [id, seqs, names, outputs, worker, starts]: [&str; 6],
    also: &str,
) -> String {
    format!(
        "WITH {input} effect AS ({effect}),
              outcome AS (SELECT (SELECT to_jsonb(output) FROM effect) AS output)
         SELECT outcome.output, engine.workflow_checkpoint({id}, {seqs}, {names},
             array_append({outputs}::jsonb[], coalesce(outcome.output, 'null'::jsonb)),
             {worker}, {starts}, false){also}
         FROM outcome"
    )
}

/// A column that publishes the step's events (keys, values, channel,
/// payloads: the four placeholders in `list`).
pub(crate) fn step_events(id: &str, list: &str) -> String {
    format!(", engine.workflow_set_events({id}, {list})")
}

/// Columns that start a workflow with the step (its eight placeholders in
/// `list`): whether it started, and when.
pub(crate) fn step_start(list: &str) -> String {
    format!(", engine.workflow_start({list}) AS started, now() AS started_at")
}

/// A column that ends the workflow with the step, succeeded with the
/// output `$output`.
pub(crate) fn step_finish(id: &str, output: &str) -> String {
    format!(", engine.workflow_finish({id}, 'succeeded', {output}, NULL, 0)")
}

/// A column that lets the commit skip its WAL flush when `$flag` is true.
pub(crate) fn skip_flush_if(flag: &str) -> String {
    format!(", CASE WHEN {flag} THEN set_config('synchronous_commit', 'off', true) END")
}

/// A `for_each` statement's `input` when its step runs alone: one row.
pub(crate) fn one_step_input(id: &str, arg: &str) -> String {
    format!("input AS (SELECT {id}::text AS workflow_id, {arg}::jsonb AS arg),")
}

/// The statement of a batch: the step statement over `input`, one row per
/// step, and their checkpoints, written only for a workflow neither
/// cancelled nor finished and a step no other execution wrote (what
/// `workflow_checkpoint()` refuses, raising, for a step alone); a step
/// with a `finish` output then ends its workflow. It returns the
/// checkpoints written; fewer than the steps, and the batch is rolled back.
pub(crate) fn batch_statement(sql: &str) -> String {
    format!(
        "WITH input AS (
             SELECT * FROM unnest($1::text[], $2::jsonb[], $3::integer[], $4::text[], $5::timestamptz[], $7::jsonb[])
                 AS i(workflow_id, arg, step_seq, name, started_at, finish)),
         effect AS ({sql}),
         checkpoint AS (
             INSERT INTO engine.workflow_steps
                 (workflow_id, step_seq, name, output, worker_id, started_at, finished_at)
             SELECT i.workflow_id, i.step_seq, i.name,
                 coalesce((SELECT to_jsonb(e.output) FROM effect e WHERE e.workflow_id = i.workflow_id), 'null'::jsonb),
                 $6, i.started_at, clock_timestamp()
             FROM input i JOIN engine.workflows w ON w.id = i.workflow_id
             WHERE NOT w.cancel_requested AND w.status NOT IN ('succeeded', 'failed', 'cancelled')
             ON CONFLICT DO NOTHING
             RETURNING workflow_id, output)
         SELECT c.workflow_id, c.output,
             CASE WHEN i.finish IS NOT NULL
                 THEN engine.workflow_finish(c.workflow_id, 'succeeded', i.finish, NULL, 0) END
         FROM checkpoint c JOIN input i ON i.workflow_id = c.workflow_id"
    )
}
