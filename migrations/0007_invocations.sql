-- Synchronous invoke: the caller's inbox. The caller creates it with the
-- outbox row, waits for a NOTIFY on outbox_reply, then reads and deletes it.
-- A dispatcher that finds no inbox (the caller gave up) records an
-- abandoned execution instead.
CREATE TABLE invocation_inboxes (
    inbox        uuid PRIMARY KEY,
    app_id       uuid NOT NULL REFERENCES apps (id) ON DELETE CASCADE,
    outbox_id    uuid NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    ok           boolean,
    result       jsonb
);
