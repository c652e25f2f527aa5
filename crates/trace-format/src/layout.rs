//! Tensor layout: type, shape (`ne`) and byte strides (`nb`) as ggml records them, and
//! the gather that turns a strided view (a permuted K cache view, a transposed V view)
//! into logical contiguous order, ne0 fastest.
//!
//! ggml addresses element (i0, i1, i2, i3) of a tensor at byte
//! `i0/blck*nb0 + i1*nb1 + i2*nb2 + i3*nb3`; for block-quantized types a row of `ne0`
//! elements must be contiguous (nb0 = block bytes).

use gguf_io::GgmlType;

/// Why a layout cannot be gathered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("unknown ggml type {0}")]
    UnknownType(GgmlType),
    #[error("ne0 = {ne0} is not a whole number of {ty} blocks")]
    NotWholeBlocks { ty: GgmlType, ne0: u64 },
    #[error("{ty} rows must be contiguous (nb0 = {expected}), got nb0 = {nb0}")]
    StridedBlocks {
        ty: GgmlType,
        nb0: u64,
        expected: u64,
    },
    #[error("layout spans {needed} bytes, only {got} given")]
    ShortBuffer { needed: u64, got: u64 },
    #[error("layout size overflows")]
    Overflow,
}

/// ggml's description of a tensor's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorLayout {
    pub ty: GgmlType,
    pub ne: [u64; 4],
    pub nb: [u64; 4],
}

impl TensorLayout {
    /// The contiguous layout of a tensor of this type and shape (what ggml gives a new tensor).
    pub fn contiguous(ty: GgmlType, ne: [u64; 4]) -> Result<Self, LayoutError> {
        let info = ty.info().ok_or(LayoutError::UnknownType(ty))?;
        let (bs, ts) = (u64::from(info.block_size), u64::from(info.type_size));
        if bs == 0 || ne[0] % bs != 0 {
            return Err(LayoutError::NotWholeBlocks { ty, ne0: ne[0] });
        }
        let nb0 = ts;
        let nb1 = (ne[0] / bs).checked_mul(ts).ok_or(LayoutError::Overflow)?;
        let nb2 = nb1.checked_mul(ne[1]).ok_or(LayoutError::Overflow)?;
        let nb3 = nb2.checked_mul(ne[2]).ok_or(LayoutError::Overflow)?;
        Ok(Self {
            ty,
            ne,
            nb: [nb0, nb1, nb2, nb3],
        })
    }

    pub fn n_elements(&self) -> u64 {
        self.ne.iter().product()
    }

    /// Bytes of the data in logical contiguous order.
    pub fn n_bytes(&self) -> Result<u64, LayoutError> {
        self.ty
            .bytes_for(self.n_elements())
            .ok_or(LayoutError::NotWholeBlocks {
                ty: self.ty,
                ne0: self.ne[0],
            })
    }

    fn block(&self) -> Result<(u64, u64), LayoutError> {
        let info = self.ty.info().ok_or(LayoutError::UnknownType(self.ty))?;
        Ok((u64::from(info.block_size), u64::from(info.type_size)))
    }

    /// True when memory order is logical order (ggml_is_contiguous).
    pub fn is_contiguous(&self) -> bool {
        Self::contiguous(self.ty, self.ne).is_ok_and(|c| {
            // Dimensions of size 1 may carry any stride.
            (0..4).all(|i| self.ne[i] == 1 || c.nb[i] == self.nb[i])
        })
    }

    /// True when the strides are not in increasing order: a permuted or transposed view.
    pub fn is_permuted(&self) -> bool {
        let dims: Vec<u64> = (0..4)
            .filter(|&i| self.ne[i] > 1)
            .map(|i| self.nb[i])
            .collect();
        dims.windows(2).any(|w| w[0] > w[1])
    }

    /// The memory order of the dimensions, fastest first (by increasing stride), as a
    /// permutation of 0..4: `[0, 2, 1, 3]` for a K cache view whose heads sit between
    /// its positions.
    pub fn memory_order(&self) -> [usize; 4] {
        let mut order = [0, 1, 2, 3];
        order.sort_by_key(|&i| (self.nb[i], i));
        order
    }

