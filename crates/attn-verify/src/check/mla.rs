//! Absorbed multi-head latent attention (DeepSeek-V2/V3, Kimi-K2, GLM-4.5 and kin):
//! llama.cpp attends over a K-only latent cache (V is a view of K, its first
//! `kv_lora_rank` dims) and "decompresses" the result per head with a MUL_MAT by
//! `attn_v_b` before `kqv_out`:
//!
//! - with flash attention: FLASH_ATTN_EXT → PERMUTE → MUL_MAT(v_mla) → PERMUTE → CONT;
//! - without it: `kqv` → MUL_MAT(v_mla) → PERMUTE → CONT.
//!
//! The trace holds the attention op's own output (`attn`) and the weight (`v_mla`,
//! `[D_latent, D_v, H]`). A group is checked in two parts:
//!
//! 1. the attention: `attn` (read as `kqv_out` would be, `[D_latent, H, T]`) against the
//!    recomputation from the traced q, k and v, exactly as any other group (the same
//!    references, bounds and diagnosis);
//! 2. the projection: `kqv_out[d + D_v*h, t] = Σ_l v_mla[l, d, h] · attn[l, h, t]` in
//!    f64, `attn` first rounded to the weight's `vec_dot_type` as ggml's MUL_MAT converts
//!    it; NMSE at most [`PROJECTION_NMSE_BOUND`], else a finding on `kqv_out`.

use gguf_io::GgmlType;
use tensor_stats::{sci, Dense};
use trace_format::meta::Role;
use trace_format::TensorLayout;

use super::{check_with, Limits, Outcome};
use crate::diagnose::{Finding, Suspect};
use crate::group::{Fingerprints, Group, Operand};
use crate::kernel;
use crate::recompute::attn_err;
use crate::VerifyError;

/// NMSE bound of `kqv_out` against `v_mla · attn` when the weight's `vec_dot_type` is
/// modelled (F32, F16, BF16, the legacy quants): f32 dot products of at most a few
/// hundred terms (the zoo's honest traces are at 1e-14).
pub const PROJECTION_NMSE_BOUND: f64 = 1e-6;
/// The same for weight types whose `vec_dot_type` is not modelled (the K-quants' Q8_K):
/// the rounding of `attn` to 8 bits per value is left in the error.
pub const PROJECTION_NMSE_BOUND_UNMODELLED: f64 = 1e-4;

/// Is this a group of absorbed MLA (it holds `v_mla`)?
pub fn is_mla(g: &Group) -> bool {
    g.get(Role::VMla).is_some()
}

/// `attn` in `kqv_out`'s order, `[D_latent, H, T, S]`: with flash attention it is in
/// that order already; without it, `kqv` is `[D_latent, T, H, S]`.
fn attn_as_output(attn: &Operand, flash: bool) -> ([usize; 4], Vec<f32>) {
    let [d, a1, a2, ns] = attn.layout.ne.map(|x| x as usize);
    if flash {
        return ([d, a1, a2, ns], attn.values.clone());
    }
    // [d, T=a1, H=a2, S] -> [d, H, T, S]
    let mut out = vec![0f32; attn.values.len()];
    for s in 0..ns {
        for h in 0..a2 {
            for t in 0..a1 {
                let from = d * (t + a1 * (h + a2 * s));
                let to = d * (h + a2 * (t + a1 * s));
                out[to..to + d].copy_from_slice(&attn.values[from..from + d]);
            }
        }
    }
    ([d, a2, a1, ns], out)
}

fn nmse(reference: &[f64], actual: &[f32]) -> f64 {
    let n = reference.len().max(1) as f64;
    let mean = reference.iter().sum::<f64>() / n;
    let var: f64 = reference.iter().map(|x| (x - mean).powi(2)).sum();
    let se: f64 = reference
        .iter()
        .zip(actual)
        .map(|(r, &a)| (f64::from(a) - r).powi(2))
        .sum();
    if var > 0.0 {
        se / var
    } else if se == 0.0 {
        0.0
    } else {
        f64::INFINITY
    }
}

