//! KL divergence of next-token distributions against independent oracles: closed forms
//! written from the definition (`p_i = e^{x_i} / Σ e^{x_j}`, `Σ p ln(p/q)`, no max
//! subtraction, no log-sum-exp), values worked out by hand (the arithmetic is in the
//! comments), and numbers computed once outside Rust (numpy float64 and Python's
//! `decimal` at 60 digits) and pasted here as constants.

use approx::assert_relative_eq;
use tensor_stats::kld::{median, percentile, DELTA_P_PERCENTILES, KLD_PERCENTILES};
use tensor_stats::{
    mean_and_uncertainty, step_kld, summarize, KldAccumulator, KldError, NextToken, Side, StepKld,
};
use test_support::Rng;

/// The definition, term by term, straight from exponentials of the logits (fine for
/// the small, moderate rows it is used on): `KL = Σ p_i ln(p_i / q_i)`.
fn oracle(base: &[f32], cur: &[f32]) -> (f64, Vec<f64>, Vec<f64>) {
    let probs = |x: &[f32]| {
        let a: Vec<f64> = x.iter().map(|&v| f64::from(v).exp()).collect();
        let s: f64 = a.iter().sum();
        a.iter().map(|v| v / s).collect::<Vec<f64>>()
    };
    let (p, q) = (probs(base), probs(cur));
    let kl = p
        .iter()
        .zip(&q)
        .filter(|(pi, _)| **pi > 0.0)
        .map(|(pi, qi)| pi * (pi / qi).ln())
        .sum();
    (kl, p, q)
}

fn kld(base: &[f32], cur: &[f32]) -> f64 {
    step_kld(base, cur, None).expect("valid rows").kld
}

/// Logits on a 1/1024 grid in [-8, 8): adding 64.0 (or any power-of-two-friendly
/// constant) keeps them exact in f32, so the shifted row is the same distribution.
fn grid_row(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.below(16 * 1024) as f32 - 8192.0) / 1024.0)
        .collect()
}

fn normal_row(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.normal() * scale).collect()
}

#[test]
fn two_tokens_closed_form() {
    // p = sigmoid(x0 - x1): p0 = 1 / (1 + e^{x1 - x0}).
    for (b, c) in [
        ([0.0f32, 1.0], [0.5f32, -0.25]),
        ([2.0, -3.0], [-1.0, 4.0]),
        ([0.125, 0.0], [0.0, 0.0]),
    ] {
        let p0 = 1.0 / (1.0 + f64::from(b[1] - b[0]).exp());
        let q0 = 1.0 / (1.0 + f64::from(c[1] - c[0]).exp());
        let (p1, q1) = (1.0 - p0, 1.0 - q0);
        let want = p0 * (p0 / q0).ln() + p1 * (p1 / q1).ln();
        let s = step_kld(&b, &c, Some(1)).unwrap();
        assert_relative_eq!(s.kld, want, max_relative = 1e-15);
        let n = s.next.unwrap();
        assert_relative_eq!(n.p_base, p1, max_relative = 1e-15);
        assert_relative_eq!(n.p_cur, q1, max_relative = 1e-15);
        assert_eq!(n.delta_p, n.p_cur - n.p_base);
    }
}

