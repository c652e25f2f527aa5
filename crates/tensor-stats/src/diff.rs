//! Difference metrics between a current tensor `c` and a reference tensor `r`, element
//! pairs streamed in chunks and accumulated in f64 (docs/diff.md defines each one).
//!
//! - `d_i = |c_i - r_i|`; mean and max absolute difference, RMSE = sqrt(mean d²),
//!   NMSE = MSE / Var(r) (population variance of the compared reference values) and in dB,
//!   cosine similarity = Σcr / sqrt(Σc² Σr²).
//! - **Relative difference and |r| ≈ 0.** `rel_i = d_i / |r_i|` is defined only where
//!   `|r_i| > REL_FLOOR` (1e-12, the original analyzer's threshold); elements with a
//!   smaller reference are left out of the mean and max relative difference (their
//!   number is `rel_count` less than `compared`), so a zero in the reference never makes
//!   the relative error infinite (the fast path computes `d_i · (1/|r_i|)`, within an ulp
//!   or two of the quotient). The tolerance rules need no division: they are written
//!   with `rel * |r_i|`, so at `r_i = 0` only the absolute tolerance can be met.
//! - **NaN and Inf** are counted per side and never enter the numbers: only pairs where
//!   both values are finite are `compared`. A pair where both sides are NaN, or both the
//!   same infinity (a mask's `-inf`), agrees; any other pair with a non-finite value is a
//!   mismatch that no tolerance passes.
//! - **Tolerance** (`ToleranceMode`): `Elementwise` (torch `assert_close`): an element
//!   fails when `d > abs + rel·|r|`; `Either` (Polygraphy): it fails only when `d > abs`
//!   and `d > rel·|r|`; `Mean` (the seed fork): the tensor passes when mean abs ≤ abs and
//!   mean rel ≤ rel. In the element modes up to `max_mismatch_pct` percent of the
//!   elements (rounded down) may fail. The share of elements outside tolerance is
//!   always counted with the mode's element rule (`Elementwise`'s for `Mean`).
//! - **Smallest passing tolerances**: the smallest `abs` that passes with `rel` kept, and
//!   the smallest `rel` with `abs` kept (exact, mismatch budget included; infinite when
//!   no value passes, e.g. a non-finite mismatch or a failing element with r = 0 for
//!   `rel`). In `Mean` mode they are the mean abs and mean rel themselves.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Below this `|r|`, an element has no relative difference (see the module docs).
pub const REL_FLOOR: f64 = 1e-12;

/// How a tensor is judged against the tolerances.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToleranceMode {
    /// Every element: `|c-r| <= abs + rel*|r|` (torch `assert_close`).
    Elementwise,
    /// An element fails only if both `|c-r| > abs` and `|c-r| > rel*|r|` (Polygraphy).
    Either,
    /// Mean absolute and mean relative difference within `abs` and `rel` (the seed fork).
    Mean,
}

impl ToleranceMode {
    pub const ALL: [ToleranceMode; 3] = [Self::Elementwise, Self::Either, Self::Mean];

    pub fn name(self) -> &'static str {
        match self {
            Self::Elementwise => "elementwise",
            Self::Either => "either",
            Self::Mean => "mean",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == s)
    }
}

/// Tolerances and the rule that applies them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tolerance {
    pub abs: f64,
    pub rel: f64,
    pub mode: ToleranceMode,
    /// Percentage (0–100) of elements allowed to fail in the element modes.
    pub max_mismatch_pct: f64,
}

impl Default for Tolerance {
    /// The seed's defaults: abs 1e-6, rel 1e-4, elementwise, no failing element allowed.
    fn default() -> Self {
        Self {
            abs: 1e-6,
            rel: 1e-4,
            mode: ToleranceMode::Elementwise,
            max_mismatch_pct: 0.0,
        }
    }
}

impl Tolerance {
    /// How many of `n` elements may fail: `floor(max_mismatch_pct / 100 * n)`.
    pub fn allowed_mismatches(&self, n: u64) -> u64 {
        if self.mode == ToleranceMode::Mean || self.max_mismatch_pct.is_nan() {
            return 0;
        }
        let pct = self.max_mismatch_pct.clamp(0.0, 100.0);
        ((pct / 100.0) * n as f64).floor().min(n as f64) as u64
    }

    /// Whether one element pair (finite values) fails the mode's element rule.
    pub fn element_fails(&self, c: f64, r: f64) -> bool {
        let d = (c - r).abs();
        let ar = r.abs();
        match self.mode {
            ToleranceMode::Either => d > self.abs && d > self.rel * ar,
            ToleranceMode::Elementwise | ToleranceMode::Mean => d > self.abs + self.rel * ar,
        }
    }
}

/// An element singled out by a metric.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Worst {
    /// Flat index (ne0 fastest).
    pub index: u64,
    pub current: f64,
    pub reference: f64,
    /// The metric's value there (absolute or relative difference).
    pub value: f64,
}

