//! Scalar types: F32, F16, BF16, F64 and the integer types, plus the f16/bf16 conversions
//! every block format uses for its scales.
//!
//! The conversions reproduce ggml's (`ggml-impl.h`) bit for bit:
//! - f16 -> f32 is exact; NaNs come out quiet with their payload kept (what the software
//!   `ggml_compute_fp16_to_fp32` and F16C's `vcvtph2ps` both give on x86);
//! - f32 -> f16 is `ggml_compute_fp32_to_fp16`: round to nearest even, overflow to
//!   infinity, every NaN becomes `sign | 0x7e00`;
//! - f32 -> bf16 is `ggml_compute_fp32_to_bf16`: round to nearest even, NaNs truncated
//!   and forced quiet (`| 0x40`), subnormals kept.

/// IEEE binary16 bits to f32, exactly (ggml's `GGML_FP16_TO_FP32`).
#[inline(always)]
pub fn f16_to_f32(h: u16) -> f32 {
    // Branch-free (so that slices of it vectorize): Maratyszcza's FP16 method, as in
    // ggml. Normal numbers are rebiased by an exact multiply; subnormals come from
    // subtracting 0.5 from a float whose low mantissa bits hold them.
    let h = u32::from(h);
    let sign = (h & 0x8000) << 16;
    let two_w = h << 17; // the f16 shifted to the top of a u32, sign dropped
    let normalized = f32::from_bits((two_w >> 4) + (0xE0 << 23)) * f32::from_bits(0x0780_0000); // 2^-112
    let denormalized = f32::from_bits((two_w >> 17) | (126 << 23)) - 0.5;
    let mut bits = if two_w < (1 << 27) {
        denormalized.to_bits()
    } else {
        normalized.to_bits()
    };
    // NaN: quiet it and keep the payload. The multiply above does exactly that on x86;
    // spelled out so the result does not depend on the platform's NaN propagation.
    if (h & 0x7fff) > 0x7c00 {
        bits = 0x7fc0_0000 | ((h & 0x03ff) << 13);
    }
    f32::from_bits(sign | bits)
}

/// f32 to IEEE binary16 bits the way ggml's `ggml_compute_fp32_to_fp16` does it.
#[inline]
pub fn f32_to_f16(f: f32) -> u16 {
    // (|f| * 2^112) * 2^-110: two separate roundings, as in ggml.
    let mut base = (f.abs() * f32::from_bits(0x7780_0000)) * f32::from_bits(0x0880_0000);

    let w = f.to_bits();
    let shl1_w = w.wrapping_add(w);
    let sign = w & 0x8000_0000;
    let bias = (shl1_w & 0xff00_0000).max(0x7100_0000);

    base += f32::from_bits((bias >> 1) + 0x0780_0000);
    let bits = base.to_bits();
    let exp_bits = (bits >> 13) & 0x0000_7c00;
    let mantissa_bits = bits & 0x0000_0fff;
    let nonsign = exp_bits + mantissa_bits;
    ((sign >> 16)
        | if shl1_w > 0xff00_0000 {
            0x7e00
        } else {
            nonsign
        }) as u16
}

/// bfloat16 bits to f32 (exact).
#[inline(always)]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// f32 to bfloat16 bits the way ggml's `ggml_compute_fp32_to_bf16` does it.
#[inline]
pub fn f32_to_bf16(s: f32) -> u16 {
    let i = s.to_bits();
    if (i & 0x7fff_ffff) > 0x7f80_0000 {
        return ((i >> 16) | 64) as u16; // NaN: force quiet
    }
    (i.wrapping_add(0x7fff + ((i >> 16) & 1)) >> 16) as u16
}

pub(super) fn dequant_f32(src: &[u8], dst: &mut [f32]) {
    for (s, d) in src.chunks_exact(4).zip(dst.iter_mut()) {
        *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
    }
}

pub(super) fn dequant_f16(src: &[u8], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx") && std::arch::is_x86_feature_detected!("f16c")
        {
            // SAFETY: AVX and F16C are available (checked above).
            unsafe { dequant_f16_f16c(src, dst) };
            return;
        }
    }
    dequant_f16_portable(src, dst);
}

/// F16C's `vcvtph2ps`, eight values per instruction: exact like [`f16_to_f32`], and it
/// quiets signalling NaNs keeping the payload, like [`f16_to_f32`] (checked over all
/// 65,536 inputs by `f16c_matches_the_portable_conversion_everywhere`).
///
/// # Safety
/// The CPU must support AVX and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn dequant_f16_f16c(src: &[u8], dst: &mut [f32]) {
    use std::arch::x86_64::{__m128i, _mm256_cvtph_ps, _mm256_storeu_ps, _mm_loadu_si128};
    let n = dst.len().min(src.len() / 2);
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: elements i..i+8 exist in both slices (i + 8 <= n); unaligned load and
        // store; x86-64 is little-endian, so the bytes are the f16 values in order.
        unsafe {
            let h = _mm_loadu_si128(src.as_ptr().add(2 * i).cast::<__m128i>());
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
        }
        i += 8;
    }
    dequant_f16_portable(&src[2 * i..2 * n], &mut dst[i..n]);
}

