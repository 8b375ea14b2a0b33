-- A job due now is announced on 'apalis::job::insert', and one worker takes
-- it from that notification (the claim statement marks it done). apalis'
-- fetch runs whenever its worker polls for more work, and each batch it
-- finds makes it poll again: under load it kept finding jobs notified a
-- moment before and took about half of them (pg_stat_statements at 32
-- clients: 5,092 of 9,893 jobs), each after the chosen worker's take had
-- already been spent. So the fetch now leaves a job alone for its first
-- 100 ms of being due: it fetches what scheduled jobs and orphans need, and
-- what no notified worker took (the chosen worker was full or has died).
-- shared/src/engine/queue.rs (NOTIFIED_JOB_GRACE) knows the same figure.
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