/// The metrics of one compared pair of tensors.
#[derive(Clone, Debug, PartialEq)]
pub struct DiffMetrics {
    /// Element pairs.
    pub count: u64,
    /// Pairs where both values are finite: the numbers below are over these.
    pub compared: u64,
    pub nan_current: u64,
    pub inf_current: u64,
    pub nan_reference: u64,
    pub inf_reference: u64,
    /// Pairs both NaN or both the same infinity.
    pub nonfinite_agree: u64,
    /// Pairs with a non-finite value that do not agree.
    pub nonfinite_mismatch: u64,
    pub mean_abs: f64,
    pub max_abs: f64,
    /// Over the `rel_count` pairs with `|r| > REL_FLOOR`; 0 when there are none.
    pub mean_rel: f64,
    pub max_rel: f64,
    pub rel_count: u64,
    pub mse: f64,
    pub rmse: f64,
    /// Population variance of the compared reference values.
    pub ref_variance: f64,
    /// MSE / Var(r); 0 when both are 0, +inf when only the variance is.
    pub nmse: f64,
    /// 10·log10(NMSE); -inf for an NMSE of 0.
    pub nmse_db: f64,
    /// 1 when both sides are all zero, 0 when only one is.
    pub cosine: f64,
    pub worst_abs: Option<Worst>,
    pub worst_rel: Option<Worst>,
    /// Elements failing the mode's element rule (non-finite mismatches included).
    pub mismatches: u64,
    /// `mismatches / count` (0 for an empty tensor).
    pub mismatch_fraction: f64,
    pub allowed_mismatches: u64,
    pub within: bool,
    /// The smallest `abs` that passes with `rel` unchanged.
    pub min_passing_abs: f64,
    /// The smallest `rel` that passes with `abs` unchanged.
    pub min_passing_rel: f64,
    pub tolerance: Tolerance,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DiffError {
    #[error("current has {current} values, reference {reference}")]
    LengthMismatch { current: usize, reference: usize },
}

/// f64 with a total order, for the heaps.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Ord64(f64);
impl Eq for Ord64 {}
impl PartialOrd for Ord64 {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Ord64 {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&o.0)
    }
}

/// The `k` largest values seen (a min-heap of them).
#[derive(Clone, Debug)]
struct TopK {
    k: usize,
    heap: BinaryHeap<Reverse<Ord64>>,
}

impl TopK {
    fn new(k: usize) -> Self {
        Self {
            k,
            heap: BinaryHeap::new(),
        }
    }

    /// Values at or below this cannot enter.
    #[inline]
    fn threshold(&self) -> f64 {
        if self.heap.len() < self.k {
            0.0
        } else {
            self.heap.peek().map_or(0.0, |r| r.0 .0)
        }
    }

    #[inline]
    fn push(&mut self, v: f64) {
        if v <= 0.0 || (self.heap.len() >= self.k && v <= self.threshold()) {
            return;
        }
        self.heap.push(Reverse(Ord64(v)));
        if self.heap.len() > self.k {
            self.heap.pop();
        }
    }

    fn merge(&mut self, o: &TopK) {
        for v in &o.heap {
            self.push(v.0 .0);
        }
    }

    /// The k-th largest value: the smallest tolerance that lets k-1 elements exceed it.
    fn kth(&self) -> f64 {
        if self.heap.len() < self.k {
            0.0
        } else {
            self.heap.peek().map_or(0.0, |r| r.0 .0)
        }
    }
}

/// Streaming accumulator over element pairs. Push chunks in order; accumulators built on
/// separate ranges (`starting_at`) merge.
#[derive(Clone, Debug)]
pub struct DiffAccumulator {
    tol: Tolerance,
    allowed: u64,
    /// Flat index of the next pushed element.
    next: u64,
    count: u64,
    compared: u64,
    nan_c: u64,
    inf_c: u64,
    nan_r: u64,
    inf_r: u64,
    nf_agree: u64,
    nf_mismatch: u64,
    sum_d: f64,
    sum_d2: f64,
    sum_rel: f64,
    rel_count: u64,
    dot: f64,
    cc: f64,
    rr: f64,
    /// Reference mean and sum of squared deviations (Chan merge).
    r_mean: f64,
    r_m2: f64,
    worst_abs: Option<Worst>,
    worst_rel: Option<Worst>,
    mismatches: u64,
    need_abs: TopK,
    need_rel: TopK,
}

/// Elements per internal block: two passes over it stay in cache.
const BLOCK: usize = 4096;
const LANES: usize = 8;

fn better(a: &Option<Worst>, b: &Option<Worst>) -> Option<Worst> {
    match (a, b) {
        (Some(x), Some(y)) => {
            if y.value > x.value || (y.value == x.value && y.index < x.index) {
                Some(*y)
            } else {
                Some(*x)
            }
        }
        (Some(x), None) => Some(*x),
        (None, y) => *y,
    }
}

/// Per-lane partial results of the fast path: lane `l` holds elements `l`, `l + LANES`,
/// `l + 2·LANES`, … of a block's body.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Lanes {
    sum_d: [f64; LANES],
    sum_d2: [f64; LANES],
    sum_rel: [f64; LANES],
    dot: [f64; LANES],
    cc: [f64; LANES],
    rr: [f64; LANES],
    sum_r: [f64; LANES],
    max_d: [f64; LANES],
    /// Over all elements, with 0 for those without a relative difference: meaningful
    /// only where `rel_n` is not 0.
    max_rel: [f64; LANES],
    need_a: [f64; LANES],
    need_r: [f64; LANES],
    rel_n: [u64; LANES],
    bad: [u64; LANES],
}

