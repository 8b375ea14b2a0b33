-- no-transaction
-- The retention pass reads the oldest finished workflows first (built as
-- the migration before).
CREATE INDEX CONCURRENTLY IF NOT EXISTS workflows_finished_idx ON engine.workflows (updated_at)
    WHERE status IN ('succeeded', 'failed', 'cancelled');
