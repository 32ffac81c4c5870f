//! Sample values as Prometheus reads them: Go's `strconv.ParseFloat` syntax, hex floats included.

/// Parses a value the way Go's `strconv.ParseFloat` does (`NaN`, `+Inf`, `1e3`, `0x1.8p3`...),
/// which is what Prometheus uses: out-of-range values are errors there, so they are here too.
pub(super) fn parse_float(s: &str) -> Option<f64> {
    let (negative, digits) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    if digits.starts_with(['n', 'N']) {
        // Go has no signed NaN.
        return (digits.len() == s.len() && digits.eq_ignore_ascii_case("nan")).then_some(f64::NAN);
    }
    if digits.starts_with(['i', 'I']) {
        let inf = digits.eq_ignore_ascii_case("inf") || digits.eq_ignore_ascii_case("infinity");
        return inf.then_some(if negative {
            f64::NEG_INFINITY
        } else {
            f64::INFINITY
        });
    }
    let magnitude = match digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        Some(hex) => parse_hex_float(hex)?,
        // Rust's decimal syntax matches Go's, except that Go also takes `_` after a base prefix.
        None if digits.starts_with(['+', '-']) => return None,
        None => digits.parse::<f64>().ok()?,
    };
    if magnitude.is_infinite() {
        return None; // Go: ErrRange
    }
    Some(if negative { -magnitude } else { magnitude })
}

/// The part of a Go hex float after `0x`: hex mantissa with optional point, mandatory `p` exponent.
fn parse_hex_float(s: &str) -> Option<f64> {
    let (mantissa, exponent) = s.split_once(['p', 'P'])?;
    let exponent = parse_exponent(exponent)?;
    let mut bits: u64 = 0;
    let mut scale: i64 = 0;
    let mut sticky = false;
    let mut seen_point = false;
    let mut seen_digit = false;
    for c in mantissa.chars() {
        if c == '.' && !seen_point {
            seen_point = true;
            continue;
        }
        let d = c.to_digit(16)?;
        seen_digit = true;
        if bits >> 60 == 0 {
            bits = bits * 16 + u64::from(d);
            if seen_point {
                scale -= 4;
            }
        } else {
            // Beyond 64 bits only "is anything left" matters for rounding.
            sticky |= d != 0;
            if !seen_point {
                scale += 4;
            }
        }
    }
    if !seen_digit {
        return None;
    }
    if sticky {
        bits |= 1;
    }
    Some(scale_by_power_of_two(bits as f64, exponent + scale))
}

/// A decimal exponent with optional sign; huge ones saturate (the result is 0 or out of range).
fn parse_exponent(s: &str) -> Option<i64> {
    let digits = s.strip_prefix(['+', '-']).unwrap_or(s);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(
        s.parse::<i64>()
            .unwrap_or(if s.starts_with('-') {
                -100_000
            } else {
                100_000
            })
            .clamp(-100_000, 100_000),
    )
}

/// `v * 2^e` in steps that keep each factor representable.
fn scale_by_power_of_two(mut v: f64, mut e: i64) -> f64 {
    while e > 1000 {
        v *= 2f64.powi(1000);
        e -= 1000;
    }
    while e < -1000 {
        v *= 2f64.powi(-1000);
        e += 1000;
    }
    v * 2f64.powi(e as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_float_edge_cases() {
        assert_eq!(
            parse_float("0x1.fffffffffffff8p0"),
            Some(2.0),
            "tie rounds to even"
        );
        assert_eq!(parse_float("0x1.fffffffffffff80001p0"), Some(2.0));
        assert_eq!(
            parse_float("0x1.fffffffffffff7p0"),
            Some(2.0 - f64::EPSILON)
        );
        assert_eq!(parse_float("0x1p-1074"), Some(5e-324));
        assert_eq!(parse_float("0x.8p1"), Some(1.0));
        assert_eq!(
            parse_float("0x1p99999999999999999999"),
            None,
            "out of range"
        );
        assert_eq!(parse_float("0x1p-99999999999999999999"), Some(0.0));
        assert_eq!(parse_float("NaN").map(f64::is_nan), Some(true));
        for bad in [
            "",
            "+",
            "-",
            "0x",
            "0x1p",
            "0x1.2.3p0",
            "1e",
            "1 ",
            " 1",
            "+nan",
            "0x1_0p0",
        ] {
            assert_eq!(parse_float(bad), None, "{bad:?}");
        }
    }
}
