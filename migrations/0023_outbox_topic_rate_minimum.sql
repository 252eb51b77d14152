-- A rate limit below 0.001 rows per second (one row in about 17 minutes) is
-- refused: the wait for the next token must stay a sensible duration. A
-- slower topic is better paused.
ALTER TABLE outbox_topic_limits
    DROP CONSTRAINT outbox_topic_limits_rate_per_sec_check,
    ADD CONSTRAINT outbox_topic_limits_rate_per_sec_check
        CHECK (rate_per_sec >= 0.001 AND rate_per_sec <= 100000);