#[test]
fn three_tokens_closed_form() {
    // Logits [ln a, ln b, ln c] give p = a/(a+b+c): exactly so up to the f32 rounding of
    // the logarithms (relative 6e-8), and exactly so with a = e^{x} of the f32 logits.
    let (a, b, c): (f64, f64, f64) = (1.0, 2.0, 5.0);
    let (d, e, f): (f64, f64, f64) = (3.0, 1.0, 4.0);
    let base = [a.ln() as f32, b.ln() as f32, c.ln() as f32];
    let cur = [d.ln() as f32, e.ln() as f32, f.ln() as f32];
    let s = step_kld(&base, &cur, Some(2)).unwrap();
    let n = s.next.unwrap();
    assert_relative_eq!(n.p_base, c / (a + b + c), max_relative = 1e-7);
    assert_relative_eq!(n.p_cur, f / (d + e + f), max_relative = 1e-7);
    let loose = [a, b, c]
        .iter()
        .zip([d, e, f])
        .map(|(x, y)| x / 8.0 * ((x / 8.0) / (y / 8.0)).ln())
        .sum::<f64>();
    assert_relative_eq!(s.kld, loose, max_relative = 1e-6);

    // With the exact exponentials of the f32 logits: 1e-15.
    let (want, p, q) = oracle(&base, &cur);
    assert_relative_eq!(s.kld, want, max_relative = 1e-15);
    assert_relative_eq!(n.p_base, p[2], max_relative = 1e-15);
    assert_relative_eq!(n.p_cur, q[2], max_relative = 1e-15);
    assert_eq!((s.top_base, s.top_cur, s.same_top), (2, 2, true));

    for (base, cur) in [
        ([0.0f32, 1.0, 2.0], [2.0f32, 1.0, 0.0]),
        ([-1.5, 0.25, 3.0], [0.0, 0.0, 0.0]),
        ([4.0, 4.0, -4.0], [1.0, -2.0, 0.5]),
    ] {
        let (want, _, _) = oracle(&base, &cur);
        assert_relative_eq!(kld(&base, &cur), want, max_relative = 1e-15);
    }
}

#[test]
fn adding_a_constant_changes_nothing() {
    let mut rng = Rng::new(7);
    for n in [2, 3, 17, 1000] {
        let base = grid_row(&mut rng, n);
        let cur = grid_row(&mut rng, n);
        let t = (n - 1) as i32;
        let s = step_kld(&base, &cur, Some(t)).unwrap();
        for (cb, cc) in [(64.0f32, 0.0f32), (0.0, -32.0), (1024.0, 4096.0)] {
            let b2: Vec<f32> = base.iter().map(|x| x + cb).collect();
            let c2: Vec<f32> = cur.iter().map(|x| x + cc).collect();
            assert!(
                b2.iter().zip(&base).all(|(y, x)| y - cb == *x),
                "exact shift"
            );
            let s2 = step_kld(&b2, &c2, Some(t)).unwrap();
            assert_relative_eq!(s2.kld, s.kld, epsilon = 1e-12, max_relative = 1e-12);
            let (n1, n2) = (s.next.unwrap(), s2.next.unwrap());
            assert_relative_eq!(n2.p_base, n1.p_base, epsilon = 1e-12, max_relative = 1e-12);
            assert_relative_eq!(n2.p_cur, n1.p_cur, epsilon = 1e-12, max_relative = 1e-12);
            assert_eq!((s2.top_base, s2.top_cur), (s.top_base, s.top_cur));
        }
    }
}

#[test]
fn a_row_against_itself_is_exactly_zero() {
    let mut rng = Rng::new(11);
    for n in [1, 2, 5, 4096] {
        let mut x = normal_row(&mut rng, n, 4.0);
        if n > 2 {
            x[1] = f32::NEG_INFINITY;
        }
        let s = step_kld(&x, &x, Some(0)).unwrap();
        assert_eq!(s.kld.to_bits(), 0.0f64.to_bits(), "+0.0 exactly");
        assert!(s.same_top);
        assert_eq!(s.top_base, s.top_cur);
        assert_eq!(s.next.unwrap().delta_p, 0.0);
    }
}

#[test]
fn ties_take_the_first_index() {
    let s = step_kld(&[1.0, 3.0, 3.0, -1.0], &[5.0, 0.0, 5.0, 5.0], None).unwrap();
    assert_eq!((s.top_base, s.top_cur, s.same_top), (1, 0, false));
    assert_eq!(s.next, None);
    // A leading -inf is never the argmax.
    let s = step_kld(&[f32::NEG_INFINITY, -5.0], &[-9.0, f32::NEG_INFINITY], None).unwrap();
    assert_eq!((s.top_base, s.top_cur), (1, 0));
}

