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
//! Before compiling, the script reads the C enum values the Rust side uses (op codes,
//! types, flags) from the tree's headers (build/enums.rs) and checks that the structs the
//! Rust side reads have the committed bindings' layout (build/layout.rs).
//!
//! The tree is `vendor/llama.cpp`, or `$KCM_LLAMA_SRC` (`cargo xtask build-llama
//! --llama-src PATH`).
//!
//! With `$KCM_LLAMA_BUILD` (`cargo xtask build-llama --llama-build DIR`) nothing of
//! llama.cpp is compiled: the libraries of that cmake build are linked (build/cmake.rs)
//! and only kcm_shim is compiled, against the headers of the tree the build was
//! configured from (`$KCM_LLAMA_SRC` when set, which must be that tree).
//!
//! Each archive is cached in `<target-dir>/kcm-llama/<name>-<fingerprint>/`,
//! shared by all profiles and by `cargo clippy` (build/cache.rs).

#[path = "build/cache.rs"]
mod cache;
#[path = "build/cmake.rs"]
mod cmake;
#[path = "build/cmake_lists.rs"]
mod cmake_lists;
#[path = "build/compile.rs"]
mod compile;
#[path = "build/cpu.rs"]
mod cpu;
#[path = "build/enums.rs"]
mod enums;
#[path = "build/generated.rs"]
mod generated;
#[path = "build/layout.rs"]
mod layout;
#[path = "build/sources.rs"]
mod sources;

use std::path::{Path, PathBuf};

/// Written by `cargo xtask build-llama` after the tree is complete
/// (xtask/src/llama_tree.rs, `STAMP`).
const STAMP: &str = ".kcm-tree-stamp";

