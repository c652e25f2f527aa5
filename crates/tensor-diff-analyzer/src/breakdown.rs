//! Error where it lives: the difference of each layer's attention output (`kqv_out`,
//! `[n_head * head_dim, n_tokens]`) broken down per query head and per token position,
//! summed over every compared step: for each (layer, head, position) the NMSE
//! `sum (c - r)^2 / sum r^2` over that head's `head_dim` values of that token (a position
//! seen at several steps, e.g. recomputed, sums them all). A quantized or mixed KV cache's
//! error shows as a band that grows with the position (the context the token attended
//! to) or sits in one head. In `--json` (`error_by_head_position`) and drawn by `--plot`
//! next to the main heatmap ([`crate::plot::write_heads_svg`]).

use std::collections::{BTreeMap, BTreeSet};

/// Per (head, position): (sum of squared differences, sum of squared reference values).
#[derive(Clone, Debug, Default)]
struct Sums {
    heads: u32,
    cells: BTreeMap<(u32, i32), (f64, f64)>,
}

/// The accumulated breakdown, per layer.
#[derive(Clone, Debug, Default)]
pub struct Breakdown {
    layers: BTreeMap<i32, Sums>,
    /// kqv_out pairs whose layout did not allow a breakdown (not `[H * D, T]` with `T`
    /// positions, or not F32).
    pub skipped: usize,
}

/// One layer's breakdown: `nmse[head][i]` at `positions[i]`; None where the reference is
/// all zeros and the difference is not (an NMSE is undefined there), Some(0) where both
/// are zero.
#[derive(Clone, Debug, PartialEq)]
pub struct Grid {
    pub layer: i32,
    pub heads: u32,
    pub positions: Vec<i32>,
    pub nmse: Vec<Vec<Option<f64>>>,
}

/// Little-endian F32 values (no alignment assumed).
fn f32s(b: &[u8]) -> impl Iterator<Item = f32> + '_ {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
}

impl Breakdown {
    /// Add one compared `kqv_out` pair: `ne` its shape, `n_head` the run's query heads,
    /// `positions` its step's token positions, `cur`/`reference` the F32 values
    /// (little-endian bytes in logical order). Returns whether it was added.
    pub fn add(
        &mut self,
        layer: i32,
        n_head: u32,
        ne: [u64; 4],
        positions: &[i32],
        cur: &[u8],
        reference: &[u8],
    ) -> bool {
        let ok = n_head > 0
            && ne[0] % u64::from(n_head) == 0
            && ne[2] == 1
            && ne[3] == 1
            && ne[1] == positions.len() as u64
            && cur.len() as u64 == ne[0] * ne[1] * 4
            && cur.len() == reference.len();
        if !ok {
            self.skipped += 1;
            return false;
        }
        let row = ne[0] as usize;
        let d = row / n_head as usize;
        let sums = self.layers.entry(layer).or_default();
        sums.heads = sums.heads.max(n_head);
        for (t, &pos) in positions.iter().enumerate() {
            let c = &cur[t * row * 4..(t + 1) * row * 4];
            let r = &reference[t * row * 4..(t + 1) * row * 4];
            let mut vals = f32s(c).zip(f32s(r));
            for h in 0..n_head {
                let (mut e2, mut r2) = (0.0f64, 0.0f64);
                for (cv, rv) in vals.by_ref().take(d) {
                    let diff = f64::from(cv) - f64::from(rv);
                    e2 += diff * diff;
                    r2 += f64::from(rv) * f64::from(rv);
                }
                let cell = sums.cells.entry((h, pos)).or_insert((0.0, 0.0));
                cell.0 += e2;
                cell.1 += r2;
            }
        }
        true
    }

    /// The per-layer grids, in layer order.
    pub fn grids(&self) -> Vec<Grid> {
        self.layers
            .iter()
            .map(|(&layer, s)| {
                let positions: Vec<i32> = s
                    .cells
                    .keys()
                    .map(|&(_, p)| p)
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                let nmse = (0..s.heads)
                    .map(|h| {
                        positions
                            .iter()
                            .map(|&p| {
                                let &(e2, r2) = s.cells.get(&(h, p))?;
                                if r2 > 0.0 {
                                    Some(e2 / r2)
                                } else if e2 == 0.0 {
                                    Some(0.0)
                                } else {
                                    None
                                }
                            })
                            .collect()
                    })
                    .collect();
                Grid {
                    layer,
                    heads: s.heads,
                    positions,
                    nmse,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn sums_per_head_and_position_over_steps() {
        let mut b = Breakdown::default();
        // 2 heads of 2 dims, 2 tokens at positions 0 and 1.
        let r = [1.0, 1.0, 2.0, 0.0, 1.0, -1.0, 0.0, 0.0];
        let c = [1.0, 1.0, 2.0, 0.5, 1.0, -1.0, 0.0, 0.25];
        assert!(b.add(3, 2, [4, 2, 1, 1], &[0, 1], &bytes(&c), &bytes(&r)));
        // Position 1 again (a later step recomputing it): sums add up.
        let r2 = [0.0, 0.0, 2.0, 0.0];
        let c2 = [0.0, 0.0, 2.0, 0.0];
        assert!(b.add(3, 2, [4, 1, 1, 1], &[1], &bytes(&c2), &bytes(&r2)));
        let g = b.grids();
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].positions, vec![0, 1]);
        // head 0: pos 0 exact; pos 1: both steps exact.
        assert_eq!(g[0].nmse[0], vec![Some(0.0), Some(0.0)]);
        // head 1: pos 0: 0.25 / 4; pos 1: reference all zero, difference not: undefined.
        assert_eq!(g[0].nmse[1][0], Some(0.25 / 4.0));
        assert_eq!(g[0].nmse[1][1], Some(0.0625 / 4.0));
        // A layout that does not fit is skipped, not misread.
        assert!(!b.add(3, 3, [4, 2, 1, 1], &[0, 1], &bytes(&c), &bytes(&r)));
        assert!(!b.add(3, 2, [4, 2, 1, 1], &[0], &bytes(&c), &bytes(&r)));
        assert_eq!(b.skipped, 2);
    }

    #[test]
    fn an_all_zero_reference_with_a_difference_is_undefined() {
        let mut b = Breakdown::default();
        let r = [0.0, 0.0];
        let c = [0.0, 1.0];
        assert!(b.add(0, 1, [2, 1, 1, 1], &[5], &bytes(&c), &bytes(&r)));
        assert_eq!(b.grids()[0].nmse, vec![vec![None]]);
    }
}
