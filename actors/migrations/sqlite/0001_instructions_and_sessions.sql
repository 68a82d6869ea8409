-- Instructions and sessions (issue 13). Times are epoch milliseconds. `seq` orders an
-- agent's instructions; `version` numbers an instruction's (or session's) changes and is
-- the `seq` of its events.
CREATE TABLE instructions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    agent_id TEXT,
    capability TEXT,
    strategy TEXT,
    session_id TEXT,
    payload TEXT NOT NULL,
    state TEXT NOT NULL,
    attempt BIGINT NOT NULL DEFAULT 0,
    max_attempts BIGINT NOT NULL,
    ack_timeout_ms BIGINT NOT NULL,
    version BIGINT NOT NULL DEFAULT 1,
    created_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL,
    delivered_at_ms BIGINT,
    ack_deadline_ms BIGINT,
    finished_at_ms BIGINT,
    result TEXT,
    reason TEXT
);
CREATE INDEX instructions_by_agent ON instructions (agent_id, state, seq);
CREATE INDEX instructions_unfinished ON instructions (state) WHERE state IN ('pending', 'delivered');
CREATE INDEX instructions_by_session ON instructions (session_id);

CREATE TABLE sessions (
    id TEXT PRIMARY KEY,
    agent_id TEXT NOT NULL,
    name TEXT NOT NULL,
    description TEXT NOT NULL,
    parameters TEXT NOT NULL,
    state TEXT NOT NULL,
    version BIGINT NOT NULL DEFAULT 1,
    created_at_ms BIGINT NOT NULL,
    last_activity_ms BIGINT NOT NULL,
    closed_at_ms BIGINT,
    close_reason TEXT
);
CREATE INDEX sessions_by_agent ON sessions (agent_id, state);
CREATE INDEX sessions_open ON sessions (state, last_activity_ms);
