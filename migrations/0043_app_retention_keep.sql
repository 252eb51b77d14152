-- An app may keep its dead letters for good (`outboxd app retention SLUG 0`),
-- as the global dead_letter_retention_days = 0 does for apps without their
-- own: one app's audit trail can outlive a sweep of the others.
--
-- "For good" is stored as 36500 days (a hundred years), not as 0: a process
-- of an earlier version, still running during a rolling upgrade (or an
-- `outboxd gc --once` in a cron job), reads the column as days, and would
-- take 0 for "older than now", deleting every dead letter of the app. It
-- keeps them a hundred years instead; this version never deletes them
-- (outbox_core::store::retention::KEEP_FOR_GOOD_DAYS). 0 stays refused.
--
-- apps is small; the check is rebuilt at once, waiting at most 10 s for a
-- lock behind a long transaction (then it fails and can be run again).
SET LOCAL lock_timeout = '10s';
ALTER TABLE apps DROP CONSTRAINT IF EXISTS apps_dead_letter_retention_days_check;
ALTER TABLE apps ADD CONSTRAINT apps_dead_letter_retention_days_check
    CHECK (dead_letter_retention_days BETWEEN 1 AND 3650 OR dead_letter_retention_days = 36500);
