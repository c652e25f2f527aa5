//! Checking a group: recompute it, compare with its `kqv_out`, judge against the bound,
//! diagnose a failure. Groups of the mixed KV cache's node go to the child module
//! [`mixed`].

mod intermediate;
pub mod mixed;
pub mod mla;

use gguf_io::GgmlType;
use tensor_stats::Dense;
use trace_format::meta::Role;
use trace_format::TraceFile;

use crate::bounds::{attended_cells, compare, exceeds, faithful_bound, nmse_bound, slice_nmse};
use crate::diagnose::{diagnose, Finding};
use crate::group::{trace_fingerprints, Fingerprints, Group, Missing};
use crate::kernel::KernelPath;
use crate::recompute::{build_inputs, Budget};
use crate::VerifyError;

/// The default work budget of one group's recomputation, in multiply-adds (heads x
/// tokens x cells x (D_k + D_v), counted twice when the kernel is modelled: the faithful
/// and the exact reference): 2^33, about 8 s. An honest gemma-3-270m ubatch of 512
/// tokens over 1792 cells takes 2 x 1.9e9.
pub const DEFAULT_MAX_WORK: u64 = 1 << 33;
/// The diagnosis of a failed group may spend this many times the group's budget (it
/// recomputes the group once per try: about 80 plus one per query head).
pub const DIAGNOSIS_WORK_FACTOR: u64 = 128;
/// The q-head permutation search holds a heads x heads matrix: groups with more query
/// heads skip it.
pub const MAX_DIAGNOSIS_HEADS: usize = 1024;

/// Resource limits of a verification (docs/verification.md, "Limits").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// A group whose recomputation exceeds this many multiply-adds is refused
    /// ([`VerifyError::Budget`]).
    pub max_work: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_work: DEFAULT_MAX_WORK,
        }
    }
}

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
    /// What the verification could not do (a diagnosis cut short by its work budget).
    pub notes: Vec<String>,
    /// The ggml path whose precision the verdict's reference modelled, or why none could
    /// be named (the reference is then the exact f64 one, with the older bound).
    pub kernel: Result<KernelPath, String>,
    /// NMSE of `kqv_out` against the exact f64 attention of the traced inputs: the
    /// kernel's own numerical error (`None` when the verdict's reference is the exact one).
    pub exact_nmse: Option<f64>,
    /// A failed group whose distance to the faithful reference is within what ggml's
    /// rounding reaches against the exact one ([`nmse_bound`]): when no input explains
    /// it, the report says "rounding beyond the kernel model" rather than naming one.
    pub rounding_sized: bool,
}

/// Recompute the attention of a group and compare it with its `kqv_out`; diagnose a
/// failure. `previous` is the previous step's fingerprints of the same layer (for the
/// stale-buffer check), with that step's number.
pub fn check(g: &Group, previous: Option<(u32, &Fingerprints)>) -> Result<Outcome, VerifyError> {
    check_with(g, previous, &Limits::default())
}