#[test]
fn minus_infinity_is_probability_zero() {
    let ninf = f32::NEG_INFINITY;
    // The same tokens ruled out in both rows: the KLD over the rest.
    let base = [0.5f32, ninf, -1.0, 2.0, ninf];
    let cur = [1.0f32, ninf, 0.0, 1.5, ninf];
    let (want, _, _) = oracle(&[0.5, -1.0, 2.0], &[1.0, 0.0, 1.5]);
    let s = step_kld(&base, &cur, Some(1)).unwrap();
    assert_relative_eq!(s.kld, want, max_relative = 1e-15);
    let n = s.next.unwrap();
    assert_eq!((n.p_base, n.p_cur, n.delta_p), (0.0, 0.0, 0.0));
    assert_eq!(n.logp_base, f64::NEG_INFINITY);

    // Ruled out only in the reference: its term is 0, the current row keeps its mass there.
    let base = [0.5f32, ninf, -1.0];
    let cur = [0.5f32, 0.0, -1.0];
    let s = step_kld(&base, &cur, Some(1)).unwrap();
    let (p, q) = (oracle(&[0.5, -1.0], &[0.5, -1.0]).1, oracle(&cur, &cur).1);
    let want = p[0] * (p[0] / q[0]).ln() + p[1] * (p[1] / q[2]).ln();
    assert_relative_eq!(s.kld, want, max_relative = 1e-15);
    assert!(s.kld.is_finite() && s.kld > 0.0);
    let n = s.next.unwrap();
    assert_eq!(n.p_base, 0.0);
    assert_relative_eq!(n.delta_p, q[1], max_relative = 1e-15);

    // Ruled out only in the current row, where the reference has mass: +inf.
    let s = step_kld(&cur, &base, Some(0)).unwrap();
    assert_eq!(s.kld, f64::INFINITY);
    assert!(s.next.unwrap().delta_p.is_finite());
}

#[test]
fn large_magnitudes_neither_overflow_nor_vanish() {
    // Logits of ±1e4 (and ±3e38): e^{x} overflows, the max-subtracted form does not.
    let base = [1e4f32, -1e4, 9998.0];
    let cur = [-1e4f32, 1e4, -1e4];
    let s = step_kld(&base, &cur, Some(2)).unwrap();
    // p_base = [1/(1+e^-2), ~0, e^-2/(1+e^-2)]; log q = [-2e4, 0, -2e4] (up to e^{-2e4}).
    let p0 = 1.0 / (1.0 + (-2.0f64).exp());
    let p2 = 1.0 - p0;
    let want = p0 * (p0.ln() + 2e4) + p2 * (p2.ln() + 2e4);
    assert_relative_eq!(s.kld, want, max_relative = 1e-15);
    let n = s.next.unwrap();
    assert_relative_eq!(n.p_base, p2, max_relative = 1e-15);
    assert_eq!(n.p_cur, 0.0, "e^-2e4 underflows");
    assert_relative_eq!(n.logp_cur, -2e4, max_relative = 1e-15);

    let s = step_kld(&[3e38, -3e38, 0.0], &[-3e38, 3e38, 0.0], Some(0)).unwrap();
    // p_base = [1, 0, 0]; log p_cur(0) = -3e38 - 3e38.
    assert_relative_eq!(s.kld, 2.0 * f64::from(3e38f32), max_relative = 1e-15);
    assert!(s.kld.is_finite());
    assert_eq!(s.next.unwrap().delta_p, -1.0);
}

