-- A workflow's own end: a cancel is delivered to the workflow, and a
-- workflow cancelled or failed for good runs its compensation before it
-- takes that status (src/runtime/ending.rs). Also what the admin API lists
-- workflows by.

-- While a compensation runs, the end it leads to ('cancelled' or 'failed');
-- the error of a failure is in `error` meanwhile. A step named '$ending'
-- marks where the workflow's own steps stopped and the compensation's begin.
ALTER TABLE engine.workflows ADD COLUMN ending text
    CONSTRAINT workflows_ending_check CHECK (ending IN ('cancelled', 'failed'));

-- Newest first, keyset-paginated (the admin list).
CREATE INDEX workflows_created_idx ON engine.workflows (created_at DESC, id DESC);

-- Makes a parked workflow's wake-up job due now, or enqueues one if that job
-- is gone, and marks the workflow enqueued. The caller holds its row lock.
CREATE FUNCTION engine.workflow_wake(
    p_workflow_id text,
    p_queue text,
    p_wait_job text,
    p_job_id text,
    p_max_attempts integer
) RETURNS void
LANGUAGE plpgsql
VOLATILE
AS $$
BEGIN
    UPDATE engine.workflows SET status = 'enqueued', wait_topic = NULL, wait_until = NULL,
        updated_at = now()
    WHERE id = p_workflow_id;
    UPDATE apalis.jobs SET run_at = now() WHERE id = p_wait_job AND apalis.jobs.status = 'Pending';
    IF FOUND THEN
        -- apalis' insert trigger notifies only for new jobs: wake the
        -- queue's workers as it would.
        PERFORM pg_notify('apalis::job::insert',
            json_build_object('job_type', p_queue, 'id', p_wait_job)::text);
    ELSE
        PERFORM engine.workflow_enqueue(p_queue, p_workflow_id, p_job_id, NULL, 0, p_max_attempts);
    END IF;
END;
$$;

-- engine.workflow_send() as before, waking a parked workflow through
-- engine.workflow_wake().
CREATE OR REPLACE FUNCTION engine.workflow_send(
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
        PERFORM engine.workflow_wake(p_workflow_id, v_queue, v_wait_job, p_job_id, p_max_attempts);
    END IF;
    outcome := 'delivered';
END;
$$;

-- A cancel request (Engine::cancel): flags the workflow, whose next step
-- (or, parked, its wake-up made due now) delivers it. Returns the status,
-- or 'ending' when its compensation already runs; a finished workflow is
-- left alone. NULL: no such workflow.
CREATE FUNCTION engine.workflow_cancel(
    p_workflow_id text,
    p_job_id text,
    p_max_attempts integer
) RETURNS text
LANGUAGE plpgsql
VOLATILE
AS $$
DECLARE
    v_status text;
    v_ending text;
    v_queue text;
    v_wait_job text;
BEGIN
    SELECT w.status, w.ending, w.queue, w.wait_job INTO v_status, v_ending, v_queue, v_wait_job
    FROM engine.workflows w WHERE w.id = p_workflow_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF v_status IN ('succeeded', 'failed', 'cancelled') THEN
        RETURN v_status;
    END IF;
    IF v_ending IS NOT NULL THEN
        RETURN 'ending';
    END IF;
    UPDATE engine.workflows SET cancel_requested = true, updated_at = now() WHERE id = p_workflow_id;
    IF v_status = 'waiting' THEN
        PERFORM engine.workflow_wake(p_workflow_id, v_queue, v_wait_job, p_job_id, p_max_attempts);
    END IF;
    RETURN v_status;
END;
$$;

-- The end of a workflow that will not finish, begun (the runtime calls it
-- when a cancel reaches the workflow or it fails for good): the '$ending'
-- step after its last checkpoint, `ending` set, the cancel request cleared
-- (the compensation's steps must not be refused), the execution count
-- restarted for the compensation, the failure's error and attempts kept.
-- Returns the marker's step number; a
-- second call returns the first one's. Raises WF003 when the workflow has
-- finished, WF004 when its row is gone.
CREATE FUNCTION engine.workflow_begin_ending(
    p_workflow_id text,
    p_ending text,
    p_error text,
    p_attempts integer,
    p_worker_id text
) RETURNS integer
LANGUAGE plpgsql
VOLATILE
AS $$
DECLARE
    v_status text;
    v_ending text;
    v_seq integer;
BEGIN
    SELECT status, ending INTO v_status, v_ending
    FROM engine.workflows WHERE id = p_workflow_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'workflow row disappeared' USING ERRCODE = 'WF004';
    END IF;
    IF v_status IN ('succeeded', 'failed', 'cancelled') THEN
        RAISE EXCEPTION '%', v_status USING ERRCODE = 'WF003';
    END IF;
    IF v_ending IS NOT NULL THEN
        SELECT max(step_seq) INTO v_seq FROM engine.workflow_steps
        WHERE workflow_id = p_workflow_id AND name = '$ending';
        RETURN v_seq;
    END IF;
    SELECT coalesce(max(step_seq) + 1, 0) INTO v_seq
    FROM engine.workflow_steps WHERE workflow_id = p_workflow_id;
    INSERT INTO engine.workflow_steps
        (workflow_id, step_seq, name, output, worker_id, started_at, finished_at)
    VALUES (p_workflow_id, v_seq, '$ending',
        jsonb_build_object('ending', p_ending, 'error', p_error), p_worker_id, now(), now());
    UPDATE engine.workflows SET ending = p_ending, error = p_error, attempts = p_attempts,
        cancel_requested = false, executions = 1, updated_at = now()
    WHERE id = p_workflow_id;
    RETURN v_seq;
END;
$$;

-- engine.workflow_finish() as before, clearing `ending`; with a NULL status,
-- the end a compensation led to (`ending`, its error and attempts kept).
CREATE OR REPLACE FUNCTION engine.workflow_finish(
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
    UPDATE engine.workflows SET status = coalesce(p_status, ending),
        output = p_output, error = CASE WHEN p_status IS NULL THEN error ELSE p_error END,
        attempts = CASE WHEN p_status IS NULL THEN attempts ELSE p_attempts END,
        owner = NULL, wait_topic = NULL, wait_until = NULL, ending = NULL, updated_at = now()
    WHERE id = p_workflow_id AND status NOT IN ('succeeded', 'failed', 'cancelled');
    RETURN FOUND;
END;
$$;
