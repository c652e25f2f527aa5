//! Reading a trace back: the GGUF plus the metadata that says what each tensor is.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use gguf_io::{Array, GgufFile, Metadata, Value};

use crate::keys;
use crate::layout::TensorLayout;
use crate::meta::{AttnParams, Role, RunMeta, StepMeta, TensorMeta};
use crate::stored::{Storage, Stored};
use crate::validate::{self, GroupProblems, Violation};
use crate::write::AttnRecord;
use crate::TraceError;

/// A traced tensor in a file: where it sits in the GGUF and what it is.
#[derive(Clone, Debug, PartialEq)]
pub struct TracedTensor {
    /// Index in the GGUF tensor table.
    pub index: usize,
    /// GGUF tensor name.
    pub name: String,
    pub meta: TensorMeta,
    /// `kqv_trace.tensor.graph_order`: the position in its step's graph of the node at
    /// whose evaluation it was read; None when not recorded.
    pub graph_order: Option<u32>,
}

/// An opened trace.
pub struct TraceFile {
    file: GgufFile,
    pub run: RunMeta,
    pub steps: Vec<StepMeta>,
    pub tensors: Vec<TracedTensor>,
    pub attn: Vec<AttnRecord>,
    /// Names of GGUF tensors that could not be given a role (files of other tools).
    pub unknown: Vec<String>,
    /// Each step's output logits (role `logits`, `--logits`), by step; kept apart from
    /// the attention tensors in `tensors`. Checked on open: F32 `[n_vocab]`, layer -1,
    /// one per step, within the trace's steps, one n_vocab for all.
    pub logits: Vec<TracedTensor>,
    /// Graph nodes traced by `--tensor-filter` (role `node`), in table order (per step,
    /// graph order); kept apart from the attention tensors. Checked on open: the layer -1 or
    /// more (as the capture took it from the name, [`crate::node_layer`]), the step within
    /// the trace's steps, the strides consistent with the shape. See [`node_occurrences`].
    pub nodes: Vec<TracedTensor>,
    /// Per step (index = step): the token the run's sampler chose from that step's
    /// output (`kqv_trace.step.sampled`); empty when the trace does not record it.
    pub sampled: Vec<Option<i32>>,
    /// True when the file lacks this format's per-tensor metadata and roles were
    /// inferred from the seed tools' names.
    pub from_names_only: bool,
    /// Group-level violations found when the file was opened.
    problems: GroupProblems,
    /// (step, layer, role) -> index in `tensors` (the first such tensor).
    index: HashMap<(u32, i32, Role), usize>,
    /// (step, layer) -> index in `attn` (the first such record).
    attn_index: HashMap<(u32, i32), usize>,
    /// `kqv_trace.format_version` (1 when absent: a seed tool's file).
    pub format_version: u32,
    /// Version 2: how each tensor is stored (`None` for version 1: all whole).
    storage: Option<Storage>,
}

fn arr<'a>(m: &'a Metadata, key: &str) -> Option<&'a Array> {
    m.get(key).and_then(Value::as_array)
}

fn missing(key: &'static str) -> Violation {
    Violation::BadValue {
        key,
        what: "missing".into(),
    }
}

fn strings(m: &Metadata, key: &'static str) -> Result<Vec<String>, Violation> {
    match arr(m, key) {
        Some(Array::String(v)) => Ok(v.clone()),
        Some(_) => Err(Violation::BadValue {
            key,
            what: "not an array of strings".into(),
        }),
        None => Err(missing(key)),
    }
}

macro_rules! typed_array {
    ($fn:ident, $variant:ident, $t:ty) => {
        fn $fn(m: &Metadata, key: &'static str) -> Result<Vec<$t>, Violation> {
            match arr(m, key) {
                Some(Array::$variant(v)) => Ok(v.clone()),
                Some(_) => Err(Violation::BadValue {
                    key,
                    what: format!("not an array of {}", stringify!($t)),
                }),
                None => Err(missing(key)),
            }
        }
    };
}
typed_array!(i32s, I32, i32);
typed_array!(u32s, U32, u32);
typed_array!(u64s, U64, u64);
typed_array!(f32s, F32, f32);

