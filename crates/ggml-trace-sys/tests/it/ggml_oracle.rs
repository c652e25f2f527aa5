//! ggml as the oracle for gguf-io's type table, dequantizers and quantizers.
//!
//! - gguf-io's `TYPE_TABLE` equals ggml's type traits for every id below
//!   `GGML_TYPE_COUNT` (name, block size, bytes per block; retired ids are reported by
//!   ggml with block and type size 0 and a "DEPRECATED" / "... REMOVED" name).
//! - For every type that both gguf-io and ggml's `to_float` dequantize, the outputs are
//!   bit-identical (`to_bits`, so NaNs compare by payload) on raw random blocks, on
//!   random blocks with sane scale fields, on zero blocks, on edge scales (±0,
//!   subnormals, max finite), on every f16 / bf16 bit pattern, and on blocks ggml's
//!   own `ggml_quantize_chunk` produced from random f32, with and without an
//!   importance matrix. Q8_K, which ggml has no `to_float` for, is compared with the
//!   exported `dequantize_row_q8_K`.
//! - gguf-io's `quantize` (F16, BF16, Q8_0, Q4_0) is byte-identical to ggml's
//!   `from_float_ref` and to `ggml_quantize_chunk` without an importance matrix. ggml's
//!   CPU-backend `from_float` (the one `ggml_get_type_traits_cpu` gives, used when ggml
//!   quantizes activations at run time) is *not* the reference: for Q8_0 on x86 it is
//!   SIMD code that computes `id = 127 / amax` instead of `1 / (amax / 127)` and rounds
//!   ties to even (`_mm256_round_ps`) instead of away from zero (`roundf`), so it may
//!   differ in the last quant; `cpu_from_float_differs_only_where_documented` shows how.
//! - `dequant::dequantize_any` handles every grid i-quant: ggml-quantized blocks (with
//!   a random importance matrix, and without one where ggml allows that) and random
//!   valid blocks all decode to finite values equal to ggml's `to_float`.

use gguf_io::quant::GRID_TYPES;
use std::ffi::{c_void, CStr};
use std::ptr;
use test_support::Rng;

use ggml_trace_sys::dequant::{self, DequantError};
use ggml_trace_sys::sys;
use gguf_io::quant;
use gguf_io::{GgmlType, TYPE_TABLE};

extern "C" {
    /// ggml-quants.h (GGML_API); not in the type traits (Q8_K has no `to_float`).
    fn dequantize_row_q8_K(x: *const c_void, y: *mut f32, k: i64);
}

// ---------------------------------------------------------------------------------
// Helpers

fn ggml_traits(ty: GgmlType) -> &'static sys::ggml_type_traits {
    dequant::type_traits(ty).expect("id below GGML_TYPE_COUNT")
}

fn ggml_name(ty: GgmlType) -> String {
    // SAFETY: type_name points to a static NUL-terminated string for every id
    // below GGML_TYPE_COUNT (checked by type_traits).
    unsafe { CStr::from_ptr(ggml_traits(ty).type_name) }
        .to_string_lossy()
        .into_owned()
}

fn current_types() -> impl Iterator<Item = GgmlType> {
    TYPE_TABLE
        .iter()
        .filter(|i| !i.retired)
        .map(|i| GgmlType(i.id))
}

fn block_geometry(ty: GgmlType) -> (usize, usize) {
    let i = ty.info().unwrap();
    (i.block_size as usize, i.type_size as usize)
}

/// The types both gguf-io and ggml's `to_float` dequantize.
fn both_dequantize() -> Vec<GgmlType> {
    current_types()
        .filter(|&t| quant::can_dequantize(t) && dequant::ggml_can_to_float(t))
        .collect()
}

/// The non-grid types `ggml_quantize_chunk` has a case for (its `default:` is an
/// `assert(false)` compiled out under NDEBUG, then a failing GGML_ASSERT on the size:
/// so Q8_1 and Q8_K must not be passed).
const GGML_QUANTIZABLE: [GgmlType; 21] = [
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q1_0,
    GgmlType::Q2_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::MXFP4,
    GgmlType::NVFP4,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::TQ1_0,
    GgmlType::TQ2_0,
    GgmlType::IQ4_NL,
    GgmlType::IQ4_XS,
    GgmlType::F32,
];

