//! The kernel-faithful reference: attention recomputed with the precision steps of the
//! ggml CPU code path that computed the traced group, so that an honest group agrees with
//! it to a bound that does not grow with the context (docs/verification.md, "Kernel
//! models").
//!
//! Which path ran is decided as ggml-cpu decides it (`ggml_compute_forward_flash_attn_ext_f16`
//! in `ggml/src/ggml-cpu/ops.cpp` at the pinned tree), from what the trace records: the
//! backend that ran the op (`kqv_trace.attn.backend`), the threads the step was computed
//! with (`kqv_trace.attn.n_threads`), the op, the traced types and shapes:
//!
//! | path | when | precision modelled |
//! |---|---|---|
//! | [`KernelPath::SplitKv`] | flash attention, one query token, one sequence, K and V both F16 (or both F32), Q F32, `n_kv >= 512` | the KV range cut into `n_threads` chunks of `ceil(n_kv / n_threads)` cells; each chunk as `OneChunk`; partials merged in f32 in chunk order |
//! | [`KernelPath::Tiled`] | flash attention, `>= 64` query tokens, K and V both F16 (or both F32), Q F32 | f32 GEMMs on unrounded Q: modelled in f64 (f32-level differences only) |
//! | [`KernelPath::OneChunk`] | every other flash attention | Q rounded to K's `vec_dot_type`; scores in f32; online softmax in f32 (`expf`); an F16 V accumulated in an **F16** buffer (scaled and multiply-added in f32, rounded to F16 after every cell), any other V in f32; the sum `S` in f32; sinks after the cells |
//! | [`KernelPath::Unfused`] | no flash attention (`MUL_MAT`, `SOFT_MAX`, `MUL_MAT`) | Q rounded to K's `vec_dot_type`; the softmax in f64, its probabilities rounded to V's `vec_dot_type` (F16 for an F16 V) before the product with V |
//!
//! The model is x86-64's (and NEON's f32 arithmetic): on SVE ggml accumulates F16 in F16
//! arithmetic, which this does not model. A group whose path cannot be named (another
//! backend, a trace without the kernel facts, the mixed cache's node) is judged against the
//! exact f64 reference with the older, looser bound ([`crate::bounds::nmse_bound`]).

use std::fmt;

use gguf_io::{quant, GgmlType};
use half::f16;
use tensor_stats::{alibi_slope, AttentionParams, Dense};

use crate::group::KernelFacts;
use crate::recompute::attn_err;
use crate::VerifyError;

/// ggml-cpu's query tile (`GGML_FA_TILE_Q`): flash attention over at least this many query
/// tokens takes the tiled path.
pub const FA_TILE_Q: usize = 64;
/// ggml-cpu splits the KV range of a single-token flash attention across threads from
/// this many cells on.
pub const SPLIT_KV_MIN_CELLS: usize = 512;

/// The ggml CPU code path that computed a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelPath {
    /// Flash attention, each query row over all cells in one pass.
    OneChunk,
    /// Flash attention of one token, the KV range split into `n_chunks` chunks.
    SplitKv { n_chunks: usize },
    /// Flash attention of a batch, in f32 tiles.
    Tiled,
    /// No flash attention: `kq` MUL_MAT, SOFT_MAX, `kqv` MUL_MAT.
    Unfused,
}

impl KernelPath {
    /// A short name without spaces (the verification table's `kernel` column).
    pub fn short(&self) -> String {
        match self {
            KernelPath::OneChunk => "one-chunk".into(),
            KernelPath::SplitKv { n_chunks } => format!("split-kv/{n_chunks}"),
            KernelPath::Tiled => "tiled".into(),
            KernelPath::Unfused => "unfused".into(),
        }
    }
}

impl fmt::Display for KernelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KernelPath::OneChunk => f.write_str("cpu flash one-chunk"),
            KernelPath::SplitKv { n_chunks } => write!(f, "cpu flash split-KV x{n_chunks}"),
            KernelPath::Tiled => f.write_str("cpu flash tiled"),
            KernelPath::Unfused => f.write_str("cpu mul_mat+soft_max"),
        }
    }
}

/// What decides the path of a group.
pub(crate) struct PathFacts<'a> {
    pub(crate) kernel: &'a KernelFacts,
    pub(crate) op: &'a str,
    pub(crate) q_type: GgmlType,
    pub(crate) k_type: GgmlType,
    pub(crate) v_type: GgmlType,
    /// Q's `ne`: [D, n_tokens, n_head, n_seq].
    pub(crate) q_ne: [usize; 4],
    pub(crate) n_kv: usize,
}

