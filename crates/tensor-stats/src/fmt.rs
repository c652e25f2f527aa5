//! Number formatting shared by the tools' human-readable output.

use std::fmt;

/// `printf("%.6e")` style: `2.500000e+00`, as the seed tools print numbers.
pub fn sci(x: f64) -> String {
    Sci(x).to_string()
}

/// [`sci`] as a `Display` value: formats without allocating and honours width and
/// alignment (`{:>13}`), for output written line after line.
#[derive(Clone, Copy, Debug)]
pub struct Sci(pub f64);

/// A fixed buffer that `write!` can fill (Rust's `{:.6e}` of an f64 is at most 13
/// characters: sign, 8 digits and point, `e-308`).
struct Buf {
    bytes: [u8; 32],
    len: usize,
}

impl fmt::Write for Buf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        self.bytes
            .get_mut(self.len..end)
            .ok_or(fmt::Error)?
            .copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

impl fmt::Display for Sci {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let x = self.0;
        if !x.is_finite() {
            return f.pad(&x.to_string());
        }
        let mut raw = Buf {
            bytes: [0; 32],
            len: 0,
        };
        fmt::write(&mut raw, format_args!("{x:.6e}"))?;
        let s = std::str::from_utf8(&raw.bytes[..raw.len]).map_err(|_| fmt::Error)?;
        let Some((mantissa, exp)) = s.split_once('e') else {
            return f.pad(s);
        };
        let (sign, digits) = match exp.strip_prefix('-') {
            Some(d) => ('-', d),
            None => ('+', exp),
        };
        let mut out = Buf {
            bytes: [0; 32],
            len: 0,
        };
        fmt::write(&mut out, format_args!("{mantissa}e{sign}{digits:0>2}"))?;
        f.pad(std::str::from_utf8(&out.bytes[..out.len]).map_err(|_| fmt::Error)?)
    }
}

#[cfg(test)]
mod tests {
    use super::{sci, Sci};

    #[test]
    fn like_printf() {
        assert_eq!(sci(2.5), "2.500000e+00");
        assert_eq!(sci(-1.5e-7), "-1.500000e-07");
        assert_eq!(sci(1e300), "1.000000e+300");
        assert_eq!(sci(-2.2250738585072014e-308), "-2.225074e-308");
        assert_eq!(sci(f64::MIN_POSITIVE / 4.0), "5.562685e-309");
        assert_eq!(sci(0.0), "0.000000e+00");
        assert_eq!(sci(f64::NAN), "NaN");
        assert_eq!(sci(f64::NEG_INFINITY), "-inf");
    }

    /// Width and alignment apply to the whole number, as they did to the String.
    #[test]
    fn pads_like_a_string() {
        assert_eq!(
            format!("{:>15}", Sci(2.5)),
            format!("{:>15}", "2.500000e+00")
        );
        assert_eq!(format!("{:<15}|", Sci(-1e-7)), "-1.000000e-07  |");
        assert_eq!(format!("{:>6}", Sci(f64::INFINITY)), "   inf");
    }
}
