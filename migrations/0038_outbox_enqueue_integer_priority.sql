-- outbox_enqueue() takes its priority as an integer, and refuses a bad topic
-- or key with a message of its own.
--
-- `p_priority` was a smallint, and PostgreSQL does not turn an integer into
-- a smallint to find a function: `outbox_enqueue('shop', 't', p_priority =>
-- 5)` failed with "function … does not exist" unless the caller wrote
-- `5::smallint`. A parameter's type cannot be changed in place, so the
-- function is dropped and created again in this migration's transaction;
-- callers never see it missing. The privileges granted on the old function
-- are granted again on the new one.
--
-- A topic, key or source out of range was refused by the table's CHECK,
-- naming a constraint of an internal segment table. The function now says
-- which argument is wrong, with the same SQLSTATEs as before (23502 for a
-- NULL topic or source, 23514 for the rest), and refuses what `outboxd
-- enqueue`, the HTTP API and the library refuse in a topic: a pattern (a
-- `*` or `>` token) or a control character. Lengths stay counted in
-- characters, as the table's checks count them.
--
-- With an idempotency key, a call that collided with a row which then
-- finished before the look-up answered NULL and wrote nothing; it now
-- inserts again (three times at most, then SQLSTATE 40001, "try again").

CREATE TEMPORARY TABLE outbox_enqueue_grants ON COMMIT DROP AS
    SELECT coalesce(p.proacl, acldefault('f', p.proowner)) AS acl, p.proowner AS owner
    FROM pg_proc p
    WHERE p.oid = 'outbox_enqueue(text, text, jsonb, timestamptz, text, text, integer, jsonb, text, smallint, text)'::regprocedure;

DROP FUNCTION outbox_enqueue(text, text, jsonb, timestamptz, text, text, integer, jsonb, text, smallint, text);

CREATE FUNCTION outbox_enqueue(
    p_app             text,
    p_topic           text,
    p_payload         jsonb DEFAULT '{}'::jsonb,
    p_run_at          timestamptz DEFAULT NULL,
    p_idempotency_key text DEFAULT NULL,
    p_ordering_key    text DEFAULT NULL,
    p_max_attempts    integer DEFAULT NULL,
    p_headers         jsonb DEFAULT '{}'::jsonb,
    p_source          text DEFAULT 'queue',
    p_priority        integer DEFAULT 0,
    p_partition_key   text DEFAULT NULL
) RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    v_app_id     uuid;
    v_id         uuid := outbox_uuid_v7();
    v_run_at     timestamptz;
    v_not_before timestamptz;
    v_segment    smallint;
    v_key        record;
    v_inserted   uuid;
