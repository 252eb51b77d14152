-- Segments: most rows live in three tables used in turn, which are emptied
-- with TRUNCATE, so their space comes back without VACUUM (docs/architecture.md,
-- "While a snapshot is held").
--
-- outbox_s0, outbox_s1 and outbox_s2 inherit from outbox: every SELECT,
-- UPDATE and DELETE on outbox reaches them unchanged, and ids stay unique
-- across them because they are UUIDv7s made by whoever inserts. Producers
-- insert rows without an idempotency key that are due soon into the
-- current segment (outbox_segments.current); rows with an idempotency key,
-- rows scheduled far ahead and a plain INSERT INTO outbox stay in outbox
-- itself, whose unique index keeps idempotency keys unique as before.
--
-- The leader rotates (outbox_core::store::segments::rotate): the segment
-- after the current one, current two periods ago, has its remaining rows
-- moved to outbox and is truncated, under a short lock_timeout, and then
-- becomes the current one. A segment may receive rows at any time (a
-- producer that read the current segment a moment before a rotation): a
-- rotation moves whatever it finds, so no placement can lose a row.
--
-- Rows in flight during the upgrade stay in outbox. Dispatchers older than
-- this migration change rows by ctid alone and must be stopped before it
-- runs: in a segment, a ctid names a different row (docs/operations.md).
-- The migration refuses to run while a dispatcher's heartbeat is live.

DO $$
DECLARE
    p record;
BEGIN
    SELECT host, pid, version INTO p FROM outbox_processes WHERE expires_at > now()
    ORDER BY last_seen DESC LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'migration 0032 (outbox segments) needs every dispatcher stopped: '
            'a process is running (host %, pid %, version %); stop all outboxd processes '
            'of earlier versions, wait a lease for a crashed one, then migrate again',
            p.host, p.pid, p.version
            USING ERRCODE = 'object_in_use';
    END IF;
END
$$;

CREATE TABLE outbox_segments (
    one         boolean PRIMARY KEY DEFAULT true CHECK (one),
    current     smallint NOT NULL DEFAULT 0 CHECK (current BETWEEN 0 AND 2),
    switched_at timestamptz NOT NULL DEFAULT now(),
    rotations   bigint NOT NULL DEFAULT 0
);
INSERT INTO outbox_segments DEFAULT VALUES;

DO $$
DECLARE
    s text;
