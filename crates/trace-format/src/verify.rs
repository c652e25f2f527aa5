//! Recompute each traced attention from its traced inputs (in f64, with the layouts the
//! trace recorded, never guessed from names), compare with the traced output, and when
//! they disagree, find which input explains it.
//!
//! The unit is a [`Group`]: the q, k, v, mask, sinks and `kqv_out` of one (step, layer)
//! with the attention op's parameters, built from a saved trace ([`Group::from_trace`]) or
//! from live captures ([`Group::from_tensors`], what `kqv-trace-monitor --verify` uses).
//! [`check`] recomputes it and returns a [`Checked`]: the metrics, the documented bound
//! ([`nmse_bound`]) and, for a group that fails, a diagnosis.
//!
//! **Diagnosis.** A failed group is tried against the mistakes a tracer or a reader
//! makes, one input at a time; each try *repairs* one input from the data the trace
//! holds (nothing is taken from outside the trace) and recomputes:
//!
//! - q, k, v: data in memory order `[ne0, ne2, ne1]` read as if it were in `ne` order
//!   (the seed's K-cache mistake: `[head_dim, n_kv, n_head_kv]` over memory ordered
//!   `[head_dim, n_head_kv, n_kv]`);
//! - v: data stored transposed (dims 0 and 1 exchanged);
//! - q: heads permuted (each output head is matched with the q head that reproduces it);
//! - mask: rows shifted by one, either way (the tokens the shift leaves without a row are
//!   not compared);
//! - the op's scale: fitted (a candidate set and a 1-d search);
//! - any input byte-identical to the same input of the previous step: a stale buffer
//!   (evidence, not a repair: the real data is gone).
//!
//! A repair counts when the repaired group passes the bound on the compared tokens while
//! the unrepaired one fails on the same tokens. Each [`Finding`] names the input, its
//! tensor and the NMSE after the repair. When nothing explains the failure, the heads
//! and tokens whose own error exceeds the bound are reported (a kernel bug, or more than
//! one wrong input).

use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeMap;
use std::fmt;
use std::hash::Hasher;
use std::ops::Range;

use gguf_io::{quant, GgmlType};
use tensor_stats::{attention, sci, AttentionParams, Dense};

use crate::layout::TensorLayout;
use crate::meta::{AttnParams, Role, RunMeta, TensorMeta};
use crate::read::TraceFile;
use crate::TraceError;

/// The op name of flash attention; anything else is the non-flash `kq`/softmax/`kqv` path.
pub const FLASH_OP: &str = "FLASH_ATTN_EXT";

/// The roles a verification reads.
const ROLES: [Role; 8] = [
    Role::Q,
    Role::K,
    Role::V,
    Role::Mask,
    Role::Sinks,
    Role::KqvOut,
    // the mixed KV cache's cold stores (crate::mixed)
    Role::KQuant,
    Role::VQuant,
];

/// The documented NMSE bound of a group (docs/verification.md, "Bounds"), by the traced
/// V type (the K type only changes how Q is rounded, which the verification mimics), the
/// op, and `n_cells`, the most KV cells one query row attends to (cells whose mask is not
/// -inf). Set from measurement on x86-64:
///
/// - F16 V with flash attention: ggml's CPU kernel (single-token steps) accumulates
///   softmax·V in an F16 buffer, rounded once per attended cell; the error grows with the
///   cells (measured 1.1e-6 at 46 cells, 2.0e-5 at 1654): `2e-6 + n_cells * 2^-24`
///   (one rounding of half an F16 ulp, 2^-12 relative, per cell).
/// - BF16 V without flash attention: the softmax is rounded to BF16 for the `kqv`
///   product (measured up to 3.1e-6): 1e-5.
/// - Everything else (f32 accumulation; F16 softmax rounding without flash attention;
///   quantized V; measured at most 1.0e-8): 1e-6.
pub fn nmse_bound(v_type: GgmlType, flash: bool, n_cells: usize) -> f64 {
    match (v_type, flash) {
        (GgmlType::F16, true) => 2e-6 + n_cells as f64 * 2f64.powi(-24),
        (GgmlType::BF16, false) => 1e-5,
        _ => 1e-6,
    }
}

