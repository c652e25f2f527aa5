//! `--verify-attention`: recompute every traced attention of a kv-cache-monitor trace from
//! its traced inputs and compare with its traced `kqv_out` (trace_format::verify).

use std::io::{self, Write};

use serde_json::json;
use tensor_stats::sci;
use trace_format::verify::{verify_group, Verification};
use trace_format::{TraceError, TraceFile};

/// The documented NMSE bounds (docs/verification.md): ggml's CPU flash attention
/// accumulates softmax·V in F16 when V is F16, which alone reaches about 1e-6.
pub fn bound(v_type: gguf_io::GgmlType, flash: bool) -> f64 {
    if flash && v_type == gguf_io::GgmlType::F16 {
        2e-6
    } else {
        1e-6
    }
}

/// One row of the report.
pub struct Row {
    pub step: u32,
    pub layer: i32,
    pub op: String,
    pub bound: f64,
    pub result: Result<Verification, Vec<&'static str>>,
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{0}")]
    Trace(#[from] TraceError),
    #[error("nothing to verify: the trace has no (step, layer) group{0}")]
    Empty(String),
}

pub fn run(
    trace: &TraceFile,
    step: Option<u32>,
    layer: Option<i32>,
) -> Result<Vec<Row>, VerifyError> {
    let mut rows = Vec::new();
    for &(s, l) in trace.groups().keys() {
        if step.is_some_and(|x| x != s) || layer.is_some_and(|x| x != l) {
            continue;
        }
        let op = trace.attn(s, l).map(|a| a.op.clone()).unwrap_or_default();
        let v_type = trace
            .find(trace_format::Role::V, l, s)
            .map_or(gguf_io::GgmlType::F32, |t| t.meta.layout.ty);
        let result = verify_group(trace, s, l)?.map_err(|m| m.0);
        rows.push(Row {
            step: s,
            layer: l,
            bound: bound(v_type, op == "FLASH_ATTN_EXT"),
            op,
            result,
        });
    }
    if rows.is_empty() {
        let filter = match (step, layer) {
            (None, None) => String::new(),
            _ => format!(" matching --step {step:?} --layer {layer:?}"),
        };
        return Err(VerifyError::Empty(filter));
    }
    Ok(rows)
}

/// Print the table (or JSON); returns (verified, failed, missing) counts.
pub fn render(
    rows: &[Row],
    json_out: bool,
    out: &mut impl Write,
) -> io::Result<(usize, usize, usize)> {
    let (mut ok, mut failed, mut missing) = (0, 0, 0);
    let mut items = Vec::new();
    if !json_out {
        writeln!(
            out,
            "{:>5} {:>5}  {:<15} {:>13} {:>13}  {:<16} {:>9}  {:>9}  verdict",
            "step", "layer", "op", "nmse", "max_abs", "at (tok,head,d)", "cosine", "bound"
        )?;
    }
    for r in rows {
        match &r.result {
            Ok(v) => {
                let pass = v.nmse <= r.bound;
                if pass {
                    ok += 1;
                } else {
                    failed += 1;
                }
                let verdict = if pass { "ok" } else { "FAIL" };
                if json_out {
                    items.push(json!({
                        "step": r.step, "layer": r.layer, "op": r.op, "nmse": v.nmse,
                        "max_abs": v.max_abs, "worst": {"token": v.worst.0, "head": v.worst.1, "dim": v.worst.2},
                        "cosine": v.cosine, "bound": r.bound, "verdict": verdict,
                    }));
                } else {
                    writeln!(
                        out,
                        "{:>5} {:>5}  {:<15} {:>13} {:>13}  {:<16} {:>9.6}  {:>9.0e}  {verdict}",
                        r.step,
                        r.layer,
                        r.op,
                        sci(v.nmse),
                        sci(v.max_abs),
                        format!("({},{},{})", v.worst.0, v.worst.1, v.worst.2),
                        v.cosine,
                        r.bound
                    )?;
                }
            }
            Err(m) => {
                missing += 1;
                if json_out {
                    items.push(json!({"step": r.step, "layer": r.layer, "verdict": "missing", "missing": m}));
                } else {
                    writeln!(
                        out,
                        "{:>5} {:>5}  missing: {}",
                        r.step,
                        r.layer,
                        m.join(", ")
                    )?;
                }
            }
        }
    }
    if json_out {
        let doc = json!({"schema": "gguf-reader-verify/1", "verified": ok, "failed": failed, "missing": missing, "groups": items});
        writeln!(out, "{doc}")?;
    } else {
        writeln!(
            out,
            "verified {ok} of {} (step, layer) groups: {failed} failed, {missing} missing inputs",
            rows.len()
        )?;
    }
    Ok((ok, failed, missing))
}
