-- outbox_enqueue() refuses a topic that cannot become NATS subject tokens,
-- as `outboxd enqueue`, the HTTP API and the library now do: whitespace, an
-- empty name (a dot at the start or the end, or two in a row) or a `*` or
-- `>` within a name. Such a topic was accepted and its row dead-lettered on
-- its first relay ("subject token {topic} is empty"), or, with a leading
-- dot, never claimed by the relay's `>` at all. A webhook's topic
-- (`webhook:…`) must have a URL's shape instead: http(s)://, a host, no
-- spaces (`webhook:not-a-url` was dead-lettered on its first attempt).
-- Invisible characters (a zero-width space or joiner, a byte-order mark)
-- are refused with the control characters: `a` U+200B `b` looked like `ab`
-- in the console. Whitespace is listed character by character, not as
-- `\s`, whose reach beyond ASCII follows the database's locale. Rows
-- already written keep their topics. The signature is unchanged, so the
-- function is replaced in place and keeps its owner and privileges.

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
    IF p_topic ~ E'[\\x01-\\x1f\\x7f-\\x9f\\u200b-\\u200f\\u202a-\\u202e\\u2060\\u2066-\\u2069\\ufeff]' THEN
        RAISE EXCEPTION 'outbox_enqueue: invalid topic: it must not contain control characters'
            USING ERRCODE = 'check_violation';
    END IF;
    -- A webhook's URL has the shape a POST needs (`webhook:not-a-url` was
    -- accepted and dead-lettered on its first attempt).
    IF p_topic LIKE 'webhook:%' AND (p_topic !~ '^webhook:https?://[^/]'
                                     OR p_topic ~ E'[\\x09-\\x0d\\x20\\u0085\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]') THEN
        RAISE EXCEPTION 'outbox_enqueue: invalid topic %: a webhook topic is webhook:http(s)://host/path, without spaces',
            quote_literal(p_topic)
            USING ERRCODE = 'check_violation';
    END IF;
    -- Any other topic becomes NATS subject tokens when it is relayed: as
    -- the library, no whitespace, no empty name, no wildcard within a name.
    IF p_topic NOT LIKE 'webhook:%' THEN
        IF p_topic ~ E'[\\x09-\\x0d\\x20\\u0085\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]' THEN
            RAISE EXCEPTION 'outbox_enqueue: invalid topic %: it must not contain whitespace (a topic is dot-separated names such as orders.created)',
                quote_literal(p_topic)
                USING ERRCODE = 'check_violation';
        END IF;
        IF '' = ANY (string_to_array(p_topic, '.')) THEN
            RAISE EXCEPTION 'outbox_enqueue: invalid topic %: it has an empty name (a dot at its start or end, or two in a row)',
                quote_literal(p_topic)
                USING ERRCODE = 'check_violation';
        END IF;
        IF p_topic ~ '[*>]' THEN
            RAISE EXCEPTION 'outbox_enqueue: invalid topic %: its names hold no ''*'' or ''>'' (wildcards are for patterns such as nats.relay_topics)',
                quote_literal(p_topic)
                USING ERRCODE = 'check_violation';
        END IF;
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
