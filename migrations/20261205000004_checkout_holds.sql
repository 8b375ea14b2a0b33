-- The checkouts one client holds (store::holds): unfinished checkouts by
-- the client recorded in their input.
CREATE INDEX workflows_checkout_client_idx ON engine.workflows ((input->>'client'))
    WHERE kind = 'checkout' AND status IN ('enqueued', 'running', 'waiting');