fn main() {
    let manifest_dir = PathBuf::from(env("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env("OUT_DIR"));
    let cmake_build = std::env::var_os(cmake::BUILD_ENV)
        .filter(|s| !s.is_empty())
        .map(PathBuf::from);
    let tree = locate_tree(&manifest_dir, cmake_build.as_deref());
    let csrc = manifest_dir.join("csrc");
    let sys_rs = manifest_dir.join("src/sys.rs");
    emit_rerun_directives(&tree, &csrc, &sys_rs);
    let plan =
        cmake_build.map(|build| cmake::plan(&build, &tree.path).unwrap_or_else(|e| fail(&e)));

    let mixed = detect_mixed_kv(&tree);
    emit_features(mixed);
    let committed = std::fs::read_to_string(&sys_rs)
        .unwrap_or_else(|e| fail(&format!("cannot read {}: {e}", sys_rs.display())));
    generate_enums(&tree.path, &committed, &out_dir);
    guard_layouts(&tree.path, &csrc, &committed, &out_dir, mixed);

    let cache = cache::Cache::new(&out_dir);
    let mut roots = vec![(tree.path.clone(), "<llama.cpp>"), (csrc.clone(), "<csrc>")];
    let libs = match &plan {
        // The cmake build has everything but our shim (and its common has its own
        // download code: csrc/kcm_no_download.cpp is not compiled).
        Some(_) => vec![sources::kcm_shim(&tree.path, &csrc, mixed)],
        None => {
            let files =
                generated::render(&tree.path, &tree.version, &tree.origin, tree.build_number);
            let gen = generated::write_all(&files, &cache.generated_dir(&files));
            // The generated files' directory is named by their content; their content is
            // hashed where it matters (the headers of an include directory,
            // build-info.cpp, the unity batches), so its name must not make every key of
            // a library differ (a staged copy of the tree, with another origin in
            // build-info.cpp, would otherwise recompile llama and ggml-base).
            roots.push((gen.include_dir.clone(), "<gen>"));
            let cpu = cpu::CpuFlags::for_host();
            let libs = sources::libraries(&tree.path, &csrc, &gen, &cpu, mixed);
            report_cpu(&cpu);
            libs
        }
    };
    roots.push((cache.root().to_path_buf(), "<cache>"));
    let lib_dirs = compile::compile_all(&libs, &cache, &roots);
    report(&libs, &lib_dirs);

    emit_link_directives(&libs, &lib_dirs, plan.as_ref());
    emit_metadata(&tree, &csrc, plan.as_ref());
}

/// One line on stderr (cargo shows it under the failed build script) and exit 1.
fn fail(msg: &str) -> ! {
    eprintln!("{msg}");
    std::process::exit(1);
}

fn env(key: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| panic!("cargo sets {key}"))
}

/// Names the environment variable that points the build at another llama.cpp tree.
const SRC_ENV: &str = "KCM_LLAMA_SRC";

/// The llama.cpp source tree being built.
struct Tree {
    path: PathBuf,
    /// Where it came from, for `llama_version()` and build-info: the pin's package
    /// (`llama-cpp-sys-2 0.1.161`), `git describe` of a checkout, or the stamp that
    /// `cargo xtask build-llama --llama-src` wrote into a staged copy.
    origin: String,
    /// llama.cpp's build number (`git rev-list --count HEAD`), 0 when unknown.
    build_number: u64,
    /// llama.cpp's version (`LLAMA_VERSION`, e.g. `0.6.0-dev`): the stamp's `llama-version`,
    /// else the tree's top-level CMakeLists.txt, else the pin's.
    version: String,
    /// `vendor/llama.cpp`, the tree the committed bindings were generated from.
    pinned: bool,
}

/// `$KCM_LLAMA_SRC` when set, else the source tree of the cmake build `cmake_build`
/// (`$KCM_LLAMA_BUILD`) when given, else the prepared `vendor/llama.cpp`; exits with one
/// line when none is usable.
fn locate_tree(manifest_dir: &Path, cmake_build: Option<&Path>) -> Tree {
    let given = match std::env::var_os(SRC_ENV).filter(|s| !s.is_empty()) {
        Some(src) => Some((PathBuf::from(src), SRC_ENV)),
        None => cmake_build.map(|build| {
            let src = cmake::source_of(build).unwrap_or_else(|e| fail(&e));
            (src, "the source tree of KCM_LLAMA_BUILD")
        }),
    };
    if let Some((given, what)) = given {
        let path = given.canonicalize().unwrap_or_else(|e| {
            fail(&format!("{what}={}: {e}", given.display()));
        });
        for needed in ["ggml/include/ggml.h", "include/llama.h", "src", "common"] {
            if !path.join(needed).exists() {
                fail(&format!(
                    "{what}={}: not a llama.cpp source tree (no {needed})",
                    given.display()
                ));
            }
        }
        let (origin, build_number) = describe(&path);
        return Tree {
            version: version_of(&path),
            path,
            origin,
            build_number,
            pinned: false,
        };
    }
    let tree = manifest_dir.join("../../vendor/llama.cpp");
    match tree.join(STAMP).canonicalize() {
        Ok(stamp) => {
            let path = stamp
                .parent()
                .expect("the stamp is inside the tree")
                .to_path_buf();
            let (origin, build_number) = describe(&path);
            Tree {
                version: version_of(&path),
                path,
                origin,
                build_number,
                pinned: true,
            }
        }
        Err(_) => fail("vendor/llama.cpp is missing: run `cargo xtask build-llama`"),
    }
}

/// llama.cpp's version of a tree: its stamp's `llama-version` line (a copy staged by xtask),
/// else its top-level CMakeLists.txt, else the pin's version.
fn version_of(tree: &Path) -> String {
    let stamp = std::fs::read_to_string(tree.join(STAMP)).unwrap_or_default();
    stamp
        .lines()
        .find_map(|l| {
            l.strip_prefix("llama-version ")
                .map(|v| v.trim().to_string())
        })
        .or_else(|| generated::llama_version(tree))
        .unwrap_or_else(|| generated::PINNED_LLAMA_VERSION.to_string())
}

/// (origin, build number) of a tree: its stamp's `origin`/`build-number` lines (or first
/// line) when it has one, else `git describe --tags --always --dirty` and
/// `git rev-list --count HEAD` when it is a git checkout, else ([`unversioned`], 0).
fn describe(tree: &Path) -> (String, u64) {
    if let Ok(stamp) = std::fs::read_to_string(tree.join(STAMP)) {
        let field = |key: &str| {
            stamp
                .lines()
                .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
        };
        let origin = field("origin ")
            .or_else(|| stamp.lines().next().map(str::to_string))
            .unwrap_or_else(|| "unknown".into());
        let number = field("build-number ")
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        return (origin, number);
    }
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(tree)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .filter(|s| !s.is_empty())
    };
    // Only a checkout whose top level is the tree itself: a tree unpacked inside some
    // other repository (a source package in a project) must not take that one's commit.
    let top = git(&["rev-parse", "--show-toplevel"]).map(PathBuf::from);
    if top.and_then(|t| t.canonicalize().ok()).as_deref() == Some(tree) {
        let origin = git(&["describe", "--tags", "--always", "--dirty"])
            .map(|d| format!("git {d}"))
            .unwrap_or_else(|| "unknown".into());
        let number = git(&["rev-list", "--count", "HEAD"])
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        return (origin, number);
    }
    (unversioned(tree), 0)
}