#[test]
fn nonnegative_and_asymmetric_on_random_rows() {
    let mut rng = Rng::new(20);
    let mut asymmetric = 0;
    for i in 0..300 {
        let n = 2 + (i % 40);
        let scale = [0.1f32, 1.0, 5.0, 30.0][i % 4];
        let base = normal_row(&mut rng, n, scale);
        let cur = normal_row(&mut rng, n, scale);
        let ab = kld(&base, &cur);
        let ba = kld(&cur, &base);
        assert!(ab >= 0.0 && ba >= 0.0, "{ab} {ba}");
        if scale <= 5.0 {
            let (want, _, _) = oracle(&base, &cur);
            assert_relative_eq!(ab, want, epsilon = 1e-14, max_relative = 1e-12);
        }
        asymmetric += usize::from(ab != ba);
    }
    assert!(asymmetric > 290, "KL is not symmetric: {asymmetric}/300");
    // A fixed pair: KL([0,1] ‖ [0,0]) vs KL([0,0] ‖ [0,1]).
    let (a, b) = (kld(&[0.0, 1.0], &[0.0, 0.0]), kld(&[0.0, 0.0], &[0.0, 1.0]));
    assert!((a - b).abs() > 1e-3, "{a} {b}");

    // Nearly equal rows (a quantized cache's differences): never below 0.
    for _ in 0..200 {
        let base = normal_row(&mut rng, 64, 3.0);
        let cur: Vec<f32> = base.iter().map(|x| x + rng.normal() * 1e-6).collect();
        assert!(kld(&base, &cur) >= 0.0);
    }
    // One logit one ulp (up to 1e-6) apart: the true KLD is at most δ²/8 ≈ 1e-13, often
    // below the f64 rounding of the sum (unclamped, a third came out near -1e-16): >= 0.
    for _ in 0..200 {
        let base = normal_row(&mut rng, 64, 3.0);
        let mut cur = base.clone();
        let i = rng.below(64) as usize;
        cur[i] = f32::from_bits(cur[i].to_bits() + 1);
        let k = kld(&base, &cur);
        assert!((0.0..1e-12).contains(&k), "{k}");
    }
}

/// Computed once with numpy 2.4.6 (float64: `lb = b - log(sum(exp(b - max b))) - max b`,
/// `kld = sum(exp(lb) * (lb - lc))` over finite `lb`) and with Python's `decimal` at 60
/// significant digits (rounded here to the nearest f64) from the f32 rows below, which numpy
/// drew from `default_rng(20)` and printed with their shortest round-trip repr. Columns:
/// base, cur, next token, numpy KLD, decimal KLD, decimal p_base(t), decimal p_cur(t).
type Case = (&'static [f32], &'static [f32], i32, f64, f64, f64, f64);
const PYTHON: [Case; 4] = [
    (
        &[
            -1.0790054, 3.6110253, 4.190604, 0.9517078, 1.2424026, -1.4686494, -2.742362, -2.701082,
        ],
        &[
            -1.578221, 4.075628, 4.1624584, 1.0158473, 0.92241734, -2.012558, -3.343339, -3.1218667,
        ],
        3,
        0.031758938507881154,
        0.03175893850788083,
        0.023584698528555922,
        0.021439605808358433,
    ),
    (
        &[
            2.9957836, 0.09220041, -2.2838583, -1.196392, -7.136677, 6.1534123, -6.082077,
            0.2119089,
        ],
        &[
            10.6848755,
            -12.755951,
            -7.0347977,
            -3.61853,
            0.5827582,
            -8.574382,
            -1.1763974,
            -0.14213839,
        ],
        5,
        18.252817583759377,
        18.252817583759374,
        0.9538780727554446,
        4.322958376370526e-09,
    ),
    (
        &[
            0.34104437,
            -4.7767467,
            f32::NEG_INFINITY,
            3.1937366,
            0.87319833,
            -1.4462327,
        ],
        &[
            -1.2268667, -5.2926164, 0.9520049, 3.006135, 1.3003242, -5.954529,
        ],
        0,
        0.18009162866274708,
        0.18009162866274678,
        0.049479508158010437,
        0.010952371057514912,
    ),
    (
        // ±1e4 logits, `cur` shifted by -2e4: numpy's unshifted `b - log S - max` loses
        // 1e-11 of the KLD here; the decimal value is the truth.
        &[
            9999.148, 9999.794, 9999.033, 10002.066, -10003.488, -10001.436, 10001.191, -9998.019,
        ],
        &[
            -10000.683, -9999.15, -10000.446, -9998.993, -30002.195, -30001.941, -10000.439,
            -29997.58,
        ],
        3,
        0.3604963296999629,
        0.36049632969887185,
        0.6164753998771303,
        0.3986586446447741,
    ),
];

