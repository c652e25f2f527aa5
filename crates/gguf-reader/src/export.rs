//! `--export FILE.safetensors`: the traced tensors for the Python ecosystem, written with
//! the `safetensors` crate. Each tensor is named `step{S}/layer{L}/{role}` (the role's
//! name as the trace spells it: `q`, `k`, `v`, `kq_mask`, `kqv_out`, ...; a second tensor
//! with the same name gets `#1`, `#2`, ... appended: the occurrence, counted from 0, as the
//! trace's own node names count it), logits rows `step{S}/logits`, in
//! logical layout: shape = ggml's `ne` reversed (numpy order, 4 dimensions), dequantized
//! to F32 by default; with `--export-raw` F32, F16 and BF16 stay as they are and quantized
//! tensors are their raw blocks as U8 (shape: ne reversed with the row in bytes last).
//! The file's `__metadata__` holds the trace's run-level GGUF metadata (each value as
//! JSON) and `kqv_trace.export.tensors`, a JSON array with each tensor's name, role,
//! layer, step, ggml name, op, type and `ne`.
//!
//! Memory stays flat: the tensors are first streamed, in the trace's own order (so a
//! delta-stored trace applies one step's changes at a time), into a spill file next to
//! the destination, which the writer then maps; the destination is written atomically
//! (a temporary file renamed), so a failed export never leaves a partial file.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, BufWriter, Write};
use std::path::Path;

use gguf_io::{ByteOrder, GgmlType, GgufFile};
use safetensors::tensor::{Dtype, View};
use trace_format::{TraceError, TraceFile, TracedTensor};

use crate::args::Input;
use crate::RunError;

