//! Per-tensor summary statistics: mean, standard deviation, min, max over the finite
//! values, with NaN and ±Inf counted separately (never folded into the numbers).
//!
//! Values arrive in chunks (a tensor is dequantized a slice at a time), so the mean and
//! variance are merged chunk by chunk with Chan et al.'s parallel update: each chunk's
//! own mean and sum of squared deviations are computed in f64 in two passes over the
//! chunk (still in cache), which keeps the variance exact where a one-pass sum of squares
//! would cancel catastrophically (values near 1e4 with a spread of 1e-3).

/// Lanes of the vectorised passes: 32 f64 accumulators are four independent AVX-512
/// (eight AVX2) vectors, enough to hide the latency of the f64 additions.
const L: usize = 32;

/// Per-lane results of the first pass.
struct FirstPass {
    sum: [f64; L],
    min: [f32; L],
    max: [f32; L],
    bad: [u32; L],
}

// Indexing the lanes (rather than iterators) is the shape the compiler turns into one
// vector operation per lane group.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn first_pass_impl(body: &[f32]) -> FirstPass {
    let mut p = FirstPass {
        sum: [0.0; L],
        min: [f32::INFINITY; L],
        max: [f32::NEG_INFINITY; L],
        bad: [0; L],
    };
    for c in body.chunks_exact(L) {
        for i in 0..L {
            let x = c[i];
            p.bad[i] += u32::from(x.to_bits() & 0x7f80_0000 == 0x7f80_0000);
            p.sum[i] += f64::from(x);
            p.min[i] = p.min[i].min(x);
            p.max[i] = p.max[i].max(x);
        }
    }
    p
}

/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn first_pass_avx512(body: &[f32]) -> FirstPass {
    first_pass_impl(body)
}

/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn first_pass_avx2(body: &[f32]) -> FirstPass {
    first_pass_impl(body)
}

/// `first_pass_impl` with the widest vectors the CPU has (same bits).
fn first_pass(body: &[f32]) -> FirstPass {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F is available (checked above).
            return unsafe { first_pass_avx512(body) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is available (checked above).
            return unsafe { first_pass_avx2(body) };
        }
    }
    first_pass_impl(body)
}

#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn squared_deviations_impl(body: &[f32], mean: f64) -> [f64; L] {
    let mut m2 = [0.0f64; L];
    for c in body.chunks_exact(L) {
        for i in 0..L {
            let d = f64::from(c[i]) - mean;
            m2[i] += d * d;
        }
    }
    m2
}

/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn squared_deviations_avx512(body: &[f32], mean: f64) -> [f64; L] {
    squared_deviations_impl(body, mean)
}

/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn squared_deviations_avx2(body: &[f32], mean: f64) -> [f64; L] {
    squared_deviations_impl(body, mean)
}

/// `squared_deviations_impl` with the widest vectors the CPU has (same bits).
fn squared_deviations(body: &[f32], mean: f64) -> [f64; L] {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F is available (checked above).
            return unsafe { squared_deviations_avx512(body, mean) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is available (checked above).
            return unsafe { squared_deviations_avx2(body, mean) };
        }
    }
    squared_deviations_impl(body, mean)
}

/// Summary of a tensor's values.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    /// All elements, including NaN and Inf.
    pub count: u64,
    /// Finite elements, over which mean/std/min/max are taken.
    pub finite: u64,
    pub mean: f64,
    /// Population standard deviation (divides by `finite`).
    pub std: f64,
    pub min: f64,
    pub max: f64,
    pub nan: u64,
    pub pos_inf: u64,
    pub neg_inf: u64,
}

impl Summary {
    pub fn inf(&self) -> u64 {
        self.pos_inf + self.neg_inf
    }

    /// Summary of one slice.
    pub fn of(values: &[f32]) -> Self {
        let mut acc = SummaryAccumulator::new();
        acc.push(values);
        acc.finish()
    }
}

/// Streaming accumulator; `merge` combines accumulators built on separate threads.
#[derive(Clone, Copy, Debug)]
pub struct SummaryAccumulator {
    count: u64,
    finite: u64,
    mean: f64,
    m2: f64,
    min: f64,
    max: f64,
    nan: u64,
    pos_inf: u64,
    neg_inf: u64,
}

impl Default for SummaryAccumulator {
    fn default() -> Self {
        Self::new()
    }
}

