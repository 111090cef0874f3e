//! UTC calendar days, the ledger's unit of time: a day's hash is named by its date, key
//! budgets are per day, and `GET /v1/usage` takes dates. Dates are converted with Howard
//! Hinnant's civil-date algorithms rather than a date crate: this is all the gateway needs.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Seconds in a day (UTC has no leap seconds in Unix time).
const DAY_S: u64 = 86_400;

/// A UTC date, held as days since 1970-01-01.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Day(i64);

impl Day {
    /// Today, in UTC.
    pub fn today() -> Self {
        Self::at(SystemTime::now())
    }

    /// The UTC date of `time` (times before 1970 count as 1970-01-01).
    pub fn at(time: SystemTime) -> Self {
        let secs = time
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        Self((secs / DAY_S) as i64)
    }

    /// Parses `YYYY-MM-DD` (a real date, years 1970 to 9999).
    pub fn parse(text: &str) -> Option<Self> {
        let bytes = text.as_bytes();
        let digits = |range: std::ops::Range<usize>| -> Option<i64> {
            let part = text.get(range)?;
            if part.bytes().all(|b| b.is_ascii_digit()) {
                part.parse().ok()
            } else {
                None
            }
        };
        if bytes.len() != 10 || bytes[4] != b'-' || bytes[7] != b'-' {
            return None;
        }
        let (y, m, d) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
        if !(1970..=9999).contains(&y) || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
            return None;
        }
        let day = Self(days_from_civil(y, m, d));
        // 2026-02-30 would land on March 2nd: a date that does not read back is not real.
        (day.civil() == (y, m, d)).then_some(day)
    }

    /// The next day.
    pub fn next(self) -> Self {
        Self(self.0 + 1)
    }

    /// Days from `self` to `other` (negative when `other` is earlier).
    pub fn until(self, other: Day) -> i64 {
        other.0 - self.0
    }

    /// Unix seconds at the start of the day `days` after this one.
    pub fn unix_start_after(self, days: u32) -> u64 {
        u64::try_from(self.0 + i64::from(days)).unwrap_or(0) * DAY_S
    }

    /// How long from `now` until the end of the day `now` is in (the next UTC midnight).
    pub fn until_midnight(now: SystemTime) -> Duration {
        let secs = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        Duration::from_secs(DAY_S - secs % DAY_S)
    }

    fn civil(self) -> (i64, i64, i64) {
        civil_from_days(self.0)
    }
}

impl fmt::Display for Day {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (y, m, d) = self.civil();
        write!(f, "{y:04}-{m:02}-{d:02}")
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (
        if m <= 2 {
            yoe + era * 400 + 1
        } else {
            yoe + era * 400
        },
        m,
        d,
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn dates_parse_print_and_count_in_utc() {
        assert_eq!(Day::parse("1970-01-01"), Some(Day(0)));
        assert_eq!(Day::parse("2000-03-01").unwrap().to_string(), "2000-03-01");
        assert_eq!(Day::parse("2024-02-29").unwrap().to_string(), "2024-02-29");
        let day = Day::parse("2026-12-31").unwrap();
        assert_eq!(day.next().to_string(), "2027-01-01");
        assert_eq!(day.until(day.next()), 1);
        // 2026-12-02 00:00:00 UTC is 1796169600.
        let dec2 = Day::parse("2026-12-02").unwrap();
        assert_eq!(dec2.unix_start_after(0), 1_796_169_600);
        assert_eq!(
            Day::at(UNIX_EPOCH + Duration::from_secs(1_796_169_600 + 86_399)),
            dec2
        );
        assert_eq!(
            Day::until_midnight(UNIX_EPOCH + Duration::from_secs(1_796_169_600 + 86_399)),
            Duration::from_secs(1)
        );
        for bad in [
            "",
            "2026-2-01",
            "2026-02-30",
            "2023-02-29",
            "2026-13-01",
            "2026-00-10",
            "1969-12-31",
            "+026-01-01",
            "2026-01-0a",
            "2026/01/01",
            "20260101xx",
            "2026-01-01 ",
        ] {
            assert_eq!(Day::parse(bad), None, "{bad:?}");
        }
    }
}