    /// Bytes from the first element to one past the last (what must be read).
    pub fn span_bytes(&self) -> Result<u64, LayoutError> {
        let (bs, ts) = self.block()?;
        if self.ne.contains(&0) {
            return Ok(0);
        }
        let mut last = 0u64;
        for i in 1..4 {
            last = (self.ne[i] - 1)
                .checked_mul(self.nb[i])
                .and_then(|x| x.checked_add(last))
                .ok_or(LayoutError::Overflow)?;
        }
        let row = if bs == 1 {
            (self.ne[0] - 1)
                .checked_mul(self.nb[0])
                .and_then(|x| x.checked_add(ts))
        } else {
            (self.ne[0] / bs).checked_mul(ts)
        };
        row.and_then(|r| r.checked_add(last))
            .ok_or(LayoutError::Overflow)
    }

    /// Copy the tensor out of `src` (its memory, starting at its first element) into
    /// logical contiguous order, ne0 fastest. Quantized types are copied block-row by
    /// block-row and stay quantized.
    pub fn gather(&self, src: &[u8]) -> Result<Vec<u8>, LayoutError> {
        let mut out = Vec::new();
        self.gather_into(src, &mut out)?;
        Ok(out)
    }

    /// [`gather`](Self::gather) into a reused buffer (cleared first).
    pub fn gather_into(&self, src: &[u8], out: &mut Vec<u8>) -> Result<(), LayoutError> {
        let rows = self.rows(src)?;
        out.clear();
        out.reserve(rows.total);
        let mut row = Vec::new();
        rows.for_each_where(
            src,
            &mut row,
            |_| true,
            |r| {
                if let RowBytes::Read(bytes) = r {
                    out.extend_from_slice(bytes);
                }
            },
        );
        Ok(())
    }

    /// Gather over a previous gather of this same layout, rewriting only the rows (runs
    /// of `ne0` elements) that changed; returns the byte ranges of `out` that changed
    /// (sorted, disjoint, neighbouring rows merged).
    ///
    /// `block_hashes` holds the 64-bit XXH3 hash of each [`HASH_BLOCK`]-byte block of
    /// the source memory from the previous call. Blocks that hash as before are taken to
    /// be unchanged (a change goes unnoticed only if the block's hash collides, about
    /// 2^-64 per changed block); the rows touching the other blocks are gathered again
    /// and compared with what `out` held. When `out` or `block_hashes` does not fit the
    /// layout, the tensor is gathered and hashed afresh and `None` is returned.
    ///
    /// The caller keeps `out` and `block_hashes` from one step to the next for tensors
    /// that change little (a KV-cache view gains a cell per step): one hashing pass over
    /// the live memory costs less than copying it, and far less than comparing it with a
    /// copy that has long left the cache; whoever summarises the data can skip what did
    /// not change.
    ///
    /// `hash_span(span, hashes)` computes the hashes; it must leave in `hashes[i]` what
    /// [`hash_blocks`] would (pass `&mut hash_blocks`, or spread the same work over
    /// threads as the capture does on ggml's threadpool).
    pub fn gather_update(
        &self,
        src: &[u8],
        out: &mut Vec<u8>,
        block_hashes: &mut Vec<u64>,
        hash_span: &mut dyn FnMut(&[u8], &mut [u64]),
    ) -> Result<Option<Vec<std::ops::Range<usize>>>, LayoutError> {
        let rows = self.rows(src)?;
        let span = &src[..rows.span];
        let n_blocks = span.len().div_ceil(HASH_BLOCK);
        if out.len() != rows.total || block_hashes.len() != n_blocks {
            self.gather_into(src, out)?;
            block_hashes.clear();
            block_hashes.resize(n_blocks, 0);
            hash_span(span, block_hashes);
            return Ok(None);
        }
        let mut now = vec![0u64; n_blocks];
        hash_span(span, &mut now);
        let mut dirty = vec![false; n_blocks];
        let mut any = false;
        for ((d, h), now) in dirty.iter_mut().zip(block_hashes.iter_mut()).zip(now) {
            if now != *h {
                *h = now;
                *d = true;
                any = true;
            }
        }
        if !any {
            return Ok(Some(Vec::new()));
        }
        let (changed, _) = rows.update(
            src,
            out,
            |extent| {
                let (first, last) = (extent.start / HASH_BLOCK, (extent.end - 1) / HASH_BLOCK);
                dirty[first..=last].contains(&true)
            },
            None,
        );
        Ok(Some(changed))
    }

