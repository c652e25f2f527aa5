//! What goes into each library: sources, include directories, defines.
//! Mirrors the cmake targets (ggml/src/CMakeLists.txt,
//! ggml/src/ggml-cpu/CMakeLists.txt, src/CMakeLists.txt, common/CMakeLists.txt)
//! for a static, non-OpenMP build with the CPU and RPC backends.

use std::path::{Path, PathBuf};

use crate::compile::Library;
use crate::cpu::{Arch, CpuFlags};
use crate::generated::Generated;

/// cmake's default (ggml/CMakeLists.txt).
const SCHED_MAX_COPIES: &str = "4";

/// common/ sources left out: the model download code needs cpp-httplib (and
/// for https OpenSSL); csrc/kcm_no_download.cpp provides stubs that fail with
/// a clear message instead. Only local model paths are supported.
const COMMON_EXCLUDED: &[&str] = &["download.cpp", "hf-cache.cpp"];

/// The libraries, in link order (dependents first).
///
/// `mixed_kv`: the tree has our mixed KV cache; our shim is compiled with `KCM_MIXED_KV=1`
/// (else `0`: its options and refusal checks are left out).
pub fn libraries(
    tree: &Path,
    csrc: &Path,
    gen: &Generated,
    cpu: &CpuFlags,
    mixed_kv: bool,
) -> Vec<Library> {
    vec![
        kcm_shim(tree, csrc, mixed_kv),
        common(tree, csrc, gen),
        llama(tree, gen),
        ggml(tree),
        ggml_rpc(tree),
        ggml_cpu(tree, cpu),
        ggml_base(tree, gen),
    ]
}

/// Defines that ggml/src/CMakeLists.txt adds for every target in its directory.
fn ggml_dir_defines() -> Vec<(&'static str, Option<&'static str>)> {
    vec![
        ("GGML_SCHED_MAX_COPIES", Some(SCHED_MAX_COPIES)),
        ("_XOPEN_SOURCE", Some("600")),
        ("_GNU_SOURCE", None),
    ]
}

fn ggml_base(tree: &Path, gen: &Generated) -> Library {
    let src = tree.join("ggml/src");
    let mut lib = Library::new("ggml-base");
    lib.add(&src, &["ggml.c", "ggml-alloc.c", "ggml-quants.c"]);
    lib.add(
        &src,
        &[
            "ggml.cpp",
            "ggml-backend.cpp",
            "ggml-backend-meta.cpp",
            "ggml-opt.cpp",
            "ggml-threading.cpp",
            "gguf.cpp",
        ],
    );
    lib.includes = vec![tree.join("ggml/include"), src, gen.include_dir.clone()];
    lib.defines = ggml_dir_defines();
    lib
}

/// The `ggml` target: the backend registry. GGML_USE_CPU makes it register
/// the CPU backend, GGML_USE_RPC the RPC backend (`--rpc host:port,...`), as
/// ggml's CMake does for GGML_CPU=ON and GGML_RPC=ON.
fn ggml(tree: &Path) -> Library {
    let src = tree.join("ggml/src");
    let mut lib = Library::new("ggml");
    lib.add(&src, &["ggml-backend-reg.cpp", "ggml-backend-dl.cpp"]);
    lib.includes = vec![tree.join("ggml/include"), src];
    lib.defines = ggml_dir_defines();
    lib.defines.push(("GGML_USE_CPU", None));
    lib.defines.push(("GGML_USE_RPC", None));
    lib
}

/// The RPC backend (ggml/src/ggml-rpc/CMakeLists.txt): the client that
/// `--rpc` registers, and `ggml_backend_rpc_start_server` (kcm-rpc-server).
/// TCP only: without GGML_RPC_RDMA no RDMA transport and no libibverbs;
/// transport-apple.cpp is macOS RDMA. No system library beyond libc.
fn ggml_rpc(tree: &Path) -> Library {
    let src = tree.join("ggml/src");
    let dir = src.join("ggml-rpc");
    let mut lib = Library::new("ggml-rpc");
    lib.add(&dir, &["ggml-rpc.cpp", "transport.cpp"]);
    lib.includes = vec![tree.join("ggml/include"), src, dir];
    lib.defines = ggml_dir_defines();
    lib
}

