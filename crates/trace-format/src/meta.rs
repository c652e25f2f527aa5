//! What a trace records: the run, each step, each traced tensor.

use gguf_io::GgmlType;

use crate::layout::TensorLayout;

/// What a traced tensor is to attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// The layer's attention output `kqv_out-<layer>` (what the seed tools watched).
    KqvOut,
    /// The attention op's own result (FLASH_ATTN_EXT output, or `kqv` without flash
    /// attention), before the reshape/permute that makes `kqv_out`.
    Attn,
    Q,
    K,
    V,
    Mask,
    Sinks,
    /// Without flash attention: the scores `kq = K·Q` before the softmax.
    Kq,
    /// Without flash attention: the softmax output.
    KqSoftMax,
    /// Mixed KV cache: the quantized (cold) K and V stores.
    KQuant,
    VQuant,
    /// With a rotated (quantized) cache, `kqv_out` is in the rotated V basis; this is
    /// llama.cpp's next result, rotated back, in `kqv_out`'s shape: the tensor to compare
    /// with an unrotated (F16-cache) run's `kqv_out`.
    KqvOutUnrotated,
    /// Absorbed multi-head latent attention (DeepSeek-V2/V3 and kin): the weight
    /// `attn_v_b` (`[D_latent, D_v, H]`) of the MUL_MAT between the attention op and
    /// `kqv_out`, which "decompresses" the latent result per head: kqv_out = W · attn.
    VMla,
    /// Without flash attention: an additive score bias, the second operand of an `ADD`
    /// onto `kq` between the `kq` MUL_MAT and the softmax (T5's relative-position bias
    /// `kq_b`), `[n_kv, T, H, S]` or broadcast to it like ggml's ADD.
    KqBias,
    /// Not attention: a step's output logits (llama.cpp's `result_output` row for the
    /// step's last token, F32 `[n_vocab]`), layer -1, when the run captured them
    /// (`--logits`). Readers keep them apart from the attention tensors
    /// ([`TraceFile::logits`](crate::TraceFile::logits)).
    Logits,
    /// Not attention: a graph node matched by `--tensor-filter`, keyed by its ggml name
    /// (which can repeat in a graph: the k-th node of a name in a step is its
    /// occurrence k), layer from the name's `-<layer>` suffix (-1 without one). Readers
    /// keep them apart from the attention tensors
    /// ([`TraceFile::nodes`](crate::TraceFile::nodes)).
    Node,
}

