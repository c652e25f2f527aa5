//! Benchmark inputs shared by gguf-io's benchmark and ggml-trace's
//! dequantization comparison (`#[path]`-included there, so both measure the same bytes).

use gguf_io::GgmlType;

/// Elements per dequantization benchmark (a whole number of blocks of every type).
pub const N_ELEMENTS: usize = 1 << 20;

/// Deterministic source bytes: xorshift noise with every f16 field a block type uses as
/// a scale set to a modest finite value, so the benchmark measures the normal path (no
/// NaN/inf/subnormal arithmetic).
pub fn source_bytes(ty: GgmlType, n: usize) -> Vec<u8> {
    let len = ty.bytes_for(n as u64).expect("whole blocks") as usize;
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(ty.0);
    let mut bytes: Vec<u8> = (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect();
    let info = ty.info().expect("known type");
    let scale_offsets: &[usize] = match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 | GgmlType::IQ4_NL => &[0],
        GgmlType::IQ4_XS | GgmlType::Q1_0 | GgmlType::Q2_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q8_1 => &[0, 2],
        GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
        GgmlType::Q2_K => &[80, 82],
        GgmlType::Q3_K => &[108],
        GgmlType::Q6_K => &[208],
        GgmlType::TQ1_0 => &[52],
        GgmlType::TQ2_0 => &[64],
        GgmlType::F16 => {
            return bytes
                .chunks_exact(2)
                .flat_map(|_| 0x3c00u16.to_le_bytes())
                .collect()
        }
        GgmlType::Q8_K => {
            for b in bytes.chunks_exact_mut(info.type_size as usize) {
                b[..4].copy_from_slice(&0.01f32.to_le_bytes());
            }
            return bytes;
        }
        _ => &[],
    };
    for block in bytes.chunks_exact_mut(info.type_size as usize) {
        for &off in scale_offsets {
            block[off..off + 2].copy_from_slice(&0x2e66u16.to_le_bytes()); // ~0.1
        }
    }
    bytes
}
