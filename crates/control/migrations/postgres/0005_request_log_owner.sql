-- Key identity (issue 18): the key's owner as the access log recorded it at
-- request time. Records from before this migration, and keys without an
-- owner, keep NULL. Adding a nullable column without a default rewrites no
-- rows. SQLite: the same in ../sqlite/0005_request_log_owner.sql.
ALTER TABLE request_logs ADD COLUMN owner text;
-- A tenant's records of one owner, newest first (the logs endpoint's
-- `owner` filter); partial, so records without an owner cost nothing.
CREATE INDEX request_logs_tenant_owner_time ON request_logs (tenant, owner, time_ms, id)
    WHERE owner IS NOT NULL;
