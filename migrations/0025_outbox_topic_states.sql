-- The leader's last count of each app's rows by topic and state: due,
-- scheduled and running, with the time the oldest due row became due. The
-- sampler writes it every metrics_sample_secs, with the /metrics gauges;
-- the dashboard and GET /api/apps/{app}/topics read it, so a page does not
-- scan the outbox, and work out at read time which due rows no live
-- process serves (so the answer holds while every dispatcher, the leader
-- among them, is down). A topic without rows left is removed at the next
-- sample.
CREATE TABLE outbox_topic_states (
    app_id        uuid        NOT NULL REFERENCES apps (id) ON DELETE CASCADE,
    topic         text        NOT NULL,
    due           bigint      NOT NULL,
    scheduled     bigint      NOT NULL,
    running       bigint      NOT NULL,
    oldest_due_at timestamptz,
    sampled_at    timestamptz NOT NULL,
    PRIMARY KEY (app_id, topic)
);
