//! The recomputation: a group's operands as the reference attention reads them
//! ([`Inputs`]: dense f64 tensors, Q rounded like ggml, V transposed back without flash
//! attention) and the reference itself ([`tensor_stats::attention`] in f64).

use std::cell::Cell;
use std::fmt;
use std::rc::Rc;

use crate::VerifyError;
use gguf_io::GgmlType;
use tensor_stats::{attention_biased, AttentionParams, Dense};
use trace_format::meta::Role;

use crate::group::{Group, Operand};
use crate::kernel::{self, KernelPath, PathFacts};

pub(crate) fn dense(o: &Operand) -> Result<Dense, VerifyError> {
    let ne = o.layout.ne.map(|x| x as usize);
    Dense::from_f32(ne, &o.values).map_err(|e| VerifyError::Malformed(format!("{}: {e}", o.name)))
}

pub(crate) fn attn_err(e: impl fmt::Display) -> VerifyError {
    VerifyError::Malformed(e.to_string())
}

/// Swap dims 0 and 1 (the transposed V of the non-flash path is [n_kv, Dv, H]).
fn transpose01(d: &Dense) -> Result<Dense, VerifyError> {
    let [a, b, c, e] = d.ne;
    Dense::from_fn([b, a, c, e], |i0, i1, i2, i3| {
        d.get(i1, i0, i2, i3).unwrap_or(f64::NAN)
    })
    .map_err(attn_err)
}

/// Multiply-adds a group may still spend on recomputations, shared by an [`Inputs`] and
/// its clones (the diagnosis' repaired copies).
#[derive(Clone, Debug)]
pub(crate) struct Budget {
    left: Rc<Cell<u128>>,
    pub(crate) step: u32,
    pub(crate) layer: i32,
    pub(crate) limit: u64,
}

impl Budget {
    pub(crate) fn new(step: u32, layer: i32, limit: u64) -> Self {
        Self {
            left: Rc::new(Cell::new(u128::from(limit))),
            step,
            layer,
            limit,
        }
    }

    /// Spend `work`, or refuse (spending nothing) when it exceeds what is left.
    pub(crate) fn spend(&self, work: u128) -> Result<(), VerifyError> {
        let left = self.left.get();
        if work > left {
            return Err(VerifyError::Budget {
                step: self.step,
                layer: self.layer,
                work,
                limit: self.limit,
            });
        }
        self.left.set(left - work);
        Ok(())
    }

    /// Start over with `limit` (the diagnosis' own budget).
    pub(crate) fn refill(&self, limit: u128) {
        self.left.set(limit);
    }
}

/// Multiply-adds of one reference attention: heads x tokens x cells x (D_k + D_v), per
/// sequence (u128: no size a file claims overflows it).
pub(crate) fn attention_work(q: [usize; 4], k: [usize; 4], v: [usize; 4]) -> u128 {
    let [d, nt, nh, ns] = q.map(|x| x as u128);
    let n_kv = k[1] as u128;
    let dv = v[0] as u128;
    ns * nh * nt * n_kv * (d + dv)
}

/// The inputs of the reference, as the attention reads them.
#[derive(Clone)]
pub(crate) struct Inputs {
    /// Rounded like ggml (to K's `vec_dot_type`), as the `kq` product reads it.
    pub(crate) q: Dense,
    /// As traced.
    pub(crate) q_raw: Dense,
    pub(crate) k: Dense,
    /// Logical [Dv, n_kv, H] (transposed back without flash attention).
    pub(crate) v: Dense,
    pub(crate) mask: Option<Dense>,
    /// An additive score bias before the softmax (`kq_bias`), as traced.
    pub(crate) bias: Option<Dense>,
    pub(crate) sinks: Option<Vec<f64>>,
    pub(crate) p: AttentionParams,
    pub(crate) k_type: GgmlType,
    pub(crate) v_type: GgmlType,
    pub(crate) flash: bool,
    pub(crate) budget: Budget,
    /// The ggml path that computed the group, or why it cannot be named: picks the
    /// reference ([`kernel::faithful`], or the exact one with the older bound).
    pub(crate) kernel: Result<KernelPath, String>,
    /// A group that ran on an RPC server: the CPU path to try ([`kernel::rpc_cpu_path`]).
    pub(crate) rpc_cpu: Option<KernelPath>,
    /// The SIMD the library was built with (`kqv_trace.run.cpu_simd`).
    pub(crate) simd: String,
}