fn same_length(
    key: &'static str,
    len: usize,
    count: usize,
    what: &'static str,
) -> Result<(), Violation> {
    if len == count {
        Ok(())
    } else {
        Err(Violation::ArrayLength {
            key,
            len,
            count,
            what,
        })
    }
}

/// Layer and role from a seed-style name (`kqv_out_kqv_out-0_step_3`, `src1_..._step_3`).
fn infer_from_name(name: &str) -> Option<(Role, i32, u32)> {
    let (base, step) = name.rsplit_once("_step_")?;
    let step: u32 = step.parse().ok()?;
    let (prefix, rest) = base.split_once('_')?;
    let role = match prefix {
        "kqv" if rest.starts_with("out_") => Role::KqvOut,
        "src0" => Role::Q,
        "src1" => Role::K,
        "src2" => Role::V,
        "src3" => Role::Mask,
        "src4" => Role::Sinks,
        _ => return None,
    };
    // The layer is the number after the last '-' or "_l" in the ggml name.
    let digits_after = |tag: &str| {
        rest.rfind(tag).and_then(|i| {
            let d: String = rest[i + tag.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            d.parse::<i32>().ok()
        })
    };
    let layer = digits_after("@l")
        .or_else(|| digits_after("-"))
        .or_else(|| digits_after("_l"))?;
    Some((role, layer, step))
}

impl TraceFile {
    /// Open and validate a trace (see [`crate::validate`]): a file-level violation is an
    /// error ([`TraceError::Invalid`]); group-level ones are kept per group
    /// ([`group_problems`](Self::group_problems)).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, TraceError> {
        Self::from_gguf(GgufFile::open(path)?)
    }

    pub fn from_gguf(file: GgufFile) -> Result<Self, TraceError> {
        let m = file.metadata();
        if !m.iter().any(|(k, _)| k.starts_with("kqv_trace.")) {
            return Err(TraceError::NotATrace);
        }
        let run = validate::run_meta(m)?;
        let mut unknown = Vec::new();
        let has_roles = m.contains(keys::TENSOR_ROLE);
        let mut tensors = Vec::new();
        let n = file.tensors().len();
        let mut format_version = crate::write::FORMAT_VERSION_FULL;
        let mut storage = None;
        if has_roles {
            format_version = validate::check_version(m)?;
            if format_version == crate::write::FORMAT_VERSION {
                if file.header().byte_order != gguf_io::ByteOrder::Little {
                    return Err(Violation::BadValue {
                        key: keys::FORMAT_VERSION,
                        what: "2 in a big-endian file (version 2 is little-endian only)".into(),
                    }
                    .into());
                }
                storage = Some(Storage::parse(m, &file)?);
            }
            let roles = strings(m, keys::TENSOR_ROLE)?;
            let layers = i32s(m, keys::TENSOR_LAYER)?;
            let steps = u32s(m, keys::TENSOR_STEP)?;
            let names = strings(m, keys::TENSOR_GGML_NAME)?;
            let ops = strings(m, keys::TENSOR_OP)?;
            let nbs = u64s(m, keys::TENSOR_NB)?;
            let views = strings(m, keys::TENSOR_VIEW_OF)?;
            // Optional (older traces): unknown.
            let orders = if m.contains(keys::TENSOR_GRAPH_ORDER) {
                let o = i32s(m, keys::TENSOR_GRAPH_ORDER)?;
                same_length(keys::TENSOR_GRAPH_ORDER, o.len(), n, "tensors")?;
                o
            } else {
                vec![-1; n]
            };
            for (key, len) in [
                (keys::TENSOR_ROLE, roles.len()),
                (keys::TENSOR_LAYER, layers.len()),
                (keys::TENSOR_STEP, steps.len()),
                (keys::TENSOR_GGML_NAME, names.len()),
                (keys::TENSOR_OP, ops.len()),
                (keys::TENSOR_VIEW_OF, views.len()),
            ] {
                same_length(key, len, n, "tensors")?;
            }
            // Four strides per tensor.
            same_length(keys::TENSOR_NB, nbs.len(), 4 * n, "strides (4 per tensor)")?;
            for (i, t) in file.tensors().iter().enumerate() {
                let Some(role) = Role::from_name(&roles[i]) else {
                    unknown.push(t.name.clone());
                    continue;
                };
                if t.dims.len() > 4 {
                    return Err(Violation::TooManyDims {
                        tensor: t.name.clone(),
                        dims: t.dims.len(),
                    }
                    .into());
                }
                let mut ne = [1u64; 4];
                ne[..t.dims.len()].copy_from_slice(&t.dims);
                let mut ty = t.ty;
                if let Some(s) = &storage {
                    (ty, ne) = s.logical(i);
                }
                let nb = [nbs[4 * i], nbs[4 * i + 1], nbs[4 * i + 2], nbs[4 * i + 3]];
                tensors.push(TracedTensor {
                    index: i,
                    name: t.name.clone(),
                    meta: TensorMeta {
                        role,
                        layer: layers[i],
                        step: steps[i],
                        ggml_name: names[i].clone(),
                        op: ops[i].clone(),
                        layout: TensorLayout { ty, ne, nb },
                        view_of: views[i].clone(),
                    },
                    graph_order: u32::try_from(orders[i]).ok(),
                });
            }
        } else {
            for (i, t) in file.tensors().iter().enumerate() {
                let Some((role, layer, step)) = infer_from_name(&t.name) else {
                    unknown.push(t.name.clone());
                    continue;
                };
                if t.dims.len() > 4 {
                    return Err(Violation::TooManyDims {
                        tensor: t.name.clone(),
                        dims: t.dims.len(),
                    }
                    .into());
                }
                let mut ne = [1u64; 4];
                ne[..t.dims.len()].copy_from_slice(&t.dims);
                let layout = TensorLayout::contiguous(t.ty, ne)?;
                tensors.push(TracedTensor {
                    index: i,
                    name: t.name.clone(),
                    meta: TensorMeta {
                        role,
                        layer,
                        step,
                        ggml_name: String::new(),
                        op: String::new(),
                        layout,
                        view_of: String::new(),
                    },
                    graph_order: None,
                });
            }
        }

        let has_steps = m.contains(keys::STEP_N_TOKENS);
        let steps = if has_steps {
            let counts = u32s(m, keys::STEP_N_TOKENS)?;
            let pos = if m.contains(keys::STEP_POSITIONS) {
                i32s(m, keys::STEP_POSITIONS)?
            } else {
                Vec::new()
            };
            let tok = if m.contains(keys::STEP_TOKENS) {
                i32s(m, keys::STEP_TOKENS)?
            } else {
                Vec::new()
            };
            let total = counts
                .iter()
                .try_fold(0usize, |a, &c| a.checked_add(c as usize))
                .unwrap_or(usize::MAX);
            same_length(keys::STEP_POSITIONS, pos.len(), total, "tokens")?;
            if !tok.is_empty() {
                same_length(keys::STEP_TOKENS, tok.len(), total, "tokens")?;
            }
            let mut at = 0;
            counts
                .iter()
                .enumerate()
                .map(|(s, &c)| {
                    let r = at..at + c as usize;
                    at += c as usize;
                    StepMeta {
                        step: s as u32,
                        positions: pos[r.clone()].to_vec(),
                        tokens: tok.get(r).map(<[i32]>::to_vec).unwrap_or_default(),
                    }
                })
                .collect()
        } else {
            Vec::new()
        };

        let attn = if m.contains(keys::ATTN_STEP) {
            let s = u32s(m, keys::ATTN_STEP)?;
            let l = i32s(m, keys::ATTN_LAYER)?;
            let op = strings(m, keys::ATTN_OP)?;
            let sc = f32s(m, keys::ATTN_SCALE)?;
            let mb = f32s(m, keys::ATTN_MAX_BIAS)?;
            let cap = f32s(m, keys::ATTN_SOFTCAP)?;
            // Optional (traces before they were recorded): unknown.
            let backend = if m.contains(keys::ATTN_BACKEND) {
                strings(m, keys::ATTN_BACKEND)?
            } else {
                vec![String::new(); s.len()]
            };
            let threads = if m.contains(keys::ATTN_N_THREADS) {
                u32s(m, keys::ATTN_N_THREADS)?
            } else {
                vec![0; s.len()]
            };
            for (key, len) in [
                (keys::ATTN_BACKEND, backend.len()),
                (keys::ATTN_N_THREADS, threads.len()),
                (keys::ATTN_LAYER, l.len()),
                (keys::ATTN_OP, op.len()),
                (keys::ATTN_SCALE, sc.len()),
                (keys::ATTN_MAX_BIAS, mb.len()),
                (keys::ATTN_SOFTCAP, cap.len()),
            ] {
                same_length(key, len, s.len(), "attention records (kqv_trace.attn.step)")?;
            }
            (0..s.len())
                .map(|i| AttnRecord {
                    step: s[i],
                    layer: l[i],
                    op: op[i].clone(),
                    params: AttnParams {
                        scale: sc[i],
                        max_bias: mb[i],
                        softcap: cap[i],
                    },
                    backend: backend[i].clone(),
                    n_threads: threads[i],
                })
                .collect()
        } else {
            Vec::new()
        };

        let sampled = if m.contains(keys::STEP_SAMPLED) {
            let v = i32s(m, keys::STEP_SAMPLED)?;
            same_length(keys::STEP_SAMPLED, v.len(), steps.len(), "steps")?;
            v.into_iter().map(|t| (t >= 0).then_some(t)).collect()
        } else {
            Vec::new()
        };
        // The logits rows leave the attention tensors here, checked.
        let (mut logits, tensors): (Vec<TracedTensor>, Vec<TracedTensor>) = tensors
            .into_iter()
            .partition(|t| t.meta.role == Role::Logits);
        check_logits(&logits, steps.len())?;
        logits.sort_by_key(|t| t.meta.step);
        let (nodes, tensors): (Vec<TracedTensor>, Vec<TracedTensor>) =
            tensors.into_iter().partition(|t| t.meta.role == Role::Node);
        check_nodes(&nodes, has_steps.then_some(steps.len()))?;

        let n_steps = has_steps.then_some(steps.len());
        if has_roles {
            validate::check_run_flags(m, &run, &steps, n, &tensors, &attn)?;
        }
        validate::check_attn_ranges(&run, n_steps, &attn)?;
        let problems = validate::check_groups(&run, n_steps, &tensors, &attn);

        let mut index = HashMap::with_capacity(tensors.len());
        for (i, t) in tensors.iter().enumerate() {
            index
                .entry((t.meta.step, t.meta.layer, t.meta.role))
                .or_insert(i);
        }
        let mut attn_index = HashMap::with_capacity(attn.len());
        for (i, a) in attn.iter().enumerate() {
            attn_index.entry((a.step, a.layer)).or_insert(i);
        }

        Ok(Self {
            file,
            run,
            steps,
            tensors,
            attn,
            unknown,
            logits,
            nodes,
            sampled,
            from_names_only: !has_roles,
            problems,
            index,
            attn_index,
            format_version,
            storage,
        })
    }

    pub fn gguf(&self) -> &GgufFile {
        &self.file
    }

    /// Where the tensor's stored bytes start in the file (a version-2 delta stores its
    /// changed bytes only: see [`stored`](Self::stored)).
    pub fn data_offset(&self, t: &TracedTensor) -> u64 {
        self.file.tensor_data_offset(&self.file.tensors()[t.index])
    }

    /// The tensor's bytes in logical contiguous order, in its own type (in the file's
    /// byte order): borrowed from the file when it holds them whole, rebuilt when the
    /// tensor is stored as a delta (version 2). Rebuilding keeps the last tensor rebuilt
    /// of each (layer, role), so reading a stream step after step applies one step's
    /// changes each time.
    pub fn data(&self, t: &TracedTensor) -> Cow<'_, [u8]> {
        self.data_at(t.index)
    }

    /// [`data`](Self::data) by index in the GGUF tensor table.
    pub fn data_at(&self, index: usize) -> Cow<'_, [u8]> {
        match &self.storage {
            Some(s) => s.data(&self.file, index),
            None => Cow::Borrowed(self.file.tensor_data(&self.file.tensors()[index])),
        }
    }

    /// How the tensor at `index` of the GGUF tensor table is stored (always whole in
    /// version 1).
    pub fn stored(&self, index: usize) -> Stored {
        match &self.storage {
            Some(s) => s.stored(&self.file, index),
            None => Stored::Whole,
        }
    }

    /// The changed byte ranges (offset, length) of the tensor at `index` of the GGUF
    /// tensor table, whose bytes its GGUF tensor holds in this order; empty for a tensor
    /// stored whole.
    pub fn stored_ranges(&self, index: usize) -> Vec<(u64, u64)> {
        match &self.storage {
            Some(s) => s.ranges(index),
            None => Vec::new(),
        }
    }

    /// The tensor's values as f32 (dequantized if quantized).
    pub fn f32(&self, t: &TracedTensor) -> Result<Vec<f32>, TraceError> {
        let info = &self.file.tensors()[t.index];
        if self.storage.is_none() {
            return Ok(self.file.tensor_f32(info)?);
        }
        let l = &t.meta.layout;
        let data = self.data(t);
        gguf_io::quant::dequantize_to_vec(l.ty, &data, l.n_elements() as usize).map_err(|source| {
            TraceError::Gguf(gguf_io::GgufError::Dequantize {
                name: info.name.clone(),
                source,
            })
        })
    }

    /// The tensor of (role, layer, step); the first one when the file has several (a
    /// group-level [`Violation::Duplicate`]). A hash lookup.
    pub fn find(&self, role: Role, layer: i32, step: u32) -> Option<&TracedTensor> {
        self.index
            .get(&(step, layer, role))
            .map(|&i| &self.tensors[i])
    }

    /// The logits row of `step` (`--logits`), if the trace has it.
    pub fn logits_at(&self, step: u32) -> Option<&TracedTensor> {
        // Sorted by step when checked on open.
        self.logits
            .binary_search_by_key(&step, |t| t.meta.step)
            .ok()
            .map(|i| &self.logits[i])
    }

    /// The token the run's sampler chose from `step`'s output, when recorded.
    pub fn sampled_at(&self, step: u32) -> Option<i32> {
        self.sampled.get(step as usize).copied().flatten()
    }

    /// The attention record of (step, layer); the first one when there are several (a
    /// group-level [`Violation::DuplicateAttn`]).
    pub fn attn(&self, step: u32, layer: i32) -> Option<&AttnRecord> {
        self.attn_index.get(&(step, layer)).map(|&i| &self.attn[i])
    }

    /// The step's description (steps are numbered by their index).
    pub fn step(&self, step: u32) -> Option<&StepMeta> {
        self.steps.get(step as usize).filter(|s| s.step == step)
    }

    /// Group-level violations of (step, layer): empty for a group that can be trusted.
    pub fn group_problems(&self, step: u32, layer: i32) -> &[Violation] {
        self.problems
            .get(&(step, layer))
            .map_or(&[][..], Vec::as_slice)
    }

    /// Every group-level violation, by (step, layer).
    pub fn problems(&self) -> &GroupProblems {
        &self.problems
    }

    /// The first group-level violation, for consumers that refuse a trace with any
    /// (the analyzer compares whole traces).
    pub fn first_problem(&self) -> Option<&Violation> {
        self.problems.values().flatten().next()
    }

    /// Tensors grouped by (step, layer), each group in file order.
    pub fn groups(&self) -> BTreeMap<(u32, i32), Vec<&TracedTensor>> {
        let mut g: BTreeMap<(u32, i32), Vec<&TracedTensor>> = BTreeMap::new();
        for t in &self.tensors {
            g.entry((t.meta.step, t.meta.layer)).or_default().push(t);
        }
        g
    }
}

