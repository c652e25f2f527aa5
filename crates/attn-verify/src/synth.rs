//! Honest synthetic traces for tests and benches (no llama.cpp): every group's inputs are
//! seeded random values and its outputs and intermediates are computed from them in f64
//! with the reference's semantics, so the trace passes validation and every group
//! verifies. [`trace_format::synth::rewrite`] then makes them lie.

use tensor_stats::{attention, AttentionParams, Dense};
use trace_format::meta::{AttnParams, Role};
use trace_format::synth::{self, Group, Shapes};

use crate::VerifyError;

/// What to generate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spec {
    pub shapes: Shapes,
    pub n_steps: u32,
    pub n_layer: u32,
    pub seed: u64,
}

impl Default for Spec {
    fn default() -> Self {
        Self {
            shapes: Shapes::default(),
            n_steps: 2,
            n_layer: 2,
            seed: 1,
        }
    }
}

fn err(e: impl std::fmt::Display) -> VerifyError {
    VerifyError::Malformed(e.to_string())
}

/// xorshift64* values in [-1, 1).
fn values(n: usize, seed: &mut u64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            *seed ^= *seed >> 12;
            *seed ^= *seed << 25;
            *seed ^= *seed >> 27;
            let x = seed.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40;
            x as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// One honest group.
pub fn group(s: &Shapes, step: u32, layer: i32, seed: &mut u64) -> Result<Group, VerifyError> {
    let [d, t, h, hk, n_kv] =
        [s.head_dim, s.n_tokens, s.n_head, s.n_head_kv, s.n_kv].map(|x| x as usize);
    let scale = 1.0 / (d as f32).sqrt();
    let q = values(d * t * h, seed);
    let k = values(d * n_kv * hk, seed);
    let v = values(d * n_kv * hk, seed);
    // Token i sees cells 0..n_kv - t + i + 1 (a causal mask over the last cells).
    let mut mask = vec![0.0f32; n_kv * t];
    for i in 0..t {
        for c in (n_kv + i + 1).saturating_sub(t)..n_kv {
            mask[c + n_kv * i] = f32::NEG_INFINITY;
        }
    }
    let qd = Dense::from_f32([d, t, h, 1], &q).map_err(err)?;
    let kd = Dense::from_f32([d, n_kv, hk, 1], &k).map_err(err)?;
    let vd = Dense::from_f32([d, n_kv, hk, 1], &v).map_err(err)?;
    let md = Dense::from_f32([n_kv, t, 1, 1], &mask).map_err(err)?;
    let p = AttentionParams::with_scale(f64::from(scale));
    let out = attention(&qd, &kd, &vd, Some(&md), None, &p).map_err(err)?;
    let out: Vec<f32> = out.data.iter().map(|&x| x as f32).collect();
    let mut tensors = Vec::new();
    for (role, ne) in s.roles() {
        let vals = match role {
            Role::KqvOut => out.clone(),
            Role::Attn if s.flash => out.clone(),
            // [Dv, T, H] from kqv_out's [Dv, H, T].
            Role::Attn => {
                let mut a = vec![0.0; out.len()];
                for hh in 0..h {
                    for tt in 0..t {
                        for dd in 0..d {
                            a[dd + d * (tt + t * hh)] = out[dd + d * (hh + h * tt)];
                        }
                    }
                }
                a
            }
            Role::Q => q.clone(),
            Role::K => k.clone(),
            Role::V if s.flash => v.clone(),
            // Stored transposed: [n_kv, Dv, H_kv].
            Role::V => {
                let mut x = vec![0.0; v.len()];
                for j in 0..hk {
                    for c in 0..n_kv {
                        for dd in 0..d {
                            x[c + n_kv * (dd + d * j)] = v[dd + d * (c + n_kv * j)];
                        }
                    }
                }
                x
            }
            Role::Mask => mask.clone(),
            Role::Kq | Role::KqSoftMax => {
                let mut kq = vec![0.0f32; n_kv * t * h];
                for hh in 0..h {
                    for tt in 0..t {
                        for c in 0..n_kv {
                            let kh = hh / (h / hk);
                            let dot: f64 = (0..d)
                                .map(|dd| {
                                    f64::from(q[dd + d * (tt + t * hh)])
                                        * f64::from(k[dd + d * (c + n_kv * kh)])
                                })
                                .sum();
                            kq[c + n_kv * (tt + t * hh)] = dot as f32;
                        }
                    }
                }
                if role == Role::Kq {
                    kq
                } else {
                    for row in 0..t * h {
                        let tt = row % t;
                        let r = &mut kq[row * n_kv..(row + 1) * n_kv];
                        let x: Vec<f64> = r
                            .iter()
                            .enumerate()
                            .map(|(c, &s)| {
                                f64::from(s) * f64::from(scale) + f64::from(mask[c + n_kv * tt])
                            })
                            .collect();
                        let max = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                        let sum: f64 = x.iter().map(|v| (v - max).exp()).sum();
                        for (o, v) in r.iter_mut().zip(&x) {
                            *o = ((v - max).exp() / sum) as f32;
                        }
                    }
                    kq
                }
            }
            _ => return Err(err(format!("synth: no values for {role}"))),
        };
        tensors.push((role, ne, vals));
    }
    Ok(Group {
        step,
        layer,
        tensors,
        op: s.op().into(),
        params: AttnParams {
            scale,
            max_bias: 0.0,
            softcap: 0.0,
        },
    })
}

/// An honest trace of `n_steps` x `n_layer` groups, as GGUF bytes, stored full (format
/// version 1: every GGUF tensor is its tensor), as the tests that use it rewrite tensors
/// in the GGUF in place.
pub fn honest_trace(spec: &Spec) -> Result<Vec<u8>, VerifyError> {
    let mut seed = spec.seed.max(1);
    let mut groups = Vec::with_capacity((spec.n_steps * spec.n_layer) as usize);
    for step in 0..spec.n_steps {
        for layer in 0..spec.n_layer as i32 {
            groups.push(group(&spec.shapes, step, layer, &mut seed)?);
        }
    }
    Ok(synth::write_with(
        trace_format::KvStorage::Full,
        &synth::run_meta(&spec.shapes, spec.n_layer),
        &synth::steps(spec.n_steps, spec.shapes.n_tokens as u32),
        groups,
    )?)
}
