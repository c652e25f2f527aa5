//! Diagnosis of a failed group: each try *repairs* one input from the data the trace
//! holds and recomputes (see the crate docs for the list); a repair that makes the group
//! pass is a [`Finding`] blaming a [`Suspect`].

use std::fmt;
use std::ops::Range;

use crate::VerifyError;
use tensor_stats::{sci, AttentionParams, Dense};
use trace_format::meta::Role;

use crate::bounds::{compare, exceeds, slice_nmse};
use crate::group::{Fingerprints, Group};
use crate::recompute::{attn_err, dense, Inputs};

/// Which input a finding blames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Suspect {
    /// A traced tensor.
    Tensor(Role),
    /// The op's recorded scale (`kqv_trace.attn.scale`).
    Scale,
    /// The op's recorded softcap (`kqv_trace.attn.softcap`).
    Softcap,
    /// The op's recorded ALiBi bias (`kqv_trace.attn.max_bias`).
    MaxBias,
}

impl fmt::Display for Suspect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Suspect::Tensor(r) => f.write_str(r.name()),
            Suspect::Scale => f.write_str("scale"),
            Suspect::Softcap => f.write_str("softcap"),
            Suspect::MaxBias => f.write_str("max_bias"),
        }
    }
}

/// One explanation of a failed group.
#[derive(Clone, Debug, PartialEq)]
pub struct Finding {
    pub suspect: Suspect,
    /// The tensor's name (GGUF name in a file, ggml name live), or the metadata key.
    pub tensor: String,
    /// What is wrong with it, in words.
    pub what: String,
    /// NMSE of the group with this input repaired (`None` for stale-buffer evidence,
    /// which cannot be repaired).
    pub nmse_after: Option<f64>,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.suspect, self.tensor, self.what)?;
        if let Some(n) = self.nmse_after {
            write!(f, "; repaired, the group verifies (NMSE {})", sci(n))?;
        }
        Ok(())
    }
}

/// The stored data was memory ordered [ne0, ne2, ne1, ne3] but read as if in `ne` order:
/// read it the other way.
fn reread_swapped12(d: &Dense) -> Result<Dense, VerifyError> {
    let [a, b, c, _] = d.ne;
    Dense::from_fn(d.ne, |i0, i1, i2, i3| {
        d.data[i0 + a * (i2 + c * (i1 + b * i3))]
    })
    .map_err(attn_err)
}

/// The stored data is the transpose (dims 0 and 1) of what its layout says: read it back.
fn reread_transposed01(d: &Dense) -> Result<Dense, VerifyError> {
    let [a, b, c, _] = d.ne;
    Dense::from_fn(d.ne, |i0, i1, i2, i3| {
        d.data[i1 + b * (i0 + a * (i2 + c * i3))]
    })
    .map_err(attn_err)
}

/// Try one repaired set of inputs over `tokens`: `Some(nmse)` when it passes there and
/// the original does not.
fn repaired(
    inp: &Inputs,
    original: &Dense,
    actual: &[f32],
    tokens: Range<usize>,
    bound: f64,
) -> Result<Option<f64>, VerifyError> {
    if tokens.is_empty() {
        return Ok(None);
    }
    let before = compare(original, actual, tokens.clone()).nmse;
    if before <= bound {
        return Ok(None);
    }
    let after = compare(&inp.reference()?, actual, tokens).nmse;
    Ok((after <= bound).then_some(after))
}

/// The findings of a failed group, and notes on what the diagnosis could not do (it
/// stops at its work budget, keeping what it found).
pub(crate) fn diagnose(
    g: &Group,
    inp: &Inputs,
    original: &Dense,
    actual: &[f32],
    bound: f64,
    previous: Option<(u32, &Fingerprints)>,
) -> Result<(Vec<Finding>, Vec<String>), VerifyError> {
    let mut found = Vec::new();
    let mut notes = Vec::new();
    match tries(g, inp, original, actual, bound, previous, &mut found, &mut notes) {
        Ok(()) => {}
        Err(VerifyError::Budget { limit, .. }) => notes.push(format!(
            "diagnosis stopped at its work budget ({} x {limit} multiply-adds); the tries not made may explain the failure",
            crate::DIAGNOSIS_WORK_FACTOR
        )),
        Err(e) => return Err(e),
    }
    Ok((found, notes))
}