BEGIN
    FOREACH s IN ARRAY ARRAY['outbox_s0', 'outbox_s1', 'outbox_s2'] LOOP
        EXECUTE format('CREATE TABLE %I () INHERITS (outbox)', s);
        EXECUTE format('ALTER TABLE %I ADD PRIMARY KEY (id)', s);
        EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I CHECK (idempotency_key IS NULL)',
                       s, s || '_no_idempotency_key');
        -- Named as outbox's own, which the library recognises (an unknown app).
        EXECUTE format('ALTER TABLE %I ADD CONSTRAINT outbox_app_id_fkey
                        FOREIGN KEY (app_id) REFERENCES apps (id)', s);
        EXECUTE format('CREATE INDEX %I ON %I (app_id, run_at, id) WHERE app_id IS NOT NULL',
                       s || '_due_idx', s);
        EXECUTE format('CREATE INDEX %I ON %I (enqueue_xid)', s || '_enqueue_xid_idx', s);
        EXECUTE format('CREATE INDEX %I ON %I (app_id, ordering_key, enqueue_xid, id)
                        WHERE ordering_key IS NOT NULL', s || '_ordering_idx', s);
        EXECUTE format('ALTER TABLE %I SET (
                            fillfactor = 40,
                            vacuum_truncate = false,
                            autovacuum_vacuum_scale_factor = 0,
                            autovacuum_vacuum_threshold = 5000,
                            autovacuum_vacuum_insert_scale_factor = 0,
                            autovacuum_vacuum_insert_threshold = 20000,
                            autovacuum_analyze_scale_factor = 0,
                            autovacuum_analyze_threshold = 20000,
                            autovacuum_vacuum_cost_delay = 0)', s);
        EXECUTE format('CREATE TRIGGER outbox_notify_insert AFTER INSERT ON %I
                        FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify()', s);
    END LOOP;
END
$$;

-- The SQL function puts a row without an idempotency key that is due within
-- a minute into the current segment; any other row into outbox, as before.
CREATE OR REPLACE FUNCTION outbox_enqueue(
    p_app             text,
    p_topic           text,
    p_payload         jsonb DEFAULT '{}'::jsonb,
    p_run_at          timestamptz DEFAULT NULL,
    p_idempotency_key text DEFAULT NULL,
    p_ordering_key    text DEFAULT NULL,
    p_max_attempts    integer DEFAULT NULL,
    p_headers         jsonb DEFAULT '{}'::jsonb,
    p_source          text DEFAULT 'queue',
    p_priority        smallint DEFAULT 0,
    p_partition_key   text DEFAULT NULL
) RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    v_app_id     uuid;
    v_id         uuid := outbox_uuid_v7();
    v_run_at     timestamptz;
    v_not_before timestamptz;
    v_segment    smallint;
BEGIN
    SELECT id INTO v_app_id FROM apps WHERE slug = p_app;
    IF v_app_id IS NULL THEN
        RAISE EXCEPTION 'outbox_enqueue: unknown app %', quote_literal(p_app)
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    IF p_payload IS NULL THEN
        p_payload := '{}'::jsonb;
    END IF;
    IF p_headers IS NULL THEN
        p_headers := '{}'::jsonb;
    END IF;
    IF p_priority IS NULL OR p_priority NOT BETWEEN 0 AND 9 THEN
        RAISE EXCEPTION 'outbox_enqueue: invalid priority %: it must be between 0 and 9', p_priority
            USING ERRCODE = 'check_violation';
    END IF;
    IF length(p_partition_key) NOT BETWEEN 1 AND 255 THEN
        RAISE EXCEPTION 'outbox_enqueue: invalid partition_key: it must be 1 to 255 characters'
            USING ERRCODE = 'check_violation';
    END IF;
    v_run_at := coalesce(p_run_at, now()) - make_interval(secs => p_priority * 10);
    v_not_before := CASE WHEN p_priority > 0 AND p_run_at > now() THEN p_run_at END;
    IF p_idempotency_key IS NOT NULL OR coalesce(p_run_at, now()) > now() + interval '1 minute' THEN
        INSERT INTO outbox (id, app_id, source, topic, payload, headers, run_at,
                            idempotency_key, ordering_key, max_attempts, priority, not_before,
                            partition_key)
        VALUES (v_id, v_app_id, p_source, p_topic, p_payload, p_headers, v_run_at,
                p_idempotency_key, p_ordering_key, p_max_attempts, p_priority, v_not_before,
                p_partition_key)
        ON CONFLICT (app_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
        RETURNING id INTO v_id;
        IF v_id IS NULL THEN
            -- ONLY: keys live in outbox itself, and reading the segments
            -- would hold their locks, and so hold off rotation, until the
            -- caller's transaction ends.
            SELECT id INTO v_id FROM ONLY outbox
            WHERE app_id = v_app_id AND idempotency_key = p_idempotency_key;
        END IF;
        RETURN v_id;
    END IF;
    -- One static INSERT per segment rather than EXECUTE format('%I'):
    -- PL/pgSQL keeps the plans of static statements, EXECUTE plans each call.
    SELECT current INTO v_segment FROM outbox_segments;
    IF v_segment = 1 THEN
        INSERT INTO outbox_s1 (id, app_id, source, topic, payload, headers, run_at,
                               ordering_key, max_attempts, priority, not_before, partition_key)
        VALUES (v_id, v_app_id, p_source, p_topic, p_payload, p_headers, v_run_at,
                p_ordering_key, p_max_attempts, p_priority, v_not_before, p_partition_key);
    ELSIF v_segment = 2 THEN
        INSERT INTO outbox_s2 (id, app_id, source, topic, payload, headers, run_at,
                               ordering_key, max_attempts, priority, not_before, partition_key)
        VALUES (v_id, v_app_id, p_source, p_topic, p_payload, p_headers, v_run_at,
                p_ordering_key, p_max_attempts, p_priority, v_not_before, p_partition_key);
    ELSE
        INSERT INTO outbox_s0 (id, app_id, source, topic, payload, headers, run_at,
                               ordering_key, max_attempts, priority, not_before, partition_key)
        VALUES (v_id, v_app_id, p_source, p_topic, p_payload, p_headers, v_run_at,
                p_ordering_key, p_max_attempts, p_priority, v_not_before, p_partition_key);
    END IF;
    RETURN v_id;
END
$$;