impl Role {
    pub const ALL: [Role; 16] = [
        Role::KqvOut,
        Role::Attn,
        Role::Q,
        Role::K,
        Role::V,
        Role::Mask,
        Role::Sinks,
        Role::Kq,
        Role::KqSoftMax,
        Role::KQuant,
        Role::VQuant,
        Role::KqvOutUnrotated,
        Role::VMla,
        Role::KqBias,
        Role::Logits,
        Role::Node,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Role::KqvOut => "kqv_out",
            Role::Attn => "attn",
            Role::Q => "q",
            Role::K => "k",
            Role::V => "v",
            Role::Mask => "mask",
            Role::Sinks => "sinks",
            Role::Kq => "kq",
            Role::KqSoftMax => "kq_soft_max",
            Role::KQuant => "k_quant",
            Role::VQuant => "v_quant",
            Role::KqvOutUnrotated => "kqv_out_unrotated",
            Role::VMla => "v_mla",
            Role::KqBias => "kq_bias",
            Role::Logits => "logits",
            Role::Node => "node",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.name() == s)
    }

    /// The seed's `src<i>` index: the source slot of the attention op this input fills
    /// (FLASH_ATTN_EXT order: q, k, v, mask, sinks; the mixed op: q, k, v, k_quant,
    /// v_quant, mask). `None` for outputs and intermediates.
    pub fn src_index(self, mixed: bool) -> Option<usize> {
        match (self, mixed) {
            (Role::Q, _) => Some(0),
            (Role::K, _) => Some(1),
            (Role::V, _) => Some(2),
            (Role::Mask, false) => Some(3),
            (Role::Sinks, false) => Some(4),
            (Role::KQuant, true) => Some(3),
            (Role::VQuant, true) => Some(4),
            (Role::Mask, true) => Some(5),
            _ => None,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The layer a graph node's name carries: the number after its last `-` (llama.cpp's
/// `name-<layer>`: `ffn_out-7` → 7, `Qcur-0 (view)` → 0) or `_l` (the KV cache's
/// `cache_k_l<layer>`), when the name up to its first space (ggml appends ` (view)`,
/// ` (permuted)` to views) ends with it; -1 without one (`result_norm`, `inp_embd`,
/// `node_24`).
pub fn node_layer(ggml_name: &str) -> i32 {
    let base = ggml_name.split(' ').next().unwrap_or("");
    let digits = base.trim_end_matches(|c: char| c.is_ascii_digit());
    let number = &base[digits.len()..];
    let tagged =
        (digits.ends_with('-') && digits.len() > 1) || (digits.ends_with("_l") && digits.len() > 2);
    if number.is_empty() || !tagged {
        return -1;
    }
    number.parse().unwrap_or(-1)
}

/// Parameters of the attention op (FLASH_ATTN_EXT `op_params`, or SOFT_MAX's scale and
/// max_bias plus a detected softcap without flash attention).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AttnParams {
    pub scale: f32,
    pub max_bias: f32,
    pub softcap: f32,
}

/// The `op` recorded for the mixed KV cache's attention node (`AttnRecord::op`,
/// `kqv_trace.attn.op`); in ggml it is a `CUSTOM` op whose function is the
/// mixed-attention kernel.
pub const MIXED_ATTN_OP: &str = "MIXED_ATTN";

/// One traced tensor's description. Its data is stored in logical contiguous order
/// (ne0 fastest) in its own ggml type; `layout.nb` are the strides it had in ggml.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorMeta {
    pub role: Role,
    pub layer: i32,
    pub step: u32,
    /// The tensor's ggml name (`kqv_out-0`, `cache_k_l0 (view) (permuted)`, ...).
    pub ggml_name: String,
    /// `ggml_op_name` of the op that produced it (`NONE` for leaves, `VIEW`, `PERMUTE`, ...).
    pub op: String,
    /// Type, shape and the original strides.
    pub layout: TensorLayout,
    /// Name of the tensor it views (`view_src`), empty if it is not a view.
    pub view_of: String,
}

impl TensorMeta {
    pub fn ty(&self) -> GgmlType {
        self.layout.ty
    }
}

/// One `llama_decode` call: a ubatch of the prompt or one generated token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepMeta {
    pub step: u32,
    /// Token positions of the ubatch, in batch order.
    pub positions: Vec<i32>,
    /// The tokens decoded in this step.
    pub tokens: Vec<i32>,
}

