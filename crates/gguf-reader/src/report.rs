//! One description of a GGUF file, built once and rendered as text or JSON.

use std::collections::BTreeMap;
use std::io::Read;
use trace_format::json::number as float_json;

use gguf_io::{Array, GgmlType, GgufFile, Header, Result, StreamReader, TensorInfo, Value};
use serde_json::{json, Map, Value as Json};
use trace_format::stored::Storage;

use crate::args::Options;
use crate::data::{self, TensorData};

/// Version of the `--json` document layout (docs/json.md).
pub const JSON_SCHEMA: &str = "gguf-reader/1";
/// Array elements shown without `--full-arrays`.
pub const ARRAY_PREVIEW: usize = 8;

/// What kind of GGUF this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A trace written by kv-cache-monitor (it carries `kqv_trace.*` metadata).
    KqvTrace,
    /// Anything else (a model, a LoRA, a file from another tool).
    Other,
}

/// A trace's tensors grouped by the step in their name (`..._step_<N>`).
#[derive(Clone, Debug, Default)]
pub struct TraceGroups {
    pub steps: BTreeMap<u64, Vec<usize>>,
    pub ungrouped: Vec<usize>,
}

pub struct Report {
    pub input: String,
    pub file_size: Option<u64>,
    pub header: Header,
    pub kind: Kind,
    /// Indices of the tensors that pass `--tensor`, in table order.
    pub selected: Vec<usize>,
    /// With `--show-data`: per selected tensor index, its data or why it has none.
    pub data: BTreeMap<usize, std::result::Result<TensorData, String>>,
    pub trace: Option<TraceGroups>,
    /// A format-version-2 trace: per tensor, how it is stored (`whole`, `delta of #i, k
    /// bytes`, `same as #i`), from its `kqv_trace.tensor.base` / `n_ranges`; `None` for
    /// any other file (or one whose arrays do not have an entry per tensor).
    pub stored: Option<Vec<String>>,
    /// A format-version-2 trace: per tensor, the type and shape of its logical data (what
    /// `--show-data` shows: a delta rebuilt, as the version-1 file has it); `None` for any
    /// other file.
    pub logical: Option<Vec<(GgmlType, Vec<u64>)>>,
}

/// A format-version-2 trace's storage, read from its header: `None` for any other file,
/// `Some(Err)` (the reason) when the storage keys contradict the file.
fn storage_of(h: &Header) -> Option<std::result::Result<Storage, String>> {
    use trace_format::keys;
    let v2 = h.metadata.get(keys::FORMAT_VERSION).and_then(Value::as_u64)
        == Some(u64::from(trace_format::FORMAT_VERSION));
    v2.then(|| Storage::from_header(h).map_err(|v| format!("version-2 storage not readable: {v}")))
}

/// Tensor `t` as its logical data is: type and shape as recorded in `storage`.
fn logical_info(t: &TensorInfo, ty: GgmlType, dims: &[u64]) -> TensorInfo {
    let n_elements = dims.iter().product();
    TensorInfo {
        name: t.name.clone(),
        dims: dims.to_vec(),
        ty,
        offset: t.offset,
        n_elements,
        n_bytes: ty.bytes_for(n_elements).unwrap_or(0),
    }
}

/// How each tensor of a version-2 trace is stored, as the listing says it.
fn stored_of(h: &Header) -> Option<Vec<String>> {
    use trace_format::keys;
    let n = h.tensors.len();
    let (Some(Array::I32(base)), Some(Array::U32(ranges))) = (
        h.metadata.get(keys::TENSOR_BASE).and_then(Value::as_array),
        h.metadata
            .get(keys::TENSOR_N_RANGES)
            .and_then(Value::as_array),
    ) else {
        return None;
    };
    if base.len() != n || ranges.len() != n {
        return None;
    }
    Some(
        (0..n)
            .map(|i| match (base[i], ranges[i]) {
                (b, _) if b < 0 => "whole".to_owned(),
                (b, 0) => format!("same as #{b}"),
                (b, _) => format!("delta of #{b}, {} bytes", h.tensors[i].n_bytes),
            })
            .collect(),
    )
}

fn kind_of(h: &Header) -> Kind {
    if h.metadata.iter().any(|(k, _)| k.starts_with("kqv_trace.")) {
        Kind::KqvTrace
    } else {
        Kind::Other
    }
}

/// The step number at the end of a seed-style trace name (`kqv_out_kqv_out-0_step_3`).
pub fn step_of(name: &str) -> Option<u64> {
    let (_, tail) = name.rsplit_once("_step_")?;
    tail.parse().ok()
}

fn group(h: &Header, selected: &[usize]) -> TraceGroups {
    let mut g = TraceGroups::default();
    for &i in selected {
        match step_of(&h.tensors[i].name) {
            Some(s) => g.steps.entry(s).or_default().push(i),
            None => g.ungrouped.push(i),
        }
    }
    g
}