impl SummaryAccumulator {
    pub fn new() -> Self {
        Self {
            count: 0,
            finite: 0,
            mean: 0.0,
            m2: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            nan: 0,
            pos_inf: 0,
            neg_inf: 0,
        }
    }

    /// Add a chunk of values.
    pub fn push(&mut self, values: &[f32]) {
        let chunk = Self::of_finite(values).unwrap_or_else(|| Self::of_mixed(values));
        self.merge(&chunk);
    }

    /// Two branch-free passes over eight lanes, built for the widest vectors the CPU has
    /// (same IEEE operations in the same order per lane whatever the build, so the same
    /// bits): first the f64 sum, min, max and a count of non-finite values, then the
    /// squared deviations from the mean (exact where a one-pass sum of squares would
    /// cancel). `None` if any value is NaN or infinite.
    fn of_finite(values: &[f32]) -> Option<Self> {
        let mut chunk = Self::new();
        chunk.count = values.len() as u64;
        chunk.finite = chunk.count;
        if values.is_empty() {
            return Some(chunk);
        }
        let (body, tail) = values.split_at(values.len() / L * L);
        let first = first_pass(body);
        let mut total: f64 = first.sum.iter().sum();
        let mut n_bad: u32 = first.bad.iter().sum();
        let mut lo = first.min.iter().copied().fold(f32::INFINITY, f32::min);
        let mut hi = first.max.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for &x in tail {
            n_bad += u32::from(!x.is_finite());
            total += f64::from(x);
            lo = lo.min(x);
            hi = hi.max(x);
        }
        if n_bad > 0 {
            return None;
        }
        let mean = total / values.len() as f64;
        let mut m2_total: f64 = squared_deviations(body, mean).iter().sum();
        for &x in tail {
            let d = f64::from(x) - mean;
            m2_total += d * d;
        }
        chunk.mean = mean;
        chunk.m2 = m2_total;
        chunk.min = f64::from(lo);
        chunk.max = f64::from(hi);
        Some(chunk)
    }

    /// Some values are NaN or infinite: count them apart, summarise the rest.
    fn of_mixed(values: &[f32]) -> Self {
        let mut chunk = Self::new();
        chunk.count = values.len() as u64;
        let mut sum = 0.0f64;
        let (mut min, mut max) = (f32::INFINITY, f32::NEG_INFINITY);
        for &v in values {
            if v.is_finite() {
                sum += f64::from(v);
                min = min.min(v);
                max = max.max(v);
            } else if v.is_nan() {
                chunk.nan += 1;
            } else if v > 0.0 {
                chunk.pos_inf += 1;
            } else {
                chunk.neg_inf += 1;
            }
        }
        chunk.finite = chunk.count - chunk.nan - chunk.pos_inf - chunk.neg_inf;
        if chunk.finite > 0 {
            let mean = sum / chunk.finite as f64;
            let mut m2 = 0.0f64;
            for &v in values {
                if v.is_finite() {
                    let d = f64::from(v) - mean;
                    m2 += d * d;
                }
            }
            chunk.mean = mean;
            chunk.m2 = m2;
            chunk.min = f64::from(min);
            chunk.max = f64::from(max);
        }
        chunk
    }

    /// Combine with another accumulator (Chan et al. pairwise update).
    pub fn merge(&mut self, other: &Self) {
        let (na, nb) = (self.finite as f64, other.finite as f64);
        if other.finite > 0 {
            if self.finite == 0 {
                self.mean = other.mean;
                self.m2 = other.m2;
            } else {
                let n = na + nb;
                let delta = other.mean - self.mean;
                self.mean += delta * nb / n;
                self.m2 += other.m2 + delta * delta * na * nb / n;
            }
        }
        self.count += other.count;
        self.finite += other.finite;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        self.nan += other.nan;
        self.pos_inf += other.pos_inf;
        self.neg_inf += other.neg_inf;
    }

    /// The summary; with no finite values, mean/std/min/max are NaN.
    pub fn finish(&self) -> Summary {
        let empty = self.finite == 0;
        let nan_if_empty = |v: f64| if empty { f64::NAN } else { v };
        Summary {
            count: self.count,
            finite: self.finite,
            mean: nan_if_empty(self.mean),
            std: nan_if_empty((self.m2 / self.finite.max(1) as f64).sqrt()),
            min: nan_if_empty(self.min),
            max: nan_if_empty(self.max),
            nan: self.nan,
            pos_inf: self.pos_inf,
            neg_inf: self.neg_inf,
        }
    }
}

#[cfg(test)]
mod tests {