/// Facts about the run that produced a trace.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunMeta {
    pub description: String,
    pub model_path: String,
    /// sha256 of the model file, hex.
    pub model_sha256: String,
    pub architecture: String,
    pub n_layer: u32,
    pub n_head: u32,
    pub n_head_kv: u32,
    pub cache_type_k: String,
    pub cache_type_v: String,
    /// `"on"` or `"off"`: what the context really used.
    pub flash_attn: String,
    /// llama.cpp rotates Q/K/V by a Hadamard matrix for quantized caches: whether it did
    /// (in any layer).
    pub kv_rotation: bool,
    /// Per layer (index = layer), as the graph showed it: Q and K rotated; None for a
    /// layer not traced. Empty when not recorded (traces written before these keys):
    /// then [`RunMeta::rotated_k`] falls back to `kv_rotation` and the cache types.
    pub rotated_k_layers: Vec<Option<bool>>,
    /// Per layer: V rotated (so `kqv_out` is in the rotated basis); as above.
    pub rotated_v_layers: Vec<Option<bool>>,
    /// The trace whose steps this run decoded again (`--replay`, the analyzer's default);
    /// empty when the run decoded its own prompt and sampled tokens.
    pub replayed_from: String,
    pub mixed_kv_cache: bool,
    /// With the mixed KV cache on an iSWA model, the type of the sliding-window layers' K
    /// and V cache (`--mixed-swa-type`, e.g. `q4_0`); empty: `cache_type_k`/`cache_type_v`.
    pub mixed_swa_type: String,
    pub n_ctx: u32,
    pub n_batch: u32,
    pub n_ubatch: u32,
    pub n_predict: i32,
    pub seed: u32,
    pub prompt_tokens: Vec<i32>,
    pub llama_version: String,
    /// -1 for all layers.
    pub target_layer: i32,
    pub trace_sources: bool,
    /// False when the run was interrupted (Ctrl-C) and the trace holds what was done.
    pub complete: bool,
    /// The SIMD ggml-cpu was built with (`avx2 fma f16c`, ...): how its kernels round.
    /// Empty when unknown.
    pub cpu_simd: String,
    /// Encoder-decoder models: the number of decoder layers whose cross-attention is
    /// recorded, decoder layer `il`'s as layer `n_layer + il` (0: none).
    pub n_cross_layer: u32,
    /// `on`/`off`: what the cross-attention records ran (empty without cross-attention).
    pub cross_flash_attn: String,
    /// The RPC servers (`host:port`) the run split its model across (`--rpc`), in
    /// llama.cpp's device order; empty for a local run. Which layer's attention ran where
    /// is each attention record's `backend` (`RPC0[host:port]`, ...).
    pub rpc_endpoints: Vec<String>,
    /// The `--tensor-filter` patterns the run traced graph nodes with (role `node`), as
    /// given; empty: attention only.
    pub tensor_filter: Vec<String>,
    /// Per step (index = step): the bytes the capture read from the RPC servers' memory
    /// with `ggml_backend_tensor_get` (remote layers' traced tensors, the written parts of
    /// their K/V views); empty for a local run or when not counted.
    pub rpc_read_bytes: Vec<u64>,
}

/// Whether llama.cpp rotates K (and Q) and V by a Hadamard matrix for these cache types
/// and head sizes (`llama-kv-cache.cpp`): a quantized cache whose head size is a multiple
/// of 64, unless `LLAMA_ATTN_ROT_DISABLE` is set to a non-zero number. Returns (K, V).
pub fn kv_rotation(type_k: GgmlType, type_v: GgmlType, head_k: u64, head_v: u64) -> (bool, bool) {
    let disabled = std::env::var("LLAMA_ATTN_ROT_DISABLE")
        .ok()
        .and_then(|v| v.trim().parse::<i64>().ok())
        .is_some_and(|v| v != 0);
    let rot =
        |ty: GgmlType, head: u64| !disabled && ty.is_quantized() && head > 0 && head % 64 == 0;
    (rot(type_k, head_k), rot(type_v, head_v))
}

/// K and V head sizes from a model's metadata (`<arch>.attention.key_length`,
/// `value_length`, else `embedding_length / head_count`); 0 when unknown.
pub fn model_head_dims(m: &gguf_io::Metadata) -> (u64, u64) {
    let Some(a) = m.get_str("general.architecture") else {
        return (0, 0);
    };
    let get = |k: &str| m.get_u64(&format!("{a}.{k}"));
    let fallback = match (get("embedding_length"), get("attention.head_count")) {
        (Some(e), Some(h)) if h > 0 => e / h,
        _ => 0,
    };
    (
        get("attention.key_length").unwrap_or(fallback),
        get("attention.value_length").unwrap_or(fallback),
    )
}

impl RunMeta {
    /// Whether the trace records rotation per layer (`kqv_trace.run.rotated_k` /
    /// `rotated_v`, from the graph); false for older traces, whose rotation is inferred
    /// from `kv_rotation` and the cache types.
    pub fn rotation_recorded(&self) -> bool {
        !self.rotated_k_layers.is_empty() || !self.rotated_v_layers.is_empty()
    }

