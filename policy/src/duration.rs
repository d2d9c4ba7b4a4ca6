//! Durations as people write them: `500ms`, `2s`, `1m`, `1h`, `1m30s`.

use std::time::Duration;

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("empty duration")]
    Empty,
    #[error("duration \"{0}\" has no unit")]
    MissingUnit(String),
    #[error("duration \"{text}\": unknown unit \"{unit}\"")]
    UnknownUnit { text: String, unit: String },
    #[error("duration \"{0}\": units must go from largest to smallest, each at most once")]
    UnitOrder(String),
    #[error("duration \"{0}\": fractions are not supported")]
    Fraction(String),
    #[error("duration \"{0}\" is not of the form 1h30m, 2s or 500ms")]
    Malformed(String),
    #[error("duration \"{0}\" must be greater than zero")]
    Zero(String),
    #[error("duration \"{0}\" is too long")]
    TooLong(String),
}

impl DurationError {
    /// What to write instead.
    pub fn hint(&self) -> Option<String> {
        match self {
            Self::MissingUnit(n) => Some(format!("write \"{n}s\" or \"{n}ms\"")),
            Self::UnknownUnit { .. } => Some("units are h, m, s and ms".into()),
            Self::Fraction(_) => Some("use a smaller unit, e.g. \"1500ms\" for 1.5s".into()),
            Self::Malformed(_) | Self::UnitOrder(_) => {
                Some("examples: \"500ms\", \"2s\", \"1m30s\", \"1h\"".into())
            }
            Self::Empty | Self::Zero(_) | Self::TooLong(_) => None,
        }
    }
}

/// Longest duration accepted (one year): anything longer is a typo.
const MAX: Duration = Duration::from_secs(366 * 24 * 3600);

/// Parses `500ms`, `2s`, `1m`, `1h` and combinations from the largest unit to the
/// smallest (`1h30m`, `1m30s`, `2s500ms`). Zero, fractions, signs, spaces and bare
/// numbers are refused.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    if text.is_empty() {
        return Err(DurationError::Empty);
    }
    let mut rest = text;
    let mut total = Duration::ZERO;
    let mut last_rank = usize::MAX;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(DurationError::Malformed(text.into()));
        }
        let (num, after) = rest.split_at(digits);
        if after.starts_with(['.', ',']) {
            return Err(DurationError::Fraction(text.into()));
        }
        let unit_len = after.bytes().take_while(u8::is_ascii_alphabetic).count();
        let (unit, after) = after.split_at(unit_len);
        let (rank, unit_dur) = match unit {
            "h" => (0, Duration::from_secs(3600)),
            "m" => (1, Duration::from_secs(60)),
            "s" => (2, Duration::from_secs(1)),
            "ms" => (3, Duration::from_millis(1)),
            "" if after.is_empty() && rest.len() == text.len() => {
                return Err(DurationError::MissingUnit(num.into()))
            }
            "" => return Err(DurationError::Malformed(text.into())),
            other => {
                return Err(DurationError::UnknownUnit {
                    text: text.into(),
                    unit: other.into(),
                })
            }
        };
        if last_rank != usize::MAX && rank <= last_rank {
            return Err(DurationError::UnitOrder(text.into()));
        }
        last_rank = rank;
        let n: u32 = num
            .parse()
            .map_err(|_| DurationError::TooLong(text.into()))?;
        total = unit_dur
            .checked_mul(n)
            .and_then(|d| total.checked_add(d))
            .ok_or_else(|| DurationError::TooLong(text.into()))?;
        rest = after;
    }
    if total.is_zero() {
        return Err(DurationError::Zero(text.into()));
    }
    if total > MAX {
        return Err(DurationError::TooLong(text.into()));
    }
    Ok(total)
}

/// Writes a duration the way `parse_duration` reads it (`1m30s`, `500ms`).
pub fn format_duration(d: Duration) -> String {
    let mut ms = d.as_millis();
    if ms == 0 {
        return "0ms".into();
    }
    let mut out = String::new();
    for (unit, size) in [("h", 3_600_000u128), ("m", 60_000), ("s", 1000), ("ms", 1)] {
        if ms >= size {
            out.push_str(&format!("{}{unit}", ms / size));
            ms %= size;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_forms() {
        let cases = [
            ("500ms", Duration::from_millis(500)),
            ("2s", Duration::from_secs(2)),
            ("1m", Duration::from_secs(60)),
            ("1h", Duration::from_secs(3600)),
            ("1m30s", Duration::from_secs(90)),
            ("1h30m", Duration::from_secs(5400)),
            ("2s500ms", Duration::from_millis(2500)),
            ("90s", Duration::from_secs(90)),
        ];

        for (text, want) in cases {
            assert_eq!(parse_duration(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn refuses_everything_else_with_a_reason() {
        let cases = [
            ("", DurationError::Empty),
            ("30", DurationError::MissingUnit("30".into())),
            (
                "5d",
                DurationError::UnknownUnit {
                    text: "5d".into(),
                    unit: "d".into(),
                },
            ),
            (
                "5sec",
                DurationError::UnknownUnit {
                    text: "5sec".into(),
                    unit: "sec".into(),
                },
            ),
            ("30s1m", DurationError::UnitOrder("30s1m".into())),
            ("1s1s", DurationError::UnitOrder("1s1s".into())),
            ("1.5s", DurationError::Fraction("1.5s".into())),
            ("-1s", DurationError::Malformed("-1s".into())),
            (" 1s", DurationError::Malformed(" 1s".into())),
            ("1s ", DurationError::Malformed("1s ".into())),
            ("1m30", DurationError::Malformed("1m30".into())),
            ("s", DurationError::Malformed("s".into())),
            ("0s", DurationError::Zero("0s".into())),
            ("0h0m", DurationError::Zero("0h0m".into())),
            (
                "99999999999h",
                DurationError::TooLong("99999999999h".into()),
            ),
            ("9000h", DurationError::TooLong("9000h".into())),
        ];

        for (text, want) in cases {
            assert_eq!(parse_duration(text), Err(want), "{text:?}");
        }
    }

    #[test]
    fn missing_unit_hint_suggests_seconds() {
        let e = parse_duration("30").unwrap_err();

        assert_eq!(e.hint().as_deref(), Some("write \"30s\" or \"30ms\""));
    }

    #[test]
    fn format_round_trips() {
        for text in ["500ms", "2s", "1m30s", "1h", "1h0m1s", "2s500ms"] {
            let d = parse_duration(text).unwrap();

            assert_eq!(parse_duration(&format_duration(d)), Ok(d), "{text}");
        }
        assert_eq!(format_duration(Duration::from_secs(90)), "1m30s");
    }
}
