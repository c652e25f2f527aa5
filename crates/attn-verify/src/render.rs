//! Rendering verdicts, the one rendering both tools print: as text (the table of
//! `gguf-reader --verify-attention`, the verdict lines of `kqv-trace-monitor --verify`)
//! and as JSON (docs/json.md).

use serde_json::{json, Value};
use tensor_stats::sci;
use trace_format::escape;
use trace_format::json::number as num;

use crate::check::Checked;
use crate::group::Missing;

/// Column titles of the verification table (`gguf-reader --verify-attention`,
/// `kqv-trace-monitor --verify`).
pub fn table_header() -> String {
    format!(
        "{:>5} {:>5}  {:<15} {:>13} {:>13}  {:<16} {:>9}  {:>9}  {:>9}  {:<12} verdict",
        "step",
        "layer",
        "op",
        "nmse",
        "max_abs",
        "at (pos,head,d)",
        "cosine",
        "bound",
        "exact",
        "kernel"
    )
}

/// One table row: metrics and verdict (`ok` or `FAIL`).
pub fn table_row(c: &Checked) -> String {
    let v = &c.verification;
    let at = match v.worst_position {
        Some(p) => format!("({p},{},{})", v.worst.1, v.worst.2),
        None => format!("(t{},{},{})", v.worst.0, v.worst.1, v.worst.2),
    };
    format!(
        "{:>5} {:>5}  {:<15} {:>13} {:>13}  {:<16} {:>9.6}  {:>9.0e}  {:>9}  {:<12} {}",
        v.step,
        v.layer,
        escape(&c.op),
        sci(v.nmse),
        sci(v.max_abs),
        at,
        v.cosine,
        c.bound,
        exact_cell(c),
        kernel_cell(c),
        if c.pass { "ok" } else { "FAIL" }
    )
}

/// The `exact` column: NMSE against the exact f64 attention (the kernel's own error), `-`
/// when the verdict's reference is the exact one.
fn exact_cell(c: &Checked) -> String {
    c.exact_nmse
        .map_or_else(|| "-".to_owned(), |x| format!("{x:.1e}"))
}

/// The `kernel` column: the ggml path modelled, `exact` when none could be named.
fn kernel_cell(c: &Checked) -> String {
    c.kernel
        .as_ref()
        .map_or_else(|_| "exact".to_owned(), |p| p.short())
}

/// Why a group's reference is the exact one (no ggml path could be named), for a note
/// under the table; `None` when its kernel was modelled.
pub fn kernel_unknown(c: &Checked) -> Option<&str> {
    c.kernel.as_ref().err().map(String::as_str)
}

/// A verdict as one self-describing line (`kqv-trace-monitor --verify`, among the
/// statistics lines).
pub fn verdict_line(c: &Checked) -> String {
    let v = &c.verification;
    let at = match v.worst_position {
        Some(p) => format!("pos {p}"),
        None => format!("token {}", v.worst.0),
    };
    format!(
        "verify step {} layer {}  {}  nmse {}  max_abs {} at ({at}, head {}, dim {})  cosine {:.6}  bound {:.0e}  exact {}  kernel {}  {}",
        v.step,
        v.layer,
        escape(&c.op),
        sci(v.nmse),
        sci(v.max_abs),
        v.worst.1,
        v.worst.2,
        v.cosine,
        c.bound,
        exact_cell(c),
        kernel_cell(c),
        if c.pass { "ok" } else { "FAIL" }
    )
}

/// The diagnosis lines printed under a failed row (none for a passing one).
pub fn diagnosis_lines(c: &Checked) -> Vec<String> {
    if c.pass {
        return Vec::new();
    }
    let mut lines: Vec<String> = if c.findings.is_empty() {
        let why = if c.rounding_sized {
            "the error is of the size ggml's rounding reaches: rounding beyond the kernel model, or a small kernel bug"
        } else {
            "a kernel bug, or more than one input wrong"
        };
        vec![format!(
            "      no single-input repair explains it: heads {:?} and tokens {:?} exceed the bound ({why})",
            c.bad_heads, c.bad_tokens
        )]
    } else {
        c.findings
            .iter()
            .map(|f| format!("      suspect {}", escape(&f.to_string())))
            .collect()
    };
    lines.extend(c.notes.iter().map(|n| format!("      note: {}", escape(n))));
    lines
}

