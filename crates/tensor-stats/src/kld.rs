//! KL divergence between two runs' next-token distributions, per decode step and over
//! a run, with the statistics `llama-perplexity --kl-divergence` prints.
//!
//! # Per step ([`step_kld`])
//!
//! Two logit rows of the same length `n_vocab`: `base` (the reference run, e.g. an f16
//! KV cache) and `cur` (the current run, e.g. q4_0), and optionally the token that
//! followed in the reference. Everything is computed in f64 from the exact f32 logits:
//!
//! - **log-softmax**: `m = max_i x_i`, `S = Σ_i exp(x_i − m)`,
//!   `log p_i = (x_i − m) − ln S` (max-subtracted log-sum-exp, so logits of ±1e4 neither
//!   overflow nor lose the distribution).
//! - **KLD** `= Σ_i p_base_i (log p_base_i − log p_cur_i)` over *all* `n_vocab` tokens,
//!   in nats. It is evaluated as `T / S_base − (ln S_base − ln S_cur)` with
//!   `T = Σ_i exp(xb_i − mb) · ((xb_i − mb) − (xc_i − mc))`, which is the same sum
//!   (`Σ p_base = 1`) with one `exp` per logit and no stored row. A term whose
//!   `p_base_i` is 0 contributes 0. The true value is ≥ 0; when the rows are (nearly)
//!   equal, rounding can leave a result a few ulps below 0, which is reported as `0.0`.
//!   Identical rows give exactly `0.0`. Accuracy: the absolute error is that of the f64
//!   log-normalisers, about 1e-16 (a few times more for a large vocabulary), so a KLD of
//!   1e-2 is good to ~1e-14 relative, one of 1e-12 only to ~1e-4.
//! - **top-1**: `top_base`, `top_cur` are the argmax of each row, the first index among
//!   ties (a strict `>` scan, as llama-perplexity's); `same_top = top_base == top_cur`.
//! - **next token** `t` (when given): `p_base(t)`, `p_cur(t)`, their logs, and
//!   `delta_p = p_cur(t) − p_base(t)`.
//!
//! ## Non-finite logits
//!
//! - **NaN** and **+inf** are errors ([`KldError::NonFinite`]): neither is a probability.
//! - **−inf** is a legitimate logit: the token has probability exactly 0 (a masked or
//!   banned token). In `base` its KLD term is 0 whatever `cur` says. In `cur`, where
//!   `base` gives the token a probability (its logit is not −inf), `log p_cur = −inf` and
//!   the KLD is `+inf` (mathematically exact, not an error: the current run rules out a
//!   token the reference allows). A row that is −inf everywhere has no distribution and
//!   is an error ([`KldError::NoProbability`]).
//! - A finite logit so far below the maximum that `exp` underflows (about 745 nats) has a
//!   probability that rounds to 0; it is *not* treated as −inf: its log-probability stays
//!   finite and exact, so the KLD stays finite.
//!
//! # Over a run ([`KldAccumulator`], [`KldSummary`])
//!
//! The definitions and names of llama.cpp's `tools/perplexity/perplexity.cpp`
//! (`kl_divergence()`), recomputed here (no code shared):
//!
//! - [`mean_and_uncertainty`]`(sum, sum2, count)`: `f = sum/count`,
//!   `var = sum2/count − f²`, uncertainty `sqrt(var/(count−1))` when `var > 0` and
//!   `count > 10`, else 0 (and `(0, 0)` for `count == 0`).
//! - **KLD** over all steps: "Mean KLD ± unc", "Maximum KLD", the 99.9/99.0/95.0/90.0 %
//!   percentiles, "Median KLD", 10.0/5.0/1.0/0.1 %, "Minimum KLD".
//! - **Percentile** of the ascending values `v` (n of them) at `fraction`: `fraction ≤ 0`
//!   gives `v[0]`, `≥ 1` gives `v[n−1]`; else `p = fraction·(n−1)`, `ip = floor(p)`,
//!   `frac = p − ip`, value `(1−frac)·v[ip] + frac·v[min(ip+1, n−1)]`. **Median**: the
//!   middle value for odd n, the mean of the two middle values for even n.
//! - **Same top p** over all steps: `p = n_same_top / count`, uncertainty
//!   `sqrt(p(1−p)/(count−1))` (0 when `count < 2`). Stored as a fraction;
//!   [`KldSummary::rows`] shows it in %, as llama-perplexity does.
//! - **Δp** over the steps that have a next token (`DeltaPSummary::dist.count` of them):
//!   "Mean Δp ± unc", "Maximum Δp", 99.9/99.0/95.0/90.0/75.0 %, "Median Δp",
//!   25.0/10.0/5.0/1.0/0.1 %, "Minimum Δp", and "RMS Δp ± unc" with
//!   `rms = sqrt(mean(Δp²))`, `unc = 0.5/rms · unc(ΣΔp², ΣΔp⁴)` (0 when `rms == 0`).
//!   Stored as fractions of probability; `rows` shows them in %.
//! - llama-perplexity prints these only from 100 positions on. They are always computed
//!   here; `count` says how many steps they rest on, so a caller can flag "few steps".
//!   With `count ≤ 10` every "± unc" of a mean is 0 by definition, not by measurement.
//!
//! # Where this differs from llama-perplexity
//!
//! | llama-perplexity `--kl-divergence`                          | here                                             |
//! |-------------------------------------------------------------|--------------------------------------------------|
//! | base log-probs stored 16-bit, linear over the 16 nats below the top logit | exact f32 logits of both runs |
//! | terms with base log-prob ≤ −16 skipped                      | every term (only exact zeros of `p_base` skip)   |
//! | `expf` in f32, log-sum-exp rounded to f32 (f64 sum)         | f64 throughout                                   |
//! | base top-1 taken from the quantized log-probs               | from the base logits                             |
//! | KLD and Δp values kept as f32; percentile fractions f32     | f64 values, f64 fractions                        |
//! | positions: the second half of each chunk, every token       | one position per decode step: the last token of its ubatch (the row the tools capture) |
//! | statistics printed only when count ≥ 100                    | always computed, with `count`                    |
//! | Same top p uncertainty divides by `count − 1` even at 1     | 0 when `count < 2`                               |
//! | percentile `(1−frac)·a + frac·b` (NaN when `b = +inf`, `frac = 0`) | the exact value when `frac == 0` or `a == b`, so a `+inf` KLD never turns a percentile into NaN |
//!
//! A `+inf` KLD (see above) makes "Mean KLD" `+inf`; its uncertainty is then 0 (the
//! variance is undefined and `var > 0` fails), and the maximum and upper percentiles are
//! `+inf`.
//!
//! # Cost
//!
//! Two passes over each pair of rows (max/argmax and validation; then the exponentials),
//! two `exp` per vocabulary entry, no allocation. A run keeps two f64 per step for the
//! percentiles.

