-- Autovacuum leaves the segments alone: the rotation's TRUNCATE gives their
-- space back (docs/architecture.md, "While a snapshot is held").
--
-- An autovacuum of a segment holds SHARE UPDATE EXCLUSIVE for as long as it
-- runs, and the rotation, which waits at most gc.segment_lock_timeout_ms
-- (50 ms) for its ACCESS EXCLUSIVE lock, gives up each second until the
-- vacuum ends. PostgreSQL cancels an autovacuum that blocks another lock
-- request only after deadlock_timeout (1 s), so it never cancels this one.
-- On a server with autovacuum at its defaults, at tens of thousands of
-- events a second, vacuums of segments holding millions of finished rows
-- kept the rotation out for tens of seconds at a time; the current segment
-- grew, claims slowed and the queue ran away (docs/performance.md, "A stock
-- server with segments").
--
-- Without autovacuum, the segments hold at most the rows of about three
-- rotation periods. When rotations stay blocked for longer (a session
-- holds a segment), the leader's rotator vacuums the segments itself,
-- between its tries (outbox_core::store::segments::vacuum). Autoanalyze
-- goes with it: statistics of a segment, which fills and is emptied every
-- few periods, mislead more than they help (docs/performance.md, "A stock
-- server with segments").
-- Anti-wraparound vacuums ignore the setting; a TRUNCATE every few periods
-- resets a segment's relfrozenxid, so they are never due. The thresholds
-- 0032 set for autovacuum go, since they no longer apply.

DO $$
DECLARE
    s text;
BEGIN
    FOREACH s IN ARRAY ARRAY['outbox_s0', 'outbox_s1', 'outbox_s2'] LOOP
        EXECUTE format('ALTER TABLE %I
                        SET (autovacuum_enabled = false, toast.autovacuum_enabled = false),
                        RESET (autovacuum_vacuum_scale_factor, autovacuum_vacuum_threshold,
                               autovacuum_vacuum_insert_scale_factor,
                               autovacuum_vacuum_insert_threshold,
                               autovacuum_analyze_scale_factor, autovacuum_analyze_threshold,
                               autovacuum_vacuum_cost_delay)', s);
    END LOOP;
END
$$;
