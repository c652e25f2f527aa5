//! Linking the libraries of a user's own cmake build of llama.cpp (`KCM_LLAMA_BUILD=DIR`,
//! `cargo xtask build-llama --llama-build DIR`) instead of compiling llama.cpp with `cc`.
//! Only our shim is compiled then, against the headers of the source tree the build was
//! configured from. See docs/build.md, "Linking a cmake build".
//!
//! Nothing here runs a compiler: [`plan`] reads `DIR/CMakeCache.txt`, finds the libraries
//! under `DIR` and returns what to link, in link order. Used by build.rs and (through
//! `#[path]`) by xtask (the rpath of shared libraries) and by the unit tests in
//! tests/it/cmake_plan.rs. Only `std`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The environment variable that names the cmake build directory.
pub const BUILD_ENV: &str = "KCM_LLAMA_BUILD";

/// `CMakeCache.txt` entries: `NAME:TYPE=VALUE` lines, by name (comments and blank lines
/// skipped; a name may itself contain `:`, the type is after the last one before `=`).
pub fn parse_cache(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim_start)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with("//"))
        .filter_map(|l| {
            let (key, value) = l.split_once('=')?;
            let name = key.rsplit_once(':').map_or(key, |(name, _)| name);
            Some((name.trim_matches('"').to_string(), value.to_string()))
        })
        .collect()
}

/// cmake's truth of a value: `ON`, `YES`, `TRUE`, `Y` or a non-zero number.
pub fn is_on(value: Option<&String>) -> bool {
    let Some(v) = value else { return false };
    let v = v.trim().to_ascii_uppercase();
    matches!(v.as_str(), "ON" | "YES" | "TRUE" | "Y") || v.parse::<f64>().is_ok_and(|n| n != 0.0)
}

/// One library of the build, as found on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lib {
    /// The name for `-l` (`ggml-cpu` for `libggml-cpu.so`).
    pub name: String,
    /// The file found (for a shared library the unversioned `lib<name>.so` link).
    pub path: PathBuf,
    pub shared: bool,
}

impl Lib {
    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }
}

/// What to link for a cmake build.
#[derive(Debug)]
pub struct Plan {
    /// The build directory (canonical).
    pub build: PathBuf,
    /// `BUILD_SHARED_LIBS` of the build.
    pub shared: bool,
    /// The build's libraries, dependents first.
    pub libs: Vec<Lib>,
    /// System libraries after them (`-l`, dynamic).
    pub system: Vec<String>,
    /// Extra search directories for [`Plan::system`] (the CUDA toolkit's, OpenMP's).
    pub system_dirs: Vec<PathBuf>,
    /// Backends besides the CPU one (`ggml-rpc`, `ggml-cuda`, ...), for the build output.
    pub backends: Vec<String>,
}

impl Plan {
    /// The directories holding shared libraries: the executables' rpath.
    pub fn rpath_dirs(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = Vec::new();
        for lib in self.libs.iter().filter(|l| l.shared) {
            let dir = lib.dir().to_path_buf();
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
        dirs
    }

    /// `shared libraries` or `static libraries`, for `--version`.
    pub fn kind(&self) -> &'static str {
        if self.shared {
            "shared libraries"
        } else {
            "static libraries"
        }
    }

    /// The files the build script reruns on.
    pub fn inputs(&self) -> Vec<PathBuf> {
        let mut files = vec![self.build.join("CMakeCache.txt")];
        files.extend(self.libs.iter().map(|l| l.path.clone()));
        files
    }
}

/// Where a cmake build of llama.cpp puts libraries: `bin/` (llama.cpp sets
/// CMAKE_LIBRARY_OUTPUT_DIRECTORY there for shared libraries), else next to their
/// CMakeLists.txt. Searched in this order; the first hit of a name wins.
pub const LIB_DIRS: &[&str] = &[
    "bin",
    "lib",
    "src",
    "ggml/src",
    "common",
    "vendor/cpp-httplib",
];