impl Lanes {
    fn new() -> Self {
        Self {
            sum_d: [0.0; LANES],
            sum_d2: [0.0; LANES],
            sum_rel: [0.0; LANES],
            dot: [0.0; LANES],
            cc: [0.0; LANES],
            rr: [0.0; LANES],
            sum_r: [0.0; LANES],
            max_d: [-1.0; LANES],
            max_rel: [-1.0; LANES],
            need_a: [0.0; LANES],
            need_r: [0.0; LANES],
            rel_n: [0; LANES],
            bad: [0; LANES],
        }
    }

    /// Whether every input value was finite: a NaN or an infinity on either side makes
    /// Σc² or Σr² non-finite, and finite f32 values cannot (4096 · f32::MAX² < f64::MAX).
    fn all_finite(&self) -> bool {
        self.cc.iter().chain(&self.rr).all(|x| x.is_finite())
    }
}

/// The largest of `v` (-1 for none above it).
fn lane_max(v: &[f64; LANES]) -> f64 {
    v.iter().fold(-1.0, |a, &b| if b > a { b } else { a })
}

/// The fast path over whole lane groups: every sum, maximum, count and (`NEED`) the
/// largest tolerance each element needs, in LANES independent lanes with no branch and
/// no index, so that the compiler vectorises it. Non-finite values poison Σc² or Σr²
/// (`Lanes::all_finite`): the caller then redoes the block element by element. The
/// worst elements' indices are found afterwards, only for a block that beats the worst
/// so far. `EITHER` picks the element rule.
#[inline(always)]
fn kernel_impl<const EITHER: bool, const NEED: bool>(
    c: &[f32],
    r: &[f32],
    abs_t: f64,
    rel_t: f64,
) -> Lanes {
    let mut k = Lanes::new();
    for (cg, rg) in c.chunks_exact(LANES).zip(r.chunks_exact(LANES)) {
        for l in 0..LANES {
            let (cv, rv) = (f64::from(cg[l]), f64::from(rg[l]));
            let d = (cv - rv).abs();
            let ar = rv.abs();
            k.sum_d[l] += d;
            k.sum_d2[l] += d * d;
            k.dot[l] += cv * rv;
            k.cc[l] += cv * cv;
            k.rr[l] += rv * rv;
            k.sum_r[l] += rv;
            let has_rel = ar > REL_FLOOR;
            // One division per element; 1/0 = +inf.
            let inv = 1.0 / ar;
            let q = d * inv;
            let rel = if has_rel { q } else { 0.0 };
            k.sum_rel[l] += rel;
            k.rel_n[l] += u64::from(has_rel);
            k.max_d[l] = if d > k.max_d[l] { d } else { k.max_d[l] };
            k.max_rel[l] = if rel > k.max_rel[l] {
                rel
            } else {
                k.max_rel[l]
            };
            let over_abs = d > abs_t;
            let fails = if EITHER {
                over_abs && d > rel_t * ar
            } else {
                d > abs_t + rel_t * ar
            };
            k.bad[l] += u64::from(fails);
            if NEED {
                // d / 0 is +inf: no rel tolerance passes a failing element at r = 0.
                let (na, nr) = if EITHER {
                    (
                        if d > rel_t * ar { d } else { 0.0 },
                        if over_abs { q } else { 0.0 },
                    )
                } else {
                    (
                        (d - rel_t * ar).max(0.0),
                        if over_abs { (d - abs_t) * inv } else { 0.0 },
                    )
                };
                k.need_a[l] = if na > k.need_a[l] { na } else { k.need_a[l] };
                k.need_r[l] = if nr > k.need_r[l] { nr } else { k.need_r[l] };
            }
        }
    }
    k
}

/// `kernel_impl` compiled for AVX-512F: the same IEEE operations in the same order per
/// lane (no fused multiply-add), so the same bits as the portable build.
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn kernel_avx512<const EITHER: bool, const NEED: bool>(
    c: &[f32],
    r: &[f32],
    abs_t: f64,
    rel_t: f64,
) -> Lanes {
    kernel_impl::<EITHER, NEED>(c, r, abs_t, rel_t)
}

/// `kernel_impl` compiled for AVX2 (same bits, as above).
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn kernel_avx2<const EITHER: bool, const NEED: bool>(
    c: &[f32],
    r: &[f32],
    abs_t: f64,
    rel_t: f64,
) -> Lanes {
    kernel_impl::<EITHER, NEED>(c, r, abs_t, rel_t)
}

/// Σ (r - mean)² over whole lane groups, in LANES lanes (pass 2 of a block).
#[inline(always)]
fn squared_deviations_impl(r: &[f32], mean: f64) -> [f64; LANES] {
    let mut m2 = [0.0f64; LANES];
    for g in r.chunks_exact(LANES) {
        for l in 0..LANES {
            let x = f64::from(g[l]) - mean;
            m2[l] += x * x;
        }
    }
    m2
}

/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn squared_deviations_avx512(r: &[f32], mean: f64) -> [f64; LANES] {
    squared_deviations_impl(r, mean)
}

/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn squared_deviations_avx2(r: &[f32], mean: f64) -> [f64; LANES] {
    squared_deviations_impl(r, mean)
}

