//! Dequantization through ggml itself: a safe wrapper over the `to_float` entry of
//! ggml's type traits, and [`dequantize_any`], which prefers gguf-io's pure-Rust
//! dequantizer and falls back to ggml for what gguf-io does not handle (the grid
//! i-quants IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S).
//!
//! gguf-io's dequantizers are bit-identical to ggml's `to_float` for every type both
//! handle (`tests/ggml_oracle.rs`), so which one runs only matters for speed.
//!
//! # The grid i-quants need no initialisation to be dequantized
//!
//! `ggml_quantize_init(type)` builds the search tables (`iq2_data[]`, `iq3_data[]`:
//! grid maps and neighbour lists) that the IQ1/IQ2/IQ3 *quantizers* use. The
//! *dequantizers* (`dequantize_row_iq2_xxs`, ... in ggml-quants.c) only read the
//! codebooks `iq2xxs_grid`, `iq2xs_grid`, `iq2s_grid`, `iq3xxs_grid`, `iq3s_grid`,
//! `iq1s_grid` and the sign tables `ksigns_iq2xs` / `kmask_iq2xs`, which ggml-common.h
//! defines as `static const` arrays (`GGML_TABLE_BEGIN` under `GGML_COMMON_IMPL_C`)
//! compiled into ggml-quants.c. Nothing has to be called before [`ggml_to_float`],
//! for any type; nor does `ggml_init` (f16 conversion is computed, not a table lookup).
//!
//! # Sizes and safety
//!
//! Sizes are checked exactly like `gguf_io::quant::dequantize` (`dst.len()` a whole
//! number of blocks, `src.len() == ty.bytes_for(dst.len())`), and gguf-io's block
//! geometry is also checked against ggml's traits before ggml is called, so the C code
//! never reads or writes outside the slices. Nothing here panics.

use gguf_io::quant::{self, QuantError};
use gguf_io::GgmlType;

use crate::sys;

/// Why a dequantization through ggml (or [`dequantize_any`]) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DequantError {
    /// A type id ggml never assigned (`retired == false`) or has since removed
    /// (`retired == true`, e.g. Q4_2 or the Q4_0_4_4 repack types).
    #[error("{} ggml type id {id}", if *.retired { "retired" } else { "unknown" })]
    UnknownType { id: u32, retired: bool },
    /// ggml has no `to_float` for this type (F32, F64, the integer types, Q8_1, Q8_K).
    #[error("ggml has no to_float for {ty}")]
    NoToFloat { ty: GgmlType },
    /// Neither gguf-io nor ggml can dequantize this type (no current type).
    #[error("ggml type {ty} cannot be dequantized")]
    Unsupported { ty: GgmlType },
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
    /// gguf-io's type table and the linked ggml disagree on the block geometry; ggml is
    /// not called, since its sizes are what the C code would trust.
    #[error(
        "{ty}: gguf-io says {block_size} elements in {type_size} bytes per block, \
         ggml says {ggml_block_size} in {ggml_type_size}"
    )]
    TraitsMismatch {
        ty: GgmlType,
        block_size: u32,
        type_size: u32,
        ggml_block_size: i64,
        ggml_type_size: usize,
    },
}

impl From<QuantError> for DequantError {
    fn from(e: QuantError) -> Self {
        match e {
            QuantError::Unsupported { ty } => Self::Unsupported { ty },
            QuantError::UnknownType { id, retired } => Self::UnknownType { id, retired },
            QuantError::NotWholeBlocks {
                ty,
                n_elements,
                block_size,
            } => Self::NotWholeBlocks {
                ty,
                n_elements,
                block_size,
            },
            QuantError::LengthMismatch {
                ty,
                n_elements,
                expected_bytes,
                actual_bytes,
            } => Self::LengthMismatch {
                ty,
                n_elements,
                expected_bytes,
                actual_bytes,
            },
        }
    }
}

