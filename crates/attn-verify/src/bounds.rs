//! Metrics and bounds: the documented NMSE bound of a group, the cells a query row
//! attends to, and the comparison of a recomputed reference with the traced output.

use std::ops::Range;

use gguf_io::GgmlType;

use crate::kernel::KernelPath;
use tensor_stats::Dense;

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

/// The NMSE bound of a group judged against the kernel-faithful reference of `path`
/// ([`crate::kernel`]), by the traced V type and whether ggml's F16 dot product order is
/// modelled (`exact_dot`: an AVX2 build, K F16). Measured on the project's models and ggml itself
/// (docs/verification.md, "Bounds"); none grows with the context:
///
/// - an F16 accumulator (one-chunk or split-KV over an F16 V) with the dot order modelled:
///   bit for bit on every test (with libm's own `expf` and `tanhf`), gemma-3-270m at 2k
///   cells included: 1e-12;
/// - the same without the dot order: one score in a few thousand rounds the other way and
///   tips an F16 rounding (measured up to 4e-8): 1e-7;
/// - f32 accumulation (tiled, or a V that is not F16), modelled in f64 (3.0e-12 on
///   gemma's 512-token ubatches): 1e-10;
/// - without flash attention the softmax is rounded to F16 for the product with V, and
///   ggml's SIMD `expf` tips a few of those roundings (up to 3.4e-9 on the zoo): 3e-8; a
///   group over it gets an allowance for the roundings its score errors could flip
///   (`check`, [`crate::kernel::unfused_tip_energy`]).
pub fn faithful_bound(path: KernelPath, v_type: GgmlType, exact_dot: bool) -> f64 {
    match path {
        KernelPath::OneChunk | KernelPath::SplitKv { .. } if v_type == GgmlType::F16 => {
            if exact_dot {
                1e-12
            } else {
                1e-7
            }
        }
        KernelPath::OneChunk | KernelPath::SplitKv { .. } | KernelPath::Tiled => 1e-10,
        KernelPath::Unfused => 3e-8,
    }
}

/// The most cells one query row attends to: cells whose mask value is not -inf, over the
/// rows of the step's tokens (all `n_kv` cells without a mask).
pub(crate) fn attended_cells(mask: Option<&Dense>, n_kv: usize, n_tokens: usize) -> usize {
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

/// Over the bound, NaN included.
pub(crate) fn exceeds(nmse: f64, bound: f64) -> bool {
    nmse.partial_cmp(&bound) != Some(std::cmp::Ordering::Less)
        && nmse.partial_cmp(&bound) != Some(std::cmp::Ordering::Equal)
}