/// The path ggml-cpu took for a group, or why it cannot be named.
pub(crate) fn select(f: &PathFacts<'_>) -> Result<KernelPath, String> {
    match f.kernel.backend.as_str() {
        "" => return Err("the trace does not record which backend ran the op".into()),
        "CPU" => {}
        other => return Err(format!("the op ran on the {other} backend, not modelled")),
    }
    match f.op {
        crate::FLASH_OP => {}
        "SOFT_MAX" => return Ok(KernelPath::Unfused),
        other => return Err(format!("no kernel model for the {other} op")),
    }
    let kv_f32_or_f16 = matches!(f.k_type, GgmlType::F32 | GgmlType::F16);
    let same = f.k_type == f.v_type;
    let q_f32 = f.q_type == GgmlType::F32;
    let [_, n_tokens, _, n_seq] = f.q_ne;
    if n_tokens == 1 && n_seq == 1 && kv_f32_or_f16 && same && q_f32 && f.n_kv >= SPLIT_KV_MIN_CELLS
    {
        return match f.kernel.n_threads {
            0 => Err("the trace does not record the thread count the step ran with".into()),
            n => Ok(KernelPath::SplitKv {
                n_chunks: n as usize,
            }),
        };
    }
    if q_f32 && kv_f32_or_f16 && same && n_tokens >= FA_TILE_Q {
        return Ok(KernelPath::Tiled);
    }
    Ok(KernelPath::OneChunk)
}

/// For a group that ran on an RPC server (`kqv_trace.attn.backend` `RPC0[host:port]`):
/// the path this build's CPU backend would have taken, the hypothesis that the server is
/// this build's CPU backend (as `kcm-rpc-server` is; ggml-rpc does not tell the client
/// what a server runs). `None` where that path depends on the server's thread count
/// (split-KV: the trace records the client's threads, not the server's), for any other
/// backend, and where no CPU path can be named. [`crate::check`] keeps the hypothesis
/// only when the group matches the path's model within its bound; otherwise the group is
/// judged against the exact reference as before.
pub(crate) fn rpc_cpu_path(f: &PathFacts<'_>) -> Option<KernelPath> {
    if !f.kernel.backend.starts_with("RPC") {
        return None;
    }
    let cpu = KernelFacts {
        backend: "CPU".into(),
        // Unknown: a split-KV step is then not named (select says why).
        n_threads: 0,
        simd: f.kernel.simd.clone(),
    };
    match select(&PathFacts {
        kernel: &cpu,
        op: f.op,
        q_type: f.q_type,
        k_type: f.k_type,
        v_type: f.v_type,
        q_ne: f.q_ne,
        n_kv: f.n_kv,
    }) {
        Ok(KernelPath::SplitKv { .. }) | Err(_) => None,
        Ok(path) => Some(path),
    }
}

/// The type ggml converts the other operand to before a dot product with a row of `ty`
/// (`vec_dot_type` of ggml-cpu's type traits): F16 for F16, Q8_0 for the legacy 4/5/8-bit
/// quants and IQ4_NL, BF16 for BF16; `None` (no conversion: F32 stays F32) otherwise.
pub(crate) fn vec_dot_type(ty: GgmlType) -> Option<GgmlType> {
    match ty {
        GgmlType::F16 => Some(GgmlType::F16),
        GgmlType::BF16 => Some(GgmlType::BF16),
        GgmlType::Q4_0
        | GgmlType::Q4_1
        | GgmlType::Q5_0
        | GgmlType::Q5_1
        | GgmlType::Q8_0
        | GgmlType::IQ4_NL => Some(GgmlType::Q8_0),
        _ => None,
    }
}

/// Round every row (ne0 values) of `d` through `ty` (quantize, dequantize), as ggml
/// converts an operand to the other's `vec_dot_type`. `None` leaves it as it is.
pub(crate) fn round_rows(d: &mut Dense, ty: Option<GgmlType>) -> Result<(), VerifyError> {
    let Some(ty) = ty else { return Ok(()) };
    let n = d.ne[0];
    if n == 0 || ty.bytes_for(n as u64).is_none() {
        return Ok(());
    }
    let mut row = vec![0f32; n];
    for chunk in d.data.chunks_exact_mut(n) {
        for (r, &x) in row.iter_mut().zip(chunk.iter()) {
            *r = x as f32;
        }
        let bytes = quant::quantize(ty, &row).map_err(|e| VerifyError::Malformed(e.to_string()))?;
        quant::dequantize(ty, &bytes, &mut row)
            .map_err(|e| VerifyError::Malformed(e.to_string()))?;
        for (c, &r) in chunk.iter_mut().zip(row.iter()) {
            *c = f64::from(r);
        }
    }
    Ok(())
}

