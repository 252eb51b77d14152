-- Concurrency limits per partition key: at most max_running_per_key rows of
-- a topic run at once for each value of their partition_key (a customer, a
-- tenant, an account), across every process; 1 is mutual exclusion per key
-- without the strict order of ordering_key. Rows without a partition key
-- are not limited per key.
--
-- A limited claim (which holds the topic's outbox_topic_limits row) counts
-- the running rows it recorded by key, leaves out the rows of keys at their
-- limit, and takes at most the free slots of each other key.
--
-- The limits first: a limited claim locks its limit's row, then the
-- outbox; taking the tables in the same order cannot deadlock with one.
ALTER TABLE outbox_topic_limits
    ADD COLUMN max_running_per_key integer CHECK (max_running_per_key BETWEEN 1 AND 10000),
    DROP CONSTRAINT outbox_topic_limits_some_limit,
    ADD CONSTRAINT outbox_topic_limits_some_limit
        CHECK (max_running IS NOT NULL OR rate_per_sec IS NOT NULL
               OR max_running_per_key IS NOT NULL);

ALTER TABLE outbox ADD COLUMN partition_key text;
ALTER TABLE outbox
    ADD CONSTRAINT outbox_partition_key_length
        CHECK (length(partition_key) BETWEEN 1 AND 255) NOT VALID;
-- A replayed dead letter keeps its key.
ALTER TABLE dead_letters ADD COLUMN partition_key text;

-- outbox_enqueue() gains p_partition_key, last and optional: existing calls
-- are unchanged.
DROP FUNCTION outbox_enqueue(text, text, jsonb, timestamptz, text, text, integer, jsonb, text, smallint);
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
    p_priority        smallint DEFAULT 0,
    p_partition_key   text DEFAULT NULL
) RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    v_app_id uuid;
    v_id     uuid;
BEGIN
    SELECT id INTO v_app_id FROM apps WHERE slug = p_app;
    IF v_app_id IS NULL THEN
        RAISE EXCEPTION 'outbox_enqueue: unknown app %', quote_literal(p_app)
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    IF p_payload IS NULL THEN
        p_payload := '{}'::jsonb;
    END IF;
    IF p_priority IS NULL OR p_priority NOT BETWEEN 0 AND 9 THEN
        RAISE EXCEPTION 'outbox_enqueue: invalid priority %: it must be between 0 and 9', p_priority
            USING ERRCODE = 'check_violation';
    END IF;
    IF length(p_partition_key) NOT BETWEEN 1 AND 255 THEN
        RAISE EXCEPTION 'outbox_enqueue: invalid partition_key: it must be 1 to 255 characters'
            USING ERRCODE = 'check_violation';
    END IF;
    INSERT INTO outbox (id, app_id, source, topic, payload, headers, run_at,
                        idempotency_key, ordering_key, max_attempts, priority, not_before,
                        partition_key)
    VALUES (outbox_uuid_v7(), v_app_id, p_source, p_topic, p_payload,
            coalesce(p_headers, '{}'::jsonb),
            coalesce(p_run_at, now()) - make_interval(secs => p_priority * 10),
            p_idempotency_key, p_ordering_key, p_max_attempts, p_priority,
            CASE WHEN p_priority > 0 AND p_run_at > now() THEN p_run_at END,
            p_partition_key)
    ON CONFLICT (app_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING id INTO v_id;
    IF v_id IS NULL THEN
        SELECT id INTO v_id FROM outbox
        WHERE app_id = v_app_id AND idempotency_key = p_idempotency_key;
    END IF;
    RETURN v_id;
END
$$;
