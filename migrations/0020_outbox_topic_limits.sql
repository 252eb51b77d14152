-- Concurrency limits per topic: at most max_running rows of the topic run
-- at once, across every process.
--
-- A limited topic is claimed apart from the others, one claim at a time: a
-- claim locks the topic's row here, counts which of the rows it recorded in
-- running still hold a live lease (a lookup by primary key each, so a
-- process killed with -9 gives its slots back when its leases expire), and
-- claims at most the free slots, recording them. Dispatchers read the limits
-- on their beat (every second, with outbox_processes and the pauses).
CREATE TABLE outbox_topic_limits (
    app_id      uuid        NOT NULL REFERENCES apps (id) ON DELETE CASCADE,
    topic       text        NOT NULL CHECK (length(topic) BETWEEN 1 AND 255),
    max_running integer     NOT NULL CHECK (max_running BETWEEN 1 AND 10000),
    running     uuid[]      NOT NULL DEFAULT '{}',
    set_at      timestamptz NOT NULL DEFAULT now(),
    set_by      text,
    PRIMARY KEY (app_id, topic)
);
