-- A segment checks the apps of the rows a statement inserted once per
-- statement, instead of once per row through a foreign key.
--
-- A foreign key runs one lookup of `apps` (SELECT … FOR KEY SHARE) for each
-- inserted row; in a batch of 100 plain events, which all name the same
-- app, that was a third of the server's work per row (docs/performance.md,
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
-- app). outbox itself keeps its foreign key: rotation moves rows into it
-- and rows with idempotency keys live there.
--
-- Old and new dispatchers interoperate: none of their statements change.

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
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'an app can be deleted or renumbered only in a READ COMMITTED transaction'
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'outbox segments look for rows of the app with a fresh snapshot, '
                         'which a REPEATABLE READ or SERIALIZABLE transaction does not take';
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
