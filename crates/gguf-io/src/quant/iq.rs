//! The non-linear 4-bit i-quants IQ4_NL (32 elements) and IQ4_XS (256 elements), which
//! map each nibble through a fixed 16-entry table instead of a codebook grid.

use super::{f16_at, for_each_block};

/// `kvalues_iq4nl` from ggml-common.h.
const KVALUES_IQ4NL: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// `d * kvalue` for all 16 codes: the very products ggml computes per element, just
/// computed once per scale.
#[inline(always)]
fn scaled_lut(d: f32) -> [f32; 16] {
    let mut lut = [0.0f32; 16];
    for (l, &k) in lut.iter_mut().zip(&KVALUES_IQ4NL) {
        *l = d * f32::from(k);
    }
    lut
}

/// IQ4_NL: `d: f16, qs: [u8; 16]`; `x = d * kvalues[nibble]`.
pub(super) fn dequant_iq4_nl(src: &[u8], dst: &mut [f32]) {
    for_each_block::<18, 32>(src, dst, |b, y| {
        let lut = scaled_lut(f16_at(b, 0));
        let (lo, hi) = y.split_at_mut(16);
        for ((l, h), &q) in lo.iter_mut().zip(hi.iter_mut()).zip(&b[2..]) {
            *l = lut[usize::from(q & 0x0f)];
            *h = lut[usize::from(q >> 4)];
        }
    });
}

/// IQ4_XS: `d: f16, scales_h: u16, scales_l: [u8; 4], qs: [u8; 128]`; eight 32-element
/// sub-blocks with 6-bit scales `ls`, `x = (d * (ls - 32)) * kvalues[nibble]`.
pub(super) fn dequant_iq4_xs(src: &[u8], dst: &mut [f32]) {
    for_each_block::<136, 256>(src, dst, |b, y| {
        let d = f16_at(b, 0);
        let scales_h = u16::from_le_bytes([b[2], b[3]]);
        let scales_l = [b[4], b[5], b[6], b[7]];
        for (ib, (qs, out)) in b[8..]
            .chunks_exact(16)
            .zip(y.chunks_exact_mut(32))
            .enumerate()
        {
            let low = (scales_l[ib / 2] >> (4 * (ib % 2))) & 0x0f;
            let high = ((scales_h >> (2 * ib)) & 3) as u8;
            let ls = i32::from(low | (high << 4));
            let lut = scaled_lut(d * (ls - 32) as f32);
            let (lo, hi) = out.split_at_mut(16);
            for ((l, h), &q) in lo.iter_mut().zip(hi.iter_mut()).zip(qs) {
                *l = lut[usize::from(q & 0x0f)];
                *h = lut[usize::from(q >> 4)];
            }
        }
    });
}