/// The logits rows: F32 `[n_vocab, 1, 1, 1]` contiguous, layer -1, one per step, within
/// the trace's `n_steps`, the same n_vocab everywhere; sorted by step afterwards.
/// Each node's occurrence of its ggml name in its step (0 for the first node of that
/// name in the step, 1 for the next, ...), in the order given (table order is graph
/// order): with the step and the name, the key that pairs nodes across runs (ggml names
/// repeat in a graph).
pub fn node_occurrences<'a>(nodes: impl IntoIterator<Item = &'a TracedTensor>) -> Vec<u32> {
    let mut seen: HashMap<(u32, &str), u32> = HashMap::new();
    nodes
        .into_iter()
        .map(|t| {
            let k = seen
                .entry((t.meta.step, t.meta.ggml_name.as_str()))
                .or_insert(0);
            *k += 1;
            *k - 1
        })
        .collect()
}

fn check_nodes(nodes: &[TracedTensor], n_steps: Option<usize>) -> Result<(), Violation> {
    let bad = |t: &TracedTensor, what: String| Violation::BadValue {
        key: keys::TENSOR_ROLE,
        what: format!("node tensor {}: {what}", crate::escape::escape(&t.name)),
    };
    for t in nodes {
        if t.meta.layer < -1 {
            return Err(bad(t, format!("layer {}", t.meta.layer)));
        }
        if let Some(n) = n_steps {
            if t.meta.step as usize >= n {
                return Err(bad(
                    t,
                    format!("step {} outside the trace's {n} steps", t.meta.step),
                ));
            }
        }
        if let Err(e) = t.meta.layout.span_bytes() {
            return Err(bad(t, format!("strides {:?}: {e}", t.meta.layout.nb)));
        }
    }
    Ok(())
}

