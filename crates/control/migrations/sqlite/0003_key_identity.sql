-- Key identity (issue 18): a rolled key's replaced value, accepted until its
-- deadline. `owner` and `metadata` exist since 0001. PostgreSQL: the same
-- columns in ../postgres/0003_key_identity.sql.
ALTER TABLE keys ADD COLUMN previous_key_hash TEXT;
ALTER TABLE keys ADD COLUMN previous_key_expires_at INTEGER;
-- No two keys may share a value, the replaced ones included.
CREATE UNIQUE INDEX keys_previous_key_hash ON keys (previous_key_hash)
    WHERE previous_key_hash IS NOT NULL;
