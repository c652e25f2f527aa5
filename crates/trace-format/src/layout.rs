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
        out.clear();
        let total = self.n_bytes()? as usize;
        out.reserve(total);
        let [ne0, ne1, ne2, ne3] = self.ne.map(|x| x as usize);
        let [nb0, nb1, nb2, nb3] = self.nb.map(|x| x as usize);
        let ts = ts as usize;
        let row_contiguous = bs > 1 || nb0 == ts;
        let row_bytes = ne0 / bs as usize * ts;
        // Every offset below is < span <= src.len(), proved by span_bytes().
        for i3 in 0..ne3 {
            for i2 in 0..ne2 {
                for i1 in 0..ne1 {
                    let base = i1 * nb1 + i2 * nb2 + i3 * nb3;
                    if row_contiguous {
                        out.extend_from_slice(&src[base..base + row_bytes]);
                    } else {
                        for i0 in 0..ne0 {
                            let at = base + i0 * nb0;
                            out.extend_from_slice(&src[at..at + ts]);
                        }
                    }
                }
            }
        }
        Ok(())
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
}
