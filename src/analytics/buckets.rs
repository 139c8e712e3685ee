//! Time-bucket boundaries in a time zone, computed in Rust the way ClickHouse computes them
//! (`toStartOfMinute`/`toStartOfHour`/`toStartOfDay`/`toMonday`/`toStartOfMonth` in the zone),
//! so that buckets without events can be filled with zeros.
//!
//! A bucket is named by the instant it starts. Minutes and hours start where the local clock
//! shows :00 (for zones offset by half an hour, that is not a UTC hour); days, weeks (from
//! Monday) and months start at local midnight, so around a DST change a day lasts 23 or 25
//! hours, and the repeated hour of a fall-back night is two buckets.

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Timelike, Utc};
use chrono_tz::Tz;

use super::model::Bucket;

/// The start of the bucket that contains `t`.
pub fn floor(bucket: Bucket, tz: Tz, t: DateTime<Utc>) -> DateTime<Utc> {
    let local = t.with_timezone(&tz);
    let into_minute = Duration::seconds(i64::from(local.second()))
        + Duration::nanoseconds(i64::from(local.nanosecond()));
    match bucket {
        Bucket::Minute => t - into_minute,
        Bucket::Hour => t - into_minute - Duration::minutes(i64::from(local.minute())),
        Bucket::Day => midnight(tz, local.date_naive()),
        Bucket::Week => {
            let date = local.date_naive();
            midnight(
                tz,
                date - Duration::days(i64::from(date.weekday().num_days_from_monday())),
            )
        }
        Bucket::Month => midnight(tz, local.date_naive().with_day(1).expect("day 1 exists")),
    }
}

/// The start of the bucket after the one that starts at `start`.
pub fn next(bucket: Bucket, tz: Tz, start: DateTime<Utc>) -> DateTime<Utc> {
    let local_date = start.with_timezone(&tz).date_naive();
    match bucket {
        // Floors again: after an offset change that is not whole hours the next local :00 is
        // not exactly one hour later.
        Bucket::Minute => floor(bucket, tz, start + Duration::minutes(1)),
        Bucket::Hour => floor(bucket, tz, start + Duration::hours(1)),
        Bucket::Day => midnight(tz, local_date + Duration::days(1)),
        Bucket::Week => midnight(tz, local_date + Duration::days(7)),
        Bucket::Month => {
            let (y, m) = if local_date.month() == 12 {
                (local_date.year() + 1, 1)
            } else {
                (local_date.year(), local_date.month() + 1)
            };
            midnight(
                tz,
                NaiveDate::from_ymd_opt(y, m, 1).expect("first of a month"),
            )
        }
    }
}

/// The first instant of a local date. Where midnight does not exist (a DST change at
/// midnight) the day starts at the first local time that does.
pub fn midnight(tz: Tz, date: NaiveDate) -> DateTime<Utc> {
    let mut local = date.and_hms_opt(0, 0, 0).expect("midnight");
    for _ in 0..(4 * 24) {
        if let Some(t) = tz.from_local_datetime(&local).earliest() {
            return t.with_timezone(&Utc);
        }
        local += Duration::minutes(15);
    }
    // No zone skips a whole day at midnight and lands nowhere; stay total anyway.
    Utc.from_utc_datetime(&date.and_hms_opt(0, 0, 0).expect("midnight"))
}