/// The origin of a tree that is not a git checkout: its last two path components, three
/// under a `vendor` directory (`tree llama_cpp_python-0.3.36/vendor/llama.cpp (not a git
/// checkout)`), which usually name the source package.
fn unversioned(tree: &Path) -> String {
    let parts: Vec<String> = tree
        .components()
        .rev()
        .take(shown_components(tree))
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let shown: Vec<&str> = parts.iter().rev().map(String::as_str).collect();
    format!("tree {} (not a git checkout)", shown.join("/"))
}

/// Names of the capability the build detects, in `--version` and the build output.
const MIXED_FEATURE: &str = "mixed-kv-cache";

/// Whether the tree has our mixed KV cache (vendor/patches 0001-0005): the declarations
/// production code links (`llama_mixed_attn_get_params`, `llama_mixed_attn` in llama.h)
/// and common's options (`mixed_kv_cache`, `mixed_swa_type` in common.h). Without it the crate is built
/// without `cfg(kcm_mixed_kv)`: the capture's mixed path, the shim's options and the
/// `llama_context_params` fields are left out, and the tools refuse `--mixed-kv-cache`.
fn detect_mixed_kv(tree: &Tree) -> bool {
    let llama_h = std::fs::read_to_string(tree.path.join("include/llama.h")).unwrap_or_default();
    let common_h = std::fs::read_to_string(tree.path.join("common/common.h")).unwrap_or_default();
    let present = llama_h.contains("llama_mixed_attn_get_params")
        && llama_h.contains("llama_mixed_attn(")
        && common_h.contains("mixed_kv_cache")
        && common_h.contains("mixed_swa_type");
    if !present {
        // A copy staged by `--with-patches` whose patches did not apply says which one.
        let stamp = std::fs::read_to_string(tree.path.join(STAMP)).unwrap_or_default();
        let why = stamp
            .lines()
            .find_map(|l| l.strip_prefix("unpatched: "))
            .map(|w| format!("vendor/patches/{w}"))
            .unwrap_or_else(|| "vendor/patches are not applied".into());
        println!(
            "cargo:warning=kcm: llama.cpp at {} has no mixed KV cache ({why}): building without it (--mixed-kv-cache is refused)",
            tree.path.display()
        );
    }
    present
}

/// The cfg and constants that say what the tree has (`ggml_trace_sys::MIXED_KV_CACHE`,
/// `ggml_trace_sys::FEATURES`), and `DEP_KCM_LLAMA_MIXED_KV` for dependents' build scripts.
fn emit_features(mixed: bool) {
    println!("cargo:rustc-check-cfg=cfg(kcm_mixed_kv)");
    if mixed {
        println!("cargo:rustc-cfg=kcm_mixed_kv");
    }
    println!("cargo:rustc-env=KCM_MIXED_KV={mixed}");
    println!("cargo:mixed_kv={}", u8::from(mixed));
    let features = if mixed {
        MIXED_FEATURE.to_string()
    } else {
        format!("no {MIXED_FEATURE}")
    };
    println!("cargo:rustc-env=KCM_LLAMA_FEATURES={features}");
    println!("kcm: features: {features}");
}

