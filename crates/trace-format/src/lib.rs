//! The kv-cache-monitor trace: what a traced tensor is (role, layer, step, layout), and
//! how a trace is laid out in GGUF. Written by `kqv-trace-monitor`, read by
//! `gguf-reader`, `attn-verify` and `tensor-diff-analyzer`. docs/trace-format.md is the
//! reference.
//!
//! **Step**: step 0 is the first ubatch of the prompt; every later `llama_decode` call
//! (the next prompt ubatch, then each generated token) is one more.

pub mod escape;
pub mod json;
pub mod keys;
pub mod layout;
pub mod materialize;
pub mod meta;
pub mod read;
pub mod stored;
pub mod synth;
pub mod validate;
pub mod write;

pub use escape::escape;
pub use layout::{LayoutError, TensorLayout};
pub use meta::{
    node_layer, AttnParams, Revision, Role, RunMeta, StepMeta, TensorMeta, MIXED_ATTN_OP,
};
pub use read::{TraceFile, TracedTensor};
pub use stored::Stored;
pub use validate::Violation;
pub use write::{
    tensor_name, AttnRecord, KvStorage, TraceWriter, FORMAT_VERSION, FORMAT_VERSION_FULL,
};

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("{0}")]
    Gguf(#[from] gguf_io::GgufError),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("layout: {0}")]
    Layout(#[from] LayoutError),
    #[error("not a kv-cache-monitor trace (no kqv_trace.* keys)")]
    NotATrace,
    #[error("malformed trace: {0}")]
    Format(String),
    /// The validation pass found a file-level contradiction (crate::validate).
    #[error("invalid trace: {0}")]
    Invalid(#[from] Violation),
}