/// The most cells one query row attends to: cells whose mask value is not -inf, over the
/// rows of the step's tokens (all `n_kv` cells without a mask).
fn attended_cells(mask: Option<&Dense>, n_kv: usize, n_tokens: usize) -> usize {
    let Some(m) = mask else { return n_kv };
    let [mk, rows, m2, m3] = m.ne;
    let mut most = 0;
    for i3 in 0..m3 {
        for i2 in 0..m2 {
            for t in 0..rows.min(n_tokens) {
                let n = (0..mk.min(n_kv))
                    .filter(|&c| m.get(c, t, i2, i3).is_some_and(|x| x != f64::NEG_INFINITY))
                    .count();
                most = most.max(n);
            }
        }
    }
    most
}

/// Identity of a tensor's stored data: type, shape and a hash of its bytes. Two steps'
/// inputs with equal fingerprints hold the same bytes (up to a 64-bit hash collision).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Fingerprint {
    pub ty: GgmlType,
    pub ne: [u64; 4],
    pub hash: u64,
}

impl Fingerprint {
    pub fn of(layout: &TensorLayout, bytes: &[u8]) -> Self {
        // DefaultHasher::new() has fixed keys: the same bytes hash the same in every run.
        let mut h = DefaultHasher::new();
        h.write(bytes);
        Self {
            ty: layout.ty,
            ne: layout.ne,
            hash: h.finish(),
        }
    }
}

/// The fingerprints of one group's inputs, by role.
pub type Fingerprints = BTreeMap<Role, Fingerprint>;

/// Fingerprints of the verified inputs of (step, layer) in a trace (hashes only, no
/// dequantization).
pub fn trace_fingerprints(trace: &TraceFile, step: u32, layer: i32) -> Fingerprints {
    ROLES
        .iter()
        .filter_map(|&r| {
            let t = trace.find(r, layer, step)?;
            Some((r, Fingerprint::of(&t.meta.layout, trace.data(t))))
        })
        .collect()
}

/// One input or output of a group.
#[derive(Clone, Debug)]
pub struct Operand {
    pub role: Role,
    /// The GGUF tensor name in a file, the ggml name in a live capture.
    pub name: String,
    /// Type, shape and the strides it had in ggml.
    pub layout: TensorLayout,
    /// The values in logical order (ne0 fastest), dequantized.
    pub values: Vec<f32>,
    pub fingerprint: Fingerprint,
}

/// Everything one (step, layer) verification reads.
#[derive(Clone, Debug)]
pub struct Group {
    pub step: u32,
    pub layer: i32,
    /// The attention op (`FLASH_ATTN_EXT` or `SOFT_MAX`) and its parameters, when recorded.
    pub op: Option<String>,
    pub params: Option<AttnParams>,
    /// Token positions of the step, in batch order (empty when unknown).
    pub positions: Vec<i32>,
    pub operands: Vec<Operand>,
}

/// Inputs a group lacks for a recomputation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Missing(pub Vec<&'static str>);

impl Missing {
    /// What to do about it: which run options produce the missing inputs.
    pub fn hint(&self, run: Option<&RunMeta>) -> String {
        let model = run
            .map(|r| r.model_path.as_str())
            .filter(|m| !m.is_empty())
            .unwrap_or("MODEL");
        let retrace =
            format!("kqv-trace-monitor -m {model} <the same llama.cpp options> --save-gguf FILE");
        let sources = self.0.iter().any(|m| matches!(*m, "q" | "k" | "v"));
        if sources && run.is_some_and(|r| !r.trace_sources) {
            format!(
                "the trace holds kqv_out only (it was made with --no-trace-sources); re-trace without that option: {retrace}"
            )
        } else if self.0 == ["attention op parameters"] {
            format!(
                "the trace records no kqv_trace.attn.* op parameters for this group (not written by kqv-trace-monitor?); re-trace: {retrace}"
            )
        } else {
            format!("re-trace with the attention inputs: {retrace}")
        }
    }
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join(", "))
    }
}

impl Group {
    /// The group of (step, layer) in a saved trace.
    pub fn from_trace(trace: &TraceFile, step: u32, layer: i32) -> Result<Self, TraceError> {
        let mut operands = Vec::new();
        for role in ROLES {
            if let Some(t) = trace.find(role, layer, step) {
                operands.push(Operand {
                    role,
                    name: t.name.clone(),
                    layout: t.meta.layout,
                    values: trace.f32(t)?,
                    fingerprint: Fingerprint::of(&t.meta.layout, trace.data(t)),
                });
            }
        }
        let attn = trace.attn(step, layer);
        Ok(Self {
            step,
            layer,
            op: attn.map(|a| a.op.clone()),
            params: attn.map(|a| a.params),
            positions: trace
                .steps
                .iter()
                .find(|s| s.step == step)
                .map(|s| s.positions.clone())
                .unwrap_or_default(),
            operands,
        })
    }

