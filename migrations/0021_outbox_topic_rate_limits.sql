-- Rate limits per topic: at most rate_per_sec rows of the topic start per
-- second across every process, with bursts of up to burst rows.
--
-- A token bucket on the topic's outbox_topic_limits row: a limited claim
-- (which holds the row's lock) first adds rate_per_sec tokens per second
-- since refilled_at, up to burst, claims at most the whole tokens there are,
-- and takes one per row claimed. Rows over the limit stay due; a claim loop
-- sleeps until the next token instead of polling. A topic may have a
-- concurrency limit, a rate limit, or both.
ALTER TABLE outbox_topic_limits
    ALTER COLUMN max_running DROP NOT NULL,
    ADD COLUMN rate_per_sec double precision
        CHECK (rate_per_sec > 0 AND rate_per_sec <= 100000),
    ADD COLUMN burst integer CHECK (burst BETWEEN 1 AND 100000),
    ADD COLUMN tokens double precision NOT NULL DEFAULT 0,
    ADD COLUMN refilled_at timestamptz NOT NULL DEFAULT now(),
    ADD CONSTRAINT outbox_topic_limits_some_limit
        CHECK (max_running IS NOT NULL OR rate_per_sec IS NOT NULL),
    ADD CONSTRAINT outbox_topic_limits_burst_with_rate
        CHECK ((rate_per_sec IS NULL) = (burst IS NULL));
