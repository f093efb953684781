//! Cron expressions (`minute hour day-of-month month day-of-week`, UTC) and
//! their next firing time. Pure arithmetic on Unix seconds: the caller brings
//! the clock.

use std::fmt;
use std::str::FromStr;

/// A cron schedule, evaluated in UTC.
///
/// Day rule as in Vixie cron and cronie: when both day fields are restricted
/// a day matches if either does. A field counts as unrestricted when it
/// starts with `*`, so `*/2` in day-of-month still combines with
/// day-of-week by AND, as crontab(5) implementations do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    expression: String,
    /// Bit `n` set when minute `n` fires; likewise for the other fields.
    minutes: u64,
    hours: u64,
    days: u64,
    months: u64,
    /// Sunday is bit 0; a `7` in the expression is folded into it.
    weekdays: u64,
    days_either: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cron expression {expression:?}: {reason}")]
pub struct ScheduleError {
    pub expression: String,
    pub reason: String,
}

/// Long enough that `0 0 29 2 *` finds its next Feb 29 across a skipped
/// century leap year (2096 → 2104).
const HORIZON_DAYS: i64 = 8 * 366;

const MINUTES_PER_DAY: u64 = 24 * 60;

const MONTH_NAMES: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const DAY_NAMES: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

const FIELD_LIST: &str = "minute hour day-of-month month day-of-week";

struct Field {
    number: usize,
    name: &'static str,
    min: u32,
    max: u32,
    /// Names for `min`, `min + 1`, …
    names: &'static [&'static str],
    names_are: &'static str,
}

const FIELDS: [Field; 5] = [
    Field {
        number: 1,
        name: "minute",
        min: 0,
        max: 59,
        names: &[],
        names_are: "",
    },
    Field {
        number: 2,
        name: "hour",
        min: 0,
        max: 23,
        names: &[],
        names_are: "",
    },
    Field {
        number: 3,
        name: "day-of-month",
        min: 1,
        max: 31,
        names: &[],
        names_are: "",
    },
    Field {
        number: 4,
        name: "month",
        min: 1,
        max: 12,
        names: &MONTH_NAMES,
        names_are: "month name",
    },
    Field {
        number: 5,
        name: "day-of-week",
        min: 0,
        max: 7,
        names: &DAY_NAMES,
        names_are: "day name",
    },
];

impl Schedule {
    /// # Errors
    /// Anything but five valid fields or one of the macros `@yearly`,
    /// `@annually`, `@monthly`, `@weekly`, `@daily`, `@midnight`, `@hourly`.
    pub fn parse(expression: &str) -> Result<Schedule, ScheduleError> {
        let fail = |reason: String| ScheduleError {
            expression: expression.to_owned(),
            reason,
        };
        let words: Vec<&str> = expression.split_whitespace().collect();
        let fields: [&str; 5] = match words.as_slice() {
            [] => return Err(fail("empty expression".into())),
            [word] if word.starts_with('@') => macro_fields(word).ok_or_else(|| {
                fail(format!(
                    "unknown macro {word} (expected @yearly, @annually, @monthly, @weekly, @daily, @midnight or @hourly)"
                ))
            })?,
            [word, ..] if word.starts_with('@') => {
                return Err(fail(format!(
                    "macro {word} stands alone, found {} fields",
                    words.len()
                )));
            }
            [a, b, c, d, e] => [*a, *b, *c, *d, *e],
            _ => {
                return Err(fail(format!(
                    "expected 5 fields ({FIELD_LIST}), found {}",
                    words.len()
                )));
            }
        };
        let mut masks = [0u64; 5];
        for ((mask, text), field) in masks.iter_mut().zip(fields).zip(&FIELDS) {
            *mask = parse_field(text, field).map_err(|reason| {
                fail(format!("field {} ({}): {reason}", field.number, field.name))
            })?;
        }
        let [minutes, hours, days, months, weekdays] = masks;
        // Sunday may be written 0 or 7.
        let weekdays = (weekdays | weekdays >> 7) & 0x7f;
        Ok(Schedule {
            expression: expression.to_owned(),
            minutes,
            hours,
            days,
            months,
            weekdays,
            days_either: !fields[2].starts_with('*') && !fields[4].starts_with('*'),
        })
    }