    /// The group from live captures: each tensor's description and its bytes in logical
    /// contiguous order in its own type (what the capture engine hands over). Roles that
    /// are not verified (`attn`, `kq`, ...) are skipped. An empty `op` means none recorded.
    pub fn from_tensors<'a>(
        step: u32,
        layer: i32,
        op: &str,
        params: AttnParams,
        positions: &[i32],
        tensors: impl IntoIterator<Item = (&'a TensorMeta, &'a [u8])>,
    ) -> Result<Self, TraceError> {
        let mut operands = Vec::new();
        for (meta, bytes) in tensors {
            if !ROLES.contains(&meta.role) || operands.iter().any(|o: &Operand| o.role == meta.role)
            {
                continue;
            }
            let n = usize::try_from(meta.layout.n_elements())
                .map_err(|_| TraceError::Format(format!("{}: too large", meta.ggml_name)))?;
            let values = quant::dequantize_to_vec(meta.layout.ty, bytes, n)
                .map_err(|e| TraceError::Format(format!("{}: {e}", meta.ggml_name)))?;
            operands.push(Operand {
                role: meta.role,
                name: meta.ggml_name.clone(),
                layout: meta.layout,
                values,
                fingerprint: Fingerprint::of(&meta.layout, bytes),
            });
        }
        Ok(Self {
            step,
            layer,
            op: (!op.is_empty()).then(|| op.to_owned()),
            params: (!op.is_empty()).then_some(params),
            positions: positions.to_vec(),
            operands,
        })
    }

    pub fn get(&self, role: Role) -> Option<&Operand> {
        self.operands.iter().find(|o| o.role == role)
    }

    pub fn fingerprints(&self) -> Fingerprints {
        self.operands
            .iter()
            .map(|o| (o.role, o.fingerprint))
            .collect()
    }

    /// What the recomputation needs and the group lacks.
    pub fn missing(&self) -> Missing {
        let mut m = Vec::new();
        for role in [Role::Q, Role::K, Role::V, Role::KqvOut] {
            if self.get(role).is_none() {
                m.push(role.name());
            }
        }
        if self.params.is_none() {
            m.push("attention op parameters");
        }
        Missing(m)
    }

    fn flash(&self) -> bool {
        self.op.as_deref() == Some(FLASH_OP)
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

/// Which input a finding blames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Suspect {
    /// A traced tensor.
    Tensor(Role),
    /// The op's recorded scale (`kqv_trace.attn.scale`).
    Scale,
}

impl fmt::Display for Suspect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Suspect::Tensor(r) => f.write_str(r.name()),
            Suspect::Scale => f.write_str("scale"),
        }
    }
}

/// One explanation of a failed group.
#[derive(Clone, Debug, PartialEq)]
pub struct Finding {
    pub suspect: Suspect,
    /// The tensor's name (GGUF name in a file, ggml name live), or the metadata key.
    pub tensor: String,
    /// What is wrong with it, in words.
    pub what: String,
    /// NMSE of the group with this input repaired (`None` for stale-buffer evidence,
    /// which cannot be repaired).
    pub nmse_after: Option<f64>,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.suspect, self.tensor, self.what)?;
        if let Some(n) = self.nmse_after {
            write!(f, "; repaired, the group verifies (NMSE {})", sci(n))?;
        }
        Ok(())
    }
}

