-- Ending a workflow in one call, which any statement can make: the runtime
-- calls it when an execution ends, and so does a workflow's last step
-- statement (WorkflowContext::final_sql_step): a paid checkout's mark_paid
-- and a dispatch's tenth step end their workflow in their own statement,
-- one flushed commit fewer for each.
--
-- workflow_finish() records a terminal status (with the output or the
-- error) unless the workflow has one already, and returns whether it did.
CREATE FUNCTION workflow_finish(
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
    UPDATE workflows SET status = p_status, output = p_output, error = p_error,
        attempts = p_attempts, owner = NULL, wait_topic = NULL, wait_until = NULL,
        updated_at = now()
    WHERE id = p_workflow_id AND status NOT IN ('succeeded', 'failed', 'cancelled');
    RETURN FOUND;
END;
$$;
