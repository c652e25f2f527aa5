//! The statistics on each monitor line: a captured tensor dequantized and summarised
//! chunk by chunk (mean, std, min, max, NaN/Inf counts; `tensor_stats::Summary`).
//!
//! A tensor's summary is the in-order merge (Chan et al.) of its chunks' summaries, each
//! a pure function of that chunk's bytes. KV-cache views arrive with a
//! [`Revision`](ggml_trace::capture::Revision) saying which bytes changed since the same
//! layer and role's previous capture (a decode step writes one cell), so [`Stats`] keeps
//! each view's chunk summaries and recomputes only the chunks that changed: the result
//! is bit for bit the one computed from scratch, at a fraction of the cost.

use std::collections::HashMap;
use std::ops::Range;

use ggml_trace::capture::CapturedTensor;
use gguf_io::{quant, GgmlType};
use tensor_stats::{Summary, SummaryAccumulator};
use trace_format::Role;

/// Elements per chunk (rounded down to whole blocks of quantized types): small enough
/// that one new KV cell touches few chunks, large enough that the per-chunk merge is
/// noise next to the summary passes.
pub const CHUNK_ELEMENTS: usize = 1024;

/// Chunk summaries kept for one (layer, role)'s KV-cache view.
struct Kept {
    revision: u64,
    ty: GgmlType,
    n_bytes: usize,
    chunks: Vec<SummaryAccumulator>,
}

/// Summarises captured tensors, reusing the chunks of KV-cache views that did not change.
#[derive(Default)]
pub struct Stats {
    kept: HashMap<(i32, Role), Kept>,
    buf: Vec<f32>,
    /// Chunks summarised and chunks reused since the start (for tests and benchmarks).
    pub computed_chunks: u64,
    pub reused_chunks: u64,
}

/// Elements and bytes of a full chunk of `ty`.
fn chunk_size(ty: GgmlType) -> Result<(usize, usize), String> {
    let block = ty.info().map_or(1, |i| i.block_size as usize).max(1);
    let elems = (CHUNK_ELEMENTS / block).max(1) * block;
    let bytes =
        ty.bytes_for(elems as u64)
            .ok_or_else(|| format!("cannot size chunks of type {}", ty.name()))? as usize;
    Ok((elems, bytes))
}

/// Does any of the sorted, disjoint `ranges` (from index `*at` on) overlap `chunk`?
/// Advances `*at` past ranges that end before the chunk (chunks arrive in order).
fn touched(ranges: &[Range<usize>], at: &mut usize, chunk: &Range<usize>) -> bool {
    while *at < ranges.len() && ranges[*at].end <= chunk.start {
        *at += 1;
    }
    *at < ranges.len() && ranges[*at].start < chunk.end
}

impl Stats {
    pub fn new() -> Self {
        Self::default()
    }

    /// The summary of one captured tensor.
    pub fn summarize(&mut self, t: &CapturedTensor) -> Result<Summary, String> {
        let ty = t.meta.layout.ty;
        let n = t.meta.layout.n_elements() as usize;
        let (chunk_elems, chunk_bytes) = chunk_size(ty)?;
        let data: &[u8] = &t.data;
        let key = (t.meta.layer, t.meta.role);
        // The previous chunks and the changed byte ranges, when they describe these bytes.
        let kept = self.kept.remove(&key);
        let previous = t.revision.as_ref().and_then(|r| {
            let (since, ranges) = r.since.as_ref()?;
            let k = kept.as_ref()?;
            (k.revision == *since && k.ty == ty && k.n_bytes == data.len())
                .then_some((&k.chunks, ranges))
        });
        let n_chunks = n.div_ceil(chunk_elems);
        let mut chunks = Vec::with_capacity(if t.revision.is_some() { n_chunks } else { 0 });
        let mut total = SummaryAccumulator::new();
        let mut range_at = 0usize;
        let (mut done, mut at) = (0usize, 0usize);
        self.buf.resize(chunk_elems.min(n), 0.0);
        while done < n {
            let k = chunk_elems.min(n - done);
            let nb = if k == chunk_elems {
                chunk_bytes
            } else {
                data.len().saturating_sub(at)
            };
            let bytes = at..at + nb;
            let reuse = previous.and_then(|(old, ranges)| {
                let i = done / chunk_elems;
                (!touched(ranges, &mut range_at, &bytes))
                    .then(|| old.get(i).copied())
                    .flatten()
            });
            let acc = match reuse {
                Some(acc) => {
                    self.reused_chunks += 1;
                    acc
                }
                None => {
                    let src = data.get(bytes).ok_or("short tensor data")?;
                    quant::dequantize(ty, src, &mut self.buf[..k]).map_err(|e| e.to_string())?;
                    let mut acc = SummaryAccumulator::new();
                    acc.push(&self.buf[..k]);
                    self.computed_chunks += 1;
                    acc
                }
            };
            total.merge(&acc);
            if t.revision.is_some() {
                chunks.push(acc);
            }
            done += k;
            at += nb;
        }
        if let Some(r) = &t.revision {
            self.kept.insert(
                key,
                Kept {
                    revision: r.id,
                    ty,
                    n_bytes: data.len(),
                    chunks,
                },
            );
        }
        Ok(total.finish())
    }
}

