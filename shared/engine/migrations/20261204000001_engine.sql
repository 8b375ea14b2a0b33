-- The durable workflow engine's schema: one baseline, one definition of each
-- function. Every object lives in the schema `engine`, except what the
-- engine adds to apalis-postgres' own `apalis` schema (which apalis'
-- migrations create first: see engine::run_migrations). Everything here is
-- what the engine's code (src/sql.rs names it for the rest of the crate)
-- relies on; nothing else writes to these tables.

-- Workflows, their checkpoints, messages and events, and the fleet.

CREATE TABLE engine.workflows (
    id               text PRIMARY KEY,
    kind             text NOT NULL,
    queue            text NOT NULL,
    status           text NOT NULL DEFAULT 'enqueued'
        CONSTRAINT workflows_status_check
        CHECK (status IN ('enqueued', 'running', 'waiting', 'succeeded', 'failed', 'cancelled')),
    input            jsonb NOT NULL,
    output           jsonb,
    error            text,
    -- failed attempts counted against the retry policy
    attempts         integer NOT NULL DEFAULT 0,
    -- executions started (a crash loop shows here)
    executions       integer NOT NULL DEFAULT 0,
    -- the worker process running it now (NULL when parked or finished)
    owner            text,
    cancel_requested boolean NOT NULL DEFAULT false,
    wait_topic       text,
    wait_until       timestamptz,
    -- the scheduled job a parked workflow waits with (its deadline or
    -- wake-up time): a message makes that job due now
    wait_job         text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX workflows_active_idx ON engine.workflows (status)
    WHERE status IN ('enqueued', 'running', 'waiting');
CREATE INDEX workflows_owner_idx ON engine.workflows (owner) WHERE owner IS NOT NULL;

-- One checkpoint per completed step. The primary key is the fence: two
-- executions of one workflow can never both commit step N.
CREATE TABLE engine.workflow_steps (
    workflow_id text NOT NULL REFERENCES engine.workflows (id) ON DELETE CASCADE,
    step_seq    integer NOT NULL,
    name        text NOT NULL,
    output      jsonb NOT NULL,
    worker_id   text,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workflow_id, step_seq)
);

CREATE TABLE engine.workflow_messages (
    id          bigserial PRIMARY KEY,
    workflow_id text NOT NULL REFERENCES engine.workflows (id) ON DELETE CASCADE,
    topic       text NOT NULL,
    payload     jsonb NOT NULL,
    message_key text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    consumed_at timestamptz,
    CONSTRAINT workflow_messages_key_unique UNIQUE (workflow_id, message_key)
);

CREATE INDEX workflow_messages_pending_idx ON engine.workflow_messages (workflow_id, topic, id)
    WHERE consumed_at IS NULL;

CREATE TABLE engine.workflow_events (
    workflow_id text NOT NULL REFERENCES engine.workflows (id) ON DELETE CASCADE,
    key         text NOT NULL,
    value       jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workflow_id, key)
);

-- The fleet: one row per live worker process. Each process holds the session
-- advisory lock `lock_key` for its whole life; a free lock means a dead process.
CREATE TABLE engine.workers (
    id         text PRIMARY KEY,
    host       text NOT NULL,
    pid        integer NOT NULL,
    queues     text[] NOT NULL,
    lock_key   bigint NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    last_seen  timestamptz NOT NULL DEFAULT now(),
    in_flight  integer NOT NULL DEFAULT 0,
    draining   boolean NOT NULL DEFAULT false
);

-- A workflow job, inserted by a function any statement can call: starting a
-- workflow is one statement (its row and its job), and so is parking one
-- (its status and its wake-up job). The row is the one apalis' push_tasks
-- writes, with the exact run_at. apalis' insert trigger notifies for a job
-- due now. PL/pgSQL keeps the INSERT's plan for the session (a LANGUAGE sql
-- function would be planned on every call).
CREATE FUNCTION engine.workflow_enqueue(
    p_queue text,
    p_workflow_id text,
    p_job_id text,
    p_run_at timestamptz,
    p_priority integer,
    p_max_attempts integer
) RETURNS text
LANGUAGE plpgsql
VOLATILE
AS $$
BEGIN
    INSERT INTO apalis.jobs (id, job_type, job, status, attempts, max_attempts, run_at, priority)
    VALUES (
        p_job_id,
        p_queue,
        convert_to(json_build_object('workflow_id', p_workflow_id)::text, 'UTF8'),
        'Pending',
        0,
        p_max_attempts,
        coalesce(p_run_at, now()),
        p_priority
    );
    RETURN p_job_id;
END;
$$;

