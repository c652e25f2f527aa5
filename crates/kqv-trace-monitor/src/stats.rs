//! The statistics on each monitor line: a captured tensor dequantized and summarised
//! chunk by chunk (mean, std, min, max, NaN/Inf counts; `tensor_stats::Summary`).
//!
//! A tensor's summary merges (Chan et al.) its chunks' summaries, each a pure function of
//! that chunk's bytes, pairwise up a binary tree: leaf `i` is chunk `i`, the leaves are
//! padded with empty summaries to a power of two (merging an empty summary changes no
//! bit), and every inner node merges its two children. KV-cache views arrive with a
//! [`Revision`](ggml_trace::capture::Revision) saying which bytes changed since the same
//! layer and role's previous capture (a decode step writes one cell), so [`Stats`] keeps
//! each view's tree and recomputes only the changed chunks and their ancestors (one
//! changed chunk of 64: 1 chunk pass and 6 merges instead of 64 passes and 63 merges).
//! The result is bit for bit the one computed from scratch, which builds the same tree.

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

/// The merge tree kept for one (layer, role)'s KV-cache view.
struct Kept {
    revision: u64,
    ty: GgmlType,
    n_bytes: usize,
    tree: Tree,
}

/// Chunk summaries merged pairwise: `nodes[1]` is the root, `nodes[i]` merges
/// `nodes[2i]` and `nodes[2i + 1]`, the leaves are `nodes[width..width + n_chunks]`
/// and `nodes[width + n_chunks..]` are empty.
#[derive(Default)]
struct Tree {
    n_chunks: usize,
    width: usize,
    nodes: Vec<SummaryAccumulator>,
}

impl Tree {
    /// Empty leaves for `n_chunks` chunks (inner nodes to be computed).
    fn reset(&mut self, n_chunks: usize) {
        self.n_chunks = n_chunks;
        self.width = n_chunks.max(1).next_power_of_two();
        self.nodes.clear();
        self.nodes.resize(2 * self.width, SummaryAccumulator::new());
    }

    fn merged(&self, i: usize) -> SummaryAccumulator {
        let mut acc = self.nodes[2 * i];
        acc.merge(&self.nodes[2 * i + 1]);
        acc
    }

    /// Compute every inner node from the leaves.
    fn build(&mut self) {
        for i in (1..self.width).rev() {
            self.nodes[i] = self.merged(i);
        }
    }

    /// Recompute the ancestors of the leaves flagged in `dirty` (indexed by node; the
    /// flags are cleared).
    fn update(&mut self, dirty: &mut [bool]) {
        let mut lo = self.width;
        let mut hi = self.width + self.n_chunks;
        while lo > 1 {
            let (plo, phi) = (lo / 2, (hi - 1) / 2 + 1);
            for child in lo..hi {
                if std::mem::take(&mut dirty[child]) {
                    dirty[child / 2] = true;
                }
            }
            for (i, _) in dirty
                .iter()
                .enumerate()
                .take(phi)
                .skip(plo)
                .filter(|(_, d)| **d)
            {
                self.nodes[i] = self.merged(i);
            }
            (lo, hi) = (plo, phi);
        }
        dirty[1] = false;
    }

    fn root(&self) -> SummaryAccumulator {
        self.nodes[1]
    }
}