/// Subdirectories of `ggml/src` searched for backend libraries (`ggml/src/ggml-cuda/`, ...).
const BACKEND_PARENT: &str = "ggml/src";

/// The libraries every build must have, by their current and older target names:
/// (names, what it is). `llama-common` was `common` before upstream renamed it.
const REQUIRED: &[(&[&str], &str)] = &[
    (
        &["llama-common", "common"],
        "llama.cpp's common library (LLAMA_BUILD_COMMON=ON)",
    ),
    (&["llama"], "libllama"),
    (&["ggml"], "ggml"),
    (&["ggml-cpu"], "the CPU backend"),
    (&["ggml-base"], "ggml-base"),
];

/// Libraries that common links publicly when present (static even in a shared build):
/// build info (`llama-common-base`, `build_info` before).
const COMMON_EXTRAS: &[&str] = &["llama-common-base", "build_info"];

/// What common links privately: part of a shared common, linked after a static one.
const COMMON_PRIVATE: &[&str] = &["cpp-httplib"];

/// Finds `lib<name>.{so,dylib,a}` in the build directory's usual places (and the backend
/// subdirectories of ggml/src): name -> library. A shared library wins over a static one
/// of the same name.
pub fn find_libs(build: &Path) -> BTreeMap<String, Lib> {
    let mut dirs: Vec<PathBuf> = LIB_DIRS.iter().map(|d| build.join(d)).collect();
    if let Ok(entries) = std::fs::read_dir(build.join(BACKEND_PARENT)) {
        let mut subs: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir() && !p.ends_with("CMakeFiles"))
            .collect();
        subs.sort();
        dirs.extend(subs);
    }
    let mut found: BTreeMap<String, Lib> = BTreeMap::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut files: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        files.sort();
        for path in files {
            let Some((name, shared)) = lib_name(&path) else {
                continue;
            };
            match found.get(&name) {
                Some(old) if old.shared || !shared => {}
                _ => {
                    found.insert(name.clone(), Lib { name, path, shared });
                }
            }
        }
    }
    found
}

/// (`-l` name, shared) of a library file name: `libggml.so`, `libggml.dylib`, `libggml.a`.
/// Versioned shared names (`libllama.so.0`) are skipped: cmake makes the unversioned link.
pub fn lib_name(path: &Path) -> Option<(String, bool)> {
    let file = path.file_name()?.to_str()?;
    let stem = file.strip_prefix("lib")?;
    for (ext, shared) in [(".so", true), (".dylib", true), (".a", false)] {
        if let Some(name) = stem.strip_suffix(ext) {
            if !name.is_empty() && !name.contains('.') {
                return Some((name.to_string(), shared));
            }
        }
    }
    None
}

/// Reads the build at `build`, checks that it was configured from `tree` and refuses what
/// the tools cannot use; the error is one line.
pub fn plan(build: &Path, tree: &Path) -> Result<Plan, String> {
    let shown = build.display();
    let build = build
        .canonicalize()
        .map_err(|e| format!("{BUILD_ENV}={shown}: {e}"))?;
    let cache_path = build.join("CMakeCache.txt");
    let text = std::fs::read_to_string(&cache_path).map_err(|e| {
        format!("{BUILD_ENV}={shown}: no CMakeCache.txt ({e}): not a cmake build directory")
    })?;
    let cache = parse_cache(&text);
    check_source(&cache, tree).map_err(|e| format!("{BUILD_ENV}={shown}: {e}"))?;
    refuse(&cache).map_err(|e| format!("{BUILD_ENV}={shown}: {e}"))?;
    let found = find_libs(&build);
    let mut plan = link_order(&found, &cache).map_err(|e| format!("{BUILD_ENV}={shown}: {e}"))?;
    plan.build = build;
    Ok(plan)
}

/// The source tree a build was configured from (`CMAKE_HOME_DIRECTORY`, else
/// `llama.cpp_SOURCE_DIR`).
pub fn source_dir(cache: &BTreeMap<String, String>) -> Option<PathBuf> {
    cache
        .get("CMAKE_HOME_DIRECTORY")
        .or_else(|| cache.get("llama.cpp_SOURCE_DIR"))
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
}