/// Generates `$OUT_DIR/tree_enums.rs` (the tree's values of the enums in
/// [`enums::ENUMS`], shadowing the committed ones in `sys`) and
/// `$OUT_DIR/tree_enum_pairs.rs` (names in both, for the test comparing them).
fn generate_enums(tree: &Path, committed: &str, out_dir: &Path) {
    let mut parsed = Vec::new();
    for (name, header) in enums::ENUMS {
        let path = tree.join(header);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| fail(&format!("cannot read {}: {e}", path.display())));
        match enums::parse_enum(&text, name) {
            Ok(Some(values)) => parsed.push((name.to_string(), values)),
            Ok(None) => fail(&format!("{} has no `enum {name}`", path.display())),
            Err(e) => fail(&format!("{}: {e}", path.display())),
        }
    }
    let r = enums::render(&parsed, committed)
        .unwrap_or_else(|e| fail(&format!("{}: {e}", tree.display())));
    if !r.changed.is_empty() {
        let list: Vec<String> = r
            .changed
            .iter()
            .map(|(n, was, now)| format!("{n} {was}->{now}"))
            .collect();
        println!(
            "cargo:warning=kcm: {} enum value(s) of this llama.cpp tree differ from the committed bindings; using the tree's: {}",
            list.len(),
            abbreviate(&list)
        );
    }
    if !r.missing.is_empty() {
        println!(
            "cargo:warning=kcm: not in this llama.cpp tree (they never match): {}",
            abbreviate(&r.missing)
        );
    }
    let pairs: String = r
        .common
        .iter()
        .map(|n| format!("    (\"{n}\", sys::{n} as i64, committed::{n} as i64),\n"))
        .collect();
    let write = |name: &str, text: &str| {
        let path = out_dir.join(name);
        std::fs::write(&path, text)
            .unwrap_or_else(|e| fail(&format!("cannot write {}: {e}", path.display())));
    };
    write("tree_enums.rs", &r.rust);
    write("tree_enum_pairs.rs", &format!("&[\n{pairs}]\n"));
}

/// The first few items of `list`, and how many more.
fn abbreviate(list: &[String]) -> String {
    const SHOWN: usize = 8;
    let mut s = list[..list.len().min(SHOWN)].join(", ");
    if list.len() > SHOWN {
        s.push_str(&format!(", ... ({} more)", list.len() - SHOWN));
    }
    s
}

/// The struct layout guard (build/layout.rs): fails the build with one line when a struct
/// the Rust side reads through the committed bindings has another layout in this tree.
///
/// Without the mixed KV cache, `llama_context_params` lacks the patch's three fields (its
/// last): their offsets and the struct's size are not checked, and the Rust side never
/// builds that struct in such a build (`cfg(kcm_mixed_kv)`; the one test that does is
/// skipped).
fn guard_layouts(tree: &Path, csrc: &Path, committed: &str, out_dir: &Path, mixed: bool) {
    let checks = layout::checks(committed, layout::GUARDED);
    if checks.len() < layout::GUARDED.len() {
        fail("src/sys.rs: the committed bindings have no layout tests for the guarded structs");
    }
    let checks = if mixed {
        checks
    } else {
        layout::without_mixed_kv(checks)
    };
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .cargo_metadata(false)
        .warnings(false)
        .include(tree.join("include"))
        .include(tree.join("ggml/include"))
        .include(csrc);
    let compiler = build.get_compiler().to_command();
    let source = layout::render(&checks);
    if let Err(what) = layout::verify(compiler, &source, &out_dir.join("kcm_layout_guard.cpp")) {
        fail(&format!(
            "llama.cpp at {} does not match the committed bindings: {what}; regenerate them with `cargo xtask bindgen --llama-src {}`",
            tree.display(),
            tree.display()
        ));
    }
}