/// One scale field inside a block.
#[derive(Clone, Copy, Debug)]
enum Scale {
    /// `ggml_half` at this byte offset.
    F16(usize),
    /// E8M0 exponent byte (MXFP4).
    E8M0(usize),
    /// Unsigned E4M3 byte (NVFP4 sub-block scales).
    UE4M3(usize),
    /// `float` at this byte offset (Q8_K).
    F32(usize),
    /// IQ1_M: an f16 spread over the top nibbles of the four `uint16_t` scale words
    /// at byte 48 (`dequantize_row_iq1_m`: `scale.u16 = (sc[0] >> 12) | ...`).
    Iq1m,
}

/// The scale fields of one block of `ty` (layouts from ggml-common.h).
fn scale_fields(ty: GgmlType) -> Vec<Scale> {
    use Scale::*;
    match ty {
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => {
            vec![F16(0), F16(2)]
        }
        GgmlType::Q4_0
        | GgmlType::Q5_0
        | GgmlType::Q8_0
        | GgmlType::Q8_1
        | GgmlType::Q1_0
        | GgmlType::Q2_0
        | GgmlType::IQ4_NL
        | GgmlType::IQ4_XS
        | GgmlType::IQ2_XXS
        | GgmlType::IQ2_XS
        | GgmlType::IQ2_S
        | GgmlType::IQ3_XXS
        | GgmlType::IQ3_S
        | GgmlType::IQ1_S => vec![F16(0)],
        GgmlType::Q2_K => vec![F16(80), F16(82)],
        GgmlType::Q3_K => vec![F16(108)],
        GgmlType::Q6_K => vec![F16(208)],
        GgmlType::TQ1_0 => vec![F16(52)],
        GgmlType::TQ2_0 => vec![F16(64)],
        GgmlType::MXFP4 => vec![E8M0(0)],
        GgmlType::NVFP4 => (0..4).map(UE4M3).collect(),
        GgmlType::Q8_K => vec![F32(0)],
        GgmlType::IQ1_M => vec![Iq1m],
        _ => vec![],
    }
}

fn set_scale(block: &mut [u8], s: Scale, bits: u32) {
    match s {
        Scale::F16(o) => block[o..o + 2].copy_from_slice(&(bits as u16).to_le_bytes()),
        Scale::E8M0(o) | Scale::UE4M3(o) => block[o] = bits as u8,
        Scale::F32(o) => block[o..o + 4].copy_from_slice(&bits.to_le_bytes()),
        Scale::Iq1m => {
            for k in 0..4 {
                let o = 48 + 2 * k;
                let w = u16::from_le_bytes([block[o], block[o + 1]]);
                let nib = ((bits >> (4 * k)) & 0xf) as u16;
                let w = (w & 0x0fff) | (nib << 12);
                block[o..o + 2].copy_from_slice(&w.to_le_bytes());
            }
        }
    }
}

/// A random finite scale of moderate magnitude (about 2^-10 .. 2^10).
fn sane_scale(rng: &mut Rng, s: Scale) -> u32 {
    match s {
        Scale::F16(_) | Scale::Iq1m => {
            let sign = (rng.below(2) as u32) << 15;
            let exp = 5 + rng.below(21) as u32;
            sign | (exp << 10) | rng.below(1024) as u32
        }
        Scale::E8M0(_) => 117 + rng.below(21) as u32,
        Scale::UE4M3(_) => rng.below(256) as u32,
        Scale::F32(_) => {
            let sign = (rng.below(2) as u32) << 31;
            let exp = 117 + rng.below(21) as u32;
            sign | (exp << 23) | rng.below(1 << 23) as u32
        }
    }
}

/// Edge values of a scale field: ±0, smallest and largest subnormal, smallest normal,
/// ±1, ±max finite (and the special codes of the 8-bit formats).
fn edge_scales(s: Scale) -> Vec<u32> {
    match s {
        Scale::F16(_) | Scale::Iq1m => vec![
            0x0000, 0x8000, 0x0001, 0x8001, 0x03ff, 0x83ff, 0x0400, 0x3c00, 0xbc00, 0x7bff, 0xfbff,
        ],
        Scale::E8M0(_) => vec![0, 1, 2, 126, 127, 128, 253, 254, 255],
        Scale::UE4M3(_) => vec![0x00, 0x01, 0x07, 0x08, 0x38, 0x7e, 0x7f, 0x80, 0xff],
        Scale::F32(_) => vec![
            0x0000_0000,
            0x8000_0000,
            0x0000_0001,
            0x007f_ffff,
            0x0080_0000,
            0x3f80_0000,
            0xbf80_0000,
            0x7f7f_ffff,
            0xff7f_ffff,
        ],
    }
}

