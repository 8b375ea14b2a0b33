-- no-transaction
-- Built without blocking writes to a table that may be large: CONCURRENTLY
-- cannot run inside a transaction, nor beside another statement, hence one
-- index per migration. Retention skips a parent whose child is unfinished.
CREATE INDEX CONCURRENTLY IF NOT EXISTS workflows_parent_idx ON engine.workflows (parent_id)
    WHERE parent_id IS NOT NULL;
