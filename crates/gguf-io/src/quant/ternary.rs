//! Ternary formats TQ1_0 (base-3 packed, 1.6875 bpw) and TQ2_0 (2 bits per element),
//! both 256-element blocks whose elements are `(t - 1) * d` for t in 0..=2.

use super::{f16_at, for_each_block};

/// The trit in the top "digit" of `q` (a byte holding a fixed-point base-3 fraction):
/// `((q as u16) * 3) >> 8`, after multiplying `q` by `3^n` mod 256 to bring digit n up.
#[inline(always)]
fn trit(q: u8, pow3: u8) -> f32 {
    let q = q.wrapping_mul(pow3);
    let xi = (u16::from(q) * 3) >> 8;
    (i16::from(xi as u8) - 1) as f32
}

const POW3: [u8; 5] = [1, 3, 9, 27, 81];

/// TQ1_0: `qs: [u8; 48] (5 trits each), qh: [u8; 4] (4 trits each), d: f16`. The first
/// 32 bytes give 5 x 32 elements, the next 16 give 5 x 16, qh gives 4 x 4.
pub(super) fn dequant_tq1_0(src: &[u8], dst: &mut [f32]) {
    for_each_block::<54, 256>(src, dst, |b, y| {
        let d = f16_at(b, 52);
        let (y0, rest) = y.split_at_mut(160);
        let (y1, y2) = rest.split_at_mut(80);
        for (&p, out) in POW3.iter().zip(y0.chunks_exact_mut(32)) {
            for (v, &q) in out.iter_mut().zip(&b[0..32]) {
                *v = trit(q, p) * d;
            }
        }
        for (&p, out) in POW3.iter().zip(y1.chunks_exact_mut(16)) {
            for (v, &q) in out.iter_mut().zip(&b[32..48]) {
                *v = trit(q, p) * d;
            }
        }
        for (&p, out) in POW3.iter().zip(y2.chunks_exact_mut(4)) {
            for (v, &q) in out.iter_mut().zip(&b[48..52]) {
                *v = trit(q, p) * d;
            }
        }
    });
}

/// TQ2_0: `qs: [u8; 64], d: f16`; for each 32-byte half, 4 rows of 32 elements taken
/// from bits `2l..2l+2`, value `(q - 1) * d`.
pub(super) fn dequant_tq2_0(src: &[u8], dst: &mut [f32]) {
    for_each_block::<66, 256>(src, dst, |b, y| {
        let d = f16_at(b, 64);
        for (qs, out) in b[..64].chunks_exact(32).zip(y.chunks_exact_mut(128)) {
            for (l, row) in out.chunks_exact_mut(32).enumerate() {
                for (v, &q) in row.iter_mut().zip(qs) {
                    let t = (q >> (2 * l)) & 3;
                    *v = (i16::from(t) - 1) as f32 * d;
                }
            }
        }
    });
}
