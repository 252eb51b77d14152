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
-- Dispatchers of an earlier version read the dropped columns: stop them
-- before this runs (docs/operations.md). One left running fails its
-- limited claims with an error, loses nothing, and claims other topics.

LOCK TABLE outbox_topic_limits IN ACCESS EXCLUSIVE MODE;

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
