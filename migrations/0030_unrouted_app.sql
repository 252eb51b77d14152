-- A reserved app for messages the consumer runtime cannot route: their
-- subject names a tenant (app) that does not exist. They are parked here
-- as dead letters, with the claimed tenant in their headers, instead of
-- being dropped or redelivered forever. Its slug starts with '_', which no
-- app made through outboxd can: only instance admins see it.
ALTER TABLE apps DROP CONSTRAINT apps_slug_check;
ALTER TABLE apps ADD CONSTRAINT apps_slug_check
    CHECK (slug ~ '^[a-z0-9][a-z0-9_-]{0,62}$' OR slug = '_unrouted');
INSERT INTO apps (id, slug, name)
VALUES ('00000000-0000-7000-8000-000000000001', '_unrouted',
        'Messages for unknown apps (reserved)')
ON CONFLICT (slug) DO NOTHING;
