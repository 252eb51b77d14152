-- What the console's charts show over the last hour, per app, topic and
-- minute: attempts completed and failed (retried or dead-lettered), counted
-- by each dispatcher process in memory and added here every few seconds
-- (one small upsert per process, never a write per row); and the age of the
-- oldest due row and the rows due, from the leader's sample of the row
-- states. Rows older than a day are deleted as new ones are written.
CREATE TABLE outbox_activity (
    app_id          uuid        NOT NULL REFERENCES apps (id) ON DELETE CASCADE,
    minute          timestamptz NOT NULL,
    topic           text        NOT NULL,
    completed       bigint      NOT NULL DEFAULT 0,
    failed          bigint      NOT NULL DEFAULT 0,
    dead_lettered   bigint      NOT NULL DEFAULT 0,
    due             bigint,
    oldest_due_secs double precision,
    PRIMARY KEY (app_id, minute, topic)
);
CREATE INDEX outbox_activity_minute_idx ON outbox_activity (minute);

-- Rows waiting for a retry's backoff, a part of `scheduled`, counted apart
-- for the console.
ALTER TABLE outbox_topic_states ADD COLUMN retrying bigint NOT NULL DEFAULT 0;
