-- Transactional mode deletes a batch's rows in a transaction that stays open
-- while the handlers run, so a worker that dies mid-batch leaves no trace in
-- the outbox: its rows come back untouched. To still count that attempt (a
-- row that kills its worker must exhaust its attempts, as in lease mode),
-- each batch first commits a row here naming its events, and deletes it in
-- the batch transaction. While the batch runs, its session holds the advisory
-- lock `lock_key`; a row here whose lock is free belongs to a dead batch, and
-- the next claim adds one attempt to each of its events still in the outbox.
CREATE TABLE outbox_tx_batches (
    lock_key    bigint PRIMARY KEY,
    worker      text NOT NULL,
    event_ids   uuid[] NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
) WITH (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_cost_delay = 0
);