    /// [`gather_update`](Self::gather_update) when the caller knows which bytes of the
    /// source memory were written since the previous call (`written`: byte ranges of the
    /// span, sorted by start, disjoint): only the rows whose source bytes meet a written
    /// range are read and compared, and only the hash blocks those ranges touch are
    /// hashed again (so `block_hashes` stays what [`hash_blocks`] gives for the whole
    /// span, and a later [`gather_update_audit`](Self::gather_update_audit) can tell a
    /// write that was not reported). The cost follows what was written, not the size of
    /// the view. Returns `None`, having gathered and hashed afresh, when `out` or
    /// `block_hashes` does not fit the layout.
    ///
    /// A write outside `written` goes unnoticed here: the caller must know every write.
    pub fn gather_update_known(
        &self,
        src: &[u8],
        out: &mut Vec<u8>,
        block_hashes: &mut Vec<u64>,
        written: &[std::ops::Range<usize>],
        hash_span: &mut dyn FnMut(&[u8], &mut [u64]),
    ) -> Result<Option<Vec<std::ops::Range<usize>>>, LayoutError> {
        let rows = self.rows(src)?;
        let span = &src[..rows.span];
        let n_blocks = span.len().div_ceil(HASH_BLOCK);
        if out.len() != rows.total || block_hashes.len() != n_blocks {
            return self.gather_update(src, out, block_hashes, hash_span);
        }
        let written = clip_ranges(written, span.len());
        if written.is_empty() {
            return Ok(Some(Vec::new()));
        }
        let mut next_block = 0usize;
        for r in &written {
            let first = (r.start / HASH_BLOCK).max(next_block);
            let last = (r.end - 1) / HASH_BLOCK;
            for b in first..=last {
                let end = ((b + 1) * HASH_BLOCK).min(span.len());
                hash_blocks(&span[b * HASH_BLOCK..end], &mut block_hashes[b..=b]);
            }
            next_block = next_block.max(last + 1);
        }
        let (changed, _) = rows.update(src, out, |extent| meets(&written, &extent), None);
        Ok(Some(changed))
    }

    /// [`gather_update`](Self::gather_update) (every block hashed) that also checks a
    /// report of what was written: `expected` are the byte ranges of the span the caller
    /// believes were written since the previous call (sorted by start, disjoint). Returns
    /// the changed ranges of `out` and how many of their bytes come from rows that no
    /// expected range meets: changes nobody reported (0 when the report was complete).
    /// `None` when `out` or `block_hashes` did not fit (gathered and hashed afresh).
    pub fn gather_update_audit(
        &self,
        src: &[u8],
        out: &mut Vec<u8>,
        block_hashes: &mut Vec<u64>,
        expected: &[std::ops::Range<usize>],
        hash_span: &mut dyn FnMut(&[u8], &mut [u64]),
    ) -> Result<Option<Audited>, LayoutError> {
        let rows = self.rows(src)?;
        let span = &src[..rows.span];
        let n_blocks = span.len().div_ceil(HASH_BLOCK);
        if out.len() != rows.total || block_hashes.len() != n_blocks {
            return Ok(self
                .gather_update(src, out, block_hashes, hash_span)?
                .map(|c| (c, 0)));
        }
        let mut now = vec![0u64; n_blocks];
        hash_span(span, &mut now);
        let dirty: Vec<bool> = block_hashes.iter().zip(&now).map(|(a, b)| a != b).collect();
        *block_hashes = now;
        if !dirty.contains(&true) {
            return Ok(Some((Vec::new(), 0)));
        }
        let expected = clip_ranges(expected, span.len());
        Ok(Some(rows.update(
            src,
            out,
            |extent| {
                let (first, last) = (extent.start / HASH_BLOCK, (extent.end - 1) / HASH_BLOCK);
                dirty[first..=last].contains(&true)
            },
            Some(&expected),
        )))
    }

