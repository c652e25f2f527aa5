//! Tensor data inspection: the first values and a summary over the whole tensor,
//! dequantized chunk by chunk (never the whole tensor in memory as f32) on all cores.
//!
//! Every current ggml type can be shown: gguf-io's pure-Rust dequantizer where it has
//! one, ggml's own `to_float` for the grid i-quants (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS,
//! IQ2_S, IQ3_XXS, IQ3_S), through [`ggml_trace::dequant::dequantize_any`].

use ggml_trace::dequant::{dequantize_any, DequantError};
use gguf_io::{ByteOrder, GgmlType, TensorInfo};
use tensor_stats::{Summary, SummaryAccumulator};

/// Elements dequantized at a time: a multiple of every block size (32, 64, 128, 256),
/// small enough to stay in L2.
const CHUNK_ELEMS: usize = 1 << 15;
/// Tensors at least this large are split across threads.
const PARALLEL_MIN_ELEMS: u64 = 1 << 21;

/// What `--show-data` shows for one tensor.
#[derive(Clone, Debug)]
pub struct TensorData {
    pub first: Vec<f32>,
    pub summary: Summary,
}

/// Dequantize `[start, start + n)` elements chunk by chunk into `acc`, keeping the
/// first `keep` values in `first`.
fn scan(
    ty: GgmlType,
    order: ByteOrder,
    bytes: &[u8],
    n_elements: usize,
    keep: usize,
    first: &mut Vec<f32>,
    acc: &mut SummaryAccumulator,
) -> Result<(), DequantError> {
    let bytes_per_chunk = ty.bytes_for(CHUNK_ELEMS as u64).unwrap_or(0) as usize;
    let mut out = vec![0f32; CHUNK_ELEMS.min(n_elements)];
    let mut done = 0usize;
    let mut src = bytes;
    while done < n_elements {
        let n = CHUNK_ELEMS.min(n_elements - done);
        let nb = if n == CHUNK_ELEMS {
            bytes_per_chunk
        } else {
            src.len()
        };
        let (chunk, rest) = src.split_at(nb.min(src.len()));
        let chunk = gguf_io::to_little_endian(ty, order, chunk);
        dequantize_any(ty, &chunk, &mut out[..n])?;
        if first.len() < keep {
            let take = (keep - first.len()).min(n);
            first.extend_from_slice(&out[..take]);
        }
        acc.push(&out[..n]);
        done += n;
        src = rest;
    }
    Ok(())
}