use thiserror::Error;

/// Which of the two compared rows a problem is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// `base`: the reference run.
    Reference,
    /// `cur`: the current run.
    Current,
}

impl Side {
    pub fn name(self) -> &'static str {
        match self {
            Self::Reference => "reference",
            Self::Current => "current",
        }
    }
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a pair of logit rows has no KL divergence.
#[derive(Clone, Debug, Error, PartialEq)]
pub enum KldError {
    #[error("empty logit rows (n_vocab = 0)")]
    Empty,
    #[error("logit rows differ in length: reference {reference}, current {current}")]
    LengthMismatch { reference: usize, current: usize },
    /// NaN or +inf (−inf is a zero probability, see the module docs).
    #[error("{side} logit {index} is {value}: not a log-probability (only -inf, probability 0, is allowed)")]
    NonFinite {
        side: Side,
        index: usize,
        value: f32,
    },
    #[error("{side} logits are all -inf: no token has a probability")]
    NoProbability { side: Side },
    #[error("next token {token} is outside the vocabulary (n_vocab = {n_vocab})")]
    TokenOutOfRange { token: i64, n_vocab: usize },
}

/// The probability of the token that followed in the reference, under both runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NextToken {
    pub token: i32,
    /// `log p_base(t)`, natural log (−inf when its logit is −inf).
    pub logp_base: f64,
    /// `log p_cur(t)`.
    pub logp_cur: f64,
    pub p_base: f64,
    pub p_cur: f64,
    /// `p_cur − p_base`.
    pub delta_p: f64,
}