/// The source tree of the build at `build` (for a default `KCM_LLAMA_SRC`).
pub fn source_of(build: &Path) -> Result<PathBuf, String> {
    let text = std::fs::read_to_string(build.join("CMakeCache.txt")).map_err(|e| {
        format!(
            "{BUILD_ENV}={}: no CMakeCache.txt ({e}): not a cmake build directory",
            build.display()
        )
    })?;
    source_dir(&parse_cache(&text)).ok_or_else(|| {
        format!(
            "{BUILD_ENV}={}: CMakeCache.txt names no source directory (CMAKE_HOME_DIRECTORY)",
            build.display()
        )
    })
}

/// The build must come from `tree`: the headers our shim is compiled against and the
/// enums and layouts checked are that tree's.
pub fn check_source(cache: &BTreeMap<String, String>, tree: &Path) -> Result<(), String> {
    let Some(recorded) = source_dir(cache) else {
        return Err("CMakeCache.txt names no source directory (CMAKE_HOME_DIRECTORY)".into());
    };
    let same = match (recorded.canonicalize(), tree.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => recorded == tree,
    };
    if same {
        Ok(())
    } else {
        Err(format!(
            "built from {}, not from the llama.cpp tree {} (set KCM_LLAMA_SRC={} or leave it unset)",
            recorded.display(),
            tree.display(),
            recorded.display()
        ))
    }
}

/// Builds the tools cannot link (one line each).
pub fn refuse(cache: &BTreeMap<String, String>) -> Result<(), String> {
    if is_on(cache.get("GGML_BACKEND_DL")) {
        return Err("built with GGML_BACKEND_DL=ON (backends loaded at run time), which the tools do not support yet: configure with -DGGML_BACKEND_DL=OFF".into());
    }
    if cache.get("LLAMA_BUILD_COMMON").is_some() && !is_on(cache.get("LLAMA_BUILD_COMMON")) {
        return Err("built with LLAMA_BUILD_COMMON=OFF: the tools need llama.cpp's common library (configure with -DLLAMA_BUILD_COMMON=ON)".into());
    }
    Ok(())
}

/// The link order of the libraries found (dependents first): common and what it links,
/// llama, ggml, the other backends (sorted by name), ggml-cpu, ggml-base; then the system
/// libraries. Fails naming the first required library not found.
pub fn link_order(
    found: &BTreeMap<String, Lib>,
    cache: &BTreeMap<String, String>,
) -> Result<Plan, String> {
    let [common, llama, ggml, cpu, base] = REQUIRED else {
        unreachable!("five required libraries")
    };
    let mut libs = Vec::new();
    let mut take = |names: &[&str], what: &str, required: bool| -> Result<(), String> {
        match names.iter().find_map(|n| found.get(*n)) {
            Some(lib) => {
                libs.push(lib.clone());
                Ok(())
            }
            None if required => Err(format!(
                "no lib{}.{{so,a}} ({what}) under it: build it first (`cmake --build DIR`)",
                names[0]
            )),
            None => Ok(()),
        }
    };
    let common_static = common
        .0
        .iter()
        .find_map(|n| found.get(*n))
        .is_some_and(|l| !l.shared);
    take(common.0, common.1, true)?;
    for extra in COMMON_EXTRAS {
        take(&[extra], extra, false)?;
    }
    if common_static {
        for private in COMMON_PRIVATE {
            take(&[private], private, false)?;
        }
    }
    take(llama.0, llama.1, true)?;
    take(ggml.0, ggml.1, true)?;
    let backends: Vec<String> = found
        .keys()
        .filter(|n| n.starts_with("ggml-") && !["ggml-cpu", "ggml-base"].contains(&n.as_str()))
        .cloned()
        .collect();
    for b in &backends {
        take(&[b], b, true)?;
    }
    take(cpu.0, cpu.1, true)?;
    take(base.0, base.1, true)?;

    let shared = is_on(cache.get("BUILD_SHARED_LIBS"));
    let (system, system_dirs) = system_libs(&libs, &backends, cache);
    Ok(Plan {
        build: PathBuf::new(),
        shared,
        libs,
        system,
        system_dirs,
        backends,
    })
}

