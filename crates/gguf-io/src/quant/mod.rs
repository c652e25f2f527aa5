//! Dequantization (every ggml type that does not need a codebook grid) and reference
//! quantization for F32, F16, BF16, Q8_0 and Q4_0, in pure safe Rust.
//!
//! Every dequantizer follows the arithmetic of ggml's C reference implementation
//! (`dequantize_row_*` in `ggml-quants.c`, `ggml_fp16_to_fp32_row`, ...) operation by
//! operation in `f32`, so its output is bit-identical to ggml's `to_float`. The quantizers
//! follow `quantize_row_q8_0_ref`, `quantize_row_q4_0_ref`, `ggml_compute_fp32_to_fp16`
//! and `ggml_compute_fp32_to_bf16` the same way.
//!
//! The grid-based i-quants (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S) are
//! reported as [`QuantError::Unsupported`].
//!
//! Nothing here panics on any input: sizes are checked up front and reported as
//! [`QuantError`]s, and the block loops only ever see whole blocks.

mod float;
mod fp4;
mod iq;
mod kquants;
mod legacy;
mod ternary;

use crate::types::GgmlType;

pub use float::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16};

/// Why a (de)quantization request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantError {
    /// A known, current ggml type this module cannot (de)quantize (the grid-based
    /// i-quants for dequantization; everything but F32/F16/BF16/Q8_0/Q4_0 for quantization).
    #[error("ggml type {ty} is not supported by this (de)quantizer")]
    Unsupported { ty: GgmlType },
    /// A type id ggml never assigned (`retired == false`) or has since removed
    /// (`retired == true`, e.g. Q4_2 or the Q4_0_4_4 repack types).
    #[error("{} ggml type id {id}", if *.retired { "retired" } else { "unknown" })]
    UnknownType { id: u32, retired: bool },
    /// The element count is not a multiple of the type's block size.
    #[error("{n_elements} elements of {ty} are not a whole number of {block_size}-element blocks")]
    NotWholeBlocks {
        ty: GgmlType,
        n_elements: u64,
        block_size: u32,
    },
    /// The byte buffer does not hold exactly `n_elements` elements of `ty`.
    /// `expected_bytes` saturates at `u64::MAX` if the true size overflows.
    #[error("{n_elements} elements of {ty} take {expected_bytes} bytes, got {actual_bytes}")]
    LengthMismatch {
        ty: GgmlType,
        n_elements: u64,
        expected_bytes: u64,
        actual_bytes: u64,
    },
}

/// The grid-based i-quants, which this module deliberately does not dequantize (their
/// lookup grids are ggml's; the tools route them through ggml instead).
pub const GRID_TYPES: [GgmlType; 7] = [
    GgmlType::IQ1_S,
    GgmlType::IQ1_M,
    GgmlType::IQ2_XXS,
    GgmlType::IQ2_XS,
    GgmlType::IQ2_S,
    GgmlType::IQ3_XXS,
    GgmlType::IQ3_S,
];

/// `true` if [`dequantize`] handles `ty` (known, not retired, not a grid i-quant).
pub fn can_dequantize(ty: GgmlType) -> bool {
    dequantizer(ty).is_some()
}

/// `true` if [`quantize`] handles `ty` (F32, F16, BF16, Q8_0, Q4_0).
pub fn can_quantize(ty: GgmlType) -> bool {
    quantizer(ty).is_some()
}

/// Dequantize `src` (the raw bytes of `dst.len()` elements of type `ty`) into `dst`.
///
/// `dst.len()` must be a multiple of the block size and `src.len()` must be exactly
/// `ty.bytes_for(dst.len())`.
pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), QuantError> {
    let f = check_type(ty, dequantizer(ty))?;
    check_sizes(ty, dst.len() as u64, src.len() as u64)?;
    f(src, dst);
    Ok(())
}

/// Like [`dequantize`], into a new vector of `n_elements` values. Sizes are checked
/// before anything is allocated.
pub fn dequantize_to_vec(
    ty: GgmlType,
    src: &[u8],
    n_elements: usize,
) -> Result<Vec<f32>, QuantError> {
    let f = check_type(ty, dequantizer(ty))?;
    check_sizes(ty, n_elements as u64, src.len() as u64)?;
    let mut out = vec![0.0f32; n_elements];
    f(src, &mut out);
    Ok(out)
}

/// Quantize `src` to `ty` the way ggml's reference code does (`quantize_row_q8_0_ref`,
/// `quantize_row_q4_0_ref`, `ggml_fp32_to_fp16_row`, `ggml_fp32_to_bf16_row_ref`).
/// Supported: F32, F16, BF16, Q8_0, Q4_0; `src.len()` must be a whole number of blocks.
pub fn quantize(ty: GgmlType, src: &[f32]) -> Result<Vec<u8>, QuantError> {
    let f = check_type(ty, quantizer(ty))?;
    let n = src.len() as u64;
    let expected = expected_bytes(ty, n)?;
    let mut out = vec![0u8; usize::try_from(expected).unwrap_or(usize::MAX)];
    if out.len() as u64 != expected {
        // Unreachable in practice: no type takes more bytes than 4 per f32 it came from.
        return Err(QuantError::LengthMismatch {
            ty,
            n_elements: n,
            expected_bytes: expected,
            actual_bytes: out.len() as u64,
        });
    }
    f(src, &mut out);
    Ok(out)
}

type DequantFn = fn(&[u8], &mut [f32]);
type QuantFn = fn(&[f32], &mut [u8]);

