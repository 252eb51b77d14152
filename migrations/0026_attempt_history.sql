-- The attempt history of a row: its last failed attempts, oldest first, so
-- an operator sees why and where a row failed before, not only its last
-- error. Written only when an attempt fails (a retry, a dead letter, a
-- release by a draining dispatcher), so a row that succeeds the first time
-- never writes it. An attempt whose number is missing from the history had
-- no outcome written: its process stopped or its lease expired.
--
-- Each entry: {"attempt": n, "started_at": claimed at, "ended_at": failed
-- at, "worker": the lease holder, "error": the error, cut to a bounded
-- length}. The dispatcher keeps the last dispatcher.attempt_history
-- entries; NULL means no failed attempt was recorded.
ALTER TABLE outbox ADD COLUMN attempts jsonb;
ALTER TABLE dead_letters ADD COLUMN attempts jsonb;

-- The outbox row a replay made of a dead letter, so the dead letter links to
-- it as the row's replayed_from links back (NULL before this migration).
ALTER TABLE dead_letters ADD COLUMN replayed_as uuid;

-- Appends one entry and keeps the last `keep` (none when `keep` is 0).
CREATE FUNCTION outbox_attempts_push(history jsonb, entry jsonb, keep integer)
RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN keep <= 0 THEN NULL ELSE (
        SELECT jsonb_agg(e.value ORDER BY e.n)
        FROM jsonb_array_elements(coalesce(history, '[]'::jsonb) || jsonb_build_array(entry))
             WITH ORDINALITY AS e(value, n)
        WHERE e.n > jsonb_array_length(coalesce(history, '[]'::jsonb)) + 1 - keep
    ) END
$$;
