//! Recompute each traced attention from its traced inputs (in f64, with the layouts the
//! trace recorded, never guessed from names) and compare with the traced output.

use gguf_io::{quant, GgmlType};
use tensor_stats::{attention, AttentionParams, Dense};

use crate::meta::Role;
use crate::read::{TraceFile, TracedTensor};
use crate::TraceError;

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
}

/// Inputs a group lacks for a recomputation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Missing(pub Vec<&'static str>);

fn dense(trace: &TraceFile, t: &TracedTensor) -> Result<Dense, TraceError> {
    let ne = t.meta.layout.ne.map(|x| x as usize);
    let v = trace.f32(t)?;
    Dense::from_f32(ne, &v).map_err(|e| TraceError::Format(format!("{}: {e}", t.name)))
}

/// Swap dims 0 and 1 (the transposed V of the non-flash path is [n_kv, Dv, H]).
fn transpose01(d: &Dense) -> Result<Dense, TraceError> {
    let [a, b, c, e] = d.ne;
    Dense::from_fn([b, a, c, e], |i0, i1, i2, i3| {
        d.get(i1, i0, i2, i3).unwrap_or(f64::NAN)
    })
    .map_err(|e| TraceError::Format(e.to_string()))
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

/// Recompute the attention of (step, layer) and compare it with the traced `kqv_out`.
pub fn verify_group(
    trace: &TraceFile,
    step: u32,
    layer: i32,
) -> Result<Result<Verification, Missing>, TraceError> {
    let find = |r| trace.find(r, layer, step);
    let (q, k, v, out) = (
        find(Role::Q),
        find(Role::K),
        find(Role::V),
        find(Role::KqvOut),
    );
    let attn = trace.attn(step, layer);
    let mut missing = Vec::new();
    for (name, present) in [
        ("q", q.is_some()),
        ("k", k.is_some()),
        ("v", v.is_some()),
        ("kqv_out", out.is_some()),
        ("attention op parameters", attn.is_some()),
    ] {
        if !present {
            missing.push(name);
        }
    }
    let (Some(q), Some(k), Some(v), Some(out), Some(attn)) = (q, k, v, out, attn) else {
        return Ok(Err(Missing(missing)));
    };
    let mut qd = dense(trace, q)?;
    // Both paths take Q·K with ggml's vec_dot (flash attention, or the `kq` MUL_MAT).
    round_q_like_ggml(&mut qd, k.meta.layout.ty)?;
    let kd = dense(trace, k)?;
    let mut vd = dense(trace, v)?;
    let flash = attn.op == "FLASH_ATTN_EXT";
    if !flash {
        // Without flash attention V is read transposed: ne [n_kv, Dv, H_kv].
        vd = transpose01(&vd)?;
    }
    let mask = match find(Role::Mask) {
        Some(m) => Some(dense(trace, m)?),
        None => None,
    };
    let sinks = match find(Role::Sinks) {
        Some(s) => Some(trace.f32(s)?.into_iter().map(f64::from).collect::<Vec<_>>()),
        None => None,
    };
    let p = AttentionParams {
        scale: f64::from(attn.params.scale),
        max_bias: f64::from(attn.params.max_bias),
        softcap: f64::from(attn.params.softcap),
    };
    let reference = attention(&qd, &kd, &vd, mask.as_ref(), sinks.as_deref(), &p)
        .map_err(|e| TraceError::Format(format!("step {step} layer {layer}: {e}")))?;
    let actual = trace.f32(out)?;
    if actual.len() != reference.data.len() {
        return Err(TraceError::Format(format!(
            "step {step} layer {layer}: kqv_out has {} values, attention of the traced inputs {}",
            actual.len(),
            reference.data.len()
        )));
    }
    let [dv, n_head, _, _] = reference.ne;
    let r = &reference.data;
    let n = r.len();
    let mean = r.iter().sum::<f64>() / n.max(1) as f64;
    let var = r.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n.max(1) as f64;
    let (mut se, mut dot, mut na, mut nr, mut max_abs, mut worst_i) =
        (0.0f64, 0.0f64, 0.0f64, 0.0f64, 0.0f64, 0usize);
    for (i, (&a, &b)) in actual.iter().zip(r).enumerate() {
        let a = f64::from(a);
        let d = (a - b).abs();
        se += d * d;
        dot += a * b;
        na += a * a;
        nr += b * b;
        if d > max_abs || d.is_nan() {
            max_abs = d;
            worst_i = i;
        }
    }
    let mse = se / n.max(1) as f64;
    let nmse = if var > 0.0 {
        mse / var
    } else if mse == 0.0 {
        0.0
    } else {
        f64::INFINITY
    };
    let cosine = if na > 0.0 && nr > 0.0 {
        dot / (na.sqrt() * nr.sqrt())
    } else {
        0.0
    };
    let worst = (
        worst_i / (dv * n_head),
        (worst_i / dv) % n_head,
        worst_i % dv,
    );
    Ok(Ok(Verification {
        step,
        layer,
        nmse,
        max_abs,
        worst,
        cosine,
        n_elements: n,
    }))
}
