//! Event-time parsing and formatting: RFC 3339 in, UTC milliseconds inside, RFC 3339 `...Z` out.

use chrono::{DateTime, SecondsFormat, Utc};

/// Why an `event_time` string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("event_time {value:?} is not an RFC 3339 timestamp with an offset: {cause}")]
pub struct TimeError {
    /// The offending input, kept for the dead-letter entry.
    pub value: String,
    /// What the parser objected to.
    pub cause: String,
}

/// Parses an RFC 3339 / ISO-8601 timestamp into milliseconds since the Unix epoch (UTC).
///
/// Accepts any fraction length (digits past the millisecond are truncated, the contract's
/// precision is the millisecond) and explicit offsets such as `+02:00`. A timestamp without
/// an offset is refused: guessing its zone could silently move it out of the join window.
pub fn parse_event_time(value: &str) -> Result<i64, TimeError> {
    DateTime::parse_from_rfc3339(value)
        .map(|t| t.timestamp_millis())
        .map_err(|e| TimeError {
            value: value.to_owned(),
            cause: e.to_string(),
        })
}

/// Formats epoch milliseconds as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn format_millis(ms: i64) -> String {
    match DateTime::<Utc>::from_timestamp_millis(ms) {
        Some(t) => t.to_rfc3339_opts(SecondsFormat::Millis, true),
        // Unreachable for parsed input (chrono's own range); keep a faithful, if odd, rendering.
        None => format!("{ms}ms"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_with_millis_round_trips() {
        let ms = parse_event_time("2026-11-20T10:15:30.123Z").unwrap();
        assert_eq!(format_millis(ms), "2026-11-20T10:15:30.123Z");
    }

    #[test]
    fn any_fraction_length_is_truncated_to_millis() {
        let base = parse_event_time("2026-11-20T10:15:30Z").unwrap();
        assert_eq!(
            parse_event_time("2026-11-20T10:15:30.1Z").unwrap(),
            base + 100
        );
        assert_eq!(
            parse_event_time("2026-11-20T10:15:30.999999999Z").unwrap(),
            base + 999
        );
        assert_eq!(
            parse_event_time("2026-11-20T10:15:30.123456789012Z").unwrap(),
            base + 123
        );
    }

    #[test]
    fn explicit_offsets_are_applied() {
        let utc = parse_event_time("2026-11-20T10:15:30.000Z").unwrap();
        assert_eq!(parse_event_time("2026-11-20T12:15:30+02:00").unwrap(), utc);
        assert_eq!(parse_event_time("2026-11-20T05:45:30-04:30").unwrap(), utc);
        assert_eq!(parse_event_time("2026-11-20T10:15:30+00:00").unwrap(), utc);
    }

    #[test]
    fn impossible_or_zoneless_times_are_refused() {
        for bad in [
            "2026-02-30T10:00:00Z",
            "2026-11-20T25:00:00Z",
            "2026-11-20T10:15:30",
            "2026-11-20",
            "yesterday",
            "",
            "1763633730",
            "2026-11-20T10:15:30+24:00",
        ] {
            assert!(parse_event_time(bad).is_err(), "{bad} should be refused");
        }
    }
}
