//! GGUF parsing. One parser serves both a memory-mapped file (random access, zero-copy
//! tensor data) and a non-seeking stream such as stdin (tensors delivered in file order).
//!
//! Hostile input is the normal case here: every count is checked against the bytes that
//! can still follow before anything is allocated, every read is bounds-checked, and every
//! failure is a [`GgufError`] naming the byte offset.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use byteorder::ByteOrder as _;
use memmap2::Mmap;

use crate::error::{GgufError, Result};
use crate::quant;
use crate::types::GgmlType;
use crate::value::{Array, Metadata, Value, ValueType};

pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Longest string accepted (keys, values, tensor names).
pub const MAX_STRING_LEN: u64 = 1 << 30;
/// Deepest nesting of arrays inside arrays.
pub const MAX_ARRAY_DEPTH: u32 = 16;
/// When reading a stream of unknown length, the header may be at most this long.
pub const MAX_STREAM_HEADER: u64 = 1 << 30;

/// Most elements reserved up front for any list read from the input.
const PREALLOC_LIMIT: usize = 1 << 16;

/// Byte order of a GGUF file. gguf-py writes both; llama.cpp reads little-endian only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ByteOrder {
    Little,
    Big,
}

impl ByteOrder {
    pub fn name(self) -> &'static str {
        match self {
            ByteOrder::Little => "little-endian",
            ByteOrder::Big => "big-endian",
        }
    }
}

/// One entry of the tensor table.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml `ne`: dims[0] is the fastest-varying dimension.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset of the data relative to the start of the data section.
    pub offset: u64,
    pub n_elements: u64,
    pub n_bytes: u64,
}

/// Everything before the tensor data.
#[derive(Clone, Debug, PartialEq)]
pub struct Header {
    pub version: u32,
    pub byte_order: ByteOrder,
    pub alignment: u64,
    pub metadata: Metadata,
    pub tensors: Vec<TensorInfo>,
    /// Bytes of header proper (magic through the last tensor info).
    pub header_len: u64,
    /// Absolute offset of the data section (header_len rounded up to the alignment).
    pub data_offset: u64,
}

impl Header {
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Bytes of the data section the tensor table needs (end of the last tensor).
    pub fn data_len(&self) -> u64 {
        self.tensors
            .iter()
            .map(|t| t.offset + t.n_bytes)
            .max()
            .unwrap_or(0)
    }
}

/// Parse a header from any reader. `len` is the input's total length when known (a file),
/// which lets every count be checked against the bytes that really follow.
pub fn parse_header<R: Read>(input: R, len: Option<u64>) -> Result<Header> {
    let mut p = Parser::new(input, len);
    p.header()
}

struct Parser<R> {
    input: R,
    pos: u64,
    /// How far the header may extend: the file length, or a cap for streams.
    budget: u64,
    known_len: Option<u64>,
    order: ByteOrder,
    scratch: Vec<u8>,
}

impl<R: Read> Parser<R> {
    fn new(input: R, len: Option<u64>) -> Self {
        Self {
            input,
            pos: 0,
            budget: len.unwrap_or(MAX_STREAM_HEADER),
            known_len: len,
            order: ByteOrder::Little,
            scratch: Vec::new(),
        }
    }

    fn remaining(&self) -> u64 {
        self.budget.saturating_sub(self.pos)
    }

