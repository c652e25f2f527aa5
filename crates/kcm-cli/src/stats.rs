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

    /// Recompute the ancestors of the chunks in `changed` (sorted, no repeats; left
    /// holding the root's index).
    fn update(&mut self, changed: &mut Vec<usize>) {
        for i in changed.iter_mut() {
            *i += self.width;
        }
        // Every leaf is at the same depth: the indices reach the root together.
        while changed.first().is_some_and(|&i| i > 1) {
            for i in changed.iter_mut() {
                *i /= 2;
            }
            changed.dedup();
            for &i in changed.iter() {
                self.nodes[i] = self.merged(i);
            }
        }
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
    /// The chunks a revision changed (scratch).
    changed: Vec<usize>,
    /// Chunks summarised and chunks reused since the start (for tests and benchmarks).
    pub computed_chunks: u64,
    pub reused_chunks: u64,
}

/// How a tensor's bytes split into chunks.
#[derive(Clone, Copy)]
struct Chunks {
    ty: GgmlType,
    /// Elements in the tensor.
    n: usize,
    /// Elements and bytes of a full chunk (whole blocks of quantized types).
    elems: usize,
    bytes: usize,
}

impl Chunks {
    fn of(t: &CapturedTensor) -> Result<Self, String> {
        let ty = t.meta.layout.ty;
        let block = ty.info().map_or(1, |i| i.block_size as usize).max(1);
        let elems = (CHUNK_ELEMENTS / block).max(1) * block;
        let bytes = ty
            .bytes_for(elems as u64)
            .ok_or_else(|| format!("cannot size chunks of type {}", ty.name()))?
            as usize;
        Ok(Chunks {
            ty,
            n: t.meta.layout.n_elements() as usize,
            elems,
            bytes,
        })
    }

    fn count(&self) -> usize {
        self.n.div_ceil(self.elems)
    }
}

impl Stats {
    pub fn new() -> Self {
        Self::default()
    }

    /// The summary of one captured tensor.
    pub fn summarize(&mut self, t: &CapturedTensor) -> Result<Summary, String> {
        let c = Chunks::of(t)?;
        let data: &[u8] = &t.data;
        self.buf.resize(c.elems.min(c.n), 0.0);
        let Some(rev) = &t.revision else {
            // Not a kept view: build a tree for this tensor alone.
            let mut tree = std::mem::take(&mut self.scratch);
            let built = self.fill(&mut tree, c, data);
            let root = tree.root();
            self.scratch = tree;
            built?;
            return Ok(root.finish());
        };
        let key = (t.meta.layer, t.meta.role);
        let mut kept = self.kept.remove(&key).unwrap_or_else(|| Kept {
            revision: 0,
            ty: c.ty,
            n_bytes: usize::MAX,
            tree: Tree::default(),
        });
        // The changed byte ranges, when the kept tree describes the other bytes.
        let ranges = rev.since.as_ref().and_then(|(since, ranges)| {
            (kept.revision == *since
                && kept.ty == c.ty
                && kept.n_bytes == data.len()
                && kept.tree.n_chunks == c.count())
            .then_some(ranges)
        });
        let done = match ranges {
            None => self.fill(&mut kept.tree, c, data),
            Some(ranges) => self.refill(&mut kept.tree, ranges, c, data),
        };
        // A failed update leaves a tree that no longer matches its revision: drop it.
        done?;
        let root = kept.tree.root();
        kept.revision = rev.id;
        kept.ty = c.ty;
        kept.n_bytes = data.len();
        self.kept.insert(key, kept);
        Ok(root.finish())
    }

    /// Summarise every chunk into `tree`.
    fn fill(&mut self, tree: &mut Tree, c: Chunks, data: &[u8]) -> Result<(), String> {
        tree.reset(c.count());
        for i in 0..c.count() {
            tree.nodes[tree.width + i] = self.chunk(c, data, i)?;
        }
        tree.build();
        Ok(())
    }

    /// Summarise again the chunks that `ranges` (byte ranges) touch and merge their
    /// ancestors again; the other chunks keep their summaries.
    fn refill(
        &mut self,
        tree: &mut Tree,
        ranges: &[Range<usize>],
        c: Chunks,
        data: &[u8],
    ) -> Result<(), String> {
        let mut changed = std::mem::take(&mut self.changed);
        changed.clear();
        for r in ranges.iter().filter(|r| r.start < r.end) {
            let hi = ((r.end - 1) / c.bytes + 1).min(tree.n_chunks);
            changed.extend(r.start / c.bytes..hi);
        }
        changed.sort_unstable();
        changed.dedup();
        let mut result = Ok(());
        for &i in &changed {
            match self.chunk(c, data, i) {
                Ok(acc) => tree.nodes[tree.width + i] = acc,
                Err(e) => result = Err(e),
            }
        }
        self.reused_chunks += (tree.n_chunks - changed.len()) as u64;
        tree.update(&mut changed);
        self.changed = changed;
        result
    }

    /// Dequantize and summarise chunk `i`.
    fn chunk(&mut self, c: Chunks, data: &[u8], i: usize) -> Result<SummaryAccumulator, String> {
        let k = c.elems.min(c.n - i * c.elems);
        let at = i * c.bytes;
        let end = if k == c.elems {
            at + c.bytes
        } else {
            data.len()
        };
        let src = data.get(at..end).ok_or("short tensor data")?;
        quant::dequantize(c.ty, src, &mut self.buf[..k]).map_err(|e| e.to_string())?;
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
        graph_order: None,
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
            graph_order: None,
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
                Chunks::of(&stray).unwrap().count() as u64
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
