//! Parsing of human-readable sizes.

use crate::{Error, Result};

/// One kibibyte.
pub const KIB: u64 = 1 << 10;
/// One mebibyte.
pub const MIB: u64 = 1 << 20;
/// One gibibyte.
pub const GIB: u64 = 1 << 30;

/// Parses a size such as `"512M"`, `"8G"`, `"1T"`, `"4096"`, `"2MiB"` or `"64K"`.
///
/// Units are binary (K = 1024) and case-insensitive; `K`, `KB` and `KiB` are all accepted, and
/// likewise for `M`, `G`, `T` and `P`. A bare number (or a `B` suffix) is bytes. `"0"` is valid.
/// Anything else, and any value that does not fit in a `u64`, is [`Error::BadSize`].
pub fn parse_size(s: &str) -> Result<u64> {
    let bad = |reason| Error::BadSize {
        input: s.to_string(),
        reason,
    };
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    if num.is_empty() {
        return Err(bad(
            "expected a number followed by an optional unit (K, M, G, T, P)",
        ));
    }
    let value: u64 = num
        .parse()
        .map_err(|_| bad("the number does not fit in 64 bits"))?;
    let unit = unit.trim_start().to_ascii_lowercase();
    let shift = match unit.as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "p" | "pb" | "pib" => 50,
        _ => {
            return Err(bad(
                "unknown unit (expected K, M, G, T or P, optionally followed by B or iB)",
            ))
        }
    };
    value
        .checked_mul(1u64 << shift)
        .ok_or_else(|| bad("the size does not fit in 64 bits"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("8G").unwrap(), 8 << 30);
        assert_eq!(parse_size("1T").unwrap(), 1 << 40);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("2MiB").unwrap(), 2 << 20);
        assert_eq!(parse_size("64K").unwrap(), 64 << 10);
        assert_eq!(parse_size("64k").unwrap(), 64 << 10);
        assert_eq!(parse_size("0").unwrap(), 0);
        assert_eq!(parse_size(" 3 GB ").unwrap(), 3 << 30);
        assert_eq!(parse_size("16383P").unwrap(), 16383 << 50);
    }

    #[test]
    fn bad_sizes() {
        for s in [
            "",
            "abc",
            "M",
            "-1",
            "1.5G",
            "12X",
            "1GiBs",
            "16384P",
            "99999999999999999999",
            "18446744073709551615K",
        ] {
            assert!(
                matches!(parse_size(s), Err(Error::BadSize { .. })),
                "{s:?} should be rejected"
            );
        }
    }
}