/// The kinds of block sets every comparison runs on.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Blocks {
    /// Raw random bytes: scales may be inf or NaN.
    Random,
    /// Random bytes with every scale field set to a sane finite value.
    Sane,
    /// All-zero blocks.
    Zero,
    /// Each scale field (and all of them together) set to each edge value, the other
    /// scales sane, the rest random.
    Edge,
}

fn make_blocks(ty: GgmlType, kind: Blocks, n_blocks: usize, rng: &mut Rng) -> Vec<u8> {
    let (_, ts) = block_geometry(ty);
    let fields = scale_fields(ty);
    match kind {
        Blocks::Random => rng.bytes(n_blocks * ts),
        Blocks::Zero => vec![0u8; n_blocks * ts],
        Blocks::Sane => {
            let mut v = rng.bytes(n_blocks * ts);
            for b in v.chunks_exact_mut(ts) {
                for &f in &fields {
                    let s = sane_scale(rng, f);
                    set_scale(b, f, s);
                }
            }
            v
        }
        Blocks::Edge => {
            let mut v = Vec::new();
            if fields.is_empty() {
                return v;
            }
            for _rep in 0..8 {
                for which in 0..=fields.len() {
                    for &e in &edge_scales(fields[0]) {
                        let mut b = rng.bytes(ts);
                        for (k, &f) in fields.iter().enumerate() {
                            let s = if which == fields.len() || which == k {
                                e
                            } else {
                                sane_scale(rng, f)
                            };
                            set_scale(&mut b, f, s);
                        }
                        v.extend_from_slice(&b);
                    }
                }
            }
            v
        }
    }
}

/// ggml's output for `src`: `to_float`, or `dequantize_row_q8_K` for Q8_K.
fn ggml_dequant(ty: GgmlType, src: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; n];
    if ty == GgmlType::Q8_K {
        let (_, ts) = block_geometry(ty);
        assert_eq!(src.len(), n / 256 * ts);
        // block_q8_K holds a float: copy to a 4-byte aligned buffer.
        let mut aligned = vec![0u32; src.len().div_ceil(4)];
        // SAFETY: `aligned` has room for src.len() bytes.
        unsafe { ptr::copy_nonoverlapping(src.as_ptr(), aligned.as_mut_ptr().cast(), src.len()) };
        // SAFETY: n / 256 whole blocks of 292 bytes in, n floats out.
        unsafe { dequantize_row_q8_K(aligned.as_ptr().cast(), out.as_mut_ptr(), n as i64) };
    } else {
        dequant::ggml_to_float(ty, src, &mut out).unwrap();
    }
    out
}

/// gguf-io vs ggml on `src`; a description of the first mismatch and their count.
fn compare(ty: GgmlType, src: &[u8], label: &str) -> Result<(), String> {
    let (bs, ts) = block_geometry(ty);
    let n = src.len() / ts * bs;
    let mut ours = vec![0f32; n];
    quant::dequantize(ty, src, &mut ours).map_err(|e| format!("{ty} {label}: {e}"))?;
    let theirs = ggml_dequant(ty, src, n);
    let bad: Vec<usize> = (0..n)
        .filter(|&i| ours[i].to_bits() != theirs[i].to_bits())
        .collect();
    match bad.first() {
        None => Ok(()),
        Some(&i) => {
            let b = i / bs;
            let hex: String = src[b * ts..(b + 1) * ts]
                .iter()
                .map(|x| format!("{x:02x}"))
                .collect();
            Err(format!(
                "{ty} {label}: {} of {n} values differ; first: element {} of block {b}: \
                 gguf-io {:e} ({:#010x}), ggml {:e} ({:#010x}); block bytes {hex}",
                bad.len(),
                i % bs,
                ours[i],
                ours[i].to_bits(),
                theirs[i],
                theirs[i].to_bits(),
            ))
        }
    }
}

