//! The capture engine: an eval callback that finds each layer's attention in the graph by
//! structure, reads its inputs and outputs after the nodes ran, and hands them over with
//! their layouts.
//!
//! How attention is found (names repeat, so only `kqv_out-<layer>` is looked up by name):
//! - flash attention: a `FLASH_ATTN_EXT` node; its sources are q, k, v, mask, sinks.
//! - without it: a `MUL_MAT` whose first source is a view of a KV-cache tensor (a leaf in
//!   a buffer that holds neither weights nor compute results) is `kq` when its second
//!   source is not a softmax, and `kqv` when it is; the `SOFT_MAX` between them is the
//!   one whose input chain (through SCALE/TANH/ADD for softcapping) reaches a `kq`; its
//!   scale and softcap are those of the whole SCALE/TANH chain (Grok). With no cache
//!   (encoders) `kq` is a `MUL_MAT` of two permuted activations; `kqv` is any `MUL_MAT`
//!   whose second source is a traced softmax (absorbed MLA's V is a contiguous copy).
//! - a score bias (T5's relative-position bias `kq_b`): an `ADD` whose first source chain
//!   reaches a traced `kq` before its softmax ran; its second source is read there, while
//!   it is live, as `kq_bias`.
//! - cross-attention (encoder-decoder decoders): the attention whose V is a projection of
//!   a graph input leaf (the encoder output) is recorded as layer `n_layer + il`, so that
//!   it does not collide with the decoder's self-attention of layer `il`.
//! - mixed KV cache (`--mixed-kv-cache`): a `CUSTOM` node that llama.cpp's
//!   `llama_mixed_attn_get_params` recognises (it compares the node's function pointer
//!   with the mixed-attention kernel's); its six sources are q, k (hot), v (hot),
//!   k_quant (cold), v_quant (cold), mask, saved with those roles and their layouts.
//! - `kqv_out-<layer>` is bound to the attention op that its source chain (views,
//!   reshapes, permutes, copies, and at most one `MUL_MAT` by a weight: absorbed MLA's
//!   `attn_v_b`, traced as `v_mla`) reaches, so the layer comes from structure too. A
//!   `kqv_out-<layer>` whose chain reaches an already traced `kqv_out` (bert.cpp and
//!   t5.cpp name the output projection so too) is not traced.
//! - rotation (llama.cpp rotates Q/K and V by a Hadamard matrix where it decides to, see
//!   `llama-kv-cache.cpp`): a `MUL_MAT` marked `GGML_HINT_SRC0_IS_HADAMARD`. Q and K are
//!   rotated when the attention's Q reaches one through layout ops; V when the rows last
//!   written (`SET_ROWS`) into the V cache tensor the attention reads did; both are
//!   recorded per layer with `kqv_out` ([`Rotation`]).
//!
//! Besides attention, `CaptureConfig::nodes` (`--tensor-filter`, [`NodeFilter`]) asks for
//! every node whose name matches, read after it ran as role `node` and handed to
//! [`CaptureSink::on_node`]. The scheduler asks about every node once per graph, in graph
//! order, so counting the asks gives each tensor read its graph order
//! ([`CapturedTensor::graph_order`]).
//!
//! The callback asks (`ask == true`) only for those nodes and reads data only in the
//! `ask == false` call that follows each one's computation, while its inputs are still
//! live: q and k are consumed by `kq` long before `kqv_out` runs when flash attention is
//! off, so they are read at `kq`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

pub use trace_format::Revision;
use trace_format::{AttnParams, Role, TensorLayout, TensorMeta};

use crate::sys;

mod error;
#[cfg(feature = "fault-injection")]
pub mod fault;
mod graph;
mod kept;
mod nodes;
mod read;
mod writes;

pub use error::CaptureError;
pub use nodes::{FilterError, NodeFilter};

pub use graph::mixed_attn_params;
use graph::{
    attention_feeding_mla, attention_q_v, backend_of, cache_base, cache_write, flash_attn_params,
    is_activation_kq, is_attention_node, is_input_projection, is_kv_mul_mat, is_rotated,
    kq_ancestor, kqv_out_layer, layout_of, op_name, projects_kqv_out, softmax_params,
    source_layer_hint, tensor_name, unrotated_kqv_out, unrotation_of, view_base, FLASH_ATTN_ROLES,
    MIXED_ROLES,
};
use kept::{KeptCache, KEPT_BUDGET};

/// One tensor read out of the graph: its description and its bytes in logical
/// contiguous order, in its own ggml type.
#[derive(Clone, Debug)]
pub struct CapturedTensor {
    pub meta: TensorMeta,
    /// Shared, not copied: a KV-cache view's or mask's bytes are the capture's own copy,
    /// kept to compare the next step's with (see [`Revision`]).
    pub data: Arc<Vec<u8>>,
    /// For KV-cache views and masks: how these bytes relate to the previous capture of
    /// the same (layer, role). `None` for everything else.
    pub revision: Option<Revision>,
    /// The position in the step's graph (ggml's node order, 0 = the first node the
    /// scheduler evaluated) of the node at whose evaluation these bytes were read: the
    /// node itself for a `node` and for outputs, the consuming op for attention inputs.
    /// None when not read in the graph (logits).
    pub graph_order: Option<u32>,
}