/// The summary of a captured tensor, computed from scratch.
pub fn summarize(t: &CapturedTensor) -> Result<Summary, String> {
    let fresh = CapturedTensor {
        meta: t.meta.clone(),
        data: t.data.clone(),
        revision: None,
    };
    Stats::new().summarize(&fresh)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ggml_trace::capture::Revision;
    use std::sync::Arc;
    use trace_format::layout::differing_ranges;
    use trace_format::{TensorLayout, TensorMeta};

    fn bits(s: &Summary) -> [u64; 9] {
        [
            s.count,
            s.finite,
            s.mean.to_bits(),
            s.std.to_bits(),
            s.min.to_bits(),
            s.max.to_bits(),
            s.nan,
            s.pos_inf,
            s.neg_inf,
        ]
    }

    fn tensor(ty: GgmlType, ne: [u64; 4], data: Vec<u8>, rev: Option<Revision>) -> CapturedTensor {
        CapturedTensor {
            meta: TensorMeta {
                role: Role::K,
                layer: 3,
                step: 0,
                ggml_name: "cache_k_l3 (view)".into(),
                op: "VIEW".into(),
                layout: TensorLayout::contiguous(ty, ne).unwrap(),
                view_of: "cache_k_l3".into(),
            },
            data: Arc::new(data),
            revision: rev,
        }
    }

    /// A sequence of revisions of an F16 and a Q8_0 view (one cell written per step,
    /// several cells, a NaN appearing and going, nothing at all): every summary equals the
    /// from-scratch one bit for bit, unchanged chunks are reused, and a revision that does
    /// not follow the kept one (or a resized view) is computed in full.
    #[test]
    fn reused_chunks_give_the_from_scratch_bits() {
        let mut seed = 0x1234_5678_9abc_def1u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for (ty, ne) in [
            (GgmlType(1), [256u64, 100, 2, 1]),
            (GgmlType(8), [256u64, 70, 1, 1]),
        ] {
            let layout = TensorLayout::contiguous(ty, ne).unwrap();
            let n_bytes = layout.n_bytes().unwrap() as usize;
            let row = n_bytes / (ne[1] * ne[2]) as usize;
            let mut data: Vec<u8> = (0..n_bytes).map(|_| next() as u8).collect();
            if ty == GgmlType(1) {
                // Finite F16 values only (exponent below all ones), then planted specials.
                for h in data.chunks_mut(2) {
                    h[1] &= 0xbb;
                }
            } else {
                // Q8_0 scales as small finite F16 values.
                for b in data.chunks_mut(34) {
                    b[0] = 0x00;
                    b[1] = 0x2c;
                }
            }
            let mut stats = Stats::new();
            let mut id = 1u64;
            let first = tensor(ty, ne, data.clone(), Some(Revision { id, since: None }));
            assert_eq!(
                bits(&stats.summarize(&first).unwrap()),
                bits(&summarize(&first).unwrap())
            );
            let mut reused_any = false;
            for step in 0..12usize {
                let before = data.clone();
                match step % 4 {
                    0 => {
                        // One new cell.
                        let cell = next() as usize % (ne[1] as usize);
                        for b in &mut data[cell * row..cell * row + 4] {
                            *b = b.wrapping_add(1);
                        }
                    }
                    1 if ty == GgmlType(1) => {
                        // A NaN in a cell (F16 0x7e00), removed again two steps later.
                        data[10] = 0x00;
                        data[11] = 0x7e;
                    }
                    3 if ty == GgmlType(1) => {
                        data[10] = before[10] ^ 1;
                        data[11] = 0x3c;
                    }
                    2 => {}
                    _ => {
                        let at = next() as usize % (n_bytes - 40);
                        for b in &mut data[at..at + 40] {
                            *b = (*b & 0x3f) | 0x08;
                        }
                    }
                }
                let prev = id;
                id += 1;
                let t = tensor(
                    ty,
                    ne,
                    data.clone(),
                    Some(Revision {
                        id,
                        since: Some((prev, differing_ranges(&before, &data, 1))),
                    }),
                );
                let r0 = stats.reused_chunks;
                let got = stats.summarize(&t).unwrap();
                reused_any |= stats.reused_chunks > r0;
                assert_eq!(
                    bits(&got),
                    bits(&summarize(&t).unwrap()),
                    "{ty:?} step {step}"
                );
            }
            assert!(reused_any, "{ty:?}: no chunk was reused");
            // A revision that claims another predecessor is summarised in full.
            data[0] ^= 0x01;
            let stray = tensor(
                ty,
                ne,
                data.clone(),
                Some(Revision {
                    id: id + 10,
                    since: Some((id + 5, Vec::new())),
                }),
            );
            let c0 = stats.computed_chunks;
            assert_eq!(
                bits(&stats.summarize(&stray).unwrap()),
                bits(&summarize(&stray).unwrap())
            );
            assert_eq!(
                stats.computed_chunks - c0,
                (layout.n_elements() as usize).div_ceil(chunk_size(ty).unwrap().0) as u64
            );
        }
    }

    /// The chunk boundaries: a range ending exactly where a chunk starts does not touch
    /// it; one byte inside does.
    #[test]
    fn touched_respects_half_open_ranges() {
        let ranges = [0..10, 20..21, 40..50];
        let mut at = 0;
        assert!(touched(&ranges, &mut at, &(0..10)));
        assert!(!touched(&ranges, &mut at, &(10..20)));
        assert!(touched(&ranges, &mut at, &(20..30)));
        assert!(!touched(&ranges, &mut at, &(30..40)));
        assert!(touched(&ranges, &mut at, &(49..60)));
        assert!(!touched(&ranges, &mut at, &(50..60)));
    }
}
