//! Difference metrics against exact values: small pairs worked out by hand (the
//! arithmetic is in the comments), and larger ones against a plain f64 oracle written
//! straight from the definitions in docs/diff.md.

use approx::assert_relative_eq;
use tensor_stats::{
    diff, diff_parallel, unravel, DiffAccumulator, DiffError, DiffMetrics, Tolerance,
    ToleranceMode, REL_FLOOR,
};
use test_support::Rng;

fn tol(mode: ToleranceMode, abs: f64, rel: f64, pct: f64) -> Tolerance {
    Tolerance {
        abs,
        rel,
        mode,
        max_mismatch_pct: pct,
    }
}

const SEED: Tolerance = Tolerance {
    abs: 1e-6,
    rel: 1e-4,
    mode: ToleranceMode::Elementwise,
    max_mismatch_pct: 0.0,
};

#[test]
fn defaults_are_the_seeds() {
    assert_eq!(Tolerance::default(), SEED);
    for m in ToleranceMode::ALL {
        assert_eq!(ToleranceMode::from_name(m.name()), Some(m));
    }
    assert_eq!(ToleranceMode::from_name("max"), None);
}

/// c = [1, 2, 3, 4], r = [1, 2, 2, 2]: d = [0, 0, 1, 2], rel = [0, 0, 1/2, 1].
#[test]
fn hand_worked_pair() {
    let c = [1.0f32, 2.0, 3.0, 4.0];
    let r = [1.0f32, 2.0, 2.0, 2.0];
    let m = diff(&c, &r, SEED).unwrap();
    assert_eq!((m.count, m.compared, m.rel_count), (4, 4, 4));
    assert_eq!(m.mean_abs, 0.75); // 3 / 4
    assert_eq!(m.max_abs, 2.0);
    assert_eq!(m.mean_rel, 0.375); // 1.5 / 4
    assert_eq!(m.max_rel, 1.0);
    assert_eq!(m.mse, 1.25); // (1 + 4) / 4
    assert_eq!(m.rmse, 1.25f64.sqrt());
    // mean(r) = 7/4; deviations -3/4, 1/4, 1/4, 1/4: variance (9 + 3) / 16 / 4 = 3/16.
    assert_eq!(m.ref_variance, 0.1875);
    assert_relative_eq!(m.nmse, 1.25 / 0.1875, max_relative = 1e-15);
    assert_relative_eq!(
        m.nmse_db,
        10.0 * (20.0f64 / 3.0).log10(),
        max_relative = 1e-15
    );
    // Σcr = 1 + 4 + 6 + 8 = 19, Σc² = 30, Σr² = 13.
    assert_relative_eq!(m.cosine, 19.0 / 390f64.sqrt(), max_relative = 1e-15);
    let w = m.worst_abs.unwrap();
    assert_eq!(
        (w.index, w.current, w.reference, w.value),
        (3, 4.0, 2.0, 2.0)
    );
    assert_eq!(m.worst_rel.unwrap().index, 3);
    // Elementwise: d > 1e-6 + 1e-4 |r| at indices 2 and 3.
    assert_eq!(m.mismatches, 2);
    assert_eq!(m.mismatch_fraction, 0.5);
    assert!(!m.within);
    // Smallest abs with rel kept: max(d - 1e-4 |r|) = 2 - 2e-4; smallest rel with abs
    // kept: max((d - 1e-6) / |r|) = (2 - 1e-6) / 2.
    assert_relative_eq!(m.min_passing_abs, 2.0 - 2e-4, max_relative = 1e-15);
    assert_relative_eq!(m.min_passing_rel, (2.0 - 1e-6) / 2.0, max_relative = 1e-15);
    // ... and they do pass.
    let passing = diff(
        &c,
        &r,
        Tolerance {
            abs: m.min_passing_abs,
            ..SEED
        },
    )
    .unwrap();
    assert!(passing.within);
    let passing = diff(
        &c,
        &r,
        Tolerance {
            rel: m.min_passing_rel,
            ..SEED
        },
    )
    .unwrap();
    assert!(passing.within);

    // Either (Polygraphy): fails where d > abs and d > rel |r|: the same two elements;
    // the smallest abs is the largest d among elements failing rel (2), the smallest rel
    // the largest d/|r| among elements failing abs (1).
    let e = diff(&c, &r, tol(ToleranceMode::Either, 1e-6, 1e-4, 0.0)).unwrap();
    assert_eq!(e.mismatches, 2);
    assert_eq!((e.min_passing_abs, e.min_passing_rel), (2.0, 1.0));
    // With rel 0.6 element 2 (rel 0.5) passes, element 3 (rel 1) does not.
    let e = diff(&c, &r, tol(ToleranceMode::Either, 1e-6, 0.6, 0.0)).unwrap();
    assert_eq!(e.mismatches, 1);
    assert_eq!(e.min_passing_abs, 2.0);

    // Mean (the seed fork): mean abs 0.75 > 1e-6.
    let mm = diff(&c, &r, tol(ToleranceMode::Mean, 1e-6, 1e-4, 0.0)).unwrap();
    assert!(!mm.within);
    assert_eq!((mm.min_passing_abs, mm.min_passing_rel), (0.75, 0.375));
    assert!(
        diff(&c, &r, tol(ToleranceMode::Mean, 0.75, 0.375, 0.0))
            .unwrap()
            .within
    );
    assert!(
        !diff(&c, &r, tol(ToleranceMode::Mean, 0.75, 0.37, 0.0))
            .unwrap()
            .within
    );
}

