-- A row's run_at lies between 1970-01-01 and 9999-12-31 (UTC), for new
-- rows from here on; migration 0040 moves the rows already there into the
-- range and checks them.
--
-- outbox_enqueue() took any timestamptz: 'infinity', '-infinity', or a year
-- past 262143, where the Rust clients' dates end (PostgreSQL's go on to
-- 294276). One such row broke every reader of it: the row browser and the
-- row page dropped the connection (decoding the row panicked), and the
-- leader's state sample failed on every pass ("cannot subtract infinite
-- timestamps"), for every app, so the rows_* gauges and their alerts went
-- quiet. The library and the API refuse such a run_at, naming it; the
-- constraint holds for the SQL function and direct inserts too, and the
-- segments inherit it.
--
-- NOT VALID, under a short lock_timeout: the lock this takes on outbox and
-- its segments is held for no scan, and a long transaction holding them
-- makes the migration fail and be retried rather than stall every producer.

SET LOCAL lock_timeout = '10s';

ALTER TABLE outbox ADD CONSTRAINT outbox_run_at_in_range
    CHECK (run_at >= '1970-01-01 00:00:00+00' AND run_at < '10000-01-01 00:00:00+00') NOT VALID;
