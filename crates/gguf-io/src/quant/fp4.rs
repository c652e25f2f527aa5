//! 4-bit float formats: MXFP4 (32 E2M1 values sharing an E8M0 scale) and NVFP4 (64
//! values, one UE4M3 scale per 16). Values come from `kvalues_fp4`, the E2M1 numbers
//! doubled, so the scales are halved to match (`ggml_e8m0_to_fp32_half`, and
//! `ggml_ue4m3_to_fp32` includes the 0.5).

use super::for_each_block;

/// `kvalues_fp4` from ggml-common.h (twice the E2M1 values).
const KVALUES_FP4: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// `kvalue * d` for all 16 codes: the very products ggml computes per element
/// (`x0*d`), just computed once per scale.
#[inline(always)]
fn scaled_lut(d: f32) -> [f32; 16] {
    let mut lut = [0.0f32; 16];
    for (l, &k) in lut.iter_mut().zip(&KVALUES_FP4) {
        *l = f32::from(k) * d;
    }
    lut
}

/// Half of the E8M0 value `2^(e-127)`, i.e. `2^(e-128)`, built from bits as ggml does
/// (`e < 2` gives the subnormals 2^-128 and 2^-127; `e = 255` is 2^127, not NaN).
#[inline(always)]
fn e8m0_to_f32_half(e: u8) -> f32 {
    let bits = if e < 2 {
        0x0020_0000u32 << e
    } else {
        u32::from(e - 1) << 23
    };
    f32::from_bits(bits)
}

/// `ggml_ue4m3_to_fp32`: unsigned E4M3 (bias 7, bit 7 ignored) times 0.5; `0` and `0x7f`
/// decode to 0. Every step is exact in f32.
#[inline]
fn ue4m3_to_f32(x: u8) -> f32 {
    if x == 0 || x == 0x7f {
        return 0.0;
    }
    let exp = i32::from((x >> 3) & 0x0f);
    let man = f32::from(x & 0x07);
    let raw = if exp == 0 {
        man * f32::from_bits(0x3b00_0000) // 2^-9
    } else {
        // 2^(exp-7) for exp in 1..=15 is a normal f32: build it from its exponent bits.
        (1.0 + man / 8.0) * f32::from_bits(((exp - 7 + 127) as u32) << 23)
    };
    raw * 0.5
}

/// MXFP4: `e: u8 (E8M0), qs: [u8; 16]`; element j is the low nibble of `qs[j]`, j+16 the
/// high one; `x = kvalue * d`.
pub(super) fn dequant_mxfp4(src: &[u8], dst: &mut [f32]) {
    for_each_block::<17, 32>(src, dst, |b, y| {
        let lut = scaled_lut(e8m0_to_f32_half(b[0]));
        let (lo, hi) = y.split_at_mut(16);
        for ((l, h), &q) in lo.iter_mut().zip(hi.iter_mut()).zip(&b[1..]) {
            *l = lut[usize::from(q & 0x0f)];
            *h = lut[usize::from(q >> 4)];
        }
    });
}

/// NVFP4: `d: [u8; 4] (UE4M3, one per 16 elements), qs: [u8; 32]`; within each
/// 16-element sub-block, element j is the low nibble of byte j, j+8 the high one.
pub(super) fn dequant_nvfp4(src: &[u8], dst: &mut [f32]) {
    for_each_block::<36, 64>(src, dst, |b, y| {
        for ((&sc, qs), out) in b[..4]
            .iter()
            .zip(b[4..].chunks_exact(8))
            .zip(y.chunks_exact_mut(16))
        {
            let lut = scaled_lut(ue4m3_to_f32(sc));
            let (lo, hi) = out.split_at_mut(8);
            for ((l, h), &q) in lo.iter_mut().zip(hi.iter_mut()).zip(qs) {
                *l = lut[usize::from(q & 0x0f)];
                *h = lut[usize::from(q >> 4)];
            }
        }
    });
}
