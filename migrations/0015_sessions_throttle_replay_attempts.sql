-- Dashboard and API sessions: a token is only as good as its row here, so
-- sign-out, a password change, deleting a user or "revoke sessions" end it on
-- the next request of every outboxd process. Tokens carry the row's id (sid).
CREATE TABLE sessions (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id     uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);
CREATE INDEX sessions_user_idx ON sessions (user_id);

-- Failed-login counters shared by every outboxd process and kept across
-- restarts. A key is 'account:<email>' or 'address:<ip>'; a key that keeps
-- failing is held back until blocked_until, for a time that doubles with each
-- failure past the free ones (see outbox_admin::auth::Throttle).
CREATE TABLE login_throttle (
    key              text PRIMARY KEY,
    failures         integer NOT NULL CHECK (failures >= 0),
    last_failure_at  timestamptz NOT NULL,
    blocked_until    timestamptz
);

-- A dead letter remembers the attempts its row was allowed (NULL: the
-- configured default), so a replay gets the same budget unless an operator
-- asks for another.
ALTER TABLE dead_letters ADD COLUMN max_attempts integer CHECK (max_attempts >= 1);
