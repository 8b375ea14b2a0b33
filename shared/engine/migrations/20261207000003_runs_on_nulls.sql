-- engine.workflow_runs_on() compares versions NULL-safely (a worker row
-- without a version runs only workflows without one), and a worker adopts
-- another version's histories only while its own version is the current
-- one: an older worker never replays a newer history. With no live worker
-- that is not draining, any version is current.
CREATE OR REPLACE FUNCTION engine.workflow_runs_on(p_kind text, p_version text, p_worker text)
RETURNS boolean
LANGUAGE sql
STABLE
AS $$
    SELECT coalesce(
        (SELECT CASE WHEN p_version IS NULL
                     THEN k.version IS NOT DISTINCT FROM coalesce(engine.current_version(), k.version)
                     ELSE k.version IS NOT DISTINCT FROM p_version
                          OR (p_kind = ANY (k.adopts)
                              AND k.version IS NOT DISTINCT FROM
                                  coalesce(engine.current_version(), k.version)) END
         FROM engine.workers k WHERE k.id = split_part(p_worker, '/', 1)),
        true)
$$;