#[allow(clippy::too_many_arguments)]
fn tries(
    g: &Group,
    inp: &Inputs,
    original: &Dense,
    actual: &[f32],
    bound: f64,
    previous: Option<(u32, &Fingerprints)>,
    found: &mut Vec<Finding>,
    notes: &mut Vec<String>,
) -> Result<(), VerifyError> {
    let n_tokens = original.ne[2];
    let all = 0..n_tokens;
    let name = |r: Role| g.get(r).map(|o| o.name.clone()).unwrap_or_default();

    // Stale buffers: an input byte for byte the previous step's, where it should have
    // changed. Sinks are weights (they never change). A Q repeats legitimately only in the
    // first layer, for the same token(s) as the previous step, in a model without rotary
    // positions: then a note, not a suspect. K/V views gain the step's rows.
    if let Some((prev_step, prev)) = previous {
        for o in &g.operands {
            if matches!(o.role, Role::KqvOut | Role::Sinks)
                || prev.get(&o.role) != Some(&o.fingerprint)
            {
                continue;
            }
            if o.role == Role::Q && g.layer == 0 && g.same_tokens_as_previous != Some(false) {
                notes.push(format!(
                    "q ({}) is byte for byte the q of step {prev_step}: legitimate for a repeated token in a model without rotary positions, a stale buffer otherwise",
                    o.name
                ));
                continue;
            }
            {
                found.push(Finding {
                    suspect: Suspect::Tensor(o.role),
                    tensor: o.name.clone(),
                    what: format!(
                        "byte for byte the {} of step {prev_step}: a stale buffer (data of the previous step)",
                        o.role
                    ),
                    nmse_after: None,
                });
            }
        }
    }

    // Layouts: memory order [ne0, ne2, ne1] read as ne order; V transposed.
    let order_words = |r: Role| match r {
        Role::Q => (
            "[head_dim, n_head, n_tokens]",
            "[head_dim, n_tokens, n_head]",
        ),
        _ => ("[head_dim, n_head_kv, n_kv]", "[head_dim, n_kv, n_head_kv]"),
    };
    for role in [Role::Q, Role::K, Role::V] {
        let Some(o) = g.get(role) else { continue };
        let stored = dense(o)?;
        let [_, n1, n2, _] = stored.ne;
        let mut tries: Vec<(Dense, String)> = Vec::new();
        if n1 > 1 && n2 > 1 {
            let (mem, ne) = order_words(role);
            let recorded = if o.layout.memory_order() == [0, 2, 1, 3] {
                " (the order its recorded nb give)"
            } else {
                ""
            };
            let ne_words = if role == Role::V && !inp.flash {
                "its ne order".to_owned()
            } else {
                format!("ne order {ne}")
            };
            let mem_words = if role == Role::V && !inp.flash {
                "memory order [ne0, ne2, ne1]".to_owned()
            } else {
                format!("memory order {mem}")
            };
            tries.push((
                reread_swapped12(&stored)?,
                format!("data in {mem_words}{recorded} read as if in {ne_words}"),
            ));
        }
        if role == Role::V && stored.ne[0] > 1 && n1 > 1 {
            tries.push((
                reread_transposed01(&stored)?,
                "data stored transposed (dims 0 and 1 exchanged)".to_owned(),
            ));
        }
        for (fixed, what) in tries {
            let mut alt = inp.clone();
            match role {
                Role::Q => alt.set_q(fixed)?,
                Role::K => alt.k = fixed,
                _ => alt.v = inp.v_from_stored(fixed)?,
            }
            if let Some(n) = repaired(&alt, original, actual, all.clone(), bound)? {
                found.push(Finding {
                    suspect: Suspect::Tensor(role),
                    tensor: o.name.clone(),
                    what,
                    nmse_after: Some(n),
                });
            }
        }
    }

    // Mask rows shifted by one.
    if let Some(mask) = &inp.mask {
        let [n_kv, rows, m2, m3] = mask.ne;
        for (dir, tokens) in [
            (1i64, 1..n_tokens),
            (-1, 0..n_tokens.min(rows.saturating_sub(1))),
        ] {
            if rows < 2 {
                break;
            }
            // dir +1: stored row t holds row t+1, so row t is stored row t-1.
            let fixed = Dense::from_fn([n_kv, rows, m2, m3], |i0, i1, i2, i3| {
                let src = (i1 as i64 - dir).clamp(0, rows as i64 - 1) as usize;
                mask.get(i0, src, i2, i3).unwrap_or(f64::NAN)
            })
            .map_err(attn_err)?;
            let mut alt = inp.clone();
            alt.mask = Some(fixed);
            if let Some(n) = repaired(&alt, original, actual, tokens.clone(), bound)? {
                let held = if dir > 0 { "t+1" } else { "t-1" };
                found.push(Finding {
                    suspect: Suspect::Tensor(Role::Mask),
                    tensor: name(Role::Mask),
                    what: format!(
                        "rows shifted by one (row t holds row {held}'s mask); compared on tokens {}..{} (the shift loses a row)",
                        tokens.start,
                        tokens.end - 1
                    ),
                    nmse_after: Some(n),
                });
            }
        }
    }

    // Q heads permuted (a heads x heads matrix: bounded).
    if inp.q.ne[2] > crate::MAX_DIAGNOSIS_HEADS {
        notes.push(format!(
            "q-head permutation search skipped: {} query heads, more than {}",
            inp.q.ne[2],
            crate::MAX_DIAGNOSIS_HEADS
        ));
    } else if let Some(f) = q_heads(g, inp, original, actual, bound)? {
        found.push(f);
    }

    // The op's parameters, fitted one at a time, when nothing else explained it (they are
    // the costliest tries): the scale, the softcap, ALiBi's max_bias.
    for param in [Param::Scale, Param::Softcap, Param::MaxBias] {
        if !found.is_empty() {
            break;
        }
        if let Some(f) = param_fit(param, inp, original, actual, bound)? {
            found.push(f);
        }
    }

    // Sinks: a wrong sink changes only the softmax's denominator, so each output row is
    // the reference's times a factor of its own.
    if found.is_empty() && inp.sinks.is_some() {
        if let Some(f) = row_scaling(g, original, actual, bound) {
            found.push(f);
        }
    }

    // One KV cell wrong (a corrupted or misplaced row of the cache): evidence, not a
    // repair, so only when no repair explained the failure.
    if found.is_empty() {
        if let Some(f) = one_cell(g, inp, original, actual)? {
            found.push(f);
        }
    }
    Ok(())
}