-- The engine's one checkpoint insert, used by every step. It writes the
-- checkpoints `p_seqs` (an in-process sleep's rides with the next step's)
-- unless the workflow was cancelled or has finished, and raises
--   WF001 when one of them is there already: another execution won the step
--         (fenced; the message names the step),
--   WF002 when a cancel was requested,
--   WF003 when the workflow has finished (the message is its status),
--   WF004 when the workflow row is gone.
-- It refuses by raising so that a one-statement step's own effect is undone
-- with it. With `p_lock` it also locks the workflow row (a recv about to
-- park).
CREATE FUNCTION engine.workflow_checkpoint(
    p_workflow_id text,
    p_seqs integer[],
    p_names text[],
    p_outputs jsonb[],
    p_worker_id text,
    p_starts timestamptz[],
    p_lock boolean
) RETURNS boolean
LANGUAGE plpgsql
VOLATILE
AS $$
DECLARE
    v_status text;
    v_cancel_requested boolean;
    v_inserted bigint;
BEGIN
    IF p_lock THEN
        SELECT status, cancel_requested INTO v_status, v_cancel_requested
        FROM engine.workflows WHERE id = p_workflow_id FOR UPDATE;
    ELSE
        SELECT status, cancel_requested INTO v_status, v_cancel_requested
        FROM engine.workflows WHERE id = p_workflow_id;
    END IF;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'workflow row disappeared' USING ERRCODE = 'WF004';
    END IF;
    IF v_cancel_requested THEN
        RAISE EXCEPTION 'cancel requested' USING ERRCODE = 'WF002';
    END IF;
    IF v_status IN ('succeeded', 'failed', 'cancelled') THEN
        RAISE EXCEPTION '%', v_status USING ERRCODE = 'WF003';
    END IF;
    -- clock_timestamp(), not now(): the transaction may have begun steps
    -- earlier.
    INSERT INTO engine.workflow_steps
        (workflow_id, step_seq, name, output, worker_id, started_at, finished_at)
    SELECT p_workflow_id, c.step_seq, c.name, c.output, p_worker_id, c.started_at, clock_timestamp()
    FROM unnest(p_seqs, p_names, p_outputs, p_starts) AS c(step_seq, name, output, started_at)
    ON CONFLICT DO NOTHING;
    GET DIAGNOSTICS v_inserted = ROW_COUNT;
    IF v_inserted < cardinality(p_seqs) THEN
        RAISE EXCEPTION 'step % was checkpointed by another execution', p_seqs[cardinality(p_seqs)]
            USING ERRCODE = 'WF001';
    END IF;
    RETURN true;
END;
$$;

-- Starting a workflow in one call: Engine::start and Engine::start_in call
-- it, and so does a step statement that starts a child. Inserts the
-- workflow row and, when it is new, its job, and returns whether it was new.
-- An id taken by a workflow of another kind raises WF005 (the message is
-- that kind); the kind read after a conflict is a statement of its own
-- inside this VOLATILE function, so it sees a row a concurrent start
-- committed while the insert waited. With `p_owner`, a new workflow starts
-- claimed by that worker (running, one execution) and no job is enqueued:
-- should that worker die, the reaper hands it to the queue as it does every
-- running workflow of a dead worker.
CREATE FUNCTION engine.workflow_start(
    p_id text,
    p_kind text,
    p_queue text,
    p_input jsonb,
    p_job_id text,
    p_max_attempts integer,
    p_owner text DEFAULT NULL
) RETURNS boolean
LANGUAGE plpgsql
VOLATILE
AS $$
DECLARE
    v_kind text;
BEGIN
    IF p_owner IS NULL THEN
        INSERT INTO engine.workflows (id, kind, queue, input) VALUES (p_id, p_kind, p_queue, p_input)
        ON CONFLICT (id) DO NOTHING;
    ELSE
        INSERT INTO engine.workflows (id, kind, queue, input, status, owner, executions)
        VALUES (p_id, p_kind, p_queue, p_input, 'running', p_owner, 1)
        ON CONFLICT (id) DO NOTHING;
    END IF;
    IF FOUND THEN
        IF p_owner IS NULL THEN
            PERFORM engine.workflow_enqueue(p_queue, p_id, p_job_id, NULL, 0, p_max_attempts);
        END IF;
        RETURN true;
    END IF;
    SELECT w.kind INTO v_kind FROM engine.workflows w WHERE w.id = p_id;
    IF v_kind IS DISTINCT FROM p_kind THEN
        RAISE EXCEPTION '%', coalesce(v_kind, 'none') USING ERRCODE = 'WF005';
    END IF;
    RETURN false;
END;
$$;