/// A checked group: metrics, bound, verdict and, when it failed, the diagnosis.
#[derive(Clone, Debug, PartialEq)]
pub struct Checked {
    pub verification: Verification,
    /// `FLASH_ATTN_EXT` or `SOFT_MAX`.
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

fn dense(o: &Operand) -> Result<Dense, TraceError> {
    let ne = o.layout.ne.map(|x| x as usize);
    Dense::from_f32(ne, &o.values).map_err(|e| TraceError::Format(format!("{}: {e}", o.name)))
}

fn attn_err(e: impl fmt::Display) -> TraceError {
    TraceError::Format(e.to_string())
}

/// Swap dims 0 and 1 (the transposed V of the non-flash path is [n_kv, Dv, H]).
fn transpose01(d: &Dense) -> Result<Dense, TraceError> {
    let [a, b, c, e] = d.ne;
    Dense::from_fn([b, a, c, e], |i0, i1, i2, i3| {
        d.get(i1, i0, i2, i3).unwrap_or(f64::NAN)
    })
    .map_err(attn_err)
}

/// The stored data was memory ordered [ne0, ne2, ne1, ne3] but read as if in `ne` order:
/// read it the other way.
fn reread_swapped12(d: &Dense) -> Result<Dense, TraceError> {
    let [a, b, c, _] = d.ne;
    Dense::from_fn(d.ne, |i0, i1, i2, i3| {
        d.data[i0 + a * (i2 + c * (i1 + b * i3))]
    })
    .map_err(attn_err)
}

/// The stored data is the transpose (dims 0 and 1) of what its layout says: read it back.
fn reread_transposed01(d: &Dense) -> Result<Dense, TraceError> {
    let [a, b, c, _] = d.ne;
    Dense::from_fn(d.ne, |i0, i1, i2, i3| {
        d.data[i1 + b * (i0 + a * (i2 + c * i3))]
    })
    .map_err(attn_err)
}

/// ggml's CPU flash attention (and MUL_MAT) converts each Q row to the type K's dot product takes
/// (`vec_dot_type`: F16 for an F16 cache, Q8_0 for the Q4_0/Q5_0/Q8_0 family) before
/// multiplying: do the same, so the comparison measures the kernel, not that rounding.
fn round_q_like_ggml(q: &mut Dense, k_type: GgmlType) -> Result<(), TraceError> {
    let dot_type = match k_type {
        GgmlType::F16 => GgmlType::F16,
        GgmlType::BF16 => GgmlType::BF16,
        GgmlType::Q4_0
        | GgmlType::Q4_1
        | GgmlType::Q5_0
        | GgmlType::Q5_1
        | GgmlType::Q8_0
        | GgmlType::IQ4_NL => GgmlType::Q8_0,
        _ => return Ok(()),
    };
    let d = q.ne[0];
    if d == 0 || dot_type.bytes_for(d as u64).is_none() {
        return Ok(());
    }
    let mut row = vec![0f32; d];
    for chunk in q.data.chunks_exact_mut(d) {
        for (r, &x) in row.iter_mut().zip(chunk.iter()) {
            *r = x as f32;
        }
        let bytes =
            quant::quantize(dot_type, &row).map_err(|e| TraceError::Format(e.to_string()))?;
        quant::dequantize(dot_type, &bytes, &mut row)
            .map_err(|e| TraceError::Format(e.to_string()))?;
        for (c, &r) in chunk.iter_mut().zip(row.iter()) {
            *c = f64::from(r);
        }
    }
    Ok(())
}

/// The inputs of the reference, as the attention reads them.
#[derive(Clone)]
struct Inputs {
    /// Rounded like ggml.
    q: Dense,
    k: Dense,
    /// Logical [Dv, n_kv, H] (transposed back without flash attention).
    v: Dense,
    mask: Option<Dense>,
    sinks: Option<Vec<f64>>,
    p: AttentionParams,
    k_type: GgmlType,
    flash: bool,
}

impl Inputs {
    fn q_from_stored(&self, mut stored: Dense) -> Result<Dense, TraceError> {
        round_q_like_ggml(&mut stored, self.k_type)?;
        Ok(stored)
    }
    fn v_from_stored(&self, stored: Dense) -> Result<Dense, TraceError> {
        if self.flash {
            Ok(stored)
        } else {
            transpose01(&stored)
        }
    }
    fn reference(&self) -> Result<Dense, TraceError> {
        self.reference_with(&self.p)
    }
    fn reference_with(&self, p: &AttentionParams) -> Result<Dense, TraceError> {
        attention(
            &self.q,
            &self.k,
            &self.v,
            self.mask.as_ref(),
            self.sinks.as_deref(),
            p,
        )
        .map_err(attn_err)
    }
}

/// Metrics of `actual` against `reference` ([Dv, n_head, n_tokens, n_seq]) over a range of
/// tokens.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Metrics {
    pub(crate) nmse: f64,
    pub(crate) max_abs: f64,
    pub(crate) worst: (usize, usize, usize),
    pub(crate) cosine: f64,
    pub(crate) n: usize,
}