BEGIN
    SELECT id INTO v_app_id FROM apps WHERE slug = p_app;
    IF v_app_id IS NULL THEN
        RAISE EXCEPTION 'outbox_enqueue: unknown app %', quote_literal(p_app)
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    IF p_topic IS NULL THEN
        RAISE EXCEPTION 'outbox_enqueue: the topic must not be NULL'
            USING ERRCODE = 'not_null_violation';
    END IF;
    IF length(p_topic) NOT BETWEEN 1 AND 255 THEN
        RAISE EXCEPTION 'outbox_enqueue: invalid topic: it must be 1 to 255 characters (it has %)',
            length(p_topic)
            USING ERRCODE = 'check_violation';
    END IF;
    IF '*' = ANY (string_to_array(p_topic, '.')) OR '>' = ANY (string_to_array(p_topic, '.')) THEN
        RAISE EXCEPTION 'outbox_enqueue: invalid topic %: it is a pattern; name one topic (the wildcards * and > are for patterns such as nats.relay_topics)',
            quote_literal(p_topic)
            USING ERRCODE = 'check_violation';
    END IF;
    -- As the library: a topic is shown in logs, metrics and the console,
    -- where a line break could forge a line and a bidirectional control
    -- reorder what an operator reads.
    -- E'…': the same text whatever standard_conforming_strings says.
    IF p_topic ~ E'[\\x01-\\x1f\\x7f-\\x9f\\u200e\\u200f\\u202a-\\u202e\\u2066-\\u2069]' THEN
        RAISE EXCEPTION 'outbox_enqueue: invalid topic: it must not contain control characters'
            USING ERRCODE = 'check_violation';
    END IF;
    FOR v_key IN
        SELECT * FROM (VALUES ('idempotency_key', p_idempotency_key),
                              ('ordering_key', p_ordering_key),
                              ('partition_key', p_partition_key)) AS k (field, val)
        WHERE length(k.val) NOT BETWEEN 1 AND 255
    LOOP
        RAISE EXCEPTION 'outbox_enqueue: invalid %: it must be 1 to 255 characters (it has %)',
            v_key.field, length(v_key.val)
            USING ERRCODE = 'check_violation';
    END LOOP;
    IF p_source IS NULL THEN
        RAISE EXCEPTION 'outbox_enqueue: the source must not be NULL'
            USING ERRCODE = 'not_null_violation';
    END IF;
    IF p_source NOT IN ('kv', 'cron', 'pubsub', 'queue', 'dead_letter', 'email', 'nats') THEN
        RAISE EXCEPTION 'outbox_enqueue: invalid source %: it must be one of kv, cron, pubsub, queue, dead_letter, email, nats',
            quote_literal(p_source)
            USING ERRCODE = 'check_violation';
    END IF;
    IF p_max_attempts < 1 THEN
        RAISE EXCEPTION 'outbox_enqueue: invalid max_attempts %: it must be at least 1', p_max_attempts
            USING ERRCODE = 'check_violation';
    END IF;
    IF p_payload IS NULL THEN
        p_payload := '{}'::jsonb;
    END IF;
    IF p_headers IS NULL THEN
        p_headers := '{}'::jsonb;
    END IF;
    IF jsonb_typeof(p_headers) <> 'object' THEN
        RAISE EXCEPTION 'outbox_enqueue: invalid headers: they must be a JSON object (got %)',
            jsonb_typeof(p_headers)
            USING ERRCODE = 'check_violation';
    END IF;
    IF p_priority IS NULL OR p_priority NOT BETWEEN 0 AND 9 THEN
        RAISE EXCEPTION 'outbox_enqueue: invalid priority %: it must be between 0 and 9', p_priority
            USING ERRCODE = 'check_violation';
    END IF;
    v_run_at := coalesce(p_run_at, now()) - make_interval(secs => p_priority * 10);
    v_not_before := CASE WHEN p_priority > 0 AND p_run_at > now() THEN p_run_at END;
    IF p_idempotency_key IS NOT NULL OR coalesce(p_run_at, now()) > now() + interval '1 minute' THEN
        -- The row holding the key may finish (and be deleted) between the
        -- insert that collided with it and the look-up: then insert again,
        -- as the library does, rather than answer NULL.
        FOR v_try IN 1..3 LOOP
            INSERT INTO outbox (id, app_id, source, topic, payload, headers, run_at,
                                idempotency_key, ordering_key, max_attempts, priority, not_before,
                                partition_key)
            VALUES (v_id, v_app_id, p_source, p_topic, p_payload, p_headers, v_run_at,
                    p_idempotency_key, p_ordering_key, p_max_attempts, p_priority, v_not_before,
                    p_partition_key)
            ON CONFLICT (app_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
            RETURNING id INTO v_inserted;
            IF v_inserted IS NOT NULL THEN
                RETURN v_inserted;
            END IF;
            -- ONLY: keys live in outbox itself, and reading the segments
            -- would hold their locks, and so hold off rotation, until the
            -- caller's transaction ends.
            SELECT id INTO v_inserted FROM ONLY outbox
            WHERE app_id = v_app_id AND idempotency_key = p_idempotency_key;
            IF v_inserted IS NOT NULL THEN
                RETURN v_inserted;
            END IF;
        END LOOP;
        RAISE EXCEPTION 'outbox_enqueue: the row holding idempotency key % kept finishing while this call looked it up; try again',
            quote_literal(p_idempotency_key)
            USING ERRCODE = 'serialization_failure';
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

-- The old function's owner and privileges on the new one, exactly: what
-- default privileges gave the new function (a REVOKE from PUBLIC, a grant
-- to some role) is undone where the old function had it otherwise.
DO $$
DECLARE
    v_new   regprocedure := 'outbox_enqueue(text, text, jsonb, timestamptz, text, text, integer, jsonb, text, integer, text)'::regprocedure;
    v_acl   aclitem[];
    v_owner oid;
    v_grant record;
BEGIN
    SELECT acl, owner INTO v_acl, v_owner FROM outbox_enqueue_grants;
    IF v_owner IS DISTINCT FROM (SELECT proowner FROM pg_proc WHERE oid = v_new) THEN
        EXECUTE format('ALTER FUNCTION %s OWNER TO %s', v_new, v_owner::regrole);
    END IF;
    FOR v_grant IN
        SELECT a.grantee
        FROM pg_proc p, aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) AS a
        WHERE p.oid = v_new AND a.privilege_type = 'EXECUTE' AND a.grantee <> v_owner
    LOOP
        -- regrole's text is already quoted where it needs to be.
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM %s', v_new,
                       CASE WHEN v_grant.grantee = 0 THEN 'PUBLIC'
                            ELSE v_grant.grantee::regrole::text END);
    END LOOP;
    FOR v_grant IN
        SELECT a.grantee, a.is_grantable FROM aclexplode(v_acl) AS a
        WHERE a.privilege_type = 'EXECUTE' AND a.grantee <> v_owner
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %s%s', v_new,
                       CASE WHEN v_grant.grantee = 0 THEN 'PUBLIC'
                            ELSE v_grant.grantee::regrole::text END,
                       CASE WHEN v_grant.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
    END LOOP;
END
$$;