#[test]
fn matches_numpy_and_exact_decimal() {
    for (i, &(base, cur, t, numpy, exact, pb, pc)) in PYTHON.iter().enumerate() {
        let s = step_kld(base, cur, Some(t)).unwrap();
        assert_relative_eq!(s.kld, exact, max_relative = 1e-14);
        // numpy's plain float64 sums are a little less exact than the decimal truth
        // (1e-14 relative on the first case, 1e-11 on the fourth).
        let numpy_tol = if i == 3 { 1e-10 } else { 1e-13 };
        assert_relative_eq!(s.kld, numpy, max_relative = numpy_tol);
        let n = s.next.unwrap();
        assert_relative_eq!(n.p_base, pb, max_relative = 1e-14);
        assert_relative_eq!(n.p_cur, pc, max_relative = 1e-13);
        assert_relative_eq!(n.logp_base, pb.ln(), max_relative = 1e-14);
    }
}

#[test]
fn gemma_sized_rows() {
    // 262,144 tokens: one step is two passes, and the oracle agrees at this size too.
    let mut rng = Rng::new(262_144);
    let base = normal_row(&mut rng, 262_144, 3.0);
    let cur: Vec<f32> = base.iter().map(|x| x + rng.normal() * 0.05).collect();
    let s = step_kld(&base, &cur, Some(262_143)).unwrap();
    let (want, p, q) = oracle(&base, &cur);
    assert_relative_eq!(s.kld, want, max_relative = 1e-9);
    let n = s.next.unwrap();
    assert_relative_eq!(n.p_base, p[262_143], max_relative = 1e-12);
    assert_relative_eq!(n.p_cur, q[262_143], max_relative = 1e-12);
}

#[test]
fn every_error_is_reached() {
    assert_eq!(step_kld(&[], &[], None), Err(KldError::Empty));
    assert_eq!(
        step_kld(&[0.0, 1.0], &[0.0], None),
        Err(KldError::LengthMismatch {
            reference: 2,
            current: 1
        })
    );
    let e = step_kld(&[0.0, f32::NAN], &[0.0, 0.0], None).unwrap_err();
    assert!(matches!(
        e,
        KldError::NonFinite {
            side: Side::Reference,
            index: 1,
            value
        } if value.is_nan()
    ));
    assert_eq!(
        step_kld(&[0.0, 0.0, 0.0], &[0.0, 1.0, f32::INFINITY], None),
        Err(KldError::NonFinite {
            side: Side::Current,
            index: 2,
            value: f32::INFINITY
        })
    );
    let ninf = f32::NEG_INFINITY;
    assert_eq!(
        step_kld(&[ninf, ninf], &[0.0, 0.0], None),
        Err(KldError::NoProbability {
            side: Side::Reference
        })
    );
    assert_eq!(
        step_kld(&[0.0, 0.0], &[ninf, ninf], None),
        Err(KldError::NoProbability {
            side: Side::Current
        })
    );
    for t in [2, -1, i32::MAX, i32::MIN] {
        assert_eq!(
            step_kld(&[0.0, 0.0], &[0.0, 0.0], Some(t)),
            Err(KldError::TokenOutOfRange {
                token: i64::from(t),
                n_vocab: 2
            })
        );
    }
    // The messages name the side and the index.
    let msg = step_kld(&[0.0, 0.0], &[0.0, f32::NAN], None)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("current logit 1 is NaN"), "{msg}");
}

