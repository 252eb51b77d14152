//! The attempt history's SQL (migrations 0026, 0027 and 0037): a row's
//! newest failed attempt in typed columns, the earlier ones as `jsonb`
//! entries in `attempts`, and how much of it a process keeps.

/// The default [`AttemptHistory::error_chars`] as SQL: the cut of readers
/// that have no dispatcher's settings (the console's row, a cancel, a dead
/// worker's record, a process with the history off).
macro_rules! default_error_chars {
    () => {
        "2000"
    };
}

/// One entry of a row's attempt history (migrations 0026 and 0027), as a
/// `jsonb` expression: `[attempt, started_at, ended_at, worker, error]`,
/// where `$attempt` is the attempt's number, `$started` when it was claimed,
/// `$ended` when it failed, `$worker` who ran it and `$error` why, cut to
/// `$chars` characters. An array rather than an object: a row that fails
/// carries its history through every later update, and the keys made each
/// entry half again as large (`Attempt` reads both forms).
macro_rules! attempt_entry {
    ($attempt:literal, $started:literal, $ended:literal, $worker:literal, $error:literal, $chars:expr) => {
        concat!(
            "jsonb_build_array(",
            $attempt,
            ", ",
            $started,
            ", ",
            $ended,
            ", ",
            $worker,
            ", left(",
            $error,
            ", ",
            $chars,
            "))"
        )
    };
}

/// The newest failed attempt of the row `$row` as a history entry: it is
/// kept in columns of its own (migration 0037), its error in `last_error`.
macro_rules! newest_failed_entry {
    ($row:literal, $chars:expr) => {
        concat!(
            "jsonb_build_array(",
            $row,
            ".failed_attempt, ",
            $row,
            ".failed_attempt_started_at, ",
            $row,
            ".failed_attempt_ended_at, ",
            $row,
            ".failed_attempt_worker, left(",
            $row,
            ".last_error, ",
            $chars,
            "))"
        )
    };
}

/// The whole attempt history of the row `$row`, oldest first: the entries
/// of `attempts`, then the newest failed attempt (see
/// [`attempt_recorded!`]), its error cut to `$chars` characters. Readers
/// without a dispatcher's [`AttemptHistory`] (the console's row, a cancel)
/// cut it as the default does, at 2,000.
macro_rules! attempts_with_newest {
    ($row:literal, $chars:expr) => {
        concat!(
            "CASE WHEN ",
            $row,
            ".failed_attempt IS NULL THEN ",
            $row,
            ".attempts ELSE coalesce(",
            $row,
            ".attempts, '[]'::jsonb) || jsonb_build_array(",
            newest_failed_entry!($row, $chars),
            ") END"
        )
    };
}

/// The `SET` items of an `UPDATE outbox o` that records a failed attempt:
/// `$error` (`NULL` for an attempt that records nothing, a snooze), the
/// attempt's number, start and worker, and the [`AttemptHistory`]'s `$keep`
/// and `$chars`. The attempt becomes the row's newest failed attempt, kept
/// in typed columns (migration 0037) with its error in `last_error`, and
/// the one it replaces is pushed into `attempts`. Building a `jsonb` entry
/// and carrying it through every later update of the row cost a drain whose
/// rows each fail once 16 % of its throughput; the columns cost a few
/// percent (docs/performance.md, "Attempt history"), and only a row that
/// fails twice builds an entry. With `$keep` 0 nothing is recorded, and an
/// attempt another process recorded is pushed whole, not dropped (its error
/// cut as the default cuts it: this process has no length of its own). The end
/// is the clock's time, not the transaction's: a transactional failure is
/// written in a transaction that began before its handler started.
macro_rules! attempt_recorded {
    ($error:literal, $attempt:literal, $started:literal, $worker:literal, $keep:literal, $chars:expr) => {
        concat!(
            "attempts = CASE WHEN ",
            $error,
            " IS NULL OR o.failed_attempt IS NULL THEN o.attempts WHEN ",
            $keep,
            " <= 0 THEN coalesce(o.attempts, '[]'::jsonb) || jsonb_build_array(",
            newest_failed_entry!("o", default_error_chars!()),
            ") WHEN ",
            $keep,
            " = 1 THEN NULL ELSE ",
            attempts_pushed!(
                "o.attempts",
                newest_failed_entry!("o", $chars),
                concat!("(", $keep, " - 1)")
            ),
            " END,
    failed_attempt = CASE WHEN ",
            $error,
            " IS NULL THEN o.failed_attempt WHEN ",
            $keep,
            " > 0 THEN ",
            $attempt,
            " END,
    failed_attempt_started_at = CASE WHEN ",
            $error,
            " IS NULL THEN o.failed_attempt_started_at WHEN ",
            $keep,
            " > 0 THEN ",
            $started,
            " END,
    failed_attempt_ended_at = CASE WHEN ",
            $error,
            " IS NULL THEN o.failed_attempt_ended_at WHEN ",
            $keep,
            " > 0 THEN clock_timestamp() END,
    failed_attempt_worker = CASE WHEN ",
            $error,
            " IS NULL THEN o.failed_attempt_worker WHEN ",
            $keep,
            " > 0 THEN ",
            $worker,
            " END"
        )
    };
}

/// `$history` with `$entry` appended, cut to the last `$keep` entries
/// (`$history` unchanged when `$keep` is 0: a process that records none
/// does not erase what others recorded). The usual cases are plain expressions here; only a
/// history longer than `$keep` goes through `outbox_attempts_push`, a SQL
/// function the planner cannot inline.
macro_rules! attempts_pushed {
    ($history:literal, $entry:expr, $keep:expr) => {
        concat!(
            "CASE WHEN ",
            $keep,
            " <= 0 THEN ",
            $history,
            " WHEN ",
            $history,
            " IS NULL THEN jsonb_build_array(",
            $entry,
            ") WHEN jsonb_array_length(",
            $history,
            ") < ",
            $keep,
            " THEN ",
            $history,
            " || jsonb_build_array(",
            $entry,
            ") ELSE outbox_attempts_push(",
            $history,
            ", ",
            $entry,
            ", ",
            $keep,
            ") END"
        )
    };
}

/// How much of their failed attempts rows keep (`outbox.attempts`, carried
/// into `dead_letters.attempts`): the last `keep` attempts, each error cut to
/// `error_chars` characters. `keep` 0 records none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttemptHistory {
    /// How many of the last failed attempts a row keeps.
    pub keep: u16,
    /// The longest error kept per attempt, in characters.
    pub error_chars: u32,
}

impl AttemptHistory {
    /// No history: failed attempts leave only `last_error`.
    pub const OFF: Self = Self {
        keep: 0,
        error_chars: 0,
    };
}

impl Default for AttemptHistory {
    /// The last 10 attempts, errors cut to 2,000 characters.
    fn default() -> Self {
        Self {
            keep: 10,
            error_chars: 2000,
        }
    }
}

/// `error_chars` as the `integer` that `left()` takes.
pub(super) fn history_chars(history: AttemptHistory) -> i32 {
    i32::try_from(history.error_chars).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests {
    use super::AttemptHistory;

    #[test]
    fn the_default_error_cut_in_sql_is_the_default_history_s() {
        assert_eq!(
            default_error_chars!(),
            AttemptHistory::default().error_chars.to_string()
        );
    }
}