fn report(failures: Vec<String>) {
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Random f32 rows: per-row magnitudes from 1e-4 to 1e4, with outliers, constant rows,
/// zero rows, ternary rows and tiny rows.
fn random_rows(rng: &mut Rng, nrows: usize, n_per_row: usize) -> Vec<f32> {
    let mut x = Vec::with_capacity(nrows * n_per_row);
    for r in 0..nrows {
        let scale = 10f32.powf(rng.unit() * 8.0 - 4.0);
        let row: Vec<f32> = match r % 8 {
            0 => vec![0.0; n_per_row],
            1 => vec![scale; n_per_row],
            2 => (0..n_per_row)
                .map(|_| (rng.below(3) as f32 - 1.0) * scale)
                .collect(),
            3 => (0..n_per_row)
                .map(|_| {
                    let v = rng.normal() * scale;
                    if rng.below(50) == 0 {
                        v * 40.0
                    } else {
                        v
                    }
                })
                .collect(),
            4 => (0..n_per_row).map(|_| rng.unit() * scale).collect(),
            _ => (0..n_per_row).map(|_| rng.normal() * scale).collect(),
        };
        x.extend(row);
    }
    x
}

/// `ggml_quantize_chunk(ty, x, ...)` over `nrows` rows of `n_per_row`.
fn ggml_quantize(ty: GgmlType, x: &[f32], n_per_row: usize, imatrix: Option<&[f32]>) -> Vec<u8> {
    let (bs, ts) = block_geometry(ty);
    assert_eq!(n_per_row % bs, 0);
    assert_eq!(x.len() % n_per_row, 0);
    if let Some(w) = imatrix {
        assert_eq!(w.len(), n_per_row);
    }
    // SAFETY: pure query.
    let needs = unsafe { sys::ggml_quantize_requires_imatrix(ty.0) };
    assert!(
        !needs || imatrix.is_some(),
        "{ty} needs an importance matrix"
    );
    let nrows = x.len() / n_per_row;
    let mut out = vec![0u8; x.len() / bs * ts];
    // SAFETY: the type is one ggml_quantize_chunk handles (callers pass
    // GGML_QUANTIZABLE or GRID_TYPES), rows are whole blocks, `out` holds exactly
    // nrows rows of n_per_row / bs blocks, and the importance matrix (if any) has one
    // weight per column, as ggml expects.
    let written = unsafe {
        sys::ggml_quantize_chunk(
            ty.0,
            x.as_ptr(),
            out.as_mut_ptr().cast(),
            0,
            nrows as i64,
            n_per_row as i64,
            imatrix.map_or(ptr::null(), |w| w.as_ptr()),
        )
    };
    assert_eq!(written, out.len(), "{ty}");
    out
}

/// `from_float_ref` of ggml's type traits.
fn ggml_from_float_ref(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    let (bs, ts) = block_geometry(ty);
    assert_eq!(x.len() % bs, 0);
    let f = ggml_traits(ty).from_float_ref.expect("from_float_ref");
    let mut out = vec![0u8; x.len() / bs * ts];
    // SAFETY: whole blocks in, exactly that many blocks out.
    unsafe { f(x.as_ptr(), out.as_mut_ptr().cast(), x.len() as i64) };
    out
}

// ---------------------------------------------------------------------------------
// (a) The type table

#[test]
fn type_table_matches_ggml_traits() {
    assert_eq!(TYPE_TABLE.len(), sys::GGML_TYPE_COUNT as usize);
    for info in TYPE_TABLE {
        let ty = GgmlType(info.id);
        let t = ggml_traits(ty);
        let name = ggml_name(ty);
        // The exported accessors agree with the traits.
        // SAFETY: pure queries on a valid id.
        unsafe {
            assert_eq!(sys::ggml_blck_size(info.id), t.blck_size, "{name}");
            assert_eq!(sys::ggml_type_size(info.id), t.type_size, "{name}");
        }
        if info.retired {
            // ggml keeps the slot with size 0 and a tombstone name.
            assert_eq!(t.blck_size, 0, "{}", info.name);
            assert_eq!(t.type_size, 0, "{}", info.name);
            assert!(!t.is_quantized, "{}", info.name);
            assert!(t.to_float.is_none() && t.from_float_ref.is_none());
            let removed = format!("TYPE_{} REMOVED", info.name.to_uppercase());
            assert!(
                name == "DEPRECATED" || name.starts_with(&removed),
                "id {}: ggml calls it {name:?}, gguf-io {:?}",
                info.id,
                info.name
            );
            assert_eq!(info.block_size, 0);
            assert_eq!(info.type_size, 0);
            continue;
        }
        assert_eq!(name, info.name, "id {}", info.id);
        assert_eq!(t.blck_size, i64::from(info.block_size), "{name}");
        assert_eq!(t.type_size, info.type_size as usize, "{name}");
        assert_eq!(t.is_quantized, ty.is_quantized(), "{name}");
        assert_eq!(GgmlType::from_name(&name), Some(ty));
    }
    // Past the end: a typed error, never a read past ggml's table.
    let past = GgmlType(sys::GGML_TYPE_COUNT);
    assert!(dequant::type_traits(past).is_none());
    assert_eq!(
        dequant::ggml_to_float(past, &[], &mut []),
        Err(DequantError::UnknownType {
            id: sys::GGML_TYPE_COUNT,
            retired: false
        })
    );
}

/// Which types each side dequantizes, pinned so that a change is noticed.
#[test]
fn dequantizer_coverage() {
    let ggml_only: Vec<GgmlType> = current_types()
        .filter(|&t| !quant::can_dequantize(t))
        .collect();
    let gguf_io_only: Vec<&str> = current_types()
        .filter(|&t| !dequant::ggml_can_to_float(t))
        .map(|t| t.name())
        .collect();
    for t in current_types() {
        assert!(dequant::can_dequantize_any(t), "{t}");
    }
    assert_eq!(
        gguf_io_only,
        ["f32", "q8_1", "q8_K", "i8", "i16", "i32", "i64", "f64"]
    );
    let mut grid = GRID_TYPES.to_vec();
    grid.sort();
    assert_eq!(ggml_only, grid);
    assert_eq!(both_dequantize().len(), TYPE_TABLE.len() - 8 - 8 - 7);
}

// ---------------------------------------------------------------------------------
// (b) gguf-io's dequantizers vs ggml's to_float

#[test]
fn f16_and_bf16_every_bit_pattern() {
    let all: Vec<u8> = (0..=u16::MAX).flat_map(|h| h.to_le_bytes()).collect();
    report(
        [GgmlType::F16, GgmlType::BF16]
            .into_iter()
            .filter_map(|ty| compare(ty, &all, "all 65536 patterns").err())
            .collect(),
    );
}

/// Blocks per set; several thousand per type in all.
const N_BLOCKS: usize = 2048;

#[test]
fn dequantize_matches_ggml_on_crafted_blocks() {
    let mut failures = Vec::new();
    let mut types = both_dequantize();
    types.push(GgmlType::Q8_K);
    for ty in types {
        let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15 ^ u64::from(ty.0));
        for kind in [Blocks::Random, Blocks::Sane, Blocks::Zero, Blocks::Edge] {
            let n = if kind == Blocks::Zero { 16 } else { N_BLOCKS };
            let src = make_blocks(ty, kind, n, &mut rng);
            if let Err(e) = compare(ty, &src, &format!("{kind:?}")) {
                failures.push(e);
            }
        }
    }
    report(failures);
}