/// Run-level metadata arrays longer than this are left out of `__metadata__` (per-tensor
/// tables: the export's own tensor list carries what they say).
const MAX_ARRAY: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{0}")]
    Trace(#[from] TraceError),
    #[error("writing the export: {0}")]
    Io(#[from] io::Error),
    #[error("writing the export: {0}")]
    Safetensors(#[from] safetensors::SafeTensorError),
    #[error("--export: the destination must end in .safetensors or .npz, got {0}")]
    Extension(String),
    #[error("--export-raw writes .safetensors only (an .npz export is dequantized to F32)")]
    RawNpz,
    #[error("writing the export: {0}")]
    Npz(#[from] ndarray_npy::WriteNpzError),
}

/// One exported tensor: its place in the spill file and how safetensors describes it.
struct Entry {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    offset: usize,
    len: usize,
}

/// A tensor of the export, borrowed from the mapped spill file.
struct Spilled<'a> {
    dtype: Dtype,
    shape: &'a [usize],
    bytes: &'a [u8],
}

impl View for Spilled<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Write the export of the trace at `input` to `dest` and say so on `out`.
pub fn run(input: &Input, dest: &Path, raw: bool, out: &mut impl Write) -> Result<(), RunError> {
    let name = input.display();
    let wrap = |e: ExportError| RunError::Export {
        input: name.clone(),
        source: e,
    };
    let npz = match dest.extension().and_then(|e| e.to_str()) {
        Some("safetensors") => false,
        Some("npz") if raw => return Err(wrap(ExportError::RawNpz)),
        Some("npz") => true,
        _ => return Err(wrap(ExportError::Extension(dest.display().to_string()))),
    };
    let file = match input {
        Input::Path(p) => GgufFile::open(p),
        Input::Stdin => {
            let mut buf = Vec::new();
            io::Read::read_to_end(&mut io::stdin().lock(), &mut buf)?;
            GgufFile::from_bytes(buf)
        }
    }
    .map_err(|e| wrap(ExportError::Trace(e.into())))?;
    let trace = TraceFile::from_gguf(file).map_err(|e| wrap(e.into()))?;
    let n = if npz {
        export_npz(&trace, dest)
    } else {
        export(&trace, dest, raw)
    }
    .map_err(wrap)?;
    writeln!(
        out,
        "{}: {n} tensors ({})",
        trace_format::escape(&dest.display().to_string()),
        if raw {
            "F32/F16/BF16 as they are, quantized as raw blocks"
        } else {
            "dequantized to F32"
        }
    )?;
    Ok(())
}

/// The exported name of a traced tensor (before de-duplication).
pub fn tensor_name(t: &TracedTensor) -> String {
    format!(
        "step{}/layer{}/{}",
        t.meta.step,
        t.meta.layer,
        t.meta.role.name()
    )
}

/// Write `dest` from `trace`; returns the number of tensors written.
pub fn export(trace: &TraceFile, dest: &Path, raw: bool) -> Result<usize, ExportError> {
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let order = trace.gguf().header().byte_order;
    let spill = tempfile::tempfile_in(dir)?;
    let mut w = BufWriter::with_capacity(1 << 20, &spill);
    let mut entries: Vec<Entry> = Vec::new();
    let mut table = Vec::new();
    let mut offset = 0usize;
    for (name, t) in named(trace) {
        let (dtype, shape, len) = write_tensor(trace, t, raw, order, &mut w)?;
        table.push(table_entry(&name, t));
        entries.push(Entry {
            name,
            dtype,
            shape,
            offset,
            len,
        });
        offset += len;
    }
    w.flush()?;
    drop(w);

    let mut info: HashMap<String, String> = run_metadata(trace).into_iter().collect();
    info.insert(
        "kqv_trace.export.tensors".into(),
        serde_json::Value::Array(table).to_string(),
    );
    info.insert(
        "kqv_trace.export.values".into(),
        if raw { "raw" } else { "f32" }.into(),
    );

    let n = entries.len();
    // An empty spill file cannot be mapped; nothing to borrow from then.
    let map = if offset > 0 {
        // SAFETY: the spill file is an unnamed temporary file of this process, written
        // above and never modified while mapped.
        Some(unsafe { memmap2::Mmap::map(&spill)? })
    } else {
        None
    };
    let bytes: &[u8] = map.as_deref().unwrap_or(&[]);
    let views: BTreeMap<String, Spilled> = entries
        .iter()
        .map(|e| {
            (
                e.name.clone(),
                Spilled {
                    dtype: e.dtype,
                    shape: &e.shape,
                    bytes: &bytes[e.offset..e.offset + e.len],
                },
            )
        })
        .collect();
    safetensors::tensor::serialize_to_file(views, Some(info), dest)?;
    Ok(n)
}

/// The exported names of a trace's tensors, in the order written: attention tensors,
/// logits rows, then graph nodes in graph order; a repeated name gets `#k`, its
/// occurrence counted from 0.
fn named(trace: &TraceFile) -> Vec<(String, &TracedTensor)> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let bases = trace
        .tensors
        .iter()
        .map(|t| (tensor_name(t), t))
        .chain(
            trace
                .logits
                .iter()
                .map(|t| (format!("step{}/logits", t.meta.step), t)),
        )
        .chain(
            trace
                .nodes
                .iter()
                .map(|t| (format!("step{}/{}", t.meta.step, t.meta.ggml_name), t)),
        );
    bases
        .map(|(base, t)| {
            let count = seen.entry(base.clone()).or_insert(0);
            *count += 1;
            let name = if *count == 1 {
                base
            } else {
                format!("{base}#{}", *count - 1)
            };
            (name, t)
        })
        .collect()
}

/// Write `dest` as an `.npz` (numpy's `savez`: one `.npy` per tensor, through the
/// `ndarray-npy` crate) of every traced tensor dequantized to F32, under the names and
/// shapes of the safetensors export; the run's metadata and the tensor table (the
/// safetensors export's `__metadata__`, as one JSON object) as the UTF-8 bytes of a
/// `uint8` array `__metadata__`. Written atomically. Returns the number of tensors.
pub fn export_npz(trace: &TraceFile, dest: &Path) -> Result<usize, ExportError> {
    let entries = named(trace);
    let mut file = gguf_io::AtomicFile::create(dest).map_err(|e| ExportError::Trace(e.into()))?;
    let mut table = Vec::with_capacity(entries.len());
    {
        let mut npz = ndarray_npy::NpzWriter::new(BufWriter::with_capacity(1 << 20, file.file()));
        for (name, t) in &entries {
            let values = trace.f32(t)?;
            let shape = numpy_shape(t.meta.layout.ne);
            let array = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&shape), values)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            npz.add_array(name.as_str(), &array)?;
            table.push(table_entry(name, t));
        }
        let mut info = serde_json::Map::new();
        for (k, v) in run_metadata(trace) {
            info.insert(k, serde_json::Value::String(v));
        }
        info.insert(
            "kqv_trace.export.tensors".into(),
            serde_json::Value::String(serde_json::Value::Array(table).to_string()),
        );
        info.insert("kqv_trace.export.values".into(), "f32".into());
        let meta = serde_json::Value::Object(info).to_string().into_bytes();
        npz.add_array("__metadata__", &ndarray::Array1::from_vec(meta))?;
        let inner = npz.finish()?;
        inner
            .into_inner()
            .map_err(|e| ExportError::Io(e.into_error()))?;
    }
    file.commit().map_err(|e| ExportError::Trace(e.into()))?;
    Ok(entries.len())
}

