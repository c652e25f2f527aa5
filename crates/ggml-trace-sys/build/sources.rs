//! What goes into each library: sources, include directories, defines.
//! Mirrors the cmake targets (ggml/src/CMakeLists.txt,
//! ggml/src/ggml-cpu/CMakeLists.txt, src/CMakeLists.txt, common/CMakeLists.txt)
//! for a static, non-OpenMP build with the CPU and RPC backends.
//!
//! The source files come from the tree's own CMake lists (build/cmake_lists.rs), so a
//! fork or a newer upstream that adds a file builds it; what this build deliberately
//! leaves out is excluded by name below, with the reason. When a list cannot be read
//! (no CMake file, a target renamed, a listed file missing), the built-in list of the
//! pinned tree (llama-cpp-sys-2 0.1.161) is used and the build says so in a warning.
//! Both lists are written to `$OUT_DIR/kcm_source_lists.txt`; a test checks that
//! they agree on the pinned tree.

use std::path::{Path, PathBuf};

use crate::cmake_lists;
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
    let mut report = Vec::new();
    let libs = vec![
        kcm_shim(tree, csrc, mixed_kv),
        common(tree, csrc, gen, &mut report),
        llama(tree, gen, &mut report),
        ggml(tree, &mut report),
        ggml_rpc(tree, &mut report),
        ggml_cpu(tree, cpu, &mut report),
        ggml_base(tree, gen, &mut report),
    ];
    for line in &report {
        if let Some(why) = &line.fallback {
            println!(
                "cargo:warning=kcm: {}: {why}; using the built-in source list of the pinned tree",
                line.library
            );
        }
    }
    let out_dir = std::env::var_os("OUT_DIR").map(PathBuf::from);
    if let Some(out_dir) = out_dir {
        let path = out_dir.join(LISTS_FILE);
        if let Err(e) = std::fs::write(&path, render_report(tree, &report)) {
            println!("cargo:warning=kcm: cannot write {}: {e}", path.display());
        }
    }
    libs
}

/// `$OUT_DIR/kcm_source_lists.txt`: for each library, where its list came from and both
/// lists (`cmake` and `builtin`), one source per line relative to the tree.
pub const LISTS_FILE: &str = "kcm_source_lists.txt";

/// How one library's source list was chosen.
struct ListReport {
    library: &'static str,
    /// The CMake file it was read from (relative to the tree).
    cmake_file: &'static str,
    /// What the CMake list gave (after the exclusions), or None when unreadable.
    from_cmake: Option<Vec<PathBuf>>,
    builtin: Vec<PathBuf>,
    /// Why the built-in list is used, when it is.
    fallback: Option<String>,
}

fn render_report(tree: &Path, report: &[ListReport]) -> String {
    let rel = |p: &PathBuf| {
        p.strip_prefix(tree)
            .unwrap_or(p)
            .to_string_lossy()
            .replace('\\', "/")
    };
    let mut out = String::new();
    for r in report {
        let used = if r.fallback.is_some() {
            "builtin"
        } else {
            "cmake"
        };
        out.push_str(&format!(
            "library {} {} {}\n",
            r.library, used, r.cmake_file
        ));
        for p in r.from_cmake.iter().flatten() {
            out.push_str(&format!("cmake {} {}\n", r.library, rel(p)));
        }
        for p in &r.builtin {
            out.push_str(&format!("builtin {} {}\n", r.library, rel(p)));
        }
    }
    out
}

/// Where a list lives in a CMake file: a target's sources or a variable's items.
enum Listed {
    Target(&'static [&'static str]),
    Var(&'static str),
}

