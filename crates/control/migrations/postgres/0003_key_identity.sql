-- Key identity (issue 18): a rolled key's replaced value, accepted until its
-- deadline. `owner` and `metadata` exist since 0001. SQLite: the same
-- columns in ../sqlite/0003_key_identity.sql.
ALTER TABLE keys ADD COLUMN previous_key_hash text;
ALTER TABLE keys ADD COLUMN previous_key_expires_at bigint;
CREATE UNIQUE INDEX keys_previous_key_hash ON keys (previous_key_hash)
    WHERE previous_key_hash IS NOT NULL;