/// ggml's type traits for `ty`, or `None` for an id at or past `GGML_TYPE_COUNT`
/// (`ggml_get_type_traits` only `assert`s the range, and asserts are compiled out).
/// Retired ids are in range: ggml reports them with block and type size 0.
pub fn type_traits(ty: GgmlType) -> Option<&'static sys::ggml_type_traits> {
    if ty.0 >= sys::GGML_TYPE_COUNT {
        return None;
    }
    // SAFETY: the id is below GGML_TYPE_COUNT, so ggml returns a pointer into its
    // static `type_traits` table, valid for the life of the program and never written.
    unsafe { sys::ggml_get_type_traits(ty.0).as_ref() }
}

/// `true` if [`ggml_to_float`] handles `ty` (a current type ggml has `to_float` for).
pub fn ggml_can_to_float(ty: GgmlType) -> bool {
    to_float_fn(ty).is_ok()
}

/// `true` if [`dequantize_any`] handles `ty`: every current ggml type.
pub fn can_dequantize_any(ty: GgmlType) -> bool {
    quant::can_dequantize(ty) || ggml_can_to_float(ty)
}

type ToFloat = unsafe extern "C" fn(*const std::os::raw::c_void, *mut f32, i64);

/// The `to_float` of a known, current type whose ggml geometry matches gguf-io's.
fn to_float_fn(ty: GgmlType) -> Result<ToFloat, DequantError> {
    let info = match ty.info() {
        None => {
            return Err(DequantError::UnknownType {
                id: ty.0,
                retired: false,
            })
        }
        Some(i) if i.retired => {
            return Err(DequantError::UnknownType {
                id: ty.0,
                retired: true,
            })
        }
        Some(i) => i,
    };
    // gguf-io's table is longer than this ggml's only if ggml is older than the table.
    let traits = type_traits(ty).ok_or(DequantError::UnknownType {
        id: ty.0,
        retired: false,
    })?;
    if traits.blck_size != i64::from(info.block_size) || traits.type_size != info.type_size as usize
    {
        return Err(DequantError::TraitsMismatch {
            ty,
            block_size: info.block_size,
            type_size: info.type_size,
            ggml_block_size: traits.blck_size,
            ggml_type_size: traits.type_size,
        });
    }
    traits.to_float.ok_or(DequantError::NoToFloat { ty })
}

/// gguf-io's size rule, so both dequantizers refuse exactly the same inputs.
fn check_sizes(ty: GgmlType, n: u64, actual: u64) -> Result<(), DequantError> {
    Ok(quant::check_sizes(ty, n, actual)?)
}

/// Elements per `to_float` call: a multiple of every block size (1 to 256), and small
/// enough that ggml's `int` block and element counters (e.g. `const int nb = k / qk`
/// in `dequantize_row_mxfp4`) cannot overflow.
const ELEMS_PER_CALL: usize = 1 << 24;

/// Alignment the C block structs could need: every type with a `to_float` has blocks
/// of `uint8_t`, `uint16_t` and `ggml_half` (alignment 2); 4 leaves a margin. A
/// misaligned `src` is copied to an aligned buffer first.
const SRC_ALIGN: usize = 4;