/// What the static libraries need from the system (a shared library records its own):
/// OpenMP's libraries when the build used it (`OpenMP_CXX_LIB_NAMES`, e.g. `gomp;pthread`),
/// the CUDA runtime and cuBLAS for ggml-cuda, Vulkan for ggml-vulkan, `BLAS_LIBRARIES` for
/// ggml-blas; then the C++ runtime, m, pthread, dl.
pub fn system_libs(
    libs: &[Lib],
    backends: &[String],
    cache: &BTreeMap<String, String>,
) -> (Vec<String>, Vec<PathBuf>) {
    let mut names: Vec<String> = Vec::new();
    let mut dirs: Vec<PathBuf> = Vec::new();
    let add = |name: &str, names: &mut Vec<String>| {
        if !names.iter().any(|n| n == name) {
            names.push(name.to_string());
        }
    };
    let any_static = |lib: &str| libs.iter().any(|l| l.name == lib && !l.shared);
    let openmp = is_on(cache.get("GGML_OPENMP"))
        && cache
            .get("OpenMP_CXX_LIB_NAMES")
            .is_some_and(|s| !s.is_empty());
    if openmp && any_static("ggml-cpu") {
        for name in cache["OpenMP_CXX_LIB_NAMES"]
            .split(';')
            .filter(|s| !s.is_empty())
        {
            add(name, &mut names);
            if let Some(dir) = cache
                .get(&format!("OpenMP_{name}_LIBRARY"))
                .and_then(|p| Path::new(p).parent().map(Path::to_path_buf))
            {
                if !dirs.contains(&dir) {
                    dirs.push(dir);
                }
            }
        }
    }
    if backends.iter().any(|b| b == "ggml-cuda") && any_static("ggml-cuda") {
        for name in ["cudart", "cublas", "cublasLt", "cuda"] {
            add(name, &mut names);
        }
        if let Some(dir) = cache.get("CUDAToolkit_LIBRARY_DIR").map(PathBuf::from) {
            dirs.push(dir.clone());
            // libcuda.so (the driver API) is a stub at link time.
            dirs.push(dir.join("stubs"));
        }
    }
    if backends.iter().any(|b| b == "ggml-vulkan") && any_static("ggml-vulkan") {
        add("vulkan", &mut names);
    }
    if backends.iter().any(|b| b == "ggml-blas") && any_static("ggml-blas") {
        for path in cache
            .get("BLAS_LIBRARIES")
            .map(|s| s.split(';').map(PathBuf::from).collect::<Vec<_>>())
            .unwrap_or_default()
        {
            if let Some((name, _)) = lib_name(&path) {
                add(&name, &mut names);
                if let Some(dir) = path.parent() {
                    dirs.push(dir.to_path_buf());
                }
            }
        }
    }
    for name in ["stdc++", "m", "pthread", "dl"] {
        add(name, &mut names);
    }
    (names, dirs)
}

/// Whether `flags` (the `CARGO_ENCODED_RUSTFLAGS` of a build, `\x1f`-separated) give the
/// linker an rpath naming each of `dirs`.
pub fn has_rpath(flags: &str, dirs: &[PathBuf]) -> bool {
    dirs.iter().all(|d| {
        let d = d.display().to_string();
        flags
            .split(['\x1f', ' '])
            .any(|f| f.contains("-rpath") && f.split([',', '=', ':']).any(|p| p == d))
    })
}

/// The `-C link-arg` that gives executables an rpath to `dirs` (for `RUSTFLAGS`).
pub fn rpath_flag(dirs: &[PathBuf]) -> String {
    let list: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    format!("-C link-arg=-Wl,-rpath,{}", list.join(":"))
}
