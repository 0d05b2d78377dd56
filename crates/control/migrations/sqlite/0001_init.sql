-- keygate schema, version 1 (SQLite). PostgreSQL has the same tables under the
-- same number in ../postgres/0001_init.sql; keep the two in step.
-- Times: `*_at` columns are Unix seconds (as in keygate-core's credential
-- model); `time_ms` columns are Unix milliseconds (request and audit records
-- need sub-second order). JSON columns hold text checked by json_valid.

CREATE TABLE store_meta (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    store_id TEXT NOT NULL,
    -- Bumped by every change to keys or sessions; the sync daemons push on change.
    version INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE tenants (
    id TEXT PRIMARY KEY,
    display_name TEXT,
    created_at INTEGER NOT NULL
);

CREATE TABLE keys (
    key_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    name TEXT NOT NULL DEFAULT '',
    kind TEXT NOT NULL CHECK (kind IN ('default', 'scoped')),
    environment TEXT NOT NULL DEFAULT 'live',
    scopes TEXT NOT NULL DEFAULT '[]' CHECK (json_valid(scopes)),
    allowed_ips TEXT NOT NULL DEFAULT '[]' CHECK (json_valid(allowed_ips)),
    rate_limit_requests INTEGER,
    rate_limit_window_secs INTEGER,
    status TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'inactive')),
    key_hash TEXT NOT NULL UNIQUE,
    secret_hash TEXT,
    previous_secret_hash TEXT,
    previous_secret_expires_at INTEGER,
    expires_at INTEGER,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    -- Kept by log ingestion: the newest request made with the key.
    last_used_at INTEGER,
    owner TEXT,
    metadata TEXT CHECK (metadata IS NULL OR json_valid(metadata)),
    CHECK ((rate_limit_requests IS NULL) = (rate_limit_window_secs IS NULL))
);
CREATE INDEX keys_tenant ON keys (tenant, kind);

-- No foreign key to keys: a store that replaces a key's row must not
-- cascade away its revoked sessions (which would make them valid again).
-- Deleting a key deletes its sessions in the service layer.
CREATE TABLE sessions (
    key_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    last_seen_at INTEGER,
    revoked_at INTEGER,
    PRIMARY KEY (key_id, session_id)
);
CREATE INDEX sessions_revoked ON sessions (revoked_at) WHERE revoked_at IS NOT NULL;

CREATE TABLE api_tokens (
    token_id TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL CHECK (role IN ('operator', 'tenant')),
    tenant TEXT,
    created_at INTEGER NOT NULL,
    expires_at INTEGER,
    revoked_at INTEGER,
    last_used_at INTEGER,
    -- A tenant token names its tenant; an operator token names none.
    CHECK ((role = 'tenant') = (tenant IS NOT NULL))
);

CREATE TABLE audit (
    id INTEGER PRIMARY KEY,
    time_ms INTEGER NOT NULL,
    actor_token_id TEXT,
    actor_ip TEXT,
    tenant TEXT,
    action TEXT NOT NULL,
    object TEXT,
    detail TEXT CHECK (detail IS NULL OR json_valid(detail))
);
CREATE INDEX audit_tenant_time ON audit (tenant, time_ms);
CREATE INDEX audit_time ON audit (time_ms);

-- One row per request from Envoy's JSON access log. `id` (the rowid) orders
-- records ingested in the same millisecond. The key's name is not copied:
-- queries join `keys`, so a renamed key shows its current name.
CREATE TABLE request_logs (
    id INTEGER PRIMARY KEY,
    time_ms INTEGER NOT NULL,
    key_id TEXT,
    tenant TEXT,
    environment TEXT,
    method TEXT,
    path TEXT,
    client_ip TEXT,
    status INTEGER,
    decision TEXT,
    reason TEXT,
    request_id TEXT
);
-- A tenant's records newest first (SQLite appends the rowid to every index,
-- so these also order by id for keyset pagination).
CREATE INDEX request_logs_tenant_time ON request_logs (tenant, time_ms);
-- One key's records newest first.
CREATE INDEX request_logs_key_time ON request_logs (key_id, time_ms);
-- Retention pruning by age.
CREATE INDEX request_logs_time ON request_logs (time_ms);

-- Allowed/denied counts per tenant, key and UTC hour, kept by ingestion in the
-- same transaction as the records: usage queries read this (24 rows a day per
-- key) instead of counting millions of request rows.
CREATE TABLE usage_hourly (
    tenant TEXT NOT NULL,
    hour_ms INTEGER NOT NULL,
    key_id TEXT NOT NULL,
    allowed INTEGER NOT NULL DEFAULT 0,
    denied INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, hour_ms, key_id)
) WITHOUT ROWID;

-- Where ingestion stands in each access log: committed in the same
-- transaction as the records it read, so a crash neither loses nor repeats
-- one. `source` names the log (node-unique in a fleet); `head_hex` holds the
-- file's first bytes, which tell a truncated-and-rewritten file from the one
-- we were reading even when its inode and size look the same.
CREATE TABLE ingest_state (
    source TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    device INTEGER NOT NULL,
    inode INTEGER NOT NULL,
    file_offset INTEGER NOT NULL,
    head_hex TEXT NOT NULL,
    last_record_id INTEGER,
    updated_at INTEGER NOT NULL
);