#[test]
fn dequantize_matches_ggml_on_ggml_quantized_blocks() {
    let n_per_row = 1024;
    let nrows = 64;
    let mut failures = Vec::new();
    for ty in GGML_QUANTIZABLE {
        if !dequant::ggml_can_to_float(ty) {
            continue; // F32
        }
        assert!(quant::can_dequantize(ty), "{ty}");
        let mut rng = Rng::new(0x5151_5151 ^ u64::from(ty.0));
        let x = random_rows(&mut rng, nrows, n_per_row);
        let w: Vec<f32> = (0..n_per_row).map(|_| 0.01 + rng.unit() * 10.0).collect();
        for (imatrix, label) in [(None, "quantized"), (Some(&w[..]), "quantized, imatrix")] {
            let q = ggml_quantize(ty, &x, n_per_row, imatrix);
            if let Err(e) = compare(ty, &q, label) {
                failures.push(e);
            }
        }
    }
    report(failures);
}

// ---------------------------------------------------------------------------------
// gguf-io's quantizers vs ggml's reference quantizers

/// Inputs for the quantizer comparison: random values at many magnitudes, exact ties
/// for Q8_0 (amax 127: id = 1, x = k + 0.5) and Q4_0 (max -8: id = 1, x + 8.5 = k),
/// and edge values (±0, subnormals, f16 overflow boundary, f32 extremes).
fn quantizer_inputs(rng: &mut Rng) -> Vec<f32> {
    let mut x = random_rows(rng, 64, 1024);
    // Q8_0 ties: amax 127 gives d = 1, id = 1.
    for _ in 0..64 {
        let mut b: Vec<f32> = (0..32)
            .map(|_| rng.below(254) as f32 - 127.0 + 0.5)
            .collect();
        b[0] = 127.0;
        x.extend(b);
    }
    // Q4_0 ties: max = -8 gives d = 1, id = 1.
    for _ in 0..64 {
        let mut b: Vec<f32> = (0..32)
            .map(|_| (rng.below(15) as f32 - 7.5).clamp(-7.5, 7.5))
            .collect();
        b[0] = -8.0;
        x.extend(b);
    }
    let edges = [
        0.0f32,
        -0.0,
        f32::from_bits(1),
        -f32::from_bits(1),
        f32::MIN_POSITIVE,
        1e-30,
        1e-38,
        5.9604645e-8, // smallest f16 subnormal
        2.9802322e-8, // half of it: a tie
        6.1035156e-5, // smallest f16 normal
        65504.0,
        65519.99,
        65520.0, // rounds to f16 inf
        1e10,
        f32::MAX,
        -f32::MAX,
        1.0,
        -1.0,
        0.1,
        1.0 / 3.0,
    ];
    for &a in &edges {
        for &b in &edges {
            let mut blk: Vec<f32> = (0..32).map(|j| if j % 2 == 0 { a } else { b }).collect();
            blk[31] = a * 0.5;
            x.extend(blk);
        }
    }
    // Single non-zero value, and a block of one tiny value.
    for &a in &edges {
        let mut blk = vec![0.0f32; 32];
        blk[7] = a;
        x.extend(blk);
    }
    // Whole 1024-element rows for ggml_quantize_chunk.
    while x.len() % 1024 != 0 {
        x.push(rng.normal());
    }
    x
}