/// The row of a group that could not be checked.
pub fn missing_row(step: u32, layer: i32, m: &Missing) -> String {
    format!("{step:>5} {layer:>5}  missing: {m}")
}

/// The row of a group that is malformed (the trace's validation found problems in it,
/// or its inputs do not fit together) or was refused (over the work budget): `reason`
/// as one line, escaped.
pub fn malformed_row(step: u32, layer: i32, reason: &str) -> String {
    format!("{step:>5} {layer:>5}  malformed: {}", escape(reason))
}

/// The closing line.
pub fn summary_line(verified: usize, failed: usize, missing: usize) -> String {
    summary_line_with(verified, failed, missing, 0)
}

/// The closing line, with the malformed (or refused) groups when there are any.
pub fn summary_line_with(
    verified: usize,
    failed: usize,
    missing: usize,
    malformed: usize,
) -> String {
    let total = verified + failed + missing + malformed;
    let tail = if malformed > 0 {
        format!(", {malformed} malformed")
    } else {
        String::new()
    };
    format!(
        "verified {verified} of {total} (step, layer) groups: {failed} failed, {missing} missing inputs{tail}"
    )
}

/// The JSON key that holds a verdict (`ok`, `FAIL`, `missing`): `"verdict"` in the
/// document of `gguf-reader --verify-attention --json`, `"verify"` in the JSON lines of
/// `kqv-trace-monitor --verify --json` (where it also tells a verdict from a statistics
/// line). Everything else in the objects is the same (docs/json.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VerdictKey {
    /// `"verdict"` (gguf-reader).
    Verdict,
    /// `"verify"` (kqv-trace-monitor).
    Verify,
}

impl VerdictKey {
    pub fn as_str(self) -> &'static str {
        match self {
            VerdictKey::Verdict => "verdict",
            VerdictKey::Verify => "verify",
        }
    }
}

/// The JSON object of a checked group (schema in docs/json.md), its verdict under `key`.
pub fn checked_json(c: &Checked, key: VerdictKey) -> Value {
    let v = &c.verification;
    let findings: Vec<Value> = c
        .findings
        .iter()
        .map(|f| {
            json!({"input": f.suspect.to_string(), "tensor": f.tensor, "finding": f.what,
                   "nmse_after": f.nmse_after.map(num)})
        })
        .collect();
    let mut o = json!({
        "step": v.step, "layer": v.layer, "op": c.op, "nmse": num(v.nmse),
        "max_abs": num(v.max_abs),
        "worst": {"token": v.worst.0, "position": v.worst_position, "head": v.worst.1, "dim": v.worst.2},
        "cosine": num(v.cosine), "bound": c.bound,
        "exact_nmse": c.exact_nmse.map(num),
        "kernel": match &c.kernel {
            Ok(p) => json!({"path": p.short(), "model": p.to_string()}),
            Err(why) => json!({"path": null, "unknown": why}),
        },
        "diagnosis": findings, "bad_heads": c.bad_heads, "bad_tokens": c.bad_tokens,
        "rounding_sized": c.rounding_sized,
        "notes": c.notes,
    });
    o[key.as_str()] = json!(if c.pass { "ok" } else { "FAIL" });
    o
}

/// The JSON object of a malformed (or refused) group: its verdict `malformed` under `key`,
/// and why.
pub fn malformed_json(step: u32, layer: i32, reason: &str, key: VerdictKey) -> Value {
    let mut o = json!({"step": step, "layer": layer, "malformed": reason});
    o[key.as_str()] = json!("malformed");
    o
}

