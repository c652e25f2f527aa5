//! Our C shim over llama.cpp's C++ `common` library (`csrc/kcm_shim.{h,cpp}`).
//! The declarations below are written by hand: keep them in sync with
//! `csrc/kcm_shim.h`.

use std::ffi::{c_char, CStr, CString};

/// Size of [`kcm_common_args::model_path`] (`KCM_PATH_MAX`).
pub const KCM_PATH_MAX: usize = 4096;

/// Mirrors `kcm_common_args` in csrc/kcm_shim.h.
#[repr(C)]
#[allow(non_camel_case_types)]
pub struct kcm_common_args {
    pub n_predict: i32,
    pub n_ctx: i32,
    pub n_batch: i32,
    pub n_ubatch: i32,
    pub n_threads: i32,
    pub seed: u32,
    pub model_path: [c_char; KCM_PATH_MAX],
}

extern "C" {
    /// See csrc/kcm_shim.h.
    pub fn kcm_common_params_parse(
        argc: i32,
        argv: *const *const c_char,
        out: *mut kcm_common_args,
    ) -> i32;
    /// See csrc/kcm_shim.h.
    pub fn kcm_common_build_info() -> *const c_char;
    /// llama.cpp's `common_debug_cb_eval` (csrc/kcm_shim.h): an eval callback.
    pub fn kcm_llama_debug_cb(
        t: *mut crate::sys::ggml_tensor,
        ask: bool,
        user_data: *mut std::ffi::c_void,
    ) -> bool;
    /// A new `common_debug_cb_user_data` (every node); NULL on failure.
    pub fn kcm_llama_debug_new() -> *mut std::ffi::c_void;
    /// Frees what [`kcm_llama_debug_new`] returned.
    pub fn kcm_llama_debug_free(user_data: *mut std::ffi::c_void);
}

/// Some of `common_params` after llama.cpp's own argument parser ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommonArgs {
    pub n_predict: i32,
    pub n_ctx: i32,
    pub n_batch: i32,
    pub n_ubatch: i32,
    pub n_threads: i32,
    pub seed: u32,
    pub model_path: String,
}

/// Parses `args` (args[0] is the program name) with llama.cpp's
/// `common_params_parse`. `None` when llama.cpp rejects them (it explains on
/// stderr) or when an argument contains a NUL byte.
///
/// As in llama.cpp's tools, `-h`/`--help` and `--version` print and exit the process.
pub fn parse_common_args<S: AsRef<str>>(args: &[S]) -> Option<CommonArgs> {
    let owned: Vec<CString> = args
        .iter()
        .map(|a| CString::new(a.as_ref()))
        .collect::<Result<_, _>>()
        .ok()?;
    let ptrs: Vec<*const c_char> = owned.iter().map(|c| c.as_ptr()).collect();
    let argc = i32::try_from(ptrs.len()).ok()?;
    let mut out = kcm_common_args {
        n_predict: 0,
        n_ctx: 0,
        n_batch: 0,
        n_ubatch: 0,
        n_threads: 0,
        seed: 0,
        model_path: [0; KCM_PATH_MAX],
    };
    // SAFETY: `ptrs` holds `argc` pointers to NUL-terminated strings that
    // `owned` keeps alive for the call; the shim copies them before parsing
    // and only writes into `out`, a valid, exclusively borrowed struct.
    let ok = unsafe { kcm_common_params_parse(argc, ptrs.as_ptr(), &mut out) };
    if ok != 1 {
        return None;
    }
    // SAFETY: the shim always NUL-terminates model_path (snprintf into a
    // buffer of KCM_PATH_MAX bytes).
    let model_path = unsafe { CStr::from_ptr(out.model_path.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    Some(CommonArgs {
        n_predict: out.n_predict,
        n_ctx: out.n_ctx,
        n_batch: out.n_batch,
        n_ubatch: out.n_ubatch,
        n_threads: out.n_threads,
        seed: out.seed,
        model_path,
    })
}

/// common's build-info string, `b<number>-<commit>` (here `b0-llama-cpp-sys-2 <version>`).
pub fn common_build_info() -> String {
    // SAFETY: returns a pointer to a NUL-terminated std::string buffer with
    // static storage duration, never NULL.
    unsafe { CStr::from_ptr(kcm_common_build_info()) }
        .to_string_lossy()
        .into_owned()
}