-- Ending a workflow in one call: the runtime calls it when an execution
-- ends, and so does a workflow's final step statement. Records a terminal
-- status (with the output or the error) unless the workflow has one
-- already, and returns whether it did.
CREATE FUNCTION engine.workflow_finish(
    p_workflow_id text,
    p_status text,
    p_output jsonb,
    p_error text,
    p_attempts integer
) RETURNS boolean
LANGUAGE plpgsql
VOLATILE
AS $$
BEGIN
    UPDATE engine.workflows SET status = p_status, output = p_output, error = p_error,
        attempts = p_attempts, owner = NULL, wait_topic = NULL, wait_until = NULL,
        updated_at = now()
    WHERE id = p_workflow_id AND status NOT IN ('succeeded', 'failed', 'cancelled');
    RETURN FOUND;
END;
$$;

-- Delivering a message (Engine::send) in one statement: lock the workflow,
-- drop a duplicate (same key), refuse a finished workflow, store the
-- message and, when the workflow is parked, make its wake-up job due now
-- (or enqueue one if that job is gone). Returns what happened and, for a
-- duplicate, the payload that was kept.
CREATE FUNCTION engine.workflow_send(
    p_workflow_id text,
    p_topic text,
    p_payload jsonb,
    p_key text,
    p_job_id text,
    p_max_attempts integer,
    OUT outcome text,
    OUT status text,
    OUT kept jsonb
)
LANGUAGE plpgsql
VOLATILE
AS $$
DECLARE
    v_queue text;
    v_wait_job text;
BEGIN
    -- The row lock orders this send against the workflow's own "no message
    -- yet, park" transaction: one of them sees the other.
    SELECT w.status, w.queue, w.wait_job INTO status, v_queue, v_wait_job
    FROM engine.workflows w WHERE w.id = p_workflow_id FOR UPDATE;
    IF NOT FOUND THEN
        outcome := 'unknown';
        RETURN;
    END IF;
    IF p_key IS NOT NULL THEN
        SELECT m.payload INTO kept FROM engine.workflow_messages m
        WHERE m.workflow_id = p_workflow_id AND m.message_key = p_key;
        IF FOUND THEN
            outcome := 'duplicate';
            RETURN;
        END IF;
    END IF;
    IF status IN ('succeeded', 'failed', 'cancelled') THEN
        outcome := 'finished';
        RETURN;
    END IF;
    INSERT INTO engine.workflow_messages (workflow_id, topic, payload, message_key)
    VALUES (p_workflow_id, p_topic, p_payload, p_key);
    IF status = 'waiting' THEN
        UPDATE engine.workflows SET status = 'enqueued', wait_topic = NULL, wait_until = NULL,
            updated_at = now()
        WHERE id = p_workflow_id;
        UPDATE apalis.jobs SET run_at = now() WHERE id = v_wait_job AND apalis.jobs.status = 'Pending';
        IF FOUND THEN
            -- apalis' insert trigger notifies only for new jobs: wake the
            -- queue's workers as it would.
            PERFORM pg_notify('apalis::job::insert',
                json_build_object('job_type', v_queue, 'id', v_wait_job)::text);
        ELSE
            PERFORM engine.workflow_enqueue(v_queue, p_workflow_id, p_job_id, NULL, 0, p_max_attempts);
        END IF;
    END IF;
    outcome := 'delivered';
END;
$$;

-- A recv in one call: write the checkpoints given (a new deadline's; none
-- when an earlier execution wrote it), lock the workflow row (refusing, as
-- engine.workflow_checkpoint() does, a cancelled or finished workflow), then
-- consume the oldest message on the topic. Found, or the deadline has
-- passed: checkpoint the outcome ({"message": ...}, null when timed out)
-- and return done. Otherwise park until the deadline with the job that
-- wakes it then, and return not done. The lock comes before the look:
-- engine.workflow_send() locks the row too, so either this look sees the
-- message or the send sees the workflow parked and makes its job due.
CREATE FUNCTION engine.workflow_recv(
    p_workflow_id text,
    p_topic text,
    p_deadline timestamptz,
    p_seqs integer[],
    p_names text[],
    p_outputs jsonb[],
    p_starts timestamptz[],
    p_seq integer,
    p_name text,
    p_started timestamptz,
    p_worker_id text,
    p_queue text,
    p_job_id text,
    p_max_attempts integer,
    OUT done boolean,
    OUT message jsonb
)
LANGUAGE plpgsql
VOLATILE
AS $$
BEGIN
    PERFORM engine.workflow_checkpoint(p_workflow_id, p_seqs, p_names, p_outputs, p_worker_id, p_starts, true);
    UPDATE engine.workflow_messages SET consumed_at = now()
    WHERE id = (SELECT m.id FROM engine.workflow_messages m
                WHERE m.workflow_id = p_workflow_id AND m.topic = p_topic AND m.consumed_at IS NULL
                ORDER BY m.id LIMIT 1 FOR UPDATE)
    RETURNING payload INTO message;
    done := FOUND OR clock_timestamp() >= p_deadline;
    IF done THEN
        PERFORM engine.workflow_checkpoint(p_workflow_id, ARRAY[p_seq], ARRAY[p_name],
            ARRAY[jsonb_build_object('message', message)], p_worker_id, ARRAY[p_started], false);
        RETURN;
    END IF;
    UPDATE engine.workflows SET status = 'waiting', owner = NULL, wait_topic = p_topic,
        wait_until = p_deadline,
        wait_job = engine.workflow_enqueue(p_queue, p_workflow_id, p_job_id, p_deadline, 0, p_max_attempts),
        updated_at = now()
    WHERE id = p_workflow_id;