/// Everything captured for one layer in one step.
#[derive(Clone, Debug)]
pub struct CapturedAttention {
    pub step: u32,
    pub layer: i32,
    /// The op that computed attention: `FLASH_ATTN_EXT`, `SOFT_MAX` (no flash attention)
    /// or `MIXED_ATTN` (the mixed KV cache's node, a ggml `CUSTOM` op).
    pub op: String,
    pub params: AttnParams,
    /// The backend buffer the attention op's output lives in (`CPU`, ...): which backend
    /// ran it, so the verification knows which kernel's precision to model. Empty when
    /// unknown.
    pub backend: String,
    /// `kqv_out` first, then the attention op's output and its inputs.
    pub tensors: Vec<CapturedTensor>,
    /// What the graph showed about this layer's Hadamard rotation; None for the capture
    /// of `kqv_out_unrotated` alone (it follows its layer's `kqv_out`).
    pub rotation: Option<Rotation>,
    /// Cross-attention of an encoder-decoder model's decoder (V is a projection of a
    /// graph input, the encoder output): recorded as layer `n_layer + il` so that it does
    /// not collide with decoder layer `il`'s self-attention. Known only when the sources
    /// are traced.
    pub cross: bool,
}

/// llama.cpp's Hadamard rotation of one layer, as its graph showed it (see the module
/// docs): what it applied, not what its rules would predict.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rotation {
    /// Q and K were rotated (`attn_rot_k`): the attention's Q is a rotation's result.
    pub k: bool,
    /// V was rotated (`attn_rot_v`): the rows written into the V cache this attention
    /// reads were; then `kqv_out` is in the rotated basis and `kqv_out_unrotated`
    /// follows. None when no write of that cache tensor was seen.
    pub v: Option<bool>,
}

/// What to capture.
#[derive(Clone, Debug)]
pub struct CaptureConfig {
    /// Only this layer; `None` for all.
    pub layer: Option<i32>,
    /// Only steps from this one on (0: all): the earlier ones run with nothing read.
    pub from_step: u32,
    /// Capture the attention inputs too (the seed's default); off: `kqv_out` only.
    pub trace_sources: bool,
    /// Keep each KV-cache view and mask from one step to the next and gather again only
    /// the rows that changed (see [`Revision`]); off: copy everything every step, with
    /// no revisions (the tools keep; tests compare the two).
    pub keep: bool,
    /// Hand each step's output logits to the sink ([`StepOutput::logits`]).
    pub logits: bool,
    /// With `keep`: how a kept K/V view learns what changed. 1: hash its whole memory
    /// every step. N > 1: from the graph's writes into the cache (what the ubatch's
    /// `SET_ROWS` stored, any other node writing there), so a step costs what was
    /// written, with a full hash of each view every N-th step (an audit) that finds
    /// and reports changes no graph node made ([`CaptureSink::on_unexplained`]).
    pub kv_audit: u32,
    /// `--tensor-filter`: graph nodes to capture besides attention (role `node`, handed
    /// to [`CaptureSink::on_node`]); None: attention only.
    pub nodes: Option<Arc<NodeFilter>>,
}

/// The default [`CaptureConfig::kv_audit`]: a full hash of each kept view every 16th
/// step.
pub const DEFAULT_KV_AUDIT: u32 = 16;

/// What keeping KV-cache views cost a run: how their changes were found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptureStats {
    /// Gathers of kept views updated from the graph's writes (no full hash).
    pub tracked_gathers: u64,
    /// Gathers that hashed a kept view's whole memory (first captures, audits, views
    /// not tracked, masks).
    pub full_hashes: u64,
    /// Bytes hashed by those.
    pub hashed_bytes: u64,
    /// Audits that found bytes no graph node wrote.
    pub unexplained: u64,
    /// Bytes the capture read from memory that is not the host's (an RPC server's) with
    /// `ggml_backend_tensor_get`: traced tensors of remote layers, the written parts of
    /// their K/V views, the `SET_ROWS` indices that say which; and the number of those
    /// reads (each a round trip to an RPC server).
    pub remote_read_bytes: u64,
    pub remote_reads: u64,
}

/// A change to a kept KV-cache view that no graph node wrote, found by an audit
/// ([`CaptureConfig::kv_audit`]): it happened after the view's previous audit and is
/// recorded in the capture of `step` (a revision naming those rows).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnexplainedChange {
    pub step: u32,
    pub layer: i32,
    pub role: Role,
    /// Bytes of the gathered view in the rows that changed.
    pub bytes: usize,
}

/// What a step produced besides its tensors, right after it ran.
#[derive(Clone, Debug, PartialEq)]
pub struct StepOutput {
    pub step: u32,
    /// The token the run's sampler chose from this step's output (in a replay: its own
    /// choice, not the token decoded next). `None` when it did not choose: a prompt
    /// ubatch before the last, an encoder step, a run without generation.
    pub sampled: Option<i32>,
    /// The output logits of the step's last token (llama.cpp's `result_output` row,
    /// n_vocab values), when [`CaptureConfig::logits`] asks for them and the step has
    /// them.
    pub logits: Option<Vec<f32>>,
}

