//! GGUF metadata keys of a trace (docs/trace-format.md describes each).

/// The seed tools' keys, kept so their scripts keep working.
pub const DESCRIPTION: &str = "kqv_trace.description";
pub const TOTAL_STEPS: &str = "kqv_trace.total_steps";
pub const TARGET_LAYER: &str = "kqv_trace.target_layer";
pub const TRACE_SOURCES: &str = "kqv_trace.trace_sources";
pub const TENSOR_COUNT: &str = "kqv_trace.tensor_count";

pub const FORMAT_VERSION: &str = "kqv_trace.format_version";
pub const COMPLETE: &str = "kqv_trace.complete";

pub const RUN_MODEL_PATH: &str = "kqv_trace.run.model_path";
pub const RUN_MODEL_SHA256: &str = "kqv_trace.run.model_sha256";
pub const RUN_ARCHITECTURE: &str = "kqv_trace.run.architecture";
pub const RUN_N_LAYER: &str = "kqv_trace.run.n_layer";
pub const RUN_N_HEAD: &str = "kqv_trace.run.n_head";
pub const RUN_N_HEAD_KV: &str = "kqv_trace.run.n_head_kv";
pub const RUN_CACHE_TYPE_K: &str = "kqv_trace.run.cache_type_k";
pub const RUN_CACHE_TYPE_V: &str = "kqv_trace.run.cache_type_v";
pub const RUN_FLASH_ATTN: &str = "kqv_trace.run.flash_attn";
pub const RUN_KV_ROTATION: &str = "kqv_trace.run.kv_rotation";
/// Per layer (index = layer), INT8: 1 if llama.cpp rotated Q and K (V) by a Hadamard
/// matrix in that layer, as the graph showed it, 0 if not, -1 if the layer was not
/// traced. Absent from traces written before rotation was recorded.
pub const RUN_ROTATED_K: &str = "kqv_trace.run.rotated_k";
pub const RUN_ROTATED_V: &str = "kqv_trace.run.rotated_v";
pub const RUN_MIXED_KV_CACHE: &str = "kqv_trace.run.mixed_kv_cache";
/// STRING, with `mixed_kv_cache` on an iSWA model: the ggml type of the sliding-window
/// layers' K and V cache (`--mixed-swa-type`), which then differs from `cache_type_k`/`_v`
/// (the hot store's F16). Optional (absent: the window layers use `cache_type_k`/`_v`).
pub const RUN_MIXED_SWA_TYPE: &str = "kqv_trace.run.mixed_swa_type";
pub const RUN_N_CTX: &str = "kqv_trace.run.n_ctx";
pub const RUN_N_BATCH: &str = "kqv_trace.run.n_batch";
pub const RUN_N_UBATCH: &str = "kqv_trace.run.n_ubatch";
pub const RUN_N_PREDICT: &str = "kqv_trace.run.n_predict";
pub const RUN_SEED: &str = "kqv_trace.run.seed";
pub const RUN_PROMPT_TOKENS: &str = "kqv_trace.run.prompt_tokens";
pub const RUN_LLAMA_VERSION: &str = "kqv_trace.run.llama_version";
/// The SIMD ggml-cpu was built with (`avx2 fma f16c`, ...). Optional.
pub const RUN_CPU_SIMD: &str = "kqv_trace.run.cpu_simd";
/// Encoder-decoder models: how many decoder layers' cross-attention is recorded, each as
/// layer `n_layer + il` (decoder layer `il`), after the self-attention layers. Optional
/// (absent: 0, no cross-attention).
pub const RUN_N_CROSS_LAYER: &str = "kqv_trace.run.n_cross_layer";
/// What the cross-attention records ran (`on`: FLASH_ATTN_EXT, `off`: the softmax path),
/// which can differ from `run.flash_attn` (T5: llama.cpp refuses flash attention for
/// the self-attention, which adds a position bias, and not for cross-attention).
/// Present only with `n_cross_layer`.
pub const RUN_CROSS_FLASH_ATTN: &str = "kqv_trace.run.cross_flash_attn";

