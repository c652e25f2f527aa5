//! The tensor capture engine over llama.cpp: a traced run ([`session`]) whose eval
//! callback ([`capture`]) finds each layer's attention in the graph and hands it to a
//! [`capture::CaptureSink`], with the facts about the run in [`run_info`].
//!
//! llama.cpp itself, the raw bindings, the C shims and ggml's dequantization live in
//! the `ggml-trace-sys` crate; the items re-exported below keep their old paths
//! (`ggml_trace::sys`, `ggml_trace::dequant`, ...).
//!
//! Prepare the source tree first: `cargo xtask build-llama` (docs/build.md).

pub mod capture;
mod fatal;
mod pool_hash;
pub mod rpc;
pub mod run_info;
pub mod session;

pub use ggml_trace_sys::{
    cpu_simd, dequant, llama_version, shim, skip_without_mixed_kv, sys, system_info, tree_summary,
    FEATURES, LLAMA_CPP_DIR, MIXED_KV_CACHE,
};
