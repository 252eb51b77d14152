-- Per-app retention: overrides dead_letter_retention_days for one app (NULL: the global setting).
ALTER TABLE apps ADD COLUMN dead_letter_retention_days integer CHECK (dead_letter_retention_days BETWEEN 1 AND 3650);