    /// Read exactly `n` bytes into the scratch buffer.
    fn bytes(&mut self, n: u64, what: &'static str) -> Result<&[u8]> {
        let truncated = |end| GgufError::Truncated {
            what,
            offset: self.pos,
            needed: n,
            end,
        };
        if n > self.remaining() {
            return Err(truncated(self.known_len.unwrap_or(self.budget)));
        }
        let n_usize = usize::try_from(n).map_err(|_| truncated(self.budget))?;
        // Grow the buffer with the data that really arrives, so a stream that claims a
        // huge count and then ends costs no more memory than it sent.
        self.scratch.clear();
        let got = (&mut self.input)
            .take(n)
            .read_to_end(&mut self.scratch)
            .map_err(GgufError::Io)?;
        if got < n_usize {
            return Err(GgufError::Truncated {
                what,
                offset: self.pos,
                needed: n,
                end: self.pos + got as u64,
            });
        }
        self.pos += n;
        Ok(&self.scratch[..n_usize])
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N]> {
        let b = self.bytes(N as u64, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32> {
        let b = self.array::<4>(what)?;
        Ok(match self.order {
            ByteOrder::Little => u32::from_le_bytes(b),
            ByteOrder::Big => u32::from_be_bytes(b),
        })
    }

    fn u64(&mut self, what: &'static str) -> Result<u64> {
        let b = self.array::<8>(what)?;
        Ok(match self.order {
            ByteOrder::Little => u64::from_le_bytes(b),
            ByteOrder::Big => u64::from_be_bytes(b),
        })
    }

    /// A count of items that each take at least `min_size` bytes: reject it before
    /// allocating if that many cannot fit in what remains.
    fn count(&mut self, what: &'static str, min_size: u64) -> Result<u64> {
        let offset = self.pos;
        let count = self.u64(what)?;
        let max = self.remaining() / min_size.max(1);
        if count > max {
            return Err(GgufError::CountTooLarge {
                what,
                offset,
                count,
                max,
            });
        }
        Ok(count)
    }

    fn string(&mut self, what: &'static str) -> Result<String> {
        let offset = self.pos;
        let len = self.u64(what)?;
        if len > MAX_STRING_LEN {
            return Err(GgufError::StringTooLong {
                offset,
                len,
                limit: MAX_STRING_LEN,
            });
        }
        let start = self.pos;
        let bytes = self.bytes(len, what)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => Err(GgufError::InvalidUtf8 {
                what,
                offset: start,
            }),
        }
    }

    fn value_type(&mut self) -> Result<ValueType> {
        let offset = self.pos;
        let id = self.u32("value type")?;
        ValueType::from_id(id).ok_or(GgufError::BadValueType { ty: id, offset })
    }

    fn bool(&mut self) -> Result<bool> {
        let offset = self.pos;
        match self.array::<1>("bool value")?[0] {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(GgufError::BadBool { value, offset }),
        }
    }

    fn value(&mut self, ty: ValueType, depth: u32) -> Result<Value> {
        let order = self.order;
        Ok(match ty {
            ValueType::U8 => Value::U8(self.array::<1>("u8 value")?[0]),
            ValueType::I8 => Value::I8(self.array::<1>("i8 value")?[0] as i8),
            ValueType::U16 => Value::U16(conv!(order, u16, self.array::<2>("u16 value")?)),
            ValueType::I16 => Value::I16(conv!(order, i16, self.array::<2>("i16 value")?)),
            ValueType::U32 => Value::U32(conv!(order, u32, self.array::<4>("u32 value")?)),
            ValueType::I32 => Value::I32(conv!(order, i32, self.array::<4>("i32 value")?)),
            ValueType::F32 => Value::F32(conv!(order, f32, self.array::<4>("f32 value")?)),
            ValueType::U64 => Value::U64(conv!(order, u64, self.array::<8>("u64 value")?)),
            ValueType::I64 => Value::I64(conv!(order, i64, self.array::<8>("i64 value")?)),
            ValueType::F64 => Value::F64(conv!(order, f64, self.array::<8>("f64 value")?)),
            ValueType::Bool => Value::Bool(self.bool()?),
            ValueType::String => Value::String(self.string("string value")?),
            ValueType::Array => Value::Array(self.array_value(depth + 1)?),
        })
    }

    fn array_value(&mut self, depth: u32) -> Result<Array> {
        if depth > MAX_ARRAY_DEPTH {
            return Err(GgufError::NestingTooDeep {
                offset: self.pos,
                limit: MAX_ARRAY_DEPTH,
            });
        }
        let elem = self.value_type()?;
        let n = self.count("array element", elem.min_size())?;
        // `count` proved n * min_size <= the bytes that may follow; still reserve no more
        // than a small start, since a stream's budget is not bytes it has sent.
        let n_usize = n as usize;
        let reserve = n_usize.min(PREALLOC_LIMIT);
        let order = self.order;
        macro_rules! fixed {
            ($variant:ident, $t:ty, $read_into:ident) => {{
                let size = std::mem::size_of::<$t>();
                let raw = self.bytes(n * size as u64, "array data")?;
                let mut v: Vec<$t> = vec![Default::default(); n_usize];
                // `raw` holds exactly n * size bytes, as `read_*_into` requires.
                match order {
                    ByteOrder::Little => byteorder::LittleEndian::$read_into(raw, &mut v),
                    ByteOrder::Big => byteorder::BigEndian::$read_into(raw, &mut v),
                }
                Array::$variant(v)
            }};
        }
        Ok(match elem {
            ValueType::U8 => Array::U8(self.bytes(n, "array data")?.to_vec()),
            ValueType::I8 => Array::I8(
                self.bytes(n, "array data")?
                    .iter()
                    .map(|&b| b as i8)
                    .collect(),
            ),
            ValueType::U16 => fixed!(U16, u16, read_u16_into),
            ValueType::I16 => fixed!(I16, i16, read_i16_into),
            ValueType::U32 => fixed!(U32, u32, read_u32_into),
            ValueType::I32 => fixed!(I32, i32, read_i32_into),
            ValueType::F32 => fixed!(F32, f32, read_f32_into),
            ValueType::U64 => fixed!(U64, u64, read_u64_into),
            ValueType::I64 => fixed!(I64, i64, read_i64_into),
            ValueType::F64 => fixed!(F64, f64, read_f64_into),
            ValueType::Bool => {
                let mut v = Vec::with_capacity(reserve);
                for _ in 0..n {
                    v.push(self.bool()?);
                }
                Array::Bool(v)
            }
            ValueType::String => {
                let mut v = Vec::with_capacity(reserve);
                for _ in 0..n {
                    v.push(self.string("string array element")?);
                }
                Array::String(v)
            }
            ValueType::Array => {
                let mut v = Vec::with_capacity(reserve);
                for _ in 0..n {
                    v.push(self.array_value(depth + 1)?);
                }
                Array::Array(v)
            }
        })
    }

    fn header(&mut self) -> Result<Header> {
        let magic = self.array::<4>("magic")?;
        if magic != GGUF_MAGIC {
            return Err(GgufError::BadMagic { found: magic });
        }
        let raw_version = self.array::<4>("version")?;
        let le = u32::from_le_bytes(raw_version);
        let be = u32::from_be_bytes(raw_version);
        // A big-endian file's version reads as a huge number in little-endian order.
        let (version, order) = if le & 0xFFFF == 0 && be & 0xFFFF != 0 {
            (be, ByteOrder::Big)
        } else {
            (le, ByteOrder::Little)
        };
        if version != 2 && version != 3 {
            return Err(GgufError::UnsupportedVersion { version });
        }
        self.order = order;

        // Each tensor info takes at least 8 (name len) + 4 (n_dims) + 8 + 4 + 8 bytes,
        // each key/value pair at least 8 (key len) + 4 (type) + 1.
        let n_tensors = self.count("tensor", 32)?;
        let n_kv = self.count("metadata key", 13)?;

        let mut metadata = Metadata::new();
        let mut seen_keys = HashSet::new();
        for _ in 0..n_kv {
            let offset = self.pos;
            let key = self.string("metadata key")?;
            let ty = self.value_type()?;
            let value = self.value(ty, 0)?;
            if !seen_keys.insert(key.clone()) {
                return Err(GgufError::DuplicateKey { key, offset });
            }
            metadata.push_unchecked(key, value);
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(Value::U32(a)) if *a != 0 && a.is_power_of_two() => u64::from(*a),
            Some(v) => {
                return Err(GgufError::BadAlignment {
                    value: format!("{v:?}"),
                })
            }
        };

        let mut tensors = Vec::with_capacity((n_tensors as usize).min(PREALLOC_LIMIT));
        let mut seen_names = HashSet::new();
        for _ in 0..n_tensors {
            let info_offset = self.pos;
            let t = self.tensor_info(alignment)?;
            if !seen_names.insert(t.name.clone()) {
                return Err(GgufError::DuplicateTensor {
                    name: t.name,
                    offset: info_offset,
                });
            }
            tensors.push(t);
        }
        check_overlaps(&tensors)?;

        let header_len = self.pos;
        let data_offset = header_len.div_ceil(alignment) * alignment;
        // Every later `data_offset + offset + n_bytes` is computed unchecked: prove here
        // that none of them can overflow.
        for t in &tensors {
            if data_offset
                .checked_add(t.offset)
                .and_then(|x| x.checked_add(t.n_bytes))
                .is_none()
            {
                return Err(GgufError::DataOutOfBounds {
                    name: t.name.clone(),
                    start: t.offset,
                    end: u64::MAX,
                    len: u64::MAX - data_offset,
                });
            }
        }
        Ok(Header {
            version,
            byte_order: order,
            alignment,
            metadata,
            tensors,
            header_len,
            data_offset,
        })
    }

    fn tensor_info(&mut self, alignment: u64) -> Result<TensorInfo> {
        let offset = self.pos;
        let name = self.string("tensor name")?;
        let n_dims = self.u32("tensor dimension count")?;
        if !(1..=4).contains(&n_dims) {
            return Err(GgufError::BadDimCount {
                name,
                offset,
                n_dims,
            });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for dim in 0..n_dims as usize {
            let size = self.u64("tensor dimension")?;
            // ggml stores ne as int64_t: anything above i64::MAX is negative there.
            if size > i64::MAX as u64 {
                return Err(GgufError::BadDim {
                    name,
                    offset,
                    dim,
                    size,
                });
            }
            dims.push(size);
        }
        let ty_id = self.u32("tensor type")?;
        let ty = GgmlType(ty_id);
        let Some(info) = ty.info().filter(|i| !i.retired) else {
            return Err(GgufError::UnknownType {
                name,
                offset,
                ty: ty_id,
            });
        };
        let data_offset = self.u64("tensor data offset")?;
        let block = u64::from(info.block_size);
        if dims[0] % block != 0 {
            return Err(GgufError::NotWholeBlocks {
                name,
                ne0: dims[0],
                ty,
                block,
            });
        }
        let n_elements = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
        let n_bytes = n_elements.and_then(|n| ty.bytes_for(n));
        let (Some(n_elements), Some(n_bytes)) = (n_elements, n_bytes) else {
            return Err(GgufError::SizeOverflow { name, dims, ty });
        };
        if data_offset % alignment != 0 {
            return Err(GgufError::Misaligned {
                name,
                data_offset,
                alignment,
            });
        }
        if data_offset.checked_add(n_bytes).is_none() {
            return Err(GgufError::SizeOverflow { name, dims, ty });
        }
        Ok(TensorInfo {
            name,
            dims,
            ty,
            offset: data_offset,
            n_elements,
            n_bytes,
        })
    }
}

/// Read a fixed-size value from bytes in the file's byte order.
macro_rules! conv {
    ($order:expr, $t:ty, $bytes:expr) => {
        match $order {
            ByteOrder::Little => <$t>::from_le_bytes($bytes),
            ByteOrder::Big => <$t>::from_be_bytes($bytes),
        }
    };
}
use conv;

fn check_overlaps(tensors: &[TensorInfo]) -> Result<()> {
    let mut by_offset: Vec<&TensorInfo> = tensors.iter().filter(|t| t.n_bytes > 0).collect();
    by_offset.sort_by_key(|t| t.offset);
    for w in by_offset.windows(2) {
        if w[0].offset + w[0].n_bytes > w[1].offset {
            return Err(GgufError::Overlap {
                first: w[0].name.clone(),
                second: w[1].name.clone(),
            });
        }
    }
    Ok(())
}

enum Storage {
    Mmap(Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mmap(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// A whole GGUF file with random access to tensor data.
pub struct GgufFile {
    header: Header,
    storage: Storage,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("len", &self.len())
            .field("header", &self.header)
            .finish()
    }
}

impl GgufFile {
    /// Memory-map a file. Tensor data is not copied.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let file = File::open(path.as_ref())?;
        // SAFETY: the map is read-only. If another process truncates the file while it is
        // mapped, reads may fault; that is the accepted contract of memory-mapped readers
        // (ripgrep, llama.cpp) and the bounds below are all checked against the mapped length.
        let map = unsafe { Mmap::map(&file)? };
        Self::from_storage(Storage::Mmap(map))
    }

    /// Parse a file already in memory (for example stdin read to the end).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        Self::from_storage(Storage::Owned(bytes))
    }

    fn from_storage(storage: Storage) -> Result<Self> {
        let bytes = storage.bytes();
        let header = parse_header(bytes, Some(bytes.len() as u64))?;
        let data_len = (bytes.len() as u64).saturating_sub(header.data_offset);
        for t in &header.tensors {
            let end = t.offset + t.n_bytes;
            if t.n_bytes > 0 && (end > data_len || header.data_offset > bytes.len() as u64) {
                return Err(GgufError::DataOutOfBounds {
                    name: t.name.clone(),
                    start: t.offset,
                    end,
                    len: data_len,
                });
            }
        }
        Ok(Self { header, storage })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn metadata(&self) -> &Metadata {
        &self.header.metadata
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.header.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.header.tensor(name)
    }

    /// Where a tensor's bytes start in the file (bounds were checked when it was opened).
    pub fn tensor_data_offset(&self, t: &TensorInfo) -> u64 {
        self.header.data_offset + t.offset
    }

    /// Raw bytes of a tensor of this file (bounds were checked when the file was opened).
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        let start = (self.header.data_offset + t.offset) as usize;
        self.storage
            .bytes()
            .get(start..start + t.n_bytes as usize)
            .unwrap_or(&[])
    }

    /// Let the pages of a memory-mapped file that this process has read leave its
    /// resident set (`MADV_DONTNEED`; Linux and other Unix): the page cache keeps them and
    /// the next read faults them back in, with the same bytes. For a reader that streams
    /// through a file much larger than the memory it wants to hold (`gguf-reader
    /// --verify-attention`, the offline analyzer): without it every page read stays
    /// resident until the file is closed, so the peak RSS is the file's size. A no-op for
    /// a file read into memory and on other platforms.
    pub fn release_pages(&self) {
        #[cfg(unix)]
        if let Storage::Mmap(m) = &self.storage {
            // SAFETY: the map is read-only and private and nothing writes through it, so
            // every page is clean: MADV_DONTNEED only drops this process's copy of the
            // mapping's pages, and a later read maps the file's same bytes again (the
            // contract `open` already relies on: the file does not change while mapped).
            let _ = unsafe { m.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) };
        }
    }

    /// Total size of the input in bytes.
    pub fn len(&self) -> u64 {
        self.storage.bytes().len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A tensor's values as f32, dequantized whatever its type.
    pub fn tensor_f32(&self, t: &TensorInfo) -> Result<Vec<f32>> {
        tensor_to_f32(t, self.tensor_data(t), self.header.byte_order)
    }
}

/// Whether a big-endian file stores this type byte-swapped. gguf-py (the one writer of
/// big-endian GGUF) swaps the types numpy has native dtypes for (F16, F32, F64, I16, I32,
/// I64) and writes everything it handles as raw bytes (BF16 and all block formats)
/// unchanged, little-endian inside.
pub fn swapped_in_big_endian(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::F16
            | GgmlType::F32
            | GgmlType::F64
            | GgmlType::I16
            | GgmlType::I32
            | GgmlType::I64
    )
}

/// Tensor bytes in little-endian order, as the dequantizers expect them.
pub fn to_little_endian(ty: GgmlType, order: ByteOrder, data: &[u8]) -> Cow<'_, [u8]> {
    match (order, ty.info()) {
        (ByteOrder::Big, Some(info)) if swapped_in_big_endian(ty) => {
            let mut swapped = data.to_vec();
            for c in swapped.chunks_exact_mut(info.type_size as usize) {
                c.reverse();
            }
            Cow::Owned(swapped)
        }
        _ => Cow::Borrowed(data),
    }
}