/// The starts of every bucket that overlaps `[from_ms, to_ms)`, oldest first; `Err(n)` once
/// there would be more than `max` (n = max + 1), without generating the rest.
pub fn sequence(
    bucket: Bucket,
    tz: Tz,
    from_ms: i64,
    to_ms: i64,
    max: usize,
) -> Result<Vec<DateTime<Utc>>, usize> {
    let from = DateTime::from_timestamp_millis(from_ms).unwrap_or_default();
    let to = DateTime::from_timestamp_millis(to_ms).unwrap_or_default();
    let mut out = Vec::new();
    let mut start = floor(bucket, tz, from);
    while start < to {
        if out.len() == max {
            return Err(max + 1);
        }
        out.push(start);
        let following = next(bucket, tz, start);
        debug_assert!(following > start);
        if following <= start {
            break;
        }
        start = following;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().to_utc()
    }

    fn local(bucket: Bucket, tz: &str, from: &str, to: &str) -> Vec<String> {
        let tz: Tz = tz.parse().unwrap();
        sequence(
            bucket,
            tz,
            t(from).timestamp_millis(),
            t(to).timestamp_millis(),
            10_000,
        )
        .unwrap()
        .into_iter()
        .map(|s| s.with_timezone(&tz).to_rfc3339())
        .collect()
    }

    #[test]
    fn days_follow_the_zone_across_dst() {
        // Berlin moves from +02:00 to +01:00 on 2025-10-26: that day has 25 hours.
        let days = local(
            Bucket::Day,
            "Europe/Berlin",
            "2025-10-25T12:00:00Z",
            "2025-10-27T12:00:00Z",
        );
        assert_eq!(
            days,
            vec![
                "2025-10-25T00:00:00+02:00",
                "2025-10-26T00:00:00+02:00",
                "2025-10-27T00:00:00+01:00"
            ]
        );
        let start = t("2025-10-26T00:00:00+02:00");
        let tz: Tz = "Europe/Berlin".parse().unwrap();
        assert_eq!(next(Bucket::Day, tz, start) - start, Duration::hours(25));
    }

    #[test]
    fn the_repeated_hour_of_a_fall_back_night_is_two_buckets() {
        let hours = local(
            Bucket::Hour,
            "America/New_York",
            "2025-11-02T04:30:00Z",
            "2025-11-02T07:30:00Z",
        );
        assert_eq!(
            hours,
            vec![
                "2025-11-02T00:00:00-04:00",
                "2025-11-02T01:00:00-04:00",
                "2025-11-02T01:00:00-05:00",
                "2025-11-02T02:00:00-05:00"
            ]
        );
    }

    #[test]
    fn half_hour_zones_have_their_own_hours() {
        let hours = local(
            Bucket::Hour,
            "Asia/Kolkata",
            "2025-10-10T00:00:00Z",
            "2025-10-10T01:00:00Z",
        );
        assert_eq!(
            hours,
            vec!["2025-10-10T05:00:00+05:30", "2025-10-10T06:00:00+05:30"]
        );
    }

    #[test]
    fn weeks_start_on_monday_and_months_on_the_first() {
        let weeks = local(
            Bucket::Week,
            "UTC",
            "2025-10-08T00:00:00Z",
            "2025-10-21T00:00:00Z",
        );
        assert_eq!(
            weeks,
            vec![
                "2025-10-06T00:00:00+00:00",
                "2025-10-13T00:00:00+00:00",
                "2025-10-20T00:00:00+00:00"
            ]
        );
        let months = local(
            Bucket::Month,
            "America/New_York",
            "2025-10-08T00:00:00Z",
            "2026-01-01T04:59:00Z",
        );
        assert_eq!(
            months,
            vec![
                "2025-10-01T00:00:00-04:00",
                "2025-11-01T00:00:00-04:00",
                "2025-12-01T00:00:00-05:00"
            ]
        );
    }

    #[test]
    fn the_count_is_bounded() {
        let tz: Tz = "UTC".parse().unwrap();
        let from = t("2025-10-01T00:00:00Z").timestamp_millis();
        let to = t("2025-10-31T00:00:00Z").timestamp_millis();
        assert_eq!(sequence(Bucket::Minute, tz, from, to, 1000), Err(1001));
        assert_eq!(sequence(Bucket::Day, tz, from, to, 1000).unwrap().len(), 30);
        // A partial last bucket is included; `to` itself is excluded.
        assert_eq!(
            sequence(Bucket::Day, tz, from, to + 1, 1000).unwrap().len(),
            31
        );
    }
}