/// One decode step's comparison of the two next-token distributions.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepKld {
    /// `KL(p_base ‖ p_cur)` in nats: ≥ 0, `+inf` when `cur` rules out a token `base` allows.
    pub kld: f64,
    /// Argmax of the reference row (first index among ties).
    pub top_base: usize,
    /// Argmax of the current row (first index among ties).
    pub top_cur: usize,
    pub same_top: bool,
    /// Present when a next token was given.
    pub next: Option<NextToken>,
}

/// Result of the first pass over one row.
struct RowMax {
    max: f32,
    argmax: Option<usize>,
}

fn check(side: Side, index: usize, x: f32) -> Result<(), KldError> {
    if x.is_nan() || x == f32::INFINITY {
        return Err(KldError::NonFinite {
            side,
            index,
            value: x,
        });
    }
    Ok(())
}

/// KL divergence, top-1 agreement and next-token probabilities of one step (module docs
/// for the definitions). `base` is the reference row, `cur` the current one; `next` is
/// the token that followed in the reference.
pub fn step_kld(base: &[f32], cur: &[f32], next: Option<i32>) -> Result<StepKld, KldError> {
    if base.len() != cur.len() {
        return Err(KldError::LengthMismatch {
            reference: base.len(),
            current: cur.len(),
        });
    }
    let n = base.len();
    if n == 0 {
        return Err(KldError::Empty);
    }
    let next = match next {
        None => None,
        Some(t) => match usize::try_from(t) {
            Ok(i) if i < n => Some((t, i)),
            _ => {
                return Err(KldError::TokenOutOfRange {
                    token: i64::from(t),
                    n_vocab: n,
                })
            }
        },
    };

    // Pass 1: validation, max and argmax of both rows, and whether `cur` rules out a
    // token that `base` allows.
    let mut rb = RowMax {
        max: f32::NEG_INFINITY,
        argmax: None,
    };
    let mut rc = RowMax {
        max: f32::NEG_INFINITY,
        argmax: None,
    };
    let mut cur_excludes = false;
    for (i, (&xb, &xc)) in base.iter().zip(cur).enumerate() {
        check(Side::Reference, i, xb)?;
        check(Side::Current, i, xc)?;
        if xb > rb.max {
            rb.max = xb;
            rb.argmax = Some(i);
        }
        if xc > rc.max {
            rc.max = xc;
            rc.argmax = Some(i);
        }
        cur_excludes |= xc == f32::NEG_INFINITY && xb != f32::NEG_INFINITY;
    }
    let top_base = rb.argmax.ok_or(KldError::NoProbability {
        side: Side::Reference,
    })?;
    let top_cur = rc.argmax.ok_or(KldError::NoProbability {
        side: Side::Current,
    })?;
    let (mb, mc) = (f64::from(rb.max), f64::from(rc.max));

    // Pass 2: the two normalisers and the p_base-weighted sum of the shifted
    // log-probability differences.
    let (mut sb, mut sc, mut t) = (0.0f64, 0.0f64, 0.0f64);
    for (&xb, &xc) in base.iter().zip(cur) {
        let yb = f64::from(xb) - mb;
        let yc = f64::from(xc) - mc;
        let wb = yb.exp();
        sb += wb;
        sc += yc.exp();
        if xb != f32::NEG_INFINITY && xc != f32::NEG_INFINITY {
            t += wb * (yb - yc);
        }
    }
    let (lsb, lsc) = (sb.ln(), sc.ln());
    let kld = if cur_excludes {
        f64::INFINITY
    } else {
        (t / sb - (lsb - lsc)).max(0.0)
    };

    let next = next.map(|(token, i)| {
        let logp_base = (f64::from(base[i]) - mb) - lsb;
        let logp_cur = (f64::from(cur[i]) - mc) - lsc;
        let (p_base, p_cur) = (logp_base.exp(), logp_cur.exp());
        NextToken {
            token,
            logp_base,
            logp_cur,
            p_base,
            p_cur,
            delta_p: p_cur - p_base,
        }
    });
    Ok(StepKld {
        kld,
        top_base,
        top_cur,
        same_top: top_base == top_cur,
        next,
    })
}

