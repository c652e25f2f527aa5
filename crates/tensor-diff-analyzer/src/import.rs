//! `--reference REF.safetensors --map MAP.toml`: activations recorded elsewhere (a
//! Hugging Face transformers model run with forward hooks, numpy, another engine, or a
//! trace exported by `gguf-reader --export`) as the reference.
//!
//! The map names, for each reference tensor name pattern, the traced tensor it is
//! (`role = "kqv_out"` or a graph node, `node = "ffn_out-{L}"`) and how its layout
//! becomes ours (`permute`, then `reshape`, in numpy axis order). The reference is
//! converted into a trace file in a temporary directory (F32 values, shapes in ggml order,
//! the steps' tokens and positions from the file's metadata), so that every mode of the
//! analyzer (offline, live with the reference's tokens replayed, `--plot`, `--json`, the
//! first divergence) works on it unchanged. Shapes are compared with size-1 dimensions
//! left out (a batch of one). docs/reference-import.md.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::Path;

use gguf_io::GgmlType;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde::Deserialize;
use trace_format::{Role, RunMeta, StepMeta, TensorLayout, TensorMeta, TraceError, TraceWriter};

/// The only map format this build reads (`format = 1`).
pub const MAP_FORMAT: u32 = 1;

/// What the converted trace's run description says (and how the analyzer recognises one).
pub const IMPORTED_DESCRIPTION: &str = "imported reference";

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("--map {path}: {why}")]
    Map { path: String, why: String },
    #[error("--reference {path}: {why}")]
    Reference { path: String, why: String },
    #[error("--reference {path}: tensor '{name}' (map entry {entry}): {why}")]
    Tensor {
        path: String,
        name: String,
        entry: usize,
        why: String,
    },
    #[error("writing the imported reference: {0}")]
    Write(#[from] TraceError),
    #[error("--reference {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// One `[[tensor]]` entry of the map file, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    reference: String,
    role: Option<String>,
    node: Option<String>,
    permute: Option<Vec<usize>>,
    reshape: Option<Vec<i64>>,
    transform: Option<Vec<RawOp>>,
}

/// One step of a `transform = [...]` list: `{ permute = [...] }` or `{ reshape = [...] }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOp {
    permute: Option<Vec<usize>>,
    reshape: Option<Vec<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMap {
    format: u32,
    #[serde(default)]
    tensor: Vec<RawEntry>,
}

/// What a map entry makes of a reference tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// An attention tensor of the trace (`kqv_out`), of the layer `{L}` names.
    Role(Role),
    /// A graph node (role `node`): its ggml name with `{L}`/`{N}` to fill in, and the
    /// occurrence of that name in the step (`#k`, 0 for the first).
    Node(String),
}

/// A layout step, in numpy's terms: `transpose(axes)` or `reshape(shape)` (row-major,
/// one `-1` inferred).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Permute(Vec<usize>),
    Reshape(Vec<i64>),
}

/// One map entry, checked.
#[derive(Clone, Debug)]
pub struct Entry {
    /// The reference name pattern as written.
    pub pattern: String,
    regex: regex::Regex,
    pub target: Target,
    /// What makes the reference's layout ours, in order.
    pub ops: Vec<Op>,
}

fn check_permute(p: &[usize]) -> Result<(), String> {
    let mut seen = vec![false; p.len()];
    for &a in p {
        if a >= p.len() || std::mem::replace(&mut seen[a], true) {
            return Err(format!(
                "permute {p:?} is not a permutation of 0..{}",
                p.len()
            ));
        }
    }
    Ok(())
}

fn check_reshape(r: &[i64]) -> Result<(), String> {
    if r.is_empty()
        || r.iter().any(|&d| d == 0 || d < -1)
        || r.iter().filter(|&&d| d == -1).count() > 1
    {
        return Err(format!("reshape {r:?}: sizes >= 1, at most one -1"));
    }
    Ok(())
}

/// A checked map file.
#[derive(Clone, Debug)]
pub struct Map {
    pub entries: Vec<Entry>,
}

/// The roles a map can name: the attention output (a reference engine's attention
/// output before its output projection). Other attention tensors are graph nodes
/// (`Qcur-{L}`, `Kcur-{L}`, `Vcur-{L}`, ...), whose layouts the map states.
const MAPPABLE_ROLES: [Role; 1] = [Role::KqvOut];