/// [`check`] within `limits`: a group whose recomputation exceeds the work budget is
/// refused before any of it is done; the diagnosis of a failed group stops at
/// [`DIAGNOSIS_WORK_FACTOR`] times the budget (a note says so).
pub fn check_with(
    g: &Group,
    previous: Option<(u32, &Fingerprints)>,
    limits: &Limits,
) -> Result<Outcome, VerifyError> {
    g.check_sizes()?;
    let budget = Budget::new(g.step, g.layer, limits.max_work);
    // The mixed KV cache's node has six inputs (cold store included): see check/mixed.rs.
    if mixed::is_mixed(g) {
        return mixed::check_mixed_within(g, &budget);
    }
    // Absorbed MLA: the latent attention, then its projection by v_mla (check/mla.rs).
    if mla::is_mla(g) {
        return mla::check_mla(g, previous, limits);
    }
    let Some((mut inp, actual)) = build_inputs(g, budget.clone())? else {
        return Ok(Outcome::Missing(g.missing()));
    };
    output_fits(g, inp.q.ne, inp.v.ne, actual.len())?;
    let v_type = g.get(Role::V).map_or(GgmlType::F32, |v| v.layout.ty);
    // The F16 dot product's order is modelled on AVX2 builds (K F16).
    let dot_modelled = inp.k_type == GgmlType::F16
        && crate::kernel::DotOrder::of(&inp.simd) == crate::kernel::DotOrder::Avx2;
    // A group that ran on an RPC server: if it matches this build's CPU kernel within
    // that model's bound, the server computed it with that kernel (kcm-rpc-server serves
    // this build's CPU backend) and the group is judged as a CPU group; otherwise (a
    // server of another kind) against the exact reference, as any unnamed path.
    let mut modelled_reference = None;
    if let (Err(why), Some(path)) = (inp.kernel.clone(), inp.rpc_cpu) {
        inp.kernel = Ok(path);
        let r = inp.reference()?;
        let nmse = compare(&r, &actual, 0..r.ne[2]).nmse;
        if nmse <= faithful_bound(path, v_type, dot_modelled) {
            modelled_reference = Some(r);
        } else {
            inp.kernel = Err(format!(
                "{why}; nor does it match this build's CPU {} kernel (NMSE {nmse:.1e} \
                 against its model)",
                path.short()
            ));
        }
    }
    if inp.kernel.is_ok() {
        // The exact reference beside the faithful one: two recomputations.
        budget.spend(inp.work())?;
    }
    let reference = match modelled_reference {
        Some(r) => r,
        None => inp.reference()?,
    };
    let n_cells = attended_cells(inp.mask.as_ref(), inp.k.ne[1], inp.q.ne[1]);
    let rounding_range = nmse_bound(v_type, inp.flash, n_cells);
    let bound = match &inp.kernel {
        Ok(path) => faithful_bound(*path, v_type, dot_modelled),
        Err(_) => rounding_range,
    };
    // Unfused: a group over the bound gets the rounding ambiguity of its own
    // probabilities as an allowance (kernel::unfused_tip_energy), computed only then.
    let bound = if inp.kernel == Ok(KernelPath::Unfused)
        && compare(&reference, &actual, 0..reference.ne[2]).nmse > bound
    {
        bound + inp.tip_allowance(&reference)?
    } else {
        bound
    };
    let op = g.op.clone().unwrap_or_default();
    let mut checked = judge(g, op, &reference, &actual, bound)?;
    checked.kernel = inp.kernel.clone();
    checked.rounding_sized =
        inp.kernel.is_ok() && !checked.pass && checked.verification.nmse <= rounding_range;
    if inp.kernel.is_ok() {
        let exact = inp.exact()?;
        checked.exact_nmse = Some(compare(&exact, &actual, 0..exact.ne[2]).nmse);
    }
    if !checked.pass {
        budget.refill(u128::from(limits.max_work) * u128::from(DIAGNOSIS_WORK_FACTOR));
        let (findings, notes) = diagnose(g, &inp, &reference, &actual, bound, previous)?;
        checked.findings = findings;
        checked.notes = notes;
    }
    let wrong = intermediate::check(g, &inp, &actual)?;
    if !wrong.is_empty() {
        checked.pass = false;
        checked.findings.extend(wrong);
    }
    Ok(Outcome::Checked(checked))
}

/// The reference's output ([D_v, H, T, S]) must have as many values as the traced
/// `kqv_out`: checked before it is allocated, so its size is bounded by bytes the trace
/// holds.
pub(crate) fn output_fits(
    g: &Group,
    q: [usize; 4],
    v: [usize; 4],
    actual: usize,
) -> Result<(), VerifyError> {
    let [_, nt, nh, ns] = q.map(|x| x as u128);
    let want = v[0] as u128 * nh * nt * ns;
    if want != actual as u128 {
        return Err(VerifyError::Malformed(format!(
            "step {} layer {}: kqv_out has {actual} values, attention of the traced inputs {want}",
            g.step, g.layer
        )));
    }
    Ok(())
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
        notes: Vec::new(),
        kernel: Err(String::new()),
        exact_nmse: None,
        rounding_sized: false,
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
    check_in_trace_with(trace, step, layer, &Limits::default())
}