/// Receives the run as it happens (on the thread that runs `llama_decode`).
pub trait CaptureSink {
    /// The model is loaded and the context made; nothing has been decoded yet.
    fn on_start(&mut self, _info: &crate::run_info::RunInfo) -> Result<(), CaptureError> {
        Ok(())
    }
    /// A step is about to be decoded. Return false to stop the run before it (Ctrl-C).
    fn on_step(&mut self, _step: &trace_format::StepMeta) -> bool {
        true
    }
    /// A layer's attention for the current step is complete. An error stops the run.
    fn on_attention(&mut self, att: CapturedAttention) -> Result<(), CaptureError>;
    /// A graph node that [`CaptureConfig::nodes`] matched has run: its output, read
    /// after it ran (role `node`, layer from its name, graph order set). An error stops
    /// the run.
    fn on_node(&mut self, _node: CapturedTensor) -> Result<(), CaptureError> {
        Ok(())
    }
    /// The step has run: what the sampler chose and, when asked for, the logits. An error
    /// stops the run.
    fn on_output(&mut self, _out: StepOutput) -> Result<(), CaptureError> {
        Ok(())
    }
    /// An audit found a KV-cache view changed where no graph node wrote (a kernel
    /// writing past its destination, host code): after the step's attention tensors.
    fn on_unexplained(&mut self, _change: &UnexplainedChange) {}
    /// The run cannot go on and the process ends after this call: a backend failed on
    /// another thread (an RPC server died mid-run, where ggml aborts; `crate::fatal`).
    /// Called on that thread, once, while the run's own thread is stopped for good
    /// outside the sink (never inside another sink call). `reason` is one line naming the
    /// failed endpoints. Save what can be saved (marked incomplete), say so in one line,
    /// and return the process's exit code (default: the line and 1).
    fn on_fatal(&mut self, reason: &str) -> u8 {
        eprintln!("{reason}");
        1
    }
}

/// Attention being assembled between its op and `kqv_out`.
#[derive(Default)]
struct Pending {
    op: String,
    params: AttnParams,
    backend: String,
    tensors: Vec<CapturedTensor>,
    layer_hint: Option<i32>,
}

/// What the `ask` call decided for the node the scheduler asked about last (its data call
/// follows, for that node, when either is true).
#[derive(Clone, Copy)]
struct Asked {
    node: *const sys::ggml_tensor,
    attention: bool,
    filtered: bool,
}

/// The callback's state. Create one per run, pass `Capture::callback` and a pointer to it
/// as the context's eval callback, and call [`Capture::begin_step`] before each decode.
pub struct Capture<'a> {
    cfg: CaptureConfig,
    sink: &'a mut dyn CaptureSink,
    step: u32,
    /// Keyed by the node that finished the attention op (FA node, or `kqv`).
    done: HashMap<*const sys::ggml_tensor, Pending>,
    /// Without flash attention: keyed by the `kq` node, then by the softmax node.
    open: HashMap<*const sys::ggml_tensor, Pending>,
    /// The `kqv_out-<layer>` nodes traced in this step (to tell a projection of one,
    /// which some models name `kqv_out-<layer>` too).
    emitted: HashSet<*const sys::ggml_tensor>,
    error: Option<CaptureError>,
    scratch: Vec<u8>,
    /// KV-cache views' and masks' last copies (see [`Revision`]).
    kept: KeptCache,
    /// Per KV-cache tensor: whether the rows last written into it were rotated.
    cache_rotated: HashMap<*const sys::ggml_tensor, bool>,
    /// The model's layer count (from the run's start): cross-attention is recorded after
    /// the self-attention layers.
    n_layer: i32,
    /// Audits' findings in the current step, handed to the sink at its end.
    unexplained: Vec<UnexplainedChange>,
    /// Reading the sources of a mixed attention node (its stores are not tracked).
    in_mixed: bool,
    /// Bytes read from non-host memory in the current step, and in each step ended so
    /// far (index = step number; steps not traced: 0).
    step_remote_bytes: u64,
    remote_bytes_per_step: Vec<u64>,
    /// Nodes asked about so far in this step: the next node's graph order.
    next_order: u32,
    /// The graph order of the node asked about last (the one a data call reads).
    order: u32,
    asked: Option<Asked>,
}

impl<'a> Capture<'a> {
    pub fn new(cfg: CaptureConfig, sink: &'a mut dyn CaptureSink) -> Self {
        let kv_audit = cfg.kv_audit;
        Self {
            cfg,
            sink,
            step: 0,
            done: HashMap::new(),
            open: HashMap::new(),
            emitted: HashSet::new(),
            error: None,
            scratch: Vec::new(),
            kept: KeptCache::new(KEPT_BUDGET, kv_audit),
            cache_rotated: HashMap::new(),
            n_layer: 0,
            unexplained: Vec::new(),
            in_mixed: false,
            step_remote_bytes: 0,
            remote_bytes_per_step: Vec::new(),
            next_order: 0,
            order: 0,
            asked: None,
        }
    }

    /// Hash kept KV-cache views on this CPU threadpool (the one the context computes
    /// with), between graph computations.
    ///
    /// # Safety
    /// `pool` must stay valid while this capture is used as the eval callback, and be
    /// the threadpool of the graph computations the callback interrupts (so nothing else
    /// computes on it while the callback runs).
    pub(crate) unsafe fn use_threadpool(
        &mut self,
        pool: *mut sys::ggml_threadpool,
        n_threads: i32,
    ) {
        // SAFETY: the caller's contract is PoolHasher::new's.
        self.kept
            .use_pool(unsafe { crate::pool_hash::PoolHasher::new(pool, n_threads) });
    }

