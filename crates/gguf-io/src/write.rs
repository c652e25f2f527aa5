//! Streaming GGUF writer. The header (metadata and tensor table) is written first, then
//! each tensor's bytes in declaration order, so a writer never holds tensor data in memory
//! and can write to a pipe. [`AtomicFile`] makes writing to a path all-or-nothing.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::error::{GgufError, Result};
use crate::read::{ByteOrder, Header, TensorInfo, DEFAULT_ALIGNMENT, GGUF_MAGIC};
use crate::types::GgmlType;
use crate::value::{Array, Metadata, Value};

/// ggml's `GGML_MAX_NAME` is 64 including the terminating NUL.
pub const MAX_TENSOR_NAME: usize = 63;

/// A tensor to be written: its data comes later, through [`GgufWriter::write_tensor`].
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    /// ggml `ne`, fastest-varying first; 1 to 4 entries.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
}

/// What goes in the header.
#[derive(Clone, Debug, PartialEq)]
pub struct HeaderSpec {
    pub metadata: Metadata,
    pub tensors: Vec<TensorSpec>,
    pub byte_order: ByteOrder,
}

impl Default for HeaderSpec {
    fn default() -> Self {
        Self {
            metadata: Metadata::new(),
            tensors: Vec::new(),
            byte_order: ByteOrder::Little,
        }
    }
}

impl HeaderSpec {
    /// The spec that reproduces a parsed header (for copying or rewriting a file).
    pub fn from_header(h: &Header) -> Self {
        Self {
            metadata: h.metadata.clone(),
            tensors: h
                .tensors
                .iter()
                .map(|t| TensorSpec {
                    name: t.name.clone(),
                    dims: t.dims.clone(),
                    ty: t.ty,
                })
                .collect(),
            byte_order: h.byte_order,
        }
    }
}

/// Writes one GGUF (version 3) to any `Write`.
pub struct GgufWriter<W: Write> {
    w: W,
    pos: u64,
    alignment: u64,
    data_offset: u64,
    infos: Vec<TensorInfo>,
    next: usize,
}

fn check_tensor(spec: &TensorSpec) -> Result<(u64, u64)> {
    let name = &spec.name;
    if name.len() > MAX_TENSOR_NAME {
        return Err(GgufError::NameTooLong {
            name: name.clone(),
            len: name.len(),
        });
    }
    if spec.dims.is_empty() || spec.dims.len() > 4 {
        return Err(GgufError::BadDimCount {
            name: name.clone(),
            offset: 0,
            n_dims: spec.dims.len() as u32,
        });
    }
    let Some(info) = spec.ty.info().filter(|i| !i.retired) else {
        return Err(GgufError::UnknownType {
            name: name.clone(),
            offset: 0,
            ty: spec.ty.0,
        });
    };
    let block = u64::from(info.block_size);
    if spec.dims[0] % block != 0 {
        return Err(GgufError::NotWholeBlocks {
            name: name.clone(),
            ne0: spec.dims[0],
            ty: spec.ty,
            block,
        });
    }
    let n = spec
        .dims
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .filter(|&n| n <= i64::MAX as u64);
    let bytes = n.and_then(|n| spec.ty.bytes_for(n));
    match (n, bytes) {
        (Some(n), Some(b)) => Ok((n, b)),
        _ => Err(GgufError::SizeOverflow {
            name: name.clone(),
            dims: spec.dims.clone(),
            ty: spec.ty,
        }),
    }
}

fn alignment_of(metadata: &Metadata) -> Result<u64> {
    match metadata.get("general.alignment") {
        None => Ok(DEFAULT_ALIGNMENT),
        Some(Value::U32(a)) if *a != 0 && a.is_power_of_two() => Ok(u64::from(*a)),
        Some(v) => Err(GgufError::BadAlignment {
            value: format!("{v:?}"),
        }),
    }
}

/// Serialises header fields in the chosen byte order.
struct Enc<'a> {
    out: &'a mut Vec<u8>,
    order: ByteOrder,
}

macro_rules! put {
    ($self:ident, $v:expr) => {
        match $self.order {
            ByteOrder::Little => $self.out.extend_from_slice(&$v.to_le_bytes()),
            ByteOrder::Big => $self.out.extend_from_slice(&$v.to_be_bytes()),
        }
    };
}

