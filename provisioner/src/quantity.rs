//! Kubernetes resource quantities ("10Gi", "1.5G", "500M", "1e9") as whole bytes.
//!
//! Claims ask for storage as quantities and matching compares them, so parsing must be exact:
//! no floating point. A fractional byte count rounds up, as the API server's canonical form does
//! (a claim for "1.5" bytes needs 2).

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    #[error("{0:?} is not a quantity (expected e.g. 10Gi, 500M, 1e9)")]
    Malformed(String),
    #[error("{0:?} is negative")]
    Negative(String),
    #[error("{0:?} is too large")]
    TooLarge(String),
}

/// Bytes a quantity stands for, rounded up to a whole byte.
pub fn parse_bytes(q: &str) -> Result<u64, QuantityError> {
    let malformed = || QuantityError::Malformed(q.to_owned());
    let s = q.trim();
    let (negative, s) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let num_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(num_end);
    if number.is_empty() || number == "." || number.matches('.').count() > 1 {
        return Err(malformed());
    }
    let (int_part, frac_part) = number.split_once('.').unwrap_or((number, ""));

    // value = digits * 10^exp10 * 2^exp2, with digits the number without its decimal point.
    let mut exp10: i32 = -(frac_part.len() as i32);
    let mut exp2: u32 = 0;
    match suffix {
        "" => {}
        "Ki" => exp2 = 10,
        "Mi" => exp2 = 20,
        "Gi" => exp2 = 30,
        "Ti" => exp2 = 40,
        "Pi" => exp2 = 50,
        "Ei" => exp2 = 60,
        "n" => exp10 -= 9,
        "u" => exp10 -= 6,
        "m" => exp10 -= 3,
        "k" => exp10 += 3,
        "M" => exp10 += 6,
        "G" => exp10 += 9,
        "T" => exp10 += 12,
        "P" => exp10 += 15,
        "E" => exp10 += 18,
        s if s.starts_with(['e', 'E']) => {
            let e: i32 = s[1..].parse().map_err(|_| malformed())?;
            if !(-40..=40).contains(&e) {
                return Err(QuantityError::TooLarge(q.to_owned()));
            }
            exp10 += e;
        }
        _ => return Err(malformed()),
    }

    let too_large = || QuantityError::TooLarge(q.to_owned());
    let digits = format!("{int_part}{frac_part}");
    let digits = digits.trim_start_matches('0');
    if digits.is_empty() {
        return Ok(0);
    }
    if negative {
        return Err(QuantityError::Negative(q.to_owned()));
    }
    if digits.len() > 38 {
        return Err(too_large());
    }
    let mut value: u128 = digits.parse().map_err(|_| malformed())?;
    value = value
        .checked_shl(exp2)
        .filter(|v| v >> exp2 == value)
        .ok_or_else(too_large)?;
    if exp10 >= 0 {
        for _ in 0..exp10 {
            value = value.checked_mul(10).ok_or_else(too_large)?;
        }
    } else {
        let mut div: u128 = 1;
        for _ in 0..(-exp10) {
            div = match div.checked_mul(10) {
                Some(d) => d,
                // Dividing by more than u128::MAX leaves a fraction of a byte: one byte.
                None => return Ok(1),
            };
        }
        value = value.div_ceil(div);
    }
    u64::try_from(value).map_err(|_| too_large())
}

/// A byte count in the shortest exact binary-suffixed form ("10Gi", "1536Mi", "1000").
pub fn format_bytes(bytes: u64) -> String {
    const SUFFIXES: [(&str, u32); 6] = [
        ("Ei", 60),
        ("Pi", 50),
        ("Ti", 40),
        ("Gi", 30),
        ("Mi", 20),
        ("Ki", 10),
    ];
    if bytes == 0 {
        return "0".into();
    }
    for (suffix, shift) in SUFFIXES {
        let unit = 1u64 << shift;
        if bytes.is_multiple_of(unit) {
            return format!("{}{suffix}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// A quantity for display in messages.
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_bytes(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_the_forms_kubernetes_accepts() {
        let table: &[(&str, u64)] = &[
            ("0", 0),
            ("1", 1),
            ("1Ki", 1024),
            ("10Gi", 10 << 30),
            ("1.5Gi", 3 << 29),
            ("1536Mi", 1536 << 20),
            ("1k", 1000),
            ("1G", 1_000_000_000),
            ("500M", 500_000_000),
            ("1e9", 1_000_000_000),
            ("1E3", 1000),
            ("1.5", 2),
            ("100m", 1),
            ("1000m", 1),
            ("1001m", 2),
            (".5Ki", 512),
            ("5.", 5),
            ("+3", 3),
            ("-0", 0),
            ("8Ei", 8 << 60),
            ("0.000000001Gi", 2),
        ];
        for (q, want) in table {
            assert_eq!(parse_bytes(q), Ok(*want), "{q}");
        }
    }

    #[test]
    fn refuses_malformed_negative_and_huge() {
        for bad in [
            "", "Gi", "1 Gi", "1gi", "1..2", ".", "1Xi", "e3", "1e", "1e+", "--1",
        ] {
            assert!(
                matches!(parse_bytes(bad), Err(QuantityError::Malformed(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            parse_bytes("-1Gi"),
            Err(QuantityError::Negative(_))
        ));
        assert!(matches!(
            parse_bytes("16Ei"),
            Err(QuantityError::TooLarge(_))
        ));
        assert!(matches!(
            parse_bytes("1e40"),
            Err(QuantityError::TooLarge(_))
        ));
        assert!(matches!(
            parse_bytes("1e41"),
            Err(QuantityError::TooLarge(_))
        ));
    }

    #[test]
    fn formats_exactly() {
        assert_eq!(format_bytes(0), "0");
        assert_eq!(format_bytes(10 << 30), "10Gi");
        assert_eq!(format_bytes(1536 << 20), "1536Mi");
        assert_eq!(format_bytes(1000), "1000");
        assert_eq!(format_bytes(1 << 60), "1Ei");
    }

    proptest! {
        #[test]
        fn format_then_parse_round_trips(bytes in any::<u64>()) {
            prop_assert_eq!(parse_bytes(&format_bytes(bytes)), Ok(bytes));
        }

        #[test]
        fn decimal_and_binary_forms_agree(n in 0u64..(1 << 20), shift in prop::sample::select(vec![(0u32, ""), (10, "Ki"), (20, "Mi"), (30, "Gi"), (40, "Ti")])) {
            let (s, suffix) = shift;
            prop_assert_eq!(parse_bytes(&format!("{n}{suffix}")), Ok(n << s));
            prop_assert_eq!(parse_bytes(&format!("{}", n << s)), Ok(n << s));
        }

        #[test]
        fn never_panics(s in "\\PC{0,24}") {
            let _ = parse_bytes(&s);
        }

        #[test]
        fn fractions_round_up(whole in 0u64..1_000_000, milli in 1u64..1000) {
            // whole.milli bytes needs whole+1 bytes.
            prop_assert_eq!(parse_bytes(&format!("{whole}.{milli:03}")), Ok(whole + 1));
        }
    }
}