/// Dequantize one tensor's bytes to f32, whatever the file's byte order.
pub fn tensor_to_f32(t: &TensorInfo, data: &[u8], order: ByteOrder) -> Result<Vec<f32>> {
    let data = to_little_endian(t.ty, order, data);
    quant::dequantize_to_vec(t.ty, &data, t.n_elements as usize).map_err(|source| {
        GgufError::Dequantize {
            name: t.name.clone(),
            source,
        }
    })
}

/// Reads a GGUF from a non-seeking stream (stdin, a pipe): the header first, then each
/// tensor's data in the order it appears in the file.
#[derive(Debug)]
pub struct StreamReader<R> {
    header: Header,
    input: R,
    /// Absolute position in the stream.
    pos: u64,
    /// Tensor indices sorted by data offset.
    order: Vec<usize>,
    next: usize,
}

impl<R: Read> StreamReader<R> {
    pub fn new(mut input: R) -> Result<Self> {
        let header = {
            let mut p = Parser::new(&mut input, None);
            let h = p.header()?;
            debug_assert_eq!(p.pos, h.header_len);
            h
        };
        let mut order: Vec<usize> = (0..header.tensors.len()).collect();
        order.sort_by_key(|&i| header.tensors[i].offset);
        Ok(Self {
            pos: header.header_len,
            header,
            input,
            order,
            next: 0,
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    fn skip_to(&mut self, target: u64, what: &'static str) -> Result<()> {
        let n = target.saturating_sub(self.pos);
        let copied = std::io::copy(&mut (&mut self.input).take(n), &mut std::io::sink())?;
        if copied < n {
            return Err(GgufError::Truncated {
                what,
                offset: self.pos,
                needed: n,
                end: self.pos + copied,
            });
        }
        self.pos = target;
        Ok(())
    }

    /// The next tensor in data order and its bytes, or `None` after the last one.
    pub fn next_tensor(&mut self) -> Result<Option<(&TensorInfo, Vec<u8>)>> {
        let Some(&idx) = self.order.get(self.next) else {
            return Ok(None);
        };
        self.next += 1;
        let t = &self.header.tensors[idx];
        let start = self.header.data_offset + t.offset;
        let n_bytes = t.n_bytes;
        if n_bytes == 0 {
            // An empty tensor may sit at any offset, even inside another's data (the
            // overlap check ignores it): there is nothing to read.
            return Ok(Some((&self.header.tensors[idx], Vec::new())));
        }
        // Non-empty tensors were checked not to overlap, so offsets only increase.
        self.skip_to(start, "padding before tensor data")?;
        let mut data = Vec::new();
        // The size was validated; still read through `take` so a short stream is an error
        // and never a huge up-front allocation.
        let got = (&mut self.input).take(n_bytes).read_to_end(&mut data)? as u64;
        if got < n_bytes {
            return Err(GgufError::Truncated {
                what: "tensor data",
                offset: self.pos,
                needed: n_bytes,
                end: self.pos + got,
            });
        }
        self.pos += n_bytes;
        Ok(Some((&self.header.tensors[idx], data)))
    }
}