    /// The rule older traces are read with: `kv_rotation` and a quantized cache.
    fn inferred(&self, cache_type: &str) -> bool {
        self.kv_rotation && GgmlType::from_name(cache_type).is_some_and(|t| t.is_quantized())
    }

    /// Q and K were rotated in some layer.
    pub fn rotated_k(&self) -> bool {
        if self.rotation_recorded() {
            return self.rotated_k_layers.contains(&Some(true));
        }
        self.inferred(&self.cache_type_k)
    }

    /// V, the attention result and `kqv_out` are in the rotated V basis in some layer.
    pub fn rotated_v(&self) -> bool {
        if self.rotation_recorded() {
            return self.rotated_v_layers.contains(&Some(true));
        }
        self.inferred(&self.cache_type_v)
    }

    /// Q and K were rotated in `layer` (recorded, else inferred).
    pub fn rotated_k_at(&self, layer: i32) -> bool {
        if self.rotation_recorded() {
            return at_layer(&self.rotated_k_layers, layer).unwrap_or(false);
        }
        self.inferred(&self.cache_type_k)
    }

    /// V was rotated in `layer` (recorded, else inferred).
    pub fn rotated_v_at(&self, layer: i32) -> bool {
        if self.rotation_recorded() {
            return at_layer(&self.rotated_v_layers, layer).unwrap_or(false);
        }
        self.inferred(&self.cache_type_v)
    }
}

/// A per-layer entry; None outside the array or for a layer not traced.
fn at_layer(v: &[Option<bool>], layer: i32) -> Option<bool> {
    usize::try_from(layer)
        .ok()
        .and_then(|l| v.get(l).copied())
        .flatten()
}

/// Per-layer facts as the file holds them (INT8: 1, 0, -1 for not traced).
pub fn layer_flags_to_i8(v: &[Option<bool>]) -> Vec<i8> {
    v.iter()
        .map(|x| match x {
            Some(true) => 1,
            Some(false) => 0,
            None => -1,
        })
        .collect()
}

/// A KV-cache view changes little from step to step (a decode step writes one cell and
/// unmasks it in the mask), so the capture keeps each (layer, role)'s last copy, hashes
/// the live memory block by block and gathers again only the rows in blocks whose hash
/// changed (see [`TensorLayout::gather_update`](crate::TensorLayout::gather_update)).
/// This says which bytes changed, so that consumers (the monitor's statistics, the trace
/// writer's spool) can skip the rest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revision {
    /// Unique within a run.
    pub id: u64,
    /// The revision these bytes were compared with (the same layer and role's previous
    /// capture) and the byte ranges that differ from it (sorted, disjoint); every other
    /// byte is equal. `None` when there is nothing to compare with: the first capture, or
    /// the view's type, shape or strides changed.
    pub since: Option<(u64, Vec<std::ops::Range<usize>>)>,
}

#[cfg(test)]
mod tests {
    use super::node_layer;

    #[test]
    fn a_node_layer_is_its_name_suffix() {
        assert_eq!(node_layer("ffn_out-7"), 7);
        assert_eq!(node_layer("Qcur-0 (view) (permuted)"), 0);
        assert_eq!(node_layer("kqv_out-12"), 12);
        assert_eq!(node_layer("cache_k_l3 (view)"), 3);
        for none in [
            "result_norm",
            "inp_embd",
            "node_24",
            "norm",
            "-3",
            "_l4",
            "a-",
            "x-1b",
            "",
        ] {
            assert_eq!(node_layer(none), -1, "{none}");
        }
        // A number must follow the tag right up to the end of the name's first word.
        assert_eq!(node_layer("attn_norm-1x (view)"), -1);
        assert_eq!(node_layer("l_out-99999999999"), -1);
    }
}