#[test]
fn mismatch_budget() {
    let c = [1.0f32, 2.0, 3.0, 4.0];
    let r = [1.0f32, 2.0, 2.0, 2.0];
    // 50 % of 4 = 2 failing elements allowed: passes; the 3rd largest need is 0.
    let m = diff(&c, &r, tol(ToleranceMode::Elementwise, 1e-6, 1e-4, 50.0)).unwrap();
    assert_eq!((m.allowed_mismatches, m.mismatches), (2, 2));
    assert!(m.within);
    assert_eq!(m.min_passing_abs, 0.0);
    // 25 %: one allowed, two fail; the 2nd largest abs need is 1 - 2e-4, rel (1 - 1e-6)/2.
    let m = diff(&c, &r, tol(ToleranceMode::Elementwise, 1e-6, 1e-4, 25.0)).unwrap();
    assert_eq!(m.allowed_mismatches, 1);
    assert!(!m.within);
    assert_relative_eq!(m.min_passing_abs, 1.0 - 2e-4, max_relative = 1e-15);
    assert_relative_eq!(m.min_passing_rel, (1.0 - 1e-6) / 2.0, max_relative = 1e-15);
    // 24.9 % of 4 rounds down to 0.
    assert_eq!(
        tol(ToleranceMode::Elementwise, 0.0, 0.0, 24.9).allowed_mismatches(4),
        0
    );
    assert_eq!(
        tol(ToleranceMode::Elementwise, 0.0, 0.0, 100.0).allowed_mismatches(7),
        7
    );
}

#[test]
fn zeros_in_the_reference() {
    // r = 0 has no relative difference; only abs can be met there.
    let m = diff(&[0.0, 1e-7, 1.0], &[0.0, 0.0, 1.0], SEED).unwrap();
    assert_eq!(m.rel_count, 1);
    assert_eq!((m.mean_rel, m.max_rel), (0.0, 0.0));
    assert!(m.within, "1e-7 <= 1e-6 + 0");
    assert_relative_eq!(m.mean_abs, f64::from(1e-7f32) / 3.0, max_relative = 1e-15);
    let m = diff(&[0.0, 1e-3, 1.0], &[0.0, 0.0, 1.0], SEED).unwrap();
    assert!(!m.within);
    assert_eq!(m.min_passing_abs, f64::from(1e-3f32));
    assert_eq!(m.min_passing_rel, f64::INFINITY, "no rel passes at r = 0");
    // A reference below REL_FLOOR counts as zero for the relative difference.
    let tiny = (REL_FLOOR / 2.0) as f32;
    let m = diff(&[1.0, 2.0], &[tiny, 1.0], SEED).unwrap();
    assert_eq!(m.rel_count, 1);
    assert_eq!(m.max_rel, 1.0);
    assert_eq!(m.worst_rel.unwrap().index, 1);
}