/// Per step (index = step): token count; positions and tokens concatenated.
pub const STEP_N_TOKENS: &str = "kqv_trace.step.n_tokens";
pub const STEP_POSITIONS: &str = "kqv_trace.step.positions";
pub const STEP_TOKENS: &str = "kqv_trace.step.tokens";
/// Per step (index = step), INT32: the token the run's sampler chose from the step's
/// output (in a replay its own choice, not the token decoded next); -1 where it did not
/// choose. Optional (absent from traces written before it was recorded).
pub const STEP_SAMPLED: &str = "kqv_trace.step.sampled";
/// The trace whose steps the run decoded again (`--replay`, the analyzer's default), as
/// the user named it. Optional (absent: the run decoded its own prompt and samples).
pub const RUN_REPLAYED_FROM: &str = "kqv_trace.run.replayed_from";
/// ARRAY[STRING]: the RPC servers (`host:port`) of `--rpc`, in llama.cpp's device order.
/// Optional (absent: a local run).
pub const RUN_RPC_ENDPOINTS: &str = "kqv_trace.run.rpc_endpoints";
/// ARRAY[STRING]: the `--tensor-filter` patterns, as given (each anchored at the start of a
/// node's name). Optional (absent: attention only, no nodes traced).
pub const RUN_TENSOR_FILTER: &str = "kqv_trace.run.tensor_filter";
/// ARRAY[UINT64]: per step (index = step), the bytes the capture read from RPC servers'
/// memory (`ggml_backend_tensor_get`). Optional (absent: a local run, or not counted).
pub const RUN_RPC_READ_BYTES: &str = "kqv_trace.run.rpc_read_bytes";

/// Per tensor, parallel to the tensor table.
pub const TENSOR_ROLE: &str = "kqv_trace.tensor.role";
pub const TENSOR_LAYER: &str = "kqv_trace.tensor.layer";
pub const TENSOR_STEP: &str = "kqv_trace.tensor.step";
pub const TENSOR_GGML_NAME: &str = "kqv_trace.tensor.ggml_name";
pub const TENSOR_OP: &str = "kqv_trace.tensor.op";
/// Four original byte strides per tensor, concatenated.
pub const TENSOR_NB: &str = "kqv_trace.tensor.nb";
pub const TENSOR_VIEW_OF: &str = "kqv_trace.tensor.view_of";
/// Per tensor, INT32: the position in the step's graph (ggml's node order, 0 = the first
/// node the scheduler evaluated) of the node at whose evaluation the tensor was read: the
/// node itself for role `node` and for outputs, the consuming op for attention inputs;
/// -1 when unknown (logits, tensors of older writers). Optional (absent in older traces).
pub const TENSOR_GRAPH_ORDER: &str = "kqv_trace.tensor.graph_order";

/// Per traced attention (one per step and layer).
pub const ATTN_STEP: &str = "kqv_trace.attn.step";
pub const ATTN_LAYER: &str = "kqv_trace.attn.layer";
pub const ATTN_OP: &str = "kqv_trace.attn.op";
pub const ATTN_SCALE: &str = "kqv_trace.attn.scale";
pub const ATTN_MAX_BIAS: &str = "kqv_trace.attn.max_bias";
pub const ATTN_SOFTCAP: &str = "kqv_trace.attn.softcap";
/// The backend buffer the attention op's output lived in (`CPU`, ...): which backend ran
/// it. Optional (older traces lack it: the kernel is then unknown).
pub const ATTN_BACKEND: &str = "kqv_trace.attn.backend";
/// The threads the step's graph was computed with (0: unknown). Optional.
pub const ATTN_N_THREADS: &str = "kqv_trace.attn.n_threads";

/// Format version 2 (`--kv-storage delta`, the default): how each tensor is stored.
/// Per tensor, parallel to the tensor table (docs/trace-format.md, "Storage"): the
/// tensor's own ggml type id (UINT32) and four `ne` (UINT64, concatenated), which the
/// GGUF tensor of a delta does not say.
pub const TENSOR_TYPE: &str = "kqv_trace.tensor.type";
pub const TENSOR_NE: &str = "kqv_trace.tensor.ne";
/// Per tensor, INT32: index in the tensor table of the earlier tensor this one is
/// stored against (a delta), or -1 when it is stored whole.
pub const TENSOR_BASE: &str = "kqv_trace.tensor.base";
/// Per tensor, UINT32: how many changed byte ranges it has in `kqv_trace.tensor.ranges`
/// (0 for a whole tensor, and for a delta equal to its base).
pub const TENSOR_N_RANGES: &str = "kqv_trace.tensor.n_ranges";
/// UINT64 (offset, length) pairs, every tensor's ranges concatenated in table order;
/// offsets in the tensor's logical contiguous bytes.
pub const TENSOR_RANGES: &str = "kqv_trace.tensor.ranges";
