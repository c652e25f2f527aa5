//! Writing a trace: captured tensors go to an anonymous spool file as they arrive (so a
//! long run over many layers does not grow the process), and `finish` streams them into
//! one GGUF with the metadata that describes them.
//!
//! A tensor that arrives with a [`Revision`] relative to the previous tensor of the same
//! (layer, role) (a KV-cache view one decode step later) is spooled as the byte ranges
//! that changed only; `finish` rebuilds each full tensor from the previous one and its
//! changes. The trace is the same; the spool holds a cell per step instead of the whole
//! cache view.
//!
//! With [`KvStorage::Delta`] (format version 2, the default) the file keeps that: a
//! tensor spooled as changes is written as its changed bytes against the previous one,
//! and a tensor whose bytes equal an earlier whole tensor's (found by hash, confirmed
//! byte for byte) as a delta with no changes against it (docs/trace-format.md,
//! "Storage"). [`KvStorage::Full`] writes version 1: every tensor whole.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::Path;

use gguf_io::{GgufWriter, HeaderSpec, Metadata, TensorSpec, MAX_TENSOR_NAME};

use crate::keys;
use crate::meta::{AttnParams, Revision, Role, RunMeta, StepMeta, TensorMeta};
use crate::TraceError;

/// Version of the trace layout written by this crate by default ([`KvStorage::Delta`]).
pub const FORMAT_VERSION: u32 = 2;
/// The version [`KvStorage::Full`] writes: every tensor whole (the seed tools' layout).
pub const FORMAT_VERSION_FULL: u32 = 1;

/// How a trace stores its tensors (`--kv-storage`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvStorage {
    /// Version 1: every tensor whole, each step's K/V views again.
    Full,
    /// Version 2: a KV-cache view as the bytes that changed since the previous step's,
    /// identical bytes once.
    #[default]
    Delta,
}

impl KvStorage {
    pub fn name(self) -> &'static str {
        match self {
            KvStorage::Full => "full",
            KvStorage::Delta => "delta",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "full" => Some(KvStorage::Full),
            "delta" => Some(KvStorage::Delta),
            _ => None,
        }
    }

    /// The `kqv_trace.format_version` it writes.
    pub fn format_version(self) -> u32 {
        match self {
            KvStorage::Full => FORMAT_VERSION_FULL,
            KvStorage::Delta => FORMAT_VERSION,
        }
    }
}

/// One traced attention's op and parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct AttnRecord {
    pub step: u32,
    pub layer: i32,
    /// `FLASH_ATTN_EXT`, `SOFT_MAX` (no flash attention) or the mixed cache's op.
    pub op: String,
    pub params: AttnParams,
    /// The backend that ran the op (its output buffer's name, `CPU`, ...); empty when
    /// unknown.
    pub backend: String,
    /// The threads the step's graph was computed with; 0 when unknown.
    pub n_threads: u32,
}

/// How a tensor's bytes sit in the spool.
enum Spooled {
    /// All of them, from this spool offset.
    Full(u64),
    /// The same (layer, role)'s previous tensor (index `base` in the table) with these
    /// byte ranges (sorted, disjoint, none empty) replaced by the spooled bytes, in order.
    Changes {
        base: usize,
        ranges: Vec<Range<usize>>,
    },
    /// Nothing: the bytes equal tensor `base`'s (a whole one). Delta storage only.
    Same(usize),
}

impl Spooled {
    /// Bytes the version-2 file stores for it (a GGUF tensor has at least one element:
    /// a delta with no changed bytes stores one ignored zero byte).
    fn stored_len(&self, n_bytes: u64) -> u64 {
        match self {
            Spooled::Full(_) => n_bytes,
            Spooled::Changes { ranges, .. } => {
                (ranges.iter().map(|r| r.len() as u64).sum::<u64>()).max(1)
            }
            Spooled::Same(_) => 1,
        }
    }
}

