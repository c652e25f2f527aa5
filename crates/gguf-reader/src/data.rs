//! Tensor data inspection: the first values and a summary over the whole tensor,
//! dequantized chunk by chunk (never the whole tensor in memory as f32) on all cores.

use gguf_io::quant::{self, QuantError};
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
) -> Result<(), QuantError> {
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
        quant::dequantize(ty, &chunk, &mut out[..n])?;
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
) -> Result<TensorData, QuantError> {
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
    let results: Vec<Result<(Vec<f32>, SummaryAccumulator), QuantError>> =
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
