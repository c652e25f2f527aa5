//! Cutting `0..n` into pieces for scoped threads, on block boundaries so that each
//! piece's accumulator sees whole blocks and the merged result has the serial bits.

use std::ops::Range;

/// `0..n` as at most `parts` consecutive ranges, each but the last a multiple of
/// `align` elements long (at least one block). Empty when `n` is 0.
pub fn split_ranges(n: u64, parts: usize, align: u64) -> impl Iterator<Item = Range<u64>> {
    let align = align.max(1);
    let per = n.div_ceil(parts.max(1) as u64).div_ceil(align).max(1) * align;
    (0..n.div_ceil(per)).map(move |i| i * per..((i + 1) * per).min(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every case against the definition: consecutive, covering, aligned, bounded count.
    #[test]
    fn ranges_cover_exactly_on_block_boundaries() {
        for n in [0u64, 1, 31, 32, 33, 1000, 65_536, 100_003] {
            for parts in [0usize, 1, 2, 3, 7, 64] {
                for align in [0u64, 1, 32, 256, 16_384] {
                    let r: Vec<_> = split_ranges(n, parts, align).collect();
                    assert!(r.len() <= parts.max(1), "{n} {parts} {align}: {r:?}");
                    let mut at = 0;
                    for (i, x) in r.iter().enumerate() {
                        assert_eq!(x.start, at);
                        assert!(x.end > x.start);
                        if i + 1 < r.len() {
                            assert_eq!((x.end - x.start) % align.max(1), 0);
                        }
                        at = x.end;
                    }
                    assert_eq!(at, n, "{n} {parts} {align}: {r:?}");
                }
            }
        }
        assert_eq!(
            split_ranges(100, 3, 32).collect::<Vec<_>>(),
            [0..64, 64..100]
        );
    }
}
