-- Round trips, measured on this kind of machine (docs/benchmarks/profile.md):
-- one costs about 150 µs when the cores are idle, and a checkout at one
-- client is a chain of about 25 of them. The engine's queue writes now ride
-- inside the statement that needs them instead of costing statements of
-- their own.

-- 1. A workflow job, inserted by a function that any statement can call:
--    starting a workflow is one statement (the workflow row and its job),
--    and so is parking one (its status and its wake-up job). The row is the
--    one apalis' push_tasks writes, with the exact run_at (push_tasks keeps
--    whole seconds). apalis' insert trigger notifies for a job due now.
--    PL/pgSQL keeps the INSERT's plan for the session (a LANGUAGE sql
--    function would be planned on every call: see 20261125000001).
CREATE FUNCTION workflow_enqueue(
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

-- 2. apalis' own migrations leave two indexes twice: the job id (the
--    primary key and unique_job_id) and lock_by (lidx and
--    idx_apalis_jobs_lock_by). Every job insert, fetch and ack wrote both
--    copies.
DROP INDEX IF EXISTS apalis.unique_job_id;
DROP INDEX IF EXISTS apalis.lidx;

-- 3. Delivering a message (Engine::send) in one statement: lock the
--    workflow, drop a duplicate (same key), refuse a finished workflow, store
--    the message and, when the workflow is parked, make its wake-up job due
--    now (or enqueue one if that job is gone). It was seven round trips on a
--    payment webhook's path. Returns what happened and, for a duplicate, the
--    payload that was kept.
CREATE FUNCTION workflow_send(
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
    FROM workflows w WHERE w.id = p_workflow_id FOR UPDATE;
    IF NOT FOUND THEN
        outcome := 'unknown';
        RETURN;
    END IF;
    IF p_key IS NOT NULL THEN
        SELECT m.payload INTO kept FROM workflow_messages m
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
    INSERT INTO workflow_messages (workflow_id, topic, payload, message_key)
    VALUES (p_workflow_id, p_topic, p_payload, p_key);
    IF status = 'waiting' THEN
        UPDATE workflows SET status = 'enqueued', wait_topic = NULL, wait_until = NULL,
            updated_at = now()
        WHERE id = p_workflow_id;
        UPDATE apalis.jobs SET run_at = now() WHERE id = v_wait_job AND apalis.jobs.status = 'Pending';
        IF FOUND THEN
            -- apalis' insert trigger notifies only for new jobs: wake the
            -- queue's workers as it would.
            PERFORM pg_notify('apalis::job::insert',
                json_build_object('job_type', v_queue, 'id', v_wait_job)::text);
        ELSE
            PERFORM workflow_enqueue(v_queue, p_workflow_id, p_job_id, NULL, 0, p_max_attempts);
        END IF;
    END IF;
    outcome := 'delivered';
END;
$$;