impl Enc<'_> {
    fn u32(&mut self, v: u32) {
        put!(self, v)
    }
    fn u64(&mut self, v: u64) {
        put!(self, v)
    }
    fn string(&mut self, s: &str) {
        self.u64(s.len() as u64);
        self.out.extend_from_slice(s.as_bytes());
    }
    fn value(&mut self, v: &Value) {
        match v {
            Value::U8(x) => self.out.push(*x),
            Value::I8(x) => self.out.push(*x as u8),
            Value::U16(x) => put!(self, x),
            Value::I16(x) => put!(self, x),
            Value::U32(x) => put!(self, x),
            Value::I32(x) => put!(self, x),
            Value::F32(x) => put!(self, x),
            Value::Bool(x) => self.out.push(u8::from(*x)),
            Value::String(s) => self.string(s),
            Value::Array(a) => self.array(a),
            Value::U64(x) => put!(self, x),
            Value::I64(x) => put!(self, x),
            Value::F64(x) => put!(self, x),
        }
    }
    fn array(&mut self, a: &Array) {
        self.u32(a.elem_type() as u32);
        self.u64(a.len() as u64);
        macro_rules! each {
            ($v:expr) => {
                for x in $v {
                    put!(self, x);
                }
            };
        }
        match a {
            Array::U8(v) => self.out.extend_from_slice(v),
            Array::I8(v) => self.out.extend(v.iter().map(|&x| x as u8)),
            Array::U16(v) => each!(v),
            Array::I16(v) => each!(v),
            Array::U32(v) => each!(v),
            Array::I32(v) => each!(v),
            Array::F32(v) => each!(v),
            Array::Bool(v) => self.out.extend(v.iter().map(|&x| u8::from(x))),
            Array::String(v) => v.iter().for_each(|s| self.string(s)),
            Array::Array(v) => v.iter().for_each(|inner| self.array(inner)),
            Array::U64(v) => each!(v),
            Array::I64(v) => each!(v),
            Array::F64(v) => each!(v),
        }
    }
}

impl<W: Write> GgufWriter<W> {
    /// Validate the spec and write the header and the padding before the data section.
    pub fn new(mut w: W, spec: &HeaderSpec) -> Result<Self> {
        let alignment = alignment_of(&spec.metadata)?;
        let mut seen = std::collections::HashSet::new();
        let mut infos = Vec::with_capacity(spec.tensors.len());
        let mut offset = 0u64;
        for t in &spec.tensors {
            let (n_elements, n_bytes) = check_tensor(t)?;
            if !seen.insert(t.name.as_str()) {
                return Err(GgufError::DuplicateTensor {
                    name: t.name.clone(),
                    offset: 0,
                });
            }
            infos.push(TensorInfo {
                name: t.name.clone(),
                dims: t.dims.clone(),
                ty: t.ty,
                offset,
                n_elements,
                n_bytes,
            });
            offset = offset
                .checked_add(n_bytes)
                .and_then(|o| o.checked_next_multiple_of(alignment))
                .ok_or_else(|| GgufError::SizeOverflow {
                    name: t.name.clone(),
                    dims: t.dims.clone(),
                    ty: t.ty,
                })?;
        }

        let mut buf = Vec::new();
        let mut e = Enc {
            out: &mut buf,
            order: spec.byte_order,
        };
        e.out.extend_from_slice(&GGUF_MAGIC);
        e.u32(3);
        e.u64(infos.len() as u64);
        e.u64(spec.metadata.len() as u64);
        for (k, v) in spec.metadata.iter() {
            e.string(k);
            e.u32(v.value_type() as u32);
            e.value(v);
        }
        for t in &infos {
            e.string(&t.name);
            e.u32(t.dims.len() as u32);
            for &d in &t.dims {
                e.u64(d);
            }
            e.u32(t.ty.0);
            e.u64(t.offset);
        }
        let header_len = buf.len() as u64;
        let data_offset = header_len.next_multiple_of(alignment);
        buf.resize(data_offset as usize, 0);
        w.write_all(&buf)?;
        Ok(Self {
            w,
            pos: data_offset,
            alignment,
            data_offset,
            infos,
            next: 0,
        })
    }

