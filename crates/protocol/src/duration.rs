//! Duration strings as the SDKs write them (`"1h"`, `"2h30m10s"`, `"5s"`, `"7d"`).

use std::time::Duration;

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: {reason}")]
pub struct DurationError {
    pub input: String,
    pub reason: String,
}

/// Parses a Go-style duration (`ns, us, ms, s, m, h, d, w` units, concatenated).
///
/// ```
/// use std::time::Duration;
/// use cairn_protocol::duration::parse;
/// assert_eq!(parse("2h30m10s").unwrap(), Duration::from_secs(9010));
/// assert_eq!(parse("1d").unwrap(), Duration::from_secs(86_400));
/// assert!(parse("soon").is_err());
/// ```
pub fn parse(input: &str) -> Result<Duration, DurationError> {
    let trimmed = input.trim();
    if trimmed.is_empty() {
        return Err(DurationError {
            input: input.to_string(),
            reason: "empty".into(),
        });
    }
    // Go writes microseconds as "µs"; humantime only knows "us".
    let normalised = trimmed.replace('µ', "u");
    humantime::parse_duration(&normalised).map_err(|e| DurationError {
        input: input.to_string(),
        reason: e.to_string(),
    })
}

/// Formats a duration the way the JS SDK does: largest units first, whole seconds,
/// sub-second durations rounded up to `1s` (v4 behaviour), zero as `"0s"`.
///
/// ```
/// use std::time::Duration;
/// use cairn_protocol::duration::format;
/// assert_eq!(format(Duration::from_secs(9010)), "2h30m10s");
/// assert_eq!(format(Duration::from_secs(86_400)), "1d");
/// assert_eq!(format(Duration::from_millis(10)), "1s");
/// ```
pub fn format(d: Duration) -> String {
    let mut secs = d.as_secs();
    if d.subsec_nanos() > 0 {
        secs += 1;
    }
    if secs == 0 {
        return "0s".to_string();
    }
    let mut out = String::new();
    for (unit, size) in [
        ("w", 604_800),
        ("d", 86_400),
        ("h", 3_600),
        ("m", 60),
        ("s", 1),
    ] {
        if secs >= size {
            out.push_str(&format!("{}{unit}", secs / size));
            secs %= size;
        }
    }
    out
}
