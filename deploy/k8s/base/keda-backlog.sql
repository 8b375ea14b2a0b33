-- Workers KEDA should run now: the busiest queue's load (jobs due and not
-- taken, plus workflows executing) over one worker's slots on a queue
-- (WORKER_CONCURRENCY, 32), rounded up. Queues run side by side in every
-- worker, so the busiest one sets the count, not their sum. Parked
-- workflows (status 'waiting') hold no slot and are not counted. No rows: 0.
SELECT coalesce(max(ceil(load / 32.0)), 0)::int AS workers_needed
FROM (
    SELECT queue, count(*) AS load
    FROM (
        SELECT job_type AS queue
        FROM apalis.jobs
        WHERE status = 'Pending' AND run_at <= now()
        UNION ALL
        SELECT queue
        FROM engine.workflows
        WHERE status = 'running'
    ) AS busy
    GROUP BY queue
) AS per_queue
