//! The 32-element "legacy" formats Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, and the newer
//! sign/2-bit formats Q1_0 (128 elements) and Q2_0 (64 elements), all with one f16 scale.
//!
//! Arithmetic follows `dequantize_row_*` / `quantize_row_*_ref` in ggml-quants.c: an int
//! quant converted to f32 and multiplied by the f32 scale (then `+ m` for the `_1` types).

use super::{f16_at, f32_to_f16, for_each_block, for_each_block_mut};

/// Q4_0: `d: f16, qs: [u8; 16]`; element j is low nibble of `qs[j]`, j+16 the high one.
pub(super) fn dequant_q4_0(src: &[u8], dst: &mut [f32]) {
    for_each_block::<18, 32>(src, dst, |b, y| {
        let d = f16_at(b, 0);
        for j in 0..16 {
            let q = b[2 + j];
            y[j] = (i32::from(q & 0x0f) - 8) as f32 * d;
            y[j + 16] = (i32::from(q >> 4) - 8) as f32 * d;
        }
    });
}

/// Q4_1: `d: f16, m: f16, qs: [u8; 16]`; `x = q*d + m`.
pub(super) fn dequant_q4_1(src: &[u8], dst: &mut [f32]) {
    for_each_block::<20, 32>(src, dst, |b, y| {
        let d = f16_at(b, 0);
        let m = f16_at(b, 2);
        for j in 0..16 {
            let q = b[4 + j];
            y[j] = f32::from(q & 0x0f) * d + m;
            y[j + 16] = f32::from(q >> 4) * d + m;
        }
    });
}

/// Q5_0: `d: f16, qh: u32 (5th bits), qs: [u8; 16]`.
pub(super) fn dequant_q5_0(src: &[u8], dst: &mut [f32]) {
    for_each_block::<22, 32>(src, dst, |b, y| {
        let d = f16_at(b, 0);
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        for j in 0..16 {
            let q = u32::from(b[6 + j]);
            let xh0 = ((qh >> j) << 4) & 0x10;
            let xh1 = (qh >> (j + 12)) & 0x10;
            y[j] = (((q & 0x0f) | xh0) as i32 - 16) as f32 * d;
            y[j + 16] = (((q >> 4) | xh1) as i32 - 16) as f32 * d;
        }
    });
}

/// Q5_1: `d: f16, m: f16, qh: u32, qs: [u8; 16]`; `x = q*d + m`.
pub(super) fn dequant_q5_1(src: &[u8], dst: &mut [f32]) {
    for_each_block::<24, 32>(src, dst, |b, y| {
        let d = f16_at(b, 0);
        let m = f16_at(b, 2);
        let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        for j in 0..16 {
            let q = u32::from(b[8 + j]);
            let xh0 = ((qh >> j) << 4) & 0x10;
            let xh1 = (qh >> (j + 12)) & 0x10;
            y[j] = ((q & 0x0f) | xh0) as f32 * d + m;
            y[j + 16] = ((q >> 4) | xh1) as f32 * d + m;
        }
    });
}

/// Q8_0: `d: f16, qs: [i8; 32]`.
pub(super) fn dequant_q8_0(src: &[u8], dst: &mut [f32]) {
    for_each_block::<34, 32>(src, dst, |b, y| {
        let d = f16_at(b, 0);
        for j in 0..32 {
            y[j] = f32::from(b[2 + j] as i8) * d;
        }
    });
}

/// Q8_1: `d: f16, s: f16 (= d * sum(qs), unused here), qs: [i8; 32]`. ggml has no
/// `to_float` for it (it only exists as a dot-product operand); this is `q * d`.
pub(super) fn dequant_q8_1(src: &[u8], dst: &mut [f32]) {
    for_each_block::<36, 32>(src, dst, |b, y| {
        let d = f16_at(b, 0);
        for j in 0..32 {
            y[j] = f32::from(b[4 + j] as i8) * d;
        }
    });
}

