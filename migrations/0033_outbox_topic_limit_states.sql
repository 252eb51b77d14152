-- A limit's running rows and tokens move out of outbox_topic_limits into a
-- table of their own, outbox_topic_limit_states, which the leader may
-- compact (outbox_core::store::compaction).
--
-- Every limited claim rewrote its limit's row (running, tokens,
-- refilled_at): while a snapshot is held, each claim batch of a limited
-- topic left a dead version there that vacuum cannot remove, and that
-- table cannot be compacted, because it holds operators' settings, which a
-- pg_dump taken during a compaction would capture empty. Now
-- outbox_topic_limits changes only when an operator sets or removes a
-- limit; the state, which a claim rebuilds when it is missing (as after a
-- restore from such a dump), is rewritten freely.
--
-- A limited claim still takes its limit's row lock first (FOR NO KEY
-- UPDATE, which writes no new version), then the state and the outbox.
--
-- Dispatchers of an earlier version read the dropped columns, and their
-- claim rounds would fail while any limit exists: with a limit set, the
-- migration refuses to run while a dispatcher's heartbeat is live
-- (docs/operations.md). Without one, it runs at once.

LOCK TABLE outbox_topic_limits IN ACCESS EXCLUSIVE MODE;

DO $$
DECLARE
    p record;
BEGIN
    IF EXISTS (SELECT 1 FROM outbox_topic_limits) THEN
        SELECT host, pid, version INTO p FROM outbox_processes WHERE expires_at > now()
        ORDER BY last_seen DESC LIMIT 1;
        IF FOUND THEN
            RAISE EXCEPTION 'migration 0033 (limit states) needs every dispatcher stopped while '
                'topics have limits: a process is running (host %, pid %, version %); stop all '
                'outboxd processes of earlier versions, wait a lease for a crashed one, then '
                'migrate again',
                p.host, p.pid, p.version
                USING ERRCODE = 'object_in_use';
        END IF;
    END IF;
END
$$;

CREATE TABLE outbox_topic_limit_states (
    app_id      uuid             NOT NULL,
    topic       text             NOT NULL,
    running     uuid[]           NOT NULL DEFAULT '{}',
    tokens      double precision NOT NULL DEFAULT 0,
    refilled_at timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (app_id, topic),
    FOREIGN KEY (app_id, topic) REFERENCES outbox_topic_limits (app_id, topic)
        ON DELETE CASCADE
);

INSERT INTO outbox_topic_limit_states (app_id, topic, running, tokens, refilled_at)
SELECT app_id, topic, running, tokens, refilled_at FROM outbox_topic_limits;

ALTER TABLE outbox_topic_limits
    DROP COLUMN running,
    DROP COLUMN tokens,
    DROP COLUMN refilled_at;