    /// The first firing time strictly after `after` (seconds since the Unix
    /// epoch, UTC), or `None` if there is none within eight years (for
    /// example `0 0 30 2 *`, which never fires).
    pub fn next_after(&self, after: u64) -> Option<u64> {
        let first = after / 60 + 1;
        let mut day = i64::try_from(first / MINUTES_PER_DAY).ok()?;
        let mut from = first % MINUTES_PER_DAY;
        let end = day.checked_add(HORIZON_DAYS)?;
        while day <= end {
            let (year, month, day_of_month) = civil_from_days(day);
            if !bit(self.months, month) {
                day = if month >= 12 {
                    days_from_civil(year + 1, 1, 1)
                } else {
                    days_from_civil(year, month + 1, 1)
                };
                from = 0;
                continue;
            }
            if self.day_matches(day, day_of_month)
                && let Some(minute_of_day) = self.first_time_from(from)
            {
                return u64::try_from(day)
                    .ok()?
                    .checked_mul(MINUTES_PER_DAY)?
                    .checked_add(minute_of_day)?
                    .checked_mul(60);
            }
            day += 1;
            from = 0;
        }
        None
    }

    pub fn expression(&self) -> &str {
        &self.expression
    }

    fn day_matches(&self, days: i64, day_of_month: u32) -> bool {
        let dom = bit(self.days, day_of_month);
        let dow = bit(self.weekdays, weekday(days));
        if self.days_either {
            dom || dow
        } else {
            dom && dow
        }
    }

    /// The first firing minute of a matching day at or after `from`.
    fn first_time_from(&self, from: u64) -> Option<u64> {
        let (first_hour, first_minute) = (from / 60, from % 60);
        (first_hour..24)
            .filter(|&h| self.hours >> h & 1 == 1)
            .find_map(|h| {
                let start = if h == first_hour { first_minute } else { 0 };
                let rest = self.minutes.checked_shr(u32::try_from(start).ok()?)?;
                (rest != 0).then(|| h * 60 + start + u64::from(rest.trailing_zeros()))
            })
    }
}

impl FromStr for Schedule {
    type Err = ScheduleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Schedule::parse(s)
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.expression)
    }
}

fn macro_fields(word: &str) -> Option<[&'static str; 5]> {
    let fields = match word.to_ascii_lowercase().as_str() {
        "@yearly" | "@annually" => ["0", "0", "1", "1", "*"],
        "@monthly" => ["0", "0", "1", "*", "*"],
        "@weekly" => ["0", "0", "*", "*", "0"],
        "@daily" | "@midnight" => ["0", "0", "*", "*", "*"],
        "@hourly" => ["0", "*", "*", "*", "*"],
        _ => return None,
    };
    Some(fields)
}

fn bit(mask: u64, n: u32) -> bool {
    mask.checked_shr(n).is_some_and(|m| m & 1 == 1)
}

/// The set of values a field allows, as bits; the reason is the error's tail.
fn parse_field(text: &str, field: &Field) -> Result<u64, String> {
    let mut mask = 0u64;
    for item in text.split(',') {
        if item.is_empty() {
            return Err(format!("{text:?} has an empty list item"));
        }
        let (range, step) = match item.split_once('/') {
            Some((range, step)) => (range, Some(parse_step(step)?)),
            None => (item, None),
        };
        let (low, high) = if range == "*" {
            (field.min, field.max)
        } else if let Some((a, b)) = range.split_once('-') {
            let (low, high) = (value(a, item, field)?, value(b, item, field)?);
            if low > high {
                return Err(format!("range {range} runs backwards"));
            }
            (low, high)
        } else {
            let v = value(range, item, field)?;
            // `5/10` means `5-max/10`.
            (v, if step.is_some() { field.max } else { v })
        };
        let step = u64::from(step.unwrap_or(1));
        let mut v = u64::from(low);
        while v <= u64::from(high) {
            mask |= 1u64
                .checked_shl(u32::try_from(v).map_err(|e| e.to_string())?)
                .unwrap_or(0);
            v += step;
        }
    }
    Ok(mask)
}

fn parse_step(text: &str) -> Result<u32, String> {
    if text.is_empty() {
        return Err("missing step after '/'".into());
    }
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("step {text:?} is not a number"));
    }
    match text.parse::<u32>() {
        Ok(0) => Err("step must be at least 1".into()),
        Ok(step) => Ok(step),
        Err(_) => Err(format!("step {text} is too large")),
    }
}

