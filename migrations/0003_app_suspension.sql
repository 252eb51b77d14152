-- A suspended app's outbox rows wait (they are not claimed), and messages the
-- consumer runtime receives for it are dead-lettered with that reason.
ALTER TABLE apps ADD COLUMN suspended_at timestamptz;