    /// Start a new step (before its `llama_decode`); false when the sink says stop.
    /// After an error (or a caught panic) the run stops before the next step.
    pub fn begin_step(&mut self, step: &trace_format::StepMeta) -> bool {
        if self.error.is_some() {
            return false;
        }
        self.step = step.step;
        self.step_remote_bytes = 0;
        self.kept.new_step();
        self.kept.trim_log();
        #[cfg(feature = "fault-injection")]
        if let Some(fault::Fault::HostWrite { step, layer, cell }) = fault::planned() {
            if step == self.step {
                self.kept.plant_byte((layer, Role::K), cell);
            }
        }
        self.done.clear();
        self.open.clear();
        self.emitted.clear();
        self.next_order = 0;
        self.asked = None;
        self.sink.on_step(step)
    }

    /// The step has run (after its `llama_decode`); false when the run must stop (an
    /// error, kept for [`Capture::take_error`]).
    pub fn end_step(&mut self, out: StepOutput) -> bool {
        let (index_bytes, index_reads) = self.kept.take_log_remote_bytes();
        self.kept.stats.remote_read_bytes += index_bytes;
        self.kept.stats.remote_reads += index_reads;
        let step = usize::try_from(self.step).unwrap_or(usize::MAX);
        if step < (1 << 24) {
            if self.remote_bytes_per_step.len() <= step {
                self.remote_bytes_per_step.resize(step + 1, 0);
            }
            self.remote_bytes_per_step[step] = self.step_remote_bytes + index_bytes;
        }
        self.step_remote_bytes = 0;
        if self.error.is_some() {
            return false;
        }
        for c in std::mem::take(&mut self.unexplained) {
            self.sink.on_unexplained(&c);
        }
        match self.sink.on_output(out) {
            Ok(()) => true,
            Err(e) => {
                self.fail(e);
                false
            }
        }
    }

    /// Whether the sink wants each step's logits.
    pub fn wants_logits(&self) -> bool {
        self.cfg.logits
    }

    pub(crate) fn start(&mut self, info: &crate::run_info::RunInfo) -> Result<(), CaptureError> {
        self.n_layer = i32::try_from(info.n_layer).unwrap_or(i32::MAX);
        self.sink.on_start(info)
    }

    /// Stop the run with `e` (kept unless an error came first).
    pub(crate) fn fail(&mut self, e: CaptureError) {
        self.error.get_or_insert(e);
    }

    /// What keeping views has cost so far.
    pub fn stats(&self) -> CaptureStats {
        self.kept.stats
    }

    /// Bytes read from non-host memory (RPC servers) in each step ended so far, index =
    /// step (see [`CaptureStats::remote_read_bytes`]).
    pub fn remote_bytes_per_step(&self) -> &[u64] {
        &self.remote_bytes_per_step
    }

    /// The first error met inside the callbacks (the run stops there).
    pub fn take_error(&mut self) -> Option<CaptureError> {
        self.error.take()
    }

    /// Without flash attention: the traced `kq` node a softmax's input chain reaches.
    ///
    /// # Safety
    /// `t` must point to a live ggml tensor.
    unsafe fn kq_ancestor(&self, t: *const sys::ggml_tensor) -> Option<*const sys::ggml_tensor> {
        // SAFETY: caller guarantees liveness.
        unsafe { kq_ancestor(t, |c| self.open.contains_key(&c)) }
    }

    /// Without flash attention: the traced `kq` that an `ADD` of a score bias onto the
    /// scores reaches (T5's relative-position bias, `kq_plus_kq_b`): the ADD's first
    /// source chain reaches a `kq` whose softmax has not run yet.
    ///
    /// # Safety
    /// `t` must point to a live ggml tensor.
    unsafe fn biased_kq(&self, t: *const sys::ggml_tensor) -> Option<*const sys::ggml_tensor> {
        // SAFETY: caller guarantees liveness.
        let tr = unsafe { &*t };
        if tr.op != sys::GGML_OP_ADD || tr.src[1].is_null() {
            return None;
        }
        // SAFETY: as above.
        let kq = unsafe { self.kq_ancestor(t) }?;
        self.open
            .get(&kq)
            .is_some_and(|p| p.op.is_empty())
            .then_some(kq)
    }

    /// Is `t` a softmax whose `kq` was traced (its layer waiting for `kqv`)?
    fn is_traced_softmax(&self, t: *const sys::ggml_tensor) -> bool {
        self.open.get(&t).is_some_and(|p| !p.op.is_empty())
    }

    fn wanted_layer(&self, hint: Option<i32>) -> bool {
        match (self.cfg.layer, hint) {
            (Some(want), Some(h)) => want == h,
            _ => true,
        }
    }

