-- The example service's own tables, in a schema of their own (outboxd has a
-- users table of its own for the admin API).
CREATE SCHEMA social;
CREATE TABLE social.users (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    email         text NOT NULL UNIQUE,
    password_hash text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE social.notes (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    author_id  uuid NOT NULL REFERENCES social.users (id),
    body       text NOT NULL CHECK (length(body) BETWEEN 1 AND 5000),
    created_at timestamptz NOT NULL DEFAULT now(),
    deleted_at timestamptz
);

CREATE TABLE social.likes (
    note_id uuid NOT NULL REFERENCES social.notes (id),
    user_id uuid NOT NULL REFERENCES social.users (id),
    PRIMARY KEY (note_id, user_id)
);

CREATE TABLE social.follows (
    follower_id uuid NOT NULL REFERENCES social.users (id),
    followee_id uuid NOT NULL REFERENCES social.users (id),
    PRIMARY KEY (follower_id, followee_id),
    CHECK (follower_id <> followee_id)
);

-- Written by the notification handler; the event id makes a re-run harmless.
CREATE TABLE social.notifications (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    event_id   uuid NOT NULL UNIQUE,
    user_id    uuid NOT NULL REFERENCES social.users (id),
    kind       text NOT NULL,
    actor_id   uuid NOT NULL REFERENCES social.users (id),
    note_id    uuid REFERENCES social.notes (id),
    created_at timestamptz NOT NULL DEFAULT now()
);
