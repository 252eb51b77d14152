-- A segment checks the apps of the rows a statement inserted once per
-- statement, instead of once per row through a foreign key.
--
-- A foreign key runs one lookup of `apps` (SELECT … FOR KEY SHARE) for each
-- inserted row; in a batch of 100 plain events, which all name the same
-- app, that was 40 % of the server's work per row (docs/performance.md,
-- "Batch enqueue without a check per row"). The segments' insert trigger
-- now reads the statement's distinct apps from its transition table and
-- locks each of them FOR KEY SHARE, as the foreign key did, so an app
-- cannot be deleted until the producer's transaction ends. An unknown app
-- is refused with the foreign key's SQLSTATE and constraint name
-- (outbox_app_id_fkey), which the library already recognises.
--
-- The other direction, deleting or renumbering an app that rows of a
-- segment still name, is refused by a trigger on `apps`. It looks for such
-- rows with the snapshot of the statement that runs after the app's row is
-- locked, which sees every producer that locked it before; a REPEATABLE
-- READ or SERIALIZABLE transaction keeps an older snapshot, so there the
-- trigger refuses the change outright (outboxd itself never deletes an
-- app). A TRUNCATE of `apps` is refused while a segment holds rows (a
-- TRUNCATE … CASCADE reaches outbox through its foreign key but not the
-- segments). outbox itself keeps its foreign key: rotation moves rows into
-- it and rows with idempotency keys live there.
--
-- A foreign key names its tables once and for all; the two functions that
-- replace it read them with a search_path fixed to this schema, with pg_temp
-- last, so a session's own table called apps cannot stand in for it.
--
-- Old and new dispatchers interoperate: none of their statements change.
-- Dropping the foreign keys takes ACCESS EXCLUSIVE locks on the segments and
-- on apps until the migration commits; it waits at most 10 s for them, then
-- fails without a change and can be run again.

SET LOCAL lock_timeout = '10s';
LOCK TABLE apps, outbox_s0, outbox_s1, outbox_s2 IN ACCESS EXCLUSIVE MODE;

CREATE FUNCTION outbox_wake() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(1869968482, 2);
    IF (CASE WHEN pg_try_advisory_lock(1869968482, 1)
             THEN NOT pg_advisory_unlock(1869968482, 1)
             ELSE true END) THEN
        PERFORM pg_notify('outbox_due', '');
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION outbox_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM outbox_wake();
    RETURN NULL;
END
$$;

CREATE FUNCTION outbox_segment_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    missing uuid;
BEGIN
    SELECT i.app_id INTO missing
    FROM (SELECT DISTINCT app_id FROM inserted) i
    LEFT JOIN LATERAL (SELECT a.id FROM apps a WHERE a.id = i.app_id FOR KEY SHARE) a ON true
    WHERE a.id IS NULL
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'insert or update on table "%" violates foreign key constraint "outbox_app_id_fkey"',
                        TG_TABLE_NAME
            USING ERRCODE = 'foreign_key_violation',
                  CONSTRAINT = 'outbox_app_id_fkey',
                  TABLE = TG_TABLE_NAME,
                  DETAIL = format('Key (app_id)=(%s) is not present in table "apps".', missing);
    END IF;
    PERFORM outbox_wake();
    RETURN NULL;
END
$$;

CREATE FUNCTION outbox_app_still_named() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    s text;
    named boolean;
BEGIN
    IF current_setting('transaction_isolation') NOT IN ('read committed', 'read uncommitted') THEN
        RAISE EXCEPTION 'apps can be deleted, renumbered or truncated only in a READ COMMITTED transaction'
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'outbox segments look for rows of the app with a fresh snapshot, '
                         'which a REPEATABLE READ or SERIALIZABLE transaction does not take';
    END IF;
    IF TG_OP = 'TRUNCATE' THEN
        FOREACH s IN ARRAY ARRAY['outbox_s0', 'outbox_s1', 'outbox_s2'] LOOP
            EXECUTE format('SELECT EXISTS (SELECT 1 FROM %I)', s) INTO named;
            IF named THEN
                RAISE EXCEPTION 'cannot truncate table "apps": rows of table "%" name apps', s
                    USING ERRCODE = 'foreign_key_violation';
            END IF;
        END LOOP;
        RETURN NULL;
    END IF;
    FOREACH s IN ARRAY ARRAY['outbox_s0', 'outbox_s1', 'outbox_s2'] LOOP
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM %I WHERE app_id = $1)', s)
            INTO named USING OLD.id;
        IF named THEN
            RAISE EXCEPTION 'update or delete on table "apps" violates foreign key constraint "outbox_app_id_fkey" on table "%"', s
                USING ERRCODE = 'foreign_key_violation',
                      CONSTRAINT = 'outbox_app_id_fkey',
                      TABLE = s,
                      DETAIL = format('Key (id)=(%s) is still referenced from table "%s".', OLD.id, s);
        END IF;
    END LOOP;
    RETURN OLD;
END
$$;

CREATE TRIGGER outbox_app_still_named BEFORE DELETE ON apps
    FOR EACH ROW EXECUTE FUNCTION outbox_app_still_named();
CREATE TRIGGER outbox_app_id_still_named BEFORE UPDATE OF id ON apps
    FOR EACH ROW WHEN (OLD.id IS DISTINCT FROM NEW.id) EXECUTE FUNCTION outbox_app_still_named();
-- AFTER: by then a TRUNCATE that also names outbox (and so its segments)
-- has emptied them, and only a TRUNCATE that left them full is refused.
CREATE TRIGGER outbox_apps_still_named AFTER TRUNCATE ON apps
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_app_still_named();

DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION outbox_segment_inserted() SET search_path = %I, pg_temp',
                   current_schema());
    EXECUTE format('ALTER FUNCTION outbox_app_still_named() SET search_path = %I, pg_temp',
                   current_schema());
END
$$;

DO $$
DECLARE
    s text;
BEGIN
    FOREACH s IN ARRAY ARRAY['outbox_s0', 'outbox_s1', 'outbox_s2'] LOOP
        EXECUTE format('DROP TRIGGER outbox_notify_insert ON %I', s);
        EXECUTE format('CREATE TRIGGER outbox_notify_insert AFTER INSERT ON %I
                        REFERENCING NEW TABLE AS inserted
                        FOR EACH STATEMENT EXECUTE FUNCTION outbox_segment_inserted()', s);
        EXECUTE format('ALTER TABLE %I DROP CONSTRAINT outbox_app_id_fkey', s);
    END LOOP;
END
$$;
