-- The segments' insert trigger names its tables with their schema instead
-- of running under a search_path fixed by the function's SET clause.
--
-- 0035 pinned the search_path of outbox_segment_inserted(), which runs once
-- for every statement that inserts into a segment, so that a producer's own
-- table called apps cannot stand in for outboxd's. A function with a SET
-- clause saves, sets and restores the setting on every call; with the
-- nested call of outbox_wake() that was about 6 % of a producer's
-- single-row enqueues (pgbench, single-row inserts into a segment against
-- the same inserts into outbox, four clients: docs/performance.md,
-- "Single-row enqueue without a pinned search_path"). The body now names
-- apps as <schema>.apps, the schema this migration runs in, written into
-- the function when it is created, compares ids with pg_catalog's
-- operator (a session's own `=` for uuid, found first on its search_path,
-- cannot vouch for an unknown app), and does the wake-up of outbox_wake()
-- itself: a change to the wake-up must change both. Its behaviour is
-- unchanged: the same lock on each distinct app, the same error for an
-- unknown one, the same wake-up.
--
-- outbox_app_still_named() keeps its pinned search_path: it runs only when
-- an app is deleted, renumbered or truncated.
--
-- Old and new dispatchers interoperate: no statement of theirs changes, and
-- replacing a function takes no lock a producer or a claim waits for.

DO $migration$
BEGIN
    EXECUTE format($function$
CREATE OR REPLACE FUNCTION outbox_segment_inserted() RETURNS trigger
LANGUAGE plpgsql AS $body$
DECLARE
    missing uuid;
BEGIN
    SELECT i.app_id INTO missing
    FROM (SELECT DISTINCT app_id FROM inserted) i
    LEFT JOIN LATERAL (SELECT a.id FROM %1$I.apps a
                       WHERE a.id OPERATOR(pg_catalog.=) i.app_id FOR KEY SHARE) a ON true
    WHERE a.id IS NULL
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'insert or update on table "%%" violates foreign key constraint "outbox_app_id_fkey"',
                        TG_TABLE_NAME
            USING ERRCODE = 'foreign_key_violation',
                  CONSTRAINT = 'outbox_app_id_fkey',
                  TABLE = TG_TABLE_NAME,
                  DETAIL = pg_catalog.format('Key (app_id)=(%%s) is not present in table "apps".', missing);
    END IF;
    -- outbox_wake(), written out: one PL/pgSQL call less per statement.
    PERFORM pg_catalog.pg_advisory_xact_lock_shared(1869968482, 2);
    IF (CASE WHEN pg_catalog.pg_try_advisory_lock(1869968482, 1)
             THEN NOT pg_catalog.pg_advisory_unlock(1869968482, 1)
             ELSE true END) THEN
        PERFORM pg_catalog.pg_notify('outbox_due', '');
    END IF;
    RETURN NULL;
END
$body$
$function$, current_schema());
    ALTER FUNCTION outbox_segment_inserted() RESET search_path;
END
$migration$;
