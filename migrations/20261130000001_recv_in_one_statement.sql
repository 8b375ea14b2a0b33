-- A recv (WorkflowContext::recv) and a step's events in one statement each.
--
-- A checkout's first execution wrote the recv's deadline checkpoint (which
-- locked the workflow row), looked for its message, and parked: three round
-- trips between the order's creation and the commit that hands the shopper
-- the payment id. A resumed recv looked, then checkpointed: two. Round trips
-- are the latency of a checkout at one client and most of PostgreSQL's CPU
-- under load (docs/benchmarks/profile.md), so the whole recv is one call.

-- 1. A recv in one call: write the checkpoints given (the in-process sleeps'
--    before it and a new deadline's; none when the deadline was written by
--    an earlier execution), lock the workflow row (refusing, as
--    workflow_checkpoint() does, a cancelled or finished workflow), then
--    consume the oldest message on the topic. Found, or the deadline has
--    passed: checkpoint the outcome ({"message": ...}, null when timed out)
--    and return done. Otherwise park until the deadline with the job that
--    wakes it then, and return not done.
--
--    The lock comes before the look. Engine::send (workflow_send()) locks
--    the row too, so either this look sees the message or the send sees the
--    workflow parked and makes its job due. The look is a statement of its
--    own inside this VOLATILE function, so it takes a fresh snapshot after
--    the lock: a send that committed while this call waited is seen.
CREATE FUNCTION workflow_recv(
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
    PERFORM workflow_checkpoint(p_workflow_id, p_seqs, p_names, p_outputs, p_worker_id, p_starts, true);
    UPDATE workflow_messages SET consumed_at = now()
    WHERE id = (SELECT m.id FROM workflow_messages m
                WHERE m.workflow_id = p_workflow_id AND m.topic = p_topic AND m.consumed_at IS NULL
                ORDER BY m.id LIMIT 1 FOR UPDATE)
    RETURNING payload INTO message;
    done := FOUND OR clock_timestamp() >= p_deadline;
    IF done THEN
        PERFORM workflow_checkpoint(p_workflow_id, ARRAY[p_seq], ARRAY[p_name],
            ARRAY[jsonb_build_object('message', message)], p_worker_id, ARRAY[p_started], false);
        RETURN;
    END IF;
    UPDATE workflows SET status = 'waiting', owner = NULL, wait_topic = p_topic,
        wait_until = p_deadline,
        wait_job = workflow_enqueue(p_queue, p_workflow_id, p_job_id, p_deadline, 0, p_max_attempts),
        updated_at = now()
    WHERE id = p_workflow_id;
END;
$$;

-- 2. Events (set_events_in, and a one-statement step's own events) in one
--    call: upsert each (their keys must differ) and notify its waiters with
--    the payload given; the notifications go out when the transaction
--    commits. Returns how many were set.
CREATE FUNCTION workflow_set_events(
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
    INSERT INTO workflow_events (workflow_id, key, value)
    SELECT p_workflow_id, e.key, e.value FROM unnest(p_keys, p_values) AS e(key, value)
    ON CONFLICT (workflow_id, key) DO UPDATE SET value = EXCLUDED.value, created_at = now();
    PERFORM pg_notify(p_channel, n.payload) FROM unnest(p_payloads) AS n(payload);
    RETURN cardinality(p_keys);
END;
$$;