#[test]
fn mean_and_uncertainty_follows_llama_perplexity() {
    assert_eq!(mean_and_uncertainty(0.0, 0.0, 0), (0.0, 0.0));
    // 1..=10: mean 5.5, variance 8.25 > 0 but count <= 10: no uncertainty.
    let (s, s2) = (55.0, 385.0);
    assert_eq!(mean_and_uncertainty(s, s2, 10), (5.5, 0.0));
    // 1..=11: mean 6, var = 506/11 - 36 = 10, unc = sqrt(10/10) = 1.
    let (m, u) = mean_and_uncertainty(66.0, 506.0, 11);
    assert_eq!(m, 6.0);
    assert_relative_eq!(u, 1.0, max_relative = 1e-15);
    // Twelve values 0.5: var exactly 0: no uncertainty.
    assert_eq!(mean_and_uncertainty(6.0, 3.0, 12), (0.5, 0.0));
}

#[test]
fn percentile_and_median_by_hand() {
    let v = [0.1, 0.2, 0.3, 0.4];
    assert_eq!(percentile(&v, 0.0), Some(0.1));
    assert_eq!(percentile(&v, -1.0), Some(0.1));
    assert_eq!(percentile(&v, 1.0), Some(0.4));
    // p = 0.9 * 3 = 2.7: 0.3 * v[2] + 0.7 * v[3] = 0.09 + 0.28.
    assert_relative_eq!(percentile(&v, 0.9).unwrap(), 0.37, max_relative = 1e-15);
    // p = 0.1 * 3 = 0.3: 0.7 * 0.1 + 0.3 * 0.2.
    assert_relative_eq!(percentile(&v, 0.1).unwrap(), 0.13, max_relative = 1e-15);
    assert_eq!(percentile(&[], 0.5), None);
    assert_eq!(percentile(&[7.0], 0.3), Some(7.0));
    assert_relative_eq!(median(&v).unwrap(), 0.25, max_relative = 1e-15);
    assert_eq!(
        median(&[0.1, 0.5, 0.2]),
        Some(0.5),
        "middle of the slice as given"
    );
    assert_eq!(median(&[]), None);
    // +inf at the top: interpolation towards it is +inf, never NaN (0 * inf).
    let w = [0.0, 1.0, f64::INFINITY];
    assert_eq!(percentile(&w, 0.5), Some(1.0));
    assert_eq!(percentile(&w, 0.75), Some(f64::INFINITY));
    assert_eq!(median(&[1.0, f64::INFINITY]), Some(f64::INFINITY));
}

fn step(kld: f64, same_top: bool, delta_p: Option<f64>) -> StepKld {
    StepKld {
        kld,
        top_base: 0,
        top_cur: usize::from(!same_top),
        same_top,
        next: delta_p.map(|d| NextToken {
            token: 0,
            logp_base: 0.5f64.ln(),
            logp_cur: (0.5 + d).ln(),
            p_base: 0.5,
            p_cur: 0.5 + d,
            delta_p: d,
        }),
    }
}

