//! Reference attention in f64, with the semantics of ggml's CPU `FLASH_ATTN_EXT`
//! (`ggml/src/ggml-cpu/ops.cpp`, `ggml_compute_forward_flash_attn_ext_f16_one_chunk` and
//! `..._tiled`; graph-level checks in `ggml/src/ggml.c`, `ggml_flash_attn_ext`).
//!
//! Layouts are ggml `ne` (fastest first), data in logical contiguous order:
//!
//! | tensor | `ne` |
//! |--------|------|
//! | q      | `[D, n_tokens, n_head, n_seq]` |
//! | k      | `[D, n_kv, n_head_k, n_seq]` |
//! | v      | `[Dv, n_kv, n_head_v, n_seq]` |
//! | mask   | `[n_kv, n_rows >= n_tokens, m2, m3]`, `n_head % m2 == 0`, `n_seq % m3 == 0` |
//! | sinks  | `[n_head]` |
//! | output | `[Dv, n_head, n_tokens, n_seq]` (`kqv_out` is its reshape to `[Dv*n_head, n_tokens]`) |
//!
//! For query `(token t, head h, seq s)` and key/value cell `j`, exactly as ggml does it:
//!
//! - GQA: query head `h` reads K head `h / (n_head / n_head_k)` and V head
//!   `h / (n_head / n_head_v)`.
//! - Mask value `mv = slope(h) * mask[j, t, h % m2, s % m3]` (0 without a mask); a cell
//!   with `mv == -inf` is skipped (weight exactly 0). Mask rows `>= n_tokens` are ignored.
//! - Score: with `softcap == 0`, `x = (q·k) * scale`; otherwise ggml first divides the
//!   scale by the softcap and then caps: `x = softcap * tanh((q·k) * (scale / softcap))`.
//!   Then `x += mv`.
//! - ALiBi (`max_bias > 0`, which ggml only allows with a mask): see [`alibi_slope`];
//!   the slope multiplies the mask value, not the score.
//! - Softmax over the unmasked cells, plus, with sinks, one extra logit `sinks[h]` that
//!   enters the denominator only (it carries no value and gets neither scale nor slope).
//! - A row whose every cell is masked: ggml's sum `S` stays 0 and it writes
//!   `VKQ * (S == 0 ? 0 : 1/S)`, i.e. zeros. With a sink, `S = 1` and the accumulator is
//!   still zero, so again zeros. This function returns zeros in both cases.
//!
//! Precision: ggml accumulates in f32 (and, on its scalar path with an F16 V, the V
//! accumulator itself is F16) and converts Q to K's `vec_dot_type` (F16 for an F16 K) before
//! the dot product. This reference works in f64 on the values it is given: differences of
//! that order are what a tolerance must absorb.

use thiserror::Error;

/// Errors from [`Dense`] construction and [`attention`]. Nothing here panics on bad shapes.
#[derive(Clone, Debug, Error, PartialEq)]
pub enum AttentionError {
    #[error("{what}: ne {ne:?} holds {expected} elements but {got} were given")]
    DataLength {
        what: &'static str,
        ne: [usize; 4],
        expected: usize,
        got: usize,
    },
    #[error("ne {ne:?}: element count overflows")]
    Overflow { ne: [usize; 4] },
    #[error("strided view ne {ne:?} strides {strides:?} reaches element {last} of a {len}-element buffer")]
    StrideOutOfBounds {
        ne: [usize; 4],
        strides: [usize; 4],
        last: usize,
        len: usize,
    },
    #[error("shape mismatch: {0}")]
    Shape(String),
    #[error("ALiBi (max_bias = {max_bias}) needs a mask (ggml asserts this)")]
    AlibiWithoutMask { max_bias: f64 },
    #[error("sinks: {got} values for {n_head} query heads")]
    SinksLength { got: usize, n_head: usize },
}

type Result<T> = std::result::Result<T, AttentionError>;

fn element_count(ne: [usize; 4]) -> Result<usize> {
    ne.iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or(AttentionError::Overflow { ne })
}

/// A dense 4-d tensor of f64, ggml `ne` order (`ne[0]` fastest), contiguous.
#[derive(Clone, Debug, PartialEq)]
pub struct Dense {
    pub ne: [usize; 4],
    pub data: Vec<f64>,
}

impl Dense {
    /// Checks that `data` holds exactly `ne0*ne1*ne2*ne3` values.
    pub fn new(ne: [usize; 4], data: Vec<f64>) -> Result<Self> {
        let expected = element_count(ne)?;
        if data.len() != expected {
            return Err(AttentionError::DataLength {
                what: "Dense::new",
                ne,
                expected,
                got: data.len(),
            });
        }
        Ok(Self { ne, data })
    }

    pub fn zeros(ne: [usize; 4]) -> Result<Self> {
        Ok(Self {
            ne,
            data: vec![0.0; element_count(ne)?],
        })
    }

    /// From contiguous f32 values in `ne` order.
    pub fn from_f32(ne: [usize; 4], data: &[f32]) -> Result<Self> {
        let expected = element_count(ne)?;
        if data.len() != expected {
            return Err(AttentionError::DataLength {
                what: "Dense::from_f32",
                ne,
                expected,
                got: data.len(),
            });
        }
        Ok(Self {
            ne,
            data: data.iter().map(|&x| f64::from(x)).collect(),
        })
    }