/// Accumulates a trace; see the module docs.
pub struct TraceWriter {
    spool: BufWriter<File>,
    tensors: Vec<(TensorMeta, String, Spooled)>,
    /// Per tensor: its graph order (`kqv_trace.tensor.graph_order`), -1 when unknown.
    graph_order: Vec<i32>,
    names: HashSet<String>,
    steps: Vec<StepMeta>,
    /// Step -> the token the sampler chose from its output.
    sampled: HashMap<u32, i32>,
    attn: Vec<AttnRecord>,
    trace_bytes: u64,
    spooled_bytes: u64,
    /// Per (layer, role): the revision id, byte count and table index of the last tensor
    /// added with a revision, which the next revision's changes may refer to.
    last_revision: HashMap<(i32, Role), (u64, usize, usize)>,
    /// The (layer, role)s of which some tensor was spooled as changes: `finish` keeps
    /// their latest full bytes in memory to rebuild the next ones.
    streams_with_changes: HashSet<(i32, Role)>,
    storage: KvStorage,
    /// Delta storage: (xxh3 of the bytes, byte length) -> the tensors spooled whole with
    /// them, the candidates a later tensor of the same bytes is stored against.
    whole_by_hash: HashMap<(u64, usize), Vec<usize>>,
    /// Nodes (role `node`) added per (step, ggml name): the next one's occurrence.
    node_seen: HashMap<(u32, String), u32>,
}

/// The GGUF tensor name: the seed's `kqv_out_<name>_step_<N>` for outputs and
/// `src<i>_<name>_step_<N>` for the attention op's inputs (`<role>_<name>_step_<N>` for
/// intermediates), with the layer added when the ggml name does not carry it (two masks
/// are both `attn_inp_kq_mask` on Gemma 3), spaces dropped, and cut to ggml's 63 bytes.
pub fn tensor_name(meta: &TensorMeta, mixed: bool) -> String {
    if meta.role == Role::Logits {
        return format!("logits_result_output_step_{}", meta.step);
    }
    if meta.role == Role::Node {
        return node_tensor_name(meta, 0);
    }
    let prefix = match meta.role.src_index(mixed) {
        Some(i) => format!("src{i}"),
        None => meta.role.name().to_owned(),
    };
    let mut base: String = meta.ggml_name.chars().filter(|c| *c != ' ').collect();
    if !carries_layer(&base, meta.layer) {
        base.push_str(&format!("@l{}", meta.layer));
    }
    let suffix = format!("_step_{}", meta.step);
    let room = MAX_TENSOR_NAME.saturating_sub(prefix.len() + 1 + suffix.len());
    if base.len() > room {
        let mut cut = room;
        while !base.is_char_boundary(cut) {
            cut -= 1;
        }
        base.truncate(cut);
    }
    format!("{prefix}_{base}{suffix}")
}

/// A node's GGUF tensor name: `node_<ggml name>_step_<N>` for the first node of its name
/// in the step, `node_<ggml name>#<k>_step_<N>` for the k-th after it (ggml names repeat
/// in a graph: `Qcur-0` labels three nodes); spaces dropped, cut to ggml's 63 bytes in
/// the name part. The layer is not appended: a node's layer is its name's.
pub fn node_tensor_name(meta: &TensorMeta, occurrence: u32) -> String {
    let mut base: String = meta.ggml_name.chars().filter(|c| *c != ' ').collect();
    if occurrence > 0 {
        base.push_str(&format!("#{occurrence}"));
    }
    let suffix = format!("_step_{}", meta.step);
    let room = MAX_TENSOR_NAME.saturating_sub("node_".len() + suffix.len());
    if base.len() > room {
        let mut cut = room;
        while !base.is_char_boundary(cut) {
            cut -= 1;
        }
        base.truncate(cut);
    }
    format!("node_{base}{suffix}")
}

/// The description of step `step`'s logits row of `n_vocab` values.
pub fn logits_meta(step: u32, n_vocab: u64) -> Result<TensorMeta, TraceError> {
    Ok(TensorMeta {
        role: Role::Logits,
        layer: -1,
        step,
        ggml_name: "result_output".into(),
        op: String::new(),
        layout: crate::layout::TensorLayout::contiguous(
            gguf_io::GgmlType::F32,
            [n_vocab, 1, 1, 1],
        )?,
        view_of: String::new(),
    })
}

/// Whether byte ranges are sorted, disjoint and within `len` bytes (what a delta may hold).
fn sorted_within(ranges: &[Range<usize>], len: usize) -> bool {
    let mut end = 0;
    ranges.iter().all(|r| {
        let ok = r.start >= end && r.start <= r.end && r.end <= len;
        end = r.end;
        ok
    })
}

