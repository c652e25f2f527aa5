//! K-quants: 256-element super-blocks Q2_K, Q3_K, Q4_K, Q5_K, Q6_K and Q8_K.
//!
//! Each follows its `dequantize_row_*` in ggml-quants.c, including the order of the f32
//! operations: sub-block scale first (`dl = d * sc`), then `dl * q - ml`; for Q6_K
//! `(d * sc) * q`.

use super::{f16_at, for_each_block};

/// Q2_K: `scales: [u8; 16] (4-bit scale | 4-bit min), qs: [u8; 64], d: f16, dmin: f16`.
/// Output row k (0..8, 32 values) takes bits `2*(k%4)` of the 32 bytes `qs[32*(k/4)..]`;
/// its first 16 values use `scales[2k]`, the last 16 `scales[2k+1]`.
pub(super) fn dequant_q2_k(src: &[u8], dst: &mut [f32]) {
    for_each_block::<84, 256>(src, dst, |b, y| {
        let d = f16_at(b, 80);
        let min = f16_at(b, 82);
        for (k, row) in y.chunks_exact_mut(32).enumerate() {
            let q = &b[16 + 32 * (k / 4)..16 + 32 * (k / 4) + 32];
            let shift = 2 * (k % 4);
            for (half, (out, q)) in row.chunks_exact_mut(16).zip(q.chunks_exact(16)).enumerate() {
                let sc = b[2 * k + half];
                let dl = d * f32::from(sc & 0x0f);
                let ml = min * f32::from(sc >> 4);
                for (v, &qq) in out.iter_mut().zip(q) {
                    *v = dl * f32::from((qq >> shift) & 3) - ml;
                }
            }
        }
    });
}

/// Q3_K: `hmask: [u8; 32], qs: [u8; 64], scales: [u8; 12] (16 x 6 bits), d: f16`.
pub(super) fn dequant_q3_k(src: &[u8], dst: &mut [f32]) {
    const KMASK1: u32 = 0x0303_0303;
    const KMASK2: u32 = 0x0f0f_0f0f;
    for_each_block::<110, 256>(src, dst, |b, y| {
        let d_all = f16_at(b, 108);
        let a0 = u32::from_le_bytes([b[96], b[97], b[98], b[99]]);
        let a1 = u32::from_le_bytes([b[100], b[101], b[102], b[103]]);
        let tmp = u32::from_le_bytes([b[104], b[105], b[106], b[107]]);
        let aux = [
            (a0 & KMASK2) | ((tmp & KMASK1) << 4),
            (a1 & KMASK2) | (((tmp >> 2) & KMASK1) << 4),
            ((a0 >> 4) & KMASK2) | (((tmp >> 4) & KMASK1) << 4),
            ((a1 >> 4) & KMASK2) | (((tmp >> 6) & KMASK1) << 4),
        ];
        let mut scales = [0i8; 16];
        for (s, a) in scales.chunks_exact_mut(4).zip(aux) {
            for (s, byte) in s.iter_mut().zip(a.to_le_bytes()) {
                *s = byte as i8;
            }
        }
        let hm = &b[0..32];
        let mut m = 1u8;
        let mut is = 0;
        let mut yo = 0;
        for n in 0..2 {
            let q = &b[32 + 32 * n..32 + 32 * n + 32];
            for shift in [0u32, 2, 4, 6] {
                for half in 0..2 {
                    let dl = d_all * f32::from(i16::from(scales[is]) - 32);
                    is += 1;
                    let qs = &q[16 * half..16 * half + 16];
                    let hs = &hm[16 * half..16 * half + 16];
                    let out = &mut y[yo..yo + 16];
                    for ((v, &qq), &h) in out.iter_mut().zip(qs).zip(hs) {
                        let low = ((qq >> shift) & 3) as i8;
                        let sub = if h & m != 0 { 0 } else { 4 };
                        *v = dl * f32::from(low - sub);
                    }
                    yo += 16;
                }
                m = m.wrapping_shl(1);
            }
        }
    });
}

/// The 6-bit scale and min of sub-block `j` (0..8) from the 12 packed bytes of Q4_K/Q5_K
/// (`get_scale_min_k4`).
#[inline(always)]
fn scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

#[inline(always)]
fn k4_scales<const N: usize>(b: &[u8; N]) -> [u8; 12] {
    let mut s = [0u8; 12];
    s.copy_from_slice(&b[4..16]);
    s
}