fn dequantizer(ty: GgmlType) -> Option<DequantFn> {
    let f: DequantFn = match ty {
        GgmlType::F32 => float::dequant_f32,
        GgmlType::F16 => float::dequant_f16,
        GgmlType::BF16 => float::dequant_bf16,
        GgmlType::F64 => float::dequant_f64,
        GgmlType::I8 => float::dequant_i8,
        GgmlType::I16 => float::dequant_i16,
        GgmlType::I32 => float::dequant_i32,
        GgmlType::I64 => float::dequant_i64,
        GgmlType::Q4_0 => legacy::dequant_q4_0,
        GgmlType::Q4_1 => legacy::dequant_q4_1,
        GgmlType::Q5_0 => legacy::dequant_q5_0,
        GgmlType::Q5_1 => legacy::dequant_q5_1,
        GgmlType::Q8_0 => legacy::dequant_q8_0,
        GgmlType::Q8_1 => legacy::dequant_q8_1,
        GgmlType::Q1_0 => legacy::dequant_q1_0,
        GgmlType::Q2_0 => legacy::dequant_q2_0,
        GgmlType::Q2_K => kquants::dequant_q2_k,
        GgmlType::Q3_K => kquants::dequant_q3_k,
        GgmlType::Q4_K => kquants::dequant_q4_k,
        GgmlType::Q5_K => kquants::dequant_q5_k,
        GgmlType::Q6_K => kquants::dequant_q6_k,
        GgmlType::Q8_K => kquants::dequant_q8_k,
        GgmlType::IQ4_NL => iq::dequant_iq4_nl,
        GgmlType::IQ4_XS => iq::dequant_iq4_xs,
        GgmlType::TQ1_0 => ternary::dequant_tq1_0,
        GgmlType::TQ2_0 => ternary::dequant_tq2_0,
        GgmlType::MXFP4 => fp4::dequant_mxfp4,
        GgmlType::NVFP4 => fp4::dequant_nvfp4,
        _ => return None,
    };
    Some(f)
}

fn quantizer(ty: GgmlType) -> Option<QuantFn> {
    let f: QuantFn = match ty {
        GgmlType::F32 => float::quant_f32,
        GgmlType::F16 => float::quant_f16,
        GgmlType::BF16 => float::quant_bf16,
        GgmlType::Q8_0 => legacy::quant_q8_0,
        GgmlType::Q4_0 => legacy::quant_q4_0,
        _ => return None,
    };
    Some(f)
}

fn check_type<F>(ty: GgmlType, f: Option<F>) -> Result<F, QuantError> {
    match ty.info() {
        None => Err(QuantError::UnknownType {
            id: ty.0,
            retired: false,
        }),
        Some(i) if i.retired => Err(QuantError::UnknownType {
            id: ty.0,
            retired: true,
        }),
        Some(_) => f.ok_or(QuantError::Unsupported { ty }),
    }
}

/// Bytes that `n` elements of a known, current `ty` take.
fn expected_bytes(ty: GgmlType, n: u64) -> Result<u64, QuantError> {
    let info = match ty.info() {
        Some(i) if !i.retired => i,
        Some(_) => {
            return Err(QuantError::UnknownType {
                id: ty.0,
                retired: true,
            })
        }
        None => {
            return Err(QuantError::UnknownType {
                id: ty.0,
                retired: false,
            })
        }
    };
    let bs = u64::from(info.block_size);
    if bs == 0 || n % bs != 0 {
        return Err(QuantError::NotWholeBlocks {
            ty,
            n_elements: n,
            block_size: info.block_size,
        });
    }
    Ok((n / bs).saturating_mul(u64::from(info.type_size)))
}

/// Check that `actual` bytes hold exactly `n` elements of `ty` (whole blocks), the rule
/// every dequantizer here applies; other dequantizers (ggml's, through FFI) use it too.
pub fn check_sizes(ty: GgmlType, n: u64, actual: u64) -> Result<(), QuantError> {
    let expected = expected_bytes(ty, n)?;
    if expected != actual {
        return Err(QuantError::LengthMismatch {
            ty,
            n_elements: n,
            expected_bytes: expected,
            actual_bytes: actual,
        });
    }
    Ok(())
}

/// Walk matching blocks of `src` (`TS` bytes each) and `dst` (`BS` values each).
///
/// Callers have checked that both hold the same number of whole blocks; the array
/// conversions below cannot fail for `chunks_exact` chunks and compile away.
#[inline(always)]
fn for_each_block<const TS: usize, const BS: usize>(
    src: &[u8],
    dst: &mut [f32],
    mut f: impl FnMut(&[u8; TS], &mut [f32; BS]),
) {
    debug_assert_eq!(src.len() / TS, dst.len() / BS);
    for (s, d) in src.chunks_exact(TS).zip(dst.chunks_exact_mut(BS)) {
        if let (Ok(s), Ok(d)) = (<&[u8; TS]>::try_from(s), <&mut [f32; BS]>::try_from(d)) {
            f(s, d);
        }
    }
}

/// Same as [`for_each_block`] in the quantizing direction.
#[inline(always)]
fn for_each_block_mut<const BS: usize, const TS: usize>(
    src: &[f32],
    dst: &mut [u8],
    mut f: impl FnMut(&[f32; BS], &mut [u8; TS]),
) {
    debug_assert_eq!(src.len() / BS, dst.len() / TS);
    for (s, d) in src.chunks_exact(BS).zip(dst.chunks_exact_mut(TS)) {
        if let (Ok(s), Ok(d)) = (<&[f32; BS]>::try_from(s), <&mut [u8; TS]>::try_from(d)) {
            f(s, d);
        }
    }
}

/// Little-endian f16 at byte offset `off` of a block, as f32 (ggml's `GGML_FP16_TO_FP32`).
#[inline(always)]
fn f16_at<const N: usize>(b: &[u8; N], off: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[off], b[off + 1]]))
}

#[cfg(test)]
mod tests;
