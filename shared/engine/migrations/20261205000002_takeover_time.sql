-- How long a takeover took: when a reaped worker's running workflow goes
-- back to the queue, its owner's last heartbeat is kept here, and the
-- claim that runs it next reads and clears it (the worker's metrics then
-- time the workflow's next step from it).
ALTER TABLE engine.workflows ADD COLUMN orphaned_at timestamptz;
