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
-- Without autovacuum, a segment holds at most the rows of about three
-- rotation periods. When a rotation stays blocked for longer (a session
-- holds the segment), the leader's rotator vacuums the segments itself,
-- between its tries (outbox_core::store::segments::vacuum).
-- Anti-wraparound vacuums still run when due; a TRUNCATE every few periods
-- resets a segment's relfrozenxid, so they are not.

ALTER TABLE outbox_s0 SET (autovacuum_enabled = false, toast.autovacuum_enabled = false);
ALTER TABLE outbox_s1 SET (autovacuum_enabled = false, toast.autovacuum_enabled = false);
ALTER TABLE outbox_s2 SET (autovacuum_enabled = false, toast.autovacuum_enabled = false);