/// One row of `kqv_trace.export.tensors`.
fn table_entry(name: &str, t: &TracedTensor) -> serde_json::Value {
    serde_json::json!({
        "name": name,
        "role": t.meta.role.name(),
        "layer": t.meta.layer,
        "step": t.meta.step,
        "ggml_name": t.meta.ggml_name,
        "op": t.meta.op,
        "type": t.meta.ty().name(),
        "ne": t.meta.layout.ne,
        "graph_order": t.graph_order,
    })
}

/// The trace's run-level metadata, each value as JSON (arrays over [`MAX_ARRAY`] left
/// out).
fn run_metadata(trace: &TraceFile) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (k, v) in trace.gguf().metadata().iter() {
        if let gguf_io::Value::Array(a) = v {
            if a.len() > MAX_ARRAY {
                continue;
            }
        }
        out.push((k.to_owned(), crate::report::value_json(v).to_string()));
    }
    out
}

/// ggml's `ne` reversed (numpy order).
fn numpy_shape(ne: [u64; 4]) -> Vec<usize> {
    ne.iter().rev().map(|&n| n as usize).collect()
}

/// Append one tensor's exported bytes (little-endian) to `w`.
fn write_tensor(
    trace: &TraceFile,
    t: &TracedTensor,
    raw: bool,
    order: ByteOrder,
    w: &mut impl Write,
) -> Result<(Dtype, Vec<usize>, usize), ExportError> {
    let ty = t.meta.ty();
    let ne = t.meta.layout.ne;
    let width = match ty {
        GgmlType::F32 => Some(Dtype::F32),
        GgmlType::F16 => Some(Dtype::F16),
        GgmlType::BF16 => Some(Dtype::BF16),
        _ => None,
    };
    if raw {
        let data = trace.data(t);
        // Little-endian as the dequantizers read them (gguf_io's rule for big-endian files).
        let data = gguf_io::to_little_endian(ty, order, &data);
        w.write_all(&data)?;
        return Ok(match width {
            Some(dtype) => (dtype, numpy_shape(ne), data.len()),
            None => {
                // Quantized: each row of ne[0] values is a whole number of blocks.
                let rows = (ne[1] * ne[2] * ne[3]).max(1) as usize;
                (
                    Dtype::U8,
                    vec![
                        ne[3] as usize,
                        ne[2] as usize,
                        ne[1] as usize,
                        data.len() / rows,
                    ],
                    data.len(),
                )
            }
        });
    }
    let values = trace.f32(t)?;
    let bytes: &[u8] = bytemuck::cast_slice(&values);
    if cfg!(target_endian = "little") {
        w.write_all(bytes)?;
    } else {
        for v in &values {
            w.write_all(&v.to_le_bytes())?;
        }
    }
    Ok((Dtype::F32, numpy_shape(ne), values.len() * 4))
}
