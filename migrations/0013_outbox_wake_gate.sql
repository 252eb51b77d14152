-- Inserts NOTIFY only while some dispatcher sleeps.
--
-- A transaction that has called NOTIFY takes one database-wide lock at commit
-- and keeps it until its commit record is on disk, so notifying producers
-- commit one at a time: no group commit, and under load a convoy behind
-- whichever of them the scheduler preempted. A dispatcher that is polling
-- anyway does not need the notification, so it is only sent while some
-- dispatcher is asleep waiting for one.
--
-- Two advisory locks (class 1869968482, "outb" in ASCII) carry the protocol:
--   sleep (1): held in shared mode, at session level, by every dispatcher
--     that waits for a NOTIFY; an inserting statement notifies when it is held.
--   gate  (2): held in shared mode by every inserting transaction, from just
--     before it looks at `sleep` until it ends.
-- A dispatcher goes to sleep by taking `sleep`, then checking that `gate` is
-- free, then claiming once more (outbox_core::store::wake). An insert that
-- looked at `sleep` before it was taken has either committed before the gate
-- check, so the last claim sees its rows, or still holds the gate, and the
-- dispatcher keeps polling until the gate is free. Any later insert sees
-- `sleep` held and notifies.
--
-- `sleep` is tested by taking and releasing it within one expression, where
-- no interrupt can land between the two, so a producer's session never keeps
-- it; were it kept, dispatchers could not sleep and would poll, and every
-- insert would notify, which is slower but loses nothing.
CREATE OR REPLACE FUNCTION outbox_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(1869968482, 2);
    IF (CASE WHEN pg_try_advisory_lock(1869968482, 1)
             THEN NOT pg_advisory_unlock(1869968482, 1)
             ELSE true END) THEN
        PERFORM pg_notify('outbox_due', '');
    END IF;
    RETURN NULL;
END
$$;
