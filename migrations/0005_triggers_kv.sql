-- Triggers (one parent row, one details table per kind) and the KV store
-- whose writes fire KV triggers.
CREATE TABLE triggers (
    id                      uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    app_id                  uuid NOT NULL REFERENCES apps (id) ON DELETE CASCADE,
    kind                    text NOT NULL CHECK (kind IN ('kv', 'cron', 'dead_letter')),
    name                    text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    enabled                 boolean NOT NULL DEFAULT true,
    -- What runs the trigger's rows: an in-process handler name (routed like a topic).
    target                  text NOT NULL CHECK (length(target) BETWEEN 1 AND 255),
    registered_by_principal text,
    created_at              timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT triggers_app_name_key UNIQUE (app_id, name)
);

CREATE TABLE kv_trigger_details (
    trigger_id       uuid PRIMARY KEY REFERENCES triggers (id) ON DELETE CASCADE,
    -- Denormalized so matching is one index lookup per glob kind.
    app_id           uuid NOT NULL,
    collection_glob  text NOT NULL,
    -- '*' → all; 'orders:*' → prefix 'orders:'; anything else → exact.
    match_kind       text NOT NULL CHECK (match_kind IN ('all', 'prefix', 'exact')),
    match_value      text NOT NULL,
    ops              text[] NOT NULL CHECK (ops <@ ARRAY['put', 'delete']::text[] AND cardinality(ops) > 0)
);
-- Matching a write: kind 'all', exact name, or one of the collection's prefixes.
CREATE INDEX kv_trigger_match_idx ON kv_trigger_details (app_id, match_kind, match_value);

CREATE TABLE cron_trigger_details (
    trigger_id    uuid PRIMARY KEY REFERENCES triggers (id) ON DELETE CASCADE,
    schedule      text NOT NULL,
    timezone      text NOT NULL DEFAULT 'UTC',
    last_fire_at  timestamptz,
    next_fire_at  timestamptz
);
CREATE INDEX cron_trigger_due_idx ON cron_trigger_details (next_fire_at);

CREATE TABLE dead_letter_trigger_details (
    trigger_id   uuid PRIMARY KEY REFERENCES triggers (id) ON DELETE CASCADE,
    -- Empty arrays match everything of that dimension.
    sources      text[] NOT NULL DEFAULT '{}',
    topics       text[] NOT NULL DEFAULT '{}',
    trigger_ids  uuid[] NOT NULL DEFAULT '{}'
);

CREATE TABLE kv_entries (
    app_id      uuid NOT NULL REFERENCES apps (id) ON DELETE CASCADE,
    collection  text NOT NULL CHECK (length(collection) BETWEEN 1 AND 255),
    key         text NOT NULL CHECK (length(key) BETWEEN 1 AND 512),
    value       jsonb NOT NULL,
    version     bigint NOT NULL DEFAULT 1,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (app_id, collection, key)
);