#[test]
fn nan_and_inf_are_counted_per_side_and_kept_out_of_the_numbers() {
    let c = [
        f32::NAN,
        1.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        2.0,
        f32::NAN,
        5.0,
    ];
    let r = [
        f32::NAN,
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        2.5,
        1.0,
        f32::INFINITY,
    ];
    let m = diff(&c, &r, SEED).unwrap();
    assert_eq!(m.count, 7);
    assert_eq!(m.compared, 1, "only (2, 2.5)");
    assert_eq!((m.nan_current, m.inf_current), (2, 2));
    assert_eq!((m.nan_reference, m.inf_reference), (2, 3));
    assert_eq!(m.nonfinite_agree, 3, "(NaN, NaN), (inf, inf), (-inf, -inf)");
    assert_eq!(m.nonfinite_mismatch, 3);
    assert_eq!((m.mean_abs, m.max_abs, m.mse), (0.5, 0.5, 0.25));
    assert_eq!(m.mismatches, 4, "3 non-finite + (2 vs 2.5)");
    assert!(!m.within);
    assert_eq!(m.min_passing_abs, f64::INFINITY);
    assert_eq!(m.min_passing_rel, f64::INFINITY);
    // Mean mode cannot pass a non-finite mismatch either.
    let mm = diff(&c, &r, tol(ToleranceMode::Mean, 1.0, 1.0, 0.0)).unwrap();
    assert!(!mm.within);
    // Agreeing non-finite values alone pass (a mask's -inf).
    let mask = [0.0f32, f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY];
    let m = diff(&mask, &mask, SEED).unwrap();
    assert!(m.within);
    assert_eq!((m.compared, m.nonfinite_agree, m.mismatches), (2, 2, 0));
    assert_eq!((m.max_abs, m.nmse, m.cosine), (0.0, 0.0, 1.0));
}

#[test]
fn empty_constant_and_zero_tensors() {
    let m = diff(&[], &[], SEED).unwrap();
    assert_eq!((m.count, m.compared, m.mismatches), (0, 0, 0));
    assert!(m.within);
    assert_eq!((m.nmse, m.cosine, m.mean_abs), (0.0, 1.0, 0.0));
    assert_eq!(m.nmse_db, f64::NEG_INFINITY);
    assert!(m.worst_abs.is_none());
    // Constant reference: variance 0, so NMSE is 0 when equal and +inf otherwise.
    let m = diff(&[3.0; 5], &[3.0; 5], SEED).unwrap();
    assert_eq!((m.nmse, m.ref_variance), (0.0, 0.0));
    let m = diff(&[3.0, 3.0, 4.0], &[3.0; 3], SEED).unwrap();
    assert_eq!(m.nmse, f64::INFINITY);
    assert_eq!(m.nmse_db, f64::INFINITY);
    // Cosine: both zero → 1, one zero → 0; opposite → -1.
    assert_eq!(diff(&[0.0; 4], &[0.0; 4], SEED).unwrap().cosine, 1.0);
    assert_eq!(diff(&[1.0; 4], &[0.0; 4], SEED).unwrap().cosine, 0.0);
    assert_eq!(diff(&[0.0; 4], &[1.0; 4], SEED).unwrap().cosine, 0.0);
    assert_eq!(diff(&[-1.0, 2.0], &[1.0, -2.0], SEED).unwrap().cosine, -1.0);
}

#[test]
fn mismatched_lengths_are_an_error() {
    assert_eq!(
        diff(&[1.0; 3], &[1.0; 4], SEED).unwrap_err(),
        DiffError::LengthMismatch {
            current: 3,
            reference: 4
        }
    );
    let mut acc = DiffAccumulator::new(SEED, 4);
    assert!(acc.push(&[1.0], &[1.0, 2.0]).is_err());
    assert_eq!(acc.count(), 0);
    assert!(diff_parallel(&[1.0; 5], &[1.0; 6], SEED, 2).is_err());
}

#[test]
fn ties_pick_the_first_element() {
    let m = diff(&[1.0, 3.0, 1.0, 3.0], &[0.0, 2.0, 0.0, 2.0], SEED).unwrap();
    assert_eq!(m.worst_abs.unwrap().index, 0);
    assert_eq!(
        m.worst_rel.unwrap().index,
        1,
        "rel = 1/2 at 1 and 3; inf-free"
    );
}

#[test]
fn unravel_is_ne0_fastest() {
    let ne = [3, 4, 5, 2];
    assert_eq!(unravel(0, ne), [0, 0, 0, 0]);
    assert_eq!(unravel(1, ne), [1, 0, 0, 0]);
    assert_eq!(unravel(3, ne), [0, 1, 0, 0]);
    // i0 + 3 (i1 + 4 (i2 + 5 i3)) with (2, 3, 4, 1): 2 + 3 (3 + 4 (4 + 5)) = 119.
    assert_eq!(unravel(119, ne), [2, 3, 4, 1]);
}

// ---- the oracle ------------------------------------------------------------------

/// Straight from the definitions, element by element, in f64.
struct Oracle {
    mean_abs: f64,
    max_abs: (f64, usize),
    mean_rel: f64,
    max_rel: (f64, usize),
    mse: f64,
    var_r: f64,
    cosine: f64,
    mismatches: u64,
    need_abs: Vec<f64>,
    need_rel: Vec<f64>,
}