/// Whether a ggml name already says its layer: `kqv_out-3`, `Qcur-3(view)`, `cache_k_l3(view)`.
fn carries_layer(name: &str, layer: i32) -> bool {
    let l = layer.to_string();
    ["-", "_l"].iter().any(|sep| {
        let tag = format!("{sep}{l}");
        name.match_indices(&tag)
            .any(|(i, m)| !name[i + m.len()..].starts_with(|c: char| c.is_ascii_digit()))
    })
}

impl TraceWriter {
    /// A writer of the default storage ([`KvStorage::Delta`], format version 2).
    pub fn new() -> Result<Self, TraceError> {
        Self::with_storage(KvStorage::default())
    }

    pub fn with_storage(storage: KvStorage) -> Result<Self, TraceError> {
        Ok(Self {
            spool: BufWriter::with_capacity(1 << 20, tempfile::tempfile()?),
            tensors: Vec::new(),
            graph_order: Vec::new(),
            names: HashSet::new(),
            steps: Vec::new(),
            sampled: HashMap::new(),
            attn: Vec::new(),
            trace_bytes: 0,
            spooled_bytes: 0,
            last_revision: HashMap::new(),
            streams_with_changes: HashSet::new(),
            storage,
            whole_by_hash: HashMap::new(),
            node_seen: HashMap::new(),
        })
    }

    pub fn storage(&self) -> KvStorage {
        self.storage
    }

    pub fn add_step(&mut self, step: StepMeta) {
        self.steps.push(step);
    }

    /// The token the run's sampler chose from `step`'s output (`kqv_trace.step.sampled`).
    pub fn set_sampled(&mut self, step: u32, token: i32) {
        self.sampled.insert(step, token);
    }

    /// A step's output logits (role `logits`, layer -1, F32 `[n_vocab]`).
    pub fn add_logits(&mut self, step: u32, logits: &[f32]) -> Result<(), TraceError> {
        let meta = logits_meta(step, logits.len() as u64)?;
        let bytes: Vec<u8> = logits.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.add_tensor(meta, &bytes, false)
    }

    pub fn add_attn(&mut self, rec: AttnRecord) {
        self.attn.push(rec);
    }

    pub fn n_tensors(&self) -> usize {
        self.tensors.len()
    }

    /// Tensor bytes the trace will hold so far.
    pub fn trace_bytes(&self) -> u64 {
        self.trace_bytes
    }

    /// Bytes written to the spool so far (less than [`trace_bytes`](Self::trace_bytes)
    /// when revisions were spooled as their changes).
    pub fn spooled_bytes(&self) -> u64 {
        self.spooled_bytes
    }

    /// Append a tensor: `data` is in logical contiguous order in the tensor's type.
    pub fn add_tensor(
        &mut self,
        meta: TensorMeta,
        data: &[u8],
        mixed: bool,
    ) -> Result<(), TraceError> {
        self.add_tensor_revision(meta, data, mixed, None)
    }

    /// [`add_tensor`](Self::add_tensor) for a tensor that may be a revision of the same
    /// (layer, role)'s previous one: when `revision` says which bytes changed since the
    /// revision added last for that (layer, role), and the size is the same, only those
    /// bytes are spooled. `data` is always the whole tensor; the changes are trusted to
    /// describe it (the capture computed both).
    pub fn add_tensor_revision(
        &mut self,
        meta: TensorMeta,
        data: &[u8],
        mixed: bool,
        revision: Option<&Revision>,
    ) -> Result<(), TraceError> {
        let need = meta.layout.n_bytes()?;
        if need != data.len() as u64 {
            return Err(TraceError::Format(format!(
                "{}: {} bytes of data for a layout of {need}",
                meta.ggml_name,
                data.len()
            )));
        }
        let name = if meta.role == Role::Node {
            let k = self
                .node_seen
                .entry((meta.step, meta.ggml_name.clone()))
                .or_insert(0);
            *k += 1;
            node_tensor_name(&meta, *k - 1)
        } else {
            tensor_name(&meta, mixed)
        };
        self.push(meta, name, data, revision)
    }

    /// [`add_tensor_revision`](Self::add_tensor_revision) recording the tensor's graph
    /// order (`kqv_trace.tensor.graph_order`: the position in the step's graph of the node
    /// at whose evaluation it was read), when known.
    pub fn add_tensor_ordered(
        &mut self,
        meta: TensorMeta,
        data: &[u8],
        mixed: bool,
        revision: Option<&Revision>,
        graph_order: Option<u32>,
    ) -> Result<(), TraceError> {
        self.add_tensor_revision(meta, data, mixed, revision)?;
        if let (Some(o), Some(last)) = (graph_order, self.graph_order.last_mut()) {
            *last = i32::try_from(o).unwrap_or(-1);
        }
        Ok(())
    }

