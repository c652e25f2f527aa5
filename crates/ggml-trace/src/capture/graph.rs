//! Graph recognisers: pure functions over ggml node structure (ops, sources, views,
//! buffers, names), with no state of the capture. See the module docs of
//! [`crate::capture`] for how attention is found; each function here is one of those
//! rules, unit-tested below on small ggml graphs built (not computed) through the FFI.

use std::ffi::CStr;

use trace_format::{AttnParams, Role, TensorLayout};

use crate::sys;

/// `ggml_op_name` of an op.
pub(crate) fn op_name(op: sys::ggml_op) -> String {
    // SAFETY: ggml_op_name returns a static NUL-terminated string for every op value.
    let p = unsafe { sys::ggml_op_name(op) };
    if p.is_null() {
        return format!("op{op}");
    }
    // SAFETY: non-null, static storage.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// The name of the backend buffer a computed node's data lives in (`CPU`, `RPC[...]`, a
/// GPU's): the backend that ran the node. Empty when the node has no buffer.
pub(crate) fn backend_of(t: &sys::ggml_tensor) -> String {
    if t.buffer.is_null() {
        return String::new();
    }
    // SAFETY: a live tensor's non-null buffer is a live backend buffer; its name is a
    // static NUL-terminated string of the buffer type (or null).
    let p = unsafe { sys::ggml_backend_buffer_name(t.buffer) };
    if p.is_null() {
        return String::new();
    }
    // SAFETY: non-null, NUL-terminated, outlives this call.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// The name's bytes up to the NUL (all of them if there is none), without allocating:
/// the callback asks about every node of every decode.
pub(crate) fn name_bytes(t: &sys::ggml_tensor) -> &[u8] {
    // SAFETY: `name` is a fixed array of c_char, which has u8's size and alignment.
    let all: &[u8] =
        unsafe { std::slice::from_raw_parts(t.name.as_ptr().cast::<u8>(), t.name.len()) };
    CStr::from_bytes_until_nul(all).map_or(all, CStr::to_bytes)
}

/// A tensor's name as a string (lossy for non-UTF-8 bytes).
pub(crate) fn tensor_name(t: &sys::ggml_tensor) -> String {
    String::from_utf8_lossy(name_bytes(t)).into_owned()
}

/// The number after `prefix` at the start of a name (`_l12 (view)` → 12).
fn number_after(name: &str, prefix: &str) -> Option<i32> {
    let rest = name.strip_prefix(prefix)?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The layer of a name that is exactly `kqv_out-<layer>`.
pub(crate) fn kqv_out_layer_of_name(name: &[u8]) -> Option<i32> {
    let rest = name.strip_prefix(b"kqv_out-")?;
    if rest.is_empty() || !rest.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(rest).ok()?.parse().ok()
}

/// The layer of a node named exactly `kqv_out-<layer>`; views of it (`kqv_out-0
/// (reshaped)`, made when llama.cpp un-rotates a quantized cache's output) are not it.
pub(crate) fn kqv_out_layer(t: &sys::ggml_tensor) -> Option<i32> {
    // Asked of every node of every decode: reject on the first byte before scanning.
    if t.name[0] != b'k' as std::ffi::c_char {
        return None;
    }
    kqv_out_layer_of_name(name_bytes(t))
}

/// The layer in a KV-cache tensor's name (`cache_k_l3` → 3): the number after its last
/// `_l`.
pub(crate) fn layer_hint_of_name(name: &str) -> Option<i32> {
    let i = name.rfind("_l")?;
    number_after(&name[i..], "_l")
}

/// A layer hint from a KV view's base tensor name (`cache_k_l3`): used only to skip
/// work for other layers under `--layer`; the binding itself is structural.
pub(crate) fn layer_hint(base: &sys::ggml_tensor) -> Option<i32> {
    layer_hint_of_name(&tensor_name(base))
}

/// The layer hint of the tensor `src` is a view of (`None` for a null source).
///
/// # Safety
/// `src` must be null or point to a live ggml tensor.
pub(crate) unsafe fn source_layer_hint(src: *const sys::ggml_tensor) -> Option<i32> {
    if src.is_null() {
        return None;
    }
    // SAFETY: caller guarantees liveness; view chains of live tensors are live.
    unsafe { layer_hint(&*view_base(src)) }
}

/// Follow views to the tensor that owns the memory.
///
/// # Safety
/// `t` must point to a live ggml tensor.
pub(crate) unsafe fn view_base(mut t: *const sys::ggml_tensor) -> *const sys::ggml_tensor {
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
pub(crate) unsafe fn is_kv_view(t: *const sys::ggml_tensor) -> bool {
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

/// Ops that only move or reinterpret data (what lies between `kqv_out` and attention).
pub(crate) fn is_layout_op(op: sys::ggml_op) -> bool {
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
pub(crate) fn layout_of(t: &sys::ggml_tensor) -> TensorLayout {
    TensorLayout {
        ty: gguf_io::GgmlType(t.type_),
        ne: t.ne.map(|x| x.max(0) as u64),
        nb: t.nb.map(|x| x as u64),
    }
}

/// The parameters of a `FLASH_ATTN_EXT` node, or `None` for any other node.
pub(crate) fn flash_attn_params(t: &sys::ggml_tensor) -> Option<AttnParams> {
    (t.op == sys::GGML_OP_FLASH_ATTN_EXT).then(|| AttnParams {
        scale: f32_param(t, 0),
        max_bias: f32_param(t, 1),
        softcap: f32_param(t, 2),
    })
}

/// The sources of a `FLASH_ATTN_EXT` node, in order, with their roles.
pub(crate) const FLASH_ATTN_ROLES: [Role; 5] = [Role::Q, Role::K, Role::V, Role::Mask, Role::Sinks];

/// Without flash attention: a `MUL_MAT` whose first source is a KV-cache view (`kq` or
/// `kqv`; which one depends on whether its second source is a traced softmax).
///
/// # Safety
/// `t` must point to a live ggml tensor.
pub(crate) unsafe fn is_kv_mul_mat(t: &sys::ggml_tensor) -> bool {
    // SAFETY: caller guarantees liveness; sources of live nodes are live or null.
    t.op == sys::GGML_OP_MUL_MAT && unsafe { is_kv_view(t.src[0]) }
}

/// Without flash attention and without a KV cache (encoders, cross-attention): `kq`, a
/// `MUL_MAT` of two permuted activations (`permute(K)`, `permute(Q)` in llama.cpp's
/// `build_attn_mha`), neither a weight nor a cache view.
///
/// # Safety
/// `t` must point to a live ggml tensor.
pub(crate) unsafe fn is_activation_kq(t: &sys::ggml_tensor) -> bool {
    if t.op != sys::GGML_OP_MUL_MAT || t.src[0].is_null() || t.src[1].is_null() {
        return false;
    }
    // SAFETY: caller guarantees liveness; sources of live nodes are live.
    unsafe {
        let (a, b) = (&*t.src[0], &*t.src[1]);
        a.op == sys::GGML_OP_PERMUTE
            && b.op == sys::GGML_OP_PERMUTE
            && !is_weight(t.src[0])
            && !is_weight(t.src[1])
            && !is_kv_view(t.src[0])
    }
}

/// Cross-attention's K or V: a projection of a graph input (the encoder output,
/// `cross_embd` in llama.cpp's encoder-decoder graphs): the source chain (layout ops and
/// casts, a `MUL_MAT` by a weight, up to 8 deep) reaches a leaf marked as an input.
///
/// # Safety
/// `t` must be null or point to a live ggml tensor.
pub(crate) unsafe fn is_input_projection(mut t: *const sys::ggml_tensor) -> bool {
    let mut projected = false;
    // SAFETY: caller guarantees liveness; sources of live nodes are live or null.
    unsafe {
        for _ in 0..8 {
            if t.is_null() {
                return false;
            }
            let c = &*t;
            if c.op == sys::GGML_OP_NONE {
                return projected
                    && c.view_src.is_null()
                    && c.flags & (sys::GGML_TENSOR_FLAG_INPUT as i32) != 0;
            }
            if is_layout_op(c.op) {
                t = c.src[0];
            } else if c.op == sys::GGML_OP_MUL_MAT && !projected && is_weight(c.src[0]) {
                projected = true;
                t = c.src[1];
            } else {
                return false;
            }
        }
    }
    false
}

/// Some models (bert.cpp, t5.cpp) also name the attention's output projection
/// `kqv_out-<layer>`: wo · kqv_out (plus a bias, a scale). True when `t`'s source chain
/// (ADD, MUL, MUL_MAT by a weight, layout ops) reaches a node for which `is_kqv_out`
/// holds (an attention output already traced in this graph).
///
/// # Safety
/// `t` must point to a live ggml tensor.
pub(crate) unsafe fn projects_kqv_out(
    t: *const sys::ggml_tensor,
    is_kqv_out: impl Fn(*const sys::ggml_tensor) -> bool,
) -> bool {
    let mut cur = t;
    for _ in 0..8 {
        if cur.is_null() {
            return false;
        }
        if cur != t && is_kqv_out(cur) {
            return true;
        }
        // SAFETY: the chain of a live node is live.
        let c = unsafe { &*cur };
        cur = match c.op {
            sys::GGML_OP_ADD | sys::GGML_OP_MUL => c.src[0],
            // SAFETY: as above.
            sys::GGML_OP_MUL_MAT if unsafe { is_weight(c.src[0]) } => c.src[1],
            op if is_layout_op(op) => c.src[0],
            _ => return false,
        };
    }
    false
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
    // SAFETY: live tensor (caller); always `None` on a tree without the mixed KV cache.
    let (scale, max_bias, softcap) = unsafe { ggml_trace_sys::mixed_attn_get_params(t) }?;
    Some(AttnParams {
        scale,
        max_bias,
        softcap,
    })
}

/// The sources of the mixed attention node, in order, with their roles.
pub(crate) const MIXED_ROLES: [Role; 6] = [
    Role::Q,
    Role::K,
    Role::V,
    Role::KQuant,
    Role::VQuant,
    Role::Mask,
];

/// Without flash attention: the node among a softmax's input chain (up to 8 deep) for
/// which `is_kq` holds (the traced `kq` MUL_MAT).
///
/// # Safety
/// `t` must point to a live ggml tensor.
pub(crate) unsafe fn kq_ancestor(
    t: *const sys::ggml_tensor,
    is_kq: impl Fn(*const sys::ggml_tensor) -> bool,
) -> Option<*const sys::ggml_tensor> {
    // SAFETY: caller guarantees liveness.
    unsafe {
        let mut cur = (*t).src[0] as *const sys::ggml_tensor;
        for _ in 0..8 {
            if cur.is_null() {
                return None;
            }
            if is_kq(cur) {
                return Some(cur);
            }
            cur = (*cur).src[0];
        }
    }
    None
}

/// The attention parameters of a `SOFT_MAX` node, made effective: its ALiBi bias, and
/// the scale and softcap of the whole chain of SCALE and TANH ops between `kq` and it
/// ([`scale_chain`]) folded with the softmax's own scale.
///
/// # Safety
/// `t` must point to a live ggml tensor.
pub(crate) unsafe fn softmax_params(t: *const sys::ggml_tensor) -> AttnParams {
    // SAFETY: caller guarantees liveness.
    let tr = unsafe { &*t };
    // SAFETY: as above.
    let chain = unsafe { scale_chain(t) };
    let (scale, softcap) = chain.effective(f32_param(tr, 0));
    AttnParams {
        scale,
        max_bias: f32_param(tr, 1),
        softcap,
    }
}

/// The SCALE and TANH ops right before a softmax, as llama.cpp builds them without flash
/// attention: `SCALE(1/c) → TANH → SCALE(c)` for a softcap (gemma2), and Grok's
/// `SCALE(out_scale/30) → TANH → SCALE(30)` (the attention scale folded into the
/// softcap's first SCALE, the softmax's own scale 1). `before` is the product of the
/// scales between `kq` and the TANH, `after` of those between the TANH and the softmax
/// (the only scales when there is no TANH).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct ScaleChain {
    pub before: f64,
    pub tanh: bool,
    pub after: f64,
}

impl ScaleChain {
    /// The (scale, softcap) of the reference's form `softcap * tanh(kq * scale /
    /// softcap)` (scale alone, softcap 0, without TANH) that equals
    /// `softmax_scale * after * tanh(before * kq)`: softcap = softmax_scale * after,
    /// scale = before * softcap.
    pub(crate) fn effective(&self, softmax_scale: f32) -> (f32, f32) {
        let s = f64::from(softmax_scale);
        if self.tanh {
            let softcap = s * self.after;
            ((self.before * softcap) as f32, softcap as f32)
        } else {
            ((s * self.after) as f32, 0.0)
        }
    }
}

/// Walk back from a softmax through plain SCALE ops (no bias) and at most one TANH.
///
/// # Safety
/// `softmax` must point to a live ggml tensor.
pub(crate) unsafe fn scale_chain(softmax: *const sys::ggml_tensor) -> ScaleChain {
    let mut chain = ScaleChain {
        before: 1.0,
        tanh: false,
        after: 1.0,
    };
    // SAFETY: caller guarantees liveness; sources of live nodes are live or null.
    unsafe {
        let mut cur = (*softmax).src[0] as *const sys::ggml_tensor;
        for _ in 0..8 {
            if cur.is_null() {
                break;
            }
            let c = &*cur;
            if c.op == sys::GGML_OP_SCALE && f32_param(c, 1) == 0.0 {
                let s = f64::from(f32_param(c, 0));
                if chain.tanh {
                    chain.before *= s;
                } else {
                    chain.after *= s;
                }
            } else if c.op == sys::GGML_OP_UNARY
                && !chain.tanh
                && sys::ggml_get_unary_op(cur) == sys::GGML_UNARY_OP_TANH
            {
                chain.tanh = true;
            } else {
                break;
            }
            cur = c.src[0];
        }
    }
    if !chain.tanh {
        // Scales alone, all "after".
        chain.after *= chain.before;
        chain.before = 1.0;
    }
    chain
}

/// Softcapping without flash attention is SCALE(1/c) → TANH → SCALE(c) between kq and
/// the softmax: recover c (as the chain stands, before the softmax's own scale).
///
/// # Safety
/// `softmax` must point to a live ggml tensor.
#[cfg(test)]
pub(crate) unsafe fn softcap_before(softmax: *const sys::ggml_tensor) -> f32 {
    // SAFETY: caller guarantees liveness.
    let chain = unsafe { scale_chain(softmax) };
    if chain.tanh {
        chain.after as f32
    } else {
        0.0
    }
}

/// A Hadamard rotation: the `MUL_MAT` llama.cpp's `llama_mul_mat_hadamard` makes (the
/// rotation matrix, an input tensor, times a reshape of the rotated tensor), which it
/// marks with `GGML_HINT_SRC0_IS_HADAMARD` in op param 1 (`ggml_mul_mat_set_hint`).
pub(crate) fn is_hadamard(t: &sys::ggml_tensor) -> bool {
    t.op == sys::GGML_OP_MUL_MAT && t.op_params[1] == sys::GGML_HINT_SRC0_IS_HADAMARD as i32
}

/// Whether `t` is (a layout of) a Hadamard rotation's result: its source chain through
/// layout ops and padding (up to 8 deep) reaches a [`is_hadamard`] node. llama.cpp rotates
/// Q and K (`attn_rot_k`) and V (`attn_rot_v`) this way before attention and before
/// writing them to the cache, only where it decided to rotate.
///
/// # Safety
/// `t` must be null or point to a live ggml tensor.
pub(crate) unsafe fn is_rotated(mut t: *const sys::ggml_tensor) -> bool {
    // SAFETY: caller guarantees liveness; sources of live nodes are live or null.
    unsafe {
        for _ in 0..8 {
            if t.is_null() {
                return false;
            }
            let tr = &*t;
            if is_hadamard(tr) {
                return true;
            }
            if !is_layout_op(tr.op) && tr.op != sys::GGML_OP_PAD {
                return false;
            }
            t = tr.src[0];
        }
    }
    false
}

/// A write into the KV cache (`SET_ROWS` into a view of a cache tensor): the cache tensor
/// written and whether the rows written were rotated ([`is_rotated`]).
///
/// # Safety
/// `t` must point to a live ggml tensor.
pub(crate) unsafe fn cache_write(
    t: *const sys::ggml_tensor,
) -> Option<(*const sys::ggml_tensor, bool)> {
    // SAFETY: caller guarantees liveness; sources and view chains of live nodes are live.
    unsafe {
        let tr = &*t;
        if tr.op != sys::GGML_OP_SET_ROWS || tr.view_src.is_null() {
            return None;
        }
        Some((view_base(t), is_rotated(tr.src[0])))
    }
}

/// The tensor whose memory a (cast, permuted) view of the KV cache reads: follow layout
/// ops to the first view, then views to their base.
///
/// # Safety
/// `t` must be null or point to a live ggml tensor.
pub(crate) unsafe fn cache_base(mut t: *const sys::ggml_tensor) -> Option<*const sys::ggml_tensor> {
    // SAFETY: caller guarantees liveness; sources of live nodes are live or null.
    unsafe {
        for _ in 0..8 {
            if t.is_null() {
                return None;
            }
            if !(*t).view_src.is_null() {
                return Some(view_base(t));
            }
            if !is_layout_op((*t).op) {
                return None;
            }
            t = (*t).src[0];
        }
    }
    None
}

/// The Q and V an attention node reads: a `FLASH_ATTN_EXT` or mixed node's sources 0 and
/// 2; for `kqv` (V·softmax, no flash attention) V is source 0 and Q the second source of
/// the `kq` its softmax's input chain reaches.
///
/// # Safety
/// `node` must point to a live ggml tensor.
pub(crate) unsafe fn attention_q_v(
    node: *const sys::ggml_tensor,
) -> (*const sys::ggml_tensor, *const sys::ggml_tensor) {
    // SAFETY: caller guarantees liveness; sources of live nodes are live or null.
    unsafe {
        let n = &*node;
        if n.op != sys::GGML_OP_MUL_MAT {
            return (n.src[0], n.src[2]);
        }
        let mut q = std::ptr::null();
        if !n.src[1].is_null() {
            if let Some(kq) = kq_ancestor(n.src[1], |c| is_kv_mul_mat(&*c)) {
                q = (*kq).src[1];
            }
        }
        (q, n.src[0])
    }
}

/// Any node that computes attention, by structure alone (the capture's own bookkeeping
/// aside): `FLASH_ATTN_EXT`, the mixed KV cache's node, or a `MUL_MAT` over a KV view.
///
/// # Safety
/// `t` must point to a live ggml tensor.
pub(crate) unsafe fn is_attention_node(t: *const sys::ggml_tensor) -> bool {
    // SAFETY: caller guarantees liveness.
    unsafe {
        let tr = &*t;
        flash_attn_params(tr).is_some() || is_kv_mul_mat(tr) || mixed_attn_params(t).is_some()
    }
}

/// A quantized cache makes llama.cpp rotate V by a Hadamard matrix, so `kqv_out` is in
/// the rotated basis and the next MUL_MAT (the rotation, an input tensor, times a
/// reshape of `kqv_out`, marked as a Hadamard rotation) turns it back: recognise that
/// node and return the layer.
///
/// # Safety
/// `t` must point to a live ggml tensor.
pub(crate) unsafe fn unrotation_of(t: *const sys::ggml_tensor) -> Option<i32> {
    // SAFETY: caller guarantees liveness; sources of live nodes are live or null.
    unsafe {
        let tr = &*t;
        if !is_hadamard(tr) || tr.src[0].is_null() || tr.src[1].is_null() {
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

/// The `kqv_out` node an un-rotation's second source chain reaches (see
/// [`unrotation_of`], which must have recognised `t`).
///
/// # Safety
/// `t` must point to a live ggml tensor for which [`unrotation_of`] returned a layer.
pub(crate) unsafe fn unrotated_kqv_out(t: *const sys::ggml_tensor) -> *const sys::ggml_tensor {
    // SAFETY: caller guarantees liveness and that the chain reaches `kqv_out`.
    unsafe {
        let mut kqv_out = (*t).src[1] as *const sys::ggml_tensor;
        while kqv_out_layer(&*kqv_out).is_none() {
            kqv_out = (*kqv_out).src[0];
        }
        kqv_out
    }
}

/// What `kqv_out`'s source chain reaches: the attention node and, for absorbed
/// multi-head latent attention, the weight of the MUL_MAT crossed on the way (`v_mla`,
/// llama.cpp's `attn_v_b`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Feeding {
    pub node: *const sys::ggml_tensor,
    pub v_mla: Option<*const sys::ggml_tensor>,
}

/// A model weight (a leaf, or a view of one, in a buffer used for weights).
///
/// # Safety
/// `t` must be null or point to a live ggml tensor.
pub(crate) unsafe fn is_weight(t: *const sys::ggml_tensor) -> bool {
    if t.is_null() {
        return false;
    }
    // SAFETY: as above; view chains of live tensors are live.
    unsafe {
        let base = view_base(t);
        (*base).op == sys::GGML_OP_NONE
            && !(*base).buffer.is_null()
            && sys::ggml_backend_buffer_get_usage((*base).buffer)
                == sys::GGML_BACKEND_BUFFER_USAGE_WEIGHTS
    }
}

/// The attention node that `kqv_out`'s source chain (layout ops only, up to 8 deep)
/// reaches, among those for which `is_attention` holds.
///
/// # Safety
/// `kqv_out` must point to a live ggml tensor.
#[cfg(test)]
pub(crate) unsafe fn attention_feeding(
    kqv_out: *const sys::ggml_tensor,
    is_attention: impl Fn(*const sys::ggml_tensor) -> bool,
) -> Option<*const sys::ggml_tensor> {
    // SAFETY: the caller's contract.
    unsafe { attention_feeding_mla(kqv_out, is_attention) }
        .filter(|f| f.v_mla.is_none())
        .map(|f| f.node)
}

/// The attention node that `kqv_out`'s source chain reaches (up to 12 nodes deep),
/// among those for which `is_attention` holds: through layout ops, and through at most
/// one MUL_MAT by a weight (absorbed MLA: with flash attention PERMUTE → MUL_MAT(v_mla)
/// → PERMUTE → CONT, without it `kqv` → MUL_MAT(v_mla) → PERMUTE → CONT), whose weight
/// is returned beside the node.
///
/// # Safety
/// `kqv_out` must point to a live ggml tensor.
pub(crate) unsafe fn attention_feeding_mla(
    kqv_out: *const sys::ggml_tensor,
    is_attention: impl Fn(*const sys::ggml_tensor) -> bool,
) -> Option<Feeding> {
    // SAFETY: the chain of a live node is live.
    let mut cur = unsafe { (*kqv_out).src[0] } as *const sys::ggml_tensor;
    let mut v_mla = None;
    for _ in 0..12 {
        if cur.is_null() {
            return None;
        }
        if is_attention(cur) {
            return Some(Feeding { node: cur, v_mla });
        }
        // SAFETY: as above.
        let c = unsafe { &*cur };
        if is_layout_op(c.op) {
            cur = c.src[0];
        // SAFETY: as above.
        } else if c.op == sys::GGML_OP_MUL_MAT && v_mla.is_none() && unsafe { is_weight(c.src[0]) }
        {
            v_mla = Some(c.src[0] as *const sys::ggml_tensor);
            cur = c.src[1];
        } else {
            return None;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    //! Small ggml graphs built (never computed) in a `no_alloc` context, with the "KV
    //! cache" tensors allocated in a CPU backend buffer of their own (usage ANY, like
    //! llama.cpp's cache), as llama.cpp's graphs lay them out.

    use std::ffi::CString;
    use std::ptr;

    use super::*;

    /// A ggml context for graph nodes plus a backend buffer for the cache tensors.
    struct Graph {
        ctx: *mut sys::ggml_context,
        cache_ctx: *mut sys::ggml_context,
        cache_buf: sys::ggml_backend_buffer_t,
    }

    const D: i64 = 32; // head size (a whole Q8_0 block)
    const H: i64 = 2; // heads
    const CELLS: i64 = 16; // cache cells
    const N: i64 = 3; // tokens in the batch

    impl Graph {
        fn new() -> Graph {
            let params = sys::ggml_init_params {
                mem_size: 1 << 20,
                mem_buffer: ptr::null_mut(),
                no_alloc: true,
            };
            // SAFETY: valid parameters; each context is freed in Drop.
            unsafe {
                let ctx = sys::ggml_init(params);
                let cache_ctx = sys::ggml_init(params);
                assert!(!ctx.is_null() && !cache_ctx.is_null());
                Graph {
                    ctx,
                    cache_ctx,
                    cache_buf: ptr::null_mut(),
                }
            }
        }

        fn name(t: *mut sys::ggml_tensor, name: &str) -> *mut sys::ggml_tensor {
            let c = CString::new(name).expect("no NUL");
            // SAFETY: live tensor; ggml copies the name (truncated to GGML_MAX_NAME).
            unsafe { sys::ggml_set_name(t, c.as_ptr()) }
        }

        fn tensor(
            &self,
            ctx: *mut sys::ggml_context,
            name: &str,
            ne: [i64; 3],
        ) -> *mut sys::ggml_tensor {
            // SAFETY: live context with room left.
            let t =
                unsafe { sys::ggml_new_tensor_3d(ctx, sys::GGML_TYPE_F32, ne[0], ne[1], ne[2]) };
            assert!(!t.is_null());
            Self::name(t, name)
        }

        /// A graph node input (not in the cache).
        fn input(&self, name: &str, ne: [i64; 3]) -> *mut sys::ggml_tensor {
            self.tensor(self.ctx, name, ne)
        }

        /// A cache tensor `cache_{k,v}_l<layer>` of `ty`: [D*H, CELLS] (`transposed`:
        /// [CELLS, D*H], llama.cpp's V cache without flash attention). Call
        /// `alloc_cache` after creating all of them.
        fn cache(&self, name: &str, ty: sys::ggml_type, transposed: bool) -> *mut sys::ggml_tensor {
            let (ne0, ne1) = if transposed {
                (CELLS, D * H)
            } else {
                (D * H, CELLS)
            };
            // SAFETY: live context.
            let t = unsafe { sys::ggml_new_tensor_2d(self.cache_ctx, ty, ne0, ne1) };
            assert!(!t.is_null());
            Self::name(t, name)
        }

        fn alloc_cache(&mut self) {
            // SAFETY: the cache context's tensors are unallocated; the buffer is freed in Drop.
            self.cache_buf = unsafe {
                sys::ggml_backend_alloc_ctx_tensors_from_buft(
                    self.cache_ctx,
                    sys::ggml_backend_cpu_buffer_type(),
                )
            };
            assert!(!self.cache_buf.is_null());
        }

        /// llama.cpp's view of a cache tensor: [D, H, cells] permuted to [D, cells, H].
        fn kv_view(&self, cache: *mut sys::ggml_tensor) -> *mut sys::ggml_tensor {
            // SAFETY: live tensors in live contexts.
            unsafe {
                let row = sys::ggml_row_size((*cache).type_, D);
                let v = sys::ggml_view_3d(self.ctx, cache, D, H, CELLS, row, row * H as usize, 0);
                sys::ggml_permute(self.ctx, v, 0, 2, 1, 3)
            }
        }

        /// llama.cpp's view of a transposed V cache: [cells, D, H].
        fn v_trans_view(&self, cache: *mut sys::ggml_tensor) -> *mut sys::ggml_tensor {
            // SAFETY: live tensors in live contexts.
            unsafe {
                let es = sys::ggml_element_size(cache);
                let col = es * CELLS as usize;
                sys::ggml_view_3d(self.ctx, cache, CELLS, D, H, col, col * D as usize, 0)
            }
        }

        fn q(&self) -> *mut sys::ggml_tensor {
            let q = self.input("q", [D, H, N]);
            // SAFETY: live tensor.
            unsafe { sys::ggml_permute(self.ctx, q, 0, 2, 1, 3) }
        }

        /// The KQ mask over `cells` cache cells.
        fn mask(&self, ty: sys::ggml_type, cells: i64) -> *mut sys::ggml_tensor {
            // SAFETY: live context with room left.
            let m = unsafe { sys::ggml_new_tensor_2d(self.ctx, ty, cells, N) };
            Self::name(m, "kq_mask");
            // SAFETY: live tensor.
            unsafe { sys::ggml_set_input(m) };
            m
        }
    }

    impl Drop for Graph {
        fn drop(&mut self) {
            // SAFETY: created in new / alloc_cache, freed once.
            unsafe {
                if !self.cache_buf.is_null() {
                    sys::ggml_backend_buffer_free(self.cache_buf);
                }
                sys::ggml_free(self.cache_ctx);
                sys::ggml_free(self.ctx);
            }
        }
    }

    /// The graph llama.cpp builds for one layer without flash attention (with softcap):
    /// kq = K·Q, SCALE(1/c) → TANH → SCALE(c), softmax(mask, scale), kqv = V·softmax,
    /// permute, cont → `kqv_out-<layer>`.
    struct NoFlash {
        kq: *mut sys::ggml_tensor,
        softmax: *mut sys::ggml_tensor,
        kqv: *mut sys::ggml_tensor,
        kqv_out: *mut sys::ggml_tensor,
        k_view: *mut sys::ggml_tensor,
    }

    fn no_flash(g: &mut Graph, layer: i32, softcap: f32) -> NoFlash {
        let kc = g.cache(&format!("cache_k_l{layer}"), sys::GGML_TYPE_F16, false);
        let vc = g.cache(&format!("cache_v_l{layer}"), sys::GGML_TYPE_F16, true);
        g.alloc_cache();
        // SAFETY: live tensors in live contexts.
        unsafe {
            let k_view = g.kv_view(kc);
            let kq = sys::ggml_mul_mat(g.ctx, k_view, g.q());
            let mut cur = kq;
            if softcap != 0.0 {
                cur = sys::ggml_scale(g.ctx, cur, 1.0 / softcap);
                cur = sys::ggml_tanh(g.ctx, cur);
                cur = sys::ggml_scale(g.ctx, cur, softcap);
            }
            let softmax =
                sys::ggml_soft_max_ext(g.ctx, cur, g.mask(sys::GGML_TYPE_F32, CELLS), 0.125, 0.5);
            let kqv = sys::ggml_mul_mat(g.ctx, g.v_trans_view(vc), softmax);
            let merged = sys::ggml_permute(g.ctx, kqv, 0, 2, 1, 3);
            let kqv_out = sys::ggml_cont(g.ctx, merged);
            Graph::name(kqv_out, &format!("kqv_out-{layer}"));
            NoFlash {
                kq,
                softmax,
                kqv,
                kqv_out,
                k_view,
            }
        }
    }

    #[test]
    fn kqv_out_name_parser() {
        assert_eq!(kqv_out_layer_of_name(b"kqv_out-0"), Some(0));
        assert_eq!(kqv_out_layer_of_name(b"kqv_out-17"), Some(17));
        assert_eq!(kqv_out_layer_of_name(b"kqv_out-"), None);
        assert_eq!(kqv_out_layer_of_name(b"kqv_out-3 (reshaped)"), None);
        assert_eq!(kqv_out_layer_of_name(b"kqv_out-x"), None);
        assert_eq!(kqv_out_layer_of_name(b"kqv_out"), None);
        assert_eq!(kqv_out_layer_of_name(b"kqv-3"), None);
        assert_eq!(kqv_out_layer_of_name(b"kqv_out--1"), None);
    }

    #[test]
    fn kqv_out_layer_of_nodes() {
        let g = Graph::new();
        let t = g.input("kqv_out-5", [4, 1, 1]);
        let view = g.input("kqv_out-5 (reshaped)", [4, 1, 1]);
        let other = g.input("attn_out-5", [4, 1, 1]);
        // SAFETY: live tensors.
        unsafe {
            assert_eq!(kqv_out_layer(&*t), Some(5));
            assert_eq!(kqv_out_layer(&*view), None);
            assert_eq!(kqv_out_layer(&*other), None);
            assert_eq!(tensor_name(&*t), "kqv_out-5");
            assert_eq!(name_bytes(&*t), b"kqv_out-5");
        }
    }

    #[test]
    fn layer_hints() {
        assert_eq!(layer_hint_of_name("cache_k_l3"), Some(3));
        assert_eq!(layer_hint_of_name("cache_v_l12 (view)"), Some(12));
        assert_eq!(layer_hint_of_name("cache_k_l"), None);
        assert_eq!(layer_hint_of_name("kq_mask"), None);
        // The last `_l` counts.
        assert_eq!(layer_hint_of_name("my_lx_cache_k_l7"), Some(7));

        let mut g = Graph::new();
        let kc = g.cache("cache_k_l9", sys::GGML_TYPE_F32, false);
        g.alloc_cache();
        let view = g.kv_view(kc);
        // SAFETY: live tensors.
        unsafe {
            assert_eq!(source_layer_hint(view), Some(9));
            assert_eq!(source_layer_hint(ptr::null()), None);
            assert_eq!(view_base(view), kc as *const _);
        }
    }

    #[test]
    fn kv_views_are_views_of_allocated_non_input_leaves() {
        let mut g = Graph::new();
        let kc = g.cache("cache_k_l0", sys::GGML_TYPE_F32, false);
        g.alloc_cache();
        let view = g.kv_view(kc);
        let q = g.q();
        let mask = g.mask(sys::GGML_TYPE_F32, CELLS);
        // SAFETY: live tensors.
        unsafe {
            assert!(is_kv_view(view));
            assert!(!is_kv_view(kc), "the cache itself is not a view");
            assert!(!is_kv_view(q), "a view of an unallocated node");
            assert!(!is_kv_view(mask));
            assert!(!is_kv_view(ptr::null()));
            sys::ggml_backend_buffer_set_usage(g.cache_buf, sys::GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
            assert!(!is_kv_view(view), "weights are not the cache");
        }
    }

    #[test]
    fn flash_attn_node() {
        let mut g = Graph::new();
        let kc = g.cache("cache_k_l4", sys::GGML_TYPE_F16, false);
        let vc = g.cache("cache_v_l4", sys::GGML_TYPE_F16, false);
        g.alloc_cache();
        // SAFETY: live tensors in live contexts.
        unsafe {
            let (k, v) = (g.kv_view(kc), g.kv_view(vc));
            let fa = sys::ggml_flash_attn_ext(
                g.ctx,
                g.q(),
                k,
                v,
                g.mask(sys::GGML_TYPE_F16, CELLS),
                0.25,
                0.5,
                30.0,
            );
            let p = flash_attn_params(&*fa).expect("a FLASH_ATTN_EXT node");
            assert_eq!((p.scale, p.max_bias, p.softcap), (0.25, 0.5, 30.0));
            assert_eq!(source_layer_hint((*fa).src[1]), Some(4));
            assert_eq!(op_name((*fa).op), "FLASH_ATTN_EXT");
            assert!(!is_kv_mul_mat(&*fa));
            assert!(mixed_attn_params(fa).is_none());
            assert!(flash_attn_params(&*k).is_none());
        }
    }

    #[test]
    fn kq_softmax_kqv_chain() {
        let mut g = Graph::new();
        let nf = no_flash(&mut g, 2, 50.0);
        // SAFETY: live tensors.
        unsafe {
            assert!(is_kv_mul_mat(&*nf.kq));
            assert!(is_kv_mul_mat(&*nf.kqv));
            assert!(!is_kv_mul_mat(&*nf.softmax));
            assert_eq!(source_layer_hint((*nf.kq).src[0]), Some(2));
            assert_eq!((*nf.kq).src[0], nf.k_view);
            // The softmax reaches kq through SCALE → TANH → SCALE.
            let kq = nf.kq as *const sys::ggml_tensor;
            assert_eq!(kq_ancestor(nf.softmax, |t| t == kq), Some(kq));
            assert_eq!(kq_ancestor(nf.softmax, |_| false), None);
            // 0.125 * 50 tanh(kq / 50) = 6.25 tanh(kq * 0.125 / 6.25): the softmax's
            // own scale multiplies the capped scores, so it scales the softcap.
            let p = softmax_params(nf.softmax);
            assert_eq!((p.scale, p.max_bias, p.softcap), (0.125, 0.5, 6.25));
            assert_eq!(softcap_before(nf.softmax), 50.0);
            // kqv_out (cont of a permute of kqv) reaches kqv through layout ops.
            assert_eq!(kqv_out_layer(&*nf.kqv_out), Some(2));
            let kqv = nf.kqv as *const sys::ggml_tensor;
            assert_eq!(attention_feeding(nf.kqv_out, |t| t == kqv), Some(kqv));
            assert_eq!(attention_feeding(nf.kqv_out, |_| false), None);
        }
    }

    #[test]
    fn softmax_without_softcap() {
        let mut g = Graph::new();
        let nf = no_flash(&mut g, 0, 0.0);
        // SAFETY: live tensors.
        unsafe {
            assert_eq!((*nf.softmax).src[0], nf.kq);
            assert_eq!(softcap_before(nf.softmax), 0.0);
            let kq = nf.kq as *const sys::ggml_tensor;
            assert_eq!(kq_ancestor(nf.softmax, |t| t == kq), Some(kq));
        }
    }

    /// Grok (no flash attention): kq → SCALE(out_scale / 30) → TANH → SCALE(30) →
    /// softmax with scale 1. The effective scale is out_scale, the softcap 30.
    #[test]
    fn grok_scale_chain() {
        let mut g = Graph::new();
        let kc = g.cache("cache_k_l1", sys::GGML_TYPE_F16, false);
        g.alloc_cache();
        let out_scale = 0.088_388_35_f32;
        // SAFETY: live tensors in live contexts.
        unsafe {
            let kq = sys::ggml_mul_mat(g.ctx, g.kv_view(kc), g.q());
            let cur = sys::ggml_scale(g.ctx, kq, out_scale / 30.0);
            let cur = sys::ggml_tanh(g.ctx, cur);
            let cur = sys::ggml_scale(g.ctx, cur, 30.0);
            let sm =
                sys::ggml_soft_max_ext(g.ctx, cur, g.mask(sys::GGML_TYPE_F32, CELLS), 1.0, 0.0);
            let p = softmax_params(sm);
            assert!(
                (p.scale / out_scale - 1.0).abs() < 1e-6,
                "scale {}",
                p.scale
            );
            assert_eq!((p.max_bias, p.softcap), (0.0, 30.0));
            // A plain SCALE chain (no TANH) folds into the scale.
            let cur = sys::ggml_scale(g.ctx, kq, 0.5);
            let cur = sys::ggml_scale(g.ctx, cur, 0.25);
            let sm = sys::ggml_soft_max_ext(g.ctx, cur, ptr::null_mut(), 2.0, 0.0);
            let p = softmax_params(sm);
            assert_eq!((p.scale, p.softcap), (0.25, 0.0));
            // A SCALE with a bias is no scale: the chain stops there.
            let cur = sys::ggml_scale_bias(g.ctx, kq, 0.5, 1.0);
            let sm = sys::ggml_soft_max_ext(g.ctx, cur, ptr::null_mut(), 2.0, 0.0);
            assert_eq!(softmax_params(sm).scale, 2.0);
        }
    }

    unsafe extern "C" fn noop(
        _dst: *mut sys::ggml_tensor,
        _ith: std::ffi::c_int,
        _nth: std::ffi::c_int,
        _user: *mut std::ffi::c_void,
    ) {
    }

    #[test]
    fn mixed_attention_node() {
        let mut g = Graph::new();
        let kh = g.cache("cache_k_l6", sys::GGML_TYPE_F16, false);
        let vh = g.cache("cache_v_l6", sys::GGML_TYPE_F16, false);
        let kc = g.cache("cache_k_cold_l6", sys::GGML_TYPE_Q8_0, false);
        let vc = g.cache("cache_v_cold_l6", sys::GGML_TYPE_Q8_0, false);
        g.alloc_cache();
        // SAFETY: live tensors in live contexts.
        unsafe {
            let Some(node) = ggml_trace_sys::mixed_attn(
                g.ctx,
                g.q(),
                g.kv_view(kh),
                g.kv_view(vh),
                g.kv_view(kc),
                g.kv_view(vc),
                g.mask(sys::GGML_TYPE_F16, 2 * CELLS),
                0.25,
                0.0,
                20.0,
            ) else {
                eprintln!(
                    "skipped: this llama.cpp tree has no mixed KV cache ({})",
                    ggml_trace_sys::FEATURES
                );
                return;
            };
            assert!(!node.is_null());
            let p = mixed_attn_params(node).expect("the mixed attention node");
            assert_eq!((p.scale, p.max_bias, p.softcap), (0.25, 0.0, 20.0));
            assert_eq!(source_layer_hint((*node).src[1]), Some(6));
            for (i, role) in MIXED_ROLES.iter().enumerate() {
                assert!(!(*node).src[i].is_null(), "source {i} ({role})");
            }
            assert!(flash_attn_params(&*node).is_none());
            // Another CUSTOM node is not it.
            let mut args = [g.q()];
            let other = sys::ggml_custom_4d(
                g.ctx,
                sys::GGML_TYPE_F32,
                D,
                1,
                1,
                1,
                args.as_mut_ptr(),
                1,
                Some(noop),
                1,
                ptr::null_mut(),
            );
            assert_eq!((*other).op, sys::GGML_OP_CUSTOM);
            assert!(mixed_attn_params(other).is_none());
            assert!(mixed_attn_params(g.q()).is_none());
        }
    }

    #[test]
    fn unrotation_mul_mat() {
        let mut g = Graph::new();
        let nf = no_flash(&mut g, 3, 0.0);
        // SAFETY: live tensors in live contexts.
        unsafe {
            // rot (an input) · reshape(kqv_out), marked as a Hadamard rotation
            let rot = g.input("attn_rot", [D, D, 1]);
            sys::ggml_set_input(rot);
            let reshaped = sys::ggml_reshape_2d(g.ctx, nf.kqv_out, D, H * N);
            let unrot = sys::ggml_mul_mat(g.ctx, rot, reshaped);
            // Without llama.cpp's hint it is some other product.
            assert_eq!(unrotation_of(unrot), None);
            sys::ggml_mul_mat_set_hint(unrot, sys::GGML_HINT_SRC0_IS_HADAMARD);
            assert_eq!(unrotation_of(unrot), Some(3));
            assert_eq!(unrotated_kqv_out(unrot), nf.kqv_out as *const _);
            // Not with a weight (non-input) first source, nor for kq itself.
            let w = g.input("wo", [D, D, 1]);
            let other = sys::ggml_mul_mat(g.ctx, w, reshaped);
            sys::ggml_mul_mat_set_hint(other, sys::GGML_HINT_SRC0_IS_HADAMARD);
            assert_eq!(unrotation_of(other), None);
            assert_eq!(unrotation_of(nf.kq), None);
        }
    }

    /// llama.cpp's `llama_mul_mat_hadamard`: reshape to rows of the rotation's size,
    /// multiply by the rotation (an input), mark it, reshape back.
    unsafe fn hadamard(g: &Graph, cur: *mut sys::ggml_tensor) -> *mut sys::ggml_tensor {
        // SAFETY: live tensors in live contexts.
        unsafe {
            let rot = g.input("attn_inp_k_rot", [D, D, 1]);
            sys::ggml_set_input(rot);
            let n = sys::ggml_nelements(cur) / D;
            let rows = sys::ggml_reshape_2d(g.ctx, cur, D, n);
            let res = sys::ggml_mul_mat(g.ctx, rot, rows);
            sys::ggml_mul_mat_set_hint(res, sys::GGML_HINT_SRC0_IS_HADAMARD);
            sys::ggml_reshape_4d(g.ctx, res, (*cur).ne[0], (*cur).ne[1], (*cur).ne[2], 1)
        }
    }

    /// Rotation as llama.cpp's graph shows it: Q reaches a Hadamard MUL_MAT through the
    /// attention's permute, a V cache write (SET_ROWS) of rotated rows through a view
    /// (and a pad), and neither without the rotation.
    #[test]
    fn rotation_is_read_from_the_graph() {
        let mut g = Graph::new();
        let kc = g.cache("cache_k_l1", sys::GGML_TYPE_Q8_0, false);
        let vc = g.cache("cache_v_l1", sys::GGML_TYPE_Q8_0, false);
        g.alloc_cache();
        // SAFETY: live tensors in live contexts.
        unsafe {
            let q_cur = g.input("Qcur-1", [D, H, N]);
            let v_cur = g.input("Vcur-1", [D, H, N]);
            let (q_rot, v_rot) = (hadamard(&g, q_cur), hadamard(&g, v_cur));
            let idx = sys::ggml_new_tensor_1d(g.ctx, sys::GGML_TYPE_I64, N);
            let write = |cur: *mut sys::ggml_tensor, cache: *mut sys::ggml_tensor| {
                let rows = sys::ggml_view_2d(g.ctx, cur, D * H, N, (*cur).nb[2], 0);
                let padded = sys::ggml_pad(g.ctx, rows, 0, 0, 0, 0);
                sys::ggml_set_rows(g.ctx, cache, padded, idx)
            };
            let wv = write(v_rot, vc);
            assert_eq!(cache_write(wv), Some((vc as *const _, true)));
            let wk = write(v_cur, kc);
            assert_eq!(cache_write(wk), Some((kc as *const _, false)));
            assert_eq!(cache_write(q_rot), None);

            let q = sys::ggml_permute(g.ctx, q_rot, 0, 2, 1, 3);
            assert!(is_rotated(q));
            assert!(!is_rotated(g.q()));
            assert!(!is_rotated(ptr::null()));
            let (k, v) = (g.kv_view(kc), g.kv_view(vc));
            let v16 = sys::ggml_cast(g.ctx, v, sys::GGML_TYPE_F16);
            assert_eq!(cache_base(v16), Some(vc as *const _));
            assert_ne!(cache_base(q), Some(vc as *const _));
            let fa = sys::ggml_flash_attn_ext(
                g.ctx,
                q,
                k,
                v16,
                g.mask(sys::GGML_TYPE_F16, CELLS),
                0.25,
                0.0,
                0.0,
            );
            assert!(is_attention_node(fa));
            assert_eq!(attention_q_v(fa), (q as *const _, v16 as *const _));
        }
        // Without flash attention: Q is kq's second source, V kqv's first.
        let mut g = Graph::new();
        let nf = no_flash(&mut g, 0, 30.0);
        // SAFETY: live tensors.
        unsafe {
            assert!(is_attention_node(nf.kqv));
            assert!(!is_attention_node(nf.softmax));
            let (q, v) = attention_q_v(nf.kqv);
            assert_eq!(q, (*nf.kq).src[1] as *const _);
            assert_eq!(v, (*nf.kqv).src[0] as *const _);
        }
    }

    #[test]
    fn layouts_of_views() {
        let mut g = Graph::new();
        let kc = g.cache("cache_k_l0", sys::GGML_TYPE_F32, false);
        g.alloc_cache();
        let view = g.kv_view(kc);
        // SAFETY: live tensor.
        let l = layout_of(unsafe { &*view });
        assert_eq!(l.ne, [D as u64, CELLS as u64, H as u64, 1]);
        assert_eq!(l.nb[0], 4);
        assert_eq!(l.nb[1], 4 * (D * H) as u64);
        assert_eq!(l.nb[2], 4 * D as u64);
        assert!(!l.is_contiguous());
        assert!(is_layout_op(sys::GGML_OP_PERMUTE));
        assert!(!is_layout_op(sys::GGML_OP_MUL_MAT));
    }
}
