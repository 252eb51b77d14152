-- A dead letter whose row was a replay links back to the dead letter it was
-- replayed from: that one's replayed_as is this one's original_event_id
-- (outbox_core::store::dead_letters, `replay_of`). The index holds only
-- replayed dead letters, so it stays small; building it reads dead_letters
-- once and holds back dead-lettering meanwhile (28 ms for 100k dead letters
-- here). It waits at most 10 s for a lock behind a long transaction, then
-- fails and can be run again, rather than stall every dispatcher behind it.
-- With millions of dead letters, build it first with CREATE INDEX
-- CONCURRENTLY under this name (docs/operations.md).
SET LOCAL lock_timeout = '10s';

-- A CREATE INDEX CONCURRENTLY that failed leaves an invalid index behind,
-- which the planner never uses; one still being built is left alone.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_index
               WHERE indexrelid = to_regclass('dead_letters_replayed_as_idx') AND NOT indisvalid)
       AND NOT EXISTS (SELECT 1 FROM pg_stat_progress_create_index
                       WHERE index_relid = to_regclass('dead_letters_replayed_as_idx')) THEN
        DROP INDEX dead_letters_replayed_as_idx;
    END IF;
END
$$;
CREATE INDEX IF NOT EXISTS dead_letters_replayed_as_idx ON dead_letters (replayed_as)
    WHERE replayed_as IS NOT NULL;