    /// The `ask == true` decision for every node but `kqv_out-<layer>` (which the
    /// callback decides itself, as it may finish the layer right there).
    ///
    /// # Safety
    /// `t` must point to a live ggml tensor of the graph being computed.
    unsafe fn wants(&mut self, t: *const sys::ggml_tensor) -> bool {
        // SAFETY: caller guarantees liveness; src pointers of live nodes are live or null.
        unsafe {
            let tr = &*t;
            if let Some((cache, rotated)) = cache_write(t) {
                self.cache_rotated.insert(cache, rotated);
                return false;
            }
            if let Some(layer) = unrotation_of(t) {
                return self.cfg.layer.is_none_or(|l| l == layer);
            }
            if !self.cfg.trace_sources {
                return false;
            }
            match tr.op {
                sys::GGML_OP_FLASH_ATTN_EXT => self.wanted_layer(source_layer_hint(tr.src[1])),
                sys::GGML_OP_MUL_MAT if is_kv_mul_mat(tr) => {
                    self.wanted_layer(source_layer_hint(tr.src[0]))
                }
                // `kq` over K and Q activations (no KV cache: encoders).
                sys::GGML_OP_MUL_MAT if is_activation_kq(tr) => true,
                // `kqv` whose V is no cache view (absorbed MLA: a contiguous transpose of
                // the latent K cache's view): its softmax was traced.
                sys::GGML_OP_MUL_MAT => self.is_traced_softmax(tr.src[1]),
                sys::GGML_OP_SOFT_MAX => self.kq_ancestor(t).is_some(),
                // A score bias added to a traced `kq` before its softmax.
                sys::GGML_OP_ADD => self.biased_kq(t).is_some(),
                sys::GGML_OP_CUSTOM if mixed_attn_params(t).is_some() => {
                    self.wanted_layer(source_layer_hint(tr.src[1]))
                }
                _ => false,
            }
        }
    }