pub(crate) fn compare(reference: &Dense, actual: &[f32], tokens: Range<usize>) -> Metrics {
    let [dv, nh, nt, ns] = reference.ne;
    let r = &reference.data;
    let idx = |d: usize, h: usize, t: usize, s: usize| d + dv * (h + nh * (t + nt * s));
    let tokens = tokens.start.min(nt)..tokens.end.min(nt);
    let each = |f: &mut dyn FnMut(usize, usize, usize, usize)| {
        for s in 0..ns {
            for t in tokens.clone() {
                for h in 0..nh {
                    for d in 0..dv {
                        f(idx(d, h, t, s), t, h, d);
                    }
                }
            }
        }
    };
    let (mut n, mut sum) = (0usize, 0.0f64);
    each(&mut |i, _, _, _| {
        n += 1;
        sum += r[i];
    });
    let mean = sum / n.max(1) as f64;
    let (mut var, mut se, mut dot, mut na, mut nr, mut max_abs, mut worst) =
        (0.0f64, 0.0, 0.0, 0.0, 0.0, 0.0f64, (0, 0, 0));
    each(&mut |i, t, h, d| {
        let (a, b) = (f64::from(actual[i]), r[i]);
        var += (b - mean).powi(2);
        let e = (a - b).abs();
        se += e * e;
        dot += a * b;
        na += a * a;
        nr += b * b;
        if e > max_abs || (e.is_nan() && !max_abs.is_nan()) {
            max_abs = e;
            worst = (t, h, d);
        }
    });
    let nmse = if var > 0.0 {
        se / var
    } else if se == 0.0 {
        0.0
    } else {
        f64::INFINITY
    };
    let cosine = if na > 0.0 && nr > 0.0 {
        dot / (na.sqrt() * nr.sqrt())
    } else {
        0.0
    };
    Metrics {
        nmse,
        max_abs,
        worst,
        cosine,
        n,
    }
}

/// Squared error per head and per token, over the whole group's reference variance.
pub(crate) fn slice_nmse(reference: &Dense, actual: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let [dv, nh, nt, ns] = reference.ne;
    let r = &reference.data;
    let n = r.len().max(1) as f64;
    let mean = r.iter().sum::<f64>() / n;
    let var = r.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    let (mut heads, mut tokens) = (vec![0.0; nh], vec![0.0; nt]);
    for (i, (&b, &a)) in r.iter().zip(actual).enumerate() {
        let e = (f64::from(a) - b).powi(2);
        heads[(i / dv) % nh] += e;
        tokens[(i / (dv * nh)) % nt] += e;
    }
    let per = |x: &mut Vec<f64>, count: usize| {
        for v in x.iter_mut() {
            *v = if var > 0.0 {
                *v / count.max(1) as f64 / var
            } else if *v == 0.0 {
                0.0
            } else {
                f64::INFINITY
            };
        }
    };
    per(&mut heads, dv * nt * ns);
    per(&mut tokens, dv * nh * ns);
    (heads, tokens)
}

fn build_inputs(g: &Group) -> Result<Result<(Inputs, Vec<f32>), Missing>, TraceError> {
    let missing = g.missing();
    let (Some(q), Some(k), Some(v), Some(out), Some(params)) = (
        g.get(Role::Q),
        g.get(Role::K),
        g.get(Role::V),
        g.get(Role::KqvOut),
        g.params,
    ) else {
        return Ok(Err(missing));
    };
    let mut inp = Inputs {
        q: Dense::zeros([0; 4]).map_err(attn_err)?,
        k: dense(k)?,
        v: Dense::zeros([0; 4]).map_err(attn_err)?,
        mask: g.get(Role::Mask).map(dense).transpose()?,
        sinks: g
            .get(Role::Sinks)
            .map(|s| s.values.iter().map(|&x| f64::from(x)).collect()),
        p: AttentionParams {
            scale: f64::from(params.scale),
            max_bias: f64::from(params.max_bias),
            softcap: f64::from(params.softcap),
        },
        k_type: k.layout.ty,
        flash: g.flash(),
    };
    // Both paths take Q·K with ggml's vec_dot (flash attention, or the `kq` MUL_MAT).
    inp.q = inp.q_from_stored(dense(q)?)?;
    // Without flash attention V is read transposed: ne [n_kv, Dv, H_kv].
    inp.v = inp.v_from_stored(dense(v)?)?;
    Ok(Ok((inp, out.values.clone())))
}