/// `actual` is `original` with each (token, head) row scaled by a factor of its own, to
/// the bound: the signature of a wrong softmax denominator (a sink).
fn row_scaling(g: &Group, original: &Dense, actual: &[f32], bound: f64) -> Option<Finding> {
    let dv = original.ne[0];
    if dv == 0 || original.data.len() != actual.len() {
        return None;
    }
    let mut fitted = original.clone();
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for (row, a) in fitted
        .data
        .chunks_exact_mut(dv)
        .zip(actual.chunks_exact(dv))
    {
        let (ra, rr) = row.iter().zip(a).fold((0.0, 0.0), |(ra, rr), (&r, &x)| {
            (ra + r * f64::from(x), rr + r * r)
        });
        if rr > 0.0 {
            let alpha = ra / rr;
            lo = lo.min(alpha);
            hi = hi.max(alpha);
            row.iter_mut().for_each(|r| *r *= alpha);
        }
    }
    let all = 0..original.ne[2];
    let before = compare(original, actual, all.clone()).nmse;
    let after = compare(&fitted, actual, all).nmse;
    if before <= bound || exceeds(after, bound) || !lo.is_finite() {
        return None;
    }
    Some(Finding {
        suspect: Suspect::Tensor(Role::Sinks),
        tensor: g.get(Role::Sinks).map(|o| o.name.clone()).unwrap_or_default(),
        what: format!(
            "kqv_out is the reference with each (token, head) row scaled by its own factor (from {} to {}): what a wrong sink (the softmax's extra denominator term) does",
            sci(lo),
            sci(hi)
        ),
        nmse_after: Some(after),
    })
}