fn oracle(c: &[f32], r: &[f32], t: &Tolerance) -> Oracle {
    let pairs: Vec<(usize, f64, f64)> = c
        .iter()
        .zip(r)
        .enumerate()
        .filter(|(_, (a, b))| a.is_finite() && b.is_finite())
        .map(|(i, (&a, &b))| (i, f64::from(a), f64::from(b)))
        .collect();
    let n = pairs.len() as f64;
    let mut o = Oracle {
        mean_abs: 0.0,
        max_abs: (-1.0, 0),
        mean_rel: 0.0,
        max_rel: (-1.0, 0),
        mse: 0.0,
        var_r: 0.0,
        cosine: 0.0,
        mismatches: 0,
        need_abs: Vec::new(),
        need_rel: Vec::new(),
    };
    // A non-finite pair that does not agree (both NaN, or the same infinity) fails.
    o.mismatches = c
        .iter()
        .zip(r)
        .filter(|(a, b)| !(a.is_finite() && b.is_finite()))
        .filter(|(a, b)| !((a.is_nan() && b.is_nan()) || (a.is_infinite() && a == b)))
        .count() as u64;
    let mut n_rel = 0.0;
    let mean_r = pairs.iter().map(|p| p.2).sum::<f64>() / n;
    let (mut dot, mut cc, mut rr) = (0.0, 0.0, 0.0);
    for &(i, a, b) in &pairs {
        let d = (a - b).abs();
        o.mean_abs += d / n;
        o.mse += d * d / n;
        o.var_r += (b - mean_r) * (b - mean_r) / n;
        if d > o.max_abs.0 {
            o.max_abs = (d, i);
        }
        if b.abs() > REL_FLOOR {
            let rel = d / b.abs();
            o.mean_rel += rel;
            n_rel += 1.0;
            if rel > o.max_rel.0 {
                o.max_rel = (rel, i);
            }
        }
        dot += a * b;
        cc += a * a;
        rr += b * b;
        let fails = match t.mode {
            ToleranceMode::Either => d > t.abs && d > t.rel * b.abs(),
            _ => d > t.abs + t.rel * b.abs(),
        };
        o.mismatches += u64::from(fails);
        // Smallest passing tolerances, elementwise rule, found by their definitions.
        o.need_abs.push((d - t.rel * b.abs()).max(0.0));
        o.need_rel.push(if d <= t.abs {
            0.0
        } else {
            (d - t.abs) / b.abs()
        });
    }
    o.mean_rel /= n_rel;
    o.cosine = dot / (cc.sqrt() * rr.sqrt());
    o
}

fn pair(n: usize, noise: f32, offset: f32, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut g = Rng::new(seed);
    let r: Vec<f32> = (0..n).map(|_| offset + g.signed()).collect();
    let c: Vec<f32> = r.iter().map(|&x| x + noise * g.signed()).collect();
    (c, r)
}

fn check_against_oracle(m: &DiffMetrics, o: &Oracle) {
    assert_relative_eq!(m.mean_abs, o.mean_abs, max_relative = 1e-10);
    assert_eq!(m.max_abs, o.max_abs.0);
    assert_eq!(m.worst_abs.unwrap().index, o.max_abs.1 as u64);
    assert_relative_eq!(m.mean_rel, o.mean_rel, max_relative = 1e-10);
    // d·(1/|r|) in the fast path: within an ulp or two of d/|r|.
    assert_relative_eq!(m.max_rel, o.max_rel.0, max_relative = 1e-15);
    assert_eq!(m.worst_rel.unwrap().index, o.max_rel.1 as u64);
    assert_relative_eq!(m.mse, o.mse, max_relative = 1e-10);
    assert_relative_eq!(m.ref_variance, o.var_r, max_relative = 1e-9);
    assert_relative_eq!(m.nmse, o.mse / o.var_r, max_relative = 1e-9);
    assert_relative_eq!(m.cosine, o.cosine, max_relative = 1e-12);
    assert_eq!(m.mismatches, o.mismatches);
}

