//! Operator commands, one file per noun. Each takes the settings and its
//! parsed arguments and prints what it did; the actions themselves live in
//! the library crates, shared with the admin API and the dashboard.

pub mod accounts;
pub mod apps;
pub mod consume;
pub mod dead_letters;
pub mod enqueue;
pub mod gc;
pub mod stream;
pub mod topics;
pub mod triggers;
pub mod webhooks;

pub use outbox_core::text::{ellipsize, printable};

use chrono::{DateTime, SecondsFormat, Utc};

/// An argument parser for a whole number within `lo..=hi`, for clap's
/// `value_parser`: every refusal names the range, also for a number past
/// the type (clap's own says "number too large to fit in target type" then,
/// or "invalid digit" for a negative one where the type has none).
pub fn number_in<T>(lo: T, hi: T) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync
where
    T: Copy + Into<i128> + TryFrom<i128> + std::fmt::Display + Send + Sync,
{
    move |given: &str| {
        let out_of_range = || format!("{given} is not in {lo}..={hi}");
        let digits = given.strip_prefix('-').unwrap_or(given);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("{given:?} is not a whole number"));
        }
        let n: i128 = given.parse().map_err(|_| out_of_range())?;
        if n < lo.into() || n > hi.into() {
            return Err(out_of_range());
        }
        T::try_from(n).map_err(|_| out_of_range())
    }
}

/// A time as every list shows it: RFC 3339 to the second, in UTC.
pub fn when(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// The lines of a list command: on a terminal, columns aligned under a
/// header, each cell [`printable`]; piped, one tab-separated line per row
/// and no header, each cell as stored but for its tabs and line breaks
/// (spaces), so that a script reads a topic it can name back (`--json`
/// gives the whole records).
pub struct Table {
    header: &'static [&'static str],
    rows: Vec<Vec<String>>,
}

impl Table {
    /// An empty table with these column names.
    pub fn new(header: &'static [&'static str]) -> Self {
        Self {
            header,
            rows: Vec::new(),
        }
    }

    /// Adds a row, one cell per column.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Prints the table to stdout, aligned when stdout is a terminal;
    /// nothing at all without rows (the command says so aside).
    pub fn print(&self) {
        use std::io::IsTerminal;
        if !self.rows.is_empty() {
            print!("{}", self.render(std::io::stdout().is_terminal()));
        }
    }

    fn render(&self, aligned: bool) -> String {
        let mut out = String::new();
        if !aligned {
            for row in &self.rows {
                let cells: Vec<String> = row
                    .iter()
                    .map(|cell| cell.replace(['\t', '\n', '\r'], " "))
                    .collect();
                out.push_str(&cells.join("\t"));
                out.push('\n');
            }
            return out;
        }
        let rows: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|row| row.iter().map(|cell| printable(cell)).collect())
            .collect();
        let width = |i: usize| {
            rows.iter()
                .filter_map(|row| row.get(i))
                .map(|cell| cell.chars().count())
                .chain([self.header[i].len()])
                .max()
                .unwrap_or(0)
        };
        let widths: Vec<usize> = (0..self.header.len()).map(width).collect();
        let header: Vec<String> = self.header.iter().map(|h| (*h).to_owned()).collect();
        for row in std::iter::once(&header).chain(&rows) {
            let last = row.len().saturating_sub(1);
            let line: Vec<String> = row
                .iter()
                .enumerate()
                .map(|(i, cell)| {
                    if i == last {
                        cell.clone()
                    } else {
                        format!("{cell:<w$}", w = widths.get(i).copied().unwrap_or(0))
                    }
                })
                .collect();
            out.push_str(line.join("  ").trim_end());
            out.push('\n');
        }
        out
    }
}

/// Shortens `text` to at most `max` characters by cutting out its middle:
/// for names that differ at their ends (webhook URLs of one host); the
/// text is made [`printable`] first.
pub fn elide_middle(text: &str, max: usize) -> String {
    let text = printable(text);
    let chars: Vec<char> = text.chars().collect();
    if chars.len() <= max {
        return text;
    }
    let keep = max.saturating_sub(1);
    let head = keep.div_ceil(2);
    let tail = keep - head;
    let mut out: String = chars[..head].iter().collect();
    out.push('…');
    out.extend(&chars[chars.len() - tail..]);
    out
}

#[cfg(test)]
mod tests {
    use super::{Table, elide_middle, number_in};

    #[test]
    fn a_number_out_of_range_is_refused_naming_the_range_whatever_its_size() {
        let limit = number_in(1u32, 1000);
        assert_eq!(limit("1"), Ok(1));
        assert_eq!(limit("1000"), Ok(1000));
        for given in [
            "0",
            "1001",
            "-3",
            "99999999999",
            "99999999999999999999999999999999999999999",
        ] {
            assert_eq!(limit(given), Err(format!("{given} is not in 1..=1000")));
        }
        for given in ["", "-", "1e3", "1.5", " 7", "x"] {
            assert_eq!(
                limit(given),
                Err(format!("{given:?} is not a whole number"))
            );
        }
        assert_eq!(number_in(0i16, 9)("9"), Ok(9i16));
    }

    #[test]
    fn a_table_is_aligned_for_people_and_tab_separated_for_scripts() {
        let mut table = Table::new(&["TOPIC", "SINCE", "REASON"]);
        table.row(vec![
            "mail.send".into(),
            "2026-12-07T05:08:42Z".into(),
            "smtp down".into(),
        ]);
        table.row(vec!["a ".into(), "-".into(), "tab\there\u{1b}".into()]);
        assert_eq!(
            table.render(true),
            "TOPIC      SINCE                 REASON\n\
             mail.send  2026-12-07T05:08:42Z  smtp down\n\
             a          -                     tab here\u{FFFD}\n"
        );
        assert_eq!(
            table.render(false),
            "mail.send\t2026-12-07T05:08:42Z\tsmtp down\na \t-\ttab here\u{1b}\n",
            "piped, a topic stays as stored"
        );
    }

    #[test]
    fn the_middle_goes_and_the_ends_stay() {
        assert_eq!(elide_middle("short", 10), "short");
        let a = elide_middle(
            "webhook:https://hooks.example.com/a/very/long/path/number/one?x=1",
            30,
        );
        let b = elide_middle(
            "webhook:https://hooks.example.com/a/very/long/path/number/two?x=1",
            30,
        );
        assert_eq!(a.chars().count(), 30);
        assert_ne!(a, b, "told apart by their ends");
        assert!(
            a.starts_with("webhook:https:/") && a.ends_with("one?x=1"),
            "{a}"
        );
        assert_eq!(elide_middle("a\u{1b}b", 10), "a\u{FFFD}b");
    }
}
