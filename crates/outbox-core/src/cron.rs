//! Cron schedules: the next tick of a 5- or 6-field expression in an IANA
//! time zone, across changes of the zone's offset as cron does. Pure
//! computation; the cron triggers that store and fire ticks are in
//! [`store::triggers`](crate::store::triggers).

use chrono::{DateTime, Timelike, Utc};

use crate::Error;

/// Parses a cron expression and returns the first tick after `after`, in UTC.
pub fn next_tick(schedule: &str, after: DateTime<Utc>) -> Result<DateTime<Utc>, Error> {
    next_tick_in(schedule, "UTC", after)
}

/// Like [`next_tick`], reading the schedule in the IANA zone `timezone` (so
/// "0 9 * * *" in Europe/Paris is 09:00 Paris time, summer and winter).
///
/// Across a change of the zone's offset it does what cron does: a schedule
/// whose minute or hour field is a wildcard (`* * * * *`, `*/15 * * * *`,
/// `0 * * * *`) follows the clock, firing through both passes of the hour
/// an autumn change repeats and going on after the hour a spring change
/// skips; a schedule at fixed times fires once at a repeated time (its
/// first pass) and, at a skipped one, when the clock goes on. The tick is
/// always later than `after`.
pub fn next_tick_in(
    schedule: &str,
    timezone: &str,
    after: DateTime<Utc>,
) -> Result<DateTime<Utc>, Error> {
    // Seconds are optional: 5 fields, or 6 with seconds first. (The parser
    // also takes a seventh, the year, which the API does not document, and
    // says "between 5 and 7 fields" of anything else.)
    let fields = schedule.split_whitespace().count();
    if !(5..=6).contains(&fields) {
        return Err(Error::invalid(
            "schedule",
            format!(
                "{schedule:?} has {fields} field(s); a cron expression has 5 (minute hour day-of-month month day-of-week) or 6 (seconds first)"
            ),
        ));
    }
    let cron: croner::Cron = schedule.parse().map_err(|_| unparsed_schedule(schedule))?;
    let tz: chrono_tz::Tz = timezone.parse().map_err(|_| {
        Error::invalid(
            "timezone",
            format!("{timezone:?} is not an IANA time zone (e.g. UTC, Europe/Paris)"),
        )
    })?;
    // Ticks fall on whole seconds: search from the start of `after`'s second.
    let after = after.with_nanosecond(0).unwrap_or(after);
    // The parser's own words ("CronScheduler time search limit exceeded")
    // say nothing to whoever wrote the schedule.
    let never = |_: croner::errors::CronError| {
        Error::invalid(
            "schedule",
            format!("{schedule:?} never fires: no time matches it"),
        )
    };
    let fields: Vec<&str> = schedule.split_whitespace().collect();
    let (minute, hour) = match fields.as_slice() {
        [_, minute, hour, ..] if fields.len() == 6 => (*minute, *hour),
        [minute, hour, ..] => (*minute, *hour),
        _ => ("", ""),
    };
    if minute.starts_with('*') || hour.starts_with('*') {
        return next_on_the_clock(&cron, tz, after).map_err(never);
    }
    // At a local time the autumn change repeats, the parser answers its
    // first instant: from within the repeated hour that one has passed,
    // and the tick is the next one after it. (Taking it fired the trigger
    // every second for the hour.)
    let mut from = after.with_timezone(&tz);
    for _ in 0..MAX_TICK_STEPS {
        let tick = cron.find_next_occurrence(&from, false).map_err(never)?;
        if tick.with_timezone(&Utc) > after {
            return Ok(tick.with_timezone(&Utc));
        }
        from = tick;
    }
    Err(never(croner::errors::CronError::TimeSearchLimitExceeded))
}

/// How many candidate ticks a search looks at, at most: a schedule of every
/// second passes 3,600 in an hour the autumn change repeats.
const MAX_TICK_STEPS: usize = 10_000;

/// The first tick after `after` of a schedule that follows the clock of
/// `tz`: searched in the offset in effect, and again from each change of
/// the offset met before a tick, so a repeated hour is searched twice and
/// a skipped one not at all.
fn next_on_the_clock(
    cron: &croner::Cron,
    tz: chrono_tz::Tz,
    after: DateTime<Utc>,
) -> Result<DateTime<Utc>, croner::errors::CronError> {
    use chrono::{Offset, TimeZone};
    let offset_at = |t: DateTime<Utc>| tz.offset_from_utc_datetime(&t.naive_utc()).fix();
    let mut from = after;
    let mut inclusive = false;
    // Each pass crosses one change; a few a year at most.
    for _ in 0..8 {
        let offset = offset_at(from);
        let tick = cron
            .find_next_occurrence(&from.with_timezone(&offset), inclusive)?
            .with_timezone(&Utc);
        // The same offset at both ends may hide two changes between them
        // (a tick a year on): look for the first one at all.
        let Some(changed) = first_change(&offset_at, from, tick) else {
            return Ok(tick);
        };
        from = changed;
        inclusive = true;
    }
    Err(croner::errors::CronError::TimeSearchLimitExceeded)
}