/// `squared_deviations_impl` with the widest vectors the CPU has (same bits).
#[inline]
fn squared_deviations(r: &[f32], mean: f64) -> [f64; LANES] {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F is available (checked above).
            return unsafe { squared_deviations_avx512(r, mean) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is available (checked above).
            return unsafe { squared_deviations_avx2(r, mean) };
        }
    }
    squared_deviations_impl(r, mean)
}

/// `kernel_impl` with the widest vectors the CPU has.
#[inline]
fn kernel<const EITHER: bool, const NEED: bool>(
    c: &[f32],
    r: &[f32],
    abs_t: f64,
    rel_t: f64,
) -> Lanes {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F is available (checked above).
            return unsafe { kernel_avx512::<EITHER, NEED>(c, r, abs_t, rel_t) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is available (checked above).
            return unsafe { kernel_avx2::<EITHER, NEED>(c, r, abs_t, rel_t) };
        }
    }
    kernel_impl::<EITHER, NEED>(c, r, abs_t, rel_t)
}

impl DiffAccumulator {
    /// An accumulator for a tensor of `n_total` elements (the mismatch budget is a share
    /// of it), starting at element 0.
    pub fn new(tol: Tolerance, n_total: u64) -> Self {
        Self::starting_at(tol, n_total, 0)
    }

    /// The same, for a range of the tensor that starts at flat index `start`.
    pub fn starting_at(tol: Tolerance, n_total: u64, start: u64) -> Self {
        let allowed = tol.allowed_mismatches(n_total);
        let k = usize::try_from(allowed.saturating_add(1)).unwrap_or(usize::MAX);
        Self {
            tol,
            allowed,
            next: start,
            count: 0,
            compared: 0,
            nan_c: 0,
            inf_c: 0,
            nan_r: 0,
            inf_r: 0,
            nf_agree: 0,
            nf_mismatch: 0,
            sum_d: 0.0,
            sum_d2: 0.0,
            sum_rel: 0.0,
            rel_count: 0,
            dot: 0.0,
            cc: 0.0,
            rr: 0.0,
            r_mean: 0.0,
            r_m2: 0.0,
            worst_abs: None,
            worst_rel: None,
            mismatches: 0,
            need_abs: TopK::new(k),
            need_rel: TopK::new(k),
        }
    }

    /// Add the next `current.len()` element pairs.
    pub fn push(&mut self, current: &[f32], reference: &[f32]) -> Result<(), DiffError> {
        if current.len() != reference.len() {
            return Err(DiffError::LengthMismatch {
                current: current.len(),
                reference: reference.len(),
            });
        }
        for (c, r) in current.chunks(BLOCK).zip(reference.chunks(BLOCK)) {
            self.push_block(c, r);
        }
        Ok(())
    }

    /// The tolerance needed by one finite pair: (abs with rel kept, rel with abs kept).
    #[inline]
    fn needed(&self, d: f64, ar: f64) -> (f64, f64) {
        let t = &self.tol;
        match t.mode {
            ToleranceMode::Elementwise => {
                let na = (d - t.rel * ar).max(0.0);
                let nr = if d <= t.abs {
                    0.0
                } else if ar > 0.0 {
                    (d - t.abs) / ar
                } else {
                    f64::INFINITY
                };
                (na, nr)
            }
            ToleranceMode::Either => {
                let na = if d > t.rel * ar { d } else { 0.0 };
                let nr = if d <= t.abs {
                    0.0
                } else if ar > 0.0 {
                    d / ar
                } else {
                    f64::INFINITY
                };
                (na, nr)
            }
            ToleranceMode::Mean => (0.0, 0.0),
        }
    }