/// The CPU backend. Deliberately NOT compiled: ggml-cpu/amx/amx.cpp and
/// amx/mmq.cpp (AMX, see build/cpu.rs), arch/x86/cpu-feats.cpp (the feature
/// probe of dynamically loaded backends), kleidiai/ and spacemit/ (other CPUs),
/// and hbm.cpp's body (it is empty without GGML_USE_CPU_HBM).
fn ggml_cpu(tree: &Path, cpu: &CpuFlags) -> Library {
    let src = tree.join("ggml/src");
    let dir = src.join("ggml-cpu");
    let mut lib = Library::new("ggml-cpu");
    lib.add(&dir, &["ggml-cpu.c", "quants.c"]);
    lib.add(
        &dir,
        &[
            "ggml-cpu.cpp",
            "repack.cpp",
            "hbm.cpp",
            "traits.cpp",
            "binary-ops.cpp",
            "unary-ops.cpp",
            "vec.cpp",
            "ops.cpp",
            "tiled/tiled.cpp",
            "tiled/tiled-kernel.cpp",
            // GGML_LLAMAFILE is ON in a llama.cpp build (its CMakeLists.txt).
            "llamafile/sgemm.cpp",
        ],
    );
    if cpu.arch == Arch::X86 {
        lib.add(&dir, &["arch/x86/quants.c", "arch/x86/repack.cpp"]);
    }
    lib.includes = vec![tree.join("ggml/include"), src, dir];
    lib.defines = ggml_dir_defines();
    lib.defines
        .extend([("GGML_USE_CPU_REPACK", None), ("GGML_USE_LLAMAFILE", None)]);
    lib.defines.extend(cpu.defines.iter().map(|d| (*d, None)));
    lib.flags = cpu.flags.iter().chain(&cpu.no_amx).cloned().collect();
    lib
}

fn llama(tree: &Path, gen: &Generated) -> Library {
    let src = tree.join("src");
    let mut lib = Library::new("llama");
    lib.cpp.extend(cpp_files(&src));
    lib.cpp.extend(gen.unity_models.iter().cloned());
    // The unity batches #include these: their content must be fingerprinted.
    lib.extra_inputs = cpp_files(&tree.join("src/models"));
    lib.includes = vec![
        src,
        tree.join("include"),
        tree.join("ggml/include"),
        gen.include_dir.clone(),
    ];
    lib
}

/// common/*.cpp, common/jinja/*.cpp, common/parsers/*.cpp, build-info.cpp.
/// Not defined: LLAMA_SUBPROCESS (only server tools spawn processes),
/// LLAMA_USE_LLGUIDANCE (needs the llguidance Rust library).
fn common(tree: &Path, csrc: &Path, gen: &Generated) -> Library {
    let dir = tree.join("common");
    let mut lib = Library::new("common");
    for sub in [dir.clone(), dir.join("jinja"), dir.join("parsers")] {
        lib.cpp.extend(cpp_files(&sub).into_iter().filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            sub != dir || !COMMON_EXCLUDED.contains(&name)
        }));
    }
    lib.cpp.push(gen.build_info_cpp.clone());
    lib.cpp.push(csrc.join("kcm_no_download.cpp"));
    lib.includes = common_includes(tree);
    lib
}

/// Our C shim (csrc/kcm_shim.cpp, csrc/kcm_session.cpp) over common and llama.
pub fn kcm_shim(tree: &Path, csrc: &Path, mixed_kv: bool) -> Library {
    let mut lib = Library::new("kcm_shim");
    lib.cpp.push(csrc.join("kcm_shim.cpp"));
    lib.cpp.push(csrc.join("kcm_session.cpp"));
    lib.includes = common_includes(tree);
    lib.includes.push(csrc.to_path_buf());
    lib.defines
        .push(("KCM_MIXED_KV", Some(if mixed_kv { "1" } else { "0" })));
    lib
}

fn common_includes(tree: &Path) -> Vec<PathBuf> {
    vec![
        tree.join("common"),
        tree.join("include"),
        tree.join("ggml/include"),
        tree.join("vendor"),
    ]
}

/// The `*.cpp` files directly inside `dir`, sorted.
pub fn cpp_files(dir: &Path) -> Vec<PathBuf> {
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cpp"))
        .collect();
    files.sort();
    files
}