    /// The tensor table as written (offsets filled in).
    pub fn tensor_infos(&self) -> &[TensorInfo] {
        &self.infos
    }

    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    fn begin_next(&mut self, got: Option<u64>) -> Result<TensorInfo> {
        let Some(t) = self.infos.get(self.next).cloned() else {
            return Err(GgufError::WriterState(
                "more tensor data written than tensors declared",
            ));
        };
        if let Some(got) = got {
            if got != t.n_bytes {
                return Err(GgufError::DataSizeMismatch {
                    name: t.name,
                    expected: t.n_bytes,
                    got,
                });
            }
        }
        let start = self.data_offset + t.offset;
        self.pad_to(start)?;
        Ok(t)
    }

    fn pad_to(&mut self, target: u64) -> Result<()> {
        const ZEROS: [u8; 64] = [0; 64];
        while self.pos < target {
            let n = (target - self.pos).min(64) as usize;
            self.w.write_all(&ZEROS[..n])?;
            self.pos += n as u64;
        }
        Ok(())
    }

    /// Write the next declared tensor's bytes (in the file's byte order).
    pub fn write_tensor(&mut self, data: &[u8]) -> Result<()> {
        self.begin_next(Some(data.len() as u64))?;
        self.w.write_all(data)?;
        self.pos += data.len() as u64;
        self.next += 1;
        Ok(())
    }

    /// Write the next declared tensor's bytes from a reader, which must supply exactly
    /// the tensor's size (used to move spooled data into the file without holding it).
    pub fn write_tensor_from<R: Read>(&mut self, r: R) -> Result<()> {
        let t = self.begin_next(None)?;
        let copied = std::io::copy(&mut r.take(t.n_bytes), &mut self.w)?;
        if copied != t.n_bytes {
            return Err(GgufError::DataSizeMismatch {
                name: t.name,
                expected: t.n_bytes,
                got: copied,
            });
        }
        self.pos += copied;
        self.next += 1;
        Ok(())
    }

    /// Check every declared tensor was written, pad the end, flush, return the sink.
    pub fn finish(mut self) -> Result<W> {
        if self.next != self.infos.len() {
            return Err(GgufError::WriterState(
                "finish() called before every declared tensor was written",
            ));
        }
        if !self.infos.is_empty() {
            let end = self.pos.next_multiple_of(self.alignment);
            self.pad_to(end)?;
        }
        self.w.flush()?;
        Ok(self.w)
    }
}

/// A file written under a temporary name in the destination directory and renamed over
/// the destination only by [`AtomicFile::commit`]: a crash, an error or a dropped
/// `AtomicFile` leaves whatever was at the path before untouched.
pub struct AtomicFile {
    tmp: tempfile::NamedTempFile,
    dest: PathBuf,
}

impl AtomicFile {
    pub fn create(dest: impl AsRef<Path>) -> Result<Self> {
        let dest = dest.as_ref().to_path_buf();
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".tmp")
            .tempfile_in(dir)?;
        // A temporary file is private (0600); the result should have the permissions a
        // newly created file gets, or keep those of the file it replaces.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let perms = match std::fs::metadata(&dest) {
                Ok(m) => m.permissions(),
                Err(_) => std::fs::Permissions::from_mode(0o644),
            };
            tmp.as_file().set_permissions(perms)?;
        }
        Ok(Self { tmp, dest })
    }

    pub fn file(&mut self) -> &mut File {
        self.tmp.as_file_mut()
    }

    /// Flush to disk and rename over the destination.
    pub fn commit(self) -> Result<()> {
        self.tmp.as_file().sync_all()?;
        self.tmp
            .persist(&self.dest)
            .map_err(|e| GgufError::Io(e.error))?;
        Ok(())
    }
}

/// Write a complete GGUF to `path` atomically; `write_data` supplies tensor data in order.
pub fn write_file<F>(path: impl AsRef<Path>, spec: &HeaderSpec, write_data: F) -> Result<()>
where
    F: FnOnce(&mut GgufWriter<BufWriter<&mut File>>) -> Result<()>,
{
    let mut out = AtomicFile::create(path)?;
    {
        let mut w = GgufWriter::new(BufWriter::new(out.file()), spec)?;
        write_data(&mut w)?;
        let buffered = w.finish()?;
        buffered
            .into_inner()
            .map_err(|e| GgufError::Io(e.into_error()))?;
    }
    out.commit()
}