    /// Check that `src` can be gathered and describe its rows.
    fn rows(&self, src: &[u8]) -> Result<Rows, LayoutError> {
        let (bs, ts) = self.block()?;
        if self.ne[0] % bs != 0 {
            return Err(LayoutError::NotWholeBlocks {
                ty: self.ty,
                ne0: self.ne[0],
            });
        }
        if bs > 1 && self.nb[0] != ts {
            return Err(LayoutError::StridedBlocks {
                ty: self.ty,
                nb0: self.nb[0],
                expected: ts,
            });
        }
        let span = self.span_bytes()?;
        if span > src.len() as u64 {
            return Err(LayoutError::ShortBuffer {
                needed: span,
                got: src.len() as u64,
            });
        }
        let total = self.n_bytes()? as usize;
        let ts = ts as usize;
        Ok(Rows {
            span: span as usize,
            ne: self.ne.map(|x| x as usize),
            nb: self.nb.map(|x| x as usize),
            ts,
            row_contiguous: bs > 1 || self.nb[0] as usize == ts,
            row_bytes: self.ne[0] as usize / bs as usize * ts,
            total,
        })
    }
}

/// What [`TensorLayout::gather_update_audit`] found: the changed byte ranges of the
/// gathered tensor, and how many of those bytes no expected write explains.
pub type Audited = (Vec<std::ops::Range<usize>>, usize);

/// Bytes of the source memory per hash in [`TensorLayout::gather_update`]: large
/// enough that hashing runs at memory speed, small enough that a changed cell costs
/// little to gather again.
pub const HASH_BLOCK: usize = 8192;

/// The 64-bit XXH3 hash of each [`HASH_BLOCK`]-byte block of `span` (the last block
/// may be shorter) into `hashes`, which holds `span.len().div_ceil(HASH_BLOCK)` entries
/// (extra entries are left alone; missing ones are not computed).
pub fn hash_blocks(span: &[u8], hashes: &mut [u64]) {
    for (h, block) in hashes.iter_mut().zip(span.chunks(HASH_BLOCK)) {
        *h = xxh3::hash64_with_seed(block, 0);
    }
}

/// Append `r` to sorted, disjoint `ranges`, merging it with the last one when they touch.
fn push_range(ranges: &mut Vec<std::ops::Range<usize>>, r: std::ops::Range<usize>) {
    match ranges.last_mut() {
        Some(last) if last.end == r.start => last.end = r.end,
        _ => ranges.push(r),
    }
}

/// The byte ranges, in whole `unit`-byte pieces (rows), where `before` and `after`
/// differ, neighbours merged: what a [`Revision`](crate::Revision) of `after` over
/// `before` records when `unit` is the row size, computed by plain comparison (the
/// tests hold `gather_update` and the capture's revisions to it).
pub fn differing_ranges(before: &[u8], after: &[u8], unit: usize) -> Vec<std::ops::Range<usize>> {
    let unit = unit.max(1);
    let mut out = Vec::new();
    for (i, (x, y)) in before.chunks(unit).zip(after.chunks(unit)).enumerate() {
        if x != y {
            push_range(&mut out, i * unit..i * unit + x.len());
        }
    }
    out
}

/// `ranges` (sorted by start) cut to `0..len`, empty ones dropped, overlapping or
/// touching ones merged.
fn clip_ranges(ranges: &[std::ops::Range<usize>], len: usize) -> Vec<std::ops::Range<usize>> {
    let mut out: Vec<std::ops::Range<usize>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        let (start, end) = (r.start.min(len), r.end.min(len));
        if start >= end {
            continue;
        }
        match out.last_mut() {
            Some(last) if start <= last.end => last.end = last.end.max(end),
            _ => out.push(start..end),
        }
    }
    out
}

