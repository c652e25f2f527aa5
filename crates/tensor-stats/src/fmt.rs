//! Number formatting shared by the tools' human-readable output.

/// `printf("%.6e")` style: `2.500000e+00`, as the seed tools print numbers.
pub fn sci(x: f64) -> String {
    if !x.is_finite() {
        return format!("{x}");
    }
    let s = format!("{x:.6e}");
    match s.split_once('e') {
        Some((mantissa, exp)) => {
            let (sign, digits) = match exp.strip_prefix('-') {
                Some(d) => ('-', d),
                None => ('+', exp),
            };
            format!("{mantissa}e{sign}{digits:0>2}")
        }
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::sci;

    #[test]
    fn like_printf() {
        assert_eq!(sci(2.5), "2.500000e+00");
        assert_eq!(sci(-1.5e-7), "-1.500000e-07");
        assert_eq!(sci(1e300), "1.000000e+300");
        assert_eq!(sci(0.0), "0.000000e+00");
        assert_eq!(sci(f64::NAN), "NaN");
        assert_eq!(sci(f64::NEG_INFINITY), "-inf");
    }
}
