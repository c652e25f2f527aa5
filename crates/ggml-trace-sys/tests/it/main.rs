//! ggml-trace-sys's integration tests in one binary (one link of llama.cpp): the FFI
//! itself, ggml as the oracle for our dequantization, llama.cpp's common through the shim,
//! and the mixed attention kernel.
//! One binary per crate, as ripgrep does (`tests/integration/`): each file below is a
//! module; shared helpers live in the `test-support` crate.

mod ggml_ffi;
mod ggml_oracle;
mod kernel_model;
mod layout_guard;
mod llama_ffi;
mod mixed_attn;
mod tree_enums;
mod unfused_ambiguity;
