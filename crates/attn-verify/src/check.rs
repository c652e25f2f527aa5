//! Checking a group: recompute it, compare with its `kqv_out`, judge against the bound,
//! diagnose a failure. Groups of the mixed KV cache's node go to the child module
//! [`mixed`].

pub mod mixed;

use gguf_io::GgmlType;
use tensor_stats::Dense;
use trace_format::meta::Role;
use trace_format::TraceFile;

use crate::bounds::{attended_cells, compare, exceeds, nmse_bound, slice_nmse};
use crate::diagnose::{diagnose, Finding};
use crate::group::{trace_fingerprints, Fingerprints, Group, Missing};
use crate::recompute::build_inputs;
use crate::VerifyError;

/// The result of checking one (step, layer).
#[derive(Clone, Debug, PartialEq)]
pub struct Verification {
    pub step: u32,
    pub layer: i32,
    /// NMSE = mean squared error / variance of the reference.
    pub nmse: f64,
    pub max_abs: f64,
    /// Where `max_abs` happened: (token index in the step, head, dim).
    pub worst: (usize, usize, usize),
    pub cosine: f64,
    pub n_elements: usize,
    /// The sequence position of the worst token, when the step's positions are known.
    pub worst_position: Option<i32>,
}

/// What checking a group gives: its verdict ([`Checked`]; [`verify_group`] gives the
/// [`Verification`] alone), or what the group lacks for a recomputation.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome<T = Checked> {
    Checked(T),
    Missing(Missing),
}

impl<T> Outcome<T> {
    /// The verdict, or what is missing, as a `Result`.
    pub fn into_result(self) -> Result<T, Missing> {
        match self {
            Outcome::Checked(c) => Ok(c),
            Outcome::Missing(m) => Err(m),
        }
    }

    /// The verdict mapped by `f`; a missing group stays missing.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Outcome<U> {
        match self {
            Outcome::Checked(c) => Outcome::Checked(f(c)),
            Outcome::Missing(m) => Outcome::Missing(m),
        }
    }
}

/// A checked group: metrics, bound, verdict and, when it failed, the diagnosis.
#[derive(Clone, Debug, PartialEq)]
pub struct Checked {
    pub verification: Verification,
    /// `FLASH_ATTN_EXT`, `SOFT_MAX` or `MIXED_ATTN`.
    pub op: String,
    pub bound: f64,
    pub pass: bool,
    /// Failed groups only: the inputs whose repair explains the failure.
    pub findings: Vec<Finding>,
    /// Failed groups only: heads and tokens (indices in the step) whose own NMSE (their
    /// squared error over the group's reference variance) exceeds the bound.
    pub bad_heads: Vec<usize>,
    pub bad_tokens: Vec<usize>,
}

/// Recompute the attention of a group and compare it with its `kqv_out`; diagnose a
/// failure. `previous` is the previous step's fingerprints of the same layer (for the
/// stale-buffer check), with that step's number.
pub fn check(g: &Group, previous: Option<(u32, &Fingerprints)>) -> Result<Outcome, VerifyError> {
    // The mixed KV cache's node has six inputs (cold store included): see check/mixed.rs.
    if mixed::is_mixed(g) {
        return mixed::check_mixed(g);
    }
    let Some((inp, actual)) = build_inputs(g)? else {
        return Ok(Outcome::Missing(g.missing()));
    };
    let reference = inp.reference()?;
    let v_type = g.get(Role::V).map_or(GgmlType::F32, |v| v.layout.ty);
    let n_cells = attended_cells(inp.mask.as_ref(), inp.k.ne[1], inp.q.ne[1]);
    let bound = nmse_bound(v_type, inp.flash, n_cells);
    let op = g.op.clone().unwrap_or_default();
    let mut checked = judge(g, op, &reference, &actual, bound)?;
    if !checked.pass {
        checked.findings = diagnose(g, &inp, &reference, &actual, bound, previous)?;
    }
    Ok(Outcome::Checked(checked))
}

/// Compare a group's traced `kqv_out` (`actual`) with its recomputed `reference` over all
/// tokens and judge the result against `bound`: the metrics, the verdict and, for a failed
/// group, the heads and tokens whose own NMSE exceeds the bound. `op` is the op recorded
/// in the verdict. Findings are left empty (the caller's diagnosis fills them). Used by
/// [`check`] and by [`mixed::check_mixed`].
fn judge(
    g: &Group,
    op: String,
    reference: &Dense,
    actual: &[f32],
    bound: f64,
) -> Result<Checked, VerifyError> {
    let (step, layer) = (g.step, g.layer);
    if actual.len() != reference.data.len() {
        return Err(VerifyError::Malformed(format!(
            "step {step} layer {layer}: kqv_out has {} values, attention of the traced inputs {}",
            actual.len(),
            reference.data.len()
        )));
    }
    let m = compare(reference, actual, 0..reference.ne[2]);
    // NaN fails too.
    let pass = m.nmse <= bound;
    let verification = Verification {
        step,
        layer,
        nmse: m.nmse,
        max_abs: m.max_abs,
        worst: m.worst,
        cosine: m.cosine,
        n_elements: m.n,
        worst_position: g.positions.get(m.worst.0).copied(),
    };
    let mut checked = Checked {
        verification,
        op,
        bound,
        pass,
        findings: Vec::new(),
        bad_heads: Vec::new(),
        bad_tokens: Vec::new(),
    };
    if !pass {
        let (heads, tokens) = slice_nmse(reference, actual);
        checked.bad_heads = (0..heads.len())
            .filter(|&h| exceeds(heads[h], bound))
            .collect();
        checked.bad_tokens = (0..tokens.len())
            .filter(|&t| exceeds(tokens[t], bound))
            .collect();
    }
    Ok(checked)
}

/// Recompute the attention of (step, layer) and compare it with the traced `kqv_out`.
pub fn verify_group(
    trace: &TraceFile,
    step: u32,
    layer: i32,
) -> Result<Outcome<Verification>, VerifyError> {
    Ok(check_in_trace(trace, step, layer)?.map(|c| c.verification))
}

/// [`check`] for (step, layer) of a saved trace, with the previous step's fingerprints.
pub fn check_in_trace(trace: &TraceFile, step: u32, layer: i32) -> Result<Outcome, VerifyError> {
    let g = Group::from_trace(trace, step, layer)?;
    let prev = step
        .checked_sub(1)
        .map(|p| (p, trace_fingerprints(trace, p, layer)));
    check(&g, prev.as_ref().map(|(p, f)| (*p, f)))
}