/// Check an absorbed-MLA group: its attention, then its projection (module docs).
pub fn check_mla(
    g: &Group,
    previous: Option<(u32, &Fingerprints)>,
    limits: &Limits,
) -> Result<Outcome, VerifyError> {
    let (Some(attn), Some(w), Some(out)) =
        (g.get(Role::Attn), g.get(Role::VMla), g.get(Role::KqvOut))
    else {
        let mut m = g.missing();
        if g.get(Role::Attn).is_none() {
            m.0.push("attn (the attention op's output, before v_mla)");
        }
        return Ok(Outcome::Missing(m));
    };
    let flash = g.flash();
    let (ne, latent) = attn_as_output(attn, flash);
    let [dl, nh, nt, ns] = ne;

    // 1. The attention, with attn in kqv_out's place.
    let mut inner = g.clone();
    inner
        .operands
        .retain(|o| !matches!(o.role, Role::VMla | Role::Attn | Role::KqvOut));
    let layout =
        TensorLayout::contiguous(GgmlType::F32, [(dl * nh) as u64, nt as u64, ns as u64, 1])
            .map_err(attn_err)?;
    inner.operands.push(Operand {
        role: Role::KqvOut,
        name: attn.name.clone(),
        layout,
        values: latent.clone(),
        fingerprint: attn.fingerprint,
    });
    let mut outcome = check_with(&inner, previous, limits)?;

    // 2. The projection kqv_out = v_mla · attn.
    let [wl, dv, wh, _] = w.layout.ne.map(|x| x as usize);
    if wl != dl || wh != nh || out.values.len() != dv * nh * nt * ns {
        return Err(VerifyError::Malformed(format!(
            "step {} layer {}: v_mla ne {:?} does not map attn [{dl}, {nh}, {nt}, {ns}] to kqv_out ne {:?}",
            g.step, g.layer, w.layout.ne, out.layout.ne
        )));
    }
    let rounding = kernel::vec_dot_type(w.layout.ty);
    let modelled = rounding.is_some() || w.layout.ty == GgmlType::F32;
    let mut lat = Dense::from_f32([dl, nh * nt * ns, 1, 1], &latent).map_err(attn_err)?;
    kernel::round_rows(&mut lat, rounding)?;
    let mut reference = vec![0f64; out.values.len()];
    for s in 0..ns {
        for t in 0..nt {
            for h in 0..nh {
                let a0 = dl * (h + nh * (t + nt * s));
                let a = &lat.data[a0..a0 + dl];
                for d in 0..dv {
                    let w0 = dl * (d + dv * h);
                    let wrow = &w.values[w0..w0 + dl];
                    reference[d + dv * (h + nh * (t + nt * s))] =
                        a.iter().zip(wrow).map(|(x, &y)| x * f64::from(y)).sum();
                }
            }
        }
    }
    let e = nmse(&reference, &out.values);
    let bound = if modelled {
        PROJECTION_NMSE_BOUND
    } else {
        PROJECTION_NMSE_BOUND_UNMODELLED
    };
    if let Outcome::Checked(c) = &mut outcome {
        if crate::bounds::exceeds(e, bound) {
            c.pass = false;
            c.findings.push(Finding {
                suspect: Suspect::Tensor(Role::KqvOut),
                tensor: out.name.clone(),
                what: format!(
                    "is not v_mla · attn (the latent attention decompressed by {}): NMSE {} (bound {bound:e})",
                    w.name,
                    sci(e)
                ),
                nmse_after: None,
            });
        }
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn operand(role: Role, ne: [u64; 4], values: Vec<f32>) -> Operand {
        let layout = TensorLayout::contiguous(GgmlType::F32, ne).expect("layout");
        Operand {
            role,
            name: role.name().to_string(),
            fingerprint: crate::group::Fingerprint::of(&layout, &[]),
            layout,
            values,
        }
    }

    #[test]
    fn attn_without_flash_is_permuted_to_the_output_order() {
        // [d=2, T=3, H=2]: value = 100 t + 10 h + i
        let mut v = Vec::new();
        for h in 0..2 {
            for t in 0..3 {
                for i in 0..2 {
                    v.push((100 * t + 10 * h + i) as f32);
                }
            }
        }
        let a = operand(Role::Attn, [2, 3, 2, 1], v);
        let (ne, out) = attn_as_output(&a, false);
        assert_eq!(ne, [2, 2, 3, 1]);
        // [d, H, T]: index i + 2 (h + 2 t)
        for t in 0..3 {
            for h in 0..2 {
                for i in 0..2 {
                    assert_eq!(out[i + 2 * (h + 2 * t)], (100 * t + 10 * h + i) as f32);
                }
            }
        }
        let (ne, same) = attn_as_output(&a, true);
        assert_eq!((ne, same), ([2, 3, 2, 1], a.values.clone()));
    }
}
