-- Workflow versions: a workflow is pinned to the code version of the worker
-- that first executes it (its history is that code's), and only workers of
-- that version run it, unless a worker's code declares patches for its kind
-- (Workflow::patches) and so adopts histories of any version. Workflows not
-- pinned yet go to the fleet's current version (engine.current_version()).

-- NULL until its first execution: any worker may take it.
ALTER TABLE engine.workflows ADD COLUMN version text;

-- Each worker's code version, and the kinds whose histories of other
-- versions it runs.
ALTER TABLE engine.workers ADD COLUMN version text;
ALTER TABLE engine.workers ADD COLUMN adopts text[] NOT NULL DEFAULT '{}';

-- The fleet's current version: that of the live workers (not draining)
-- that joined last (their oldest started last). Workflows not pinned yet go
-- to its workers, so an older version only finishes what it has pinned.
CREATE FUNCTION engine.current_version() RETURNS text
LANGUAGE sql
STABLE
AS $$
    SELECT k.version FROM engine.workers k WHERE NOT k.draining
    GROUP BY k.version ORDER BY min(k.started_at) DESC LIMIT 1
$$;

-- Whether worker `p_worker` (an engine worker id, or an apalis worker name
-- `<worker id>/<queue>/<generation>`) may execute a workflow of kind `p_kind`
-- pinned to `p_version` (NULL: not pinned yet, for the current version's
-- workers). A worker missing from the registry runs anything.
CREATE FUNCTION engine.workflow_runs_on(p_kind text, p_version text, p_worker text)
RETURNS boolean
LANGUAGE sql
STABLE
AS $$
    SELECT coalesce(
        (SELECT CASE WHEN p_version IS NULL
                     THEN k.version IS NOT DISTINCT FROM engine.current_version()
                     ELSE k.version = p_version OR p_kind = ANY (k.adopts) END
         FROM engine.workers k WHERE k.id = split_part(p_worker, '/', 1)),
        true)
$$;

-- A child started by a step on the worker that runs it is pinned at once to
-- that worker's version: it has no claim to pin it.
CREATE OR REPLACE FUNCTION engine.workflow_start(
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
        INSERT INTO engine.workflows (id, kind, queue, input) VALUES (p_id, p_kind, p_queue, p_input)
        ON CONFLICT (id) DO NOTHING;
    ELSE
        INSERT INTO engine.workflows (id, kind, queue, input, status, owner, executions, version)
        VALUES (p_id, p_kind, p_queue, p_input, 'running', p_owner, 1,
                (SELECT k.version FROM engine.workers k WHERE k.id = p_owner))
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

-- apalis' fetch (as the engine's baseline defines it) skips the jobs of
-- workflows pinned to a version this worker does not run: they wait for a
-- worker of theirs. The workflow is found from the job's payload.
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
        SELECT j.id
        FROM apalis.jobs j
        LEFT JOIN engine.workflows w
            ON w.id = convert_from(j.job, 'UTF8')::json ->> 'workflow_id'
        WHERE
            (
                j.status = 'Pending'
                OR (
                    j.status = 'Failed'
                    AND j.attempts < j.max_attempts
                )
            )
            AND j.run_at < now() - interval '100 milliseconds'
            AND j.job_type = v_job_type
            AND (w.id IS NULL OR w.status IN ('succeeded', 'failed', 'cancelled')
                 OR engine.workflow_runs_on(w.kind, w.version, worker_id))
        ORDER BY j.priority DESC, j.run_at ASC
        LIMIT v_job_count
        FOR UPDATE OF j SKIP LOCKED
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
