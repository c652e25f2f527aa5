//! Facts about a traced run, shared by [`crate::session`] (which makes them) and
//! [`crate::capture`] (which hands them to the sink), so that neither imports the other.

/// Facts about the run, known before the first decode.
#[derive(Clone, Debug, PartialEq)]
pub struct RunInfo {
    pub n_layer: u32,
    pub n_head: u32,
    pub n_head_kv: u32,
    pub n_ctx: u32,
    pub n_batch: u32,
    pub n_ubatch: u32,
    pub n_predict: i32,
    pub seed: u32,
    /// What was asked for: `Some(true)` on, `Some(false)` off, `None` auto (llama.cpp
    /// decides; the trace records what the graph really did).
    pub flash_attn_requested: Option<bool>,
    pub type_k: gguf_io::GgmlType,
    pub type_v: gguf_io::GgmlType,
    pub architecture: String,
    pub model_path: String,
    pub prompt_tokens: Vec<i32>,
    /// The mixed KV cache's settings, when `--mixed-kv-cache` was given.
    pub mixed: Option<MixedKvInfo>,
    /// Bytes of the context's KV-cache backend buffers (hot and cold stores of a mixed
    /// cache included), from ggml's buffer sizes (`llama_memory_buffer_size`).
    pub kv_buffer_bytes: u64,
    /// Threads llama.cpp computes single-token graphs with (`llama_n_threads`), and
    /// batched ones (`llama_n_threads_batch`): `llama_context::graph_compute` picks the
    /// first for a ubatch of one token, the second otherwise.
    pub n_threads: u32,
    pub n_threads_batch: u32,
    /// The trace whose steps this run replays (`--replay`, the analyzer's default), as
    /// the user named it; `None` when the run decoded its own prompt and samples.
    pub replayed_from: Option<String>,
    /// The RPC servers the run's `--rpc` (or `LLAMA_ARG_RPC`) named, `host:port`, in
    /// llama.cpp's order (devices `RPC0`, `RPC1`, ...); empty without RPC.
    pub rpc_endpoints: Vec<String>,
}

impl RunInfo {
    /// The threads llama.cpp computes a ubatch of `n_tokens` tokens with (the rule of
    /// `llama_context::graph_compute`: batched when `n_tokens > 1`).
    pub fn threads_for(&self, n_tokens: u64) -> u32 {
        if n_tokens > 1 {
            self.n_threads_batch
        } else {
            self.n_threads
        }
    }
}

/// `--mixed-kv-cache` settings of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MixedKvInfo {
    /// Tokens kept in the F16 hot store (`--mixed-hot-window`).
    pub hot_window: u32,
    /// Type of the cold store (`--mixed-cold-type`).
    pub cold_type: gguf_io::GgmlType,
    /// Type of an iSWA model's window-layer K and V cache (`--mixed-swa-type`); `None`:
    /// the run's `-ctk`/`-ctv` (F16 with the mixed cache).
    pub swa_type: Option<gguf_io::GgmlType>,
}

/// How the run went.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunOutcome {
    pub steps: u32,
    /// Stopped early by the sink (Ctrl-C), not by the end of the prompt/generation.
    pub interrupted: bool,
    pub generated_text: String,
    /// What keeping KV-cache views cost (zero without a capture).
    pub capture: crate::capture::CaptureStats,
    /// Bytes the capture read from RPC servers' memory in each step (index = step;
    /// empty without a capture): see [`crate::capture::CaptureStats::remote_read_bytes`].
    pub remote_read_bytes: Vec<u64>,
}
