//! Writing a trace: captured tensors go to an anonymous spool file as they arrive (so a
//! long run over many layers does not grow the process), and `finish` streams them into
//! one GGUF with the metadata that describes them.
//!
//! A tensor that arrives with a [`Revision`] relative to the previous tensor of the same
//! (layer, role) (a KV-cache view one decode step later) is spooled as the byte ranges
//! that changed only; `finish` rebuilds each full tensor from the previous one and its
//! changes. The trace is the same; the spool holds a cell per step instead of the whole
//! cache view.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::Path;

use gguf_io::{GgufWriter, HeaderSpec, Metadata, TensorSpec, MAX_TENSOR_NAME};

use crate::keys;
use crate::meta::{AttnParams, Revision, Role, RunMeta, StepMeta, TensorMeta};
use crate::TraceError;

/// Version of the trace layout written by this crate.
pub const FORMAT_VERSION: u32 = 1;

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
    /// All of them.
    Full,
    /// The same (layer, role)'s previous tensor with these byte ranges replaced by the
    /// spooled bytes, in order.
    Changes(Vec<Range<usize>>),
}

/// Accumulates a trace; see the module docs.
pub struct TraceWriter {
    spool: BufWriter<File>,
    tensors: Vec<(TensorMeta, String, Spooled)>,
    names: HashSet<String>,
    steps: Vec<StepMeta>,
    /// Step -> the token the sampler chose from its output.
    sampled: HashMap<u32, i32>,
    attn: Vec<AttnRecord>,
    trace_bytes: u64,
    spooled_bytes: u64,
    /// Per (layer, role): the revision id and byte count of the last tensor added with a
    /// revision, which the next revision's changes may refer to.
    last_revision: HashMap<(i32, Role), (u64, usize)>,
    /// The (layer, role)s of which some tensor was spooled as changes: `finish` keeps
    /// their latest full bytes in memory to rebuild the next ones.
    streams_with_changes: HashSet<(i32, Role)>,
}

/// The GGUF tensor name: the seed's `kqv_out_<name>_step_<N>` for outputs and
/// `src<i>_<name>_step_<N>` for the attention op's inputs (`<role>_<name>_step_<N>` for
/// intermediates), with the layer added when the ggml name does not carry it (two masks
/// are both `attn_inp_kq_mask` on Gemma 3), spaces dropped, and cut to ggml's 63 bytes.
pub fn tensor_name(meta: &TensorMeta, mixed: bool) -> String {
    if meta.role == Role::Logits {
        return format!("logits_result_output_step_{}", meta.step);
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
    pub fn new() -> Result<Self, TraceError> {
        Ok(Self {
            spool: BufWriter::with_capacity(1 << 20, tempfile::tempfile()?),
            tensors: Vec::new(),
            names: HashSet::new(),
            steps: Vec::new(),
            sampled: HashMap::new(),
            attn: Vec::new(),
            trace_bytes: 0,
            spooled_bytes: 0,
            last_revision: HashMap::new(),
            streams_with_changes: HashSet::new(),
        })
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
        let mut name = tensor_name(&meta, mixed);
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
        let spooled = match revision {
            Some(Revision {
                since: Some((since, changes)),
                ..
            }) if self.last_revision.get(&key) == Some(&(*since, data.len()))
                && changes
                    .iter()
                    .all(|r| r.start <= r.end && r.end <= data.len()) =>
            {
                for r in changes {
                    self.spool.write_all(&data[r.clone()])?;
                    self.spooled_bytes += r.len() as u64;
                }
                self.streams_with_changes.insert(key);
                Spooled::Changes(changes.clone())
            }
            _ => {
                self.spool.write_all(data)?;
                self.spooled_bytes += data.len() as u64;
                Spooled::Full
            }
        };
        match revision {
            Some(r) => self.last_revision.insert(key, (r.id, data.len())),
            None => self.last_revision.remove(&key),
        };
        self.trace_bytes += data.len() as u64;
        self.names.insert(name.clone());
        self.tensors.push((meta, name, spooled));
        Ok(())
    }

    fn header(&self, run: &RunMeta) -> HeaderSpec {
        let mut m = Metadata::new();
        m.set(keys::DESCRIPTION, run.description.as_str());
        m.set(keys::TOTAL_STEPS, self.steps.len() as i32);
        m.set(keys::TARGET_LAYER, run.target_layer);
        m.set(keys::TRACE_SOURCES, run.trace_sources);
        m.set(keys::TENSOR_COUNT, self.tensors.len() as i32);
        m.set(keys::FORMAT_VERSION, FORMAT_VERSION);
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

        HeaderSpec {
            metadata: m,
            tensors: t
                .iter()
                .map(|(x, name, _)| TensorSpec {
                    name: name.clone(),
                    dims: x.layout.ne.to_vec(),
                    ty: x.layout.ty,
                })
                .collect(),
            byte_order: gguf_io::ByteOrder::Little,
        }
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
        let with_changes = &self.streams_with_changes;
        let mut w = GgufWriter::new(out, &spec)?;
        // The latest full bytes of each (layer, role) whose next tensor may be changes.
        let mut current: HashMap<(i32, Role), Vec<u8>> = HashMap::new();
        for (meta, _, spooled) in &self.tensors {
            let key = (meta.layer, meta.role);
            match spooled {
                Spooled::Full if !with_changes.contains(&key) => {
                    current.remove(&key);
                    w.write_tensor_from(&mut spool)?;
                }
                Spooled::Full => {
                    let n = meta.layout.n_bytes()? as usize;
                    let buf = current.entry(key).or_default();
                    buf.resize(n, 0);
                    spool.read_exact(buf)?;
                    w.write_tensor(buf)?;
                }
                Spooled::Changes(changes) => {
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
