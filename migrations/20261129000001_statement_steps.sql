-- A step whose effect is one SQL statement can be committed in one round
-- trip: its statement and its checkpoint become one autocommit statement
-- (WorkflowContext::sql_step). Nothing can roll such a statement back
-- from outside once it runs, so the checkpoint must refuse by raising: the
-- error aborts the statement, and the step's effect with it.
--
-- workflow_checkpoint() is the engine's one checkpoint insert, used by
-- every step (tx_step, step, recv, sleep, sql_step). It writes the
-- checkpoints `p_seqs` (an in-process sleep's rides with the next step's)
-- unless the workflow was cancelled or has finished, and raises
--   WF001 when one of them is there already: another execution won the step
--         (fenced; the message names the step),
--   WF002 when a cancel was requested,
--   WF003 when the workflow has finished (the message is its status),
--   WF004 when the workflow row is gone.
-- With `p_lock` it also locks the workflow row (a recv about to park).
-- PL/pgSQL keeps the plans of its statements for the session.
CREATE FUNCTION workflow_checkpoint(
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
        FROM workflows WHERE id = p_workflow_id FOR UPDATE;
    ELSE
        SELECT status, cancel_requested INTO v_status, v_cancel_requested
        FROM workflows WHERE id = p_workflow_id;
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
    INSERT INTO workflow_steps
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