/// [`round_rows`] as the build that ran converts: on x86 with AVX2 ggml-cpu's own
/// `quantize_row_q8_0` ([`q8_0_row_x86`]) makes Q8_0 operands, which rounds differently
/// from the reference quantizer (`quant::quantize`) now and then; everything else as
/// [`round_rows`].
pub(crate) fn round_rows_as(
    d: &mut Dense,
    ty: Option<GgmlType>,
    dot: DotOrder,
) -> Result<(), VerifyError> {
    if ty != Some(GgmlType::Q8_0) || dot != DotOrder::Avx2 {
        return round_rows(d, ty);
    }
    let n = d.ne[0];
    if n == 0 || n % 32 != 0 {
        return round_rows(d, ty);
    }
    let mut row = vec![0f32; n];
    for chunk in d.data.chunks_exact_mut(n) {
        for (r, &x) in row.iter_mut().zip(chunk.iter()) {
            *r = x as f32;
        }
        let rounded = q8_0_row_x86(&row);
        for (c, &r) in chunk.iter_mut().zip(rounded.iter()) {
            *c = f64::from(r);
        }
    }
    Ok(())
}

/// A row (a whole number of 32-value blocks) quantized to Q8_0 and back as ggml-cpu's x86
/// `quantize_row_q8_0` (AVX/AVX2 builds, `arch/x86/quants.c`) does it: per block
/// `amax = max |x|`, the scale `d = amax / 127` stored as F16, the multiplier
/// `id = 127 / amax` (not `1 / d`, as the reference quantizer computes it), and
/// `q = round_half_even(x * id)` (`_mm256_round_ps(.., _MM_ROUND_NEAREST)`, where the
/// reference rounds half away from zero), saturated to i8; the value is then
/// `q * f16(d)`. Returns the dequantized row.
pub fn q8_0_row_x86(row: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(row.len());
    for block in row.chunks(32) {
        let amax = block.iter().fold(0.0f32, |m, &v| m.max(v.abs()));
        let d = f16::from_f32(amax / 127.0).to_f32();
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        for &v in block {
            let q = (v * id).round_ties_even().clamp(-128.0, 127.0);
            out.push(q * d);
        }
    }
    out
}

/// The operands of one recomputation, in the reference's layouts (see
/// [`tensor_stats::attention`]); `q` unrounded.
pub(crate) struct Operands<'a> {
    pub(crate) q: &'a Dense,
    pub(crate) k: &'a Dense,
    /// Logical [Dv, n_kv, H_v, S].
    pub(crate) v: &'a Dense,
    pub(crate) mask: Option<&'a Dense>,
    /// An additive score bias, added to `K·Q` before the scale (`kq_bias`).
    pub(crate) bias: Option<&'a Dense>,
    pub(crate) sinks: Option<&'a [f64]>,
    pub(crate) p: &'a AttentionParams,
    pub(crate) k_type: GgmlType,
    pub(crate) v_type: GgmlType,
    pub(crate) dot: DotOrder,
}

/// How ggml's `ggml_vec_dot_f16` sums, by the SIMD the library was built with
/// (`kqv_trace.run.cpu_simd`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DotOrder {
    /// AVX2 with FMA and F16C, no AVX-512: four 8-lane f32 FMA accumulators over steps of
    /// 32, reduced as `GGML_F32x8_REDUCE` does, leftovers added in double.
    Avx2,
    /// Any other build: the dot product in f64 (rounded to f32 once).
    Exact,
}

impl DotOrder {
    pub(crate) fn of(simd: &str) -> Self {
        let has = |f: &str| simd.split_whitespace().any(|x| x == f);
        if has("avx2") && has("fma") && has("f16c") && !has("avx512") {
            DotOrder::Avx2
        } else {
            DotOrder::Exact
        }
    }
}