#[test]
fn summary_of_a_small_run_by_hand() {
    // KLD [0.4, 0.1, 0.3, 0.2], same top 3 of 4, Δp [0.1, -0.2, 0.4] on three steps.
    let steps = [
        step(0.4, true, Some(0.1)),
        step(0.1, false, Some(-0.2)),
        step(0.3, true, None),
        step(0.2, true, Some(0.4)),
    ];
    let s = summarize(&steps).unwrap();
    assert_eq!(s.count, 4);
    let k = &s.kld;
    assert_eq!(k.count, 4);
    assert_relative_eq!(k.mean, 0.25, max_relative = 1e-15);
    assert_eq!(k.mean_uncertainty, 0.0, "count <= 10");
    assert_eq!((k.max, k.min), (0.4, 0.1));
    assert_relative_eq!(k.median, 0.25, max_relative = 1e-15);
    // Sorted [0.1, 0.2, 0.3, 0.4], p = fraction * 3.
    let want = [
        (0.999, 0.003 * 0.3 + 0.997 * 0.4),
        (0.99, 0.03 * 0.3 + 0.97 * 0.4),
        (0.95, 0.15 * 0.3 + 0.85 * 0.4),
        (0.90, 0.37),
        (0.10, 0.13),
        (0.05, 0.85 * 0.1 + 0.15 * 0.2),
        (0.01, 0.97 * 0.1 + 0.03 * 0.2),
        (0.001, 0.997 * 0.1 + 0.003 * 0.2),
    ];
    assert_eq!(k.percentiles.len(), KLD_PERCENTILES.len());
    for (p, (f, v)) in k.percentiles.iter().zip(want) {
        assert_eq!(p.fraction, f);
        assert_relative_eq!(p.value, v, max_relative = 1e-14);
        assert_eq!(k.percentile(f), Some(p.value));
    }
    // Same top p = 3/4, ± sqrt(0.75 * 0.25 / 3) = 0.25.
    assert_eq!(s.n_same_top, 3);
    assert_eq!(s.same_top, 0.75);
    assert_relative_eq!(s.same_top_uncertainty, 0.25, max_relative = 1e-15);

    let dp = s.delta_p.as_ref().unwrap();
    let d = &dp.dist;
    assert_eq!(d.count, 3);
    assert_relative_eq!(d.mean, 0.1, max_relative = 1e-14);
    assert_eq!(d.mean_uncertainty, 0.0);
    assert_eq!(
        (d.max, d.median, d.min),
        (0.4, 0.1, -0.2),
        "odd count: the middle"
    );
    // Sorted [-0.2, 0.1, 0.4], p = fraction * 2: 75% -> 1.5, 25% -> 0.5.
    assert_eq!(d.percentiles.len(), DELTA_P_PERCENTILES.len());
    assert_relative_eq!(d.percentile(0.75).unwrap(), 0.25, max_relative = 1e-14);
    assert_relative_eq!(d.percentile(0.25).unwrap(), -0.05, max_relative = 1e-14);
    assert_relative_eq!(
        d.percentile(0.999).unwrap(),
        0.002 * 0.1 + 0.998 * 0.4,
        max_relative = 1e-14
    );
    // RMS = sqrt((0.01 + 0.04 + 0.16) / 3).
    assert_relative_eq!(dp.rms, 0.07f64.sqrt(), max_relative = 1e-14);
    assert_eq!(dp.rms_uncertainty, 0.0);

    // The report lines: llama-perplexity's names, order and units.
    let rows = s.rows();
    let names: Vec<&str> = rows.iter().map(|r| r.name).collect();
    assert_eq!(
        names,
        [
            "Mean KLD",
            "Maximum KLD",
            "99.9% KLD",
            "99.0% KLD",
            "95.0% KLD",
            "90.0% KLD",
            "Median KLD",
            "10.0% KLD",
            "5.0% KLD",
            "1.0% KLD",
            "0.1% KLD",
            "Minimum KLD",
            "Mean Δp",
            "Maximum Δp",
            "99.9% Δp",
            "99.0% Δp",
            "95.0% Δp",
            "90.0% Δp",
            "75.0% Δp",
            "Median Δp",
            "25.0% Δp",
            "10.0% Δp",
            "5.0% Δp",
            "1.0% Δp",
            "0.1% Δp",
            "Minimum Δp",
            "RMS Δp",
            "Same top p",
        ]
    );
    let last = rows.last().unwrap();
    assert!(last.percent);
    assert_eq!(last.value, 75.0);
    assert_relative_eq!(last.uncertainty.unwrap(), 25.0, max_relative = 1e-15);
    assert_eq!((rows[1].value, rows[1].percent), (0.4, false));
    assert_relative_eq!(rows[13].value, 40.0, max_relative = 1e-15);
}

