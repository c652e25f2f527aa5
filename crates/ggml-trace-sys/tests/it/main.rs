//! ggml-trace-sys's integration tests in one binary (one link of llama.cpp): the FFI
//! itself, ggml as the oracle for our dequantization, llama.cpp's common through the shim,
//! and the mixed attention kernel.
//! One binary per crate, as ripgrep does (`tests/integration/`): each file below is a
//! module; shared helpers live in the `test-support` crate.

mod cmake_plan;
mod ggml_ffi;
mod ggml_oracle;
mod kernel_model;
mod layout_guard;
mod llama_ffi;
// Needs the mixed KV cache (vendor/patches 0001): compiled only when the tree has it.
#[cfg(kcm_mixed_kv)]
mod mixed_attn;
mod source_lists;
mod tree_enums;
mod unfused_ambiguity;

/// On a tree without the mixed KV cache the `mixed_attn` module is not compiled; this says
/// so in the test output instead of passing silently.
#[cfg(not(kcm_mixed_kv))]
#[test]
fn mixed_attn_skipped() {
    const { assert!(!ggml_trace_sys::MIXED_KV_CACHE) };
    eprintln!(
        "skipped: mixed_attn (this llama.cpp tree has no mixed KV cache: {})",
        ggml_trace_sys::FEATURES
    );
}

/// The detected feature agrees with the cfg it comes from.
#[test]
fn mixed_kv_feature_matches_cfg() {
    assert_eq!(ggml_trace_sys::MIXED_KV_CACHE, cfg!(kcm_mixed_kv));
    let expected = if cfg!(kcm_mixed_kv) {
        "mixed-kv-cache"
    } else {
        "no mixed-kv-cache"
    };
    assert_eq!(ggml_trace_sys::FEATURES, expected);
    assert!(ggml_trace_sys::tree_summary().contains(ggml_trace_sys::LLAMA_CPP_DIR));
}