END;
$$;

-- Events in one call: upsert each (their keys must differ) and notify its
-- waiters with the payload given; the notifications go out when the
-- transaction commits. Returns how many were set.
CREATE FUNCTION engine.workflow_set_events(
    p_workflow_id text,
    p_keys text[],
    p_values jsonb[],
    p_channel text,
    p_payloads text[]
) RETURNS integer
LANGUAGE plpgsql
VOLATILE
AS $$
BEGIN
    INSERT INTO engine.workflow_events (workflow_id, key, value)
    SELECT p_workflow_id, e.key, e.value FROM unnest(p_keys, p_values) AS e(key, value)
    ON CONFLICT (workflow_id, key) DO UPDATE SET value = EXCLUDED.value, created_at = now();
    PERFORM pg_notify(p_channel, n.payload) FROM unnest(p_payloads) AS n(payload);
    RETURN cardinality(p_keys);
END;
$$;

-- What the engine changes in apalis' queue (see src/queue.rs).

-- apalis.jobs takes one insert and several updates per job and is pruned of
-- finished jobs by the workers' janitor: vacuum it much sooner than the
-- default 20 % of the table so dead rows never pile up under load.
ALTER TABLE apalis.jobs SET (
    autovacuum_vacuum_scale_factor = 0.0,
    autovacuum_vacuum_threshold = 5000,
    autovacuum_analyze_scale_factor = 0.05,
    fillfactor = 80
);

-- apalis' own migrations leave two indexes twice (the job id and lock_by):
-- every insert, fetch and ack wrote both copies.
DROP INDEX IF EXISTS apalis.unique_job_id;
DROP INDEX IF EXISTS apalis.lidx;

-- apalis' fetch, in PL/pgSQL (PostgreSQL before 18 plans a LANGUAGE sql
-- function's UPDATE on every call), leaving a job alone for its first
-- 100 ms of being due: a job due now is announced on 'apalis::job::insert'
-- and one worker takes it from that notification (src/queue.rs,
-- NOTIFIED_JOB_GRACE, knows the same figure); the fetch is for scheduled
-- jobs, orphans, and what no notified worker took.
CREATE OR REPLACE FUNCTION apalis.get_jobs(
    worker_id TEXT,
    v_job_type TEXT,
    v_job_count INTEGER DEFAULT 5
)
RETURNS SETOF apalis.jobs
LANGUAGE plpgsql
VOLATILE
AS $$
BEGIN
    RETURN QUERY
    WITH jobs AS (
        SELECT id
        FROM apalis.jobs
        WHERE
            (
                status = 'Pending'
                OR (
                    status = 'Failed'
                    AND attempts < max_attempts
                )
            )
            AND run_at < now() - interval '100 milliseconds'
            AND job_type = v_job_type
        ORDER BY priority DESC, run_at ASC
        LIMIT v_job_count
        FOR UPDATE SKIP LOCKED
    )
    UPDATE apalis.jobs j
    SET
        status = 'Queued',
        lock_by = worker_id,
        lock_at = now()
    FROM jobs
    WHERE j.id = jobs.id
    RETURNING j.*;
END;
$$;

-- A finished job lets go of its worker: apalis' ack finds the jobs to
-- complete through the lock_by index, and a finished job kept its worker's
-- name there forever, so each ack scanned every job its worker ever ran.
-- Nothing reads lock_by of a finished job.
CREATE FUNCTION apalis.release_finished_job_lock() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.lock_by := NULL;
    RETURN NEW;
END;
$$;

CREATE TRIGGER release_finished_job_lock
    BEFORE UPDATE OF status ON apalis.jobs
    FOR EACH ROW
    WHEN (NEW.status IN ('Done', 'Failed', 'Killed') AND NEW.lock_by IS NOT NULL)
    EXECUTE FUNCTION apalis.release_finished_job_lock();

UPDATE apalis.jobs SET lock_by = NULL
WHERE status IN ('Done', 'Failed', 'Killed') AND lock_by IS NOT NULL;
