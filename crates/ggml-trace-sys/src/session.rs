//! Raw declarations of our traced-session C ABI (`csrc/kcm_session.{h,cpp}`), written by
//! hand: keep them in sync with `csrc/kcm_session.h`. The layout of [`kcm_run_info`] is
//! checked on both sides with the same numbers (the `const` assertions below and the
//! `static_assert`s in `csrc/kcm_session.cpp`), so a field added on one side only fails
//! to compile instead of being misread. The safe wrapper is `ggml_trace::session`.

use std::ffi::{c_char, c_void};

use crate::sys;

/// Size of [`kcm_run_info::arch`] (`KCM_NAME_MAX`).
pub const KCM_NAME_MAX: usize = 256;
/// Size of [`kcm_run_info::model_path`] (`KCM_PATH_MAX`).
pub const KCM_PATH_MAX: usize = 4096;

/// Mirrors `kcm_run_info` in csrc/kcm_session.h.
#[repr(C)]
#[allow(non_camel_case_types)]
pub struct kcm_run_info {
    pub n_layer: i32,
    pub n_head: i32,
    pub n_head_kv: i32,
    pub n_ctx: u32,
    pub n_batch: u32,
    pub n_ubatch: u32,
    pub n_predict: i32,
    pub seed: u32,
    /// 1: the context uses flash attention, 0: it does not, else auto.
    pub flash_attn: i32,
    /// ggml_type of the K cache.
    pub type_k: i32,
    /// ggml_type of the V cache.
    pub type_v: i32,
    pub n_prompt_tokens: i32,
    pub arch: [c_char; KCM_NAME_MAX],
    pub model_path: [c_char; KCM_PATH_MAX],
    /// 1: `--mixed-kv-cache`.
    pub mixed_kv_cache: i32,
    pub mixed_hot_window: u32,
    /// ggml_type of the mixed cache's cold store.
    pub mixed_cold_type: i32,
    /// Bytes of the context's KV buffers (`llama_memory_buffer_size`).
    pub kv_buffer_bytes: u64,
    /// Threads of single-token graph computations (`llama_n_threads`).
    pub n_threads: i32,
    /// Threads of batched ones (`llama_n_threads_batch`).
    pub n_threads_batch: i32,
    /// ggml_type of an iSWA model's window-layer cache (`--mixed-swa-type`); -1: `-ctk`/`-ctv`.
    pub mixed_swa_type: i32,
}

// The same numbers as the static_asserts in csrc/kcm_session.cpp.
const _: () = {
    use std::mem::{align_of, offset_of, size_of};
    assert!(size_of::<kcm_run_info>() == 4440);
    assert!(align_of::<kcm_run_info>() == 8);
    assert!(offset_of!(kcm_run_info, n_layer) == 0);
    assert!(offset_of!(kcm_run_info, n_head) == 4);
    assert!(offset_of!(kcm_run_info, n_head_kv) == 8);
    assert!(offset_of!(kcm_run_info, n_ctx) == 12);
    assert!(offset_of!(kcm_run_info, n_batch) == 16);
    assert!(offset_of!(kcm_run_info, n_ubatch) == 20);
    assert!(offset_of!(kcm_run_info, n_predict) == 24);
    assert!(offset_of!(kcm_run_info, seed) == 28);
    assert!(offset_of!(kcm_run_info, flash_attn) == 32);
    assert!(offset_of!(kcm_run_info, type_k) == 36);
    assert!(offset_of!(kcm_run_info, type_v) == 40);
    assert!(offset_of!(kcm_run_info, n_prompt_tokens) == 44);
    assert!(offset_of!(kcm_run_info, arch) == 48);
    assert!(offset_of!(kcm_run_info, model_path) == 304);
    assert!(offset_of!(kcm_run_info, mixed_kv_cache) == 4400);
    assert!(offset_of!(kcm_run_info, mixed_hot_window) == 4404);
    assert!(offset_of!(kcm_run_info, mixed_cold_type) == 4408);
    assert!(offset_of!(kcm_run_info, kv_buffer_bytes) == 4416);
    assert!(offset_of!(kcm_run_info, n_threads) == 4424);
    assert!(offset_of!(kcm_run_info, n_threads_batch) == 4428);
    assert!(offset_of!(kcm_run_info, mixed_swa_type) == 4432);
};

/// An opaque `kcm_session`.
#[repr(C)]
#[allow(non_camel_case_types)]
pub struct kcm_session {
    _private: [u8; 0],
}

/// `kcm_step_cb`: called before each `llama_decode` with the step number and the batch's
/// tokens and positions; return 0 to stop before this step.
#[allow(non_camel_case_types)]
pub type kcm_step_cb = unsafe extern "C" fn(*mut c_void, u32, *const i32, *const i32, i32) -> i32;

/// `kcm_output_cb`: called after each step with the step, the sampler's choice (-1: none)
/// and the logits of the step's last token (null, 0 when none); return 0 to stop.
#[allow(non_camel_case_types)]
pub type kcm_output_cb = unsafe extern "C" fn(*mut c_void, u32, i32, *const f32, i32) -> i32;

/// `kcm_replay`: the steps of an earlier trace to decode instead of the prompt and
/// sampled tokens (see csrc/kcm_session.h).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct kcm_replay {
    pub tokens: *const i32,
    pub n_tokens: *const i32,
    pub n_steps: i32,
    pub n_prompt_tokens: i32,
}

extern "C" {
    /// See csrc/kcm_session.h.
    #[allow(clippy::too_many_arguments)]
    pub fn kcm_session_create(
        argc: i32,
        argv: *const *const c_char,
        cb: sys::ggml_backend_sched_eval_callback,
        cb_user: *mut c_void,
        verbose: i32,
        replay: *const kcm_replay,
        err: *mut c_char,
        err_len: usize,
        usage_error: *mut i32,
    ) -> *mut kcm_session;
    /// See csrc/kcm_session.h.
    pub fn kcm_session_info(s: *const kcm_session, out: *mut kcm_run_info);
    /// See csrc/kcm_session.h.
    pub fn kcm_session_prompt_tokens(s: *const kcm_session, out: *mut i32, cap: i32) -> i32;
    /// See csrc/kcm_session.h.
    #[allow(clippy::too_many_arguments)]
    pub fn kcm_session_run(
        s: *mut kcm_session,
        prefill_only: i32,
        want_logits: i32,
        on_step: Option<kcm_step_cb>,
        on_output: Option<kcm_output_cb>,
        user: *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
    /// See csrc/kcm_session.h.
    pub fn kcm_session_generated_text(s: *mut kcm_session) -> *const c_char;
    /// See csrc/kcm_session.h.
    pub fn kcm_session_free(s: *mut kcm_session);
    /// See csrc/kcm_session.h.
    pub fn kcm_session_threadpool(
        s: *mut kcm_session,
        n_threads: *mut i32,
    ) -> *mut sys::ggml_threadpool;
}