/// Summarises captured tensors, reusing the chunks of KV-cache views that did not change.
#[derive(Default)]
pub struct Stats {
    kept: HashMap<(i32, Role), Kept>,
    buf: Vec<f32>,
    /// The tree of a tensor that is not kept.
    scratch: Tree,
    /// Per tree node: does it need recomputing (all false between calls).
    dirty: Vec<bool>,
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
        let n_chunks = n.div_ceil(chunk_elems);
        self.buf.resize(chunk_elems.min(n), 0.0);
        let Some(rev) = &t.revision else {
            // Not a kept view: build a tree for this tensor alone.
            let mut tree = std::mem::take(&mut self.scratch);
            let built = self.fill(&mut tree, ty, data, n, chunk_elems, chunk_bytes);
            let root = tree.root();
            self.scratch = tree;
            built?;
            return Ok(root.finish());
        };
        let key = (t.meta.layer, t.meta.role);
        let mut kept = self.kept.remove(&key).unwrap_or_else(|| Kept {
            revision: 0,
            ty,
            n_bytes: usize::MAX,
            tree: Tree::default(),
        });
        // The changed byte ranges, when the kept tree describes the other bytes.
        let ranges = rev.since.as_ref().and_then(|(since, ranges)| {
            (kept.revision == *since
                && kept.ty == ty
                && kept.n_bytes == data.len()
                && kept.tree.n_chunks == n_chunks)
                .then_some(ranges)
        });
        let done = match ranges {
            None => self.fill(&mut kept.tree, ty, data, n, chunk_elems, chunk_bytes),
            Some(ranges) => self.refill(
                &mut kept.tree,
                ranges,
                ty,
                data,
                n,
                chunk_elems,
                chunk_bytes,
            ),
        };
        // A failed update leaves a tree that no longer matches its revision: drop it.
        done?;
        let root = kept.tree.root();
        kept.revision = rev.id;
        kept.ty = ty;
        kept.n_bytes = data.len();
        self.kept.insert(key, kept);
        Ok(root.finish())
    }

    /// Summarise every chunk into `tree`.
    fn fill(
        &mut self,
        tree: &mut Tree,
        ty: GgmlType,
        data: &[u8],
        n: usize,
        chunk_elems: usize,
        chunk_bytes: usize,
    ) -> Result<(), String> {
        let n_chunks = n.div_ceil(chunk_elems);
        tree.reset(n_chunks);
        for i in 0..n_chunks {
            tree.nodes[tree.width + i] = self.chunk(ty, data, i, n, chunk_elems, chunk_bytes)?;
        }
        tree.build();
        Ok(())
    }

    /// Summarise again the chunks that `ranges` (sorted, disjoint byte ranges) touch and
    /// merge their ancestors again; the other chunks keep their summaries.
    #[allow(clippy::too_many_arguments)]
    fn refill(
        &mut self,
        tree: &mut Tree,
        ranges: &[Range<usize>],
        ty: GgmlType,
        data: &[u8],
        n: usize,
        chunk_elems: usize,
        chunk_bytes: usize,
    ) -> Result<(), String> {
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.clear();
        dirty.resize(tree.nodes.len(), false);
        let mut result = Ok(());
        for r in ranges {
            if r.start >= r.end {
                continue;
            }
            let lo = r.start / chunk_bytes;
            let hi = ((r.end - 1) / chunk_bytes + 1).min(tree.n_chunks);
            for i in lo..hi {
                if dirty[tree.width + i] {
                    continue;
                }
                match self.chunk(ty, data, i, n, chunk_elems, chunk_bytes) {
                    Ok(acc) => tree.nodes[tree.width + i] = acc,
                    Err(e) => result = Err(e),
                }
                dirty[tree.width + i] = true;
            }
        }
        self.reused_chunks += (tree.n_chunks - dirty.iter().filter(|d| **d).count()) as u64;
        tree.update(&mut dirty);
        self.dirty = dirty;
        result
    }

    /// Dequantize and summarise chunk `i` of `n` elements.
    fn chunk(
        &mut self,
        ty: GgmlType,
        data: &[u8],
        i: usize,
        n: usize,
        chunk_elems: usize,
        chunk_bytes: usize,
    ) -> Result<SummaryAccumulator, String> {
        let start = i * chunk_elems;
        let k = chunk_elems.min(n - start);
        let at = i * chunk_bytes;
        let end = if k == chunk_elems {
            at + chunk_bytes
        } else {
            data.len()
        };
        let src = data.get(at..end).ok_or("short tensor data")?;
        quant::dequantize(ty, src, &mut self.buf[..k]).map_err(|e| e.to_string())?;
        let mut acc = SummaryAccumulator::new();
        acc.push(&self.buf[..k]);
        self.computed_chunks += 1;
        Ok(acc)
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

    /// Chunk boundaries: a range ending exactly where a chunk starts leaves that chunk
    /// alone, one byte more reaches it; ranges out of order or overlapping recompute each
    /// chunk once; a range past the end is clipped.
    #[test]
    #[allow(clippy::single_range_in_vec_init)]
    fn changed_ranges_pick_exactly_their_chunks() {
        let ty = GgmlType(1); // F16: a chunk is 1024 elements, 2048 bytes
        let ne = [256u64, 40, 1, 1]; // 10 chunks
        let data: Vec<u8> = (0..256 * 40)
            .flat_map(|i| quant::f32_to_f16((i as f32 * 0.37).sin()).to_le_bytes())
            .collect();
        let cases: [(Vec<Range<usize>>, u64); 6] = [
            (vec![0..2048], 1),
            (vec![2047..2048], 1),
            (vec![2047..2049], 2),
            (vec![6000..6002, 100..110, 6001..6003], 2),
            (vec![18000..40000], 2),
            (vec![], 0),
        ];
        for (ranges, want) in cases {
            let mut stats = Stats::new();
            let first = tensor(ty, ne, data.clone(), Some(Revision { id: 1, since: None }));
            stats.summarize(&first).unwrap();
            let c0 = stats.computed_chunks;
            let next = tensor(
                ty,
                ne,
                data.clone(),
                Some(Revision {
                    id: 2,
                    since: Some((1, ranges.clone())),
                }),
            );
            let got = stats.summarize(&next).unwrap();
            assert_eq!(stats.computed_chunks - c0, want, "{ranges:?}");
            assert_eq!(bits(&got), bits(&summarize(&next).unwrap()));
        }
    }
}
