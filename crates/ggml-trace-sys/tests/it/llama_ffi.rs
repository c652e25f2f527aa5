//! llama and common are linked in and built with the intended CPU flags.

use ggml_trace_sys::{shim, system_info};

#[test]
fn system_info_reports_the_host_simd_and_no_amx() {
    let info = system_info();
    println!("{info}");
    assert!(!info.trim().is_empty());
    assert!(info.contains("CPU"), "{info}");
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        assert!(
            info.contains("AVX2 = 1"),
            "host has AVX2 but ggml-cpu was built without it: {info}"
        );
    }
    // AMX is never compiled in (docs/build.md, llama.cpp issue #20824).
    assert!(!info.contains("AMX"), "{info}");
}

#[test]
fn common_params_parse_runs_llamas_own_parser() {
    let args = shim::parse_common_args(&[
        "kcm", "-m", "x.gguf", "-n", "7", "-c", "128", "-b", "64", "-t", "2",
    ])
    .expect("llama.cpp accepts these arguments");
    assert_eq!(args.model_path, "x.gguf");
    assert_eq!(args.n_predict, 7);
    assert_eq!(args.n_ctx, 128);
    assert_eq!(args.n_batch, 64);
    assert_eq!(args.n_threads, 2);
}

#[test]
fn common_params_parse_rejects_unknown_options() {
    assert_eq!(
        shim::parse_common_args(&["kcm", "-m", "x.gguf", "--no-such-option-kcm"]),
        None
    );
    assert_eq!(shim::parse_common_args(&["kcm", "-n"]), None);
}

#[test]
fn common_build_info_comes_from_the_generated_build_info() {
    let info = shim::common_build_info();
    // b<build number>-<commit>, the commit standing for the tree's origin.
    if ggml_trace_sys::LLAMA_TREE_IS_PINNED {
        assert!(info.starts_with("b0-llama-cpp-sys-2 "), "{info}");
    }
    assert!(info.starts_with('b'), "{info}");
    if ggml_trace_sys::LLAMA_CMAKE_BUILD.is_empty() {
        assert!(info.ends_with(ggml_trace_sys::LLAMA_ORIGIN), "{info}");
    } else {
        // cmake's own build-info.cpp: b<LLAMA_BUILD_NUMBER>-<git commit or `unknown`>.
        eprintln!(
            "not checked: the origin in the build info of a {} (cmake's build info: {info})",
            ggml_trace_sys::LLAMA_CMAKE_BUILD
        );
    }
    assert_eq!(
        ggml_trace_sys::llama_version(),
        format!("llama.cpp from {} ({info})", ggml_trace_sys::LLAMA_ORIGIN)
    );
}

#[test]
fn llama_cpp_dir_points_at_the_tree() {
    let dir = std::path::Path::new(ggml_trace_sys::LLAMA_CPP_DIR);
    assert!(dir.join("include/llama.h").is_file());
}
