//! Format version 2's storage (docs/trace-format.md, "Storage"): a tensor is stored
//! whole, or as a delta against an earlier tensor of the same byte length (its changed
//! byte ranges, the bytes concatenated in the GGUF tensor). [`Storage`] reads and checks
//! the per-tensor keys when a trace is opened and rebuilds a delta's full bytes on demand,
//! keeping the last tensor rebuilt per (layer, role) so that reading a stream step after
//! step costs the changed bytes (plus one copy out), not the chain.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Mutex;

use gguf_io::{Array, GgmlType, GgufFile, Metadata, Value};

use crate::escape::escape;
use crate::keys;
use crate::validate::Violation;

/// How one tensor of a version-2 trace is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stored {
    /// Its GGUF tensor holds all its bytes.
    Whole,
    /// Tensor `base`'s bytes (rebuilt if itself a delta) with `n_ranges` byte ranges
    /// replaced by the `bytes` its GGUF tensor holds. `n_ranges` 0: the same bytes as
    /// `base`.
    Delta {
        base: usize,
        n_ranges: usize,
        bytes: u64,
    },
}

/// The last tensor rebuilt of a stream: (its table index, its bytes).
type Cached = (usize, Vec<u8>);

/// A version-2 trace's storage, checked (see [`Storage::parse`]).
pub struct Storage {
    /// Per GGUF tensor: base (-1 whole) and where its ranges start in `ranges` (pairs).
    base: Vec<i64>,
    first_range: Vec<usize>,
    n_ranges: Vec<usize>,
    /// (offset, length) pairs, flat.
    ranges: Vec<u64>,
    /// Per tensor: its own type and ne (metadata; the GGUF tensor of a delta is bytes).
    logical: Vec<(GgmlType, [u64; 4])>,
    /// Per tensor: the first tensor reached through bases of deltas without ranges (the
    /// tensor whose bytes it has, stored with content).
    canonical: Vec<usize>,
    /// Per tensor: an id of its (layer, role), the cache's key.
    stream: Vec<u32>,
    cache: Mutex<HashMap<u32, Cached>>,
}

fn bad(key: &'static str, what: String) -> Violation {
    Violation::BadValue { key, what }
}

fn array<'a>(m: &'a Metadata, key: &'static str) -> Result<&'a Array, Violation> {
    m.get(key).and_then(Value::as_array).ok_or_else(|| {
        bad(
            key,
            "missing (format version 2 stores it per tensor)".into(),
        )
    })
}

macro_rules! typed {
    ($m:expr, $key:expr, $variant:ident, $t:literal) => {
        match array($m, $key)? {
            Array::$variant(v) => v,
            _ => return Err(bad($key, concat!("not an array of ", $t).into())),
        }
    };
}

fn count(key: &'static str, len: usize, want: usize, what: &'static str) -> Result<(), Violation> {
    if len == want {
        Ok(())
    } else {
        Err(Violation::ArrayLength {
            key,
            len,
            count: want,
            what,
        })
    }
}

