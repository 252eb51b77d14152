-- outbox_attempts_push (0026) read the whole history back with
-- jsonb_array_elements and aggregated it again for every failed attempt,
-- which cost a drain whose every row fails once 13 % of its throughput. A
-- history shorter than `keep` is now appended to; only a full one is cut,
-- and a full one loses its oldest entry with the `-` operator.
CREATE OR REPLACE FUNCTION outbox_attempts_push(history jsonb, entry jsonb, keep integer)
RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE
        WHEN keep <= 0 THEN NULL
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
