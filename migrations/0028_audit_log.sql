-- Who did what to an app, when, and to how many rows: operator actions of
-- the API, the dashboard and the CLI (replay, ignore, bulk actions, pause,
-- resume, limits, cancel, triggers, app settings) write one entry in the
-- transaction of the action itself, so an action without its entry cannot
-- commit. Entries are
-- small and few (one per action, not per row) and are kept; delete old ones
-- by hand if a policy asks for it.
CREATE TABLE audit_log (
    id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at      timestamptz NOT NULL DEFAULT now(),
    actor   text        NOT NULL,
    app_id  uuid        NOT NULL REFERENCES apps (id) ON DELETE CASCADE,
    action  text        NOT NULL,
    target  text,
    rows    bigint      NOT NULL DEFAULT 0,
    detail  jsonb       NOT NULL DEFAULT '{}'::jsonb
);

-- The console reads an app's entries newest first, a page at a time.
CREATE INDEX audit_log_app_idx ON audit_log (app_id, id DESC);