/// Q4_K: `d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128]`.
pub(super) fn dequant_q4_k(src: &[u8], dst: &mut [f32]) {
    for_each_block::<144, 256>(src, dst, |b, y| {
        let d = f16_at(b, 0);
        let min = f16_at(b, 2);
        let scales = k4_scales(b);
        for (j, (q, out)) in b[16..]
            .chunks_exact(32)
            .zip(y.chunks_exact_mut(64))
            .enumerate()
        {
            let (sc, m) = scale_min_k4(2 * j, &scales);
            let d1 = d * f32::from(sc);
            let m1 = min * f32::from(m);
            let (sc, m) = scale_min_k4(2 * j + 1, &scales);
            let d2 = d * f32::from(sc);
            let m2 = min * f32::from(m);
            let (lo, hi) = out.split_at_mut(32);
            for ((l, h), &qq) in lo.iter_mut().zip(hi.iter_mut()).zip(q) {
                *l = d1 * f32::from(qq & 0x0f) - m1;
                *h = d2 * f32::from(qq >> 4) - m2;
            }
        }
    });
}

/// Q5_K: `d: f16, dmin: f16, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128]`.
pub(super) fn dequant_q5_k(src: &[u8], dst: &mut [f32]) {
    for_each_block::<176, 256>(src, dst, |b, y| {
        let d = f16_at(b, 0);
        let min = f16_at(b, 2);
        let scales = k4_scales(b);
        let qh = &b[16..48];
        for (j, (ql, out)) in b[48..]
            .chunks_exact(32)
            .zip(y.chunks_exact_mut(64))
            .enumerate()
        {
            let (sc, m) = scale_min_k4(2 * j, &scales);
            let d1 = d * f32::from(sc);
            let m1 = min * f32::from(m);
            let (sc, m) = scale_min_k4(2 * j + 1, &scales);
            let d2 = d * f32::from(sc);
            let m2 = min * f32::from(m);
            let u1 = 1u8 << (2 * j);
            let u2 = 2u8 << (2 * j);
            let (lo, hi) = out.split_at_mut(32);
            for (((l, h), &q), &qhb) in lo.iter_mut().zip(hi.iter_mut()).zip(ql).zip(qh) {
                let b1 = if qhb & u1 != 0 { 16 } else { 0 };
                let b2 = if qhb & u2 != 0 { 16 } else { 0 };
                *l = d1 * f32::from((q & 0x0f) + b1) - m1;
                *h = d2 * f32::from((q >> 4) + b2) - m2;
            }
        }
    });
}

/// Q6_K: `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`.
pub(super) fn dequant_q6_k(src: &[u8], dst: &mut [f32]) {
    for_each_block::<210, 256>(src, dst, |b, y| {
        let d = f16_at(b, 208);
        for n in 0..2 {
            let ql = &b[64 * n..64 * n + 64];
            let qh = &b[128 + 32 * n..128 + 32 * n + 32];
            let sc = &b[192 + 8 * n..192 + 8 * n + 8];
            let out = &mut y[128 * n..128 * n + 128];
            // Four rows of 32 outputs; row r uses scales sc[2r] (l < 16) and sc[2r+1].
            let (o0, rest) = out.split_at_mut(32);
            let (o1, rest) = rest.split_at_mut(32);
            let (o2, o3) = rest.split_at_mut(32);
            for half in 0..2 {
                let r = 16 * half..16 * half + 16;
                let s = |k: usize| d * f32::from(sc[k + half] as i8);
                let (d0, d1, d2, d3) = (s(0), s(2), s(4), s(6));
                let it = o0[r.clone()]
                    .iter_mut()
                    .zip(o1[r.clone()].iter_mut())
                    .zip(o2[r.clone()].iter_mut())
                    .zip(o3[r.clone()].iter_mut())
                    .zip(&ql[r.clone()])
                    .zip(&ql[32 + r.start..32 + r.end])
                    .zip(&qh[r]);
                for ((((((y0, y1), y2), y3), &la), &lb), &h) in it {
                    let q1 = ((la & 0x0f) | ((h & 3) << 4)) as i8 - 32;
                    let q2 = ((lb & 0x0f) | (((h >> 2) & 3) << 4)) as i8 - 32;
                    let q3 = ((la >> 4) | (((h >> 4) & 3) << 4)) as i8 - 32;
                    let q4 = ((lb >> 4) | (((h >> 6) & 3) << 4)) as i8 - 32;
                    *y0 = d0 * f32::from(q1);
                    *y1 = d1 * f32::from(q2);
                    *y2 = d2 * f32::from(q3);
                    *y3 = d3 * f32::from(q4);
                }
            }
        }
    });
}

/// Q8_K: `d: f32, qs: [i8; 256], bsums: [i16; 16] (unused here)`.
pub(super) fn dequant_q8_k(src: &[u8], dst: &mut [f32]) {
    for_each_block::<292, 256>(src, dst, |b, y| {
        let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        for (v, &q) in y.iter_mut().zip(&b[4..260]) {
            *v = d * f32::from(q as i8);
        }
    });
}