/// Q1_0: `d: f16, qs: [u8; 16]`; bit j (LSB first) set gives `d`, clear gives `-d`.
pub(super) fn dequant_q1_0(src: &[u8], dst: &mut [f32]) {
    for_each_block::<18, 128>(src, dst, |b, y| {
        let d = f16_at(b, 0);
        let neg_d = -d;
        for (byte, out) in b[2..].iter().zip(y.chunks_exact_mut(8)) {
            for (bit, v) in out.iter_mut().enumerate() {
                *v = if (byte >> bit) & 1 != 0 { d } else { neg_d };
            }
        }
    });
}

/// Q2_0: `d: f16, qs: [u8; 16]`; element j is bits `2*(j%4)..` of `qs[j/4]`, value
/// `(q - 1) * d` (q in 0..=3 means -1, 0, +1, +2).
pub(super) fn dequant_q2_0(src: &[u8], dst: &mut [f32]) {
    for_each_block::<18, 64>(src, dst, |b, y| {
        let d = f16_at(b, 0);
        for (byte, out) in b[2..].iter().zip(y.chunks_exact_mut(4)) {
            for (k, v) in out.iter_mut().enumerate() {
                let q = (byte >> (2 * k)) & 3;
                *v = (i32::from(q) - 1) as f32 * d;
            }
        }
    });
}

/// A C `(int8_t)` cast of a float as x86-64 compilers emit it: truncate to int32 with
/// `cvttss2si` (NaN and out-of-range give `INT32_MIN`), keep the low byte. It only
/// differs from Rust's saturating `as i8` for values outside the int8 range, which the
/// reference quantizers produce when a block's scale is so small that `1/d` overflows
/// (e.g. a block of subnormals): ggml then writes 0, not 127.
#[inline(always)]
fn c_f32_to_i8(v: f32) -> i8 {
    let i = if v.is_nan() || !(-2_147_483_648.0..2_147_483_648.0).contains(&v) {
        i32::MIN
    } else {
        v as i32
    };
    i as i8
}

/// Largest `|x|` the way ggml's `MAX(amax, fabsf(v))` macro computes it (a NaN is kept
/// only until the next element replaces it, exactly as the C ternary behaves).
#[inline(always)]
fn c_max_abs(amax: f32, v: f32) -> f32 {
    let a = v.abs();
    if amax > a {
        amax
    } else {
        a
    }
}

/// `quantize_row_q8_0_ref`: `d = amax / 127`, `q = roundf(x / d)`.
pub(super) fn quant_q8_0(src: &[f32], dst: &mut [u8]) {
    for_each_block_mut::<32, 34>(src, dst, |x, b| {
        let amax = x.iter().fold(0.0f32, |m, &v| c_max_abs(m, v));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        b[..2].copy_from_slice(&f32_to_f16(d).to_le_bytes());
        for (q, &v) in b[2..].iter_mut().zip(x.iter()) {
            // `roundf` rounds half away from zero, like `f32::round`.
            *q = c_f32_to_i8((v * id).round()) as u8;
        }
    });
}

/// `quantize_row_q4_0_ref`: `d = max / -8` where `max` is the first element of largest
/// magnitude (sign kept), `q = min(15, (int8_t)(x / d + 8.5))`.
pub(super) fn quant_q4_0(src: &[f32], dst: &mut [u8]) {
    for_each_block_mut::<32, 18>(src, dst, |x, b| {
        let mut amax = 0.0f32;
        let mut max = 0.0f32;
        for &v in x {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        b[..2].copy_from_slice(&f32_to_f16(d).to_le_bytes());
        for j in 0..16 {
            let x0 = x[j] * id;
            let x1 = x[j + 16] * id;
            let xi0 = c_f32_to_i8(x0 + 8.5).min(15) as u8;
            let xi1 = c_f32_to_i8(x1 + 8.5).min(15) as u8;
            b[2 + j] = xi0 | (xi1 << 4);
        }
    });
}
