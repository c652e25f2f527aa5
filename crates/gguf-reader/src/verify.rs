//! `--verify-attention` and `--shapes` for kv-cache-monitor traces.
//!
//! `--verify-attention` recomputes every traced attention from its traced inputs and
//! compares it with its traced `kqv_out` (the attn-verify crate, which also diagnoses a
//! failure: which input, which mistake). `--shapes` shows what was captured for each
//! (step, layer): per tensor its role, type, `ne`, the strides it had in ggml (`nb`) and
//! the memory order those strides give.

use std::io::{self, Write};

use attn_verify::render::{self, VerdictKey};
use attn_verify::{check_in_trace_with, Limits, Outcome};
use serde_json::{json, Value};
use trace_format::{escape, TraceFile, TracedTensor};

/// What checking a group gave.
// One per report row, moved once: the size difference of the variants costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum GroupResult {
    /// Checked or missing inputs.
    Outcome(Outcome),
    /// The group cannot be checked: the trace's validation found problems in it, its
    /// inputs do not fit together, or it is over the work budget (one line, why).
    Malformed(String),
}

/// One (step, layer) of the report.
pub struct Row<'a> {
    pub step: u32,
    pub layer: i32,
    /// `None` with `--shapes` alone.
    pub result: Option<GroupResult>,
    /// The group's tensors, in file order (for `--shapes`).
    pub tensors: Vec<&'a TracedTensor>,
    /// The trace's validation problems of this group (shown with `--shapes` too).
    pub problems: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("nothing to show: the trace has no (step, layer) group{0}")]
    Empty(String),
}

/// The groups that pass the filters, checked when `verify` (each group on its own: one
/// that cannot be checked is a malformed row, the others are still checked).
pub fn run<'a>(
    trace: &'a TraceFile,
    step: Option<u32>,
    layer: Option<i32>,
    verify: bool,
    limits: &Limits,
) -> Result<Vec<Row<'a>>, VerifyError> {
    let mut rows = Vec::new();
    let mut last_step = None;
    for ((s, l), tensors) in trace.groups() {
        if step.is_some_and(|x| x != s) || layer.is_some_and(|x| x != l) {
            continue;
        }
        // A new step: the pages read for the last one leave the resident set, so the
        // peak RSS is about one step's data, not the file (the rebuilt views are kept
        // per (layer, role) by the trace's own cache).
        if verify && last_step.replace(s) != Some(s) {
            trace.gguf().release_pages();
        }
        let result = verify.then(|| match check_in_trace_with(trace, s, l, limits) {
            Ok(o) => GroupResult::Outcome(o),
            Err(e) => {
                let mut why = e.line();
                if matches!(e, attn_verify::VerifyError::Budget { .. }) {
                    why.push_str(" (raise it with --max-work N)");
                }
                GroupResult::Malformed(why)
            }
        });
        let problems = trace
            .group_problems(s, l)
            .iter()
            .map(|p| escape(&p.to_string()).into_owned())
            .collect();
        rows.push(Row {
            step: s,
            layer: l,
            result,
            tensors,
            problems,
        });
    }
    if rows.is_empty() {
        let filter = match (step, layer) {
            (None, None) => String::new(),
            _ => format!(
                " matching{}{}",
                step.map(|s| format!(" --step {s}")).unwrap_or_default(),
                layer.map(|l| format!(" --layer {l}")).unwrap_or_default()
            ),
        };
        return Err(VerifyError::Empty(filter));
    }
    Ok(rows)
}

/// Counts of a verification.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub verified: usize,
    pub failed: usize,
    pub missing: usize,
    /// Malformed or refused groups.
    pub malformed: usize,
}

fn dims(x: &[u64; 4]) -> String {
    let d: Vec<String> = x.iter().map(u64::to_string).collect();
    format!("[{}]", d.join(","))
}

fn layout_word(t: &TracedTensor) -> &'static str {
    let l = &t.meta.layout;
    if l.is_contiguous() {
        "contiguous"
    } else if l.is_permuted() {
        "permuted"
    } else {
        "strided"
    }
}

