-- Starting a workflow in one call, which any statement can make: Engine::start
-- and Engine::start_in call it, and so does a step statement that starts a
-- child (StepStatement::start): a paid checkout's mark_paid marks the order
-- paid, starts its dispatch and publishes the settlement in one statement,
-- where it took four round trips.
--
-- workflow_start() inserts the workflow row and, when it is new, its job,
-- and returns whether it was new. An id already taken by a workflow of
-- another kind raises WF005 (the message is that kind). The kind read after
-- a conflict is a statement of its own inside this VOLATILE function, so it
-- sees a row that a concurrent start committed while the insert waited.
CREATE FUNCTION workflow_start(
    p_id text,
    p_kind text,
    p_queue text,
    p_input jsonb,
    p_job_id text,
    p_max_attempts integer
) RETURNS boolean
LANGUAGE plpgsql
VOLATILE
AS $$
DECLARE
    v_kind text;
BEGIN
    INSERT INTO workflows (id, kind, queue, input) VALUES (p_id, p_kind, p_queue, p_input)
    ON CONFLICT (id) DO NOTHING;
    IF FOUND THEN
        PERFORM workflow_enqueue(p_queue, p_id, p_job_id, NULL, 0, p_max_attempts);
        RETURN true;
    END IF;
    SELECT w.kind INTO v_kind FROM workflows w WHERE w.id = p_id;
    IF v_kind IS DISTINCT FROM p_kind THEN
        RAISE EXCEPTION '%', coalesce(v_kind, 'none') USING ERRCODE = 'WF005';
    END IF;
    RETURN false;
END;
$$;
