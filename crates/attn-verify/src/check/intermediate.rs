//! The intermediates a trace holds besides the inputs and `kqv_out`, checked against
//! what they are documented to equal (docs/trace-format.md, "Roles"; docs/verification.md,
//! "Intermediates"):
//!
//! - `attn`, the attention op's own result, holds `kqv_out`'s values: with flash
//!   attention (and the mixed node) `kqv_out` is its reshape (`[D_v, H, T]` read flat),
//!   without it a contiguous copy of its permute (`attn` is `[D_v, T, H]`). Equal bit for
//!   bit.
//! - `kq` (no flash attention) = K·Q, per head and token, from the traced k and q (q
//!   rounded to K's dot type as for the reference): NMSE at most [`KQ_NMSE_BOUND`].
//! - `kq_soft_max` = softmax over the cells of `kq * scale + slope * mask` (with the
//!   softcap as the reference applies it, and the sinks in the denominator), from the
//!   traced `kq`: NMSE at most [`KQ_NMSE_BOUND`]. Rows whose every cell is masked are not
//!   compared.
//!
//! Each mismatch is a [`Finding`] naming the tensor (no repair: `nmse_after` is `None`)
//! and fails the group.

use tensor_stats::{alibi_slope, sci, Dense};
use trace_format::meta::Role;

use crate::diagnose::{Finding, Suspect};
use crate::group::Group;
use crate::recompute::Inputs;
use crate::VerifyError;

/// NMSE bound of `kq` and `kq_soft_max` against their recomputation: f32 dot products
/// and an f32 softmax (the honest non-flash traces of the test suite, tiny LLaMA with
/// f16/bf16/f32/q8_0 caches and gemma-3-270m, pass it).
pub const KQ_NMSE_BOUND: f64 = 1e-6;

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

fn finding(g: &Group, role: Role, what: String) -> Finding {
    Finding {
        suspect: Suspect::Tensor(role),
        tensor: g.get(role).map(|o| o.name.clone()).unwrap_or_default(),
        what,
        nmse_after: None,
    }
}

/// `attn` against `kqv_out` (`flash`: the reshape; else the permute).
pub(crate) fn attn_equals_kqv_out(g: &Group, flash: bool, out: &[f32]) -> Option<Finding> {
    let attn = g.get(Role::Attn)?;
    let [dv, a1, a2, ns] = attn.layout.ne.map(|x| x as usize);
    let a = &attn.values;
    if a.len() != out.len() {
        return Some(finding(
            g,
            Role::Attn,
            format!(
                "holds {} values, kqv_out {}: it is documented to hold kqv_out's values",
                a.len(),
                out.len()
            ),
        ));
    }
    let mut differ = 0usize;
    for s in 0..ns {
        for i2 in 0..a2 {
            for i1 in 0..a1 {
                for d in 0..dv {
                    let at = d + dv * (i1 + a1 * (i2 + a2 * s));
                    // flash: [Dv, H, T] flat = kqv_out; else [Dv, T, H] -> kqv_out[d + Dv*h, t].
                    let o = if flash {
                        at
                    } else {
                        d + dv * (i2 + a2 * (i1 + a1 * s))
                    };
                    if a[at].to_bits() != out[o].to_bits() {
                        differ += 1;
                    }
                }
            }
        }
    }
    (differ > 0).then(|| {
        finding(
            g,
            Role::Attn,
            format!(
                "differs from kqv_out in {differ} of {} values; kqv_out is documented to be its {}",
                a.len(),
                if flash { "reshape" } else { "permute" }
            ),
        )
    })
}