    /// The `ask == false` work: read what this node makes available.
    ///
    /// # Safety
    /// `t` must point to a live ggml tensor whose node has just been computed.
    unsafe fn observe(&mut self, t: *const sys::ggml_tensor) -> Result<(), CaptureError> {
        // Hashes computed ahead belong to the observe call that made them.
        self.kept.clear_prehashed();
        // SAFETY: caller guarantees liveness; sources of a computed node are still live.
        unsafe {
            let tr = &*t;
            if let Some(layer) = kqv_out_layer(tr) {
                return self.finish_layer(t, layer);
            }
            if let Some(layer) = unrotation_of(t) {
                return self.unrotated(t, layer);
            }
            if let Some(params) = flash_attn_params(tr) {
                let mut p = Pending {
                    op: op_name(tr.op),
                    params,
                    backend: backend_of(tr),
                    layer_hint: source_layer_hint(tr.src[1]),
                    tensors: Vec::new(),
                };
                let layer = p.layer_hint.unwrap_or(-1);
                p.tensors.push(self.read(t, Role::Attn, layer)?);
                let srcs: [_; 5] = std::array::from_fn(|i| {
                    (tr.src[i] as *const sys::ggml_tensor, FLASH_ATTN_ROLES[i])
                });
                self.prehash(&srcs, layer);
                for (i, role) in FLASH_ATTN_ROLES.into_iter().enumerate() {
                    if !tr.src[i].is_null() {
                        p.tensors.push(self.read(tr.src[i], role, layer)?);
                    }
                }
                self.done.insert(t, p);
                return Ok(());
            }
            match tr.op {
                sys::GGML_OP_MUL_MAT
                    if is_kv_mul_mat(tr)
                        || is_activation_kq(tr)
                        || self.is_traced_softmax(tr.src[1]) =>
                {
                    let src1 = tr.src[1] as *const sys::ggml_tensor;
                    let is_kqv = !src1.is_null() && self.open.contains_key(&src1);
                    if is_kqv {
                        let mut p = self.open.remove(&src1).unwrap_or_default();
                        let layer = p.layer_hint.unwrap_or(-1);
                        p.tensors.push(self.read(tr.src[0], Role::V, layer)?);
                        p.tensors.push(self.read(t, Role::Attn, layer)?);
                        self.done.insert(t, p);
                    } else {
                        let hint = source_layer_hint(tr.src[0]);
                        let layer = hint.unwrap_or(-1);
                        let mut p = Pending {
                            layer_hint: hint,
                            ..Default::default()
                        };
                        p.tensors.push(self.read(src1, Role::Q, layer)?);
                        p.tensors.push(self.read(tr.src[0], Role::K, layer)?);
                        p.tensors.push(self.read(t, Role::Kq, layer)?);
                        self.open.insert(t, p);
                    }
                }
                sys::GGML_OP_CUSTOM => {
                    let Some(params) = mixed_attn_params(t) else {
                        return Ok(());
                    };
                    let layer_hint = source_layer_hint(tr.src[1]);
                    let layer = layer_hint.unwrap_or(-1);
                    let mut p = Pending {
                        op: trace_format::MIXED_ATTN_OP.to_string(),
                        params,
                        backend: backend_of(tr),
                        layer_hint,
                        tensors: Vec::new(),
                    };
                    p.tensors.push(self.read(t, Role::Attn, layer)?);
                    let srcs: [_; 6] = std::array::from_fn(|i| {
                        (tr.src[i] as *const sys::ggml_tensor, MIXED_ROLES[i])
                    });
                    self.in_mixed = true;
                    let read = self.read_mixed_sources(tr, &srcs, layer, &mut p);
                    self.in_mixed = false;
                    read?;
                    self.done.insert(t, p);
                }
                // The bias is read here, while it is live (its memory may be reused once
                // the ADD has run).
                sys::GGML_OP_ADD => {
                    if let Some(kq) = self.biased_kq(t) {
                        let layer = self.open.get(&kq).and_then(|p| p.layer_hint).unwrap_or(-1);
                        let bias = self.read(tr.src[1], Role::KqBias, layer)?;
                        if let Some(p) = self.open.get_mut(&kq) {
                            p.tensors.push(bias);
                        }
                    }
                }
                sys::GGML_OP_SOFT_MAX => {
                    if let Some(kq) = self.kq_ancestor(t) {
                        let mut p = self.open.remove(&kq).unwrap_or_default();
                        let layer = p.layer_hint.unwrap_or(-1);
                        p.op = op_name(tr.op);
                        p.params = softmax_params(t);
                        p.backend = backend_of(tr);
                        if !tr.src[1].is_null() {
                            p.tensors.push(self.read(tr.src[1], Role::Mask, layer)?);
                        }
                        if !tr.src[2].is_null() {
                            p.tensors.push(self.read(tr.src[2], Role::Sinks, layer)?);
                        }
                        p.tensors.push(self.read(t, Role::KqSoftMax, layer)?);
                        self.open.insert(t, p);
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// `fault::Fault::GraphWrite`: point the planned `SET_ROWS`'s first index at the
    /// planned cell, before it runs.
    ///
    /// # Safety
    /// `t` must point to a live ggml tensor of the graph being computed.
    #[cfg(feature = "fault-injection")]
    unsafe fn plant_graph_fault(&self, t: *const sys::ggml_tensor) {
        let Some(fault::Fault::GraphWrite { step, layer, cell }) = fault::planned() else {
            return;
        };
        // SAFETY: caller guarantees liveness; sources and view chains of live nodes are
        // live.
        unsafe {
            let tr = &*t;
            if step != self.step || tr.op != sys::GGML_OP_SET_ROWS || tr.view_src.is_null() {
                return;
            }
            let base = &*graph::view_base(t);
            if !tensor_name(base).starts_with("cache_k") || graph::layer_hint(base) != Some(layer) {
                return;
            }
            let c = tr.src[1];
            if c.is_null() || (*c).data.is_null() || !sys::ggml_backend_buffer_is_host((*c).buffer)
            {
                return;
            }
            match (*c).type_ {
                sys::GGML_TYPE_I64 => *((*c).data as *mut i64) = cell as i64,
                sys::GGML_TYPE_I32 => *((*c).data as *mut i32) = cell as i32,
                _ => {}
            }
        }
    }

    /// Read a mixed attention node's six sources into `p`.
    ///
    /// # Safety
    /// `tr` must be a live, computed mixed attention node; `srcs` its sources.
    unsafe fn read_mixed_sources(
        &mut self,
        tr: &sys::ggml_tensor,
        srcs: &[(*const sys::ggml_tensor, Role); 6],
        layer: i32,
        p: &mut Pending,
    ) -> Result<(), CaptureError> {
        // SAFETY: the caller's contract.
        unsafe {
            self.prehash(srcs, layer);
            for (i, role) in MIXED_ROLES.into_iter().enumerate() {
                if tr.src[i].is_null() {
                    return Err(CaptureError::MissingSource {
                        layer,
                        index: i,
                        role,
                    });
                }
                p.tensors.push(self.read(tr.src[i], role, layer)?);
            }
        }
        Ok(())
    }

    /// Is a mixed attention node's source being read (see `read::tracks`)?
    pub(super) fn mixed_layer_source(&self, _t: *const sys::ggml_tensor) -> bool {
        self.in_mixed
    }

    /// Emit the un-rotated attention output, recorded in `kqv_out`'s shape.
    ///
    /// # Safety
    /// `t` must point to a live, computed ggml tensor.
    unsafe fn unrotated(
        &mut self,
        t: *const sys::ggml_tensor,
        layer: i32,
    ) -> Result<(), CaptureError> {
        // SAFETY: caller guarantees liveness.
        let mut c = unsafe { self.read(t, Role::KqvOutUnrotated, layer) }?;
        // SAFETY: as above; src[1]'s chain was checked by unrotation_of.
        unsafe {
            let kqv_out = unrotated_kqv_out(t);
            let ne = (*kqv_out).ne.map(|x| x.max(0) as u64);
            if let Ok(l) = TensorLayout::contiguous(c.meta.layout.ty, ne) {
                if l.n_elements() == c.meta.layout.n_elements() {
                    c.meta.layout = l;
                }
            }
        }
        self.sink.on_attention(CapturedAttention {
            step: self.step,
            layer,
            op: String::new(),
            params: AttnParams::default(),
            backend: String::new(),
            tensors: vec![c],
            rotation: None,
            cross: false,
        })
    }

    /// `kqv_out-<layer>` ran: bind it to the attention op its chain reaches, emit.
    ///
    /// # Safety
    /// `t` must point to a live, computed ggml tensor.
    unsafe fn finish_layer(
        &mut self,
        t: *const sys::ggml_tensor,
        layer: i32,
    ) -> Result<(), CaptureError> {
        // SAFETY: caller guarantees `t` is live and computed.
        let out = unsafe { self.read(t, Role::KqvOut, layer) }?;
        // SAFETY: as above.
        unsafe { self.emit_layer(t, layer, out) }
    }

    /// With flash attention `kqv_out` is usually a contiguous reshape of the attention
    /// op's output, already read when that op ran: then it is described from its own
    /// layout and its bytes are the op output's, and the callback need not stop the
    /// graph at it (one synchronisation less per layer). Returns false when the fast
    /// path does not apply.
    ///
    /// # Safety
    /// `t` must point to a live ggml tensor.
    unsafe fn finish_layer_as_view(
        &mut self,
        t: *const sys::ggml_tensor,
        layer: i32,
    ) -> Result<bool, CaptureError> {
        // SAFETY: caller guarantees liveness.
        let tr = unsafe { &*t };
        if tr.view_src.is_null() {
            return Ok(false);
        }
        // SAFETY: view chains of live tensors are live.
        let base = unsafe { view_base(t) };
        let Some(p) = self.done.get(&base) else {
            return Ok(false);
        };
        let Some(attn) = p.tensors.iter().find(|c| c.meta.role == Role::Attn) else {
            return Ok(false);
        };
        let layout = layout_of(tr);
        let same_bytes = tr.view_offs == 0
            && layout.is_contiguous()
            && attn.meta.layout.is_contiguous()
            && layout.ty == attn.meta.layout.ty
            && layout.n_elements() == attn.meta.layout.n_elements();
        if !same_bytes {
            return Ok(false);
        }
        let out = CapturedTensor {
            meta: TensorMeta {
                role: Role::KqvOut,
                layer,
                step: self.step,
                ggml_name: tensor_name(tr),
                op: op_name(tr.op),
                layout,
                // SAFETY: checked non-null above.
                view_of: tensor_name(unsafe { &*tr.view_src }),
            },
            data: Arc::clone(&attn.data),
            revision: None,
            graph_order: Some(self.order),
        };
        // SAFETY: caller guarantees liveness.
        unsafe { self.emit_layer(t, layer, out) }?;
        Ok(true)
    }

    /// Bind `kqv_out` (already captured as `out`) to the attention op its source chain
    /// reaches, and hand the whole layer to the sink.
    ///
    /// # Safety
    /// `t` must point to a live ggml tensor.
    unsafe fn emit_layer(
        &mut self,
        t: *const sys::ggml_tensor,
        layer: i32,
        mut out: CapturedTensor,
    ) -> Result<(), CaptureError> {
        out.meta.layer = layer;
        // SAFETY: caller guarantees liveness.
        let rotation = unsafe { self.rotation_of(t) };
        self.emitted.insert(t);
        let mut att = CapturedAttention {
            step: self.step,
            layer,
            op: String::new(),
            params: AttnParams::default(),
            backend: String::new(),
            tensors: vec![out],
            rotation,
            cross: false,
        };
        if self.cfg.trace_sources {
            // SAFETY: caller guarantees liveness.
            let feeding = unsafe { attention_feeding_mla(t, |c| self.done.contains_key(&c)) };
            let Some((p, v_mla, feeding_node)) =
                feeding.and_then(|f| Some((self.done.remove(&f.node)?, f.v_mla, f.node)))
            else {
                return Err(CaptureError::Unbound {
                    layer,
                    step: self.step,
                });
            };
            // SAFETY: a node of the live graph.
            let (_, v) = unsafe { attention_q_v(feeding_node) };
            // SAFETY: as above.
            att.cross = unsafe { is_input_projection(v) };
            let layer = if att.cross {
                self.n_layer + layer
            } else {
                layer
            };
            att.layer = layer;
            for c in &mut att.tensors {
                c.meta.layer = layer;
            }
            att.op = p.op;
            att.params = p.params;
            att.backend = p.backend;
            for mut c in p.tensors {
                c.meta.layer = layer;
                att.tensors.push(c);
            }
            if let Some(w) = v_mla {
                // Absorbed MLA: kqv_out = W · attn per head (a weight: always live).
                // SAFETY: a source of a live node.
                att.tensors
                    .push(unsafe { self.read(w, Role::VMla, layer) }?);
            }
        }
        self.sink.on_attention(att)
    }

    /// The rotation of the attention `kqv_out`'s source chain reaches (found by structure,
    /// whether or not its inputs are traced); None when no attention node is reached.
    ///
    /// # Safety
    /// `kqv_out` must point to a live ggml tensor.
    unsafe fn rotation_of(&self, kqv_out: *const sys::ggml_tensor) -> Option<Rotation> {
        // SAFETY: caller guarantees liveness; the graph's nodes stay live during it.
        unsafe {
            let node = attention_feeding_mla(kqv_out, |c| is_attention_node(c))?.node;
            let (q, v) = attention_q_v(node);
            Some(Rotation {
                k: is_rotated(q),
                v: cache_base(v).and_then(|c| self.cache_rotated.get(&c).copied()),
            })
        }
    }

    /// The eval callback to give llama.cpp (`ggml_backend_sched_eval_callback`), with a
    /// `*mut Capture` as `user_data`.
    ///
    /// # Safety
    /// `user_data` must be a valid `*mut Capture` for the duration of the run, and ggml
    /// must call this with live tensors (it does).
    pub unsafe extern "C" fn callback(
        t: *mut sys::ggml_tensor,
        ask: bool,
        user_data: *mut std::ffi::c_void,
    ) -> bool {
        if user_data.is_null() || t.is_null() {
            return false;
        }
        // SAFETY: the session passes a `*mut Capture` that outlives the run.
        let cap = unsafe { &mut *(user_data as *mut Capture) };
        if cap.error.is_some() {
            // After an error ask for nothing more (and stop the graph if asked).
            return false;
        }
        // A panic must not unwind into ggml's C code: catch it and stop the run with it.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // SAFETY: ggml passes live graph nodes; with `ask == false`, computed ones.
            unsafe { cap.eval(t, ask) }
        }));
        match result {
            Ok(Ok(wanted)) => wanted,
            Ok(Err(e)) => {
                cap.error = Some(e);
                false
            }
            Err(panic) => {
                cap.error = Some(CaptureError::from_panic(panic));
                false
            }
        }
    }

    /// The callback's work: the `ask` decision, or the data call's reading.
    ///
    /// # Safety
    /// `t` must point to a live ggml tensor of the graph being computed, computed when
    /// `ask` is false.
    unsafe fn eval(&mut self, t: *mut sys::ggml_tensor, ask: bool) -> Result<bool, CaptureError> {
        if ask {
            // The scheduler asks about every node once, in graph order.
            self.order = self.next_order;
            self.next_order = self.next_order.saturating_add(1);
        }
        if self.step < self.cfg.from_step {
            return Ok(false);
        }
        #[cfg(feature = "fault-injection")]
        if ask {
            // SAFETY: caller guarantees liveness.
            unsafe { self.plant_graph_fault(t) };
        }
        if ask && self.cfg.keep {
            // Before it runs: what it will write into the kept views' memory.
            // SAFETY: caller guarantees liveness; the graph's inputs are set.
            unsafe { self.kept.note_writes(t) };
        }
        if ask {
            // SAFETY: caller guarantees liveness.
            let attention = unsafe { self.ask_attention(t) }?;
            // SAFETY: as above.
            let filtered = unsafe { self.wants_node(t) };
            self.asked = Some(Asked {
                node: t,
                attention,
                filtered,
            });
            return Ok(attention || filtered);
        }
        // The data call follows the ask about the same node.
        let (attention, filtered) = match self.asked.take() {
            Some(a) if std::ptr::eq(a.node, t) => (a.attention, a.filtered),
            _ => (true, false),
        };
        #[cfg(feature = "fault-injection")]
        fault::tap(t, self.step, self.order);
        if attention {
            // SAFETY: as above; this node has been computed.
            unsafe { self.observe(t) }?;
        }
        if filtered {
            // SAFETY: as above.
            let node = unsafe { self.read_node(t) }?;
            self.sink.on_node(node)?;
        }
        Ok(true)
    }

    /// The `ask` decision for attention (see the module docs).
    ///
    /// # Safety
    /// `t` must point to a live ggml tensor of the graph being computed.
    unsafe fn ask_attention(&mut self, t: *mut sys::ggml_tensor) -> Result<bool, CaptureError> {
        // SAFETY: caller guarantees liveness.
        let Some(layer) = kqv_out_layer(unsafe { &*t }) else {
            // SAFETY: as above.
            return Ok(unsafe { self.wants(t) });
        };
        if self.cfg.layer.is_some_and(|l| l != layer) {
            return Ok(false);
        }
        // Not attention's output but its projection by wo (bert.cpp, t5.cpp name it
        // `kqv_out-<layer>` as well): ignored, the layer's output was traced.
        // SAFETY: as above.
        if unsafe { projects_kqv_out(t, |c| self.emitted.contains(&c)) } {
            return Ok(false);
        }
        // SAFETY: as above.
        if self.cfg.trace_sources && unsafe { self.finish_layer_as_view(t, layer) }? {
            return Ok(false);
        }
        Ok(true)
    }

    /// Does `--tensor-filter` want this node (its name matches, its layer is the one
    /// `--layer` asks for, and it has elements)?
    ///
    /// # Safety
    /// `t` must point to a live ggml tensor.
    unsafe fn wants_node(&self, t: *const sys::ggml_tensor) -> bool {
        let Some(filter) = self.cfg.nodes.as_deref() else {
            return false;
        };
        // SAFETY: caller guarantees liveness.
        let tr = unsafe { &*t };
        if tr.ne.iter().any(|&n| n <= 0) || !computed(tr) {
            return false;
        }
        let name = String::from_utf8_lossy(graph::name_bytes(tr));
        filter.matches(&name)
            && self
                .cfg
                .layer
                .is_none_or(|l| trace_format::node_layer(&name) == l)
    }

    /// Read a filtered node's output (role `node`, its layer from its name).
    ///
    /// # Safety
    /// `t` must point to a live, computed ggml tensor.
    unsafe fn read_node(
        &mut self,
        t: *const sys::ggml_tensor,
    ) -> Result<CapturedTensor, CaptureError> {
        // SAFETY: caller guarantees liveness.
        let layer = trace_format::node_layer(&tensor_name(unsafe { &*t }));
        // SAFETY: as above.
        unsafe { self.read(t, Role::Node, layer) }
    }
}

/// Whether the graph computes `t`. A graph built with `ggml_build_forward_select` (llama.cpp
/// builds its input embeddings so: token, vector and mixed paths, one selected per batch)
/// holds nodes of the branches not taken without `GGML_TENSOR_FLAG_COMPUTE`; the scheduler
/// still asks about them, but they never run and their memory holds whatever was there.
/// A tree without the flag (older llama.cpp) computes every node.
pub(crate) fn computed(t: &sys::ggml_tensor) -> bool {
    let flag = sys::GGML_TENSOR_FLAG_COMPUTE;
    // The generated constant is the type's maximum where the tree has no such flag.
    flag == sys::ggml_tensor_flag::MAX || t.flags & (flag as i32) != 0
}