/// llama-perplexity's mean and its uncertainty from a sum and a sum of squares:
/// `(sum/count, sqrt(var/(count−1)))` with `var = sum2/count − mean²`; the uncertainty
/// is 0 unless `var > 0` and `count > 10`. `(0, 0)` for `count == 0`.
pub fn mean_and_uncertainty(sum: f64, sum2: f64, count: usize) -> (f64, f64) {
    if count == 0 {
        return (0.0, 0.0);
    }
    let n = count as f64;
    let f = sum / n;
    let var = sum2 / n - f * f;
    let unc = if var > 0.0 && count > 10 {
        (var / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    (f, unc)
}

/// Linear-interpolated percentile of ascending `sorted` at `fraction` (module docs);
/// `None` when `sorted` is empty.
pub fn percentile(sorted: &[f64], fraction: f64) -> Option<f64> {
    let (&first, &last) = (sorted.first()?, sorted.last()?);
    if fraction <= 0.0 {
        return Some(first);
    }
    if fraction >= 1.0 {
        return Some(last);
    }
    let p = fraction * (sorted.len() - 1) as f64;
    let ip = p.floor();
    let frac = p - ip;
    let ip = ip as usize;
    let a = sorted[ip];
    let b = sorted[(ip + 1).min(sorted.len() - 1)];
    if frac == 0.0 || a == b {
        return Some(a);
    }
    Some((1.0 - frac) * a + frac * b)
}

/// Median of ascending `sorted`: the middle value, or the mean of the two middle ones;
/// `None` when empty.
pub fn median(sorted: &[f64]) -> Option<f64> {
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    if n % 2 == 1 {
        Some(sorted[n / 2])
    } else {
        Some(0.5 * (sorted[n / 2 - 1] + sorted[n / 2]))
    }
}

/// The percentiles llama-perplexity prints for the KLD (besides max, median, min).
pub const KLD_PERCENTILES: [f64; 8] = [0.999, 0.99, 0.95, 0.90, 0.10, 0.05, 0.01, 0.001];
/// The percentiles llama-perplexity prints for Δp (besides max, median, min).
pub const DELTA_P_PERCENTILES: [f64; 10] =
    [0.999, 0.99, 0.95, 0.90, 0.75, 0.25, 0.10, 0.05, 0.01, 0.001];

/// One percentile of a distribution.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Percentile {
    /// In (0, 1): 0.999 is llama-perplexity's "99.9%".
    pub fraction: f64,
    pub value: f64,
}

/// Mean ± uncertainty, extremes, median and percentiles of one quantity over a run.
#[derive(Clone, Debug, PartialEq)]
pub struct Distribution {
    /// How many values.
    pub count: usize,
    pub mean: f64,
    /// [`mean_and_uncertainty`]'s (0 for `count ≤ 10`).
    pub mean_uncertainty: f64,
    pub max: f64,
    pub median: f64,
    pub min: f64,
    /// Highest fraction first, as llama-perplexity prints them.
    pub percentiles: Vec<Percentile>,
}

impl Distribution {
    /// `values` in any order (no NaN), `sum` and `sum2` their sum and sum of squares.
    fn of(mut values: Vec<f64>, sum: f64, sum2: f64, fractions: &[f64]) -> Option<Self> {
        values.sort_by(f64::total_cmp);
        let (mean, mean_uncertainty) = mean_and_uncertainty(sum, sum2, values.len());
        Some(Self {
            count: values.len(),
            mean,
            mean_uncertainty,
            max: *values.last()?,
            median: median(&values)?,
            min: *values.first()?,
            percentiles: fractions
                .iter()
                .map(|&fraction| {
                    percentile(&values, fraction).map(|value| Percentile { fraction, value })
                })
                .collect::<Option<_>>()?,
        })
    }

    /// The value at `fraction` if it is one of the computed percentiles.
    pub fn percentile(&self, fraction: f64) -> Option<f64> {
        self.percentiles
            .iter()
            .find(|p| p.fraction == fraction)
            .map(|p| p.value)
    }
}

/// Δp statistics over the steps that had a next token.
#[derive(Clone, Debug, PartialEq)]
pub struct DeltaPSummary {
    /// Fractions of probability (−1..1); `dist.count` steps.
    pub dist: Distribution,
    /// `sqrt(mean(Δp²))`.
    pub rms: f64,
    /// `0.5/rms · unc(ΣΔp², ΣΔp⁴)`, 0 when `rms == 0`.
    pub rms_uncertainty: f64,
}

/// llama-perplexity's KL-divergence and token-probability statistics over a run.
#[derive(Clone, Debug, PartialEq)]
pub struct KldSummary {
    /// Steps summarised (llama-perplexity wants at least 100 before it prints).
    pub count: usize,
    /// KLD per step, in nats.
    pub kld: Distribution,
    pub n_same_top: usize,
    /// `n_same_top / count`, a fraction.
    pub same_top: f64,
    /// `sqrt(p(1−p)/(count−1))`, 0 when `count < 2`.
    pub same_top_uncertainty: f64,
    /// `None` when no step had a next token.
    pub delta_p: Option<DeltaPSummary>,
}

/// One line of llama-perplexity's report, for text or JSON output.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StatRow {
    /// llama-perplexity's label with its padding collapsed: "Mean KLD", "99.9% KLD",
    /// "RMS Δp", "Same top p".
    pub name: &'static str,
    /// In the unit llama-perplexity prints: nats for KLD, percent for Δp and Same top p.
    pub value: f64,
    /// For the rows printed with "±".
    pub uncertainty: Option<f64>,
    /// `value` (and `uncertainty`) are in percent.
    pub percent: bool,
}