/// Placeholders of a pattern: `{S}` step, `{L}` layer (numbers), `{N}` any text without
/// `/`.
const PLACEHOLDERS: [(&str, &str); 3] = [
    ("{S}", r"(?P<S>\d+)"),
    ("{L}", r"(?P<L>\d+)"),
    ("{N}", r"(?P<N>[^/]+)"),
];

fn compile(pattern: &str) -> Result<regex::Regex, String> {
    let mut out = String::from("^");
    let mut rest = pattern;
    let mut used = Vec::new();
    while !rest.is_empty() {
        let next = PLACEHOLDERS
            .iter()
            .filter_map(|(p, r)| rest.find(p).map(|i| (i, *p, *r)))
            .min_by_key(|(i, _, _)| *i);
        match next {
            Some((i, p, r)) => {
                out.push_str(&regex::escape(&rest[..i]));
                if used.contains(&p) {
                    return Err(format!("{p} appears twice in '{pattern}'"));
                }
                used.push(p);
                out.push_str(r);
                rest = &rest[i + p.len()..];
            }
            None => {
                out.push_str(&regex::escape(rest));
                rest = "";
            }
        }
    }
    out.push('$');
    regex::Regex::new(&out).map_err(|e| format!("'{pattern}': {e}"))
}

impl Map {
    /// Read and check a map file.
    pub fn load(path: &Path) -> Result<Self, ImportError> {
        let bad = |why: String| ImportError::Map {
            path: path.display().to_string(),
            why,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        Self::parse(&text).map_err(bad)
    }

    /// Parse and check a map from its text; Err(one line saying what is wrong).
    pub fn parse(text: &str) -> Result<Self, String> {
        let raw: RawMap = toml::from_str(text).map_err(|e| one_line(&e.to_string()))?;
        if raw.format != MAP_FORMAT {
            return Err(format!(
                "format {} is not one this build reads (format = {MAP_FORMAT})",
                raw.format
            ));
        }
        if raw.tensor.is_empty() {
            return Err("no [[tensor]] entries: nothing would be compared".into());
        }
        let mut entries = Vec::with_capacity(raw.tensor.len());
        for (i, e) in raw.tensor.into_iter().enumerate() {
            let at = |why: String| format!("[[tensor]] entry {} ('{}'): {why}", i + 1, e.reference);
            let regex = compile(&e.reference).map_err(at)?;
            let has = |p: &str| e.reference.contains(p);
            let target = match (&e.role, &e.node) {
                (Some(r), None) => {
                    let role = Role::from_name(r)
                        .filter(|r| MAPPABLE_ROLES.contains(r))
                        .ok_or_else(|| {
                            at(format!(
                                "role '{r}' cannot be mapped (roles: kqv_out; other tensors \
                                 are graph nodes: node = \"<ggml name>\")"
                            ))
                        })?;
                    if !has("{L}") {
                        return Err(at(format!("role {r} needs {{L}} (the layer) in reference")));
                    }
                    Target::Role(role)
                }
                (None, Some(n)) => {
                    for p in ["{L}", "{N}"] {
                        if n.contains(p) && !has(p) {
                            return Err(at(format!("node '{n}' uses {p}, which reference lacks")));
                        }
                    }
                    if n.is_empty() {
                        return Err(at("node is empty".into()));
                    }
                    Target::Node(n.clone())
                }
                _ => return Err(at("give exactly one of role = ... or node = ...".into())),
            };
            let mut ops = Vec::new();
            match (&e.transform, &e.permute, &e.reshape) {
                (Some(t), None, None) => {
                    for (k, op) in t.iter().enumerate() {
                        match (&op.permute, &op.reshape) {
                            (Some(p), None) => ops.push(Op::Permute(p.clone())),
                            (None, Some(r)) => ops.push(Op::Reshape(r.clone())),
                            _ => {
                                return Err(at(format!(
                                "transform step {}: give one of permute = [...] or reshape = [...]",
                                k + 1
                            )))
                            }
                        }
                    }
                }
                (Some(_), _, _) => {
                    return Err(at(
                        "transform = [...] replaces permute/reshape: give one or the other".into(),
                    ))
                }
                (None, p, r) => {
                    ops.extend(p.iter().cloned().map(Op::Permute));
                    ops.extend(r.iter().cloned().map(Op::Reshape));
                }
            }
            for op in &ops {
                match op {
                    Op::Permute(p) => check_permute(p).map_err(at)?,
                    Op::Reshape(r) => check_reshape(r).map_err(at)?,
                }
            }
            entries.push(Entry {
                pattern: e.reference,
                regex,
                target,
                ops,
            });
        }
        Ok(Self { entries })
    }

    /// The first entry whose pattern matches `name`, with the step, layer and `{N}` text.
    fn find(&self, name: &str) -> Option<(usize, u32, Option<i32>, Option<String>)> {
        self.entries.iter().enumerate().find_map(|(i, e)| {
            let c = e.regex.captures(name)?;
            let step = match c.name("S") {
                Some(s) => s.as_str().parse().ok()?,
                None => 0,
            };
            let layer = match c.name("L") {
                Some(l) => Some(l.as_str().parse().ok()?),
                None => None,
            };
            Some((i, step, layer, c.name("N").map(|n| n.as_str().to_owned())))
        })
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The trace node name and occurrence a target names: `Qcur-0#2` is the third `Qcur-0`.
pub fn split_occurrence(name: &str) -> (&str, u32) {
    if let Some((base, k)) = name.rsplit_once('#') {
        if let Ok(k) = k.parse::<u32>() {
            if !base.is_empty() {
                return (base, k);
            }
        }
    }
    (name, 0)
}

/// What the conversion did, for the report's notes.
#[derive(Debug, Default)]
pub struct Imported {
    /// Reference tensors converted.
    pub tensors: usize,
    /// Reference tensors no map entry matches (names, sorted).
    pub unmapped: Vec<String>,
    /// Map entries that matched no reference tensor (their patterns).
    pub unused_entries: Vec<String>,
    /// Where the steps' tokens came from (`kcm.steps`, the trace export's keys) or
    /// nothing (no tokens: a live run cannot replay them).
    pub tokens_from: Option<&'static str>,
}

/// Values of a float tensor as f32 (F64 rounded to nearest, F16/BF16 exactly).
fn to_f32(v: &TensorView) -> Result<Vec<f32>, String> {
    let b = v.data();
    Ok(match v.dtype() {
        Dtype::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F64 => b
            .chunks_exact(8)
            .map(|c| {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                f64::from_le_bytes(a) as f32
            })
            .collect(),
        Dtype::F16 => b
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => b
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(format!(
                "dtype {other} is not a float type (F32, F16, BF16, F64)"
            ))
        }
    })
}

/// `x` (row-major, `shape`) with its axes taken in the order `perm` (numpy's
/// `transpose(perm)`): returns the new shape and the values, row-major.
pub fn permute(x: &[f32], shape: &[usize], perm: &[usize]) -> (Vec<usize>, Vec<f32>) {
    let n = shape.len();
    let mut strides = vec![1usize; n];
    for i in (0..n.saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    let new_shape: Vec<usize> = perm.iter().map(|&a| shape[a]).collect();
    let new_strides: Vec<usize> = perm.iter().map(|&a| strides[a]).collect();
    let mut out = Vec::with_capacity(x.len());
    let mut idx = vec![0usize; n];
    for _ in 0..x.len() {
        let src: usize = idx.iter().zip(&new_strides).map(|(i, s)| i * s).sum();
        out.push(x[src]);
        // Odometer over the new shape, last axis fastest.
        for d in (0..n).rev() {
            idx[d] += 1;
            if idx[d] < new_shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    (new_shape, out)
}

/// numpy's `reshape` of a row-major array of `count` elements: the new shape, with the
/// one `-1` inferred.
pub fn reshape(count: usize, to: &[i64]) -> Result<Vec<usize>, String> {
    let known: usize = to.iter().filter(|&&d| d > 0).map(|&d| d as usize).product();
    let mut out: Vec<usize> = Vec::with_capacity(to.len());
    for &d in to {
        if d == -1 {
            if known == 0 || count % known != 0 {
                return Err(format!("{count} elements cannot be reshaped to {to:?}"));
            }
            out.push(count / known);
        } else {
            out.push(d as usize);
        }
    }
    if out.iter().product::<usize>() != count {
        return Err(format!("{count} elements cannot be reshaped to {to:?}"));
    }
    Ok(out)
}

/// ggml's `ne` of a numpy shape with its size-1 dimensions left out: the shape reversed,
/// padded with 1s. Err when more than 4 dimensions are left.
pub fn ggml_ne(shape: &[usize]) -> Result<[u64; 4], String> {
    let kept: Vec<u64> = shape
        .iter()
        .rev()
        .filter(|&&d| d != 1)
        .map(|&d| d as u64)
        .collect();
    if kept.len() > 4 {
        return Err(format!(
            "shape {shape:?} has {} dimensions larger than 1; ggml tensors have 4",
            kept.len()
        ));
    }
    let mut ne = [1u64; 4];
    ne[..kept.len()].copy_from_slice(&kept);
    Ok(ne)
}

/// `ne` without its size-1 dimensions (how an imported reference's shape is compared).
pub fn squeezed(ne: [u64; 4]) -> Vec<u64> {
    ne.into_iter().filter(|&d| d != 1).collect()
}

/// The steps (tokens, positions), the prompt's tokens, and the metadata they came from.
type Tokens = (Vec<StepMeta>, Vec<i32>, &'static str);

/// The steps' tokens and positions from the reference's metadata: `kcm.steps` (a JSON
/// array of `{"step", "tokens", "positions"}`, what python/record_reference.py writes) or
/// the keys of a trace exported by `gguf-reader --export`. Also the prompt's tokens.
fn steps_from(meta: &HashMap<String, String>) -> Result<Option<Tokens>, String> {
    let ints = |v: &serde_json::Value| -> Option<Vec<i32>> {
        v.as_array()?
            .iter()
            .map(|x| x.as_i64().and_then(|x| i32::try_from(x).ok()))
            .collect()
    };
    let json = |k: &str| -> Result<Option<serde_json::Value>, String> {
        meta.get(k)
            .map(|s| serde_json::from_str(s).map_err(|e| format!("metadata {k}: {e}")))
            .transpose()
    };
    if let Some(v) = json("kcm.steps")? {
        let arr = v.as_array().ok_or("metadata kcm.steps: not a JSON array")?;
        let mut steps = Vec::with_capacity(arr.len());
        for (i, s) in arr.iter().enumerate() {
            let bad =
                || format!("metadata kcm.steps[{i}]: needs step, tokens and positions (integers)");
            let step = s
                .get("step")
                .and_then(|x| x.as_u64())
                .and_then(|x| u32::try_from(x).ok())
                .ok_or_else(bad)?;
            let tokens = s.get("tokens").and_then(ints).ok_or_else(bad)?;
            let positions = s.get("positions").and_then(ints).ok_or_else(bad)?;
            if tokens.len() != positions.len() {
                return Err(format!(
                    "metadata kcm.steps[{i}]: {} tokens, {} positions",
                    tokens.len(),
                    positions.len()
                ));
            }
            steps.push(StepMeta {
                step,
                tokens,
                positions,
            });
        }
        let prompt = match json("kcm.prompt_tokens")? {
            Some(p) => {
                ints(&p).ok_or("metadata kcm.prompt_tokens: not a JSON array of integers")?
            }
            None => Vec::new(),
        };
        return Ok(Some((steps, prompt, "kcm.steps")));
    }
    // A trace exported by gguf-reader --export: the trace's own step arrays.
    let (Some(n), Some(pos), Some(tok)) = (
        json("kqv_trace.step.n_tokens")?,
        json("kqv_trace.step.positions")?,
        json("kqv_trace.step.tokens")?,
    ) else {
        return Ok(None);
    };
    let bad = || "metadata kqv_trace.step.*: not arrays of integers".to_string();
    let n = ints(&n).ok_or_else(bad)?;
    let (pos, tok) = (ints(&pos).ok_or_else(bad)?, ints(&tok).ok_or_else(bad)?);
    let total: i64 = n.iter().map(|&k| i64::from(k.max(0))).sum();
    if n.iter().any(|&k| k < 0) || total != pos.len() as i64 || total != tok.len() as i64 {
        return Err(format!(
            "metadata kqv_trace.step.n_tokens sums to {total}, with {} positions and {} tokens",
            pos.len(),
            tok.len()
        ));
    }
    let mut steps = Vec::with_capacity(n.len());
    let mut at = 0usize;
    for (s, &k) in n.iter().enumerate() {
        let k = k as usize;
        steps.push(StepMeta {
            step: s as u32,
            positions: pos[at..at + k].to_vec(),
            tokens: tok[at..at + k].to_vec(),
        });
        at += k;
    }
    let prompt = match json("kqv_trace.run.prompt_tokens")? {
        Some(p) => ints(&p).ok_or_else(bad)?,
        None => Vec::new(),
    };
    Ok(Some((steps, prompt, "the trace export's kqv_trace.step.*")))
}

/// One converted tensor before it is written.
struct Converted {
    step: u32,
    layer: i32,
    target: Target,
    /// The node's name with placeholders filled in (nodes), `#k` kept.
    name: String,
    ne: [u64; 4],
    values: Vec<f32>,
}

/// Convert the safetensors file at `reference` through `map` into a trace at `dest`.
pub fn convert(reference: &Path, map: &Map, dest: &Path) -> Result<Imported, ImportError> {
    let rpath = reference.display().to_string();
    let bad = |why: String| ImportError::Reference {
        path: rpath.clone(),
        why,
    };
    let file = File::open(reference).map_err(|source| ImportError::Io {
        path: rpath.clone(),
        source,
    })?;
    // SAFETY: mapped read-only; a file changed by another process while mapped is the
    // caller's race (as with the trace files, which are mapped too).
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| ImportError::Io {
        path: rpath.clone(),
        source,
    })?;
    let st = SafeTensors::deserialize(&mmap)
        .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
    let (_, header) = SafeTensors::read_metadata(&mmap)
        .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
    let meta = header.metadata().clone().unwrap_or_default();

    let mut imported = Imported::default();
    let mut used = vec![false; map.entries.len()];
    let mut out: Vec<Converted> = Vec::new();
    let mut names: Vec<&str> = st.names();
    names.sort_unstable();
    for name in names {
        let Some((ei, step, layer, n)) = map.find(name) else {
            imported.unmapped.push(name.to_owned());
            continue;
        };
        used[ei] = true;
        let e = &map.entries[ei];
        let tensor_err = |why: String| ImportError::Tensor {
            path: rpath.clone(),
            name: name.to_owned(),
            entry: ei + 1,
            why,
        };
        let view = st.tensor(name).map_err(|e| tensor_err(e.to_string()))?;
        let mut values = to_f32(&view).map_err(tensor_err)?;
        let mut shape = view.shape().to_vec();
        for op in &e.ops {
            match op {
                Op::Permute(p) => {
                    if p.len() != shape.len() {
                        return Err(tensor_err(format!(
                            "permute {p:?} is for {} axes, the tensor has shape {shape:?} here",
                            p.len()
                        )));
                    }
                    (shape, values) = permute(&values, &shape, p);
                }
                Op::Reshape(r) => shape = reshape(values.len(), r).map_err(tensor_err)?,
            }
        }
        let ne = ggml_ne(&shape).map_err(tensor_err)?;
        let fill = |s: &str| {
            let mut s = s.replace("{L}", &layer.map_or(String::new(), |l| l.to_string()));
            if let Some(n) = &n {
                s = s.replace("{N}", n);
            }
            s
        };
        let (layer, name) = match &e.target {
            Target::Role(r) => {
                let l = layer.ok_or_else(|| tensor_err("no layer".into()))?;
                (l, format!("{}-{l}", r.name()))
            }
            Target::Node(n) => {
                let name = fill(n);
                // A node's layer is its name's `-<layer>` suffix, as the capture has it.
                let (base, _) = split_occurrence(&name);
                let l = base
                    .rsplit_once('-')
                    .and_then(|(_, l)| l.parse::<i32>().ok())
                    .unwrap_or(-1);
                (l, name)
            }
        };
        out.push(Converted {
            step,
            layer,
            target: e.target.clone(),
            name,
            ne,
            values,
        });
    }
    imported.unused_entries = map
        .entries
        .iter()
        .zip(&used)
        .filter(|(_, u)| !**u)
        .map(|(e, _)| e.pattern.clone())
        .collect();
    if out.is_empty() {
        return Err(bad(format!(
            "no tensor matches the map's {} pattern(s) (e.g. '{}'); the file holds {} tensor(s), e.g. '{}'",
            map.entries.len(),
            map.entries[0].pattern,
            imported.unmapped.len(),
            imported.unmapped.first().map_or("", String::as_str)
        )));
    }
    // Two reference tensors for one traced tensor: which would be compared is not clear.
    let mut seen: HashMap<(u32, i32, String), ()> = HashMap::new();
    for c in &out {
        let key = match &c.target {
            Target::Role(r) => (c.step, c.layer, r.name().to_owned()),
            Target::Node(_) => (c.step, i32::MIN, c.name.clone()),
        };
        if seen.insert(key, ()).is_some() {
            return Err(bad(format!(
                "two reference tensors map to {} at step {}: make the map's patterns name one each",
                c.name, c.step
            )));
        }
    }

    let steps = steps_from(&meta).map_err(bad)?;
    let max_step = out.iter().map(|c| c.step).max().unwrap_or(0);
    let (steps, prompt) = match steps {
        Some((steps, prompt, from)) => {
            imported.tokens_from = Some(from);
            let have: std::collections::BTreeSet<u32> = steps.iter().map(|s| s.step).collect();
            if let Some(s) = out.iter().map(|c| c.step).find(|s| !have.contains(s)) {
                return Err(bad(format!(
                    "tensors of step {s}, but the metadata's steps do not include it"
                )));
            }
            (steps, prompt)
        }
        None => (
            (0..=max_step)
                .map(|s| StepMeta {
                    step: s,
                    positions: Vec::new(),
                    tokens: Vec::new(),
                })
                .collect(),
            Vec::new(),
        ),
    };

    // In step order, then layer, then as the map and names sort: the writer stores
    // tensors in the order given.
    out.sort_by(|a, b| (a.step, a.layer, &a.name).cmp(&(b.step, b.layer, &b.name)));
    let mut w = TraceWriter::new()?;
    let mut by_step: BTreeMap<u32, StepMeta> = BTreeMap::new();
    for s in steps {
        by_step.insert(s.step, s);
    }
    let n_layer = out.iter().map(|c| c.layer + 1).max().unwrap_or(0).max(0) as u32;
    for s in by_step.values() {
        w.add_step(s.clone());
    }
    for c in out {
        let bytes: Vec<u8> = c.values.iter().flat_map(|x| x.to_le_bytes()).collect();
        let role = match c.target {
            Target::Role(r) => r,
            Target::Node(_) => Role::Node,
        };
        let meta = TensorMeta {
            role,
            layer: c.layer,
            step: c.step,
            ggml_name: c.name,
            op: "IMPORTED".into(),
            layout: TensorLayout::contiguous(GgmlType::F32, c.ne)
                .map_err(|e| bad(e.to_string()))?,
            view_of: String::new(),
        };
        w.add_tensor(meta, &bytes, false)?;
        imported.tensors += 1;
    }
    let run = RunMeta {
        description: match meta.get("kcm.source") {
            Some(src) => format!("{IMPORTED_DESCRIPTION} from {rpath} ({src})"),
            None => format!("{IMPORTED_DESCRIPTION} from {rpath}"),
        },

        n_layer,
        prompt_tokens: prompt,
        target_layer: -1,
        trace_sources: false,
        complete: true,
        ..RunMeta::default()
    };
    w.finish_to_path(&run, dest)?;
    Ok(imported)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permute_is_numpys_transpose() {
        // A (2, 3, 4) array x[i][j][k] = 100i + 10j + k, transposed to (4, 2, 3) by
        // axes (2, 0, 1): y[k][i][j] = x[i][j][k], by explicit loops.
        let x: Vec<f32> = (0..2)
            .flat_map(|i| {
                (0..3).flat_map(move |j| (0..4).map(move |k| (100 * i + 10 * j + k) as f32))
            })
            .collect();
        let (shape, y) = permute(&x, &[2, 3, 4], &[2, 0, 1]);
        assert_eq!(shape, [4, 2, 3]);
        let mut want = Vec::new();
        for k in 0..4 {
            for i in 0..2 {
                for j in 0..3 {
                    want.push((100 * i + 10 * j + k) as f32);
                }
            }
        }
        assert_eq!(y, want);
        // The identity, and a 0-d corner: a single element.
        assert_eq!(permute(&x, &[2, 3, 4], &[0, 1, 2]).1, x);
        assert_eq!(permute(&[7.0], &[1], &[0]), (vec![1], vec![7.0]));
    }

    #[test]
    fn reshape_infers_one_dimension_and_refuses_a_wrong_count() {
        assert_eq!(reshape(24, &[-1, 4, 2]).unwrap(), [3, 4, 2]);
        assert_eq!(reshape(24, &[2, 12]).unwrap(), [2, 12]);
        assert!(reshape(24, &[5, -1]).is_err());
        assert!(reshape(24, &[2, 3]).is_err());
    }

    #[test]
    fn ggml_ne_reverses_and_leaves_out_ones() {
        assert_eq!(ggml_ne(&[1, 13, 64]).unwrap(), [64, 13, 1, 1]);
        assert_eq!(ggml_ne(&[1, 13, 4, 16]).unwrap(), [16, 4, 13, 1]);
        assert_eq!(ggml_ne(&[]).unwrap(), [1, 1, 1, 1]);
        assert!(ggml_ne(&[2, 2, 2, 2, 2]).is_err());
        assert_eq!(squeezed([16, 1, 13, 1]), [16, 13]);
    }

    #[test]
    fn patterns_capture_step_layer_and_name() {
        let m = Map::parse(
            "format = 1\n\
             [[tensor]]\nreference = \"step{S}/model.layers.{L}.mlp:output\"\nnode = \"ffn_out-{L}\"\n\
             [[tensor]]\nreference = \"step{S}/{N}\"\nnode = \"{N}\"\n\
             [[tensor]]\nreference = \"x.{L}\"\nrole = \"kqv_out\"\npermute = [1, 0]\nreshape = [-1]\n",
        )
        .unwrap();
        assert_eq!(
            m.find("step12/model.layers.3.mlp:output"),
            Some((0, 12, Some(3), None))
        );
        // `.` is literal: "model-layers" does not match the first entry.
        assert_eq!(
            m.find("step0/model.layers.3.mlpXoutput").map(|f| f.0),
            Some(1)
        );
        assert_eq!(
            m.find("step2/Qcur-0#2"),
            Some((1, 2, None, Some("Qcur-0#2".into())))
        );
        assert_eq!(m.find("step2/a/b"), None);
        assert_eq!(m.find("x.7"), Some((2, 0, Some(7), None)));
        assert_eq!(
            m.entries[2].ops,
            [Op::Permute(vec![1, 0]), Op::Reshape(vec![-1])]
        );
        assert_eq!(split_occurrence("Qcur-0#2"), ("Qcur-0", 2));
        assert_eq!(split_occurrence("a#b"), ("a#b", 0));
        assert_eq!(split_occurrence("#3"), ("#3", 0));
    }

    #[test]
    fn bad_maps_say_what_is_wrong() {
        let e = |t: &str| Map::parse(t).unwrap_err();
        assert!(
            e("format = 1\n[[tensor]]\nreference = \"{L}{L}\"\nrole = \"kqv_out\"\n")
                .contains("appears twice")
        );
        assert!(
            e("format = 1\n[[tensor]]\nreference = \"s{S}\"\nrole = \"kqv_out\"\n")
                .contains("needs {L}")
        );
        assert!(
            e("format = 1\n[[tensor]]\nreference = \"s{S}\"\nnode = \"x-{L}\"\n")
                .contains("uses {L}")
        );
        assert!(
            e("format = 1\n[[tensor]]\nreference = \"{L}\"\nnode = \"x\"\nreshape = [0]\n")
                .contains("sizes >= 1")
        );
        assert!(e(
            "format = 1\n[[tensor]]\nreference = \"{L}\"\nnode = \"x\"\nreshape = [-1, -1]\n"
        )
        .contains("at most one -1"));
        assert!(e("format = 1\n[[tensor]]\nreference = \"{L}\"\nnode = \"x\"\npermute = [0]\ntransform = []\n")
            .contains("give one or the other"));
        assert!(e("format = 1\n[[tensor]]\nreference = \"{L}\"\nnode = \"x\"\ntransform = [{ permute = [0], reshape = [1] }]\n")
            .contains("transform step 1"));
        assert!(
            e("format = 1\n[[tensor]]\nreference = \"{L}\"\nnode = \"x\"\npermute = [1, 2]\n")
                .contains("not a permutation")
        );
        // One line, whatever the TOML parser says.
        assert!(!e("format = \n[[").contains('\n'));
    }
}
