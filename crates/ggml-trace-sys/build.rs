//! Builds the llama.cpp libraries this crate links, straight from
//! `vendor/llama.cpp` (prepared by `cargo xtask build-llama`) with the `cc`
//! crate; no cmake. See docs/build.md.
//!
//! Static libraries, in link order (dependents first):
//!   kcm_shim   our C shim over `common` (csrc/)
//!   common     llama.cpp's common/ (argument parsing, sampling, ...), without download code
//!   llama      src/*.cpp and src/models/*.cpp (the latter as unity batches, like upstream)
//!   ggml       the backend registry (ggml-backend-reg.cpp; GGML_USE_CPU, GGML_USE_RPC)
//!   ggml-rpc   the RPC backend (ggml-rpc/: client and server, TCP transport)
//!   ggml-cpu   the CPU backend, with host-specific SIMD flags (build/cpu.rs)
//!   ggml-base  ggml core, gguf, the scheduler
//!
//! Each archive is cached in `<target-dir>/kcm-llama/<name>-<fingerprint>/`,
//! shared by all profiles and by `cargo clippy` (build/cache.rs).

#[path = "build/cache.rs"]
mod cache;
#[path = "build/compile.rs"]
mod compile;
#[path = "build/cpu.rs"]
mod cpu;
#[path = "build/generated.rs"]
mod generated;
#[path = "build/sources.rs"]
mod sources;

use std::path::{Path, PathBuf};

/// Written by `cargo xtask build-llama` after the tree is complete
/// (xtask/src/llama_tree.rs, `STAMP`).
const STAMP: &str = ".kcm-tree-stamp";

fn main() {
    let manifest_dir = PathBuf::from(env("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env("OUT_DIR"));
    let tree = locate_tree(&manifest_dir);
    let csrc = manifest_dir.join("csrc");
    emit_rerun_directives(&tree, &csrc);

    let cache = cache::Cache::new(&out_dir);
    let files = generated::render(&tree);
    let gen = generated::write_all(&files, &cache.generated_dir(&files));
    let cpu = cpu::CpuFlags::for_host();
    let libs = sources::libraries(&tree, &csrc, &gen, &cpu);

    let roots = [
        (tree.clone(), "<llama.cpp>"),
        (csrc.clone(), "<csrc>"),
        (cache.root().to_path_buf(), "<cache>"),
    ];
    let lib_dirs = compile::compile_all(&libs, &cache, &roots);
    report(&libs, &cpu, &lib_dirs);

    emit_link_directives(&libs, &lib_dirs);
    emit_metadata(&tree, &csrc);
}

fn env(key: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| panic!("cargo sets {key}"))
}

/// The prepared llama.cpp tree; exits with one line when it is not there.
fn locate_tree(manifest_dir: &Path) -> PathBuf {
    let tree = manifest_dir.join("../../vendor/llama.cpp");
    match tree.join(STAMP).canonicalize() {
        Ok(stamp) => stamp
            .parent()
            .expect("the stamp is inside the tree")
            .to_path_buf(),
        Err(_) => {
            eprintln!("vendor/llama.cpp is missing: run `cargo xtask build-llama`");
            std::process::exit(1);
        }
    }
}

/// Rerun only when the tree is re-prepared (its stamp changes), our own C
/// sources change, or the CPU flag override changes; not for every vendored file.
fn emit_rerun_directives(tree: &Path, csrc: &Path) {
    println!("cargo:rerun-if-changed={}", tree.join(STAMP).display());
    println!("cargo:rerun-if-changed={}", csrc.display());
    println!("cargo:rerun-if-env-changed={}", cpu::OVERRIDE_ENV);
    println!("cargo:rerun-if-env-changed={}", compile::DEBUG_ENV);
}

/// A summary in the build script's output (`cargo build -vv`, or
/// target/*/build/ggml-trace-sys-*/output).
fn report(libs: &[compile::Library], cpu: &cpu::CpuFlags, lib_dirs: &[PathBuf]) {
    for (lib, dir) in libs.iter().zip(lib_dirs) {
        println!(
            "kcm: lib{}.a from {} sources in {}",
            lib.name,
            lib.source_count(),
            dir.display()
        );
    }
    println!(
        "kcm: ggml-cpu flags: {} {}",
        cpu.flags.join(" "),
        cpu.no_amx.join(" ")
    );
    println!("kcm: ggml-cpu defines: {}", cpu.defines.join(" "));
}

fn emit_link_directives(libs: &[compile::Library], lib_dirs: &[PathBuf]) {
    // Dependents before their dependencies: the linker resolves left to right.
    for (lib, dir) in libs.iter().zip(lib_dirs) {
        println!("cargo:rustc-link-search=native={}", dir.display());
        println!("cargo:rustc-link-lib=static={}", lib.name);
        // Rerun (and rebuild) if the cache entry disappears (rm -rf target/kcm-llama).
        println!(
            "cargo:rerun-if-changed={}",
            dir.join(cache::COMPLETE).display()
        );
    }
    for system in ["stdc++", "m", "pthread", "dl"] {
        println!("cargo:rustc-link-lib=dylib={system}");
    }
}

/// `links` metadata for dependents' build scripts, and the tree path for this
/// crate's code (`ggml_trace_sys::LLAMA_CPP_DIR`).
fn emit_metadata(tree: &Path, csrc: &Path) {
    println!("cargo:root={}", tree.display());
    let includes = [
        tree.join("include"),
        tree.join("ggml/include"),
        tree.join("common"),
        csrc.to_path_buf(),
    ];
    let joined: Vec<String> = includes.iter().map(|p| p.display().to_string()).collect();
    println!("cargo:include={}", joined.join(","));
    println!("cargo:rustc-env=KCM_LLAMA_CPP_DIR={}", tree.display());
}