/// `ggml_vec_dot_f16` on AVX2 (`vec.cpp`): lanes `sum[j][l]` accumulate element
/// `32 * i + 8 * j + l` by FMA in f32; then `sum[0] += sum[2]`, `sum[1] += sum[3]`,
/// `sum[0] += sum[1]`, the two 128-bit halves added, two horizontal adds; leftovers
/// (`n % 32`) added in double.
fn dot_avx2(x: &[f64], y: &[f64]) -> f32 {
    let n = x.len().min(y.len());
    let np = n & !31;
    let mut sum = [[0f32; 8]; 4];
    for i in (0..np).step_by(32) {
        for (j, acc) in sum.iter_mut().enumerate() {
            for (l, a) in acc.iter_mut().enumerate() {
                let e = i + 8 * j + l;
                *a = (x[e] as f32).mul_add(y[e] as f32, *a);
            }
        }
    }
    let [s0, s1, s2, s3] = sum;
    let a: [f32; 8] = std::array::from_fn(|l| s0[l] + s2[l]);
    let b: [f32; 8] = std::array::from_fn(|l| s1[l] + s3[l]);
    let r: [f32; 8] = std::array::from_fn(|l| a[l] + b[l]);
    let t0: [f32; 4] = std::array::from_fn(|l| r[l] + r[l + 4]);
    let res = (t0[0] + t0[1]) + (t0[2] + t0[3]);
    let mut sumf = f64::from(res);
    for e in np..n {
        sumf += f64::from((x[e] as f32) * (y[e] as f32));
    }
    sumf as f32
}

/// `expf` as ggml calls it: Rust's `f32::exp` is the platform libm's `expf`, the same
/// function ggml's scalar code calls (not always correctly rounded: an exp in f64 rounded
/// to f32 differs from it in the last bit now and then, which can tip an F16 rounding).
fn expf(x: f32) -> f32 {
    x.exp()
}