/// [`check_in_trace`] within `limits`. A group the trace's validation found problems in
/// is not recomputed: [`VerifyError::Invalid`].
pub fn check_in_trace_with(
    trace: &TraceFile,
    step: u32,
    layer: i32,
    limits: &Limits,
) -> Result<Outcome, VerifyError> {
    if let [first, rest @ ..] = trace.group_problems(step, layer) {
        return Err(VerifyError::Invalid {
            first: first.clone(),
            more: rest.len(),
        });
    }
    let g = Group::from_trace(trace, step, layer)?;
    let prev = step
        .checked_sub(1)
        .map(|p| (p, trace_fingerprints(trace, p, layer)));
    let mut outcome = check_with(&g, prev.as_ref().map(|(p, f)| (*p, f)), limits)?;
    if let Outcome::Checked(c) = &mut outcome {
        // Evidence, not a repair: only when no repair explained the failure.
        if !c.pass && c.findings.iter().all(|f| f.nmse_after.is_none()) {
            c.findings.extend(rewritten_cells(trace, &g)?);
        }
    }
    Ok(outcome)
}

/// Evidence from the previous step (saved traces only): K/V rows that changed since then
/// at cells this step did not write. A step writes one cell per token; in a cache that
/// does not wrap, cell = position, so a changed row at a cell that is none of the step's
/// positions, when more rows changed than the step has tokens (and most rows did not:
/// a view that persists across steps), is a cache row modified behind the kernel's back
/// (or traced wrong).
fn rewritten_cells(trace: &TraceFile, g: &Group) -> Result<Vec<Finding>, VerifyError> {
    let Some(prev_step) = g.step.checked_sub(1) else {
        return Ok(Vec::new());
    };
    let mut found = Vec::new();
    for role in [Role::K, Role::V] {
        let (Some(cur), Some(prev)) = (g.get(role), trace.find(role, g.layer, prev_step)) else {
            continue;
        };
        // Cells are ne[1], except the transposed V of the unfused path (ne[0]).
        let axis = usize::from(role != Role::V || g.flash());
        let (cn, pn) = (cur.layout.ne, prev.meta.layout.ne);
        let same_rest = (0..4).all(|i| i == axis || cn[i] == pn[i]);
        if !same_rest || cur.layout.ty != prev.meta.layout.ty {
            continue;
        }
        let pv = trace.f32(prev)?;
        let n = cn[axis].min(pn[axis]) as usize;
        let ne_c = cn.map(|x| x as usize);
        let ne_p = pn.map(|x| x as usize);
        let idx =
            |ne: [usize; 4], i: [usize; 4]| i[0] + ne[0] * (i[1] + ne[1] * (i[2] + ne[2] * i[3]));
        let mut changed = Vec::new();
        for cell in 0..n {
            let mut differs = false;
            'scan: for i3 in 0..ne_c[3] {
                for i2 in 0..ne_c[2] {
                    for other in 0..ne_c[1 - axis] {
                        let mut i = [0, 0, i2, i3];
                        i[axis] = cell;
                        i[1 - axis] = other;
                        let (a, b) = (cur.values.get(idx(ne_c, i)), pv.get(idx(ne_p, i)));
                        if a.map(|x| x.to_bits()) != b.map(|x| x.to_bits()) {
                            differs = true;
                            break 'scan;
                        }
                    }
                }
            }
            if differs {
                changed.push(cell);
            }
        }
        let written: Vec<usize> = g.positions.iter().map(|&p| p.max(0) as usize).collect();
        let extra: Vec<usize> = changed
            .iter()
            .copied()
            .filter(|c| !written.contains(c))
            .collect();
        // Only for a view that persists across steps (most rows unchanged): a cache
        // shifted, defragmented or not a cache at all changes most of its rows.
        if extra.is_empty() || changed.len() <= g.positions.len() || changed.len() * 2 > n {
            continue;
        }
        let shown: Vec<String> = extra.iter().take(8).map(usize::to_string).collect();
        found.push(Finding {
            suspect: crate::Suspect::Tensor(role),
            tensor: cur.name.clone(),
            what: format!(
                "cell{} {}{} changed since step {prev_step} although this step wrote only position(s) {:?}: a cache row modified behind the kernel's back, or traced wrong",
                if extra.len() > 1 { "s" } else { "" },
                shown.join(", "),
                if extra.len() > 8 { format!(" (and {} more)", extra.len() - 8) } else { String::new() },
                g.positions
            ),
            nmse_after: None,
        });
    }
    Ok(found)
}