/// An op parameter the diagnosis fits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Param {
    Scale,
    Softcap,
    MaxBias,
}

fn param_fit(
    param: Param,
    inp: &Inputs,
    original: &Dense,
    actual: &[f32],
    bound: f64,
) -> Result<Option<Finding>, VerifyError> {
    match param {
        Param::Scale => scale_fit(inp, original, actual, bound),
        Param::Softcap | Param::MaxBias => other_fit(param, inp, original, actual, bound),
    }
}

/// Fit the softcap (0 = none, the usual 30 and 50, and a grid around the recorded value)
/// or ALiBi's max_bias (0, 8, and a grid; only with a mask, as ggml requires).
fn other_fit(
    param: Param,
    inp: &Inputs,
    original: &Dense,
    actual: &[f32],
    bound: f64,
) -> Result<Option<Finding>, VerifyError> {
    if param == Param::MaxBias && inp.mask.is_none() {
        return Ok(None);
    }
    let all = 0..original.ne[2];
    let rec = match param {
        Param::Softcap => inp.p.softcap,
        _ => inp.p.max_bias,
    };
    let with = |x: f64| match param {
        Param::Softcap => AttentionParams {
            softcap: x,
            ..inp.p
        },
        _ => AttentionParams {
            max_bias: x,
            ..inp.p
        },
    };
    let eval = |x: f64| -> Result<f64, VerifyError> {
        Ok(compare(&inp.reference_with(&with(x))?, actual, all.clone()).nmse)
    };
    let center = if rec > 0.0 && rec.is_finite() {
        rec
    } else {
        8.0
    };
    let mut candidates = vec![0.0, 8.0, 30.0, 50.0];
    let step = 2f64.sqrt();
    candidates.extend((-8..=8).map(|k| center * step.powi(k)));
    let mut best = (f64::INFINITY, rec);
    for x in candidates {
        if x.is_finite() && x >= 0.0 && (x - rec).abs() > 1e-6 * rec.abs().max(1e-30) {
            let e = eval(x)?;
            if e < best.0 {
                best = (e, x);
            }
        }
    }
    if best.0 > bound && best.1 > 0.0 {
        // Golden-section search on the log within one grid step either side.
        let found = golden_log_search(&eval, best.1, step)?;
        if found.0 < best.0 {
            best = found;
        }
    }
    let (after, x) = best;
    let before = compare(original, actual, all).nmse;
    if exceeds(after, bound) || before <= bound {
        return Ok(None);
    }
    let (suspect, key, name) = match param {
        Param::Softcap => (
            Suspect::Softcap,
            trace_format::keys::ATTN_SOFTCAP,
            "softcap",
        ),
        _ => (
            Suspect::MaxBias,
            trace_format::keys::ATTN_MAX_BIAS,
            "ALiBi max_bias",
        ),
    };
    Ok(Some(Finding {
        suspect,
        tensor: key.to_owned(),
        what: format!(
            "the recorded {name} {} does not reproduce kqv_out; {name} {} does",
            rec as f32,
            sci(x)
        ),
        nmse_after: Some(after),
    }))
}