/// The C and C++ sources of `what` in `tree/cmake_file` (read as the CMake file of
/// directory `tree/base`), less the `excluded` ones (predicate on the path relative to
/// `base`), or the built-in list with the reason. Records the choice in `report`.
fn choose(
    report: &mut Vec<ListReport>,
    library: &'static str,
    tree: &Path,
    (cmake_file, base): (&'static str, &str),
    what: Listed,
    excluded: &dyn Fn(&str) -> bool,
    builtin: Vec<PathBuf>,
) -> Vec<PathBuf> {
    let base = tree.join(base);
    let read = cmake_lists::read(&tree.join(cmake_file), &base).and_then(|lists| {
        let items = match what {
            Listed::Target(names) => names
                .iter()
                .find_map(|n| lists.targets.get(*n).cloned())
                .ok_or_else(|| format!("{cmake_file} has no target {}", names.join(" or ")))?,
            Listed::Var(name) => lists
                .var_paths(name, &base)
                .ok_or_else(|| format!("{cmake_file} never sets {name}"))?,
        };
        let mut sources = Vec::new();
        for item in items {
            let is_source = item.extension().is_some_and(|e| e == "c" || e == "cpp");
            let rel = item
                .strip_prefix(&base)
                .map(|r| r.to_string_lossy().replace('\\', "/"))
                .unwrap_or_default();
            if !is_source || excluded(&rel) || sources.contains(&item) {
                continue;
            }
            if !item.is_file() {
                return Err(format!(
                    "{cmake_file} lists {} which does not exist",
                    item.display()
                ));
            }
            sources.push(item);
        }
        if sources.is_empty() {
            return Err(format!("{cmake_file} lists no source of {library}"));
        }
        Ok(sources)
    });
    let (used, from_cmake, fallback) = match read {
        Ok(list) => (list.clone(), Some(list), None),
        Err(why) => (builtin.clone(), None, Some(why)),
    };
    report.push(ListReport {
        library,
        cmake_file,
        from_cmake,
        builtin,
        fallback,
    });
    used
}

/// `names` under `dir`.
fn under(dir: &Path, names: &[&str]) -> Vec<PathBuf> {
    names.iter().map(|n| dir.join(n)).collect()
}

/// Defines that ggml/src/CMakeLists.txt adds for every target in its directory.
fn ggml_dir_defines() -> Vec<(&'static str, Option<&'static str>)> {
    vec![
        ("GGML_SCHED_MAX_COPIES", Some(SCHED_MAX_COPIES)),
        ("_XOPEN_SOURCE", Some("600")),
        ("_GNU_SOURCE", None),
    ]
}

fn ggml_base(tree: &Path, gen: &Generated, report: &mut Vec<ListReport>) -> Library {
    let src = tree.join("ggml/src");
    let mut lib = Library::new("ggml-base");
    let builtin = under(
        &src,
        &[
            "ggml.c",
            "ggml-alloc.c",
            "ggml-quants.c",
            "ggml.cpp",
            "ggml-backend.cpp",
            "ggml-backend-meta.cpp",
            "ggml-opt.cpp",
            "ggml-threading.cpp",
            "gguf.cpp",
        ],
    );
    let sources = choose(
        report,
        lib.name,
        tree,
        GGML_SRC_LISTS,
        Listed::Target(&["ggml-base"]),
        &|_| false,
        builtin,
    );
    lib.add_sources(sources);
    lib.includes = vec![tree.join("ggml/include"), src, gen.include_dir.clone()];
    lib.defines = ggml_dir_defines();
    lib
}

/// ggml/src/CMakeLists.txt, read as the CMake file of ggml/src.
const GGML_SRC_LISTS: (&str, &str) = ("ggml/src/CMakeLists.txt", "ggml/src");

/// The `ggml` target: the backend registry. GGML_USE_CPU makes it register
/// the CPU backend, GGML_USE_RPC the RPC backend (`--rpc host:port,...`), as
/// ggml's CMake does for GGML_CPU=ON and GGML_RPC=ON.
fn ggml(tree: &Path, report: &mut Vec<ListReport>) -> Library {
    let src = tree.join("ggml/src");
    let mut lib = Library::new("ggml");
    let builtin = under(&src, &["ggml-backend-reg.cpp", "ggml-backend-dl.cpp"]);
    let sources = choose(
        report,
        lib.name,
        tree,
        GGML_SRC_LISTS,
        Listed::Target(&["ggml"]),
        &|_| false,
        builtin,
    );
    lib.add_sources(sources);
    lib.includes = vec![tree.join("ggml/include"), src];
    lib.defines = ggml_dir_defines();
    lib.defines.push(("GGML_USE_CPU", None));
    lib.defines.push(("GGML_USE_RPC", None));
    lib
}

/// The RPC backend (ggml/src/ggml-rpc/CMakeLists.txt): the client that
/// `--rpc` registers, and `ggml_backend_rpc_start_server` (kcm-rpc-server).
/// TCP only: without GGML_RPC_RDMA no RDMA transport and no libibverbs;
/// transport-apple.cpp (macOS RDMA) is left out. No system library beyond libc.
fn ggml_rpc(tree: &Path, report: &mut Vec<ListReport>) -> Library {
    let src = tree.join("ggml/src");
    let dir = src.join("ggml-rpc");
    let mut lib = Library::new("ggml-rpc");
    let builtin = under(&dir, &["ggml-rpc.cpp", "transport.cpp"]);
    let sources = choose(
        report,
        lib.name,
        tree,
        ("ggml/src/ggml-rpc/CMakeLists.txt", "ggml/src/ggml-rpc"),
        Listed::Target(&["ggml-rpc"]),
        &|rel| rel.contains("apple"),
        builtin,
    );
    lib.add_sources(sources);
    lib.includes = vec![tree.join("ggml/include"), src, dir];
    lib.defines = ggml_dir_defines();
    lib
}

/// Whether a source of `GGML_CPU_SOURCES` (relative to ggml/src) is deliberately NOT
/// compiled: ggml-cpu/amx/ (AMX, see build/cpu.rs), arch/*/cpu-feats.cpp (the feature
/// probe of dynamically loaded backends), kleidiai/ and spacemit/ (other CPUs), and the
/// arch/ directories of other architectures than `arch_dir` (all of them for `None`:
/// ggml's scalar fallbacks). hbm.cpp is compiled; its body is empty without
/// GGML_USE_CPU_HBM.
fn cpu_excluded(rel: &str, arch_dir: Option<&str>) -> bool {
    let Some(inner) = rel.strip_prefix("ggml-cpu/") else {
        return true;
    };
    if ["amx/", "kleidiai/", "spacemit/"]
        .iter()
        .any(|d| inner.starts_with(d))
    {
        return true;
    }
    if let Some(arch) = inner.strip_prefix("arch/") {
        return arch.ends_with("/cpu-feats.cpp")
            || arch_dir.is_none_or(|a| !arch.starts_with(&format!("{a}/")));
    }
    false
}

/// The CPU backend: `GGML_CPU_SOURCES` of ggml/src/ggml-cpu/CMakeLists.txt (paths there
/// are relative to ggml/src), less [`cpu_excluded`].
fn ggml_cpu(tree: &Path, cpu: &CpuFlags, report: &mut Vec<ListReport>) -> Library {
    let src = tree.join("ggml/src");
    let dir = src.join("ggml-cpu");
    let mut lib = Library::new("ggml-cpu");
    let mut names = vec![
        "ggml-cpu.c",
        "quants.c",
        "ggml-cpu.cpp",
        "repack.cpp",
        "hbm.cpp",
        "traits.cpp",
        "tiled/tiled.cpp",
        "tiled/tiled-kernel.cpp",
        "binary-ops.cpp",
        "unary-ops.cpp",
        "vec.cpp",
        "ops.cpp",
        // GGML_LLAMAFILE is ON in a llama.cpp build (its CMakeLists.txt).
        "llamafile/sgemm.cpp",
    ];
    let arch_dir = match cpu.arch {
        Arch::X86 => {
            names.extend(["arch/x86/quants.c", "arch/x86/repack.cpp"]);
            Some("x86")
        }
        Arch::Generic => None,
    };
    let sources = choose(
        report,
        lib.name,
        tree,
        ("ggml/src/ggml-cpu/CMakeLists.txt", "ggml/src"),
        Listed::Var("GGML_CPU_SOURCES"),
        &|rel| cpu_excluded(rel, arch_dir),
        under(&dir, &names),
    );
    lib.add_sources(sources);
    lib.includes = vec![tree.join("ggml/include"), src, dir];
    lib.defines = ggml_dir_defines();
    lib.defines
        .extend([("GGML_USE_CPU_REPACK", None), ("GGML_USE_LLAMAFILE", None)]);
    lib.defines.extend(cpu.defines.iter().map(|d| (*d, None)));
    lib.flags = cpu.flags.iter().chain(&cpu.no_amx).cloned().collect();
    lib
}

/// The `llama` target of src/CMakeLists.txt, less src/models/*.cpp: those are compiled
/// through the generated unity batches (as upstream's UNITY_BUILD does), which include
/// every model source.
fn llama(tree: &Path, gen: &Generated, report: &mut Vec<ListReport>) -> Library {
    let src = tree.join("src");
    let mut lib = Library::new("llama");
    let sources = choose(
        report,
        lib.name,
        tree,
        ("src/CMakeLists.txt", "src"),
        Listed::Target(&["llama"]),
        &|rel| rel.starts_with("models/"),
        cpp_files(&src),
    );
    lib.add_sources(sources);
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

/// The `llama-common` target of common/CMakeLists.txt (`common` in older trees), with
/// the generated build-info.cpp (llama-common-base upstream) and our download stubs.
/// Left out: download.cpp and hf-cache.cpp (see [`COMMON_EXCLUDED`]). Not defined:
/// LLAMA_SUBPROCESS (only server tools spawn processes), LLAMA_USE_LLGUIDANCE (needs the
/// llguidance Rust library).
fn common(tree: &Path, csrc: &Path, gen: &Generated, report: &mut Vec<ListReport>) -> Library {
    let dir = tree.join("common");
    let mut lib = Library::new("common");
    let mut builtin = Vec::new();
    for sub in [dir.clone(), dir.join("jinja"), dir.join("parsers")] {
        builtin.extend(cpp_files(&sub).into_iter().filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            sub != dir || !COMMON_EXCLUDED.contains(&name)
        }));
    }
    let sources = choose(
        report,
        lib.name,
        tree,
        ("common/CMakeLists.txt", "common"),
        Listed::Target(&["llama-common", "common"]),
        &|rel| COMMON_EXCLUDED.contains(&rel),
        builtin,
    );
    lib.add_sources(sources);
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
