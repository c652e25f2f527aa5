//! Per-tensor summary statistics: mean, standard deviation, min, max over the finite
//! values, with NaN and ±Inf counted separately (never folded into the numbers).
//!
//! Values arrive in chunks (a tensor is dequantized a slice at a time), so the mean and
//! variance are merged chunk by chunk with Chan et al.'s parallel update: each chunk's
//! own mean and sum of squared deviations are computed in f64 in two passes over the
//! chunk (still in cache), which keeps the variance exact where a one-pass sum of squares
//! would cancel catastrophically (values near 1e4 with a spread of 1e-3).

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

    /// Two branch-free passes over eight lanes (the compiler vectorises them): first the
    /// f64 sum, min, max and a count of non-finite values, then the squared deviations
    /// from the mean (exact where a one-pass sum of squares would cancel). `None` if any
    /// value is NaN or infinite.
    fn of_finite(values: &[f32]) -> Option<Self> {
        const L: usize = 8;
        let mut chunk = Self::new();
        chunk.count = values.len() as u64;
        chunk.finite = chunk.count;
        if values.is_empty() {
            return Some(chunk);
        }
        let (body, tail) = values.split_at(values.len() / L * L);
        let mut sum = [0.0f64; L];
        let mut min = [f32::INFINITY; L];
        let mut max = [f32::NEG_INFINITY; L];
        let mut bad = [0u32; L];
        for c in body.chunks_exact(L) {
            for i in 0..L {
                let x = c[i];
                bad[i] += u32::from(x.to_bits() & 0x7f80_0000 == 0x7f80_0000);
                sum[i] += f64::from(x);
                min[i] = min[i].min(x);
                max[i] = max[i].max(x);
            }
        }
        let mut total: f64 = sum.iter().sum();
        let mut n_bad: u32 = bad.iter().sum();
        let mut lo = min.iter().copied().fold(f32::INFINITY, f32::min);
        let mut hi = max.iter().copied().fold(f32::NEG_INFINITY, f32::max);
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
        let mut m2 = [0.0f64; L];
        for c in body.chunks_exact(L) {
            for i in 0..L {
                let d = f64::from(c[i]) - mean;
                m2[i] += d * d;
            }
        }
        let mut m2_total: f64 = m2.iter().sum();
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
