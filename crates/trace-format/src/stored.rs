//! Format version 2's storage (docs/trace-format.md, "Storage"): a tensor is stored
//! whole, or as a delta against an earlier tensor of the same byte length (its changed
//! byte ranges, the bytes concatenated in the GGUF tensor). [`Storage`] reads and checks
//! the per-tensor keys when a trace is opened and rebuilds a delta's full bytes on demand,
//! keeping the last tensor rebuilt per (layer, role) so that reading a stream step after
//! step costs the changed bytes (plus one copy out), not the chain.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Mutex;

use gguf_io::{Array, GgmlType, GgufFile, Header, Metadata, TensorInfo, Value};

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
        Self::parse_tensors(m, file.tensors())
    }

    /// [`parse`](Self::parse) from a header alone (a trace read from a stream, where the
    /// data comes tensor by tensor: see [`base`](Self::base) and
    /// [`apply_delta`](Self::apply_delta)); the same checks.
    pub fn from_header(h: &Header) -> Result<Self, Violation> {
        Self::parse_tensors(&h.metadata, &h.tensors)
    }

    fn parse_tensors(m: &Metadata, infos: &[TensorInfo]) -> Result<Self, Violation> {
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

    /// The tensor tensor `i` is stored against (`None` when it is stored whole).
    pub fn base(&self, i: usize) -> Option<usize> {
        usize::try_from(self.base[i]).ok()
    }

    /// Apply tensor `i`'s ranges onto `buf` (its base's bytes).
    fn apply(&self, file: &GgufFile, i: usize, buf: &mut [u8]) {
        self.apply_delta(i, file.tensor_data(&file.tensors()[i]), buf);
    }

    /// Rebuild delta `i` in place: `buf` holds its [`base`](Self::base)'s full bytes,
    /// `data` its GGUF tensor's bytes (the changed bytes, in range order); each range of
    /// `buf` is overwritten by the next of them. Nothing to do for a tensor stored whole.
    pub fn apply_delta(&self, i: usize, data: &[u8], buf: &mut [u8]) {
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
    /// has them, else rebuilt from the nearest tensor whole or cached. `file` is the GGUF
    /// whose header this storage was parsed from.
    pub fn data<'a>(&self, file: &'a GgufFile, i: usize) -> Cow<'a, [u8]> {
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

#[cfg(test)]
mod tests {
    use gguf_io::{Array, GgmlType, GgufFile, HeaderSpec, Value};

    use crate::keys;
    use crate::meta::{Revision, Role, RunMeta, TensorMeta};
    use crate::synth::arrays::{i32s, set_array, u32s, u64s};
    use crate::{Stored, TensorLayout, TraceError, TraceFile, TraceWriter};

    fn meta(role: Role, step: u32, ty: GgmlType, ne: [u64; 4]) -> TensorMeta {
        TensorMeta {
            role,
            layer: 0,
            step,
            ggml_name: format!("{}-0", role.name()),
            op: "NONE".into(),
            layout: TensorLayout::contiguous(ty, ne).unwrap(),
            view_of: String::new(),
        }
    }

    /// #0 kqv_out step 0 (16 bytes, whole), #1 k step 0 (64 bytes, whole), #2 kqv_out
    /// step 1 (whole), #3 k step 1 (a delta of #1: bytes 8..12 and 40..44), #4 v step 1
    /// (the bytes of #1: the same as #1).
    fn honest() -> (Vec<u8>, Vec<Vec<u8>>) {
        let mut w = TraceWriter::new().unwrap();
        for s in crate::synth::steps(2, 1) {
            w.add_step(s);
        }
        let k0: Vec<u8> = (0..64u8).collect();
        let mut k1 = k0.clone();
        for i in (8..12).chain(40..44) {
            k1[i] = 200 + i as u8;
        }
        let out0 = vec![1u8; 16];
        let out1 = vec![2u8; 16];
        let f32_4 = [4, 1, 1, 1];
        let f16_k = [8, 4, 1, 1];
        w.add_tensor(meta(Role::KqvOut, 0, GgmlType::F32, f32_4), &out0, false)
            .unwrap();
        let r0 = Revision { id: 1, since: None };
        w.add_tensor_revision(
            meta(Role::K, 0, GgmlType::F16, f16_k),
            &k0,
            false,
            Some(&r0),
        )
        .unwrap();
        w.add_tensor(meta(Role::KqvOut, 1, GgmlType::F32, f32_4), &out1, false)
            .unwrap();
        let r1 = Revision {
            id: 2,
            since: Some((1, vec![8..12, 40..44])),
        };
        w.add_tensor_revision(
            meta(Role::K, 1, GgmlType::F16, f16_k),
            &k1,
            false,
            Some(&r1),
        )
        .unwrap();
        w.add_tensor(meta(Role::V, 1, GgmlType::F16, f16_k), &k0, false)
            .unwrap();
        let run = RunMeta {
            n_layer: 1,
            target_layer: -1,
            trace_sources: true,
            complete: true,
            ..RunMeta::default()
        };
        (
            w.finish(&run, Vec::new()).unwrap(),
            vec![out0, k0.clone(), out1, k1, k0],
        )
    }

    fn open(bytes: Vec<u8>) -> Result<TraceFile, TraceError> {
        TraceFile::from_gguf(GgufFile::from_bytes(bytes).unwrap())
    }

    #[test]
    fn deltas_and_repeats_read_back_whole() {
        let (bytes, want) = honest();
        let t = open(bytes).unwrap();
        assert_eq!(t.format_version, 2);
        assert_eq!(t.stored(0), Stored::Whole);
        assert_eq!(t.stored(1), Stored::Whole);
        assert_eq!(
            t.stored(3),
            Stored::Delta {
                base: 1,
                n_ranges: 2,
                bytes: 8
            }
        );
        assert_eq!(t.stored_ranges(3), vec![(8, 4), (40, 4)]);
        assert_eq!(
            t.stored(4),
            Stored::Delta {
                base: 1,
                n_ranges: 0,
                bytes: 0
            }
        );
        assert_eq!(t.gguf().tensors()[3].ty, GgmlType::I8);
        assert_eq!(t.gguf().tensors()[4].n_bytes, 1);
        for _ in 0..2 {
            for (tt, w) in t.tensors.iter().zip(&want) {
                assert_eq!(t.data(tt), &w[..], "{}", tt.name);
                assert_eq!(tt.meta.layout.n_bytes().unwrap() as usize, w.len());
            }
        }
        assert!(matches!(
            t.data(&t.tensors[4]),
            std::borrow::Cow::Borrowed(_)
        ));
    }

    /// Rewrite the honest file's metadata array `key` (an array of `T`) with `f`.
    fn with<T: Clone>(
        key: &'static str,
        get: fn(&Array) -> Option<&Vec<T>>,
        f: impl FnOnce(&mut Vec<T>),
    ) -> Vec<u8>
    where
        Value: From<Vec<T>>,
    {
        edit(|h, _| set_array(h, key, get, f))
    }

    fn edit(f: impl FnOnce(&mut HeaderSpec, &mut Vec<Vec<u8>>)) -> Vec<u8> {
        crate::synth::rewrite(&honest().0, f).unwrap()
    }

    /// The file is refused, file level, with one line that says `what`.
    fn refused(bytes: Vec<u8>, what: &str) {
        match open(bytes) {
            Err(TraceError::Invalid(v)) => {
                let m = v.to_string();
                assert!(m.contains(what), "{m}");
                assert!(!m.contains('\n'), "{m}");
                assert_eq!(v.group(), None, "{m}");
            }
            Err(e) => panic!("another error: {e}"),
            Ok(_) => panic!("accepted, wanted: {what}"),
        }
    }

    #[test]
    fn each_storage_lie_is_refused_with_its_reason() {
        refused(
            with(keys::TENSOR_BASE, i32s, |v| v[3] = 4),
            "base 4 is not an earlier tensor",
        );
        refused(with(keys::TENSOR_BASE, i32s, |v| v[1] = 3), "(a cycle)");
        refused(with(keys::TENSOR_BASE, i32s, |v| v[3] = 3), "(a cycle)");
        refused(
            with(keys::TENSOR_BASE, i32s, |v| v[3] = 99),
            "base 99 is no tensor of the table",
        );
        refused(
            with(keys::TENSOR_RANGES, u64s, |v| v[2] = 62),
            "range 1 (62, 4) outside the tensor's 64 bytes",
        );
        refused(
            with(keys::TENSOR_RANGES, u64s, |v| v[2] = u64::MAX),
            "outside the tensor's 64 bytes",
        );
        refused(
            with(keys::TENSOR_RANGES, u64s, |v| v[2] = 10),
            "overlapping or out of order",
        );
        refused(
            with(keys::TENSOR_RANGES, u64s, |v| v.swap(0, 2)),
            "overlapping or out of order",
        );
        refused(
            edit(|h, d| {
                d[3].push(0);
                h.tensors[3].dims = vec![9];
            }),
            "9 bytes of delta data for ranges of 8 bytes",
        );
        refused(
            edit(|h, d| {
                d[4] = vec![0, 0];
                h.tensors[4].dims = vec![2];
            }),
            "2 bytes of delta data for ranges of 0 bytes (stored as 1 byte)",
        );
        refused(
            with(keys::TENSOR_BASE, i32s, |v| v[3] = 0),
            "stored against tensor #0",
        );
        refused(
            with(keys::TENSOR_NE, u64s, |v| v[4] = 16),
            "stored whole as f16 [8, 4, 1, 1], but recorded as f16 [16, 4, 1, 1]",
        );
        refused(
            with(keys::TENSOR_N_RANGES, u32s, |v| v[3] = 3),
            "4 entries for 3 ranges",
        );
        refused(
            with(keys::TENSOR_N_RANGES, u32s, |v| {
                v[1] = 2;
                v[3] = 0
            }),
            "stored whole, with 2 changed ranges",
        );
        refused(
            edit(|h, _| h.metadata.set(keys::TENSOR_BASE, vec![0u32; 5])),
            "not an array of int32",
        );
        refused(
            edit(|h, _| h.metadata.set(keys::TENSOR_TYPE, vec![0u32; 4])),
            "kqv_trace.tensor.type has 4 entries for 5 tensors",
        );
        refused(
            edit(|h, _| h.byte_order = gguf_io::ByteOrder::Big),
            "version 2 is little-endian only",
        );
    }
}