impl Storage {
    /// Read and check the storage keys of a version-2 trace against its tensor table:
    /// every base an earlier tensor (no cycle) of the same byte length, every range
    /// inside the tensor, sorted and disjoint, every delta's data the sum of its ranges
    /// (one byte when none), every whole tensor's GGUF type and shape its recorded ones.
    /// Each contradiction is a file-level violation. Nothing is allocated from a claim
    /// before it is checked against the file.
    pub(crate) fn parse(m: &Metadata, file: &GgufFile) -> Result<Self, Violation> {
        let infos = file.tensors();
        let n = infos.len();
        let types = typed!(m, keys::TENSOR_TYPE, U32, "uint32");
        let nes = typed!(m, keys::TENSOR_NE, U64, "uint64");
        let bases = typed!(m, keys::TENSOR_BASE, I32, "int32");
        let counts = typed!(m, keys::TENSOR_N_RANGES, U32, "uint32");
        let ranges = typed!(m, keys::TENSOR_RANGES, U64, "uint64");
        count(keys::TENSOR_TYPE, types.len(), n, "tensors")?;
        count(keys::TENSOR_NE, nes.len(), 4 * n, "dims (4 per tensor)")?;
        count(keys::TENSOR_BASE, bases.len(), n, "tensors")?;
        count(keys::TENSOR_N_RANGES, counts.len(), n, "tensors")?;
        let total = counts.iter().map(|&c| c as u64).sum::<u64>();
        if ranges.len() as u64 != total.saturating_mul(2) {
            return Err(bad(
                keys::TENSOR_RANGES,
                format!(
                    "{} entries for {total} ranges ({} says; 2 per range)",
                    ranges.len(),
                    keys::TENSOR_N_RANGES
                ),
            ));
        }
        let name = |i: usize| escape(&infos[i].name).into_owned();
        let what = |i: usize, w: String| Violation::Stored {
            tensor: name(i),
            what: w,
        };

        // Bases: a tensor of the table, no cycle, then an earlier one.
        for (i, &b) in bases.iter().enumerate() {
            if b < -1 || b as i64 >= n as i64 {
                return Err(what(i, format!("base {b} is no tensor of the table")));
            }
        }
        // Each tensor has at most one base: follow them, colouring the walk.
        let mut state = vec![0u32; n]; // 0 unseen, walk id + 1 while walking, u32::MAX done
        for start in 0..n {
            let id = start as u32 + 1;
            let mut j = start;
            while state[j] == 0 {
                state[j] = id;
                match bases[j] {
                    -1 => break,
                    b => j = b as usize,
                }
            }
            if state[j] == id && bases[j] != -1 {
                return Err(what(
                    j,
                    "its bases lead back to it (a cycle): a chain must end at a tensor stored whole"
                        .into(),
                ));
            }
            let mut j = start;
            while state[j] == id {
                state[j] = u32::MAX;
                match bases[j] {
                    -1 => break,
                    b => j = b as usize,
                }
            }
        }
        for (i, &b) in bases.iter().enumerate() {
            if b >= 0 && b as usize >= i {
                return Err(what(
                    i,
                    format!("base {b} is not an earlier tensor (a base comes first)"),
                ));
            }
        }

        let mut logical = Vec::with_capacity(n);
        let mut n_bytes = Vec::with_capacity(n);
        let mut first_range = Vec::with_capacity(n);
        let mut at = 0usize;
        for i in 0..n {
            let ty = GgmlType(types[i]);
            let ne = [nes[4 * i], nes[4 * i + 1], nes[4 * i + 2], nes[4 * i + 3]];
            let bytes = ty.info().and(
                ne.iter()
                    .try_fold(1u64, |a, &x| a.checked_mul(x))
                    .and_then(|e| ty.bytes_for(e)),
            );
            let Some(bytes) = bytes else {
                return Err(what(
                    i,
                    format!(
                        "type {} and ne {ne:?} ({} / {}) have no byte size",
                        types[i],
                        keys::TENSOR_TYPE,
                        keys::TENSOR_NE
                    ),
                ));
            };
            let info = &infos[i];
            let c = counts[i] as usize;
            let own = &ranges[2 * at..2 * (at + c)];
            if bases[i] == -1 {
                let mut dims = [1u64; 4];
                if info.dims.len() <= 4 {
                    dims[..info.dims.len()].copy_from_slice(&info.dims);
                }
                if info.ty != ty || info.dims.len() > 4 || dims != ne {
                    return Err(what(
                        i,
                        format!(
                            "stored whole as {} {:?}, but recorded as {} {ne:?}",
                            info.ty.name(),
                            info.dims,
                            ty.name()
                        ),
                    ));
                }
                if c != 0 {
                    return Err(what(i, format!("stored whole, with {c} changed ranges")));
                }
            } else {
                let b = bases[i] as usize;
                if n_bytes[b] != bytes {
                    return Err(what(
                        i,
                        format!(
                            "{bytes} bytes, stored against tensor #{b} ({}) of another byte length, {}",
                            name(b),
                            n_bytes[b]
                        ),
                    ));
                }
                if info.ty != GgmlType::I8 || info.dims.len() != 1 {
                    return Err(what(
                        i,
                        format!(
                            "a delta stored as {} {:?}, not the 1-D i8 of its changed bytes",
                            info.ty.name(),
                            info.dims
                        ),
                    ));
                }
                let mut end = 0u64;
                let mut sum = 0u64;
                for (k, r) in own.chunks_exact(2).enumerate() {
                    let (off, len) = (r[0], r[1]);
                    let stop = off.checked_add(len).filter(|&s| s <= bytes);
                    let Some(stop) = stop else {
                        return Err(what(
                            i,
                            format!("range {k} ({off}, {len}) outside the tensor's {bytes} bytes"),
                        ));
                    };
                    if len == 0 || off < end {
                        return Err(what(
                            i,
                            format!(
                                "range {k} ({off}, {len}) empty, overlapping or out of order \
                                 (ranges are sorted, disjoint, not empty)"
                            ),
                        ));
                    }
                    end = stop;
                    sum += len;
                }
                if info.n_bytes != sum.max(1) {
                    return Err(what(
                        i,
                        format!(
                            "{} bytes of delta data for ranges of {sum} bytes{}",
                            info.n_bytes,
                            if sum == 0 { " (stored as 1 byte)" } else { "" }
                        ),
                    ));
                }
            }
            logical.push((ty, ne));
            n_bytes.push(bytes);
            first_range.push(at);
            at += c;
        }

        let mut canonical: Vec<usize> = Vec::with_capacity(n);
        for i in 0..n {
            canonical.push(match bases[i] {
                b if b >= 0 && counts[i] == 0 => canonical[b as usize],
                _ => i,
            });
        }
        let roles = match m.get(keys::TENSOR_ROLE).and_then(Value::as_array) {
            Some(Array::String(v)) if v.len() == n => v.clone(),
            _ => vec![String::new(); n],
        };
        let layers = match m.get(keys::TENSOR_LAYER).and_then(Value::as_array) {
            Some(Array::I32(v)) if v.len() == n => v.clone(),
            _ => vec![0; n],
        };
        let mut ids: HashMap<(i32, &str), u32> = HashMap::new();
        let stream = (0..n)
            .map(|i| {
                let next = ids.len() as u32;
                *ids.entry((layers[i], roles[i].as_str())).or_insert(next)
            })
            .collect();
        Ok(Self {
            base: bases.iter().map(|&b| i64::from(b)).collect(),
            first_range,
            n_ranges: counts.iter().map(|&c| c as usize).collect(),
            ranges: ranges.clone(),
            logical,
            canonical,
            stream,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Tensor `i`'s own type and ne.
    pub fn logical(&self, i: usize) -> (GgmlType, [u64; 4]) {
        self.logical[i]
    }

    /// How tensor `i` is stored.
    pub fn stored(&self, file: &GgufFile, i: usize) -> Stored {
        match self.base[i] {
            -1 => Stored::Whole,
            b => Stored::Delta {
                base: b as usize,
                n_ranges: self.n_ranges[i],
                bytes: if self.n_ranges[i] == 0 {
                    0
                } else {
                    file.tensors()[i].n_bytes
                },
            },
        }
    }

    /// Tensor `i`'s changed ranges, (offset, length) in its logical bytes, in the order
    /// its GGUF tensor holds their bytes (empty for a whole tensor).
    pub fn ranges(&self, i: usize) -> Vec<(u64, u64)> {
        let own =
            &self.ranges[2 * self.first_range[i]..2 * (self.first_range[i] + self.n_ranges[i])];
        own.chunks_exact(2).map(|r| (r[0], r[1])).collect()
    }

    /// Apply tensor `i`'s ranges onto `buf` (its base's bytes).
    fn apply(&self, file: &GgufFile, i: usize, buf: &mut [u8]) {
        let data = file.tensor_data(&file.tensors()[i]);
        let mut pos = 0usize;
        let own =
            &self.ranges[2 * self.first_range[i]..2 * (self.first_range[i] + self.n_ranges[i])];
        for r in own.chunks_exact(2) {
            let (off, len) = (r[0] as usize, r[1] as usize);
            // Checked on open: inside the tensor, and the data is their sum.
            if let (Some(dst), Some(src)) = (buf.get_mut(off..off + len), data.get(pos..pos + len))
            {
                dst.copy_from_slice(src);
            }
            pos += len;
        }
    }

    /// Tensor `i`'s full logical bytes: borrowed from the file when a tensor stored whole
    /// has them, else rebuilt from the nearest tensor whole or cached.
    pub(crate) fn data<'a>(&self, file: &'a GgufFile, i: usize) -> Cow<'a, [u8]> {
        let c = self.canonical[i];
        if self.base[c] == -1 {
            return Cow::Borrowed(file.tensor_data(&file.tensors()[c]));
        }
        let key = self.stream[i];
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let cached = cache.get(&key).map(|(idx, _)| *idx);
        if cached == Some(c) {
            if let Some((_, bytes)) = cache.get(&key) {
                return Cow::Owned(bytes.clone());
            }
        }
        // Back from c to the cached tensor or one stored whole.
        let mut path = Vec::new();
        let mut j = c;
        let from_cache = loop {
            if Some(j) == cached {
                break true;
            }
            match self.base[j] {
                -1 => break false,
                b => {
                    path.push(j);
                    j = b as usize;
                }
            }
        };
        let mut buf = match from_cache {
            true => cache.remove(&key).map(|(_, b)| b).unwrap_or_default(),
            false => file.tensor_data(&file.tensors()[j]).to_vec(),
        };
        for &k in path.iter().rev() {
            self.apply(file, k, &mut buf);
        }
        let out = buf.clone();
        cache.insert(key, (c, buf));
        Cow::Owned(out)
    }
}
