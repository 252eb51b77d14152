-- The outbox is a queue: every row is inserted, updated once per claim (a
-- HOT update: no indexed column changes) and deleted within moments. Left to
-- the defaults, autovacuum waits for 20% of the table to be dead, which for a
-- short queue under steady load means index scans that wade through dead
-- entries at the head of outbox_due_idx between vacuums.
--  * fillfactor 80 keeps room on each page so a claim's update stays HOT;
--  * vacuum after a fixed number of dead rows, not a fraction of a table
--    that is mostly empty, and without cost-based sleeping.
-- Also lower the server's autovacuum_naptime (default 1 min; 1–10 s suits a
-- busy outbox) — a server setting, see docs/performance.md.
ALTER TABLE outbox SET (
    fillfactor = 80,
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 5000,
    autovacuum_vacuum_insert_scale_factor = 0,
    autovacuum_vacuum_insert_threshold = 20000,
    autovacuum_analyze_scale_factor = 0,
    autovacuum_analyze_threshold = 20000,
    autovacuum_vacuum_cost_delay = 0
);
