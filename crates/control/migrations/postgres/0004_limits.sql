-- Several limits per key, plans and tenant limits (issue 18). Same tables
-- and meaning as ../sqlite/0004_limits.sql; keep the two in step. Limits are
-- JSON arrays of strings such as "100/min" or "10000/day".

CREATE TABLE plans (
    name TEXT PRIMARY KEY,
    limits JSONB NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE tenant_limits (
    tenant TEXT PRIMARY KEY,
    plan TEXT REFERENCES plans (name),
    limits JSONB NOT NULL DEFAULT '[]'
);

CREATE TABLE key_limits (
    key_id TEXT PRIMARY KEY,
    limits JSONB NOT NULL DEFAULT '[]',
    plan TEXT REFERENCES plans (name),
    credits JSONB
);