/// Dequantize `src` (the raw little-endian bytes of `dst.len()` elements of type `ty`)
/// into `dst` with ggml's own `to_float`.
///
/// `dst.len()` must be a multiple of the block size and `src.len()` must be exactly
/// `ty.bytes_for(dst.len())`. Unknown and retired ids, types ggml has no `to_float`
/// for, and a ggml whose block geometry differs from gguf-io's are typed errors.
pub fn ggml_to_float(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), DequantError> {
    let f = to_float_fn(ty)?;
    check_sizes(ty, dst.len() as u64, src.len() as u64)?;
    if dst.is_empty() {
        return Ok(());
    }
    let aligned: Vec<u32>;
    let src_ptr: *const u8 = if (src.as_ptr() as usize) % SRC_ALIGN == 0 {
        src.as_ptr()
    } else {
        let mut buf = vec![0u32; src.len().div_ceil(4)];
        // SAFETY: `buf` has at least src.len() bytes; the two do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), buf.as_mut_ptr().cast::<u8>(), src.len())
        };
        aligned = buf;
        aligned.as_ptr().cast::<u8>()
    };
    // Geometry is known to be valid and to match ggml's (to_float_fn).
    let (bs, ts) = ty
        .info()
        .map_or((1, 0), |i| (i.block_size as usize, i.type_size as usize));
    let bytes_per_call = ELEMS_PER_CALL / bs * ts;
    for (i, out) in dst.chunks_mut(ELEMS_PER_CALL).enumerate() {
        let k = out.len();
        // SAFETY: check_sizes proved src.len() == dst.len() / bs * ts, and every piece
        // except the last is ELEMS_PER_CALL (a multiple of bs) elements, so this piece's
        // k / bs blocks of ts bytes lie inside src (or its aligned copy), and `out` has
        // room for exactly k floats. ggml's traits agree on bs and ts (to_float_fn).
        // to_float only reads its input, writes its output, and keeps no pointer.
        unsafe {
            f(
                src_ptr.add(i * bytes_per_call).cast(),
                out.as_mut_ptr(),
                k as i64,
            )
        };
    }
    Ok(())
}

/// Dequantize with gguf-io's pure-Rust dequantizer when it handles `ty`, else with
/// ggml's `to_float` (the grid i-quants). Same contract as [`ggml_to_float`]; every
/// current ggml type is handled by one of the two ([`can_dequantize_any`]).
pub fn dequantize_any(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), DequantError> {
    if quant::can_dequantize(ty) {
        return quant::dequantize(ty, src, dst).map_err(DequantError::from);
    }
    match ggml_to_float(ty, src, dst) {
        Err(DequantError::NoToFloat { ty }) => Err(DequantError::Unsupported { ty }),
        r => r,
    }
}