impl Report {
    fn new(input: &str, file_size: Option<u64>, header: Header, opts: &Options) -> Self {
        let selected: Vec<usize> = (0..header.tensors.len())
            .filter(|&i| {
                opts.tensor_filter
                    .as_ref()
                    .is_none_or(|re| re.is_match(&header.tensors[i].name))
            })
            .collect();
        let kind = kind_of(&header);
        let trace = (kind == Kind::KqvTrace).then(|| group(&header, &selected));
        let stored = (kind == Kind::KqvTrace)
            .then(|| stored_of(&header))
            .flatten();
        Self {
            stored,
            logical: None,
            input: input.to_owned(),
            file_size,
            header,
            kind,
            selected,
            data: BTreeMap::new(),
            trace,
        }
    }

    pub fn from_file(input: &str, file: &GgufFile, opts: &Options) -> Result<Self> {
        let mut r = Self::new(input, Some(file.len()), file.header().clone(), opts);
        if !opts.show_data {
            return Ok(r);
        }
        let order = file.header().byte_order;
        let storage = (r.kind == Kind::KqvTrace)
            .then(|| storage_of(file.header()))
            .flatten();
        r.set_logical(storage.as_ref());
        for &i in &r.selected {
            let t = &file.tensors()[i];
            let d = match &storage {
                None => data::inspect(t, file.tensor_data(t), order, opts.count)
                    .map_err(|e| e.to_string()),
                Some(Err(e)) => Err(e.clone()),
                // A version-2 trace: the logical data, a delta rebuilt (from the last
                // tensor rebuilt of its stream when there is one).
                Some(Ok(s)) => {
                    let (ty, ne) = s.logical(i);
                    data::inspect(
                        &logical_info(t, ty, &ne),
                        &s.data(file, i),
                        order,
                        opts.count,
                    )
                    .map_err(|e| e.to_string())
                }
            };
            r.data.insert(i, d);
        }
        Ok(r)
    }

    /// Record each tensor's logical type and shape from a version-2 storage.
    fn set_logical(&mut self, storage: Option<&std::result::Result<Storage, String>>) {
        if let Some(Ok(s)) = storage {
            self.logical = Some(
                (0..self.header.tensors.len())
                    .map(|i| {
                        let (ty, ne) = s.logical(i);
                        (ty, ne.to_vec())
                    })
                    .collect(),
            );
        }
    }

    /// The type and shape of tensor `i`'s data as `--show-data` shows it: the GGUF
    /// tensor's, or a version-2 trace's logical ones.
    pub fn data_layout(&self, i: usize) -> (GgmlType, &[u64]) {
        match self.logical.as_ref().and_then(|l| l.get(i)) {
            Some((ty, dims)) => (*ty, dims),
            None => (self.header.tensors[i].ty, &self.header.tensors[i].dims),
        }
    }

