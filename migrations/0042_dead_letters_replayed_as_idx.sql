-- A dead letter whose row was a replay links back to the dead letter it was
-- replayed from: that one's replayed_as is this one's original_event_id
-- (outbox_core::store::dead_letters, `replay_of`). The index holds only
-- replayed dead letters, so it stays small; building it reads dead_letters
-- once and holds back dead-lettering meanwhile (under a second for 100k
-- dead letters here). With millions, build it first with
-- CREATE INDEX CONCURRENTLY under this name (docs/operations.md).
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_index
               WHERE indexrelid = to_regclass('dead_letters_replayed_as_idx') AND NOT indisvalid) THEN
        DROP INDEX dead_letters_replayed_as_idx;
    END IF;
END
$$;
CREATE INDEX IF NOT EXISTS dead_letters_replayed_as_idx ON dead_letters (replayed_as)
    WHERE replayed_as IS NOT NULL;
