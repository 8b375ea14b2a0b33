-- Workers KEDA should run now: the busiest queue's load over one worker's
-- slots on a queue (WORKER_CONCURRENCY, 32), rounded up. The load is the
-- workflows waiting for a slot or holding one: started or handed back and
-- not claimed yet ('enqueued', whatever apalis has done with their job),
-- executing ('running'), and parked ones whose wake-up is due (a message
-- came, a deadline passed). Parked workflows not due hold no slot. Queues
-- run side by side in every worker, so the busiest one sets the count, not
-- their sum. No rows: 0.
SELECT coalesce(max(ceil(load / 32.0)), 0)::int AS workers_needed
FROM (
    SELECT queue, count(*) AS load
    FROM (
        SELECT queue
        FROM engine.workflows
        WHERE status IN ('enqueued', 'running')
        UNION ALL
        SELECT w.queue
        FROM apalis.jobs j
        JOIN engine.workflows w
            ON w.id = convert_from(j.job, 'UTF8')::json ->> 'workflow_id'
        WHERE j.status = 'Pending' AND j.run_at <= now() AND w.status = 'waiting'
    ) AS busy
    GROUP BY queue
) AS per_queue
