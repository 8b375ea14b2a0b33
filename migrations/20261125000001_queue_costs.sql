-- Two costs of apalis' queue found with pg_stat_statements under load
-- (docs/benchmarks/profile.md), fixed without changing what the queue does.

-- 1. apalis.get_jobs is a LANGUAGE sql function. PostgreSQL before 18 plans
--    a SQL function's UPDATE on every call: about 0.7 ms of planning per
--    fetch, for a statement that then runs in 0.1 ms. The same statement in
--    PL/pgSQL keeps its plan for the session.
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
            AND run_at < now()
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

-- 2. apalis' ack finds the jobs to complete through the lock_by index, and a
--    finished job kept its worker's name there forever (until pruned): each
--    ack scanned every job its worker ever ran, 1.6 ms per ack and growing.
--    A finished job now lets go of its worker. Nothing reads lock_by of a
--    finished job: recovery looks at Queued and Running jobs only.
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
