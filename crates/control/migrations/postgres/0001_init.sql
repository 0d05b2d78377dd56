-- keygate schema, version 1 (PostgreSQL). Same tables and meaning as
-- ../sqlite/0001_init.sql; keep the two in step.
-- Times: `*_at` columns are Unix seconds (as in keygate-core's credential
-- model); `time_ms` columns are Unix milliseconds. JSON columns are jsonb
-- (bind text with `$n::text::jsonb`, read with `col::text`).

CREATE TABLE store_meta (
    id integer PRIMARY KEY CHECK (id = 1),
    store_id text NOT NULL,
    version bigint NOT NULL DEFAULT 0
);

CREATE TABLE tenants (
    id text PRIMARY KEY,
    display_name text,
    created_at bigint NOT NULL
);

CREATE TABLE keys (
    key_id text PRIMARY KEY,
    tenant text NOT NULL,
    name text NOT NULL DEFAULT '',
    kind text NOT NULL CHECK (kind IN ('default', 'scoped')),
    environment text NOT NULL DEFAULT 'live',
    scopes jsonb NOT NULL DEFAULT '[]',
    allowed_ips jsonb NOT NULL DEFAULT '[]',
    rate_limit_requests bigint,
    rate_limit_window_secs bigint,
    status text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'inactive')),
    key_hash text NOT NULL UNIQUE,
    secret_hash text,
    previous_secret_hash text,
    previous_secret_expires_at bigint,
    expires_at bigint,
    created_at bigint NOT NULL,
    updated_at bigint NOT NULL,
    last_used_at bigint,
    owner text,
    metadata jsonb,
    CHECK ((rate_limit_requests IS NULL) = (rate_limit_window_secs IS NULL))
);
CREATE INDEX keys_tenant ON keys (tenant, kind);

-- No foreign key to keys: a store that replaces a key's row must not
-- cascade away its revoked sessions (which would make them valid again).
-- Deleting a key deletes its sessions in the service layer.
CREATE TABLE sessions (
    key_id text NOT NULL,
    session_id text NOT NULL,
    created_at bigint NOT NULL,
    expires_at bigint NOT NULL,
    last_seen_at bigint,
    revoked_at bigint,
    PRIMARY KEY (key_id, session_id)
);
CREATE INDEX sessions_revoked ON sessions (revoked_at) WHERE revoked_at IS NOT NULL;

CREATE TABLE api_tokens (
    token_id text PRIMARY KEY,
    token_hash text NOT NULL UNIQUE,
    role text NOT NULL CHECK (role IN ('operator', 'tenant')),
    tenant text,
    created_at bigint NOT NULL,
    expires_at bigint,
    revoked_at bigint,
    last_used_at bigint,
    CHECK ((role = 'tenant') = (tenant IS NOT NULL))
);

CREATE TABLE audit (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    time_ms bigint NOT NULL,
    actor_token_id text,
    actor_ip text,
    tenant text,
    action text NOT NULL,
    object text,
    detail jsonb
);
CREATE INDEX audit_tenant_time ON audit (tenant, time_ms, id);
CREATE INDEX audit_time ON audit (time_ms);

CREATE TABLE request_logs (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    time_ms bigint NOT NULL,
    key_id text,
    tenant text,
    environment text,
    method text,
    path text,
    client_ip text,
    status bigint,
    decision text,
    reason text,
    request_id text
);
CREATE INDEX request_logs_tenant_time ON request_logs (tenant, time_ms, id);
CREATE INDEX request_logs_key_time ON request_logs (key_id, time_ms, id);
CREATE INDEX request_logs_time ON request_logs (time_ms);

CREATE TABLE usage_hourly (
    tenant text NOT NULL,
    hour_ms bigint NOT NULL,
    key_id text NOT NULL,
    allowed bigint NOT NULL DEFAULT 0,
    denied bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, hour_ms, key_id)
);

CREATE TABLE ingest_state (
    source text PRIMARY KEY,
    path text NOT NULL,
    device bigint NOT NULL,
    inode bigint NOT NULL,
    file_offset bigint NOT NULL,
    head_hex text NOT NULL,
    last_record_id bigint,
    updated_at bigint NOT NULL
);