    /// [`add_tensor`](Self::add_tensor) under a name given rather than derived from the
    /// description (`gguf-reader --materialize` keeps a trace's names as they are).
    pub fn add_tensor_named(
        &mut self,
        meta: TensorMeta,
        name: &str,
        data: &[u8],
        graph_order: Option<u32>,
    ) -> Result<(), TraceError> {
        let need = meta.layout.n_bytes()?;
        if need != data.len() as u64 {
            return Err(TraceError::Format(format!(
                "{}: {} bytes of data for a layout of {need}",
                meta.ggml_name,
                data.len()
            )));
        }
        self.push(meta, name.to_owned(), data, None)?;
        if let (Some(o), Some(last)) = (graph_order, self.graph_order.last_mut()) {
            *last = i32::try_from(o).unwrap_or(-1);
        }
        Ok(())
    }

    fn push(
        &mut self,
        meta: TensorMeta,
        mut name: String,
        data: &[u8],
        revision: Option<&Revision>,
    ) -> Result<(), TraceError> {
        let mut k = 1;
        while self.names.contains(&name) {
            // Unreachable with one record per (role, layer, step); kept as a guarantee.
            let tag = format!("#{k}");
            let mut cut = MAX_TENSOR_NAME - tag.len();
            while !name.is_char_boundary(cut.min(name.len())) {
                cut -= 1;
            }
            name.truncate(cut.min(name.len()));
            name.push_str(&tag);
            k += 1;
        }
        let key = (meta.layer, meta.role);
        let index = self.tensors.len();
        let changes = match revision {
            Some(Revision {
                since: Some((since, changes)),
                ..
            }) => match self.last_revision.get(&key) {
                Some(&(id, len, base))
                    if id == *since && len == data.len() && sorted_within(changes, len) =>
                {
                    Some((base, changes))
                }
                _ => None,
            },
            _ => None,
        };
        // Delta storage: changes that cost more than the tensor (16 bytes of metadata a
        // range) are stored whole instead.
        let changes = changes.filter(|(_, c)| {
            self.storage == KvStorage::Full
                || c.iter().map(|r| r.len() + 16).sum::<usize>() < data.len()
        });
        let spooled = if let Some((base, changes)) = changes {
            let ranges: Vec<Range<usize>> =
                changes.iter().filter(|r| !r.is_empty()).cloned().collect();
            for r in &ranges {
                self.spool.write_all(&data[r.clone()])?;
                self.spooled_bytes += r.len() as u64;
            }
            self.streams_with_changes.insert(key);
            Spooled::Changes { base, ranges }
        } else if let Some(same) = self.same_as_earlier(data)? {
            Spooled::Same(same)
        } else {
            let at = self.spooled_bytes;
            self.spool.write_all(data)?;
            self.spooled_bytes += data.len() as u64;
            if self.storage == KvStorage::Delta {
                let h = xxh3::hash64_with_seed(data, 0);
                self.whole_by_hash
                    .entry((h, data.len()))
                    .or_default()
                    .push(index);
            }
            Spooled::Full(at)
        };
        match revision {
            Some(r) => self.last_revision.insert(key, (r.id, data.len(), index)),
            None => self.last_revision.remove(&key),
        };
        self.trace_bytes += data.len() as u64;
        self.names.insert(name.clone());
        self.tensors.push((meta, name, spooled));
        self.graph_order.push(-1);
        Ok(())
    }

