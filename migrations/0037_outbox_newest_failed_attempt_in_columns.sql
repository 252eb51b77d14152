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
-- Adding columns without a default changes only the catalog. It takes an
-- ACCESS EXCLUSIVE lock on outbox and its segments for that moment, waiting
-- at most 10 s behind open transactions (then it fails without a change and
-- can be run again); claims and producers queue behind it meanwhile, and a
-- producer caught between its locks may fail with a deadlock error (40P01)
-- and retry. Dispatchers of the previous version keep appending to
-- `attempts` and do not see the columns: while both run, a row failed by
-- both may list its attempts out of order or with the error of the attempt
-- after (an old retry overwrites last_error while the columns hold an
-- attempt), and a dead letter or a cancel written by the previous version
-- leaves out the attempt the columns held (the attempt stays counted).
-- Finish a roll-out before relying on the history.

SET LOCAL lock_timeout = '10s';

ALTER TABLE outbox
    ADD COLUMN failed_attempt integer,
    ADD COLUMN failed_attempt_started_at timestamptz,
    ADD COLUMN failed_attempt_ended_at timestamptz,
    ADD COLUMN failed_attempt_worker text;

COMMENT ON COLUMN outbox.attempts IS
    'The failed attempts before the newest, oldest first: [attempt, started_at, ended_at, worker, error] '
    'arrays (objects with those keys before migration 0027); NULL when none was recorded. '
    'The newest failed attempt is in the failed_attempt columns, its error in last_error.';
COMMENT ON COLUMN outbox.failed_attempt IS
    'The number of the newest failed attempt (its error is last_error); NULL when none was recorded.';
COMMENT ON COLUMN outbox.failed_attempt_started_at IS 'When the newest failed attempt was claimed.';
COMMENT ON COLUMN outbox.failed_attempt_ended_at IS 'When the newest failed attempt failed.';
COMMENT ON COLUMN outbox.failed_attempt_worker IS 'The process that ran the newest failed attempt.';