    /// From a stream, the tensors come in data order, each read once: a version-2
    /// delta is rebuilt from its base's bytes, kept only while a tensor still to come
    /// that is shown (or that a shown one is rebuilt from) needs them.
    pub fn from_stream<R: Read>(
        input: &str,
        reader: &mut StreamReader<R>,
        opts: &Options,
    ) -> Result<Self> {
        let mut r = Self::new(input, None, reader.header().clone(), opts);
        if !opts.show_data {
            return Ok(r);
        }
        let order = reader.header().byte_order;
        let storage = (r.kind == Kind::KqvTrace)
            .then(|| storage_of(reader.header()))
            .flatten();
        r.set_logical(storage.as_ref());
        let n = r.header.tensors.len();
        let position: std::collections::HashMap<&str, usize> = r
            .header
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.as_str(), i))
            .collect();
        let mut wanted = vec![false; n];
        for &i in &r.selected {
            wanted[i] = true;
        }
        // Version 2: the tensors a shown one is rebuilt from, and how many of those
        // still to come need each one's bytes.
        let mut needed = wanted.clone();
        let mut uses = vec![0u32; n];
        if let Some(Ok(s)) = &storage {
            for i in (0..n).rev() {
                if let (true, Some(b)) = (needed[i], s.base(i)) {
                    needed[b] = true;
                    uses[b] += 1;
                }
            }
        }
        let mut held: std::collections::HashMap<usize, Vec<u8>> = Default::default();
        let mut found = Vec::new();
        while let Some((t, bytes)) = reader.next_tensor()? {
            let Some(&i) = position.get(t.name.as_str()) else {
                continue;
            };
            if !needed[i] {
                continue;
            }
            let d = match &storage {
                None => data::inspect(t, &bytes, order, opts.count).map_err(|e| e.to_string()),
                Some(Err(e)) => Err(e.clone()),
                Some(Ok(s)) => {
                    let logical = match s.base(i) {
                        None => Ok(bytes),
                        Some(b) => {
                            uses[b] = uses[b].saturating_sub(1);
                            let base = if uses[b] == 0 {
                                held.remove(&b)
                            } else {
                                held.get(&b).cloned()
                            };
                            match base {
                                Some(mut buf) => {
                                    s.apply_delta(i, &bytes, &mut buf);
                                    Ok(buf)
                                }
                                None => Err(format!(
                                    "stored against tensor #{b}, which the stream did not \
                                     hold before it (its data is not in table order)"
                                )),
                            }
                        }
                    };
                    let d = logical.as_ref().map_err(Clone::clone).and_then(|l| {
                        let (ty, ne) = s.logical(i);
                        data::inspect(&logical_info(t, ty, &ne), l, order, opts.count)
                            .map_err(|e| e.to_string())
                    });
                    if let (Ok(l), true) = (logical, uses[i] > 0) {
                        held.insert(i, l);
                    }
                    d
                }
            };
            if wanted[i] {
                found.push((i, d));
            }
        }
        r.data.extend(found);
        Ok(r)
    }

    pub fn to_json(&self, opts: &Options) -> Json {
        let h = &self.header;
        let metadata: Vec<Json> = h
            .metadata
            .iter()
            .map(|(k, v)| {
                let mut m = Map::new();
                m.insert("key".into(), json!(k));
                m.insert("type".into(), json!(v.value_type().name()));
                if let Value::Array(a) = v {
                    m.insert("elem_type".into(), json!(a.elem_type().name()));
                    m.insert("len".into(), json!(a.len()));
                    let limit = if opts.full_arrays {
                        usize::MAX
                    } else {
                        ARRAY_PREVIEW
                    };
                    m.insert("value".into(), array_json(a, limit));
                    m.insert("truncated".into(), json!(a.len() > limit));
                } else {
                    m.insert("value".into(), value_json(v));
                }
                Json::Object(m)
            })
            .collect();
        let tensors: Vec<Json> = self
            .selected
            .iter()
            .map(|&i| {
                let t = &h.tensors[i];
                let mut m = Map::new();
                m.insert("name".into(), json!(t.name));
                m.insert("type".into(), json!(t.ty.name()));
                m.insert("shape".into(), json!(t.dims));
                m.insert("n_elements".into(), json!(t.n_elements));
                m.insert("n_bytes".into(), json!(t.n_bytes));
                m.insert("offset".into(), json!(t.offset));
                if let Some(step) = self.trace.as_ref().and(step_of(&t.name)) {
                    m.insert("step".into(), json!(step));
                }
                if let Some(s) = self.stored.as_ref().and_then(|s| s.get(i)) {
                    m.insert("stored".into(), json!(s));
                }
                match self.data.get(&i) {
                    Some(Ok(d)) => {
                        let s = &d.summary;
                        m.insert(
                            "data".into(),
                            json!({
                                "first": d.first.iter().map(|&x| float_json(x.into())).collect::<Vec<_>>(),
                                "count": s.count,
                                "finite": s.finite,
                                "mean": float_json(s.mean),
                                "std": float_json(s.std),
                                "min": float_json(s.min),
                                "max": float_json(s.max),
                                "nan": s.nan,
                                "inf": s.inf(),
                                "pos_inf": s.pos_inf,
                                "neg_inf": s.neg_inf,
                            }),
                        );
                    }
                    Some(Err(e)) => {
                        m.insert("data".into(), json!({ "error": e }));
                    }
                    None => {}
                }
                Json::Object(m)
            })
            .collect();
        let trace = self.trace.as_ref().map(|g| {
            json!({
                "steps": g.steps.iter().map(|(s, idx)| json!({
                    "step": s,
                    "tensors": idx.iter().map(|&i| &h.tensors[i].name).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
                "ungrouped": g.ungrouped.iter().map(|&i| &h.tensors[i].name).collect::<Vec<_>>(),
            })
        });
        json!({
            "schema": JSON_SCHEMA,
            "input": self.input,
            "file_size": self.file_size,
            "version": h.version,
            "byte_order": h.byte_order.name(),
            "alignment": h.alignment,
            "data_offset": h.data_offset,
            "kind": match self.kind { Kind::KqvTrace => "kqv-trace", Kind::Other => "gguf" },
            "tensor_count": h.tensors.len(),
            "metadata": metadata,
            "tensors": tensors,
            "trace": trace,
        })
    }
}

pub(crate) fn value_json(v: &Value) -> Json {
    match v {
        Value::U8(x) => json!(x),
        Value::I8(x) => json!(x),
        Value::U16(x) => json!(x),
        Value::I16(x) => json!(x),
        Value::U32(x) => json!(x),
        Value::I32(x) => json!(x),
        Value::F32(x) => float_json(f64::from(*x)),
        Value::Bool(x) => json!(x),
        Value::String(s) => json!(s),
        Value::Array(a) => array_json(a, usize::MAX),
        Value::U64(x) => json!(x),
        Value::I64(x) => json!(x),
        Value::F64(x) => float_json(*x),
    }
}

fn array_json(a: &Array, limit: usize) -> Json {
    let n = a.len().min(limit);
    Json::Array(
        (0..n)
            .filter_map(|i| a.get(i))
            .map(|v| value_json(&v))
            .collect(),
    )
}