    fn push_block(&mut self, c: &[f32], r: &[f32]) {
        let n = c.len();
        let base = self.next;
        // Pass 1: everything but the reference's squared deviations and the worst
        // elements' indices, in LANES independent lanes, branch-free (vectorised).
        let (abs_t, rel_t) = (self.tol.abs, self.tol.rel);
        // With no mismatch budget the smallest passing tolerances are plain maxima.
        let single = self.need_abs.k == 1;
        let body = n / LANES * LANES;
        let (cb, rb) = (&c[..body], &r[..body]);
        let k = match self.tol.mode {
            ToleranceMode::Either => kernel::<true, true>(cb, rb, abs_t, rel_t),
            ToleranceMode::Elementwise => kernel::<false, true>(cb, rb, abs_t, rel_t),
            ToleranceMode::Mean => kernel::<false, false>(cb, rb, abs_t, rel_t),
        };
        let tail_nonfinite = c[body..].iter().chain(&r[body..]).any(|x| !x.is_finite());
        if tail_nonfinite || !k.all_finite() {
            // Rare: redo the block element by element, sorting non-finite pairs out.
            self.push_block_scalar(c, r);
            return;
        }
        let mut s_r: f64 = k.sum_r.iter().sum();
        let mut acc_d: f64 = k.sum_d.iter().sum();
        let mut acc_d2: f64 = k.sum_d2.iter().sum();
        let mut acc_rel: f64 = k.sum_rel.iter().sum();
        let body_rel_n: u64 = k.rel_n.iter().sum();
        let mut acc_rel_n = body_rel_n;
        let mut acc_dot: f64 = k.dot.iter().sum();
        let mut acc_cc: f64 = k.cc.iter().sum();
        let mut acc_rr: f64 = k.rr.iter().sum();
        let mut acc_bad: u64 = k.bad.iter().sum();
        // The worst elements of the body: their first index is looked up again only
        // when the block beats the worst so far (a tie keeps the earlier element).
        let mut wa: Option<Worst> = None;
        let mut wr: Option<Worst> = None;
        let max_d = lane_max(&k.max_d);
        if body > 0 && self.worst_abs.is_none_or(|w| max_d > w.value) {
            wa = (0..body)
                .find(|&i| (f64::from(c[i]) - f64::from(r[i])).abs() == max_d)
                .map(|i| self.worst(base, i, c, r, max_d));
        }
        let max_rel = lane_max(&k.max_rel);
        if body_rel_n > 0 && self.worst_rel.is_none_or(|w| max_rel > w.value) {
            wr = (0..body)
                .find(|&i| {
                    let (cv, rv) = (f64::from(c[i]), f64::from(r[i]));
                    let ar = rv.abs();
                    ar > REL_FLOOR && (cv - rv).abs() * (1.0 / ar) == max_rel
                })
                .map(|i| self.worst(base, i, c, r, max_rel));
        }
        for i in body..n {
            let (cv, rv) = (f64::from(c[i]), f64::from(r[i]));
            let d = (cv - rv).abs();
            let ar = rv.abs();
            s_r += rv;
            acc_d += d;
            acc_d2 += d * d;
            acc_dot += cv * rv;
            acc_cc += cv * cv;
            acc_rr += rv * rv;
            wa = better(&wa, &Some(self.worst(base, i, c, r, d)));
            if ar > REL_FLOOR {
                acc_rel += d / ar;
                acc_rel_n += 1;
                wr = better(&wr, &Some(self.worst(base, i, c, r, d / ar)));
            }
            acc_bad += u64::from(self.tol.element_fails(cv, rv));
            let (na, nr) = self.needed(d, ar);
            self.need_abs.push(na);
            self.need_rel.push(nr);
        }
        if self.tol.mode != ToleranceMode::Mean {
            let (need_a, need_r) = (lane_max(&k.need_a), lane_max(&k.need_r));
            if single {
                self.need_abs.push(need_a);
                self.need_rel.push(need_r);
            } else {
                // A mismatch budget: the k largest needs. Only a block holding a need
                // above the current k-th largest can change them; the lanes' rel need
                // is d·(1/|r|), within a few ulps of the quotient pushed below, hence
                // the margin.
                let may_rel = need_r * (1.0 + 1e-9) + 1e-300 > self.need_rel.threshold();
                if need_a > self.need_abs.threshold() || may_rel {
                    for i in 0..body {
                        let (cv, rv) = (f64::from(c[i]), f64::from(r[i]));
                        let (na, nr) = self.needed((cv - rv).abs(), rv.abs());
                        self.need_abs.push(na);
                        self.need_rel.push(nr);
                    }
                }
            }
        }
        // Pass 2: the reference's squared deviations from this block's mean (exact where
        // a one-pass sum of squares would cancel).
        let mean = s_r / n as f64;
        let mut m2_total: f64 = squared_deviations(&r[..body], mean).iter().sum();
        for &v in &r[body..] {
            let x = f64::from(v) - mean;
            m2_total += x * x;
        }
        self.merge_sums(
            n as u64, acc_d, acc_d2, acc_rel, acc_rel_n, acc_dot, acc_cc, acc_rr, mean, m2_total,
            acc_bad,
        );
        self.worst_abs = better(&self.worst_abs, &wa);
        self.worst_rel = better(&self.worst_rel, &wr);
        self.count += n as u64;
        self.next += n as u64;
    }