    /// Gather a (possibly permuted or padded) view: element `(i0,i1,i2,i3)` is
    /// `data[i0*strides[0] + i1*strides[1] + i2*strides[2] + i3*strides[3]]`. Strides are
    /// in elements (ggml `nb[i] / sizeof(f32)`); every reached index is bounds-checked.
    pub fn from_f32_strided(ne: [usize; 4], strides: [usize; 4], data: &[f32]) -> Result<Self> {
        let n = element_count(ne)?;
        if n == 0 {
            return Ok(Self {
                ne,
                data: Vec::new(),
            });
        }
        let oob = |last| AttentionError::StrideOutOfBounds {
            ne,
            strides,
            last,
            len: data.len(),
        };
        let last = (0..4).try_fold(0usize, |acc, i| {
            (ne[i] - 1)
                .checked_mul(strides[i])
                .and_then(|x| acc.checked_add(x))
        });
        match last {
            Some(last) if last < data.len() => {}
            Some(last) => return Err(oob(last)),
            None => return Err(oob(usize::MAX)),
        }
        let mut out = Vec::with_capacity(n);
        for i3 in 0..ne[3] {
            for i2 in 0..ne[2] {
                for i1 in 0..ne[1] {
                    let base = i3 * strides[3] + i2 * strides[2] + i1 * strides[1];
                    out.extend((0..ne[0]).map(|i0| f64::from(data[base + i0 * strides[0]])));
                }
            }
        }
        Ok(Self { ne, data: out })
    }

    /// Build from a function of the index.
    pub fn from_fn(
        ne: [usize; 4],
        mut f: impl FnMut(usize, usize, usize, usize) -> f64,
    ) -> Result<Self> {
        let mut data = Vec::with_capacity(element_count(ne)?);
        for i3 in 0..ne[3] {
            for i2 in 0..ne[2] {
                for i1 in 0..ne[1] {
                    for i0 in 0..ne[0] {
                        data.push(f(i0, i1, i2, i3));
                    }
                }
            }
        }
        Ok(Self { ne, data })
    }

    pub fn n_elements(&self) -> usize {
        self.data.len()
    }

    /// Linear index of `(i0,i1,i2,i3)`, or `None` when out of range.
    pub fn index(&self, i0: usize, i1: usize, i2: usize, i3: usize) -> Option<usize> {
        let [n0, n1, n2, n3] = self.ne;
        if i0 >= n0 || i1 >= n1 || i2 >= n2 || i3 >= n3 {
            return None;
        }
        let i = ((i3 * n2 + i2) * n1 + i1) * n0 + i0;
        (i < self.data.len()).then_some(i)
    }

    pub fn get(&self, i0: usize, i1: usize, i2: usize, i3: usize) -> Option<f64> {
        self.index(i0, i1, i2, i3).map(|i| self.data[i])
    }

    /// The `ne[0]` values at `(·, i1, i2, i3)`.
    pub fn row(&self, i1: usize, i2: usize, i3: usize) -> Option<&[f64]> {
        let start = self.index(0, i1, i2, i3)?;
        self.data.get(start..start + self.ne[0])
    }

    pub fn to_f32(&self) -> Vec<f32> {
        self.data.iter().map(|&x| x as f32).collect()
    }

    fn check(&self, what: &'static str) -> Result<()> {
        let expected = element_count(self.ne)?;
        if self.data.len() != expected {
            return Err(AttentionError::DataLength {
                what,
                ne: self.ne,
                expected,
                got: self.data.len(),
            });
        }
        Ok(())
    }
}

/// `FLASH_ATTN_EXT` op_params: `scale`, `max_bias`, `logit_softcap` (floats 0..2).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionParams {
    pub scale: f64,
    pub max_bias: f64,
    pub softcap: f64,
}

impl AttentionParams {
    /// `scale = 1/sqrt(head_dim)`, no ALiBi, no softcap (what llama passes).
    pub fn with_scale(scale: f64) -> Self {
        Self {
            scale,
            max_bias: 0.0,
            softcap: 0.0,
        }
    }
}

/// ALiBi slope of query head `h` among `n_head`, as ggml computes it:
/// `n_head_log2 = 2^floor(log2(n_head))`, `m0 = 2^(-max_bias / n_head_log2)`,
/// `m1 = 2^(-(max_bias / 2) / n_head_log2)`, slope = `m0^(h+1)` for `h < n_head_log2`,
/// else `m1^(2*(h - n_head_log2) + 1)`; 1 when `max_bias <= 0` (or `n_head == 0`).
pub fn alibi_slope(max_bias: f64, n_head: usize, h: usize) -> f64 {
    // `max_bias > 0` is false for NaN too, like ggml's `(max_bias > 0.0f) ? ... : 1.0f`.
    if max_bias <= 0.0 || max_bias.is_nan() || n_head == 0 {
        return 1.0;
    }
    let n_head_log2 = 1usize << n_head.ilog2();
    let nl2 = n_head_log2 as f64;
    let m0 = 2f64.powf(-max_bias / nl2);
    let m1 = 2f64.powf(-(max_bias / 2.0) / nl2);
    if h < n_head_log2 {
        m0.powf((h + 1) as f64)
    } else {
        m1.powf((2 * (h - n_head_log2) + 1) as f64)
    }
}

fn shape_err(msg: String) -> AttentionError {
    AttentionError::Shape(msg)
}

/// Heads-per-KV-head ratio, checked as ggml does (`n_head % n_head_kv == 0`).
fn broadcast(what: &str, n_head: usize, n_head_kv: usize) -> Result<usize> {
    if n_head_kv == 0 || n_head % n_head_kv != 0 {
        return Err(shape_err(format!(
            "{what} has {n_head_kv} heads, which does not divide the {n_head} query heads"
        )));
    }
    Ok(n_head / n_head_kv)
}