#[test]
fn quantize_matches_ggml_reference() {
    let mut rng = Rng::new(0xdead_beef);
    let x = quantizer_inputs(&mut rng);
    assert_eq!(x.len() % 1024, 0, "whole rows for ggml_quantize_chunk");
    let mut failures = Vec::new();
    for ty in [
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
    ] {
        let ours = quant::quantize(ty, &x).unwrap();
        let reference = ggml_from_float_ref(ty, &x);
        let chunk = ggml_quantize(ty, &x, 1024, None);
        for (theirs, what) in [
            (&reference, "from_float_ref"),
            (&chunk, "ggml_quantize_chunk"),
        ] {
            if let Some(i) = ours.iter().zip(theirs.iter()).position(|(a, b)| a != b) {
                let (bs, ts) = block_geometry(ty);
                let blk = i / ts;
                failures.push(format!(
                    "{ty} vs {what}: first differing byte {i} (block {blk}): \
                     gguf-io {:02x?}, ggml {:02x?}; input {:?}",
                    &ours[blk * ts..(blk + 1) * ts],
                    &theirs[blk * ts..(blk + 1) * ts],
                    &x[blk * bs..(blk + 1) * bs],
                ));
            }
        }
    }
    // F16 / BF16 conversions of arbitrary f32 bit patterns (NaN, inf, subnormals).
    let bits: Vec<f32> = (0..1 << 20)
        .map(|_| f32::from_bits(rng.next_u64() as u32))
        .chain([f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY])
        .chain((0..1024).map(|i| f32::from_bits(0x7f80_0001 + i * 4099)))
        .collect();
    for ty in [GgmlType::F16, GgmlType::BF16] {
        let ours = quant::quantize(ty, &bits).unwrap();
        let theirs = ggml_from_float_ref(ty, &bits);
        if let Some(i) =
            (0..bits.len()).find(|&i| ours[2 * i..2 * i + 2] != theirs[2 * i..2 * i + 2])
        {
            failures.push(format!(
                "{ty} from bits: input {:#010x}: gguf-io {:02x?}, ggml {:02x?}",
                bits[i].to_bits(),
                &ours[2 * i..2 * i + 2],
                &theirs[2 * i..2 * i + 2]
            ));
        }
    }
    report(failures);
}

