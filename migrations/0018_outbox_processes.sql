-- The dispatcher processes that are up, and what each serves.
--
-- Every dispatcher writes its row when it starts and again every second
-- (outbox_core::store::processes::beat); a row whose expires_at has passed
-- belongs to a process that stopped or died, and is ignored and deleted by
-- the next beat of any process. Operators and the dashboard read who serves
-- what here; the metrics sampler counts the due rows that no live process
-- serves (outboxd_rows_unserved), which wait instead of burning attempts.
--
-- topics are served by name, patterns are shown as declared (NATS-style,
-- or a handler's prefix followed by '*'), and regexes are the same match as
-- PostgreSQL regular expressions, so that SQL can tell whether a topic is
-- served without knowing the pattern syntax.
CREATE TABLE outbox_processes (
    id          uuid PRIMARY KEY,
    worker      text        NOT NULL,
    host        text        NOT NULL,
    pid         integer     NOT NULL,
    version     text        NOT NULL,
    topics      text[]      NOT NULL DEFAULT '{}',
    patterns    text[]      NOT NULL DEFAULT '{}',
    regexes     text[]      NOT NULL DEFAULT '{}',
    started_at  timestamptz NOT NULL DEFAULT now(),
    last_seen   timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);
