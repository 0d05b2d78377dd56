-- Several limits per key, plans and tenant limits (issue 18). Limits are
-- JSON arrays of strings such as "100/min" or "10000/day" (keygate-core's
-- `limits` module validates them; the store refuses what it refuses).

-- Named limit sets: changing one changes every key on it.
CREATE TABLE plans (
    name TEXT PRIMARY KEY,
    limits TEXT NOT NULL CHECK (json_valid(limits)),
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);

-- A tenant's plan (for its keys that name none) and limits shared by all of
-- its keys. No foreign key to tenants: tenants exist through their keys.
CREATE TABLE tenant_limits (
    tenant TEXT PRIMARY KEY,
    plan TEXT REFERENCES plans (name),
    limits TEXT NOT NULL DEFAULT '[]' CHECK (json_valid(limits))
);

-- A key's own limits and plan, beside its row in `keys` (kept apart so that
-- a key without them costs no row).
CREATE TABLE key_limits (
    key_id TEXT PRIMARY KEY,
    limits TEXT NOT NULL DEFAULT '[]' CHECK (json_valid(limits)),
    plan TEXT REFERENCES plans (name),
    -- Usage credits: {"balance", "serial", "monthly", "granted_at"}; what is
    -- left is counted from request_logs since granted_at (or the month).
    credits TEXT CHECK (credits IS NULL OR json_valid(credits))
);