fn shape_json(t: &TracedTensor) -> Value {
    let l = &t.meta.layout;
    json!({
        "role": t.meta.role.name(), "name": t.name, "ggml_name": t.meta.ggml_name,
        "op": t.meta.op, "type": l.ty.name(), "ne": l.ne, "nb": l.nb,
        "memory_order": l.memory_order(), "layout": layout_word(t), "view_of": t.meta.view_of,
    })
}

fn shapes_header(out: &mut impl Write) -> io::Result<()> {
    writeln!(
        out,
        "      {:<17} {:<6} {:<22} {:<30} {:<10} {:<11} ggml name",
        "role", "type", "ne", "nb", "mem order", "layout"
    )
}

fn shape_line(t: &TracedTensor, out: &mut impl Write) -> io::Result<()> {
    let l = &t.meta.layout;
    let order: Vec<String> = l.memory_order().iter().map(usize::to_string).collect();
    writeln!(
        out,
        "      {:<17} {:<6} {:<22} {:<30} {:<10} {:<11} {}",
        t.meta.role.name(),
        l.ty.name(),
        dims(&l.ne),
        dims(&l.nb),
        format!("[{}]", order.join(",")),
        layout_word(t),
        escape(&t.meta.ggml_name)
    )
}

/// Print the table (or JSON); returns the counts (all zero with `--shapes` alone).
pub fn render(
    rows: &[Row<'_>],
    json_out: bool,
    shapes: bool,
    out: &mut impl Write,
) -> io::Result<Counts> {
    let mut n = Counts::default();
    let verifying = rows.iter().any(|r| r.result.is_some());
    let mut items = Vec::new();
    if !json_out {
        if verifying {
            writeln!(out, "{}", render::table_header())?;
        }
        if shapes {
            shapes_header(out)?;
        }
    }
    for r in rows {
        let mut item = match &r.result {
            Some(GroupResult::Malformed(why)) => {
                n.malformed += 1;
                if !json_out {
                    writeln!(out, "{}", render::malformed_row(r.step, r.layer, why))?;
                }
                render::malformed_json(r.step, r.layer, why, VerdictKey::Verdict)
            }
            Some(GroupResult::Outcome(Outcome::Checked(c))) => {
                if c.pass {
                    n.verified += 1;
                } else {
                    n.failed += 1;
                }
                if !json_out {
                    writeln!(out, "{}", render::table_row(c))?;
                    for line in render::diagnosis_lines(c) {
                        writeln!(out, "{line}")?;
                    }
                }
                render::checked_json(c, VerdictKey::Verdict)
            }
            Some(GroupResult::Outcome(Outcome::Missing(m))) => {
                n.missing += 1;
                if !json_out {
                    writeln!(out, "{}", render::missing_row(r.step, r.layer, m))?;
                }
                render::missing_json(r.step, r.layer, m, VerdictKey::Verdict)
            }
            None => {
                if !json_out {
                    writeln!(out, "{:>5} {:>5}", r.step, r.layer)?;
                    for p in &r.problems {
                        writeln!(out, "      malformed: {p}")?;
                    }
                }
                if r.problems.is_empty() {
                    json!({"step": r.step, "layer": r.layer})
                } else {
                    json!({"step": r.step, "layer": r.layer, "problems": r.problems})
                }
            }
        };
        if shapes {
            if json_out {
                item["inputs"] = r.tensors.iter().map(|t| shape_json(t)).collect();
            } else {
                for t in &r.tensors {
                    shape_line(t, out)?;
                }
            }
        }
        items.push(item);
    }
    if json_out {
        let doc = if verifying {
            json!({"schema": "gguf-reader-verify/1", "verified": n.verified, "failed": n.failed,
                   "missing": n.missing, "malformed": n.malformed, "groups": items})
        } else {
            json!({"schema": "gguf-reader-shapes/1", "groups": items})
        };
        writeln!(out, "{doc}")?;
    } else if verifying {
        writeln!(
            out,
            "{}",
            render::summary_line_with(n.verified, n.failed, n.missing, n.malformed)
        )?;
    }
    Ok(n)
}