/// Recompute the attention of a group and compare it with its `kqv_out`; diagnose a
/// failure. `previous` is the previous step's fingerprints of the same layer (for the
/// stale-buffer check), with that step's number.
pub fn check(
    g: &Group,
    previous: Option<(u32, &Fingerprints)>,
) -> Result<Result<Checked, Missing>, TraceError> {
    // The mixed KV cache's node has six inputs (cold store included): see mixed.rs.
    if crate::mixed::is_mixed(g) {
        return crate::mixed::check_mixed(g);
    }
    let (inp, actual) = match build_inputs(g)? {
        Ok(x) => x,
        Err(m) => return Ok(Err(m)),
    };
    let reference = inp.reference()?;
    let (step, layer) = (g.step, g.layer);
    if actual.len() != reference.data.len() {
        return Err(TraceError::Format(format!(
            "step {step} layer {layer}: kqv_out has {} values, attention of the traced inputs {}",
            actual.len(),
            reference.data.len()
        )));
    }
    let all = 0..reference.ne[2];
    let m = compare(&reference, &actual, all);
    let v_type = g.get(Role::V).map_or(GgmlType::F32, |v| v.layout.ty);
    let n_cells = attended_cells(inp.mask.as_ref(), inp.k.ne[1], inp.q.ne[1]);
    let bound = nmse_bound(v_type, inp.flash, n_cells);
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
        op: g.op.clone().unwrap_or_default(),
        bound,
        pass,
        findings: Vec::new(),
        bad_heads: Vec::new(),
        bad_tokens: Vec::new(),
    };
    if !pass {
        let (heads, tokens) = slice_nmse(&reference, &actual);
        checked.bad_heads = (0..heads.len())
            .filter(|&h| exceeds(heads[h], bound))
            .collect();
        checked.bad_tokens = (0..tokens.len())
            .filter(|&t| exceeds(tokens[t], bound))
            .collect();
        checked.findings = diagnose(g, &inp, &reference, &actual, bound, previous)?;
    }
    Ok(Ok(checked))
}

/// Over the bound, NaN included.
fn exceeds(nmse: f64, bound: f64) -> bool {
    nmse.partial_cmp(&bound) != Some(std::cmp::Ordering::Less)
        && nmse.partial_cmp(&bound) != Some(std::cmp::Ordering::Equal)
}

/// Try one repaired set of inputs over `tokens`: `Some(nmse)` when it passes there and
/// the original does not.
fn repaired(
    inp: &Inputs,
    original: &Dense,
    actual: &[f32],
    tokens: Range<usize>,
    bound: f64,
) -> Result<Option<f64>, TraceError> {
    if tokens.is_empty() {
        return Ok(None);
    }
    let before = compare(original, actual, tokens.clone()).nmse;
    if before <= bound {
        return Ok(None);
    }
    let after = compare(&inp.reference()?, actual, tokens).nmse;
    Ok((after <= bound).then_some(after))
}