/// The JSON object of a group that could not be checked: its verdict `missing` under
/// `key`, and what it lacks.
pub fn missing_json(step: u32, layer: i32, m: &Missing, key: VerdictKey) -> Value {
    let mut o = json!({"step": step, "layer": layer, "missing": m.0});
    o[key.as_str()] = json!("missing");
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::Verification;
    use crate::diagnose::{Finding, Suspect};
    use trace_format::Role;

    fn checked(pass: bool) -> Checked {
        Checked {
            verification: Verification {
                step: 3,
                layer: 1,
                nmse: if pass { 1e-9 } else { f64::NAN },
                max_abs: 0.5,
                worst: (2, 1, 7),
                cosine: 0.25,
                n_elements: 64,
                worst_position: Some(9),
            },
            op: "FLASH_ATTN_EXT".into(),
            bound: 4e-6,
            pass,
            findings: if pass {
                Vec::new()
            } else {
                vec![Finding {
                    suspect: Suspect::Tensor(Role::K),
                    tensor: "k-1".into(),
                    what: "w".into(),
                    nmse_after: Some(1e-10),
                }]
            },
            bad_heads: if pass { Vec::new() } else { vec![1] },
            bad_tokens: if pass { Vec::new() } else { vec![0, 2] },
            notes: Vec::new(),
            kernel: Err("not recorded".into()),
            exact_nmse: None,
            rounding_sized: false,
        }
    }

    fn keys(v: &Value) -> Vec<&str> {
        let mut k: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        k.sort_unstable();
        k
    }

    #[test]
    fn the_two_tools_json_differs_only_in_the_verdict_key() {
        for pass in [true, false] {
            let c = checked(pass);
            let reader = checked_json(&c, VerdictKey::Verdict);
            let monitor = checked_json(&c, VerdictKey::Verify);
            let verdict = if pass { "ok" } else { "FAIL" };
            assert_eq!(reader["verdict"], verdict);
            assert_eq!(monitor["verify"], verdict);
            assert!(reader.get("verify").is_none() && monitor.get("verdict").is_none());
            let mut same = monitor.clone();
            let moved = same.as_object_mut().unwrap().remove("verify").unwrap();
            same["verdict"] = moved;
            assert_eq!(same, reader);
            assert_eq!(
                keys(&reader),
                [
                    "bad_heads",
                    "bad_tokens",
                    "bound",
                    "cosine",
                    "diagnosis",
                    "exact_nmse",
                    "kernel",
                    "layer",
                    "max_abs",
                    "nmse",
                    "notes",
                    "op",
                    "rounding_sized",
                    "step",
                    "verdict",
                    "worst"
                ]
            );
        }
        let fail = checked_json(&checked(false), VerdictKey::Verdict);
        assert_eq!(fail["nmse"], "nan");
        assert_eq!(fail["diagnosis"][0]["input"], "k");
        assert_eq!(fail["worst"]["position"], 9);
    }

    #[test]
    fn strings_from_the_file_reach_the_terminal_escaped_on_one_line() {
        let mut c = checked(false);
        c.op = "FLASH\n\u{1b}[31m".into();
        c.findings[0].tensor = "k\nx".into();
        c.notes.push("n\u{7}".into());
        let mut lines = vec![table_row(&c), verdict_line(&c)];
        lines.extend(diagnosis_lines(&c));
        lines.push(malformed_row(1, 2, "tensor a\nb: bad"));
        for l in &lines {
            assert!(!l.contains(['\n', '\u{1b}', '\u{7}']), "{l:?}");
        }
        assert!(lines[0].contains("FLASH\\n\\u{1b}[31m"), "{}", lines[0]);
        assert!(lines.iter().any(|l| l.contains("note: n\\u{7}")));
        assert_eq!(
            summary_line_with(1, 2, 0, 3),
            "verified 1 of 6 (step, layer) groups: 2 failed, 0 missing inputs, 3 malformed"
        );
        assert_eq!(summary_line(1, 2, 3), summary_line_with(1, 2, 3, 0));
        let j = malformed_json(1, 2, "why", VerdictKey::Verdict);
        assert_eq!(
            j,
            json!({"step": 1, "layer": 2, "verdict": "malformed", "malformed": "why"})
        );
    }

    #[test]
    fn a_missing_group_says_missing_under_the_tools_key() {
        let m = Missing(vec!["q", "attention op parameters"]);
        let reader = missing_json(2, 0, &m, VerdictKey::Verdict);
        let monitor = missing_json(2, 0, &m, VerdictKey::Verify);
        assert_eq!(
            reader,
            json!({"step": 2, "layer": 0, "verdict": "missing", "missing": ["q", "attention op parameters"]})
        );
        assert_eq!(
            monitor,
            json!({"step": 2, "layer": 0, "verify": "missing", "missing": ["q", "attention op parameters"]})
        );
    }
}