#[test]
fn streaming_chunks_and_threads_match_the_oracle() {
    let n = 300_007; // not a multiple of the block or lane count
    let (c, r) = pair(n, 1e-3, 0.0, 0x1234_5678);
    for t in [
        SEED,
        tol(ToleranceMode::Either, 1e-4, 1e-3, 0.0),
        tol(ToleranceMode::Elementwise, 1e-4, 1e-3, 10.0),
    ] {
        let o = oracle(&c, &r, &t);
        let whole = diff(&c, &r, t).unwrap();
        check_against_oracle(&whole, &o);
        // Pushed in ragged chunks.
        let mut acc = DiffAccumulator::new(t, n as u64);
        let mut at = 0;
        for len in [1usize, 7, 4095, 4097, 100_000].iter().cycle() {
            let end = (at + len).min(n);
            acc.push(&c[at..end], &r[at..end]).unwrap();
            at = end;
            if at == n {
                break;
            }
        }
        let chunked = acc.finish();
        check_against_oracle(&chunked, &o);
        // Split over threads.
        let par = diff_parallel(&c, &r, t, 3).unwrap();
        check_against_oracle(&par, &o);
        assert_eq!(chunked.worst_abs, whole.worst_abs);
        assert_eq!(par.min_passing_abs, whole.min_passing_abs);
        assert_relative_eq!(
            par.min_passing_rel,
            whole.min_passing_rel,
            max_relative = 1e-15
        );
        assert_relative_eq!(
            chunked.min_passing_rel,
            whole.min_passing_rel,
            max_relative = 1e-15
        );
        if t.mode == ToleranceMode::Elementwise {
            // The k-th largest need, k = allowed + 1.
            let k = t.allowed_mismatches(n as u64) as usize + 1;
            let kth = |v: &[f64]| {
                let mut v = v.to_vec();
                v.sort_by(|a, b| b.total_cmp(a));
                v[k - 1]
            };
            assert_eq!(whole.min_passing_abs, kth(&o.need_abs));
            assert_relative_eq!(
                whole.min_passing_rel,
                kth(&o.need_rel),
                max_relative = 1e-15
            );
            assert_eq!(whole.within, o.mismatches < k as u64);
        }
    }
}

#[test]
fn non_finite_values_inside_large_chunks() {
    let n = 20_000;
    let (mut c, mut r) = pair(n, 1e-5, 0.0, 99);
    c[5000] = f32::NAN;
    r[12_345] = f32::INFINITY;
    c[17_000] = f32::NEG_INFINITY;
    r[17_000] = f32::NEG_INFINITY;
    let o = oracle(&c, &r, &SEED);
    let m = diff_parallel(&c, &r, SEED, 2).unwrap();
    check_against_oracle(&m, &o);
    assert_eq!(m.compared, n as u64 - 3);
    assert_eq!((m.nan_current, m.inf_current, m.inf_reference), (1, 1, 2));
    assert_eq!((m.nonfinite_agree, m.nonfinite_mismatch), (1, 2));
}

#[test]
fn the_variance_does_not_cancel_with_a_large_offset() {
    // Reference near 1e4 with a spread of ~1: E[r²] - E[r]² would lose most digits.
    let (c, r) = pair(50_000, 1e-2, 1.0e4, 7);
    let o = oracle(&c, &r, &SEED);
    let m = diff(&c, &r, SEED).unwrap();
    assert_relative_eq!(m.ref_variance, o.var_r, max_relative = 1e-9);
    assert_relative_eq!(m.nmse, o.mse / o.var_r, max_relative = 1e-9);
}

/// Q8_0 blocks decoded by hand (f16 scale, 32 int8): the oracle for quantized input.
fn q8_0_by_hand(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(34)
        .flat_map(|b| {
            let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
            b[2..].iter().map(move |&q| d * f32::from(q as i8))
        })
        .collect()
}

#[test]
fn quantized_input_against_its_source() {
    let (_, r) = pair(32 * 64, 0.0, 0.0, 4242);
    let q = gguf_io::quant::quantize(gguf_io::GgmlType::Q8_0, &r).unwrap();
    let c = gguf_io::quant::dequantize_to_vec(gguf_io::GgmlType::Q8_0, &q, r.len()).unwrap();
    assert_eq!(c, q8_0_by_hand(&q));
    let t = tol(ToleranceMode::Elementwise, 1e-3, 0.0, 0.0);
    let m = diff(&c, &r, t).unwrap();
    check_against_oracle(&m, &oracle(&c, &r, &t));
    // Q8_0 rounds to half a step of d = max|x|/127 per block, and d itself is rounded to
    // f16 (relative 2^-11, times up to 127 steps): |error| <= 1/254 + 1/2048 for |x| <= 1.
    assert!(m.max_abs <= 1.0 / 254.0 + 1.0 / 2048.0, "{}", m.max_abs);
    assert!(m.nmse < 1e-4 && m.cosine > 0.9999, "{m:?}");
}