/// Like [`dequantize_any`], into a new vector of `n_elements` values. Sizes are
/// checked before anything is allocated.
pub fn dequantize_any_to_vec(
    ty: GgmlType,
    src: &[u8],
    n_elements: usize,
) -> Result<Vec<f32>, DequantError> {
    if quant::can_dequantize(ty) {
        return quant::dequantize_to_vec(ty, src, n_elements).map_err(DequantError::from);
    }
    match to_float_fn(ty) {
        Err(DequantError::NoToFloat { ty }) => return Err(DequantError::Unsupported { ty }),
        Err(e) => return Err(e),
        Ok(_) => {}
    }
    check_sizes(ty, n_elements as u64, src.len() as u64)?;
    let mut out = vec![0f32; n_elements];
    ggml_to_float(ty, src, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_typed() {
        let mut out = [0f32; 32];
        assert_eq!(
            ggml_to_float(GgmlType(4), &[0; 18], &mut out),
            Err(DequantError::UnknownType {
                id: 4,
                retired: true
            })
        );
        assert_eq!(
            ggml_to_float(GgmlType(43), &[0; 18], &mut out),
            Err(DequantError::UnknownType {
                id: 43,
                retired: false
            })
        );
        assert_eq!(
            ggml_to_float(GgmlType(u32::MAX), &[], &mut []),
            Err(DequantError::UnknownType {
                id: u32::MAX,
                retired: false
            })
        );
        for ty in [
            GgmlType::F32,
            GgmlType::F64,
            GgmlType::I8,
            GgmlType::I32,
            GgmlType::Q8_1,
            GgmlType::Q8_K,
        ] {
            assert_eq!(
                ggml_to_float(ty, &[], &mut []),
                Err(DequantError::NoToFloat { ty })
            );
            assert!(can_dequantize_any(ty), "{ty}");
        }
        assert_eq!(
            ggml_to_float(GgmlType::IQ2_XXS, &[0; 66], &mut out),
            Err(DequantError::NotWholeBlocks {
                ty: GgmlType::IQ2_XXS,
                n_elements: 32,
                block_size: 256
            })
        );
        let mut out = vec![0f32; 256];
        assert_eq!(
            ggml_to_float(GgmlType::IQ2_XXS, &[0; 65], &mut out),
            Err(DequantError::LengthMismatch {
                ty: GgmlType::IQ2_XXS,
                n_elements: 256,
                expected_bytes: 66,
                actual_bytes: 65
            })
        );
        assert_eq!(
            dequantize_any(GgmlType::IQ1_S, &[0; 51], &mut out),
            Err(DequantError::LengthMismatch {
                ty: GgmlType::IQ1_S,
                n_elements: 256,
                expected_bytes: 50,
                actual_bytes: 51
            })
        );
        assert_eq!(
            dequantize_any_to_vec(GgmlType::IQ1_S, &[0; 50], 255),
            Err(DequantError::NotWholeBlocks {
                ty: GgmlType::IQ1_S,
                n_elements: 255,
                block_size: 256
            })
        );
        assert!(DequantError::UnknownType {
            id: 31,
            retired: true
        }
        .to_string()
        .starts_with("retired"));
    }

    #[test]
    fn every_current_type_is_handled() {
        for info in gguf_io::TYPE_TABLE {
            let ty = GgmlType(info.id);
            assert_eq!(can_dequantize_any(ty), !info.retired, "{ty}");
            if info.retired {
                continue;
            }
            let n = info.block_size as usize * 3;
            let src = vec![0u8; info.type_size as usize * 3];
            let v = dequantize_any_to_vec(ty, &src, n).unwrap();
            assert_eq!(v.len(), n);
        }
    }

    /// Zero blocks with scale 1.0 (f16 0x3c00) decode to grid entry 0 times the
    /// smallest sub-block scale: known values, computed without any
    /// `ggml_quantize_init` in this process (nothing in this crate calls it).
    #[test]
    fn grid_iquants_decode_without_quantize_init() {
        let cases = [
            // iq2xxs_grid[0] = 0x0808..08: 8 * (1 * (0.5 + 0) * 0.25).
            (GgmlType::IQ2_XXS, 0, 1.0),
            // iq3xxs_grid[0] = 0x04040404: 4 * (1 * (0.5 + 0) * 0.5).
            (GgmlType::IQ3_XXS, 0, 1.0),
            // iq1s_grid[0] = all -1, delta +0.125, dl = 1 * (2 * 0 + 1).
            (GgmlType::IQ1_S, 0, -0.875),
        ];
        for (ty, off, want) in cases {
            let info = ty.info().unwrap();
            let mut block = vec![0u8; info.type_size as usize];
            block[off..off + 2].copy_from_slice(&0x3c00u16.to_le_bytes());
            let v = dequantize_any_to_vec(ty, &block, 256).unwrap();
            assert!(v.iter().all(|&x| x == want), "{ty}: {v:?}");
        }
    }

    #[test]
    fn misaligned_source_is_copied() {
        // IQ2_XXS, d = 1.0 (f16 0x3c00), all-zero quants: grid entry 0 with scale
        // (0.5 + 0) * 0.25 = 0.125, i.e. 8 * 0.125 = 1.0 for grid value 8.
        let mut buf = [0u8; 66 + SRC_ALIGN];
        // Every offset: at least one is misaligned, at least one aligned.
        let mut outs = Vec::new();
        for off in 0..SRC_ALIGN {
            buf.fill(0);
            buf[off..off + 2].copy_from_slice(&0x3c00u16.to_le_bytes());
            let mut a = vec![0f32; 256];
            ggml_to_float(GgmlType::IQ2_XXS, &buf[off..off + 66], &mut a).unwrap();
            assert!(a.iter().all(|&v| v == 1.0), "offset {off}: {a:?}");
            outs.push(a);
        }
        assert_eq!(outs.len(), SRC_ALIGN);
    }
}