    /// Every build of the first pass gives the same bits as the portable one (the
    /// dispatcher may pick any of them), on lengths around the lane width.
    #[test]
    fn first_pass_builds_agree_bit_for_bit() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for n in [0usize, 1, 7, 8, 9, 63, 64, 1000, 4097] {
            let v: Vec<f32> = (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 1e3
                })
                .collect();
            let body = &v[..n / L * L];
            let want = first_pass_impl(body);
            let mut got = vec![first_pass(body)];
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: checked above.
                    got.push(unsafe { first_pass_avx2(body) });
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: checked above.
                    got.push(unsafe { first_pass_avx512(body) });
                }
            }
            for g in got {
                let bits = |a: &[f64; L]| a.map(f64::to_bits);
                assert_eq!(bits(&g.sum), bits(&want.sum), "n={n}");
                assert_eq!(g.min.map(f32::to_bits), want.min.map(f32::to_bits));
                assert_eq!(g.max.map(f32::to_bits), want.max.map(f32::to_bits));
                assert_eq!(g.bad, want.bad);
            }
        }
    }

    use super::*;
    use approx::assert_relative_eq;

    /// Exact reference in f64, straight from the definitions.
    fn reference(v: &[f32]) -> (f64, f64, usize) {
        let f: Vec<f64> = v
            .iter()
            .filter(|x| x.is_finite())
            .map(|&x| x.into())
            .collect();
        let mean = f.iter().sum::<f64>() / f.len() as f64;
        let var = f.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / f.len() as f64;
        (mean, var.sqrt(), f.len())
    }

    #[test]
    fn small_exact_values() {
        let s = Summary::of(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(s.mean, 2.5);
        assert_eq!(s.std, 1.25f64.sqrt());
        assert_eq!((s.min, s.max), (1.0, 4.0));
        assert_eq!((s.count, s.finite, s.nan, s.inf()), (4, 4, 0, 0));
    }

    #[test]
    fn non_finite_counted_apart() {
        let s = Summary::of(&[
            f32::NAN,
            1.0,
            f32::INFINITY,
            3.0,
            f32::NEG_INFINITY,
            f32::NAN,
        ]);
        assert_eq!(
            (s.count, s.finite, s.nan, s.pos_inf, s.neg_inf),
            (6, 2, 2, 1, 1)
        );
        assert_eq!(s.mean, 2.0);
        assert_eq!(s.std, 1.0);
        assert_eq!((s.min, s.max), (1.0, 3.0));
    }

    #[test]
    fn an_outlier_first_value_keeps_the_variance_exact() {
        let mut v = vec![1.0e6f32];
        v.extend((0..9999).map(|i| ((i * 37) % 101) as f32 * 1e-3));
        let (mean, std, _) = reference(&v);
        let s = Summary::of(&v);
        assert_relative_eq!(s.mean, mean, max_relative = 1e-12);
        assert_relative_eq!(s.std, std, max_relative = 1e-9);
    }

    #[test]
    fn empty_and_all_nan() {
        let s = Summary::of(&[]);
        assert_eq!(s.count, 0);
        assert!(s.mean.is_nan() && s.std.is_nan() && s.min.is_nan());
        let s = Summary::of(&[f32::NAN; 3]);
        assert_eq!((s.count, s.finite, s.nan), (3, 0, 3));
        assert!(s.mean.is_nan());
    }

    #[test]
    fn chunked_merge_matches_exact_and_avoids_cancellation() {
        // Large offset, tiny spread: a naive sum of squares in f32 or f64 loses it.
        let v: Vec<f32> = (0..100_003)
            .map(|i| 10_000.0 + ((i * 7919) % 1000) as f32 * 1e-3)
            .collect();
        let (mean, std, n) = reference(&v);
        let mut acc = SummaryAccumulator::new();
        for c in v.chunks(4096) {
            acc.push(c);
        }
        let s = acc.finish();
        assert_eq!(s.finite as usize, n);
        assert_relative_eq!(s.mean, mean, max_relative = 1e-14);
        assert_relative_eq!(s.std, std, max_relative = 1e-9);
        // Merging two halves built separately gives the same answer.
        let (a, b) = v.split_at(50_000);
        let mut x = SummaryAccumulator::new();
        x.push(a);
        let mut y = SummaryAccumulator::new();
        y.push(b);
        x.merge(&y);
        assert_relative_eq!(x.finish().std, std, max_relative = 1e-9);
    }
}
