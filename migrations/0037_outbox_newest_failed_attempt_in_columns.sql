-- A row's newest failed attempt is kept in columns of its own instead of
-- as a jsonb entry appended to `attempts`.
--
-- Recording a failed attempt built a jsonb entry (number, start, end,
-- worker, error) and appended it to `attempts`, and every later version of
-- the row carried it: a drain whose every row failed once ran at 0.84 of
-- the same drain with the history off (docs/performance.md, "Attempt
-- history"). Now a failure writes the attempt's number, start, end and
-- worker into the four columns below (its error is the row's last_error),
-- and pushes the newest failed attempt they held before, if any, into
-- `attempts`: a row that fails once builds no jsonb at all. Readers take
-- `attempts` followed by these columns as the whole history, and a dead
-- letter gets both in one array, as before.
--
-- Adding columns without a default changes only the catalog; it takes an
-- ACCESS EXCLUSIVE lock on outbox and its segments for that moment, waiting
-- at most 10 s behind open transactions (then it fails without a change and
-- can be run again). Dispatchers of the previous version keep appending to
-- `attempts` and do not see the columns: while both run, a row failed by
-- both may list its attempts out of order, and a dead letter or a cancel
-- written by the previous version leaves out the attempt the columns held
-- (the attempt stays counted). Finish a roll-out before relying on the
-- history.

SET LOCAL lock_timeout = '10s';

ALTER TABLE outbox
    ADD COLUMN failed_attempt integer,
    ADD COLUMN failed_attempt_started_at timestamptz,
    ADD COLUMN failed_attempt_ended_at timestamptz,
    ADD COLUMN failed_attempt_worker text;