#[test]
fn summary_uncertainties_beyond_ten_steps() {
    // KLD 1..=12: mean 6.5, var = 650/12 - 42.25 = 143/12, unc = sqrt(143/12/11) =
    // sqrt(13/12). Same top on 9 of 12: 0.75 ± sqrt(0.1875/11). Δp 0.1 on six steps and
    // 0.3 on six: mean 0.2, var 0.01, unc 0.1/sqrt(11); Δp² in {0.01, 0.09}: mse 0.05,
    // var(Δp²) = 0.0041 - 0.0025 = 0.0016, unc(mse) = 0.04/sqrt(11),
    // rms = sqrt(0.05), unc(rms) = 0.5/sqrt(0.05) * 0.04/sqrt(11).
    let mut acc = KldAccumulator::new();
    for i in 0..12 {
        acc.push(&step(
            f64::from(i + 1),
            i % 4 != 0,
            Some(if i % 2 == 0 { 0.1 } else { 0.3 }),
        ));
    }
    assert_eq!(acc.count(), 12);
    let s = acc.finish().unwrap();
    assert_eq!(s.kld.mean, 6.5);
    assert_relative_eq!(
        s.kld.mean_uncertainty,
        (13.0f64 / 12.0).sqrt(),
        max_relative = 1e-14
    );
    assert_eq!(s.kld.median, 6.5);
    assert_eq!(s.same_top, 0.75);
    assert_relative_eq!(
        s.same_top_uncertainty,
        (0.1875f64 / 11.0).sqrt(),
        max_relative = 1e-15
    );
    let dp = s.delta_p.unwrap();
    assert_relative_eq!(dp.dist.mean, 0.2, max_relative = 1e-14);
    assert_relative_eq!(
        dp.dist.mean_uncertainty,
        0.1 / 11f64.sqrt(),
        max_relative = 1e-10
    );
    assert_relative_eq!(dp.rms, 0.05f64.sqrt(), max_relative = 1e-14);
    assert_relative_eq!(
        dp.rms_uncertainty,
        0.5 / 0.05f64.sqrt() * 0.04 / 11f64.sqrt(),
        max_relative = 1e-10
    );
}

#[test]
fn summary_edges() {
    assert_eq!(KldAccumulator::new().finish(), None);
    // One step, no next token: no Δp block, no Same top uncertainty (count - 1 = 0).
    let s = summarize(&[step(0.5, false, None)]).unwrap();
    assert_eq!(s.count, 1);
    assert_eq!((s.kld.min, s.kld.median, s.kld.max), (0.5, 0.5, 0.5));
    assert!(s.kld.percentiles.iter().all(|p| p.value == 0.5));
    assert_eq!((s.same_top, s.same_top_uncertainty), (0.0, 0.0));
    assert_eq!(s.delta_p, None);
    assert_eq!(s.rows().len(), 13);
    // Δp all zero: rms 0 and its uncertainty 0 (not 0/0).
    let s = summarize(&[step(0.0, true, Some(0.0)), step(0.0, true, Some(0.0))]).unwrap();
    let dp = s.delta_p.unwrap();
    assert_eq!((dp.rms, dp.rms_uncertainty), (0.0, 0.0));
    assert_eq!((s.same_top, s.same_top_uncertainty), (1.0, 0.0));
    // A +inf KLD: mean and max +inf, no NaN anywhere.
    let mut steps: Vec<StepKld> = (0..20).map(|i| step(f64::from(i), true, None)).collect();
    steps.push(step(f64::INFINITY, false, None));
    let s = summarize(&steps).unwrap();
    assert_eq!((s.kld.mean, s.kld.max), (f64::INFINITY, f64::INFINITY));
    assert_eq!(s.kld.mean_uncertainty, 0.0);
    assert!(s.rows().iter().all(|r| !r.value.is_nan()));
}