/// llama-perplexity's labels of [`KLD_PERCENTILES`], in the same order.
const KLD_LABELS: [&str; 8] = [
    "99.9% KLD",
    "99.0% KLD",
    "95.0% KLD",
    "90.0% KLD",
    "10.0% KLD",
    "5.0% KLD",
    "1.0% KLD",
    "0.1% KLD",
];
/// llama-perplexity's labels of [`DELTA_P_PERCENTILES`], in the same order.
const DELTA_P_LABELS: [&str; 10] = [
    "99.9% Δp",
    "99.0% Δp",
    "95.0% Δp",
    "90.0% Δp",
    "75.0% Δp",
    "25.0% Δp",
    "10.0% Δp",
    "5.0% Δp",
    "1.0% Δp",
    "0.1% Δp",
];

impl KldSummary {
    /// The report in llama-perplexity's order and names: the KLD block, the Δp block
    /// (when any step had a next token), then "Same top p".
    pub fn rows(&self) -> Vec<StatRow> {
        let row = |name, value, uncertainty, percent| StatRow {
            name,
            value,
            uncertainty,
            percent,
        };
        let k = &self.kld;
        let mut out = vec![
            row("Mean KLD", k.mean, Some(k.mean_uncertainty), false),
            row("Maximum KLD", k.max, None, false),
        ];
        // The percentiles above the median, the median, those below.
        let mut pcts = k
            .percentiles
            .iter()
            .zip(KLD_LABELS)
            .map(|(p, name)| row(name, p.value, None, false));
        out.extend(pcts.by_ref().take(4));
        out.push(row("Median KLD", k.median, None, false));
        out.extend(pcts);
        out.push(row("Minimum KLD", k.min, None, false));
        if let Some(dp) = &self.delta_p {
            let d = &dp.dist;
            let pct = |x: f64| 100.0 * x;
            out.push(row(
                "Mean Δp",
                pct(d.mean),
                Some(pct(d.mean_uncertainty)),
                true,
            ));
            out.push(row("Maximum Δp", pct(d.max), None, true));
            let mut pcts = d
                .percentiles
                .iter()
                .zip(DELTA_P_LABELS)
                .map(|(p, name)| row(name, pct(p.value), None, true));
            out.extend(pcts.by_ref().take(5));
            out.push(row("Median Δp", pct(d.median), None, true));
            out.extend(pcts);
            out.push(row("Minimum Δp", pct(d.min), None, true));
            out.push(row(
                "RMS Δp",
                pct(dp.rms),
                Some(pct(dp.rms_uncertainty)),
                true,
            ));
        }
        out.push(row(
            "Same top p",
            100.0 * self.same_top,
            Some(100.0 * self.same_top_uncertainty),
            true,
        ));
        out
    }
}