fn check_logits(logits: &[TracedTensor], n_steps: usize) -> Result<(), Violation> {
    let bad = |t: &TracedTensor, what: String| Violation::BadValue {
        key: keys::TENSOR_ROLE,
        what: format!("logits tensor {}: {what}", crate::escape::escape(&t.name)),
    };
    let mut seen = std::collections::HashSet::new();
    let n_vocab = logits.first().map(|t| t.meta.layout.ne[0]);
    for t in logits {
        let l = &t.meta.layout;
        if l.ty != gguf_io::GgmlType::F32 {
            return Err(bad(t, format!("type {}, not f32", l.ty.name())));
        }
        if l.ne[1..] != [1, 1, 1] || l.ne[0] == 0 || Some(l.ne[0]) != n_vocab {
            return Err(bad(
                t,
                format!(
                    "shape {:?}: one row of the same n_vocab for every step",
                    l.ne
                ),
            ));
        }
        let row = l.ne[0].saturating_mul(4);
        if l.nb != [4, row, row, row] {
            return Err(bad(
                t,
                format!("strides {:?} of no contiguous f32 row", l.nb),
            ));
        }
        if t.meta.layer != -1 {
            return Err(bad(
                t,
                format!("layer {} (logits belong to no layer: -1)", t.meta.layer),
            ));
        }
        if t.meta.step as usize >= n_steps {
            return Err(bad(
                t,
                format!("step {} outside the trace's {n_steps} steps", t.meta.step),
            ));
        }
        if !seen.insert(t.meta.step) {
            return Err(bad(
                t,
                format!("a second logits row for step {}", t.meta.step),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_names_parse() {
        assert_eq!(
            infer_from_name("kqv_out_kqv_out-12_step_3"),
            Some((Role::KqvOut, 12, 3))
        );
        assert_eq!(
            infer_from_name("src1_cache_k_l4(view)(permuted)_step_0"),
            Some((Role::K, 4, 0))
        );
        assert_eq!(
            infer_from_name("src3_attn_inp_kq_mask@l5_step_7"),
            Some((Role::Mask, 5, 7))
        );
        assert_eq!(infer_from_name("token_embd.weight"), None);
    }

    /// A two-step trace with a kqv_out per step, logits rows for `logit_steps` and the
    /// sampler's choice after step 1 only.
    fn with_logits(logit_steps: &[u32]) -> Vec<u8> {
        use crate::layout::TensorLayout;
        use crate::write::TraceWriter;
        let mut w = TraceWriter::new().unwrap();
        for s in crate::synth::steps(2, 1) {
            w.add_step(s);
        }
        for step in 0..2u32 {
            let meta = TensorMeta {
                role: Role::KqvOut,
                layer: 0,
                step,
                ggml_name: "kqv_out-0".into(),
                op: "NONE".into(),
                layout: TensorLayout::contiguous(gguf_io::GgmlType::F32, [4, 1, 1, 1]).unwrap(),
                view_of: String::new(),
            };
            w.add_tensor(meta, &[0u8; 16], false).unwrap();
        }
        for &step in logit_steps {
            let row: Vec<f32> = (0..5).map(|i| (i as f32) * 0.5 - step as f32).collect();
            w.add_logits(step, &row).unwrap();
        }
        w.set_sampled(1, 3);
        let run = RunMeta {
            n_layer: 1,
            target_layer: -1,
            trace_sources: true,
            complete: true,
            replayed_from: "golden.gguf".into(),
            rpc_endpoints: vec!["127.0.0.1:50052".into(), "10.0.0.2:50052".into()],
            tensor_filter: vec!["ffn_out".into(), "l_out|attn_norm".into()],
            rpc_read_bytes: vec![4_718_592, 12_345],
            ..RunMeta::default()
        };
        w.finish(&run, Vec::new()).unwrap()
    }

    #[test]
    fn logits_and_sampled_tokens_round_trip_apart_from_the_attention_tensors() {
        let t = TraceFile::from_gguf(GgufFile::from_bytes(with_logits(&[1, 0])).unwrap()).unwrap();
        assert_eq!(t.tensors.len(), 2);
        assert!(t.tensors.iter().all(|x| x.meta.role == Role::KqvOut));
        assert_eq!(t.logits.len(), 2);
        let row = t.f32(t.logits_at(1).unwrap()).unwrap();
        assert_eq!(row, vec![-1.0, -0.5, 0.0, 0.5, 1.0]);
        assert_eq!(t.logits_at(0).unwrap().meta.layer, -1);
        assert_eq!(t.sampled, vec![None, Some(3)]);
        assert_eq!(t.sampled_at(1), Some(3));
        assert_eq!(t.sampled_at(7), None);
        assert_eq!(t.run.replayed_from, "golden.gguf");
        assert_eq!(t.run.rpc_endpoints, ["127.0.0.1:50052", "10.0.0.2:50052"]);
        assert_eq!(t.run.tensor_filter, ["ffn_out", "l_out|attn_norm"]);
        assert_eq!(t.run.rpc_read_bytes, [4_718_592, 12_345]);
        assert!(t.first_problem().is_none());
    }

    #[test]
    fn hostile_logits_rows_are_refused_with_the_reason() {
        let open = |b: Vec<u8>| {
            TraceFile::from_gguf(GgufFile::from_bytes(b).unwrap())
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        // A row claimed for a step the trace does not have.
        let bytes = crate::synth::rewrite(&with_logits(&[0]), |h, _| {
            crate::synth::arrays::set_array(
                h,
                keys::TENSOR_STEP,
                crate::synth::arrays::u32s,
                |v| {
                    if let Some(last) = v.last_mut() {
                        *last = 9;
                    }
                },
            );
        })
        .unwrap();
        assert!(open(bytes).contains("step 9 outside the trace's 2 steps"));
        // Two rows for one step.
        let bytes = crate::synth::rewrite(&with_logits(&[0, 1]), |h, _| {
            h.metadata.set(keys::TENSOR_STEP, vec![0u32, 1, 0, 0]);
        })
        .unwrap();
        assert!(open(bytes).contains("a second logits row for step 0"));
        // A logits row in a layer.
        let bytes = crate::synth::rewrite(&with_logits(&[0]), |h, _| {
            h.metadata.set(keys::TENSOR_LAYER, vec![0i32, 0, 0]);
        })
        .unwrap();
        assert!(open(bytes).contains("layer 0 (logits belong to no layer"));
        // A sampled-token array of another length than the steps.
        let bytes = crate::synth::rewrite(&with_logits(&[0]), |h, _| {
            h.metadata.set(keys::STEP_SAMPLED, vec![1i32]);
        })
        .unwrap();
        assert!(open(bytes).contains(keys::STEP_SAMPLED));
    }
}