/// ggml's CPU-backend `from_float` (`ggml_get_type_traits_cpu`) is not the reference
/// quantizer. For Q4_0 it *is* `quantize_row_q4_0_ref`; for F16 and BF16 it may use
/// F16C / AVX512-BF16; for Q8_0 on x86 with AVX it is SIMD code with a different
/// inverse scale and ties-to-even rounding. This test pins what agrees with the
/// reference (and so with gguf-io) and prints how much of Q8_0 does not.
#[test]
fn cpu_from_float_differs_only_where_documented() {
    // SAFETY: idempotent initialisation of ggml-cpu's tables.
    unsafe { sys::ggml_cpu_init() };
    let mut rng = Rng::new(0x0ddba11);
    let x = quantizer_inputs(&mut rng);
    // Finite, in f16 range: the F16C and scalar conversions agree there.
    let finite: Vec<f32> = x.iter().map(|v| v.clamp(-65504.0, 65504.0)).collect();
    for ty in [
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
    ] {
        // SAFETY: valid id; static table.
        let cpu = unsafe { &*sys::ggml_get_type_traits_cpu(ty.0) };
        let f = cpu.from_float.expect("cpu from_float");
        let (bs, ts) = block_geometry(ty);
        let input = if ty == GgmlType::F16 { &finite } else { &x };
        let mut theirs = vec![0u8; input.len() / bs * ts];
        // SAFETY: whole blocks in, that many blocks out.
        unsafe {
            f(
                input.as_ptr(),
                theirs.as_mut_ptr().cast(),
                input.len() as i64,
            )
        };
        let ours = quant::quantize(ty, input).unwrap();
        let differing_blocks = ours
            .chunks_exact(ts)
            .zip(theirs.chunks_exact(ts))
            .filter(|(a, b)| a != b)
            .count();
        eprintln!(
            "{ty}: CPU from_float differs from the reference in {differing_blocks} of {} blocks",
            ours.len() / ts
        );
        if ty == GgmlType::BF16 && ggml_trace_sys::system_info().contains("AVX512_BF16 = 1") {
            // `ggml_fp32_to_bf16_row` flushes subnormals to zero with AVX512-BF16.
            continue;
        }
        if ty != GgmlType::Q8_0 {
            assert_eq!(differing_blocks, 0, "{ty}");
            continue;
        }
        // Q8_0: same scale, and no quant more than one step away, except in blocks
        // whose inverse scale overflows (amax below about 127 * 2^-128: both sides then
        // convert inf or NaN to int8, which C leaves undefined).
        for (k, (a, b)) in ours
            .chunks_exact(ts)
            .zip(theirs.chunks_exact(ts))
            .enumerate()
        {
            let xs = &input[k * bs..(k + 1) * bs];
            let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
            if a == b || (1.0 / (amax / 127.0)).is_infinite() {
                continue;
            }
            assert_eq!(a[..2], b[..2], "q8_0 block {k}: scale");
            for j in 2..ts {
                let (qa, qb) = (i32::from(a[j] as i8), i32::from(b[j] as i8));
                assert!(
                    (qa - qb).abs() <= 1,
                    "q8_0 block {k}: {qa} vs {qb}, input {xs:?}"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// (c) dequantize_any on the grid i-quants

fn check_grid(
    ty: GgmlType,
    src: &[u8],
    label: &str,
    expect_finite: bool,
) -> Result<Vec<f32>, String> {
    let (bs, ts) = block_geometry(ty);
    let n = src.len() / ts * bs;
    let mut any = vec![0f32; n];
    dequant::dequantize_any(ty, src, &mut any).map_err(|e| format!("{ty} {label}: {e}"))?;
    let reference = ggml_dequant(ty, src, n);
    if let Some(i) = (0..n).find(|&i| any[i].to_bits() != reference[i].to_bits()) {
        return Err(format!(
            "{ty} {label}: element {i}: dequantize_any {:e}, ggml {:e}",
            any[i], reference[i]
        ));
    }
    if quant::can_dequantize(ty) {
        compare(ty, src, label)?;
    }
    if expect_finite {
        if let Some(i) = any.iter().position(|v| !v.is_finite()) {
            return Err(format!("{ty} {label}: element {i} is {}", any[i]));
        }
    }
    Ok(any)
}

fn rms(v: impl Iterator<Item = f32>) -> f64 {
    let (s, n) = v.fold((0f64, 0usize), |(s, n), x| {
        (s + f64::from(x) * f64::from(x), n + 1)
    });
    (s / n.max(1) as f64).sqrt()
}

/// One grid i-quant through `dequantize_any`. One test per type, so that ggml's
/// one-time quantizer initialisation (`ggml_quantize_init`: seconds for IQ1_S and
/// IQ2_S, which build neighbour tables over their grids) runs in parallel.
fn grid_iquant(ty: GgmlType) {
    let n_per_row = 1024;
    let nrows = 8;
    let mut failures = Vec::new();
    {
        let mut rng = Rng::new(0x00a1_1ce5 ^ u64::from(ty.0));

        // ggml-quantized random data: always with a random importance matrix, and
        // without one where ggml allows it.
        // SAFETY: pure query.
        let needs = unsafe { sys::ggml_quantize_requires_imatrix(ty.0) };
        let x: Vec<f32> = (0..nrows * n_per_row).map(|_| rng.normal()).collect();
        let w: Vec<f32> = (0..n_per_row).map(|_| 0.01 + rng.unit() * 10.0).collect();
        let mut runs = vec![(Some(&w[..]), "quantized, imatrix")];
        if !needs {
            runs.push((None, "quantized"));
        }
        for (imatrix, label) in runs {
            let q = ggml_quantize(ty, &x, n_per_row, imatrix);
            match check_grid(ty, &q, label, true) {
                Err(e) => failures.push(e),
                Ok(y) => {
                    // A sane round trip: the error is smaller than the signal.
                    let err = rms(x.iter().zip(&y).map(|(a, b)| a - b));
                    let sig = rms(x.iter().copied());
                    eprintln!("{ty} {label}: relative rms error {:.3}", err / sig);
                    if err.partial_cmp(&sig) != Some(std::cmp::Ordering::Less) {
                        failures.push(format!("{ty} {label}: rms error {err} >= rms {sig}"));
                    }
                }
            }
        }

        // Random valid blocks: sane scales (finite output), raw bytes, zeros, edges.
        for kind in [Blocks::Sane, Blocks::Random, Blocks::Zero, Blocks::Edge] {
            let n = if kind == Blocks::Zero { 16 } else { N_BLOCKS };
            let src = make_blocks(ty, kind, n, &mut rng);
            let finite = kind != Blocks::Random;
            if let Err(e) = check_grid(ty, &src, &format!("{kind:?}"), finite) {
                failures.push(e);
            }
        }
    }
    report(failures);
}

macro_rules! grid_tests {
    ($($name:ident: $ty:ident,)*) => {
        $(
            #[test]
            fn $name() {
                grid_iquant(GgmlType::$ty);
            }
        )*
        /// The tests above cover exactly GRID_TYPES.
        #[test]
        fn grid_tests_cover_every_grid_type() {
            let mut covered = vec![$(GgmlType::$ty),*];
            covered.sort();
            let mut all = GRID_TYPES.to_vec();
            all.sort();
            assert_eq!(covered, all);
        }
    };
}

grid_tests! {
    dequantize_any_iq1_s: IQ1_S,
    dequantize_any_iq1_m: IQ1_M,
    dequantize_any_iq2_xxs: IQ2_XXS,
    dequantize_any_iq2_xs: IQ2_XS,
    dequantize_any_iq2_s: IQ2_S,
    dequantize_any_iq3_xxs: IQ3_XXS,
    dequantize_any_iq3_s: IQ3_S,
}

/// F32, F64 and the integer types have no ggml `to_float`; gguf-io's conversions
/// for them are checked against plain Rust casts instead (what ggml's CPU ops do:
/// `(float) x`). Q8_1 has no ggml dequantizer at all (`dequantize_row_q8_1` is
/// commented out in ggml-quants.h) and is not checked here.
#[test]
fn types_without_ggml_to_float_are_plain_casts() {
    let mut rng = Rng::new(7);
    let raw = rng.bytes(8 * 4096);
    let check = |ty: GgmlType, f: &dyn Fn(&[u8]) -> f32| {
        let (_, ts) = block_geometry(ty);
        let v = dequant::dequantize_any_to_vec(ty, &raw, raw.len() / ts).unwrap();
        for (i, c) in raw.chunks_exact(ts).enumerate() {
            assert_eq!(v[i].to_bits(), f(c).to_bits(), "{ty} element {i}");
        }
    };
    check(GgmlType::F32, &|c| {
        f32::from_le_bytes(c.try_into().unwrap())
    });
    check(GgmlType::F64, &|c| {
        f64::from_le_bytes(c.try_into().unwrap()) as f32
    });
    check(GgmlType::I8, &|c| f32::from(c[0] as i8));
    check(GgmlType::I16, &|c| {
        f32::from(i16::from_le_bytes(c.try_into().unwrap()))
    });
    check(GgmlType::I32, &|c| {
        i32::from_le_bytes(c.try_into().unwrap()) as f32
    });
    check(GgmlType::I64, &|c| {
        i64::from_le_bytes(c.try_into().unwrap()) as f32
    });
}