/// Reference `FLASH_ATTN_EXT` (see the module docs for layouts and semantics).
/// Returns the result with `ne = [Dv, n_head, n_tokens, n_seq]`.
pub fn attention(
    q: &Dense,
    k: &Dense,
    v: &Dense,
    mask: Option<&Dense>,
    sinks: Option<&[f64]>,
    p: &AttentionParams,
) -> Result<Dense> {
    attention_biased(q, k, v, mask, None, sinks, p)
}

/// The bias element added to the score of cell `j` for (token `t`, head `h`, sequence
/// `s`): `bias` is `[n_kv, T, H, S]` or broadcast to it as ggml's ADD repeats its second
/// operand (each dimension divides the scores').
pub fn bias_at(bias: &Dense, j: usize, t: usize, h: usize, s: usize) -> f64 {
    let [b0, b1, b2, b3] = bias.ne;
    bias.data[(((s % b3) * b2 + h % b2) * b1 + t % b1) * b0 + j % b0]
}

/// [`attention`] with an additive score bias (`bias`, see [`bias_at`]) added to the raw
/// score `K·Q` before the scale and softcap, as llama.cpp's `kq + kq_b` before
/// `soft_max_ext(kq, mask, scale)` (T5's relative-position bias):
/// `softmax((K·Q + bias) * scale + slope * mask)`.
pub fn attention_biased(
    q: &Dense,
    k: &Dense,
    v: &Dense,
    mask: Option<&Dense>,
    bias: Option<&Dense>,
    sinks: Option<&[f64]>,
    p: &AttentionParams,
) -> Result<Dense> {
    q.check("q")?;
    k.check("k")?;
    v.check("v")?;
    let [d, n_tokens, n_head, n_seq] = q.ne;
    let [dk, n_kv, n_head_k, k_seq] = k.ne;
    let [dv, v_kv, n_head_v, v_seq] = v.ne;
    if dk != d {
        return Err(shape_err(format!(
            "q head size {d} != k head size {dk} (q ne {:?}, k ne {:?})",
            q.ne, k.ne
        )));
    }
    if v_kv != n_kv {
        return Err(shape_err(format!(
            "k has {n_kv} cells but v has {v_kv} (k ne {:?}, v ne {:?})",
            k.ne, v.ne
        )));
    }
    if k_seq != n_seq || v_seq != n_seq {
        return Err(shape_err(format!(
            "sequence counts differ: q {n_seq}, k {k_seq}, v {v_seq}"
        )));
    }
    let rk = broadcast("k", n_head, n_head_k)?;
    let rv = broadcast("v", n_head, n_head_v)?;
    if let Some(m) = mask {
        m.check("mask")?;
        let [m0, m1, m2, m3] = m.ne;
        if m0 != n_kv {
            return Err(shape_err(format!(
                "mask ne {:?}: ne0 must be n_kv = {n_kv}",
                m.ne
            )));
        }
        if m1 < n_tokens {
            return Err(shape_err(format!(
                "mask ne {:?}: {m1} rows for {n_tokens} tokens",
                m.ne
            )));
        }
        if m2 == 0 || n_head % m2 != 0 || m3 == 0 || n_seq % m3 != 0 {
            return Err(shape_err(format!(
                "mask ne {:?}: ne2 must divide n_head = {n_head} and ne3 must divide n_seq = {n_seq}",
                m.ne
            )));
        }
    } else if p.max_bias > 0.0 {
        return Err(AttentionError::AlibiWithoutMask {
            max_bias: p.max_bias,
        });
    }
    if let Some(b) = bias {
        b.check("bias")?;
        let fits = [n_kv, n_tokens, n_head, n_seq]
            .iter()
            .zip(b.ne)
            .all(|(&n, bn)| bn > 0 && n % bn == 0);
        if !fits {
            return Err(shape_err(format!(
                "bias ne {:?} does not broadcast onto the scores [{n_kv}, {n_tokens}, {n_head}, {n_seq}]",
                b.ne
            )));
        }
    }
    if let Some(s) = sinks {
        if s.len() != n_head {
            return Err(AttentionError::SinksLength {
                got: s.len(),
                n_head,
            });
        }
    }

    let out_ne = [dv, n_head, n_tokens, n_seq];
    let mut out = Dense::zeros(out_ne)?;
    // ggml: `if (logit_softcap != 0) scale /= logit_softcap;`
    let scale = if p.softcap != 0.0 {
        p.scale / p.softcap
    } else {
        p.scale
    };
    let mut scores: Vec<Option<f64>> = vec![None; n_kv];
    let mut acc = vec![0.0f64; dv];

    for s in 0..n_seq {
        for h in 0..n_head {
            let slope = alibi_slope(p.max_bias, n_head, h);
            let kh = h / rk;
            let vh = h / rv;
            let k_base = (s * n_head_k + kh) * n_kv * d;
            let v_base = (s * n_head_v + vh) * n_kv * dv;
            for t in 0..n_tokens {
                let q_start = ((s * n_head + h) * n_tokens + t) * d;
                let qrow = &q.data[q_start..q_start + d];
                let mrow = match mask {
                    Some(m) => {
                        let [m0, m1, m2, m3] = m.ne;
                        let start = (((s % m3) * m2 + h % m2) * m1 + t) * m0;
                        Some(&m.data[start..start + m0])
                    }
                    None => None,
                };
                let mut max = f64::NEG_INFINITY;
                for (j, score) in scores.iter_mut().enumerate() {
                    let mv = mrow.map_or(0.0, |r| slope * r[j]);
                    if mv == f64::NEG_INFINITY {
                        *score = None;
                        continue;
                    }
                    let krow = &k.data[k_base + j * d..k_base + (j + 1) * d];
                    let mut dot: f64 = qrow.iter().zip(krow).map(|(a, b)| a * b).sum();
                    if let Some(b) = bias {
                        dot += bias_at(b, j, t, h, s);
                    }
                    let mut x = dot * scale;
                    if p.softcap != 0.0 {
                        x = p.softcap * x.tanh();
                    }
                    x += mv;
                    max = max.max(x);
                    *score = Some(x);
                }
                let sink = sinks.map(|sk| sk[h]);
                if let Some(sv) = sink {
                    max = max.max(sv);
                }
                acc.iter_mut().for_each(|a| *a = 0.0);
                let mut sum = 0.0f64;
                if max != f64::NEG_INFINITY {
                    for (j, score) in scores.iter().enumerate() {
                        let Some(x) = *score else { continue };
                        let w = (x - max).exp();
                        sum += w;
                        let vrow = &v.data[v_base + j * dv..v_base + (j + 1) * dv];
                        acc.iter_mut().zip(vrow).for_each(|(a, b)| *a += w * b);
                    }
                    if let Some(sv) = sink {
                        sum += (sv - max).exp();
                    }
                }
                // ggml: `S_inv = S == 0.0f ? 0.0f : 1.0f/S`.
                let inv = if sum == 0.0 { 0.0 } else { 1.0 / sum };
                let o_start = ((s * n_tokens + t) * n_head + h) * dv;
                out.data[o_start..o_start + dv]
                    .iter_mut()
                    .zip(&acc)
                    .for_each(|(o, a)| *o = a * inv);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use approx::assert_relative_eq;

    const NEG_INF: f64 = f64::NEG_INFINITY;

    fn d(ne: [usize; 4], data: &[f64]) -> Dense {
        Dense::new(ne, data.to_vec()).expect("test shape")
    }

    #[test]
    fn one_query_two_keys() {
        // q = [1, 0], k0 = [1, 0], k1 = [0, 1]; scale 2 -> scores 2, 0.
        let q = d([2, 1, 1, 1], &[1.0, 0.0]);
        let k = d([2, 2, 1, 1], &[1.0, 0.0, 0.0, 1.0]);
        let v = d([3, 2, 1, 1], &[1.0, 2.0, 3.0, -1.0, 0.0, 5.0]);
        let out = attention(&q, &k, &v, None, None, &AttentionParams::with_scale(2.0)).unwrap();
        assert_eq!(out.ne, [3, 1, 1, 1]);
        let w0 = 2f64.exp() / (2f64.exp() + 1.0);
        let w1 = 1.0 - w0;
        for (i, (a, b)) in [(1.0, -1.0), (2.0, 0.0), (3.0, 5.0)].iter().enumerate() {
            assert_relative_eq!(out.data[i], w0 * a + w1 * b, epsilon = 1e-15);
        }
    }

    /// A score bias is added to K·Q before the scale: with scale 1 it is a mask (added
    /// after the scale, slope 1), with scale 2 a mask of twice its values; broadcast
    /// over tokens as ggml's ADD repeats it; checked by hand on one row too.
    #[test]
    fn a_score_bias_is_added_before_the_scale() {
        // q = [1, 0] for 2 tokens x 2 heads; k0 = [1, 0], k1 = [0, 1] -> dots 1, 0.
        let q = d([2, 2, 2, 1], &[1.0, 0.0, 0.5, 0.0, 1.0, 0.0, 0.0, 2.0]);
        let k = d([2, 2, 1, 1], &[1.0, 0.0, 0.0, 1.0]);
        let v = d([3, 2, 1, 1], &[1.0, 2.0, 3.0, -1.0, 0.0, 5.0]);
        // Per head, one row broadcast over both tokens: [n_kv, 1, H, 1].
        let b = d([2, 1, 2, 1], &[0.25, -1.5, 3.0, 0.0]);
        let as_mask = |f: f64| {
            let mut data = Vec::new();
            for h in 0..2 {
                for _t in 0..2 {
                    data.extend([b.data[2 * h] * f, b.data[2 * h + 1] * f]);
                }
            }
            d([2, 2, 2, 1], &data)
        };
        for scale in [1.0, 2.0] {
            let got =
                attention_biased(&q, &k, &v, None, Some(&b), None, &p(scale, 0.0, 0.0)).unwrap();
            let mask = as_mask(scale);
            let want = attention(&q, &k, &v, Some(&mask), None, &p(scale, 0.0, 0.0)).unwrap();
            for (a, w) in got.data.iter().zip(&want.data) {
                assert_relative_eq!(a, w, epsilon = 1e-14);
            }
        }
        // Token 0, head 0, scale 2: scores (1 + 0.25) * 2 and (0 - 1.5) * 2.
        let got = attention_biased(&q, &k, &v, None, Some(&b), None, &p(2.0, 0.0, 0.0)).unwrap();
        let (e0, e1) = (2.5f64.exp(), (-3f64).exp());
        let w0 = e0 / (e0 + e1);
        // V rows 0 and 1 start with 1 and -1.
        assert_relative_eq!(got.data[0], w0 - (1.0 - w0), epsilon = 1e-15);
        // A bias that does not broadcast onto the scores is refused.
        let bad = d([3, 1, 1, 1], &[0.0; 3]);
        assert!(attention_biased(&q, &k, &v, None, Some(&bad), None, &p(1.0, 0.0, 0.0)).is_err());
    }

    fn p(scale: f64, max_bias: f64, softcap: f64) -> AttentionParams {
        AttentionParams {
            scale,
            max_bias,
            softcap,
        }
    }

    /// One query, keys with dot products `dots` against it (D = n_kv, q = ones, k = diag),
    /// V rows `[j, 10 + j]`.
    fn diag_case(dots: &[f64]) -> (Dense, Dense, Dense) {
        let n = dots.len();
        let q = Dense::from_fn([n, 1, 1, 1], |_, _, _, _| 1.0).unwrap();
        let k = Dense::from_fn(
            [n, n, 1, 1],
            |i0, i1, _, _| if i0 == i1 { dots[i0] } else { 0.0 },
        )
        .unwrap();
        let v = Dense::from_fn([2, n, 1, 1], |i0, i1, _, _| (i1 + 10 * i0) as f64).unwrap();
        (q, k, v)
    }

    fn expected(weights: &[f64]) -> [f64; 2] {
        let sum: f64 = weights.iter().sum();
        let o0: f64 = weights.iter().enumerate().map(|(j, w)| w * j as f64).sum();
        let o1: f64 = weights
            .iter()
            .enumerate()
            .map(|(j, w)| w * (10 + j) as f64)
            .sum();
        [o0 / sum, o1 / sum]
    }

    #[test]
    fn minus_inf_mask_removes_a_key_and_finite_mask_adds() {
        let (q, k, v) = diag_case(&[1.0, 2.0, 3.0]);
        let mask = d([3, 1, 1, 1], &[0.0, NEG_INF, 2f64.ln()]);
        let out = attention(&q, &k, &v, Some(&mask), None, &p(1.0, 0.0, 0.0)).unwrap();
        // weights e^1, 0, 2*e^3
        let e = expected(&[1f64.exp(), 0.0, 2.0 * 3f64.exp()]);
        assert_relative_eq!(out.data[0], e[0], epsilon = 1e-14);
        assert_relative_eq!(out.data[1], e[1], epsilon = 1e-14);

        // Masking all but one key gives exactly that key's value.
        let mask = d([3, 1, 1, 1], &[NEG_INF, 0.0, NEG_INF]);
        let out = attention(&q, &k, &v, Some(&mask), None, &p(1.0, 0.0, 0.0)).unwrap();
        assert_eq!(out.data, vec![1.0, 11.0]);
    }

    #[test]
    fn a_fully_masked_row_is_zero_and_padding_rows_are_ignored() {
        // Two tokens, mask padded to 4 rows: row 0 fully masked, row 1 open, rows 2..4
        // (padding) hold garbage that must not matter.
        let q = Dense::from_fn([2, 2, 1, 1], |i0, i1, _, _| (i0 + i1) as f64 * 0.3).unwrap();
        let k = Dense::from_fn([2, 3, 1, 1], |i0, i1, _, _| (i0 * 3 + i1) as f64 * 0.1).unwrap();
        let v = Dense::from_fn([2, 3, 1, 1], |i0, i1, _, _| (i0 + 2 * i1) as f64).unwrap();
        let mut m = vec![NEG_INF; 3];
        m.extend([0.0; 3]);
        m.extend([f64::NAN, 1e30, NEG_INF, -5.0, 7.0, f64::INFINITY]);
        let mask = d([3, 4, 1, 1], &m);
        let out = attention(&q, &k, &v, Some(&mask), None, &p(1.0, 0.0, 0.0)).unwrap();
        assert_eq!(out.ne, [2, 1, 2, 1]);
        assert_eq!(&out.data[0..2], &[0.0, 0.0]);
        let unmasked = attention(&q, &k, &v, None, None, &p(1.0, 0.0, 0.0)).unwrap();
        assert_eq!(&out.data[2..4], &unmasked.data[2..4]);
        assert!(out.data.iter().all(|x| x.is_finite()));

        // Same with a sink: S = 1, accumulator 0 -> zeros.
        let out = attention(&q, &k, &v, Some(&mask), Some(&[0.5]), &p(1.0, 0.0, 0.0)).unwrap();
        assert_eq!(&out.data[0..2], &[0.0, 0.0]);
    }

    #[test]
    fn gqa_maps_query_heads_to_kv_heads_by_division() {
        // 4 query heads (identical queries), 2 kv heads with different keys and values.
        let q = Dense::from_fn([4, 3, 4, 1], |i0, i1, _, _| {
            (i0 as f64 - 1.5) * (1.0 + i1 as f64) * 0.2
        })
        .unwrap();
        let k = Dense::from_fn([4, 5, 2, 1], |i0, i1, i2, _| {
            ((i0 * 7 + i1 * 3 + i2 * 11) % 5) as f64 * 0.3 - 0.6
        })
        .unwrap();
        let v = Dense::from_fn([3, 5, 2, 1], |i0, i1, i2, _| {
            (i0 + i1 * 2) as f64 + 100.0 * i2 as f64
        })
        .unwrap();
        let pr = p(0.5, 0.0, 0.0);
        let out = attention(&q, &k, &v, None, None, &pr).unwrap();
        assert_eq!(out.ne, [3, 4, 3, 1]);
        for t in 0..3 {
            let h = |h| out.row(h, t, 0).unwrap().to_vec();
            assert_eq!(h(0), h(1));
            assert_eq!(h(2), h(3));
            assert_ne!(h(0), h(2));
            // Each equals single-head attention over its kv head.
            for (head, kv) in [(0, 0), (3, 1)] {
                let q1 = Dense::from_fn([4, 1, 1, 1], |i0, _, _, _| q.get(i0, t, head, 0).unwrap())
                    .unwrap();
                let k1 = Dense::from_fn([4, 5, 1, 1], |i0, i1, _, _| k.get(i0, i1, kv, 0).unwrap())
                    .unwrap();
                let v1 = Dense::from_fn([3, 5, 1, 1], |i0, i1, _, _| v.get(i0, i1, kv, 0).unwrap())
                    .unwrap();
                let o1 = attention(&q1, &k1, &v1, None, None, &pr).unwrap();
                assert_eq!(h(head), o1.data);
            }
        }
        // V may have its own head count: 4 query heads over 1 V head.
        let v1 = Dense::from_fn([3, 5, 1, 1], |i0, i1, _, _| (i0 * i1) as f64).unwrap();
        assert!(attention(&q, &k, &v1, None, None, &pr).is_ok());
    }

    #[test]
    fn alibi_slopes_match_the_closed_form() {
        // n_head = 8 (a power of two), max_bias 8: slope_h = 2^-(h+1).
        for h in 0..8 {
            assert_relative_eq!(
                alibi_slope(8.0, 8, h),
                2f64.powi(-(h as i32 + 1)),
                epsilon = 1e-15
            );
        }
        // n_head = 6: n_head_log2 = 4, m0 = 2^-2, m1 = 2^-1;
        // h < 4: 2^(-2(h+1)); h = 4, 5: 2^-1, 2^-3.
        let want = [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125];
        for (h, w) in want.iter().enumerate() {
            assert_relative_eq!(alibi_slope(8.0, 6, h), *w, epsilon = 1e-15);
        }
        // max_bias 0 (or negative, or NaN): no ALiBi.
        assert_eq!(alibi_slope(0.0, 6, 5), 1.0);
        assert_eq!(alibi_slope(-1.0, 6, 5), 1.0);
        assert_eq!(alibi_slope(f64::NAN, 6, 5), 1.0);
    }

    #[test]
    fn alibi_scales_the_mask_per_head() {
        // 6 heads, 1 kv head; mask = -distance; head h's weights use slope_h * mask.
        let q = Dense::from_fn([2, 1, 6, 1], |i0, _, i2, _| (i0 + i2) as f64 * 0.1).unwrap();
        let k = Dense::from_fn([2, 3, 1, 1], |i0, i1, _, _| (i0 as f64 - i1 as f64) * 0.4).unwrap();
        let v = Dense::from_fn([1, 3, 1, 1], |_, i1, _, _| i1 as f64).unwrap();
        let mask = d([3, 1, 1, 1], &[-2.0, -1.0, 0.0]);
        let out = attention(&q, &k, &v, Some(&mask), None, &p(0.7, 8.0, 0.0)).unwrap();
        for h in 0..6 {
            let slope = alibi_slope(8.0, 6, h);
            let w: Vec<f64> = (0..3)
                .map(|j| {
                    let dot: f64 = (0..2)
                        .map(|i| q.get(i, 0, h, 0).unwrap() * k.get(i, j, 0, 0).unwrap())
                        .sum();
                    (dot * 0.7 + slope * mask.data[j]).exp()
                })
                .collect();
            let want = (w[1] + 2.0 * w[2]) / (w[0] + w[1] + w[2]);
            assert_relative_eq!(out.get(0, h, 0, 0).unwrap(), want, epsilon = 1e-14);
        }
        // max_bias without a mask is rejected, as ggml asserts.
        assert_eq!(
            attention(&q, &k, &v, None, None, &p(0.7, 8.0, 0.0)),
            Err(AttentionError::AlibiWithoutMask { max_bias: 8.0 })
        );
    }

    #[test]
    fn softcap_caps_the_scaled_score() {
        // dots 4 and 1, scale 0.5, softcap 1.5: x = 1.5 * tanh(dot * 0.5 / 1.5).
        let (q, k, v) = diag_case(&[4.0, 1.0]);
        let out = attention(&q, &k, &v, None, None, &p(0.5, 0.0, 1.5)).unwrap();
        let x = |dot: f64| 1.5 * (dot * 0.5 / 1.5).tanh();
        let e = expected(&[x(4.0).exp(), x(1.0).exp()]);
        assert_relative_eq!(out.data[0], e[0], epsilon = 1e-14);
        assert_relative_eq!(out.data[1], e[1], epsilon = 1e-14);
        // Not the uncapped result.
        let plain = attention(&q, &k, &v, None, None, &p(0.5, 0.0, 0.0)).unwrap();
        assert!((plain.data[0] - out.data[0]).abs() > 1e-3);
        // A huge softcap is the identity in the limit.
        let big = attention(&q, &k, &v, None, None, &p(0.5, 0.0, 1e6)).unwrap();
        assert_relative_eq!(big.data[0], plain.data[0], epsilon = 1e-9);
    }

    #[test]
    fn sinks_add_to_the_denominator_only() {
        let (q, k, v) = diag_case(&[1.0, -0.5]);
        // Two query heads sharing the kv head, sinks 0.3 and -2.
        let q2 = Dense::from_fn([2, 1, 2, 1], |_, _, _, _| 1.0).unwrap();
        assert_eq!(q.ne[0], 2);
        let out = attention(&q2, &k, &v, None, Some(&[0.3, -2.0]), &p(1.0, 0.0, 0.0)).unwrap();
        for (h, sink) in [(0usize, 0.3f64), (1, -2.0)] {
            let w = [1f64.exp(), (-0.5f64).exp()];
            let den = w[0] + w[1] + sink.exp();
            assert_relative_eq!(out.get(0, h, 0, 0).unwrap(), w[1] / den, epsilon = 1e-14);
            assert_relative_eq!(
                out.get(1, h, 0, 0).unwrap(),
                (10.0 * w[0] + 11.0 * w[1]) / den,
                epsilon = 1e-14
            );
        }
        // A sink far above every score drives the output to zero without overflow.
        let out = attention(&q, &k, &v, None, Some(&[1000.0]), &p(1.0, 0.0, 0.0)).unwrap();
        assert!(out.data.iter().all(|x| x.is_finite() && x.abs() < 1e-300));
    }

    #[test]
    fn shape_errors_are_reported_not_panicked() {
        let q = Dense::zeros([4, 2, 4, 1]).unwrap();
        let k = Dense::zeros([4, 3, 2, 1]).unwrap();
        let v = Dense::zeros([4, 3, 2, 1]).unwrap();
        let pr = p(1.0, 0.0, 0.0);
        let shape = |r: Result<Dense>| assert!(matches!(r, Err(AttentionError::Shape(_))), "{r:?}");
        shape(attention(
            &q,
            &Dense::zeros([5, 3, 2, 1]).unwrap(),
            &v,
            None,
            None,
            &pr,
        ));
        shape(attention(
            &q,
            &k,
            &Dense::zeros([4, 4, 2, 1]).unwrap(),
            None,
            None,
            &pr,
        ));
        shape(attention(
            &q,
            &Dense::zeros([4, 3, 3, 1]).unwrap(),
            &v,
            None,
            None,
            &pr,
        ));
        shape(attention(
            &q,
            &Dense::zeros([4, 3, 0, 1]).unwrap(),
            &v,
            None,
            None,
            &pr,
        ));
        shape(attention(
            &q,
            &k,
            &Dense::zeros([4, 3, 3, 1]).unwrap(),
            None,
            None,
            &pr,
        ));
        shape(attention(
            &q,
            &Dense::zeros([4, 3, 2, 2]).unwrap(),
            &v,
            None,
            None,
            &pr,
        ));
        for bad in [
            [2, 2, 1, 1],
            [3, 1, 1, 1],
            [3, 2, 3, 1],
            [3, 2, 0, 1],
            [3, 2, 1, 0],
        ] {
            let m = Dense::zeros(bad).unwrap();
            shape(attention(&q, &k, &v, Some(&m), None, &pr));
        }
        assert!(attention(
            &q,
            &k,
            &v,
            Some(&Dense::zeros([3, 8, 2, 1]).unwrap()),
            None,
            &pr
        )
        .is_ok());
        assert_eq!(
            attention(&q, &k, &v, None, Some(&[0.0; 3]), &pr),
            Err(AttentionError::SinksLength { got: 3, n_head: 4 })
        );
        // Public fields edited out of step with `ne`.
        let mut bad_q = q.clone();
        bad_q.data.pop();
        assert!(matches!(
            attention(&bad_q, &k, &v, None, None, &pr),
            Err(AttentionError::DataLength { what: "q", .. })
        ));
        assert!(matches!(
            Dense::new([2, 2, 1, 1], vec![0.0; 3]),
            Err(AttentionError::DataLength {
                expected: 4,
                got: 3,
                ..
            })
        ));
        assert!(matches!(
            Dense::from_f32([2, 2, 1, 1], &[0.0; 5]),
            Err(AttentionError::DataLength { .. })
        ));
        assert!(matches!(
            Dense::zeros([usize::MAX, 2, 1, 1]),
            Err(AttentionError::Overflow { .. })
        ));
        assert!(matches!(
            Dense::from_f32_strided([2, 2, 1, 1], [1, usize::MAX, 0, 0], &[0.0; 4]),
            Err(AttentionError::StrideOutOfBounds { .. })
        ));
        // Empty dimensions are fine: no kv cells gives zeros, no tokens an empty result.
        let out = attention(
            &q,
            &Dense::zeros([4, 0, 2, 1]).unwrap(),
            &Dense::zeros([4, 0, 2, 1]).unwrap(),
            None,
            None,
            &pr,
        )
        .unwrap();
        assert!(out.data.iter().all(|&x| x == 0.0));
        let out = attention(
            &Dense::zeros([4, 0, 4, 1]).unwrap(),
            &k,
            &v,
            None,
            None,
            &pr,
        )
        .unwrap();
        assert_eq!(out.ne, [4, 4, 0, 1]);
    }

    /// splitmix64
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        fn unif(&mut self) -> f64 {
            (self.next() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// ALiBi slopes the way the ALiBi paper builds them (geometric sequence for the
    /// largest power of two, then every other slope of the sequence for twice that),
    /// generalized from max_bias 8 to any max_bias.
    fn paper_slopes(n: usize, max_bias: f64) -> Vec<f64> {
        fn pow2(n: usize, b: f64) -> Vec<f64> {
            let start = 2f64.powf(-b / n as f64);
            (0..n).map(|i| start * start.powi(i as i32)).collect()
        }
        let mut closest = 1;
        while closest * 2 <= n {
            closest *= 2;
        }
        let mut s = pow2(closest, max_bias);
        s.extend(
            pow2(2 * closest, max_bias)
                .into_iter()
                .step_by(2)
                .take(n - closest),
        );
        s
    }

    /// Naive attention: repeat K/V per query head, full score matrix, softmax with the
    /// sink as an extra column, then weights times V; indices through `get`.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        q: &Dense,
        k: &Dense,
        v: &Dense,
        mask: Option<&Dense>,
        sinks: Option<&[f64]>,
        pr: &AttentionParams,
    ) -> Dense {
        let [dd, nt, nh, ns] = q.ne;
        let nkv = k.ne[1];
        let dv = v.ne[0];
        let slopes = if pr.max_bias > 0.0 {
            paper_slopes(nh, pr.max_bias)
        } else {
            vec![1.0; nh]
        };
        let mut out = vec![0.0; dv * nh * nt * ns];
        for s in 0..ns {
            for h in 0..nh {
                let kh = h * k.ne[2] / nh;
                let vh = h * v.ne[2] / nh;
                for t in 0..nt {
                    let mut logits: Vec<f64> = (0..nkv)
                        .map(|j| {
                            let m = mask.map_or(0.0, |m| {
                                slopes[h] * m.get(j, t, h % m.ne[2], s % m.ne[3]).unwrap()
                            });
                            if m == NEG_INF {
                                return NEG_INF;
                            }
                            let dot: f64 = (0..dd)
                                .map(|i| q.get(i, t, h, s).unwrap() * k.get(i, j, kh, s).unwrap())
                                .sum();
                            let x = if pr.softcap != 0.0 {
                                pr.softcap * (dot * pr.scale / pr.softcap).tanh()
                            } else {
                                dot * pr.scale
                            };
                            x + m
                        })
                        .collect();
                    if logits.iter().all(|&x| x == NEG_INF) {
                        continue; // all masked: zeros, sink or not
                    }
                    if let Some(sk) = sinks {
                        logits.push(sk[h]);
                    }
                    let mx = logits.iter().cloned().fold(NEG_INF, f64::max);
                    let e: Vec<f64> = logits.iter().map(|x| (x - mx).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for c in 0..dv {
                        let o: f64 = (0..nkv)
                            .map(|j| e[j] / z * v.get(c, j, vh, s).unwrap())
                            .sum();
                        out[((s * nt + t) * nh + h) * dv + c] = o;
                    }
                }
            }
        }
        Dense::new([dv, nh, nt, ns], out).unwrap()
    }

    #[test]
    fn randomized_cross_check_against_a_naive_implementation() {
        let mut rng = Rng(0x5eed);
        for case in 0..300 {
            let dd = 1 + rng.below(9);
            let dv = 1 + rng.below(9);
            let nt = 1 + rng.below(5);
            let nkv = 1 + rng.below(12);
            let nhk = 1 + rng.below(3);
            let nh = nhk * (1 + rng.below(3));
            let nhv = [1, nhk, nh][rng.below(3)];
            let ns = 1 + rng.below(2);
            let gen = |rng: &mut Rng, ne: [usize; 4], amp: f64| {
                Dense::from_fn(ne, |_, _, _, _| amp * rng.unif()).unwrap()
            };
            let q = gen(&mut rng, [dd, nt, nh, ns], 2.0);
            let k = gen(&mut rng, [dd, nkv, nhk, ns], 2.0);
            let v = gen(&mut rng, [dv, nkv, nhv, ns], 3.0);
            let use_mask = rng.below(4) != 0;
            let max_bias = if use_mask && rng.below(2) == 0 {
                [8.0, 3.5, 1.0][rng.below(3)]
            } else {
                0.0
            };
            let softcap = if rng.below(3) == 0 {
                0.5 + 30.0 * rng.unif().abs()
            } else {
                0.0
            };
            let pr = p(0.2 + rng.unif().abs(), max_bias, softcap);
            let mask = use_mask.then(|| {
                let m2 = if rng.below(2) == 0 { 1 } else { nh };
                let m3 = if rng.below(2) == 0 { 1 } else { ns };
                let rows = nt + rng.below(3);
                Dense::from_fn([nkv, rows, m2, m3], |j, t, _, _| {
                    // causal-ish pattern plus random holes and some whole masked rows
                    if j > t + nkv / 2 || rng.below(5) == 0 || (case % 7 == 0 && t == 0) {
                        NEG_INF
                    } else {
                        rng.unif()
                    }
                })
                .unwrap()
            });
            let sinks: Option<Vec<f64>> =
                (rng.below(3) == 0).then(|| (0..nh).map(|_| 2.0 * rng.unif()).collect());
            let got = attention(&q, &k, &v, mask.as_ref(), sinks.as_deref(), &pr).unwrap();
            let want = naive(&q, &k, &v, mask.as_ref(), sinks.as_deref(), &pr);
            assert_eq!(got.ne, want.ne, "case {case}");
            for (i, (a, b)) in got.data.iter().zip(&want.data).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-12 * (1.0 + b.abs()),
                    "case {case} elem {i}: {a} vs {b} ({pr:?})"
                );
            }
        }
    }

    #[test]
    fn strided_gather_reads_a_permuted_view() {
        // Memory [D=2, H=3, N=2]; view ne [D, N, H] has strides [1, 6, 2, 0].
        let mem: Vec<f32> = (0..12).map(|x| x as f32).collect();
        let view = Dense::from_f32_strided([2, 2, 3, 1], [1, 6, 2, 0], &mem).unwrap();
        assert_eq!(view.get(1, 1, 2, 0), Some(11.0));
        assert_eq!(view.get(0, 1, 0, 0), Some(6.0));
        assert_eq!(view.get(1, 0, 1, 0), Some(3.0));
        assert!(matches!(
            Dense::from_f32_strided([2, 2, 3, 1], [1, 6, 3, 0], &mem),
            Err(AttentionError::StrideOutOfBounds { last: 13, .. })
        ));
        assert_eq!(view.get(2, 0, 0, 0), None);
    }
}
