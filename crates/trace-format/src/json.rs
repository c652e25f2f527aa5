//! JSON output shared by the tools' `--json` modes (docs/json.md).

use serde_json::{json, Value};

/// A number JSON can hold, or the strings "nan", "inf", "-inf" (JSON has no NaN or
/// infinity).
pub fn number(x: f64) -> Value {
    if x.is_finite() {
        json!(x)
    } else if x.is_nan() {
        json!("nan")
    } else if x > 0.0 {
        json!("inf")
    } else {
        json!("-inf")
    }
}

#[cfg(test)]
mod tests {
    use super::number;

    #[test]
    fn non_finite_values_become_strings() {
        assert_eq!(number(1.5), serde_json::json!(1.5));
        assert_eq!(number(-0.0), serde_json::json!(-0.0));
        assert_eq!(number(f64::NAN), "nan");
        assert_eq!(number(f64::INFINITY), "inf");
        assert_eq!(number(f64::NEG_INFINITY), "-inf");
    }
}