fn diagnose(
    g: &Group,
    inp: &Inputs,
    original: &Dense,
    actual: &[f32],
    bound: f64,
    previous: Option<(u32, &Fingerprints)>,
) -> Result<Vec<Finding>, TraceError> {
    let mut found = Vec::new();
    let n_tokens = original.ne[2];
    let all = 0..n_tokens;
    let name = |r: Role| g.get(r).map(|o| o.name.clone()).unwrap_or_default();

    // Stale buffers: an input byte for byte the previous step's.
    if let Some((prev_step, prev)) = previous {
        for o in &g.operands {
            if o.role != Role::KqvOut && prev.get(&o.role) == Some(&o.fingerprint) {
                found.push(Finding {
                    suspect: Suspect::Tensor(o.role),
                    tensor: o.name.clone(),
                    what: format!(
                        "byte for byte the {} of step {prev_step}: a stale buffer (data of the previous step)",
                        o.role
                    ),
                    nmse_after: None,
                });
            }
        }
    }

    // Layouts: memory order [ne0, ne2, ne1] read as ne order; V transposed.
    let order_words = |r: Role| match r {
        Role::Q => (
            "[head_dim, n_head, n_tokens]",
            "[head_dim, n_tokens, n_head]",
        ),
        _ => ("[head_dim, n_head_kv, n_kv]", "[head_dim, n_kv, n_head_kv]"),
    };
    for role in [Role::Q, Role::K, Role::V] {
        let Some(o) = g.get(role) else { continue };
        let stored = dense(o)?;
        let [_, n1, n2, _] = stored.ne;
        let mut tries: Vec<(Dense, String)> = Vec::new();
        if n1 > 1 && n2 > 1 {
            let (mem, ne) = order_words(role);
            let recorded = if o.layout.memory_order() == [0, 2, 1, 3] {
                " (the order its recorded nb give)"
            } else {
                ""
            };
            let ne_words = if role == Role::V && !inp.flash {
                "its ne order".to_owned()
            } else {
                format!("ne order {ne}")
            };
            let mem_words = if role == Role::V && !inp.flash {
                "memory order [ne0, ne2, ne1]".to_owned()
            } else {
                format!("memory order {mem}")
            };
            tries.push((
                reread_swapped12(&stored)?,
                format!("data in {mem_words}{recorded} read as if in {ne_words}"),
            ));
        }
        if role == Role::V && stored.ne[0] > 1 && n1 > 1 {
            tries.push((
                reread_transposed01(&stored)?,
                "data stored transposed (dims 0 and 1 exchanged)".to_owned(),
            ));
        }
        for (fixed, what) in tries {
            let mut alt = inp.clone();
            match role {
                Role::Q => alt.q = inp.q_from_stored(fixed)?,
                Role::K => alt.k = fixed,
                _ => alt.v = inp.v_from_stored(fixed)?,
            }
            if let Some(n) = repaired(&alt, original, actual, all.clone(), bound)? {
                found.push(Finding {
                    suspect: Suspect::Tensor(role),
                    tensor: o.name.clone(),
                    what,
                    nmse_after: Some(n),
                });
            }
        }
    }

    // Mask rows shifted by one.
    if let Some(mask) = &inp.mask {
        let [n_kv, rows, m2, m3] = mask.ne;
        for (dir, tokens) in [
            (1i64, 1..n_tokens),
            (-1, 0..n_tokens.min(rows.saturating_sub(1))),
        ] {
            if rows < 2 {
                break;
            }
            // dir +1: stored row t holds row t+1, so row t is stored row t-1.
            let fixed = Dense::from_fn([n_kv, rows, m2, m3], |i0, i1, i2, i3| {
                let src = (i1 as i64 - dir).clamp(0, rows as i64 - 1) as usize;
                mask.get(i0, src, i2, i3).unwrap_or(f64::NAN)
            })
            .map_err(attn_err)?;
            let mut alt = inp.clone();
            alt.mask = Some(fixed);
            if let Some(n) = repaired(&alt, original, actual, tokens.clone(), bound)? {
                let held = if dir > 0 { "t+1" } else { "t-1" };
                found.push(Finding {
                    suspect: Suspect::Tensor(Role::Mask),
                    tensor: name(Role::Mask),
                    what: format!(
                        "rows shifted by one (row t holds row {held}'s mask); compared on tokens {}..{} (the shift loses a row)",
                        tokens.start,
                        tokens.end - 1
                    ),
                    nmse_after: Some(n),
                });
            }
        }
    }

    // Q heads permuted.
    if let Some(f) = q_heads(g, inp, original, actual, bound)? {
        found.push(f);
    }

    // The scale, fitted, when nothing else explained it (it is the costliest try).
    if found.is_empty() {
        if let Some(f) = scale_fit(inp, original, actual, bound)? {
            found.push(f);
        }
    }
    Ok(found)
}

/// Each output head's best q head (giving every query head one q head's data at a time);
/// a finding when that matching is a permutation other than the identity that verifies.
fn q_heads(
    g: &Group,
    inp: &Inputs,
    original: &Dense,
    actual: &[f32],
    bound: f64,
) -> Result<Option<Finding>, TraceError> {
    let [d, nt, nh, ns] = inp.q.ne;
    if nh < 2 {
        return Ok(None);
    }
    let head_of = |q: &Dense, from: &dyn Fn(usize) -> usize| {
        Dense::from_fn([d, nt, nh, ns], |i0, i1, i2, i3| {
            q.get(i0, i1, from(i2), i3).unwrap_or(f64::NAN)
        })
        .map_err(attn_err)
    };
    // err[h][s]: head h's squared error when all heads read q head s.
    let mut err = vec![vec![0.0f64; nh]; nh];
    for s in 0..nh {
        let mut alt = inp.clone();
        alt.q = head_of(&inp.q, &|_| s)?;
        let (heads, _) = slice_nmse(&alt.reference()?, actual);
        for (row, e) in err.iter_mut().zip(heads) {
            row[s] = e;
        }
    }
    let map: Vec<usize> = (0..nh)
        .map(|h| {
            (0..nh)
                .min_by(|&a, &b| err[h][a].total_cmp(&err[h][b]))
                .unwrap_or(h)
        })
        .collect();
    let mut seen = vec![false; nh];
    let bijective = map.iter().all(|&s| !std::mem::replace(&mut seen[s], true));
    if !bijective || map.iter().enumerate().all(|(h, &s)| h == s) {
        return Ok(None);
    }
    let mut alt = inp.clone();
    alt.q = head_of(&inp.q, &|h| map[h])?;
    let all = 0..original.ne[2];
    Ok(
        repaired(&alt, original, actual, all, bound)?.map(|n| Finding {
            suspect: Suspect::Tensor(Role::Q),
            tensor: g.get(Role::Q).map(|o| o.name.clone()).unwrap_or_default(),
            what: format!("heads permuted: output head h matches q head {:?}[h]", map),
            nmse_after: Some(n),
        }),
    )
}