fn value(text: &str, item: &str, field: &Field) -> Result<u32, String> {
    if text.is_empty() {
        return Err(format!("{item:?} is missing a value"));
    }
    if text.bytes().all(|b| b.is_ascii_digit()) {
        return match text.parse::<u32>() {
            Ok(v) if (field.min..=field.max).contains(&v) => Ok(v),
            _ => Err(format!(
                "{text} is out of range {}-{}",
                field.min, field.max
            )),
        };
    }
    let named = (field.min..)
        .zip(field.names)
        .find(|(_, name)| name.eq_ignore_ascii_case(text));
    match named {
        Some((v, _)) => Ok(v),
        None if field.names.is_empty() => Err(format!("{text:?} is not a number")),
        None => Err(format!("{text:?} is not a number or a {}", field.names_are)),
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = if year >= 0 { year } else { year - 399 } / 400;
    let year_of_era = year - era * 400;
    let month_from_march = i64::from((month + 9) % 12);
    let day_of_year = (153 * month_from_march + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// `seconds` since the Unix epoch as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn format_utc(seconds: i64) -> String {
    let (year, month, day) = civil_from_days(seconds.div_euclid(86_400));
    let rem = seconds.rem_euclid(86_400);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// (year, month 1-12, day 1-31) of days since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    // Both are in range by construction (1-12, 1-31).
    (
        year,
        u32::try_from(month).unwrap_or(1),
        u32::try_from(day).unwrap_or(1),
    )
}

/// 0 is Sunday; 1970-01-01 was a Thursday.
fn weekday(days: i64) -> u32 {
    u32::try_from((days + 4).rem_euclid(7)).unwrap_or(0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn utc(year: i64, month: u32, day: u32, hour: u64, minute: u64) -> u64 {
        let days = u64::try_from(days_from_civil(year, month, day)).unwrap();
        days * 86_400 + hour * 3600 + minute * 60
    }

    fn next(expr: &str, after: u64) -> Option<u64> {
        Schedule::parse(expr).unwrap().next_after(after)
    }

    fn reason(expr: &str) -> String {
        Schedule::parse(expr).unwrap_err().reason
    }

    /// (year, month, day) by walking years and months from 1970: slow and obvious.
    fn naive_civil(mut days: u64) -> (i64, u32, u32) {
        let leap = |y: i64| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
        let mut year = 1970;
        loop {
            let len = if leap(year) { 366 } else { 365 };
            if days < len {
                break;
            }
            days -= len;
            year += 1;
        }
        let lengths = [
            31,
            if leap(year) { 29 } else { 28 },
            31,
            30,
            31,
            30,
            31,
            31,
            30,
            31,
            30,
            31,
        ];
        let mut month = 1;
        for len in lengths {
            if days < len {
                break;
            }
            days -= len;
            month += 1;
        }
        (year, month, u32::try_from(days).unwrap() + 1)
    }

    /// Whether `s` fires at `secs`, straight from the definition.
    fn matches(s: &Schedule, secs: u64) -> bool {
        if !secs.is_multiple_of(60) {
            return false;
        }
        let (minute, hour, days) = (secs / 60 % 60, secs / 3600 % 24, secs / 86_400);
        let (_, month, day) = naive_civil(days);
        let dow = u32::try_from((days + 4) % 7).unwrap();
        let has = |mask: u64, n: u64| mask & (1 << n) != 0;
        let dom_ok = has(s.days, day.into());
        let dow_ok = has(s.weekdays, dow.into());
        let day_ok = if s.days_either {
            dom_ok || dow_ok
        } else {
            dom_ok && dow_ok
        };
        has(s.minutes, minute) && has(s.hours, hour) && has(s.months, month.into()) && day_ok
    }

    #[test]
    fn calendar_conversions() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(utc(2026, 11, 22, 10, 7), 1_795_342_020);
        assert_eq!(utc(2104, 2, 29, 0, 0), 4_233_686_400);
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(weekday(0), 4);
        assert_eq!(weekday(-1), 3);
        assert_eq!(weekday(days_from_civil(2026, 11, 22)), 0);
        for days in (-800_000..800_000).step_by(7) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        for days in 0..(300 * 366) {
            assert_eq!(civil_from_days(days), naive_civil(days.try_into().unwrap()));
        }
    }

    #[test]
    fn known_firing_times() {
        let t = utc(2026, 11, 22, 10, 7);
        assert_eq!(next("*/15 * * * *", t), Some(utc(2026, 11, 22, 10, 15)));
        assert_eq!(
            next("*/15 * * * *", t + 53),
            Some(utc(2026, 11, 22, 10, 15))
        );
        assert_eq!(next("* * * * *", 0), Some(60));
        assert_eq!(next("* * * * *", 59), Some(60));
        assert_eq!(next("* * * * *", 60), Some(120));
        // Strictly after: a firing time is not its own successor.
        let two = utc(2026, 11, 23, 2, 0);
        assert_eq!(next("0 2 * * *", t), Some(two));
        assert_eq!(next("0 2 * * *", two - 1), Some(two));
        assert_eq!(next("0 2 * * *", two), Some(utc(2026, 11, 24, 2, 0)));
        assert_eq!(
            next("0 0 1 * *", utc(2026, 12, 15, 0, 0)),
            Some(utc(2027, 1, 1, 0, 0))
        );
        assert_eq!(next("0 0 1 * *", 1_798_761_599), Some(1_798_761_600));
        assert_eq!(next("0 0 29 2 *", t), Some(utc(2028, 2, 29, 0, 0)));
        assert_eq!(
            next("0 0 29 2 *", utc(2096, 2, 29, 0, 0)),
            Some(utc(2104, 2, 29, 0, 0))
        );
        assert_eq!(next("@hourly", t), Some(utc(2026, 11, 22, 11, 0)));
        assert_eq!(next("@daily", t), Some(utc(2026, 11, 23, 0, 0)));
        assert_eq!(next("@MIDNIGHT", t), Some(utc(2026, 11, 23, 0, 0)));
        assert_eq!(next("@weekly", t), Some(utc(2026, 11, 29, 0, 0)));
        assert_eq!(next("@monthly", t), Some(utc(2026, 12, 1, 0, 0)));
        assert_eq!(next("@yearly", t), Some(utc(2027, 1, 1, 0, 0)));
        assert_eq!(next("@annually", t), Some(utc(2027, 1, 1, 0, 0)));
        assert_eq!(next("10-50/10 9 * * *", t), Some(utc(2026, 11, 23, 9, 10)));
        assert_eq!(next("5/20 10 * * *", t), Some(utc(2026, 11, 22, 10, 25)));
        assert_eq!(next("0 0 1 jan-MAR/2 *", t), Some(utc(2027, 1, 1, 0, 0)));
        assert_eq!(next("0 0 1 feb,dec *", t), Some(utc(2026, 12, 1, 0, 0)));
    }

    #[test]
    fn day_of_month_or_day_of_week_when_both_restricted() {
        // 2026-11-22 is a Sunday: the next Friday comes before the next 13th.
        let t = utc(2026, 11, 22, 10, 7);
        assert_eq!(next("0 0 13 * fri", t), Some(utc(2026, 11, 27, 0, 0)));
        // Saturday the 12th: Sunday the 13th matches by day-of-month alone.
        assert_eq!(
            next("0 0 13 * fri", utc(2026, 12, 12, 1, 0)),
            Some(utc(2026, 12, 13, 0, 0))
        );
        // One field unrestricted: both must match, so only a Friday the 13th.
        assert_eq!(next("0 0 13 * *", t), Some(utc(2026, 12, 13, 0, 0)));
        assert_eq!(next("0 0 * * fri", t), Some(utc(2026, 11, 27, 0, 0)));
        // `*/2` counts as unrestricted (Vixie cron): odd days that are Mondays,
        // not the 25th (odd) or the 30th (Monday).
        assert_eq!(
            next("0 0 */2 * mon", utc(2026, 11, 23, 1, 0)),
            Some(utc(2026, 12, 7, 0, 0))
        );
    }

    #[test]
    fn sunday_is_zero_and_seven() {
        let wednesday = utc(2026, 11, 18, 0, 0);
        let sunday_noon = Some(utc(2026, 11, 22, 12, 0));
        assert_eq!(next("0 12 * * 0", wednesday), sunday_noon);
        assert_eq!(next("0 12 * * 7", wednesday), sunday_noon);
        assert_eq!(next("0 12 * * sun", wednesday), sunday_noon);
        assert_eq!(next("0 12 * * 7-7", wednesday), sunday_noon);
        assert_eq!(next("0 12 * * 5-7", utc(2026, 11, 21, 13, 0)), sunday_noon);
        assert_eq!(
            Schedule::parse("0 12 * * 0").unwrap().weekdays,
            Schedule::parse("0 12 * * 7").unwrap().weekdays
        );
    }

    #[test]
    fn weekdays_skip_the_weekend() {
        let friday_evening = utc(2026, 11, 20, 18, 0);
        assert_eq!(
            next("30 9 * * mon-fri", friday_evening),
            Some(utc(2026, 11, 23, 9, 30))
        );
        assert_eq!(
            next("30 9 * * 1-5", utc(2026, 11, 23, 9, 30)),
            Some(utc(2026, 11, 24, 9, 30))
        );
    }

    #[test]
    fn schedules_that_never_fire() {
        let t = utc(2026, 11, 22, 10, 7);
        assert_eq!(next("0 0 30 2 *", t), None);
        assert_eq!(next("0 0 31 4,6,9,11 *", t), None);
        // Time runs out before u64 seconds do.
        assert_eq!(next("* * * * *", u64::MAX), None);
        assert_eq!(next("0 0 29 2 *", u64::MAX - 86_400 * 400), None);
    }

    #[test]
    fn text_round_trips() {
        let s: Schedule = " 0 2 * * * ".parse().unwrap();
        assert_eq!(s.expression(), " 0 2 * * * ");
        assert_eq!(s.to_string(), " 0 2 * * * ");
        assert_eq!(
            Schedule::parse("0\t2 * *  *").unwrap().next_after(0),
            Some(7200)
        );
    }

    #[test]
    fn errors_name_what_is_wrong() {
        let e = Schedule::parse("0 24 * * *").unwrap_err();
        assert_eq!(e.expression, "0 24 * * *");
        assert_eq!(e.reason, "field 2 (hour): 24 is out of range 0-23");
        assert_eq!(
            e.to_string(),
            "cron expression \"0 24 * * *\": field 2 (hour): 24 is out of range 0-23"
        );
        let cases = [
            ("", "empty expression"),
            ("  \t ", "empty expression"),
            (
                "* * *",
                "expected 5 fields (minute hour day-of-month month day-of-week), found 3",
            ),
            (
                "0 * * * * *",
                "expected 5 fields (minute hour day-of-month month day-of-week), found 6",
            ),
            (
                "@reboot",
                "unknown macro @reboot (expected @yearly, @annually, @monthly, @weekly, @daily, @midnight or @hourly)",
            ),
            ("@daily 0", "macro @daily stands alone, found 2 fields"),
            ("60 * * * *", "field 1 (minute): 60 is out of range 0-59"),
            (
                "99999999999 * * * *",
                "field 1 (minute): 99999999999 is out of range 0-59",
            ),
            (
                "* * 0 * *",
                "field 3 (day-of-month): 0 is out of range 1-31",
            ),
            (
                "* * 32 * *",
                "field 3 (day-of-month): 32 is out of range 1-31",
            ),
            ("* * * 13 *", "field 4 (month): 13 is out of range 1-12"),
            ("* * * * 8", "field 5 (day-of-week): 8 is out of range 0-7"),
            ("*/0 * * * *", "field 1 (minute): step must be at least 1"),
            ("* 1-5/0 * * *", "field 2 (hour): step must be at least 1"),
            ("*/ * * * *", "field 1 (minute): missing step after '/'"),
            (
                "*/x * * * *",
                "field 1 (minute): step \"x\" is not a number",
            ),
            (
                "*/1/2 * * * *",
                "field 1 (minute): step \"1/2\" is not a number",
            ),
            (
                "*/99999999999 * * * *",
                "field 1 (minute): step 99999999999 is too large",
            ),
            (
                "50-10 * * * *",
                "field 1 (minute): range 50-10 runs backwards",
            ),
            (
                "* * * * fri-mon",
                "field 5 (day-of-week): range fri-mon runs backwards",
            ),
            ("-5 * * * *", "field 1 (minute): \"-5\" is missing a value"),
            ("5- * * * *", "field 1 (minute): \"5-\" is missing a value"),
            (
                "1,,2 * * * *",
                "field 1 (minute): \"1,,2\" has an empty list item",
            ),
            (
                "1, * * * *",
                "field 1 (minute): \"1,\" has an empty list item",
            ),
            ("x * * * *", "field 1 (minute): \"x\" is not a number"),
            (
                "* * mon * *",
                "field 3 (day-of-month): \"mon\" is not a number",
            ),
            (
                "* * * foo *",
                "field 4 (month): \"foo\" is not a number or a month name",
            ),
            (
                "* * * mon *",
                "field 4 (month): \"mon\" is not a number or a month name",
            ),
            (
                "* * * * jan",
                "field 5 (day-of-week): \"jan\" is not a number or a day name",
            ),
            (
                "* * * * monday",
                "field 5 (day-of-week): \"monday\" is not a number or a day name",
            ),
            ("1-2-3 * * * *", "field 1 (minute): \"2-3\" is not a number"),
            ("+5 * * * *", "field 1 (minute): \"+5\" is not a number"),
            ("٣ * * * *", "field 1 (minute): \"٣\" is not a number"),
        ];
        for (expr, want) in cases {
            assert_eq!(reason(expr), want, "{expr:?}");
        }
    }

    fn item(min: u32, max: u32, names: &'static [&'static str]) -> BoxedStrategy<String> {
        let value = move || {
            let number = (min..=max).prop_map(|v| v.to_string());
            if names.is_empty() {
                number.boxed()
            } else {
                let name = (0..names.len(), any::<bool>()).prop_map(move |(i, upper)| {
                    let n = names[i];
                    if upper {
                        n.to_ascii_uppercase()
                    } else {
                        n.to_owned()
                    }
                });
                prop_oneof![number, name].boxed()
            }
        };
        let step = 1..=max + 2;
        // Ranges from two values in order; names go through their numbers.
        let ordered = (min..=max, min..=max).prop_map(|(a, b)| (a.min(b), a.max(b)));
        prop_oneof![
            3 => Just("*".to_owned()),
            2 => step.clone().prop_map(|s| format!("*/{s}")),
            3 => value(),
            2 => ordered.clone().prop_map(|(a, b)| format!("{a}-{b}")),
            1 => (ordered, step.clone()).prop_map(|((a, b), s)| format!("{a}-{b}/{s}")),
            1 => (value(), step).prop_map(|(v, s)| format!("{v}/{s}")),
        ]
        .boxed()
    }

    fn field(min: u32, max: u32, names: &'static [&'static str]) -> impl Strategy<Value = String> {
        proptest::collection::vec(item(min, max, names), 1..=3).prop_map(|items| items.join(","))
    }

    fn expression() -> impl Strategy<Value = String> {
        let fields = (
            field(0, 59, &[]),
            field(0, 23, &[]),
            field(1, 31, &[]),
            field(1, 12, &MONTH_NAMES),
            field(0, 7, &DAY_NAMES),
        )
            .prop_map(|(a, b, c, d, e)| format!("{a} {b} {c} {d} {e}"));
        let macros = proptest::sample::select(vec![
            "@yearly",
            "@annually",
            "@monthly",
            "@weekly",
            "@daily",
            "@midnight",
            "@hourly",
        ])
        .prop_map(str::to_owned);
        prop_oneof![10 => fields, 1 => macros]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn next_after_is_the_next_firing(expr in expression(), after in 0u64..4_200_000_000) {
            let s = Schedule::parse(&expr).unwrap();
            prop_assert_eq!(s.expression(), expr.as_str());
            prop_assert_eq!(&s.to_string().parse::<Schedule>().unwrap(), &s);
            match s.next_after(after) {
                Some(got) => {
                    prop_assert!(got > after);
                    prop_assert!(matches(&s, got), "{} does not fire at {}", expr, got);
                    if got - after < 3 * 86_400 {
                        let mut t = (after / 60 + 1) * 60;
                        while t < got {
                            prop_assert!(!matches(&s, t), "{} fires at {} before {}", expr, t, got);
                            t += 60;
                        }
                    }
                }
                None => {
                    // Every day within the horizon must lack a matching date.
                    let first = after / 86_400;
                    for day in first..=first + 8 * 366 {
                        let midnight = day * 86_400;
                        let date_ok = (0..24).any(|h| matches(&s, midnight + h * 3600 + 60 * u64::from(s.minutes.trailing_zeros())));
                        prop_assert!(!date_ok, "{} fires on day {} but next_after({}) is None", expr, day, after);
                    }
                }
            }
        }

        #[test]
        fn parse_never_panics(text in any::<String>(), after in any::<u64>()) {
            if let Ok(s) = Schedule::parse(&text) {
                let _ = s.next_after(after);
            }
        }

        #[test]
        fn parse_never_panics_on_cron_like_text(
            text in "[0-9*/,\\- \t@a-zA-Z]{0,30}",
            after in any::<u64>(),
        ) {
            match Schedule::parse(&text) {
                Ok(s) => {
                    if let Some(t) = s.next_after(after) {
                        prop_assert!(t > after);
                    }
                }
                Err(e) => prop_assert!(!e.reason.is_empty()),
            }
        }
    }
}
