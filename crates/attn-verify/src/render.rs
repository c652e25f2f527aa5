//! Rendering verdicts as text: the table of `gguf-reader --verify-attention` and the
//! verdict lines of `kqv-trace-monitor --verify`.

use tensor_stats::sci;

use crate::check::Checked;
use crate::group::Missing;

/// Column titles of the verification table (`gguf-reader --verify-attention`,
/// `kqv-trace-monitor --verify`).
pub fn table_header() -> String {
    format!(
        "{:>5} {:>5}  {:<15} {:>13} {:>13}  {:<16} {:>9}  {:>9}  verdict",
        "step", "layer", "op", "nmse", "max_abs", "at (pos,head,d)", "cosine", "bound"
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
        "{:>5} {:>5}  {:<15} {:>13} {:>13}  {:<16} {:>9.6}  {:>9.0e}  {}",
        v.step,
        v.layer,
        c.op,
        sci(v.nmse),
        sci(v.max_abs),
        at,
        v.cosine,
        c.bound,
        if c.pass { "ok" } else { "FAIL" }
    )
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
        "verify step {} layer {}  {}  nmse {}  max_abs {} at ({at}, head {}, dim {})  cosine {:.6}  bound {:.0e}  {}",
        v.step,
        v.layer,
        c.op,
        sci(v.nmse),
        sci(v.max_abs),
        v.worst.1,
        v.worst.2,
        v.cosine,
        c.bound,
        if c.pass { "ok" } else { "FAIL" }
    )
}

/// The diagnosis lines printed under a failed row (none for a passing one).
pub fn diagnosis_lines(c: &Checked) -> Vec<String> {
    if c.pass {
        return Vec::new();
    }
    if c.findings.is_empty() {
        return vec![format!(
            "      no single-input repair explains it: heads {:?} and tokens {:?} exceed the bound (a kernel bug, or more than one input wrong)",
            c.bad_heads, c.bad_tokens
        )];
    }
    c.findings
        .iter()
        .map(|f| format!("      suspect {f}"))
        .collect()
}

/// The row of a group that could not be checked.
pub fn missing_row(step: u32, layer: i32, m: &Missing) -> String {
    format!("{step:>5} {layer:>5}  missing: {m}")
}

/// The closing line.
pub fn summary_line(verified: usize, failed: usize, missing: usize) -> String {
    format!(
        "verified {verified} of {} (step, layer) groups: {failed} failed, {missing} missing inputs",
        verified + failed + missing
    )
}
