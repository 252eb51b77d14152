-- An app may keep its dead letters for good (dead_letter_retention_days = 0),
-- as the global dead_letter_retention_days = 0 does for apps without their
-- own: one app's audit trail can outlive a sweep of the others. apps is
-- small; the check is rebuilt at once, waiting at most 10 s for a lock behind
-- a long transaction (then it fails and can be run again).
SET LOCAL lock_timeout = '10s';
ALTER TABLE apps DROP CONSTRAINT IF EXISTS apps_dead_letter_retention_days_check;
ALTER TABLE apps ADD CONSTRAINT apps_dead_letter_retention_days_check
    CHECK (dead_letter_retention_days BETWEEN 0 AND 3650);
