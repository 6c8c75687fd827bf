//! Sizes and times as operators write and read them: `64G`, `500M`,
//! `1.5 GiB`, and RFC 3339 timestamps, without pulling in a crate for each.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

const KIB: u64 = 1024;

/// A size in bytes that reads `10G`, `500M`, `4096` or `1.5GiB`.
///
/// Multiples are binary (K = 1024) whichever spelling is used, because
/// disks and caches are sized that way and `10G` meaning 10 × 10⁹ here but
/// 10 × 2³⁰ in `df -h` would only confuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

/// Why a size was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeParseError {
    #[error("Empty size: write a number with an optional unit, like 10G or 500M")]
    Empty,
    #[error("{0:?} is not a size: write a number with an optional unit K, M, G or T, like 10G")]
    Invalid(String),
    #[error("{0:?} is too large")]
    Overflow(String),
}

/// Parses `10G`, `500M`, `1.5 GiB`, `4096`, `0`. Units: B, K, M, G, T, P,
/// optionally followed by `B` or `iB`, any case.
pub fn parse_size(text: &str) -> Result<u64, SizeParseError> {
    let s = text.trim();
    if s.is_empty() {
        return Err(SizeParseError::Empty);
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let unit = unit.trim().to_ascii_lowercase();
    let shift = match unit.trim_end_matches("ib").trim_end_matches('b') {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        "p" => 50,
        _ => return Err(SizeParseError::Invalid(text.to_string())),
    };
    // "1.5G" is common enough to allow; the fraction is taken in units of
    // the multiple, so precision far beyond a byte is never needed.
    let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && frac.is_empty() {
        return Err(SizeParseError::Invalid(text.to_string()));
    }
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole
            .parse()
            .map_err(|_| SizeParseError::Invalid(text.to_string()))?
    };
    let multiple = 1u64 << shift;
    let mut bytes = whole
        .checked_mul(multiple)
        .ok_or_else(|| SizeParseError::Overflow(text.to_string()))?;
    if !frac.is_empty() {
        if !frac.bytes().all(|b| b.is_ascii_digit()) || frac.len() > 9 {
            return Err(SizeParseError::Invalid(text.to_string()));
        }
        let digits: u64 = frac.parse().unwrap_or(0);
        let scale = 10u64.pow(frac.len() as u32);
        let part = u128::from(digits) * u128::from(multiple) / u128::from(scale);
        bytes = bytes
            .checked_add(part as u64)
            .ok_or_else(|| SizeParseError::Overflow(text.to_string()))?;
    }
    Ok(bytes)
}

/// `1.5 GiB`, `512 B`: one decimal above a KiB, for tables and messages.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < KIB {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / KIB as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

impl FromStr for ByteSize {
    type Err = SizeParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_size(s).map(ByteSize)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_size(self.0))
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    /// A plain integer is bytes; a string may carry a unit.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Bytes(n) => Ok(ByteSize(n)),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// Parses a duration as operators write it: `30s`, `2m`, `1h`, `500ms`,
/// or bare seconds (`30`).
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let s = text.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let bad = || format!("{text:?} is not a duration: write e.g. 30s, 2m, 1h or 500ms");
    let n: u64 = number.parse().map_err(|_| bad())?;
    let ms = match unit.trim() {
        "" | "s" | "sec" | "secs" => n.checked_mul(1000),
        "ms" => Some(n),
        "m" | "min" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => return Err(bad()),
    }
    .ok_or_else(bad)?;
    Ok(std::time::Duration::from_millis(ms))
}

/// Seconds since the epoch as `2024-05-01T12:00:00Z` (UTC).
pub fn format_rfc3339(unix_secs: i64) -> String {
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_as_operators_write_them() {
        use std::time::Duration;
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-3s").is_err());
        assert!(parse_duration("3d").is_err());
    }

    #[test]
    fn sizes_as_operators_write_them() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("500M"), Ok(500 << 20));
        assert_eq!(parse_size("500m"), Ok(500 << 20));
        assert_eq!(parse_size("64GiB"), Ok(64 << 30));
        assert_eq!(parse_size("64 GB"), Ok(64 << 30));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("2k"), Ok(2048));
        assert_eq!(parse_size("7B"), Ok(7));
        assert_eq!(parse_size(" 1T "), Ok(1 << 40));
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert_eq!(parse_size(""), Err(SizeParseError::Empty));
        for bad in ["G", "ten", "10X", "1.2.3G", "-5M", "1e9", ".", "5 G G"] {
            assert!(
                matches!(parse_size(bad), Err(SizeParseError::Invalid(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            parse_size("99999999999P"),
            Err(SizeParseError::Overflow(_))
        ));
    }

    #[test]
    fn sizes_format_for_people() {
        assert_eq!(format_size(512), "512 B");
        assert_eq!(format_size(1536), "1.5 KiB");
        assert_eq!(format_size(64 << 30), "64.0 GiB");
    }

    #[test]
    fn bytesize_reads_integers_and_strings() {
        #[derive(Deserialize)]
        struct T {
            a: ByteSize,
            b: ByteSize,
        }
        let t: T = toml::from_str("a = 1024\nb = \"2M\"").unwrap();
        assert_eq!((t.a.0, t.b.0), (1024, 2 << 20));
        let err = toml::from_str::<T>("a = 1\nb = \"lots\"").err().unwrap();
        assert!(err.to_string().contains("not a size"), "{err}");
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}
