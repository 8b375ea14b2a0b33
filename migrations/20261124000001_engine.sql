-- The durable workflow engine's tables. The apalis queue lives in its own
-- schema (`apalis`), created by apalis-postgres' own migrations.

CREATE TABLE workflows (
    id               text PRIMARY KEY,
    kind             text NOT NULL,
    queue            text NOT NULL,
    status           text NOT NULL DEFAULT 'enqueued'
        CONSTRAINT workflows_status_check
        CHECK (status IN ('enqueued', 'running', 'waiting', 'succeeded', 'failed', 'cancelled')),
    input            jsonb NOT NULL,
    output           jsonb,
    error            text,
    -- failed attempts counted against the retry policy
    attempts         integer NOT NULL DEFAULT 0,
    -- executions started (a crash loop shows here)
    executions       integer NOT NULL DEFAULT 0,
    -- the worker process running it now (NULL when parked or finished)
    owner            text,
    cancel_requested boolean NOT NULL DEFAULT false,
    wait_topic       text,
    wait_until       timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX workflows_active_idx ON workflows (status)
    WHERE status IN ('enqueued', 'running', 'waiting');
CREATE INDEX workflows_owner_idx ON workflows (owner) WHERE owner IS NOT NULL;

-- One checkpoint per completed step. The primary key is the fence: two
-- executions of one workflow can never both commit step N.
CREATE TABLE workflow_steps (
    workflow_id text NOT NULL REFERENCES workflows (id) ON DELETE CASCADE,
    step_seq    integer NOT NULL,
    name        text NOT NULL,
    output      jsonb NOT NULL,
    worker_id   text,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workflow_id, step_seq)
);

CREATE TABLE workflow_messages (
    id          bigserial PRIMARY KEY,
    workflow_id text NOT NULL REFERENCES workflows (id) ON DELETE CASCADE,
    topic       text NOT NULL,
    payload     jsonb NOT NULL,
    message_key text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    consumed_at timestamptz,
    CONSTRAINT workflow_messages_key_unique UNIQUE (workflow_id, message_key)
);

CREATE INDEX workflow_messages_pending_idx ON workflow_messages (workflow_id, topic, id)
    WHERE consumed_at IS NULL;

CREATE TABLE workflow_events (
    workflow_id text NOT NULL REFERENCES workflows (id) ON DELETE CASCADE,
    key         text NOT NULL,
    value       jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workflow_id, key)
);

-- The fleet: one row per live worker process. Each process holds the session
-- advisory lock `lock_key` for its whole life; a free lock means a dead process.
CREATE TABLE workers (
    id         text PRIMARY KEY,
    host       text NOT NULL,
    pid        integer NOT NULL,
    queues     text[] NOT NULL,
    lock_key   bigint NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    last_seen  timestamptz NOT NULL DEFAULT now(),
    in_flight  integer NOT NULL DEFAULT 0,
    draining   boolean NOT NULL DEFAULT false
);
