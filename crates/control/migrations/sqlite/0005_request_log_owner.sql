-- Key identity (issue 18): the key's owner as the access log recorded it at
-- request time (a later owner change does not rewrite history). Records
-- from before this migration, and keys without an owner, keep NULL.
-- PostgreSQL: the same in ../postgres/0005_request_log_owner.sql.
ALTER TABLE request_logs ADD COLUMN owner TEXT;
-- A tenant's records of one owner, newest first (the `owner` filter of the
-- logs endpoint). Partial: records without an owner (most, and every old
-- one) cost neither index space nor ingest time, and the migration only
-- scans the table once. SQLite appends the rowid, so keyset pages by
-- (time_ms, id) stay a range scan.
CREATE INDEX request_logs_tenant_owner_time ON request_logs (tenant, owner, time_ms)
    WHERE owner IS NOT NULL;