fn f16_round(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// Index helpers over contiguous `ne`-ordered data.
fn at(ne: [usize; 4], i1: usize, i2: usize, i3: usize) -> usize {
    ne[0] * (i1 + ne[1] * (i2 + ne[2] * i3))
}

/// One query row's pass over cells `cells` (ggml's `..._one_chunk` for one `ir`): the
/// running max `M`, sum `S` and the accumulator converted to f32 (not yet divided by `S`).
struct Partial {
    m: f32,
    s: f32,
    acc: Vec<f32>,
}

/// Shape facts checked once before any row is computed.
struct Shape {
    d: usize,
    dv: usize,
    n_tokens: usize,
    n_head: usize,
    n_seq: usize,
    n_kv: usize,
    rk: usize,
    rv: usize,
}

fn shape(o: &Operands<'_>) -> Result<Shape, VerifyError> {
    let bad = |m: String| VerifyError::Malformed(m);
    let [d, n_tokens, n_head, n_seq] = o.q.ne;
    let [dk, n_kv, hk, sk] = o.k.ne;
    let [dv, v_kv, hv, sv] = o.v.ne;
    if dk != d || v_kv != n_kv || sk != n_seq || sv != n_seq {
        return Err(bad(format!(
            "kernel model: q {:?}, k {:?}, v {:?} do not fit together",
            o.q.ne, o.k.ne, o.v.ne
        )));
    }
    if hk == 0 || hv == 0 || n_head % hk != 0 || n_head % hv != 0 {
        return Err(bad(format!(
            "kernel model: {hk} K heads / {hv} V heads do not divide {n_head} query heads"
        )));
    }
    if let Some(m) = o.mask {
        let [m0, m1, m2, m3] = m.ne;
        if m0 != n_kv || m1 < n_tokens || m2 == 0 || m3 == 0 || n_head % m2 != 0 || n_seq % m3 != 0
        {
            return Err(bad(format!("kernel model: mask {:?} does not fit", m.ne)));
        }
    }
    if let Some(b) = o.bias {
        let fits = [n_kv, n_tokens, n_head, n_seq]
            .iter()
            .zip(b.ne)
            .all(|(&n, bn)| bn > 0 && n % bn == 0);
        let n = b.ne.iter().try_fold(1usize, |a, &x| a.checked_mul(x));
        if !fits || n != Some(b.data.len()) {
            return Err(bad(format!("kernel model: bias {:?} does not fit", b.ne)));
        }
    }
    if let Some(s) = o.sinks {
        if s.len() != n_head {
            return Err(bad(format!(
                "kernel model: {} sinks for {n_head} heads",
                s.len()
            )));
        }
    }
    for (what, t) in [("q", o.q), ("k", o.k), ("v", o.v)] {
        let n = t.ne.iter().try_fold(1usize, |a, &x| a.checked_mul(x));
        if n != Some(t.data.len()) {
            return Err(bad(format!(
                "kernel model: {what} data does not fill {:?}",
                t.ne
            )));
        }
    }
    Ok(Shape {
        d,
        dv,
        n_tokens,
        n_head,
        n_seq,
        n_kv,
        rk: n_head / hk,
        rv: n_head / hv,
    })
}

/// The f32 score of every cell of one query row (`None`: masked, skipped), as ggml's
/// one-chunk path computes it: `s = dot * (scale / softcap)`, `softcap * tanhf(s)`, then
/// `+ slope * mask`.
fn scores_f32(
    o: &Operands<'_>,
    sh: &Shape,
    qrow: &[f64],
    t: usize,
    h: usize,
    s: usize,
    out: &mut [Option<f32>],
) {
    let p = o.p;
    let mut scale = p.scale as f32;
    let softcap = p.softcap as f32;
    if softcap != 0.0 {
        scale /= softcap;
    }
    let slope = alibi_slope(p.max_bias, sh.n_head, h) as f32;
    let kh = h / sh.rk;
    let k_base = at(o.k.ne, 0, kh, s);
    let mrow = o.mask.map(|m| {
        let start = at(m.ne, t, h % m.ne[2], s % m.ne[3]);
        &m.data[start..start + sh.n_kv]
    });
    for (j, slot) in out.iter_mut().enumerate() {
        let mv = mrow.map_or(0.0, |r| slope * r[j] as f32);
        if mv == f32::NEG_INFINITY {
            *slot = None;
            continue;
        }
        let krow = &o.k.data[k_base + j * sh.d..k_base + (j + 1) * sh.d];
        let mut dot = if o.dot == DotOrder::Avx2 && o.k_type == GgmlType::F16 {
            dot_avx2(qrow, krow)
        } else {
            qrow.iter().zip(krow).map(|(a, b)| a * b).sum::<f64>() as f32
        };
        if let Some(b) = o.bias {
            // ggml's ADD of the bias onto the f32 scores.
            dot += tensor_stats::bias_at(b, j, t, h, s) as f32;
        }
        let mut x = dot * scale;
        if softcap != 0.0 {
            // libm's tanhf, as ggml calls it.
            x = softcap * x.tanh();
        }
        *slot = Some(x + mv);
    }
}

/// ggml's one-chunk pass of one query row over `cells` (see the module docs).
fn one_chunk_row(
    o: &Operands<'_>,
    sh: &Shape,
    scores: &[Option<f32>],
    cells: std::ops::Range<usize>,
    vh: usize,
    s: usize,
    sink: Option<f32>,
) -> Partial {
    let dv = sh.dv;
    let v_base = at(o.v.ne, 0, vh, s);
    let f16_acc = o.v_type == GgmlType::F16;
    let mut acc = vec![0f32; dv];
    let (mut m, mut sum) = (f32::NEG_INFINITY, 0f32);
    for j in cells {
        let Some(x) = scores[j] else { continue };
        let vrow = &o.v.data[v_base + j * dv..v_base + (j + 1) * dv];
        let (mut ms, mut vs) = (1f32, 1f32);
        if x > m {
            let old = m;
            m = x;
            ms = expf(old - m);
            for a in acc.iter_mut() {
                *a *= ms;
                if f16_acc {
                    *a = f16_round(*a);
                }
            }
        } else {
            vs = expf(x - m);
        }
        for (a, &vv) in acc.iter_mut().zip(vrow) {
            *a = (vv as f32).mul_add(vs, *a);
            if f16_acc {
                *a = f16_round(*a);
            }
        }
        sum = sum.mul_add(ms, vs);
    }
    if let Some(sk) = sink {
        let (mut ms, mut vs) = (1f32, 1f32);
        if sk > m {
            ms = expf(m - sk);
            m = sk;
            acc.iter_mut().for_each(|a| *a *= ms);
        } else {
            vs = expf(sk - m);
        }
        sum = sum.mul_add(ms, vs);
    }
    Partial { m, s: sum, acc }
}

fn normalized(mut p: Partial) -> Vec<f32> {
    let inv = if p.s == 0.0 { 0.0 } else { 1.0 / p.s };
    p.acc.iter_mut().for_each(|a| *a *= inv);
    p.acc
}

/// ggml's merge of the split-KV partials of one head, in chunk order.
fn merge(parts: Vec<Partial>, dv: usize) -> Vec<f32> {
    let (mut m, mut sum) = (f32::NEG_INFINITY, 0f32);
    let mut acc = vec![0f32; dv];
    for p in parts {
        if p.s == 0.0 {
            continue;
        }
        let m_new = m.max(p.m);
        let (so, sn) = (expf(m - m_new), expf(p.m - m_new));
        for (a, &c) in acc.iter_mut().zip(&p.acc) {
            *a = a.mul_add(so, c * sn);
        }
        sum = sum.mul_add(so, p.s * sn);
        m = m_new;
    }
    if sum != 0.0 {
        let inv = 1.0 / sum;
        acc.iter_mut().for_each(|a| *a *= inv);
    }
    acc
}

/// The flash-attention paths that run row by row (one-chunk and split-KV).
fn flash_rows(o: &Operands<'_>, n_chunks: Option<usize>) -> Result<Dense, VerifyError> {
    let sh = shape(o)?;
    let mut q = o.q.clone();
    round_rows_as(&mut q, vec_dot_type(o.k_type), o.dot)?;
    let mut out = Dense::zeros([sh.dv, sh.n_head, sh.n_tokens, sh.n_seq]).map_err(attn_err)?;
    let mut scores = vec![None; sh.n_kv];
    for s in 0..sh.n_seq {
        for h in 0..sh.n_head {
            let vh = h / sh.rv;
            let sink = o.sinks.map(|x| x[h] as f32);
            for t in 0..sh.n_tokens {
                let qs = at(q.ne, t, h, s);
                let qrow = &q.data[qs..qs + sh.d];
                scores_f32(o, &sh, qrow, t, h, s, &mut scores);
                let row = match n_chunks {
                    None => normalized(one_chunk_row(o, &sh, &scores, 0..sh.n_kv, vh, s, sink)),
                    Some(n) => {
                        let n = n.max(1);
                        let size = sh.n_kv.div_ceil(n);
                        let parts = (0..n)
                            .map(|c| c * size)
                            .take_while(|&start| start < sh.n_kv)
                            .map(|start| {
                                let end = (start + size).min(sh.n_kv);
                                let sink = if start == 0 { sink } else { None };
                                one_chunk_row(o, &sh, &scores, start..end, vh, s, sink)
                            })
                            .collect();
                        merge(parts, sh.dv)
                    }
                };
                let os = sh.dv * (h + sh.n_head * (t + sh.n_tokens * s));
                for (dst, &x) in out.data[os..os + sh.dv].iter_mut().zip(&row) {
                    *dst = f64::from(x);
                }
            }
        }
    }
    Ok(out)
}

/// Without flash attention: Q rounded to K's dot type, the softmax (f64) rounded to V's
/// dot type before the product with V (f64).
fn unfused(o: &Operands<'_>) -> Result<Dense, VerifyError> {
    let sh = shape(o)?;
    let mut q = o.q.clone();
    round_rows_as(&mut q, vec_dot_type(o.k_type), o.dot)?;
    let p_type = vec_dot_type(o.v_type);
    let mut out = Dense::zeros([sh.dv, sh.n_head, sh.n_tokens, sh.n_seq]).map_err(attn_err)?;
    let mut scores = vec![None; sh.n_kv];
    let mut probs = Dense::zeros([sh.n_kv, 1, 1, 1]).map_err(attn_err)?;
    for s in 0..sh.n_seq {
        for h in 0..sh.n_head {
            let vh = h / sh.rv;
            let v_base = at(o.v.ne, 0, vh, s);
            for t in 0..sh.n_tokens {
                let qs = at(q.ne, t, h, s);
                let qrow = &q.data[qs..qs + sh.d];
                scores_exact(o, &sh, qrow, t, h, s, &mut scores);
                let sink = o.sinks.map(|x| x[h]);
                let max = scores
                    .iter()
                    .flatten()
                    .copied()
                    .chain(sink)
                    .fold(f64::NEG_INFINITY, f64::max);
                let mut sum = sink.map_or(0.0, |x| (x - max).exp());
                for (pj, sc) in probs.data.iter_mut().zip(&scores) {
                    *pj = sc.map_or(0.0, |x| (x - max).exp());
                    sum += *pj;
                }
                if max == f64::NEG_INFINITY || sum == 0.0 {
                    continue;
                }
                probs.data.iter_mut().for_each(|x| *x /= sum);
                round_rows_as(&mut probs, p_type, o.dot)?;
                let os = sh.dv * (h + sh.n_head * (t + sh.n_tokens * s));
                for (j, &pj) in probs.data.iter().enumerate() {
                    if pj == 0.0 {
                        continue;
                    }
                    let vrow = &o.v.data[v_base + j * sh.dv..v_base + (j + 1) * sh.dv];
                    for (dst, &vv) in out.data[os..os + sh.dv].iter_mut().zip(vrow) {
                        *dst += pj * vv;
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Scores in f64 (the tiled and unfused paths compute them in f32 GEMMs: f32-level
/// differences only).
fn scores_exact(
    o: &Operands<'_>,
    sh: &Shape,
    qrow: &[f64],
    t: usize,
    h: usize,
    s: usize,
    out: &mut [Option<f64>],
) {
    let p = o.p;
    let scale = if p.softcap != 0.0 {
        p.scale / p.softcap
    } else {
        p.scale
    };
    let slope = alibi_slope(p.max_bias, sh.n_head, h);
    let kh = h / sh.rk;
    let k_base = at(o.k.ne, 0, kh, s);
    let mrow = o.mask.map(|m| {
        let start = at(m.ne, t, h % m.ne[2], s % m.ne[3]);
        &m.data[start..start + sh.n_kv]
    });
    for (j, slot) in out.iter_mut().enumerate() {
        let mv = mrow.map_or(0.0, |r| slope * r[j]);
        if mv == f64::NEG_INFINITY {
            *slot = None;
            continue;
        }
        let krow = &o.k.data[k_base + j * sh.d..k_base + (j + 1) * sh.d];
        let mut dot: f64 = qrow.iter().zip(krow).map(|(a, b)| a * b).sum();
        if let Some(b) = o.bias {
            dot += tensor_stats::bias_at(b, j, t, h, s);
        }
        let mut x = dot * scale;
        if p.softcap != 0.0 {
            x = p.softcap * x.tanh();
        }
        *slot = Some(x + mv);
    }
}

/// The softmax weights of every (token, head, seq) row over the cells, in f64, from the
/// traced inputs (sinks in the denominator): `weights[r * n_kv + j]` with row
/// `r = t + n_tokens * (h + n_head * s)`. Used by the one-cell diagnosis.
pub(crate) fn weights(o: &Operands<'_>) -> Result<(Vec<f64>, usize, usize), VerifyError> {
    let sh = shape(o)?;
    let n_rows = sh.n_tokens * sh.n_head * sh.n_seq;
    let mut w = vec![0f64; n_rows * sh.n_kv];
    let mut scores = vec![None; sh.n_kv];
    for s in 0..sh.n_seq {
        for h in 0..sh.n_head {
            for t in 0..sh.n_tokens {
                let qs = at(o.q.ne, t, h, s);
                scores_exact(o, &sh, &o.q.data[qs..qs + sh.d], t, h, s, &mut scores);
                let sink = o.sinks.map(|x| x[h]);
                let max = scores
                    .iter()
                    .flatten()
                    .copied()
                    .chain(sink)
                    .fold(f64::NEG_INFINITY, f64::max);
                if max == f64::NEG_INFINITY {
                    continue;
                }
                let r = t + sh.n_tokens * (h + sh.n_head * s);
                let row = &mut w[r * sh.n_kv..(r + 1) * sh.n_kv];
                let mut sum = sink.map_or(0.0, |x| (x - max).exp());
                for (wj, sc) in row.iter_mut().zip(&scores) {
                    *wj = sc.map_or(0.0, |x| (x - max).exp());
                    sum += *wj;
                }
                row.iter_mut().for_each(|x| *x /= sum);
            }
        }
    }
    Ok((w, sh.n_kv, sh.rv))
}

/// The kernel-faithful reference of `path` ([Dv, n_head, n_tokens, n_seq]).
pub(crate) fn faithful(path: KernelPath, o: &Operands<'_>) -> Result<Dense, VerifyError> {
    match path {
        KernelPath::OneChunk => flash_rows(o, None),
        KernelPath::SplitKv { n_chunks } => flash_rows(o, Some(n_chunks)),
        // f32 GEMMs on unrounded Q: the exact reference is the model.
        KernelPath::Tiled => {
            tensor_stats::attention_biased(o.q, o.k, o.v, o.mask, o.bias, o.sinks, o.p)
                .map_err(attn_err)
        }
        KernelPath::Unfused => unfused(o),
    }
}

/// The unfused path's rounding ambiguity: [`unfused`] rounds each probability, computed in
/// f64, to V's dot type (F16 or BF16); ggml rounds its own f32 softmax, whose value may
/// differ from the f64 one by the f32 errors of the score GEMM, the subtraction of the
/// row's maximum, `expf` and the normalisation. Where that error could move a probability
/// across a rounding midpoint, ggml may round it the other way: each such "ambiguous"
/// cell may change the output by one rounding step (or more, if the error spans several)
/// times its V row. Returns the squared sum, over every output value, of the largest
/// such change (each ambiguous cell's step times `|v|`, added up: the worst case, every
/// ambiguous rounding tipped in the same direction). 0 for other dot types (F32 V, or a
/// quantized V's Q8_0 rows).
///
/// Error model of a score `s_j = scale * q.k_j` (f32 GEMM over `d` products): at most
/// `n * u * scale * sum_i |q_i k_ji|` (worst-case f32 accumulation of `n` terms in one
/// accumulator, `u = 2^-24`; `n = d / 8 + 8` on AVX2 builds, whose dot products and GEMM
/// tiles use 8-lane accumulators, else `d`), plus one rounding of the product and of the
/// scaling; the probability's relative error is
/// then bounded by its score's error, the largest score error of the row (the maximum
/// and the normalising sum), and 16 `u` for `expf` and the normalisation.
pub(crate) fn unfused_tip_energy(o: &Operands<'_>) -> Result<f64, VerifyError> {
    let p_type = vec_dot_type(o.v_type);
    let round: fn(f64) -> f64 = match p_type {
        Some(GgmlType::F16) => |x| half::f16::from_f64(x).to_f64(),
        Some(GgmlType::BF16) => |x| half::bf16::from_f64(x).to_f64(),
        _ => return Ok(0.0),
    };
    let sh = shape(o)?;
    let mut q = o.q.clone();
    round_rows_as(&mut q, vec_dot_type(o.k_type), o.dot)?;
    const U: f64 = 1.0 / 16_777_216.0; // 2^-24
    let p = o.p;
    let scale = if p.softcap != 0.0 {
        p.scale / p.softcap
    } else {
        p.scale
    };
    // Products summed one after the other in one f32 accumulator, at most: an AVX2 build
    // spreads them over 8-lane accumulators (ggml_vec_dot_f16, or llamafile's sgemm
    // tiles), d / 8 per lane plus the reduction; any other build, d.
    let terms = match o.dot {
        DotOrder::Avx2 => (sh.d as f64 / 8.0).ceil() + 8.0,
        DotOrder::Exact => sh.d as f64,
    };
    let mut scores = vec![None; sh.n_kv];
    let mut err = vec![0f64; sh.n_kv];
    let mut amb = vec![0f64; sh.dv];
    let mut energy = 0f64;
    for s in 0..sh.n_seq {
        for h in 0..sh.n_head {
            let kh = h / sh.rk;
            let k_base = at(o.k.ne, 0, kh, s);
            let vh = h / sh.rv;
            let v_base = at(o.v.ne, 0, vh, s);
            for t in 0..sh.n_tokens {
                let qs = at(q.ne, t, h, s);
                let qrow = &q.data[qs..qs + sh.d];
                scores_exact(o, &sh, qrow, t, h, s, &mut scores);
                let sink = o.sinks.map(|x| x[h]);
                let max = scores
                    .iter()
                    .flatten()
                    .copied()
                    .chain(sink)
                    .fold(f64::NEG_INFINITY, f64::max);
                if max == f64::NEG_INFINITY {
                    continue;
                }
                let mut sum = sink.map_or(0.0, |x| (x - max).exp());
                let mut worst = 0f64;
                for (j, sc) in scores.iter().enumerate() {
                    let Some(x) = sc else {
                        err[j] = 0.0;
                        continue;
                    };
                    sum += (x - max).exp();
                    let krow = &o.k.data[k_base + j * sh.d..k_base + (j + 1) * sh.d];
                    let abs_dot: f64 = qrow.iter().zip(krow).map(|(a, b)| (a * b).abs()).sum();
                    // softcap: tanh's slope is at most 1, its f32 evaluation a few u.
                    let e = (terms + 2.0) * U * scale.abs() * abs_dot
                        + 4.0 * U * x.abs()
                        + if p.softcap != 0.0 {
                            4.0 * U * p.softcap.abs()
                        } else {
                            0.0
                        };
                    err[j] = e;
                    worst = worst.max(e);
                }
                if sum == 0.0 {
                    continue;
                }
                amb.iter_mut().for_each(|a| *a = 0.0);
                let mut any = false;
                for (j, sc) in scores.iter().enumerate() {
                    let Some(x) = sc else { continue };
                    let pj = (x - max).exp() / sum;
                    if pj == 0.0 {
                        continue;
                    }
                    // Relative error of ggml's f32 probability (first order in the errors).
                    let rel = err[j] + 2.0 * worst + (x - max).abs() * U + 16.0 * U;
                    let r = round(pj);
                    let lo = round(pj * (1.0 - rel));
                    let hi = round(pj * (1.0 + rel));
                    let step = (lo - r).abs().max((hi - r).abs());
                    if step == 0.0 {
                        continue;
                    }
                    any = true;
                    let vrow = &o.v.data[v_base + j * sh.dv..v_base + (j + 1) * sh.dv];
                    for (a, &vv) in amb.iter_mut().zip(vrow) {
                        *a += step * vv.abs();
                    }
                }
                if any {
                    energy += amb.iter().map(|a| a * a).sum::<f64>();
                }
            }
        }
    }
    Ok(energy)
}