/// Each output head's best q head (giving every query head one q head's data at a time);
/// a finding when that matching is a permutation other than the identity that verifies.
fn q_heads(
    g: &Group,
    inp: &Inputs,
    original: &Dense,
    actual: &[f32],
    bound: f64,
) -> Result<Option<Finding>, VerifyError> {
    let [d, nt, nh, ns] = inp.q.ne;
    if nh < 2 {
        return Ok(None);
    }
    let head_of = |q: &Dense, from: &dyn Fn(usize) -> usize| {
        Dense::from_fn([d, nt, nh, ns], |i0, i1, i2, i3| {
            q.get(i0, i1, from(i2), i3).unwrap_or(f64::NAN)
        })
        .map_err(attn_err)
    };
    // err[h][s]: head h's squared error when all heads read q head s.
    let mut err = vec![vec![0.0f64; nh]; nh];
    for s in 0..nh {
        let mut alt = inp.clone();
        alt.set_q(head_of(&inp.q_raw, &|_| s)?)?;
        let (heads, _) = slice_nmse(&alt.reference()?, actual);
        for (row, e) in err.iter_mut().zip(heads) {
            row[s] = e;
        }
    }
    let map: Vec<usize> = (0..nh)
        .map(|h| {
            (0..nh)
                .min_by(|&a, &b| err[h][a].total_cmp(&err[h][b]))
                .unwrap_or(h)
        })
        .collect();
    let mut seen = vec![false; nh];
    let bijective = map.iter().all(|&s| !std::mem::replace(&mut seen[s], true));
    if !bijective || map.iter().enumerate().all(|(h, &s)| h == s) {
        return Ok(None);
    }
    let mut alt = inp.clone();
    alt.set_q(head_of(&inp.q_raw, &|h| map[h])?)?;
    let all = 0..original.ne[2];
    Ok(
        repaired(&alt, original, actual, all, bound)?.map(|n| Finding {
            suspect: Suspect::Tensor(Role::Q),
            tensor: g.get(Role::Q).map(|o| o.name.clone()).unwrap_or_default(),
            what: format!("heads permuted: output head h matches q head {:?}[h]", map),
            nmse_after: Some(n),
        }),
    )
}

/// Fit the scale: ggml's usual 1/sqrt(head_dim) and a few others, a grid over a factor
/// of 64 either way of the recorded scale, then a golden-section search around the best.
fn scale_fit(
    inp: &Inputs,
    original: &Dense,
    actual: &[f32],
    bound: f64,
) -> Result<Option<Finding>, VerifyError> {
    let all = 0..original.ne[2];
    let rec = inp.p.scale;
    let d = inp.q.ne[0] as f64;
    let usual = 1.0 / d.sqrt();
    let center = if rec.is_finite() && rec > 0.0 {
        rec
    } else {
        usual
    };
    let eval = |s: f64| -> Result<f64, VerifyError> {
        let p = AttentionParams { scale: s, ..inp.p };
        Ok(compare(&inp.reference_with(&p)?, actual, all.clone()).nmse)
    };
    let mut best = (f64::INFINITY, center);
    let consider = |s: f64, best: &mut (f64, f64)| -> Result<(), VerifyError> {
        let e = eval(s)?;
        if e < best.0 {
            *best = (e, s);
        }
        Ok(())
    };
    for s in [usual, 1.0, 1.0 / d, rec * rec, rec.abs().sqrt()] {
        if s.is_finite() && s > 0.0 {
            consider(s, &mut best)?;
        }
    }
    let step = 2f64.sqrt();
    for k in -12..=12 {
        consider(center * step.powi(k), &mut best)?;
    }
    if best.0 > bound {
        // Golden-section search on the log within one grid step either side.
        let found = golden_log_search(&eval, best.1, step)?;
        if found.0 < best.0 {
            best = found;
        }
    }
    let (after, s) = best;
    let before = compare(original, actual, all).nmse;
    if exceeds(after, bound) || before <= bound || (s - rec).abs() <= 1e-6 * rec.abs() {
        return Ok(None);
    }
    let named = if (s - usual).abs() <= 1e-6 * usual {
        format!(" = 1/sqrt({})", inp.q.ne[0])
    } else {
        String::new()
    };
    Ok(Some(Finding {
        suspect: Suspect::Scale,
        tensor: trace_format::keys::ATTN_SCALE.to_owned(),
        what: format!(
            "the recorded op scale {} does not reproduce kqv_out; scale {}{named} does",
            rec as f32,
            sci(s)
        ),
        nmse_after: Some(after),
    }))
}