/// Inspect one tensor's bytes (already bounds-checked by the reader).
pub fn inspect(
    t: &TensorInfo,
    bytes: &[u8],
    order: ByteOrder,
    keep: usize,
) -> Result<TensorData, DequantError> {
    let n = t.n_elements as usize;
    let mut first = Vec::with_capacity(keep.min(n));
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if t.n_elements < PARALLEL_MIN_ELEMS || threads < 2 {
        let mut acc = SummaryAccumulator::new();
        scan(t.ty, order, bytes, n, keep, &mut first, &mut acc)?;
        return Ok(TensorData {
            first,
            summary: acc.finish(),
        });
    }
    // Split on chunk boundaries so every piece is whole blocks.
    let n_chunks = n.div_ceil(CHUNK_ELEMS);
    let per_thread = n_chunks.div_ceil(threads);
    let bytes_per_chunk = t.ty.bytes_for(CHUNK_ELEMS as u64).unwrap_or(0) as usize;
    let results: Vec<Result<(Vec<f32>, SummaryAccumulator), DequantError>> =
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .filter_map(|i| {
                    let c0 = i * per_thread;
                    let c1 = ((i + 1) * per_thread).min(n_chunks);
                    (c0 < c1).then_some((c0, c1))
                })
                .map(|(c0, c1)| {
                    let e0 = c0 * CHUNK_ELEMS;
                    let e1 = (c1 * CHUNK_ELEMS).min(n);
                    let b0 = c0 * bytes_per_chunk;
                    let b1 = (c1 * bytes_per_chunk).min(bytes.len());
                    let piece = &bytes[b0.min(b1)..b1];
                    let keep_here = if c0 == 0 { keep } else { 0 };
                    s.spawn(move || {
                        let mut acc = SummaryAccumulator::new();
                        let mut f = Vec::new();
                        scan(t.ty, order, piece, e1 - e0, keep_here, &mut f, &mut acc)?;
                        Ok((f, acc))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
    let mut acc = SummaryAccumulator::new();
    for (i, r) in results.into_iter().enumerate() {
        let (f, a) = r?;
        if i == 0 {
            first = f;
        }
        acc.merge(&a);
    }
    Ok(TensorData {
        first,
        summary: acc.finish(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ggml_trace::dequant::ggml_to_float;
    use tensor_stats::Summary;

    /// IQ2_XXS: `d: f16` then 64 bytes of grid indices, signs and 4-bit scales.
    const IQ2_XXS_BLOCK: usize = 66;

    fn tensor(ty: GgmlType, n_elements: u64, n_bytes: u64) -> TensorInfo {
        TensorInfo {
            name: "t".into(),
            dims: vec![n_elements],
            ty,
            offset: 0,
            n_elements,
            n_bytes,
        }
    }

    /// Random IQ2_XXS blocks (xorshift) with finite scales of moderate size.
    fn iq2_xxs_blocks(n_blocks: usize, seed: u64) -> Vec<u8> {
        let mut s = seed;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let mut bytes: Vec<u8> = (0..n_blocks * IQ2_XXS_BLOCK)
            .map(|_| next() as u8)
            .collect();
        for b in bytes.chunks_exact_mut(IQ2_XXS_BLOCK) {
            // sign, exponent 10..=19 (2^-5 .. 2^4), random mantissa.
            let d = (((next() & 1) << 15) | ((10 + next() % 10) << 10) | (next() & 0x3ff)) as u16;
            b[..2].copy_from_slice(&d.to_le_bytes());
        }
        bytes
    }

    #[test]
    fn iq2_xxs_known_block() {
        // d = 1.0, all-zero indices: grid entry 0 (all 8s) times (0.5 + 0) * 0.25.
        let mut bytes = vec![0u8; 2 * IQ2_XXS_BLOCK];
        bytes[..2].copy_from_slice(&0x3c00u16.to_le_bytes());
        bytes[IQ2_XXS_BLOCK..IQ2_XXS_BLOCK + 2].copy_from_slice(&0xc000u16.to_le_bytes()); // -2.0
        let t = tensor(GgmlType::IQ2_XXS, 512, bytes.len() as u64);
        let d = inspect(&t, &bytes, ByteOrder::Little, 300).unwrap();
        assert_eq!(d.first.len(), 300);
        assert!(d.first[..256].iter().all(|&v| v == 1.0));
        assert!(d.first[256..].iter().all(|&v| v == -2.0));
        assert_eq!(d.summary.count, 512);
        assert_eq!(d.summary.finite, 512);
        assert_eq!((d.summary.min, d.summary.max), (-2.0, 1.0));
        assert_eq!(d.summary.mean, -0.5);
    }

    #[test]
    fn iq2_xxs_matches_ggml_serial_and_parallel() {
        // Small (one thread), and above PARALLEL_MIN_ELEMS with a partial last chunk.
        for n_blocks in [
            37usize,
            (PARALLEL_MIN_ELEMS as usize + 3 * CHUNK_ELEMS) / 256 + 5,
        ] {
            let bytes = iq2_xxs_blocks(n_blocks, 0x1234_5678 + n_blocks as u64);
            let n = n_blocks * 256;
            let t = tensor(GgmlType::IQ2_XXS, n as u64, bytes.len() as u64);
            let d = inspect(&t, &bytes, ByteOrder::Little, 1000).unwrap();

            let mut want = vec![0f32; n];
            ggml_to_float(GgmlType::IQ2_XXS, &bytes, &mut want).unwrap();
            assert_eq!(d.first, want[..1000.min(n)]);
            let s = Summary::of(&want);
            assert_eq!(d.summary.count, n as u64);
            assert_eq!(d.summary.finite, s.finite);
            assert_eq!((d.summary.min, d.summary.max), (s.min, s.max));
            assert!((d.summary.mean - s.mean).abs() <= 1e-9 * s.std.max(1.0));
            assert!((d.summary.std - s.std).abs() <= 1e-9 * s.std.max(1.0));
            assert!(s.std > 0.0);
        }
    }

    #[test]
    fn size_errors_are_reported() {
        let bytes = vec![0u8; IQ2_XXS_BLOCK - 1];
        let t = tensor(GgmlType::IQ2_XXS, 256, bytes.len() as u64);
        let e = inspect(&t, &bytes, ByteOrder::Little, 4).unwrap_err();
        assert!(matches!(e, DequantError::LengthMismatch { .. }), "{e}");
    }
}
