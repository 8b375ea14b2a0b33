-- A workflow started by a step may run on the worker whose step started it,
-- claimed by the start itself (StepStatement::start): a paid checkout's
-- mark_paid starts the order's dispatch so. The dispatch then needs no job,
-- no notification and no claim of its own: three writes and a round trip
-- fewer per paid order.
--
-- workflow_start() gains `p_owner`. With it, a new workflow's row is
-- inserted as its claim leaves it (running, owned by that worker, one
-- execution) and no job is enqueued: should that worker die, the reaper
-- hands the workflow back to the queue as it does every running workflow
-- of a dead worker. Without it (NULL, the default), as before.
DROP FUNCTION workflow_start(text, text, text, jsonb, text, integer);

CREATE FUNCTION workflow_start(
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
        INSERT INTO workflows (id, kind, queue, input) VALUES (p_id, p_kind, p_queue, p_input)
        ON CONFLICT (id) DO NOTHING;
    ELSE
        INSERT INTO workflows (id, kind, queue, input, status, owner, executions)
        VALUES (p_id, p_kind, p_queue, p_input, 'running', p_owner, 1)
        ON CONFLICT (id) DO NOTHING;
    END IF;
    IF FOUND THEN
        IF p_owner IS NULL THEN
            PERFORM workflow_enqueue(p_queue, p_id, p_job_id, NULL, 0, p_max_attempts);
        END IF;
        RETURN true;
    END IF;
    SELECT w.kind INTO v_kind FROM workflows w WHERE w.id = p_id;
    IF v_kind IS DISTINCT FROM p_kind THEN
        RAISE EXCEPTION '%', coalesce(v_kind, 'none') USING ERRCODE = 'WF005';
    END IF;
    RETURN false;
END;
$$;
