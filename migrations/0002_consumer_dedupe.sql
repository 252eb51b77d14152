-- Consume-side de-duplication for the NATS consumer runtime: a message id is
-- claimed before its handler runs, marked done after success (kept until
-- expires_at), and released after a failure so the redelivery runs again.
CREATE TABLE processed_messages (
    consumer      text NOT NULL,
    message_id    text NOT NULL,
    state         text NOT NULL CHECK (state IN ('claimed', 'done')),
    -- A claim older than this is abandoned (its consumer died) and may be taken over.
    claimed_until timestamptz NOT NULL,
    -- A done row is forgotten after this (the de-duplication TTL).
    expires_at    timestamptz,
    PRIMARY KEY (consumer, message_id)
);
CREATE INDEX processed_messages_expiry_idx ON processed_messages (expires_at);