/// Rerun only when the tree is re-prepared (its stamp changes), our own C sources or the
/// committed bindings change, or the CPU flag override changes; not for every vendored file
/// of the pinned tree. For another tree, rerun when any of its files changes.
fn emit_rerun_directives(tree: &Tree, csrc: &Path, sys_rs: &Path) {
    if !tree.pinned {
        // Cargo scans these directories recursively; the compile cache then rebuilds
        // only the libraries whose inputs changed.
        for dir in [
            "ggml/include",
            "ggml/src",
            "include",
            "src",
            "common",
            "vendor",
        ] {
            // Only existing paths: cargo reruns every time for a missing one.
            let path = tree.path.join(dir);
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
    if tree.pinned || tree.path.join(STAMP).exists() {
        println!("cargo:rerun-if-changed={}", tree.path.join(STAMP).display());
    }
    println!("cargo:rerun-if-env-changed={SRC_ENV}");
    println!("cargo:rerun-if-env-changed={}", cmake::BUILD_ENV);
    println!("cargo:rerun-if-changed={}", sys_rs.display());
    println!("cargo:rerun-if-changed={}", csrc.display());
    println!("cargo:rerun-if-env-changed={}", cpu::OVERRIDE_ENV);
    println!("cargo:rerun-if-env-changed={}", compile::DEBUG_ENV);
}

/// A summary in the build script's output (`cargo build -vv`, or
/// target/*/build/ggml-trace-sys-*/output).
fn report(libs: &[compile::Library], lib_dirs: &[PathBuf]) {
    for (lib, dir) in libs.iter().zip(lib_dirs) {
        println!(
            "kcm: lib{}.a from {} sources in {}",
            lib.name,
            lib.source_count(),
            dir.display()
        );
    }
}

fn report_cpu(cpu: &cpu::CpuFlags) {
    println!(
        "kcm: ggml-cpu flags: {} {}",
        cpu.flags.join(" "),
        cpu.no_amx.join(" ")
    );
    println!("kcm: ggml-cpu defines: {}", cpu.defines.join(" "));
}

fn emit_link_directives(
    libs: &[compile::Library],
    lib_dirs: &[PathBuf],
    plan: Option<&cmake::Plan>,
) {
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
    let Some(plan) = plan else {
        for system in ["stdc++", "m", "pthread", "dl"] {
            println!("cargo:rustc-link-lib=dylib={system}");
        }
        return;
    };
    emit_cmake_link(plan);
}

/// The libraries of a cmake build (build/cmake.rs), its system libraries, the rpath of
/// this package's own tests and benches, and a warning when other packages' executables
/// would lack it.
fn emit_cmake_link(plan: &cmake::Plan) {
    for input in plan.inputs() {
        println!("cargo:rerun-if-changed={}", input.display());
    }
    let mut searched: Vec<&Path> = Vec::new();
    for lib in &plan.libs {
        if !searched.contains(&lib.dir()) {
            println!("cargo:rustc-link-search=native={}", lib.dir().display());
            searched.push(lib.dir());
        }
        let kind = if lib.shared { "dylib" } else { "static" };
        println!("cargo:rustc-link-lib={kind}={}", lib.name);
        println!("kcm: linking {} ({kind})", lib.path.display());
    }
    for dir in &plan.system_dirs {
        println!("cargo:rustc-link-search=native={}", dir.display());
    }
    for system in &plan.system {
        println!("cargo:rustc-link-lib=dylib={system}");
    }
    println!(
        "kcm: cmake build at {} ({}); backends besides the CPU: {}",
        plan.build.display(),
        plan.kind(),
        if plan.backends.is_empty() {
            "none".to_string()
        } else {
            plan.backends.join(", ")
        }
    );
    let rpath = plan.rpath_dirs();
    if rpath.is_empty() {
        return;
    }
    let joined: Vec<String> = rpath.iter().map(|d| d.display().to_string()).collect();
    // Reaches this package's tests, benches and examples only.
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", joined.join(":"));
    let flags = std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    if !cmake::has_rpath(&flags, &rpath) {
        println!(
            "cargo:warning=kcm: linked shared libraries of {} without an rpath: to run the tools, export RUSTFLAGS=\"{}\" before building (cargo xtask build-llama --llama-build does), or LD_LIBRARY_PATH={} when running them",
            plan.build.display(),
            cmake::rpath_flag(&rpath),
            joined.join(":")
        );
    }
}

/// `links` metadata for dependents' build scripts, and the tree path for this
/// crate's code (`ggml_trace_sys::LLAMA_CPP_DIR`).
fn emit_metadata(tree: &Tree, csrc: &Path, plan: Option<&cmake::Plan>) {
    println!("cargo:root={}", tree.path.display());
    let includes = [
        tree.path.join("include"),
        tree.path.join("ggml/include"),
        tree.path.join("common"),
        csrc.to_path_buf(),
    ];
    let joined: Vec<String> = includes.iter().map(|p| p.display().to_string()).collect();
    println!("cargo:include={}", joined.join(","));
    println!("cargo:rustc-env=KCM_LLAMA_CPP_DIR={}", tree.path.display());
    println!("cargo:rustc-env=KCM_LLAMA_ORIGIN={}", tree.origin);
    println!("cargo:rustc-env=KCM_LLAMA_PINNED={}", tree.pinned);
    println!("cargo:rustc-env=KCM_LLAMA_VERSION={}", tree.version);
    let cmake = plan
        .map(|p| format!("cmake build at {} ({})", p.build.display(), p.kind()))
        .unwrap_or_default();
    println!("cargo:rustc-env=KCM_LLAMA_CMAKE={cmake}");
}

/// How many trailing path components name a tree that is not a git checkout: two
/// (`<parent>/<name>`), three when the parent is `vendor` (a source package's
/// `<package>/vendor/llama.cpp`, e.g. llama-cpp-python's).
fn shown_components(tree: &Path) -> usize {
    let parent = tree.parent().and_then(|p| p.file_name());
    if parent.is_some_and(|n| n == "vendor") {
        3
    } else {
        2
    }
}