    #[inline]
    fn worst(&self, base: u64, i: usize, c: &[f32], r: &[f32], value: f64) -> Worst {
        Worst {
            index: base + i as u64,
            current: f64::from(c[i]),
            reference: f64::from(r[i]),
            value,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn merge_sums(
        &mut self,
        compared: u64,
        sum_d: f64,
        sum_d2: f64,
        sum_rel: f64,
        rel_count: u64,
        dot: f64,
        cc: f64,
        rr: f64,
        r_mean: f64,
        r_m2: f64,
        mismatches: u64,
    ) {
        if compared > 0 {
            if self.compared == 0 {
                self.r_mean = r_mean;
                self.r_m2 = r_m2;
            } else {
                let (na, nb) = (self.compared as f64, compared as f64);
                let n = na + nb;
                let delta = r_mean - self.r_mean;
                self.r_mean += delta * nb / n;
                self.r_m2 += r_m2 + delta * delta * na * nb / n;
            }
        }
        self.compared += compared;
        self.sum_d += sum_d;
        self.sum_d2 += sum_d2;
        self.sum_rel += sum_rel;
        self.rel_count += rel_count;
        self.dot += dot;
        self.cc += cc;
        self.rr += rr;
        self.mismatches += mismatches;
    }

    /// The general path: element by element, non-finite values sorted out.
    fn push_block_scalar(&mut self, c: &[f32], r: &[f32]) {
        let base = self.next;
        let (mut sum_d, mut sum_d2, mut sum_rel, mut dot, mut cc, mut rr, mut sum_r) =
            (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
        let (mut rel_n, mut compared, mut bad) = (0u64, 0u64, 0u64);
        let mut wa: Option<Worst> = None;
        let mut wr: Option<Worst> = None;
        for i in 0..c.len() {
            let (cf, rf) = (c[i], r[i]);
            if !cf.is_finite() || !rf.is_finite() {
                self.nan_c += u64::from(cf.is_nan());
                self.inf_c += u64::from(cf.is_infinite());
                self.nan_r += u64::from(rf.is_nan());
                self.inf_r += u64::from(rf.is_infinite());
                let agree = (cf.is_nan() && rf.is_nan()) || (cf.is_infinite() && cf == rf);
                if agree {
                    self.nf_agree += 1;
                } else {
                    self.nf_mismatch += 1;
                    bad += 1;
                    self.need_abs.push(f64::INFINITY);
                    self.need_rel.push(f64::INFINITY);
                }
                continue;
            }
            compared += 1;
            let (cv, rv) = (f64::from(cf), f64::from(rf));
            let d = (cv - rv).abs();
            let ar = rv.abs();
            sum_d += d;
            sum_d2 += d * d;
            dot += cv * rv;
            cc += cv * cv;
            rr += rv * rv;
            sum_r += rv;
            wa = better(&wa, &Some(self.worst(base, i, c, r, d)));
            if ar > REL_FLOOR {
                sum_rel += d / ar;
                rel_n += 1;
                wr = better(&wr, &Some(self.worst(base, i, c, r, d / ar)));
            }
            bad += u64::from(self.tol.element_fails(cv, rv));
            let (na, nr) = self.needed(d, ar);
            self.need_abs.push(na);
            self.need_rel.push(nr);
        }
        let mean = if compared > 0 {
            sum_r / compared as f64
        } else {
            0.0
        };
        let m2: f64 = r
            .iter()
            .zip(c)
            .filter(|(r, c)| r.is_finite() && c.is_finite())
            .map(|(&v, _)| (f64::from(v) - mean).powi(2))
            .sum();
        self.merge_sums(
            compared, sum_d, sum_d2, sum_rel, rel_n, dot, cc, rr, mean, m2, bad,
        );
        self.worst_abs = better(&self.worst_abs, &wa);
        self.worst_rel = better(&self.worst_rel, &wr);
        self.count += c.len() as u64;
        self.next += c.len() as u64;
    }

    /// Combine with an accumulator of another range of the same tensor (same tolerance
    /// and total).
    pub fn merge(&mut self, o: &DiffAccumulator) {
        self.merge_sums(
            o.compared,
            o.sum_d,
            o.sum_d2,
            o.sum_rel,
            o.rel_count,
            o.dot,
            o.cc,
            o.rr,
            o.r_mean,
            o.r_m2,
            o.mismatches,
        );
        self.count += o.count;
        self.nan_c += o.nan_c;
        self.inf_c += o.inf_c;
        self.nan_r += o.nan_r;
        self.inf_r += o.inf_r;
        self.nf_agree += o.nf_agree;
        self.nf_mismatch += o.nf_mismatch;
        self.worst_abs = better(&self.worst_abs, &o.worst_abs);
        self.worst_rel = better(&self.worst_rel, &o.worst_rel);
        self.need_abs.merge(&o.need_abs);
        self.need_rel.merge(&o.need_rel);
        self.next = self.next.max(o.next);
    }

    /// Elements pushed so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn finish(&self) -> DiffMetrics {
        let n = self.compared as f64;
        let mean_of = |s: f64, k: u64| if k > 0 { s / k as f64 } else { 0.0 };
        let mean_abs = mean_of(self.sum_d, self.compared);
        let mse = mean_of(self.sum_d2, self.compared);
        let mean_rel = mean_of(self.sum_rel, self.rel_count);
        let ref_variance = if self.compared > 0 {
            self.r_m2 / n
        } else {
            0.0
        };
        let nmse = if ref_variance > 0.0 {
            mse / ref_variance
        } else if mse == 0.0 {
            0.0
        } else {
            f64::INFINITY
        };
        let cosine = if self.cc == 0.0 && self.rr == 0.0 {
            1.0
        } else if self.cc == 0.0 || self.rr == 0.0 {
            0.0
        } else {
            // f32 inputs: cc * rr cannot overflow f64.
            (self.dot / (self.cc * self.rr).sqrt()).clamp(-1.0, 1.0)
        };
        let t = self.tol;
        let (within, min_abs, min_rel) = match t.mode {
            ToleranceMode::Mean => {
                let ok = self.nf_mismatch == 0 && mean_abs <= t.abs && mean_rel <= t.rel;
                let inf_if_bad = |v: f64| {
                    if self.nf_mismatch > 0 {
                        f64::INFINITY
                    } else {
                        v
                    }
                };
                (ok, inf_if_bad(mean_abs), inf_if_bad(mean_rel))
            }
            _ => (
                self.mismatches <= self.allowed,
                self.need_abs.kth(),
                self.need_rel.kth(),
            ),
        };
        DiffMetrics {
            count: self.count,
            compared: self.compared,
            nan_current: self.nan_c,
            inf_current: self.inf_c,
            nan_reference: self.nan_r,
            inf_reference: self.inf_r,
            nonfinite_agree: self.nf_agree,
            nonfinite_mismatch: self.nf_mismatch,
            mean_abs,
            max_abs: self.worst_abs.map_or(0.0, |w| w.value),
            mean_rel,
            max_rel: self.worst_rel.map_or(0.0, |w| w.value),
            rel_count: self.rel_count,
            mse,
            rmse: mse.sqrt(),
            ref_variance,
            nmse,
            nmse_db: 10.0 * nmse.log10(),
            cosine,
            worst_abs: self.worst_abs,
            worst_rel: self.worst_rel,
            mismatches: self.mismatches,
            mismatch_fraction: if self.count > 0 {
                self.mismatches as f64 / self.count as f64
            } else {
                0.0
            },
            allowed_mismatches: self.allowed,
            within,
            min_passing_abs: min_abs,
            min_passing_rel: min_rel,
            tolerance: t,
        }
    }
}

/// Compare two whole slices.
pub fn diff(current: &[f32], reference: &[f32], tol: Tolerance) -> Result<DiffMetrics, DiffError> {
    let mut acc = DiffAccumulator::new(tol, reference.len() as u64);
    acc.push(current, reference)?;
    Ok(acc.finish())
}

/// The same, split over up to `threads` threads for large inputs (ranges merged in order).
pub fn diff_parallel(
    current: &[f32],
    reference: &[f32],
    tol: Tolerance,
    threads: usize,
) -> Result<DiffMetrics, DiffError> {
    if current.len() != reference.len() {
        return Err(DiffError::LengthMismatch {
            current: current.len(),
            reference: reference.len(),
        });
    }
    let n = reference.len();
    let threads = threads.clamp(1, n.div_ceil(1 << 16).max(1));
    if threads == 1 {
        return diff(current, reference, tol);
    }
    let parts: Vec<DiffAccumulator> = std::thread::scope(|s| {
        let handles: Vec<_> = crate::split_ranges(n as u64, threads, BLOCK as u64)
            .map(|piece| {
                let (start, end) = (piece.start as usize, piece.end as usize);
                let (c, r) = (&current[start..end], &reference[start..end]);
                s.spawn(move || {
                    let mut a = DiffAccumulator::starting_at(tol, n as u64, start as u64);
                    // Lengths are equal by construction.
                    let _ = a.push(c, r);
                    a
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    let mut acc = DiffAccumulator::new(tol, n as u64);
    for p in &parts {
        acc.merge(p);
    }
    Ok(acc.finish())
}

/// The 4-d index (ne0 fastest) of flat index `i` in a tensor of shape `ne`.
pub fn unravel(i: u64, ne: [u64; 4]) -> [u64; 4] {
    let mut out = [0u64; 4];
    let mut rest = i;
    for (d, &n) in ne.iter().enumerate() {
        let n = n.max(1);
        if d == 3 {
            out[d] = rest;
        } else {
            out[d] = rest % n;
            rest /= n;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift values in [-1, 1), with zeros, tiny references and (`nonfinite`) NaN and
    /// infinities planted.
    fn inputs(n: usize, seed: u64, nonfinite: bool) -> (Vec<f32>, Vec<f32>) {
        let mut s = seed | 1;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let mut c = Vec::with_capacity(n);
        let mut r = Vec::with_capacity(n);
        for _ in 0..n {
            let x = next();
            let v = ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
            let rv = match x % 97 {
                0 => 0.0,
                1 => -0.0,
                2 => 1e-13,
                _ => v,
            };
            let cv = match x % 89 {
                0 => rv,
                1 => 0.0,
                _ => rv + 1e-3 * (((x >> 16) & 0xffff) as f32 / 65536.0 - 0.5),
            };
            r.push(rv);
            c.push(cv);
        }
        if nonfinite {
            for k in 0..6 {
                let i = (next() % n as u64) as usize;
                match k % 3 {
                    0 => c[i] = f32::NAN,
                    1 => r[i] = f32::INFINITY,
                    _ => (c[i], r[i]) = (f32::NEG_INFINITY, f32::NEG_INFINITY),
                }
            }
        }
        (c, r)
    }

    fn bits(k: &Lanes) -> Vec<u64> {
        let f = [
            k.sum_d, k.sum_d2, k.sum_rel, k.dot, k.cc, k.rr, k.sum_r, k.max_d, k.max_rel, k.need_a,
            k.need_r,
        ];
        // NaN (only from non-finite input, whose block is redone) in one canonical form.
        let canon = |x: &f64| {
            if x.is_nan() {
                f64::NAN.to_bits()
            } else {
                x.to_bits()
            }
        };
        f.iter()
            .flat_map(|a| a.iter().map(canon))
            .chain(k.rel_n.iter().chain(&k.bad).copied())
            .collect()
    }

    /// Every vector build of the kernel gives the portable build's bits.
    #[test]
    fn kernel_builds_agree_bit_for_bit() {
        for seed in 1..20u64 {
            let (c, r) = inputs(BLOCK, seed * 7919, seed % 3 == 0);
            let (a, t) = (1e-4, 1e-3);
            type K = fn(&[f32], &[f32], f64, f64) -> Lanes;
            let portable: [K; 3] = [
                kernel_impl::<true, true>,
                kernel_impl::<false, true>,
                kernel_impl::<false, false>,
            ];
            let dispatched: [K; 3] = [
                kernel::<true, true>,
                kernel::<false, true>,
                kernel::<false, false>,
            ];
            for (p, d) in portable.iter().zip(&dispatched) {
                assert_eq!(
                    bits(&p(&c, &r, a, t)),
                    bits(&d(&c, &r, a, t)),
                    "seed {seed}"
                );
            }
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: AVX2 checked just above.
                    let v = unsafe { kernel_avx2::<false, true>(&c, &r, a, t) };
                    assert_eq!(bits(&v), bits(&portable[1](&c, &r, a, t)));
                    // SAFETY: AVX2 checked above.
                    let m = unsafe { squared_deviations_avx2(&r, 0.25) };
                    assert_eq!(
                        m.map(f64::to_bits),
                        squared_deviations_impl(&r, 0.25).map(f64::to_bits)
                    );
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: AVX-512F checked just above.
                    let v = unsafe { kernel_avx512::<true, true>(&c, &r, a, t) };
                    assert_eq!(bits(&v), bits(&portable[0](&c, &r, a, t)));
                    // SAFETY: AVX-512F checked above.
                    let m = unsafe { squared_deviations_avx512(&r, 0.25) };
                    assert_eq!(
                        m.map(f64::to_bits),
                        squared_deviations_impl(&r, 0.25).map(f64::to_bits)
                    );
                }
            }
        }
    }

    /// The lane fast path against the element-by-element path on the same blocks: the
    /// counts, maxima, worst elements and smallest passing tolerances agree exactly (the
    /// relative values up to the fast path's d·(1/|r|)), the sums to rounding.
    #[test]
    fn fast_path_matches_the_element_by_element_path() {
        let tols = [
            Tolerance::default(),
            Tolerance {
                abs: 1e-4,
                rel: 1e-3,
                mode: ToleranceMode::Either,
                max_mismatch_pct: 0.0,
            },
            Tolerance {
                abs: 1e-4,
                rel: 1e-3,
                mode: ToleranceMode::Elementwise,
                max_mismatch_pct: 5.0,
            },
            Tolerance {
                abs: 1e-5,
                rel: 1e-2,
                mode: ToleranceMode::Either,
                max_mismatch_pct: 0.5,
            },
            Tolerance {
                abs: 1e-4,
                rel: 1e-3,
                mode: ToleranceMode::Mean,
                max_mismatch_pct: 0.0,
            },
        ];
        for seed in 1..12u64 {
            let n = [4096usize, 20_003, 65_536][(seed % 3) as usize];
            let (c, r) = inputs(n, seed * 104_729, seed % 4 == 0);
            for t in tols {
                let mut fast = DiffAccumulator::new(t, n as u64);
                fast.push(&c, &r).unwrap();
                let mut slow = DiffAccumulator::new(t, n as u64);
                for (cb, rb) in c.chunks(BLOCK).zip(r.chunks(BLOCK)) {
                    slow.push_block_scalar(cb, rb);
                }
                let (f, s) = (fast.finish(), slow.finish());
                let ctx = format!("seed {seed} n {n} {t:?}");
                assert_eq!(
                    (f.count, f.compared, f.rel_count, f.mismatches, f.within),
                    (s.count, s.compared, s.rel_count, s.mismatches, s.within),
                    "{ctx}"
                );
                assert_eq!(
                    (
                        f.nan_current,
                        f.inf_current,
                        f.nan_reference,
                        f.inf_reference
                    ),
                    (
                        s.nan_current,
                        s.inf_current,
                        s.nan_reference,
                        s.inf_reference
                    ),
                    "{ctx}"
                );
                assert_eq!(
                    (f.nonfinite_agree, f.nonfinite_mismatch),
                    (s.nonfinite_agree, s.nonfinite_mismatch),
                    "{ctx}"
                );
                assert_eq!(f.worst_abs, s.worst_abs, "{ctx}");
                let (fr, sr) = (f.worst_rel.unwrap(), s.worst_rel.unwrap());
                assert_eq!(fr.index, sr.index, "{ctx}");
                assert!((fr.value - sr.value).abs() <= 4e-16 * sr.value, "{ctx}");
                // (In `Mean` mode they are the means: sums, compared below.)
                let exact = t.mode != ToleranceMode::Mean;
                assert!(!exact || f.min_passing_abs == s.min_passing_abs, "{ctx}");
                let (a, b) = (f.min_passing_rel, s.min_passing_rel);
                let ulps = if exact { 4e-16 } else { 1e-12 };
                assert!(a == b || (a - b).abs() <= ulps * b, "{ctx}: {a} {b}");
                for (x, y) in [
                    (f.mean_abs, s.mean_abs),
                    (f.mse, s.mse),
                    (f.mean_rel, s.mean_rel),
                    (f.ref_variance, s.ref_variance),
                    (f.cosine, s.cosine),
                    (f.min_passing_abs, s.min_passing_abs),
                ] {
                    assert!(x == y || (x - y).abs() <= 1e-12 * y.abs(), "{ctx}: {x} {y}");
                }
            }
        }
    }
}
