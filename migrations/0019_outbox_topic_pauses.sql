-- Paused topics: their due rows wait, in every process, until resumed.
--
-- Each dispatcher reads the pauses on its beat (every second, with
-- outbox_processes), so a pause is honoured within about a second and a
-- resume takes effect without a restart; rows already running finish. A
-- whole app is paused with apps.suspended_at (outboxd app suspend).
CREATE TABLE outbox_topic_pauses (
    app_id     uuid        NOT NULL REFERENCES apps (id) ON DELETE CASCADE,
    topic      text        NOT NULL CHECK (length(topic) BETWEEN 1 AND 255),
    paused_at  timestamptz NOT NULL DEFAULT now(),
    paused_by  text,
    reason     text CHECK (length(reason) <= 1000),
    PRIMARY KEY (app_id, topic)
);