fn dequant_f16_portable(src: &[u8], dst: &mut [f32]) {
    // Fixed-size groups so the branch-free conversion vectorizes.
    let mut s16 = src.chunks_exact(32);
    let mut d16 = dst.chunks_exact_mut(16);
    for (s, d) in (&mut s16).zip(&mut d16) {
        let mut h = [0u16; 16];
        for (h, b) in h.iter_mut().zip(s.chunks_exact(2)) {
            *h = u16::from_le_bytes([b[0], b[1]]);
        }
        for (d, &h) in d.iter_mut().zip(&h) {
            *d = f16_to_f32(h);
        }
    }
    for (s, d) in s16.remainder().chunks_exact(2).zip(d16.into_remainder()) {
        *d = f16_to_f32(u16::from_le_bytes([s[0], s[1]]));
    }
}

pub(super) fn dequant_bf16(src: &[u8], dst: &mut [f32]) {
    for (s, d) in src.chunks_exact(2).zip(dst.iter_mut()) {
        *d = bf16_to_f32(u16::from_le_bytes([s[0], s[1]]));
    }
}

/// F64 has no `to_float` in ggml; this narrows with Rust's `as` (round to nearest even).
pub(super) fn dequant_f64(src: &[u8], dst: &mut [f32]) {
    for (s, d) in src.chunks_exact(8).zip(dst.iter_mut()) {
        *d = f64::from_le_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]]) as f32;
    }
}

pub(super) fn dequant_i8(src: &[u8], dst: &mut [f32]) {
    for (s, d) in src.iter().zip(dst.iter_mut()) {
        *d = f32::from(*s as i8);
    }
}

pub(super) fn dequant_i16(src: &[u8], dst: &mut [f32]) {
    for (s, d) in src.chunks_exact(2).zip(dst.iter_mut()) {
        *d = f32::from(i16::from_le_bytes([s[0], s[1]]));
    }
}

/// Large magnitudes round to nearest even, as a C `(float)` cast does.
pub(super) fn dequant_i32(src: &[u8], dst: &mut [f32]) {
    for (s, d) in src.chunks_exact(4).zip(dst.iter_mut()) {
        *d = i32::from_le_bytes([s[0], s[1], s[2], s[3]]) as f32;
    }
}

pub(super) fn dequant_i64(src: &[u8], dst: &mut [f32]) {
    for (s, d) in src.chunks_exact(8).zip(dst.iter_mut()) {
        *d = i64::from_le_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]]) as f32;
    }
}

pub(super) fn quant_f32(src: &[f32], dst: &mut [u8]) {
    for (s, d) in src.iter().zip(dst.chunks_exact_mut(4)) {
        d.copy_from_slice(&s.to_le_bytes());
    }
}

pub(super) fn quant_f16(src: &[f32], dst: &mut [u8]) {
    for (s, d) in src.iter().zip(dst.chunks_exact_mut(2)) {
        d.copy_from_slice(&f32_to_f16(*s).to_le_bytes());
    }
}

pub(super) fn quant_bf16(src: &[f32], dst: &mut [u8]) {
    for (s, d) in src.iter().zip(dst.chunks_exact_mut(2)) {
        d.copy_from_slice(&f32_to_bf16(*s).to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every f16 bit pattern, at every alignment and with ragged tails, through the
    /// dispatched conversion (F16C where the CPU has it): the same bits as the portable
    /// `f16_to_f32`, signalling NaNs included.
    #[test]
    fn f16c_matches_the_portable_conversion_everywhere() {
        let all: Vec<u8> = (0..=u16::MAX).flat_map(u16::to_le_bytes).collect();
        for offset in [0usize, 1, 3] {
            let mut bytes = vec![0u8; offset];
            bytes.extend_from_slice(&all);
            let src = &bytes[offset..];
            for n in [65_536usize, 65_531, 13, 8, 7, 0] {
                let mut dst = vec![0f32; n];
                dequant_f16(&src[..2 * n], &mut dst);
                for (i, d) in dst.iter().enumerate() {
                    let want = f16_to_f32(i as u16);
                    assert_eq!(
                        d.to_bits(),
                        want.to_bits(),
                        "f16 {i:#06x}, offset {offset}, n {n}"
                    );
                }
            }
        }
    }
}
