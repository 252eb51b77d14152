-- Priorities with aging: a row of priority p (0 to 9, default 0) is claimed
-- as if it had been due p × 10 seconds earlier. Within an app, a row of a
-- higher priority therefore runs before the rows of lower ones that became
-- due less than the difference × 10 s before it; a row of priority 0 waits
-- at most 90 s behind a steady stream of priority-9 rows, never forever.
--
-- The claim order stays the index order of outbox_due_idx (app_id, run_at,
-- id): the statements that write a row of a non-zero priority (enqueue,
-- outbox_enqueue(), a retry's reschedule) store run_at that much earlier, and
-- keep the time the row is really due in not_before, which claims respect (a
-- row scheduled for later does not run early). A trigger would do the same
-- for hand-written INSERTs, but it cost every enqueue about 5 %, rows of
-- priority 0 included: insert by hand with run_at already moved back (and
-- not_before set), or through outbox_enqueue().
ALTER TABLE outbox
    ADD COLUMN priority smallint NOT NULL DEFAULT 0,
    ADD COLUMN not_before timestamptz;
ALTER TABLE outbox
    ADD CONSTRAINT outbox_priority_range CHECK (priority BETWEEN 0 AND 9) NOT VALID;

-- outbox_enqueue() gains p_priority, last and optional: existing calls are
-- unchanged.
DROP FUNCTION outbox_enqueue(text, text, jsonb, timestamptz, text, text, integer, jsonb, text);
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
    p_priority        smallint DEFAULT 0
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
    INSERT INTO outbox (id, app_id, source, topic, payload, headers, run_at,
                        idempotency_key, ordering_key, max_attempts, priority, not_before)
    VALUES (outbox_uuid_v7(), v_app_id, p_source, p_topic, p_payload,
            coalesce(p_headers, '{}'::jsonb),
            coalesce(p_run_at, now()) - make_interval(secs => p_priority * 10),
            p_idempotency_key, p_ordering_key, p_max_attempts, p_priority,
            CASE WHEN p_priority > 0 AND p_run_at > now() THEN p_run_at END)
    ON CONFLICT (app_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING id INTO v_id;
    IF v_id IS NULL THEN
        SELECT id INTO v_id FROM outbox
        WHERE app_id = v_app_id AND idempotency_key = p_idempotency_key;
    END IF;
    RETURN v_id;
END
$$;