/// Does any of `ranges` (sorted, disjoint) share a byte with `extent`?
fn meets(ranges: &[std::ops::Range<usize>], extent: &std::ops::Range<usize>) -> bool {
    let i = ranges.partition_point(|r| r.end <= extent.start);
    ranges.get(i).is_some_and(|r| r.start < extent.end)
}

/// A row handed over by `Rows::for_each_where`.
enum RowBytes<'a> {
    Read(&'a [u8]),
    Skipped(usize),
}

/// A checked layout's logical rows (`ne0` elements each), in logical order.
struct Rows {
    span: usize,
    ne: [usize; 4],
    nb: [usize; 4],
    ts: usize,
    row_contiguous: bool,
    row_bytes: usize,
    total: usize,
}

impl Rows {
    /// Gather again the rows `wanted` picks (by their source extent) over `out`, which
    /// holds the previous gather: returns the byte ranges of `out` that changed (rows,
    /// neighbours merged) and, with `expected`, the changed bytes of rows whose source
    /// extent meets none of `expected`.
    fn update(
        &self,
        src: &[u8],
        out: &mut [u8],
        mut wanted: impl FnMut(std::ops::Range<usize>) -> bool,
        expected: Option<&[std::ops::Range<usize>]>,
    ) -> (Vec<std::ops::Range<usize>>, usize) {
        let mut changed: Vec<std::ops::Range<usize>> = Vec::new();
        let mut unexplained = 0usize;
        let mut at = 0usize;
        let mut row = Vec::new();
        let extent = std::cell::Cell::new(0..0);
        self.for_each_where(
            src,
            &mut row,
            |e| {
                extent.set(e.clone());
                wanted(e)
            },
            |row| {
                let (len, bytes) = match row {
                    RowBytes::Read(b) => (b.len(), Some(b)),
                    RowBytes::Skipped(n) => (n, None),
                };
                let end = at + len;
                if let Some(bytes) = bytes {
                    let dst = &mut out[at..end];
                    if dst != bytes {
                        dst.copy_from_slice(bytes);
                        push_range(&mut changed, at..end);
                        let e = extent.take();
                        if expected.is_some_and(|x| !meets(x, &e)) {
                            unexplained += len;
                        }
                    }
                }
                at = end;
            },
        );
        (changed, unexplained)
    }

