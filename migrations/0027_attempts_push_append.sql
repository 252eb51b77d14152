-- The attempt history, cheaper and smaller.
--
-- 0026's outbox_attempts_push read the whole history back with
-- jsonb_array_elements and aggregated it again for every failed attempt. The
-- statements now append to a history shorter than `keep` themselves and
-- call the function only for a full one, which loses its oldest entry with
-- the `-` operator; only a history longer than `keep` (after
-- dispatcher.attempt_history was lowered) is read back and cut. A `keep` of
-- 0 leaves the history as it is: a process that records none does not erase
-- what others recorded.
--
-- New entries are arrays, [attempt, started_at, ended_at, worker, error],
-- about a third smaller than 0026's objects (a failed row carries its
-- history through every later update); entries of both forms are read.
CREATE OR REPLACE FUNCTION outbox_attempts_push(history jsonb, entry jsonb, keep integer)
RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE
        WHEN keep <= 0 THEN history
        WHEN history IS NULL THEN jsonb_build_array(entry)
        WHEN jsonb_array_length(history) < keep THEN history || jsonb_build_array(entry)
        WHEN jsonb_array_length(history) = keep THEN (history - 0) || jsonb_build_array(entry)
        ELSE (
            SELECT jsonb_agg(e.value ORDER BY e.n)
            FROM jsonb_array_elements(history || jsonb_build_array(entry))
                 WITH ORDINALITY AS e(value, n)
            WHERE e.n > jsonb_array_length(history) + 1 - keep
        )
    END
$$;

COMMENT ON COLUMN outbox.attempts IS
    'The last failed attempts, oldest first: [attempt, started_at, ended_at, worker, error] '
    'arrays (objects with those keys before migration 0027); NULL when none was recorded.';
COMMENT ON COLUMN dead_letters.attempts IS
    'Its row''s attempt history when it was dead-lettered or cancelled (see outbox.attempts).';
COMMENT ON COLUMN dead_letters.replayed_as IS
    'The outbox row a replay made of it; that row''s replayed_from is this dead letter.';
