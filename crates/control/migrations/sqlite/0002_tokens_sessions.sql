-- keygate schema, version 2 (SQLite). Same meaning as
-- ../postgres/0002_tokens_sessions.sql; keep the two in step.
-- What a token is for: `api` (a bearer token for /api/v1), `portal_link`
-- (a one-time portal link) or `portal_session` (a portal browser cookie).
-- Each is accepted only where it belongs, and only `api` tokens are listed.
ALTER TABLE api_tokens ADD COLUMN purpose TEXT NOT NULL DEFAULT 'api'
    CHECK (purpose IN ('api', 'portal_link', 'portal_session'));

-- Portal tokens made before this column: the audit trail names them (a
-- login's object is its session token, a CLI link's object its link token).
UPDATE api_tokens SET purpose = 'portal_session'
    WHERE token_id IN (SELECT object FROM audit WHERE action = 'portal.login');
UPDATE api_tokens SET purpose = 'portal_link'
    WHERE token_id IN (SELECT object FROM audit WHERE action = 'portal.link_create')
       OR token_id IN (SELECT json_extract(detail, '$.link_token_id') FROM audit
                       WHERE action = 'portal.login' AND json_valid(detail));

-- Dead sessions are deleted in the background by their expiry.
CREATE INDEX sessions_expires ON sessions (expires_at);

-- The newest token issue seen for a session (Unix ms): a session is listed
-- revoked only while no token was issued after its revocation.
ALTER TABLE sessions ADD COLUMN issued_ms INTEGER;