    /// Call `f` for each logical row, in order: with its bytes when `wanted` says yes
    /// for the row's extent in `src` (first byte to one past the last; a strided row is
    /// assembled in `row` first), with its length only otherwise. Every offset is
    /// < span <= src.len() (checked by `TensorLayout::rows`).
    fn for_each_where(
        &self,
        src: &[u8],
        row: &mut Vec<u8>,
        mut wanted: impl FnMut(std::ops::Range<usize>) -> bool,
        mut f: impl FnMut(RowBytes),
    ) {
        let [ne0, ne1, ne2, ne3] = self.ne;
        let [nb0, nb1, nb2, nb3] = self.nb;
        let extent = if self.row_contiguous {
            self.row_bytes
        } else {
            (ne0.max(1) - 1) * nb0 + self.ts
        };
        for i3 in 0..ne3 {
            for i2 in 0..ne2 {
                for i1 in 0..ne1 {
                    let base = i1 * nb1 + i2 * nb2 + i3 * nb3;
                    if self.row_bytes == 0 || !wanted(base..base + extent) {
                        f(RowBytes::Skipped(self.row_bytes));
                    } else if self.row_contiguous {
                        f(RowBytes::Read(&src[base..base + self.row_bytes]));
                    } else {
                        row.clear();
                        for i0 in 0..ne0 {
                            let at = base + i0 * nb0;
                            row.extend_from_slice(&src[at..at + self.ts]);
                        }
                        f(RowBytes::Read(row));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The K cache view of seed 2: logical ne [D, n_kv, H] over memory ordered
    /// [D, H, n_kv] (each cell holds all heads of one position).
    #[test]
    fn permuted_k_view_gathers_to_logical_order() {
        let (d, n_kv, h) = (4u64, 3u64, 2u64);
        // Memory: cell c, head j, dim i holds value 100*c + 10*j + i (as f32 bytes).
        let mut mem = Vec::new();
        for c in 0..n_kv {
            for j in 0..h {
                for i in 0..d {
                    mem.extend_from_slice(&((100 * c + 10 * j + i) as f32).to_le_bytes());
                }
            }
        }
        let view = TensorLayout {
            ty: GgmlType::F32,
            ne: [d, n_kv, h, 1],
            nb: [4, 4 * d * h, 4 * d, 4 * d * h * n_kv],
        };
        assert!(view.is_permuted());
        assert!(!view.is_contiguous());
        assert_eq!(view.memory_order(), [0, 2, 1, 3]);
        let out = view.gather(&mem).unwrap();
        let vals: Vec<f32> = out
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        // Logical order: head-major, then position, then dim.
        let mut want = Vec::new();
        for j in 0..h {
            for c in 0..n_kv {
                for i in 0..d {
                    want.push((100 * c + 10 * j + i) as f32);
                }
            }
        }
        assert_eq!(vals, want);
        // Reading the same bytes with the strides of the other order is wrong.
        let wrong = TensorLayout::contiguous(GgmlType::F32, [d, n_kv, h, 1]).unwrap();
        assert_ne!(wrong.gather(&mem).unwrap(), out);
    }

    #[test]
    fn transposed_f16_view_gathers_elementwise() {
        // A 3x2 f16 matrix stored row-major, viewed transposed: ne [3, 2], nb [4, 2].
        let mem: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect();
        let t = TensorLayout {
            ty: GgmlType::F16,
            ne: [3, 2, 1, 1],
            nb: [4, 2, 12, 12],
        };
        let out = t.gather(&mem).unwrap();
        let vals: Vec<f32> = out
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect();
        assert_eq!(vals, [1.0, 3.0, 5.0, 2.0, 4.0, 6.0]);
    }

    #[test]
    fn quantized_rows_copy_whole_blocks_and_reject_strided_blocks() {
        let q = TensorLayout {
            ty: GgmlType::Q8_0,
            ne: [32, 2, 1, 1],
            nb: [34, 68, 136, 136],
        };
        let mem: Vec<u8> = (0..136).map(|i| i as u8).collect();
        let out = q.gather(&mem).unwrap();
        assert_eq!(out.len(), 68);
        assert_eq!(&out[..34], &mem[..34]);
        assert_eq!(&out[34..], &mem[68..102]);
        let bad = TensorLayout {
            nb: [68, 34, 68, 68],
            ..q
        };
        assert!(matches!(
            bad.gather(&mem),
            Err(LayoutError::StridedBlocks { .. })
        ));
        assert!(matches!(
            q.gather(&mem[..100]),
            Err(LayoutError::ShortBuffer { .. })
        ));
    }

    #[test]
    fn contiguous_layouts_round_trip() {
        let c = TensorLayout::contiguous(GgmlType::F32, [3, 2, 2, 1]).unwrap();
        assert_eq!(c.nb, [4, 12, 24, 48]);
        assert!(c.is_contiguous() && !c.is_permuted());
        let mem: Vec<u8> = (0..48).collect();
        assert_eq!(c.gather(&mem).unwrap(), mem);
        assert_eq!(c.span_bytes().unwrap(), 48);
    }

    /// `gather_update` leaves exactly what `gather_into` makes and reports exactly the
    /// rows that changed (no hash collides here): a permuted K view, a transposed V view
    /// (strided rows) and a Q8_0 view, each small (one hash block) and large (dozens),
    /// with one byte changed, a short run, many scattered bytes, every byte, or nothing.
    #[test]
    fn gather_update_matches_a_fresh_gather_and_names_the_changed_rows() {
        let f16 = GgmlType(1);
        let q8_0 = GgmlType(8);
        let mut layouts = Vec::new();
        for (d, n_kv, h) in [(8u64, 6u64, 3u64), (64, 300, 4)] {
            // K view: logical [d, n_kv, h] over memory [d, h, n_kv].
            layouts.push(TensorLayout {
                ty: f16,
                ne: [d, n_kv, h, 1],
                nb: [2, 2 * d * h, 2 * d, 2 * d * h * n_kv],
            });
            // V view without flash attention: logical [n_kv, d, h], transposed.
            layouts.push(TensorLayout {
                ty: f16,
                ne: [n_kv, d, h, 1],
                nb: [2 * d * h, 2, 2 * d, 2 * d * h * n_kv],
            });
            // A quantized cache view: rows of one Q8_0 block (34 bytes) per head.
            layouts.push(TensorLayout {
                ty: q8_0,
                ne: [32, n_kv, h, 1],
                nb: [34, 34 * h, 34, 34 * h * n_kv],
            });
        }
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut multi_block = false;
        for layout in layouts {
            let span = layout.span_bytes().unwrap() as usize;
            multi_block |= span > 4 * HASH_BLOCK;
            let row =
                layout.n_bytes().unwrap() as usize / (layout.n_elements() / layout.ne[0]) as usize;
            let mut mem: Vec<u8> = (0..span).map(|_| next() as u8).collect();
            let mut kept = Vec::new();
            let mut hashes = Vec::new();
            assert_eq!(
                layout
                    .gather_update(&mem, &mut kept, &mut hashes, &mut hash_blocks)
                    .unwrap(),
                None
            );
            assert_eq!(kept, layout.gather(&mem).unwrap());
            assert_eq!(hashes.len(), span.div_ceil(HASH_BLOCK));
            for edits in [0usize, 1, 2, 40, span] {
                let before = kept.clone();
                let start = (next() as usize) % span;
                for k in 0..edits {
                    let at = if edits <= 2 {
                        (start + 7 * k) % span
                    } else {
                        next() as usize % span
                    };
                    mem[at] = mem[at].wrapping_add(1 + (next() % 255) as u8);
                }
                let changed = layout
                    .gather_update(&mem, &mut kept, &mut hashes, &mut hash_blocks)
                    .unwrap()
                    .unwrap();
                let fresh = layout.gather(&mem).unwrap();
                assert_eq!(kept, fresh, "{layout:?} after {edits} edits");
                assert_eq!(
                    changed,
                    differing_ranges(&before, &fresh, row),
                    "{layout:?}"
                );
            }
        }
        assert!(multi_block);
        // A buffer of another size is gathered afresh.
        let l = TensorLayout::contiguous(f16, [8, 6, 3, 1]).unwrap();
        let mem = vec![1u8; l.span_bytes().unwrap() as usize];
        let mut other = vec![0u8; 3];
        let mut hashes = Vec::new();
        assert_eq!(
            l.gather_update(&mem, &mut other, &mut hashes, &mut hash_blocks)
                .unwrap(),
            None
        );
        assert_eq!(other, l.gather(&mem).unwrap());
        assert_eq!(hashes.len(), 1);
        // So is one whose block hashes do not fit.
        hashes.push(0);
        assert_eq!(
            l.gather_update(&mem, &mut other, &mut hashes, &mut hash_blocks)
                .unwrap(),
            None
        );
        assert_eq!(hashes.len(), 1);
        // Errors are the gather's.
        assert!(matches!(
            l.gather_update(&mem[..10], &mut other, &mut hashes, &mut hash_blocks),
            Err(LayoutError::ShortBuffer { .. })
        ));
    }

    /// `gather_update_known` with a complete report of the writes gives what a fresh
    /// gather and `differing_ranges` give, and leaves the block hashes of the whole span;
    /// `gather_update_audit` counts exactly the changed bytes of rows no reported range
    /// meets. K view (rows of one head of one cell), V view without flash attention
    /// (each cell one element of every row) and a Q8_0 view; writes of whole cells (what
    /// a cache's SET_ROWS does), plus one byte written where nobody said.
    #[test]
    fn known_writes_and_audits_match_a_fresh_gather() {
        let f16 = GgmlType(1);
        let q8_0 = GgmlType(8);
        let (d, n_kv, h) = (64u64, 300u64, 4u64);
        let cell = |ts: u64, per_head: u64| ts * per_head * h; // bytes per cell
        let layouts = [
            (
                TensorLayout {
                    ty: f16,
                    ne: [d, n_kv, h, 1],
                    nb: [2, 2 * d * h, 2 * d, 2 * d * h * n_kv],
                },
                cell(2, d),
            ),
            (
                TensorLayout {
                    ty: f16,
                    ne: [n_kv, d, h, 1],
                    nb: [2, 2 * n_kv, 2 * n_kv * d, 2 * n_kv * d * h],
                },
                0, // transposed: a cell is one element per row (written below)
            ),
            (
                TensorLayout {
                    ty: q8_0,
                    ne: [64, n_kv, h, 1],
                    nb: [34, 68 * h, 68, 68 * h * n_kv],
                },
                cell(68, 1),
            ),
        ];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for (layout, cell_bytes) in layouts {
            let span = layout.span_bytes().unwrap() as usize;
            let row =
                layout.n_bytes().unwrap() as usize / (layout.n_elements() / layout.ne[0]) as usize;
            let mut mem: Vec<u8> = (0..span).map(|_| next() as u8).collect();
            let (mut kept, mut hashes) = (Vec::new(), Vec::new());
            layout
                .gather_update(&mem, &mut kept, &mut hashes, &mut hash_blocks)
                .unwrap();
            for cells in [0usize, 1, 3, 17] {
                // Write `cells` random cells, as SET_ROWS would, and report them.
                let mut written: Vec<std::ops::Range<usize>> = Vec::new();
                for _ in 0..cells {
                    let c = next() as usize % n_kv as usize;
                    if cell_bytes > 0 {
                        let r = c * cell_bytes as usize..(c + 1) * cell_bytes as usize;
                        for b in r.clone() {
                            mem[b] = mem[b].wrapping_add(1);
                        }
                        written.push(r);
                    } else {
                        for r in 0..(d * h) as usize {
                            let at = r * 2 * n_kv as usize + 2 * c;
                            mem[at] = mem[at].wrapping_add(1);
                            written.push(at..at + 2);
                        }
                    }
                }
                written.sort_by_key(|r| r.start);
                let before = kept.clone();
                let changed = layout
                    .gather_update_known(&mem, &mut kept, &mut hashes, &written, &mut hash_blocks)
                    .unwrap()
                    .unwrap();
                let fresh = layout.gather(&mem).unwrap();
                assert_eq!(kept, fresh, "{layout:?}, {cells} cells");
                assert_eq!(
                    changed,
                    differing_ranges(&before, &fresh, row),
                    "{layout:?}"
                );
                let mut all = vec![0u64; span.div_ceil(HASH_BLOCK)];
                hash_blocks(&mem, &mut all);
                assert_eq!(hashes, all, "{layout:?}: block hashes of the whole span");
            }
            // One byte written that nobody reports: known misses it, the audit finds it
            // and counts its row as unexplained; a reported write is not counted.
            let at = span / 2;
            mem[at] = mem[at].wrapping_add(1);
            let before = kept.clone();
            let missed = layout
                .gather_update_known(&mem, &mut kept, &mut hashes, &[], &mut hash_blocks)
                .unwrap()
                .unwrap();
            assert!(missed.is_empty());
            assert_eq!(kept, before);
            let (changed, unexplained) = layout
                .gather_update_audit(&mem, &mut kept, &mut hashes, &[], &mut hash_blocks)
                .unwrap()
                .unwrap();
            let fresh = layout.gather(&mem).unwrap();
            assert_eq!(kept, fresh);
            assert_eq!(changed, differing_ranges(&before, &fresh, row));
            assert_eq!(unexplained, changed.iter().map(|r| r.len()).sum::<usize>());
            assert!(unexplained > 0, "{layout:?}");
            mem[at] = mem[at].wrapping_add(1);
            let before = kept.clone();
            let (changed, unexplained) = layout
                .gather_update_audit(
                    &mem,
                    &mut kept,
                    &mut hashes,
                    std::slice::from_ref(&(at..at + 1)),
                    &mut hash_blocks,
                )
                .unwrap()
                .unwrap();
            assert_eq!(
                changed,
                differing_ranges(&before, &layout.gather(&mem).unwrap(), row)
            );
            assert_eq!(unexplained, 0);
        }
    }
}
