//! The recomputation: a group's operands as the reference attention reads them
//! ([`Inputs`]: dense f64 tensors, Q rounded like ggml, V transposed back without flash
//! attention) and the reference itself ([`tensor_stats::attention`] in f64).

use std::cell::Cell;
use std::fmt;
use std::rc::Rc;

use crate::VerifyError;
use gguf_io::{quant, GgmlType};
use tensor_stats::{attention, AttentionParams, Dense};
use trace_format::meta::Role;

use crate::group::{Group, Operand};

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

/// ggml's CPU flash attention (and MUL_MAT) converts each Q row to the type K's dot product takes
/// (`vec_dot_type`: F16 for an F16 cache, Q8_0 for the Q4_0/Q5_0/Q8_0 family) before
/// multiplying: do the same, so the comparison measures the kernel, not that rounding.
fn round_q_like_ggml(q: &mut Dense, k_type: GgmlType) -> Result<(), VerifyError> {
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
            quant::quantize(dot_type, &row).map_err(|e| VerifyError::Malformed(e.to_string()))?;
        quant::dequantize(dot_type, &bytes, &mut row)
            .map_err(|e| VerifyError::Malformed(e.to_string()))?;
        for (c, &r) in chunk.iter_mut().zip(row.iter()) {
            *c = f64::from(r);
        }
    }
    Ok(())
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
    /// Rounded like ggml.
    pub(crate) q: Dense,
    pub(crate) k: Dense,
    /// Logical [Dv, n_kv, H] (transposed back without flash attention).
    pub(crate) v: Dense,
    pub(crate) mask: Option<Dense>,
    pub(crate) sinks: Option<Vec<f64>>,
    pub(crate) p: AttentionParams,
    pub(crate) k_type: GgmlType,
    pub(crate) flash: bool,
    pub(crate) budget: Budget,
}

impl Inputs {
    pub(crate) fn q_from_stored(&self, mut stored: Dense) -> Result<Dense, VerifyError> {
        round_q_like_ggml(&mut stored, self.k_type)?;
        Ok(stored)
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
    pub(crate) fn reference_with(&self, p: &AttentionParams) -> Result<Dense, VerifyError> {
        self.budget.spend(self.work())?;
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
        budget,
    };
    // Both paths take Q·K with ggml's vec_dot (flash attention, or the `kq` MUL_MAT).
    inp.q = inp.q_from_stored(dense(q)?)?;
    // Without flash attention V is read transposed: ne [n_kv, Dv, H_kv].
    inp.v = inp.v_from_stored(dense(v)?)?;
    Ok(Some((inp, out.values.clone())))
}
