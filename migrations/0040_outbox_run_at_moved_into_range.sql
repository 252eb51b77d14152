-- Rows whose run_at lies outside the years 1970 to 9999 (0039) move to the
-- nearest bound ('infinity' stays "never" in practice, '-infinity' "first"),
-- and the constraint is then checked on every row.
--
-- A migration of its own so that neither read of outbox happens under the
-- lock 0039 took: the UPDATE locks only the rows it moves, and VALIDATE
-- takes a lock that lets reads, writes and claims go on.

UPDATE outbox
SET run_at = CASE WHEN run_at < '1970-01-01 00:00:00+00' THEN '1970-01-01 00:00:00+00'::timestamptz
                  ELSE '9999-12-31 00:00:00+00'::timestamptz END
WHERE NOT (run_at >= '1970-01-01 00:00:00+00' AND run_at < '10000-01-01 00:00:00+00');

ALTER TABLE outbox VALIDATE CONSTRAINT outbox_run_at_in_range;