/// The share of the error a one-cell hypothesis must explain to be reported, and how many
/// times more the runner-up cell must leave unexplained.
const ONE_CELL_SHARE: f64 = 0.8;
const ONE_CELL_MARGIN: f64 = 2.0;
/// The most another cell may explain: when every cell fits (few rows leave the
/// hypothesis underdetermined), none is named.
const ONE_CELL_RUNNER_UP: f64 = 0.95;

/// One K or V cell wrong: each hypothesis predicts the error's shape exactly (not only to
/// first order), whatever the size of the corruption:
///
/// - K row of cell `j` wrong: only cell `j`'s score moves, so each query row's output moves
///   along `v_j - o_r` (its reference output `o_r`): `e_r = c_r (v_j - o_r)`, one free
///   scalar per row;
/// - V row of cell `j` wrong: `e_r = w_rj * dv_j`, one vector per KV head shared by the
///   query rows reading it (`w_rj` the reference's softmax weight).
///
/// Each cell's least-squares fit explains some share of the error energy; a finding when
/// one (role, cell) explains at least [`ONE_CELL_SHARE`] and the runner-up cell leaves
/// [`ONE_CELL_MARGIN`] times as much unexplained. Costs about one recomputation.
fn one_cell(
    g: &Group,
    inp: &Inputs,
    original: &Dense,
    actual: &[f32],
) -> Result<Option<Finding>, VerifyError> {
    inp.budget.spend(inp.work())?;
    let ops = inp.operands(&inp.p);
    let (w, n_kv, rv) = crate::kernel::weights(&ops)?;
    let [dv, nh, nt, ns] = original.ne;
    if n_kv == 0 || dv == 0 || original.data.len() != actual.len() {
        return Ok(None);
    }
    let v = &inp.v;
    let n_vh = v.ne[2];
    let err: Vec<f64> = actual
        .iter()
        .zip(&original.data)
        .map(|(&a, &r)| f64::from(a) - r)
        .collect();
    let total: f64 = err.iter().map(|x| x * x).sum();
    if total <= 0.0 || !total.is_finite() {
        return Ok(None);
    }
    let mut k_share = vec![0f64; n_kv];
    // V: per (kv head, seq, cell) the weighted error sum and the weights' squares.
    let mut v_num = vec![0f64; n_vh * ns * n_kv * dv];
    let mut v_den = vec![0f64; n_vh * ns * n_kv];
    for s in 0..ns {
        for h in 0..nh {
            let vh = h / rv.max(1);
            for t in 0..nt {
                let r = t + nt * (h + nh * s);
                let o0 = dv * (h + nh * (t + nt * s));
                let (e, o) = (&err[o0..o0 + dv], &original.data[o0..o0 + dv]);
                let wr = &w[r * n_kv..(r + 1) * n_kv];
                for (j, &wj) in wr.iter().enumerate() {
                    if wj == 0.0 {
                        continue;
                    }
                    let vb = dv * (j + n_kv * (vh + n_vh * s));
                    let vj = &v.data[vb..vb + dv];
                    let (mut eu, mut uu) = (0.0, 0.0);
                    for d in 0..dv {
                        let u = vj[d] - o[d];
                        eu += e[d] * u;
                        uu += u * u;
                    }
                    if uu > 0.0 {
                        k_share[j] += eu * eu / uu;
                    }
                    let c = (vh + n_vh * s) * n_kv + j;
                    v_den[c] += wj * wj;
                    for (acc, &ed) in v_num[c * dv..(c + 1) * dv].iter_mut().zip(e) {
                        *acc += wj * ed;
                    }
                }
            }
        }
    }
    let mut v_share = vec![0f64; n_kv];
    for (c, &den) in v_den.iter().enumerate() {
        if den > 0.0 {
            let n2: f64 = v_num[c * dv..(c + 1) * dv].iter().map(|x| x * x).sum();
            v_share[c % n_kv] += n2 / den;
        }
    }
    let best_of = |share: &[f64]| {
        let mut idx: Vec<usize> = (0..share.len()).collect();
        idx.sort_by(|&a, &b| share[b].total_cmp(&share[a]));
        (idx.first().copied(), idx.get(1).copied())
    };
    let (Some(kb), k2) = best_of(&k_share) else {
        return Ok(None);
    };
    let (Some(vb), v2) = best_of(&v_share) else {
        return Ok(None);
    };
    // Each role's best cell, against that role's runner-up cell: the V hypothesis fits
    // any cell whose weights across the rows are alike (few rows: a decode), so it names
    // a cell only when the rows single one out. An F16 accumulator adds its own rounding
    // (an ulp per later cell) to the error's shape: the fit need not be perfect, only
    // clearly better than any other cell's.
    let k = (
        Role::K,
        kb,
        k_share[kb] / total,
        k2.map_or(0.0, |j| k_share[j]) / total,
    );
    let v = (
        Role::V,
        vb,
        v_share[vb] / total,
        v2.map_or(0.0, |j| v_share[j]) / total,
    );
    let clear = |c: &(Role, usize, f64, f64)| {
        c.2 >= ONE_CELL_SHARE
            && c.3 <= ONE_CELL_RUNNER_UP
            && (1.0 - c.3) >= ONE_CELL_MARGIN * (1.0 - c.2)
    };
    let (role, cell, share, runner) = match (clear(&k), clear(&v)) {
        (true, true) if v.2 > k.2 => v,
        (true, _) => k,
        (false, true) => v,
        (false, false) => return Ok(None),
    };
    let what = match role {
        Role::K => "key",
        _ => "value",
    };
    Ok(Some(Finding {
        suspect: Suspect::Tensor(role),
        tensor: g.get(role).map(|o| o.name.clone()).unwrap_or_default(),
        what: format!(
            "cell {cell} (of {n_kv} in the view): its {what} row is not what the kernel read; a wrong {what} at that one cell explains {:.1}% of the error (the next cell {:.1}%)",
            100.0 * share,
            100.0 * runner
        ),
        nmse_after: None,
    }))
}

/// Golden-section search of `eval`'s minimum on log(x) over [center / step, center *
/// step] (40 rounds): the (value, x) found.
fn golden_log_search(
    eval: &dyn Fn(f64) -> Result<f64, VerifyError>,
    center: f64,
    step: f64,
) -> Result<(f64, f64), VerifyError> {
    let (mut a, mut b) = ((center / step).ln(), (center * step).ln());
    let phi = (5f64.sqrt() - 1.0) / 2.0;
    let (mut c, mut e) = (b - phi * (b - a), a + phi * (b - a));
    let (mut fc, mut fe) = (eval(c.exp())?, eval(e.exp())?);
    for _ in 0..40 {
        if fc < fe {
            b = e;
            e = c;
            fe = fc;
            c = b - phi * (b - a);
            fc = eval(c.exp())?;
        } else {
            a = c;
            c = e;
            fc = fe;
            e = a + phi * (b - a);
            fe = eval(e.exp())?;
        }
    }
    Ok(if fc < fe {
        (fc, c.exp())
    } else {
        (fe, e.exp())
    })
}
