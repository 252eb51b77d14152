-- Claims start from a position instead of the head of outbox_due_idx.
--
-- While any session holds an old snapshot (a pg_dump, an idle transaction),
-- no deleted row's index entries can be removed, and a claim that scans from
-- the oldest row of an app visits every one of them before it finds live
-- work. A dispatcher therefore keeps, per app, a position: the (run_at, id)
-- of the first unfinished row it saw, and claims from there
-- (outbox_core::store::outbox::advance_positions).
--
-- A row can still appear behind a position when the transaction that
-- inserts it commits after the position was taken. Such rows are found by
-- the transaction id they were inserted with: the rows of the transactions
-- that were running when the position was taken, and of those that began
-- since. This index serves that lookup; its entries are appended at the
-- right end, like the primary key's. With a large backlog, build it first
-- with CREATE INDEX CONCURRENTLY under this name (docs/operations.md).
--
-- A CREATE INDEX CONCURRENTLY that failed leaves an invalid index behind,
-- which the planner never uses: every advance would then read the table.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_index
               WHERE indexrelid = to_regclass('outbox_enqueue_xid_idx') AND NOT indisvalid) THEN
        DROP INDEX outbox_enqueue_xid_idx;
    END IF;
END
$$;
CREATE INDEX IF NOT EXISTS outbox_enqueue_xid_idx ON outbox (enqueue_xid);