    /// Delta storage: an earlier tensor spooled whole with exactly these bytes (same hash,
    /// then compared byte for byte in the spool).
    fn same_as_earlier(&mut self, data: &[u8]) -> Result<Option<usize>, TraceError> {
        if self.storage != KvStorage::Delta || data.is_empty() {
            return Ok(None);
        }
        let h = xxh3::hash64_with_seed(data, 0);
        let Some(candidates) = self.whole_by_hash.get(&(h, data.len())) else {
            return Ok(None);
        };
        let candidates: Vec<(usize, u64)> = candidates
            .iter()
            .filter_map(|&i| match self.tensors[i].2 {
                Spooled::Full(at) => Some((i, at)),
                _ => None,
            })
            .collect();
        self.spool.flush()?;
        let file = self.spool.get_mut();
        let mut found = None;
        let mut buf = vec![0u8; data.len().min(1 << 20)];
        'candidates: for (i, at) in candidates {
            file.seek(SeekFrom::Start(at))?;
            for chunk in data.chunks(buf.len()) {
                let b = &mut buf[..chunk.len()];
                file.read_exact(b)?;
                if b != chunk {
                    continue 'candidates;
                }
            }
            found = Some(i);
            break;
        }
        file.seek(SeekFrom::End(0))?;
        Ok(found)
    }

    fn header(&self, run: &RunMeta) -> HeaderSpec {
        let mut m = Metadata::new();
        m.set(keys::DESCRIPTION, run.description.as_str());
        m.set(keys::TOTAL_STEPS, self.steps.len() as i32);
        m.set(keys::TARGET_LAYER, run.target_layer);
        m.set(keys::TRACE_SOURCES, run.trace_sources);
        m.set(keys::TENSOR_COUNT, self.tensors.len() as i32);
        m.set(keys::FORMAT_VERSION, self.storage.format_version());
        m.set(keys::COMPLETE, run.complete);
        m.set(keys::RUN_MODEL_PATH, run.model_path.as_str());
        m.set(keys::RUN_MODEL_SHA256, run.model_sha256.as_str());
        m.set(keys::RUN_ARCHITECTURE, run.architecture.as_str());
        m.set(keys::RUN_N_LAYER, run.n_layer);
        m.set(keys::RUN_N_HEAD, run.n_head);
        m.set(keys::RUN_N_HEAD_KV, run.n_head_kv);
        m.set(keys::RUN_CACHE_TYPE_K, run.cache_type_k.as_str());
        m.set(keys::RUN_CACHE_TYPE_V, run.cache_type_v.as_str());
        m.set(keys::RUN_FLASH_ATTN, run.flash_attn.as_str());
        m.set(keys::RUN_KV_ROTATION, run.kv_rotation);
        if run.rotation_recorded() {
            m.set(
                keys::RUN_ROTATED_K,
                crate::meta::layer_flags_to_i8(&run.rotated_k_layers),
            );
            m.set(
                keys::RUN_ROTATED_V,
                crate::meta::layer_flags_to_i8(&run.rotated_v_layers),
            );
        }
        m.set(keys::RUN_MIXED_KV_CACHE, run.mixed_kv_cache);
        if !run.mixed_swa_type.is_empty() {
            m.set(keys::RUN_MIXED_SWA_TYPE, run.mixed_swa_type.as_str());
        }
        m.set(keys::RUN_N_CTX, run.n_ctx);
        m.set(keys::RUN_N_BATCH, run.n_batch);
        m.set(keys::RUN_N_UBATCH, run.n_ubatch);
        m.set(keys::RUN_N_PREDICT, run.n_predict);
        m.set(keys::RUN_SEED, run.seed);
        m.set(keys::RUN_PROMPT_TOKENS, run.prompt_tokens.clone());
        m.set(keys::RUN_LLAMA_VERSION, run.llama_version.as_str());
        m.set(keys::RUN_CPU_SIMD, run.cpu_simd.as_str());
        if run.n_cross_layer > 0 {
            m.set(keys::RUN_N_CROSS_LAYER, run.n_cross_layer);
            m.set(keys::RUN_CROSS_FLASH_ATTN, run.cross_flash_attn.as_str());
        }

        m.set(
            keys::STEP_N_TOKENS,
            self.steps
                .iter()
                .map(|s| s.positions.len() as u32)
                .collect::<Vec<_>>(),
        );
        m.set(
            keys::STEP_POSITIONS,
            self.steps
                .iter()
                .flat_map(|s| s.positions.iter().copied())
                .collect::<Vec<_>>(),
        );
        m.set(
            keys::STEP_TOKENS,
            self.steps
                .iter()
                .flat_map(|s| s.tokens.iter().copied())
                .collect::<Vec<_>>(),
        );
        if !self.sampled.is_empty() {
            m.set(
                keys::STEP_SAMPLED,
                self.steps
                    .iter()
                    .map(|s| self.sampled.get(&s.step).copied().unwrap_or(-1))
                    .collect::<Vec<_>>(),
            );
        }
        if !run.replayed_from.is_empty() {
            m.set(keys::RUN_REPLAYED_FROM, run.replayed_from.as_str());
        }
        if !run.rpc_endpoints.is_empty() {
            m.set(keys::RUN_RPC_ENDPOINTS, run.rpc_endpoints.clone());
        }
        if !run.tensor_filter.is_empty() {
            m.set(keys::RUN_TENSOR_FILTER, run.tensor_filter.clone());
        }
        if !run.rpc_read_bytes.is_empty() {
            m.set(keys::RUN_RPC_READ_BYTES, run.rpc_read_bytes.clone());
        }

        let t = &self.tensors;
        m.set(
            keys::TENSOR_ROLE,
            t.iter()
                .map(|(x, _, _)| x.role.name().to_owned())
                .collect::<Vec<_>>(),
        );
        m.set(
            keys::TENSOR_LAYER,
            t.iter().map(|(x, _, _)| x.layer).collect::<Vec<_>>(),
        );
        m.set(
            keys::TENSOR_STEP,
            t.iter().map(|(x, _, _)| x.step).collect::<Vec<_>>(),
        );
        m.set(
            keys::TENSOR_GGML_NAME,
            t.iter()
                .map(|(x, _, _)| x.ggml_name.clone())
                .collect::<Vec<_>>(),
        );
        m.set(
            keys::TENSOR_OP,
            t.iter().map(|(x, _, _)| x.op.clone()).collect::<Vec<_>>(),
        );
        m.set(
            keys::TENSOR_NB,
            t.iter()
                .flat_map(|(x, _, _)| x.layout.nb)
                .collect::<Vec<u64>>(),
        );
        m.set(
            keys::TENSOR_VIEW_OF,
            t.iter()
                .map(|(x, _, _)| x.view_of.clone())
                .collect::<Vec<_>>(),
        );
        if self.graph_order.iter().any(|&o| o >= 0) {
            m.set(keys::TENSOR_GRAPH_ORDER, self.graph_order.clone());
        }

        let a = &self.attn;
        m.set(
            keys::ATTN_STEP,
            a.iter().map(|r| r.step).collect::<Vec<_>>(),
        );
        m.set(
            keys::ATTN_LAYER,
            a.iter().map(|r| r.layer).collect::<Vec<_>>(),
        );
        m.set(
            keys::ATTN_OP,
            a.iter().map(|r| r.op.clone()).collect::<Vec<_>>(),
        );
        m.set(
            keys::ATTN_SCALE,
            a.iter().map(|r| r.params.scale).collect::<Vec<_>>(),
        );
        m.set(
            keys::ATTN_MAX_BIAS,
            a.iter().map(|r| r.params.max_bias).collect::<Vec<_>>(),
        );
        m.set(
            keys::ATTN_SOFTCAP,
            a.iter().map(|r| r.params.softcap).collect::<Vec<_>>(),
        );
        m.set(
            keys::ATTN_BACKEND,
            a.iter().map(|r| r.backend.clone()).collect::<Vec<_>>(),
        );
        m.set(
            keys::ATTN_N_THREADS,
            a.iter().map(|r| r.n_threads).collect::<Vec<_>>(),
        );

        if self.storage == KvStorage::Delta {
            self.storage_keys(&mut m);
        }

        HeaderSpec {
            metadata: m,
            tensors: t
                .iter()
                .map(|(x, name, spooled)| match spooled {
                    _ if self.storage == KvStorage::Full => TensorSpec {
                        name: name.clone(),
                        dims: x.layout.ne.to_vec(),
                        ty: x.layout.ty,
                    },
                    Spooled::Full(_) => TensorSpec {
                        name: name.clone(),
                        dims: x.layout.ne.to_vec(),
                        ty: x.layout.ty,
                    },
                    // A delta: its changed bytes, one byte (ignored) when there are none.
                    _ => TensorSpec {
                        name: name.clone(),
                        dims: vec![spooled.stored_len(x.layout.n_bytes().unwrap_or(0))],
                        ty: gguf_io::GgmlType::I8,
                    },
                })
                .collect(),
            byte_order: gguf_io::ByteOrder::Little,
        }
    }

    /// Version 2's per-tensor storage keys (docs/trace-format.md, "Storage").
    fn storage_keys(&self, m: &mut Metadata) {
        let t = &self.tensors;
        m.set(
            keys::TENSOR_TYPE,
            t.iter()
                .map(|(x, _, _)| x.layout.ty.0)
                .collect::<Vec<u32>>(),
        );
        m.set(
            keys::TENSOR_NE,
            t.iter()
                .flat_map(|(x, _, _)| x.layout.ne)
                .collect::<Vec<u64>>(),
        );
        m.set(
            keys::TENSOR_BASE,
            t.iter()
                .map(|(_, _, s)| match s {
                    Spooled::Full(_) => -1,
                    Spooled::Changes { base, .. } | Spooled::Same(base) => *base as i32,
                })
                .collect::<Vec<i32>>(),
        );
        m.set(
            keys::TENSOR_N_RANGES,
            t.iter()
                .map(|(_, _, s)| match s {
                    Spooled::Changes { ranges, .. } => ranges.len() as u32,
                    _ => 0,
                })
                .collect::<Vec<u32>>(),
        );
        m.set(
            keys::TENSOR_RANGES,
            t.iter()
                .flat_map(|(_, _, s)| match s {
                    Spooled::Changes { ranges, .. } => ranges
                        .iter()
                        .flat_map(|r| [r.start as u64, r.len() as u64])
                        .collect(),
                    _ => Vec::new(),
                })
                .collect::<Vec<u64>>(),
        );
    }

    /// Write the GGUF to any sink (stdout for `--save-gguf -`).
    pub fn finish<W: Write>(mut self, run: &RunMeta, out: W) -> Result<W, TraceError> {
        let spec = self.header(run);
        self.spool.flush()?;
        let mut spool = self
            .spool
            .into_inner()
            .map_err(|e| TraceError::Io(e.into_error()))?;
        spool.seek(SeekFrom::Start(0))?;
        let mut spool = BufReader::with_capacity(1 << 20, spool);
        let mut w = GgufWriter::new(out, &spec)?;
        if self.storage == KvStorage::Delta {
            // The spool holds exactly what the file stores, in order.
            for (_, _, spooled) in &self.tensors {
                match spooled {
                    Spooled::Changes { ranges, .. } if !ranges.is_empty() => {
                        w.write_tensor_from(&mut spool)?
                    }
                    Spooled::Full(_) => w.write_tensor_from(&mut spool)?,
                    _ => w.write_tensor(&[0])?,
                }
            }
            return Ok(w.finish()?);
        }
        let with_changes = &self.streams_with_changes;
        // The latest full bytes of each (layer, role) whose next tensor may be changes.
        let mut current: HashMap<(i32, Role), Vec<u8>> = HashMap::new();
        for (meta, _, spooled) in &self.tensors {
            let key = (meta.layer, meta.role);
            match spooled {
                Spooled::Full(_) if !with_changes.contains(&key) => {
                    current.remove(&key);
                    w.write_tensor_from(&mut spool)?;
                }
                Spooled::Full(_) => {
                    let n = meta.layout.n_bytes()? as usize;
                    let buf = current.entry(key).or_default();
                    buf.resize(n, 0);
                    spool.read_exact(buf)?;
                    w.write_tensor(buf)?;
                }
                Spooled::Same(_) => {
                    return Err(TraceError::Format(format!(
                        "{}: stored as another tensor in full storage",
                        meta.ggml_name
                    )))
                }
                Spooled::Changes {
                    ranges: changes, ..
                } => {
                    let buf = current.get_mut(&key).ok_or_else(|| {
                        TraceError::Format(format!(
                            "{}: spooled as changes with no earlier tensor",
                            meta.ggml_name
                        ))
                    })?;
                    for r in changes {
                        spool.read_exact(&mut buf[r.clone()])?;
                    }
                    w.write_tensor(buf)?;
                }
            }
        }
        Ok(w.finish()?)
    }

    /// Write the GGUF to a path atomically: the path gets the whole file or is untouched.
    pub fn finish_to_path(self, run: &RunMeta, path: &Path) -> Result<(), TraceError> {
        let mut file = gguf_io::AtomicFile::create(path)?;
        {
            let out = BufWriter::with_capacity(1 << 20, file.file());
            let out = self.finish(run, out)?;
            out.into_inner()
                .map_err(|e| TraceError::Io(e.into_error()))?;
        }
        file.commit()?;
        Ok(())
    }
}
