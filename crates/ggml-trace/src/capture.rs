//! The capture engine: an eval callback that finds each layer's attention in the graph by
//! structure, reads its inputs and outputs after the nodes ran, and hands them over with
//! their layouts.
//!
//! How attention is found (names repeat, so only `kqv_out-<layer>` is looked up by name):
//! - flash attention: a `FLASH_ATTN_EXT` node; its sources are q, k, v, mask, sinks.
//! - without it: a `MUL_MAT` whose first source is a view of a KV-cache tensor (a leaf in
//!   a buffer that holds neither weights nor compute results) is `kq` when its second
//!   source is not a softmax, and `kqv` when it is; the `SOFT_MAX` between them is the
//!   one whose input chain (through SCALE/TANH/ADD for softcapping) reaches a `kq`.
//! - mixed KV cache (`--mixed-kv-cache`): a `CUSTOM` node that llama.cpp's
//!   `llama_mixed_attn_get_params` recognises (it compares the node's function pointer
//!   with the mixed-attention kernel's); its six sources are q, k (hot), v (hot),
//!   k_quant (cold), v_quant (cold), mask, saved with those roles and their layouts.
//! - `kqv_out-<layer>` is bound to the attention op that its source chain (views,
//!   reshapes, permutes, copies) reaches, so the layer comes from structure too.
//!
//! The callback asks (`ask == true`) only for those nodes and reads data only in the
//! `ask == false` call that follows each one's computation, while its inputs are still
//! live: q and k are consumed by `kq` long before `kqv_out` runs when flash attention is
//! off, so they are read at `kq`.

use std::collections::HashMap;
use std::ffi::CStr;
use std::sync::Arc;

use trace_format::layout::{hash_blocks, HASH_BLOCK};
pub use trace_format::Revision;
use trace_format::{AttnParams, Role, TensorLayout, TensorMeta};

use crate::sys;

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
}

/// A KV-cache view's (or mask's) last copy, per (layer, role).
struct Kept {
    layout: TensorLayout,
    data: Arc<Vec<u8>>,
    block_hashes: Vec<u64>,
    id: u64,
}

/// Keep KV-cache copies only while all of them together stay under this many bytes
/// (a long context on a large model would otherwise hold a second KV cache); beyond
/// it, further views are copied afresh each step as before.
const KEPT_BUDGET: usize = 1 << 30;

/// Everything captured for one layer in one step.
#[derive(Clone, Debug)]
pub struct CapturedAttention {
    pub step: u32,
    pub layer: i32,
    /// The op that computed attention: `FLASH_ATTN_EXT`, `SOFT_MAX` (no flash attention)
    /// or `MIXED_ATTN` (the mixed KV cache's node, a ggml `CUSTOM` op).
    pub op: String,
    pub params: AttnParams,
    /// `kqv_out` first, then the attention op's output and its inputs.
    pub tensors: Vec<CapturedTensor>,
}

/// What to capture.
#[derive(Clone, Copy, Debug)]
pub struct CaptureConfig {
    /// Only this layer; `None` for all.
    pub layer: Option<i32>,
    /// Capture the attention inputs too (the seed's default); off: `kqv_out` only.
    pub trace_sources: bool,
    /// Keep each KV-cache view and mask from one step to the next and gather again only
    /// the rows that changed (see [`Revision`]); off: copy everything every step, with
    /// no revisions (the tools keep; tests compare the two).
    pub keep: bool,
}

/// Receives the run as it happens (on the thread that runs `llama_decode`).
pub trait CaptureSink {
    /// The model is loaded and the context made; nothing has been decoded yet.
    fn on_start(&mut self, _info: &crate::session::RunInfo) -> Result<(), String> {
        Ok(())
    }
    /// A step is about to be decoded. Return false to stop the run before it (Ctrl-C).
    fn on_step(&mut self, _step: &trace_format::StepMeta) -> bool {
        true
    }
    /// A layer's attention for the current step is complete. An error stops the run.
    fn on_attention(&mut self, att: CapturedAttention) -> Result<(), String>;
}