/// The first second in `(from, until]` whose offset (`offset_at`) differs
/// from `from`'s, if any: sampled every six hours (changes are months
/// apart), then halved down to the second.
fn first_change(
    offset_at: &impl Fn(DateTime<Utc>) -> chrono::FixedOffset,
    from: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let offset = offset_at(from);
    let step = chrono::TimeDelta::hours(6);
    let mut before = from;
    let changed = loop {
        let next = (before + step).min(until);
        if offset_at(next) != offset {
            break next;
        }
        if next >= until {
            return None;
        }
        before = next;
    };
    let mut changed = changed;
    while changed - before > chrono::TimeDelta::seconds(1) {
        let middle = before + (changed - before) / 2;
        if offset_at(middle) == offset {
            before = middle;
        } else {
            changed = middle;
        }
    }
    Some(changed.with_nanosecond(0).unwrap_or(changed))
}

/// What is wrong with a schedule the parser refused, in our words (the
/// parser says "Component error: Number out of bounds."): the first field
/// that the parser refuses on its own, every other field `*`, with the
/// values that field takes.
fn unparsed_schedule(schedule: &str) -> Error {
    const FIELDS: [(&str, &str); 6] = [
        ("second", "0-59"),
        ("minute", "0-59"),
        ("hour", "0-23"),
        ("day-of-month", "1-31 or L"),
        ("month", "1-12 or JAN-DEC"),
        ("day-of-week", "0-7 or SUN-SAT"),
    ];
    let fields: Vec<&str> = schedule.split_whitespace().collect();
    // Five fields have no seconds.
    let names = &FIELDS[FIELDS.len() - fields.len().min(FIELDS.len())..];
    for (i, (field, (name, values))) in fields.iter().zip(names).enumerate() {
        let alone: Vec<&str> = (0..fields.len())
            .map(|j| if j == i { *field } else { "*" })
            .collect();
        if alone.join(" ").parse::<croner::Cron>().is_err() {
            return Error::invalid(
                "schedule",
                format!(
                    "{schedule:?}: the {name} field {field:?} is not valid ({name} takes {values}, as single values, lists, ranges or steps)"
                ),
            );
        }
    }
    Error::invalid(
        "schedule",
        format!("{schedule:?} is not a cron expression (each field is valid alone, not together)"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(rfc3339: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(rfc3339)
            .map(|d| d.with_timezone(&Utc))
            .unwrap_or_default()
    }

    fn ticks(schedule: &str, zone: &str, from: &str, n: usize) -> Vec<String> {
        let mut after = at(from);
        let mut out = Vec::new();
        for _ in 0..n {
            match next_tick_in(schedule, zone, after) {
                Ok(tick) => {
                    out.push(tick.format("%H:%MZ").to_string());
                    after = tick;
                }
                Err(e) => out.push(e.to_string()),
            }
        }
        out
    }

    /// New York falls back at 06:00 UTC on 2027-11-07 (01:59 EDT is followed
    /// by 01:00 EST) and springs forward at 07:00 UTC on 2027-03-14 (01:59
    /// EST is followed by 03:00 EDT).
    #[test]
    fn cron_across_changes_of_the_offset() {
        let ny = "America/New_York";
        // From within the repeated hour, the next tick is later than now:
        // the first pass's instant had the trigger fire every second.
        assert_eq!(
            ticks("* * * * *", ny, "2027-11-07T06:00:07Z", 2),
            ["06:01Z", "06:02Z"]
        );
        // A schedule that follows the clock fires through both passes.
        assert_eq!(
            ticks("*/15 * * * *", ny, "2027-11-07T05:40:00Z", 3),
            ["05:45Z", "06:00Z", "06:15Z"]
        );
        // A fixed time fires once, at its first pass, also when asked from
        // within the repeated hour.
        assert_eq!(
            ticks("30 1 * * *", ny, "2027-11-07T05:00:00Z", 2),
            ["05:30Z", "06:30Z"]
        );
        assert_eq!(
            next_tick_in("30 1 * * *", ny, at("2027-11-07T06:10:00Z")).ok(),
            Some(at("2027-11-08T06:30:00Z"))
        );
        // Spring: the clock goes on after the skipped hour; a fixed time in
        // it fires when the clock goes on.
        assert_eq!(
            ticks("*/15 * * * *", ny, "2027-03-14T06:40:00Z", 3),
            ["06:45Z", "07:00Z", "07:15Z"]
        );
        assert_eq!(
            next_tick_in("30 2 * * *", ny, at("2027-03-14T06:00:00Z")).ok(),
            Some(at("2027-03-14T07:00:00Z"))
        );
        // A year's two changes between one tick and the next cancel out;
        // the first pass of the repeated hour is not skipped for that.
        assert_eq!(
            next_tick_in("*/5 1 * 11 0", ny, at("2026-11-29T06:55:00Z")).ok(),
            Some(at("2027-11-07T05:00:00Z"))
        );
    }

    /// Whatever the schedule and the zone, around changes of the offset too,
    /// every tick is later than the one before.
    #[test]
    fn ticks_always_move_forward() {
        for zone in [
            "America/New_York",
            "Europe/Berlin",
            "Australia/Lord_Howe",
            "Asia/Kolkata",
        ] {
            for schedule in [
                "* * * * *",
                "*/7 * * * *",
                "0 * * * *",
                "30 1 * * *",
                "0 2,3 * * *",
                "*/20 * * * * *",
            ] {
                for from in [
                    "2027-11-06T20:00:00Z",
                    "2027-03-13T20:00:00Z",
                    "2027-03-27T12:00:00Z",
                    "2027-10-02T12:00:00Z",
                ] {
                    let mut after = at(from);
                    for _ in 0..150 {
                        let tick = next_tick_in(schedule, zone, after);
                        assert!(
                            tick.as_ref().is_ok_and(|t| *t > after),
                            "{schedule} in {zone} after {after}: {tick:?}"
                        );
                        after = tick.unwrap_or(after);
                    }
                }
            }
        }
    }

    #[test]
    fn cron_in_a_time_zone() {
        let base = DateTime::parse_from_rfc3339("2026-07-01T00:00:00Z")
            .map(|d| d.with_timezone(&Utc))
            .unwrap_or_default();
        // 09:00 in Paris is 07:00 UTC in summer.
        let next = next_tick_in("0 9 * * *", "Europe/Paris", base).ok();
        assert_eq!(
            next.map(|d| d.to_rfc3339()),
            Some("2026-07-01T07:00:00+00:00".into())
        );
        let err = next_tick_in("0 9 * * *", "Mars/Olympus", base)
            .unwrap_err()
            .to_string();
        assert!(err.contains("timezone"), "{err}");
    }

    #[test]
    fn cron_expressions() {
        let base = DateTime::parse_from_rfc3339("2026-01-01T00:00:30Z")
            .map(|d| d.with_timezone(&Utc))
            .ok();
        let base = base.unwrap_or_default();
        let next = next_tick("* * * * *", base).ok();
        assert_eq!(
            next.map(|d| d.to_rfc3339()),
            Some("2026-01-01T00:01:00+00:00".into())
        );
        let next = next_tick("*/10 * * * * *", base).ok();
        assert_eq!(
            next.map(|d| d.to_rfc3339()),
            Some("2026-01-01T00:00:40+00:00".into())
        );
        let err = next_tick("every minute", base).unwrap_err().to_string();
        assert!(err.contains("schedule"), "{err}");
        // The documented shapes only, said in the API's words.
        for (schedule, fields) in [("bogus", 1), ("0 0 1 1 * * 2030", 7)] {
            let err = next_tick(schedule, base).unwrap_err().to_string();
            assert!(
                err.contains(&format!("has {fields} field(s); a cron expression has 5")),
                "{err}"
            );
        }
        // A bad field is named, with the values it takes, not in the
        // parser's words ("Component error: Number out of bounds.").
        for (schedule, says) in [
            (
                "99 * * * *",
                "the minute field \"99\" is not valid (minute takes 0-59",
            ),
            (
                "0 25 * * *",
                "the hour field \"25\" is not valid (hour takes 0-23",
            ),
            ("0 0 * 13 *", "the month field \"13\" is not valid"),
            ("61 0 * * * *", "the second field \"61\" is not valid"),
            (
                "0 0 * * MON-FOO",
                "the day-of-week field \"MON-FOO\" is not valid",
            ),
        ] {
            let err = next_tick(schedule, base).unwrap_err().to_string();
            assert!(err.contains(says), "{schedule}: {err}");
            assert!(!err.contains("Component") && !err.contains("Cron"), "{err}");
        }
    }
}
