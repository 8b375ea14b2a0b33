-- Retention: finished workflows are deleted after a while (their steps,
-- events and messages go with them, ON DELETE CASCADE), never while a
-- workflow they started is unfinished: a workflow started by a step
-- records its parent.
ALTER TABLE engine.workflows ADD COLUMN parent_id text;

-- Its indexes are built without blocking writes by the next two migrations.

-- workflow_start() with the parent (the workflow whose step starts it).
DROP FUNCTION engine.workflow_start(text, text, text, jsonb, text, integer, text);
CREATE FUNCTION engine.workflow_start(
    p_id text,
    p_kind text,
    p_queue text,
    p_input jsonb,
    p_job_id text,
    p_max_attempts integer,
    p_owner text DEFAULT NULL,
    p_parent text DEFAULT NULL
) RETURNS boolean
LANGUAGE plpgsql
VOLATILE
AS $$
DECLARE
    v_kind text;
BEGIN
    IF p_owner IS NULL THEN
        INSERT INTO engine.workflows (id, kind, queue, input, parent_id)
        VALUES (p_id, p_kind, p_queue, p_input, p_parent)
        ON CONFLICT (id) DO NOTHING;
    ELSE
        INSERT INTO engine.workflows (id, kind, queue, input, status, owner, executions, version, parent_id)
        VALUES (p_id, p_kind, p_queue, p_input, 'running', p_owner, 1,
                (SELECT k.version FROM engine.workers k WHERE k.id = p_owner), p_parent)
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
