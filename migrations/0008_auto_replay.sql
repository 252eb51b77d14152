-- Automatic replay (quarantine): a policy per app and source/topic replays
-- dead letters after a delay that doubles each round, for a set number of
-- rounds; then the last dead letter waits for an operator.
CREATE TABLE replay_policies (
    id                 uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    app_id             uuid NOT NULL REFERENCES apps (id) ON DELETE CASCADE,
    -- NULL matches any source / topic; the most specific policy wins.
    source             text,
    topic              text,
    initial_delay_secs integer NOT NULL CHECK (initial_delay_secs BETWEEN 1 AND 604800),
    max_rounds         integer NOT NULL CHECK (max_rounds BETWEEN 1 AND 20),
    created_at         timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT replay_policies_scope_key UNIQUE NULLS NOT DISTINCT (app_id, source, topic)
);

ALTER TABLE dead_letters
    -- 0 for a first failure; n for the dead letter of the n-th automatic replay.
    ADD COLUMN replay_round integer NOT NULL DEFAULT 0,
    -- When the policy replays it; NULL when no policy applies or rounds are spent.
    ADD COLUMN replay_due_at timestamptz;
CREATE INDEX dead_letters_replay_due_idx ON dead_letters (replay_due_at)
    WHERE replay_due_at IS NOT NULL AND resolved_at IS NULL;