/// The group's intermediates against what they are documented to equal.
pub(crate) fn check(g: &Group, inp: &Inputs, out: &[f32]) -> Result<Vec<Finding>, VerifyError> {
    let mut found: Vec<Finding> = attn_equals_kqv_out(g, inp.flash, out).into_iter().collect();
    let (q, k) = (&inp.q, &inp.k);
    let [d, nt, nh, ns] = q.ne;
    let [_, n_kv, nhk, _] = k.ne;
    let shape = [n_kv, nt, nh, ns];
    let want = n_kv * nt * nh * ns;
    let kq = g.get(Role::Kq);
    if let Some(kq) = kq {
        if kq.values.len() != want || nhk == 0 || nh % nhk != 0 {
            found.push(finding(
                g,
                Role::Kq,
                format!("ne {:?} is not [n_kv, T, H, S] = {shape:?}", kq.layout.ne),
            ));
        } else {
            // K·Q costs heads x tokens x cells x D: within the group's budget.
            inp.budget.spend((nh * nt * n_kv * d * ns) as u128)?;
            let r = nh / nhk;
            let mut reference = vec![0.0f64; want];
            for s in 0..ns {
                for h in 0..nh {
                    for t in 0..nt {
                        let q0 = ((s * nh + h) * nt + t) * d;
                        let qrow = &q.data[q0..q0 + d];
                        for j in 0..n_kv {
                            let k0 = ((s * nhk + h / r) * n_kv + j) * d;
                            let krow = &k.data[k0..k0 + d];
                            reference[j + n_kv * (t + nt * (h + nh * s))] =
                                qrow.iter().zip(krow).map(|(a, b)| a * b).sum();
                        }
                    }
                }
            }
            let e = nmse(&reference, &kq.values);
            if crate::bounds::exceeds(e, KQ_NMSE_BOUND) {
                found.push(finding(
                    g,
                    Role::Kq,
                    format!(
                        "is not K·Q of the traced k and q: NMSE {} (bound {KQ_NMSE_BOUND:e})",
                        sci(e)
                    ),
                ));
            }
        }
    }
    if let (Some(sm), Some(kq)) = (g.get(Role::KqSoftMax), kq) {
        if sm.values.len() != want || kq.values.len() != want {
            found.push(finding(
                g,
                Role::KqSoftMax,
                format!("ne {:?} is not [n_kv, T, H, S] = {shape:?}", sm.layout.ne),
            ));
        } else {
            let (reference, compared) = softmax(inp, &kq.values, shape)?;
            let actual: Vec<f32> = compared.iter().map(|&i| sm.values[i]).collect();
            let e = nmse(&reference, &actual);
            if crate::bounds::exceeds(e, KQ_NMSE_BOUND) {
                found.push(finding(
                    g,
                    Role::KqSoftMax,
                    format!(
                        "is not softmax(kq * scale + mask) of the traced kq and mask: NMSE {} (bound {KQ_NMSE_BOUND:e})",
                        sci(e)
                    ),
                ));
            }
        }
    }
    Ok(found)
}

/// softmax((kq + kq_bias) * scale + slope * mask) per row, with the reference's softcap and sinks;
/// the values of the rows that have an unmasked cell, and their indices.
fn softmax(
    inp: &Inputs,
    kq: &[f32],
    [n_kv, nt, nh, ns]: [usize; 4],
) -> Result<(Vec<f64>, Vec<usize>), VerifyError> {
    let p = &inp.p;
    let scale = if p.softcap != 0.0 {
        p.scale / p.softcap
    } else {
        p.scale
    };
    let mask: Option<&Dense> = inp.mask.as_ref();
    if let Some(m) = mask {
        let [m0, m1, m2, m3] = m.ne;
        if m0 != n_kv || m1 < nt || m2 == 0 || nh % m2 != 0 || m3 == 0 || ns % m3 != 0 {
            return Err(VerifyError::Malformed(format!(
                "mask ne {:?} does not cover kq [{n_kv}, {nt}, {nh}, {ns}]",
                m.ne
            )));
        }
    }
    let mut values = Vec::with_capacity(kq.len());
    let mut index = Vec::with_capacity(kq.len());
    let mut row = vec![None; n_kv];
    for s in 0..ns {
        for h in 0..nh {
            let slope = alibi_slope(p.max_bias, nh, h);
            let sink = inp.sinks.as_ref().and_then(|x| x.get(h).copied());
            for t in 0..nt {
                let base = n_kv * (t + nt * (h + nh * s));
                let mut max = f64::NEG_INFINITY;
                for (j, x) in row.iter_mut().enumerate() {
                    let mv = mask
                        .and_then(|m| m.get(j, t, h % m.ne[2], s % m.ne[3]))
                        .map_or(0.0, |v| slope * v);
                    if mv == f64::NEG_INFINITY {
                        *x = None;
                        continue;
                    }
                    let mut v = f64::from(kq[base + j]);
                    if let Some(b) = &inp.bias {
                        v += tensor_stats::bias_at(b, j, t, h, s);
                    }
                    v *= scale;
                    if p.softcap != 0.0 {
                        v = p.softcap * v.tanh();
                    }
                    v += mv;
                    max = max.max(v);
                    *x = Some(v);
                }
                if max == f64::NEG_INFINITY {
                    continue;
                }
                if let Some(sv) = sink {
                    max = max.max(sv);
                }
                let mut sum: f64 = row.iter().flatten().map(|x| (x - max).exp()).sum();
                if let Some(sv) = sink {
                    sum += (sv - max).exp();
                }
                for (j, x) in row.iter().enumerate() {
                    values.push(x.map_or(0.0, |x| (x - max).exp() / sum));
                    index.push(base + j);
                }
            }
        }
    }
    Ok((values, index))
}
