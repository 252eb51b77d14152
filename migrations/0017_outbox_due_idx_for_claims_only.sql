-- outbox_due_idx serves claims only: it becomes a partial index whose
-- predicate (app_id IS NOT NULL, true of every row) is implied by the
-- claims' "app_id = …" and by nothing that looks rows up by id.
--
-- While an old snapshot is held, vacuum finds almost no live rows among
-- the dead ones and records that count; the planner then costs a read of
-- the whole of outbox_due_idx, which also holds id, as cheap as probing
-- the primary key for a batch of ids, and took it for completions: 1.6
-- million buffers, 15 s for one completion of 376 rows after twelve
-- minutes of a held snapshot, and the queue ran away. An index the lookup
-- cannot use cannot be chosen for it.
--
-- With a large backlog, build the new index first with
-- CREATE INDEX CONCURRENTLY under the name outbox_due_claims_idx
-- (docs/operations.md); this migration then only swaps the names.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_index
               WHERE indexrelid = to_regclass('outbox_due_claims_idx') AND NOT indisvalid) THEN
        DROP INDEX outbox_due_claims_idx;
    END IF;
END
$$;
CREATE INDEX IF NOT EXISTS outbox_due_claims_idx ON outbox (app_id, run_at, id)
    WHERE app_id IS NOT NULL;
DROP INDEX IF EXISTS outbox_due_idx;
ALTER INDEX outbox_due_claims_idx RENAME TO outbox_due_idx;