/// Fit the scale: ggml's usual 1/sqrt(head_dim) and a few others, a grid over a factor
/// of 64 either way of the recorded scale, then a golden-section search around the best.
fn scale_fit(
    inp: &Inputs,
    original: &Dense,
    actual: &[f32],
    bound: f64,
) -> Result<Option<Finding>, TraceError> {
    let all = 0..original.ne[2];
    let rec = inp.p.scale;
    let d = inp.q.ne[0] as f64;
    let usual = 1.0 / d.sqrt();
    let center = if rec.is_finite() && rec > 0.0 {
        rec
    } else {
        usual
    };
    let eval = |s: f64| -> Result<f64, TraceError> {
        let p = AttentionParams { scale: s, ..inp.p };
        Ok(compare(&inp.reference_with(&p)?, actual, all.clone()).nmse)
    };
    let mut best = (f64::INFINITY, center);
    let consider = |s: f64, best: &mut (f64, f64)| -> Result<(), TraceError> {
        let e = eval(s)?;
        if e < best.0 {
            *best = (e, s);
        }
        Ok(())
    };
    for s in [usual, 1.0, 1.0 / d, rec * rec, rec.abs().sqrt()] {
        if s.is_finite() && s > 0.0 {
            consider(s, &mut best)?;
        }
    }
    let step = 2f64.sqrt();
    for k in -12..=12 {
        consider(center * step.powi(k), &mut best)?;
    }
    if best.0 > bound {
        // Golden-section search on log(scale) within one grid step either side.
        let (mut a, mut b) = ((best.1 / step).ln(), (best.1 * step).ln());
        let phi = (5f64.sqrt() - 1.0) / 2.0;
        let (mut c, mut e) = (b - phi * (b - a), a + phi * (b - a));
        let (mut fc, mut fe) = (eval(c.exp())?, eval(e.exp())?);
        for _ in 0..40 {
            if fc < fe {
                b = e;
                e = c;
                fe = fc;
                c = b - phi * (b - a);
                fc = eval(c.exp())?;
            } else {
                a = c;
                c = e;
                fc = fe;
                e = a + phi * (b - a);
                fe = eval(e.exp())?;
            }
        }
        let (f, s) = if fc < fe {
            (fc, c.exp())
        } else {
            (fe, e.exp())
        };
        if f < best.0 {
            best = (f, s);
        }
    }
    let (after, s) = best;
    let before = compare(original, actual, all).nmse;
    if exceeds(after, bound) || before <= bound || (s - rec).abs() <= 1e-6 * rec.abs() {
        return Ok(None);
    }
    let named = if (s - usual).abs() <= 1e-6 * usual {
        format!(" = 1/sqrt({})", inp.q.ne[0])
    } else {
        String::new()
    };
    Ok(Some(Finding {
        suspect: Suspect::Scale,
        tensor: crate::keys::ATTN_SCALE.to_owned(),
        what: format!(
            "the recorded op scale {} does not reproduce kqv_out; scale {}{named} does",
            rec as f32,
            sci(s)
        ),
        nmse_after: Some(after),
    }))
}

/// Recompute the attention of (step, layer) and compare it with the traced `kqv_out`.
pub fn verify_group(
    trace: &TraceFile,
    step: u32,
    layer: i32,
) -> Result<Result<Verification, Missing>, TraceError> {
    Ok(check_in_trace(trace, step, layer)?.map(|c| c.verification))
}

/// [`check`] for (step, layer) of a saved trace, with the previous step's fingerprints.
pub fn check_in_trace(
    trace: &TraceFile,
    step: u32,
    layer: i32,
) -> Result<Result<Checked, Missing>, TraceError> {
    let g = Group::from_trace(trace, step, layer)?;
    let prev = step
        .checked_sub(1)
        .map(|p| (p, trace_fingerprints(trace, p, layer)));
    check(&g, prev.as_ref().map(|(p, f)| (*p, f)))
}

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
