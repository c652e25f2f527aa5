//! The mixed KV cache (`--mixed-kv-cache`): its attention node and how a traced group of
//! it is verified.
//!
//! llama.cpp (patched, `vendor/patches/0001-0002`) keeps each layer's most recent tokens in
//! an F16 hot store and older ones quantized in a cold store, and computes attention over
//! both with one node whose six sources are traced with these roles and layouts (ggml `ne`):
//!
//! | role | tensor | `ne` |
//! |------|--------|------|
//! | `q` | Q, permuted view, F32 | `[D, n_tokens, n_head, 1]` |
//! | `k` | hot K cache, permuted view, F16 | `[D, n_hot, n_head_kv, 1]` |
//! | `v` | hot V cache (not transposed), permuted view, F16 | `[Dv, n_hot, n_head_kv, 1]` |
//! | `k_quant` | cold K store, permuted view, quantized | `[D, n_cold, n_head_kv, 1]` |
//! | `v_quant` | cold V store, permuted view, quantized | `[Dv, n_cold, n_head_kv, 1]` |
//! | `mask` | F16 or F32 | `[n_cold + n_hot, n_tokens, 1, 1]` (cold columns first) |
//!
//! The node's output (`attn`) is `[Dv, n_head, n_tokens, 1]` F32 like `FLASH_ATTN_EXT`'s,
//! and `kqv_out-<layer>` is its reshape. The kernel converts K and V rows to f32 and
//! takes dot products with the f32 Q as it is (no rounding of Q to K's type), so the
//! reference below recomputes from exactly the traced values: cold rows dequantized,
//! concatenated in front of the hot rows (the mask's column order), then
//! [`tensor_stats::attention()`] in f64. [`check`](super::check) hands such groups here, so
//! `verify_group`, `gguf-reader --verify-attention` and `kqv-trace-monitor --verify` all
//! verify mixed traces.

use crate::VerifyError;
use tensor_stats::{attention, AttentionParams, Dense};
use trace_format::meta::Role;
/// The `op` recorded for the mixed attention node (a format constant: the capture writes it).
pub use trace_format::MIXED_ATTN_OP;

use super::{judge, output_fits, Outcome};
use crate::group::{Group, Missing};
use crate::recompute::{attention_work, dense, Budget};

/// NMSE bound of a mixed group: the node works in F32 (F32 Q, F32 accumulators, no F16
/// accumulator as in ggml's flash attention), measured worst 1.6e-13 (docs/verification.md).
pub const MIXED_NMSE_BOUND: f64 = 1e-6;

/// True when the group was computed by the mixed attention node: its op says so, or it
/// has a cold store (`k_quant`).
pub fn is_mixed(g: &Group) -> bool {
    g.op.as_deref() == Some(MIXED_ATTN_OP) || g.get(Role::KQuant).is_some()
}

/// `cold` then `hot` along dim 1 (the KV cells): `[D, n_cold + n_hot, H, S]`.
pub fn concat_cells(cold: &Dense, hot: &Dense) -> Result<Dense, VerifyError> {
    let [d, n_cold, h, s] = cold.ne;
    let [d2, n_hot, h2, s2] = hot.ne;
    if d != d2 || h != h2 || s != s2 {
        return Err(VerifyError::Malformed(format!(
            "cold store ne {:?} does not match hot store ne {:?}",
            cold.ne, hot.ne
        )));
    }
    Dense::from_fn([d2, n_cold + n_hot, h2, s2], |i0, i1, i2, i3| {
        if i1 < n_cold {
            cold.get(i0, i1, i2, i3)
        } else {
            hot.get(i0, i1 - n_cold, i2, i3)
        }
        .unwrap_or(f64::NAN)
    })
    .map_err(|e| VerifyError::Malformed(e.to_string()))
}

/// Recompute a mixed-cache attention group from its six inputs and compare it with its
/// `kqv_out` (see the module docs). A failed group lists the heads and tokens over the
/// bound; there is no further diagnosis for this op.
pub fn check_mixed(g: &Group) -> Result<Outcome, VerifyError> {
    g.check_sizes()?;
    check_mixed_within(g, &Budget::new(g.step, g.layer, super::DEFAULT_MAX_WORK))
}

/// [`check_mixed`] within a work budget.
pub(crate) fn check_mixed_within(g: &Group, budget: &Budget) -> Result<Outcome, VerifyError> {
    let roles = [
        Role::Q,
        Role::K,
        Role::V,
        Role::KQuant,
        Role::VQuant,
        Role::Mask,
        Role::KqvOut,
    ];
    let mut missing: Vec<&'static str> = roles
        .iter()
        .filter(|r| g.get(**r).is_none())
        .map(|r| r.name())
        .collect();
    if g.params.is_none() {
        missing.push("attention op parameters");
    }
    let [Some(q), Some(k), Some(v), Some(kq), Some(vq), Some(mask), Some(out)] =
        roles.map(|r| g.get(r))
    else {
        return Ok(Outcome::Missing(Missing(missing)));
    };
    let Some(params) = g.params else {
        return Ok(Outcome::Missing(Missing(missing)));
    };
    let (step, layer) = (g.step, g.layer);
    let qd = dense(q)?;
    let kd = concat_cells(&dense(kq)?, &dense(k)?)?;
    let vd = concat_cells(&dense(vq)?, &dense(v)?)?;
    let md = dense(mask)?;
    output_fits(g, qd.ne, vd.ne, out.values.len())?;
    budget.spend(attention_work(qd.ne, kd.ne, vd.ne))?;
    let p = AttentionParams {
        scale: f64::from(params.scale),
        max_bias: f64::from(params.max_bias),
        softcap: f64::from(params.softcap),
    };
    let reference = attention(&qd, &kd, &vd, Some(&md), None, &p)
        .map_err(|e| VerifyError::Malformed(format!("step {step} layer {layer}: {e}")))?;
    let mut checked = judge(
        g,
        MIXED_ATTN_OP.to_owned(),
        &reference,
        &out.values,
        MIXED_NMSE_BOUND,
    )?;
    if let Some(f) = super::intermediate::attn_equals_kqv_out(g, true, &out.values) {
        checked.pass = false;
        checked.findings.push(f);
    }
    Ok(Outcome::Checked(checked))
}