impl Inputs {
    /// Q as traced (or repaired): both the raw and the rounded copy.
    pub(crate) fn set_q(&mut self, raw: Dense) -> Result<(), VerifyError> {
        let mut rounded = raw.clone();
        kernel::round_rows(&mut rounded, kernel::vec_dot_type(self.k_type))?;
        self.q = rounded;
        self.q_raw = raw;
        Ok(())
    }
    pub(crate) fn v_from_stored(&self, stored: Dense) -> Result<Dense, VerifyError> {
        if self.flash {
            Ok(stored)
        } else {
            transpose01(&stored)
        }
    }
    pub(crate) fn reference(&self) -> Result<Dense, VerifyError> {
        self.reference_with(&self.p)
    }
    pub(crate) fn work(&self) -> u128 {
        attention_work(self.q.ne, self.k.ne, self.v.ne)
    }
    /// The verdict's reference with the op parameters `p`: the kernel-faithful one when
    /// the path is known, else the exact one on Q rounded like ggml (the older model).
    pub(crate) fn reference_with(&self, p: &AttentionParams) -> Result<Dense, VerifyError> {
        self.budget.spend(self.work())?;
        match self.kernel {
            Ok(path) => kernel::faithful(path, &self.operands(p)),
            Err(_) => attention_biased(
                &self.q,
                &self.k,
                &self.v,
                self.mask.as_ref(),
                self.bias.as_ref(),
                self.sinks.as_deref(),
                p,
            )
            .map_err(attn_err),
        }
    }
    /// The exact attention of the traced values in f64 (Q unrounded): what the kernel's
    /// own numerical error is measured against. Its work is spent by the caller, before
    /// the verdict's reference (a group over the budget is refused before any work).
    pub(crate) fn exact(&self) -> Result<Dense, VerifyError> {
        attention_biased(
            &self.q_raw,
            &self.k,
            &self.v,
            self.mask.as_ref(),
            self.bias.as_ref(),
            self.sinks.as_deref(),
            &self.p,
        )
        .map_err(attn_err)
    }
    /// The unfused path's allowance for rounding ambiguity, as an NMSE against
    /// `reference` ([`kernel::unfused_tip_energy`] over the reference's variance, the
    /// denominator of the verdict's NMSE); 0 for other paths. Costs one more pass over
    /// the scores, spent from the budget.
    pub(crate) fn tip_allowance(&self, reference: &Dense) -> Result<f64, VerifyError> {
        if self.kernel != Ok(kernel::KernelPath::Unfused) {
            return Ok(0.0);
        }
        self.budget.spend(self.work())?;
        let energy = kernel::unfused_tip_energy(&self.operands(&self.p))?;
        let n = reference.data.len().max(1) as f64;
        let mean = reference.data.iter().sum::<f64>() / n;
        let var: f64 = reference.data.iter().map(|r| (r - mean).powi(2)).sum();
        Ok(if var > 0.0 { energy / var } else { 0.0 })
    }
    pub(crate) fn operands<'a>(&'a self, p: &'a AttentionParams) -> kernel::Operands<'a> {
        kernel::Operands {
            q: &self.q_raw,
            k: &self.k,
            v: &self.v,
            mask: self.mask.as_ref(),
            bias: self.bias.as_ref(),
            sinks: self.sinks.as_deref(),
            p,
            k_type: self.k_type,
            v_type: self.v_type,
            dot: kernel::DotOrder::of(&self.simd),
        }
    }
}

/// The group's inputs as the reference reads them, and its traced `kqv_out`; `None` when
/// the group lacks some of them ([`Group::missing`] says which).
pub(crate) fn build_inputs(
    g: &Group,
    budget: Budget,
) -> Result<Option<(Inputs, Vec<f32>)>, VerifyError> {
    let (Some(q), Some(k), Some(v), Some(out), Some(params)) = (
        g.get(Role::Q),
        g.get(Role::K),
        g.get(Role::V),
        g.get(Role::KqvOut),
        g.params,
    ) else {
        return Ok(None);
    };
    let mut inp = Inputs {
        q: Dense::zeros([0; 4]).map_err(attn_err)?,
        q_raw: Dense::zeros([0; 4]).map_err(attn_err)?,
        k: dense(k)?,
        v: Dense::zeros([0; 4]).map_err(attn_err)?,
        mask: g.get(Role::Mask).map(dense).transpose()?,
        bias: g.get(Role::KqBias).map(dense).transpose()?,
        sinks: g
            .get(Role::Sinks)
            .map(|s| s.values.iter().map(|&x| f64::from(x)).collect()),
        p: AttentionParams {
            scale: f64::from(params.scale),
            max_bias: f64::from(params.max_bias),
            softcap: f64::from(params.softcap),
        },
        k_type: k.layout.ty,
        v_type: v.layout.ty,
        flash: g.flash(),
        budget,
        kernel: Err(String::new()),
        rpc_cpu: None,
        simd: g.kernel.simd.clone(),
    };
    let facts = PathFacts {
        kernel: &g.kernel,
        op: g.op.as_deref().unwrap_or_default(),
        q_type: q.layout.ty,
        k_type: k.layout.ty,
        v_type: v.layout.ty,
        q_ne: q.layout.ne.map(|x| x as usize),
        n_kv: k.layout.ne[1] as usize,
    };
    inp.kernel = kernel::select(&facts);
    inp.rpc_cpu = kernel::rpc_cpu_path(&facts);
    // Both paths take Q·K with ggml's vec_dot (flash attention, or the `kq` MUL_MAT).
    inp.set_q(dense(q)?)?;
    // Without flash attention V is read transposed: ne [n_kv, Dv, H_kv].
    inp.v = inp.v_from_stored(dense(v)?)?;
    Ok(Some((inp, out.values.clone())))
}
