-- outboxd foundation schema: tenants, the outbox, dead letters, abandoned executions.
-- Forward-only: never edit a released migration; add a new numbered one.

-- UUIDv7 (time-ordered) generated in SQL, for producers that enqueue through
-- outbox_enqueue(). The Rust library generates the same layout client-side.
CREATE FUNCTION outbox_uuid_v7() RETURNS uuid
LANGUAGE sql VOLATILE PARALLEL SAFE AS $$
    SELECT encode(
        set_bit(set_bit(
            overlay(uuid_send(gen_random_uuid())
                    PLACING substring(int8send(floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
                    FROM 1 FOR 6),
            52, 1), 53, 1),
        'hex')::uuid
$$;

CREATE TABLE apps (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    slug        text NOT NULL UNIQUE CHECK (slug ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    name        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE outbox (
    id                      uuid PRIMARY KEY,
    app_id                  uuid NOT NULL REFERENCES apps (id),
    source                  text NOT NULL DEFAULT 'queue'
                            CHECK (source IN ('kv', 'cron', 'pubsub', 'queue', 'dead_letter', 'email', 'nats')),
    op                      text NOT NULL DEFAULT '',
    topic                   text NOT NULL CHECK (length(topic) BETWEEN 1 AND 255),
    trigger_id              uuid,
    target                  text,
    payload                 jsonb NOT NULL DEFAULT '{}'::jsonb,
    headers                 jsonb NOT NULL DEFAULT '{}'::jsonb,
    idempotency_key         text CHECK (length(idempotency_key) BETWEEN 1 AND 255),
    ordering_key            text CHECK (length(ordering_key) BETWEEN 1 AND 255),
    depth                   integer NOT NULL DEFAULT 0 CHECK (depth >= 0),
    attempt_count           integer NOT NULL DEFAULT 0,
    -- NULL means "the dispatcher's configured default" (trigger_retry_max_attempts).
    max_attempts            integer CHECK (max_attempts >= 1),
    -- Due time. A row is claimable when it is due and has no live lease
    -- (locked_until unset or past); claims leave run_at alone so they stay
    -- HOT updates.
    run_at                  timestamptz NOT NULL DEFAULT now(),
    locked_by               text,
    locked_until            timestamptz,
    -- Fencing token: bumped on every claim; completions must present the current one.
    lease_token             bigint NOT NULL DEFAULT 0,
    first_attempt_at        timestamptz,
    last_attempt_at         timestamptz,
    last_error              text,
    reply_to                text,
    registered_by_principal text,
    -- The transaction that enqueued the row; orders rows of one ordering key and
    -- guards against claiming past a still-open producer transaction.
    enqueue_xid             xid8 NOT NULL DEFAULT pg_current_xact_id(),
    created_at              timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = 90);

-- The claim path: due rows of one app, oldest first. An index range scan whose cost
-- does not depend on the backlog behind the head.
CREATE INDEX outbox_due_idx ON outbox (app_id, run_at, id);
-- Strict per-key ordering: is there an earlier row of the same key?
CREATE INDEX outbox_ordering_idx ON outbox (app_id, ordering_key, enqueue_xid, id)
    WHERE ordering_key IS NOT NULL;
CREATE UNIQUE INDEX outbox_idempotency_idx ON outbox (app_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

ALTER TABLE outbox SET (
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_insert_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.02
);

-- Wake dispatchers once per inserting statement (not once per row of a batch).
-- Rows that are not due yet are found by the poll fallback.
CREATE FUNCTION outbox_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox_due', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER outbox_notify_insert
    AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();

CREATE TABLE dead_letters (
    id                 uuid PRIMARY KEY DEFAULT outbox_uuid_v7(),
    app_id             uuid NOT NULL REFERENCES apps (id),
    original_event_id  uuid NOT NULL,
    source             text NOT NULL,
    op                 text NOT NULL DEFAULT '',
    topic              text NOT NULL,
    trigger_id         uuid,
    handler            text,
    payload            jsonb NOT NULL,
    headers            jsonb NOT NULL DEFAULT '{}'::jsonb,
    ordering_key       text,
    depth              integer NOT NULL DEFAULT 0,
    attempt_count      integer NOT NULL,
    first_attempt_at   timestamptz,
    last_attempt_at    timestamptz,
    last_error         text,
    registered_by_principal text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    resolved_at        timestamptz,
    resolution         text CHECK (resolution IN ('replayed', 'ignored', 'handled_by_script', 'handler_failed')),
    CONSTRAINT dead_letters_resolution_pair CHECK ((resolution IS NULL) = (resolved_at IS NULL))
);

-- Dashboard badge and list: unresolved rows of one app, newest first.
CREATE INDEX dead_letters_unresolved_idx ON dead_letters (app_id, created_at DESC, id DESC)
    WHERE resolved_at IS NULL;
CREATE INDEX dead_letters_app_idx ON dead_letters (app_id, created_at DESC, id DESC);
CREATE INDEX dead_letters_original_idx ON dead_letters (original_event_id);
CREATE INDEX dead_letters_retention_idx ON dead_letters (created_at);

CREATE TABLE abandoned_executions (
    id               uuid PRIMARY KEY DEFAULT outbox_uuid_v7(),
    outbox_id        uuid NOT NULL,
    app_id           uuid NOT NULL REFERENCES apps (id),
    reply_to         text NOT NULL,
    topic            text NOT NULL,
    target           text,
    outcome          text NOT NULL,
    error            text,
    started_at       timestamptz,
    finished_at      timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX abandoned_executions_retention_idx ON abandoned_executions (created_at);

-- Enqueue for producers that are not written in Rust. Same semantics as the
-- library: visible only when the caller's transaction commits; a duplicate
-- idempotency key (while the first row exists) returns the existing id.
CREATE FUNCTION outbox_enqueue(
    p_app             text,
    p_topic           text,
    p_payload         jsonb DEFAULT '{}'::jsonb,
    p_run_at          timestamptz DEFAULT NULL,
    p_idempotency_key text DEFAULT NULL,
    p_ordering_key    text DEFAULT NULL,
    p_max_attempts    integer DEFAULT NULL,
    p_headers         jsonb DEFAULT '{}'::jsonb,
    p_source          text DEFAULT 'queue'
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
    INSERT INTO outbox (id, app_id, source, topic, payload, headers, run_at,
                        idempotency_key, ordering_key, max_attempts)
    VALUES (outbox_uuid_v7(), v_app_id, p_source, p_topic, p_payload,
            coalesce(p_headers, '{}'::jsonb), coalesce(p_run_at, now()),
            p_idempotency_key, p_ordering_key, p_max_attempts)
    ON CONFLICT (app_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING id INTO v_id;
    IF v_id IS NULL THEN
        SELECT id INTO v_id FROM outbox
        WHERE app_id = v_app_id AND idempotency_key = p_idempotency_key;
    END IF;
    RETURN v_id;
END
$$;