/// Collects [`StepKld`]s over a run; [`finish`](Self::finish) gives the summary.
#[derive(Clone, Debug, Default)]
pub struct KldAccumulator {
    kld: Vec<f64>,
    sum_kld: f64,
    sum_kld2: f64,
    n_same_top: usize,
    delta_p: Vec<f64>,
    sum_dp: f64,
    sum_dp2: f64,
    sum_dp4: f64,
}

impl KldAccumulator {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, s: &StepKld) {
        self.kld.push(s.kld);
        self.sum_kld += s.kld;
        self.sum_kld2 += s.kld * s.kld;
        self.n_same_top += usize::from(s.same_top);
        if let Some(n) = &s.next {
            let d = n.delta_p;
            let d2 = d * d;
            self.delta_p.push(d);
            self.sum_dp += d;
            self.sum_dp2 += d2;
            self.sum_dp4 += d2 * d2;
        }
    }

    /// Steps pushed so far.
    pub fn count(&self) -> usize {
        self.kld.len()
    }

    /// The summary; `None` before the first step.
    pub fn finish(&self) -> Option<KldSummary> {
        let count = self.kld.len();
        let kld = Distribution::of(
            self.kld.clone(),
            self.sum_kld,
            self.sum_kld2,
            &KLD_PERCENTILES,
        )?;
        let same_top = self.n_same_top as f64 / count as f64;
        let same_top_uncertainty = if count < 2 {
            0.0
        } else {
            (same_top * (1.0 - same_top) / (count - 1) as f64).sqrt()
        };
        let delta_p = Distribution::of(
            self.delta_p.clone(),
            self.sum_dp,
            self.sum_dp2,
            &DELTA_P_PERCENTILES,
        )
        .map(|dist| {
            let (mse, mse_unc) = mean_and_uncertainty(self.sum_dp2, self.sum_dp4, dist.count);
            let rms = mse.sqrt();
            let rms_uncertainty = if rms > 0.0 { 0.5 / rms * mse_unc } else { 0.0 };
            DeltaPSummary {
                dist,
                rms,
                rms_uncertainty,
            }
        });
        Some(KldSummary {
            count,
            kld,
            n_same_top: self.n_same_top,
            same_top,
            same_top_uncertainty,
            delta_p,
        })
    }
}

/// [`KldAccumulator`] over a slice of steps.
pub fn summarize<'a>(steps: impl IntoIterator<Item = &'a StepKld>) -> Option<KldSummary> {
    let mut acc = KldAccumulator::new();
    for s in steps {
        acc.push(s);
    }
    acc.finish()
}