/// Attention being assembled between its op and `kqv_out`.
#[derive(Default)]
struct Pending {
    op: String,
    params: AttnParams,
    tensors: Vec<CapturedTensor>,
    layer_hint: Option<i32>,
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
    error: Option<String>,
    scratch: Vec<u8>,
    kept: HashMap<(i32, Role), Kept>,
    kept_bytes: usize,
    revisions: u64,
    /// Hashes kept views on llama.cpp's CPU threadpool (see `pool_hash`), when the
    /// session has one.
    pool_hasher: Option<crate::pool_hash::PoolHasher>,
    /// Block hashes of the spans an attention node's kept sources cover, computed in one
    /// pool computation before they are read (see `prehash`); valid only during the
    /// `observe` call that made them.
    prehashed: Vec<Prehashed>,
}

/// The block hashes of one span, computed ahead.
struct Prehashed {
    ptr: *const u8,
    len: usize,
    hashes: Vec<u64>,
}

fn op_name(op: sys::ggml_op) -> String {
    // SAFETY: ggml_op_name returns a static NUL-terminated string for every op value.
    let p = unsafe { sys::ggml_op_name(op) };
    if p.is_null() {
        return format!("op{op}");
    }
    // SAFETY: non-null, static storage.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

fn tensor_name(t: &sys::ggml_tensor) -> String {
    let bytes: Vec<u8> = t
        .name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The number after `prefix` at the start of a name (`cache_k_l12 (view)` → 12).
fn number_after(name: &str, prefix: &str) -> Option<i32> {
    let rest = name.strip_prefix(prefix)?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The name's bytes up to the NUL, without allocating: the callback asks about every
/// node of every decode.
fn name_bytes(t: &sys::ggml_tensor) -> &[u8] {
    // SAFETY: `name` is a fixed array of c_char, which has u8's size and alignment.
    let all: &[u8] =
        unsafe { std::slice::from_raw_parts(t.name.as_ptr().cast::<u8>(), t.name.len()) };
    let end = all.iter().position(|&b| b == 0).unwrap_or(all.len());
    &all[..end]
}

/// The layer of a node named exactly `kqv_out-<layer>`; views of it (`kqv_out-0
/// (reshaped)`, made when llama.cpp un-rotates a quantized cache's output) are not it.
fn kqv_out_layer(t: &sys::ggml_tensor) -> Option<i32> {
    // Asked of every node of every decode: reject on the first byte before scanning.
    if t.name[0] != b'k' as std::ffi::c_char {
        return None;
    }
    let rest = name_bytes(t).strip_prefix(b"kqv_out-")?;
    if rest.is_empty() || !rest.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(rest).ok()?.parse().ok()
}

/// A layer hint from a KV view's base tensor name (`cache_k_l3`): used only to skip
/// work for other layers under `--layer`; the binding itself is structural.
fn layer_hint(base: &sys::ggml_tensor) -> Option<i32> {
    let name = tensor_name(base);
    let i = name.rfind("_l")?;
    number_after(&name[i..], "_l")
}

/// Follow views to the tensor that owns the memory.
///
/// # Safety
/// `t` must point to a live ggml tensor.
unsafe fn view_base(mut t: *const sys::ggml_tensor) -> *const sys::ggml_tensor {
    // SAFETY: the caller guarantees `t` is live; view_src pointers of live tensors are live.
    unsafe {
        while !(*t).view_src.is_null() {
            t = (*t).view_src;
        }
    }
    t
}

/// A view (possibly permuted) of a persistent, non-weight tensor: the KV cache.
///
/// # Safety
/// `t` must be null or point to a live ggml tensor.
unsafe fn is_kv_view(t: *const sys::ggml_tensor) -> bool {
    if t.is_null() {
        return false;
    }
    // SAFETY: as above.
    unsafe {
        let base = view_base(t);
        if base == t || (*base).op != sys::GGML_OP_NONE || (*base).buffer.is_null() {
            return false;
        }
        if (*base).flags & (sys::GGML_TENSOR_FLAG_INPUT as i32) != 0 {
            return false;
        }
        sys::ggml_backend_buffer_get_usage((*base).buffer) == sys::GGML_BACKEND_BUFFER_USAGE_ANY
    }
}

fn is_layout_op(op: sys::ggml_op) -> bool {
    matches!(
        op,
        sys::GGML_OP_VIEW
            | sys::GGML_OP_RESHAPE
            | sys::GGML_OP_PERMUTE
            | sys::GGML_OP_TRANSPOSE
            | sys::GGML_OP_CONT
            | sys::GGML_OP_CPY
    )
}

fn f32_param(t: &sys::ggml_tensor, i: usize) -> f32 {
    f32::from_bits(t.op_params[i] as u32)
}

/// A tensor's type, shape and strides as ggml holds them.
fn layout_of(t: &sys::ggml_tensor) -> TensorLayout {
    TensorLayout {
        ty: gguf_io::GgmlType(t.type_),
        ne: t.ne.map(|x| x.max(0) as u64),
        nb: t.nb.map(|x| x as u64),
    }
}

/// The parameters of a mixed-KV-cache attention node, or `None` for any other node.
///
/// # Safety
/// `t` must point to a live ggml tensor.
pub unsafe fn mixed_attn_params(t: *const sys::ggml_tensor) -> Option<AttnParams> {
    // SAFETY: caller guarantees liveness.
    if unsafe { (*t).op } != sys::GGML_OP_CUSTOM {
        return None;
    }
    let (mut scale, mut max_bias, mut softcap) = (0f32, 0f32, 0f32);
    // SAFETY: live tensor, writable out-parameters; the function only reads the node.
    let is_mixed =
        unsafe { sys::llama_mixed_attn_get_params(t, &mut scale, &mut max_bias, &mut softcap) };
    is_mixed.then_some(AttnParams {
        scale,
        max_bias,
        softcap,
    })
}

/// The sources of the mixed attention node, in order, with their roles.
const MIXED_ROLES: [Role; 6] = [
    Role::Q,
    Role::K,
    Role::V,
    Role::KQuant,
    Role::VQuant,
    Role::Mask,
];

impl<'a> Capture<'a> {
    pub fn new(cfg: CaptureConfig, sink: &'a mut dyn CaptureSink) -> Self {
        Self {
            cfg,
            sink,
            step: 0,
            done: HashMap::new(),
            open: HashMap::new(),
            error: None,
            scratch: Vec::new(),
            kept: HashMap::new(),
            kept_bytes: 0,
            revisions: 0,
            pool_hasher: None,
            prehashed: Vec::new(),
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
        self.pool_hasher = unsafe { crate::pool_hash::PoolHasher::new(pool, n_threads) };
    }

    /// Start a new step (before its `llama_decode`); false when the sink says stop.
    pub fn begin_step(&mut self, step: &trace_format::StepMeta) -> bool {
        self.step = step.step;
        self.done.clear();
        self.open.clear();
        self.sink.on_step(step)
    }

    pub(crate) fn start(&mut self, info: &crate::session::RunInfo) -> Result<(), String> {
        self.sink.on_start(info)
    }

    /// The first error met inside the callback (the run stops there).
    pub fn take_error(&mut self) -> Option<String> {
        self.error.take()
    }

    fn wanted_layer(&self, hint: Option<i32>) -> bool {
        match (self.cfg.layer, hint) {
            (Some(want), Some(h)) => want == h,
            _ => true,
        }
    }

    /// Read a tensor's bytes (after its node ran) into logical contiguous order.
    ///
    /// # Safety
    /// `t` must point to a live, allocated ggml tensor.
    unsafe fn read(
        &mut self,
        t: *const sys::ggml_tensor,
        role: Role,
        layer: i32,
    ) -> Result<CapturedTensor, String> {
        // SAFETY: caller guarantees `t` is live.
        let tr = unsafe { &*t };
        let layout = layout_of(tr);
        let span = layout
            .span_bytes()
            .map_err(|e| format!("{}: {e}", tensor_name(tr)))? as usize;
        if tr.data.is_null() || tr.buffer.is_null() {
            return Err(format!("{}: tensor has no data", tensor_name(tr)));
        }
        // SAFETY: the buffer pointer is live while the graph runs.
        let host = unsafe { sys::ggml_backend_buffer_is_host(tr.buffer) };
        let mut scratch = std::mem::take(&mut self.scratch);
        let src: &[u8] = if host {
            // SAFETY: for host buffers `data` points at `span` readable bytes: ggml
            // allocated ggml_nbytes(t) = span bytes for this (view of a) tensor.
            unsafe { std::slice::from_raw_parts(tr.data as *const u8, span) }
        } else {
            scratch.resize(span, 0);
            // SAFETY: offset 0 and size span = ggml_nbytes(t) lie inside the tensor.
            unsafe {
                sys::ggml_backend_tensor_get(t, scratch.as_mut_ptr().cast(), 0, span);
            }
            &scratch
        };
        // SAFETY: caller guarantees `t` is live.
        let keep = unsafe { self.keeps(t, role, layer) };
        let gathered = if keep {
            self.gather_kept(src, layout, role, layer)
        } else {
            let mut out = Vec::new();
            layout
                .gather_into(src, &mut out)
                .map(|()| (Arc::new(out), None))
                .map_err(|e| e.to_string())
        };
        self.scratch = scratch;
        let (data, revision) = gathered?;
        let view_of = if tr.view_src.is_null() {
            String::new()
        } else {
            // SAFETY: view_src of a live tensor is live.
            tensor_name(unsafe { &*tr.view_src })
        };
        Ok(CapturedTensor {
            meta: TensorMeta {
                role,
                layer,
                step: self.step,
                ggml_name: tensor_name(tr),
                op: op_name(tr.op),
                layout,
                view_of,
            },
            data,
            revision,
        })
    }

    /// Is `t` kept from one step to the next? KV-cache views and masks change little.
    ///
    /// # Safety
    /// `t` must point to a live ggml tensor.
    unsafe fn keeps(&self, t: *const sys::ggml_tensor, role: Role, layer: i32) -> bool {
        self.cfg.keep
            && layer >= 0
            && (role == Role::Mask
                || matches!(role, Role::K | Role::V | Role::KQuant | Role::VQuant)
                // SAFETY: caller guarantees `t` is live.
                    && unsafe { is_kv_view(t) })
    }

    /// Before an attention node's sources are read: hash the spans of those that `read`
    /// will keep and hash, all in one computation on the pool (K and V — and the mixed
    /// cache's cold stores — wake the pool once, not once each). `gather_kept` finds the
    /// hashes by span; the memory cannot change in between, as no graph is computing.
    ///
    /// # Safety
    /// Every non-null pointer in `srcs` must point to a live, allocated ggml tensor.
    unsafe fn prehash(&mut self, srcs: &[(*const sys::ggml_tensor, Role)], layer: i32) {
        self.prehashed.clear();
        if self.pool_hasher.is_none() {
            return;
        }
        for &(t, role) in srcs {
            // SAFETY: caller guarantees liveness of non-null pointers.
            if t.is_null() || !unsafe { self.keeps(t, role, layer) } {
                continue;
            }
            // SAFETY: as above.
            let tr = unsafe { &*t };
            // SAFETY: the buffer of a live allocated tensor is live.
            if tr.data.is_null()
                || tr.buffer.is_null()
                || !unsafe { sys::ggml_backend_buffer_is_host(tr.buffer) }
            {
                continue;
            }
            let layout = layout_of(tr);
            let (Ok(span), Ok(n_bytes)) = (layout.span_bytes(), layout.n_bytes()) else {
                continue;
            };
            // Only what gather_kept will hash: an existing copy of this layout, or a new
            // one within the budget.
            let key = (layer, role);
            let hashed = match self.kept.get(&key) {
                Some(k) if k.layout == layout => true,
                _ => self.fits_budget(key, n_bytes as usize),
            };
            if hashed {
                self.prehashed.push(Prehashed {
                    ptr: tr.data as *const u8,
                    len: span as usize,
                    hashes: vec![0; (span as usize).div_ceil(HASH_BLOCK)],
                });
            }
        }
        if self.prehashed.len() < 2 {
            // One span: gather_kept hashes it the same way by itself.
            self.prehashed.clear();
            return;
        }
        let Some(pool) = self.pool_hasher.as_mut() else {
            return;
        };
        let mut jobs: Vec<(&[u8], &mut [u64])> = self
            .prehashed
            .iter_mut()
            .map(|p| {
                // SAFETY: host memory of a live tensor, `len` = its span in bytes (what
                // `read` hands `gather_kept`).
                let span = unsafe { std::slice::from_raw_parts(p.ptr, p.len) };
                (span, p.hashes.as_mut_slice())
            })
            .collect();
        pool.hash_many(&mut jobs);
    }

    /// Would a new copy of `n_bytes` for `key` stay within the budget, the key's old
    /// copy (of another layout) being dropped?
    fn fits_budget(&self, key: (i32, Role), n_bytes: usize) -> bool {
        let old = self.kept.get(&key).map_or(0, |k| k.data.len());
        self.kept_bytes - old + n_bytes <= KEPT_BUDGET
    }

    /// Gather a KV-cache view over its previous copy (see [`Revision`]).
    fn gather_kept(
        &mut self,
        src: &[u8],
        layout: TensorLayout,
        role: Role,
        layer: i32,
    ) -> Result<(Arc<Vec<u8>>, Option<Revision>), String> {
        self.revisions += 1;
        let id = self.revisions;
        let key = (layer, role);
        let n_bytes = layout.n_bytes().map_err(|e| e.to_string())? as usize;
        let fits = self.fits_budget(key, n_bytes);
        let pool = &mut self.pool_hasher;
        let prehashed = &self.prehashed;
        let mut hash = |span: &[u8], out: &mut [u64]| {
            let ahead = prehashed.iter().find(|p| {
                p.ptr == span.as_ptr() && p.len == span.len() && p.hashes.len() == out.len()
            });
            match (ahead, pool.as_mut()) {
                (Some(p), _) => out.copy_from_slice(&p.hashes),
                (None, Some(h)) => h.hash(span, out),
                (None, None) => hash_blocks(span, out),
            }
        };
        if let Some(k) = self.kept.get_mut(&key) {
            if k.layout == layout {
                // Unique unless a sink kept the previous capture: then it is copied once.
                let data = Arc::make_mut(&mut k.data);
                let changed = layout
                    .gather_update(src, data, &mut k.block_hashes, &mut hash)
                    .map_err(|e| e.to_string())?;
                let since = changed.map(|c| (k.id, c));
                k.id = id;
                return Ok((Arc::clone(&k.data), Some(Revision { id, since })));
            }
            if let Some(old) = self.kept.remove(&key) {
                self.kept_bytes -= old.data.len();
            }
        }
        let mut out = Vec::new();
        if !fits {
            layout
                .gather_into(src, &mut out)
                .map_err(|e| e.to_string())?;
            return Ok((Arc::new(out), None));
        }
        let mut block_hashes = Vec::new();
        layout
            .gather_update(src, &mut out, &mut block_hashes, &mut hash)
            .map_err(|e| e.to_string())?;
        let data = Arc::new(out);
        self.kept_bytes += data.len();
        self.kept.insert(
            key,
            Kept {
                layout,
                data: Arc::clone(&data),
                block_hashes,
                id,
            },
        );
        Ok((data, Some(Revision { id, since: None })))
    }

    /// The `ask == true` decision for every node but `kqv_out-<layer>` (which the
    /// callback decides itself, as it may finish the layer right there).
    ///
    /// # Safety
    /// `t` must point to a live ggml tensor of the graph being computed.
    unsafe fn wants(&self, t: *const sys::ggml_tensor) -> bool {
        // SAFETY: caller guarantees liveness; src pointers of live nodes are live or null.
        unsafe {
            let tr = &*t;
            if let Some(layer) = Self::unrotation_of(t) {
                return self.cfg.layer.is_none_or(|l| l == layer);
            }
            if !self.cfg.trace_sources {
                return false;
            }
            match tr.op {
                sys::GGML_OP_FLASH_ATTN_EXT => {
                    let hint = if tr.src[1].is_null() {
                        None
                    } else {
                        layer_hint(&*view_base(tr.src[1]))
                    };
                    self.wanted_layer(hint)
                }
                sys::GGML_OP_MUL_MAT if is_kv_view(tr.src[0]) => {
                    self.wanted_layer(layer_hint(&*view_base(tr.src[0])))
                }
                sys::GGML_OP_SOFT_MAX => self.kq_ancestor(t).is_some(),
                sys::GGML_OP_CUSTOM if mixed_attn_params(t).is_some() => {
                    let hint = if tr.src[1].is_null() {
                        None
                    } else {
                        layer_hint(&*view_base(tr.src[1]))
                    };
                    self.wanted_layer(hint)
                }
                _ => false,
            }
        }
    }

    /// Without flash attention: the `kq` node a softmax's input chain reaches, if traced.
    ///
    /// # Safety
    /// `t` must point to a live ggml tensor.
    unsafe fn kq_ancestor(&self, t: *const sys::ggml_tensor) -> Option<*const sys::ggml_tensor> {
        // SAFETY: caller guarantees liveness.
        unsafe {
            let mut cur = (*t).src[0] as *const sys::ggml_tensor;
            for _ in 0..8 {
                if cur.is_null() {
                    return None;
                }
                if self.open.contains_key(&cur) {
                    return Some(cur);
                }
                cur = (*cur).src[0];
            }
        }
        None
    }

    /// Softcapping without flash attention is SCALE(1/c) → TANH → SCALE(c) between kq and
    /// the softmax: recover c.
    ///
    /// # Safety
    /// `softmax` must point to a live ggml tensor.
    unsafe fn softcap_before(softmax: *const sys::ggml_tensor) -> f32 {
        // SAFETY: caller guarantees liveness.
        unsafe {
            let outer = (*softmax).src[0];
            if outer.is_null() || (*outer).op != sys::GGML_OP_SCALE {
                return 0.0;
            }
            let tanh = (*outer).src[0];
            if tanh.is_null() || (*tanh).op != sys::GGML_OP_UNARY {
                return 0.0;
            }
            f32_param(&*outer, 0)
        }
    }

    /// The `ask == false` work: read what this node makes available.
    ///
    /// # Safety
    /// `t` must point to a live ggml tensor whose node has just been computed.
    unsafe fn observe(&mut self, t: *const sys::ggml_tensor) -> Result<(), String> {
        // Hashes computed ahead belong to the observe call that made them.
        self.prehashed.clear();
        // SAFETY: caller guarantees liveness; sources of a computed node are still live.
        unsafe {
            let tr = &*t;
            if let Some(layer) = kqv_out_layer(tr) {
                return self.finish_layer(t, layer);
            }
            if let Some(layer) = Self::unrotation_of(t) {
                return self.unrotated(t, layer);
            }
            match tr.op {
                sys::GGML_OP_FLASH_ATTN_EXT => {
                    let mut p = Pending {
                        op: op_name(tr.op),
                        params: AttnParams {
                            scale: f32_param(tr, 0),
                            max_bias: f32_param(tr, 1),
                            softcap: f32_param(tr, 2),
                        },
                        layer_hint: if tr.src[1].is_null() {
                            None
                        } else {
                            layer_hint(&*view_base(tr.src[1]))
                        },
                        tensors: Vec::new(),
                    };
                    let layer = p.layer_hint.unwrap_or(-1);
                    p.tensors.push(self.read(t, Role::Attn, layer)?);
                    let roles = [Role::Q, Role::K, Role::V, Role::Mask, Role::Sinks];
                    let srcs: [_; 5] =
                        std::array::from_fn(|i| (tr.src[i] as *const sys::ggml_tensor, roles[i]));
                    self.prehash(&srcs, layer);
                    for (i, role) in roles.into_iter().enumerate() {
                        if !tr.src[i].is_null() {
                            p.tensors.push(self.read(tr.src[i], role, layer)?);
                        }
                    }
                    self.done.insert(t, p);
                }
                sys::GGML_OP_MUL_MAT if is_kv_view(tr.src[0]) => {
                    let src1 = tr.src[1] as *const sys::ggml_tensor;
                    let is_kqv = !src1.is_null() && self.open.contains_key(&src1);
                    if is_kqv {
                        let mut p = self.open.remove(&src1).unwrap_or_default();
                        let layer = p.layer_hint.unwrap_or(-1);
                        p.tensors.push(self.read(tr.src[0], Role::V, layer)?);
                        p.tensors.push(self.read(t, Role::Attn, layer)?);
                        self.done.insert(t, p);
                    } else {
                        let hint = layer_hint(&*view_base(tr.src[0]));
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
                    let layer_hint = if tr.src[1].is_null() {
                        None
                    } else {
                        layer_hint(&*view_base(tr.src[1]))
                    };
                    let layer = layer_hint.unwrap_or(-1);
                    let mut p = Pending {
                        op: trace_format::MIXED_ATTN_OP.to_string(),
                        params,
                        layer_hint,
                        tensors: Vec::new(),
                    };
                    p.tensors.push(self.read(t, Role::Attn, layer)?);
                    let srcs: [_; 6] = std::array::from_fn(|i| {
                        (tr.src[i] as *const sys::ggml_tensor, MIXED_ROLES[i])
                    });
                    self.prehash(&srcs, layer);
                    for (i, role) in MIXED_ROLES.into_iter().enumerate() {
                        if tr.src[i].is_null() {
                            return Err(format!(
                                "mixed attention node (layer {layer}): source {i} ({role}) is missing"
                            ));
                        }
                        p.tensors.push(self.read(tr.src[i], role, layer)?);
                    }
                    self.done.insert(t, p);
                }
                sys::GGML_OP_SOFT_MAX => {
                    if let Some(kq) = self.kq_ancestor(t) {
                        let mut p = self.open.remove(&kq).unwrap_or_default();
                        let layer = p.layer_hint.unwrap_or(-1);
                        p.op = op_name(tr.op);
                        p.params = AttnParams {
                            scale: f32_param(tr, 0),
                            max_bias: f32_param(tr, 1),
                            softcap: Self::softcap_before(t),
                        };
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

    /// A quantized cache makes llama.cpp rotate V by a Hadamard matrix, so `kqv_out` is in
    /// the rotated basis and the next MUL_MAT (the rotation, an input tensor, times a
    /// reshape of `kqv_out`) turns it back: recognise that node and return the layer.
    ///
    /// # Safety
    /// `t` must point to a live ggml tensor.
    unsafe fn unrotation_of(t: *const sys::ggml_tensor) -> Option<i32> {
        // SAFETY: caller guarantees liveness; sources of live nodes are live or null.
        unsafe {
            let tr = &*t;
            if tr.op != sys::GGML_OP_MUL_MAT || tr.src[0].is_null() || tr.src[1].is_null() {
                return None;
            }
            if (*tr.src[0]).flags & (sys::GGML_TENSOR_FLAG_INPUT as i32) == 0 {
                return None;
            }
            let mut cur = tr.src[1] as *const sys::ggml_tensor;
            for _ in 0..4 {
                if cur.is_null() {
                    return None;
                }
                if let Some(layer) = kqv_out_layer(&*cur) {
                    return Some(layer);
                }
                if !is_layout_op((*cur).op) {
                    return None;
                }
                cur = (*cur).src[0];
            }
        }
        None
    }

    /// Emit the un-rotated attention output, recorded in `kqv_out`'s shape.
    ///
    /// # Safety
    /// `t` must point to a live, computed ggml tensor.
    unsafe fn unrotated(&mut self, t: *const sys::ggml_tensor, layer: i32) -> Result<(), String> {
        // SAFETY: caller guarantees liveness.
        let mut c = unsafe { self.read(t, Role::KqvOutUnrotated, layer) }?;
        // SAFETY: as above; src[1]'s chain was checked by unrotation_of.
        let mut kqv_out = unsafe { (*t).src[1] } as *const sys::ggml_tensor;
        // SAFETY: as above.
        unsafe {
            while kqv_out_layer(&*kqv_out).is_none() {
                kqv_out = (*kqv_out).src[0];
            }
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
            tensors: vec![c],
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
    ) -> Result<(), String> {
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
    ) -> Result<bool, String> {
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
    ) -> Result<(), String> {
        out.meta.layer = layer;
        let mut att = CapturedAttention {
            step: self.step,
            layer,
            op: String::new(),
            params: AttnParams::default(),
            tensors: vec![out],
        };
        if self.cfg.trace_sources {
            // SAFETY: the chain of a live node is live.
            let mut cur = unsafe { (*t).src[0] } as *const sys::ggml_tensor;
            let mut found = None;
            for _ in 0..8 {
                if cur.is_null() {
                    break;
                }
                if self.done.contains_key(&cur) {
                    found = self.done.remove(&cur);
                    break;
                }
                // SAFETY: as above.
                let c = unsafe { &*cur };
                if !is_layout_op(c.op) {
                    break;
                }
                cur = c.src[0];
            }
            let Some(p) = found else {
                return Err(format!(
                    "kqv_out-{layer} (step {}): no traced attention op feeds it (is this architecture's attention supported?)",
                    self.step
                ));
            };
            att.op = p.op;
            att.params = p.params;
            for mut c in p.tensors {
                c.meta.layer = layer;
                att.tensors.push(c);
            }
        }
        self.sink.on_attention(att)
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
        if ask {
            // SAFETY: ggml passes live graph nodes.
            let Some(layer) = kqv_out_layer(unsafe { &*t }) else {
                // SAFETY: as above.
                return unsafe { cap.wants(t) };
            };
            if cap.cfg.layer.is_some_and(|l| l != layer) {
                return false;
            }
            if cap.cfg.trace_sources {
                // SAFETY: as above.
                match unsafe { cap.finish_layer_as_view(t, layer) } {
                    Ok(true) => return false,
                    Ok(false) => {}
                    Err(e) => {
                        cap.error = Some(e);
                        return false;
                    }
                }
            }
            return true;
        }
        // SAFETY: as above; this node has been computed.
        match unsafe { cap.observe(t) } {
            Ok(()) => true,
            Err(e) => {
                cap.error = Some(e);
                false
            }
        }
    }
}
